"""Resolver: serve an object from the local store, or fetch, verify and store it first.

*First redirection*: the reference is in the local store; read it from there.
*Second redirection*: it is not; fetch it from the remote repository, hash it while streaming it
into the store's tmp/, and install it only if the digest matches — then serve it like local data.

Single flight: concurrent requests for one cold object cause one fetch. Within a process a
per-object lock serialises the threads; across processes an OFD byte-range lock on
``STORE/fetch.lock`` (one byte per object, at an offset derived from the id) does the same, and
the kernel drops it if the holder dies (a killed fetch leaves a temp file the next start removes,
and the waiting process takes over). The loser of the race finds the object present and reads it.

Sizes: every call takes the object's ``expected_size`` — the exact length its reference claims
(a manifest entry's size, a vimg cluster size). A fetch then reads no byte past it, and an object
of any other length, fetched or already local, is :class:`SizeMismatch` before a byte is served:
a manifest cannot make a 6-byte object a 1 TiB file. Callers that cannot know the size (a
manifest itself, an object named on a command line) give ``max_size``; the default bound for a
fetch that gives neither is :data:`DEFAULT_MAX_UNSIZED` (1 GiB; ``Resolver(max_unsized=)``), so
no caller that forgot the size can have an 11-byte file fill a store. docs/redirect.md, section 7.
"""

from __future__ import annotations

import contextlib
import fcntl
import itertools
import logging
import os
import struct
import threading
from collections.abc import Iterator

from vfs.errors import IntegrityError, ObjectNotFound, SizeMismatch, UsageError
from vfs.redirect.bounds import fetch_bound, size_mismatch, too_large
from vfs.redirect.objectid import check_object_id
from vfs.redirect.remote import Remote
from vfs.redirect.store import LocalStore

log = logging.getLogger(__name__)

_FLOCK = struct.Struct("@hhqqi4x")  # struct flock on Linux/x86_64 and aarch64

#: The bound of a fetch whose caller gives neither ``expected_size`` nor ``max_size``.
DEFAULT_MAX_UNSIZED = 1 << 30


class Resolver:
    """First and second redirection over one store and (optionally) one remote."""

    def __init__(
        self,
        store: LocalStore,
        remote: Remote | None = None,
        *,
        max_unsized: int = DEFAULT_MAX_UNSIZED,
    ) -> None:
        self.store = store
        self.remote = remote
        self.max_unsized = fetch_bound("-", None, max_unsized)
        self._inflight: dict[str, list] = {}  # oid -> [lock, waiters]
        self._inflight_lock = threading.Lock()
        self.fetches = 0  #: objects fetched by this resolver (for tests and stats)
        self.fetched_bytes = 0

    def has_local(self, oid: str) -> bool:
        return self.store.has(oid)

    def stored_id(self, oid: str) -> str:
        """The id the local store keeps object ``oid`` under: ``oid`` itself here; a resolver
        that keeps objects transformed (encrypted, :mod:`vfs.redirect.sealed_store`) names its
        stored copy, which is what gc roots must protect."""
        return oid

    def ensure(
        self,
        oid: str,
        *,
        expected_size: int | None = None,
        max_size: int | None = None,
        size_hint: int | None = None,
    ) -> None:
        """Make ``oid`` present in the local store (fetching it if needed).

        ``expected_size``: the object's exact length as its reference says; a fetch reads no
        more, and an object of another length (fetched or local) is :class:`SizeMismatch`.
        ``max_size``: the bound when the size is unknown (default :attr:`max_unsized`).
        ``size_hint``: the former name of ``expected_size``, for callers not yet renamed.
        """
        check_object_id(oid)
        if expected_size is None:
            expected_size = size_hint
        bound = fetch_bound(oid, expected_size, self.max_unsized if max_size is None else max_size)
        if not self.store.has(oid):
            self._ensure_fetched(oid, expected_size, bound)
        if expected_size is not None:
            self._check_size(oid, expected_size)

    def _check_size(self, oid: str, expected_size: int) -> None:
        actual = self.store.size(oid)
        if actual != expected_size:
            raise size_mismatch(oid, actual, expected_size, "the local store's copy")

    def _ensure_fetched(self, oid: str, expected_size: int | None, bound: int) -> None:
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
                    self._fetch(oid, expected_size, bound)
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

    def _fetch(self, oid: str, expected_size: int | None, bound: int) -> None:
        """Stream the object into the store: at most ``bound`` bytes (exactly
        ``expected_size`` if given), verified against its id, installed only if all holds."""
        assert self.remote is not None
        url = self.remote.url
        log.info("fetching %s from %s", oid, url)
        if expected_size is not None:
            blocks = self.remote.iter_object(oid, expected_size=expected_size)
        else:
            blocks = self.remote.iter_object(oid, limit=bound)
        with contextlib.closing(blocks):
            # The response's headers first (a Content-Length that disagrees with the size is
            # refused here), then the store: a lie never makes it evict or reserve anything.
            first = next(blocks, b"")
            with self.store.new_object(expected_size=expected_size) as pending:
                for block in itertools.chain((first,), blocks):
                    pending.write(block)
                    if pending.received > bound:  # the remote stops first; this is the belt
                        raise too_large(oid, bound, url)
                if expected_size is not None and pending.received != expected_size:
                    raise size_mismatch(oid, pending.received, expected_size, url)
                try:
                    pending.commit(expected=oid)
                except SizeMismatch:
                    raise
                except IntegrityError:
                    log.info("object %s from %s failed verification", oid, url)
                    raise IntegrityError(
                        f"object {oid}: bytes from {url} do not match the id "
                        "(lying or damaged repository); refused, nothing stored",
                        oid=oid,
                    ) from None
        self.fetches += 1
        self.fetched_bytes += pending.received

    def read_local(
        self,
        oid: str,
        offset: int,
        size: int,
        *,
        drop_cache: bool = False,
        expected_size: int | None = None,
    ) -> bytes | None:
        """First redirection only, never the network: the bytes if the store holds a good copy,
        None if the object must be fetched (absent, or damaged — the store quarantined it — while
        a remote can give a good copy). Cheap enough for an event loop: one open at most.
        ``expected_size``: the object's length as its reference says; a copy of another length
        is :class:`SizeMismatch` (the copy is genuine, the reference lies: not refetched)."""
        try:
            return self.store.read(
                oid, offset, size, drop_cache=drop_cache, expected_size=expected_size
            )
        except ObjectNotFound:
            return None
        except SizeMismatch:
            raise
        except IntegrityError:
            if self.remote is None:
                raise
            return None  # the store logged and quarantined it

    def read(
        self,
        oid: str,
        offset: int,
        size: int,
        *,
        drop_cache: bool = False,
        expected_size: int | None = None,
    ) -> bytes:
        """Bytes of an object, from the store after fetching it if needed. ``expected_size``:
        the object's exact length as its reference says — checked before a byte is served
        (:class:`SizeMismatch` naming the object), and the bound of any fetch."""
        if offset < 0 or size < 0:
            raise UsageError("negative offset or size")
        for attempt in (0, 1):
            self.ensure(oid, expected_size=expected_size)
            try:
                return self.store.read(
                    oid, offset, size, drop_cache=drop_cache, expected_size=expected_size
                )
            except SizeMismatch:
                raise
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

    def get(
        self, oid: str, *, expected_size: int | None = None, max_size: int | None = None
    ) -> bytes:
        """The whole object in memory: exactly ``expected_size`` bytes, or at most
        ``max_size`` (default :attr:`max_unsized`), also when it is already local."""
        bound = fetch_bound(oid, expected_size, self.max_unsized if max_size is None else max_size)
        self.ensure(oid, expected_size=expected_size, max_size=bound)
        actual = self.store.size(oid)
        if actual > bound:
            raise IntegrityError(
                f"object {oid}: {actual} bytes, more than the {bound} this caller accepts",
                oid=oid,
            )
        try:
            return self.store.get(oid)
        except (ObjectNotFound, IntegrityError) as e:
            if self.remote is None or isinstance(e, SizeMismatch):
                raise
            # evicted meanwhile, or damaged (the store dropped it): fetch it once more
            self.ensure(oid, expected_size=expected_size, max_size=bound)
            return self.store.get(oid)

    def size(self, oid: str) -> int:
        self.ensure(oid)
        return self.store.size(oid)
