"""The request fast paths (docs/vimg-format.md 9 and 13.3, README "Disk images"): reads into a
caller's buffer, host-contiguous runs read and written with one system call, and the checksum of a
fresh cluster rewritten in part computed once, at the commit or at the first read."""

from __future__ import annotations

import os
import random

import pytest
import xxhash

from vfs.errors import IntegrityError
from vfs.image import layout as L
from vfs.image.check import check, verify
from vfs.image.image import Image

from .helpers import Recorder

CS = 4096


def _model_image(tmp_path, r: random.Random, *, backing: bool, compress: bool = False):
    size = 64 * CS
    base = bytearray(size)
    bpath = str(tmp_path / "base.vimg")
    path = str(tmp_path / "img.vimg")
    kw = {}
    if backing:
        with Image.create(bpath, size, cluster_size=CS) as b:
            d = r.randbytes(size // 2)
            b.write(size // 4, d)
            base[size // 4 : size // 4 + len(d)] = d
        kw["backing"] = os.path.basename(bpath)
    img = Image.create(path, size, cluster_size=CS, compress=compress, **kw)
    return img, bytearray(base), path


@pytest.mark.parametrize("backing", [False, True])
@pytest.mark.parametrize("compress", [False, True])
def test_readinto_and_read_match_the_model(tmp_path, backing, compress):
    r = random.Random(7 + backing + 2 * compress)
    img, model, _ = _model_image(tmp_path, r, backing=backing, compress=compress)
    try:
        for i in range(400):
            off = r.randrange(0, len(model))
            n = min(
                r.choice([1, 511, CS, 3 * CS, 5 * CS + 9, r.randrange(1, 9 * CS)]), len(model) - off
            )
            op = r.random()
            if op < 0.45:
                d = r.randbytes(n) if r.random() < 0.8 else bytes(n)
                img.write(off, d)
                model[off : off + n] = d
            elif op < 0.5:
                img.discard(off, n)
                model[off : off + n] = bytes(n)
            elif op < 0.55:
                img.flush()
            else:
                want = bytes(model[off : off + n])
                buf = bytearray(b"\xee") * n  # stale bytes must all be overwritten
                assert img.readinto(off, buf) == n
                assert buf == want, f"readinto {off:#x}+{n:#x} (op {i})"
                assert img.read(off, n) == want, f"read {off:#x}+{n:#x} (op {i})"
        whole = bytearray(len(model))
        img.readinto(0, memoryview(whole))
        assert whole == model
        assert verify(img) == []
    finally:
        img.close()
    assert check(str(tmp_path / "img.vimg")).corruptions == 0


def test_contiguous_whole_clusters_are_one_write_and_one_read(tmp_path):
    rec = Recorder()
    p = str(tmp_path / "a.vimg")
    img = Image.create(p, 64 * CS, cluster_size=CS, opener=rec.opener)
    data = os.urandom(8 * CS)
    before = len(rec.ops)
    img.write(4 * CS, data)
    writes = [op for op in rec.ops[before:] if op[0] == "w"]
    assert len(writes) == 1 and len(writes[0][2]) == 8 * CS
    hosts = [img.entry(4 + j)[4] for j in range(8)]
    assert hosts == [hosts[0] + j * CS for j in range(8)]
    assert img.read(4 * CS, 8 * CS) == data
    # a zero cluster in the middle becomes a ZERO entry and splits the run
    d2 = os.urandom(3 * CS) + bytes(CS) + os.urandom(4 * CS)
    img.write(20 * CS, d2)
    assert img.entry(23)[0] == L.ZERO
    assert img.read(20 * CS, 8 * CS) == d2
    img.close()
    with Image.open(p, readonly=True) as ro:
        assert ro.read(4 * CS, 8 * CS) == data
        assert ro.read(20 * CS, 8 * CS) == d2


def test_partial_rewrites_of_a_fresh_cluster_are_summed_at_commit(tmp_path):
    p = str(tmp_path / "a.vimg")
    img = Image.create(p, 16 * CS, cluster_size=CS)
    img.write(0, os.urandom(4 * CS))
    img.flush()
    img.write(CS + 100, b"a" * 50)  # copy-on-write: a fresh cluster, summed
    img.write(CS + 300, b"b" * 50)  # in place, verified first, now unsummed
    img.write(CS + 500, b"c" * 50)  # in place, no re-read
    assert set(img._core.unsummed) == {1}
    want = img.read(CS, CS)  # a read settles it
    assert not img._core.unsummed
    assert img.entry(1)[5] == xxhash.xxh3_64_intdigest(want)
    assert want[100:150] == b"a" * 50 and want[300:350] == b"b" * 50
    img.write(CS + 700, b"d" * 50)
    img.write(2 * CS + 1, b"e")
    img.write(2 * CS + 2, b"f")
    assert set(img._core.unsummed) == {1, 2}
    assert verify(img) == []  # settles an open writer's stale checksums first
    img.write(2 * CS + 3, b"g")
    img.close()  # the commit sums the rest
    assert check(p).corruptions == 0
    with Image.open(p, readonly=True) as ro:
        got = ro.read(CS, 2 * CS)
        assert got[700:750] == b"d" * 50 and got[CS + 1 : CS + 4] == b"efg"
        assert verify(ro) == []


def test_unsummed_cluster_survives_snapshot_resize_and_discard(tmp_path):
    p = str(tmp_path / "a.vimg")
    img = Image.create(p, 16 * CS, cluster_size=CS)
    img.write(0, os.urandom(CS))
    img.write(10, b"x")
    img.write(20, b"y")
    assert set(img._core.unsummed) == {0}
    img.snapshot_create("s")  # commits first
    assert not img._core.unsummed
    img.write(30, b"z")  # copy-on-write (shared with the snapshot)
    img.write(40, b"w")
    img.write(5 * CS, os.urandom(CS))
    img.write(5 * CS + 7, b"v")
    img.write(5 * CS + 9, b"u")
    assert set(img._core.unsummed) == {0, 5}
    img.discard(5 * CS, CS)
    assert set(img._core.unsummed) == {0}
    img.resize(8 * CS)
    assert not img._core.unsummed
    content = img.read(0, CS)
    img.close()
    assert check(p).corruptions == 0
    with Image.open(p, readonly=True) as ro:
        assert ro.read(0, CS) == content
        assert content[10:11] == b"x" and content[40:41] == b"w"
        assert verify(ro) == []


def test_damaged_fresh_cluster_is_caught_before_a_partial_rewrite(tmp_path):
    p = str(tmp_path / "a.vimg")
    img = Image.create(p, 16 * CS, cluster_size=CS)
    img.write(3 * CS, os.urandom(CS))
    host = img.entry(3)[4]
    fd = os.open(p, os.O_RDWR)
    try:
        os.pwrite(fd, bytes([os.pread(fd, 1, host + 9)[0] ^ 1]), host + 9)
    finally:
        os.close(fd)
    with pytest.raises(IntegrityError, match="guest offset 0x3000"):
        img.write(3 * CS + 100, b"x")
    img.close()


def test_preallocated_tail_is_given_back_at_close_and_harmless_after_a_crash(tmp_path):
    p = str(tmp_path / "a.vimg")
    img = Image.create(p, 256 * CS, cluster_size=CS)
    img.write(0, os.urandom(64 * CS))
    img.flush()
    end = len(img._core.alloc) * CS
    if not img._writer.grown_to:
        img.close()
        pytest.skip("fallocate not supported here")
    assert os.path.getsize(p) > end  # reserved ahead of the image end
    # a "crash": the process goes away without closing; the tail stays, the image is fine
    img._core.f.close()
    img._core.closed = True
    res = check(p)
    assert res.corruptions == 0 and res.leaks == 0
    with Image.open(p) as again:
        again.write(64 * CS, os.urandom(CS))  # appends into the old tail
    size = os.path.getsize(p)
    with Image.open(p, readonly=True) as ro:
        assert size == ro.header.host_clusters * CS
        assert verify(ro) == []
    assert check(p).corruptions == 0


def test_bench_loop_reads_and_writes_through_one_buffer(tmp_path):
    from vfs.image.bench import request_buffer, run_bench
    from vfs.image.fileio import RawFile

    buf = request_buffer(3 * CS, 0x5A)
    assert len(buf) == 3 * CS and bytes(buf) == b"\x5a" * (3 * CS)
    p = str(tmp_path / "a.vimg")
    with Image.create(p, 64 * CS, cluster_size=CS) as img:
        run_bench(img, count=40, size=2 * CS + 512, step=5 * CS + 512, write=True, pattern=0xA5)
        run_bench(img, count=40, size=2 * CS + 512, step=5 * CS + 512)
        data = img.read(0, 2 * CS + 512)
        assert data == b"\xa5" * (2 * CS + 512)
    raw = str(tmp_path / "a.raw")
    with RawFile(raw, create_size=10 * CS) as r:
        r.write(0, b"\x11" * CS)
        out = bytearray(b"\xff") * (3 * CS)
        assert r.readinto(9 * CS, out) == 3 * CS  # past the end: zeros
        assert out == bytes(3 * CS)
        r.readinto(0, out)
        assert out == b"\x11" * CS + bytes(2 * CS)
        run_bench(r, count=10, size=CS, step=3 * CS)


@pytest.mark.log_warnings
def test_damage_to_a_rewritten_fresh_cluster_is_still_detected(tmp_path):
    """The deferred checksum of a fresh cluster rewritten in part is computed from the file
    verified against the sums of the bytes the guest wrote, never blessing the file: a bit
    flipped in the file copy between the rewrite and the commit is an error at the next read
    (and logged), not blessed into the checksum."""
    path = str(tmp_path / "img.vimg")
    with Image.create(path, 16 * CS, cluster_size=CS) as img:
        img.write(0, b"a" * CS)  # fresh cluster
        img.write(100, b"b" * 10)  # partial rewrites: checksum now stale
        img.write(200, b"c" * 10)
        host = img._core.entry_raw(0)[4]
        with open(path, "r+b") as f:  # the disk (or a stray writer) damages the file copy
            f.seek(host + 3000)
            f.write(b"X")
        with pytest.raises(IntegrityError, match="guest offset 0x0"):
            img.read(0, CS)
        img.write(0, b"d" * CS)  # a whole-cluster write replaces it with good data
        img.flush()
        assert img.read(0, CS) == b"d" * CS


def test_many_stale_clusters_are_bounded_and_correct(tmp_path):
    path = str(tmp_path / "img.vimg")
    n = 64
    with Image.create(path, n * CS, cluster_size=CS) as img:
        img._core.unsummed_limit = 8
        for ci in range(n):
            img.write(ci * CS, bytes([ci]) * CS)
        for ci in range(n):
            img.write(ci * CS + 5, b"zz")
            assert len(img._core.unsummed) <= 8
        img.flush()
    with Image.open(path) as img:
        for ci in range(n):
            want = bytearray(bytes([ci]) * CS)
            want[5:7] = b"zz"
            assert img.read(ci * CS, CS) == want
    res = check(path)
    assert (res.corruptions, res.leaks) == (0, 0)


#: The clusters of the tests below: larger than a subcluster (4 KiB).
BIG = 64 * 1024


@pytest.mark.log_warnings
def test_damage_to_a_stale_cluster_survives_the_commit_as_a_checksum_error(tmp_path):
    """Damage to a stale cluster's file copy in a subcluster no later write touches: the commit
    still succeeds (everything else it commits is good), the damaged cluster's entry carries a
    checksum its bytes do not match, so reads and ``verify`` report it and nothing else."""
    path = str(tmp_path / "img.vimg")
    with Image.create(path, 16 * BIG, cluster_size=BIG) as img:
        img.write(0, os.urandom(4 * BIG))
        img.flush()
        img.write(BIG + 10, b"a" * 10)  # copy-on-write: stale from the start
        img.write(2 * BIG + 10, b"b" * 10)
        assert set(img._core.unsummed) == {1, 2}
        host = img._core.entry_raw(1)[4]
        with open(path, "r+b") as f:
            f.seek(host + BIG - 100)  # the last subcluster: never read back by a write
            f.write(b"X")
        img.flush()
        assert img.read(2 * BIG, 20)[10:] == b"b" * 10
        with pytest.raises(IntegrityError, match="guest offset 0x10000"):
            img.read(BIG, 20)
    assert check(path).corruptions == 0  # the tree is sound
    with Image.open(path, readonly=True) as ro:
        bad = verify(ro)
    assert len(bad) == 1 and "0x10000" in str(bad[0]), bad


def test_damage_in_a_subcluster_a_write_covers_in_part_fails_that_write(tmp_path):
    path = str(tmp_path / "img.vimg")
    with Image.create(path, 16 * BIG, cluster_size=BIG) as img:
        img.write(0, os.urandom(BIG))
        img.write(100, b"a")  # stale now
        host = img._core.entry_raw(0)[4]
        with open(path, "r+b") as f:
            f.seek(host + 5 * 4096 + 7)
            f.write(b"X")
        img.write(4 * 4096, os.urandom(4096))  # whole subcluster: reads nothing, fine
        with pytest.raises(IntegrityError, match="guest offset 0x0 .*damaged"):
            img.write(5 * 4096 + 100, b"b")
        img.write(0, os.urandom(BIG))  # replaced whole: good again
        img.flush()
    assert check(path).corruptions == 0


def test_partial_writes_read_back_only_the_subclusters_they_cover_in_part(tmp_path):
    """The hot path of 4 KiB guest writes: after the first partial write of a fresh cluster
    (which verifies it whole), an aligned 4 KiB write reads nothing back and an unaligned one
    reads only the two subclusters it covers in part; the result is right after a reopen."""
    p = str(tmp_path / "a.vimg")
    with Image.create(p, 16 * BIG, cluster_size=BIG) as img:
        model = bytearray(os.urandom(4 * BIG))
        img.write(0, model)
        img.flush()
        f = img._core.f
        preadv = f.preadv
        reads: list[int] = []

        def counting(buf, off):
            reads.append(len(buf))
            return preadv(buf, off)

        f.preadv = counting
        rng = random.Random(11)
        first = set()
        for _ in range(300):
            n = rng.choice([1, 512, 4096, 4096, 4097, 8192, 3 * 4096 + 5])
            off = rng.randrange(0, 4 * BIG - n)
            if rng.random() < 0.5:
                off -= off % 4096
            data = os.urandom(n)
            reads.clear()
            img.write(off, data)
            model[off : off + n] = data
            clusters = {off // BIG, (off + n - 1) // BIG}
            if clusters <= first:
                assert sum(reads) <= 2 * 4096 * len(clusters), (off, n, reads)
                if off % 4096 == 0 and n % 4096 == 0:
                    assert reads == [], (off, n)
            first |= clusters
        assert set(img._core.unsummed) == {0, 1, 2, 3}
        f.preadv = preadv
        assert img.read(0, 4 * BIG) == model
        img.write(BIG + 1, b"z")
        model[BIG + 1] = ord("z")
    with Image.open(p, readonly=True) as ro:
        assert ro.read(0, 4 * BIG) == model
        assert verify(ro) == []
    assert check(p).corruptions == 0
