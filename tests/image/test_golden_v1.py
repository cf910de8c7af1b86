"""The golden vimg v1 images (tests/image/golden/, made by tools/make_golden_images.py): every
later version of vfs must read them as this test says, byte for byte.

The expected contents are written out here independently of the tool. The files themselves
are pinned by their SHA-256: regenerating them is a deliberate act (version 1 was wrong), not
a side effect of a writer change.
"""

from __future__ import annotations

import hashlib
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import xxhash

from vfs.image import layout as L
from vfs.image.check import check, verify
from vfs.image.fileio import ImageFile
from vfs.image.header import choose_header
from vfs.image.image import Image

GOLDEN = Path(__file__).parent / "golden"
TOOL = Path(__file__).parents[2] / "tools" / "make_golden_images.py"
CS = 4096
SIZE = 256 << 10

PINNED = {
    "base.vimg": "85164ed43fad2c5571abf90f93fe7011a44779785fd81a917796a2bc879b8bca",
    "bitmaps.vimg": "63168db5c45ba3447a24f42634797dfa06bbf8973c4d0eb75fcf3ba46476ece0",
    "compressed.vimg": "e1bf1b5296aa6f9d02493faab55f2cbc78431b09deb0599132b9823aba18ba0f",
    "grown-header.vimg": "42fd8360ca243e616bcfc90ecfec86c44d67816a222657d7a947cdffe7df2c92",
    "overlay.vimg": "7949c227fa8f2cb90ec26e955e10606596ac2eede788338d10dbb3531426bb68",
    "plain.vimg": "5a18791d49180de083a1d07286be2807724741ffe60a665af3048745ddd023a6",
    "remote.vimg": "359eedf741300fdf49dab6da50ecacefa6f2e32fd487738d5c1d95aec238d921",
    "snapshots.vimg": "e2bffa478d9c5f693aa1e8be8b7c4483e858acd4408f81c8da51d2957b3809bd",
    "stale-bitmap.vimg": "2125b7fd83022050b60ed1b441a9d3b2c031ad1ab784845e110185479559593c",
    "torn.vimg": "007c2f90a7bfc175a3d11115435972bb7bb465ce475e4efc10b7f23e86665030",
}


def fill(b: int) -> bytes:
    return bytes([b]) * CS


class Objects:
    """A resolver holding the remote clusters of remote.vimg."""

    def __init__(self) -> None:
        self.objects = {
            hashlib.sha256(fill(0x40 + ci)).hexdigest(): fill(0x40 + ci) for ci in range(4)
        }

    def get(self, oid: str, *, expected_size: int | None = None) -> bytes:
        return self.objects[oid]


def _expect_plain(img: Image) -> None:
    for ci in range(SIZE // CS):
        want = fill(0x10 + ci) if ci in (0, 1, 2, 5, 9, 63) else bytes(CS)
        if ci == 10:
            want = bytes(50) + b"\xab" * 100 + bytes(CS - 150)
        assert img.read(ci * CS, CS) == want, ci
    kinds = {ci: e.kind for ci, e in img.iter_entries()}
    assert kinds == {0: 2, 1: 2, 2: 2, 5: 2, 7: 1, 9: 2, 10: 2, 63: 2}


def _expect_compressed(img: Image) -> None:
    import random

    for ci in range(8):
        assert img.read(ci * CS, CS) == (b"golden-%d " % ci * CS)[:CS]
        assert img.entry(ci).kind == L.COMPRESSED
    assert img.read(8 * CS, CS) == random.Random(8).randbytes(CS)
    assert img.entry(8).kind == L.LOCAL
    assert img.header.incompatible == L.INCOMPAT_COMPRESSED


def _expect_remote(img: Image) -> None:
    for ci in range(4):
        e = img.entry(ci)
        assert e.kind == L.REMOTE and e.oid == hashlib.sha256(fill(0x40 + ci)).digest()
        assert e.checksum == xxhash.xxh3_64_intdigest(fill(0x40 + ci))
        assert img.read(ci * CS, CS) == fill(0x40 + ci)
    assert img.read(4 * CS, CS) == fill(0x55)
    assert img.header.incompatible == L.INCOMPAT_REMOTE


def _vm_state() -> bytes:
    import random

    return random.Random(7).randbytes(CS) + bytes(CS) + (b"vmstate!" * CS)[: CS + 123]


def _expect_snapshots(img: Image) -> None:
    active = [fill(0x71), fill(0x72), fill(0x81), fill(0x64)]
    assert [img.read(ci * CS, CS) for ci in range(4)] == active
    one, two = img.snapshots
    assert (one.id, one.name, one.date_sec, one.vm_state_size) == ("1", "one", 1704067200, 0)
    assert (two.id, two.name, two.date_sec, two.vm_clock_nsec) == (
        "2",
        "two",
        1704067201,
        7 * 10**9,
    )
    assert b"".join(img.load_vmstate("two")) == _vm_state()
    assert two.vm_state_size == len(_vm_state()) == 12411
    snap_one = dict(img.iter_entries("one"))
    assert sorted(snap_one) == [0, 1, 2, 3]
    assert [img.cluster_data(ci, snap_one[ci]) for ci in range(4)] == [
        fill(0x61 + ci) for ci in range(4)
    ]
    snap_two = dict(img.iter_entries("two"))
    assert [img.cluster_data(ci, snap_two[ci]) for ci in range(4)] == [
        fill(0x71),
        fill(0x72),
        fill(0x63),
        fill(0x64),
    ]


def _expect_bitmaps(img: Image) -> None:
    infos = {b.name: b for b in img.bitmap_list()}
    assert set(infos) == {"inc", "full"}
    assert (infos["inc"].granularity, infos["inc"].enabled, infos["inc"].stale) == (
        512,
        True,
        False,
    )
    assert (infos["full"].granularity, infos["full"].enabled, infos["full"].stale) == (
        65536,
        False,
        False,
    )
    assert img.bitmap_dirty("inc") == [(2560, 1536), (40960, 4096)]
    assert img.bitmap_dirty("full") == [(0, 65536)]
    assert img.read(3000, 1000) == b"\x01" * 1000 and img.read(40960, CS) == fill(0x02)
    assert img.header.autoclear & L.AUTOCLEAR_BITMAPS


def _expect_stale_bitmap(img: Image) -> None:
    (b,) = img.bitmap_list()
    assert (b.name, b.stale, b.enabled) == ("b", True, True)
    assert img.bitmap_dirty("b") == [(0, SIZE)]
    assert img.read(0, CS) == fill(0x03) and img.read(3 * CS, CS) == fill(0x04)


def _expect_overlay(img: Image) -> None:
    assert img.backing_name == "base.vimg" and img.backing_format == "vimg"
    want = [b"b" * CS, fill(0x6F), bytes(CS), bytes(CS)] + [b"b" * CS] * 4 + [bytes(CS)] * 56
    assert [img.read(ci * CS, CS) for ci in range(SIZE // CS)] == want
    kinds = {ci: e.kind for ci, e in img.iter_entries()}
    assert kinds == {1: L.LOCAL, 2: L.ZERO, 3: L.ZERO}


def _expect_grown_header(img: Image) -> None:
    h = img.header
    assert h.unknown_fields == bytes(range(1, 9))
    assert h.unknown_extensions == [(b"ZZZZ", b"future")]
    assert h.compatible == 1 << 5 and h.autoclear == 1 << 7
    assert h.feature_names == {
        (L.FEATURE_COMPAT, 5): "future compat",
        (L.FEATURE_AUTOCLEAR, 7): "future autoclear",
    }
    assert img.read(0, CS) == fill(0x99)


def _expect_torn(img: Image) -> None:
    assert img.sequence == 2 and img.read(0, CS) == fill(0x32)
    assert img.header_choice.fallback is None
    assert any("torn header write" in n for n in img.header_choice.notes)


EXPECT = {
    "plain.vimg": (_expect_plain, 1),
    "compressed.vimg": (_expect_compressed, 1),
    "remote.vimg": (_expect_remote, 1),
    "snapshots.vimg": (_expect_snapshots, 5),
    "bitmaps.vimg": (_expect_bitmaps, 1),
    "stale-bitmap.vimg": (_expect_stale_bitmap, 3),
    "overlay.vimg": (_expect_overlay, 1),
    "grown-header.vimg": (_expect_grown_header, 1),
    "torn.vimg": (_expect_torn, 2),
}


def _check_dir(d: Path) -> None:
    for name, (expect, seq) in EXPECT.items():
        with Image.open(str(d / name), readonly=True, resolver=Objects()) as img:
            assert img.sequence == seq, name
            assert img.size == SIZE and img.cluster_size == CS
            expect(img)
            assert verify(img) == [], name
        res = check(str(d / name))
        assert (res.corruptions, res.leaks) == (0, 0), (name, res.messages)


def test_the_checked_in_images_are_the_pinned_ones():
    names = sorted(p.name for p in GOLDEN.glob("*.vimg"))
    assert names == sorted(PINNED)
    for name, digest in PINNED.items():
        assert hashlib.sha256((GOLDEN / name).read_bytes()).hexdigest() == digest, name


def test_the_golden_images_read_as_written():
    _check_dir(GOLDEN)


def test_every_header_copy_is_parsed_the_same_way():
    for name in EXPECT:
        f = ImageFile(str(GOLDEN / name), writable=False)
        try:
            choice = choose_header(f)
        finally:
            f.close()
        assert choice.fallback is None and not choice.damaged, name
        assert L.pack_header(choice.header) == choice.bytes, name  # parse/pack round trip


def test_writers_keep_what_they_do_not_know(tmp_path):
    """A writer of this version on the grown header: unknown fields, extensions, compatible
    bits and feature names are kept; the unknown autoclear bit is cleared (spec 3.5, 10)."""
    p = tmp_path / "g.vimg"
    shutil.copy(GOLDEN / "grown-header.vimg", p)
    with Image.open(str(p)) as img:
        img.write(CS, fill(0x11))
    with Image.open(str(p), readonly=True) as img:
        h = img.header
        assert h.unknown_fields == bytes(range(1, 9))
        assert h.unknown_extensions == [(b"ZZZZ", b"future")]
        assert h.compatible == 1 << 5 and h.autoclear == 0
        assert h.feature_names[(L.FEATURE_COMPAT, 5)] == "future compat"
        assert img.read(0, 2 * CS) == fill(0x99) + fill(0x11)


def test_the_tool_still_makes_images_that_read_as_written(tmp_path):
    out = tmp_path / "golden"
    subprocess.run([sys.executable, str(TOOL), "--out", str(out)], check=True, capture_output=True)
    _check_dir(out)


@pytest.mark.parametrize("name", sorted(EXPECT))
def test_the_cli_reads_them(name, tmp_path):
    vimg = str(Path(sys.executable).parent / "vimg")
    shutil.copy(GOLDEN / name, tmp_path / name)
    if name == "overlay.vimg":
        shutil.copy(GOLDEN / "base.vimg", tmp_path / "base.vimg")
    r = subprocess.run([vimg, "info", "--json", str(tmp_path / name)], capture_output=True)
    assert r.returncode == 0, r.stderr
    r = subprocess.run([vimg, "check", str(tmp_path / name)], capture_output=True)
    assert r.returncode == 0, r.stdout
