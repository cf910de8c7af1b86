"""Break images on purpose (flip bytes in data and metadata) and check what is detected,
what reads refuse, and what ``check -r all`` recovers."""

from __future__ import annotations

import os
import random
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import xxhash

from vfs.errors import CorruptionError, FormatError, IntegrityError, UnsupportedFeature
from vfs.image import layout as L
from vfs.image.check import check, verify
from vfs.image.image import Image

from .helpers import current_header, write_header

CS = 4096
SIZE = 1 << 20
NCL = 40  # clusters written


def flip(path, offset: int, mask: int = 0x01) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        b = f.read(1)
        f.seek(offset)
        f.write(bytes([b[0] ^ mask]))


@pytest.fixture
def image(tmp_path):
    """An image with NCL clusters of distinct random data, spread over two L2 tables."""
    path = str(tmp_path / "img.vimg")
    r = random.Random(5)
    content = {}
    with Image.create(path, SIZE, cluster_size=CS) as img:
        for k in range(NCL):
            ci = k * 5  # 64 entries per L2 at 4 KiB: clusters 0..195 span 4 tables
            data = r.randbytes(CS)
            img.write(ci * CS, data)
            content[ci] = data
    return path, content


def test_flipped_data_byte_is_an_error_naming_the_guest_offset(image):
    path, content = image
    with Image.open(path, readonly=True) as img:
        victim = 15
        host = img.entry(victim)[4]
    flip(path, host + 100)
    with Image.open(path, readonly=True) as img:
        with pytest.raises(IntegrityError, match=f"guest offset {victim * CS:#x}"):
            img.read(victim * CS + 4000, 10)  # even a read that misses the flipped byte
        # everything else still reads
        for ci, data in content.items():
            if ci != victim:
                assert img.read(ci * CS, CS) == data
        bad = verify(img)
    assert [b["offset"] for b in bad] == [victim * CS]
    assert check(path).corruptions == 0  # metadata is fine: data damage is verify's to find


def test_flipped_l2_byte_detected_and_salvaged(image):
    path, content = image
    with Image.open(path, readonly=True) as img:
        l2_off = next(img.roots())[2][0][0]
    # Damage the checksum field of entry 5 (guest cluster 5) in the first L2 table.
    flip(path, l2_off + 5 * L.L2_ENTRY_SIZE + 16)
    with Image.open(path, readonly=True) as img:
        with pytest.raises(CorruptionError, match="L2 table"):
            img.read(0, CS)
        assert img.read(100 * CS, CS) == content[100]  # other tables unaffected
        assert verify(img)
    res = check(path)
    assert res.corruptions > 0 and res.exit_code == 2
    fixed = check(path, "all")
    assert fixed.corruptions_fixed == fixed.corruptions
    assert fixed.lost_clusters == [5 * CS]
    assert check(path).exit_code == 0
    with Image.open(path, readonly=True) as img:
        for ci, data in content.items():
            assert img.read(ci * CS, CS) == (bytes(CS) if ci == 5 else data)
        assert verify(img) == []


def test_flipped_refcount_block(image):
    path, content = image
    with Image.open(path) as img:
        block = img._core.rct[0][0]
    flip(path, block + 2 * 3)  # refcount of host cluster 3
    with Image.open(path, readonly=True) as img:  # readers do not need refcounts
        assert img.read(0, CS) == content[0]
    with pytest.raises(CorruptionError, match="refcount block"):
        Image.open(path)  # a writer does, and refuses doubtful ones
    assert check(path).exit_code == 2
    assert check(path, "leaks").exit_code == 2  # -r leaks does not touch corruption
    check(path, "all")
    assert check(path).exit_code == 0
    with Image.open(path) as img:
        img.write(0, b"x" * CS)
        assert all(img.read(ci * CS, CS) == d for ci, d in content.items() if ci)


def test_flipped_l1_salvage_keeps_verified_tables(image):
    path, content = image
    with Image.open(path, readonly=True) as img:
        l1 = img.header.l1_offset
    flip(path, l1 + 16 + 2)  # L1 entry 1: offset of the second L2 table
    with pytest.raises(CorruptionError, match="L1"):
        Image.open(path, readonly=True)
    assert check(path).exit_code == 2
    res = check(path, "all")
    assert res.lost_clusters == [64 * CS]
    assert check(path).exit_code == 0
    with Image.open(path, readonly=True) as img:
        for ci, data in content.items():
            want = bytes(CS) if 64 <= ci < 128 else data
            assert img.read(ci * CS, CS) == want


def test_leak_is_reported_and_repaired(image):
    path, content = image
    with Image.open(path) as img:
        img._core.alloc.incref(img.entry(0)[4] // CS)  # a refcount too high: a leak
        img._core.alloc.alloc()  # and a cluster nobody references
    res = check(path)
    assert (res.corruptions, res.leaks, res.exit_code) == (0, 2, 3)
    fixed = check(path, "leaks")
    assert fixed.leaks_fixed == 2
    assert check(path).exit_code == 0
    with Image.open(path, readonly=True) as img:
        assert all(img.read(ci * CS, CS) == d for ci, d in content.items())


def _rewrite_header(path, **changes) -> None:
    h = current_header(path)
    for k, v in changes.items():
        setattr(h, k, v)
    write_header(path, h)


def test_unknown_incompatible_feature_is_refused(image):
    path, _ = image
    _rewrite_header(path, incompatible=1 << 40)
    with pytest.raises(UnsupportedFeature, match="incompatible feature bit.* 40 unknown"):
        Image.open(path, readonly=True)


def test_unknown_compatible_and_autoclear_bits(image):
    path, content = image
    _rewrite_header(path, compatible=1 << 7, autoclear=1 << 3)
    with Image.open(path) as img:
        assert img.read(0, CS) == content[0]
        img.write(CS, b"y" * 10)
    with Image.open(path, readonly=True) as img:
        assert img.header.compatible == 1 << 7  # preserved
        assert img.header.autoclear == 0  # cleared by a writer that does not know it


def test_every_header_copy_damaged(image):
    path, _ = image
    for o in L.HEADER_COPY_OFFSETS:
        flip(path, o + 60)
    with pytest.raises(FormatError, match="no valid vimg header"):
        Image.open(path, readonly=True)


def test_truncated_file(image):
    path, _ = image
    size = os.path.getsize(path)
    os.truncate(path, size // 2)
    with pytest.raises((IntegrityError, FormatError)), Image.open(path, readonly=True) as img:
        img.read(0, SIZE)
    res = check(path)
    assert res.exit_code == 2


def test_header_checksum_is_xxh3_of_the_header():
    h = L.Header(
        virtual_size=SIZE,
        cluster_bits=12,
        l1_offset=16384,
        l1_entries=4,
        refcount_table_offset=20480,
        refcount_table_entries=1,
        host_clusters=6,
    )
    raw = L.pack_header(h)
    (s,) = struct.unpack_from("<Q", raw, len(raw) - 8)
    assert s == xxhash.xxh3_64_intdigest(raw[:-8])
    assert L.unpack_header(raw) == h


def test_damaged_snapshot_is_dropped_by_repair(image):
    path, content = image
    with Image.open(path) as img:
        img.snapshot_create("old")
        img.write(0, b"n" * CS)  # the active root now has its own copy of L2 table 0
        img.flush()
        snap_l1 = [r for r in img.roots() if r[0] == "old"][0][2]
        assert snap_l1[0][0] != next(img.roots())[2][0][0]
        snap_l2 = snap_l1[0][0]
    flip(path, snap_l2 + 7 * L.L2_ENTRY_SIZE + 20)
    with Image.open(path, readonly=True) as img:
        assert [b["root"] for b in verify(img)] == ["old"]
        assert img.read(0, CS) == b"n" * CS
    assert check(path).exit_code == 2
    res = check(path, "all")
    assert "dropped damaged snapshot(s): 'old'" in res.messages
    assert check(path).exit_code == 0
    with Image.open(path, readonly=True) as img:
        assert img.snapshots == []
        assert img.read(0, CS) == b"n" * CS
        assert all(img.read(ci * CS, CS) == d for ci, d in content.items() if ci)


def test_flipped_refcount_table(image):
    path, content = image
    with Image.open(path, readonly=True) as img:
        table = img.header.refcount_table_offset
    flip(path, table + 3)
    with Image.open(path, readonly=True) as img:
        assert img.read(0, CS) == content[0]
    assert check(path).exit_code == 2
    check(path, "all")
    assert check(path).exit_code == 0
    with Image.open(path) as img:  # writable again, and allocation is sane
        img.write(250 * CS, b"w" * CS)
        assert all(img.read(ci * CS, CS) == d for ci, d in content.items())
    assert check(path).exit_code == 0


@pytest.fixture
def overlay(tmp_path):
    """A backing file full of 'B' and an overlay whose own data ('O' clusters) spans two L2
    tables (64 entries each at 4 KiB clusters)."""
    base = str(tmp_path / "base.vimg")
    with Image.create(base, SIZE, cluster_size=CS) as b:
        b.write(0, b"B" * SIZE)
    top = str(tmp_path / "top.vimg")
    written = [3, 10, 70, 71, 100]
    with Image.create(top, SIZE, cluster_size=CS, backing="base.vimg") as t:
        for ci in written:
            t.write(ci * CS, b"O" * CS)
    return top, written


def _l1(path):
    with Image.open(path, readonly=True, with_backing=False) as img:
        return img.header.l1_offset, list(next(img.roots())[2])


def _assert_no_backing_bytes_where_data_was(path, written, lost_tables):
    with Image.open(path, readonly=True) as img:
        for ci in range(SIZE // CS):
            got = img.read(ci * CS, CS)
            if ci // 64 in lost_tables:
                assert got == bytes(CS), f"cluster {ci} reads {got[:1]!r}, not zeros"
            elif ci in written:
                assert got == b"O" * CS
            else:
                assert got == b"B" * CS


def test_repair_of_a_zeroed_l2_table_reads_zeros_not_the_backing_file(overlay):
    top, written = overlay
    _, l1 = _l1(top)
    with open(top, "r+b") as f:  # the overlay's first L2 table is wiped
        f.seek(l1[0][0])
        f.write(bytes(CS))
    assert check(top).exit_code == 2
    res = check(top, "all")
    assert res.exit_code == 0
    assert {3 * CS, 10 * CS} <= set(res.lost_clusters)
    assert check(top).exit_code == 0
    _assert_no_backing_bytes_where_data_was(top, written, lost_tables={0})


def test_repair_of_a_zeroed_l1_entry_reads_zeros_not_the_backing_file(overlay, tmp_path):
    top, written = overlay
    l1_off, l1 = _l1(top)
    with open(top, "r+b") as f:  # L1 entry 1 (guest clusters 64..127) zeroed
        f.seek(l1_off + 16)
        f.write(bytes(16))
    r = subprocess.run(
        [str(Path(sys.executable).parent / "vimg"), "check", "-r", "all", top],
        capture_output=True,
        text=True,
    )
    assert r.returncode == 0, r.stdout + r.stderr
    assert "0 damaged range(s)" not in r.stdout and "now read as zeros" in r.stdout
    assert check(top).exit_code == 0
    # The stored refcounts count an L2 table nothing references now: a table is missing, and
    # a damaged L1 cannot say which (0, 0) entry was it, so every one of them reads as zeros.
    _assert_no_backing_bytes_where_data_was(top, written, lost_tables={1, 2, 3})


def test_repair_keeps_holes_when_the_refcounts_prove_nothing_is_missing(overlay):
    """A damaged L1 whose (0, 0) entries are really unallocated (every stored refcount is
    accounted for): they keep reading the backing file."""
    top, written = overlay
    l1_off, _ = _l1(top)
    with open(top, "r+b") as f:  # damage an unused L1 entry's checksum field: no L2 is lost
        f.seek(l1_off + 16 * 3 + 8)
        f.write(b"\x01")
    res = check(top, "all")
    assert res.exit_code == 0 and res.lost_clusters == []
    _assert_no_backing_bytes_where_data_was(top, written, lost_tables=set())
