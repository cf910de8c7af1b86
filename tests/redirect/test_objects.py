"""Object ids, plain object files and their checksum sidecars, without any store or network."""

from __future__ import annotations

import hashlib
import io
import os

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vfs.errors import IntegrityError, InvalidObjectId, UnsupportedFeature, VfsError
from vfs.redirect.objectid import check_object_id, object_id
from vfs.redirect.objfile import (
    HOLE_BLOCK,
    ChunkSums,
    MissingSums,
    ObjectReader,
    SumsBuilder,
    sums_for,
    write_sparse,
)
from vfs.redirect.objfile_v1 import v1_chunks, write_v1


def test_object_id_is_sha256_hex():
    assert object_id(b"") == "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"


@pytest.mark.parametrize(
    "bad",
    ["", "../etc/passwd", "..", "A" * 64, "g" * 64, "a" * 63, "a" * 65, "a" * 62 + "/x", None, 5],
)
def test_check_object_id_refuses_paths_and_garbage(bad):
    with pytest.raises(InvalidObjectId):
        check_object_id(bad)


def _sums(data: bytes, chunk: int) -> ChunkSums:
    b = SumsBuilder(chunk)
    # Feed in odd-sized pieces so chunk boundaries fall inside writes.
    for i in range(0, len(data), 1000):
        b.update(data[i : i + 1000])
    return b.finish()


def _reader(tmp_path, data: bytes, *, chunk: int = 4096, sums: ChunkSums | None = None):
    p = tmp_path / "obj"
    p.write_bytes(data)
    if sums is None and len(data) > chunk:
        sums = _sums(data, chunk)
    return ObjectReader(os.open(p, os.O_RDONLY), object_id(data), sums=sums, chunk_size=chunk)


@pytest.mark.parametrize("size", [0, 1, 4095, 4096, 4097, 50_000])
def test_plain_object_round_trip_and_partial_reads(tmp_path, size):
    data = (os.urandom(size // 2) + b"z" * (size - size // 2))[:size]
    r = _reader(tmp_path, data)
    try:
        assert r.size == size
        assert r.read(0, size + 10) == data
        for off, n in [(0, 1), (4095, 2), (4096, 4096), (size // 3, 9000), (size, 5)]:
            assert r.read(off, n) == data[off : off + n]
        assert b"".join(r.iter_chunks()) == data
    finally:
        r.close()


def test_the_object_file_is_exactly_the_bytes(tmp_path):
    data = os.urandom(70_000)
    r = _reader(tmp_path, data)
    r.close()
    assert (tmp_path / "obj").read_bytes() == data
    assert hashlib.sha256((tmp_path / "obj").read_bytes()).hexdigest() == object_id(data)


def test_flipped_bit_in_a_large_object_is_an_error_naming_the_chunk_never_data(tmp_path):
    data = os.urandom(3000) + b"a" * 20000
    sums = _sums(data, 4096)
    bad = bytearray(data)
    bad[100] ^= 0x10
    p = tmp_path / "obj"
    p.write_bytes(bad)
    r = ObjectReader(os.open(p, os.O_RDONLY), object_id(data), sums=sums, chunk_size=4096)
    try:
        with pytest.raises(IntegrityError, match="checksum mismatch in chunk 0"):
            r.read(50, 10)
        assert r.read(8192, 100) == data[8192:8292]  # other chunks still verified and served
    finally:
        r.close()


def test_flipped_bit_in_a_small_object_fails_its_id_at_open(tmp_path):
    data = b"small object\n" * 10
    p = tmp_path / "obj"
    p.write_bytes(data[:-1] + b"X")
    fd = os.open(p, os.O_RDONLY)
    try:
        with pytest.raises(IntegrityError, match="does not match its id"):
            ObjectReader(fd, object_id(data))
    finally:
        os.close(fd)


def test_a_large_object_needs_its_sidecar_and_sums_for_rebuilds_it_only_if_the_object_is_good(
    tmp_path,
):
    data = os.urandom(200_000)
    p = tmp_path / "obj"
    p.write_bytes(data)
    fd = os.open(p, os.O_RDONLY)
    try:
        with pytest.raises(MissingSums):
            ObjectReader(fd, object_id(data), chunk_size=4096)
        assert sums_for(fd, object_id(data), 4096) == _sums(data, 4096)
        with pytest.raises(IntegrityError):
            sums_for(fd, "0" * 64, 4096)
    finally:
        os.close(fd)


def test_sidecar_round_trip_and_damage_is_missing_sums():
    s = _sums(os.urandom(100_000), 4096)
    enc = s.encode()
    assert ChunkSums.decode(enc) == s
    for i in (0, 12, 20, 40, len(enc) - 1):
        bad = bytearray(enc)
        bad[i] ^= 1
        with pytest.raises((MissingSums, UnsupportedFeature)):
            ChunkSums.decode(bytes(bad))
    with pytest.raises(MissingSums):
        ChunkSums.decode(enc[:-8])


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=200), st.integers(min_value=0, max_value=120))
def test_fuzz_damaged_sidecar_only_raises_vfs_errors(junk, cut):
    good = _sums(b"x" * 100_000, 4096).encode()
    blob = good[: max(0, len(good) - cut)] + junk
    try:
        ChunkSums.decode(blob)
    except VfsError:
        pass


@pytest.mark.parametrize("offset", [0, 100, 4096])
def test_write_sparse_leaves_aligned_zero_blocks_as_holes(tmp_path, offset):
    data = os.urandom(5000) + bytes(5 * HOLE_BLOCK) + os.urandom(3000) + bytes(9000)
    p = tmp_path / "sparse"
    fd = os.open(p, os.O_RDWR | os.O_CREAT)
    try:
        write_sparse(fd, data, offset)
        os.ftruncate(fd, offset + len(data))
        os.fsync(fd)
        assert os.pread(fd, len(data), offset) == data
        st = os.fstat(fd)
        assert st.st_blocks * 512 < offset + len(data) - 3 * HOLE_BLOCK
    finally:
        os.close(fd)


def test_format_1_container_is_read_for_migration_only(tmp_path):
    data = os.urandom(3000) + b"b" * 150_000
    for compress in (False, True):
        buf = io.BytesIO()
        write_v1(buf, data, compress=compress)
        p = tmp_path / f"v1-{compress}"
        p.write_bytes(buf.getvalue())
        fd = os.open(p, os.O_RDONLY)
        try:
            parsed = v1_chunks(fd)
            assert parsed is not None
            size, chunks = parsed
            assert size == len(data) and b"".join(chunks) == data
        finally:
            os.close(fd)
    plain = tmp_path / "plain"
    plain.write_bytes(data)
    fd = os.open(plain, os.O_RDONLY)
    try:
        assert v1_chunks(fd) is None  # a plain object is no container
    finally:
        os.close(fd)
