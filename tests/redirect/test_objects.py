"""Object ids and the object-file container, without any store or network."""

from __future__ import annotations

import io
import os

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vfs.errors import IntegrityError, InvalidObjectId, VfsError
from vfs.redirect.objectid import check_object_id, object_id
from vfs.redirect.objfile import ObjectReader, ObjectWriter


def test_object_id_is_sha256_hex():
    assert object_id(b"") == "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"


@pytest.mark.parametrize(
    "bad",
    ["", "../etc/passwd", "..", "A" * 64, "g" * 64, "a" * 63, "a" * 65, "a" * 62 + "/x", None, 5],
)
def test_check_object_id_refuses_paths_and_garbage(bad):
    with pytest.raises(InvalidObjectId):
        check_object_id(bad)


def _container(data: bytes, *, compress: bool, chunk: int = 4096) -> bytes:
    buf = io.BytesIO()
    w = ObjectWriter(buf, compress=compress, chunk_size=chunk)
    # Feed in odd-sized pieces so chunk boundaries fall inside writes.
    for i in range(0, len(data), 1000):
        w.write(data[i : i + 1000])
    w.finish()
    return buf.getvalue()


def _reader(tmp_path, blob: bytes) -> ObjectReader:
    p = tmp_path / "obj"
    p.write_bytes(blob)
    return ObjectReader(os.open(p, os.O_RDONLY), name="test")


@pytest.mark.parametrize("compress", [False, True])
@pytest.mark.parametrize("size", [0, 1, 4095, 4096, 4097, 50_000])
def test_container_round_trip_and_partial_reads(tmp_path, compress, size):
    data = (os.urandom(size // 2) + b"z" * (size - size // 2))[:size]
    r = _reader(tmp_path, _container(data, compress=compress))
    try:
        assert r.size == size
        assert r.read(0, size + 10) == data
        for off, n in [(0, 1), (4095, 2), (4096, 4096), (size // 3, 9000), (size, 5)]:
            assert r.read(off, n) == data[off : off + n]
    finally:
        r.close()


@pytest.mark.parametrize("compress", [False, True])
def test_flipped_bit_is_an_error_naming_the_object_never_data(tmp_path, compress):
    data = os.urandom(3000) + b"a" * 20000
    blob = bytearray(_container(data, compress=compress))
    blob[100] ^= 0x10
    r = _reader(tmp_path, bytes(blob))
    try:
        with pytest.raises(IntegrityError, match="test: checksum mismatch in chunk 0"):
            r.read(50, 10)
        assert r.read(8192, 100) == data[8192:8292]  # other chunks still verified and served
    finally:
        r.close()


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=200), st.integers(min_value=0, max_value=120))
def test_fuzz_damaged_trailer_only_raises_format_errors(tmp_path_factory, junk, cut):
    good = _container(b"x" * 10000, compress=True)
    blob = good[: max(0, len(good) - cut)] + junk
    p = tmp_path_factory.mktemp("fz") / "o"
    p.write_bytes(blob)
    fd = os.open(p, os.O_RDONLY)
    try:
        r = ObjectReader(fd, name="fz")
        r.read(0, 20000)
    except VfsError:
        pass
    finally:
        os.close(fd)
