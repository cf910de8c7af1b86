"""What is where: block status of guest ranges (this layer or the whole chain), allocated
extents, and the stored entries of a root — the introspection the CLI's ``map``, ``convert``,
``commit``, ``verify`` and the exports (NBD ``base:allocation``) are built on.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, NamedTuple

from vfs.errors import VfsError
from vfs.image import layout as L
from vfs.image.core import Core

if TYPE_CHECKING:
    from vfs.image.snapshots import Snapshots


class Extent(NamedTuple):
    """A guest range with one status (the fields of qemu-img map / NBD base:allocation).

    - ``allocated``: the layer at ``depth`` decides what the range reads as (stored data or a
      ZERO entry); False: nothing in the chain does (or, for ``chain=False``, not this layer:
      the range reads through to the backing file, or zeros without one).
    - ``data``: bytes are stored for it (LOCAL, COMPRESSED, REMOTE; raw file data).
    - ``zero``: known to read as zeros (ZERO entry, a hole with nothing below, past the end of
      the backing file). False means "may hold data", not "non-zero".
    - ``depth``: 0 for this image, 1 for its backing file, ...
    - ``host_offset``: byte offset in the layer's file where the range's bytes start (LOCAL
      clusters and raw files, and only when asked for), else None.
    """

    offset: int
    length: int
    allocated: bool
    data: bool
    zero: bool
    depth: int = 0
    host_offset: int | None = None

    @property
    def hole(self) -> bool:
        """NBD's NBD_STATE_HOLE: no layer stores data here."""
        return not self.data


def _merge(out: list[Extent], e: Extent) -> None:
    if out:
        last = out[-1]
        if (
            last.offset + last.length == e.offset
            and (last.allocated, last.data, last.zero, last.depth)
            == (e.allocated, e.data, e.zero, e.depth)
            and (
                (last.host_offset is None and e.host_offset is None)
                or (
                    last.host_offset is not None
                    and e.host_offset is not None
                    and last.host_offset + last.length == e.host_offset
                )
            )
        ):
            out[-1] = last._replace(length=last.length + e.length)
            return
    out.append(e)


def layer_status(c: Core, offset: int, length: int, host_offsets: bool) -> list[Extent]:
    """This layer's view of [offset, offset+length), merged into runs."""
    c.check_range(offset, length)
    out: list[Extent] = []
    cs, bits, per = c.cluster_size, c.cluster_bits, c.per_l2
    span = cs * per
    no_backing = not c.header.backing_name
    end = offset + length
    pos = offset
    while pos < end:
        idx = pos // span
        if c.l1[idx][0] == 0 and idx not in c.l2cache:
            nxt = min((idx + 1) * span, end)
            _merge(out, Extent(pos, nxt - pos, False, False, no_backing))
            pos = nxt
            continue
        ci = pos >> bits
        nxt = min((ci + 1) * cs, end)
        e = c.entry(ci)
        t = e[0]
        if t == L.LOCAL:
            host = e[4] + (pos & c.mask) if host_offsets else None
            _merge(out, Extent(pos, nxt - pos, True, True, False, 0, host))
        elif t == L.COMPRESSED or t == L.REMOTE:
            _merge(out, Extent(pos, nxt - pos, True, True, False))
        elif t == L.ZERO:
            _merge(out, Extent(pos, nxt - pos, True, False, True))
        else:
            _merge(out, Extent(pos, nxt - pos, False, False, no_backing))
        pos = nxt
    return out


def chain_status(c: Core, offset: int, length: int, host_offsets: bool) -> list[Extent]:
    """The whole chain's view: ranges this layer leaves unallocated are resolved below."""
    out: list[Extent] = []
    for e in layer_status(c, offset, length, host_offsets):
        if e.allocated or c.backing is None:
            _merge(out, e)
            continue
        for sub in backing_status(c.backing, e.offset, e.offset + e.length, host_offsets):
            _merge(out, sub._replace(depth=sub.depth + 1))
    return out


def backing_status(b: object, start: int, end: int, host_offsets: bool) -> Iterator[Extent]:
    """Status of [start, end) in a backing layer (an Image or a raw file), depth relative to
    it; the part past its end reads as zeros (unallocated)."""
    size = b.size  # type: ignore[attr-defined]
    b_end = min(end, size)
    if start < b_end:
        status = getattr(b, "block_status", None)
        if status is not None:  # a vimg layer: its own chain
            yield from status(start, b_end - start, chain=True, host_offsets=host_offsets)
        else:
            yield from raw_status(b, start, b_end, host_offsets)
    if end > max(start, size):
        a = max(start, size)
        yield Extent(a, end - a, False, False, True)


def raw_status(raw: object, start: int, end: int, host_offsets: bool) -> Iterator[Extent]:
    """A raw file's data and holes (SEEK_DATA/SEEK_HOLE) in [start, end)."""
    for s, n, is_data in raw.extents():  # type: ignore[attr-defined]
        a, b = max(s, start), min(s + n, end)
        if a < b:
            yield Extent(a, b - a, True, is_data, not is_data, 0, a if host_offsets else None)


def iter_entries(
    c: Core,
    snaps: Snapshots,
    snapshot: str | None = None,
    on_error: Callable[[int, VfsError], None] | None = None,
) -> Iterator[tuple[int, L.Entry]]:
    """(guest cluster, entry) for every entry of a root that is not UNALLOCATED, in guest
    order: the active root (with its unsaved changes) or the named snapshot. A damaged L2 table
    raises, or with ``on_error`` is reported as ``on_error(guest_offset, error)`` and skipped."""
    per, cs = c.per_l2, c.cluster_size
    if snapshot is None:
        c.settle_all()  # no stale checksum leaves the image
        l1, active = c.l1, True
    else:
        l1, active = snaps.snapshot_l1(snaps.find(snapshot)), False
    make = L.Entry._make
    for idx, (off, s) in enumerate(l1):
        t = c.l2cache.get(idx) if active else None
        if t is None:
            if not off:
                continue
            try:
                t = c.load_l2(off, s, idx)
            except VfsError as e:
                if on_error is None:
                    raise
                on_error(idx * per * cs, e)
                continue
        base = idx * per
        for i, raw in enumerate(L.L2_ENTRY.iter_unpack(t)):
            if raw[0] != L.UNALLOCATED:
                yield base + i, make(raw)
