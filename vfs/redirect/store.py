"""LocalStore: the host-wide content-addressed object store (first redirection).

On-disk layout (docs/redirect.md, "Local store")::

    ROOT/store.json        format marker + settings (quota, compression); written atomically
    ROOT/objects/ab/<id>   one object file each (vfs.redirect.objfile container)
    ROOT/tmp/              temporary files .tmp.<pid>.<rand>, renamed into objects/ when complete
    ROOT/index.db          SQLite (WAL): sizes, last use, pins; a rebuildable cache of the truth
    ROOT/store.lock        flock: shared by every process using the store
    ROOT/fetch.lock        OFD byte-range locks: one writer per object across processes
    ROOT/clean             present only while no process has the store open after a clean close

The truth is the object files; ``index.db`` only accelerates usage accounting and LRU eviction.
Crash story: an object becomes visible only by ``rename`` after its bytes were fsynced, and its
index row is added after the rename; deleting unlinks the file, then drops the row. So after a
kill -9 or power loss the worst states are (a) a temp file in tmp/, (b) an object file with no
row, (c) a row with no file. The first process to open the store when no other process has it
open (exclusive flock succeeds) and finds no ``clean`` marker runs :meth:`LocalStore.recover`,
which removes (a) and reconciles (b) and (c); usage is therefore right after every start.
``vfsd store verify`` re-hashes every object and ``vfsd store rebuild`` redoes the scan at will.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import logging
import os
import sqlite3
import threading
import time
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import BinaryIO

from vfs.durable import fsync_dir, pid_alive, tmp_name, tmp_owner_pid, write_atomic
from vfs.errors import (
    BusyError,
    FormatError,
    IntegrityError,
    ObjectNotFound,
    StoreFull,
    UnsupportedFeature,
    UsageError,
)
from vfs.redirect.bounds import size_mismatch
from vfs.redirect.objectid import check_object_id, new_hasher, object_id, shard
from vfs.redirect.objfile import DEFAULT_CHUNK, ObjectReader, ObjectWriter
from vfs.redirect.roots import GcRoots

log = logging.getLogger(__name__)

STORE_FORMAT = "vfs-store"
STORE_VERSION = 1
KNOWN_FEATURES: frozenset[str] = frozenset()
ATIME_FLUSH_SECONDS = 5.0
READER_CACHE = 256
_COPY = 1 << 20


@dataclass
class StoreStats:
    root: str
    objects: int
    logical_bytes: int
    stored_bytes: int
    quota: int | None
    pinned_objects: int
    compress: bool


@dataclass
class VerifyReport:
    checked: int
    bad: list[str]
    removed: list[str]


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
        self.root = Path(root)
        self.objects_dir = self.root / "objects"
        self.tmp_dir = self.root / "tmp"
        self._lock = threading.RLock()
        self._readers: OrderedDict[str, ObjectReader] = OrderedDict()
        self._touched: dict[str, int] = {}
        self._last_flush = time.monotonic()
        self._flusher: threading.Thread | None = None
        self._objects_prefix = os.fspath(self.objects_dir) + "/"
        self._closed = False
        self._lock_fd = -1
        self._db: sqlite3.Connection | None = None
        self._db_lock = threading.Lock()

        config = self._open_config(create, quota, compress)
        self.quota: int | None = config.get("quota")
        self.compress: bool = bool(config.get("compress", False))
        self.chunk_size: int = int(config.get("chunk_size", DEFAULT_CHUNK))
        self.roots = GcRoots(self.root)  # what eviction must leave (vfs.redirect.roots)

        self._lock_fd = os.open(self.root / "store.lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC)
        try:
            self._db = self._open_db()
            self._startup()
        except BaseException:
            self.close()
            raise

    # ------------------------------------------------------------------ set-up and recovery

    def _open_config(self, create: bool, quota: int | None, compress: bool | None) -> dict:
        cfg_path = self.root / "store.json"
        if cfg_path.exists():
            try:
                config = json.loads(cfg_path.read_text())
            except (ValueError, OSError) as e:
                raise FormatError(f"{cfg_path}: unreadable store config: {e}") from None
            if config.get("format") != STORE_FORMAT:
                raise FormatError(f"{self.root} is not a vfs store")
            if config.get("version", 0) > STORE_VERSION:
                raise UnsupportedFeature(
                    f"{self.root}: store version {config.get('version')} is newer than this vfs"
                )
            unknown = set(config.get("features", [])) - KNOWN_FEATURES
            if unknown:
                raise UnsupportedFeature(f"{self.root}: unknown store features {sorted(unknown)}")
            changed = False
            if quota is not None and quota != config.get("quota"):
                config["quota"], changed = quota, True
            if compress is not None and compress != config.get("compress"):
                config["compress"], changed = compress, True
            if changed:
                write_atomic(cfg_path, json.dumps(config, indent=2).encode())
            return config
        if not create:
            raise UsageError(f"{self.root}: no store here (store.json missing)")
        if quota is not None and quota <= 0:
            raise UsageError("quota must be positive")
        self.root.mkdir(parents=True, exist_ok=True)
        (self.root / "objects").mkdir(exist_ok=True)
        (self.root / "tmp").mkdir(exist_ok=True)
        config = {
            "format": STORE_FORMAT,
            "version": STORE_VERSION,
            "features": [],
            "quota": quota,
            "compress": bool(compress),
            "chunk_size": DEFAULT_CHUNK,
        }
        with contextlib.suppress(FileExistsError):
            # O_EXCL through a hard link: two processes creating the same store agree on one.
            tmp = self.root / f".store.json.{os.getpid()}"
            tmp.write_bytes(json.dumps(config, indent=2).encode())
            os.fsync(os.open(tmp, os.O_RDONLY))
            os.link(tmp, cfg_path)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.root / f".store.json.{os.getpid()}")
        fsync_dir(self.root)
        return json.loads(cfg_path.read_text())

    def _open_db(self) -> sqlite3.Connection:
        db = sqlite3.connect(
            self.root / "index.db", timeout=30.0, check_same_thread=False, isolation_level=None
        )
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=NORMAL")
        # The canonical schema of the index (sentinels: atime 0 = never read since recovery).
        db.executescript(
            """
            CREATE TABLE IF NOT EXISTS objects (
                oid    TEXT PRIMARY KEY,   -- 64 hex chars, the object's SHA-256
                size   INTEGER NOT NULL,   -- uncompressed bytes
                stored INTEGER NOT NULL,   -- bytes of the object file on disk (what quota counts)
                atime  INTEGER NOT NULL    -- last use, unix seconds, for LRU eviction
            );
            CREATE INDEX IF NOT EXISTS objects_atime ON objects(atime);
            CREATE TABLE IF NOT EXISTS pins (
                oid   TEXT NOT NULL,
                owner TEXT NOT NULL,       -- 'pid:<n>' pins vanish with their process
                PRIMARY KEY (oid, owner)
            );
            """
        )
        return db

    def _startup(self) -> None:
        try:
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            alone = True
        except BlockingIOError:
            alone = False
        if alone:
            clean = self.root / "clean"
            if clean.exists():
                os.unlink(clean)
                fsync_dir(self.root)
            else:
                log.info("store %s was not closed cleanly: recovering", self.root)
                self.recover()
        fcntl.flock(self._lock_fd, fcntl.LOCK_SH)

    def recover(self) -> dict[str, int]:
        """Bring the index back to the truth of the object files; drop temp files of dead
        processes. Safe to run while other processes use the store (it only removes temp files
        whose owner is dead and reconciles rows with files)."""
        removed_tmp = 0
        for entry in os.scandir(self.tmp_dir):
            pid = tmp_owner_pid(entry.name)
            if pid is None or pid == os.getpid() or not pid_alive(pid):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(entry.path)
                removed_tmp += 1
        on_disk: dict[str, int] = {}
        for oid, path in self._iter_object_files():
            try:
                on_disk[oid] = path.stat().st_size
            except FileNotFoundError:
                pass
        db = self._require_db()
        with self._db_lock:
            rows = {oid: stored for oid, stored in db.execute("SELECT oid, stored FROM objects")}
            added = dropped = 0
            db.execute("BEGIN IMMEDIATE")
            try:
                for oid in rows.keys() - on_disk.keys():
                    db.execute("DELETE FROM objects WHERE oid=?", (oid,))
                    dropped += 1
                now = int(time.time())
                for oid, stored in on_disk.items():
                    if rows.get(oid) == stored:
                        continue
                    size = self._read_size(oid)
                    if size is None:
                        continue
                    db.execute(
                        "INSERT OR REPLACE INTO objects(oid, size, stored, atime) VALUES(?,?,?,?)",
                        (oid, size, stored, now),
                    )
                    added += 1
                for (owner,) in db.execute("SELECT DISTINCT owner FROM pins").fetchall():
                    if owner.startswith("pid:") and not pid_alive(int(owner[4:])):
                        db.execute("DELETE FROM pins WHERE owner=?", (owner,))
                db.execute("COMMIT")
            except BaseException:
                db.execute("ROLLBACK")
                raise
        result = {"removed_tmp": removed_tmp, "added_rows": added, "dropped_rows": dropped}
        log.info("store recovery: %s", result)
        return result

    def _read_size(self, oid: str) -> int | None:
        try:
            fd = os.open(self._path(oid), os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            return None
        try:
            return ObjectReader(fd, name=oid).size
        except (IntegrityError, FormatError) as e:
            log.warning("store: damaged object file %s (%s): removing", oid, e)
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self._path(oid))
            return None
        finally:
            os.close(fd)  # once: a second close could hit an fd another thread just opened

    def _iter_object_files(self) -> Iterator[tuple[str, Path]]:
        for sub in sorted(os.scandir(self.objects_dir), key=lambda e: e.name):
            if not sub.is_dir(follow_symlinks=False):
                continue
            for entry in os.scandir(sub.path):
                name = entry.name
                if len(name) == 64 and name.startswith(sub.name):
                    try:
                        check_object_id(name)
                    except UsageError:
                        continue
                    yield name, Path(entry.path)

    def _require_db(self) -> sqlite3.Connection:
        if self._db is None:
            raise UsageError("store is closed")
        return self._db

    # ------------------------------------------------------------------ reading

    def _path(self, oid: str) -> Path:
        return self.objects_dir / shard(oid)

    def has(self, oid: str) -> bool:
        """First redirection: is the object here? (one stat, no index round trip)"""
        check_object_id(oid)
        with self._lock:
            if oid in self._readers:
                return True
        return os.path.exists(self._path(oid))

    def _reader(self, oid: str) -> ObjectReader:
        with self._lock:
            r = self._readers.get(oid)
            if r is not None:
                self._readers.move_to_end(oid)
                self._touched[oid] = int(time.time())
                return r
        check_object_id(oid)
        try:
            # a plain string path: pathlib costs more than the open itself on a warm cache
            fd = os.open(self._objects_prefix + shard(oid), os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            raise ObjectNotFound(f"object {oid} not in local store", oid=oid) from None
        try:
            r = ObjectReader(fd, name=oid)
        except BaseException:
            os.close(fd)
            raise
        with self._lock:
            old = self._readers.get(oid)
            if old is not None:
                r.close()
                return old
            self._readers[oid] = r
            self._touched[oid] = int(time.time())
            while len(self._readers) > READER_CACHE:
                _, victim = self._readers.popitem(last=False)
                victim.close()
        self._maybe_flush_atimes()
        return r

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
            self._quarantine(oid)
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
            self._quarantine(oid)
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
            self._quarantine(oid)
            raise
        return n

    def _quarantine(self, oid: str) -> None:
        log.warning("store: object %s failed verification: removing the damaged copy", oid)
        with self._lock:
            r = self._readers.pop(oid, None)
            if r is not None:
                r.close()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self._path(oid))
        with self._db_lock:
            self._require_db().execute("DELETE FROM objects WHERE oid=?", (oid,))

    # ------------------------------------------------------------------ writing

    def put(self, data: bytes | bytearray | memoryview) -> str:
        """Store ``data``; return its id. Durable when this returns."""
        oid = object_id(data)
        if self.has(oid):
            self._touched[oid] = int(time.time())
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

    def _install(self, tmp: Path, oid: str, size: int) -> None:
        dest = self._path(oid)
        dest.parent.mkdir(exist_ok=True)
        stored = tmp.stat().st_size
        self._make_room(stored, exclude=oid)
        os.replace(tmp, dest)
        fsync_dir(dest.parent)
        with self._db_lock:
            self._require_db().execute(
                "INSERT OR REPLACE INTO objects(oid, size, stored, atime) VALUES(?,?,?,?)",
                (oid, size, stored, int(time.time())),
            )

    # ------------------------------------------------------------------ quota, pins, eviction

    def usage(self) -> int:
        with self._db_lock:
            db = self._require_db()
            (n,) = db.execute("SELECT COALESCE(SUM(stored),0) FROM objects").fetchone()
        return n

    def _make_room(self, need: int, exclude: str | None = None) -> None:
        if self.quota is None:
            return
        if need > self.quota:
            raise StoreFull(f"object of {need} bytes exceeds the store quota of {self.quota}")
        self._flush_atimes()
        db = self._require_db()
        with self._db_lock:
            (used,) = db.execute("SELECT COALESCE(SUM(stored),0) FROM objects").fetchone()
            if used + need <= self.quota:
                return
            victims = db.execute(
                "SELECT oid, stored FROM objects WHERE oid NOT IN (SELECT oid FROM pins) "
                "ORDER BY atime, oid"
            ).fetchall()
        freed = 0
        with self.roots.locked():  # gc roots: never what a root keeps, its cache objects last
            for oid, stored in self.roots.evictable(victims):
                if used + need - freed <= self.quota:
                    break
                if oid == exclude:
                    continue
                self._delete(oid)
                freed += stored
                log.info("store: evicted %s (%d bytes) for quota", oid, stored)
        if used + need - freed > self.quota:
            raise StoreFull(
                f"store quota {self.quota} bytes reached and the remaining objects are pinned "
                "or needed by a gc root (vfsd store roots)"
            )

    def _delete(self, oid: str) -> None:
        with self._lock:
            r = self._readers.pop(oid, None)
            if r is not None:
                r.close()
            self._touched.pop(oid, None)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self._path(oid))
        with self._db_lock:
            self._require_db().execute("DELETE FROM objects WHERE oid=?", (oid,))

    def delete(self, oid: str) -> None:
        """Remove an object (refused while it is pinned)."""
        check_object_id(oid)
        if self.pins(oid):
            raise BusyError(f"object {oid} is pinned by {', '.join(self.pins(oid))}")
        self._delete(oid)

    def pin(self, oid: str, owner: str) -> None:
        """Keep ``oid`` from eviction until ``unpin`` with the same owner."""
        check_object_id(oid)
        with self._db_lock:
            self._require_db().execute(
                "INSERT OR IGNORE INTO pins(oid, owner) VALUES(?,?)", (oid, owner)
            )

    def unpin(self, oid: str, owner: str) -> None:
        with self._db_lock:
            self._require_db().execute("DELETE FROM pins WHERE oid=? AND owner=?", (oid, owner))

    def pins(self, oid: str) -> list[str]:
        with self._db_lock:
            rows = self._require_db().execute("SELECT owner FROM pins WHERE oid=?", (oid,))
            return [r[0] for r in rows]

    def gc(self, target: int | None = None) -> dict[str, int]:
        """Evict unpinned objects, least recently used first, until usage <= ``target``
        (default: the quota; with neither, evict every unpinned object). Objects a gc root
        keeps stay; those it caches go only for an explicit ``target``
        (:mod:`vfs.redirect.roots`)."""
        self._flush_atimes()
        goal = target if target is not None else (self.quota if self.quota is not None else 0)
        db = self._require_db()
        with self._db_lock:
            (used,) = db.execute("SELECT COALESCE(SUM(stored),0) FROM objects").fetchone()
            victims = db.execute(
                "SELECT oid, stored FROM objects WHERE oid NOT IN (SELECT oid FROM pins) "
                "ORDER BY atime, oid"
            ).fetchall()
        removed = freed = 0
        with self.roots.locked():  # gc roots: never what a root keeps; its cache objects
            cache = self.roots.protected()[1] if target is None else set()  # only for --target
            for oid, stored in self.roots.evictable(victims):
                if used - freed <= goal or oid in cache:
                    break
                self._delete(oid)
                removed += 1
                freed += stored
        return {"removed": removed, "freed_bytes": freed, "usage": used - freed}

    def _maybe_flush_atimes(self) -> None:
        """Every few seconds, write the batched last-use times in a background thread: a
        reader (the FUSE daemon's event loop) never waits for SQLite. Nothing durable depends
        on them (docs/redirect.md: the index is a rebuildable cache; a lost atime only makes
        LRU eviction less exact); :meth:`close` waits for the thread and flushes the rest."""
        if time.monotonic() - self._last_flush <= ATIME_FLUSH_SECONDS:
            return
        with self._lock:
            if self._closed or (self._flusher is not None and self._flusher.is_alive()):
                return
            self._last_flush = time.monotonic()
            t = threading.Thread(
                target=self._flush_atimes_quietly, name="store-atimes", daemon=True
            )
            self._flusher = t
            t.start()  # under the lock: close() never finds an unstarted thread to join

    def _flush_atimes_quietly(self) -> None:
        try:
            self._flush_atimes()
        except Exception as e:  # a busy index: that batch's atimes are lost (LRU less exact)
            log.debug("store: atime flush failed: %s", e)

    def _flush_atimes(self) -> None:
        """Write batched last-use times (a SQLite write per read would dominate a warm hit)."""
        with self._lock:
            touched, self._touched = self._touched, {}
            self._last_flush = time.monotonic()
        if not touched or self._db is None:
            return
        with self._db_lock:
            self._db.executemany(
                "UPDATE objects SET atime=? WHERE oid=? AND atime<?",
                [(t, oid, t) for oid, t in touched.items()],
            )

    # ------------------------------------------------------------------ inspection

    def stats(self) -> StoreStats:
        db = self._require_db()
        with self._db_lock:
            n, logical, stored = db.execute(
                "SELECT COUNT(*), COALESCE(SUM(size),0), COALESCE(SUM(stored),0) FROM objects"
            ).fetchone()
            (pinned,) = db.execute("SELECT COUNT(DISTINCT oid) FROM pins").fetchone()
        return StoreStats(str(self.root), n, logical, stored, self.quota, pinned, self.compress)

    def stats_dict(self) -> dict:
        return asdict(self.stats())

    def list(self) -> list[str]:
        return sorted(oid for oid, _ in self._iter_object_files())

    def verify(self, *, repair: bool = False, progress=None) -> VerifyReport:
        """Re-hash every object against its id (and every chunk against its xxh3). With
        ``repair``, damaged objects are removed so they can be fetched again."""
        bad: list[str] = []
        removed: list[str] = []
        checked = 0
        for oid, path in self._iter_object_files():
            checked += 1
            try:
                fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
            except FileNotFoundError:
                continue
            try:
                r = ObjectReader(fd, name=oid)
                h = new_hasher()
                for chunk in r.iter_chunks():
                    h.update(chunk)
                ok = h.hexdigest() == oid
            except (IntegrityError, FormatError):
                ok = False
            finally:
                os.close(fd)
            if not ok:
                bad.append(oid)
                log.info("store: object %s is damaged", oid)
                if repair:
                    self._quarantine(oid)
                    removed.append(oid)
            if progress:
                progress(checked)
        return VerifyReport(checked, bad, removed)

    # ------------------------------------------------------------------ lifetime

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        with self._lock:
            flusher = self._flusher
        if flusher is not None:
            flusher.join()
        with contextlib.suppress(Exception):
            self._flush_atimes()
        with self._lock:
            for r in self._readers.values():
                r.close()
            self._readers.clear()
        if self._db is not None:
            with contextlib.suppress(Exception):
                self._db.execute("DELETE FROM pins WHERE owner=?", (f"pid:{os.getpid()}",))
            self._db.close()
            self._db = None
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


class PendingObject:
    """A new object being streamed into the store's tmp/; see :meth:`LocalStore.new_object`."""

    def __init__(self, store: LocalStore, expected_size: int | None, oid: str | None) -> None:
        self._store = store
        self._known_oid = oid
        self._hasher = new_hasher() if oid is None else None
        self._writer: ObjectWriter | None = None
        self._f: BinaryIO | None = None
        self._tmp: Path | None = None
        self.oid: str | None = None
        self.expected_size = expected_size
        self.received = 0

    def __enter__(self) -> PendingObject:
        self._tmp = tmp_name(self._store.tmp_dir)
        fd = os.open(self._tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o444)
        self._f = os.fdopen(fd, "wb", buffering=1 << 20)
        self._writer = ObjectWriter(
            self._f, compress=self._store.compress, chunk_size=self._store.chunk_size
        )
        return self

    def write(self, data: bytes | bytearray | memoryview) -> None:
        assert self._writer is not None
        try:
            self._writer.write(data)
        except OSError as e:
            if e.errno in (errno.ENOSPC, errno.EDQUOT):
                raise StoreFull(f"no space left in store {self._store.root}") from e
            raise
        if self._hasher is not None:
            self._hasher.update(data)
        self.received += len(data)

    def digest(self) -> str:
        return self._known_oid if self._hasher is None else self._hasher.hexdigest()

    def commit(self, expected: str | None = None) -> str:
        """Finish, verify against ``expected`` (if given), and publish the object."""
        assert self._writer is not None and self._f is not None and self._tmp is not None
        oid = self.digest()
        if expected is not None and oid != expected:
            raise IntegrityError(
                f"object {expected}: content does not match its id (got {oid}); discarded",
                oid=expected,
            )
        try:
            self._writer.finish()
            self._f.flush()
            os.fsync(self._f.fileno())
            self._f.close()
            self._store._install(self._tmp, oid, self._writer.size)
        except OSError as e:
            if e.errno in (errno.ENOSPC, errno.EDQUOT):
                raise StoreFull(f"no space left in store {self._store.root}") from e
            raise
        self._tmp = None
        self.oid = oid
        return oid

    def __exit__(self, *exc: object) -> None:
        if self._f is not None and not self._f.closed:
            with contextlib.suppress(OSError):
                self._f.close()
        if self._tmp is not None:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self._tmp)
            self._tmp = None
