"""LocalStore: the host-wide content-addressed object store (first redirection).

On-disk layout (docs/redirect.md, "Local store", format 2)::

    ROOT/store.json        format marker + settings (quota); written atomically
    ROOT/objects/ab/<id>   exactly the object's bytes (a plain, maybe sparse, file, mode 0444):
                           what every reader uses, the kernel engine's overlay mounts included
    ROOT/sums/ab/<id>      per-chunk xxh3 of objects longer than one chunk (vfs.redirect.objfile)
    ROOT/tmp/              temporary files .tmp.<pid>.<rand>, renamed into place when complete
    ROOT/index.db          SQLite (WAL): sizes, last use, pins; a rebuildable cache of the truth
    ROOT/store.lock        flock: shared by every process using the store
    ROOT/fetch.lock        OFD byte-range locks: one writer per object across processes
    ROOT/clean             present only while no process has the store open after a clean close

The truth is the object files; ``index.db`` only accelerates usage accounting and LRU eviction
(:mod:`vfs.redirect.store_index`), and sidecars are rebuilt from verified objects. Crash story:
an object becomes visible only by ``rename`` after its bytes were fsynced (its sidecar renamed
into place just before it), and its index row is added after the rename; deleting unlinks the
object, then its sidecar, then drops the row. So after a kill -9 or power loss the worst states
are (a) a temp file in tmp/, (b) an object file with no row, (c) a row with no file, (d) a
sidecar with no object, or an object whose sidecar rename was lost. The first process to open
the store when no other process has it open (exclusive flock succeeds) and finds no ``clean``
marker runs recovery (:mod:`vfs.redirect.store_recovery`), which removes (a) and (d) and
reconciles (b) and (c); a large object without its sidecar gets it rebuilt when it is first read,
after a check against its id. ``vfsd store verify`` re-hashes every object and ``vfsd store
rebuild`` redoes the scan at will.

Eviction and garbage collection go through two methods only, :meth:`LocalStore.gc` and
:meth:`LocalStore.make_room`, which both take their victims from :meth:`LocalStore.evictable`
(unpinned objects, least recently used first): the one place a policy that protects more
objects (gc roots) hooks in.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import threading
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import BinaryIO

from vfs.durable import atomic_writer, fsync_dir, write_atomic
from vfs.errors import (
    BusyError,
    FormatError,
    IntegrityError,
    ObjectNotFound,
    StoreFull,
    UnsupportedFeature,
    UsageError,
)
from vfs.redirect import store_recovery
from vfs.redirect.bounds import size_mismatch
from vfs.redirect.objectid import check_object_id, object_id, shard
from vfs.redirect.objfile import (
    DEFAULT_CHUNK,
    ChunkSums,
    MissingSums,
    ObjectReader,
    sums_for,
)
from vfs.redirect.roots import GcRoots
from vfs.redirect.store_index import StoreIndex
from vfs.redirect.store_pending import PendingObject
from vfs.redirect.store_recovery import VerifyReport

log = logging.getLogger(__name__)

STORE_FORMAT = "vfs-store"
STORE_VERSION = 2
KNOWN_FEATURES: frozenset[str] = frozenset()
READER_CACHE = 256
_COPY = 1 << 20

__all__ = ["LocalStore", "PendingObject", "StoreStats", "VerifyReport"]


@dataclass
class StoreStats:
    root: str
    objects: int
    logical_bytes: int
    stored_bytes: int
    quota: int | None
    pinned_objects: int


class LocalStore:
    """A content-addressed store shared by every tree and image on the host.

    Thread-safe; several processes may open the same root at once (the FUSE daemon, vimg, CLIs).
    """

    def __init__(
        self,
        root: str | os.PathLike[str],
        *,
        quota: int | None = None,
        compress: bool | None = None,
        create: bool = True,
    ) -> None:
        if compress:
            raise UsageError(
                "the store keeps objects as plain files (format 2: the kernel engine reads them "
                "directly), so it no longer compresses them; put the store on a compressing "
                "file system (btrfs compress=zstd, zfs compression) instead"
            )
        self.root = Path(root)
        self.objects_dir = self.root / "objects"
        self.sums_dir = self.root / "sums"
        self.tmp_dir = self.root / "tmp"
        self._lock = threading.RLock()
        self._readers: OrderedDict[str, ObjectReader] = OrderedDict()
        self._objects_prefix = os.fspath(self.objects_dir) + "/"
        self._sums_prefix = os.fspath(self.sums_dir) + "/"
        self._closed = False
        self._lock_fd = -1
        self._index: StoreIndex | None = None

        config = self._open_config(create, quota)
        self.quota: int | None = config.get("quota")
        self.chunk_size: int = int(config.get("chunk_size", DEFAULT_CHUNK))
        self.roots = GcRoots(self.root)  # what eviction must leave (vfs.redirect.roots)
        self._version = int(config.get("version", 1))

        self._lock_fd = os.open(self.root / "store.lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC)
        try:
            self._index = StoreIndex(self.root / "index.db")
            self._startup()
        except BaseException:
            self.close()
            raise

    # ------------------------------------------------------------------ set-up and recovery

    def _open_config(self, create: bool, quota: int | None) -> dict:
        cfg_path = self.root / "store.json"
        if cfg_path.exists():
            try:
                config = json.loads(cfg_path.read_text())
            except (ValueError, OSError) as e:
                raise FormatError(f"{cfg_path}: unreadable store config: {e}") from None
            if not isinstance(config, dict) or config.get("format") != STORE_FORMAT:
                raise FormatError(f"{self.root} is not a vfs store")
            version = config.get("version", 0)
            if type(version) is not int or version < 1:
                raise FormatError(f"{cfg_path}: invalid store version {version!r}")
            if version > STORE_VERSION:
                raise UnsupportedFeature(
                    f"{self.root}: store version {version} is newer than this vfs"
                )
            unknown = set(config.get("features", [])) - KNOWN_FEATURES
            if unknown:
                raise UnsupportedFeature(f"{self.root}: unknown store features {sorted(unknown)}")
            if quota is not None and quota <= 0:
                raise UsageError("quota must be positive")
            if quota is not None and quota != config.get("quota"):
                config["quota"] = quota
                write_atomic(cfg_path, json.dumps(config, indent=2).encode())
            return config
        if not create:
            raise UsageError(f"{self.root}: no store here (store.json missing)")
        if quota is not None and quota <= 0:
            raise UsageError("quota must be positive")
        self.root.mkdir(parents=True, exist_ok=True)
        for sub in ("objects", "sums", "tmp"):
            (self.root / sub).mkdir(exist_ok=True)
        config = {
            "format": STORE_FORMAT,
            "version": STORE_VERSION,
            "features": [],
            "quota": quota,
            "chunk_size": DEFAULT_CHUNK,
        }
        tmp = self.root / f".store.json.{os.getpid()}"
        with contextlib.suppress(FileExistsError):
            # O_EXCL through a hard link: two processes creating the same store agree on one.
            tmp.write_bytes(json.dumps(config, indent=2).encode())
            fd = os.open(tmp, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
            os.link(tmp, cfg_path)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        fsync_dir(self.root)
        return json.loads(cfg_path.read_text())

    def _startup(self) -> None:
        try:
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            alone = True
        except BlockingIOError:
            alone = False
        if self._version < STORE_VERSION:
            if not alone:
                raise BusyError(
                    f"store {self.root} is in format {self._version} and must be migrated to "
                    f"format {STORE_VERSION}: stop the other processes using it, then open it"
                )
            self._migrate()
        if alone:
            clean = self.root / "clean"
            if clean.exists():
                os.unlink(clean)
                fsync_dir(self.root)
            else:
                log.info("store %s was not closed cleanly: recovering", self.root)
                self.recover()
        fcntl.flock(self._lock_fd, fcntl.LOCK_SH)

    def _migrate(self) -> None:
        """Format 1 → 2 (objects become plain files); under the exclusive lock."""
        log.warning("store %s: migrating from format %d to %d", self.root, self._version, 2)
        self.sums_dir.mkdir(exist_ok=True)
        store_recovery.migrate_v1(self)
        cfg_path = self.root / "store.json"
        config = json.loads(cfg_path.read_text())
        config.pop("compress", None)
        config["version"] = STORE_VERSION
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.root / "clean")  # the index must be rebuilt: stored sizes changed
        write_atomic(cfg_path, json.dumps(config, indent=2).encode())
        self._version = STORE_VERSION

    def recover(self) -> dict[str, int]:
        """Bring the index back to the truth of the object files; drop temp files of dead
        processes and sidecars of absent objects (:func:`store_recovery.recover`)."""
        return store_recovery.recover(self)

    @property
    def index(self) -> StoreIndex:
        if self._index is None:
            raise UsageError("store is closed")
        return self._index

    # ------------------------------------------------------------------ paths

    def object_path(self, oid: str) -> Path:
        """Where object ``oid``'s bytes are (whether or not it is present)."""
        return self.objects_dir / shard(oid)

    def sums_path(self, oid: str) -> Path:
        return self.sums_dir / shard(oid)

    # ------------------------------------------------------------------ reading

    def has(self, oid: str) -> bool:
        """First redirection: is the object here? (one stat, no index round trip)"""
        check_object_id(oid)
        with self._lock:
            if oid in self._readers:
                return True
        return os.path.exists(self._objects_prefix + shard(oid))

    def read_sums(self, oid: str) -> ChunkSums | None:
        """The object's sidecar, or None if it is missing or damaged."""
        try:
            with open(self._sums_prefix + shard(oid), "rb") as f:
                data = f.read()
        except FileNotFoundError:
            return None
        try:
            return ChunkSums.decode(data, name=oid)
        except MissingSums:
            return None

    def write_sums(self, oid: str, sums: ChunkSums) -> None:
        """Install a sidecar for ``oid`` (temp file, fsync, rename)."""
        dest = self.sums_path(oid)
        dest.parent.mkdir(exist_ok=True)
        with atomic_writer(dest, tmp_dir=self.tmp_dir, mode=0o444) as f:
            f.write(sums.encode())

    def _reader(self, oid: str) -> ObjectReader:
        with self._lock:
            r = self._readers.get(oid)
            if r is not None:
                self._readers.move_to_end(oid)
        if r is not None:
            self.index.touch(oid)
            return r
        check_object_id(oid)
        try:
            # a plain string path: pathlib costs more than the open itself on a warm cache
            fd = os.open(self._objects_prefix + shard(oid), os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            raise ObjectNotFound(f"object {oid} not in local store", oid=oid) from None
        try:
            r = self._open_reader(fd, oid)
        except IntegrityError:
            os.close(fd)
            self._quarantine(oid)
            raise
        except BaseException:
            os.close(fd)
            raise
        with self._lock:
            old = self._readers.get(oid)
            if old is not None:
                r.close()
                return old
            self._readers[oid] = r
            while len(self._readers) > READER_CACHE:
                _, victim = self._readers.popitem(last=False)
                victim.close()
        self.index.touch(oid)
        return r

    def _open_reader(self, fd: int, oid: str) -> ObjectReader:
        size = os.fstat(fd).st_size
        sums = self.read_sums(oid) if size > self.chunk_size else None
        try:
            return ObjectReader(fd, oid, sums=sums, chunk_size=self.chunk_size)
        except MissingSums as e:
            # Derived data lost (a crash between the two renames, a damaged sidecar): rebuild
            # it from the object, which must match its id first.
            log.warning("store: %s; rebuilding it from the object", e)
            fresh = sums_for(fd, oid, self.chunk_size)
            self.write_sums(oid, fresh)
            return ObjectReader(fd, oid, sums=fresh, chunk_size=self.chunk_size)

    def open_reader(self, oid: str) -> ObjectReader:
        """A cached, verified random-access reader (do not close it: the store owns it)."""
        return self._reader(oid)

    def read(
        self,
        oid: str,
        offset: int,
        size: int,
        *,
        drop_cache: bool = False,
        expected_size: int | None = None,
    ) -> bytes:
        """Bytes ``offset..offset+size`` of an object; every chunk touched is checksum-verified.

        A damaged object file raises :class:`IntegrityError` naming the object; the file is
        quarantined (removed) so that a resolver can fetch a good copy again. ``drop_cache``:
        the caller caches the bytes itself, drop the object file's pages
        (:meth:`ObjectReader.drop_cache`). ``expected_size``: the length the object's reference
        claims; another length is :class:`SizeMismatch` and nothing is served (the object is
        genuine, so it stays).
        """
        r = self._reader(oid)
        if expected_size is not None and r.size != expected_size:
            raise size_mismatch(oid, r.size, expected_size, "the local store's copy")
        try:
            data = r.read(offset, size)
        except IntegrityError:
            self._damaged_chunk(oid, r)
            raise
        if drop_cache:
            with contextlib.suppress(OSError):
                r.drop_cache(offset, size)
        return data

    def get(self, oid: str) -> bytes:
        r = self._reader(oid)
        try:
            return r.read(0, r.size)
        except IntegrityError:
            self._damaged_chunk(oid, r)
            raise

    def size(self, oid: str) -> int:
        return self._reader(oid).size

    def export(self, oid: str, out: BinaryIO) -> int:
        """Copy an object's verified bytes to ``out`` chunk by chunk (never whole in memory)."""
        r = self._reader(oid)
        n = 0
        try:
            for chunk in r.iter_chunks():
                out.write(chunk)
                n += len(chunk)
        except IntegrityError:
            self._damaged_chunk(oid, r)
            raise
        return n

    def _damaged_chunk(self, oid: str, r: ObjectReader) -> None:
        """A chunk did not match its checksum: the object or its sidecar is damaged. An object
        that still matches its id keeps living (its sidecar is rebuilt; the caller's read
        fails this once); otherwise it is quarantined."""
        try:
            fresh = sums_for(r.fd, oid, self.chunk_size)
        except (IntegrityError, OSError):
            self._quarantine(oid)
            return
        log.warning("store: checksum sidecar of %s was damaged: rebuilt", oid)
        self.write_sums(oid, fresh)
        with self._lock:
            if self._readers.get(oid) is r:
                del self._readers[oid]
        r.close()

    def quarantine(self, oid: str) -> None:
        """Remove a damaged object (a resolver fetches a good copy again)."""
        self._quarantine(oid)

    def _quarantine(self, oid: str) -> None:
        log.warning("store: object %s failed verification: removing the damaged copy", oid)
        self._remove(oid)

    # ------------------------------------------------------------------ writing

    def put(self, data: bytes | bytearray | memoryview) -> str:
        """Store ``data``; return its id. Durable when this returns."""
        oid = object_id(data)
        if self.has(oid):
            self.index.touch(oid)
            return oid
        with self.new_object(oid=oid) as w:
            w.write(data)
            w.commit()
        return oid

    def put_file(self, path: str | os.PathLike[str]) -> str:
        """Store a file's bytes, streaming (constant memory)."""
        with open(path, "rb") as src:
            return self.put_stream(src)

    def put_stream(self, src: BinaryIO) -> str:
        """Store everything readable from ``src`` (read once, constant memory)."""
        with self.new_object() as w:
            while block := src.read(_COPY):
                w.write(block)
            return w.commit()

    def new_object(
        self, expected_size: int | None = None, *, oid: str | None = None
    ) -> PendingObject:
        """A writer for an object whose id is known only at the end (streamed fetches).

        ``commit(expected=oid)`` checks the digest: a mismatch discards the bytes and raises
        :class:`IntegrityError`, so a lying server never gets an object stored. ``oid``: the
        caller already hashed these very bytes in this process (:meth:`put`), so they are not
        hashed twice. ``expected_size``: an object that cannot fit the quota is refused now;
        room is made (LRU eviction) only at commit, for the verified object's real size, so a
        reference that lies about a size cannot flush the store.
        """
        if expected_size is not None and self.quota is not None and expected_size > self.quota:
            raise StoreFull(
                f"object of {expected_size} bytes exceeds the store quota of {self.quota}"
            )
        return PendingObject(self, expected_size, oid)

    def install(self, tmp: Path, oid: str, size: int, sums: ChunkSums) -> None:
        """The last step of a new object (:class:`PendingObject`): ``tmp`` (in ``tmp_dir``,
        fsynced) becomes object ``oid``, its sidecar first, room made under the quota."""
        dest = self.object_path(oid)
        dest.parent.mkdir(exist_ok=True)
        self.make_room(size, exclude=oid)
        if size > self.chunk_size:
            self.write_sums(oid, sums)  # before the object: a visible object has its sidecar
        os.replace(tmp, dest)
        fsync_dir(dest.parent)
        self.index.insert(oid, size, size)

    # ------------------------------------------------------------------ quota, pins, eviction

    def usage(self) -> int:
        return self.index.usage()

    def evictable(self) -> tuple[int, list[tuple[str, int]]]:
        """``(usage, victims)``: the objects an eviction may remove, in the order it should
        (unpinned, least recently used first), as ``(oid, stored bytes)``. Both :meth:`gc` and
        :meth:`make_room` take their victims from here and nowhere else."""
        return self.index.lru_victims()

    def make_room(self, need: int, exclude: str | None = None) -> None:
        """Evict until an object of ``need`` bytes fits the quota (``exclude`` is never
        evicted); :class:`StoreFull` if it cannot."""
        if self.quota is None:
            return
        if need > self.quota:
            raise StoreFull(f"object of {need} bytes exceeds the store quota of {self.quota}")
        used, victims = self.evictable()
        if used + need <= self.quota:
            return
        freed = 0
        with self.roots.locked():  # gc roots: never what a root keeps, its cache objects last
            for oid, stored in self.roots.evictable(victims):
                if used + need - freed <= self.quota:
                    break
                if oid == exclude:
                    continue
                self._remove(oid)
                freed += stored
                log.info("store: evicted %s (%d bytes) for quota", oid, stored)
        if used + need - freed > self.quota:
            raise StoreFull(
                f"store quota {self.quota} bytes reached and the remaining objects are pinned "
                "or needed by a gc root (vfsd store roots)"
            )

    def gc(self, target: int | None = None) -> dict[str, int]:
        """Evict unpinned objects, least recently used first, until usage <= ``target``
        (default: the quota; with neither, evict every unpinned object). Objects a gc root
        keeps stay; those it caches go only for an explicit ``target``
        (:mod:`vfs.redirect.roots`)."""
        goal = target if target is not None else (self.quota if self.quota is not None else 0)
        used, victims = self.evictable()
        removed = freed = 0
        with self.roots.locked():  # gc roots: never what a root keeps; its cache objects
            cache = self.roots.protected()[1] if target is None else set()  # only for --target
            for oid, stored in self.roots.evictable(victims):
                if used - freed <= goal or oid in cache:
                    break
                self._remove(oid)
                removed += 1
                freed += stored
        return {"removed": removed, "freed_bytes": freed, "usage": used - freed}

    def _remove(self, oid: str) -> None:
        """Unlink the object, then its sidecar, then drop its row (the crash order)."""
        with self._lock:
            r = self._readers.pop(oid, None)
        if r is not None:
            r.close()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.object_path(oid))
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.sums_path(oid))
        self.index.delete(oid)

    def delete(self, oid: str) -> None:
        """Remove an object (refused while it is pinned)."""
        check_object_id(oid)
        pins = self.pins(oid)
        if pins:
            raise BusyError(f"object {oid} is pinned by {', '.join(pins)}")
        self._remove(oid)

    def pin(self, oid: str, owner: str) -> None:
        """Keep ``oid`` from eviction until ``unpin`` with the same owner."""
        check_object_id(oid)
        self.index.pin(oid, owner)

    def unpin(self, oid: str, owner: str) -> None:
        self.index.unpin(oid, owner)

    def pins(self, oid: str) -> list[str]:
        return self.index.pins(oid)

    def _flush_atimes(self) -> None:
        """Write batched last-use times now (tests and eviction; normally every 5 s)."""
        self.index.flush_atimes()

    # ------------------------------------------------------------------ inspection

    def stats(self) -> StoreStats:
        n, logical, stored, pinned = self.index.totals()
        return StoreStats(str(self.root), n, logical, stored, self.quota, pinned)

    def stats_dict(self) -> dict:
        return asdict(self.stats())

    def list(self) -> list[str]:
        return sorted(oid for oid, _ in store_recovery.iter_object_files(self.objects_dir))

    def verify(
        self, *, repair: bool = False, progress: Callable[[int], None] | None = None
    ) -> VerifyReport:
        """Re-hash every object against its id (and rebuild damaged sidecars). With
        ``repair``, damaged objects are removed so they can be fetched again."""
        return store_recovery.verify(self, repair=repair, progress=progress)

    # ------------------------------------------------------------------ lifetime

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        with self._lock:
            for r in self._readers.values():
                r.close()
            self._readers.clear()
        if self._index is not None:
            self._index.close(drop_owner=f"pid:{os.getpid()}")
            self._index = None
        if self._lock_fd >= 0:
            try:
                fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                # Last one out: the index is consistent with the files; say so.
                write_atomic(self.root / "clean", b"")
            except BlockingIOError:
                pass
            except OSError as e:
                log.warning("store: could not mark clean: %s", e)
            os.close(self._lock_fd)
            self._lock_fd = -1

    def __enter__(self) -> LocalStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        if not getattr(self, "_closed", True) and getattr(self, "_lock_fd", -1) >= 0:
            with contextlib.suppress(Exception):
                os.close(self._lock_fd)
