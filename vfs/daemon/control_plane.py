"""The control plane of one ``vfsd serve``: the registry, the templates and the VEEs of its
engine, and the requests of the control socket (``vfsd vee add|rm|list|upgrade``).

Plain Python over the engines' public calls (:class:`vfs.tree.view.Views` for the FUSE engine,
:class:`vfs.daemon.kernel_engine.KernelEngine` for the kernel engine): :mod:`vfs.daemon.serve`
owns the daemon's lifetime (mounts, the FUSE loop, signals) and hands each request here.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
from typing import Any

import trio

from vfs.daemon import mounts
from vfs.daemon.datalayer import DataLayerOperations
from vfs.daemon.kernel_engine import KernelEngine, busy_message
from vfs.daemon.sealed_sources import SealedSources
from vfs.errors import (
    AlreadyExists,
    BusyError,
    NotFound,
    UsageError,
    VfsError,
)
from vfs.export.supervisor import ExportSupervisor
from vfs.redirect import Remote, RepoConfig, Resolver
from vfs.redirect.sealed_remote import UnsealingRemote, split_address
from vfs.tree import gcroots
from vfs.tree.gcroots import StateRoot
from vfs.tree.ovl_upper import needs_normalizing, normalize_upper
from vfs.tree.template import Template, is_digest, resolve_ref
from vfs.tree.upgrade import plan_upgrade
from vfs.tree.vee import VeeRegistry, check_vee_name
from vfs.tree.view import Views

log = logging.getLogger(__name__)


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
