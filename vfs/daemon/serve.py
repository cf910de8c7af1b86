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
import threading
from pathlib import Path
from typing import Any

import pyfuse3
import trio

from vfs.daemon import control, mounts
from vfs.daemon.confine import Confinement
from vfs.daemon.datalayer import MOUNT_OPTIONS as DATA_MOUNT_OPTIONS
from vfs.daemon.datalayer import DataLayerOperations
from vfs.daemon.fuse_ops import VeeOperations, invalidate_attr, invalidate_entry, set_read_ahead
from vfs.daemon.kernel_engine import KernelEngine, busy_message, clear_for_fuse_engine, probe
from vfs.daemon.sealed_sources import SealedSources
from vfs.errors import (
    AlreadyExists,
    BusyError,
    NotFound,
    UsageError,
    VfsError,
)
from vfs.export.supervisor import ExportSupervisor
from vfs.redirect import LocalStore, Remote, RepoConfig, Resolver
from vfs.redirect.sealed_refs import Keys, PinStore
from vfs.redirect.sealed_remote import UnsealingRemote, split_address
from vfs.redirect.sealed_store import SealedStoreResolver
from vfs.tree import gcroots
from vfs.tree.gcroots import StateRoot
from vfs.tree.ovl_upper import needs_normalizing, normalize_upper
from vfs.tree.template import Template, is_digest, resolve_ref
from vfs.tree.upgrade import plan_upgrade
from vfs.tree.vee import VeeRegistry, check_vee_name
from vfs.tree.view import Views

log = logging.getLogger(__name__)

#: pyfuse3 worker tasks (concurrent requests in the daemon).
MAX_REQUEST_TASKS = 1024
MOUNT_OPTIONS = {"fsname=vfsd", "subtype=vfsd", "default_permissions", "allow_other", "dev", "suid"}
ENGINES = ("auto", "kernel", "fuse")


class Daemon:
    """The control-plane of one daemon: the registry, the templates, and the VEEs of its
    engine (``views`` for the FUSE engine, ``kernel`` for the kernel engine)."""

    def __init__(
        self,
        registry: VeeRegistry,
        resolver: Resolver,
        remote: Any,
        *,
        views: Views | None = None,
        kernel: KernelEngine | None = None,
        data_layer: DataLayerOperations | None = None,
        engine_reason: str = "",
        root: StateRoot | None = None,
        exports: ExportSupervisor | None = None,
        unsealing: UnsealingRemote | None = None,
        sources: SealedSources | None = None,
        repo: RepoConfig | None = None,
    ):
        assert (views is None) != (kernel is None)
        self.registry = registry
        self.exports = exports
        self.views = views
        self.kernel = kernel
        self.data_layer = data_layer
        self.resolver = resolver
        self.remote = remote
        self.engine = "kernel" if kernel is not None else "fuse"
        self.engine_reason = engine_reason
        self.unsealing = unsealing
        self.sources = sources
        self.repo_config = repo
        self._remotes: dict[str, Remote] = {}
        self.templates: dict[str, Template] = {}
        self.broken: dict[str, str] = {}
        self._hydrating: set[str] = set()
        #: set on SIGTERM/SIGINT: a start-up still mounting VEEs stops after the current one
        self.stopping = threading.Event()
        #: the state directory's gc root in the store: what store gc and eviction must leave
        self.root = root or StateRoot(
            resolver.store.roots, registry.state, _url(remote), stored_id=resolver.stored_id
        )

    # -- templates ---------------------------------------------------------------------------

    def remote_for(self, url: str) -> Remote:
        """The repository at ``url``: the daemon's --remote, or one opened with the same TLS
        and proxy options (kept open for the daemon's life)."""
        if self.remote is not None and url.rstrip("/") == self.remote.url.rstrip("/"):
            return self.remote
        r = self._remotes.get(url)
        if r is None:
            # the same TLS, proxy and deadline options as --repo, for another URL
            cfg = self.repo_config.replace(url=url) if self.repo_config else RepoConfig(url)
            r = self._remotes[url] = cfg.open()
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
                    f"template {ref!r} is a name: the daemon needs --repo (or give URL#{ref})"
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
                    f"{ref!r}: a plain (unencrypted) template is served from --repo only"
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

    def in_use(self) -> dict[str, Template | None]:
        """The templates the registry names, loaded (None: could not be loaded)."""
        return {r.template: self.templates.get(r.template) for r in self.registry.vees.values()}

    def _use(self, digest: str, t: Template) -> None:
        """Blocking: ``t``'s objects join the gc root; without a repository to fetch them, every
        one must be in the store (checked after the root protects them, so a gc running now
        either leaves them or is found out here)."""
        self.root.hold(digest, t)
        if self.remote is not None:
            return
        if self.unsealing is not None and self.unsealing.entry(digest) is not None:
            return  # an encrypted template: its objects are fetched from where it came from
        try:  # a refusal (objects not here, a size the manifest lies about) drops the hold
            missing = gcroots.missing_objects(t, self.resolver.store)
            if missing:
                path = missing[0].path.decode("utf-8", "backslashreplace")
                raise NotFound(
                    f"template {digest[:16]}…: {len(missing)} content object(s) are not in the "
                    f"local store (first: /{path}) and the daemon has no --repo to fetch them: "
                    "publish it with --store, or serve with --repo"
                )
        except BaseException:
            self.root.release(digest)
            self.root.sync(self.in_use())
            raise

    # -- the engines' blocking steps (worker threads) ---------------------------------------

    def _normalize_for_fuse(self, name: str, t: Template) -> None:
        """A layer the kernel engine used may hold metacopy files: make it plain first."""
        root = self.registry.layer_dir(name)
        if needs_normalizing(root):
            normalize_upper(root, t, self.resolver.read)

    def _kernel_attach(self, name: str, t: Template) -> None:
        """Mount VEE ``name`` with the kernel engine (blocking)."""
        assert self.kernel is not None and self.data_layer is not None
        missing = {m.oid: m.size for m in gcroots.missing_objects(t, self.resolver.store)}
        self.data_layer.register(gcroots.object_sizes(t), f"template {t.digest[:16]}…")
        reused = self.kernel.attach(name, t, self.registry.layer_dir(name), local=not missing)
        if reused and missing:
            self._hydrate(name, missing)

    def _hydrate(self, name: str, missing: dict[str, int]) -> None:
        """Fetch every object a kept mount of a previous daemon may still need (its data layer
        died with that daemon): once local, the files it has not opened yet find them in the
        first data layer (one it opened through the dead layer stays bound to it,
        docs/kernel-engine.md §8)."""
        if name in self._hydrating:
            return
        self._hydrating.add(name)

        def run() -> None:
            done = failed = 0
            for oid, size in missing.items():
                try:
                    self.resolver.ensure(oid, expected_size=size)
                    done += 1
                except VfsError as e:
                    failed += 1
                    log.error("VEE %s: object %s not fetched: %s", name, oid, e)
            self._hydrating.discard(name)
            log.info("VEE %s: fetched %d objects a kept mount needs (%d failed)", name, done,
                     failed)  # fmt: skip

        threading.Thread(target=run, name=f"hydrate-{name}", daemon=True).start()

    def start_all(self) -> None:
        """Mount every registered VEE (blocking; at start-up, before the control socket)."""
        self.reopen_sealed()
        # Registered with the store first (the root of a previous run stays until this one
        # knows better): templates that fail to load now keep what their root had.
        for digest in {r.template for r in self.registry.vees.values()}:
            self.root.hold(digest)
            self.root.release(digest)
        for name, rec in sorted(self.registry.vees.items()):
            if self.stopping.is_set():
                log.info("stopping: VEE %s and the rest not mounted", name)
                break
            if name in self.broken:  # refused before start-up (clear_for_fuse_engine)
                continue
            try:
                t = self.load_template(rec.template)
                if self.kernel is not None:
                    self._kernel_attach(name, t)
                else:
                    assert self.views is not None
                    self._normalize_for_fuse(name, t)
                    self.views.add_vee(name, t, self.registry.open_layer(name))
            except VfsError as e:
                log.error("VEE %s not mounted: %s", name, e)
                self.broken[name] = str(e)
        self.root.sync(self.in_use())
        if self.kernel is not None:
            # before the control socket: no add can be building an image meanwhile
            keep = {rec.template for rec in self.registry.vees.values()}
            n = self.kernel.images.remove_unused(keep)
            if n:
                log.info("removed %d cached template images no VEE uses", n)
            for name in list(self.kernel.leftovers):
                left = self.kernel.leftovers.pop(name)
                log.warning("%s: a previous daemon's mount of a VEE no longer registered: "
                            "detached", left.info.mountpoint)  # fmt: skip
                with contextlib.suppress(VfsError):
                    mounts.umount(left.info.mountpoint)

    # -- control requests ------------------------------------------------------------------

    async def handle(self, req: dict[str, Any]) -> Any:
        """One request, already validated by :func:`control.parse_request` (exact types)."""
        op = req["op"]
        if op == "ping":
            return {"pid": os.getpid(), "engine": self.engine, "engine_reason": self.engine_reason}
        if op == "list":
            return self.list()
        if op == "add":
            return await self.add(req["name"], req["template"])
        if op == "rm":
            return await self.rm(req["name"], req["purge"])
        if op == "upgrade":
            return await self.upgrade(req["name"], req["template"], req["dry_run"], req["force"])
        if op.startswith("export_"):
            if self.exports is None:
                raise UsageError("this daemon serves no exports")
            if op == "export_add":
                return await self.exports.add(req["spec"])
            if op == "export_rm":
                return await self.exports.remove(req["name"])
            if op == "export_list":
                return self.exports.list()
        raise UsageError(f"unknown control op {op!r}")

    def list(self) -> list[dict[str, Any]]:
        out = []
        for name, rec in sorted(self.registry.vees.items()):
            d: dict[str, Any] = {"name": name, **rec.to_json()}
            d["state"] = "broken" if name in self.broken else "mounted"
            if name in self.broken:
                d["error"] = self.broken[name]
            d["layer"] = str(self.registry.layer_dir(name))
            d["engine"] = self.engine
            d["engine_reason"] = self.engine_reason
            if self.kernel is not None:
                vm = self.kernel.vees.get(name)
                if vm is not None and vm.reused:
                    d["reused_mount"] = True
            out.append(d)
        return out

    async def add(self, name: str, ref: str) -> dict[str, Any]:
        check_vee_name(name)
        if name in self.registry.vees:
            raise AlreadyExists(f"VEE {name!r} exists")
        digest = await trio.to_thread.run_sync(self._digest, ref)
        # The manifest is protected before it is read, the content before a VEE uses it.
        await trio.to_thread.run_sync(self.root.hold, digest)
        try:
            t = await trio.to_thread.run_sync(self.load_template, digest)
            await trio.to_thread.run_sync(self._use, digest, t)
            try:
                await self._add_registered(name, digest, ref, t)
            finally:
                self.root.release(digest)
        finally:
            self.root.release(digest)
            await trio.to_thread.run_sync(self.root.sync, self.in_use())
        return {"name": name, "template": digest}

    async def _add_registered(self, name: str, digest: str, ref: str, t: Template) -> None:
        if self.kernel is None:
            await trio.to_thread.run_sync(self._normalize_for_fuse, name, t)
        # Save-then-apply: everything that can fail on a full disk (the layer's directories,
        # the registry file) happens before the VEE appears; the last step mounts it. A
        # failure leaves no ghost: not listed, not mounted, not registered.
        layer = self.registry.open_layer(name)
        try:
            Views.prepare_layer(t, layer)
            self.registry.add(name, digest, ref)
        except BaseException:
            layer.close()
            raise
        try:
            if self.views is not None:
                self.views.add_vee(name, t, layer)
            else:
                layer.close()
                await trio.to_thread.run_sync(self._kernel_attach, name, t)
        except BaseException:
            self.registry.forget(name)  # the layer (maybe adopted, not new) stays where it is
            raise

    def _busy(self, name: str) -> str | None:
        """Why VEE ``name`` cannot be unmounted now (None: it can)."""
        if self.views is not None:
            vee = self.views.vees.get(name)
            if vee is not None and any(h.node.vee is vee for h in self.views.handles.values()):
                return f"VEE {name!r} has open files: close them (or stop its users) first"
            return None
        assert self.kernel is not None
        held = self.kernel.holders(name)
        return busy_message(name, held) if held else None

    async def rm(self, name: str, purge: bool) -> dict[str, Any]:
        self.registry.get(name)
        busy = await trio.to_thread.run_sync(self._busy, name)
        if busy:
            raise BusyError(busy)
        self.registry.forget(name)  # durable first: a failure here changes nothing
        if self.views is not None:
            with contextlib.suppress(NotFound):
                self.views.remove_vee(name)
        else:
            assert self.kernel is not None
            with contextlib.suppress(NotFound):
                await trio.to_thread.run_sync(lambda: self.kernel.detach(name, force=True))
        self.broken.pop(name, None)
        kept = self.registry.retire_layer(name, purge=purge)
        # last: its template's objects leave the gc root once no VEE uses them
        await trio.to_thread.run_sync(self.root.sync, self.in_use())
        return {"name": name, "kept_layer": str(kept) if kept else None}

    async def upgrade(self, name: str, ref: str, dry_run: bool, force: bool) -> dict[str, Any]:
        rec = self.registry.get(name)
        digest = await trio.to_thread.run_sync(self._digest, ref)
        new = await trio.to_thread.run_sync(self.load_template, digest)
        old = await trio.to_thread.run_sync(self.load_template, rec.template)
        live = self.views.vees.get(name) if self.views is not None else None
        # the mounted VEE's own layer object: opening another would clean its work dir under
        # a copy-up in progress
        layer = live.layer if live is not None else self.registry.open_layer(name)
        try:
            report = await trio.to_thread.run_sync(plan_upgrade, name, layer, old, new)
        finally:
            if live is None:
                layer.close()
        out = report.to_json()
        out["applied"] = False
        if dry_run or digest == rec.template:
            return out
        if self.views is not None:
            busy = self._busy(name)
            if busy:
                raise BusyError(busy)
        await trio.to_thread.run_sync(self._use, digest, new)  # before the registry names it
        try:
            if self.views is not None:
                self.registry.set_template(name, digest, ref)
                with contextlib.suppress(NotFound):
                    self.views.remove_vee(name)
                self.views.add_vee(name, new, layer)
            else:
                await trio.to_thread.run_sync(self._kernel_switch, name, old, new, ref, force)
            self.broken.pop(name, None)
        finally:
            self.root.release(digest)
            await trio.to_thread.run_sync(self.root.sync, self.in_use())
        out["applied"] = True
        return out

    def _kernel_switch(
        self, name: str, old: Template, new: Template, ref: str, force: bool
    ) -> None:
        """An overlay cannot change its lower layer: unmount (refused while held, unless
        ``force``), make metadata-only copies full copies against the old template (a private
        file must keep its bytes), save the registry, mount on the new template. A failure
        before the registry is saved mounts the old template again."""
        assert self.kernel is not None
        self.data_layer.register(gcroots.object_sizes(new), f"template {new.digest[:16]}…")  # type: ignore[union-attr]
        if name in self.kernel.vees:
            self.kernel.detach(name, force=force)
        root = self.registry.layer_dir(name)
        try:
            normalize_upper(root, old, self.resolver.read, clear_marker=False)
            self.registry.set_template(name, new.digest, ref)
        except BaseException:
            with contextlib.suppress(VfsError):
                self._kernel_attach(name, old)
            raise
        try:
            self._kernel_attach(name, new)
        except VfsError as e:
            self.broken[name] = str(e)
            raise


def _url(remote: Any) -> str | None:
    return getattr(remote, "url", None) if remote is not None else None


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
