"""A new object being written into the local store: streamed into what becomes the object
file, hashed and chunk-summed on the way, then committed (fsync, sidecar, rename) or dropped.

Crash story: until :meth:`PendingObject.commit` returns, the bytes are only a temporary file
in the store's ``tmp/`` (named with the writer's pid), which the store's next start removes;
after it, the object and its sidecar are durable (docs/redirect.md §3).
"""

from __future__ import annotations

import contextlib
import errno
import os
from pathlib import Path
from typing import TYPE_CHECKING

from vfs.durable import tmp_name
from vfs.errors import IntegrityError, StoreFull
from vfs.redirect.objectid import new_hasher
from vfs.redirect.objfile import SumsBuilder, write_sparse

if TYPE_CHECKING:
    from vfs.redirect.store import LocalStore

_COPY = 1 << 20


class PendingObject:
    """A new object being streamed into the store's tmp/; see :meth:`LocalStore.new_object`.

    The bytes go straight into what becomes the object file (all-zero 4 KiB blocks left as
    holes), hashed and chunk-summed on the way, so committing is fsync + rename."""

    def __init__(self, store: LocalStore, expected_size: int | None, oid: str | None) -> None:
        self._store = store
        self._known_oid = oid
        self._hasher = new_hasher() if oid is None else None
        self._sums = SumsBuilder(store.chunk_size)
        self._fd = -1
        self._tmp: Path | None = None
        self._buf = bytearray()
        self.oid: str | None = None
        self.expected_size = expected_size
        self.received = 0
        self._written = 0

    def __enter__(self) -> PendingObject:
        self._tmp = tmp_name(self._store.tmp_dir)
        self._fd = os.open(self._tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o444)
        return self

    def write(self, data: bytes | bytearray | memoryview) -> None:
        assert self._fd >= 0
        if self._hasher is not None:
            self._hasher.update(data)
        self._sums.update(data)
        self.received += len(data)
        self._buf += data
        if len(self._buf) >= _COPY:
            self._flush()

    def _flush(self) -> None:
        if not self._buf:
            return
        try:
            write_sparse(self._fd, self._buf, self._written)
        except OSError as e:
            if e.errno in (errno.ENOSPC, errno.EDQUOT):
                raise StoreFull(f"no space left in store {self._store.root}") from e
            raise
        self._written += len(self._buf)
        self._buf = bytearray()

    def digest(self) -> str:
        if self._hasher is None:
            assert self._known_oid is not None
            return self._known_oid
        return self._hasher.hexdigest()

    def commit(self, expected: str | None = None) -> str:
        """Finish, verify against ``expected`` (if given), and publish the object."""
        assert self._fd >= 0 and self._tmp is not None
        oid = self.digest()
        if expected is not None and oid != expected:
            raise IntegrityError(
                f"object {expected}: content does not match its id (got {oid}); discarded",
                oid=expected,
            )
        try:
            self._flush()
            os.ftruncate(self._fd, self.received)
            os.fsync(self._fd)
            os.close(self._fd)
            self._fd = -1
            self._store.install(self._tmp, oid, self.received, self._sums.finish())
        except OSError as e:
            if e.errno in (errno.ENOSPC, errno.EDQUOT):
                raise StoreFull(f"no space left in store {self._store.root}") from e
            raise
        self._tmp = None
        self.oid = oid
        return oid

    def __exit__(self, *exc: object) -> None:
        if self._fd >= 0:
            with contextlib.suppress(OSError):
                os.close(self._fd)
            self._fd = -1
        if self._tmp is not None:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self._tmp)
            self._tmp = None
