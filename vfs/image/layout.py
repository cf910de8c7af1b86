"""On-disk structures of the vimg format: constants, byte layouts, pack/unpack. No behaviour.

``docs/vimg-format.md`` is canonical; this module implements its bytes (the snapshot table and
the bitmap directory are in :mod:`vfs.image.directories`). Everything is little-endian.
Parsers raise :class:`vfs.errors.FormatError` (never struct.error, IndexError or UnicodeError)
and bound every length they read by the size of the buffer they were given, so a hostile file
cannot make them allocate or loop beyond it.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from typing import NamedTuple

import xxhash

from vfs.errors import FormatError, UnsupportedFeature

MAGIC = b"VIMG\r\n\x1a\n"
VERSION = 1

# ---- the header area (spec sections 2, 3) -------------------------------------------------
#: Bytes of one header copy.
HEADER_SLOT_SIZE = 4096
#: Host offsets of the two slots' primary copies; the mirrors follow (spec 2).
HEADER_SLOT_OFFSETS = (0, 4096)
HEADER_MIRROR_OFFSETS = (8192, 12288)
#: Every header copy, for probing: a file is vimg when any of them starts with the magic.
HEADER_COPY_OFFSETS = HEADER_SLOT_OFFSETS + HEADER_MIRROR_OFFSETS
#: Bytes reserved at the start of the file for the header copies.
HEADER_AREA = 16384
#: Commit counters stay below this (spec 3.2).
MAX_SEQUENCE = 1 << 63

MIN_CLUSTER_BITS = 12  # 4 KiB
MAX_CLUSTER_BITS = 21  # 2 MiB
DEFAULT_CLUSTER_BITS = 16  # 64 KiB
#: Virtual sizes are multiples of this (as in qemu-img).
SECTOR = 512
#: Format limit on the virtual size (implementation limits may be lower).
MAX_VIRTUAL_SIZE = 1 << 56

# ---- feature bits (spec section 10) ---------------------------------------------------------
FEATURE_INCOMPAT, FEATURE_COMPAT, FEATURE_AUTOCLEAR = 0, 1, 2
FEATURE_KINDS = {FEATURE_INCOMPAT: "incompatible", FEATURE_COMPAT: "compatible", 2: "autoclear"}
#: Incompatible: an L2 entry may be of type REMOTE (readers need a resolver to read them).
INCOMPAT_REMOTE = 1 << 0
#: Incompatible: an L2 entry may be of type COMPRESSED (zstd).
INCOMPAT_COMPRESSED = 1 << 1
#: Autoclear: the BMAP extension is consistent with the disk.
AUTOCLEAR_BITMAPS = 1 << 0
KNOWN_INCOMPAT = INCOMPAT_REMOTE | INCOMPAT_COMPRESSED
KNOWN_COMPAT = 0
KNOWN_AUTOCLEAR = AUTOCLEAR_BITMAPS
#: (kind, bit) -> name, as written into the feature name table.
FEATURE_NAMES = {
    (FEATURE_INCOMPAT, 0): "remote clusters",
    (FEATURE_INCOMPAT, 1): "zstd clusters",
    (FEATURE_AUTOCLEAR, 0): "bitmaps",
}

# ---- backing formats / compression ----------------------------------------------------------
BACKING_NONE, BACKING_RAW, BACKING_VIMG = 0, 1, 2
BACKING_FORMATS = {BACKING_NONE: "", BACKING_RAW: "raw", BACKING_VIMG: "vimg"}
BACKING_FORMAT_CODES = {v: k for k, v in BACKING_FORMATS.items() if v}
COMPRESSION_NONE, COMPRESSION_ZSTD = 0, 1
MAX_BACKING_NAME = 1024

# ---- header ----------------------------------------------------------------------------------
#: The header fields of version 1 (bytes 0..151; spec 3.2).
_HEADER = struct.Struct("<8sIIQIIQQQQIHBBIIQQIIQQQQIIQ")
HEADER_FIELDS_SIZE = _HEADER.size
assert HEADER_FIELDS_SIZE == 152
#: Offsets every version keeps (the slot choice is blind to everything else).
_SLOT_LENGTH_AT, _SEQUENCE_AT = 12, 16

#: Extension tags (spec 3.3).
EXT_FEATURES = b"FEAT"
EXT_BITMAPS = b"BMAP"
_EXT = struct.Struct("<4sI")
_FEATURE = struct.Struct("<BB46s")
FEATURE_ENTRY_SIZE = _FEATURE.size  # 48
_BMAP = struct.Struct("<IIQQ8x")
BMAP_SIZE = _BMAP.size  # 32
MAX_BITMAP_DIRECTORY = 1 << 20


@dataclass
class BitmapsExt:
    """The BMAP extension: where the bitmap directory is (spec 7.1)."""

    nb_bitmaps: int
    directory_size: int
    directory_offset: int
    directory_checksum: int


@dataclass
class Header:
    """The header of one slot. ``sequence`` orders the slots; the highest intact copy wins."""

    virtual_size: int
    cluster_bits: int
    sequence: int = 0
    incompatible: int = 0
    compatible: int = 0
    autoclear: int = 0
    l1_offset: int = 0
    l1_checksum: int = 0
    l1_entries: int = 0
    nb_snapshots: int = 0
    refcount_table_offset: int = 0
    refcount_table_checksum: int = 0
    refcount_table_entries: int = 0
    snapshots_offset: int = 0
    snapshots_checksum: int = 0
    snapshots_size: int = 0
    backing_format: int = BACKING_NONE
    compression: int = COMPRESSION_NONE
    host_clusters: int = 0
    backing_name: str = ""
    version: int = VERSION
    bitmaps: BitmapsExt | None = None
    #: Header fields past byte 151 this reader does not know (kept as they are, spec 3.5).
    unknown_fields: bytes = b""
    #: Extensions of unknown type, (tag, data), kept byte for byte.
    unknown_extensions: list[tuple[bytes, bytes]] = field(default_factory=list)
    #: Names from the feature name table: (kind, bit) -> name.
    feature_names: dict[tuple[int, int], str] = field(default_factory=dict)

    @property
    def cluster_size(self) -> int:
        return 1 << self.cluster_bits

    def feature_name(self, kind: int, bit: int) -> str:
        return FEATURE_NAMES.get((kind, bit)) or self.feature_names.get((kind, bit), "")


def _ext(tag: bytes, data: bytes) -> bytes:
    return _EXT.pack(tag, len(data)) + data + bytes(pad8(len(data)) - len(data))


def pack_header(h: Header) -> bytes:
    """The bytes of one header copy (``slot_length`` of them; writers zero-fill the slot)."""
    name = h.backing_name.encode()
    if len(name) > MAX_BACKING_NAME:
        raise FormatError(f"backing file name longer than {MAX_BACKING_NAME} bytes")
    if not 0 <= h.sequence < MAX_SEQUENCE:
        raise FormatError(f"sequence {h.sequence} out of range")
    names = dict(h.feature_names)
    names.update(FEATURE_NAMES)
    table = b"".join(
        _FEATURE.pack(kind, bit, n.encode()[:46]) for (kind, bit), n in sorted(names.items())
    )
    exts = _ext(EXT_FEATURES, table)
    if h.bitmaps is not None:
        b = h.bitmaps
        exts += _ext(
            EXT_BITMAPS,
            _BMAP.pack(b.nb_bitmaps, b.directory_size, b.directory_offset, b.directory_checksum),
        )
    for tag, data in h.unknown_extensions:
        exts += _ext(tag, data)
    header_length = HEADER_FIELDS_SIZE + len(h.unknown_fields)
    name_off = header_length + len(exts) if name else 0
    slot_length = header_length + len(exts) + pad8(len(name)) + 8
    if slot_length > HEADER_SLOT_SIZE:
        raise FormatError(f"header needs {slot_length} bytes, more than a slot holds")
    fields = _HEADER.pack(
        MAGIC,
        h.version,
        slot_length,
        h.sequence,
        header_length,
        len(exts),
        h.incompatible,
        h.compatible,
        h.autoclear,
        h.virtual_size,
        h.cluster_bits,
        len(name),
        h.backing_format,
        h.compression,
        name_off,
        h.nb_snapshots,
        h.l1_offset,
        h.l1_checksum,
        h.l1_entries,
        h.refcount_table_entries,
        h.refcount_table_offset,
        h.refcount_table_checksum,
        h.snapshots_offset,
        h.snapshots_checksum,
        h.snapshots_size,
        0,
        h.host_clusters,
    )
    body = fields + h.unknown_fields + exts + name + bytes(pad8(len(name)) - len(name))
    return body + struct.pack("<Q", xxhash.xxh3_64_intdigest(body))


def copy_sequence(buf: bytes) -> int | None:
    """The sequence number of an *intact* header copy (magic, slot_length, checksum), else None.

    Deliberately blind to version and features: the choice of the current header must not
    depend on what this reader understands (else a newer writer's commit would be skipped)."""
    if len(buf) < 32 or bytes(buf[:8]) != MAGIC:
        return None
    (length,) = struct.unpack_from("<I", buf, _SLOT_LENGTH_AT)
    if length < 32 or length > min(HEADER_SLOT_SIZE, len(buf)) or length % 8:
        return None
    (stored_sum,) = struct.unpack_from("<Q", buf, length - 8)
    if xxhash.xxh3_64_intdigest(bytes(buf[: length - 8])) != stored_sum:
        return None
    return struct.unpack_from("<Q", buf, _SEQUENCE_AT)[0]


def is_blank(buf: bytes) -> bool:
    """A header copy that was never written (all zeros)."""
    return not any(buf)


def unpack_header(buf: bytes) -> Header:
    """Parse and validate one header copy. Raises FormatError / UnsupportedFeature."""
    if copy_sequence(buf) is None:
        if len(buf) < 32 or bytes(buf[:8]) != MAGIC:
            raise FormatError("not a vimg header (bad magic)")
        raise FormatError("header checksum mismatch (or bad slot length)")
    (version,) = struct.unpack_from("<I", buf, 8)
    (slot_length,) = struct.unpack_from("<I", buf, _SLOT_LENGTH_AT)
    if version != VERSION:
        raise UnsupportedFeature(f"vimg version {version} is not supported (this reader: 1)")
    if slot_length < HEADER_FIELDS_SIZE + 8:
        raise FormatError(f"bad slot length {slot_length}")
    f = _HEADER.unpack_from(buf, 0)
    header_length, ext_length = f[4], f[5]
    if (
        header_length < HEADER_FIELDS_SIZE
        or header_length % 8
        or ext_length % 8
        or header_length + ext_length + 8 > slot_length
    ):
        raise FormatError(f"bad header length {header_length} / extensions length {ext_length}")
    h = Header(
        version=version,
        sequence=f[3],
        incompatible=f[6],
        compatible=f[7],
        autoclear=f[8],
        virtual_size=f[9],
        cluster_bits=f[10],
        backing_format=f[12],
        compression=f[13],
        nb_snapshots=f[15],
        l1_offset=f[16],
        l1_checksum=f[17],
        l1_entries=f[18],
        refcount_table_entries=f[19],
        refcount_table_offset=f[20],
        refcount_table_checksum=f[21],
        snapshots_offset=f[22],
        snapshots_checksum=f[23],
        snapshots_size=f[24],
        host_clusters=f[26],
        unknown_fields=bytes(buf[HEADER_FIELDS_SIZE:header_length]),
    )
    _unpack_extensions(h, bytes(buf[header_length : header_length + ext_length]))
    unknown = h.incompatible & ~KNOWN_INCOMPAT
    if unknown:
        bits = []
        for b in range(64):
            if unknown >> b & 1:
                n = h.feature_name(FEATURE_INCOMPAT, b)
                bits.append(f"{b} ({n})" if n else str(b))
        raise UnsupportedFeature(
            f"image uses incompatible feature bit(s) {', '.join(bits)} unknown to this reader; "
            "upgrade vfs to open it"
        )
    name_len, name_off = f[11], f[14]
    if name_len:
        lo = header_length + ext_length
        if name_len > MAX_BACKING_NAME or name_off % 8 or name_off < lo:
            raise FormatError("backing name offset or length invalid")
        if name_off + name_len > slot_length - 8:
            raise FormatError("backing name lies past the header")
        try:
            h.backing_name = bytes(buf[name_off : name_off + name_len]).decode()
        except UnicodeDecodeError:
            raise FormatError("backing file name is not UTF-8") from None
        if "\0" in h.backing_name:
            raise FormatError("backing file name contains a NUL byte")
    elif name_off:
        raise FormatError("backing name offset without a name")
    validate_header(h)
    return h


def _unpack_extensions(h: Header, area: bytes) -> None:
    pos, seen = 0, set()
    while pos < len(area):
        if pos + _EXT.size > len(area):
            raise FormatError("header extension truncated")
        tag, n = _EXT.unpack_from(area, pos)
        data_at = pos + _EXT.size
        if tag == b"\0\0\0\0" or data_at + n > len(area):
            raise FormatError("malformed header extension")
        if tag in seen:
            raise FormatError(f"header extension {tag!r} appears twice")
        seen.add(tag)
        data = area[data_at : data_at + n]
        if tag == EXT_FEATURES:
            for i in range(n // FEATURE_ENTRY_SIZE):
                kind, bit, raw = _FEATURE.unpack_from(data, i * FEATURE_ENTRY_SIZE)
                if kind in FEATURE_KINDS and bit < 64:
                    name = raw.rstrip(b"\0").decode("utf-8", "replace")
                    if (kind, bit) not in FEATURE_NAMES:
                        h.feature_names[(kind, bit)] = name
        elif tag == EXT_BITMAPS:
            if n < BMAP_SIZE:
                raise FormatError("bitmaps extension truncated")
            nb, size, off, csum = _BMAP.unpack_from(data, 0)
            if nb < 1 or size > MAX_BITMAP_DIRECTORY or size < nb * 32:
                raise FormatError("bitmaps extension fields invalid")
            h.bitmaps = BitmapsExt(nb, size, off, csum)
        else:
            h.unknown_extensions.append((bytes(tag), bytes(data)))
        pos = data_at + pad8(n)


def validate_header(h: Header) -> None:
    """Invariants every header must satisfy (bounds that keep later allocations sane)."""
    if not 0 <= h.sequence < MAX_SEQUENCE:
        raise FormatError(f"sequence {h.sequence} out of range")
    if not MIN_CLUSTER_BITS <= h.cluster_bits <= MAX_CLUSTER_BITS:
        raise FormatError(f"cluster bits {h.cluster_bits} out of range 12..21")
    cs = h.cluster_size
    if h.virtual_size % SECTOR or h.virtual_size > MAX_VIRTUAL_SIZE:
        raise FormatError(f"bad virtual size {h.virtual_size}")
    if h.l1_entries != l1_entries_for(h.virtual_size, cs):
        raise FormatError("L1 size does not match the virtual size")
    if h.host_clusters > MAX_VIRTUAL_SIZE // cs * 2:
        raise FormatError("host cluster count out of range")
    offsets = [
        ("L1", h.l1_offset),
        ("refcount table", h.refcount_table_offset),
        ("snapshot table", h.snapshots_offset),
    ]
    if h.bitmaps is not None:
        offsets.append(("bitmap directory", h.bitmaps.directory_offset))
        if not h.bitmaps.directory_offset:
            raise FormatError("bitmap directory offset invalid")
    for name, off in offsets:
        if off and (off % cs or off < HEADER_AREA or off >= h.host_clusters * cs):
            raise FormatError(f"{name} offset {off:#x} invalid")
    if h.l1_offset == 0:
        raise FormatError("no L1 table")
    if h.refcount_table_offset == 0:
        raise FormatError("no refcount table")
    if h.refcount_table_entries != refcount_blocks_for(h.host_clusters, cs):
        raise FormatError("refcount table size does not match the host cluster count")
    if (h.snapshots_offset == 0) != (h.nb_snapshots == 0) or h.snapshots_size > 1 << 26:
        raise FormatError("snapshot table fields inconsistent")
    if h.backing_format not in BACKING_FORMATS or (h.backing_format == 0) != (not h.backing_name):
        raise FormatError("bad backing format")
    if h.compression not in (COMPRESSION_NONE, COMPRESSION_ZSTD):
        raise FormatError(f"unknown compression type {h.compression}")


# ---- L1 / L2 ---------------------------------------------------------------------------------
#: L1 entry: u64 host offset of the L2 table (0 = none: all entries unallocated),
#: u64 xxh3_64 of the whole L2 cluster.
L1_ENTRY = struct.Struct("<QQ")
L1_ENTRY_SIZE = L1_ENTRY.size  # 16

#: L2 entry: type, flags, reserved, stored length, host offset, xxh3_64 of the cluster content,
#: object id (SHA-256, binary), reserved.
L2_ENTRY = struct.Struct("<BBHIQQ32s8x")
L2_ENTRY_SIZE = L2_ENTRY.size  # 64
assert L2_ENTRY_SIZE == 64

UNALLOCATED, ZERO, LOCAL, COMPRESSED, REMOTE = 0, 1, 2, 3, 4
ENTRY_TYPES = {
    UNALLOCATED: "unallocated",
    ZERO: "zero",
    LOCAL: "local",
    COMPRESSED: "compressed",
    REMOTE: "remote",
}
NO_OID = b"\0" * 32


class Entry(NamedTuple):
    """One L2 entry with named fields (the hot paths use the plain ``L2_ENTRY`` tuple, whose
    fields are in the same order)."""

    kind: int  #: UNALLOCATED, ZERO, LOCAL, COMPRESSED or REMOTE
    flags: int
    reserved: int
    length: int  #: COMPRESSED: bytes of the zstd frame
    host: int  #: LOCAL: cluster offset; COMPRESSED: frame offset
    checksum: int  #: xxh3 of the uncompressed cluster
    oid: bytes  #: REMOTE: SHA-256 of the cluster

    @property
    def stored(self) -> bool:
        """The entry holds data of its own (LOCAL, COMPRESSED or REMOTE)."""
        return self.kind in (LOCAL, COMPRESSED, REMOTE)


UNALLOCATED_ENTRY = Entry(UNALLOCATED, 0, 0, 0, 0, 0, NO_OID)


def l2_entries_per_table(cluster_size: int) -> int:
    return cluster_size // L2_ENTRY_SIZE


def l1_entries_for(virtual_size: int, cluster_size: int) -> int:
    span = cluster_size * l2_entries_per_table(cluster_size)
    return max(1, -(-virtual_size // span))


def pack_l1(entries: list[tuple[int, int]]) -> bytes:
    return b"".join(L1_ENTRY.pack(o, s) for o, s in entries)


def unpack_l1(buf: bytes, count: int, cluster_size: int, host_end: int) -> list[tuple[int, int]]:
    """Parse ``count`` L1 entries; every L2 offset must be cluster-aligned and inside the file."""
    if len(buf) < count * L1_ENTRY_SIZE:
        raise FormatError("L1 table truncated")
    out = []
    for i in range(count):
        off, s = L1_ENTRY.unpack_from(buf, i * L1_ENTRY_SIZE)
        if off and (off % cluster_size or off < HEADER_AREA or off + cluster_size > host_end):
            raise FormatError(f"L1 entry {i}: bad L2 offset {off:#x}")
        out.append((off, s))
    return out


#: Cluster tables (bitmaps, VM state: spec section 1) have the L1 table's entry layout.
pack_table = pack_l1
unpack_table = unpack_l1


def check_l2_entry(
    etype: int, length: int, host: int, cluster_size: int, host_end: int
) -> str | None:
    """Return why an L2 entry is malformed, or None when it is well formed."""
    if etype not in ENTRY_TYPES:
        return f"unknown entry type {etype}"
    if etype == LOCAL:
        if host % cluster_size or host < HEADER_AREA or host + cluster_size > host_end:
            return f"local cluster offset {host:#x} invalid"
    elif etype == COMPRESSED:
        if not 0 < length < cluster_size:
            return f"compressed length {length} invalid"
        if host < HEADER_AREA or host + length > host_end:
            return f"compressed cluster offset {host:#x} invalid"
        if host // cluster_size != (host + length - 1) // cluster_size:
            return "compressed cluster crosses a host cluster boundary"
    return None


# ---- refcounts -------------------------------------------------------------------------------
#: Refcount table entry: u64 host offset of a refcount block (0 = all zero), u64 xxh3_64 of it.
RC_TABLE_ENTRY = L1_ENTRY
REFCOUNT_BYTES = 2  # u16 per host cluster
MAX_REFCOUNT = 0xFFFF


def refcounts_per_block(cluster_size: int) -> int:
    return cluster_size // REFCOUNT_BYTES


def refcount_blocks_for(host_clusters: int, cluster_size: int) -> int:
    return max(1, -(-host_clusters // refcounts_per_block(cluster_size)))


def clusters_for(nbytes: int, cluster_size: int) -> int:
    return max(1, -(-nbytes // cluster_size))


def pad8(n: int) -> int:
    """``n`` rounded up to a multiple of 8."""
    return (n + 7) & ~7
