"""Consistency check and repair of a vimg image (``vimg check [-r leaks|all]``) and ``verify``.

``check`` walks the on-disk tree from the current header independently of :class:`Image`'s
in-memory state: it recomputes every refcount from the roots (spec section 5.1) and compares,
verifies every metadata checksum and every entry's shape, and classifies what it finds:

- *leak*: a stored refcount higher than the computed one (space lost, no data at risk);
- *corruption*: anything that could return wrong data or let live data be overwritten: a stored
  refcount lower than computed, a metadata checksum mismatch, a malformed entry, a cluster used
  as two kinds of structure.

Repair rebuilds the refcounts from the (salvaged) tree and commits them through the normal
copy-on-write flush, so a crash during repair leaves the image as it was before it.
``-r all`` also salvages damaged L2 tables: entries whose data still verifies are kept, others
become ZERO and are reported as lost (with their guest offsets).

``verify`` reads every stored cluster of every root and checks its xxh3 (and the SHA-256 of
remote objects when a resolver is given).
"""

from __future__ import annotations

import logging
from array import array
from dataclasses import dataclass, field
from typing import Any

import xxhash

from vfs.errors import UsageError, VfsError
from vfs.image import directories as D
from vfs.image import layout as L
from vfs.image.fileio import ImageFile
from vfs.image.header import HeaderChoice, choose_header
from vfs.image.image import Image, Salvaged, default_opener

log = logging.getLogger(__name__)
_xxh = xxhash.xxh3_64_intdigest


@dataclass
class CheckResult:
    filename: str
    corruptions: int = 0
    leaks: int = 0
    corruptions_fixed: int = 0
    leaks_fixed: int = 0
    image_end_offset: int = 0
    total_clusters: int = 0
    allocated_clusters: int = 0
    fragmented_clusters: int = 0
    compressed_clusters: int = 0
    remote_clusters: int = 0
    lost_clusters: list[int] = field(default_factory=list)
    messages: list[str] = field(default_factory=list)

    @property
    def exit_code(self) -> int:
        """As qemu-img: 0 clean, 2 corruption left, 3 only leaks left."""
        if self.corruptions - self.corruptions_fixed > 0:
            return 2
        if self.leaks - self.leaks_fixed > 0:
            return 3
        return 0

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "filename": self.filename,
            "format": "vimg",
            "check-errors": 0,
            "image-end-offset": self.image_end_offset,
            "total-clusters": self.total_clusters,
            "allocated-clusters": self.allocated_clusters,
            "fragmented-clusters": self.fragmented_clusters,
            "compressed-clusters": self.compressed_clusters,
            "remote-clusters": self.remote_clusters,
        }
        if self.corruptions:
            out["corruptions"] = self.corruptions
        if self.leaks:
            out["leaks"] = self.leaks
        if self.corruptions_fixed:
            out["corruptions-fixed"] = self.corruptions_fixed
        if self.leaks_fixed:
            out["leaks-fixed"] = self.leaks_fixed
        if self.lost_clusters:
            out["lost-guest-offsets"] = self.lost_clusters
        return out


class _Walk:
    """One pass over the on-disk tree: computed refcounts, kinds, salvaged tables."""

    def __init__(self, f: ImageFile, h: L.Header, res: CheckResult, salvage: bool) -> None:
        self.f, self.h, self.res, self.salvage = f, h, res, salvage
        self.cs = cs = h.cluster_size
        self.bits = h.cluster_bits
        file_clusters = -(-f.size() // cs)
        if h.host_clusters > file_clusters + 1:
            self.corrupt(
                f"image end {h.host_clusters * cs:#x} lies past the end of the file "
                f"({f.size():#x}): truncated"
            )
        # Never trust the header for an allocation size: bound it by the real file.
        self.host_clusters = min(h.host_clusters, file_clusters + 1)
        self.host_end = self.host_clusters * cs
        self.computed = array("I", [0]) * self.host_clusters
        self.kind: dict[int, str] = {}
        #: Damaged structures whose clusters the committed header still references.
        self.damaged_l2: dict[int, bytearray] = {}  # active l1 index -> salvaged table
        self.active_l1: list[tuple[int, int]] = []
        self.snapshots: list[D.Snapshot] = []
        self.dropped_snapshots: list[str] = []
        self.stored: array | None = None
        self.rct: list[tuple[int, int]] = []
        self.fatal = False
        #: The active L1 failed its checksum and was salvaged entry by entry.
        self.salvaged_active_l1 = False
        #: Snapshots whose VM state table was damaged (repair drops the state).
        self.dropped_vmstate: list[str] = []
        #: The bitmap directory or a bitmap table was damaged (repair drops the bitmaps).
        self.bitmaps_damaged = False
        self.has_backing = bool(h.backing_name)
        self.guest_clusters = -(-h.virtual_size // cs)

    def corrupt(self, msg: str) -> None:
        self.res.corruptions += 1
        self.res.messages.append(f"ERROR {msg}")

    def use(self, c: int, kind: str) -> bool:
        if not 0 <= c < self.host_clusters:
            self.corrupt(f"{kind} cluster {c:#x} lies past the image end")
            return False
        prev = self.kind.get(c)
        if prev is not None and prev != kind:
            self.corrupt(f"host cluster {c:#x} used both as {prev} and as {kind}")
            return False
        self.kind[c] = kind
        self.computed[c] += 1
        return True

    def read(self, off: int, size: int, checksum: int) -> bytes | None:
        if off + size > self.host_end:
            return None
        data = self.f.pread(size, off)
        if len(data) != size or _xxh(data) != checksum:
            return None
        return data

    def run(self) -> None:
        h, cs = self.h, self.cs
        for c in range(L.clusters_for(L.HEADER_AREA, cs)):
            self.use(c, "header")
        self._refcounts()
        if h.nb_snapshots:
            for c in self._run(h.snapshots_offset, h.snapshots_size):
                self.use(c, "snapshot table")
            raw = self.read(h.snapshots_offset, h.snapshots_size, h.snapshots_checksum)
            if raw is None:
                self.corrupt("snapshot table checksum mismatch")
                self.dropped_snapshots.append("*")
            else:
                try:
                    self.snapshots = D.unpack_snapshots(raw, h.nb_snapshots, cs)
                except VfsError as e:
                    self.corrupt(f"snapshot table: {e}")
                    self.dropped_snapshots.append("*")
        l1 = self._root("active", h.l1_offset, h.l1_entries, h.l1_checksum, active=True)
        self.active_l1 = l1 if l1 is not None else [(0, 0)] * h.l1_entries
        if l1 is None:
            self.fatal = True
        kept = []
        for s in self.snapshots:
            saved = (array("I", self.computed), dict(self.kind))
            if self._root(s.name, s.l1_offset, s.l1_entries, s.l1_checksum, active=False):
                kept.append(s)
                self._vmstate(s)
            else:  # forget the partial counts of a root that is dropped
                self.computed, self.kind = saved
                self.dropped_snapshots.append(s.name)
        self.snapshots = kept
        self._bitmaps()

    def _table(
        self, what: str, off: int, entries: int, checksum: int, kind: str, data: bool = False
    ) -> bool:
        """Count a cluster table (bitmaps, VM state) and the clusters it names; False (and a
        corruption) when it is damaged. With ``data`` its clusters are verified too (bitmap
        bits are metadata; VM state is data, verify's to read)."""
        nbytes = entries * 16
        raw = self.read(off, nbytes, checksum)
        if raw is None:
            self.corrupt(f"{what}: table at {off:#x}: checksum mismatch")
            return False
        try:
            table = L.unpack_table(raw, entries, self.cs, self.host_end)
        except VfsError as e:
            self.corrupt(f"{what}: {e}")
            return False
        for c in self._run(off, nbytes):
            self.use(c, f"{kind} table")
        ok = True
        for o, sm in table:
            if o:
                self.use(o >> self.bits, kind)
                if data and self.read(o, self.cs, sm) is None:
                    self.corrupt(f"{what}: cluster at {o:#x}: checksum mismatch")
                    ok = False
        return ok

    def _vmstate(self, s: D.Snapshot) -> None:
        if not s.vm_state_table_offset:
            return
        what = f"VM state of snapshot {s.name!r}"
        ok = self._table(
            what,
            s.vm_state_table_offset,
            s.vm_state_table_entries,
            s.vm_state_table_checksum,
            "VM state",
        )
        if not ok:  # repair: the snapshot keeps its disk, loses its VM state
            s.vm_state_size = s.vm_state_table_offset = 0
            s.vm_state_table_entries = s.vm_state_table_checksum = 0
            self.dropped_vmstate.append(s.name)

    def _bitmaps(self) -> None:
        ext = self.h.bitmaps
        if ext is None:
            return
        raw = self.read(ext.directory_offset, ext.directory_size, ext.directory_checksum)
        if raw is None:
            self.corrupt("bitmap directory checksum mismatch")
            self.bitmaps_damaged = True
            return
        try:
            entries = D.unpack_bitmap_directory(raw, ext.nb_bitmaps, self.cs, self.h.virtual_size)
        except VfsError as e:
            self.corrupt(f"bitmap directory: {e}")
            self.bitmaps_damaged = True
            return
        for c in self._run(ext.directory_offset, ext.directory_size):
            self.use(c, "bitmap directory")
        for e in entries:
            if e.table_offset and not self._table(
                f"bitmap {e.name!r}",
                e.table_offset,
                e.table_entries,
                e.table_checksum,
                "bitmap",
                data=True,
            ):
                self.bitmaps_damaged = True

    def _run(self, off: int, nbytes: int) -> range:
        first = off >> self.bits
        return range(first, first + L.clusters_for(nbytes, self.cs))

    def _refcounts(self) -> None:
        h, cs = self.h, self.cs
        for c in self._run(h.refcount_table_offset, h.refcount_table_entries * 16):
            self.use(c, "refcount table")
        raw = self.read(
            h.refcount_table_offset, h.refcount_table_entries * 16, h.refcount_table_checksum
        )
        if raw is None:
            self.corrupt("refcount table checksum mismatch")
            return
        try:
            self.rct = L.unpack_l1(raw, h.refcount_table_entries, cs, self.host_end)
        except VfsError as e:
            self.corrupt(f"refcount table: {e}")
            return
        stored = array("H")
        ok = True
        for i, (off, s) in enumerate(self.rct):
            if off:
                self.use(off >> self.bits, "refcount block")
                block = self.read(off, cs, s)
                if block is None:
                    self.corrupt(f"refcount block {i} at {off:#x}: checksum mismatch")
                    ok = False
                    block = bytes(cs)
                stored.frombytes(block)
            else:
                stored.frombytes(bytes(cs))
        del stored[self.host_clusters :]
        if ok:
            self.stored = stored

    def _root(
        self, name: str, l1_off: int, entries: int, checksum: int, active: bool
    ) -> list[tuple[int, int]] | None:
        cs, bits = self.cs, self.bits
        per = L.l2_entries_per_table(cs)
        raw = self.read(l1_off, entries * 16, checksum)
        salvaged_l1 = raw is None
        if raw is None:
            self.corrupt(f"L1 table of {name} at {l1_off:#x}: checksum mismatch")
            if not (self.salvage and active) or l1_off + entries * 16 > self.host_end:
                return None
            raw = self.f.pread(entries * 16, l1_off).ljust(entries * 16, b"\0")
            self.salvaged_active_l1 = True
        for c in self._run(l1_off, entries * 16):
            self.use(c, "L1")
        l1 = []
        for idx in range(entries):
            off, s = L.L1_ENTRY.unpack_from(raw, idx * 16)
            bad = off and (off % cs or off < L.HEADER_AREA or off + cs > self.host_end)
            if bad:
                self.corrupt(f"L1 of {name} entry {idx}: bad L2 offset {off:#x}")
                l1.append((0, 0))
                if active:
                    self.lose_table(idx)
                continue
            l1.append((off, s))
            if not off:
                continue
            if not self.use(off >> bits, "L2"):
                if active:
                    self.lose_table(idx)
                l1[-1] = (0, 0)
                continue
            t = self.f.pread(cs, off)
            damaged = len(t) != cs or _xxh(t) != s
            if damaged:
                if salvaged_l1:
                    # The L1 itself is damaged: an L2 is trusted only if its checksum matches.
                    l1[-1] = (0, 0)
                    self.computed[off >> bits] -= 1
                    if active:
                        self.lose_table(idx)
                    continue
                self.corrupt(
                    f"L2 table of {name} at {off:#x} (guest {idx * per * cs:#x}): checksum mismatch"
                )
                if not active:
                    return None
                t = t.ljust(cs, b"\0")
            table = bytearray(t)
            # In a table that fails its checksum an UNALLOCATED entry may be a zeroed one: over
            # a backing file it would show the backing file's bytes, so it becomes ZERO.
            distrust_holes = damaged and active and self.has_backing
            for i, e in enumerate(L.L2_ENTRY.iter_unpack(table)):
                guest = (idx * per + i) * cs
                if e[0] == L.UNALLOCATED and distrust_holes and idx * per + i < self.guest_clusters:
                    self._drop(table, i, guest, active)
                    continue
                why = L.check_l2_entry(e[0], e[3], e[4], cs, self.host_end)
                if why:
                    if not damaged:
                        self.corrupt(f"{name}: entry for guest offset {guest:#x}: {why}")
                    self._drop(table, i, guest, active)
                    damaged = True
                    continue
                if damaged and e[0] in (L.LOCAL, L.COMPRESSED) and not self._data_ok(e):
                    self._drop(table, i, guest, active)
                    continue
                if e[0] in (L.LOCAL, L.COMPRESSED):
                    if not self.use(e[4] >> bits, "data"):
                        self._drop(table, i, guest, active)
                        damaged = True
                        continue
                    if active:
                        self.res.allocated_clusters += 1
                        self.res.compressed_clusters += e[0] == L.COMPRESSED
                elif e[0] == L.REMOTE and active:
                    self.res.remote_clusters += 1
            if damaged and active:
                self.damaged_l2[idx] = table
        return l1

    def _data_ok(self, e: tuple) -> bool:
        import zstandard

        cs = self.cs
        if e[0] == L.LOCAL:
            data = self.f.pread(cs, e[4])
        else:
            try:
                data = zstandard.ZstdDecompressor().decompress(
                    self.f.pread(e[3], e[4]), max_output_size=cs
                )
            except zstandard.ZstdError:
                return False
        return len(data) == cs and _xxh(data) == e[5]

    def _drop(self, table: bytearray, i: int, guest: int, active: bool) -> None:
        L.L2_ENTRY.pack_into(table, i * 64, L.ZERO, 0, 0, 0, 0, 0, L.NO_OID)
        if active:
            self.res.lost_clusters.append(guest)

    def lose_table(self, idx: int) -> None:
        """A whole L2 table of the active root is gone: its guest range reads as zeros (ZERO
        entries, never the backing file's bytes) and is reported lost (once, by its start)."""
        per = L.l2_entries_per_table(self.cs)
        table = bytearray(self.cs)
        for i in range(min(per, self.guest_clusters - idx * per)):
            L.L2_ENTRY.pack_into(table, i * 64, L.ZERO, 0, 0, 0, 0, 0, L.NO_OID)
        self.damaged_l2[idx] = table
        self.res.lost_clusters.append(idx * per * self.cs)


def check(path: str, repair: str | None = None, *, opener: Any = default_opener) -> CheckResult:
    """Check (and with ``repair`` in {'leaks', 'all'} repair) the image at ``path``."""
    if repair not in (None, "leaks", "all"):
        raise UsageError(f"-r must be 'leaks' or 'all', not {repair!r}")
    f = opener(path, repair is not None, False)
    try:
        choice = choose_header(f)
        h = choice.header
        res = CheckResult(filename=path)
        res.total_clusters = -(-h.virtual_size // h.cluster_size)
        res.image_end_offset = h.host_clusters * h.cluster_size
        walk = _Walk(f, h, res, salvage=repair == "all")
        res.messages += [f"note: header {n}" for n in choice.notes]
        for d in choice.damaged:
            walk.corrupt(f"header {d}")
        if choice.fallback:
            walk.corrupt(choice.fallback)
        walk.run()
        corruptions_before = res.corruptions
        if walk.stored is not None:
            for c in range(min(h.host_clusters, walk.host_clusters, len(walk.stored))):
                s, want = walk.stored[c], walk.computed[c]
                if s > want:
                    res.leaks += 1
                    res.messages.append(f"Leaked cluster {c} refcount={s} reference={want}")
                elif s < want:
                    res.corruptions += 1
                    res.messages.append(f"ERROR cluster {c} refcount={s} reference={want}")
        elif not res.corruptions:
            res.corruptions += 1
        if walk.salvaged_active_l1 and walk.has_backing:
            # A (0, 0) entry of a damaged L1 may be a zeroed one. It stays unallocated only if
            # the stored refcounts are intact and every cluster they count is accounted for
            # (then no L2 table is missing); otherwise its range is lost too.
            proven = walk.stored is not None and all(
                walk.stored[c] <= walk.computed[c]
                for c in range(min(len(walk.stored), walk.host_clusters))
            )
            if not proven:
                for idx, (off, _s) in enumerate(walk.active_l1):
                    if off == 0 and idx not in walk.damaged_l2:
                        walk.lose_table(idx)
        if repair is None or (res.corruptions == 0 and res.leaks == 0):
            return res
        if repair == "leaks" and res.corruptions:
            res.messages.append("corruption found: not repairing (use -r all)")
            return res
        if walk.fatal:
            res.messages.append("active L1 table lost: cannot repair")
            return res
        _rebuild(f, choice, walk)
        res.leaks_fixed = res.leaks
        res.corruptions_fixed = res.corruptions
        if walk.dropped_snapshots:
            names = ", ".join(
                "(unreadable table)" if n == "*" else repr(n) for n in walk.dropped_snapshots
            )
            res.messages.append(f"dropped damaged snapshot(s): {names}")
        if walk.dropped_vmstate:
            names = ", ".join(repr(n) for n in walk.dropped_vmstate)
            res.messages.append(f"dropped the damaged VM state of snapshot(s): {names}")
        if walk.bitmaps_damaged:
            res.messages.append("dropped the dirty bitmaps (their metadata was damaged)")
        if choice.fallback:
            res.messages.append(f"accepted the header of sequence {h.sequence}")
        if corruptions_before:
            res.messages.append(
                f"repaired; {len(res.lost_clusters)} damaged range(s) now read as zeros"
            )
        return res
    finally:
        f.close()


def _rebuild(f: ImageFile, choice: HeaderChoice, walk: _Walk) -> None:
    """Commit the salvaged tree with recomputed refcounts (through the normal flush).

    The structures the committed header uses (old refcount blocks and table, damaged L2 tables)
    are counted as in use, so the flush writes their replacements elsewhere and the old header
    stays intact until the new one is written: a crash during repair loses nothing."""
    counts = array("H", (min(v, L.MAX_REFCOUNT) for v in walk.computed))
    salvaged = Salvaged(
        l1=walk.active_l1,
        counts=counts,
        rct=walk.rct,
        snapshots=walk.snapshots,
        snapshots_changed=bool(walk.dropped_snapshots or walk.dropped_vmstate),
        tables=walk.damaged_l2,
        drop_bitmaps=walk.bitmaps_damaged,
        stale_bitmaps=bool(walk.res.lost_clusters) or choice.fallback is not None,
    )
    Image.rebuild(f, choice, salvaged).flush()


def verify(img: Image) -> list[dict[str, Any]]:
    """Read every stored cluster of the active image and every snapshot; return the bad ones.

    A cluster shared by several roots is read once. Remote clusters are verified only when the
    image has a resolver."""
    bad: list[dict[str, Any]] = []
    seen: set[tuple[int, int, bytes]] = set()
    names: list[str | None] = [None]
    try:
        names += [s.name for s in img.snapshots]
    except VfsError as e:
        bad.append({"root": "snapshot table", "offset": 0, "error": str(e)})
    for snap in img.snapshots if len(names) > 1 else []:
        if snap.vm_state_size:
            try:
                for _chunk in img.load_vmstate(snap.name):
                    pass
            except VfsError as e:
                bad.append({"root": snap.name, "vm-state": True, "offset": 0, "error": str(e)})
    for name in names:
        root = name or "active"

        def table_error(offset: int, err: VfsError, root: str = root) -> None:
            bad.append({"root": root, "offset": offset, "error": str(err)})

        try:
            entries = list(img.iter_entries(name, on_error=table_error))
        except VfsError as e:  # the snapshot's L1 table itself
            bad.append({"root": root, "offset": 0, "error": str(e)})
            continue
        for ci, e in entries:
            if not e.stored:
                continue
            key = (e.host, e.checksum, e.oid)
            if key in seen:  # shared with an already verified root
                continue
            seen.add(key)
            if e.kind == L.REMOTE and img.resolver is None:
                continue
            try:
                img.cluster_data(ci, e)
            except VfsError as err:  # checksum, missing object, unreachable remote
                bad.append(
                    {
                        "root": root,
                        "offset": ci * img.cluster_size,
                        "host-offset": e.host,
                        "error": str(err),
                    }
                )
    return bad
