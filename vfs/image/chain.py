"""Backing-chain operations: commit (overlay into its backing file) and rebase.

Both work cluster by cluster through the public :class:`Image` API, so every byte moved is
checksum-verified on read, and both end with flushes: a crash in the middle leaves each image
consistent (a commit interrupted half-way has copied some clusters into the backing file; the
overlay still holds all of them, so the guest view is unchanged).
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from vfs.errors import UsageError
from vfs.image import layout as L
from vfs.image.backing import backing_format_of, confine
from vfs.image.fileio import RawFile
from vfs.image.image import Image

log = logging.getLogger(__name__)

Progress = Callable[[int, int], None]


def commit(img: Image, *, keep: bool = False, progress: Progress | None = None) -> int:
    """Write every allocated cluster of ``img`` into its backing file, then empty ``img`` (its
    clusters read through to the backing file again) — unless ``keep`` (qemu-img commit
    ``-d``: the overlay keeps its data). Returns the number of clusters copied."""
    if not img.backing_name:
        raise UsageError(f"{img.path} has no backing file to commit into")
    img.flush()
    path = img.confined_backing_path()
    img.close_backing()  # our read-only handle (and its shared lock) while we write into it
    cs = img.cluster_size
    target: Image | RawFile
    if img.backing_format == "vimg":
        target = Image.open(path, resolver=img.resolver, backing_dirs=img.allowed_backing_dirs)
    else:
        target = RawFile(path, writable=True)
    copied = 0
    n = img.guest_clusters
    try:
        if target.size < img.size:
            target.resize(img.size)
        for ci, e in img.iter_entries():
            start = ci * cs
            length = min(cs, img.size - start)
            if e.kind == L.ZERO:
                target.write_zeroes(start, length)
            else:
                target.write(start, img.cluster_data(ci, e)[:length])
            copied += 1
            if progress:
                progress(ci + 1, n)
        target.flush()
    finally:
        target.close()
        img.open_backing()
    if not keep:
        for ci, _e in list(img.iter_entries()):
            img.drop_cluster(ci)
        img.flush()
    return copied


def rebase(img: Image, backing: str | None, fmt: str | None, *, unsafe: bool = False) -> int:
    """Point ``img`` at a new backing file. Safe mode first copies into ``img`` every cluster
    whose content would change (where ``img`` is unallocated and old != new). Returns the
    number of clusters copied."""
    copied = 0
    if not unsafe:
        old = img.backing
        new: Image | RawFile | None = None
        if backing:
            p = confine(backing, img.path, img.allowed_backing_dirs)
            f = fmt or backing_format_of(p)
            new = (
                Image.open(
                    p, readonly=True, resolver=img.resolver, backing_dirs=img.allowed_backing_dirs
                )
                if f == "vimg"
                else RawFile(p)
            )
        try:
            cs = img.cluster_size
            for ci in range(img.guest_clusters):
                if img.entry(ci).kind != L.UNALLOCATED:
                    continue
                start = ci * cs
                length = min(cs, img.size - start)
                a = _read(old, start, length)
                b = _read(new, start, length)
                if a != b:
                    img.write(start, a)
                    copied += 1
        finally:
            if new is not None:
                new.close()
    img.set_backing(backing, fmt)
    img.flush()
    return copied


def _read(layer: object, start: int, length: int) -> bytes:
    if layer is None:
        return bytes(length)
    size = layer.size  # type: ignore[attr-defined]
    if start >= size:
        return bytes(length)
    n = min(length, size - start)
    return layer.read(start, n) + bytes(length - n)  # type: ignore[attr-defined]
