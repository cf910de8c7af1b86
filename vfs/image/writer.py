"""Copy-on-write writes of guest bytes: where each cluster goes, zeroing and discard, zstd frames.

Rules (spec 5.2): a cluster is written in place only if it is *fresh* (allocated since the last
commit) and this root is its only user; otherwise it goes to a new cluster and the old one's
count drops. A data cluster is always written before the entry pointing at it changes, and
before the old copy is released. Metadata is written only by the commit.

Hot paths:
- whole-cluster writes go where copy-on-write puts them, host-contiguous ones in one ``pwrite``;
- a partial write to a fresh cluster verifies the cluster the first time and keeps the sum of
  each of its 4 KiB subclusters, then writes only the changed bytes to the file, reading back
  (and verifying) only the subclusters it covers in part: the cluster's checksum is computed
  once, at the commit or the next read, from the file verified subcluster by subcluster
  against those sums (the bytes the guest wrote, never blessing damage to the file copy:
  implementation notes 13.3, ``Core.unsummed``). The copy-on-write of a cluster starts
  in that state (no checksum computed for a cluster about to be rewritten);
- the file grows ahead of appended clusters with ``fallocate`` (trimmed back at close).
"""

from __future__ import annotations

import logging
from array import array
from collections.abc import Callable

import xxhash
import zstandard

from vfs.errors import IntegrityError
from vfs.image import layout as L
from vfs.image.core import Core
from vfs.image.reader import Reader

log = logging.getLogger(__name__)
_xxh = xxhash.xxh3_64_intdigest
_ENTRY = L.L2_ENTRY
_ESIZE = L.L2_ENTRY_SIZE

#: Called with (offset, length) of every guest range a write path changes (dirty tracking).
Marker = Callable[[int, int], None]


class Writer:
    def __init__(self, core: Core, reader: Reader) -> None:
        self.c = core
        self.reader = reader
        self._cctx = zstandard.ZstdCompressor(level=3)
        #: Preallocation: the file is grown with fallocate ahead of appended clusters (writing
        #: into reserved blocks is faster than extending the file); what is left past the
        #: image end is given back at close. 0: off (read-only, or not supported).
        self.grown_to = 0 if core.readonly else core.f.size()
        #: Dirty trackers (persistent bitmaps): every guest range a write path changes.
        self.markers: list[Marker] = []

    def mark(self, offset: int, length: int) -> None:
        for m in self.markers:
            m(offset, length)

    # ------------------------------------------------------------------ data writes
    def write(self, offset: int, data: bytes | bytearray | memoryview) -> None:
        """Write guest bytes (durable after the next commit)."""
        c = self.c
        if c.readonly or c.closed or c.failed is not None:
            c.writable()  # raises
        if type(data) is memoryview and (data.format != "B" or data.ndim != 1):
            data = data.cast("B")
        n = len(data)
        if offset < 0 or offset + n > c.size:
            c.check_range(offset, n)  # raises
        if self.markers:
            self.mark(offset, n)
        bits, mask, cs = c.cluster_bits, c.mask, c.cluster_size
        a = offset & mask
        if a + n <= cs and 0 < n < cs:
            # The hot path of small guest writes: part of one cluster (``Core.entry_raw``
            # and ``Allocator.can_overwrite`` inlined: a call costs as much as the check).
            ci = offset >> bits
            t = c.l2cache.get(ci // c.per_l2)
            e = c.entry_raw(ci) if t is None else _ENTRY.unpack_from(t, (ci % c.per_l2) * _ESIZE)
            if e[0] == L.LOCAL and not c.compress:
                hc = e[4] >> bits
                al = c.alloc
                if hc in al.fresh and al.counts[hc] == 1:
                    self._rewrite_fresh(ci, e, a, data)
                    return
            self._write_cluster(ci, a, data)
            return
        pos, end = offset, offset + n
        view = memoryview(data)
        compress = c.compress
        while pos < end:
            ci = pos >> bits
            a = pos & mask
            n = min(cs - a, end - pos)
            if not a and n == cs and not compress:
                k = (end - pos) >> bits  # whole clusters from here on
                self._write_whole(ci, view[pos - offset : pos - offset + k * cs], k)
                pos += k * cs
                continue
            self._write_cluster(ci, a, view[pos - offset : pos - offset + n])
            pos += n

    def _write_whole(self, ci: int, view: memoryview, k: int) -> None:
        """Store ``k`` whole clusters from ``ci`` (uncompressed image): each goes where
        :meth:`store_cluster` would put it, and clusters whose host clusters follow each other
        are written with one ``pwrite``."""
        c = self.c
        cs, bits, al, zeros = c.cluster_size, c.cluster_bits, c.alloc, c.zeros
        plan: list[tuple[int, tuple, int, bool]] = []  # (j, old entry, host offset, new?)
        for j in range(k):
            piece = view[j * cs : (j + 1) * cs]
            e = c.entry_raw(ci + j)  # replaced whole: a stale checksum does not matter
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
        c = self.c
        cs = c.cluster_size
        i = 0
        while i < len(plan):
            j0, _, h0, _ = plan[i]
            m = i + 1
            while m < len(plan) and plan[m][0] == j0 + m - i and plan[m][2] == h0 + (m - i) * cs:
                m += 1
            self.pwrite(view[j0 * cs : (j0 + m - i) * cs], h0)
            for j, e, host, new in plan[i:m]:
                c.set_entry(ci + j, L.LOCAL, host, _xxh(view[j * cs : (j + 1) * cs]))
                if new:
                    c.release(e)
            i = m

    def _write_cluster(self, ci: int, a: int, piece: memoryview | bytes) -> None:
        c = self.c
        cs = c.cluster_size
        e = c.entry_raw(ci)
        if len(piece) == cs:
            self.store_cluster(ci, e, piece)  # no copy: hashed and written from the caller's buffer
            return
        if e[0] == L.LOCAL and not c.compress and c.alloc.can_overwrite(e[4] >> c.cluster_bits):
            self._rewrite_fresh(ci, e, a, piece)
            return
        if ci in c.unsummed:  # not reached: only fresh LOCAL clusters are unsummed
            c.settle(ci)
            e = c.entry_raw(ci)
        if e[0] == L.LOCAL:
            # Copy-on-write of a local cluster: read, verify and patch it in the reused scratch
            # buffer (no allocation, no copy), write it whole to a new cluster.
            mv = c.scratch
            if c.f.preadv(mv, e[4]) != cs or _xxh(mv) != e[5]:
                self.reader.cluster(ci, e)  # raises the precise error
                raise IntegrityError(f"cluster at guest offset {ci * cs:#x} changed while read")
            mv[a : a + len(piece)] = piece
            if c.compress or mv == c.zeros:
                self.store_cluster(ci, e, mv)
                return
            # The copy is fresh: later partial writes rewrite it in place, so its checksum is
            # left stale from the start (its subcluster sums cost what the checksum would).
            host = c.alloc.alloc() << c.cluster_bits
            self.pwrite(mv, host)
            c.release(e)
            self._stale(ci, host, c.subsums(mv))
            return
        buf = bytearray(self.reader.read_cluster(ci))
        buf[a : a + len(piece)] = piece
        self.store_cluster(ci, e, bytes(buf))

    def _rewrite_fresh(self, ci: int, e: tuple, a: int, piece: memoryview | bytes) -> None:
        """Write part of a fresh cluster (only this root uses it) in place: only the changed
        bytes go to the file. Its checksum is left stale and the sum of each of its
        subclusters kept instead (``Core.unsummed``): the subclusters the write covers in part
        are read back and verified against their sums, patched and summed again; the checksum
        of the whole cluster is computed once, at the commit (or when something reads it
        first), from the file verified against these sums. The first partial write since the
        checksum was computed reads and verifies the whole cluster."""
        c = self.c
        cs, sub = c.cluster_size, c.sub
        unsummed = c.unsummed
        host = e[4]
        sums = unsummed.get(ci)
        if sums is None:
            if len(unsummed) >= c.unsummed_limit:
                c.settle(next(iter(unsummed)))  # oldest first: bounded memory
            mv = c.scratch
            if c.f.preadv(mv, host) != cs or _xxh(mv) != e[5]:
                self.reader.cluster(ci, e)  # raises the precise error
                raise IntegrityError(f"cluster at guest offset {ci * cs:#x} changed while read")
            sums = c.subsums(mv)
            unsummed[ci] = sums
        n = len(piece)
        s0, s1 = a // sub, (a + n - 1) // sub + 1  # subclusters [s0, s1) are touched
        lo = s0 * sub
        if a == lo and a + n == s1 * sub:  # whole subclusters: nothing to read
            for k in range(s0, s1):
                o = (k - s0) * sub
                sums[k] = _xxh(piece[o : o + sub])
            self.pwrite(piece, host + a)
            return
        buf = c.scratch[: (s1 - s0) * sub]
        head, tail = a != lo, a + n != s1 * sub
        if head and tail and s1 - s0 <= 2:
            self._read_subs(ci, host, buf, s0, s1, sums)
        else:
            if head:
                self._read_subs(ci, host, buf[:sub], s0, s0 + 1, sums)
            if tail:
                self._read_subs(ci, host, buf[-sub:], s1 - 1, s1, sums)
        buf[a - lo : a - lo + n] = piece
        for k in range(s0, s1):
            o = (k - s0) * sub
            sums[k] = _xxh(buf[o : o + sub])
        self.pwrite(piece, host + a)

    def _read_subs(
        self, ci: int, host: int, buf: memoryview, s0: int, s1: int, sums: array
    ) -> None:
        """Read subclusters [s0, s1) of a stale cluster into ``buf``, each verified against
        the sum of what was written to it."""
        c = self.c
        sub = c.sub
        got = c.f.preadv(buf, host + s0 * sub)
        for k in range(s0, s1):
            o = (k - s0) * sub
            if got < o + sub or _xxh(buf[o : o + sub]) != sums[k]:
                raise IntegrityError(
                    f"cluster at guest offset {ci * c.cluster_size:#x} (host offset "
                    f"{host:#x}): bytes written since the last commit were damaged in the file"
                )

    def _stale(self, ci: int, host: int, sums: array) -> None:
        """Point ``ci`` at the fresh LOCAL cluster ``host`` whose checksum is left stale."""
        c = self.c
        unsummed = c.unsummed
        if len(unsummed) >= c.unsummed_limit:
            c.settle(next(iter(unsummed)))
        c.set_entry(ci, L.LOCAL, host, 0)
        unsummed[ci] = sums

    def store_cluster(
        self, ci: int, e: tuple, content: bytes | memoryview, *, keep_zeros: bool = False
    ) -> None:
        """Make guest cluster ``ci`` hold ``content`` (cluster_size bytes), copy-on-write.
        All-zero content becomes a ZERO entry unless ``keep_zeros`` (stored, allocated)."""
        c = self.c
        if not keep_zeros and content == c.zeros:
            c.release(e)
            c.set_entry(ci, L.ZERO)
            return
        csum = _xxh(content)
        if c.compress:
            frame = self._cctx.compress(content)
            if len(frame) < c.cluster_size:
                host = self._pack_alloc(len(frame))
                self.pwrite(frame, host)
                c.release(e)  # only once the new copy is written
                c.set_entry(ci, L.COMPRESSED, host, csum, len(frame))
                return
        if e[0] == L.LOCAL and c.alloc.can_overwrite(e[4] >> c.cluster_bits):
            self.pwrite(content, e[4])
            c.set_entry(ci, L.LOCAL, e[4], csum)
            return
        host = c.alloc.alloc() << c.cluster_bits
        self.pwrite(content, host)
        c.release(e)
        c.set_entry(ci, L.LOCAL, host, csum)

    def _pack_alloc(self, n: int) -> int:
        c = self.c
        cs = c.cluster_size
        if c.pack is not None:
            hc, used = c.pack
            if used + n <= cs and hc in c.alloc.fresh:
                c.alloc.incref(hc)
                c.pack = (hc, used + n)
                return hc * cs + used
        hc = c.alloc.alloc()
        c.pack = (hc, n)
        return hc * cs

    def set_remote(self, ci: int, oid: bytes, csum: int) -> None:
        """Point guest cluster ``ci`` at a remote object (used by push)."""
        c = self.c
        c.writable()
        e = c.entry(ci)
        c.release(e)
        c.punch = True
        c.set_entry(ci, L.REMOTE, 0, csum, 0, oid)
        if not c.header.incompatible & L.INCOMPAT_REMOTE:
            c.header.incompatible |= L.INCOMPAT_REMOTE
            c.header_dirty = True

    def drop_cluster(self, ci: int) -> None:
        """Make guest cluster ``ci`` unallocated in this layer (reads fall through)."""
        c = self.c
        c.writable()
        e = c.entry(ci)
        if e[0] != L.UNALLOCATED:
            c.punch = True
            c.release(e)
            c.set_entry(ci, L.UNALLOCATED)

    # ------------------------------------------------------------------ zeroing
    def zero_range(self, offset: int, length: int, *, discard: bool, unmap: bool = True) -> None:
        """Zero (or discard) a guest range. Whole clusters become ZERO entries, or UNALLOCATED
        when discarding without a backing file (both free their space); with ``unmap`` False
        they stay allocated (stored zeros). Partial clusters are zeroed in place."""
        c = self.c
        c.writable()
        c.check_range(offset, length)
        if self.markers and length:
            self.mark(offset, length)
        c.punch = True
        pos, end, cs = offset, offset + length, c.cluster_size
        new_type = L.UNALLOCATED if discard and not c.header.backing_name else L.ZERO
        while pos < end:
            ci = pos >> c.cluster_bits
            a = pos & c.mask
            n = min(cs - a, end - pos)
            if not unmap:
                e = c.entry(ci)
                if n == cs or (pos + n == c.size and a == 0):
                    self.store_cluster(ci, e, c.zeros, keep_zeros=True)
                else:
                    self._write_cluster(ci, a, c.zeros[:n])
            elif n == cs or (pos + n == c.size and a == 0):
                e = c.entry(ci)
                if e[0] != new_type:
                    c.release(e)
                    c.set_entry(ci, new_type)
            else:
                e = c.entry(ci)
                if not (e[0] == L.ZERO or (e[0] == L.UNALLOCATED and not c.header.backing_name)):
                    self._write_cluster(ci, a, c.zeros[:n])
            pos += n

    # ------------------------------------------------------------------ the file
    def pwrite(self, data: bytes | memoryview, offset: int) -> None:
        """Every write of the image goes here: after a failed one (ENOSPC, EIO) the in-memory
        state may describe bytes that are not on disk, so the image stops accepting writes."""
        if offset + len(data) > self.grown_to and self.grown_to:
            self._preallocate(offset + len(data))
        try:
            self.c.f.pwrite(data, offset)
        except OSError as e:
            self.c.failed = e
            raise

    def _preallocate(self, end: int) -> None:
        """Grow the file past ``end`` with fallocate: by an eighth of its size, 1..64 MiB."""
        start = self.grown_to
        chunk = min(64 << 20, max(1 << 20, start >> 3, self.c.cluster_size))
        new = (end + chunk + self.c.mask) & ~self.c.mask
        if self.c.f.allocate(start, new - start):
            self.grown_to = new
        else:
            self.grown_to = 0  # not supported here: stop trying

    def trim_preallocation(self, dirty: bool) -> None:
        """At close, after the last commit: give back the tail past the image end (preallocated
        by this writer, or left by one that crashed): nothing the committed header references
        lies there."""
        c = self.c
        if c.failed is not None or dirty:
            return
        end = len(c.alloc) * c.cluster_size
        try:
            if c.f.size() > end:
                c.f.truncate(end)
        except OSError as e:  # best effort: the tail is allowed (spec section 2)
            log.warning("%s: could not trim the file to the image end: %s", c.path, e)
