"""Hypothesis fuzzing of the vimg parsers: hostile bytes give FormatError-family errors only
(never struct.error, IndexError, MemoryError, a hang or a huge allocation).

Checksums would stop almost every random mutation at the door, so the interesting tests
*re-seal* mutated structures (recompute their checksums up to the header) before opening them:
that exercises the validation behind the checksums, which is what a malicious file attacks.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import tracemalloc

import pytest
import xxhash
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vfs.errors import FormatError, VfsError
from vfs.image import directories as D
from vfs.image import layout as L
from vfs.image.check import check, verify
from vfs.image.header import read_current_header
from vfs.image.image import Image

from .helpers import reseal, write_header

FUZZ = settings(
    max_examples=int(os.environ.get("VIMG_FUZZ_EXAMPLES", "150")),
    deadline=2000,
    suppress_health_check=[HealthCheck.too_slow],
    derandomize="VIMG_FUZZ_EXAMPLES" not in os.environ,
)

_base_dir = tempfile.mkdtemp(prefix="vimg-fuzz-")
BASE = os.path.join(_base_dir, "base.vimg")


def _make_base() -> None:
    if os.path.exists(BASE):
        return
    with Image.create(BASE, 1 << 20, cluster_size=4096) as img:
        for i in range(12):
            img.write(i * 37 * 1024, bytes([i + 1]) * 5000)
        img.snapshot_create("snap")
        img.write(0, b"z" * 4096)


def _exercise(path: str) -> None:
    """Everything a user can do to a file: open, read all, verify, check — with bounded memory
    (the image is 1 MiB; a parser trusting a hostile size would allocate far more)."""
    tracemalloc.start()
    try:
        _exercise_inner(path)
        _cur, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 32 << 20, f"peak allocation {peak} bytes"


def _exercise_inner(path: str) -> None:
    try:
        with Image.open(path, readonly=True) as img:
            img.read(0, img.size) if img.size <= 1 << 22 else img.read(0, 1 << 22)
            verify(img)
    except VfsError:
        pass
    try:
        check(path)
    except VfsError:
        pass


@FUZZ
@given(st.binary(min_size=0, max_size=600))
def test_header_parser_random_bytes(data):
    try:
        L.unpack_header(data)
    except FormatError:
        pass


@pytest.mark.log_warnings  # a mutated header may look like damage: a possible roll-back
@FUZZ
@given(
    st.lists(st.tuples(st.integers(8, L.HEADER_FIELDS_SIZE + 64), st.integers(0, 255)), max_size=6)
)
def test_resealed_header_mutations(tmp_path_factory, muts):
    _make_base()
    d = tmp_path_factory.mktemp("h")
    path = str(d / "f.vimg")
    shutil.copy(BASE, path)
    with open(path, "r+b") as f:
        buf = bytearray(f.read(L.HEADER_AREA))
        # mutate the current slot
        seqs = [L.copy_sequence(buf[o : o + L.HEADER_SLOT_SIZE]) for o in L.HEADER_SLOT_OFFSETS]
        slot = max(range(2), key=lambda i: seqs[i] or -1)
        o = L.HEADER_SLOT_OFFSETS[slot]
        h = bytearray(buf[o : o + L.HEADER_SLOT_SIZE])
        for pos, val in muts:
            h[pos] = val
        for o in (L.HEADER_SLOT_OFFSETS[slot], L.HEADER_MIRROR_OFFSETS[slot]):
            f.seek(o)
            f.write(reseal(h))
    _exercise(path)


@FUZZ
@given(st.binary(max_size=2000), st.integers(0, 50))
def test_snapshot_table_parser(data, count):
    try:
        D.unpack_snapshots(data, count, 4096)
    except FormatError:
        pass


@FUZZ
@given(st.binary(max_size=512), st.integers(0, 40))
def test_l1_parser(data, count):
    try:
        L.unpack_l1(data, count, 4096, 1 << 20)
    except FormatError:
        pass


@FUZZ
@given(st.binary(min_size=64, max_size=64))
def test_l2_entry_checker(raw):
    e = L.L2_ENTRY.unpack(raw)
    why = L.check_l2_entry(e[0], e[3], e[4], 4096, 1 << 20)
    assert why is None or isinstance(why, str)


@FUZZ
@given(
    st.lists(st.tuples(st.integers(0, 4095), st.integers(0, 255)), min_size=1, max_size=8),
    st.integers(0, 3),
)
def test_resealed_l2_mutations(tmp_path_factory, muts, which):
    """Mutate an L2 table, fix its checksum in the L1, the L1's in the header: then open."""
    _make_base()
    d = tmp_path_factory.mktemp("l2")
    path = str(d / "f.vimg")
    shutil.copy(BASE, path)
    with Image.open(path, readonly=True) as img:
        h = img.header
        l1 = list(next(img.roots())[2])
    present = [i for i, (off, _s) in enumerate(l1) if off]
    idx = present[which % len(present)]
    with open(path, "r+b") as f:
        f.seek(l1[idx][0])
        t = bytearray(f.read(4096))
        for pos, val in muts:
            t[pos] = val
        f.seek(l1[idx][0])
        f.write(t)
        l1[idx] = (l1[idx][0], xxhash.xxh3_64_intdigest(bytes(t)))
        raw = L.pack_l1(l1)
        f.seek(h.l1_offset)
        f.write(raw)
        h.l1_checksum = xxhash.xxh3_64_intdigest(raw)
    write_header(path, h)
    _exercise(path)


def test_read_current_header_on_garbage(tmp_path):
    p = tmp_path / "g"
    p.write_bytes(os.urandom(9000))
    from vfs.image.fileio import ImageFile

    f = ImageFile(str(p), writable=False)
    try:
        with pytest.raises(VfsError, match="not a vimg image"):
            read_current_header(f)
    finally:
        f.close()
