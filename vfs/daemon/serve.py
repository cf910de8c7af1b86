"""``vfsd serve``: the daemon's whole lifetime in one place.

One ``AsyncExitStack`` and one trio nursery: each resource (state lock, store, remote, views, the
FUSE mount, the control socket) registers its cleanup right after it is created, so any failure
or signal unwinds exactly what exists, in reverse order. SIGTERM/SIGINT end ``pyfuse3.main`` and
the mount is unmounted.

Crash story (``docs/vee-layer.md``): kill -9 leaves the kernel mount dead (ENOTCONN); the next
``serve`` on the same mountpoint detaches it lazily and mounts again. Everything durable lives in
the state directory (registry: atomic JSON; private layers: every structural change renamed into
place and its directory fsynced; file data: the VEE's own fsync goes to the private file).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
import resource
import signal
import subprocess
from pathlib import Path
from typing import Any

import pyfuse3
import trio

from vfs.daemon import control
from vfs.daemon.confine import Confinement
from vfs.daemon.fuse_ops import VeeOperations, invalidate_attr, invalidate_entry, set_read_ahead
from vfs.daemon.sealed_sources import SealedSources
from vfs.errors import AlreadyExists, BusyError, NotFound, UsageError, VfsError
from vfs.redirect import LocalStore, Remote, Resolver, open_remote
from vfs.redirect.sealed_refs import Keys, PinStore
from vfs.redirect.sealed_remote import UnsealingRemote, split_address
from vfs.tree.template import Template, is_digest, resolve_ref
from vfs.tree.upgrade import plan_upgrade
from vfs.tree.vee import VeeRegistry, check_vee_name
from vfs.tree.view import Views

log = logging.getLogger(__name__)

#: pyfuse3 worker tasks (concurrent requests in the daemon).
MAX_REQUEST_TASKS = 1024
MOUNT_OPTIONS = {"fsname=vfsd", "subtype=vfsd", "default_permissions", "allow_other", "dev", "suid"}


class Daemon:
    """The control-plane of one mount: the registry, the templates, and the views."""

    def __init__(
        self,
        registry: VeeRegistry,
        views: Views,
        resolver: Resolver,
        remote: Any,
        *,
        unsealing: UnsealingRemote | None = None,
        sources: SealedSources | None = None,
        remote_tls: dict[str, Any] | None = None,
    ):
        self.registry = registry
        self.views = views
        self.resolver = resolver
        self.remote = remote
        self.unsealing = unsealing
        self.sources = sources
        self.remote_tls = remote_tls or {}
        self._remotes: dict[str, Remote] = {}
        self.templates: dict[str, Template] = {}
        self.broken: dict[str, str] = {}

    # -- templates ---------------------------------------------------------------------------

    def remote_for(self, url: str) -> Remote:
        """The repository at ``url``: the daemon's --remote, or one opened with the same TLS
        and proxy options (kept open for the daemon's life)."""
        if self.remote is not None and url.rstrip("/") == self.remote.url.rstrip("/"):
            return self.remote
        r = self._remotes.get(url)
        if r is None:
            r = self._remotes[url] = open_remote(url, **self.remote_tls)
        return r

    def close_remotes(self) -> None:
        for r in self._remotes.values():
            r.close()
        self._remotes.clear()

    def _digest(self, ref: str) -> str:
        """A template reference → digest: a digest, a ref NAME of --remote, or the address
        URL#NAME (an encrypted template is opened with the daemon's --identity here, and where
        it came from is kept in the state for restarts)."""
        url, name = split_address(ref)
        if url is None and is_digest(name):
            return name
        if url is None:
            if self.remote is None:
                raise UsageError(
                    f"template {ref!r} is a name: the daemon needs --remote (or give URL#{ref})"
                )
            remote = self.remote
        else:
            if is_digest(name):
                raise UsageError(f"{ref!r}: an address names a ref (URL#NAME), not a digest")
            remote = self.remote_for(url)
        if self.unsealing is None:
            return resolve_ref(name, remote)
        digest = self.unsealing.resolve(remote, name)
        opened = next(
            (o for o in self.unsealing.opened.values() if o.digest == digest and o.name == name),
            None,
        )
        if opened is None:  # a plain ref
            if remote is not self.remote:
                raise UsageError(
                    f"{ref!r}: a plain (unencrypted) template is served from --remote only"
                )
            return digest
        if self.sources is not None:
            self.sources.remember(remote.url, opened)
        return digest

    def reopen_sealed(self) -> None:
        """At start: open the signed refs the registered VEEs came from, from the state (no
        network), so their objects can be fetched and decrypted again."""
        if self.sources is None or self.unsealing is None:
            return
        used = {rec.template for rec in self.registry.vees.values()}
        self.sources.prune(used)
        for digest, src in self.sources.load().items():
            try:
                data, index = self.sources.read(src["signed_ref"], src["index"])
                self.unsealing.add_signed(
                    self.remote_for(src["url"]),
                    src["signed_ref"],
                    data,
                    name=src["ref"],
                    pin=False,
                    fetch_index=lambda _i, _n, raw=index: raw,
                    where=f"ref {src['ref']!r} of {src['url']} (kept in the state)",
                )
            except (VfsError, OSError) as e:
                log.error("encrypted template %s cannot be opened: %s", digest, e)

    def load_template(self, digest: str) -> Template:
        """Blocking (may fetch the manifest): call from a worker thread inside the loop."""
        t = self.templates.get(digest)
        if t is None:
            t = Template.load(self.resolver, digest)
            self.templates[digest] = t
        return t

    def start_all(self) -> None:
        """Mount every registered VEE (at startup, before serving)."""
        self.reopen_sealed()
        for name, rec in sorted(self.registry.vees.items()):
            try:
                t = self.load_template(rec.template)
                self.views.add_vee(name, t, self.registry.open_layer(name))
            except VfsError as e:
                log.error("VEE %s not mounted: %s", name, e)
                self.broken[name] = str(e)

    # -- control requests ------------------------------------------------------------------

    async def handle(self, req: dict[str, Any]) -> Any:
        """One request, already validated by :func:`control.parse_request` (exact types)."""
        op = req["op"]
        if op == "ping":
            return {"pid": os.getpid()}
        if op == "list":
            return self.list()
        if op == "add":
            return await self.add(req["name"], req["template"])
        if op == "rm":
            return self.rm(req["name"], req["purge"])
        if op == "upgrade":
            return await self.upgrade(req["name"], req["template"], req["dry_run"])
        raise UsageError(f"unknown control op {op!r}")

    def list(self) -> list[dict[str, Any]]:
        out = []
        for name, rec in sorted(self.registry.vees.items()):
            d: dict[str, Any] = {"name": name, **rec.to_json()}
            d["state"] = "broken" if name in self.broken else "mounted"
            if name in self.broken:
                d["error"] = self.broken[name]
            d["layer"] = str(self.registry.layer_dir(name))
            out.append(d)
        return out

    async def add(self, name: str, ref: str) -> dict[str, Any]:
        check_vee_name(name)
        if name in self.registry.vees:
            raise AlreadyExists(f"VEE {name!r} exists")
        digest = await trio.to_thread.run_sync(self._digest, ref)
        t = await trio.to_thread.run_sync(self.load_template, digest)
        # Save-then-apply: everything that can fail on a full disk (the layer's directories,
        # the registry file) happens before the VEE appears in the mount; the last step only
        # changes memory. A failure leaves no ghost: not listed, not mounted, not registered.
        layer = self.registry.open_layer(name)
        try:
            self.views.prepare_layer(t, layer)
            self.registry.add(name, digest, ref)
        except BaseException:
            layer.close()
            raise
        try:
            self.views.add_vee(name, t, layer)
        except BaseException:
            self.registry.forget(name)  # the layer (maybe adopted, not new) stays where it is
            raise
        return {"name": name, "template": digest}

    def rm(self, name: str, purge: bool) -> dict[str, Any]:
        self.registry.get(name)
        if any(h.node.vee is self.views.vees.get(name) for h in self.views.handles.values()):
            raise BusyError(f"VEE {name!r} has open files")
        self.registry.forget(name)  # durable first: a failure here changes nothing
        with contextlib.suppress(NotFound):
            self.views.remove_vee(name)
        self.broken.pop(name, None)
        kept = self.registry.retire_layer(name, purge=purge)
        return {"name": name, "kept_layer": str(kept) if kept else None}

    async def upgrade(self, name: str, ref: str, dry_run: bool) -> dict[str, Any]:
        rec = self.registry.get(name)
        digest = await trio.to_thread.run_sync(self._digest, ref)
        new = await trio.to_thread.run_sync(self.load_template, digest)
        old = await trio.to_thread.run_sync(self.load_template, rec.template)
        live = self.views.vees.get(name)
        # the mounted VEE's own layer object: opening another would clean its work dir under
        # a copy-up in progress
        layer = live.layer if live is not None else self.registry.open_layer(name)
        report = await trio.to_thread.run_sync(plan_upgrade, name, layer, old, new)
        out = report.to_json()
        out["applied"] = False
        if dry_run or digest == rec.template:
            return out
        vee = self.views.vees.get(name)
        if vee is not None and any(h.node.vee is vee for h in self.views.handles.values()):
            raise BusyError(f"VEE {name!r} has open files: close them (or stop its users) first")
        self.registry.set_template(name, digest, ref)
        with contextlib.suppress(NotFound):
            self.views.remove_vee(name)
        self.views.add_vee(name, new, layer)
        self.broken.pop(name, None)
        out["applied"] = True
        return out


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


def _prepare_mountpoint(mount: Path) -> None:
    """Detach a dead mount left by a killed daemon (statfs fails with ENOTCONN).

    statfs, not stat: the kernel answers stat of the dead mount's root from its attribute cache
    (we hand out hour-long timeouts), while statfs always asks the (dead) daemon."""
    try:
        os.statvfs(mount)
    except OSError as e:
        if e.errno != errno.ENOTCONN:
            raise
        log.warning("%s: dead FUSE mount of a previous daemon: detaching it", mount)
        subprocess.run(["umount", "-l", os.fspath(mount)], check=False)
    if not mount.is_dir():
        raise NotFound(f"mountpoint {mount} is not a directory")
    if os.path.ismount(mount):
        raise BusyError(f"{mount} is already a mount point")


async def serve(
    state: Path,
    mount: Path,
    *,
    store_dir: Path,
    remote_url: str | None = None,
    remote_tls: dict[str, str | None] | None = None,
    keys: Keys | None = None,
    debug_fuse: bool = False,
) -> None:
    """Run the daemon until SIGTERM/SIGINT (or cancellation). ``keys``: the identity and
    trusted publishers encrypted templates are opened with (pins default to STATE/pins.json)."""
    state.mkdir(parents=True, exist_ok=True)
    _raise_fd_limit()
    async with contextlib.AsyncExitStack() as stack:
        lock_fd = _lock_state(state)
        stack.callback(os.close, lock_fd)
        _prepare_mountpoint(mount)
        mount = mount.resolve()  # now, before it is a FUSE mount this loop must answer
        store = LocalStore(store_dir)
        stack.callback(store.close)
        remote = open_remote(remote_url, **(remote_tls or {})) if remote_url else None
        if remote is not None:
            stack.callback(remote.close)
        if keys is None:
            keys = Keys()
        if keys.pins is None:
            keys.pins = PinStore(state / "pins.json")
        # The store and the engines see plaintext objects under their plaintext ids: objects
        # of encrypted templates are decrypted (and verified) between the repository and the
        # resolver (docs/encryption.md, "At rest").
        unsealing = UnsealingRemote(remote, keys)
        resolver = Resolver(store, unsealing)
        registry = VeeRegistry(state)
        views = Views(resolver)
        stack.callback(views.close)
        daemon = Daemon(
            registry,
            views,
            resolver,
            remote,
            unsealing=unsealing,
            sources=SealedSources(state),
            remote_tls=remote_tls,
        )
        stack.callback(daemon.close_remotes)
        daemon.start_all()
        options = set(MOUNT_OPTIONS)
        if debug_fuse:
            options.add("debug")
        ops = VeeOperations(views)
        pyfuse3.init(ops, os.fspath(mount), options)
        stack.callback(pyfuse3.close, unmount=True)
        log.info("serving %d VEE(s) at %s", len(views.vees), mount)
        async with trio.open_nursery() as nursery:
            await nursery.start(control.serve_control, state, daemon.handle)
            nursery.start_soon(_signals, nursery.cancel_scope)
            nursery.start_soon(_kernel_ready, mount, views, ops)
            # Worker tasks are cheap: enough that requests waiting on a stalled fetch (each
            # bounded by the fetch deadline) never leave none to answer the other VEEs.
            await pyfuse3.main(max_tasks=MAX_REQUEST_TASKS)
            nursery.cancel_scope.cancel()
        log.info("vfsd at %s stopping", mount)


async def _kernel_ready(mount: Path, views: Views, ops: VeeOperations) -> None:
    """Once the FUSE INIT handshake is over (a stat of the mount from a worker thread returns
    only after this loop answered INIT and GETATTR): raise read-ahead (INIT resets it), let
    the view send the kernel invalidations (refused before INIT), and start checking callers
    confined to a VEE (their roots are identified by the mount's device number)."""
    st = await trio.to_thread.run_sync(os.stat, mount)
    set_read_ahead(os.fspath(mount))
    views.attach_kernel(invalidate_entry, invalidate_attr)
    ops.confinement = Confinement(st.st_dev, views)


async def _signals(scope: trio.CancelScope) -> None:
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as sigs:
        async for _ in sigs:
            log.info("signal received: unmounting")
            pyfuse3.terminate()
            return
