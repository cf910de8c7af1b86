"""Resolver: serve an object from the local store, or fetch, verify and store it first.

*First redirection*: the reference is in the local store; read it from there.
*Second redirection*: it is not; fetch it from the remote repository, hash it while streaming it
into the store's tmp/, and install it only if the digest matches — then serve it like local data.

Single flight: concurrent requests for one cold object cause one fetch. Within a process a
per-object lock serialises the threads; across processes an OFD byte-range lock on
``STORE/fetch.lock`` (one byte per object, at an offset derived from the id) does the same, and
the kernel drops it if the holder dies (a killed fetch leaves a temp file the next start removes,
and the waiting process takes over). The loser of the race finds the object present and reads it.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import struct
import threading
from collections.abc import Iterator

from vfs.errors import IntegrityError, ObjectNotFound, UsageError
from vfs.redirect.objectid import check_object_id
from vfs.redirect.objfile import MAX_SIZE
from vfs.redirect.remote import Remote
from vfs.redirect.store import LocalStore

log = logging.getLogger(__name__)

_FLOCK = struct.Struct("@hhqqi4x")  # struct flock on Linux/x86_64 and aarch64


class Resolver:
    """First and second redirection over one store and (optionally) one remote."""

    def __init__(self, store: LocalStore, remote: Remote | None = None) -> None:
        self.store = store
        self.remote = remote
        self._inflight: dict[str, list] = {}  # oid -> [lock, waiters]
        self._inflight_lock = threading.Lock()
        self.fetches = 0  #: objects fetched by this resolver (for tests and stats)
        self.fetched_bytes = 0

    def has_local(self, oid: str) -> bool:
        return self.store.has(oid)

    def ensure(self, oid: str, *, size_hint: int | None = None) -> None:
        """Make ``oid`` present in the local store (fetching it if needed)."""
        check_object_id(oid)
        if self.store.has(oid):
            return
        if self.remote is None:
            raise ObjectNotFound(f"object {oid} not in local store and no remote configured")
        with self._inflight_lock:
            slot = self._inflight.setdefault(oid, [threading.Lock(), 0])
            slot[1] += 1
        try:
            with slot[0]:
                if self.store.has(oid):
                    return
                with self._process_lock(oid):
                    if self.store.has(oid):
                        return
                    self._fetch(oid, size_hint)
        finally:
            with self._inflight_lock:
                slot[1] -= 1
                if slot[1] == 0:
                    del self._inflight[oid]

    @contextlib.contextmanager
    def _process_lock(self, oid: str) -> Iterator[None]:
        """OFD write lock on one byte of fetch.lock: excludes other processes (and other
        open file descriptions), released by close or by the kernel on death."""
        fd = os.open(self.store.root / "fetch.lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            offset = int(oid[:15], 16)
            fcntl.fcntl(
                fd, fcntl.F_OFD_SETLKW, _FLOCK.pack(fcntl.F_WRLCK, os.SEEK_SET, offset, 1, 0)
            )
            yield
        finally:
            os.close(fd)

    def _fetch(self, oid: str, size_hint: int | None) -> None:
        assert self.remote is not None
        limit = size_hint if size_hint is not None else MAX_SIZE
        log.info("fetching %s from %s", oid, self.remote.url)
        with self.store.new_object(expected_size=size_hint) as pending:
            for block in self.remote.iter_object(oid):
                pending.write(block)
                if pending.received > limit:
                    raise IntegrityError(
                        f"object {oid}: {self.remote.url} sent more than the expected "
                        f"{limit} bytes; refused",
                        oid=oid,
                    )
            try:
                pending.commit(expected=oid)
            except IntegrityError:
                log.info("object %s from %s failed verification", oid, self.remote.url)
                raise IntegrityError(
                    f"object {oid}: bytes from {self.remote.url} do not match the id "
                    "(lying or damaged repository); refused, nothing stored",
                    oid=oid,
                ) from None
        self.fetches += 1
        self.fetched_bytes += pending.received

    def read_local(
        self, oid: str, offset: int, size: int, *, drop_cache: bool = False
    ) -> bytes | None:
        """First redirection only, never the network: the bytes if the store holds a good copy,
        None if the object must be fetched (absent, or damaged — the store quarantined it — while
        a remote can give a good copy). Cheap enough for an event loop: one open at most."""
        try:
            return self.store.read(oid, offset, size, drop_cache=drop_cache)
        except ObjectNotFound:
            return None
        except IntegrityError:
            if self.remote is None:
                raise
            return None  # the store logged and quarantined it

    def read(self, oid: str, offset: int, size: int, *, drop_cache: bool = False) -> bytes:
        """Bytes of an object, from the store after fetching it if needed."""
        if offset < 0 or size < 0:
            raise UsageError("negative offset or size")
        for attempt in (0, 1):
            self.ensure(oid)
            try:
                return self.store.read(oid, offset, size, drop_cache=drop_cache)
            except ObjectNotFound:
                # Evicted by another process between ensure and read: fetch again once.
                if attempt:
                    raise
            except IntegrityError:
                # Damaged on disk: the store dropped it; a remote can give a good copy.
                if attempt or self.remote is None:
                    raise
                log.warning("object %s damaged in the store: fetching it again", oid)
        raise AssertionError("unreachable")

    def get(self, oid: str) -> bytes:
        self.ensure(oid)
        try:
            return self.store.get(oid)
        except (ObjectNotFound, IntegrityError):
            if self.remote is None:
                raise
            self.ensure(oid)
            return self.store.get(oid)

    def size(self, oid: str) -> int:
        self.ensure(oid)
        return self.store.size(oid)
