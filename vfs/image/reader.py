"""Reads of guest bytes: address translation, verified cluster reads, codecs, the backing file.

Hot paths (measured with ``vimg bench`` / ``python -m tools.bench.image``):
- a read of part of a local cluster is one L2 lookup in a cached bytearray, one ``preadv`` of
  the whole cluster into a reused scratch buffer (its xxh3 must be verified) and one copy out;
- whole clusters that are host-contiguous are one ``preadv`` straight into the caller's buffer
  (:meth:`Reader.readinto`) or one ``pread`` (:meth:`Reader.read`), then one xxh3 per cluster.
Every LOCAL, COMPRESSED or REMOTE cluster touched is verified against its entry's checksum
before any of its bytes are returned (spec 4.3).
"""

from __future__ import annotations

import hashlib

import xxhash
import zstandard

from vfs.errors import IntegrityError, UsageError
from vfs.image import layout as L
from vfs.image.core import Core

_xxh = xxhash.xxh3_64_intdigest


class Reader:
    def __init__(self, core: Core) -> None:
        self.c = core
        self._dctx = zstandard.ZstdDecompressor()

    def read(self, offset: int, length: int) -> bytes | bytearray:
        """Guest bytes; every stored cluster touched is checksum-verified.

        Whole local clusters are read straight into the result buffer, which is returned as is
        (a bytearray when the range spans clusters): one allocation per call and no copies,
        the hot path of large sequential reads. A range that is one run of host-contiguous
        local clusters is one ``pread`` (no zero-filled buffer at all)."""
        c = self.c
        c.check_range(offset, length)
        cs, bits, mask = c.cluster_size, c.cluster_bits, c.mask
        if length <= cs - (offset & mask):  # within one cluster: no assembly needed
            return self.piece(offset >> bits, offset & mask, length)
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
        c = self.c
        cs, entry = c.cluster_size, c.entry
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
        data = c.f.pread(k * cs, host)
        self._verify_run(ci, memoryview(data), sums, len(data))
        return data

    def _verify_run(self, ci: int, mv: memoryview, sums: list[int], got: int) -> None:
        """Check the clusters read into ``mv`` (``got`` bytes) against their checksums."""
        cs = self.c.cluster_size
        xxh = _xxh
        for j, s in enumerate(sums):
            o = j * cs
            if got < o + cs or xxh(mv[o : o + cs]) != s:
                self.cluster(ci + j, self.c.entry(ci + j))  # re-read the slow way: precise error
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
        c = self.c
        c.check_range(offset, length)
        cs, bits, mask = c.cluster_size, c.cluster_bits, c.mask
        entry, readinto = c.entry, c.f.preadv
        no_backing = not c.header.backing_name
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
                scratch = c.scratch
                if readinto(scratch, e[4]) != cs or _xxh(scratch) != e[5]:
                    self.cluster(ci, e)  # raises the precise error
                    raise IntegrityError(f"cluster at guest offset {ci * cs:#x} changed while read")
                mv[o : o + n] = scratch[a : a + n]
            elif t == L.ZERO or (t == L.UNALLOCATED and no_backing):
                mv[o : o + n] = c.zeros[:n] if n < cs else c.zeros
            else:
                mv[o : o + n] = self.piece(ci, a, n, e)
            pos += n
        return length

    def piece(self, ci: int, a: int, n: int, e: tuple | None = None) -> bytes:
        """``n`` guest bytes at offset ``a`` inside cluster ``ci``."""
        c = self.c
        cs = c.cluster_size
        if e is None:
            e = c.entry(ci)
        t = e[0]
        if t == L.LOCAL and n < cs:
            # verified in the reused scratch buffer: only the n bytes asked for are allocated
            scratch = c.scratch
            if c.f.preadv(scratch, e[4]) != cs or _xxh(scratch) != e[5]:
                self.cluster(ci, e)  # raises the precise error
                raise IntegrityError(f"cluster at guest offset {ci * cs:#x} changed while read")
            return bytes(scratch[a : a + n])
        if t == L.LOCAL or t == L.COMPRESSED or t == L.REMOTE:
            data = self.cluster(ci, e)
            return data if n == cs else data[a : a + n]
        if t == L.ZERO or not c.header.backing_name:
            return c.zeros[:n] if n < cs else c.zeros
        return self.read_backing(ci * cs + a, n)

    def read_backing(self, pos: int, n: int) -> bytes:
        c = self.c
        b = c.backing
        if b is None:
            raise UsageError(
                f"{c.path} was opened without its backing file {c.header.backing_name!r}"
            )
        if pos >= b.size:
            return bytes(n)
        if pos + n <= b.size:
            return b.read(pos, n)
        return b.read(pos, b.size - pos) + bytes(pos + n - b.size)

    def cluster(self, ci: int, e: tuple) -> bytes:
        """The verified content of a stored cluster (LOCAL, COMPRESSED or REMOTE)."""
        c = self.c
        cs = c.cluster_size
        t, host = e[0], e[4]
        where = f"cluster at guest offset {ci * cs:#x}"
        if t == L.LOCAL:
            data = c.f.pread(cs, host)
            if len(data) != cs:
                raise IntegrityError(
                    f"{where}: short read at host offset {host:#x}", offset=ci * cs
                )
        elif t == L.COMPRESSED:
            frame = c.f.pread(e[3], host)
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
        elif t == L.REMOTE:
            data = self._remote(ci, e)
        else:
            raise UsageError(f"{where} stores no data ({L.ENTRY_TYPES.get(t, t)})")
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
        c = self.c
        oid = e[6].hex()
        if c.resolver is None:
            raise UsageError(
                f"cluster at guest offset {ci * c.cluster_size:#x} is remote (object {oid}); "
                "give a store/repository to read it"
            )
        # a remote cluster is exactly one cluster: a server sending more is cut off there
        data = c.resolver.get(oid, expected_size=c.cluster_size)
        if len(data) != c.cluster_size or hashlib.sha256(data).digest() != e[6]:
            raise IntegrityError(
                f"cluster at guest offset {ci * c.cluster_size:#x}: object {oid} does not "
                "match its digest",
                offset=ci * c.cluster_size,
            )
        return data

    def read_cluster(self, ci: int) -> bytes:
        """The full content of guest cluster ``ci`` as the guest sees it."""
        c = self.c
        e = c.entry(ci)
        t = e[0]
        if t == L.LOCAL or t == L.COMPRESSED or t == L.REMOTE:
            return self.cluster(ci, e)
        if t == L.ZERO or not c.header.backing_name:
            return c.zeros
        return self.read_backing(ci * c.cluster_size, c.cluster_size)
