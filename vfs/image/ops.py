"""Whole-image operations behind the CLI verbs: map, info, convert, compare, measure.

Inputs are opened as *sources* (raw file, vimg image, or qcow2 through a temporary raw file made
by ``qemu-img convert``); each has ``size``, ``read(offset, length)`` and ``close()``, and
:func:`extents` tells which ranges may hold data so copies skip holes.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from typing import Any

from vfs.errors import UsageError, VfsError
from vfs.image import directories as D
from vfs.image import layout as L
from vfs.image.backing import allowed_dirs, confine
from vfs.image.bitmaps import BitmapInfo
from vfs.image.extents import backing_status
from vfs.image.fileio import RawFile, probe_format
from vfs.image.image import Image, Resolver
from vfs.image.qemu import qemu_img

log = logging.getLogger(__name__)

FORMATS = ("raw", "qcow2", "vimg")
Progress = Callable[[int, int], None]
#: (depth, present, zero, data, host offset or None) as qemu-img map reports it
Status = tuple[int, bool, bool, bool, int | None]


class Qcow2Source(RawFile):
    """A qcow2 image read through a sparse raw copy made by qemu-img (deleted on close).

    Its backing chain is confined as a vimg chain is (spec 8): each layer's backing name is
    read with ``qemu-img info`` (which does not open the backing file) and checked against the
    allowed directories before qemu-img is let to follow it."""

    format = "qcow2"

    def __init__(self, path: str, backing_dirs: tuple[str, ...] | list[str] = ()) -> None:
        confine_qcow2_chain(path, allowed_dirs(path, backing_dirs))
        self._tmpdir = tempfile.mkdtemp(prefix="vimg-qcow2-")
        raw = os.path.join(self._tmpdir, "image.raw")
        try:
            qemu_img("convert", "-f", "qcow2", "-O", "raw", path, raw)
            super().__init__(raw)
        except BaseException:
            shutil.rmtree(self._tmpdir, ignore_errors=True)
            raise
        self.path = path

    def close(self) -> None:
        super().close()
        shutil.rmtree(self._tmpdir, ignore_errors=True)


def confine_qcow2_chain(path: str, allowed: tuple[str, ...]) -> None:
    """Refuse a qcow2 image whose backing chain leaves the allowed directories (spec 8),
    before qemu-img is asked to follow it."""
    import json

    layer, seen = path, set()
    while layer and len(seen) < 64:
        seen.add(layer)
        info = json.loads(qemu_img("info", "--output=json", "-U", layer))
        name = info.get("backing-filename")
        if not name:
            return
        real = confine(name, layer, allowed)
        if probe_format(real) not in ("qcow2", "raw"):
            raise UsageError(f"{layer}: backing file {name!r} is not a qcow2 or raw image")
        layer = real if real not in seen else ""


def open_source(
    path: str,
    fmt: str | None = None,
    resolver: Resolver | None = None,
    backing_dirs: tuple[str, ...] | list[str] = (),
) -> Any:
    """Open an image for reading in any supported format (probed when ``fmt`` is None). A vimg
    image's backing files are confined to its directory and ``backing_dirs``."""
    if fmt is not None and fmt not in FORMATS:
        raise UsageError(f"unknown format {fmt!r} (raw, qcow2, vimg)")
    fmt = fmt or probe_format(path)
    if not os.path.exists(path):
        raise UsageError(f"{path}: no such file")
    if fmt == "vimg":
        return Image.open(path, readonly=True, resolver=resolver, backing_dirs=backing_dirs)
    if fmt == "qcow2":
        return Qcow2Source(path, backing_dirs)
    return RawFile(path)


# --------------------------------------------------------------------------------- map
def layer_status(
    layer: Any, start: int, end: int, depth: int = 0
) -> Iterator[tuple[int, int, Status]]:
    """(start, length, status) pieces covering [start, end) of ``layer`` and what is below."""
    if isinstance(layer, Image):
        extents: Any = layer.block_status(start, end - start, chain=True, host_offsets=True)
    else:
        extents = backing_status(layer, start, end, True)
    for e in extents:
        yield (e.offset, e.length, (depth + e.depth, e.allocated, e.zero, e.data, e.host_offset))


def image_map(img: Any) -> list[dict[str, Any]]:
    """qemu-img map --output=json for any source."""
    out: list[dict[str, Any]] = []
    for start, length, (depth, present, zero, data, off) in layer_status(img, 0, img.size):
        if out:
            last = out[-1]
            same = (last["depth"], last["present"], last["zero"], last["data"]) == (
                depth,
                present,
                zero,
                data,
            )
            contiguous = ("offset" not in last and off is None) or (
                "offset" in last and off is not None and last["offset"] + last["length"] == off
            )
            if same and contiguous and last["start"] + last["length"] == start:
                last["length"] += length
                continue
        d: dict[str, Any] = {
            "start": start,
            "length": length,
            "depth": depth,
            "present": present,
            "zero": zero,
            "data": data,
        }
        if off is not None and data:
            d["offset"] = off
        out.append(d)
    return out


def data_ranges(src: Any) -> list[tuple[int, int]]:
    """Ranges that may hold non-zero data (merged)."""
    out: list[tuple[int, int]] = []
    for start, length, (_d, _p, zero, data, _o) in layer_status(src, 0, src.size):
        if not data and zero:
            continue
        if out and out[-1][0] + out[-1][1] == start:
            out[-1] = (out[-1][0], out[-1][1] + length)
        else:
            out.append((start, length))
    return out


# --------------------------------------------------------------------------------- info
def image_info(img: Image) -> dict[str, Any]:
    """qemu-img info's fields for a vimg image, plus vimg's own under "format-specific".

    Damage that does not stop reading the disk is reported, not raised: an unreadable snapshot
    table ("snapshots-error"), a possible header roll-back or damaged header copies
    ("header-problems")."""
    st = os.stat(img.path)
    h = img.header
    info: dict[str, Any] = {
        "virtual-size": img.size,
        "filename": img.path,
        "cluster-size": img.cluster_size,
        "format": "vimg",
        "actual-size": st.st_blocks * 512,
        "dirty-flag": False,
    }
    if img.backing_name:
        info["backing-filename"] = img.backing_name
        info["full-backing-filename"] = img.backing_path()
        info["backing-filename-format"] = img.backing_format
    try:
        snaps = img.snapshots
    except VfsError as e:
        snaps = []
        info["snapshots-error"] = str(e)
    if snaps:
        info["snapshots"] = [snapshot_info(s) for s in snaps]

    def names(kind: int, bits: int) -> list[str]:
        return [h.feature_name(kind, b) or f"bit {b}" for b in range(64) if bits >> b & 1]

    data: dict[str, Any] = {
        "version": h.version,
        "sequence": h.sequence,
        "compression-type": "zstd" if h.compression == L.COMPRESSION_ZSTD else "none",
        "checksum": "xxh3-64",
        "incompatible-features": names(L.FEATURE_INCOMPAT, h.incompatible),
        "compatible-features": names(L.FEATURE_COMPAT, h.compatible),
        "autoclear-features": names(L.FEATURE_AUTOCLEAR, h.autoclear),
        "host-clusters": h.host_clusters,
    }
    try:
        bitmaps = img.bitmap_list()
    except VfsError as e:
        bitmaps = []
        info["bitmaps-error"] = str(e)
    if bitmaps:
        data["bitmaps"] = [bitmap_info(b) for b in bitmaps]
    problems = header_problems(img)
    if problems:
        data["header-problems"] = problems
    info["format-specific"] = {"type": "vimg", "data": data}
    return info


def snapshot_info(s: D.Snapshot) -> dict[str, Any]:
    """One snapshot as qemu-img info lists it."""
    return {
        "icount": 0,
        "vm-clock-nsec": s.vm_clock_nsec % 10**9,
        "name": s.name,
        "date-sec": s.date_sec,
        "date-nsec": s.date_nsec,
        "vm-clock-sec": s.vm_clock_nsec // 10**9,
        "id": s.id,
        "vm-state-size": s.vm_state_size,
    }


def bitmap_info(b: BitmapInfo) -> dict[str, Any]:
    """One bitmap as qemu-img info lists a qcow2 bitmap (flags "auto" = enabled, "in-use" =
    stale), plus how much of the disk it marks dirty."""
    flags = (["auto"] if b.enabled else []) + (["in-use"] if b.stale else [])
    return {"flags": flags, "name": b.name, "granularity": b.granularity, "dirty": b.dirty_bytes}


def header_problems(img: Image) -> list[str]:
    """What is wrong with the header copies (empty when nothing is): a possible roll-back
    first, then damaged copies of the current header."""
    choice = img.header_choice
    out = [choice.fallback] if choice.fallback else []
    return out + list(choice.damaged)


def format_size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB", "PiB"):
        if n < 1024 or unit == "PiB":
            return f"{n:g} {unit}" if unit == "B" else f"{n:.3g} {unit}"
        n /= 1024  # type: ignore[assignment]
    return str(n)


def info_text(info: dict[str, Any]) -> str:
    lines = [
        f"image: {info['filename']}",
        f"file format: {info['format']}",
        f"virtual size: {format_size(info['virtual-size'])} ({info['virtual-size']} bytes)",
        f"disk size: {format_size(info['actual-size'])}",
    ]
    if "cluster-size" in info:
        lines.append(f"cluster_size: {info['cluster-size']}")
    if "backing-filename" in info:
        lines.append(f"backing file: {info['backing-filename']}")
        lines.append(f"backing file format: {info['backing-filename-format']}")
    if info.get("snapshots"):
        lines.append("Snapshot list:")
        lines.append(f"{'ID':<10}{'TAG':<18}{'VM SIZE':>9}{'DATE':>20}{'VM CLOCK':>13}")
        import time as _t

        for s in info["snapshots"]:
            date = _t.strftime("%Y-%m-%d %H:%M:%S", _t.localtime(s["date-sec"]))
            vm = format_size(s["vm-state-size"]) if s["vm-state-size"] else "0 B"
            clock = s["vm-clock-sec"]
            hms = f"{clock // 3600:02d}:{clock // 60 % 60:02d}:{clock % 60:02d}"
            ms = s["vm-clock-nsec"] // 10**6
            lines.append(f"{s['id']:<10}{s['name']:<18}{vm:>9} {date:>19} {hms}.{ms:03d}")
    fs = info.get("format-specific")
    if fs:
        lines.append("Format specific information:")
        for k, v in fs["data"].items():
            if k in ("header-problems", "bitmaps"):
                continue
            lines.append(f"    {k}: {(', '.join(v) or 'none') if isinstance(v, list) else v}")
        if fs["data"].get("bitmaps"):
            lines.append("    bitmaps:")
            for b in fs["data"]["bitmaps"]:
                lines.append(
                    f"        {b['name']}: granularity {b['granularity']}, flags "
                    f"{', '.join(b['flags']) or 'none'}, {format_size(b['dirty'])} dirty"
                )
        for p in fs["data"].get("header-problems", []):
            lines.append(f"WARNING: header: {p}")
    if "snapshots-error" in info:
        lines.append(f"WARNING: snapshot table: {info['snapshots-error']}")
    if "bitmaps-error" in info:
        lines.append(f"WARNING: bitmaps: {info['bitmaps-error']}")
    return "\n".join(lines)


# --------------------------------------------------------------------------------- convert
def convert(
    src_path: str,
    dst_path: str,
    *,
    src_fmt: str | None = None,
    dst_fmt: str = "raw",
    compress: bool = False,
    cluster_size: int = 1 << L.DEFAULT_CLUSTER_BITS,
    resolver: Resolver | None = None,
    progress: Progress | None = None,
    on_source: Callable[[Any], None] | None = None,
    backing_dirs: tuple[str, ...] | list[str] = (),
) -> None:
    """Copy the guest view of ``src`` (its whole backing chain) into a new image.
    ``on_source`` is called with the opened source (the CLI reports header problems)."""
    if dst_fmt not in FORMATS:
        raise UsageError(f"unknown output format {dst_fmt!r} (raw, qcow2, vimg)")
    if (
        os.path.exists(dst_path)
        and os.path.exists(src_path)
        and os.path.samefile(src_path, dst_path)
    ):
        raise UsageError("input and output are the same file")
    if os.path.exists(dst_path) and dst_fmt != "raw":
        raise UsageError(f"{dst_path}: output file exists")
    if compress and dst_fmt == "raw":
        raise UsageError("-c needs a compressing output format (qcow2 or vimg)")
    src = open_source(src_path, src_fmt, resolver, backing_dirs)
    try:
        if on_source is not None:
            on_source(src)
        if dst_fmt == "qcow2":
            tmpdir = tempfile.mkdtemp(prefix="vimg-convert-")
            try:
                raw = os.path.join(tmpdir, "image.raw")
                _copy(src, RawFile(raw, create_size=src.size), 1 << 20, progress)
                args = ["convert", "-f", "raw", "-O", "qcow2"] + (["-c"] if compress else [])
                qemu_img(*args, raw, dst_path)
            finally:
                shutil.rmtree(tmpdir, ignore_errors=True)
            return
        if dst_fmt == "raw":
            dst: Any = RawFile(dst_path, create_size=src.size)
            chunk = 1 << 20
        else:
            size = -(-src.size // L.SECTOR) * L.SECTOR
            dst = Image.create(dst_path, size, cluster_size=cluster_size, compress=compress)
            chunk = cluster_size
        _copy(src, dst, chunk, progress)
    finally:
        src.close()


def _copy(src: Any, dst: Any, chunk: int, progress: Progress | None) -> None:
    zero = bytes(chunk)
    ranges = data_ranges(src)
    total = sum(n for _s, n in ranges)
    done = 0
    try:
        for start, length in ranges:
            pos = start // chunk * chunk
            while pos < start + length:
                n = min(chunk, src.size - pos)
                data = src.read(pos, n)
                if data != zero[:n]:
                    dst.write(pos, data)
                done += n
                pos += n
                if progress:
                    progress(min(done, total), total)
        dst.flush()
    finally:
        dst.close()


# --------------------------------------------------------------------------------- compare
def compare(a: Any, b: Any, *, strict: bool = False, chunk: int = 1 << 20) -> int | None:
    """Offset of the first difference, or None when the guest views are identical.

    As qemu-img compare: without ``strict`` a size difference is fine if the extra bytes of the
    larger image read as zeros; with it, different sizes differ at the smaller size.
    """
    common = min(a.size, b.size)
    if strict and a.size != b.size:
        return common
    ranges = _union(data_ranges(a), data_ranges(b), common)
    for start, length in ranges:
        pos = start
        while pos < start + length:
            n = min(chunk, start + length - pos)
            da, db = a.read(pos, n), b.read(pos, n)
            if da != db:
                return pos + next(i for i in range(n) if da[i] != db[i])
            pos += n
    big = a if a.size > b.size else b
    for start, length in data_ranges(big):
        pos = max(start, common)
        while pos < start + length:
            n = min(chunk, start + length - pos)
            d = big.read(pos, n)
            if d.count(0) != n:
                return pos + next(i for i in range(n) if d[i])
            pos += n
    return None


def _union(
    r1: list[tuple[int, int]], r2: list[tuple[int, int]], limit: int
) -> list[tuple[int, int]]:
    points = sorted((s, min(s + n, limit)) for s, n in r1 + r2 if s < limit)
    out: list[tuple[int, int]] = []
    for s, e in points:
        if out and s <= out[-1][1]:
            out[-1] = (out[-1][0], max(out[-1][1], e))
        else:
            out.append((s, e))
    return [(s, e - s) for s, e in out]


# --------------------------------------------------------------------------------- measure
def vimg_size(virtual: int, cs: int, data_clusters: int, l2_tables: int) -> int:
    """Bytes a vimg file needs for this many data clusters and L2 tables.

    Counted as ``create`` + one commit leaves it: the commit writes the L1 table, refcount blocks
    and refcount table copy-on-write, so the file holds two generations of them (the freed one
    is reused by later writes)."""
    reserved = L.clusters_for(L.HEADER_AREA, cs)
    l1 = L.clusters_for(L.l1_entries_for(virtual, cs) * L.L1_ENTRY_SIZE, cs)
    base = reserved + l1 + data_clusters + l2_tables
    blocks = 1
    while True:
        table = L.clusters_for(blocks * L.L1_ENTRY_SIZE, cs)
        total = base + blocks + table
        if data_clusters or l2_tables:
            total += l1 + blocks + table
        need = L.refcount_blocks_for(total, cs)
        if need <= blocks:
            return total * cs
        blocks = need


def measure(src: Any | None, size: int | None, cs: int) -> dict[str, int]:
    """qemu-img measure for output format vimg: 'required' and 'fully-allocated' bytes."""
    virtual = src.size if src is not None else size
    assert virtual is not None
    virtual = -(-virtual // L.SECTOR) * L.SECTOR
    per = L.l2_entries_per_table(cs)
    all_clusters = -(-virtual // cs)
    full = vimg_size(virtual, cs, all_clusters, -(-all_clusters // per))
    if src is None:
        return {"required": vimg_size(virtual, cs, 0, 0), "fully-allocated": full}
    clusters: set[int] = set()
    for start, length in data_ranges(src):
        clusters.update(range(start // cs, -(-(start + length) // cs)))
    tables = {c // per for c in clusters}
    return {"required": vimg_size(virtual, cs, len(clusters), len(tables)), "fully-allocated": full}
