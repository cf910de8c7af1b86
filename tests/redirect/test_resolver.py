"""Resolver over a file:// repository: redirections, single flight, lying repositories."""

from __future__ import annotations

import os
import threading

import pytest

from vfs.errors import IntegrityError, ObjectNotFound, SizeMismatch, UsageError
from vfs.redirect import LocalStore, Resolver, open_remote
from vfs.redirect.file_remote import FileRemote


@pytest.fixture
def env(tmp_path):
    remote = open_remote(f"file://{tmp_path / 'repo'}", create=True)
    with LocalStore(tmp_path / "store") as store:
        yield store, remote, Resolver(store, remote)


def test_second_then_first_redirection(env):
    store, remote, res = env
    data = os.urandom(100_000)
    oid = remote.put(data)
    assert not store.has(oid)
    assert res.read(oid, 10, 20) == data[10:30]  # second redirection: fetched, verified, stored
    assert store.has(oid) and res.fetches == 1
    assert res.get(oid) == data  # first redirection: no new fetch
    assert res.fetches == 1


def test_fifty_concurrent_readers_one_fetch(env):
    store, remote, res = env
    data = os.urandom(3 << 20)
    oid = remote.put(data)
    results, errors = [], []
    barrier = threading.Barrier(50)

    def reader(i):
        try:
            barrier.wait()
            results.append(res.read(oid, i * 1000, 1000) == data[i * 1000 : i * 1000 + 1000])
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=reader, args=(i,)) for i in range(50)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert results == [True] * 50
    assert res.fetches == 1


def test_lying_repository_is_refused_and_nothing_is_stored(env, tmp_path):
    store, remote, res = env
    oid = remote.put(b"the truth" * 1000)
    path = tmp_path / "repo" / "objects" / oid[:2] / oid
    path.write_bytes(b"a lie" * 1000)
    with pytest.raises(IntegrityError, match=oid):
        res.ensure(oid)
    assert not store.has(oid)
    assert list((store.root / "tmp").iterdir()) == []
    assert store.stats().objects == 0


def test_object_of_another_size_is_refused_before_it_is_read(env):
    store, remote, res = env
    oid = remote.put(b"x" * 10_000)
    with pytest.raises(SizeMismatch, match=f"{oid}.* 10000 bytes where 100 were expected"):
        res.ensure(oid, expected_size=100)
    with pytest.raises(SizeMismatch):
        res.ensure(oid, size_hint=100)  # the former name (vfs/image callers) means the same
    with pytest.raises(IntegrityError, match="more than the expected 100 bytes"):
        res.ensure(oid, max_size=100)
    assert not store.has(oid) and res.fetches == 0


@pytest.mark.log_warnings
def test_damaged_local_copy_is_fetched_again(env):
    store, remote, res = env
    data = os.urandom(200_000)
    oid = remote.put(data)
    res.ensure(oid)
    p = store.root / "objects" / oid[:2] / oid
    raw = bytearray(p.read_bytes())
    raw[10] ^= 0xFF
    os.chmod(p, 0o644)
    p.write_bytes(bytes(raw))
    store._readers.clear()
    assert res.read(oid, 0, 100) == data[:100]
    assert res.fetches == 2


def test_missing_everywhere_and_hostile_ids(env):
    store, remote, res = env
    with pytest.raises(ObjectNotFound):
        res.get("1" * 64)
    with pytest.raises(UsageError):
        res.get("../../../../etc/shadow")
    with pytest.raises(ObjectNotFound):
        Resolver(store).get("1" * 64)


def test_refs_are_validated(tmp_path):
    r = FileRemote(tmp_path / "r", create=True)
    oid = r.put(b"manifest")
    r.set_ref("debian-12.1", oid)
    assert r.get_ref("debian-12.1") == oid
    assert r.list_refs() == {"debian-12.1": oid}
    for bad in ["../x", "a/b", "", ".hidden", "x" * 200, "a\0b"]:
        with pytest.raises(UsageError):
            r.set_ref(bad, oid)
    with pytest.raises(ObjectNotFound):
        r.set_ref("dangling", "2" * 64)


def test_repository_format_is_checked(tmp_path):
    d = tmp_path / "r"
    FileRemote.init(d)
    (d / "vfs-repo.json").write_text('{"format": "vfs-repo", "version": 99}')
    from vfs.errors import UnsupportedFeature

    with pytest.raises(UnsupportedFeature):
        FileRemote(d)


@pytest.mark.log_warnings
def test_read_local_never_fetches(env):
    store, remote, res = env
    data = os.urandom(100_000)
    oid = remote.put(data)
    assert res.read_local(oid, 0, 10) is None and res.fetches == 0  # absent: caller fetches
    assert res.read(oid, 5, 10, drop_cache=True) == data[5:15]
    assert res.read_local(oid, 70_000, 10, drop_cache=True) == data[70_000:70_010]
    p = store.root / "objects" / oid[:2] / oid
    raw = bytearray(p.read_bytes())
    raw[10] ^= 0xFF
    os.chmod(p, 0o644)
    p.write_bytes(bytes(raw))
    store._readers.clear()
    assert res.read_local(oid, 0, 10) is None  # damaged: quarantined, a remote has a good copy
    assert not store.has(oid) and res.fetches == 1
    oid2 = store.put(b"local only" * 1000)
    p2 = store.root / "objects" / oid2[:2] / oid2
    raw = bytearray(p2.read_bytes())
    raw[3] ^= 0xFF
    os.chmod(p2, 0o644)
    p2.write_bytes(bytes(raw))
    with pytest.raises(IntegrityError):
        Resolver(store).read_local(oid2, 0, 10)  # no remote: an error, never data
