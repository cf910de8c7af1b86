"""The local store's index: sizes, last use and pins of the objects, in SQLite (WAL).

A rebuildable cache of the truth (the object files, ``docs/redirect.md`` section 5): it makes
usage accounting and LRU eviction cheap, and it is reconciled with the files by recovery after
any unclean close. Last-use times are batched in memory and written every few seconds from a
background thread, so a reader (the FUSE daemon's event loop) never waits for SQLite.

This module knows rows, not files: :class:`vfs.redirect.store.LocalStore` decides what an
eviction removes from disk (:meth:`StoreIndex.lru_victims` only proposes).
"""

from __future__ import annotations

import logging
import sqlite3
import threading
import time
from collections.abc import Iterable
from pathlib import Path

from vfs.durable import pid_alive

log = logging.getLogger(__name__)

#: How often batched last-use times are written (seconds).
ATIME_FLUSH_SECONDS = 5.0

SCHEMA = """
CREATE TABLE IF NOT EXISTS objects (
    oid    TEXT PRIMARY KEY,   -- 64 hex chars, the object's SHA-256
    size   INTEGER NOT NULL,   -- bytes of the object
    stored INTEGER NOT NULL,   -- length of the object file (what the quota counts)
    atime  INTEGER NOT NULL    -- last use, unix seconds, for LRU eviction
);
CREATE INDEX IF NOT EXISTS objects_atime ON objects(atime);
CREATE TABLE IF NOT EXISTS pins (
    oid   TEXT NOT NULL,
    owner TEXT NOT NULL,       -- 'pid:<n>' pins vanish with their process
    PRIMARY KEY (oid, owner)
);
"""


class StoreIndex:
    """One process's connection to ``ROOT/index.db``; thread-safe."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._db: sqlite3.Connection | None = sqlite3.connect(
            path, timeout=30.0, check_same_thread=False, isolation_level=None
        )
        # Two processes creating the index at once: switching a new database to WAL needs a
        # lock SQLite does not wait for with its busy timeout; the loser retries briefly.
        for attempt in range(100):
            try:
                self._db.execute("PRAGMA journal_mode=WAL")
                break
            except sqlite3.OperationalError as e:
                if "locked" not in str(e) or attempt == 99:
                    raise
                time.sleep(0.05)
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.executescript(SCHEMA)
        self._lock = threading.Lock()
        self._touched: dict[str, int] = {}
        self._touch_lock = threading.Lock()
        self._last_flush = time.monotonic()
        self._flusher: threading.Thread | None = None
        self._closed = False

    def _conn(self) -> sqlite3.Connection:
        if self._db is None:
            from vfs.errors import UsageError

            raise UsageError("store is closed")
        return self._db

    # -- rows ------------------------------------------------------------------------------

    def insert(self, oid: str, size: int, stored: int) -> None:
        with self._lock:
            self._conn().execute(
                "INSERT OR REPLACE INTO objects(oid, size, stored, atime) VALUES(?,?,?,?)",
                (oid, size, stored, int(time.time())),
            )

    def delete(self, oid: str) -> None:
        with self._touch_lock:
            self._touched.pop(oid, None)
        with self._lock:
            self._conn().execute("DELETE FROM objects WHERE oid=?", (oid,))

    def usage(self) -> int:
        with self._lock:
            (n,) = self._conn().execute("SELECT COALESCE(SUM(stored),0) FROM objects").fetchone()
        return n

    def totals(self) -> tuple[int, int, int, int]:
        """(objects, logical bytes, stored bytes, pinned objects)."""
        with self._lock:
            db = self._conn()
            n, logical, stored = db.execute(
                "SELECT COUNT(*), COALESCE(SUM(size),0), COALESCE(SUM(stored),0) FROM objects"
            ).fetchone()
            (pinned,) = db.execute("SELECT COUNT(DISTINCT oid) FROM pins").fetchone()
        return n, logical, stored, pinned

    def stored_by_oid(self) -> dict[str, int]:
        with self._lock:
            return dict(self._conn().execute("SELECT oid, stored FROM objects"))

    def reconcile(
        self, drop: Iterable[str], add: Iterable[tuple[str, int, int]]
    ) -> tuple[int, int]:
        """One transaction: drop rows whose file is gone, add/replace rows ``(oid, size,
        stored)`` for files the index lacks or has wrong, drop pins of dead processes."""
        dropped = added = 0
        now = int(time.time())
        with self._lock:
            db = self._conn()
            db.execute("BEGIN IMMEDIATE")
            try:
                for oid in drop:
                    db.execute("DELETE FROM objects WHERE oid=?", (oid,))
                    dropped += 1
                for oid, size, stored in add:
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
        return dropped, added

    # -- pins ------------------------------------------------------------------------------

    def pin(self, oid: str, owner: str) -> None:
        with self._lock:
            self._conn().execute("INSERT OR IGNORE INTO pins(oid, owner) VALUES(?,?)", (oid, owner))

    def unpin(self, oid: str, owner: str) -> None:
        with self._lock:
            self._conn().execute("DELETE FROM pins WHERE oid=? AND owner=?", (oid, owner))

    def pins(self, oid: str) -> list[str]:
        with self._lock:
            rows = self._conn().execute("SELECT owner FROM pins WHERE oid=?", (oid,))
            return [r[0] for r in rows]

    def drop_pins_of(self, owner: str) -> None:
        with self._lock:
            self._conn().execute("DELETE FROM pins WHERE owner=?", (owner,))

    # -- LRU -------------------------------------------------------------------------------

    def lru_victims(self) -> tuple[int, list[tuple[str, int]]]:
        """(usage, unpinned objects oldest use first as ``(oid, stored)``): what an eviction
        may remove, in the order it should. Batched last-use times are written first."""
        self.flush_atimes()
        with self._lock:
            db = self._conn()
            (used,) = db.execute("SELECT COALESCE(SUM(stored),0) FROM objects").fetchone()
            victims = db.execute(
                "SELECT oid, stored FROM objects WHERE oid NOT IN (SELECT oid FROM pins) "
                "ORDER BY atime, oid"
            ).fetchall()
        return used, victims

    def touch(self, oid: str) -> None:
        """Note a use of ``oid`` (written later, in a batch)."""
        with self._touch_lock:
            self._touched[oid] = int(time.time())
        self._maybe_flush()

    def _maybe_flush(self) -> None:
        if time.monotonic() - self._last_flush <= ATIME_FLUSH_SECONDS:
            return
        with self._touch_lock:
            if self._closed or (self._flusher is not None and self._flusher.is_alive()):
                return
            self._last_flush = time.monotonic()
            t = threading.Thread(target=self._flush_quietly, name="store-atimes", daemon=True)
            self._flusher = t
            t.start()  # under the lock: close() never finds an unstarted thread to join

    def _flush_quietly(self) -> None:
        try:
            self.flush_atimes()
        except Exception as e:  # a busy index: that batch's atimes are lost (LRU less exact)
            log.debug("store: atime flush failed: %s", e)

    def flush_atimes(self) -> None:
        """Write batched last-use times (a SQLite write per read would dominate a warm hit)."""
        with self._touch_lock:
            touched, self._touched = self._touched, {}
            self._last_flush = time.monotonic()
        if not touched or self._db is None:
            return
        with self._lock:
            self._db.executemany(
                "UPDATE objects SET atime=? WHERE oid=? AND atime<?",
                [(t, oid, t) for oid, t in touched.items()],
            )

    # -- lifetime --------------------------------------------------------------------------

    def close(self, *, drop_owner: str | None = None) -> None:
        if self._closed:
            return
        self._closed = True
        with self._touch_lock:
            flusher = self._flusher
        if flusher is not None:
            flusher.join()
        try:
            self.flush_atimes()
        except Exception as e:
            log.debug("store: final atime flush failed: %s", e)
        if self._db is not None:
            if drop_owner is not None:
                try:
                    self._db.execute("DELETE FROM pins WHERE owner=?", (drop_owner,))
                except sqlite3.Error as e:
                    log.debug("store: dropping pins of %s failed: %s", drop_owner, e)
            self._db.close()
            self._db = None
