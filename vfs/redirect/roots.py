"""Garbage-collection roots of a local store: what must not be evicted, also with no daemon up.

A store evicts objects for two reasons: ``vfsd store gc`` and the quota (least recently used
first, when a new object needs room). Neither may take an object something on this host still
needs and cannot get back. The owners of such needs — a ``vfsd`` state directory (its VEEs'
templates), a vimg image (its remote clusters) — *register* with the store as a root: a small
file naming the objects they need, written by the owner whenever that set changes and kept on
disk, so that it protects them whether or not the owner's process runs.

Layout (docs/redirect.md §8)::

    STORE/roots/<key>.json   one root: key = first 32 hex digits of sha256(kind NUL path)
    STORE/roots.lock         flock(2): LOCK_EX while a root is written, and while a gc or an
                             eviction decides and deletes

A root holds *sets* (one per template a state directory uses, one per image), each with two
lists of object ids:

- ``keep``: never evicted while the root names it — objects that cannot be fetched back (no
  repository behind them), and a template's manifest (the catalog a VEE needs to start at all,
  also while its repository is unreachable; CernVM-FS pins catalogs the same way);
- ``cache``: objects a repository can give back: evicted only under quota pressure or an
  explicit ``--target``, and after every object no root names (a plain ``vfsd store gc`` keeps
  them): eviction of them stays a cache decision, CernVM-FS style.

This module knows nothing of templates or images: the owners compute the sets
(:mod:`vfs.tree.gcroots`, the ``vimg`` push) and the store only asks :meth:`GcRoots.evictable`.

Concurrency and crash story: a root is replaced atomically (:func:`vfs.durable.write_atomic`)
under ``LOCK_EX`` of ``roots.lock``; a gc or an eviction holds the same lock from reading the
roots to the last unlink. An owner that adds objects to its root therefore either wrote before
the gc read the roots (protected), or after the gc finished (and finds the objects gone when it
checks that they are present, as it must after writing the root). A crash leaves the old or the
new root, never a torn one; an owner always widens its root *before* it starts to depend on the
new objects and narrows it only after it stopped.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import threading
import time
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from vfs.durable import fsync_dir, write_atomic
from vfs.errors import FormatError, UnsupportedFeature, UsageError
from vfs.redirect.objectid import check_object_id

log = logging.getLogger(__name__)

ROOT_FORMAT = "vfs-gc-root"
ROOT_VERSION = 1
#: The kinds of owners; a root of another kind (a newer vfs) is honoured, never rewritten.
KINDS = ("vee-state", "vimg")
#: A root file larger than this is refused as damaged (100 templates of 1 M files fit).
MAX_ROOT_BYTES = 1 << 32


@dataclass
class ObjectSet:
    """The objects one use needs: ``keep`` (never evicted), ``cache`` (evictable last)."""

    keep: set[str] = field(default_factory=set)
    cache: set[str] = field(default_factory=set)

    def __post_init__(self) -> None:
        self.keep = set(self.keep)
        self.cache = set(self.cache) - self.keep

    def to_json(self) -> dict[str, list[str]]:
        return {"keep": sorted(self.keep), "cache": sorted(self.cache - self.keep)}

    def __len__(self) -> int:
        return len(self.keep | self.cache)


@dataclass
class Root:
    """One registered owner and the sets of objects it needs."""

    kind: str
    path: str
    repo: str | None = None  #: where the owner fetches missing objects from (informative)
    sets: dict[str, ObjectSet] = field(default_factory=dict)
    updated_ns: int = 0

    def keep(self) -> set[str]:
        return set().union(*(s.keep for s in self.sets.values()))

    def cache(self) -> set[str]:
        return set().union(*(s.cache for s in self.sets.values())) - self.keep()

    def to_json(self) -> dict[str, object]:
        return {
            "format": ROOT_FORMAT,
            "version": ROOT_VERSION,
            "kind": self.kind,
            "path": self.path,
            "repo": self.repo,
            "updated_ns": self.updated_ns,
            "sets": {label: s.to_json() for label, s in sorted(self.sets.items())},
        }

    def summary(self) -> dict[str, object]:
        keep, cache = self.keep(), self.cache()
        return {
            "kind": self.kind,
            "path": self.path,
            "repo": self.repo,
            "sets": len(self.sets),
            "keep_objects": len(keep),
            "cache_objects": len(cache),
            "present": os.path.exists(self.path),
            "updated_ns": self.updated_ns,
        }


def root_key(kind: str, path: str) -> str:
    return hashlib.sha256(f"{kind}\0{path}".encode("utf-8", "surrogateescape")).hexdigest()[:32]


def _ids(value: object, where: str) -> set[str]:
    if not isinstance(value, list):
        raise FormatError(f"{where}: object list expected")
    out = set()
    for oid in value:
        if not isinstance(oid, str):
            raise FormatError(f"{where}: object ids are strings")
        try:
            out.add(check_object_id(oid))
        except UsageError:
            raise FormatError(f"{where}: {oid[:80]!r} is no object id") from None
    return out


def parse_root(raw: bytes, where: str) -> Root:
    """A root file, checked strictly: a damaged root must stop a gc, not protect nothing."""
    try:
        doc = json.loads(raw)
    except ValueError as e:
        raise FormatError(f"{where}: unreadable gc root ({e})") from None
    if not isinstance(doc, dict) or doc.get("format") != ROOT_FORMAT:
        raise FormatError(f"{where}: not a gc root")
    version = doc.get("version")
    if type(version) is not int or version < 1:
        raise FormatError(f"{where}: bad version {version!r}")
    if version > ROOT_VERSION:
        raise UnsupportedFeature(f"{where}: gc root version {version} is newer than this vfs")
    kind, path, repo = doc.get("kind"), doc.get("path"), doc.get("repo")
    if not isinstance(kind, str) or not isinstance(path, str) or not os.path.isabs(path):
        raise FormatError(f"{where}: a root names its kind and its absolute path")
    if repo is not None and not isinstance(repo, str):
        raise FormatError(f"{where}: repo must be a string or null")
    sets_doc = doc.get("sets")
    if not isinstance(sets_doc, dict):
        raise FormatError(f"{where}: sets must be an object")
    sets = {}
    for label, s in sets_doc.items():
        if not isinstance(s, dict):
            raise FormatError(f"{where}: set {label!r} must be an object")
        sets[label] = ObjectSet(
            _ids(s.get("keep", []), f"{where}: set {label!r}"),
            _ids(s.get("cache", []), f"{where}: set {label!r}"),
        )
    updated = doc.get("updated_ns", 0)
    return Root(kind, path, repo, sets, updated if type(updated) is int else 0)


class GcRoots:
    """The roots of the store at ``store_root`` (thread-safe; any number of processes)."""

    def __init__(self, store_root: str | os.PathLike[str]) -> None:
        self.store_root = Path(store_root)
        self.dir = self.store_root / "roots"
        self._lock_path = self.store_root / "roots.lock"
        self._mutex = threading.RLock()  # flock is per open file: threads need their own lock
        self._depth = 0
        self._fd = -1
        # parsed roots by file name, with the (inode, mtime, size) they were parsed at
        self._cache: dict[str, tuple[tuple[int, int, int], Root]] = {}

    # -- locking ---------------------------------------------------------------------------

    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        """Exclusive: no root changes while the holder reads the roots and acts on them
        (re-entrant within a process)."""
        with self._mutex:
            if self._depth == 0:
                self.dir.mkdir(exist_ok=True)
                fd = os.open(self._lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX)
                except BaseException:
                    os.close(fd)
                    raise
                self._fd = fd
            self._depth += 1
            try:
                yield
            finally:
                self._depth -= 1
                if self._depth == 0:
                    os.close(self._fd)  # releases the flock
                    self._fd = -1

    # -- reading ---------------------------------------------------------------------------

    def _file(self, kind: str, path: str) -> Path:
        return self.dir / f"{root_key(kind, path)}.json"

    def roots(self) -> list[Root]:
        """Every registered root (parsed files are cached while they do not change). A
        damaged root raises FormatError naming its file: nothing may be evicted then."""
        out = []
        try:
            entries = sorted(os.scandir(self.dir), key=lambda e: e.name)
        except FileNotFoundError:
            return []
        seen = set()
        for entry in entries:
            if not entry.name.endswith(".json") or entry.name.startswith("."):
                continue
            try:
                st = entry.stat(follow_symlinks=False)
            except FileNotFoundError:
                continue
            sig = (st.st_ino, st.st_mtime_ns, st.st_size)
            seen.add(entry.name)
            cached = self._cache.get(entry.name)
            if cached is not None and cached[0] == sig:
                out.append(cached[1])
                continue
            if st.st_size > MAX_ROOT_BYTES:
                raise FormatError(f"{entry.path}: gc root larger than {MAX_ROOT_BYTES} bytes")
            try:
                with open(entry.path, "rb") as f:
                    raw = f.read(MAX_ROOT_BYTES + 1)
            except FileNotFoundError:
                continue
            root = parse_root(raw, entry.path)
            self._cache[entry.name] = (sig, root)
            out.append(root)
        for name in list(self._cache):
            if name not in seen:
                del self._cache[name]
        return out

    def get(self, kind: str, path: str | os.PathLike[str]) -> Root | None:
        p = _abs(path)
        for r in self.roots():
            if r.kind == kind and r.path == p:
                return r
        return None

    def protected(self) -> tuple[set[str], set[str]]:
        """(keep, cache): every object some root needs, in its strongest class."""
        keep: set[str] = set()
        cache: set[str] = set()
        for r in self.roots():
            for s in r.sets.values():
                keep |= s.keep
                cache |= s.cache
        return keep, cache - keep

    def evictable(self, candidates: Iterable[tuple[str, int]]) -> list[tuple[str, int]]:
        """The store's eviction hook: ``candidates`` (object id, bytes) in least recently used
        order, minus every ``keep`` object, with objects no root names first and ``cache``
        objects after them (each group still in LRU order). Call it under :meth:`locked`
        and delete under the same lock."""
        keep, cache = self.protected()
        free, cached = [], []
        for oid, n in candidates:
            if oid in keep:
                continue
            (cached if oid in cache else free).append((oid, n))
        return free + cached

    # -- writing ---------------------------------------------------------------------------

    def put(
        self,
        kind: str,
        path: str | os.PathLike[str],
        sets: Mapping[str, ObjectSet],
        *,
        repo: str | None = None,
    ) -> Root:
        """Register (or replace) the root of ``path``: durable when this returns."""
        if kind not in KINDS:
            raise UsageError(f"unknown gc root kind {kind!r}")
        root = Root(kind, _abs(path), repo, dict(sets), time.time_ns())
        with self.locked():
            write_atomic(self._file(kind, root.path), json.dumps(root.to_json()).encode() + b"\n")
        return root

    def update(
        self,
        kind: str,
        path: str | os.PathLike[str],
        *,
        add: Mapping[str, ObjectSet] | None = None,
        drop: Iterable[str] = (),
        repo: str | None = None,
    ) -> Root:
        """Read-modify-write under the lock: sets in ``add`` replace those of the same label,
        labels in ``drop`` go; the rest stays as it is."""
        with self.locked():
            old = self.get(kind, path)
            sets = dict(old.sets) if old is not None else {}
            for label in drop:
                sets.pop(label, None)
            sets.update(add or {})
            if repo is None and old is not None:
                repo = old.repo
            return self.put(kind, path, sets, repo=repo)

    def remove(self, kind: str, path: str | os.PathLike[str]) -> bool:
        """Unregister ``path``: its objects become ordinary cache (False if it was none)."""
        f = self._file(kind, _abs(path))
        with self.locked():
            try:
                os.unlink(f)
            except FileNotFoundError:
                return False
            fsync_dir(self.dir)
        return True


def _abs(path: str | os.PathLike[str]) -> str:
    return os.path.abspath(os.fspath(path))
