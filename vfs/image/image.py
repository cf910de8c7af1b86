"""The vimg image: :class:`Image`, a façade over collaborators that each do one job.

Layout and invariants: ``docs/vimg-format.md``; bytes: :mod:`vfs.image.layout`. The parts:

- :mod:`~vfs.image.core` — shared state, the active root's tables and entries;
- :mod:`~vfs.image.reader` — verified reads, codecs, the backing file;
- :mod:`~vfs.image.writer` — copy-on-write writes, zeroing, discard;
- :mod:`~vfs.image.commit` — ``flush``, the commit point of the crash model;
- :mod:`~vfs.image.snapshots` — internal snapshots;
- :mod:`~vfs.image.extents` — block status, allocated extents, a root's entries;
- :mod:`~vfs.image.backing` — backing chains.

**Threads**: an ``Image`` is not thread-safe. Call it from one thread at a time (an export
serialises its requests onto one worker, or holds a lock around every call); reads also use
shared scratch buffers. Separate ``Image`` objects (of different files) are independent.
"""

from __future__ import annotations

import logging
import os
from array import array
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from vfs.errors import AlreadyExists, CorruptionError, NotFound, UsageError, VfsError
from vfs.image import backing as B
from vfs.image import directories as D
from vfs.image import extents as X
from vfs.image import layout as L
from vfs.image.alloc import Allocator
from vfs.image.bitmaps import BitmapInfo, Bitmaps
from vfs.image.commit import Committer
from vfs.image.core import Backing, Core, FileOpener, Resolver
from vfs.image.create import write_new_image
from vfs.image.extents import Extent
from vfs.image.fileio import ImageFile
from vfs.image.header import HeaderChoice, choose_header, heal, refuse_fallback
from vfs.image.reader import Reader
from vfs.image.snapshots import Snapshots, VmState
from vfs.image.writer import Writer

log = logging.getLogger(__name__)

#: Implementation limit on the L1 table (held in memory as a list): 1 Mi entries = 64 TiB of
#: guest at 64 KiB clusters, 64 PiB at 2 MiB.
MAX_L1_ENTRIES = 1 << 20

__all__ = [
    "Backing",
    "BitmapInfo",
    "Extent",
    "Image",
    "Resolver",
    "Salvaged",
    "default_opener",
]


@dataclass
class Salvaged:
    """Tables rebuilt by ``check -r``: refcounts recomputed from the roots, repaired L2 tables."""

    l1: list[tuple[int, int]]
    counts: array
    rct: list[tuple[int, int]]
    snapshots: list[D.Snapshot]
    snapshots_changed: bool
    tables: dict[int, bytearray] = field(default_factory=dict)
    #: The bitmap directory (or a bitmap's table) was damaged: drop every bitmap.
    drop_bitmaps: bool = False
    #: The repair changed what some ranges read: every bitmap becomes stale (spec 11).
    stale_bitmaps: bool = False


def default_opener(path: str, writable: bool, create: bool) -> ImageFile:
    return ImageFile(path, writable=writable, create=create)


class Image:
    """An open vimg image. Use :meth:`create` or :meth:`open`; close (or ``with``) when done.

    Not thread-safe (see the module docstring). Writes are durable after :meth:`flush` (the
    commit) and not before; after a failed write every later :meth:`flush` fails too
    (:class:`~vfs.errors.WriteFailed`) until the image is reopened."""

    format = "vimg"

    def __init__(
        self,
        path: str,
        f: ImageFile,
        choice: HeaderChoice,
        *,
        readonly: bool,
        resolver: Resolver | None,
        chain: tuple[str, ...] = (),
        salvaged: Salvaged | None = None,
        with_backing: bool = True,
        allowed: tuple[str, ...] = (),
    ) -> None:
        header = choice.header
        cs = header.cluster_size
        if header.host_clusters * cs > f.size() + cs:
            # Bounds every allocation that follows by the real file (hostile or truncated files).
            raise CorruptionError(
                f"{path}: image end {header.host_clusters * cs:#x} lies past the end of the file "
                f"({f.size():#x}): truncated?"
            )
        self._core = c = Core(path, f, choice, readonly=readonly, resolver=resolver)
        #: Directories backing files may lie in (real paths): spec 8, "Confinement".
        self._allowed = allowed or B.allowed_dirs(path)
        self._reader = Reader(c)
        self._writer = Writer(c, self._reader)
        self._committer = Committer(c, self._writer)
        self._snapshots = Snapshots(c, self._committer)
        self._bitmaps = Bitmaps(c, self._committer, self._writer)
        self._committer.parts += [self._snapshots, self._bitmaps]
        if salvaged is not None:
            self._install(salvaged)
            return
        c.load_l1()
        if readonly:
            c.alloc = Allocator.empty(L.refcounts_per_block(cs), header.host_clusters)
        else:
            c.load_refcounts()
        if header.backing_name and with_backing:
            c.backing = B.open_layer(
                header.backing_name,
                self.backing_format,
                path,
                resolver,
                chain + (os.path.realpath(path),),
                self._allowed,
            )
        if not readonly:
            # Dirty bitmaps go to disk as in use before the first write is accepted (spec 7.3).
            self._bitmaps.start_session()
            if self._committer.dirty:
                try:
                    self._committer.flush()
                except BaseException:
                    if c.backing is not None:
                        c.backing.close()
                    raise

    # ------------------------------------------------------------------ open / create / close
    @classmethod
    def create(
        cls,
        path: str,
        size: int,
        *,
        cluster_size: int = 1 << L.DEFAULT_CLUSTER_BITS,
        backing: str | None = None,
        backing_format: str | None = None,
        compress: bool = False,
        opener: FileOpener = default_opener,
        resolver: Resolver | None = None,
        backing_dirs: tuple[str, ...] | list[str] = (),
    ) -> Image:
        """Create a new image (refusing to overwrite an existing file) and open it read-write.
        With a backing file and ``size < 0`` the size is the backing file's. The backing file
        must lie in the new image's directory or one of ``backing_dirs`` (spec 8)."""
        bits = cluster_size.bit_length() - 1
        if cluster_size != 1 << bits or not L.MIN_CLUSTER_BITS <= bits <= L.MAX_CLUSTER_BITS:
            raise UsageError(f"cluster size {cluster_size} must be a power of two, 4k..2M")
        bfmt = L.BACKING_NONE
        if backing:
            allowed = B.allowed_dirs(path, backing_dirs)
            fmt = B.check_backing_name(backing, backing_format, path, allowed)
            bfmt = L.BACKING_FORMAT_CODES[fmt]
            if size < 0:
                size = -(-B.virtual_size_of(backing, fmt, path, allowed) // L.SECTOR) * L.SECTOR
        if size % L.SECTOR or size < 0 or size > L.MAX_VIRTUAL_SIZE:
            raise UsageError(f"image size {size} must be a multiple of 512 and at most 2^56")
        if os.path.exists(path):
            raise AlreadyExists(f"{path}: file exists")
        if L.l1_entries_for(size, cluster_size) > MAX_L1_ENTRIES:
            limit = MAX_L1_ENTRIES * cluster_size * L.l2_entries_per_table(cluster_size)
            raise UsageError(
                f"{size} bytes exceeds this implementation's limit of {limit} bytes at "
                f"{cluster_size // 1024} KiB clusters; use a larger cluster size (-c)"
            )
        write_new_image(
            opener(path, True, True),
            size,
            bits,
            backing_name=backing or "",
            backing_format=bfmt,
            compress=compress,
        )
        return cls.open(path, opener=opener, resolver=resolver, backing_dirs=backing_dirs)

    @classmethod
    def open(
        cls,
        path: str,
        *,
        readonly: bool = False,
        resolver: Resolver | None = None,
        opener: FileOpener = default_opener,
        with_backing: bool = True,
        backing_dirs: tuple[str, ...] | list[str] = (),
        _chain: tuple[str, ...] = (),
        _allowed: tuple[str, ...] = (),
    ) -> Image:
        """Open an existing image. ``with_backing=False`` skips opening the backing chain (for
        metadata work such as ``info``, ``snapshot`` or ``rebase -u`` when the backing file is
        gone); reading a range that would fall through to it is then an error, never zeros.
        Backing files are followed only inside this image's directory and ``backing_dirs``
        (spec 8); the layers below are confined to the same directories.

        A header that may have rolled back (spec 3.1) is reported in :attr:`header_choice`
        and logged; a read-write open refuses it (``check -r all`` accepts it). A writer first
        rewrites damaged copies of the current header from the intact one, and, when the image
        has enabled dirty bitmaps, commits them as in use before returning (spec 7.3)."""
        try:
            f = opener(path, not readonly, False)
        except FileNotFoundError:
            raise NotFound(f"{path}: no such file") from None
        except IsADirectoryError:
            raise UsageError(f"{path}: is a directory") from None
        try:
            choice = choose_header(f)
            h = choice.header
            if choice.fallback:
                if not readonly:
                    refuse_fallback(path, choice)
                log.warning("%s: %s", path, choice.fallback)
            if not readonly:
                heal(f, choice)
            if h.autoclear & ~L.KNOWN_AUTOCLEAR:
                log.info("clearing unknown autoclear features %#x", h.autoclear)
            return cls(
                path,
                f,
                choice,
                readonly=readonly,
                resolver=resolver,
                chain=_chain,
                with_backing=with_backing,
                allowed=_allowed or B.allowed_dirs(path, backing_dirs),
            )
        except BaseException:
            f.close()
            raise

    @classmethod
    def rebuild(cls, f: ImageFile, choice: HeaderChoice, salvaged: Salvaged) -> Image:
        """An image on ``f`` (open read-write) whose tables are the ones ``check -r`` rebuilt;
        its next :meth:`flush` commits them copy-on-write (the old header stays valid until
        the new one is written) and so accepts a possible roll-back. Used by
        :func:`vfs.image.check.check`."""
        heal(f, choice)
        return cls(f.path, f, choice, readonly=False, resolver=None, salvaged=salvaged)

    def close(self) -> None:
        """Commit (writers) and release the file. After a failed write the file is released
        and :class:`~vfs.errors.WriteFailed` is raised: what was written since the last commit
        is not durable."""
        c = self._core
        if c.closed:
            return
        try:
            if not c.readonly:
                if c.failed is None:
                    self._bitmaps.end_session()  # the bits go back, in_use cleared
                self.flush()
                self._committer.sync_mirror()
                self._writer.trim_preallocation(self.dirty)
        finally:
            c.closed = True
            c.f.close()
            if c.backing is not None:
                c.backing.close()

    def __enter__(self) -> Image:
        return self

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        if exc_type is None:
            self.close()
            return
        try:  # an error is on its way out already: do not replace it with close's
            self.close()
        except VfsError as e:
            log.debug("%s: close after an error: %s", self.path, e)

    def _install(self, s: Salvaged) -> None:
        """Take the tables ``check -r`` rebuilt; the next flush commits them copy-on-write."""
        c = self._core
        h, cs = c.header, c.cluster_size
        c.l1 = list(s.l1)
        c.l1_off, c.l1_sum = h.l1_offset, h.l1_checksum
        c.l1_nbytes = h.l1_entries * L.L1_ENTRY_SIZE
        c.alloc = Allocator(s.counts, L.refcounts_per_block(cs))
        c.rct = list(s.rct) or [(0, 0)] * L.refcount_blocks_for(len(s.counts), cs)
        c.alloc.dirty_blocks.update(range(len(c.rct)))  # rewrite every refcount block
        self._snapshots.install(s.snapshots, s.snapshots_changed)
        if s.drop_bitmaps:
            c.header.bitmaps = None
            c.header.autoclear &= ~L.AUTOCLEAR_BITMAPS
        elif c.header.bitmaps is not None and s.stale_bitmaps:
            self._bitmaps.mark_stale()  # the repair changed what ranges read (spec 11)
        c.header_dirty = c.l1_dirty = True
        for idx, table in s.tables.items():
            c.l2cache[idx] = table
            c.dirty_l2.add(idx)

    # ------------------------------------------------------------------ properties
    @property
    def path(self) -> str:
        return self._core.path

    @property
    def size(self) -> int:
        """Virtual (guest) size in bytes."""
        return self._core.size

    @property
    def cluster_size(self) -> int:
        return self._core.cluster_size

    @property
    def cluster_bits(self) -> int:
        return self._core.cluster_bits

    @property
    def readonly(self) -> bool:
        return self._core.readonly

    @property
    def resolver(self) -> Resolver | None:
        """Where REMOTE clusters come from (None: reading one is an error)."""
        return self._core.resolver

    @resolver.setter
    def resolver(self, value: Resolver | None) -> None:
        self._core.resolver = value

    @property
    def backing(self) -> Backing | None:
        """The open layer below (None without a backing file, or opened without it)."""
        return self._core.backing

    @property
    def allowed_backing_dirs(self) -> tuple[str, ...]:
        """The directories backing files may lie in (real paths), for this whole chain."""
        return self._allowed

    @property
    def backing_name(self) -> str:
        return self._core.header.backing_name

    @property
    def backing_format(self) -> str:
        return L.BACKING_FORMATS[self._core.header.backing_format]

    @property
    def header(self) -> L.Header:
        """The committed header (what is on disk)."""
        return self._core.header

    @property
    def header_choice(self) -> HeaderChoice:
        """How the header was chosen at open: damaged copies found, a possible roll-back."""
        return self._core.choice

    @property
    def sequence(self) -> int:
        return self._core.header.sequence

    @property
    def dirty(self) -> bool:
        """Something changed since the last commit."""
        return self._committer.dirty

    @property
    def guest_clusters(self) -> int:
        return self._core.guest_clusters

    # ------------------------------------------------------------------ I/O
    def read(self, offset: int, length: int) -> bytes | bytearray:
        """Guest bytes; every stored cluster touched is checksum-verified."""
        return self._reader.read(offset, length)

    def readinto(self, offset: int, buf: bytearray | memoryview) -> int:
        """Fill ``buf`` with the guest bytes at ``offset`` (verified); returns ``len(buf)``."""
        return self._reader.readinto(offset, buf)

    def write(self, offset: int, data: bytes | bytearray | memoryview) -> None:
        """Write guest bytes (durable after the next :meth:`flush`)."""
        self._writer.write(offset, data)

    def write_zeroes(self, offset: int, length: int, *, unmap: bool = True) -> None:
        """The range reads as zeros. Whole clusters become ZERO entries and their space is
        freed; with ``unmap=False`` (NBD's NO_HOLE) they stay allocated, holding zeros."""
        self._writer.zero_range(offset, length, discard=False, unmap=unmap)

    def discard(self, offset: int, length: int) -> None:
        """Free the range (trim). Whole clusters become unallocated (ZERO over a backing file
        so the backing data does not reappear); partial clusters are zeroed."""
        self._writer.zero_range(offset, length, discard=True)

    def flush(self) -> None:
        """Commit everything written so far (spec section 9). Raises
        :class:`~vfs.errors.WriteFailed` once any write of this open image has failed."""
        self._committer.flush()

    # ------------------------------------------------------------------ clusters and entries
    def entry(self, ci: int) -> L.Entry:
        """The L2 entry of guest cluster ``ci`` (named fields)."""
        return L.Entry._make(self._core.entry(ci))

    def iter_entries(
        self,
        snapshot: str | None = None,
        *,
        on_error: Callable[[int, VfsError], None] | None = None,
    ) -> Iterator[tuple[int, L.Entry]]:
        """(guest cluster, entry) for every entry that is not UNALLOCATED, of the active root
        or of ``snapshot``. A damaged L2 table raises, or is passed to ``on_error(guest
        offset, error)`` and skipped."""
        return X.iter_entries(self._core, self._snapshots, snapshot, on_error)

    def cluster_data(self, ci: int, entry: tuple | None = None) -> bytes:
        """The verified content of a stored cluster (LOCAL, COMPRESSED or REMOTE; never the
        backing file). ``entry`` (from :meth:`iter_entries`) defaults to the active one."""
        return self._reader.cluster(ci, self._core.entry(ci) if entry is None else entry)

    def read_cluster(self, ci: int) -> bytes:
        """The full content of guest cluster ``ci`` as the guest sees it."""
        return self._reader.read_cluster(ci)

    def store_cluster(self, ci: int, content: bytes | memoryview) -> None:
        """Make guest cluster ``ci`` hold ``content`` (one cluster), copy-on-write. Not a
        guest write: dirty bitmaps are not marked (for moves that keep the content, as pull)."""
        self._core.writable()
        self._writer.store_cluster(ci, self._core.entry(ci), content)

    def set_remote(self, ci: int, oid: bytes, checksum: int) -> None:
        """Point guest cluster ``ci`` at a remote object (its content is unchanged)."""
        self._writer.set_remote(ci, oid, checksum)

    def drop_cluster(self, ci: int) -> None:
        """Make guest cluster ``ci`` unallocated in this layer (it then reads through to the
        backing file): for ``commit``, once the backing file holds the same bytes."""
        self._writer.drop_cluster(ci)

    # ------------------------------------------------------------------ block status
    def block_status(
        self, offset: int, length: int, *, chain: bool = False, host_offsets: bool = False
    ) -> list[Extent]:
        """Runs of [offset, offset+length) with one status each (:class:`Extent`): this
        layer's view, or with ``chain`` the whole backing chain's (what NBD ``base:allocation``
        and ``qemu-img map`` report). ``host_offsets``: give LOCAL runs their host offsets
        (runs are then also split where the host offsets are not contiguous)."""
        if chain:
            return X.chain_status(self._core, offset, length, host_offsets)
        return X.layer_status(self._core, offset, length, host_offsets)

    def iter_allocated(self, offset: int = 0, length: int | None = None) -> Iterator[Extent]:
        """The extents this layer decides (stored data or ZERO entries), in guest order: what
        a copy of this layer alone must carry (e.g. migration over a shared backing file)."""
        n = self.size - offset if length is None else length
        for e in X.layer_status(self._core, offset, n, False):
            if e.allocated:
                yield e

    # ------------------------------------------------------------------ snapshots
    @property
    def snapshots(self) -> list[D.Snapshot]:
        """The snapshot table (read on first use: the active view does not need it)."""
        return self._snapshots.items

    def snapshot_list(self) -> list[D.Snapshot]:
        return list(self._snapshots.items)

    def snapshot_create(
        self, name: str, *, vm_state: VmState | None = None, vm_clock_nsec: int = 0
    ) -> D.Snapshot:
        """Freeze the current disk under ``name`` (commits first and after), optionally with
        the VM state that belongs to it (see :meth:`save_vmstate`)."""
        return self._snapshots.create(name, vm_state, vm_clock_nsec)

    def save_vmstate(self, snapshot: str, data: VmState) -> int:
        """Store VM state (bytes, a binary file, or an iterable of chunks, e.g. QEMU's
        migration stream) with snapshot ``snapshot``, replacing any; commits. Returns its
        size. The state lives in the image file, freed with the snapshot (spec 6.1)."""
        return self._snapshots.save_vmstate(snapshot, data)

    def load_vmstate(self, snapshot: str) -> Iterator[bytes]:
        """The VM state saved with ``snapshot``, in order, in verified chunks of at most one
        cluster (empty when there is none)."""
        return self._snapshots.load_vmstate(snapshot)

    def vmstate_size(self, snapshot: str) -> int:
        return self._snapshots.find(snapshot).vm_state_size

    def snapshot_apply(self, name: str) -> None:
        """Revert the active image to a snapshot (the snapshot itself stays). Dirty bitmaps
        record the whole disk as changed."""
        old = self.size
        self._snapshots.apply(name)
        if self.size != old:
            self._bitmaps.resize(self.size)
        self._writer.mark(0, self.size)

    def snapshot_delete(self, name: str) -> None:
        self._snapshots.delete(name)

    def roots(self) -> Iterator[tuple[str, int, list[tuple[int, int]], bool]]:
        """(name, l1_offset, l1 entries, is_active) for the active root and every snapshot."""
        return self._snapshots.roots()

    # ------------------------------------------------------------------ dirty bitmaps
    def bitmap_add(
        self, name: str, *, granularity: int | None = None, enabled: bool = True
    ) -> BitmapInfo:
        """A new dirty bitmap, all clear: from now on (``enabled``) every write path marks the
        ranges it changes. ``granularity`` (bytes per bit): a power of two, 512 .. 2 GiB;
        default the cluster size. Durable at the next flush."""
        return self._bitmaps.add(name, granularity, enabled)

    def bitmap_remove(self, name: str) -> None:
        self._bitmaps.remove(name)

    def bitmap_clear(self, name: str) -> None:
        """Reset to all clear (a new point in time; a stale bitmap is usable again)."""
        self._bitmaps.clear(name)

    def bitmap_enable(self, name: str, enabled: bool = True) -> None:
        """Start (or with False, stop) recording writes in the bitmap."""
        self._bitmaps.set_enabled(name, enabled)

    def bitmap_list(self) -> list[BitmapInfo]:
        return [self._bitmaps.info(bm) for bm in self._bitmaps.items]

    def bitmap_dirty(
        self, name: str, offset: int = 0, length: int | None = None
    ) -> list[tuple[int, int]]:
        """Dirty (offset, length) ranges inside [offset, offset+length), in guest order and
        merged, at the bitmap's granularity. A stale bitmap (see :class:`BitmapInfo`) is
        dirty everywhere."""
        return self._bitmaps.dirty_ranges(name, offset, length)

    def bitmap_take(self, name: str) -> list[tuple[int, int]]:
        """:meth:`bitmap_dirty` of the whole disk and :meth:`bitmap_clear` in one step: what
        a copier (migration, backup) must copy now; writes after it are marked again."""
        return self._bitmaps.take(name)

    # ------------------------------------------------------------------ resize / backing
    def resize(self, new_size: int) -> None:
        """Grow or shrink the virtual disk. Shrinking frees everything past the new end."""
        c = self._core
        c.writable()
        if new_size % L.SECTOR or new_size < 0 or new_size > L.MAX_VIRTUAL_SIZE:
            raise UsageError(f"size {new_size} must be a multiple of 512")
        if L.l1_entries_for(new_size, c.cluster_size) > MAX_L1_ENTRIES:
            raise UsageError(f"size {new_size} exceeds this implementation's limit")
        c.settle_all()
        old, cs = c.size, c.cluster_size
        if new_size < old:
            c.punch = True
            tail = new_size & c.mask
            if tail:
                self._writer.zero_range(new_size, min(cs - tail, old - new_size), discard=False)
            first = -(-new_size // cs)
            for ci in range(first, -(-old // cs)):
                e = c.entry(ci)
                if e[0] != L.UNALLOCATED:
                    c.release(e)
                    c.set_entry(ci, L.UNALLOCATED)
        b = c.backing
        if new_size > old and c.header.backing_name and b is None:
            raise UsageError(f"{c.path} was opened without its backing file")
        c.resize_l1(L.l1_entries_for(new_size, cs))
        c.size = new_size
        c.header_dirty = True
        self._bitmaps.resize(new_size)
        if new_size > old:
            self._writer.mark(old, new_size - old)  # the new range changed (spec 7.3)
            if b is not None and b.size > old:
                self.write_zeroes(old, min(new_size, b.size) - old)

    def set_backing(self, name: str | None, fmt: str | None) -> None:
        """Change the backing reference (no data is copied: that is rebase's job)."""
        c = self._core
        c.writable()
        if name:
            fmt = B.check_backing_name(name, fmt, c.path, self._allowed)
        # Open the new chain first: a missing file or a loop must leave the image unchanged.
        new = None
        if name:
            assert fmt is not None
            new = B.open_layer(
                name, fmt, c.path, c.resolver, (os.path.realpath(c.path),), self._allowed
            )
        self.close_backing()
        c.backing = new
        c.header.backing_name = name or ""
        c.header.backing_format = L.BACKING_FORMAT_CODES[fmt] if name and fmt else L.BACKING_NONE
        c.header_dirty = True

    def close_backing(self) -> None:
        """Close the backing chain (e.g. to write into the backing file); reads that fall
        through are then errors until :meth:`open_backing`."""
        c = self._core
        if c.backing is not None:
            c.backing.close()
            c.backing = None

    def open_backing(self) -> None:
        """(Re)open the backing chain named in the header."""
        c = self._core
        self.close_backing()
        if c.header.backing_name:
            c.backing = B.open_layer(
                c.header.backing_name,
                self.backing_format,
                c.path,
                c.resolver,
                (os.path.realpath(c.path),),
                self._allowed,
            )

    def backing_path(self) -> str:
        """The path the backing name stands for ('' without a backing file); not checked
        against the allowed directories (:meth:`confined_backing_path` is)."""
        name = self.backing_name
        return B.resolve_name(name, self.path) if name else ""

    def confined_backing_path(self) -> str:
        """The real path of the backing file if it lies in an allowed directory ('' without
        a backing file); UsageError otherwise."""
        name = self.backing_name
        return B.confine(name, self.path, self._allowed) if name else ""
