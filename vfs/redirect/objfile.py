"""The local store's file format for one object: checksummed chunks, optionally zstd-compressed.

Layout (docs/redirect.md, "Object file"): chunk payloads, then a table of ``nchunks`` entries,
then a 48-byte trailer at the very end of the file::

    payload 0 | payload 1 | ... | table (nchunks x 16 bytes) | trailer (48 bytes)

    table entry:  u64 end offset of this payload in the file (bit 63 set: payload is a zstd frame)
                  u64 xxh3_64 of the chunk's *uncompressed* bytes
    trailer:      0  8  magic b"VFSOBJ\\x00\\x01"
                  8  4  version (1)
                 12  4  incompatible feature bits (none defined; readers refuse any set bit)
                 16  8  size: uncompressed object size in bytes
                 24  4  chunk size (bytes of uncompressed data per chunk, last may be short)
                 28  4  nchunks
                 32  8  xxh3_64 of the table bytes
                 40  8  xxh3_64 of trailer bytes 0..39

Why a container and not the raw bytes: the SHA-256 digest can only be checked over a whole
object, but FUSE and images read 4 KiB..1 MiB pieces of objects that may be gigabytes. Per-chunk
xxh3 lets every partial read prove its bytes are what was stored (a flipped bit on disk is an
:class:`IntegrityError`, never data), and chunking lets zstd compression keep random access.

Crash story: object files are written whole to a temporary file and renamed into place only
after fsync (see :mod:`vfs.durable`), so a reader never sees a partial container.
"""

from __future__ import annotations

import os
import struct
from array import array
from dataclasses import dataclass
from typing import BinaryIO

import xxhash
import zstandard

from vfs.errors import FormatError, IntegrityError, UnsupportedFeature

MAGIC = b"VFSOBJ\x00\x01"
VERSION = 1
TRAILER = struct.Struct("<8sIIQIIQQ")
assert TRAILER.size == 48
COMPRESSED_BIT = 1 << 63
DEFAULT_CHUNK = 64 * 1024
MAX_CHUNK = 16 * 1024 * 1024
#: Objects larger than this are refused (format limit chosen so a table fits in memory: 16 TiB).
MAX_SIZE = 1 << 44
#: Object files up to this size are read whole when opened (one chunk of the default size and
#: its table and trailer); the bytes stay with the reader, so this bounds its memory.
SMALL_FILE = DEFAULT_CHUNK + 4096

_xxh3 = xxhash.xxh3_64_intdigest


class ObjectWriter:
    """Streams bytes into an object file: chunks them, checksums and optionally compresses."""

    def __init__(self, f: BinaryIO, *, compress: bool = False, chunk_size: int = DEFAULT_CHUNK):
        self._f = f
        self._chunk_size = chunk_size
        self._compressor = zstandard.ZstdCompressor(level=3) if compress else None
        self._buf = bytearray()
        self._ends = array("Q")
        self._sums = array("Q")
        self._pos = 0
        self.size = 0

    def write(self, data: bytes | bytearray | memoryview) -> None:
        self._buf += data
        cs = self._chunk_size
        if len(self._buf) >= cs:
            view = memoryview(self._buf)
            n = len(self._buf) // cs * cs
            for off in range(0, n, cs):
                self._emit(view[off : off + cs])
            view.release()
            del self._buf[:n]

    def _emit(self, chunk: memoryview | bytes) -> None:
        payload: bytes | memoryview = chunk
        flag = 0
        if self._compressor is not None:
            packed = self._compressor.compress(chunk)
            if len(packed) < len(chunk) - len(chunk) // 16:
                payload = packed
                flag = COMPRESSED_BIT
        self._f.write(payload)
        self._pos += len(payload)
        self.size += len(chunk)
        self._ends.append(self._pos | flag)
        self._sums.append(_xxh3(chunk))

    def finish(self) -> int:
        """Write the table and trailer; return the file's total length."""
        if self._buf:
            self._emit(bytes(self._buf))
            self._buf.clear()
        table = self._ends.tobytes() + self._sums.tobytes()
        self._f.write(table)
        head = struct.pack(
            "<8sIIQII",
            MAGIC,
            VERSION,
            0,
            self.size,
            self._chunk_size,
            len(self._ends),
        )
        head += struct.pack("<Q", _xxh3(table))
        self._f.write(head + struct.pack("<Q", _xxh3(head)))
        return self._pos + len(table) + TRAILER.size


@dataclass
class ObjectInfo:
    size: int
    chunk_size: int
    nchunks: int
    stored_size: int


class ObjectReader:
    """Random access to one object file. Cheap to keep open; safe to share between threads
    (only ``os.pread`` on a fixed fd, no file position)."""

    def __init__(self, fd: int, *, name: str = "?"):
        self.fd = fd
        self.name = name
        st = os.fstat(fd)
        if st.st_size < TRAILER.size:
            raise IntegrityError(f"object {name}: file truncated ({st.st_size} bytes)", oid=name)
        # A small object file (one chunk, the common template file) is read whole in one
        # pread: one system call and one disk read instead of trailer, table and payload
        # separately (cold reads of small files are dominated by these). Its bytes are then
        # verified exactly as those read piecewise are.
        whole = os.pread(fd, st.st_size, 0) if st.st_size <= SMALL_FILE else None
        if whole is not None and len(whole) != st.st_size:
            raise IntegrityError(f"object {name}: file changed while read", oid=name)
        if whole is not None:
            raw = whole[-TRAILER.size :]
        else:
            raw = os.pread(fd, TRAILER.size, st.st_size - TRAILER.size)
        magic, version, incompat, size, chunk, n, table_sum, trailer_sum = TRAILER.unpack(raw)
        if magic != MAGIC:
            raise IntegrityError(f"object {name}: bad trailer magic (damaged file)", oid=name)
        if _xxh3(raw[:40]) != trailer_sum:
            raise IntegrityError(f"object {name}: trailer checksum mismatch", oid=name)
        if version != VERSION or incompat:
            raise UnsupportedFeature(
                f"object {name}: format version {version} features {incompat:#x} not supported"
            )
        if not (0 < chunk <= MAX_CHUNK) or size > MAX_SIZE or n != -(-size // chunk):
            raise FormatError(f"object {name}: inconsistent trailer", oid=name)
        table_len = 16 * n
        table_off = st.st_size - TRAILER.size - table_len
        if table_off < 0:
            raise IntegrityError(f"object {name}: table out of bounds", oid=name)
        if whole is not None:
            table = whole[table_off : table_off + table_len]
        else:
            table = os.pread(fd, table_len, table_off)
        if _xxh3(table) != table_sum:
            raise IntegrityError(f"object {name}: chunk table checksum mismatch", oid=name)
        self._ends = array("Q")
        self._ends.frombytes(table[: 8 * n])
        self._sums = array("Q")
        self._sums.frombytes(table[8 * n :])
        self.size = size
        self.chunk_size = chunk
        self.nchunks = n
        self.stored_size = st.st_size
        self._table_off = table_off
        self._whole = whole
        self._dctx: zstandard.ZstdDecompressor | None = None  # made on the first compressed chunk

    def info(self) -> ObjectInfo:
        return ObjectInfo(self.size, self.chunk_size, self.nchunks, self.stored_size)

    def chunk(self, i: int) -> bytes:
        """Chunk ``i``'s verified uncompressed bytes."""
        end = self._ends[i]
        start = (self._ends[i - 1] & ~COMPRESSED_BIT) if i else 0
        compressed = bool(end & COMPRESSED_BIT)
        end &= ~COMPRESSED_BIT
        if not (start <= end <= self._table_off):
            raise IntegrityError(f"object {self.name}: chunk {i} out of bounds", oid=self.name)
        whole = self._whole
        payload = whole[start:end] if whole is not None else os.pread(self.fd, end - start, start)
        expect = min(self.chunk_size, self.size - i * self.chunk_size)
        if compressed:
            if self._dctx is None:
                self._dctx = zstandard.ZstdDecompressor()
            try:
                data = self._dctx.decompress(payload, max_output_size=self.chunk_size)
            except zstandard.ZstdError:
                data = b""
        else:
            data = payload
        if len(data) != expect or _xxh3(data) != self._sums[i]:
            raise IntegrityError(
                f"object {self.name}: checksum mismatch in chunk {i} "
                f"(bytes {i * self.chunk_size}..{i * self.chunk_size + expect})",
                oid=self.name,
                offset=i * self.chunk_size,
            )
        return data

    def read(self, offset: int, size: int) -> bytes:
        """``size`` bytes at ``offset`` (short at end of object), every touched chunk verified."""
        if offset < 0 or size < 0:
            raise ValueError("negative offset or size")
        end = min(offset + size, self.size)
        if offset >= end:
            return b""
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
        last = (min(offset + size, self.size) - 1) // self.chunk_size
        if self._whole is not None or last >= self.nchunks - 1:
            length = 0  # to the end of the file
        else:
            length = self._ends[max(last, 0)] & ~COMPRESSED_BIT
        os.posix_fadvise(self.fd, 0, length, os.POSIX_FADV_DONTNEED)

    def iter_chunks(self):
        for i in range(self.nchunks):
            yield self.chunk(i)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
