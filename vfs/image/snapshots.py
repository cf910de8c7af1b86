"""Internal snapshots of a vimg image (spec section 6): create, apply, delete, and root walking.

A mixin of :class:`vfs.image.image.Image`, kept apart because it is the one place that counts
whole roots (every cluster an L1 table reaches) up and down — the bookkeeping that makes a
snapshot cheap to take (share everything) and safe to write after (copy-on-write by refcount).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import TYPE_CHECKING

from vfs.errors import AlreadyExists, NotFound, UsageError
from vfs.image import layout as L

if TYPE_CHECKING:
    from vfs.image.image import Image

_ENTRY = L.L2_ENTRY


class SnapshotMixin:
    # ------------------------------------------------------------------ walking roots
    def roots(self: Image) -> Iterator[tuple[str, int, list[tuple[int, int]], bool]]:
        """(name, l1_offset, l1 entries, is_active) for the active root and every snapshot."""
        yield ("active", self._l1_off, self._l1, True)
        for s in self.snapshots:
            yield (s.name, s.l1_offset, self.snapshot_l1(s), False)

    def snapshot_l1(self: Image, s: L.Snapshot) -> list[tuple[int, int]]:
        """A snapshot's L1 table, checksum-verified."""
        raw = self._read_meta(
            s.l1_offset, s.l1_entries * L.L1_ENTRY_SIZE, s.l1_checksum, f"L1 of snapshot {s.name!r}"
        )
        return L.unpack_l1(
            raw, s.l1_entries, self.cluster_size, len(self._alloc) * self.cluster_size
        )

    def _root_clusters(
        self: Image, l1_off: int, l1: list[tuple[int, int]], active: bool
    ) -> Iterator[int]:
        """Every host cluster one root uses, with multiplicity (section 5.1 of the spec)."""
        bits = self.cluster_bits
        first = l1_off >> bits
        yield from range(
            first, first + L.clusters_for(len(l1) * L.L1_ENTRY_SIZE, self.cluster_size)
        )
        for idx, (off, s) in enumerate(l1):
            t = self._l2cache.get(idx) if active else None
            if off:
                yield off >> bits
            if t is None:
                if not off:
                    continue
                t = self.load_l2(off, s, idx)
            for e in _ENTRY.iter_unpack(t):
                if e[0] == L.LOCAL or e[0] == L.COMPRESSED:
                    yield e[4] >> bits

    # ------------------------------------------------------------------ snapshots
    def snapshot_create(self: Image, name: str) -> L.Snapshot:
        self._writable()
        if not name or len(name.encode()) > L.MAX_SNAPSHOT_NAME:
            raise UsageError("snapshot name must be 1..256 bytes")
        if any(s.name == name for s in self.snapshots):
            raise AlreadyExists(f"snapshot {name!r} already exists")
        self.flush()
        # The active root's clusters become shared: the next change to any of them copies it.
        self._change_refs(list(self._root_clusters(self._l1_off, self._l1, True)), [])
        now = time.time_ns()
        ids = [int(s.id) for s in self.snapshots if s.id.isdigit()]
        snap = L.Snapshot(
            id=str(max(ids, default=0) + 1),
            name=name,
            l1_offset=self._l1_off,
            l1_checksum=self._l1_sum,
            l1_entries=len(self._l1),
            virtual_size=self.size,
            date_sec=now // 10**9,
            date_nsec=now % 10**9,
        )
        self.snapshots.append(snap)
        self._snap_dirty = True
        self.flush()
        return snap

    def snapshot_list(self: Image) -> list[L.Snapshot]:
        return list(self.snapshots)

    def _find_snapshot(self: Image, name: str) -> L.Snapshot:
        for s in self.snapshots:
            if s.name == name:
                return s
        for s in self.snapshots:
            if s.id == name:
                return s
        raise NotFound(f"no snapshot named {name!r}")

    def snapshot_apply(self: Image, name: str) -> None:
        """Revert the active image to a snapshot (the snapshot itself stays)."""
        self._writable()
        snap = self._find_snapshot(name)
        self.flush()
        new_l1 = self.snapshot_l1(snap)
        new_refs = list(self._root_clusters(snap.l1_offset, new_l1, False))
        old_refs = list(self._root_clusters(self._l1_off, self._l1, True))
        self._change_refs(new_refs, old_refs)
        self._l1, self._l1_off, self._l1_sum = new_l1, snap.l1_offset, snap.l1_checksum
        self._l1_nbytes = snap.l1_entries * L.L1_ENTRY_SIZE
        self._l2cache.clear()
        self._dirty_l2.clear()
        self.size = snap.virtual_size
        self._header_dirty = True
        self.flush()

    def snapshot_delete(self: Image, name: str) -> None:
        self._writable()
        snap = self._find_snapshot(name)
        self.flush()
        l1 = self.snapshot_l1(snap)
        self._change_refs([], list(self._root_clusters(snap.l1_offset, l1, False)))
        self.snapshots.remove(snap)
        self._snap_dirty = True
        self.flush()

    def _change_refs(self: Image, inc: list[int], dec: list[int]) -> None:
        """Count a root in and/or out, all or nothing (an overflow half-way must not leave
        counts that the next commit would write)."""
        done_inc: list[int] = []
        done_dec: list[int] = []
        try:
            for c in inc:
                self._alloc.incref(c)
                done_inc.append(c)
            for c in dec:
                self._alloc.decref(c)
                done_dec.append(c)
        except BaseException:
            for c in done_dec:
                self._alloc.counts[c] += 1
                self._alloc.pending.discard(c)
            for c in done_inc:
                self._alloc.counts[c] -= 1
            raise
