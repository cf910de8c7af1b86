"""The bytes of a new, empty image (spec sections 2, 3, 5): the header in both copies of slot
0, an all-zero L1 table (left sparse), refcount blocks and the refcount table.
"""

from __future__ import annotations

import os
from array import array

import xxhash

from vfs.durable import fsync_dir
from vfs.image import layout as L
from vfs.image.fileio import ImageFile

_xxh = xxhash.xxh3_64_intdigest


def write_new_image(
    f: ImageFile,
    size: int,
    bits: int,
    *,
    backing_name: str,
    backing_format: int,
    compress: bool,
) -> None:
    """Lay out a new image of ``size`` guest bytes and ``1 << bits``-byte clusters in the new,
    empty file ``f``; then close it and make its directory entry durable."""
    cs = 1 << bits
    per = L.refcounts_per_block(cs)
    reserved = L.clusters_for(L.HEADER_AREA, cs)
    l1_entries = L.l1_entries_for(size, cs)
    l1_bytes = l1_entries * L.L1_ENTRY_SIZE
    l1_clusters = L.clusters_for(l1_bytes, cs)
    # header area, L1, refcount blocks, refcount table: as many blocks as they all need
    nblocks = 1
    while True:
        table_clusters = L.clusters_for(nblocks * L.L1_ENTRY_SIZE, cs)
        host_clusters = reserved + l1_clusters + nblocks + table_clusters
        if L.refcount_blocks_for(host_clusters, cs) == nblocks:
            break
        nblocks = L.refcount_blocks_for(host_clusters, cs)
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
        l1_offset=reserved * cs,
        l1_checksum=_xxh(bytes(l1_bytes)),
        l1_entries=l1_entries,
        refcount_table_offset=table_off,
        refcount_table_checksum=_xxh(rct),
        refcount_table_entries=nblocks,
        backing_format=backing_format,
        compression=L.COMPRESSION_ZSTD if compress else L.COMPRESSION_NONE,
        incompatible=L.INCOMPAT_COMPRESSED if compress else 0,
        host_clusters=host_clusters,
        backing_name=backing_name,
    )
    try:
        f.truncate(host_clusters * cs)  # the L1 table is all zeros: leave it sparse
        for b, blk in enumerate(blocks):
            f.pwrite(blk, (first_block + b) * cs)
        f.pwrite(rct, table_off)
        slot = L.pack_header(h).ljust(L.HEADER_SLOT_SIZE, b"\0")
        f.pwrite(slot, L.HEADER_SLOT_OFFSETS[0])
        f.pwrite(slot, L.HEADER_MIRROR_OFFSETS[0])
        f.fsync()
    finally:
        f.close()
    fsync_dir(os.path.dirname(os.path.abspath(f.path)))
