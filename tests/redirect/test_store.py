"""LocalStore: durability, accounting, quota/LRU, pins, corruption, crashes, full disks."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from vfs.errors import BusyError, IntegrityError, ObjectNotFound, StoreFull, UsageError
from vfs.redirect import LocalStore, object_id


@pytest.fixture
def store(tmp_path):
    with LocalStore(tmp_path / "store") as s:
        yield s


def test_put_get_read_has(store):
    data = os.urandom(200_000)
    oid = store.put(data)
    assert oid == object_id(data)
    assert store.has(oid)
    assert store.get(oid) == data
    assert store.read(oid, 70_000, 100_000) == data[70_000:170_000]
    assert store.size(oid) == len(data)
    assert store.put(data) == oid  # idempotent
    assert store.stats().objects == 1


def test_missing_object_and_bad_ids(store):
    with pytest.raises(ObjectNotFound):
        store.get("0" * 64)
    with pytest.raises(UsageError):
        store.has("../../etc/passwd")


def test_put_file_streams_large_file(store, tmp_path):
    src = tmp_path / "big"
    with open(src, "wb") as f:
        for _ in range(20):
            f.write(os.urandom(1 << 20))
    oid = store.put_file(src)
    data = src.read_bytes()
    assert oid == object_id(data)
    assert store.read(oid, 19 << 20, 2 << 20) == data[19 << 20 :]


def test_objects_are_plain_files_and_compression_is_left_to_the_file_system(tmp_path):
    """Format 2: the object file is exactly the object's bytes (the kernel engine reads it as
    its first data layer); runs of zeros stay holes; zstd at rest is refused with the way out."""
    with LocalStore(tmp_path / "z") as s:
        data = os.urandom(100_000) + bytes(1 << 20) + b"end"
        oid = s.put(data)
        path = tmp_path / "z" / "objects" / oid[:2] / oid
        assert path.read_bytes() == data
        assert path.stat().st_blocks * 512 < 200_000  # the MiB of zeros is a hole
        assert (tmp_path / "z" / "sums" / oid[:2] / oid).exists()  # > one chunk: a sidecar
        small = s.put(b"tiny")
        assert not (tmp_path / "z" / "sums" / small[:2] / small).exists()
        assert s.get(oid) == data
    with pytest.raises(UsageError, match="compressing file system"):
        LocalStore(tmp_path / "c", compress=True)


def test_usage_survives_reopen_and_is_rebuilt_from_files(tmp_path):
    root = tmp_path / "s"
    with LocalStore(root) as s:
        oids = [s.put(os.urandom(10_000 + i)) for i in range(5)]
        before = s.stats()
    (root / "index.db").unlink()
    for p in root.glob("index.db-*"):
        p.unlink()
    with LocalStore(root) as s:
        after = s.stats()
    # A lost index is not a clean store: the first opener rescans.
    assert (root / "clean").exists()
    (root / "clean").unlink()
    with LocalStore(root) as s:
        after = s.stats()
        assert all(s.has(o) for o in oids)
    assert (after.objects, after.stored_bytes) == (before.objects, before.stored_bytes)


def test_quota_evicts_least_recently_used_unpinned(tmp_path):
    with LocalStore(tmp_path / "q", quota=350_000) as s:
        a = s.put(os.urandom(100_000))
        b = s.put(os.urandom(100_000))
        s.pin(a, "test")
        time.sleep(1.1)  # atimes have 1 s resolution
        s.read(b, 0, 1)
        s._flush_atimes()
        c = s.put(os.urandom(100_000))
        time.sleep(1.1)
        d = s.put(os.urandom(100_000))  # over quota: the LRU unpinned (b, then c) must go
        assert s.has(a) and s.has(d)
        assert not (s.has(b) and s.has(c))
        assert s.stats().stored_bytes <= 350_000
        with pytest.raises(StoreFull):
            s.put(os.urandom(400_000))
        with pytest.raises(BusyError):
            s.delete(a)
        s.unpin(a, "test")
        s.delete(a)
        assert not s.has(a)


def test_gc_keeps_pinned(store):
    a = store.put(b"a" * 1000)
    b = store.put(b"b" * 1000)
    store.pin(a, "vee:x")
    res = store.gc()
    assert res["removed"] == 1
    assert store.has(a) and not store.has(b)


@pytest.mark.log_warnings
def test_flipped_bit_on_disk_is_refused_quarantined_and_found_by_verify(tmp_path):
    root = tmp_path / "s"
    data = os.urandom(300_000)
    with LocalStore(root) as s:
        oid = s.put(data)
        other = s.put(b"fine")
    path = root / "objects" / oid[:2] / oid
    with open(path, "r+b") as f:
        f.seek(150_000)
        byte = f.read(1)
        f.seek(150_000)
        f.write(bytes([byte[0] ^ 1]))
    with LocalStore(root) as s:
        rep = s.verify()
        assert rep.bad == [oid] and rep.checked == 2
        with pytest.raises(IntegrityError, match=oid):
            s.read(oid, 140_000, 20_000)
        assert not s.has(oid)  # quarantined: a resolver will fetch a good copy
        assert s.get(other) == b"fine"


def _run(code: str, *args: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(code), *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )


def test_kill_9_mid_put_leaves_no_partial_object_and_next_start_cleans(tmp_path):
    root = tmp_path / "s"
    with LocalStore(root) as s:
        kept = s.put(b"acknowledged before the crash")
    # A writer that acknowledges one object, then streams a second one forever.
    proc = _run(
        """
        import sys, os
        from vfs.redirect import LocalStore
        s = LocalStore(sys.argv[1])
        print(s.put(b"acked"), flush=True)
        with s.new_object() as p:
            while True:
                p.write(os.urandom(1 << 16))
        """,
        str(root),
    )
    acked = proc.stdout.readline().decode().strip()
    deadline = time.monotonic() + 10
    while not any((root / "tmp").iterdir()) and time.monotonic() < deadline:
        time.sleep(0.01)
    time.sleep(0.2)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert any((root / "tmp").iterdir()), "the killed writer left its temp file"
    with LocalStore(root) as s:
        assert list((root / "tmp").iterdir()) == []
        assert s.get(kept) == b"acknowledged before the crash"
        assert s.get(acked) == b"acked"
        st = s.stats()
        assert st.objects == 2
        assert st.stored_bytes == sum(
            p.stat().st_size for p in (root / "objects").rglob("*") if p.is_file()
        )
        assert s.verify().bad == []


@pytest.fixture
def tiny_fs(tmp_path):
    """A real 2 MiB tmpfs: writes beyond it fail with ENOSPC."""
    mnt = tmp_path / "tiny"
    mnt.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mnt)])
    if r.returncode != 0:
        pytest.skip("cannot mount tmpfs (not root?)")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def test_full_disk_is_a_clear_error_and_leaves_no_partial_object(tiny_fs):
    with LocalStore(tiny_fs / "s") as s:
        small = s.put(b"x" * 1000)
        with pytest.raises(StoreFull):
            s.put(os.urandom(4 << 20))
        assert list((tiny_fs / "s" / "tmp").iterdir()) == []
        assert s.get(small) == b"x" * 1000
        assert s.verify().bad == []
        assert s.stats().objects == 1


def test_concurrent_processes_share_one_store(tmp_path):
    root = tmp_path / "s"
    LocalStore(root).close()
    code = """
        import sys, os
        from vfs.redirect import LocalStore
        s = LocalStore(sys.argv[1])
        ids = [s.put(bytes([i]) * 50_000) for i in range(30)]
        ids.append(s.put(os.urandom(50_000)))
        s.close()
        print(len(set(ids)))
        """
    procs = [_run(code, str(root)) for _ in range(4)]
    for p in procs:
        out, err = p.communicate(timeout=60)
        assert p.returncode == 0, err.decode()
        assert out.strip() == b"31"
    with LocalStore(root) as s:
        st = s.stats()
        assert st.objects == 30 + 4
        assert s.verify().bad == []


def test_accounting_is_right_after_kill_9_at_a_random_point(tmp_path):
    """A writer putting objects in a loop is killed at some instant (maybe between the rename
    and the index insert); after restart the usage equals what is really on disk."""
    root = tmp_path / "s"
    LocalStore(root).close()
    proc = _run(
        """
        import sys, os
        from vfs.redirect import LocalStore
        s = LocalStore(sys.argv[1])
        i = 0
        while True:
            s.put(os.urandom(1000 + i % 5000))
            i += 1
            if i == 20:
                print("go", flush=True)
        """,
        str(root),
    )
    assert proc.stdout.readline().strip() == b"go"
    time.sleep(0.3)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    files = [p for p in (root / "objects").rglob("*") if p.is_file()]
    with LocalStore(root) as s:
        st = s.stats()
        assert st.objects == len(files) >= 20
        assert st.stored_bytes == sum(p.stat().st_size for p in files)
        assert s.verify().bad == []


@pytest.mark.log_warnings
def test_damaged_or_missing_sidecar_never_costs_a_good_object(tmp_path):
    root = tmp_path / "s"
    data = os.urandom(300_000)
    with LocalStore(root) as s:
        oid = s.put(data)
    sums = root / "sums" / oid[:2] / oid
    raw = bytearray(sums.read_bytes())
    raw[40] ^= 0xFF  # one chunk checksum wrong, the sidecar's own checksum too
    os.chmod(sums, 0o644)
    sums.write_bytes(bytes(raw))
    with LocalStore(root) as s:
        assert s.read(oid, 0, 300_000) == data  # rebuilt from the object, which matches its id
    with LocalStore(root) as s:
        sums.unlink()  # e.g. lost with a crash between the two renames
        assert s.get(oid) == data
        assert sums.exists()
    # A well-formed sidecar with one wrong checksum: the read of that chunk fails once (its
    # bytes cannot be vouched for by it), the object is found good and the sidecar rebuilt.
    from vfs.redirect.objfile import ChunkSums

    good = ChunkSums.decode(sums.read_bytes())
    lie = ChunkSums(good.size, good.chunk_size, good.sums[:])
    lie.sums[2] ^= 1
    os.chmod(sums, 0o644)
    sums.write_bytes(lie.encode())
    with LocalStore(root) as s:
        with pytest.raises(IntegrityError):
            s.read(oid, 2 * 65536, 10)
        assert s.has(oid)
        assert s.read(oid, 2 * 65536, 10) == data[2 * 65536 : 2 * 65536 + 10]
    with LocalStore(root) as s:
        rep = s.verify()
        assert rep.bad == [] and rep.sums_rebuilt == []


def _v1_store(root, objects: list[bytes], *, compress: bool) -> list[str]:
    """A store as vfs before format 2 left it: containers in objects/, store.json version 1."""
    import json

    from vfs.redirect.objfile_v1 import write_v1

    (root / "objects").mkdir(parents=True)
    (root / "tmp").mkdir()
    (root / "store.json").write_text(
        json.dumps(
            {"format": "vfs-store", "version": 1, "features": [], "quota": None,
             "compress": compress, "chunk_size": 65536}
        )
    )  # fmt: skip
    oids = []
    for data in objects:
        oid = object_id(data)
        (root / "objects" / oid[:2]).mkdir(exist_ok=True)
        with open(root / "objects" / oid[:2] / oid, "wb") as f:
            write_v1(f, data, compress=compress)
        oids.append(oid)
    return oids


@pytest.mark.log_warnings
@pytest.mark.parametrize("compress", [False, True])
def test_format_1_store_is_migrated_to_plain_files_in_place(tmp_path, compress):
    import json

    root = tmp_path / "s"
    blobs = [b"text line\n" * 30_000, os.urandom(1000), b"", os.urandom(200_000)]
    oids = _v1_store(root, blobs, compress=compress)
    damaged = _v1_store(tmp_path / "other", [b"will be damaged" * 100], compress=False)[0]
    src = tmp_path / "other" / "objects" / damaged[:2] / damaged
    (root / "objects" / damaged[:2]).mkdir(exist_ok=True)
    raw = bytearray(src.read_bytes())
    raw[5] ^= 1
    (root / "objects" / damaged[:2] / damaged).write_bytes(bytes(raw))
    # An interrupted earlier migration: one object already plain.
    done = oids[1]
    (root / "objects" / done[:2] / done).write_bytes(blobs[1])
    with LocalStore(root) as s:
        for oid, data in zip(oids, blobs, strict=True):
            assert (root / "objects" / oid[:2] / oid).read_bytes() == data
            assert s.get(oid) == data
        assert not s.has(damaged)
        assert s.verify().bad == []
        st = s.stats()
        assert st.objects == len(blobs) and st.stored_bytes == sum(map(len, blobs))
    cfg = json.loads((root / "store.json").read_text())
    assert cfg["version"] == 2 and "compress" not in cfg


def test_format_1_store_in_use_elsewhere_is_not_migrated_under_it(tmp_path):
    import fcntl

    root = tmp_path / "s"
    _v1_store(root, [b"x" * 10], compress=False)
    fd = os.open(root / "store.lock", os.O_RDWR | os.O_CREAT)
    try:
        fcntl.flock(fd, fcntl.LOCK_SH)
        with pytest.raises(BusyError, match="must be migrated"):
            LocalStore(root)
    finally:
        os.close(fd)
