"""On-disk structures of the vimg format: constants, byte layouts, pack/unpack. No behaviour.

This module is the canonical definition of the format's bytes; ``docs/vimg-format.md`` describes
the same structures in prose with their invariants. Everything is little-endian. Parsers raise
:class:`vfs.errors.FormatError` (never struct.error, IndexError or UnicodeError) and bound every
length they read by the size of the buffer they were given, so a hostile file cannot make them
allocate or loop beyond it.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from typing import NamedTuple

import xxhash

from vfs.errors import FormatError, UnsupportedFeature

MAGIC = b"VIMG\r\n\x1a\n"
VERSION = 1

#: Two header slots (shadow paging): the valid one with the higher sequence number is current.
HEADER_SLOT_OFFSETS = (0, 4096)
HEADER_SLOT_SIZE = 4096
#: Bytes reserved at the start of the file for the two header slots.
HEADER_AREA = 8192

MIN_CLUSTER_BITS = 12  # 4 KiB
MAX_CLUSTER_BITS = 21  # 2 MiB
DEFAULT_CLUSTER_BITS = 16  # 64 KiB
#: Virtual sizes are multiples of this (as in qemu-img).
SECTOR = 512
#: Format limit on the virtual size (implementation limits may be lower).
MAX_VIRTUAL_SIZE = 1 << 56

# ---- feature bits ---------------------------------------------------------------------------
#: Incompatible: an L2 entry may be of type REMOTE (readers need a resolver to read them).
INCOMPAT_REMOTE = 1 << 0
#: Incompatible: an L2 entry may be of type COMPRESSED (zstd).
INCOMPAT_COMPRESSED = 1 << 1
KNOWN_INCOMPAT = INCOMPAT_REMOTE | INCOMPAT_COMPRESSED
KNOWN_COMPAT = 0
KNOWN_AUTOCLEAR = 0
INCOMPAT_NAMES = {0: "remote clusters", 1: "zstd-compressed clusters"}

# ---- backing formats / compression ----------------------------------------------------------
BACKING_NONE, BACKING_RAW, BACKING_VIMG = 0, 1, 2
BACKING_FORMATS = {BACKING_NONE: "", BACKING_RAW: "raw", BACKING_VIMG: "vimg"}
BACKING_FORMAT_CODES = {v: k for k, v in BACKING_FORMATS.items() if v}
COMPRESSION_NONE, COMPRESSION_ZSTD = 0, 1
MAX_BACKING_NAME = 1024

# ---- header ----------------------------------------------------------------------------------
#: Fixed part of the header (bytes 0..143); the backing name follows, then the 8-byte checksum.
_HEADER = struct.Struct("<8sIIQQQQQIIQQIIQQIIQQIHBBQ")
HEADER_FIXED_SIZE = _HEADER.size  # 144
assert HEADER_FIXED_SIZE == 144


@dataclass
class Header:
    """The header of one slot. ``sequence`` orders the two slots; the higher valid one wins."""

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

    @property
    def cluster_size(self) -> int:
        return 1 << self.cluster_bits


def header_length(backing_name: str) -> int:
    name = backing_name.encode()
    return HEADER_FIXED_SIZE + _pad8(len(name)) + 8


def pack_header(h: Header) -> bytes:
    name = h.backing_name.encode()
    if len(name) > MAX_BACKING_NAME:
        raise FormatError(f"backing file name longer than {MAX_BACKING_NAME} bytes")
    length = header_length(h.backing_name)
    fixed = _HEADER.pack(
        MAGIC,
        h.version,
        length,
        h.incompatible,
        h.compatible,
        h.autoclear,
        h.sequence,
        h.virtual_size,
        h.cluster_bits,
        0,
        h.l1_offset,
        h.l1_checksum,
        h.l1_entries,
        h.nb_snapshots,
        h.refcount_table_offset,
        h.refcount_table_checksum,
        h.refcount_table_entries,
        0,
        h.snapshots_offset,
        h.snapshots_checksum,
        h.snapshots_size,
        len(name),
        h.backing_format,
        h.compression,
        h.host_clusters,
    )
    body = fixed + name + b"\0" * (_pad8(len(name)) - len(name))
    return body + struct.pack("<Q", xxhash.xxh3_64_intdigest(body))


def slot_sequence(buf: bytes) -> int | None:
    """The sequence number of a slot whose magic, length and checksum are intact, else None.

    Deliberately blind to version and features: the choice of the current slot must not depend
    on what this reader understands (else a newer writer's commit would be silently skipped)."""
    if len(buf) < HEADER_FIXED_SIZE + 8 or bytes(buf[:8]) != MAGIC:
        return None
    (length,) = struct.unpack_from("<I", buf, 12)
    if length < HEADER_FIXED_SIZE + 8 or length > min(HEADER_SLOT_SIZE, len(buf)) or length % 8:
        return None
    (stored_sum,) = struct.unpack_from("<Q", buf, length - 8)
    if xxhash.xxh3_64_intdigest(bytes(buf[: length - 8])) != stored_sum:
        return None
    return struct.unpack_from("<Q", buf, 40)[0]


def unpack_header(buf: bytes) -> Header:
    """Parse and validate one header slot. Raises FormatError / UnsupportedFeature."""
    if len(buf) < HEADER_FIXED_SIZE + 8:
        raise FormatError("file too short for a vimg header")
    f = _HEADER.unpack_from(buf, 0)
    if f[0] != MAGIC:
        raise FormatError("not a vimg image (bad magic)")
    version, length = f[1], f[2]
    if length < HEADER_FIXED_SIZE + 8 or length > min(HEADER_SLOT_SIZE, len(buf)) or length % 8:
        raise FormatError(f"bad header length {length}")
    (stored_sum,) = struct.unpack_from("<Q", buf, length - 8)
    if xxhash.xxh3_64_intdigest(bytes(buf[: length - 8])) != stored_sum:
        raise FormatError("header checksum mismatch")
    if version != VERSION:
        raise UnsupportedFeature(f"vimg version {version} is not supported (this reader: 1)")
    incompat = f[3]
    unknown = incompat & ~KNOWN_INCOMPAT
    if unknown:
        bits = ", ".join(str(b) for b in range(64) if unknown >> b & 1)
        raise UnsupportedFeature(
            f"image uses incompatible feature bit(s) {bits} unknown to this reader; "
            "upgrade vfs to open it"
        )
    name_len = f[21]
    if HEADER_FIXED_SIZE + _pad8(name_len) + 8 != length:
        raise FormatError("header length does not match backing name length")
    try:
        name = bytes(buf[HEADER_FIXED_SIZE : HEADER_FIXED_SIZE + name_len]).decode()
    except UnicodeDecodeError:
        raise FormatError("backing file name is not UTF-8") from None
    h = Header(
        version=version,
        incompatible=incompat,
        compatible=f[4],
        autoclear=f[5],
        sequence=f[6],
        virtual_size=f[7],
        cluster_bits=f[8],
        l1_offset=f[10],
        l1_checksum=f[11],
        l1_entries=f[12],
        nb_snapshots=f[13],
        refcount_table_offset=f[14],
        refcount_table_checksum=f[15],
        refcount_table_entries=f[16],
        snapshots_offset=f[18],
        snapshots_checksum=f[19],
        snapshots_size=f[20],
        backing_format=f[22],
        compression=f[23],
        host_clusters=f[24],
        backing_name=name,
    )
    validate_header(h)
    return h


def validate_header(h: Header) -> None:
    """Invariants every header must satisfy (bounds that keep later allocations sane)."""
    if not MIN_CLUSTER_BITS <= h.cluster_bits <= MAX_CLUSTER_BITS:
        raise FormatError(f"cluster bits {h.cluster_bits} out of range 12..21")
    cs = h.cluster_size
    if h.virtual_size % SECTOR or h.virtual_size > MAX_VIRTUAL_SIZE:
        raise FormatError(f"bad virtual size {h.virtual_size}")
    if h.l1_entries != l1_entries_for(h.virtual_size, cs):
        raise FormatError("L1 size does not match the virtual size")
    if h.host_clusters > MAX_VIRTUAL_SIZE // cs * 2:
        raise FormatError("host cluster count out of range")
    for name, off in (
        ("L1", h.l1_offset),
        ("refcount table", h.refcount_table_offset),
        ("snapshot table", h.snapshots_offset),
    ):
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


# ---- snapshots -------------------------------------------------------------------------------
_SNAP = struct.Struct("<QQIIQQIIQQHHI")
SNAPSHOT_FIXED = _SNAP.size  # 72
assert SNAPSHOT_FIXED == 72
MAX_SNAPSHOT_NAME = 256


@dataclass
class Snapshot:
    """One internal snapshot: a frozen L1 table (shared clusters, counted per root)."""

    id: str
    name: str
    l1_offset: int
    l1_checksum: int
    l1_entries: int
    virtual_size: int
    date_sec: int = 0
    date_nsec: int = 0
    vm_clock_nsec: int = 0
    extra: dict = field(default_factory=dict)


def pack_snapshots(snaps: list[Snapshot]) -> bytes:
    out = bytearray()
    for s in snaps:
        sid, name = s.id.encode(), s.name.encode()
        if len(name) > MAX_SNAPSHOT_NAME or len(sid) > MAX_SNAPSHOT_NAME:
            raise FormatError("snapshot name too long")
        out += _SNAP.pack(
            s.l1_offset,
            s.l1_checksum,
            s.l1_entries,
            0,
            s.virtual_size,
            s.date_sec,
            s.date_nsec,
            0,
            s.vm_clock_nsec,
            0,
            len(sid),
            len(name),
            0,
        )
        tail = sid + name
        out += tail + b"\0" * (_pad8(len(tail)) - len(tail))
    return bytes(out)


def unpack_snapshots(buf: bytes, count: int, cluster_size: int) -> list[Snapshot]:
    snaps: list[Snapshot] = []
    pos = 0
    for i in range(count):
        if pos + SNAPSHOT_FIXED > len(buf):
            raise FormatError(f"snapshot table truncated at entry {i}")
        f = _SNAP.unpack_from(buf, pos)
        id_len, name_len = f[10], f[11]
        if id_len > MAX_SNAPSHOT_NAME or name_len > MAX_SNAPSHOT_NAME:
            raise FormatError(f"snapshot {i}: name too long")
        start = pos + SNAPSHOT_FIXED
        end = start + id_len + name_len
        if end > len(buf):
            raise FormatError(f"snapshot table truncated at entry {i}")
        try:
            sid = bytes(buf[start : start + id_len]).decode()
            name = bytes(buf[start + id_len : end]).decode()
        except UnicodeDecodeError:
            raise FormatError(f"snapshot {i}: name is not UTF-8") from None
        s = Snapshot(
            id=sid,
            name=name,
            l1_offset=f[0],
            l1_checksum=f[1],
            l1_entries=f[2],
            virtual_size=f[4],
            date_sec=f[5],
            date_nsec=f[6],
            vm_clock_nsec=f[8],
        )
        if s.l1_offset % cluster_size or s.l1_offset < HEADER_AREA:
            raise FormatError(f"snapshot {i}: bad L1 offset")
        if s.virtual_size % SECTOR or s.virtual_size > MAX_VIRTUAL_SIZE:
            raise FormatError(f"snapshot {i}: bad virtual size")
        if s.l1_entries != l1_entries_for(s.virtual_size, cluster_size):
            raise FormatError(f"snapshot {i}: L1 size does not match its virtual size")
        snaps.append(s)
        pos = start + _pad8(id_len + name_len)
    return snaps


def _pad8(n: int) -> int:
    return (n + 7) & ~7
