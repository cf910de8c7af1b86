"""The v1 header: copies and slots (torn commit vs. damage, never a silent roll-back), growth
(header length, extensions, feature names, the backing name by offset), hostile values."""

from __future__ import annotations

import os
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import xxhash

from vfs.errors import CorruptionError, FormatError, UnsupportedFeature
from vfs.image import layout as L
from vfs.image.check import check, verify
from vfs.image.header import choose_header
from vfs.image.image import Image

from .helpers import current_header, write_header

VIMG = str(Path(sys.executable).parent / "vimg")
CS = 4096


def vimg(*args: str) -> subprocess.CompletedProcess:
    p = subprocess.run([VIMG, *args], capture_output=True, text=True)
    assert "Traceback" not in p.stderr, p.stderr
    return p


def flip(path: str, offset: int, mask: int = 0x01) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        b = f.read(1)
        f.seek(offset)
        f.write(bytes([b[0] ^ mask]))


@pytest.fixture
def converted(tmp_path):
    """As the issue's reproduction: a fresh ``vimg convert`` output of a disk with data."""
    raw = tmp_path / "disk.raw"
    data = os.urandom(256 << 10) + bytes(768 << 10)
    raw.write_bytes(data)
    out = tmp_path / "disk.vimg"
    assert vimg("convert", "-O", "vimg", str(raw), str(out)).returncode == 0
    return str(out), data


def _current_slot(path: str) -> int:
    return current_header(path).sequence % 2


def test_one_flipped_bit_in_the_current_header_never_rolls_back(converted):
    """Every single-bit flip in the current header's primary copy: the image still reads as
    written (its mirror is intact), and check reports the damaged copy."""
    path, data = converted
    slot = _current_slot(path)
    orig = Path(path).read_bytes()
    length = struct.unpack_from("<I", orig, slot * 4096 + 12)[0]
    for byte in range(0, length):
        for bit in (0, 5):
            with open(path, "wb") as f:
                f.write(orig)
            flip(path, L.HEADER_SLOT_OFFSETS[slot] + byte, 1 << bit)
            with Image.open(path, readonly=True) as img:
                assert img.read(0, len(data)) == data, f"byte {byte} bit {bit}"
                assert img.header_choice.fallback is None
            assert check(path).exit_code == 2, f"byte {byte} bit {bit} not reported"


def test_flipped_header_bit_through_the_cli(converted, tmp_path):
    path, data = converted
    slot = _current_slot(path)
    flip(path, L.HEADER_SLOT_OFFSETS[slot] + 60)
    out = tmp_path / "back.raw"
    assert vimg("convert", "-O", "raw", path, str(out)).returncode == 0
    assert out.read_bytes() == data  # not an empty disk
    r = vimg("check", path)
    assert r.returncode == 2 and "slot" in r.stdout
    # a writer heals the copy from its mirror when it opens the image
    assert vimg("io", path, "-c", "write -P 0x42 0 512").returncode == 0
    assert vimg("check", path).returncode == 0


@pytest.mark.log_warnings
def test_damage_to_both_copies_is_a_loud_roll_back(converted, tmp_path):
    """Both copies of the newest slot damaged: the older slot is the only intact header. The
    reader may use it, but never silently: info/check/verify exit non-zero, convert warns, a
    read-write open refuses until check -r all accepts the older header."""
    path, data = converted
    slot = _current_slot(path)
    seq = current_header(path).sequence
    flip(path, L.HEADER_SLOT_OFFSETS[slot] + 60)
    flip(path, L.HEADER_MIRROR_OFFSETS[slot] + 61)
    with Image.open(path, readonly=True) as img:
        assert img.sequence == seq - 1
        assert "may have rolled back" in img.header_choice.fallback
    with pytest.raises(CorruptionError, match="check -r all"):
        Image.open(path)
    r = vimg("info", path)
    assert r.returncode != 0 and "rolled back" in r.stdout + r.stderr
    assert vimg("verify", path).returncode != 0
    r = vimg("check", path)
    assert r.returncode == 2 and "rolled back" in r.stdout
    r = vimg("convert", "-O", "raw", path, str(tmp_path / "x.raw"))
    assert r.returncode == 0 and "warning" in r.stderr and "rolled back" in r.stderr
    assert vimg("io", path, "-c", "write 0 512").returncode == 5  # refused, data untouched
    r = vimg("check", "-r", "all", path)
    assert r.returncode == 0 and f"accepted the header of sequence {seq - 1}" in r.stdout
    assert vimg("check", path).returncode == 0
    assert vimg("io", path, "-c", "write -P 0x42 0 512").returncode == 0


def test_torn_header_write_is_a_crash_not_damage(tmp_path):
    """A commit torn in its header write (the primary half written, the mirror still the old
    one): the previous commit is current, check is clean (a note), writers open it."""
    path = str(tmp_path / "a.vimg")
    with Image.create(path, 1 << 20, cluster_size=CS) as img:
        img.write(0, b"1" * CS)
        img.flush()
        img.write(0, b"2" * CS)
        img.flush()
    h = current_header(path)
    nxt = L.HEADER_SLOT_OFFSETS[(h.sequence + 1) % 2]
    h.sequence += 1
    torn = L.pack_header(h)[:100] + os.urandom(60)  # the new header half on disk
    with open(path, "r+b") as f:
        f.seek(nxt)
        f.write(torn)
    res = check(path)
    assert res.exit_code == 0 and any("torn header write" in m for m in res.messages)
    with Image.open(path) as img:  # no refusal: a crash is not damage
        assert img.sequence == h.sequence - 1
        assert img.read(0, CS) == b"2" * CS
        assert img.header_choice.fallback is None


def test_first_torn_write_of_a_fresh_slot(tmp_path):
    path = str(tmp_path / "a.vimg")
    Image.create(path, 1 << 20, cluster_size=CS).close()
    with open(path, "r+b") as f:
        f.seek(L.HEADER_SLOT_OFFSETS[1])
        f.write(b"VIMG\r\n\x1a\n" + os.urandom(200))
    choice = _choice(path)
    assert choice.fallback is None and choice.notes


def test_two_crashes_do_not_look_like_damage(tmp_path):
    """A torn mirror (crash right after a commit) followed by a torn primary of the same slot
    two commits later would leave that slot with no intact copy. The writer's heal at open
    rewrites the damaged mirror first, so the second crash still reads as a torn write."""
    path = str(tmp_path / "a.vimg")
    with Image.create(path, 1 << 20, cluster_size=CS) as img:
        img.write(0, b"1" * CS)
        img.flush()
    seq = current_header(path).sequence
    slot = seq % 2
    with open(path, "r+b") as f:  # crash 1: the mirror of the newest commit is torn
        f.seek(L.HEADER_MIRROR_OFFSETS[slot] + 64)
        f.write(os.urandom(64))
    assert _choice(path).fallback is None
    with Image.open(path) as img:  # heals the mirror, then commits into the other slot
        img.write(0, b"2" * CS)
        img.flush()
    h = current_header(path)
    h.sequence += 1
    with open(path, "r+b") as f:  # crash 2: the next commit into `slot` is torn
        f.seek(L.HEADER_SLOT_OFFSETS[slot])
        f.write(L.pack_header(h)[:80] + os.urandom(80))
    choice = _choice(path)
    assert choice.fallback is None and choice.header.sequence == seq + 1


def _choice(path):
    from vfs.image.fileio import ImageFile

    f = ImageFile(path, writable=False)
    try:
        return choose_header(f)
    finally:
        f.close()


# ------------------------------------------------------------------------- growth
def _forge(path: str, body_edit) -> None:
    """Rebuild the current header copy with ``body_edit(bytes) -> bytes`` applied to its bytes
    before the checksum, then reseal it into both copies of its slot."""
    h = current_header(path)
    raw = L.pack_header(h)[:-8]
    raw = body_edit(raw)
    raw += struct.pack("<Q", xxhash.xxh3_64_intdigest(raw))
    slot = raw.ljust(L.HEADER_SLOT_SIZE, b"\0")
    with open(path, "r+b") as f:
        for o in (L.HEADER_SLOT_OFFSETS[h.sequence % 2], L.HEADER_MIRROR_OFFSETS[h.sequence % 2]):
            f.seek(o)
            f.write(slot)


def _grow(raw: bytes, extra_field: bytes = b"", extension: bytes = b"") -> bytes:
    """Insert a later header field and/or an extension, fixing every length and offset."""
    hl, el = struct.unpack_from("<II", raw, 24)
    name_len, name_off = struct.unpack_from("<H", raw, 68)[0], struct.unpack_from("<I", raw, 72)[0]
    fields, exts, tail = raw[:hl], raw[hl : hl + el], raw[hl + el :]
    out = bytearray(fields + extra_field + exts + extension + tail)
    struct.pack_into("<II", out, 24, hl + len(extra_field), el + len(extension))
    if name_len:
        struct.pack_into("<I", out, 72, name_off + len(extra_field) + len(extension))
    struct.pack_into("<I", out, 12, len(out) + 8)
    return bytes(out)


def test_a_longer_header_is_read_and_its_unknown_field_kept(tmp_path):
    path = str(tmp_path / "a.vimg")
    Image.create(str(tmp_path / "base.raw.vimg"), 1 << 20).close()
    with Image.create(path, 1 << 20, cluster_size=CS, backing="base.raw.vimg") as img:
        img.write(0, b"d" * CS)
    field = struct.pack("<Q", 0x1122334455667788)
    ext = b"ZZZZ" + struct.pack("<I", 5) + b"hello" + bytes(3)
    _forge(path, lambda raw: _grow(raw, field, ext))
    with Image.open(path) as img:  # one extra 8-byte field, an unknown extension
        assert img.read(0, CS) == b"d" * CS
        assert img.backing_name == "base.raw.vimg"  # found through its offset
        img.write(CS, b"e" * CS)  # a commit: rewrites the header
    h = current_header(path)
    assert h.unknown_fields == field
    assert h.unknown_extensions == [(b"ZZZZ", b"hello")]
    assert check(path).exit_code == 0


def test_unknown_incompatible_feature_is_named_from_the_table(tmp_path):
    path = str(tmp_path / "a.vimg")
    Image.create(path, 1 << 20, cluster_size=CS).close()
    h = current_header(path)
    h.incompatible |= 1 << 9
    h.feature_names[(L.FEATURE_INCOMPAT, 9)] = "holographic clusters"
    write_header(path, h)
    with pytest.raises(UnsupportedFeature, match=r"bit\(s\) 9 \(holographic clusters\)"):
        Image.open(path, readonly=True)
    r = vimg("info", path)
    assert r.returncode == 6 and "holographic clusters" in r.stderr


def test_unknown_compatible_feature_and_its_name_survive_a_writer(tmp_path):
    path = str(tmp_path / "a.vimg")
    Image.create(path, 1 << 20, cluster_size=CS).close()
    h = current_header(path)
    h.compatible |= 1 << 3
    h.feature_names[(L.FEATURE_COMPAT, 3)] = "shiny"
    write_header(path, h)
    with Image.open(path) as img:
        img.write(0, b"x" * CS)
    h = current_header(path)
    assert h.compatible & 1 << 3 and h.feature_names[(L.FEATURE_COMPAT, 3)] == "shiny"


def test_backing_name_after_a_gap_is_found_by_its_offset(tmp_path):
    Image.create(str(tmp_path / "b.vimg"), 1 << 20).close()
    path = str(tmp_path / "a.vimg")
    Image.create(path, 1 << 20, backing="b.vimg").close()

    def move_name(raw: bytes) -> bytes:
        off = struct.unpack_from("<I", raw, 72)[0]
        out = bytearray(raw[:off] + bytes(64) + raw[off:])
        struct.pack_into("<I", out, 72, off + 64)
        struct.pack_into("<I", out, 12, len(out) + 8)
        return bytes(out)

    _forge(path, move_name)
    with Image.open(path, readonly=True) as img:
        assert img.backing_name == "b.vimg"


@pytest.mark.parametrize(
    "edit",
    [
        lambda raw: raw[:72] + struct.pack("<I", 4000) + raw[76:],  # name past the header
        lambda raw: raw[:72] + struct.pack("<I", 24) + raw[76:],  # name inside the fields
        lambda raw: raw[:28] + struct.pack("<I", 4088) + raw[32:],  # extensions overrun
        lambda raw: raw[:24] + struct.pack("<I", 100) + raw[28:],  # header length too short
    ],
)
def test_malformed_lengths_and_offsets_are_format_errors(tmp_path, edit):
    Image.create(str(tmp_path / "b.vimg"), 1 << 20).close()
    path = str(tmp_path / "a.vimg")
    Image.create(path, 1 << 20, backing="b.vimg").close()
    _forge(path, edit)
    with pytest.raises(FormatError):
        Image.open(path, readonly=True)


def test_sequence_at_the_end_of_its_range(tmp_path):
    """A header with sequence 2^64-1 (valid checksum) is refused at open, never a struct.error
    at the next write; one just below the format's limit opens read-only but refuses to
    commit past it."""
    path = str(tmp_path / "a.vimg")
    Image.create(path, 1 << 20, cluster_size=CS).close()

    def seq(value: int):
        def edit(raw: bytes) -> bytes:
            return raw[:16] + struct.pack("<Q", value) + raw[24:]

        return edit

    _forge(path, seq((1 << 64) - 1))
    with pytest.raises(FormatError, match="sequence"):
        Image.open(path)
    r = vimg("io", path, "-c", "write 0 512")
    assert r.returncode == 6 and "sequence" in r.stderr
    os.unlink(path)
    Image.create(path, 1 << 20, cluster_size=CS).close()
    _forge(path, seq(L.MAX_SEQUENCE - 1))
    with Image.open(path, readonly=True) as img:
        assert img.read(0, 10) == bytes(10)
    img = Image.open(path)
    img.write(0, b"x")
    with pytest.raises(FormatError, match="sequence"):
        img.flush()
    with pytest.raises(FormatError, match="sequence"):
        img.close()  # the file is released all the same
    with Image.open(path, readonly=True) as img:
        assert img.read(0, 1) == b"\0"


@pytest.mark.log_warnings
def test_verify_reports_the_roll_back(converted):
    path, _ = converted
    slot = _current_slot(path)
    flip(path, L.HEADER_SLOT_OFFSETS[slot] + 40)
    flip(path, L.HEADER_MIRROR_OFFSETS[slot] + 40)
    with Image.open(path, readonly=True) as img:
        assert verify(img) == []  # the older tree itself is sound
        assert img.header_choice.fallback
