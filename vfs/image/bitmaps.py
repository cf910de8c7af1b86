"""Persistent dirty bitmaps (spec section 7): which guest ranges changed since a point in time.

For the exports' dirty tracking (NBD ``qemu:dirty-bitmap:NAME``) and incremental migration. A
bitmap's bits live in memory while the image is open; every write path marks them
(:meth:`Bitmaps.mark`, registered with the writer only while some bitmap is enabled, so writes
without bitmaps pay nothing).

Crash story (spec 7.3 and 13.6): a writer's session marks every enabled bitmap *in use* on disk
in a commit made when the image is opened read-write, before any write is accepted; flushes do
not write bits; ``close`` writes the bits back and clears in_use in its last commit. After a
crash (or kill -9) every enabled bitmap is therefore in use — *stale* — and reads as all dirty
until it is cleared. Stale even though the image rolls back to its last commit with the bits:
a reader of the export may have copied data written after that commit, which the crash undid.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

import xxhash

from vfs.errors import AlreadyExists, CorruptionError, NotFound, UsageError, VfsError
from vfs.image import directories as D
from vfs.image import layout as L
from vfs.image.core import Core

if TYPE_CHECKING:
    from vfs.image.commit import Committer
    from vfs.image.writer import Writer

log = logging.getLogger(__name__)
_xxh = xxhash.xxh3_64_intdigest
_NONZERO = re.compile(rb"[^\x00]+")
_ALL_ONES = re.compile(rb"\xff+")


@dataclass(frozen=True)
class BitmapInfo:
    """A bitmap as :meth:`vfs.image.image.Image.bitmap_list` describes it."""

    name: str
    granularity: int
    enabled: bool
    #: The bits may not describe every change (a crash during a session, a repair, a writer
    #: that did not know bitmaps): the bitmap reads as all dirty until cleared.
    stale: bool
    #: Bytes of guest ranges marked dirty (the whole disk when stale).
    dirty_bytes: int


class _Bitmap:
    def __init__(self, entry: D.BitmapEntry, nbytes: int) -> None:
        self.entry = entry
        #: The bits (loaded on first use); bit k is bit k % 8 of byte k // 8.
        self.bits: bytearray | None = None
        self.nbytes = nbytes
        #: The cluster table, as loaded (or as it will be written).
        self.table: list[tuple[int, int]] = []
        #: False when the on-disk table or its clusters were unreadable: kept as it is.
        self.table_ok = True
        #: Table entries (clusters of bits) changed since they were last written.
        self.dirty_chunks: set[int] = set()
        #: Placed by the commit in progress: its bits and table are written.
        self.placed = False
        self.stale = not entry.usable

    @property
    def name(self) -> str:
        return self.entry.name

    @property
    def gbits(self) -> int:
        return self.entry.granularity_bits

    @property
    def enabled(self) -> bool:
        return bool(self.entry.flags & D.BITMAP_ENABLED)

    @property
    def known(self) -> bool:
        """Of a type and with flags this reader understands (else kept, never changed)."""
        e = self.entry
        return e.type == D.BITMAP_DIRTY_TRACKING and not e.flags & ~D.KNOWN_BITMAP_FLAGS

    @property
    def tracking(self) -> bool:
        """Writes are recorded in it."""
        return self.enabled and self.known and not self.stale and self.bits is not None


class Bitmaps:
    """The bitmaps of one open image, and a metadata part of the commit (MetadataPart)."""

    def __init__(self, core: Core, committer: Committer, writer: Writer) -> None:
        self.c = core
        self.commit = committer
        self.writer = writer
        self._items: list[_Bitmap] | None = None
        ext = core.header.bitmaps
        #: The on-disk directory (offset, size, checksum); offset 0 when there is none.
        self.dir = (
            (ext.directory_offset, ext.directory_size, ext.directory_checksum) if ext else (0, 0, 0)
        )
        self._dir_dirty = False
        self._placed = False
        #: A read-write session is running: its enabled bitmaps are in use on disk.
        self.session = False
        #: Why the directory could not be read: its extension is then kept untouched and the
        #: autoclear bit cleared (the bitmaps are no longer kept up to date).
        self.broken: str | None = None

    # ------------------------------------------------------------------ loading
    @property
    def items(self) -> list[_Bitmap]:
        """The bitmaps (the directory is read and verified on first use)."""
        if self._items is None:
            self._items = self._load()
        return self._items

    def _load(self) -> list[_Bitmap]:
        c = self.c
        ext = c.header.bitmaps
        if ext is None:
            return []
        raw = c.read_meta(
            ext.directory_offset, ext.directory_size, ext.directory_checksum, "bitmap directory"
        )
        entries = D.unpack_bitmap_directory(raw, ext.nb_bitmaps, c.cluster_size, c.size)
        consistent = bool(c.header.autoclear & L.AUTOCLEAR_BITMAPS)
        out = []
        for e in entries:
            bm = _Bitmap(e, self._nbytes(c.size, e.granularity_bits))
            bm.stale = bm.stale or not consistent
            out.append(bm)
        return out

    @staticmethod
    def _nbytes(size: int, gbits: int) -> int:
        return -(-D.bitmap_bits(size, gbits) // 8)

    def _bits(self, bm: _Bitmap) -> bytearray:
        """The bits of ``bm``, read and verified on first use (damage makes it stale)."""
        if bm.bits is not None:
            return bm.bits
        c = self.c
        cs = c.cluster_size
        e = bm.entry
        bits = bytearray(bm.nbytes)
        bm.table = [(0, 0)] * e.table_entries
        if e.table_offset:
            try:
                raw = c.read_meta(
                    e.table_offset,
                    e.table_entries * L.L1_ENTRY_SIZE,
                    e.table_checksum,
                    f"table of bitmap {e.name!r}",
                )
                bm.table = L.unpack_table(raw, e.table_entries, cs, c.host_end())
                for i, (off, s) in enumerate(bm.table):
                    if off:
                        chunk = c.read_meta(off, cs, s, f"bits of bitmap {e.name!r}")
                        n = min(cs, bm.nbytes - i * cs)
                        bits[i * cs : i * cs + n] = chunk[:n]
            except VfsError as err:
                log.warning(
                    "%s: bitmap %r is damaged (%s): it reads as all dirty", c.path, e.name, err
                )
                bm.stale, bm.table_ok = True, False
        bm.bits = bits
        return bits

    def find(self, name: str) -> _Bitmap:
        for bm in self.items:
            if bm.name == name:
                return bm
        raise NotFound(f"no bitmap named {name!r}")

    # ------------------------------------------------------------------ the session
    def start_session(self) -> None:
        """A writer opened the image: load the bits of enabled bitmaps (for marking) and mark
        them in use on disk before any write is accepted (the caller commits)."""
        try:
            items = self.items
        except VfsError as err:
            self.broken = str(err)
            log.warning(
                "%s: bitmap directory unreadable (%s): bitmaps are no longer kept up to date "
                "('vimg check -r all' drops them)",
                self.c.path,
                err,
            )
            self.c.header_dirty = True
            return
        self.session = True
        for bm in items:
            if bm.enabled and bm.known:
                self._bits(bm)
                if not bm.stale:
                    self._dir_dirty = True  # in_use goes to disk with the first commit
        self._update_markers()

    def end_session(self) -> None:
        """The writer closes: the next commit writes the bits back and clears in_use."""
        if not self.session:
            return
        self.session = False
        if any(bm.enabled and bm.known for bm in self._items or ()):
            self._dir_dirty = True

    def _update_markers(self) -> None:
        w = self.writer
        active = any(bm.tracking for bm in self._items or ())
        if active and self.mark not in w.markers:
            w.markers.append(self.mark)
        elif not active and self.mark in w.markers:
            w.markers.remove(self.mark)

    # ------------------------------------------------------------------ marking
    def mark(self, offset: int, length: int) -> None:
        """Record a change of the guest range in every tracking bitmap (the write paths)."""
        if length <= 0:
            return
        cs = self.c.cluster_size
        for bm in self._items or ():
            if not bm.tracking:
                continue
            g = bm.gbits
            first, last = offset >> g, (offset + length - 1) >> g
            _set_bits(bm.bits, first, last)  # type: ignore[arg-type]
            a, b = (first >> 3) // cs, (last >> 3) // cs
            if a == b:
                bm.dirty_chunks.add(a)
            else:
                bm.dirty_chunks.update(range(a, b + 1))

    # ------------------------------------------------------------------ operations
    def add(self, name: str, granularity: int | None, enabled: bool) -> BitmapInfo:
        c = self.c
        c.writable()
        self._usable_directory()
        if not name or len(name.encode()) > D.MAX_BITMAP_NAME:
            raise UsageError("bitmap name must be 1..1023 bytes")
        if any(bm.name == name for bm in self.items):
            raise AlreadyExists(f"bitmap {name!r} already exists")
        g = granularity or c.cluster_size
        gbits = g.bit_length() - 1
        if g != 1 << gbits or not D.MIN_GRANULARITY_BITS <= gbits <= D.MAX_GRANULARITY_BITS:
            raise UsageError(f"bitmap granularity {g} must be a power of two, 512 .. 2 GiB")
        e = D.BitmapEntry(
            name=name,
            granularity_bits=gbits,
            flags=D.BITMAP_ENABLED if enabled else 0,
            table_entries=D.bitmap_table_entries(c.size, gbits, c.cluster_size),
        )
        bm = _Bitmap(e, self._nbytes(c.size, gbits))
        bm.bits = bytearray(bm.nbytes)
        bm.table = [(0, 0)] * e.table_entries
        self.items.append(bm)
        self._dir_dirty = True
        self._update_markers()
        return self.info(bm)

    def remove(self, name: str) -> None:
        self.c.writable()
        self._usable_directory()
        bm = self.find(name)
        self._free(bm)
        self.items.remove(bm)
        self._dir_dirty = True
        self._update_markers()

    def clear(self, name: str) -> None:
        """All bits zero: a new point in time (a stale bitmap is consistent again)."""
        self.c.writable()
        self._usable_directory()
        bm = self.find(name)
        self._known(bm)
        self._bits(bm)
        if not bm.table_ok:  # its on-disk table was unreadable: free it, start a new one
            self._free(bm)
            bm.table_ok = True
        if len(bm.table) != bm.entry.table_entries:
            bm.table = [(0, 0)] * bm.entry.table_entries
        bm.bits = bytearray(bm.nbytes)
        bm.dirty_chunks.update(i for i, (off, _s) in enumerate(bm.table) if off)
        bm.stale = False
        self._dir_dirty = True
        self._update_markers()

    def set_enabled(self, name: str, enabled: bool) -> None:
        self.c.writable()
        self._usable_directory()
        bm = self.find(name)
        self._known(bm)
        self._bits(bm)
        if enabled:
            bm.entry.flags |= D.BITMAP_ENABLED
        else:
            bm.entry.flags &= ~D.BITMAP_ENABLED
        self._dir_dirty = True
        self._update_markers()

    def info(self, bm: _Bitmap) -> BitmapInfo:
        if bm.stale or not bm.known:
            dirty = self.c.size
        else:
            dirty = sum(n for _o, n in self.dirty_ranges(bm.name))
        return BitmapInfo(bm.name, 1 << bm.gbits, bm.enabled, bm.stale, dirty)

    def dirty_ranges(
        self, name: str, offset: int = 0, length: int | None = None
    ) -> list[tuple[int, int]]:
        """Dirty guest ranges (offset, length) inside [offset, offset+length), merged; a stale
        bitmap is dirty everywhere (spec 7.3)."""
        c = self.c
        n = c.size - offset if length is None else length
        c.check_range(offset, n)
        bm = self.find(name)
        if n == 0:
            return []
        bits = self._bits(bm)
        if bm.stale or not bm.known:
            return [(offset, n)]
        g = bm.gbits
        out: list[tuple[int, int]] = []
        end = offset + n
        for a, b in _bit_runs(bits, offset >> g, ((end - 1) >> g) + 1):
            lo, hi = max(a << g, offset), min(b << g, end)
            if lo < hi:
                out.append((lo, hi - lo))
        return out

    def take(self, name: str) -> list[tuple[int, int]]:
        """The dirty ranges, and the bitmap cleared, in one step (no write can fall between:
        the image is used from one thread at a time)."""
        ranges = self.dirty_ranges(name)
        self.clear(name)
        return ranges

    def resize(self, new_size: int) -> None:
        """The virtual size changed: every bitmap follows (the caller marks a grown range)."""
        if self.broken:
            return
        c = self.c
        cs = c.cluster_size
        for bm in self.items:
            if not bm.known:
                continue  # kept as is; its size no longer matches: it is dropped by check -r
            bits = self._bits(bm)
            nbits = D.bitmap_bits(new_size, bm.gbits)
            nbytes = -(-nbits // 8)
            if nbytes < len(bits):
                del bits[nbytes:]
            else:
                bits.extend(bytes(nbytes - len(bits)))
            if nbits & 7 and bits:  # bits past the end are zero
                bits[-1] &= (1 << (nbits & 7)) - 1
            bm.nbytes = nbytes
            entries = D.bitmap_table_entries(new_size, bm.gbits, cs)
            if not bm.table_ok:
                self._free(bm)
                bm.table_ok = True
                bm.table = [(0, 0)] * entries
            for off, _s in bm.table[entries:]:
                if off:
                    c.alloc.decref(off >> c.cluster_bits)
            del bm.table[entries:]
            bm.table.extend([(0, 0)] * (entries - len(bm.table)))
            if bm.entry.table_offset:  # the table changes size: it is written anew
                self.commit.relocate_run(
                    bm.entry.table_offset, bm.entry.table_entries * L.L1_ENTRY_SIZE, 0
                )
                bm.entry.table_offset = 0
            bm.entry.table_entries = entries
            bm.dirty_chunks = {i for i in bm.dirty_chunks if i < entries}
            bm.dirty_chunks.update(i for i, (off, _s) in enumerate(bm.table) if off)
            if bits:
                bm.dirty_chunks.add((len(bits) - 1) // cs)
        self._dir_dirty = True

    def mark_stale(self) -> None:
        """Every bitmap may now miss changes (a repair): it reads as all dirty until cleared."""
        for bm in self.items:
            bm.stale = True
        self._dir_dirty = True
        self._update_markers()

    def _known(self, bm: _Bitmap) -> None:
        if not bm.known:
            raise UsageError(f"bitmap {bm.name!r} is of a kind this vfs does not know: remove it")

    def _usable_directory(self) -> None:
        if self.broken:
            raise CorruptionError(
                f"{self.c.path}: bitmap directory unreadable ({self.broken}); "
                "run 'vimg check -r all'"
            )

    def _free(self, bm: _Bitmap) -> None:
        """Release a bitmap's table and clusters (they stay until the next commit)."""
        c = self.c
        e = bm.entry
        if e.table_offset:
            self.commit.relocate_run(e.table_offset, e.table_entries * L.L1_ENTRY_SIZE, 0)
            e.table_offset = 0
            e.table_checksum = 0
        if bm.table_ok:
            for off, _s in bm.table:
                if off:
                    c.alloc.decref(off >> c.cluster_bits)
        # an unreadable table's data clusters cannot be named: check finds them as leaks
        bm.table = [(0, 0)] * e.table_entries

    # ------------------------------------------------------------------ commit part
    def _due(self, bm: _Bitmap) -> bool:
        """A commit writes a bitmap's bits only when they go to disk as consistent (not in
        use): during a session an enabled bitmap waits for the close."""
        return (
            bm.known
            and bm.table_ok
            and not bm.stale
            and not (self.session and bm.enabled)
            and bm.bits is not None
            and bool(bm.dirty_chunks)
        )

    def dirty(self) -> bool:
        return self._dir_dirty or any(self._due(bm) for bm in self._items or ())

    def place(self) -> None:
        if self.broken or self._items is None:
            return
        c, com = self.c, self.commit
        al, bits, cs = c.alloc, c.cluster_bits, c.cluster_size
        changed = self._dir_dirty
        for bm in self._items:
            if not self._due(bm):
                continue
            data = bm.bits
            assert data is not None
            for i in sorted(bm.dirty_chunks):
                off = bm.table[i][0]
                if not any(data[i * cs : (i + 1) * cs]):
                    if off:
                        al.decref(off >> bits)
                    bm.table[i] = (0, 0)
                elif off == 0 or not al.can_overwrite(off >> bits):
                    new = al.alloc() << bits
                    if off:
                        al.decref(off >> bits)
                    bm.table[i] = (new, 0)
            e = bm.entry
            nbytes = len(bm.table) * L.L1_ENTRY_SIZE
            if any(off for off, _s in bm.table):
                if not (e.table_offset and com.run_overwritable(e.table_offset, nbytes)):
                    e.table_offset = com.relocate_run(e.table_offset, nbytes, nbytes)
            elif e.table_offset:
                com.relocate_run(e.table_offset, nbytes, 0)
                e.table_offset = 0
            bm.placed = changed = True
        if not changed:
            return
        for bm in self._items:
            bm.entry.flags = self._disk_flags(bm)
        size = len(D.pack_bitmap_directory([bm.entry for bm in self._items]))
        off, old_size, _sum = self.dir
        new_off = com.relocate_run(off, old_size, size if self._items else 0)
        self.dir = (new_off, size if self._items else 0, 0)
        self._placed = True

    def _disk_flags(self, bm: _Bitmap) -> int:
        f = bm.entry.flags
        if not bm.known:
            return f
        in_use = bm.stale or (self.session and bm.enabled)
        return (f | D.BITMAP_IN_USE) if in_use else (f & ~D.BITMAP_IN_USE)

    def write(self) -> None:
        if not self._placed:
            return
        c, w = self.c, self.commit.w
        cs = c.cluster_size
        for bm in self._items or ():
            if not bm.placed:
                continue
            data = bm.bits
            assert data is not None
            for i in sorted(bm.dirty_chunks):
                off = bm.table[i][0]
                if off:
                    chunk = bytes(data[i * cs : (i + 1) * cs]).ljust(cs, b"\0")
                    w.pwrite(chunk, off)
                    bm.table[i] = (off, _xxh(chunk))
            e = bm.entry
            if e.table_offset:
                raw = L.pack_table(bm.table)
                w.pwrite(raw, e.table_offset)
                e.table_checksum = _xxh(raw)
            else:
                e.table_checksum = 0
        off, size, _sum = self.dir
        if off:
            raw = D.pack_bitmap_directory([bm.entry for bm in self._items or ()])
            w.pwrite(raw, off)
            self.dir = (off, size, _xxh(raw))

    def fill_header(self, h: L.Header) -> None:
        if self.broken:
            h.autoclear &= ~L.AUTOCLEAR_BITMAPS  # no longer kept up to date (spec 7.3)
            return
        if self._items is None:
            return  # never loaded: nothing changed
        off, size, csum = self.dir
        if self._items:
            h.bitmaps = L.BitmapsExt(len(self._items), size, off, csum)
            h.autoclear |= L.AUTOCLEAR_BITMAPS
        else:
            h.bitmaps = None
            h.autoclear &= ~L.AUTOCLEAR_BITMAPS

    def committed(self) -> None:
        if not self._placed:
            return
        self._placed = self._dir_dirty = False
        for bm in self._items or ():
            if bm.placed:
                bm.dirty_chunks.clear()
                bm.placed = False


def _set_bits(bits: bytearray, first: int, last: int) -> None:
    """Set bits first..last (inclusive)."""
    fb, lb = first >> 3, last >> 3
    lo = (0xFF << (first & 7)) & 0xFF
    hi = 0xFF >> (7 - (last & 7))
    if fb == lb:
        bits[fb] |= lo & hi
        return
    bits[fb] |= lo
    if lb > fb + 1:
        bits[fb + 1 : lb] = b"\xff" * (lb - fb - 1)
    bits[lb] |= hi


def _bit_runs(bits: bytearray, start: int, end: int) -> Iterator[tuple[int, int]]:
    """Runs [a, b) of set bits within the bit range [start, end)."""
    run: int | None = None
    for m in _NONZERO.finditer(bits, start >> 3, -(-end >> 3)):
        i, stop = m.span()
        while i < stop:
            byte = bits[i]
            if byte == 0xFF:
                j = _ALL_ONES.match(bits, i, stop).end()  # type: ignore[union-attr]
                if run is None:
                    run = i << 3
                i = j
                continue
            for k in range(8):
                if byte >> k & 1:
                    if run is None:
                        run = (i << 3) + k
                elif run is not None:
                    a, b = max(run, start), min((i << 3) + k, end)
                    if a < b:
                        yield a, b
                    run = None
            i += 1
        if run is not None:
            a, b = max(run, start), min(stop << 3, end)
            if a < b:
                yield a, b
            run = None
