"""The state one open image shares between its collaborators, and the active root's tables.

:class:`vfs.image.image.Image` is a façade over a few collaborators, each with one job
(:mod:`~vfs.image.reader`, :mod:`~vfs.image.writer`, :mod:`~vfs.image.commit`,
:mod:`~vfs.image.snapshots`, :mod:`~vfs.image.bitmaps`). They share one :class:`Core`: the file,
the committed header, the allocator, and the active root's mapping (the L1 table, cached L2
tables, the entries) with the bookkeeping of what changed since the last commit. ``Core`` is
internal to the package: other modules use :class:`Image`'s public calls.

Entries are plain tuples on the hot paths (``L.L2_ENTRY`` field order: type, flags, reserved,
stored length, host offset, checksum, object id) and :class:`vfs.image.layout.Entry` (named
fields, the same order) where they leave them.
"""

from __future__ import annotations

import logging
from array import array
from collections.abc import Callable
from typing import TYPE_CHECKING, Protocol

import xxhash

from vfs.errors import CorruptionError, UsageError, WriteFailed
from vfs.image import layout as L
from vfs.image.alloc import Allocator
from vfs.image.fileio import ImageFile

if TYPE_CHECKING:
    from vfs.image.header import HeaderChoice

log = logging.getLogger(__name__)
_xxh = xxhash.xxh3_64_intdigest
#: The piece of a cluster a stale checksum is tracked by (implementation notes, 13.3): the
#: bytes a partial rewrite must read back and verify are the pieces it covers in part.
SUBCLUSTER = 4096
_ENTRY = L.L2_ENTRY
_UNALLOCATED_ENTRY = (L.UNALLOCATED, 0, 0, 0, 0, 0, L.NO_OID)


class Backing(Protocol):
    """What an image needs from the layer below it (a raw file or a read-only image)."""

    size: int
    path: str

    def read(self, offset: int, length: int) -> bytes: ...

    def close(self) -> None: ...


class Resolver(Protocol):
    """The part of ``vfs.redirect.Resolver`` the image uses."""

    def get(self, oid: str, *, expected_size: int | None = None) -> bytes: ...


FileOpener = Callable[[str, bool, bool], ImageFile]


class Core:
    """Shared state of one open image (see the module docstring). Not thread-safe."""

    def __init__(
        self,
        path: str,
        f: ImageFile,
        choice: HeaderChoice,
        *,
        readonly: bool,
        resolver: Resolver | None,
    ) -> None:
        header = choice.header
        self.path = path
        self.f = f
        #: The committed header (replaced by each commit).
        self.header = header
        #: How the header was chosen (damaged copies, a possible roll-back): spec section 3.
        self.choice = choice
        self.readonly = readonly
        self.resolver = resolver
        self.cluster_bits = bits = header.cluster_bits
        self.cluster_size = cs = 1 << bits
        self.mask = cs - 1
        self.per_l2 = L.l2_entries_per_table(cs)
        self.zeros = bytes(cs)
        #: Scratch buffer of one cluster for verified partial reads and copy-on-write.
        self.scratch = memoryview(bytearray(cs))
        self.size = header.virtual_size
        self.compress = header.compression == L.COMPRESSION_ZSTD
        # ---- the active root (loaded by Image)
        self.l1: list[tuple[int, int]] = []
        self.l1_off = header.l1_offset
        self.l1_sum = header.l1_checksum
        self.l1_nbytes = header.l1_entries * L.L1_ENTRY_SIZE
        self.l2cache: dict[int, bytearray] = {}
        #: Bound on cached L2 tables (64 MiB of tables; each covers cluster_size²/64 guest bytes).
        self.l2_limit = max(64, (64 << 20) // cs)
        self.dirty_l2: set[int] = set()
        #: Guest clusters whose in-memory entry checksum is stale: fresh LOCAL clusters rewritten
        #: in part since their checksum was last computed, each with the xxh3 of the intended
        #: bytes of each of its subclusters (implementation notes 13.3: the checksum of the
        #: whole cluster is computed from the file at the commit, or when anything but a write
        #: looks at the entry first, every subcluster verified against these).
        self.unsummed: dict[int, array] = {}
        self.sub = sub = min(SUBCLUSTER, cs)
        self.subs_per_cluster = cs // sub
        #: Bound on stale clusters: about 16 MiB of memory for their sums (an array of 8 bytes
        #: per subcluster, ~160 bytes of object and dict overhead): 57,000 clusters of 64 KiB.
        self.unsummed_limit = max(16, (16 << 20) // (160 + 8 * self.subs_per_cluster))
        self.alloc = Allocator.empty(L.refcounts_per_block(cs))
        self.rct: list[tuple[int, int]] = []
        # ---- what changed since the last commit
        self.l1_dirty = False
        self.header_dirty = False
        #: Punch the clusters the next commit frees (set by discard, zeroing, push, shrink).
        self.punch = False
        #: (host cluster, bytes used) of the cluster zstd frames are packed into.
        self.pack: tuple[int, int] | None = None
        # ---- life cycle
        self.closed = False
        #: A write or fsync failed: every later write and flush fails until the image is
        #: reopened (errseq semantics; the last commit on disk is intact).
        self.failed: BaseException | None = None
        self.backing: Backing | None = None

    # ------------------------------------------------------------------ guards
    def writable(self) -> None:
        if self.readonly:
            from vfs.errors import ReadOnlyError

            raise ReadOnlyError(f"{self.path}: image is open read-only")
        if self.closed:
            raise UsageError("image is closed")
        if self.failed is not None:
            raise self.write_failed()

    def write_failed(self) -> WriteFailed:
        return WriteFailed(
            f"{self.path}: an earlier write failed ({self.failed}); nothing written since the "
            "last commit is durable: reopen the image (its last commit is intact)"
        )

    def check_range(self, offset: int, length: int) -> None:
        if offset < 0 or length < 0 or offset + length > self.size:
            raise UsageError(
                f"range {offset}+{length} is outside the image (virtual size {self.size})"
            )

    # ------------------------------------------------------------------ metadata reads
    def read_meta(self, off: int, size: int, checksum: int, what: str) -> bytes:
        """A checksummed metadata structure, bounded by the image end and the file."""
        end = self.header.host_clusters * self.cluster_size
        if off + size > end or off + size > self.f.size():
            raise CorruptionError(f"{what} at host offset {off:#x} lies past the image end")
        data = self.f.pread(size, off)
        if len(data) != size:
            raise CorruptionError(f"{what} at host offset {off:#x} is truncated")
        if _xxh(data) != checksum:
            raise CorruptionError(f"{what} at host offset {off:#x}: checksum mismatch")
        return data

    def load_l1(self) -> None:
        h = self.header
        raw = self.read_meta(h.l1_offset, h.l1_entries * L.L1_ENTRY_SIZE, h.l1_checksum, "L1")
        host_end = h.host_clusters << self.cluster_bits
        self.l1 = L.unpack_l1(raw, h.l1_entries, self.cluster_size, host_end)
        self.l1_off, self.l1_sum, self.l1_nbytes = h.l1_offset, h.l1_checksum, len(raw)

    def load_refcounts(self) -> None:
        """Refcounts of the whole file, in memory (writers only: readers never allocate)."""
        from array import array

        h, cs = self.header, self.cluster_size
        host_end = h.host_clusters * cs
        raw = self.read_meta(
            h.refcount_table_offset,
            h.refcount_table_entries * L.L1_ENTRY_SIZE,
            h.refcount_table_checksum,
            "refcount table",
        )
        self.rct = L.unpack_l1(raw, h.refcount_table_entries, cs, host_end)
        per = L.refcounts_per_block(cs)
        counts = array("H")
        for i, (off, s) in enumerate(self.rct):
            if off:
                counts.frombytes(self.read_meta(off, cs, s, f"refcount block {i}"))
            else:
                counts.frombytes(bytes(cs))
        if len(self.rct) * per < h.host_clusters:
            raise CorruptionError("refcount table does not cover the image")
        del counts[h.host_clusters :]
        self.alloc = Allocator(counts, per)

    # ------------------------------------------------------------------ L2 tables
    def l2(self, idx: int, create: bool) -> bytearray | None:
        t = self.l2cache.get(idx)
        if t is not None:
            return t
        off, s = self.l1[idx]
        if off == 0:
            if not create:
                return None
            t = bytearray(self.cluster_size)
        else:
            t = self.load_l2(off, s, idx)
        cache = self.l2cache
        if len(cache) >= self.l2_limit:
            self.evict_l2()
        cache[idx] = t
        return t

    def evict_l2(self) -> None:
        """Drop the oldest clean tables (dirty ones must stay until the commit writes them)."""
        cache, dirty = self.l2cache, self.dirty_l2
        victims = [i for i in cache if i not in dirty][: max(1, len(cache) // 4)]
        for i in victims:
            del cache[i]

    def load_l2(self, off: int, checksum: int, idx: int) -> bytearray:
        """Read an L2 table, verify its checksum and every entry's shape."""
        cs = self.cluster_size
        span = cs * self.per_l2
        t = bytearray(self.f.pread(cs, off))
        if len(t) != cs or _xxh(t) != checksum:
            raise CorruptionError(
                f"L2 table at host offset {off:#x} (guest offsets {idx * span:#x}.."
                f"{(idx + 1) * span - 1:#x}): checksum mismatch",
                offset=idx * span,
                host_offset=off,
            )
        host_end = self.host_end()
        for i, e in enumerate(_ENTRY.iter_unpack(t)):
            why = L.check_l2_entry(e[0], e[3], e[4], cs, host_end)
            if why:
                guest = (idx * self.per_l2 + i) * cs
                raise CorruptionError(f"L2 entry for guest offset {guest:#x}: {why}", offset=guest)
        return t

    def host_end(self) -> int:
        """End of the clusters this image may reference (readers: the committed image end)."""
        n = len(self.alloc) if not self.readonly else self.header.host_clusters
        return n * self.cluster_size

    # ------------------------------------------------------------------ entries
    def entry(self, ci: int) -> tuple:
        """The L2 entry of guest cluster ``ci`` with an up-to-date checksum."""
        if ci in self.unsummed:
            self.settle(ci)
        t = self.l2(ci // self.per_l2, False)
        if t is None:
            return _UNALLOCATED_ENTRY
        return _ENTRY.unpack_from(t, (ci % self.per_l2) * L.L2_ENTRY_SIZE)

    def entry_raw(self, ci: int) -> tuple:
        """:meth:`entry` for the write paths: the checksum may be stale (``unsummed``)."""
        t = self.l2(ci // self.per_l2, False)
        if t is None:
            return _UNALLOCATED_ENTRY
        return _ENTRY.unpack_from(t, (ci % self.per_l2) * L.L2_ENTRY_SIZE)

    def set_entry(
        self,
        ci: int,
        etype: int,
        host: int = 0,
        csum: int = 0,
        length: int = 0,
        oid: bytes = L.NO_OID,
    ) -> None:
        idx = ci // self.per_l2
        t = self.l2(idx, etype != L.UNALLOCATED)
        if t is None:  # setting UNALLOCATED in a table that does not exist: nothing to do
            return
        _ENTRY.pack_into(
            t, (ci % self.per_l2) * L.L2_ENTRY_SIZE, etype, 0, 0, length, host, csum, oid
        )
        self.dirty_l2.add(idx)
        self.unsummed.pop(ci, None)

    def subsums(self, data: memoryview | bytes | bytearray) -> array:
        """The xxh3 of each subcluster of one cluster's bytes."""
        sub = self.sub
        return array("Q", [_xxh(data[o : o + sub]) for o in range(0, self.cluster_size, sub)])

    def settle(self, ci: int) -> None:
        """Compute the checksum of a fresh cluster that was rewritten in part: from the file,
        each subcluster verified against the sum of the bytes the guest meant (damage to the
        file copy must stay detectable: never blessed into the checksum)."""
        sums = self.unsummed[ci]
        e = self.entry_raw(ci)
        mv, sub, cs = self.scratch, self.sub, self.cluster_size
        good = self.f.preadv(mv, e[4]) == cs and all(
            _xxh(mv[k * sub : (k + 1) * sub]) == s for k, s in enumerate(sums)
        )
        csum = _xxh(mv)
        if not good:
            # The file no longer holds what was written (the disk or a stray writer damaged
            # it). The entry gets a checksum those bytes do not match: every read reports the
            # damage (IntegrityError), and ``vimg check`` counts it, as for any damaged cluster.
            log.error(
                "%s: cluster at guest offset %#x was damaged in the file after it was written",
                self.path,
                ci * cs,
            )
            csum ^= 1
        self.set_entry(ci, L.LOCAL, e[4], csum)

    def settle_all(self) -> None:
        """Bring every stale checksum up to date (before a commit, or table-level work)."""
        for ci in sorted(self.unsummed):
            self.settle(ci)

    def release(self, e: tuple) -> None:
        """Drop this root's use of the host cluster an entry points to."""
        if e[0] == L.LOCAL or e[0] == L.COMPRESSED:
            c = e[4] >> self.cluster_bits
            self.alloc.decref(c)
            if self.pack is not None and self.pack[0] == c and self.alloc.counts[c] == 0:
                self.pack = None

    def resize_l1(self, n: int) -> None:
        """Grow or shrink the active L1 table to ``n`` entries, releasing what a shrink drops."""
        c = self
        if n == len(c.l1):
            return
        while len(c.l1) > n:
            idx = len(c.l1) - 1
            off = c.l1[idx][0]
            t = c.l2cache.pop(idx, None)
            c.dirty_l2.discard(idx)
            if t is not None or off:
                if t is None:
                    t = c.load_l2(off, c.l1[idx][1], idx)
                for e in L.L2_ENTRY.iter_unpack(t):
                    c.release(e)
            if off:
                c.alloc.decref(off >> c.cluster_bits)
            c.l1.pop()
        while len(c.l1) < n:
            c.l1.append((0, 0))
        c.l1_dirty = True

    def table_entries(self, idx: int) -> bytearray | None:
        """The active root's L2 table ``idx`` (cached or loaded, verified), None if absent."""
        return self.l2(idx, False)

    @property
    def guest_clusters(self) -> int:
        return -(-self.size // self.cluster_size)
