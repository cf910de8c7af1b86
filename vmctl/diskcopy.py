"""Copying a running guest's disk from its export to another: the disk half of a migration.

Plain blocking code over two NBD connections (vfs.export.client), run in a worker thread by
the caller. The source export's dirty bitmap says what the guest wrote meanwhile:

    mark(bitmap) ─► copy every allocated range ─► take(bitmap), copy, ... (the rounds)
    guest paused and flushed ─► take(bitmap), copy the rest ─► flush the destination

``mark`` comes before the first read, so a write that lands during the full copy is in the
first round's ranges, whether the copy had read that range before or after it.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

from vfs.export import protocol as P
from vfs.export.client import ExportControl, NbdClient

#: Bytes per NBD read/write while copying.
CHUNK = 1 << 20
#: The copier's bitmap in the source export (kept apart from the export's own ``dirty``).
BITMAP = "vmctl-migration"


@dataclass
class CopyStats:
    rounds: list[int] = field(default_factory=list)  # bytes copied per round (0: full copy)
    bytes_sent: int = 0
    seconds: float = 0.0


class DiskCopier:
    """One disk: source export (socket + control) to a destination NBD server: its export's
    Unix socket, or a (host, port) over TCP (the destination QEMU's server, another host)."""

    def __init__(self, src_socket: Path, src_control: Path, src_export: str,
                 dst: Path | tuple[str, int], dst_export: str) -> None:  # fmt: skip
        self.ctl = ExportControl(src_control)
        self.dst_export = dst_export
        self.src = NbdClient(str(src_socket), src_export,
                             contexts=(P.CTX_BASE_ALLOCATION, P.CTX_ALLOCATION_DEPTH))  # fmt: skip
        try:
            self.dst = NbdClient(dst if isinstance(dst, tuple) else str(dst), dst_export)
        except BaseException:
            self.src.close()
            raise
        if self.dst.size != self.src.size:
            self.close()
            raise ValueError(f"destination disk is {self.dst.size} bytes, source {self.src.size}")
        self.stats = CopyStats()

    def _copy(self, ranges: list[tuple[int, int]]) -> int:
        t0 = time.monotonic()
        sent = 0
        for off, n in ranges:
            end = min(off + n, self.src.size)
            while off < end:
                k = min(CHUNK, end - off)
                self.dst.pwrite(self.src.pread(off, k), off)
                off += k
                sent += k
        self.stats.bytes_sent += sent
        self.stats.rounds.append(sent)
        self.stats.seconds += time.monotonic() - t0
        return sent

    def full_copy(self, top_only: bool = False) -> int:
        """Start tracking writes, then copy every allocated range (holes stay holes); with
        ``top_only``, only what the image itself holds (allocation depth 1), not what its
        backing file provides: the destination's image has the same backing file
        (virsh's ``--copy-storage-inc``). A zero cluster of the top layer is allocated there
        and copied as zeros, so backing data it hides stays hidden."""
        self.ctl.mark(BITMAP)
        if top_only:
            ranges = [(off, n) for off, n, depth in self.src.extents(P.CTX_ALLOCATION_DEPTH)
                      if depth == 1]  # fmt: skip
        else:
            ranges = [(off, n) for off, n, flags in self.src.extents(P.CTX_BASE_ALLOCATION)
                      if not flags & P.STATE_HOLE]  # fmt: skip
        return self._copy(ranges)

    def pending(self) -> int:
        """Bytes written since the last copy (not yet taken)."""
        return sum(n for _, n in self.ctl.dirty(BITMAP))

    def copy_dirty(self) -> int:
        """Copy what was written since the previous round (atomically taken)."""
        return self._copy(self.ctl.take(BITMAP))

    def finish(self) -> int:
        """With the guest paused and its writes flushed into the source export: the rest, then
        make the destination durable."""
        self.ctl.flush()
        sent = self.copy_dirty()
        self.dst.flush()
        return sent

    def close_destination(self) -> None:
        """Disconnect from the destination (after :meth:`finish`); the source stays open."""
        try:
            self.dst.close()
        except OSError:
            pass

    def close(self, *, drop_bitmap: bool = True) -> None:
        for c in (self.src, self.dst):
            try:
                c.close()
            except OSError:
                pass
        if drop_bitmap:
            try:
                self.ctl.remove_bitmap(BITMAP)
            except Exception:  # noqa: BLE001 (the source may be gone; the bitmap is harmless)
                pass
