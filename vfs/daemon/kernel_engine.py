"""The kernel engine: every VEE root its own overlayfs mount over its template's EROFS image.

Per template, an EROFS image of metadata only (:mod:`vfs.tree.erofs_image`) mounted once at
``<state>/kernel/lower/<digest>``; per VEE, an overlay at ``MNT/<name>``::

    lowerdir+  <state>/kernel/lower/<digest>      the template (metadata, metacopy stubs)
    datadir+   <store>/objects                    first redirection: local objects, in the kernel
    datadir+   <state>/kernel/data                second: vfsd's FUSE mount of objects fetched
                                                  on demand (vfs/daemon/datalayer.py)
    upperdir   <state>/vees/<name>/upper          the private layer (the FUSE engine's format)
    workdir    <state>/vees/<name>/ovl-work       overlayfs's own scratch directory
    metacopy=on, redirect_dir=on, index=off, nfs_export=off, xino=auto

Requests of a VEE never reach Python: the kernel answers every lookup, getattr, readdir, read
and write; the daemon only serves objects that are not local yet. The page cache of a template
file is the object file's (both data layers are below every VEE): one copy for every VEE of
every template version that has the file.

Why these options: ``metacopy=on`` is what makes the stubs work (and a chmod of a template file
copies up only its metadata); ``redirect_dir=on`` lets a VEE rename a template directory
without EXDEV, as the FUSE engine does; ``index=off`` because an index pins the lower layer's
identity, and a VEE moving to another template remounts on another image (overlayfs then
refuses the mount); ``nfs_export=off`` so file handles of a VEE cannot be decoded at all (one
superblock per VEE: a handle from one VEE means nothing in another, ``docs/kernel-engine.md``
"Isolation"); ``xino=auto`` so that st_dev is the overlay's for every file (``find -xdev``,
``du -x``) with inode numbers that stay unique.

Crash story: the mounts belong to the kernel, not to the daemon. When the daemon dies, every
VEE stays mounted; files whose objects are local keep working (a fully local template needs
nothing from the daemon), reads that need the FUSE data layer fail (ENOTCONN) until a new
daemon runs — also for a file a VEE first opened while its object was not local: overlayfs
looks a stub's data up once per inode, so that inode stays bound to the dead data layer until
the mount is replaced (``docs/kernel-engine.md`` §8). At start-up
:meth:`KernelEngine.inventory` finds the overlays a previous daemon left at ``MNT/<name>``
(identified by their ``upperdir``); :meth:`attach` replaces one that nothing holds (a fresh
mount over the new daemon's data layer), and keeps one that processes still hold — its local
files never stopped working, and the daemon fetches every object of its template that is not
local yet, so that the files it has not opened yet find them in the store; the next restart
after its holders leave replaces it.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vfs.daemon import mounts
from vfs.daemon.holders import Holder, holders
from vfs.daemon.pin import Pin, pin
from vfs.errors import BusyError, NotFound, VfsError
from vfs.tree.erofs_image import ImageCache
from vfs.tree.ovl_upper import KERNEL_WORK

log = logging.getLogger(__name__)

OVERLAY_FLAGS = (
    ("metacopy", "on"),
    ("redirect_dir", "on"),
    ("index", "off"),
    ("nfs_export", "off"),
    ("xino", "auto"),
)


@dataclass
class VeeMount:
    name: str
    digest: str
    path: Path
    mount_id: int
    dev: str
    reused: bool = False  #: a previous daemon's mount, still held by processes


@dataclass
class Leftover:
    """An overlay a previous daemon left at ``MNT/<name>``."""

    info: mounts.MountInfo
    digest: str | None  # the template of its lower layer, if it is one of ours
    extra: dict[str, Any] = field(default_factory=dict)


class KernelEngine:
    """Mounts and unmounts the VEE overlays of one daemon (thread-safe: the blocking calls run
    in worker threads)."""

    name = "kernel"

    def __init__(
        self,
        state: Path,
        mnt: Path,
        store_objects: Path,
        *,
        data_layer: Path | None,
        reason: str = "",
        pin_images: bool = True,
    ) -> None:
        self.state = state
        self.mnt = mnt
        self.store_objects = store_objects
        self.kdir = state / "kernel"
        self.lower_dir = self.kdir / "lower"
        self.data_layer = data_layer
        self.reason = reason
        self.pin_images = pin_images
        self.images = ImageCache(self.kdir / "images")
        self.vees: dict[str, VeeMount] = {}
        self.leftovers: dict[str, Leftover] = {}
        self._lowers: dict[str, int] = {}  # digest -> VEEs mounted on it
        self._pins: dict[str, Pin] = {}  # digest -> its image's blocks, locked in memory
        #: digest -> the image a previous daemon's mount of it read (its ``source``), and the
        #: pin of that image while VEE overlays it left are kept (:meth:`attach`)
        self._left_images: dict[str, str] = {}
        self._kept_pins: dict[str, Pin] = {}
        self._lock = threading.RLock()
        for d in (self.kdir, self.lower_dir):
            d.mkdir(mode=0o700, parents=True, exist_ok=True)
            os.chmod(d, 0o700)

    @staticmethod
    def data_layer_path(state: Path) -> Path:
        return state / "kernel" / "data"

    # -- start-up ------------------------------------------------------------------------------

    def inventory(self) -> None:
        """Find what a previous daemon left mounted: VEE overlays (kept for :meth:`attach` to
        reuse or replace), template image mounts (detached: a new one is mounted on demand;
        overlays hold private clones of their layers, so detaching never affects a VEE)."""
        self.leftovers = leftover_overlays(self.state, self.mnt, self.lower_dir)
        for name, left in self.leftovers.items():
            log.info("VEE %s: still mounted by a previous daemon (template %s)", name,
                     (left.digest or "?")[:16])  # fmt: skip
        prefix = os.fspath(self.lower_dir) + "/"
        self._left_images = {
            m.mountpoint[len(prefix) :]: m.source
            for m in mounts.mountinfo()
            if m.fstype == "erofs" and m.mountpoint.startswith(prefix)
        }
        n = mounts.detach_all_under(self.lower_dir)
        if n:
            log.info("detached %d template image mounts of a previous daemon", n)

    # -- template lower layers -----------------------------------------------------------------

    def _lower(self, template: Any) -> Path:
        """The mounted image of ``template`` (built, checked, mounted on first use)."""
        digest = template.digest
        target = self.lower_dir / digest
        with self._lock:
            if digest in self._lowers and mounts.mounted_at(target) is not None:
                self._lowers[digest] += 1
                return target
        image = self.images.ensure(template)
        with self._lock:
            if digest in self._lowers and mounts.mounted_at(target) is not None:
                self._lowers[digest] += 1
                return target
            target.mkdir(mode=0o700, exist_ok=True)
            old = self._pins.pop(digest, None)
            if old is not None:  # of a mount that went away behind our back
                old.close()
            how, p = mount_image(image, target, pin_images=self.pin_images)
            if p is not None:
                self._pins[digest] = p
                log.debug("template %s (%s): %d bytes kept in memory", digest[:16], how, p.length)
            self._lowers[digest] = 1
            return target

    def _release_lower(self, digest: str) -> None:
        with self._lock:
            n = self._lowers.get(digest, 0) - 1
            if n > 0:
                self._lowers[digest] = n
                return
            self._lowers.pop(digest, None)
            target = self.lower_dir / digest
            with contextlib.suppress(VfsError):
                mounts.umount(target)
            p = self._pins.pop(digest, None)
            if p is not None:
                p.close()  # after the umount: the autoclear loop device detaches now
            with contextlib.suppress(OSError):
                target.rmdir()

    # -- VEE mounts ----------------------------------------------------------------------------

    def _mount_overlay(self, name: str, lower: Path, layer_root: Path) -> VeeMount:
        target = self.mnt / name
        target.mkdir(mode=0o755, exist_ok=True)
        work = layer_root / KERNEL_WORK
        work.mkdir(mode=0o700, exist_ok=True)
        strings = [("lowerdir+", os.fspath(lower)), ("datadir+", os.fspath(self.store_objects))]
        if self.data_layer is not None:
            strings.append(("datadir+", os.fspath(self.data_layer)))
        strings += [
            ("upperdir", os.fspath(layer_root / "upper")),
            ("workdir", os.fspath(work)),
            *OVERLAY_FLAGS,
        ]
        mounts.mount_fs("overlay", target, strings=strings)
        info = mounts.mounted_at(target)
        if info is None:
            raise VfsError(f"overlay of VEE {name} mounted at {target} but not found there")
        return VeeMount(name, os.path.basename(lower), target, info.mount_id, info.dev)

    def attach(self, name: str, template: Any, layer_root: Path, *, local: bool) -> bool:
        """Mount VEE ``name`` on ``template`` (blocking). ``local``: every object of the
        template is in the store. Returns True when a previous daemon's mount is kept (it is
        held by processes; see the module's crash story): the caller then fetches what is not
        local so that it heals."""
        left = self.leftovers.pop(name, None)
        if left is not None:
            vm = VeeMount(name, left.digest or "", Path(left.info.mountpoint),
                          left.info.mount_id, left.info.dev, reused=True)  # fmt: skip
            held = holders(vm.dev, vm.mount_id, os.fspath(vm.path))
            if held and left.digest == template.digest:
                log.warning("VEE %s: a previous daemon's mount is in use (%s): kept", name,
                            "; ".join(map(str, held[:3])))  # fmt: skip
                with self._lock:
                    self.vees[name] = vm  # its layers are the overlay's private clones
                    self._pin_kept(template.digest)
                return True
            if held:
                raise BusyError(
                    f"VEE {name} is still mounted on template {(left.digest or '?')[:16]}… by a "
                    f"previous daemon and in use ({held[0]}): stop its users and restart vfsd"
                )
            log.info("VEE %s: replacing a previous daemon's mount", name)
            mounts.umount(vm.path)
        lower = self._lower(template)
        try:
            vm = self._mount_overlay(name, lower, layer_root)
        except BaseException:
            self._release_lower(template.digest)
            raise
        with self._lock:
            self.vees[name] = vm
        return False

    def holders(self, name: str) -> list[Holder]:
        vm = self.vees.get(name)
        if vm is None:
            return []
        return holders(vm.dev, vm.mount_id, os.fspath(vm.path))

    def detach(self, name: str, *, force: bool = False) -> None:
        """Unmount VEE ``name``. Refused while processes hold it (the list says who), unless
        ``force``: then the mount is detached lazily and they keep the view they have."""
        with self._lock:
            vm = self.vees.get(name)
        if vm is None:
            raise NotFound(f"VEE {name!r} is not mounted")
        if not force:
            held = self.holders(name)
            if held:
                raise BusyError(busy_message(name, held))
        mounts.umount(vm.path, detach=True)
        with self._lock:
            self.vees.pop(name, None)
        if vm.reused:
            self._unpin_kept(vm.digest)
        else:
            self._release_lower(vm.digest)
        with contextlib.suppress(OSError):
            vm.path.rmdir()

    def close(self) -> None:
        """Unmount every VEE (lazily: a process inside keeps what it holds) and every image."""
        for name in list(self.vees):
            with contextlib.suppress(VfsError):
                self.detach(name, force=True)
        for left in self.leftovers.values():
            with contextlib.suppress(VfsError):
                mounts.umount(left.info.mountpoint)
        mounts.detach_all_under(self.lower_dir)
        self._lowers.clear()
        for p in self._pins.values():
            p.close()
        self._pins.clear()
        for p in self._kept_pins.values():
            p.close()
        self._kept_pins.clear()

    def _pin_kept(self, digest: str) -> None:
        """Keep in memory the image a kept overlay of ``digest`` still reads (with the lock).

        Its image mount was detached at start-up (the overlay holds a private clone of it), so
        the pin of the dead daemon is gone with it; the image the clone reads is the
        ``source`` its mount had: the image file (file-backed) or the loop device. Should
        the cache have rebuilt that file since, the path names the new file and its pages
        are pinned for nothing until the VEE is replaced (memory, never a wrong byte)."""
        source = self._left_images.get(digest)
        if not self.pin_images or digest in self._kept_pins or source is None:
            return
        if os.path.exists(source) and (p := pin(source)) is not None:
            self._kept_pins[digest] = p
            log.debug("template %s of a kept VEE: %d bytes kept in memory", digest[:16],
                      p.length)  # fmt: skip

    def _unpin_kept(self, digest: str) -> None:
        """After a kept VEE of ``digest`` went: its image's pin goes with the last of them."""
        with self._lock:
            if any(vm.reused and vm.digest == digest for vm in self.vees.values()):
                return
            p = self._kept_pins.pop(digest, None)
        if p is not None:
            p.close()


def mount_image(image: Path, target: Path, *, pin_images: bool = True) -> tuple[str, Pin | None]:
    """Mount a template image at ``target`` with its blocks kept in memory where the kernel
    lets us (vfs/daemon/pin.py): file-backed over the pinned image file; on a loop device,
    the device's blocks pinned (what EROFS reads as metadata; its directory blocks then go
    through the image file). Returns how it is mounted and the pin (None: not pinned).
    ``pin_images=False`` (``vfsd serve --no-pin-images``): as the kernel mounts it best
    unpinned (a loop device, else file-backed)."""
    p = pin(os.fspath(image)) if pin_images else None
    try:
        how = mounts.mount_erofs(image, target, file_first=p is not None)
    except BaseException:
        if p is not None:
            p.close()
        raise
    if how == "loop" and p is not None:
        p.close()
        info = mounts.mounted_at(target)
        p = pin(info.source) if info is not None and info.source.startswith("/dev/") else None
    return how, p


def busy_message(name: str, held: list[Holder]) -> str:
    shown = "; ".join(str(h) for h in held[:8])
    more = f" and {len(held) - 8} more" if len(held) > 8 else ""
    return f"VEE {name!r} is in use: {shown}{more} (stop them, or use --force)"


def leftover_overlays(state: Path, mnt: Path, lower_dir: Path) -> dict[str, Leftover]:
    """The VEE overlays a previous kernel-engine daemon of ``state`` left at ``mnt/<name>``,
    by name: identified by their ``upperdir`` (``state/vees/<name>/upper``); an overlay there
    whose upper directory is another's is left alone (logged)."""
    out: dict[str, Leftover] = {}
    mnt_prefix = os.fspath(mnt) + "/"
    for m in mounts.mountinfo():
        if m.fstype != "overlay" or not m.mountpoint.startswith(mnt_prefix):
            continue
        name = m.mountpoint[len(mnt_prefix) :]
        if "/" in name:
            continue
        if m.option("upperdir") != [os.fspath(state / "vees" / name / "upper")]:
            log.warning("%s: an overlay that is not this daemon's: left alone", m.mountpoint)
            continue
        lowers = m.option("lowerdir+") or m.option("lowerdir")
        digest = None
        if lowers:
            first = lowers[0].split(":")[0]
            if first.startswith(os.fspath(lower_dir) + "/"):
                digest = os.path.basename(first)
        out[name] = Leftover(m, digest)
    return out


def clear_for_fuse_engine(state: Path, mnt: Path) -> dict[str, str]:
    """Before the FUSE engine mounts at ``mnt``: what a kernel-engine daemon of ``state`` left
    (it was killed, or the host rebooted into this engine without a clean stop) must go, or
    the FUSE mount would hide VEE overlays still writing to the private layers it serves.
    Unheld VEE overlays, the template image mounts and the dead data layer are detached.
    Returns name -> why for the VEEs whose old overlay processes still hold: those are not
    served (two writers on one private layer), until their users leave and vfsd restarts."""
    kdir = state / "kernel"
    refused: dict[str, str] = {}
    for name, left in leftover_overlays(state, mnt, kdir / "lower").items():
        info = left.info
        held = holders(info.dev, info.mount_id, info.mountpoint)
        if held:
            refused[name] = (
                f"VEE {name} is still mounted by a previous kernel-engine daemon and in use "
                f"({held[0]}): stop its users and restart vfsd"
            )
            log.error("%s", refused[name])
            continue
        log.warning("VEE %s: detaching a previous kernel-engine daemon's mount", name)
        mounts.detach_all_under(info.mountpoint)
    n = mounts.detach_all_under(kdir)  # an overlay holds private clones of its layers
    if n:
        log.info("detached %d image and data layer mounts of a kernel-engine daemon", n)
    return refused


# -- is the kernel engine possible here? --------------------------------------------------------


def probe(workdir: Path, *, pin_images: bool = True) -> tuple[bool, str]:
    """Try the whole kernel path once in ``workdir`` (removed after): a file-backed EROFS
    mount of an image this vfs writes, and an overlay with a data-only layer that serves a
    metacopy stub's bytes. Returns (supported, why) — the reason names what is missing."""
    import hashlib
    import shutil
    import stat as st

    from vfs.tree.entry import Entry
    from vfs.tree.erofs_image import build_image
    from vfs.tree.template import Template

    fs = Path("/proc/filesystems").read_text().split()
    for need in ("erofs", "overlay"):
        if need not in fs:
            return False, f"the kernel has no {need} file system"
    data = b"vfs kernel engine probe\n"
    oid = hashlib.sha256(data).hexdigest()
    root = Entry(1, "dir", st.S_IFDIR | 0o755, 0, 0, 0, 0, 2, 0, None, None, {})
    f = Entry(2, "reg", st.S_IFREG | 0o644, 0, 0, len(data), 0, 1, 0, None, oid, {})
    t = Template(oid, [root, f], [(1, b"probe", 2)], 0)
    shutil.rmtree(workdir, ignore_errors=True)
    workdir.mkdir(mode=0o700, parents=True)
    lower, mnt = workdir / "lower", workdir / "mnt"
    try:
        for d in (lower, mnt, workdir / "upper", workdir / "work", workdir / "data" / oid[:2]):
            d.mkdir(parents=True)
        (workdir / "data" / oid[:2] / oid).write_bytes(data)
        (workdir / "image").write_bytes(build_image(t))
        try:
            how, held = mount_image(workdir / "image", lower, pin_images=pin_images)
        except VfsError as e:
            return False, f"no loop devices and no file-backed EROFS mounts (Linux 6.12+): {e}"
        if held is not None:
            held.close()
        try:
            mounts.mount_fs(
                "overlay",
                mnt,
                strings=[
                    ("lowerdir+", os.fspath(lower)),
                    ("datadir+", os.fspath(workdir / "data")),
                    ("upperdir", os.fspath(workdir / "upper")),
                    ("workdir", os.fspath(workdir / "work")),
                    *OVERLAY_FLAGS,
                ],
            )
        except VfsError as e:
            return False, f"no overlayfs data-only layers (lowerdir+/datadir+, Linux 6.5+): {e}"
        try:
            if (mnt / "probe").read_bytes() != data:
                return False, "overlayfs did not follow a metacopy redirect into a data layer"
        finally:
            mounts.umount(mnt)
        where = "on loop devices" if how == "loop" else "file-backed"
        where += ", kept in memory" if held is not None else ""
        return True, f"EROFS images ({where}), overlayfs metacopy and data-only layers"
    except OSError as e:
        return False, f"kernel engine probe failed: {e}"
    finally:
        with contextlib.suppress(VfsError):
            mounts.umount(lower)
        shutil.rmtree(workdir, ignore_errors=True)
