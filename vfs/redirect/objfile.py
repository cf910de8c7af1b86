"""The local store's files for one object (store format 2): the plain bytes, and a sidecar of
per-chunk checksums for objects longer than one chunk.

``objects/ab/<id>`` holds exactly the object's bytes (holes where it has long runs of zeros), so
the kernel can read it as it is: it is the first data-only layer of the kernel engine's overlay
mounts (``docs/kernel-engine.md``) and the same file every FUSE-engine read and every image
reads. One copy on disk, whichever engine serves it.

Verification (``docs/redirect.md``, section 4):

- an object of at most one chunk (64 KiB, the common template file) is read whole when it is
  opened and checked against its id (SHA-256): small objects need no sidecar at all;
- a longer object has ``sums/ab/<id>``, the xxh3-64 of each chunk, so a partial read of a large
  object proves its bytes without hashing the whole object. Layout (little-endian)::

      0   8  magic b"VFSSUMS\\x00"
      8   4  version (1)
     12   4  incompatible feature bits (none defined; readers refuse any set bit)
     16   8  size: the object's length in bytes
     24   4  chunk size (bytes per chunk, the last may be short)
     28   4  nchunks = ceil(size / chunk size)
     32   8n xxh3-64 of each chunk
     32+8n 8 xxh3-64 of all bytes before it

A sidecar is derived data: the store rebuilds one that is missing or damaged from the object,
after checking the object against its id (:func:`sums_for`), so a damaged sidecar never costs a
good object. Reads through the kernel engine are not verified at all (no fs-verity in the
kernels this runs on): integrity at rest is checked when an object enters the store and by
``vfsd store verify``.
"""

from __future__ import annotations

import os
import struct
from array import array
from collections.abc import Iterator
from dataclasses import dataclass

import xxhash

from vfs.errors import FormatError, IntegrityError, UnsupportedFeature
from vfs.redirect.objectid import new_hasher

SUMS_MAGIC = b"VFSSUMS\x00"
SUMS_VERSION = 1
SUMS_HEADER = struct.Struct("<8sIIQII")
assert SUMS_HEADER.size == 32
DEFAULT_CHUNK = 64 * 1024
MAX_CHUNK = 16 * 1024 * 1024
#: Objects larger than this are refused (16 TiB: a sidecar of any allowed object fits in memory).
MAX_SIZE = 1 << 44
#: Granularity of holes in object files: runs of zeros this long and aligned are not written.
HOLE_BLOCK = 4096
_ZERO_BLOCK = bytes(HOLE_BLOCK)

_xxh3 = xxhash.xxh3_64_intdigest


class MissingSums(IntegrityError):
    """A large object has no usable sidecar (missing or damaged): the store rebuilds it."""


@dataclass(frozen=True)
class ChunkSums:
    """The per-chunk checksums of one object."""

    size: int
    chunk_size: int
    sums: array  # array('Q') of xxh3-64, one per chunk

    @property
    def nchunks(self) -> int:
        return len(self.sums)

    def encode(self) -> bytes:
        head = SUMS_HEADER.pack(
            SUMS_MAGIC, SUMS_VERSION, 0, self.size, self.chunk_size, len(self.sums)
        )
        body = head + self.sums.tobytes()
        return body + struct.pack("<Q", _xxh3(body))

    @classmethod
    def decode(cls, data: bytes, *, name: str = "?") -> ChunkSums:
        """Parse and check a sidecar; :class:`MissingSums` (an IntegrityError) if it is
        damaged in any way, :class:`UnsupportedFeature` if it is from a newer vfs."""
        if len(data) < SUMS_HEADER.size + 8:
            raise MissingSums(f"object {name}: checksum sidecar truncated", oid=name)
        magic, version, incompat, size, chunk, n = SUMS_HEADER.unpack_from(data)
        if magic != SUMS_MAGIC:
            raise MissingSums(f"object {name}: checksum sidecar has a bad magic", oid=name)
        if version != SUMS_VERSION or incompat:
            raise UnsupportedFeature(
                f"object {name}: checksum sidecar version {version} features {incompat:#x}"
            )
        if len(data) != SUMS_HEADER.size + 8 * n + 8:
            raise MissingSums(f"object {name}: checksum sidecar has a wrong length", oid=name)
        (check,) = struct.unpack_from("<Q", data, len(data) - 8)
        if _xxh3(data[:-8]) != check:
            raise MissingSums(f"object {name}: checksum sidecar is damaged", oid=name)
        if not (0 < chunk <= MAX_CHUNK) or size > MAX_SIZE or n != -(-size // chunk):
            raise MissingSums(f"object {name}: checksum sidecar is inconsistent", oid=name)
        sums = array("Q")
        sums.frombytes(data[SUMS_HEADER.size : -8])
        return cls(size, chunk, sums)


class SumsBuilder:
    """Chunk checksums of a byte stream, fed in pieces of any size."""

    def __init__(self, chunk_size: int = DEFAULT_CHUNK) -> None:
        self.chunk_size = chunk_size
        self._sums = array("Q")
        self._state = xxhash.xxh3_64()
        self._in_chunk = 0
        self.size = 0

    def update(self, data: bytes | bytearray | memoryview) -> None:
        view = memoryview(data)
        cs = self.chunk_size
        while view:
            take = min(cs - self._in_chunk, len(view))
            self._state.update(view[:take])
            self._in_chunk += take
            self.size += take
            view = view[take:]
            if self._in_chunk == cs:
                self._sums.append(self._state.intdigest())
                self._state.reset()
                self._in_chunk = 0

    def finish(self) -> ChunkSums:
        sums = array("Q", self._sums)
        if self._in_chunk:
            sums.append(self._state.intdigest())
        return ChunkSums(self.size, self.chunk_size, sums)


def write_sparse(fd: int, data: bytes | bytearray | memoryview, offset: int) -> None:
    """Write ``data`` at ``offset`` leaving aligned all-zero 4 KiB blocks as holes (the caller
    extends the file to its length at the end with ``ftruncate``): a sparse template file's
    object stays sparse on disk, and ``du`` in a kernel-engine VEE sees the data it has.
    A search for a run of 4096 zeros first (tens of microseconds a MiB) keeps dense data to
    one write."""
    if not isinstance(data, bytes):
        data = bytes(data)
    n = len(data)
    run_start = 0  # first byte not yet written
    pos = 0
    while True:
        hit = data.find(_ZERO_BLOCK, pos)
        if hit < 0:
            break
        a = hit + (-(offset + hit)) % HOLE_BLOCK  # the first aligned block at or after it
        if a + HOLE_BLOCK > n:
            break
        if data[a : a + HOLE_BLOCK] != _ZERO_BLOCK:
            pos = a  # the run ended before an aligned block; look further
            continue
        end = a + HOLE_BLOCK
        while end + HOLE_BLOCK <= n and data[end : end + HOLE_BLOCK] == _ZERO_BLOCK:
            end += HOLE_BLOCK
        if a > run_start:
            _pwrite_all(fd, memoryview(data)[run_start:a], offset + run_start)
        run_start = pos = end
    if run_start < n:
        _pwrite_all(fd, memoryview(data)[run_start:], offset + run_start)


def _pwrite_all(fd: int, view: memoryview, offset: int) -> None:
    while view:
        k = os.pwrite(fd, view, offset)
        view = view[k:]
        offset += k


class ObjectReader:
    """Verified random access to one plain object file. Cheap to keep open; safe to share
    between threads (only ``os.pread`` on a fixed fd, no file position).

    ``sums``: the object's sidecar (required when the object is longer than ``chunk_size``;
    :class:`MissingSums` otherwise). A small object is read whole here and checked against
    ``oid``; its bytes then stay with the reader (the store bounds how many readers it keeps).
    """

    def __init__(
        self,
        fd: int,
        oid: str,
        *,
        sums: ChunkSums | None = None,
        chunk_size: int = DEFAULT_CHUNK,
    ) -> None:
        self.fd = fd
        self.name = oid
        st = os.fstat(fd)
        self.size = st.st_size
        self.stored_size = st.st_size
        self._whole: bytes | None = None
        if self.size <= chunk_size:
            whole = os.pread(fd, self.size, 0) if self.size else b""
            if len(whole) != self.size:
                raise IntegrityError(f"object {oid}: file changed while read", oid=oid)
            h = new_hasher()
            h.update(whole)
            if h.hexdigest() != oid:
                raise IntegrityError(
                    f"object {oid}: content does not match its id (damaged file)", oid=oid
                )
            self._whole = whole
            self.chunk_size = chunk_size
            self.nchunks = 1 if self.size else 0
            self._sums = None
            return
        if sums is None:
            raise MissingSums(f"object {oid}: no checksum sidecar", oid=oid)
        if sums.size != self.size:
            raise MissingSums(
                f"object {oid}: checksum sidecar is for {sums.size} bytes, the file has "
                f"{self.size}",
                oid=oid,
            )
        self.chunk_size = sums.chunk_size
        self.nchunks = sums.nchunks
        self._sums = sums.sums

    def chunk(self, i: int) -> bytes:
        """Chunk ``i``'s verified bytes."""
        cs = self.chunk_size
        if self._whole is not None:
            if i != 0:
                raise IndexError(i)
            return self._whole
        start = i * cs
        expect = min(cs, self.size - start)
        data = os.pread(self.fd, expect, start)
        assert self._sums is not None
        if len(data) != expect or _xxh3(data) != self._sums[i]:
            raise IntegrityError(
                f"object {self.name}: checksum mismatch in chunk {i} "
                f"(bytes {start}..{start + expect})",
                oid=self.name,
                offset=start,
            )
        return data

    def read(self, offset: int, size: int) -> bytes:
        """``size`` bytes at ``offset`` (short at end of object), every touched chunk verified."""
        if offset < 0 or size < 0:
            raise ValueError("negative offset or size")
        end = min(offset + size, self.size)
        if offset >= end:
            return b""
        if self._whole is not None:
            return self._whole[offset:end]
        cs = self.chunk_size
        first, last = offset // cs, (end - 1) // cs
        if first == last:
            base = first * cs
            return self.chunk(first)[offset - base : end - base]
        parts = []
        for i in range(first, last + 1):
            data = self.chunk(i)
            base = i * cs
            parts.append(data[max(0, offset - base) : end - base])
        return b"".join(parts)

    def drop_cache(self, offset: int, size: int) -> None:
        """Drop this file's page cache up to the end of the chunks holding ``offset..+size``
        (the whole file once a read reaches the object's end): for callers that keep the bytes
        cached elsewhere (a FUSE inode), so the host does not cache them twice."""
        if self._whole is not None or offset + size >= self.size:
            length = 0  # to the end of the file
        else:
            last = (offset + size - 1) // self.chunk_size
            length = (last + 1) * self.chunk_size
        os.posix_fadvise(self.fd, 0, length, os.POSIX_FADV_DONTNEED)

    def iter_chunks(self) -> Iterator[bytes]:
        for i in range(self.nchunks):
            yield self.chunk(i)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def sums_for(fd: int, oid: str, chunk_size: int = DEFAULT_CHUNK) -> ChunkSums:
    """Recompute an object's chunk checksums from its file, checking the whole file against
    its id first: :class:`IntegrityError` if the object itself is damaged (then no sidecar can
    be trusted to describe it)."""
    size = os.fstat(fd).st_size
    if size > MAX_SIZE:
        raise FormatError(f"object {oid}: {size} bytes, more than the format allows", oid=oid)
    h = new_hasher()
    b = SumsBuilder(chunk_size)
    off = 0
    step = max(chunk_size, 1 << 20) // chunk_size * chunk_size
    while off < size:
        block = os.pread(fd, min(step, size - off), off)
        if not block:
            break
        h.update(block)
        b.update(block)
        off += len(block)
    if off != size or h.hexdigest() != oid:
        raise IntegrityError(f"object {oid}: content does not match its id (damaged file)", oid=oid)
    return b.finish()
