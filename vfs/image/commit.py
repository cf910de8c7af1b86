"""The commit (``flush``): the one point where metadata is written (spec section 9).

1. every changed L2 table, the L1 table, the snapshot table, the bitmaps and the refcount
   blocks go to clusters the committed header does not reference (their own if fresh and
   unshared, else new ones), with checksums flowing upward;
2. ``fsync``;
3. the new header (sequence + 1) into the primary copy of the slot that does not hold the
   committed one, ``fsync`` (the commit point);
4. the same bytes into that slot's mirror copy (durable by the next commit's first fsync, or
   at close);
5. only now may clusters freed by this commit be reused (and punched out of the file).
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Protocol

import xxhash

from vfs.image import layout as L
from vfs.image.core import Core
from vfs.image.writer import Writer

log = logging.getLogger(__name__)
_xxh = xxhash.xxh3_64_intdigest


class MetadataPart(Protocol):
    """A collaborator with metadata of its own (snapshot table, bitmaps), committed with the
    rest: ``place`` allocates its clusters (before the refcounts are placed), ``write`` writes
    them (before the fsync), ``fill_header`` puts its fields into the new header, and
    ``committed`` runs once that header is durable."""

    def dirty(self) -> bool: ...

    def place(self) -> None: ...

    def write(self) -> None: ...

    def fill_header(self, h: L.Header) -> None: ...

    def committed(self) -> None: ...


class Committer:
    def __init__(self, core: Core, writer: Writer) -> None:
        self.c = core
        self.w = writer
        #: Collaborators with their own metadata, in the order they are placed and written.
        self.parts: list[MetadataPart] = []
        #: The last commit's mirror copy is written but not yet known durable.
        self.mirror_pending = False

    @property
    def dirty(self) -> bool:
        c = self.c
        return bool(
            c.dirty_l2
            or c.unsummed
            or c.l1_dirty
            or c.header_dirty
            or c.alloc.dirty_blocks
            or any(p.dirty() for p in self.parts)
        )

    def flush(self) -> None:
        """Commit: new metadata to fresh clusters, fsync, then the header into the slot that
        does not hold the committed one, fsync. Nothing before the header write touches
        anything the committed header references. Raises WriteFailed once any write or fsync
        of this open image has failed."""
        c = self.c
        if c.failed is not None:
            # errseq: a failed write makes every later flush fail until the image is reopened
            # (the bytes it was to commit may not be on disk, and a retry could overwrite the
            # committed header slot).
            raise c.write_failed()
        if c.readonly or c.closed:
            return
        if c.header.autoclear & ~L.KNOWN_AUTOCLEAR:
            c.header.autoclear &= L.KNOWN_AUTOCLEAR
            c.header_dirty = True
        if not self.dirty:
            return
        if c.header.sequence + 1 >= L.MAX_SEQUENCE:
            from vfs.errors import FormatError

            raise FormatError(f"{c.path}: commit sequence exhausted (the header is hostile)")
        c.settle_all()
        self.mirror_pending = False  # the fsync of step 2 makes the last mirror durable
        self._place_l2_tables()
        if c.l1_dirty:
            new_bytes = len(c.l1) * L.L1_ENTRY_SIZE
            c.l1_off = self.relocate_run(c.l1_off, c.l1_nbytes, new_bytes)
            c.l1_nbytes = new_bytes
        for p in self.parts:
            p.place()
        rct_off = self._place_refcounts()
        try:
            table_sum = self._write_metadata(rct_off)
            c.f.fsync()
            h = dataclasses.replace(
                c.header,
                sequence=c.header.sequence + 1,
                virtual_size=c.size,
                l1_offset=c.l1_off,
                l1_checksum=c.l1_sum,
                l1_entries=len(c.l1),
                refcount_table_offset=rct_off,
                refcount_table_checksum=table_sum,
                refcount_table_entries=len(c.rct),
                host_clusters=len(c.alloc),
            )
            for p in self.parts:
                p.fill_header(h)
            slot = L.pack_header(h).ljust(L.HEADER_SLOT_SIZE, b"\0")
            # The commit point: the slot's primary copy, durable.
            self.w.pwrite(slot, L.HEADER_SLOT_OFFSETS[h.sequence % 2])
            c.f.fsync()
            # Then its mirror, durable at the next commit's first fsync (or at close): a crash
            # before that leaves the primary intact (spec 9).
            self.w.pwrite(slot, L.HEADER_MIRROR_OFFSETS[h.sequence % 2])
            self.mirror_pending = True
        except OSError as e:
            # After a failed write or fsync the page cache cannot be trusted (and a retry could
            # overwrite the committed slot): stop writing. The committed state on disk is intact.
            c.failed = e
            raise
        c.header = h
        # Committed: freed clusters become reusable. After a discard, a push or a shrink they
        # are also punched out of the file so the space goes back to the host (only now: the
        # committed header no longer references them).
        freed = c.alloc.commit()
        if c.punch and freed:
            self._punch_runs(freed)
        c.punch = False
        c.dirty_l2.clear()
        c.l1_dirty = c.header_dirty = False
        c.pack = None
        for p in self.parts:
            p.committed()
        log.debug("%s: committed sequence %d, %d clusters freed", c.path, h.sequence, len(freed))

    def sync_mirror(self) -> None:
        """Make the last commit's mirror copy durable (at close: no later commit will)."""
        if self.mirror_pending and self.c.failed is None:
            try:
                self.c.f.fsync()
            except OSError as e:
                self.c.failed = e
                raise
            self.mirror_pending = False

    def _place_l2_tables(self) -> None:
        """Give every changed L2 table a cluster it may write: its own if fresh and unshared,
        else a new one (the old stays for the committed header or the snapshots sharing it)."""
        c = self.c
        al, bits = c.alloc, c.cluster_bits
        for idx in sorted(c.dirty_l2):
            off = c.l1[idx][0]
            t = c.l2cache[idx]
            if not any(t[0 : len(t) : L.L2_ENTRY_SIZE]):  # every entry unallocated: drop it
                if off:
                    al.decref(off >> bits)
                c.l1[idx] = (0, 0)
                del c.l2cache[idx]
            elif off == 0 or not al.can_overwrite(off >> bits):
                new = al.alloc() << bits
                if off:
                    al.decref(off >> bits)
                c.l1[idx] = (new, 0)
            c.l1_dirty = True

    def _place_refcounts(self) -> int:
        """Place changed refcount blocks and the table, to a fixed point: allocating clusters
        for them changes refcounts too. Returns the table's offset."""
        c = self.c
        al, cs, bits, rct = c.alloc, c.cluster_size, c.cluster_bits, c.rct
        rct_off = c.header.refcount_table_offset
        rct_bytes = len(rct) * L.L1_ENTRY_SIZE
        while True:
            changed = False
            nblocks = L.refcount_blocks_for(len(al), cs)
            while len(rct) < nblocks:
                al.dirty_blocks.add(len(rct))
                rct.append((0, 0))
                changed = True
            for b in sorted(al.dirty_blocks):
                off = rct[b][0]
                if off == 0 or not al.can_overwrite(off >> bits):
                    new = al.alloc() << bits
                    if off:
                        al.decref(off >> bits)
                    rct[b] = (new, 0)
                    changed = True
            want = len(rct) * L.L1_ENTRY_SIZE
            if want != rct_bytes or not self.run_overwritable(rct_off, rct_bytes):
                rct_off = self.relocate_run(rct_off, rct_bytes, want)
                rct_bytes = want
                changed = True
            if not changed:
                return rct_off

    def _write_metadata(self, rct_off: int) -> int:
        """Write the placed tables; checksums flow upward (L2 -> L1 -> header, block -> table).
        Returns the refcount table's checksum."""
        c = self.c
        w, al, cs, rct = self.w.pwrite, c.alloc, c.cluster_size, c.rct
        for idx in sorted(c.dirty_l2):
            if idx in c.l2cache:
                t = bytes(c.l2cache[idx])
                off = c.l1[idx][0]
                w(t, off)
                c.l1[idx] = (off, _xxh(t))
        if c.l1_dirty:
            l1_bytes = L.pack_l1(c.l1)
            w(l1_bytes, c.l1_off)
            c.l1_sum = _xxh(l1_bytes)
        for p in self.parts:
            p.write()
        per = al.per_block
        for b in sorted(al.dirty_blocks):
            chunk = al.counts[b * per : (b + 1) * per].tobytes()
            block = chunk + bytes(cs - len(chunk))
            w(block, rct[b][0])
            rct[b] = (rct[b][0], _xxh(block))
        table = L.pack_l1(rct)
        w(table, rct_off)
        return _xxh(table)

    def _punch_runs(self, clusters: list[int]) -> None:
        bits = self.c.cluster_bits
        start = prev = clusters[0]
        for c in clusters[1:] + [-1]:
            if c != prev + 1:
                self.c.f.punch(start << bits, (prev - start + 1) << bits)
                start = c
            prev = c

    def run_overwritable(self, off: int, nbytes: int) -> bool:
        if off == 0:
            return False
        c = self.c
        first = off >> c.cluster_bits
        n = L.clusters_for(nbytes, c.cluster_size)
        return all(c.alloc.can_overwrite(k) for k in range(first, first + n))

    def relocate_run(self, off: int, old_bytes: int, new_bytes: int) -> int:
        """Where a contiguous table of ``new_bytes`` goes: in place if allowed, else a new run
        (the old run's clusters are released). 0 when ``new_bytes`` is 0."""
        c = self.c
        cs = c.cluster_size
        old_n = L.clusters_for(old_bytes, cs) if off else 0
        same_size = new_bytes and off and old_n == L.clusters_for(new_bytes, cs)
        if same_size and self.run_overwritable(off, old_bytes):
            return off
        for k in range(off >> c.cluster_bits, (off >> c.cluster_bits) + old_n):
            c.alloc.decref(k)
        if not new_bytes:
            return 0
        return c.alloc.alloc_run(L.clusters_for(new_bytes, cs)) << c.cluster_bits
