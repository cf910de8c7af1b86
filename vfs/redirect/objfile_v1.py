"""Reading store format 1 object files, only to migrate a store to format 2.

Format 1 (vfs before the kernel engine) kept each object in a container: chunk payloads
(optionally zstd frames), a table of ``end offset | compressed bit, xxh3`` per chunk, and a
48-byte trailer (``docs/redirect.md``, appendix A). The kernel cannot read such a file, so a
format-1 store is rewritten to plain object files when it is first opened
(:func:`vfs.redirect.store_recovery.migrate_v1`); nothing else reads this format.
"""

from __future__ import annotations

import os
import struct
from array import array
from collections.abc import Iterator

import xxhash
import zstandard

from vfs.errors import FormatError

MAGIC = b"VFSOBJ\x00\x01"
TRAILER = struct.Struct("<8sIIQIIQQ")
COMPRESSED_BIT = 1 << 63
MAX_CHUNK = 16 * 1024 * 1024
MAX_SIZE = 1 << 44
_xxh3 = xxhash.xxh3_64_intdigest


def v1_chunks(fd: int) -> tuple[int, Iterator[bytes]] | None:
    """``(size, chunks)`` of a format-1 container, or None if the file is not one (no valid
    trailer: e.g. an object already migrated). The chunks are verified as they are read;
    a damaged chunk raises FormatError."""
    st_size = os.fstat(fd).st_size
    if st_size < TRAILER.size:
        return None
    raw = os.pread(fd, TRAILER.size, st_size - TRAILER.size)
    magic, version, incompat, size, chunk, n, table_sum, trailer_sum = TRAILER.unpack(raw)
    if magic != MAGIC or _xxh3(raw[:40]) != trailer_sum or version != 1 or incompat:
        return None
    if not (0 < chunk <= MAX_CHUNK) or size > MAX_SIZE or n != -(-size // chunk):
        return None
    table_off = st_size - TRAILER.size - 16 * n
    if table_off < 0:
        return None
    table = os.pread(fd, 16 * n, table_off)
    if _xxh3(table) != table_sum:
        return None
    ends = array("Q")
    ends.frombytes(table[: 8 * n])
    sums = array("Q")
    sums.frombytes(table[8 * n :])

    def chunks() -> Iterator[bytes]:
        dctx = zstandard.ZstdDecompressor()
        start = 0
        for i in range(n):
            end = ends[i] & ~COMPRESSED_BIT
            if not start <= end <= table_off:
                raise FormatError(f"format-1 object: chunk {i} out of bounds")
            payload = os.pread(fd, end - start, start)
            if ends[i] & COMPRESSED_BIT:
                try:
                    data = dctx.decompress(payload, max_output_size=chunk)
                except zstandard.ZstdError:
                    data = b""
            else:
                data = payload
            if len(data) != min(chunk, size - i * chunk) or _xxh3(data) != sums[i]:
                raise FormatError(f"format-1 object: chunk {i} is damaged")
            yield data
            start = end

    return size, chunks()


def write_v1(f, data: bytes, *, chunk_size: int = 64 * 1024, compress: bool = False) -> None:
    """Write ``data`` as a format-1 container to the binary file ``f``: for the migration
    tests, which need stores as the previous vfs left them."""
    ends = array("Q")
    sums = array("Q")
    pos = 0
    cctx = zstandard.ZstdCompressor(level=3)
    for off in range(0, len(data), chunk_size):
        c = data[off : off + chunk_size]
        payload, flag = c, 0
        if compress:
            packed = cctx.compress(c)
            if len(packed) < len(c) - len(c) // 16:
                payload, flag = packed, COMPRESSED_BIT
        f.write(payload)
        pos += len(payload)
        ends.append(pos | flag)
        sums.append(_xxh3(c))
    table = ends.tobytes() + sums.tobytes()
    f.write(table)
    head = struct.pack("<8sIIQII", MAGIC, 1, 0, len(data), chunk_size, len(ends))
    head += struct.pack("<Q", _xxh3(table))
    f.write(head + struct.pack("<Q", _xxh3(head)))
