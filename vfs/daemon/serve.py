"""``vfsd serve``: the daemon's whole lifetime in one place, for either engine.

One ``AsyncExitStack`` and one trio nursery: each resource (state lock, store, remote, views or
mounts, the FUSE mount, the control socket, the image exports) registers its cleanup right
after it is created, so any failure or signal unwinds exactly what exists, in reverse order.
SIGTERM/SIGINT end ``pyfuse3.main`` and everything is unmounted.

Two engines (``docs/kernel-engine.md``), chosen at start-up (``--engine auto|kernel|fuse``):

- *fuse*: one FUSE mount at MOUNT whose entries are the VEE roots (:mod:`vfs.tree.view`);
- *kernel*: every VEE root an overlayfs mount at MOUNT/<name> over its template's EROFS image
  (:mod:`vfs.daemon.kernel_engine`); the daemon's one FUSE mount is then the second data layer
  (:mod:`vfs.daemon.datalayer`), serving objects that are not local yet.

Both use the same state directory, registry and private layers, so a VEE moves between engines
across a restart (a layer the kernel engine used is normalized for the FUSE engine first:
:mod:`vfs.tree.ovl_upper`).

Crash story (``docs/vee-layer.md``, ``docs/kernel-engine.md``): kill -9 leaves the FUSE mount
dead (ENOTCONN); the next ``serve`` detaches it lazily and mounts again. Kernel-engine VEE
mounts outlive the daemon; the next ``serve`` reuses or replaces them. Everything durable lives
in the state directory (registry: atomic JSON; private layers: every structural change renamed
into place and its directory fsynced; file data: the VEE's own fsync goes to the private file).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
import resource
import shutil
import signal
import subprocess
from pathlib import Path
from typing import Any

import pyfuse3
import trio

from vfs.daemon import control, mounts
from vfs.daemon.confine import Confinement
from vfs.daemon.control_plane import Daemon
from vfs.daemon.datalayer import MOUNT_OPTIONS as DATA_MOUNT_OPTIONS
from vfs.daemon.datalayer import DataLayerOperations
from vfs.daemon.fuse_ops import VeeOperations, invalidate_attr, invalidate_entry, set_read_ahead
from vfs.daemon.kernel_engine import KernelEngine, clear_for_fuse_engine, probe
from vfs.daemon.sealed_sources import SealedSources
from vfs.errors import (
    BusyError,
    NotFound,
    UsageError,
)
from vfs.export.supervisor import ExportSupervisor
from vfs.redirect import LocalStore, RepoConfig, Resolver
from vfs.redirect.sealed_refs import Keys, PinStore
from vfs.redirect.sealed_remote import UnsealingRemote
from vfs.redirect.sealed_store import SealedStoreResolver
from vfs.tree.vee import VeeRegistry
from vfs.tree.view import Views

log = logging.getLogger(__name__)

#: pyfuse3 worker tasks (concurrent requests in the daemon).
MAX_REQUEST_TASKS = 1024
MOUNT_OPTIONS = {"fsname=vfsd", "subtype=vfsd", "default_permissions", "allow_other", "dev", "suid"}
ENGINES = ("auto", "kernel", "fuse")


def _raise_fd_limit() -> None:
    """The view pins every private file the kernel holds with an ``O_PATH`` fd (its identity,
    ``docs/vee-layer.md`` §3): take as many fds as the host allows (root may raise the hard
    limit up to ``fs.nr_open``), and say how many."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = hard
    with contextlib.suppress(OSError, ValueError):
        want = max(hard, int(Path("/proc/sys/fs/nr_open").read_text()))
    for limit in (want, hard):
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (limit, limit))
            break
        except (OSError, ValueError):
            continue
    log.info("open file limit %d (was %d)", resource.getrlimit(resource.RLIMIT_NOFILE)[0], soft)


def _lock_state(state: Path) -> int:
    fd = os.open(state / "daemon.lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise BusyError(f"another vfsd serves state directory {state}") from None
    return fd


def _detach_dead_fuse(mount: Path) -> None:
    """Detach a dead FUSE mount left by a killed daemon (statfs fails with ENOTCONN).

    statfs, not stat: the kernel answers stat of the dead mount's root from its attribute cache
    (we hand out hour-long timeouts), while statfs always asks the (dead) daemon."""
    try:
        os.statvfs(mount)
    except OSError as e:
        if e.errno != errno.ENOTCONN:
            raise
        log.warning("%s: dead FUSE mount of a previous daemon: detaching it", mount)
        subprocess.run(["umount", "-l", os.fspath(mount)], check=False)


def _prepare_mountpoint(mount: Path) -> None:
    _detach_dead_fuse(mount)
    if not mount.is_dir():
        raise NotFound(f"mountpoint {mount} is not a directory")
    if os.path.ismount(mount):
        raise BusyError(f"{mount} is already a mount point")


#: Why ``--keep-encrypted`` takes the FUSE engine (docs/encryption.md §9.1).
KEEP_ENCRYPTED_NEEDS_FUSE = (
    "--keep-encrypted: the kernel engine's EROFS data layers read the store's object files "
    "as plaintext; the FUSE engine decrypts on read"
)
#: The usage error of ``--engine kernel --keep-encrypted``.
KEEP_ENCRYPTED_NOT_KERNEL = (
    "--keep-encrypted needs the FUSE engine (the kernel engine's data layers are the store's "
    "plaintext files): use --engine fuse or auto"
)


def choose_engine(
    engine: str, state: Path, *, keep_encrypted: bool = False, pin_images: bool = True
) -> tuple[str, str]:
    """(engine, why) for ``--engine``: ``auto`` takes the kernel engine where the probe says
    the kernel can do it (EROFS on a loop device or file-backed, overlayfs data-only layers),
    and the FUSE engine when the store keeps ciphertext (``keep_encrypted``)."""
    if engine not in ENGINES:
        raise UsageError(f"unknown engine {engine!r} (use {', '.join(ENGINES)})")
    if keep_encrypted:
        if engine == "kernel":
            raise UsageError(KEEP_ENCRYPTED_NOT_KERNEL)
        return "fuse", KEEP_ENCRYPTED_NEEDS_FUSE
    if engine == "fuse":
        return "fuse", "chosen with --engine fuse"
    for old in (state / "kernel").glob("probe.*"):  # a probe of a daemon killed meanwhile
        mounts.detach_all_under(old)
        shutil.rmtree(old, ignore_errors=True)
    ok, why = probe(state / "kernel" / f"probe.{os.getpid()}", pin_images=pin_images)
    if ok:
        return "kernel", why
    if engine == "kernel":
        raise UsageError(f"the kernel engine cannot run here: {why}")
    return "fuse", f"the kernel engine cannot run here ({why})"


async def serve(
    state: Path,
    mount: Path,
    *,
    store_dir: Path,
    repo: RepoConfig | None = None,
    keys: Keys | None = None,
    debug_fuse: bool = False,
    engine: str = "auto",
    keep_encrypted: bool = False,
    pin_images: bool = True,
) -> None:
    """Run the daemon until SIGTERM/SIGINT (or cancellation). ``keys``: the identity and
    trusted publishers encrypted templates are opened with (pins default to STATE/pins.json).
    ``keep_encrypted``: the store keeps the objects of encrypted templates as ciphertext and
    the FUSE engine decrypts them on read (docs/encryption.md §9.1). ``pin_images``: the kernel
    engine keeps its template images locked in memory (vfs/daemon/pin.py)."""
    state.mkdir(parents=True, exist_ok=True)
    _raise_fd_limit()
    # From here a SIGTERM/SIGINT is queued, never fatal: even during start-up (the probe, the
    # inventory, mounting VEEs) it ends in the unwinding of the exit stack, which unmounts
    # everything this daemon mounted (the default SIGTERM action would leave it all behind).
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as sigs:
        try:
            await _serve(
                sigs, state, mount, store_dir, repo, keys, debug_fuse, engine, keep_encrypted,
                pin_images=pin_images,
            )  # fmt: skip
        except BaseExceptionGroup as eg:
            # a nursery wraps what failed in it: the CLI's one-line error wants the failure
            leaves = [e for e in _leaves(eg) if not isinstance(e, trio.Cancelled)]
            if len(leaves) == 1:
                raise leaves[0] from None
            raise


def _leaves(eg: BaseExceptionGroup) -> list[BaseException]:
    out: list[BaseException] = []
    for e in eg.exceptions:
        out += _leaves(e) if isinstance(e, BaseExceptionGroup) else [e]
    return out


async def _serve(
    sigs, state, mount, store_dir, repo, keys, debug_fuse, engine, keep_encrypted, *, pin_images
) -> None:
    async with contextlib.AsyncExitStack() as stack:
        lock_fd = _lock_state(state)
        stack.callback(os.close, lock_fd)
        _prepare_mountpoint(mount)
        mount = mount.resolve()  # now, before it is a FUSE mount this loop must answer
        chosen, why = choose_engine(
            engine, state, keep_encrypted=keep_encrypted, pin_images=pin_images
        )
        log.info("engine: %s (%s)", chosen, why)
        store = LocalStore(store_dir)
        stack.callback(store.close)
        remote = repo.open() if repo is not None else None
        if remote is not None:
            stack.callback(remote.close)
        if keys is None:
            keys = Keys()
        if keys.pins is None:
            keys.pins = PinStore(state / "pins.json")
        # The store and the engines see plaintext objects under their plaintext ids: objects
        # of encrypted templates are decrypted (and verified) between the repository and the
        # resolver (docs/encryption.md, "At rest"). With --keep-encrypted the store keeps
        # their ciphertext instead and the resolver decrypts each read (§9.1).
        unsealing = UnsealingRemote(remote, keys)
        if keep_encrypted:
            resolver: Resolver = SealedStoreResolver(store, unsealing)
        else:
            resolver = Resolver(store, unsealing)
        registry = VeeRegistry(state)
        exports = ExportSupervisor(state)
        sealed = {"unsealing": unsealing, "sources": SealedSources(state), "repo": repo}
        if chosen == "kernel":
            await _serve_kernel(stack, sigs, state, mount, store, resolver, registry, remote,
                                why, debug_fuse, exports, sealed, pin_images)  # fmt: skip
        else:
            await _serve_fuse(stack, sigs, state, mount, resolver, registry, remote, why,
                              debug_fuse, exports, sealed)  # fmt: skip
        log.info("vfsd at %s stopping", mount)


async def _serve_fuse(
    stack, sigs, state, mount, resolver, registry, remote, why, debug_fuse, exports, sealed
) -> None:
    views = Views(resolver)
    stack.callback(views.close)
    daemon = Daemon(
        registry, resolver, remote, views=views, engine_reason=why, exports=exports, **sealed
    )
    stack.callback(daemon.close_remotes)
    # a kernel-engine daemon of this state killed before: its mounts go first (held VEEs of
    # it are not served: two writers on one private layer)
    daemon.broken.update(clear_for_fuse_engine(state, mount))
    daemon.start_all()
    options = set(MOUNT_OPTIONS)
    if debug_fuse:
        options.add("debug")
    ops = VeeOperations(views)
    pyfuse3.init(ops, os.fspath(mount), options)
    stack.callback(pyfuse3.close, unmount=True)
    log.info("serving %d VEE(s) at %s", len(views.vees), mount)
    async with trio.open_nursery() as nursery:
        # the exports (processes of their own, docs/export.md) come and go with the daemon
        await nursery.start(exports.run)
        await nursery.start(control.serve_control, state, daemon.handle)
        started = trio.Event()
        started.set()  # start_all is over
        nursery.start_soon(_signals, sigs, daemon, started)
        nursery.start_soon(_kernel_ready, mount, views, ops)
        # Worker tasks are cheap: enough that requests waiting on a stalled fetch (each
        # bounded by the fetch deadline) never leave none to answer the other VEEs.
        await pyfuse3.main(max_tasks=MAX_REQUEST_TASKS)
        nursery.cancel_scope.cancel()


async def _serve_kernel(
    stack,
    sigs,
    state,
    mount,
    store,
    resolver,
    registry,
    remote,
    why,
    debug_fuse,
    exports,
    sealed,
    pin_images,
) -> None:
    """Kernel engine: the FUSE mount is the data layer; VEE overlays are mounted from a worker
    thread once it answers (mounting an overlay looks the data layer's root up, which this very
    loop must answer)."""
    os.chmod(mount, 0o700)  # MNT: only root traverses to the VEE roots (issue 8, item 2)
    data_mnt = KernelEngine.data_layer_path(state)
    data_mnt.mkdir(mode=0o700, parents=True, exist_ok=True)
    _detach_dead_fuse(data_mnt)
    if os.path.ismount(data_mnt):
        mounts.umount(data_mnt)
    kernel = KernelEngine(state, mount, store.objects_dir, data_layer=data_mnt, reason=why,
                          pin_images=pin_images)  # fmt: skip
    kernel.inventory()
    ops = DataLayerOperations(resolver)
    daemon = Daemon(
        registry, resolver, remote, kernel=kernel, data_layer=ops, engine_reason=why,
        exports=exports, **sealed,
    )  # fmt: skip
    stack.callback(daemon.close_remotes)
    options = set(DATA_MOUNT_OPTIONS)
    if debug_fuse:
        options.add("debug")
    pyfuse3.init(ops, os.fspath(data_mnt), options)
    stack.callback(pyfuse3.close, unmount=True)
    stack.callback(kernel.close)  # runs first: the overlays go before their data layer
    async with trio.open_nursery() as nursery:
        started = trio.Event()
        nursery.start_soon(_signals, sigs, daemon, started)
        await nursery.start(exports.run)

        async def start() -> None:
            try:
                await trio.to_thread.run_sync(os.stat, data_mnt)  # INIT answered
                set_read_ahead(os.fspath(data_mnt))
                await trio.to_thread.run_sync(daemon.start_all)
            finally:
                started.set()
            log.info("serving %d VEE(s) at %s (kernel engine)", len(kernel.vees), mount)
            await nursery.start(control.serve_control, state, daemon.handle)

        nursery.start_soon(start)
        await pyfuse3.main(max_tasks=MAX_REQUEST_TASKS)
        nursery.cancel_scope.cancel()


async def _kernel_ready(mount: Path, views: Views, ops: VeeOperations) -> None:
    """Once the FUSE INIT handshake is over (a stat of the mount from a worker thread returns
    only after this loop answered INIT and GETATTR): raise read-ahead (INIT resets it), let
    the view send the kernel invalidations (refused before INIT), and start checking callers
    confined to a VEE (their roots are identified by the mount's device number)."""
    st = await trio.to_thread.run_sync(os.stat, mount)
    set_read_ahead(os.fspath(mount))
    views.attach_kernel(invalidate_entry, invalidate_attr)
    ops.confinement = Confinement(st.st_dev, views)


async def _signals(sigs: Any, daemon: Daemon, started: trio.Event) -> None:
    """The first SIGTERM/SIGINT (also one queued during start-up) ends the FUSE loop, and so
    the daemon. A start-up still mounting VEEs is told to stop and waited for first: mounting
    an overlay asks the FUSE data layer (statfs of each layer), which only this loop answers,
    so ending the loop under it would hang the mount and leave what it mounted behind."""
    async for _ in sigs:
        log.info("signal received: unmounting")
        daemon.stopping.set()
        await started.wait()
        pyfuse3.terminate()
        return
