"""Internal snapshots of a vimg image (spec section 6): create, apply, delete, and root walking.

A collaborator of :class:`vfs.image.image.Image`, and the one place that counts whole roots
(every cluster an L1 table reaches) up and down — the bookkeeping that makes a snapshot cheap to
take (share everything) and safe to write after (copy-on-write by refcount).

The snapshot table is read when first needed, not at open: the active view needs only the
active tables, so a damaged snapshot table does not stop anyone reading the disk.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import TYPE_CHECKING

from vfs.errors import AlreadyExists, NotFound, UsageError
from vfs.image import directories as D
from vfs.image import layout as L
from vfs.image.core import Core

if TYPE_CHECKING:
    from vfs.image.commit import Committer

_ENTRY = L.L2_ENTRY


class Snapshots:
    def __init__(self, core: Core, committer: Committer) -> None:
        self.c = core
        self.commit = committer
        h = core.header
        self._list: list[D.Snapshot] | None = None
        self.off, self.sum, self.size = h.snapshots_offset, h.snapshots_checksum, h.snapshots_size
        self.count = h.nb_snapshots
        self._dirty = False
        self._bytes = b""

    # ------------------------------------------------------------------ the table
    @property
    def items(self) -> list[D.Snapshot]:
        """The snapshot table (read and verified on first use)."""
        if self._list is None:
            self._list = []
            if self.count:
                raw = self.c.read_meta(self.off, self.size, self.sum, "snapshot table")
                self._list = D.unpack_snapshots(raw, self.count, self.c.cluster_size)
        return self._list

    def install(self, snaps: list[D.Snapshot], changed: bool) -> None:
        """Take a table rebuilt by ``check -r`` (rewritten at the next commit if ``changed``)."""
        self._list = list(snaps)
        self._dirty = changed

    def find(self, name: str) -> D.Snapshot:
        for s in self.items:
            if s.name == name:
                return s
        for s in self.items:
            if s.id == name:
                return s
        raise NotFound(f"no snapshot named {name!r}")

    # ------------------------------------------------------------------ commit part
    def dirty(self) -> bool:
        return self._dirty

    def place(self) -> None:
        if not self._dirty:
            return
        snaps = self.items
        self._bytes = D.pack_snapshots(snaps)
        if snaps:
            self.off = self.commit.relocate_run(self.off, self.size, len(self._bytes))
        else:
            self.commit.relocate_run(self.off, self.size, 0)
            self.off = 0
        self.size = len(self._bytes)

    def write(self) -> None:
        if not self._dirty:
            return
        import xxhash

        if self.items:
            self.commit.w.pwrite(self._bytes, self.off)
        self.sum = xxhash.xxh3_64_intdigest(self._bytes) if self.items else 0

    def fill_header(self, h: L.Header) -> None:
        h.snapshots_offset, h.snapshots_checksum, h.snapshots_size = self.off, self.sum, self.size
        if self._list is not None:
            self.count = len(self._list)
        h.nb_snapshots = self.count

    def committed(self) -> None:
        self._dirty = False
        self._bytes = b""

    # ------------------------------------------------------------------ walking roots
    def roots(self) -> Iterator[tuple[str, int, list[tuple[int, int]], bool]]:
        """(name, l1_offset, l1 entries, is_active) for the active root and every snapshot."""
        c = self.c
        yield ("active", c.l1_off, c.l1, True)
        for s in self.items:
            yield (s.name, s.l1_offset, self.snapshot_l1(s), False)

    def snapshot_l1(self, s: D.Snapshot) -> list[tuple[int, int]]:
        """A snapshot's L1 table, checksum-verified."""
        c = self.c
        raw = c.read_meta(
            s.l1_offset, s.l1_entries * L.L1_ENTRY_SIZE, s.l1_checksum, f"L1 of snapshot {s.name!r}"
        )
        return L.unpack_l1(raw, s.l1_entries, c.cluster_size, c.host_end())

    def root_clusters(self, l1_off: int, l1: list[tuple[int, int]], active: bool) -> Iterator[int]:
        """Every host cluster one root uses, with multiplicity (section 5.1 of the spec)."""
        c = self.c
        bits = c.cluster_bits
        first = l1_off >> bits
        yield from range(first, first + L.clusters_for(len(l1) * L.L1_ENTRY_SIZE, c.cluster_size))
        for idx, (off, s) in enumerate(l1):
            t = c.l2cache.get(idx) if active else None
            if off:
                yield off >> bits
            if t is None:
                if not off:
                    continue
                t = c.load_l2(off, s, idx)
            for e in _ENTRY.iter_unpack(t):
                if e[0] == L.LOCAL or e[0] == L.COMPRESSED:
                    yield e[4] >> bits

    # ------------------------------------------------------------------ operations
    def create(self, name: str) -> D.Snapshot:
        c = self.c
        c.writable()
        if not name or len(name.encode()) > D.MAX_SNAPSHOT_NAME:
            raise UsageError("snapshot name must be 1..256 bytes")
        if any(s.name == name for s in self.items):
            raise AlreadyExists(f"snapshot {name!r} already exists")
        self.commit.flush()
        # The active root's clusters become shared: the next change to any of them copies it.
        self._change_refs(list(self.root_clusters(c.l1_off, c.l1, True)), [])
        now = time.time_ns()
        ids = [int(s.id) for s in self.items if s.id.isdigit()]
        snap = D.Snapshot(
            id=str(max(ids, default=0) + 1),
            name=name,
            l1_offset=c.l1_off,
            l1_checksum=c.l1_sum,
            l1_entries=len(c.l1),
            virtual_size=c.size,
            date_sec=now // 10**9,
            date_nsec=now % 10**9,
        )
        self.items.append(snap)
        self._dirty = True
        self.commit.flush()
        return snap

    def apply(self, name: str) -> None:
        """Revert the active image to a snapshot (the snapshot itself stays)."""
        c = self.c
        c.writable()
        snap = self.find(name)
        self.commit.flush()
        new_l1 = self.snapshot_l1(snap)
        new_refs = list(self.root_clusters(snap.l1_offset, new_l1, False))
        old_refs = list(self.root_clusters(c.l1_off, c.l1, True))
        self._change_refs(new_refs, old_refs)
        c.l1, c.l1_off, c.l1_sum = new_l1, snap.l1_offset, snap.l1_checksum
        c.l1_nbytes = snap.l1_entries * L.L1_ENTRY_SIZE
        c.l2cache.clear()
        c.dirty_l2.clear()
        c.size = snap.virtual_size
        c.header_dirty = True
        self.commit.flush()

    def delete(self, name: str) -> None:
        c = self.c
        c.writable()
        snap = self.find(name)
        self.commit.flush()
        l1 = self.snapshot_l1(snap)
        self._change_refs([], list(self.root_clusters(snap.l1_offset, l1, False)))
        self.items.remove(snap)
        self._dirty = True
        self.commit.flush()

    def _change_refs(self, inc: list[int], dec: list[int]) -> None:
        """Count a root in and/or out, all or nothing (an overflow half-way must not leave
        counts that the next commit would write)."""
        al = self.c.alloc
        done_inc: list[int] = []
        done_dec: list[int] = []
        try:
            for k in inc:
                al.incref(k)
                done_inc.append(k)
            for k in dec:
                al.decref(k)
                done_dec.append(k)
        except BaseException:
            for k in done_dec:
                al.counts[k] += 1
                al.pending.discard(k)
            for k in done_inc:
                al.counts[k] -= 1
            raise
