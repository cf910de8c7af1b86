"""One exported image: the plain-Python core both adapters (NBD, the FUSE raw file) call.

**Threads and the loop.** An :class:`~vfs.image.Image` is not thread-safe, so every call into
it is a short synchronous section on the trio loop (the NBD connections and the FUSE
handlers of one export process share one loop). Two kinds of work never run there:

- *fetches*: the image is given a :class:`LocalOnlyResolver`, which serves objects from the
  local store (a pread, cheap enough for the loop) and raises :class:`NeedFetch` for any
  other. The caller (:meth:`ExportBackend.retry`) then fetches the objects of the request's
  range in worker threads (the resolver is thread-safe and single-flight; the image is not
  touched meanwhile) and runs the call again. Image calls are idempotent up to the point
  where they raise (a write that fetched for its second cluster rewrites its first), so a
  retry is safe.
- *commits* (``flush``: fsyncs): :meth:`ExportBackend.flush` closes the *gate* (every image
  call waits for it to open), runs ``Image.flush`` in a worker thread, and opens it again.
  Flushes that arrive while one runs and after which no write was applied share its result
  (group commit).

**Durability.** A write is applied to the image (its page cache) before its reply is sent;
it is durable once a later FLUSH (or its own FUA) has returned, and not before — exactly the
image's commit model (``docs/vimg-format.md`` §9). A failed write or commit makes every
later flush fail (the image's errseq, §13.4) until the export is restarted.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, TypeVar

import trio

from vfs.errors import NotFound, UsageError, VfsError
from vfs.export import protocol as P
from vfs.image import Image
from vfs.image import layout as L

log = logging.getLogger(__name__)

T = TypeVar("T")

#: How many times one request may find a missing object and fetch before it fails (a read
#: spans at most 32 MiB: every missing object of the range is fetched in the first round).
MAX_FETCH_ROUNDS = 64
#: Parallel fetches per export.
FETCH_THREADS = 8
#: Block status answers cover at most this much (clients ask again for the rest).
MAX_STATUS_SPAN = 1 << 30
#: The first window of :meth:`ExportBackend.chain_extents`.
STATUS_WINDOW = 1 << 20


class NeedFetch(Exception):
    """The image asked for an object that is not in the local store (not a VfsError: no
    layer below may catch it as a failure)."""

    def __init__(self, oid: str, size: int | None) -> None:
        super().__init__(oid)
        self.oid = oid
        self.size = size


class LocalOnlyResolver:
    """The resolver the exported image reads through: the local store only, never the
    network (:class:`NeedFetch` instead). ``resolver`` is a :class:`vfs.redirect.Resolver`."""

    def __init__(self, resolver: Any) -> None:
        self.resolver = resolver

    def get(
        self, oid: str, *, expected_size: int | None = None, max_size: int | None = None
    ) -> bytes:
        size = expected_size if expected_size is not None else (max_size or (1 << 30))
        data = self.resolver.read_local(oid, 0, size, expected_size=expected_size)
        if data is None:
            raise NeedFetch(oid, expected_size)
        return data


@dataclass
class Stats:
    """Counters of one export (``vfsd export status``)."""

    started: float = field(default_factory=time.time)
    requests: dict[str, int] = field(default_factory=dict)
    bytes_read: int = 0
    bytes_written: int = 0
    flushes: int = 0
    commits: int = 0
    errors: int = 0
    fetch_rounds: int = 0
    hydrate_done: int = 0
    hydrate_total: int = 0
    hydrate_state: str = "idle"
    hydrate_error: str = ""


def errno_of(e: BaseException) -> int:
    """The wire errno for an error an image call raised."""
    if isinstance(e, VfsError):
        return P.wire_errno(e.errno)
    if isinstance(e, OSError):
        return P.wire_errno(e.errno or 5)
    return P.EIO


class ExportBackend:
    """An open image as the exports see it: byte I/O, flush, block status, dirty maps.

    The synchronous calls (:meth:`read`, :meth:`write`, ...) may raise :class:`NeedFetch`;
    callers on the fast path then fall back to :meth:`retry` in a task of their own. Every
    call must be made on the export's trio loop thread, with the gate open
    (:attr:`gate_open`, :meth:`wait_open`)."""

    def __init__(
        self, image: Image, *, resolver: Any = None, name: str = "", description: str = ""
    ) -> None:
        self.image = image
        self.resolver = resolver
        self.name = name
        self.description = description or f"vimg {image.path}"
        self.readonly = image.readonly
        self.size = image.size
        self.stats = Stats()
        self.gate_open = True
        self._gate = trio.Event()
        self._gate.set()
        #: Writes applied (incremented before each) and the count the last commit covered.
        self.write_gen = 0
        self.flushed_gen = 0
        self._flushing: trio.Event | None = None
        self._fetch_limiter = trio.CapacityLimiter(FETCH_THREADS)
        self._hydrating = False

    # ------------------------------------------------------------------ description
    def contexts(self) -> tuple[str, ...]:
        names = [P.CTX_BASE_ALLOCATION, P.CTX_ALLOCATION_DEPTH]
        names += [P.CTX_DIRTY_BITMAP_PREFIX + b.name for b in self.image.bitmap_list()]
        return tuple(names)

    def info(self, name: str | None = None) -> P.ExportInfo:
        return P.ExportInfo(
            name=self.name if name is None else name,
            size=self.size,
            readonly=self.readonly,
            description=self.description,
            contexts=self.contexts(),
        )

    # ------------------------------------------------------------------ the gate
    async def wait_open(self) -> None:
        while not self.gate_open:
            await self._gate.wait()

    def _close_gate(self) -> None:
        self.gate_open = False
        self._gate = trio.Event()

    def _open_gate(self) -> None:
        self.gate_open = True
        self._gate.set()

    async def exclusive(self, fn: Callable[[], T]) -> T:
        """Run ``fn`` (which uses the image) in a worker thread with the gate closed."""
        await self.wait_open()
        self._close_gate()
        try:
            return await trio.to_thread.run_sync(fn)
        finally:
            self._open_gate()

    # ------------------------------------------------------------------ fetching
    async def retry(self, fn: Callable[[], T], offset: int = 0, length: int = 0) -> T:
        """Run the synchronous image call ``fn`` on the loop; when it needs objects the store
        lacks, fetch them (every missing one of [offset, offset+length) at once, in worker
        threads) and run it again."""
        for _ in range(MAX_FETCH_ROUNDS):
            await self.wait_open()
            try:
                return fn()
            except NeedFetch as nf:
                self.stats.fetch_rounds += 1
                oids = {nf.oid: nf.size}
                oids.update(self.missing_objects(offset, length))
                await self.fetch(oids)
        raise VfsError(f"objects of range {offset}+{length} keep disappearing from the store")

    def missing_objects(self, offset: int, length: int) -> dict[str, int | None]:
        """Remote objects the range reads (this image and the vimg layers below it) that are
        not in the local store."""
        out: dict[str, int | None] = {}
        if self.resolver is None or length <= 0:
            return out
        img: Any = self.image
        has = self.resolver.has_local
        while isinstance(img, Image):
            cs, bits = img.cluster_size, img.cluster_bits
            end = min(offset + length, img.size)
            through = False
            for ci in range(offset >> bits, -(-end // cs) if end > offset else offset >> bits):
                e = img.entry(ci)
                if e.kind == L.REMOTE:
                    oid = e.oid.hex()
                    if oid not in out and not has(oid):
                        out[oid] = cs
                elif e.kind == L.UNALLOCATED:
                    through = True
            if not through:
                break
            img = img.backing
        return out

    async def fetch(self, oids: dict[str, int | None]) -> None:
        """Bring objects into the local store, in parallel worker threads."""
        if self.resolver is None:
            raise UsageError("the image has remote clusters: give the export a store/repository")
        ensure = self.resolver.ensure

        async def one(oid: str, size: int | None) -> None:
            await trio.to_thread.run_sync(
                lambda: ensure(oid, expected_size=size), limiter=self._fetch_limiter
            )

        if len(oids) == 1:
            ((oid, size),) = oids.items()
            await one(oid, size)
            return
        errors: list[BaseException] = []

        async def guarded(oid: str, size: int | None) -> None:
            try:
                await one(oid, size)
            except Exception as e:  # reported once all are done: no half-cancelled fetches
                errors.append(e)

        async with trio.open_nursery() as n:
            for oid, size in oids.items():
                n.start_soon(guarded, oid, size)
        if errors:
            raise errors[0]

    # ------------------------------------------------------------------ I/O (synchronous)
    def read(self, offset: int, length: int) -> bytes | bytearray:
        self.stats.bytes_read += length
        return self.image.read(offset, length)

    def readinto(self, offset: int, buf: bytearray | memoryview) -> int:
        self.stats.bytes_read += len(buf)
        return self.image.readinto(offset, buf)

    def write(self, offset: int, data: bytes | bytearray | memoryview) -> None:
        self.write_gen += 1
        self.stats.bytes_written += len(data)
        self.image.write(offset, data)

    def write_zeroes(self, offset: int, length: int, unmap: bool = True) -> None:
        self.write_gen += 1
        self.image.write_zeroes(offset, length, unmap=unmap)

    def discard(self, offset: int, length: int) -> None:
        self.write_gen += 1
        self.image.discard(offset, length)

    async def flush(self) -> None:
        """Commit every write applied so far (durable when this returns). Concurrent callers
        share a commit that started after their writes."""
        self.stats.flushes += 1
        want = self.write_gen
        while True:
            if self._flushing is not None:
                await self._flushing.wait()
                continue
            if self.flushed_gen >= want and not self.image.dirty:
                return
            done = self._flushing = trio.Event()
            start = self.write_gen
            try:
                await self.exclusive(self.image.flush)
                self.flushed_gen = start
                self.stats.commits += 1
                return
            finally:
                self._flushing = None
                done.set()

    async def cache(self, offset: int, length: int) -> None:
        """NBD CACHE: fetch the remote objects of the range into the local store."""
        missing = self.missing_objects(offset, length)
        if missing:
            await self.fetch(missing)

    # ------------------------------------------------------------------ block status
    def block_status(
        self, ctx: str, offset: int, length: int, *, one: bool = False
    ) -> list[tuple[int, int]]:
        """(length, flags) descriptors of one meta context over [offset, offset+length);
        ``one`` (NBD ``REQ_ONE``, what QEMU's client always asks): just the first, computed
        over no more of the image than it covers (see :meth:`chain_extents`)."""
        length = min(length, MAX_STATUS_SPAN, self.size - offset)
        if ctx.startswith(P.CTX_DIRTY_BITMAP_PREFIX):
            name = ctx[len(P.CTX_DIRTY_BITMAP_PREFIX) :]
            runs = _runs(self.image.bitmap_dirty(name, offset, length), offset, length)
            return runs[:1] if one else runs
        if ctx == P.CTX_BASE_ALLOCATION:

            def desc(e: Any) -> int:
                return (0 if e.data else P.STATE_HOLE) | (P.STATE_ZERO if e.zero else 0)

        elif ctx == P.CTX_ALLOCATION_DEPTH:

            def desc(e: Any) -> int:
                return e.depth + 1 if e.allocated else 0

        else:
            raise UsageError(f"unknown meta context {ctx!r}")
        if not one:
            extents = self.image.block_status(offset, length, chain=True)
            return [(e.length, desc(e)) for e in extents]
        first: list[int] = []
        for e in self.chain_extents(offset, offset + length):
            if first and desc(e) != first[1]:
                break
            if first:
                first[0] += e.length
            else:
                first = [e.length, desc(e)]
        return [(first[0], first[1])]

    def chain_extents(self, offset: int, end: int) -> Iterator[Any]:
        """The chain's extents from ``offset`` to ``end``, computed in windows that start
        small and double: a caller that stops at the first change of status (REQ_ONE, SEEK_DATA)
        pays for what it looks at, not for the rest of the disk (a convert asks once per
        extent: over the whole remaining disk each time would be quadratic)."""
        pos, win = offset, STATUS_WINDOW
        while pos < end:
            n = min(win, end - pos)
            yield from self.image.block_status(pos, n, chain=True)
            pos += n
            win = min(win * 2, MAX_STATUS_SPAN)

    # ------------------------------------------------------------------ dirty maps
    def bitmaps(self) -> list[dict[str, Any]]:
        return [
            {
                "name": b.name,
                "granularity": b.granularity,
                "enabled": b.enabled,
                "stale": b.stale,
                "dirty_bytes": b.dirty_bytes,
            }
            for b in self.image.bitmap_list()
        ]

    def has_bitmap(self, name: str) -> bool:
        return any(b.name == name for b in self.image.bitmap_list())

    def ensure_bitmap(self, name: str, granularity: int | None = None) -> bool:
        """Make sure bitmap ``name`` exists and records writes; True if it was created."""
        if self.has_bitmap(name):
            if not next(b for b in self.image.bitmap_list() if b.name == name).enabled:
                self.image.bitmap_enable(name)
            return False
        self.image.bitmap_add(name, granularity=granularity)
        return True

    def dirty(self, name: str, offset: int = 0, length: int | None = None) -> list[list[int]]:
        if not self.has_bitmap(name):
            raise NotFound(f"no dirty bitmap {name!r} in {self.image.path}")
        return [[o, n] for o, n in self.image.bitmap_dirty(name, offset, length)]

    def take(self, name: str) -> list[list[int]]:
        """The dirty ranges and a new mark, in one step (no write falls between)."""
        if not self.has_bitmap(name):
            raise NotFound(f"no dirty bitmap {name!r} in {self.image.path}")
        return [[o, n] for o, n in self.image.bitmap_take(name)]

    def mark(self, name: str, granularity: int | None = None) -> None:
        """A new point in time: the bitmap is cleared (created when absent)."""
        if not self.ensure_bitmap(name, granularity):
            self.image.bitmap_clear(name)

    def remove_bitmap(self, name: str) -> None:
        if not self.has_bitmap(name):
            raise NotFound(f"no dirty bitmap {name!r} in {self.image.path}")
        self.image.bitmap_remove(name)

    # ------------------------------------------------------------------ hydration
    def remote_clusters(self) -> list[tuple[int, str]]:
        return [(ci, e.oid.hex()) for ci, e in self.image.iter_entries() if e.kind == L.REMOTE]

    async def hydrate(self, *, batch: int = 64) -> int:
        """Fetch every remote cluster of the image into the image file, in the background of
        the export: fetches in worker threads, each cluster stored on the loop (if the guest
        did not overwrite it meanwhile), a commit every ``batch`` clusters. Progress is in
        :attr:`stats`; what was committed stays after a restart (so does what was fetched:
        the local store keeps it)."""
        if self._hydrating:
            raise UsageError("hydration is already running")
        if self.readonly:
            raise UsageError("a read-only export cannot hydrate its image")
        self._hydrating = True
        st = self.stats
        st.hydrate_state, st.hydrate_error = "running", ""
        done = 0
        try:
            await self.wait_open()
            todo = self.remote_clusters()
            st.hydrate_total, st.hydrate_done = len(todo), 0
            for i in range(0, len(todo), batch):
                part = todo[i : i + batch]
                await self.fetch({oid: self.image.cluster_size for _ci, oid in part})
                for ci, oid in part:
                    await self.wait_open()
                    done += self._hydrate_one(ci, oid)
                    st.hydrate_done += 1
                await self.flush()
            st.hydrate_state = "done"
            return done
        except BaseException as e:
            st.hydrate_state = "failed"
            st.hydrate_error = str(e) or type(e).__name__
            raise
        finally:
            self._hydrating = False

    def _hydrate_one(self, ci: int, oid: str) -> int:
        e = self.image.entry(ci)
        if e.kind != L.REMOTE or e.oid.hex() != oid:
            return 0  # overwritten (or discarded) meanwhile: nothing to fetch any more
        try:
            data = self.image.read_cluster(ci)
        except NeedFetch:
            return 0  # evicted from the store meanwhile: the next hydrate gets it
        self.image.store_cluster(ci, data)
        return 1

    # ------------------------------------------------------------------ status
    def status(self) -> dict[str, Any]:
        st = self.stats
        out: dict[str, Any] = {
            "name": self.name,
            "image": self.image.path,
            "size": self.size,
            "readonly": self.readonly,
            "requests": dict(st.requests),
            "bytes_read": st.bytes_read,
            "bytes_written": st.bytes_written,
            "flushes": st.flushes,
            "commits": st.commits,
            "errors": st.errors,
            "bitmaps": self.bitmaps(),
            "hydrate": {
                "state": st.hydrate_state,
                "done": st.hydrate_done,
                "total": st.hydrate_total,
                "error": st.hydrate_error,
            },
        }
        r = self.resolver
        if r is not None:
            out["fetched_objects"] = getattr(r, "fetches", 0)
            out["fetched_bytes"] = getattr(r, "fetched_bytes", 0)
        return out


def _runs(dirty: list[tuple[int, int]], offset: int, length: int) -> list[tuple[int, int]]:
    """Dirty ranges as descriptors covering [offset, offset+length): (length, DIRTY or 0)."""
    out: list[tuple[int, int]] = []
    pos, end = offset, offset + length
    for o, n in dirty:
        if o > pos:
            out.append((o - pos, 0))
        out.append((n, P.STATE_DIRTY))
        pos = o + n
    if pos < end:
        out.append((end - pos, 0))
    return out
