"""``vfsd export``: one image served over NBD (Unix sockets, loopback TCP) and optionally as a
raw file on a FUSE mount, with a control socket; its whole lifetime in one place.

One process per exported image (as qemu-nbd): the image is open (and locked) by it alone,
its requests run on its own trio loop, and the FUSE raw file needs a process of its own
anyway (pyfuse3 allows one mount per process; a ``vfsd serve`` process holds the VEE mount).
``vfsd serve`` starts and watches these processes for the exports it manages
(:mod:`vfs.export.supervisor`).

Shutdown (SIGTERM, SIGINT, the control op ``stop``): the listeners close, connections finish
the requests they hold, the FUSE file is unmounted, then the image is closed — its last commit
writes the dirty bitmaps back. Crash story: kill -9 loses nothing a client's FLUSH (or FUA)
was answered for (the image's shadow-paging commit, ``docs/vimg-format.md`` §9); the image
opens as it was at its last commit; enabled dirty bitmaps are then stale (all dirty) until
the next mark, so a copier that relies on them copies everything once more, never too little.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import trio

from vfs.errors import UsageError
from vfs.export.backend import ExportBackend, LocalOnlyResolver
from vfs.export.nbd_server import NbdServer
from vfs.redirect.repoconfig import RepoConfig

log = logging.getLogger(__name__)

#: The dirty bitmap a writable export keeps unless told otherwise.
DEFAULT_BITMAP = "dirty"


@dataclass
class ExportConfig:
    """Everything one export process needs (the CLI and the supervisor build it)."""

    image: str
    name: str = ""
    nbd: list[str] = field(default_factory=list)
    tcp: list[tuple[str, int]] = field(default_factory=list)
    fuse: str | None = None
    readonly: bool = False
    #: Dirty bitmap to keep (created when missing; None: none). Every bitmap of the image is
    #: readable over NBD whatever this says.
    bitmap: str | None = DEFAULT_BITMAP
    control: str | None = None
    store: str | None = None
    #: A repository, or (its url) the address URL#REF of an image pushed encrypted (opened
    #: with ``identity``, ``trust``, ``pins``: key files, docs/encryption.md).
    repo: RepoConfig | None = None
    identity: str | None = None
    trust: list[str] = field(default_factory=list)
    pins: str | None = None
    passphrase_file: str | None = None
    #: The store keeps an encrypted image's clusters encrypted; decrypted on read.
    keep_encrypted: bool = False
    backing_dirs: list[str] = field(default_factory=list)
    description: str = ""

    def __post_init__(self) -> None:
        if not self.name:
            self.name = Path(self.image).stem or "disk"
        if not (self.nbd or self.tcp or self.fuse):
            raise UsageError("nothing to serve: give --nbd SOCKET, --tcp HOST:PORT or --fuse FILE")
        if self.control is None and self.nbd:
            self.control = self.nbd[0] + ".ctl"
        if self.readonly:
            self.bitmap = None

    def to_json(self) -> dict[str, Any]:
        return {
            "image": self.image,
            "name": self.name,
            "nbd": list(self.nbd),
            "tcp": [f"{h}:{p}" for h, p in self.tcp],
            "fuse": self.fuse,
            "readonly": self.readonly,
            "bitmap": self.bitmap,
            "control": self.control,
        }


class ExportResolver:
    """The local store and repository of an export, opened on first need (most images have
    no remote cluster); thread-safe like the :class:`vfs.redirect.Resolver` it wraps."""

    def __init__(
        self,
        store: str | None,
        repo: RepoConfig | None,
        keys: Any = None,
        keep_encrypted: bool = False,
    ) -> None:
        self.store_dir, self.repo = store, repo
        self.keep_encrypted = keep_encrypted
        self.sealed_ref: str | None = None
        self.keys = keys  # vfs.redirect.sealed_refs.Keys, for an address URL#REF
        if repo is not None:
            from vfs.redirect.sealed_remote import split_address

            url, ref = split_address(repo.url)
            if url is not None:
                self.repo, self.sealed_ref = repo.replace(url=url), ref
        self._r: Any = None
        self._objs: list[Any] = []
        self._lock = threading.Lock()

    def resolver(self) -> Any:
        """The store's resolver (the repository is attached on the first fetch: a host that
        has every object it needs serves them with the repository unreachable)."""
        with self._lock:
            if self._r is None:
                from vfs.paths import default_store
                from vfs.redirect import LocalStore, Resolver

                store = LocalStore(self.store_dir or default_store())
                self._objs.append(store)
                self._r = Resolver(store, None)
            return self._r

    def attach_remote(self) -> Any:
        r = self.resolver()
        with self._lock:
            if r.remote is None and self.repo is not None:
                remote = self.repo.open()
                self._objs.append(remote)
                if self.sealed_ref is not None:
                    # an encrypted image: its ref is opened (signature, trust, pin, key), its
                    # clusters decrypted and verified after fetch
                    from vfs.redirect.sealed_remote import UnsealingRemote

                    remote = UnsealingRemote.for_ref(remote, self.sealed_ref, self.keys)
                    if self.keep_encrypted:
                        from vfs.redirect.sealed_store import SealedStoreResolver

                        self._r = r = SealedStoreResolver(r.store, remote)
                r.remote = remote
        return r

    def has_local(self, oid: str) -> bool:
        return self.resolver().has_local(oid)

    def read_local(self, oid: str, offset: int, size: int, **kw: Any) -> bytes | None:
        return self.resolver().read_local(oid, offset, size, **kw)

    def ensure(self, oid: str, **kw: Any) -> None:
        r = self.resolver()
        if not r.has_local(oid):
            r = self.attach_remote()
        r.ensure(oid, **kw)

    @property
    def fetches(self) -> int:
        return self._r.fetches if self._r is not None else 0

    @property
    def fetched_bytes(self) -> int:
        return self._r.fetched_bytes if self._r is not None else 0

    def close(self) -> None:
        for o in reversed(self._objs):
            o.close()
        self._objs.clear()


def open_backend(cfg: ExportConfig) -> tuple[ExportBackend, ExportResolver]:
    """Open the image of ``cfg`` for exporting (blocking: before the loop serves anyone)."""
    from vfs.image import Image

    keys = None
    if (
        cfg.repo is not None and "#" in cfg.repo.url
    ):  # key files are checked before anything is served
        from vfs.paths import vfs_root
        from vfs.redirect.keys import read_passphrase_file
        from vfs.redirect.sealed_refs import Keys

        pw = cfg.passphrase_file
        keys = Keys.from_files(
            cfg.identity,
            cfg.trust,
            cfg.pins or vfs_root() / "pins.json",
            passphrase=(lambda: read_passphrase_file(pw)) if pw else None,
        )
    if cfg.keep_encrypted and keys is None:
        raise UsageError("--keep-encrypted applies only with --repo URL#REF (an encrypted image)")
    res = ExportResolver(cfg.store, cfg.repo, keys, cfg.keep_encrypted)
    try:
        if res.sealed_ref is not None:
            # opened at once: a wrong key or a forged ref is refused before anyone connects
            # (a plain repository is attached on the first fetch only)
            res.attach_remote()
        img = Image.open(
            cfg.image,
            readonly=cfg.readonly,
            resolver=LocalOnlyResolver(res),
            backing_dirs=cfg.backing_dirs,
        )
    except BaseException:
        res.close()
        raise
    backend = ExportBackend(img, resolver=res, name=cfg.name, description=cfg.description)
    try:
        if cfg.bitmap:
            if backend.ensure_bitmap(cfg.bitmap):
                log.info("%s: new dirty bitmap %r", cfg.image, cfg.bitmap)
            img.flush()
    except BaseException:
        img.close()
        res.close()
        raise
    return backend, res


async def run_export(cfg: ExportConfig, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
    """Serve ``cfg`` until SIGTERM/SIGINT, the control op ``stop`` or cancellation."""
    async with contextlib.AsyncExitStack() as stack:
        backend, res = open_backend(cfg)
        stack.callback(res.close)
        stack.callback(_close_image, backend)
        server = NbdServer({cfg.name: backend}, default=cfg.name)
        listeners = []
        for path in cfg.nbd:
            s = NbdServer.unix_listener(path)
            stack.callback(_unlink, path)
            stack.callback(s.close)
            listeners.append(s)
        for host, port in cfg.tcp:
            s = NbdServer.tcp_listener(host, port)
            stack.callback(s.close)
            listeners.append(s)
        async with trio.open_nursery() as nursery:
            control = ExportControl(cfg, backend, server, nursery.cancel_scope, nursery)
            for s in listeners:
                nursery.start_soon(server.serve, s)
            if cfg.control:
                from vfs.daemon import control as C

                await nursery.start(
                    lambda task_status: C.serve_socket(
                        Path(cfg.control), control.handle, control.parse, task_status=task_status
                    )
                )
            if cfg.fuse:
                from vfs.export import fuse_raw

                await nursery.start(fuse_raw.serve_fuse, backend, cfg.fuse, nursery.cancel_scope)
            nursery.start_soon(_signals, nursery.cancel_scope)
            control.ready = True  # every listener and the FUSE file are up (ping says so)
            log.info(
                "exporting %s as %r: nbd %s tcp %s fuse %s",
                cfg.image,
                cfg.name,
                cfg.nbd,
                cfg.tcp,
                cfg.fuse,
            )
            task_status.started(backend)


def _close_image(backend: ExportBackend) -> None:
    try:
        backend.image.close()
    except Exception as e:
        log.error("%s: closing the image failed: %s", backend.image.path, e)
        raise


def _unlink(path: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)


async def _signals(scope: trio.CancelScope) -> None:
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as sigs:
        async for _ in sigs:
            log.info("signal received: stopping the export")
            scope.cancel()
            return


#: The control ops of an export process and their fields (checked as the daemon's are).
CONTROL_REQUESTS: dict[str, dict[str, type]] = {
    "ping": {},
    "status": {},
    "stop": {},
    "flush": {},
    "bitmaps": {},
    "dirty": {"bitmap": str, "offset": int, "length": int},
    "take": {"bitmap": str},
    "mark": {"bitmap": str, "granularity": int},
    "bitmap_rm": {"bitmap": str},
    "hydrate": {"wait": bool},
}
CONTROL_DEFAULTS: dict[str, Any] = {"offset": 0, "length": -1, "granularity": 0, "wait": False}


class ExportControl:
    """Answers the control socket of one export (JSON lines, :mod:`vfs.daemon.control`)."""

    def __init__(
        self,
        cfg: ExportConfig,
        backend: ExportBackend,
        server: NbdServer,
        scope: trio.CancelScope,
        nursery: trio.Nursery,
    ):
        self.cfg, self.backend, self.server = cfg, backend, server
        self.scope, self.nursery = scope, nursery
        self._hydrate_done: trio.Event | None = None
        self.ready = False

    def parse(self, line: bytes) -> dict[str, Any]:
        from vfs.daemon import control as C

        return C.parse_request(line, CONTROL_REQUESTS, CONTROL_DEFAULTS)

    async def handle(self, req: dict[str, Any]) -> Any:
        b = self.backend
        op = req["op"]
        if op == "ping":
            return {"pid": os.getpid(), "name": self.cfg.name, "ready": self.ready}
        if op == "status":
            out = b.status()
            out.update(self.cfg.to_json())
            out["pid"] = os.getpid()
            out["connections"] = self.server.connections
            return out
        if op == "stop":
            self.scope.cancel()
            return {"stopping": True}
        if op == "flush":
            await b.flush()
            return {"flushed": True}
        if op == "bitmaps":
            await b.wait_open()
            return b.bitmaps()
        await b.wait_open()
        if op == "dirty":
            n = None if req["length"] < 0 else req["length"]
            return b.dirty(req["bitmap"], req["offset"], n)
        if op == "take":
            return b.take(req["bitmap"])
        if op == "mark":
            b.mark(req["bitmap"], req["granularity"] or None)
            await b.flush()  # the bitmap's existence is durable; its bits are (spec 13.6)
            return {"bitmap": req["bitmap"], "marked": True}
        if op == "bitmap_rm":
            b.remove_bitmap(req["bitmap"])
            await b.flush()
            return {"bitmap": req["bitmap"], "removed": True}
        if op == "hydrate":
            return await self.hydrate(req["wait"])
        raise UsageError(f"unknown control op {op!r}")

    async def hydrate(self, wait: bool) -> dict[str, Any]:
        if self._hydrate_done is None or self._hydrate_done.is_set():
            done = self._hydrate_done = trio.Event()

            async def run() -> None:
                try:
                    await self.backend.hydrate()
                except Exception as e:  # reported by status; the export keeps serving
                    log.error("hydrate of %s failed: %s", self.cfg.image, e)
                finally:
                    done.set()

            self.backend.stats.hydrate_state = "running"  # from now: `status` must not say idle
            self.nursery.start_soon(run)
        if wait:
            await self._hydrate_done.wait()
        return self.backend.status()["hydrate"]
