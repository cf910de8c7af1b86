"""Putting a template's content objects somewhere, once each: the sink every source feeds.

The sources (:mod:`vfs.tree.dirsource`, :mod:`vfs.tree.tarsource`) walk a tree and hand each
regular file's bytes to an :class:`ObjectSink`; :func:`vfs.tree.publish.publish_template` then
writes the manifest. This module holds what they share (the sink, ``--exclude`` patterns, the
hole check of sparse files) so that the sources never import the publisher and the publisher
imports them at the top: no import cycle.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from collections import deque
from collections.abc import Callable, Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from fnmatch import fnmatchcase
from typing import Any, BinaryIO

from vfs.errors import IntegrityError, UsageError

#: Files up to this size are read into memory and sent with ``put``; bigger ones are streamed.
SMALL_FILE = 4 << 20
#: Threads putting small objects, and the bound on what they may hold in memory.
UPLOAD_WORKERS = 4
MAX_PENDING = 64
MAX_PENDING_BYTES = 32 << 20
_CHUNK = 1 << 20
_ZEROS = bytes(_CHUNK)

Progress = Callable[[int, int], None]  # (files done, content bytes done)


def freshening_has(target: Any) -> Callable[[str], bool]:
    """``target.has``, or ``target.freshen`` where the target has one (a directory
    repository): a publish that finds an object present and skips its upload marks it as
    reused, so a repository garbage collection running meanwhile keeps it
    (docs/template-format.md §3)."""
    return getattr(target, "freshen", None) or target.has


class Exclude:
    """``--exclude`` patterns, with rsync's simple rules.

    A pattern without ``/`` matches a name anywhere (``*.pyc``, ``.git``); one with a ``/``
    matches the path from the root (``/var/cache/*``, leading ``/`` optional); a trailing
    ``/`` restricts it to directories. An excluded directory is left out with its contents.
    """

    def __init__(self, patterns: Iterable[str] = ()) -> None:
        self.names: list[tuple[bytes, bool]] = []
        self.paths: list[tuple[bytes, bool]] = []
        for p in patterns:
            b = p.encode("utf-8", "surrogateescape")
            dir_only = b.endswith(b"/")
            b = b.rstrip(b"/")
            if not b:
                raise UsageError(f"empty exclude pattern {p!r}")
            if b"/" in b:
                self.paths.append((b.lstrip(b"/"), dir_only))
            else:
                self.names.append((b, dir_only))

    def __bool__(self) -> bool:
        return bool(self.names or self.paths)

    def __call__(self, relpath: bytes, is_dir: bool) -> bool:
        """Is ``relpath`` (relative to the root, no leading slash) excluded?"""
        base = relpath.rpartition(b"/")[2]
        for pat, dir_only in self.names:
            if (is_dir or not dir_only) and fnmatchcase(base, pat):
                return True
        for pat, dir_only in self.paths:
            if (is_dir or not dir_only) and fnmatchcase(relpath, pat):
                return True
        return False


class ObjectSink:
    """Puts content objects into the repository (and optionally a local store) once each.

    ``remote`` and ``store`` need ``has``, ``put``, ``put_file`` and ``put_stream``; the sink
    computes each object's SHA-256 itself and checks that the target agrees (a mismatch means
    the source changed under us or the target is broken: either way the publish stops).
    """

    def __init__(
        self,
        remote: Any,
        store: Any = None,
        progress: Progress | None = None,
        spool_dir=None,
        workers: int = UPLOAD_WORKERS,
    ) -> None:
        self.remote = remote
        self._remote_has = freshening_has(remote)
        self.store = store
        self.progress = progress
        self.spool_dir = spool_dir
        self.seen: dict[str, int] = {}  # oid -> size, every distinct object of this publish
        self.uploaded = 0
        self.bytes_uploaded = 0
        self.files = 0
        self.file_bytes = 0
        # Small objects go to the repository from a few threads: each put is an fsync-bound
        # write + rename, and overlapping them lets the file system batch its journal commits.
        self._pool = ThreadPoolExecutor(workers, "vfs-publish") if workers > 1 else None
        self._pending: deque[tuple[Future[bool], int]] = deque()
        self._pending_bytes = 0

    def __enter__(self) -> ObjectSink:
        return self

    def __exit__(self, *exc: object) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)

    def drain(self) -> None:
        """Wait until every upload submitted so far is durable (raises the first failure)."""
        while self._pending:
            self._settle()

    def _settle(self) -> None:
        fut, n = self._pending.popleft()
        self._pending_bytes -= n
        if fut.result():
            self.uploaded += 1
            self.bytes_uploaded += n

    def _upload_small(self, oid: str, data: bytes) -> bool:
        if self._remote_has(oid):
            return False
        self._check(oid, self.remote.put(data))
        return True

    # -- entry points used by the sources --------------------------------------------------

    def put_bytes(self, data: bytes) -> str:
        """Store a small object held in memory; return its id."""
        oid = hashlib.sha256(data).hexdigest()
        self._tick(len(data))
        if oid in self.seen:
            return oid
        self.seen[oid] = len(data)
        if self._pool is None:
            if self._upload_small(oid, data):
                self.uploaded += 1
                self.bytes_uploaded += len(data)
        elif not self._remote_has(oid):  # a cheap probe inline; only the put goes to a thread
            while self._pending and (
                len(self._pending) >= MAX_PENDING or self._pending_bytes > MAX_PENDING_BYTES
            ):
                self._settle()
            self._pending.append((self._pool.submit(self._upload_small, oid, data), len(data)))
            self._pending_bytes += len(data)
        if self.store is not None and not self.store.has(oid):
            self._check(oid, self.store.put(data))
        return oid

    def put_stream(
        self, f: BinaryIO, size_hint: int, *, extents: Iterable[tuple[int, int]] | None = None
    ) -> tuple[str, int]:
        """Store the content of a stream that can be read only once (a tar member); with
        ``extents`` (a sparse member's map), every byte outside them must be zero."""
        holes = (
            None
            if extents is None
            else HoleCheck(extents, "tar: a sparse member has data in a hole")
        )
        if size_hint <= SMALL_FILE:
            data = _read_all(f)
            if holes is not None:
                holes(data, 0)
            return self.put_bytes(data), len(data)
        with self._spool() as spool:
            h = hashlib.sha256()
            n = _copy(f, spool, h, holes)
            spool.flush()
            oid = h.hexdigest()
            self._tick(n)
            if oid not in self.seen:
                self.seen[oid] = n
                self._put_path(oid, n, spool.name)
            return oid, n

    def put_file(
        self,
        opener: Callable[[], BinaryIO],
        size_hint: int,
        *,
        extents: Iterable[tuple[int, int]] | None = None,
    ) -> tuple[str, int]:
        """Store the content of a file that can be reopened (a directory source): hash it
        first, and read it a second time only if some target lacks the object.

        ``extents``: the file's data map (sparse files); every byte outside it must read as
        zero, or the file changed since it was mapped and the publish stops."""
        holes = HoleCheck(extents) if extents is not None else None
        with opener() as f:
            if size_hint <= SMALL_FILE:
                data = _read_all(f)
                if holes is not None:
                    holes(data, 0)
                return self.put_bytes(data), len(data)
            h = hashlib.sha256()
            n = 0
            while chunk := f.read(_CHUNK):
                if holes is not None:
                    holes(chunk, n)
                h.update(chunk)
                n += len(chunk)
        oid = h.hexdigest()
        self._tick(n)
        if oid in self.seen:
            return oid, n
        self.seen[oid] = n
        if self._remote_has(oid) and (self.store is None or self.store.has(oid)):
            return oid, n
        # Stream straight from the source (no spool): the target hashes what it stores and
        # _check compares, so a file that changed since it was hashed stops the publish.
        if not self._remote_has(oid):
            with opener() as f:
                self._check(oid, self.remote.put_stream(f), changed=True)
            self.uploaded += 1
            self.bytes_uploaded += n
        if self.store is not None and not self.store.has(oid):
            with opener() as f:
                self._check(oid, self.store.put_stream(f), changed=True)
        return oid, n

    # -- helpers ---------------------------------------------------------------------------

    def _put_path(self, oid: str, n: int, path: str) -> None:
        if not self._remote_has(oid):
            self._check(oid, self.remote.put_file(path), changed=True)
            self.uploaded += 1
            self.bytes_uploaded += n
        if self.store is not None and not self.store.has(oid):
            self._check(oid, self.store.put_file(path), changed=True)

    def _spool(self):
        return tempfile.NamedTemporaryFile(prefix="vfs-publish-", dir=self.spool_dir)

    def _tick(self, n: int) -> None:
        self.files += 1
        self.file_bytes += n
        if self.progress is not None:
            self.progress(self.files, self.file_bytes)

    @staticmethod
    def _check(want: str, got: str, changed: bool = False) -> None:
        if got != want:
            if changed:  # hashed once, stored another time: the source moved under us
                raise IntegrityError("a source file changed while it was being published")
            raise IntegrityError(f"repository stored object {got[:16]}… for {want[:16]}…")


class HoleCheck:
    """Checks, chunk by chunk in file order, that every byte outside a file's data extents is
    zero (a hole). Raises IntegrityError at the first that is not."""

    _END = 1 << 63

    def __init__(self, extents: Iterable[tuple[int, int]], message: str = "") -> None:
        self.holes: list[tuple[int, int]] = []
        prev = 0
        for off, n in sorted(extents):
            if off > prev:
                self.holes.append((prev, off))
            prev = max(prev, off + n)
        self.holes.append((prev, self._END))  # past the last extent: zeros up to the end
        self.i = 0
        self.message = message or "a source file changed while it was being published"

    def __call__(self, chunk: bytes, pos: int) -> None:
        end = pos + len(chunk)
        while self.i < len(self.holes):
            a, b = self.holes[self.i]
            if a >= end:
                return
            lo, hi = max(a, pos), min(b, end)
            if lo < hi and chunk.count(0, lo - pos, hi - pos) != hi - lo:
                raise IntegrityError(f"{self.message} (data in a hole at byte {lo})")
            if b > end:
                return
            self.i += 1


def _read_all(f: BinaryIO) -> bytes:
    parts = []
    while chunk := f.read(_CHUNK):
        parts.append(chunk)
    return b"".join(parts)


def _copy(src: BinaryIO, dst: BinaryIO, h, holes: HoleCheck | None = None) -> int:
    """Copy (and hash, unless ``h`` is None; check holes with ``holes``); runs of zeros become
    holes, so a sparse file stays sparse in the spool."""
    n = 0
    hole = False
    while chunk := src.read(_CHUNK):
        if holes is not None:
            holes(chunk, n)
        if h is not None:
            h.update(chunk)
        n += len(chunk)
        if len(chunk) == _CHUNK and chunk == _ZEROS:
            dst.seek(_CHUNK, os.SEEK_CUR)
            hole = True
        else:
            dst.write(chunk)
            hole = False
    if hole:
        dst.truncate(n)
    return n
