"""The snapshot table (spec section 6) and the bitmap directory (spec section 7): the bytes of
the two variable-length directories of a vimg image, with pack/unpack. No behaviour.

Like :mod:`vfs.image.layout`, parsers raise :class:`vfs.errors.FormatError` only and bound
every length they read by the buffer they were given.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from vfs.errors import FormatError
from vfs.image.layout import HEADER_AREA, MAX_VIRTUAL_SIZE, SECTOR, l1_entries_for, pad8

# ---- snapshots (spec section 6) -------------------------------------------------------------
_SNAP = struct.Struct("<QQIIQQIIQHHI")
SNAPSHOT_FIXED = _SNAP.size  # 64
assert SNAPSHOT_FIXED == 64
MAX_SNAPSHOT_NAME = 256
MAX_EXTRA_DATA = 4096
#: Snapshot extra data of version 1 (spec 6.1): VM state size, table offset, entries, checksum.
_SNAP_EXTRA = struct.Struct("<QQI4xQ")
SNAPSHOT_EXTRA_V1 = _SNAP_EXTRA.size  # 32


@dataclass
class Snapshot:
    """One internal snapshot: a frozen L1 table (shared clusters, counted per root), and
    optionally the VM state saved with it."""

    id: str
    name: str
    l1_offset: int
    l1_checksum: int
    l1_entries: int
    virtual_size: int
    date_sec: int = 0
    date_nsec: int = 0
    vm_clock_nsec: int = 0
    vm_state_size: int = 0
    vm_state_table_offset: int = 0
    vm_state_table_entries: int = 0
    vm_state_table_checksum: int = 0
    #: Extra data past the fields this reader knows (kept as is).
    extra_unknown: bytes = b""


def pack_snapshots(snaps: list[Snapshot]) -> bytes:
    out = bytearray()
    for s in snaps:
        sid, name = s.id.encode(), s.name.encode()
        if len(name) > MAX_SNAPSHOT_NAME or len(sid) > MAX_SNAPSHOT_NAME:
            raise FormatError("snapshot name too long")
        extra = (
            _SNAP_EXTRA.pack(
                s.vm_state_size,
                s.vm_state_table_offset,
                s.vm_state_table_entries,
                s.vm_state_table_checksum,
            )
            + s.extra_unknown
        )
        out += _SNAP.pack(
            s.l1_offset,
            s.l1_checksum,
            s.l1_entries,
            len(extra),
            s.virtual_size,
            s.date_sec,
            s.date_nsec,
            0,
            s.vm_clock_nsec,
            len(sid),
            len(name),
            0,
        )
        tail = extra + sid + name
        out += tail + b"\0" * (pad8(len(tail)) - len(tail))
    return bytes(out)


def unpack_snapshots(buf: bytes, count: int, cluster_size: int) -> list[Snapshot]:
    snaps: list[Snapshot] = []
    pos = 0
    for i in range(count):
        if pos + SNAPSHOT_FIXED > len(buf):
            raise FormatError(f"snapshot table truncated at entry {i}")
        f = _SNAP.unpack_from(buf, pos)
        extra_len, id_len, name_len = f[3], f[9], f[10]
        if id_len > MAX_SNAPSHOT_NAME or name_len > MAX_SNAPSHOT_NAME:
            raise FormatError(f"snapshot {i}: name too long")
        if extra_len > MAX_EXTRA_DATA or extra_len % 8:
            raise FormatError(f"snapshot {i}: bad extra data size {extra_len}")
        start = pos + SNAPSHOT_FIXED
        names = start + extra_len
        end = names + id_len + name_len
        if end > len(buf):
            raise FormatError(f"snapshot table truncated at entry {i}")
        extra = bytes(buf[start:names]).ljust(SNAPSHOT_EXTRA_V1, b"\0")
        try:
            sid = bytes(buf[names : names + id_len]).decode()
            name = bytes(buf[names + id_len : end]).decode()
        except UnicodeDecodeError:
            raise FormatError(f"snapshot {i}: name is not UTF-8") from None
        vm_size, vm_off, vm_entries, vm_sum = _SNAP_EXTRA.unpack_from(extra, 0)
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
            vm_state_size=vm_size,
            vm_state_table_offset=vm_off,
            vm_state_table_entries=vm_entries,
            vm_state_table_checksum=vm_sum,
            extra_unknown=extra[SNAPSHOT_EXTRA_V1:] if extra_len > SNAPSHOT_EXTRA_V1 else b"",
        )
        if s.l1_offset % cluster_size or s.l1_offset < HEADER_AREA:
            raise FormatError(f"snapshot {i}: bad L1 offset")
        if s.virtual_size % SECTOR or s.virtual_size > MAX_VIRTUAL_SIZE:
            raise FormatError(f"snapshot {i}: bad virtual size")
        if s.l1_entries != l1_entries_for(s.virtual_size, cluster_size):
            raise FormatError(f"snapshot {i}: L1 size does not match its virtual size")
        if s.vm_state_table_entries != -(-s.vm_state_size // cluster_size) or (
            (s.vm_state_table_offset == 0) != (s.vm_state_size == 0)
        ):
            raise FormatError(f"snapshot {i}: VM state fields inconsistent")
        if s.vm_state_table_offset and (
            s.vm_state_table_offset % cluster_size or s.vm_state_table_offset < HEADER_AREA
        ):
            raise FormatError(f"snapshot {i}: bad VM state table offset")
        snaps.append(s)
        pos = start + pad8(extra_len + id_len + name_len)
    return snaps


# ---- dirty bitmaps (spec section 7) ----------------------------------------------------------
_BITMAP_FIXED = struct.Struct("<QQIIBBHI")
BITMAP_FIXED = _BITMAP_FIXED.size  # 32
assert BITMAP_FIXED == 32
BITMAP_IN_USE = 1 << 0
BITMAP_ENABLED = 1 << 1
KNOWN_BITMAP_FLAGS = BITMAP_IN_USE | BITMAP_ENABLED
BITMAP_DIRTY_TRACKING = 1
MIN_GRANULARITY_BITS, MAX_GRANULARITY_BITS = 9, 31
MAX_BITMAP_NAME = 1023


@dataclass
class BitmapEntry:
    """One bitmap directory entry (the bits live in its cluster table)."""

    name: str
    granularity_bits: int
    flags: int = BITMAP_ENABLED
    table_offset: int = 0
    table_checksum: int = 0
    table_entries: int = 0
    type: int = BITMAP_DIRTY_TRACKING
    extra: bytes = b""

    @property
    def usable(self) -> bool:
        """Its bits may be used as they are (a dirty-tracking bitmap, not in use, no unknown
        flags); otherwise a reader treats every bit as set."""
        return (
            self.type == BITMAP_DIRTY_TRACKING
            and not self.flags & BITMAP_IN_USE
            and not self.flags & ~KNOWN_BITMAP_FLAGS
        )


def bitmap_bits(virtual_size: int, granularity_bits: int) -> int:
    return -(-virtual_size >> granularity_bits)


def bitmap_table_entries(virtual_size: int, granularity_bits: int, cluster_size: int) -> int:
    nbytes = -(-bitmap_bits(virtual_size, granularity_bits) // 8)
    return -(-nbytes // cluster_size)


def pack_bitmap_directory(entries: list[BitmapEntry]) -> bytes:
    out = bytearray()
    for b in entries:
        name = b.name.encode()
        if not 0 < len(name) <= MAX_BITMAP_NAME:
            raise FormatError("bitmap name must be 1..1023 bytes")
        out += _BITMAP_FIXED.pack(
            b.table_offset,
            b.table_checksum,
            b.table_entries,
            b.flags,
            b.type,
            b.granularity_bits,
            len(name),
            len(b.extra),
        )
        tail = b.extra + name
        out += tail + bytes(pad8(len(tail)) - len(tail))
    return bytes(out)


def unpack_bitmap_directory(
    buf: bytes, count: int, cluster_size: int, virtual_size: int
) -> list[BitmapEntry]:
    out: list[BitmapEntry] = []
    names: set[str] = set()
    pos = 0
    for i in range(count):
        if pos + BITMAP_FIXED > len(buf):
            raise FormatError(f"bitmap directory truncated at entry {i}")
        off, csum, entries, flags, btype, gbits, nlen, xlen = _BITMAP_FIXED.unpack_from(buf, pos)
        start = pos + BITMAP_FIXED
        end = start + xlen + nlen
        if not 0 < nlen <= MAX_BITMAP_NAME or xlen > MAX_EXTRA_DATA or end > len(buf):
            raise FormatError(f"bitmap {i}: bad name or extra data length")
        try:
            name = bytes(buf[start + xlen : end]).decode()
        except UnicodeDecodeError:
            raise FormatError(f"bitmap {i}: name is not UTF-8") from None
        if name in names:
            raise FormatError(f"bitmap name {name!r} appears twice")
        names.add(name)
        if not MIN_GRANULARITY_BITS <= gbits <= MAX_GRANULARITY_BITS:
            raise FormatError(f"bitmap {name!r}: granularity bits {gbits} out of range 9..31")
        if entries != bitmap_table_entries(virtual_size, gbits, cluster_size):
            raise FormatError(f"bitmap {name!r}: table size does not match the virtual size")
        if off and (off % cluster_size or off < HEADER_AREA):
            raise FormatError(f"bitmap {name!r}: bad table offset")
        out.append(
            BitmapEntry(
                name=name,
                granularity_bits=gbits,
                flags=flags,
                table_offset=off,
                table_checksum=csum,
                table_entries=entries,
                type=btype,
                extra=bytes(buf[start : start + xlen]),
            )
        )
        pos = start + pad8(xlen + nlen)
    return out
