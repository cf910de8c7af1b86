"""Remote repositories: where objects live when they are not on this host (second redirection).

One layout, served two ways (docs/redirect.md, "Repository")::

    REPO/vfs-repo.json      {"format": "vfs-repo", "version": 1, "features": []}
    REPO/objects/ab/<id>    the object's plain bytes (so any static server can do Range on it)
    REPO/refs/<name>        a named reference: "<id>\\n"
    REPO/refs.json          every ref, {"name": "<id>"} (the listing a static server cannot make)

Backends: :class:`FileRemote` (a directory, e.g. an NFS share; the only one that can ``put``) and
:class:`vfs.redirect.http_remote.HttpRemote` (any static web server, CDN or bucket). A repository is
published over HTTP by copying the directory to the web root (``rsync -a REPO/
host:/var/www/repo/``): objects first, refs last.

Remotes never decide what is trusted: callers verify every byte against its id (the resolver
does it before anything is stored; :meth:`Remote.get` does it for small objects). What a remote
does enforce is every bound a lying repository could break: an object fetch stops at the size
the caller expects (``expected_size``) or may accept (``limit``), and repository metadata is
parsed strictly (:mod:`vfs.redirect.repometa`).
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import stat
import threading
import urllib.parse
from abc import ABC, abstractmethod
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

from vfs.durable import atomic_writer, fsync_dir, tmp_name, write_atomic
from vfs.errors import (
    FormatError,
    IntegrityError,
    NotFound,
    ObjectNotFound,
    RemoteUnavailable,
    StoreFull,
    UsageError,
)
from vfs.redirect.bounds import fetch_bound, size_mismatch, too_large
from vfs.redirect.objectid import check_object_id, new_hasher, object_id, shard
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

__all__ = ["BLOCK", "FileRemote", "Remote", "check_ref_name", "open_remote"]

BLOCK = 1 << 20
#: What :meth:`Remote.get` accepts when the caller knows no better (whole objects in memory).
GET_LIMIT = 1 << 30


class Remote(ABC):
    """A repository of objects. Subclasses are thread-safe."""

    url: str

    @abstractmethod
    def has(self, oid: str) -> bool: ...

    @abstractmethod
    def iter_object(
        self,
        oid: str,
        block: int = BLOCK,
        *,
        expected_size: int | None = None,
        limit: int | None = None,
    ) -> Iterator[bytes]:
        """The object's bytes in blocks, as the repository has them (unverified).

        ``expected_size``: the object's exact length as its reference says (a manifest entry, a
        cluster size): a repository that announces or sends another length is refused with
        :class:`SizeMismatch` (nothing past the size is ever read). Without it, ``limit``
        bounds what is read (:class:`IntegrityError` past it); without either, the format's
        16 TiB object limit does.
        """

    def get(
        self, oid: str, max_size: int = GET_LIMIT, *, expected_size: int | None = None
    ) -> bytes:
        """The whole object, verified against its id. For small objects (manifests, clusters):
        at most ``max_size`` bytes, or exactly ``expected_size``."""
        check_object_id(oid)
        parts = []
        for block in self.iter_object(oid, expected_size=expected_size, limit=max_size):
            parts.append(block)
        data = b"".join(parts)
        if object_id(data) != oid:
            raise IntegrityError(
                f"object {oid}: bytes from {self.url} do not match the id (lying or damaged "
                "repository); refused",
                oid=oid,
            )
        return data

    def put(self, data: bytes) -> str:
        raise UsageError(f"{self.url}: read-only repository (publish by copying the directory)")

    def put_file(self, path: str | os.PathLike[str]) -> str:
        raise UsageError(f"{self.url}: read-only repository (publish by copying the directory)")

    def put_stream(self, src: BinaryIO) -> str:
        raise UsageError(f"{self.url}: read-only repository (publish by copying the directory)")

    def set_ref(self, name: str, oid: str) -> None:
        raise UsageError(f"{self.url}: read-only repository (publish by copying the directory)")

    @abstractmethod
    def get_ref(self, name: str) -> str: ...

    @abstractmethod
    def list_refs(self) -> dict[str, str]: ...

    def close(self) -> None:  # noqa: B027 - optional hook, most backends hold nothing
        """Release connections."""

    def __enter__(self) -> Remote:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# --------------------------------------------------------------------------- file://


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

    def _path(self, oid: str) -> Path:
        return self.root / "objects" / shard(check_object_id(oid))

    def has(self, oid: str) -> bool:
        return self._path(oid).exists()

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
            f = _open_regular(self._path(oid), f"{self.url}: object {oid}")
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
            return self._path(oid).stat().st_size
        except FileNotFoundError:
            raise ObjectNotFound(f"object {oid} not in repository {self.url}", oid=oid) from None

    def put(self, data: bytes) -> str:
        oid = object_id(data)
        dest = self._path(oid)
        if dest.exists():
            return oid
        dest.parent.mkdir(exist_ok=True)
        with atomic_writer(dest) as f:
            f.write(data)
        return oid

    def put_file(self, path: str | os.PathLike[str]) -> str:
        """Upload a file, streaming: hashed while copied to a temp file, renamed when complete."""
        with open(path, "rb") as src:
            return self.put_stream(src)

    def put_stream(self, src: BinaryIO) -> str:
        """Upload everything readable from ``src`` (read once, constant memory)."""
        tmp = tmp_name(self.root / "objects")
        h = new_hasher()
        try:
            with open(tmp, "xb") as dst:
                while data := src.read(BLOCK):
                    h.update(data)
                    dst.write(data)
                dst.flush()
                os.fsync(dst.fileno())
            oid = h.hexdigest()
            dest = self._path(oid)
            if dest.exists():
                os.unlink(tmp)
                return oid
            dest.parent.mkdir(exist_ok=True)
            os.replace(tmp, dest)
            fsync_dir(dest.parent)
            return oid
        except BaseException as e:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
                raise StoreFull(f"no space left in repository {self.url}") from e
            raise

    def set_ref(self, name: str, oid: str) -> None:
        """Point ``name`` at ``oid``. The object must already be in the repository (refs are
        written last, so a reader that sees a ref can fetch everything it names)."""
        check_ref_name(name)
        check_object_id(oid)
        if not self.has(oid):
            raise ObjectNotFound(f"cannot set ref {name}: object {oid} is not in {self.url}")
        with self._refs_lock, _flock(self.root / ".refs.lock"):
            write_atomic(self.root / "refs" / name, oid.encode() + b"\n")
            refs = self._scan_refs()
            write_atomic(
                self.root / "refs.json", json.dumps(refs, indent=2, sort_keys=True).encode()
            )

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
        with _open_regular(self.root / "refs" / name, where) as f:
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
    import fcntl

    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _open_regular(path: Path, where: str) -> BinaryIO:
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
    with _open_regular(marker, where) as f:
        raw = f.read(MAX_META_BYTES + 1)  # the bound, before any parsing
    return parse_repo_meta(raw, where)


def open_remote(
    url: str,
    *,
    ca: str | None = None,
    cert: str | None = None,
    key: str | None = None,
    timeout: float = 10.0,
    retries: int = 4,
    backoff: float = 0.2,
    create: bool = False,
    proxy: str | None = None,
    min_rate: float | None = None,
    grace: float | None = None,
) -> Remote:
    """A repository from its URL: ``file:///dir``, a plain path, or ``http(s)://host/path``
    (optionally through an HTTP forward ``proxy``). ``timeout``, ``retries``, ``backoff``,
    ``min_rate`` and ``grace`` bound HTTP fetches (:class:`vfs.redirect.http_remote.HttpRemote`);
    None takes the documented default."""
    if url.startswith(("http://", "https://")):
        from vfs.redirect import http_remote

        return http_remote.HttpRemote(
            url,
            ca=ca,
            cert=cert,
            key=key,
            timeout=timeout,
            retries=retries,
            backoff=backoff,
            proxy=proxy,
            min_rate=http_remote.DEFAULT_MIN_RATE if min_rate is None else min_rate,
            grace=http_remote.DEFAULT_GRACE if grace is None else grace,
        )
    if proxy:
        raise UsageError("--proxy applies only to http(s):// repositories")
    if cert or key or ca:
        raise UsageError("--ca/--cert/--key apply only to https:// repositories")
    if url.startswith("file://"):
        path = urllib.parse.unquote(urllib.parse.urlsplit(url).path)
    elif "://" in url:
        raise UsageError(f"unsupported repository URL scheme in {url!r} (file, http, https)")
    else:
        path = url
    if not path:
        raise UsageError(f"invalid repository URL {url!r}")
    return FileRemote(path, create=create)
