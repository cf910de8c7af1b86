"""The vimg image core: open/create, read/write/discard/zero, flush (commit), resize, snapshots.

Layout and invariants: ``docs/vimg-format.md``; bytes: :mod:`vfs.image.layout`; copy-on-write
bookkeeping: :class:`vfs.image.alloc.Allocator`.

Hot paths (measured with ``vimg bench`` / ``python -m tools.bench.image``):
- a read of part of a local cluster is one L2 lookup in a cached bytearray, one ``preadv`` of
  the whole cluster into a reused scratch buffer (its xxh3 must be verified) and one copy out;
- whole clusters that are host-contiguous are one ``preadv`` straight into the caller's buffer
  (:meth:`Image.readinto`) or one ``pread`` (:meth:`Image.read`), then one xxh3 per cluster;
- whole-cluster writes go where copy-on-write puts them, host-contiguous ones in one ``pwrite``;
- a partial write to a fresh cluster (written since the last commit) verifies the cluster the
  first time and keeps its bytes in memory, then writes only the changed bytes to the file and
  patches the memory copy: its checksum is computed once, from that memory copy (the bytes the
  guest wrote, never the disk's), at the commit or the next read (spec section 7, ``_unsummed``);
- the file grows ahead of appended clusters with ``fallocate`` (trimmed back at close).
Metadata is written only by :meth:`Image.flush`, which is the commit point of the crash model.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import os
from array import array
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

import xxhash
import zstandard

from vfs.errors import (
    AlreadyExists,
    CorruptionError,
    FormatError,
    IntegrityError,
    NotFound,
    ReadOnlyError,
    UsageError,
)
from vfs.image import layout as L
from vfs.image.alloc import Allocator
from vfs.image.fileio import ImageFile, RawFile
from vfs.image.snapshots import SnapshotMixin

log = logging.getLogger(__name__)

_xxh = xxhash.xxh3_64_intdigest
_ENTRY = L.L2_ENTRY
MAX_CHAIN_DEPTH = 64
#: Implementation limit on the L1 table (held in memory as a list): 1 Mi entries = 64 TiB of
#: guest at 64 KiB clusters, 64 PiB at 2 MiB.
MAX_L1_ENTRIES = 1 << 20


class Backing(Protocol):
    """What an image needs from the layer below it."""

    size: int
    path: str

    def read(self, offset: int, length: int) -> bytes: ...

    def close(self) -> None: ...


class Resolver(Protocol):
    """The part of ``vfs.redirect.Resolver`` the image uses."""

    def get(self, oid: str) -> bytes: ...


FileOpener = Callable[[str, bool, bool], ImageFile]


@dataclass
class Salvaged:
    """Tables rebuilt by ``check -r``: refcounts recomputed from the roots, repaired L2 tables."""

    l1: list[tuple[int, int]]
    counts: array
    rct: list[tuple[int, int]]
    snapshots: list[L.Snapshot]
    snapshots_changed: bool
    tables: dict[int, bytearray] = field(default_factory=dict)


def default_opener(path: str, writable: bool, create: bool) -> ImageFile:
    return ImageFile(path, writable=writable, create=create)


class Image(SnapshotMixin):
    """An open vimg image. Use :meth:`create` or :meth:`open`; close (or ``with``) when done.

    Not thread-safe: one thread at a time (an NBD/FUSE adapter serialises requests, or holds a
    lock). Writes are durable after :meth:`flush` (the commit) and not before."""

    format = "vimg"

    def __init__(
        self,
        path: str,
        f: ImageFile,
        header: L.Header,
        *,
        readonly: bool,
        resolver: Resolver | None,
        chain: tuple[str, ...] = (),
        salvaged: Salvaged | None = None,
        with_backing: bool = True,
    ) -> None:
        self.path = path
        self._f = f
        self._h = header
        self.readonly = readonly
        self.resolver = resolver
        self.cluster_bits = header.cluster_bits
        self.cluster_size = cs = header.cluster_size
        self._mask = cs - 1
        self._per_l2 = L.l2_entries_per_table(cs)
        self._zeros = bytes(cs)
        self._scratch = memoryview(bytearray(cs))
        self.size = header.virtual_size
        self._compress = header.compression == L.COMPRESSION_ZSTD
        self._cctx = zstandard.ZstdCompressor(level=3)
        self._dctx = zstandard.ZstdDecompressor()
        if header.host_clusters * cs > f.size() + cs:
            # Bounds every allocation that follows by the real file (hostile or truncated files).
            raise CorruptionError(
                f"{path}: image end {header.host_clusters * cs:#x} lies past the end of the file "
                f"({f.size():#x}): truncated?"
            )
        #: Preallocation (spec 10): the file is grown with fallocate ahead of appended clusters
        #: (writing into reserved blocks is ~1.5x faster than extending the file); what is left
        #: past the image end is given back at close. 0: off (read-only, or not supported).
        self._grown_to = 0 if readonly else f.size()
        self._l2cache: dict[int, bytearray] = {}
        #: Bound on cached L2 tables (64 MiB of tables; each covers cluster_size²/64 guest bytes).
        self._l2_limit = max(64, (64 << 20) // cs)
        self._dirty_l2: set[int] = set()
        #: Guest clusters whose in-memory entry checksum is stale: fresh LOCAL clusters rewritten
        #: in part since their checksum was last computed, each with the intended bytes of the
        #: whole cluster (spec 7: the checksum is computed from these at the commit, or when
        #: anything but a write looks at the entry first). Bounded by ``_unsummed_limit``.
        self._unsummed: dict[int, bytearray] = {}
        self._unsummed_limit = max(16, (16 << 20) // cs)
        self._l1_dirty = False
        self._snap_dirty = False
        self._header_dirty = False
        self._pack: tuple[int, int] | None = None  # (host cluster, bytes used) for zstd frames
        self._closed = False
        #: Punch the clusters the next commit frees (set by discard, zeroing, push, shrink).
        self._punch = False
        #: A write or fsync failed: the image refuses further writes (reopen to continue).
        self._failed = False
        self.backing: Backing | None = None
        if salvaged is not None:
            self._install(salvaged)
            return
        self._load_tables()
        if header.backing_name and with_backing:
            self.backing = open_backing(self, chain + (os.path.realpath(path),))

    # ------------------------------------------------------------------ open / create / close
    @classmethod
    def create(
        cls,
        path: str,
        size: int,
        *,
        cluster_size: int = 1 << L.DEFAULT_CLUSTER_BITS,
        backing: str | None = None,
        backing_format: str | None = None,
        compress: bool = False,
        opener: FileOpener = default_opener,
        resolver: Resolver | None = None,
    ) -> Image:
        """Create a new image (refusing to overwrite an existing file) and open it read-write."""
        bits = cluster_size.bit_length() - 1
        if cluster_size != 1 << bits or not L.MIN_CLUSTER_BITS <= bits <= L.MAX_CLUSTER_BITS:
            raise UsageError(f"cluster size {cluster_size} must be a power of two, 4k..2M")
        if backing and size < 0:
            size = -(-_probe_size(backing, path) // L.SECTOR) * L.SECTOR
        if size % L.SECTOR or size < 0 or size > L.MAX_VIRTUAL_SIZE:
            raise UsageError(f"image size {size} must be a multiple of 512 and at most 2^56")
        bfmt = L.BACKING_NONE
        if backing:
            fmt = backing_format or _probe_format(_resolve_rel(backing, path))
            if fmt not in L.BACKING_FORMAT_CODES:
                raise UsageError(f"backing format {fmt!r} not supported (raw or vimg)")
            bfmt = L.BACKING_FORMAT_CODES[fmt]
            if len(backing.encode()) > L.MAX_BACKING_NAME:
                raise UsageError("backing file name too long")
            if not os.path.exists(_resolve_rel(backing, path)):
                raise UsageError(f"backing file {backing!r} does not exist")
        if os.path.exists(path):
            raise AlreadyExists(f"{path}: file exists")
        cs = cluster_size
        per = L.refcounts_per_block(cs)
        reserved = L.clusters_for(L.HEADER_AREA, cs)
        l1_entries = L.l1_entries_for(size, cs)
        if l1_entries > MAX_L1_ENTRIES:
            limit = MAX_L1_ENTRIES * cs * L.l2_entries_per_table(cs)
            raise UsageError(
                f"{size} bytes exceeds this implementation's limit of {limit} bytes at "
                f"{cs // 1024} KiB clusters; use a larger cluster size (-c)"
            )
        l1_bytes = l1_entries * L.L1_ENTRY_SIZE
        l1_clusters = L.clusters_for(l1_bytes, cs)
        # Layout of a new image: header area, L1, refcount blocks, refcount table.
        nblocks = 1
        while True:
            table_clusters = L.clusters_for(nblocks * L.L1_ENTRY_SIZE, cs)
            host_clusters = reserved + l1_clusters + nblocks + table_clusters
            if L.refcount_blocks_for(host_clusters, cs) == nblocks:
                break
            nblocks = L.refcount_blocks_for(host_clusters, cs)
        l1_off = reserved * cs
        first_block = reserved + l1_clusters
        table_off = (first_block + nblocks) * cs
        counts = array("H", [1] * host_clusters)
        blocks = []
        for b in range(nblocks):
            chunk = counts[b * per : (b + 1) * per].tobytes()
            blocks.append(chunk + bytes(cs - len(chunk)))
        rct = L.pack_l1([((first_block + b) * cs, _xxh(blk)) for b, blk in enumerate(blocks)])
        h = L.Header(
            virtual_size=size,
            cluster_bits=bits,
            sequence=0,
            l1_offset=l1_off,
            l1_checksum=_xxh(bytes(l1_bytes)),
            l1_entries=l1_entries,
            refcount_table_offset=table_off,
            refcount_table_checksum=_xxh(rct),
            refcount_table_entries=nblocks,
            backing_format=bfmt,
            compression=L.COMPRESSION_ZSTD if compress else L.COMPRESSION_NONE,
            incompatible=L.INCOMPAT_COMPRESSED if compress else 0,
            host_clusters=host_clusters,
            backing_name=backing or "",
        )
        f = opener(path, True, True)
        try:
            f.truncate(host_clusters * cs)  # the L1 table is all zeros: leave it sparse
            for b, blk in enumerate(blocks):
                f.pwrite(blk, (first_block + b) * cs)
            f.pwrite(rct, table_off)
            f.pwrite(L.pack_header(h), L.HEADER_SLOT_OFFSETS[0])
            f.fsync()
        finally:
            f.close()
        _fsync_dir(path)
        return cls.open(path, opener=opener, resolver=resolver)

    @classmethod
    def open(
        cls,
        path: str,
        *,
        readonly: bool = False,
        resolver: Resolver | None = None,
        opener: FileOpener = default_opener,
        with_backing: bool = True,
        _chain: tuple[str, ...] = (),
    ) -> Image:
        """Open an existing image. ``with_backing=False`` skips opening the backing chain (for
        metadata work such as ``info``, ``snapshot`` or ``rebase -u`` when the backing file is
        gone); reading a range that would fall through to it is then an error, never zeros."""
        try:
            f = opener(path, not readonly, False)
        except FileNotFoundError:
            raise NotFound(f"{path}: no such file") from None
        except IsADirectoryError:
            raise UsageError(f"{path}: is a directory") from None
        try:
            header = read_current_header(f)
            if header.version == L.VERSION and header.autoclear & ~L.KNOWN_AUTOCLEAR:
                log.info("clearing unknown autoclear features %#x", header.autoclear)
            return cls(
                path,
                f,
                header,
                readonly=readonly,
                resolver=resolver,
                chain=_chain,
                with_backing=with_backing,
            )
        except BaseException:
            f.close()
            raise

    def close(self) -> None:
        if self._closed:
            return
        try:
            if not self.readonly:
                self.flush()
                self._trim_preallocation()
        finally:
            self._closed = True
            self._f.close()
            if self.backing is not None:
                self.backing.close()

    def __enter__(self) -> Image:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------ loading metadata
    def _load_tables(self) -> None:
        h, cs = self._h, self.cluster_size
        host_end = h.host_clusters * cs
        raw = self._read_meta(h.l1_offset, h.l1_entries * L.L1_ENTRY_SIZE, h.l1_checksum, "L1")
        self._l1 = L.unpack_l1(raw, h.l1_entries, cs, host_end)
        self._l1_off = h.l1_offset
        self._l1_nbytes = len(raw)
        self._l1_sum = h.l1_checksum
        if self.readonly:
            # Readers never allocate: skip the refcounts (a damaged refcount block is then a
            # matter for check/repair, and does not stop anyone reading the data).
            self._rct = []
            self._alloc = Allocator(
                array("H", bytes(2 * h.host_clusters)), L.refcounts_per_block(cs)
            )
            self._load_snapshots()
            return
        rct_raw = self._read_meta(
            h.refcount_table_offset,
            h.refcount_table_entries * L.L1_ENTRY_SIZE,
            h.refcount_table_checksum,
            "refcount table",
        )
        self._rct = L.unpack_l1(rct_raw, h.refcount_table_entries, cs, host_end)
        per = L.refcounts_per_block(cs)
        counts = array("H")
        for i, (off, s) in enumerate(self._rct):
            if off:
                block = self._read_meta(off, cs, s, f"refcount block {i}")
                counts.frombytes(block)
            else:
                counts.frombytes(bytes(cs))
        del counts[h.host_clusters :]
        if len(counts) < h.host_clusters:
            raise FormatError("refcount table too short")
        if len(self._rct) * per < h.host_clusters:
            raise FormatError("refcount table does not cover the image")
        self._alloc = Allocator(counts, per)
        self._load_snapshots()

    def _install(self, s: Salvaged) -> None:
        """Take the tables ``check -r`` rebuilt; the next flush commits them copy-on-write."""
        h, cs = self._h, self.cluster_size
        self._l1 = list(s.l1)
        self._l1_off, self._l1_sum = h.l1_offset, h.l1_checksum
        self._l1_nbytes = h.l1_entries * L.L1_ENTRY_SIZE
        self._alloc = Allocator(s.counts, L.refcounts_per_block(cs))
        self._rct = list(s.rct) or [(0, 0)] * L.refcount_blocks_for(len(s.counts), cs)
        self._alloc.dirty_blocks.update(range(len(self._rct)))  # rewrite every refcount block
        self.snapshots = list(s.snapshots)
        self._snap_off, self._snap_sum = h.snapshots_offset, h.snapshots_checksum
        self._snap_size = h.snapshots_size
        self._snap_dirty = s.snapshots_changed
        self._header_dirty = self._l1_dirty = True
        for idx, table in s.tables.items():
            self._l2cache[idx] = table
            self._dirty_l2.add(idx)

    def _load_snapshots(self) -> None:
        h, cs = self._h, self.cluster_size
        self.snapshots: list[L.Snapshot] = []
        if h.nb_snapshots:
            raw = self._read_meta(
                h.snapshots_offset, h.snapshots_size, h.snapshots_checksum, "snapshot table"
            )
            self.snapshots = L.unpack_snapshots(raw, h.nb_snapshots, cs)
        self._snap_off = h.snapshots_offset
        self._snap_sum = h.snapshots_checksum
        self._snap_size = h.snapshots_size

    def _read_meta(self, off: int, size: int, checksum: int, what: str) -> bytes:
        if off + size > self._h.host_clusters * self.cluster_size or off + size > self._f.size():
            raise CorruptionError(f"{what} at host offset {off:#x} lies past the image end")
        data = self._f.pread(size, off)
        if len(data) != size:
            raise CorruptionError(f"{what} at host offset {off:#x} is truncated")
        if _xxh(data) != checksum:
            raise CorruptionError(f"{what} at host offset {off:#x}: checksum mismatch")
        return data

    def _l2(self, idx: int, create: bool) -> bytearray | None:
        t = self._l2cache.get(idx)
        if t is not None:
            return t
        off, s = self._l1[idx]
        if off == 0:
            if not create:
                return None
            t = bytearray(self.cluster_size)
        else:
            t = self.load_l2(off, s, idx)
        cache = self._l2cache
        if len(cache) >= self._l2_limit:
            self._evict_l2()
        cache[idx] = t
        return t

    def _evict_l2(self) -> None:
        """Drop the oldest clean tables (dirty ones must stay until the commit writes them)."""
        cache, dirty = self._l2cache, self._dirty_l2
        victims = [i for i in cache if i not in dirty][: max(1, len(cache) // 4)]
        for i in victims:
            del cache[i]

    def load_l2(self, off: int, checksum: int, idx: int) -> bytearray:
        """Read an L2 table, verify its checksum and every entry's shape."""
        cs = self.cluster_size
        span = cs * self._per_l2
        t = bytearray(self._f.pread(cs, off))
        if len(t) != cs or _xxh(t) != checksum:
            raise CorruptionError(
                f"L2 table at host offset {off:#x} (guest offsets {idx * span:#x}.."
                f"{(idx + 1) * span - 1:#x}): checksum mismatch",
                offset=idx * span,
                host_offset=off,
            )
        host_end = len(self._alloc) * cs
        for i, e in enumerate(_ENTRY.iter_unpack(t)):
            why = L.check_l2_entry(e[0], e[3], e[4], cs, host_end)
            if why:
                guest = (idx * self._per_l2 + i) * cs
                raise CorruptionError(f"L2 entry for guest offset {guest:#x}: {why}", offset=guest)
        return t

    # ------------------------------------------------------------------ entries
    def entry(self, ci: int) -> tuple:
        """The L2 entry of guest cluster ``ci``: (type, flags, 0, length, host, checksum, oid)."""
        if ci in self._unsummed:
            self._settle(ci)
        return self._entry(ci)

    def _entry(self, ci: int) -> tuple:
        """:meth:`entry` for the write paths: the checksum may be stale (``_unsummed``)."""
        t = self._l2(ci // self._per_l2, False)
        if t is None:
            return (L.UNALLOCATED, 0, 0, 0, 0, 0, L.NO_OID)
        return _ENTRY.unpack_from(t, (ci % self._per_l2) * L.L2_ENTRY_SIZE)

    def _set_entry(
        self,
        ci: int,
        etype: int,
        host: int = 0,
        csum: int = 0,
        length: int = 0,
        oid: bytes = L.NO_OID,
    ) -> None:
        idx = ci // self._per_l2
        t = self._l2(idx, etype != L.UNALLOCATED)
        if t is None:  # setting UNALLOCATED in a table that does not exist: nothing to do
            return
        _ENTRY.pack_into(
            t, (ci % self._per_l2) * L.L2_ENTRY_SIZE, etype, 0, 0, length, host, csum, oid
        )
        self._dirty_l2.add(idx)
        self._unsummed.pop(ci, None)

    def _settle(self, ci: int) -> None:
        """Compute the checksum of a fresh cluster that was rewritten in part, from the memory
        copy of what was written (not from the file: damage to the file copy must stay
        detectable by the next read)."""
        data = self._unsummed[ci]
        e = self._entry(ci)
        self._set_entry(ci, L.LOCAL, e[4], _xxh(data))

    def _settle_all(self) -> None:
        """Bring every stale checksum up to date (before a commit, or table-level work)."""
        for ci in sorted(self._unsummed):
            self._settle(ci)

    def _release(self, e: tuple) -> None:
        """Drop this root's use of the host cluster an entry points to."""
        if e[0] == L.LOCAL or e[0] == L.COMPRESSED:
            c = e[4] >> self.cluster_bits
            self._alloc.decref(c)
            if self._pack is not None and self._pack[0] == c and self._alloc.counts[c] == 0:
                self._pack = None

    # ------------------------------------------------------------------ reading
    def _check_range(self, offset: int, length: int) -> None:
        if offset < 0 or length < 0 or offset + length > self.size:
            raise UsageError(
                f"range {offset}+{length} is outside the image (virtual size {self.size})"
            )

    def read(self, offset: int, length: int) -> bytes | bytearray:
        """Guest bytes; every stored cluster touched is checksum-verified.

        Whole local clusters are read straight into the result buffer, which is returned as is
        (a bytearray when the range spans clusters): one allocation per call and no copies,
        the hot path of large sequential reads. A range that is one run of host-contiguous
        local clusters is one ``pread`` (no zero-filled buffer at all)."""
        self._check_range(offset, length)
        cs, bits, mask = self.cluster_size, self.cluster_bits, self._mask
        if length <= cs - (offset & mask):  # within one cluster: no assembly needed
            return self._piece(offset >> bits, offset & mask, length)
        if not offset & mask and not length & mask:
            data = self._read_run(offset >> bits, length >> bits)
            if data is not None:
                return data
        out = bytearray(length)
        self.readinto(offset, out)
        return out

    def _read_run(self, ci: int, k: int) -> bytes | None:
        """``k`` whole clusters from ``ci`` if they are LOCAL and host-contiguous (one pread,
        each cluster verified), else None."""
        cs, entry = self.cluster_size, self.entry
        e = entry(ci)
        if e[0] != L.LOCAL:
            return None
        host = e[4]
        sums = [e[5]]
        for j in range(1, k):
            e = entry(ci + j)
            if e[0] != L.LOCAL or e[4] != host + j * cs:
                return None
            sums.append(e[5])
        data = self._f.pread(k * cs, host)
        self._verify_run(ci, memoryview(data), sums, len(data))
        return data

    def _verify_run(self, ci: int, mv: memoryview, sums: list[int], got: int) -> None:
        """Check the clusters read into ``mv`` (``got`` bytes) against their checksums."""
        cs = self.cluster_size
        xxh = _xxh
        for j, s in enumerate(sums):
            o = j * cs
            if got < o + cs or xxh(mv[o : o + cs]) != s:
                self._cluster(ci + j, self.entry(ci + j))  # re-read the slow way: precise error
                raise IntegrityError(
                    f"cluster at guest offset {(ci + j) * cs:#x} changed while read"
                )

    def readinto(self, offset: int, buf: bytearray | memoryview) -> int:
        """Fill ``buf`` (any writable buffer) with the guest bytes at ``offset``, verified as
        :meth:`read` does; returns ``len(buf)``. Nothing is allocated for whole local
        clusters: host-contiguous runs of them are one ``preadv`` straight into ``buf``."""
        mv = memoryview(buf)
        if mv.format != "B" or mv.ndim != 1:
            mv = mv.cast("B")
        length = len(mv)
        self._check_range(offset, length)
        cs, bits, mask = self.cluster_size, self.cluster_bits, self._mask
        entry, readinto = self.entry, self._f.preadv
        pos, end = offset, offset + length
        while pos < end:
            ci = pos >> bits
            a = pos & mask
            n = min(cs - a, end - pos)
            o = pos - offset
            e = entry(ci)
            t = e[0]
            if t == L.LOCAL and n == cs:
                # the longest run of whole, host-contiguous local clusters: one preadv
                host = e[4]
                sums = [e[5]]
                k = 1
                while pos + (k + 1) * cs <= end:
                    e2 = entry(ci + k)
                    if e2[0] != L.LOCAL or e2[4] != host + k * cs:
                        break
                    sums.append(e2[5])
                    k += 1
                dst = mv[o : o + k * cs]
                self._verify_run(ci, dst, sums, readinto(dst, host))
                n = k * cs
            elif t == L.LOCAL:
                scratch = self._scratch
                if readinto(scratch, e[4]) != cs or _xxh(scratch) != e[5]:
                    self._cluster(ci, e)  # raises the precise error
                    raise IntegrityError(f"cluster at guest offset {ci * cs:#x} changed while read")
                mv[o : o + n] = scratch[a : a + n]
            elif t == L.ZERO or (t == L.UNALLOCATED and not self._h.backing_name):
                mv[o : o + n] = self._zeros[:n] if n < cs else self._zeros
            else:
                mv[o : o + n] = self._piece(ci, a, n, e)
            pos += n
        return length

    def _piece(self, ci: int, a: int, n: int, e: tuple | None = None) -> bytes:
        """``n`` guest bytes at offset ``a`` inside cluster ``ci``."""
        if e is None:
            e = self.entry(ci)
        t = e[0]
        if t == L.LOCAL and n < self.cluster_size:
            # verified in the reused scratch buffer: only the n bytes asked for are allocated
            scratch = self._scratch
            if self._f.preadv(scratch, e[4]) != self.cluster_size or _xxh(scratch) != e[5]:
                self._cluster(ci, e)  # raises the precise error
                raise IntegrityError(
                    f"cluster at guest offset {ci * self.cluster_size:#x} changed while read"
                )
            return bytes(scratch[a : a + n])
        if t == L.LOCAL or t == L.COMPRESSED or t == L.REMOTE:
            data = self._cluster(ci, e)
            return data if n == self.cluster_size else data[a : a + n]
        if t == L.ZERO or not self._h.backing_name:
            return self._zeros[:n] if n < self.cluster_size else self._zeros
        return self._read_backing(ci * self.cluster_size + a, n)

    def _backing(self) -> Backing:
        if self.backing is None:
            raise UsageError(
                f"{self.path} was opened without its backing file {self._h.backing_name!r}"
            )
        return self.backing

    def _read_backing(self, pos: int, n: int) -> bytes:
        b = self._backing()
        if pos >= b.size:
            return bytes(n)
        if pos + n <= b.size:
            return b.read(pos, n)
        return b.read(pos, b.size - pos) + bytes(pos + n - b.size)

    def _cluster(self, ci: int, e: tuple) -> bytes:
        """The verified content of a stored cluster (LOCAL, COMPRESSED or REMOTE)."""
        cs = self.cluster_size
        t, host = e[0], e[4]
        where = f"cluster at guest offset {ci * cs:#x}"
        if t == L.LOCAL:
            data = self._f.pread(cs, host)
            if len(data) != cs:
                raise IntegrityError(
                    f"{where}: short read at host offset {host:#x}", offset=ci * cs
                )
        elif t == L.COMPRESSED:
            frame = self._f.pread(e[3], host)
            try:
                data = self._dctx.decompress(frame, max_output_size=cs)
            except zstandard.ZstdError as err:
                raise IntegrityError(
                    f"{where}: compressed data at host offset {host:#x} is damaged ({err})",
                    offset=ci * cs,
                ) from None
            if len(data) != cs:
                raise IntegrityError(
                    f"{where}: compressed cluster has the wrong size", offset=ci * cs
                )
        else:
            data = self._remote(ci, e)
        if _xxh(data) != e[5]:
            raise IntegrityError(
                f"{where}: checksum mismatch (host offset {host:#x})"
                if t != L.REMOTE
                else f"{where}: remote object {e[6].hex()} checksum mismatch",
                offset=ci * cs,
                host_offset=host,
            )
        return data

    def _remote(self, ci: int, e: tuple) -> bytes:
        oid = e[6].hex()
        if self.resolver is None:
            raise UsageError(
                f"cluster at guest offset {ci * self.cluster_size:#x} is remote (object {oid}); "
                "give a store/repository to read it"
            )
        data = self.resolver.get(oid)
        if len(data) != self.cluster_size or hashlib.sha256(data).digest() != e[6]:
            raise IntegrityError(
                f"cluster at guest offset {ci * self.cluster_size:#x}: object {oid} does not "
                "match its digest",
                offset=ci * self.cluster_size,
            )
        return data

    def cluster_data(self, ci: int) -> bytes:
        """The verified content of a LOCAL, COMPRESSED or REMOTE cluster (never the backing)."""
        return self._cluster(ci, self.entry(ci))

    def read_cluster(self, ci: int) -> bytes:
        """The full content of guest cluster ``ci`` as the guest sees it."""
        e = self.entry(ci)
        t = e[0]
        if t == L.LOCAL or t == L.COMPRESSED or t == L.REMOTE:
            return self._cluster(ci, e)
        if t == L.ZERO or not self._h.backing_name:
            return self._zeros
        return self._read_backing(ci * self.cluster_size, self.cluster_size)

    # ------------------------------------------------------------------ writing
    def _writable(self) -> None:
        if self.readonly:
            raise ReadOnlyError(f"{self.path}: image is open read-only")
        if self._closed:
            raise UsageError("image is closed")
        if self._failed:
            raise ReadOnlyError(
                f"{self.path}: an earlier write failed; reopen the image "
                "(its last commit is intact)"
            )

    def write(self, offset: int, data: bytes) -> None:
        """Write guest bytes (durable after the next :meth:`flush`)."""
        self._writable()
        self._check_range(offset, len(data))
        pos, end, bits, mask, cs = (
            offset,
            offset + len(data),
            self.cluster_bits,
            self._mask,
            self.cluster_size,
        )
        view = memoryview(data)
        if view.format != "B" or view.ndim != 1:
            view = view.cast("B")
        while pos < end:
            ci = pos >> bits
            a = pos & mask
            n = min(cs - a, end - pos)
            if not a and n == cs and not self._compress:
                k = (end - pos) >> bits  # whole clusters from here on
                self._write_whole(ci, view[pos - offset : pos - offset + k * cs], k)
                pos += k * cs
                continue
            self._write_cluster(ci, a, view[pos - offset : pos - offset + n])
            pos += n

    def _write_whole(self, ci: int, view: memoryview, k: int) -> None:
        """Store ``k`` whole clusters from ``ci`` (uncompressed image): each goes where
        :meth:`store_cluster` would put it, and clusters whose host clusters follow each other
        are written with one ``pwrite``. Every data cluster is written before its entry changes
        and before the old copy is released, as in :meth:`store_cluster`."""
        cs, bits, al, zeros = self.cluster_size, self.cluster_bits, self._alloc, self._zeros
        plan: list[tuple[int, tuple, int, bool]] = []  # (j, old entry, host offset, new?)
        for j in range(k):
            piece = view[j * cs : (j + 1) * cs]
            e = self._entry(ci + j)  # replaced whole: a stale checksum does not matter
            if piece == zeros:
                self._store_planned(ci, view, plan)
                plan = []
                self.store_cluster(ci + j, e, piece)
                continue
            if e[0] == L.LOCAL and al.can_overwrite(e[4] >> bits):
                plan.append((j, e, e[4], False))
            else:
                plan.append((j, e, al.alloc() << bits, True))
        self._store_planned(ci, view, plan)

    def _store_planned(
        self, ci: int, view: memoryview, plan: list[tuple[int, tuple, int, bool]]
    ) -> None:
        cs = self.cluster_size
        i = 0
        while i < len(plan):
            j0, _, h0, _ = plan[i]
            m = i + 1
            while m < len(plan) and plan[m][0] == j0 + m - i and plan[m][2] == h0 + (m - i) * cs:
                m += 1
            self._pwrite(view[j0 * cs : (j0 + m - i) * cs], h0)
            for j, e, host, new in plan[i:m]:
                self._set_entry(ci + j, L.LOCAL, host, _xxh(view[j * cs : (j + 1) * cs]))
                if new:
                    self._release(e)
            i = m

    def _write_cluster(self, ci: int, a: int, piece: memoryview | bytes) -> None:
        cs = self.cluster_size
        e = self._entry(ci)
        if len(piece) == cs:
            self.store_cluster(ci, e, piece)  # no copy: hashed and written from the caller's buffer
            return
        if (
            e[0] == L.LOCAL
            and not self._compress
            and self._alloc.can_overwrite(e[4] >> self.cluster_bits)
        ):
            # Fresh cluster, only this root uses it: write just the changed bytes in place. Its
            # old content is verified the first time; its new checksum is computed once, at
            # the commit (or when something reads it first): spec section 7.
            unsummed = self._unsummed
            mem = unsummed.get(ci)
            if mem is None:
                if len(unsummed) >= self._unsummed_limit:
                    self._settle(next(iter(unsummed)))  # oldest first: bounded memory
                mem = bytearray(cs)
                if self._f.preadv(mem, e[4]) != cs or _xxh(mem) != e[5]:
                    self._cluster(ci, e)  # raises the precise error
                    raise IntegrityError(f"cluster at guest offset {ci * cs:#x} changed while read")
                unsummed[ci] = mem
            mem[a : a + len(piece)] = piece
            self._pwrite(piece, e[4] + a)
            return
        if ci in self._unsummed:  # not reached: only fresh LOCAL clusters are unsummed
            self._settle(ci)
            e = self._entry(ci)
        if e[0] == L.LOCAL:
            # Copy-on-write of a local cluster: read, verify and patch it in the reused scratch
            # buffer, which store_cluster hashes and writes (no allocation, no copy).
            mv = self._scratch
            if self._f.preadv(mv, e[4]) != cs or _xxh(mv) != e[5]:
                self._cluster(ci, e)  # raises the precise error
                raise IntegrityError(f"cluster at guest offset {ci * cs:#x} changed while read")
            mv[a : a + len(piece)] = piece
            self.store_cluster(ci, e, mv)
            return
        buf = bytearray(self.read_cluster(ci))
        buf[a : a + len(piece)] = piece
        self.store_cluster(ci, e, bytes(buf))

    def store_cluster(self, ci: int, e: tuple, content: bytes | memoryview) -> None:
        """Make guest cluster ``ci`` hold ``content`` (cluster_size bytes), copy-on-write."""
        if content == self._zeros:
            self._release(e)
            self._set_entry(ci, L.ZERO)
            return
        csum = _xxh(content)
        if self._compress:
            frame = self._cctx.compress(content)
            if len(frame) < self.cluster_size:
                host = self._pack_alloc(len(frame))
                self._pwrite(frame, host)
                self._release(e)  # only once the new copy is written
                self._set_entry(ci, L.COMPRESSED, host, csum, len(frame))
                return
        if e[0] == L.LOCAL and self._alloc.can_overwrite(e[4] >> self.cluster_bits):
            self._pwrite(content, e[4])
            self._set_entry(ci, L.LOCAL, e[4], csum)
            return
        host = self._alloc.alloc() << self.cluster_bits
        self._pwrite(content, host)
        self._release(e)
        self._set_entry(ci, L.LOCAL, host, csum)

    def _pwrite(self, data: bytes | memoryview, offset: int) -> None:
        """Every write of the image goes here: after a failed one (ENOSPC, EIO) the in-memory
        state may describe bytes that are not on disk, so the image stops accepting writes."""
        if offset + len(data) > self._grown_to and self._grown_to:
            self._preallocate(offset + len(data))
        try:
            self._f.pwrite(data, offset)
        except OSError:
            self._failed = True
            raise

    def _preallocate(self, end: int) -> None:
        """Grow the file past ``end`` with fallocate: by an eighth of its size, 1..64 MiB."""
        start = self._grown_to
        chunk = min(64 << 20, max(1 << 20, start >> 3, self.cluster_size))
        new = (end + chunk + self._mask) & ~self._mask
        if self._f.allocate(start, new - start):
            self._grown_to = new
        else:
            self._grown_to = 0  # not supported here: stop trying

    def _trim_preallocation(self) -> None:
        """At close, after the last commit: give back the tail past the image end (preallocated
        by this writer, or left by one that crashed): nothing the committed header references
        lies there."""
        if self._failed or self.dirty:
            return
        end = len(self._alloc) * self.cluster_size
        try:
            if self._f.size() > end:
                self._f.truncate(end)
        except OSError as e:  # best effort: the tail is allowed (spec section 2)
            log.warning("%s: could not trim the file to the image end: %s", self.path, e)

    def _pack_alloc(self, n: int) -> int:
        cs = self.cluster_size
        if self._pack is not None:
            c, used = self._pack
            if used + n <= cs and c in self._alloc.fresh:
                self._alloc.incref(c)
                self._pack = (c, used + n)
                return c * cs + used
        c = self._alloc.alloc()
        self._pack = (c, n)
        return c * cs

    def set_remote(self, ci: int, oid: bytes, csum: int) -> None:
        """Point guest cluster ``ci`` at a remote object (used by push)."""
        self._writable()
        e = self.entry(ci)
        self._release(e)
        self._punch = True
        self._set_entry(ci, L.REMOTE, 0, csum, 0, oid)
        if not self._h.incompatible & L.INCOMPAT_REMOTE:
            self._h.incompatible |= L.INCOMPAT_REMOTE
            self._header_dirty = True

    def write_zeroes(self, offset: int, length: int) -> None:
        """Guest range reads as zeros; whole clusters become ZERO entries (space freed)."""
        self._zero_range(offset, length, discard=False)

    def discard(self, offset: int, length: int) -> None:
        """Free the range. Whole clusters become unallocated (ZERO over a backing file so the
        backing data does not reappear); partial clusters are zeroed."""
        self._zero_range(offset, length, discard=True)

    def _zero_range(self, offset: int, length: int, discard: bool) -> None:
        self._writable()
        self._check_range(offset, length)
        self._punch = True
        pos, end, cs = offset, offset + length, self.cluster_size
        new_type = L.UNALLOCATED if discard and not self._h.backing_name else L.ZERO
        while pos < end:
            ci = pos >> self.cluster_bits
            a = pos & self._mask
            n = min(cs - a, end - pos)
            if n == cs or (pos + n == self.size and a == 0):
                e = self.entry(ci)
                if e[0] != new_type:
                    self._release(e)
                    self._set_entry(ci, new_type)
            else:
                e = self.entry(ci)
                if not (e[0] == L.ZERO or (e[0] == L.UNALLOCATED and not self._h.backing_name)):
                    self._write_cluster(ci, a, bytes(n))
            pos += n

    # ------------------------------------------------------------------ commit
    @property
    def dirty(self) -> bool:
        return bool(
            self._dirty_l2
            or self._unsummed
            or self._l1_dirty
            or self._snap_dirty
            or self._header_dirty
            or self._alloc.dirty_blocks
        )

    @property
    def sequence(self) -> int:
        return self._h.sequence

    def flush(self) -> None:
        """Commit (spec section 7): new metadata to fresh clusters, fsync, then the header into
        the slot that does not hold the committed one, fsync. Nothing before the header write
        touches anything the committed header references."""
        if self.readonly or self._closed or self._failed:
            return
        if self._h.autoclear & ~L.KNOWN_AUTOCLEAR:
            self._h.autoclear &= L.KNOWN_AUTOCLEAR
            self._header_dirty = True
        if not self.dirty:
            return
        self._settle_all()
        self._place_l2_tables()
        if self._l1_dirty:
            new_bytes = len(self._l1) * L.L1_ENTRY_SIZE
            self._l1_off = self._relocate_run(self._l1_off, self._l1_nbytes, new_bytes)
            self._l1_nbytes = new_bytes
        snap_bytes = self._place_snapshot_table()
        rct_off = self._place_refcounts()
        try:
            table_sum = self._write_metadata(snap_bytes, rct_off)
            self._f.fsync()
            h = dataclasses.replace(
                self._h,
                sequence=self._h.sequence + 1,
                virtual_size=self.size,
                l1_offset=self._l1_off,
                l1_checksum=self._l1_sum,
                l1_entries=len(self._l1),
                refcount_table_offset=rct_off,
                refcount_table_checksum=table_sum,
                refcount_table_entries=len(self._rct),
                snapshots_offset=self._snap_off,
                snapshots_checksum=self._snap_sum,
                snapshots_size=self._snap_size,
                nb_snapshots=len(self.snapshots),
                host_clusters=len(self._alloc),
            )
            # The commit point.
            self._pwrite(L.pack_header(h), L.HEADER_SLOT_OFFSETS[h.sequence % 2])
            self._f.fsync()
        except OSError:
            # After a failed write or fsync the page cache cannot be trusted (and a retry could
            # overwrite the committed slot): stop writing. The committed state on disk is intact.
            self._failed = True
            raise
        self._h = h
        # Committed: freed clusters become reusable. After a discard, a push or a shrink they
        # are also punched out of the file so the space goes back to the host (only now: the
        # committed header no longer references them).
        freed = self._alloc.commit()
        if self._punch and freed:
            self._punch_runs(freed)
        self._punch = False
        self._dirty_l2.clear()
        self._l1_dirty = self._snap_dirty = self._header_dirty = False
        self._pack = None
        log.debug("%s: committed sequence %d, %d clusters freed", self.path, h.sequence, len(freed))

    def _place_l2_tables(self) -> None:
        """Give every changed L2 table a cluster it may write: its own if fresh and unshared,
        else a new one (the old stays for the committed header or the snapshots sharing it)."""
        al, bits = self._alloc, self.cluster_bits
        for idx in sorted(self._dirty_l2):
            off = self._l1[idx][0]
            t = self._l2cache[idx]
            if not any(t[0 : len(t) : L.L2_ENTRY_SIZE]):  # every entry unallocated: drop it
                if off:
                    al.decref(off >> bits)
                self._l1[idx] = (0, 0)
                del self._l2cache[idx]
            elif off == 0 or not al.can_overwrite(off >> bits):
                new = al.alloc() << bits
                if off:
                    al.decref(off >> bits)
                self._l1[idx] = (new, 0)
            self._l1_dirty = True

    def _place_snapshot_table(self) -> bytes:
        if not self._snap_dirty:
            return b""
        snap_bytes = L.pack_snapshots(self.snapshots)
        if self.snapshots:
            self._snap_off = self._relocate_run(self._snap_off, self._snap_size, len(snap_bytes))
        else:
            self._relocate_run(self._snap_off, self._snap_size, 0)
            self._snap_off = 0
        self._snap_size = len(snap_bytes)
        return snap_bytes

    def _place_refcounts(self) -> int:
        """Place changed refcount blocks and the table, to a fixed point: allocating clusters
        for them changes refcounts too. Returns the table's offset."""
        al, cs, bits, rct = self._alloc, self.cluster_size, self.cluster_bits, self._rct
        rct_off = self._h.refcount_table_offset
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
            if want != rct_bytes or not self._run_overwritable(rct_off, rct_bytes):
                rct_off = self._relocate_run(rct_off, rct_bytes, want)
                rct_bytes = want
                changed = True
            if not changed:
                return rct_off

    def _write_metadata(self, snap_bytes: bytes, rct_off: int) -> int:
        """Write the placed tables; checksums flow upward (L2 -> L1 -> header, block -> table).
        Returns the refcount table's checksum."""
        w, al, cs, rct = self._pwrite, self._alloc, self.cluster_size, self._rct
        for idx in sorted(self._dirty_l2):
            if idx in self._l2cache:
                t = bytes(self._l2cache[idx])
                off = self._l1[idx][0]
                w(t, off)
                self._l1[idx] = (off, _xxh(t))
        if self._l1_dirty:
            l1_bytes = L.pack_l1(self._l1)
            w(l1_bytes, self._l1_off)
            self._l1_sum = _xxh(l1_bytes)
        if self._snap_dirty:
            if self.snapshots:
                w(snap_bytes, self._snap_off)
            self._snap_sum = _xxh(snap_bytes) if self.snapshots else 0
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
        bits = self.cluster_bits
        start = prev = clusters[0]
        for c in clusters[1:] + [-1]:
            if c != prev + 1:
                self._f.punch(start << bits, (prev - start + 1) << bits)
                start = c
            prev = c

    def _run_overwritable(self, off: int, nbytes: int) -> bool:
        if off == 0:
            return False
        first = off >> self.cluster_bits
        n = L.clusters_for(nbytes, self.cluster_size)
        return all(self._alloc.can_overwrite(c) for c in range(first, first + n))

    def _relocate_run(self, off: int, old_bytes: int, new_bytes: int) -> int:
        """Where a contiguous table of ``new_bytes`` goes: in place if allowed, else a new run."""
        cs = self.cluster_size
        old_n = L.clusters_for(old_bytes, cs) if off else 0
        same_size = new_bytes and off and old_n == L.clusters_for(new_bytes, cs)
        if same_size and self._run_overwritable(off, old_bytes):
            return off
        for c in range(off >> self.cluster_bits, (off >> self.cluster_bits) + old_n):
            self._alloc.decref(c)
        if not new_bytes:
            return 0
        return self._alloc.alloc_run(L.clusters_for(new_bytes, cs)) << self.cluster_bits

    # ------------------------------------------------------------------ resize / backing
    def resize(self, new_size: int) -> None:
        """Grow or shrink the virtual disk. Shrinking frees everything past the new end."""
        self._writable()
        if new_size % L.SECTOR or new_size < 0 or new_size > L.MAX_VIRTUAL_SIZE:
            raise UsageError(f"size {new_size} must be a multiple of 512")
        if L.l1_entries_for(new_size, self.cluster_size) > MAX_L1_ENTRIES:
            raise UsageError(f"size {new_size} exceeds this implementation's limit")
        self._settle_all()
        old, cs = self.size, self.cluster_size
        if new_size < old:
            self._punch = True
            tail = new_size & self._mask
            if tail:
                self._zero_range(new_size, min(cs - tail, old - new_size), discard=False)
            first = -(-new_size // cs)
            for ci in range(first, -(-old // cs)):
                e = self.entry(ci)
                if e[0] != L.UNALLOCATED:
                    self._release(e)
                    self._set_entry(ci, L.UNALLOCATED)
            # Keep every guest cluster index usable for tables that shrink.
        self._set_l1_size(L.l1_entries_for(new_size, cs))
        self.size = new_size
        self._header_dirty = True
        if new_size > old and self._h.backing_name and self._backing().size > old:
            self.write_zeroes(old, min(new_size, self.backing.size) - old)

    def _set_l1_size(self, n: int) -> None:
        if n == len(self._l1):
            return
        while len(self._l1) > n:
            idx = len(self._l1) - 1
            off = self._l1[idx][0]
            t = self._l2cache.pop(idx, None)
            self._dirty_l2.discard(idx)
            if t is not None or off:
                if t is None:
                    t = self.load_l2(off, self._l1[idx][1], idx)
                for e in _ENTRY.iter_unpack(t):
                    self._release(e)
            if off:
                self._alloc.decref(off >> self.cluster_bits)
            self._l1.pop()
        while len(self._l1) < n:
            self._l1.append((0, 0))
        self._l1_dirty = True

    @property
    def backing_name(self) -> str:
        return self._h.backing_name

    @property
    def backing_format(self) -> str:
        return L.BACKING_FORMATS[self._h.backing_format]

    @property
    def header(self) -> L.Header:
        return self._h

    def set_backing(self, name: str | None, fmt: str | None) -> None:
        """Change the backing reference (no data is copied: that is rebase's job)."""
        self._writable()
        if name:
            if len(name.encode()) > L.MAX_BACKING_NAME:
                raise UsageError("backing file name too long")
            fmt = fmt or _probe_format(_resolve_rel(name, self.path))
            if fmt not in L.BACKING_FORMAT_CODES:
                raise UsageError(f"backing format {fmt!r} not supported (raw or vimg)")
        # Open the new chain first: a missing file or a loop must leave the image unchanged.
        new = None
        if name:
            assert fmt is not None
            new = _open_layer(name, fmt, self.path, self.resolver, (os.path.realpath(self.path),))
        if self.backing is not None:
            self.backing.close()
        self.backing = new
        self._h.backing_name = name or ""
        self._h.backing_format = L.BACKING_FORMAT_CODES[fmt] if name and fmt else L.BACKING_NONE
        self._header_dirty = True

    # ------------------------------------------------------------------ introspection
    @property
    def guest_clusters(self) -> int:
        return -(-self.size // self.cluster_size)


# ---------------------------------------------------------------------- helpers
def read_current_header(f: ImageFile) -> L.Header:
    """The intact header slot with the higher sequence number (crash model, spec section 7).

    A slot that fails its checksum is a torn write (or damage) and is ignored; the chosen slot is
    then parsed fully, so an unknown incompatible feature in it is refused, never skipped."""
    buf = f.pread(L.HEADER_AREA, 0)
    best: tuple[int, int] | None = None
    for off in L.HEADER_SLOT_OFFSETS:
        seq = L.slot_sequence(buf[off : off + L.HEADER_SLOT_SIZE])
        if seq is not None and (best is None or seq > best[0]):
            best = (seq, off)
    if best is None:
        if not any(buf[o : o + 8] == L.MAGIC for o in L.HEADER_SLOT_OFFSETS):
            raise FormatError(f"{f.path}: not a vimg image")
        raise FormatError(f"{f.path}: no valid vimg header (both slots fail their checksum)")
    return L.unpack_header(buf[best[1] : best[1] + L.HEADER_SLOT_SIZE])


def _resolve_rel(name: str, image_path: str) -> str:
    if os.path.isabs(name):
        return name
    return os.path.join(os.path.dirname(os.path.abspath(image_path)), name)


def _probe_format(path: str) -> str:
    from vfs.image.qemu import probe_format

    if not os.path.exists(path):
        raise UsageError(f"backing file {path!r} does not exist")
    return probe_format(path)


def _probe_size(backing: str, image_path: str) -> int:
    p = _resolve_rel(backing, image_path)
    if _probe_format(p) == "vimg":
        with Image.open(p, readonly=True) as b:
            return b.size
    return os.path.getsize(p)


def open_backing(img: Image, chain: tuple[str, ...]) -> Backing:
    """Open ``img``'s backing file (read-only), refusing loops and absurd depths."""
    return _open_layer(img.backing_name, img.backing_format, img.path, img.resolver, chain)


def _open_layer(
    name: str, fmt: str, image_path: str, resolver: Resolver | None, chain: tuple[str, ...]
) -> Backing:
    path = _resolve_rel(name, image_path)
    real = os.path.realpath(path)
    if real in chain:
        raise FormatError(f"backing chain loops back to {path}")
    if len(chain) >= MAX_CHAIN_DEPTH:
        raise FormatError("backing chain too deep")
    if not os.path.exists(path):
        raise NotFound(f"backing file {name!r} of {image_path} not found")
    if fmt == "raw":
        return RawFile(path)
    return Image.open(path, readonly=True, resolver=resolver, _chain=chain)


def _fsync_dir(path: str) -> None:
    fd = os.open(os.path.dirname(os.path.abspath(path)), os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
