"""Persistent dirty bitmaps (spec section 7): every write path marks them, they survive
close/reopen, and a bitmap that may be stale after a crash, an old writer or a repair is
detectably so and reads as all dirty."""

from __future__ import annotations

import os
import random
import subprocess
import sys
from pathlib import Path

import pytest

from vfs.errors import AlreadyExists, NotFound, UsageError
from vfs.image import layout as L
from vfs.image.check import check
from vfs.image.image import Image

from .helpers import current_header, write_header

CS = 4096
SIZE = 1 << 20
VIMG = str(Path(sys.executable).parent / "vimg")


def _granules(ranges, g):
    out = set()
    for o, n in ranges:
        out.update(range(o // g, -(-(o + n) // g)))
    return out


@pytest.fixture
def img(tmp_path):
    with Image.create(str(tmp_path / "a.vimg"), SIZE, cluster_size=CS) as i:
        yield i


def test_every_write_path_marks(img, tmp_path):
    img.bitmap_add("g512", granularity=512)
    img.bitmap_add("g4k")
    img.bitmap_add("g64k", granularity=65536)
    img.write(100, b"x" * 10)  # partial, inside one granule
    img.write(8 * CS, b"y" * (3 * CS))  # whole clusters
    img.write(20 * CS - 5, b"z" * 10)  # across a cluster boundary
    img.write_zeroes(40 * CS, 2 * CS)
    img.write_zeroes(50 * CS + 512, 512, unmap=False)
    img.discard(60 * CS, CS)
    want = [(100, 10), (8 * CS, 3 * CS), (20 * CS - 5, 10), (40 * CS, 2 * CS)]
    want += [(50 * CS + 512, 512), (60 * CS, CS)]
    for name, g in (("g512", 512), ("g4k", CS), ("g64k", 65536)):
        assert _granules(img.bitmap_dirty(name), g) == _granules(want, g), name
    img.resize(SIZE + 3 * CS)  # growing: the new range changed
    assert _granules(img.bitmap_dirty("g4k"), CS) == _granules(want + [(SIZE, 3 * CS)], CS)
    img.resize(SIZE // 2)  # shrinking: bits past the end are gone
    assert all(o + n <= SIZE // 2 for o, n in img.bitmap_dirty("g4k"))
    assert img.bitmap_dirty("g4k", 8 * CS, CS) == [(8 * CS, CS)]  # a window


def test_snapshot_apply_marks_the_disk(img):
    img.write(0, b"a" * CS)
    img.snapshot_create("s")
    img.bitmap_add("b")
    img.snapshot_apply("s")
    assert img.bitmap_dirty("b") == [(0, SIZE)]


def test_bitmaps_survive_close_and_reopen(tmp_path):
    p = str(tmp_path / "a.vimg")
    with Image.create(p, SIZE, cluster_size=CS) as img:
        img.bitmap_add("b")
        img.bitmap_add("off", enabled=False)
        img.write(5 * CS, b"q" * CS)
    with Image.open(p, readonly=True) as img:
        infos = {b.name: b for b in img.bitmap_list()}
        assert not infos["b"].stale and infos["b"].enabled and not infos["off"].enabled
        assert img.bitmap_dirty("b") == [(5 * CS, CS)] and img.bitmap_dirty("off") == []
    with Image.open(p) as img:
        img.write(9 * CS, b"r")
        img.bitmap_enable("off")
        img.write(11 * CS, b"s")
    with Image.open(p, readonly=True) as img:
        assert img.bitmap_dirty("b") == [(5 * CS, CS), (9 * CS, CS), (11 * CS, CS)]
        assert img.bitmap_dirty("off") == [(11 * CS, CS)]
    assert check(p).exit_code == 0


def test_take_is_dirty_then_clear(img):
    img.bitmap_add("m")
    img.write(3 * CS, b"x")
    assert img.bitmap_take("m") == [(3 * CS, CS)]
    assert img.bitmap_dirty("m") == []
    img.write(4 * CS, b"y")
    assert img.bitmap_take("m") == [(4 * CS, CS)]


def test_names_and_granularity_are_checked(img):
    img.bitmap_add("a")
    with pytest.raises(AlreadyExists):
        img.bitmap_add("a")
    for g in (256, 3000, 1 << 32):
        with pytest.raises(UsageError, match="granularity"):
            img.bitmap_add(f"g{g}", granularity=g)
    with pytest.raises(UsageError):
        img.bitmap_add("")
    with pytest.raises(NotFound):
        img.bitmap_dirty("nope")
    img.bitmap_remove("a")
    assert img.bitmap_list() == []


CHILD = r"""
import sys
from vfs.image.image import Image
img = Image.open(sys.argv[1])
g = 0
while True:
    g += 1
    img.write((g % 200) * 4096, bytes([g % 250 + 1]) * 4096)
    if g % 10 == 0:
        img.flush()
        print(g, flush=True)
"""


def test_a_crash_leaves_enabled_bitmaps_stale(tmp_path):
    """kill -9 of a writer: the bitmap may miss writes a reader of the export copied, so it
    must read as stale (all dirty) until cleared; the data is the last flush, check clean."""
    p = str(tmp_path / "k.vimg")
    with Image.create(p, SIZE, cluster_size=CS) as img:
        img.bitmap_add("mig")
        img.bitmap_add("frozen", enabled=False)
    child = subprocess.Popen([sys.executable, "-c", CHILD, p], stdout=subprocess.PIPE, text=True)
    try:
        acked = 0
        while acked < 30:
            line = child.stdout.readline()
            assert line, "child died"
            acked = int(line)
    finally:
        child.kill()
        child.wait()
    with Image.open(p, readonly=True) as img:
        info = {b.name: b for b in img.bitmap_list()}
        assert info["mig"].stale and info["mig"].dirty_bytes == SIZE
        assert img.bitmap_dirty("mig") == [(0, SIZE)]
        assert not info["frozen"].stale  # not tracking: nothing it could have missed
    r = subprocess.run([VIMG, "bitmap", "--list", p], capture_output=True, text=True)
    assert "in-use" in r.stdout
    assert check(p).exit_code == 0
    with Image.open(p) as img:
        img.bitmap_clear("mig")  # a new point in time: usable again
        img.write(0, b"n")
    with Image.open(p, readonly=True) as img:
        assert img.bitmap_dirty("mig") == [(0, CS)]


def test_a_writer_that_did_not_know_bitmaps_makes_them_stale(tmp_path):
    p = str(tmp_path / "a.vimg")
    with Image.create(p, SIZE, cluster_size=CS) as img:
        img.bitmap_add("b")
    h = current_header(p)
    h.autoclear &= ~L.AUTOCLEAR_BITMAPS  # what such a writer's first commit does
    h.sequence += 1
    write_header(p, h)
    with Image.open(p, readonly=True) as img:
        assert img.bitmap_list()[0].stale
        assert img.bitmap_dirty("b") == [(0, SIZE)]


def test_a_repair_that_changed_data_makes_bitmaps_stale(tmp_path):
    p = str(tmp_path / "a.vimg")
    with Image.create(p, SIZE, cluster_size=CS) as img:
        img.bitmap_add("b")
        for ci in range(0, 100, 7):
            img.write(ci * CS, os.urandom(CS))
    with Image.open(p, readonly=True) as img:
        l2 = next(img.roots())[2][0][0]
    assert check(p, "leaks").exit_code == 0
    with Image.open(p, readonly=True) as img:
        assert not img.bitmap_list()[0].stale  # nothing was repaired
    with open(p, "r+b") as f:  # the checksum of cluster 0's entry (flipped: writing 0xff
        f.seek(l2 + 16)  # left it as it was when the random data's checksum had 0xff there)
        old = f.read(1)[0]
        f.seek(l2 + 16)
        f.write(bytes([old ^ 0xFF]))
    res = check(p, "all")
    assert res.exit_code == 0 and res.lost_clusters
    with Image.open(p, readonly=True) as img:
        assert img.bitmap_list()[0].stale


@pytest.mark.log_warnings
def test_a_damaged_bitmap_directory(tmp_path):
    p = str(tmp_path / "a.vimg")
    with Image.create(p, SIZE, cluster_size=CS) as img:
        img.bitmap_add("b")
        img.write(0, b"d" * CS)
    d = current_header(p).bitmaps.directory_offset
    with open(p, "r+b") as f:
        f.seek(d + 3)
        f.write(b"\x7f")
    with Image.open(p, readonly=True) as img:
        assert img.read(0, CS) == b"d" * CS  # the disk does not need the bitmaps
    with Image.open(p) as img:  # a writer: bitmaps no longer kept up to date
        img.write(CS, b"e" * CS)
    assert not current_header(p).autoclear & L.AUTOCLEAR_BITMAPS
    res = check(p)
    assert res.exit_code == 2 and any("bitmap directory" in m for m in res.messages)
    res = check(p, "all")
    assert res.exit_code == 0 and any("dropped the dirty bitmaps" in m for m in res.messages)
    with Image.open(p, readonly=True) as img:
        assert img.bitmap_list() == [] and img.read(0, 2 * CS) == b"d" * CS + b"e" * CS
    assert check(p).exit_code == 0


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_bitmap_against_a_model(tmp_path, seed):
    """Random writes, zeroes, discards, takes, flushes and reopens: the bitmap says exactly
    which granules changed since its last clear (our marking is exact), and check stays
    clean (its clusters are counted)."""
    r = random.Random(seed)
    p = str(tmp_path / "m.vimg")
    g = r.choice([512, CS, 16384])
    img = Image.create(p, SIZE, cluster_size=CS)
    img.bitmap_add("m", granularity=g)
    model: set[int] = set()
    for _ in range(150):
        op = r.choices(
            ["write", "zero", "discard", "take", "flush", "reopen"], [50, 8, 8, 5, 8, 4]
        )[0]
        off = r.randrange(0, SIZE - 1)
        n = min(r.choice([1, 511, 4096, 9000, 70000]), SIZE - off)
        if op == "write":
            img.write(off, os.urandom(n))
        elif op == "zero":
            img.write_zeroes(off, n, unmap=r.random() < 0.5)
        elif op == "discard":
            img.discard(off, n)
        elif op == "take":
            assert _granules(img.bitmap_take("m"), g) == model
            model = set()
            continue
        elif op == "flush":
            img.flush()
            continue
        else:
            img.close()
            img = Image.open(p)
            continue
        model.update(range(off // g, -(-(off + n) // g)))
        assert _granules(img.bitmap_dirty("m"), g) == model
    img.close()
    with Image.open(p, readonly=True) as ro:
        assert _granules(ro.bitmap_dirty("m"), g) == model
    res = check(p)
    assert (res.corruptions, res.leaks) == (0, 0), res.messages[:3]


def test_bitmap_cli(tmp_path):
    p = str(tmp_path / "a.vimg")
    run = lambda *a: subprocess.run([VIMG, *a], capture_output=True, text=True)  # noqa: E731
    assert run("create", p, "1M").returncode == 0
    assert run("bitmap", "--add", "-g", "512", p, "b0").returncode == 0
    assert run("io", p, "-c", "write 1024 512").returncode == 0
    r = run("bitmap", "--dirty", "--json", p, "b0")
    assert r.returncode == 0 and '"start": 1024' in r.stdout
    assert run("bitmap", "--clear", p, "b0").returncode == 0
    assert run("bitmap", "--dirty", p, "b0").stdout == ""
    r = run("bitmap", "--add", p, "b0")
    assert r.returncode == 4 and "already exists" in r.stderr
    assert run("bitmap", p).returncode == 2
    assert run("bitmap", "--remove", p, "b0").returncode == 0
    assert run("bitmap", "--list", p).stdout == ""
