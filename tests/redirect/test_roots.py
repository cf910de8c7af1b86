"""gc roots of the local store: what store gc and quota eviction must leave, across processes."""

from __future__ import annotations

import json
import multiprocessing
import os
import time

import pytest

from vfs.errors import FormatError, StoreFull, UnsupportedFeature
from vfs.redirect import LocalStore
from vfs.redirect.roots import GcRoots, ObjectSet, parse_root


def _fill(s: LocalStore, n: int, size: int = 10_000) -> list[str]:
    out = []
    for _ in range(n):
        out.append(s.put(os.urandom(size)))
        time.sleep(0.001)
    return out


def _age(s: LocalStore, oids: list[str]) -> None:
    """Give objects distinct last-use times in this order (LRU: the first is the oldest)."""
    s._flush_atimes()
    db = s._require_db()
    for i, oid in enumerate(oids):
        db.execute("UPDATE objects SET atime=? WHERE oid=?", (1000 + i, oid))


def test_plain_gc_leaves_what_roots_keep_and_cache(tmp_path):
    with LocalStore(tmp_path / "s") as s:
        keep, cache, _unrooted = _fill(s, 2), _fill(s, 2), _fill(s, 2)
        s.roots.put("vee-state", tmp_path / "state", {"t": ObjectSet(keep=keep, cache=cache)})
        res = s.gc()
        assert res["removed"] == 2
        assert sorted(s.list()) == sorted(keep + cache)
        # an explicit target may take cache objects, never kept ones
        res = s.gc(target=0)
        assert res["removed"] == 2 and sorted(s.list()) == sorted(keep)


def test_quota_eviction_takes_unrooted_first_then_cache_never_keep(tmp_path):
    with LocalStore(tmp_path / "s", quota=60_000) as s:
        cache = _fill(s, 2)
        keep = _fill(s, 2)
        free = _fill(s, 1)
        _age(s, cache + keep + free)  # the rooted ones are the least recently used
        s.roots.put("vimg", tmp_path / "img", {"image": ObjectSet(keep=keep, cache=cache)})
        new = s.put(os.urandom(15_000))  # needs one eviction: the unrooted one, not LRU order
        assert free[0] not in s.list() and set(cache + keep) <= set(s.list())
        newer = s.put(os.urandom(20_000))  # more room: first the unrooted (the newest one
        # too), then the cache objects, oldest first; kept ones never
        assert new not in s.list() and cache[0] not in s.list()
        assert set(keep) | {cache[1], newer} == set(s.list())
        with pytest.raises(StoreFull, match="gc root"):
            s.put(os.urandom(45_000))  # only kept objects left to evict: refused
        assert set(keep) <= set(s.list())


def test_roots_survive_the_process_and_are_shared(tmp_path):
    """A root is a file: another process (no daemon, a later gc) honours it."""
    with LocalStore(tmp_path / "s") as s:
        keep = _fill(s, 3)
        s.roots.put("vee-state", tmp_path / "state", {"t": ObjectSet(keep=keep)})
    ctx = multiprocessing.get_context("spawn")
    with ctx.Pool(1) as pool:
        removed = pool.apply(_gc_in_child, (str(tmp_path / "s"),))
    assert removed == 0
    with LocalStore(tmp_path / "s") as s:
        assert sorted(s.list()) == sorted(keep)
        assert s.roots.remove("vee-state", tmp_path / "state")
        assert s.gc()["removed"] == 3


def _gc_in_child(path: str) -> int:
    with LocalStore(path) as s:
        return s.gc()["removed"]


def test_update_merges_sets_and_drops(tmp_path):
    r = GcRoots(tmp_path)
    a, b = "a" * 64, "b" * 64
    r.update("vee-state", tmp_path / "st", add={"t1": ObjectSet(keep={a})}, repo="file:///x")
    r.update("vee-state", tmp_path / "st", add={"t2": ObjectSet(cache={b})})
    root = r.get("vee-state", tmp_path / "st")
    assert root is not None and set(root.sets) == {"t1", "t2"} and root.repo == "file:///x"
    assert r.protected() == ({a}, {b})
    r.update("vee-state", tmp_path / "st", drop=["t1"])
    assert r.protected() == (set(), {b})


@pytest.mark.parametrize(
    "doc, err",
    [
        (b"not json", FormatError),
        (b'{"format": "other"}', FormatError),
        (b'{"format": "vfs-gc-root", "version": 2, "kind": "x", "path": "/p", "sets": {}}',
         UnsupportedFeature),
        (b'{"format": "vfs-gc-root", "version": 1, "kind": "x", "path": "rel", "sets": {}}',
         FormatError),
        (b'{"format": "vfs-gc-root", "version": 1, "kind": "x", "path": "/p", '
         b'"sets": {"t": {"keep": ["../../etc"]}}}', FormatError),
        (b'{"format": "vfs-gc-root", "version": 1, "kind": "x", "path": "/p", '
         b'"sets": {"t": {"keep": "aaaa"}}}', FormatError),
    ],
)  # fmt: skip
def test_a_damaged_root_stops_eviction(tmp_path, doc, err):
    """A root that cannot be read protects nothing we know of: refuse to evict, loudly."""
    with pytest.raises(err):
        parse_root(doc, "x")
    with LocalStore(tmp_path / "s") as s:
        oids = _fill(s, 2)
        s.roots.dir.mkdir(exist_ok=True)
        (s.roots.dir / "bad.json").write_bytes(doc)
        with pytest.raises(err):
            s.gc()
        assert sorted(s.list()) == sorted(oids)


def test_a_root_written_during_a_gc_waits_for_it(tmp_path):
    """The lock protocol: an owner writing its root while a gc sweeps waits until the sweep is
    over, then finds (by its presence check) whatever the gc took."""
    import threading

    with LocalStore(tmp_path / "s") as s:
        oids = _fill(s, 3)
        held = threading.Event()
        release = threading.Event()

        def gc_holding_lock() -> None:
            with s.roots.locked():
                held.set()
                release.wait(10)
                s.gc()

        t = threading.Thread(target=gc_holding_lock)
        t.start()
        held.wait(10)
        other = GcRoots(s.root)  # another "process": its own lock file description
        done = threading.Event()

        def owner() -> None:
            other.put("vee-state", tmp_path / "st", {"t": ObjectSet(keep=oids)})
            done.set()

        w = threading.Thread(target=owner)
        w.start()
        time.sleep(0.2)
        assert not done.is_set()  # blocked behind the gc
        release.set()
        t.join(10)
        w.join(10)
        assert done.is_set()
        assert [o for o in oids if not s.has(o)] == oids  # the owner must now see them gone


def test_root_file_format(tmp_path):
    r = GcRoots(tmp_path)
    r.put("vimg", tmp_path / "disk.vimg", {"image": ObjectSet(cache={"c" * 64})}, repo=None)
    (f,) = (tmp_path / "roots").iterdir()
    doc = json.loads(f.read_text())
    assert doc["format"] == "vfs-gc-root" and doc["version"] == 1
    assert doc["kind"] == "vimg" and doc["path"] == str(tmp_path / "disk.vimg")
    assert doc["sets"] == {"image": {"keep": [], "cache": ["c" * 64]}}
