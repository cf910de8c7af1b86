"""``file://`` repositories: a local or network-mounted directory (e.g. an NFS share).

The layout is the one every backend serves (:mod:`vfs.redirect.remote`, docs/redirect.md §2);
this is the only backend that writes: ``put`` stores an object durably (temporary file, fsync,
rename, fsync of the directory: :mod:`vfs.durable`), ``set_ref`` names one, last.

Freshening: an object a writer finds already present and reuses (``put`` of bytes the
repository has, :meth:`FileRemote.freshen` before skipping an upload) gets its mtime set to now.
Repository garbage collection (:mod:`vfs.redirect.repo_gc`) never removes an object younger
than its grace period, so an old unreferenced object that a publish running at the same time
decided to reuse survives until the publish's ref names it (git freshens reused loose objects
for the same reason).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import stat
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

from vfs import durable
from vfs.durable import write_atomic
from vfs.errors import FormatError, NotFound, ObjectNotFound, RemoteUnavailable
from vfs.redirect.bounds import fetch_bound, size_mismatch, too_large
from vfs.redirect.objectid import check_object_id, new_hasher, object_id, shard
from vfs.redirect.remote import BLOCK, Remote
from vfs.redirect.repometa import (
    MAX_META_BYTES,
    MAX_REF_BYTES,
    REPO_FORMAT,
    REPO_VERSION,
    check_ref_name,
    is_ref_name,
    parse_ref,
    parse_repo_meta,
)

log = logging.getLogger(__name__)

__all__ = ["FileRemote"]


class FileRemote(Remote):
    """A repository in a local or network-mounted directory."""

    def __init__(self, path: str | os.PathLike[str], *, create: bool = False) -> None:
        self.root = Path(path)
        self.url = f"file://{self.root.resolve()}"
        marker = self.root / "vfs-repo.json"
        if not marker.exists():
            if not create:
                raise NotFound(f"{self.url}: not a vfs repository (vfs-repo.json missing)")
            self.init(self.root)
        self.meta = _read_meta(marker, f"{self.url}/vfs-repo.json")
        self._refs_lock = threading.Lock()

    @staticmethod
    def init(path: str | os.PathLike[str]) -> Path:
        """Create an empty repository (idempotent: an existing one must be valid)."""
        root = Path(path)
        marker = root / "vfs-repo.json"
        if marker.exists():
            _read_meta(marker, f"file://{marker.resolve()}")
        (root / "objects").mkdir(parents=True, exist_ok=True)
        (root / "refs").mkdir(exist_ok=True)
        if not marker.exists():
            meta = {"format": REPO_FORMAT, "version": REPO_VERSION, "features": []}
            write_atomic(marker, json.dumps(meta, indent=2).encode() + b"\n")
        if not (root / "refs.json").exists():
            write_atomic(root / "refs.json", b"{}\n")
        return root

    def object_path(self, oid: str) -> Path:
        """Where object ``oid`` lives in the directory (it may not exist)."""
        return self.root / "objects" / shard(check_object_id(oid))

    def has(self, oid: str) -> bool:
        return self.object_path(oid).exists()

    def freshen(self, oid: str) -> bool:
        """Is the object here? If so, its mtime becomes now: a writer about to reuse it (and
        skip its upload) says so, and a garbage collection running meanwhile keeps it (module
        docstring). One ``utime``: it either finds the file or fails with ENOENT."""
        try:
            os.utime(self.object_path(oid))
            return True
        except FileNotFoundError:
            return False

    def iter_object(
        self,
        oid: str,
        block: int = BLOCK,
        *,
        expected_size: int | None = None,
        limit: int | None = None,
    ) -> Iterator[bytes]:
        bound = fetch_bound(oid, expected_size, limit)
        where = f"repository {self.url}"
        try:
            f = open_regular(self.object_path(oid), f"{self.url}: object {oid}")
        except FileNotFoundError:
            raise ObjectNotFound(f"object {oid} not in repository {self.url}", oid=oid) from None
        with f:
            size = os.fstat(f.fileno()).st_size
            if expected_size is not None and size != expected_size:
                raise size_mismatch(oid, size, expected_size, where)
            if size > bound:
                raise too_large(oid, bound, where)
            n = 0
            while data := f.read(min(block, bound - n + 1)):
                n += len(data)
                if n > bound:
                    raise too_large(oid, bound, where)
                yield data
            if expected_size is not None and n != expected_size:
                raise size_mismatch(oid, n, expected_size, where)

    def size(self, oid: str) -> int:
        try:
            return self.object_path(oid).stat().st_size
        except FileNotFoundError:
            raise ObjectNotFound(f"object {oid} not in repository {self.url}", oid=oid) from None

    def put(self, data: bytes) -> str:
        oid = object_id(data)
        if self.freshen(oid):
            return oid
        dest = self.object_path(oid)
        dest.parent.mkdir(exist_ok=True)
        with durable.new_file(dest.parent, full_message=self._full()) as pending:
            pending.write(data)
            pending.commit(dest)
        return oid

    def put_file(self, path: str | os.PathLike[str]) -> str:
        """Upload a file, streaming: hashed while copied to a temp file, renamed when complete."""
        with open(path, "rb") as src:
            return self.put_stream(src)

    def put_stream(self, src: BinaryIO) -> str:
        """Upload everything readable from ``src`` (read once, constant memory)."""
        h = new_hasher()
        with durable.new_file(self.root / "objects", full_message=self._full()) as pending:
            while data := src.read(BLOCK):
                h.update(data)
                pending.write(data)
            oid = h.hexdigest()
            if self.freshen(oid):
                return oid  # already here: the temporary copy is dropped
            dest = self.object_path(oid)
            dest.parent.mkdir(exist_ok=True)
            pending.commit(dest)
        return oid

    def _full(self) -> str:
        return f"no space left in repository {self.url}"

    def set_ref(self, name: str, oid: str) -> None:
        """Point ``name`` at ``oid``. The object must already be in the repository (refs are
        written last, so a reader that sees a ref can fetch everything it names); it is
        freshened, so a garbage collection that started before the ref cannot take it."""
        check_ref_name(name)
        check_object_id(oid)
        if not self.freshen(oid):
            raise ObjectNotFound(f"cannot set ref {name}: object {oid} is not in {self.url}")
        with self._refs_lock, _flock(self.root / ".refs.lock"):
            write_atomic(self.root / "refs" / name, oid.encode() + b"\n")
            refs = self._scan_refs()
            write_atomic(
                self.root / "refs.json", json.dumps(refs, indent=2, sort_keys=True).encode()
            )

    def delete_ref(self, name: str) -> str:
        """Remove ref ``name`` (retire a template or image name); return the id it named.

        The unlink of ``refs/NAME`` (then an fsync of ``refs/``) is the commit point; the
        listing ``refs.json`` is rewritten after it. A crash in between leaves the name in the
        listing but not resolvable (NotFound on use), and the next ``set_ref`` or
        ``delete_ref`` rewrites the listing. The objects stay: ``vfsd repo gc`` removes what no
        ref reaches any more, after its grace period."""
        check_ref_name(name)
        with self._refs_lock, _flock(self.root / ".refs.lock"):
            oid = self.get_ref(name)
            try:
                os.unlink(self.root / "refs" / name)
            except FileNotFoundError:
                raise NotFound(f"no ref {name!r} in {self.url}") from None
            durable.fsync_dir(self.root / "refs")
            refs = self._scan_refs()
            write_atomic(
                self.root / "refs.json", json.dumps(refs, indent=2, sort_keys=True).encode()
            )
        return oid

    def _scan_refs(self) -> dict[str, str]:
        """Every ref file: names that are no ref name (editor leftovers, temp files) and
        entries that are no regular file are not refs; a ref file that names no object id is
        a damaged repository (FormatError naming it)."""
        refs = {}
        for entry in sorted(os.scandir(self.root / "refs"), key=lambda e: e.name):
            if not is_ref_name(entry.name) or not entry.is_file(follow_symlinks=False):
                continue
            with contextlib.suppress(FileNotFoundError):  # removed meanwhile
                refs[entry.name] = self._read_ref(entry.name)
        return refs

    def _read_ref(self, name: str) -> str:
        where = f"{self.url}/refs/{name}"
        with open_regular(self.root / "refs" / name, where) as f:
            raw = f.read(MAX_REF_BYTES + 1)
        return parse_ref(raw, where)

    def get_ref(self, name: str) -> str:
        check_ref_name(name)
        try:
            return self._read_ref(name)
        except FileNotFoundError:
            raise NotFound(f"no ref {name!r} in {self.url}") from None

    def list_refs(self) -> dict[str, str]:
        return self._scan_refs()

    def iter_oids(self) -> Iterator[str]:
        for sub in sorted((self.root / "objects").iterdir()):
            if sub.is_dir():
                for p in sorted(sub.iterdir()):
                    if len(p.name) == 64:
                        yield p.name


@contextlib.contextmanager
def _flock(path: Path) -> Iterator[None]:
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def open_regular(path: Path, where: str) -> BinaryIO:
    """Open a repository file for reading; only regular files (a FIFO would block the open, a
    device or a symlink to one would never end). FileNotFoundError passes through."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK)
    except FileNotFoundError:
        raise
    except OSError as e:
        raise RemoteUnavailable(f"{where}: cannot open: {e.strerror or e}") from None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise FormatError(f"{where}: not a regular file")
        os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def _read_meta(marker: Path, where: str):
    with open_regular(marker, where) as f:
        raw = f.read(MAX_META_BYTES + 1)  # the bound, before any parsing
    return parse_repo_meta(raw, where)
