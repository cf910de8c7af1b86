"""Internal snapshots of a vimg image (spec section 6): create, apply, delete, root walking,
and the VM state a snapshot may carry (6.1).

A collaborator of :class:`vfs.image.image.Image`, and the one place that counts whole roots
(every cluster an L1 table reaches) up and down — the bookkeeping that makes a snapshot cheap to
take (share everything) and safe to write after (copy-on-write by refcount).

The snapshot table is read when first needed, not at open: the active view needs only the
active tables, so a damaged snapshot table does not stop anyone reading the disk.

VM state (hibernation: QEMU's device and memory state saved with the disk it belongs to) is a
cluster table of the snapshot's own clusters. Crash story: :meth:`Snapshots.save_vmstate`
writes the state and its table to fresh clusters, then commits the snapshot table that names
them; a crash before that commit leaves the snapshot as it was (the new clusters lie past the
image end or are free), after it the new state is whole.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING, BinaryIO

import xxhash

from vfs.errors import AlreadyExists, NotFound, UsageError
from vfs.image import directories as D
from vfs.image import layout as L
from vfs.image.core import Core

if TYPE_CHECKING:
    from vfs.image.commit import Committer

_ENTRY = L.L2_ENTRY
_xxh = xxhash.xxh3_64_intdigest

#: What :meth:`Snapshots.save_vmstate` takes: bytes, a binary file, or an iterable of chunks.
VmState = bytes | bytearray | memoryview | BinaryIO | Iterable[bytes]


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
        if self.items:
            self.commit.w.pwrite(self._bytes, self.off)
        self.sum = _xxh(self._bytes) if self.items else 0

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
    def create(
        self, name: str, vm_state: VmState | None = None, vm_clock_nsec: int = 0
    ) -> D.Snapshot:
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
            vm_clock_nsec=vm_clock_nsec,
        )
        self.items.append(snap)
        self._dirty = True
        if vm_state is not None:
            self.save_vmstate(name, vm_state)  # commits
        else:
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
        self._free_vmstate(snap)
        self.items.remove(snap)
        self._dirty = True
        self.commit.flush()

    # ------------------------------------------------------------------ VM state
    def save_vmstate(self, name: str, data: VmState) -> int:
        """Store ``data`` as the VM state of snapshot ``name`` (replacing any), commit, and
        return its size. Clusters of zeros are not stored."""
        c = self.c
        c.writable()
        snap = self.find(name)
        cs, bits, al = c.cluster_size, c.cluster_bits, c.alloc
        table: list[tuple[int, int]] = []
        taken: list[int] = []
        size = 0
        try:
            for piece in _chunks(data, cs):
                size += len(piece)
                if not any(piece):
                    table.append((0, 0))
                    continue
                chunk = bytes(piece).ljust(cs, b"\0")
                host = al.alloc()
                taken.append(host)
                self.commit.w.pwrite(chunk, host << bits)
                table.append((host << bits, _xxh(chunk)))
            run = 0
            if table:
                raw = L.pack_table(table)
                n = L.clusters_for(len(raw), cs)
                run = al.alloc() if n == 1 else al.alloc_run(n)
                taken += range(run, run + n)
                self.commit.w.pwrite(raw, run << bits)
        except BaseException:
            for k in taken:  # fresh: free again at once
                al.decref(k)
            raise
        self._free_vmstate(snap)
        snap.vm_state_size = size
        snap.vm_state_table_offset = run << bits if table else 0
        snap.vm_state_table_entries = len(table)
        snap.vm_state_table_checksum = _xxh(raw) if table else 0
        self._dirty = True
        self.commit.flush()
        return size

    def vmstate_table(self, snap: D.Snapshot) -> list[tuple[int, int]]:
        """The VM state's cluster table, verified (empty without VM state)."""
        if not snap.vm_state_table_offset:
            return []
        c = self.c
        raw = c.read_meta(
            snap.vm_state_table_offset,
            snap.vm_state_table_entries * L.L1_ENTRY_SIZE,
            snap.vm_state_table_checksum,
            f"VM state table of snapshot {snap.name!r}",
        )
        return L.unpack_table(raw, snap.vm_state_table_entries, c.cluster_size, c.host_end())

    def load_vmstate(self, name: str) -> Iterator[bytes]:
        """The VM state of snapshot ``name`` in order, one verified cluster at a time (the
        last one cut to the state's size): nothing is returned before it is checked."""
        c = self.c
        snap = self.find(name)
        cs = c.cluster_size
        left = snap.vm_state_size
        for i, (off, s) in enumerate(self.vmstate_table(snap)):
            n = min(cs, left)
            if off:
                chunk = c.read_meta(off, cs, s, f"VM state of snapshot {name!r} (cluster {i})")
                yield chunk if n == cs else chunk[:n]
            else:
                yield bytes(n)
            left -= n

    def _free_vmstate(self, snap: D.Snapshot) -> None:
        if not snap.vm_state_table_offset:
            return
        c = self.c
        table = self.vmstate_table(snap)  # a damaged table raises: nothing freed, nothing lost
        for off, _s in table:
            if off:
                c.alloc.decref(off >> c.cluster_bits)
        self.commit.relocate_run(
            snap.vm_state_table_offset, snap.vm_state_table_entries * L.L1_ENTRY_SIZE, 0
        )
        snap.vm_state_size = snap.vm_state_table_offset = 0
        snap.vm_state_table_entries = snap.vm_state_table_checksum = 0

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


def _chunks(data: VmState, size: int) -> Iterator[bytes | memoryview]:
    """``data`` in pieces of ``size`` bytes (the last may be shorter)."""
    if isinstance(data, (bytes, bytearray, memoryview)):
        mv = memoryview(data).cast("B")
        for o in range(0, len(mv), size):
            yield mv[o : o + size]
        return
    read = getattr(data, "read", None)
    if read is not None:
        while True:
            buf = bytearray()
            while len(buf) < size:
                got = read(size - len(buf))
                if not got:
                    break
                buf += got
            if buf:
                yield bytes(buf)
            if len(buf) < size:
                return
    pending = bytearray()
    for part in data:  # type: ignore[union-attr]
        pending += part
        while len(pending) >= size:
            yield bytes(pending[:size])
            del pending[:size]
    if pending:
        yield bytes(pending)
