"""The pyfuse3 adapter of :class:`vfs.tree.view.Views`: the only place that speaks errno.

Every handler is a translation: arguments in, :class:`Attr` → ``EntryAttributes`` out,
``VfsError``/``OSError`` → ``FUSEError(errno)``. The tunings of ``docs/perf-notes.md`` live here:
long entry/attr timeouts and ``keep_cache`` (template content never changes, and everything else
changes only through this daemon), ``flush`` answered with ENOSYS so the kernel stops sending it,
the writeback cache (the kernel merges small writes and handles O_APPEND), and the kernel's
readdir cache for every directory of a VEE (see :meth:`VeeOperations.opendir`).

It needs the pyfuse3 that ``make`` builds with the patches of ``tools/pyfuse3`` (FALLOCATE,
opendir returning ``FileInfo.cache_readdir``, ``invalidate_inode_async``): :func:`check_pyfuse3`
refuses to start on a plain PyPI pyfuse3.
"""

from __future__ import annotations

import errno
import functools
import logging
import os
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import pyfuse3

from vfs.daemon.confine import Confinement
from vfs.errors import VfsError
from vfs.tree.nodes import CACHE_TIMEOUT, ROOT_INO, Attr, SetAttr
from vfs.tree.view import Views

log = logging.getLogger(__name__)

F = TypeVar("F", bound=Callable[..., Awaitable[Any]])

#: ``VFSD_DIR_CACHE=0`` turns the kernel's readdir cache off (benchmarks compare both; an escape
#: hatch should a directory ever show a stale listing).
DIR_CACHE = os.environ.get("VFSD_DIR_CACHE", "1") != "0"


def check_pyfuse3() -> None:
    """Fail clearly unless pyfuse3 is the build ``make`` makes (``tools/pyfuse3``)."""
    missing = []
    if getattr(pyfuse3.Operations, "fallocate", None) is None:
        missing.append("Operations.fallocate")
    if not hasattr(pyfuse3.FileInfo(), "cache_readdir"):
        missing.append("FileInfo.cache_readdir")
    if not hasattr(pyfuse3, "invalidate_inode_async"):
        missing.append("invalidate_inode_async")
    if getattr(pyfuse3.Operations, "lseek", None) is None:
        missing.append("Operations.lseek")
    if missing:
        raise VfsError(
            f"pyfuse3 {pyfuse3.__version__} ({pyfuse3.__file__}) is not the vfs-patched build "
            f"(no {', '.join(missing)}): run `make setup` (tools/pyfuse3/build.py)"
        )


def _errno(fn: F) -> F:
    """Run a handler; library errors become the errno a local file system would return."""

    @functools.wraps(fn)
    async def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return await fn(*args, **kwargs)
        except pyfuse3.FUSEError:
            raise
        except VfsError as e:
            if e.errno not in (errno.ENOENT, errno.ESTALE, errno.ENOTEMPTY, errno.EEXIST):
                log.debug("%s: %s", fn.__name__, e)
            raise pyfuse3.FUSEError(e.errno) from None
        except OSError as e:
            raise pyfuse3.FUSEError(e.errno or errno.EIO) from None
        except Exception:
            log.exception("internal error in %s", fn.__name__)
            raise pyfuse3.FUSEError(errno.EIO) from None

    return wrapper  # type: ignore[return-value]


def entry_attributes(a: Attr) -> pyfuse3.EntryAttributes:
    """The kernel's answer for a name. A name of a *shared* template file with several links
    is never cached (entry timeout 0): when one VEE links, unlinks or writes such a file, its
    other names must show the VEE's own inode at once (vfs/tree/view.py, the ESTALE rule),
    and the invalidations of those names are queued (a handler cannot wait for them: the
    kernel holds the directory's lock until the reply), so a name cached until they land
    would still show the shared inode and its old link count. Revalidating costs one lookup
    per walk through such a name (hard-linked template files are few: 4 in Debian minbase)."""
    e = pyfuse3.EntryAttributes()
    e.st_ino = a.ino
    e.generation = a.generation
    e.entry_timeout = 0 if a.shared and a.nlink > 1 else CACHE_TIMEOUT
    e.attr_timeout = CACHE_TIMEOUT
    e.st_mode = a.mode
    e.st_nlink = a.nlink
    e.st_uid = a.uid
    e.st_gid = a.gid
    e.st_rdev = a.rdev
    e.st_size = a.size
    e.st_blksize = 4096
    e.st_blocks = a.blocks
    e.st_atime_ns = a.atime_ns
    e.st_mtime_ns = a.mtime_ns
    e.st_ctime_ns = a.ctime_ns
    return e


def invalidate_entry(parent: int, name: bytes) -> None:
    """Drop a cached name in the kernel, and the parent's cached listing (queued: never blocks a
    handler). The kernel drops the listing itself only when it still has the name's dentry; a
    listing it keeps would go on showing the name's old inode number (``d_ino``)."""
    try:
        pyfuse3.invalidate_entry_async(parent, name, ignore_enoent=True)
    except Exception:  # the mount may be going away
        log.debug("invalidate_entry(%d, %r) failed", parent, name, exc_info=True)
    invalidate_listing(parent)


def invalidate_listing(ino: int) -> None:
    """Drop the kernel's cached listing (and attributes) of directory ``ino`` (queued)."""
    try:
        pyfuse3.invalidate_inode_async(ino, ignore_enoent=True)
    except Exception:  # the mount may be going away
        log.debug("invalidate_inode(%d) failed", ino, exc_info=True)


def invalidate_attr(inode: int) -> None:
    """Drop the kernel's cached attributes of an inode (queued, attributes only)."""
    try:
        pyfuse3.invalidate_inode_async(inode, attr_only=True, ignore_enoent=True)
    except Exception:  # not mounted yet, or going away
        log.debug("invalidate_inode(%d) failed", inode, exc_info=True)


_NEGATIVE = pyfuse3.EntryAttributes()
_NEGATIVE.st_ino = 0
_NEGATIVE.entry_timeout = CACHE_TIMEOUT


class _OpenDir:
    """A directory the kernel has open: its inode, and the view's listing once it is read."""

    __slots__ = ("ino", "listing")

    def __init__(self, ino: int) -> None:
        self.ino = ino
        self.listing: int | None = None  # a Views.opendir handle


class VeeOperations(pyfuse3.Operations):
    """pyfuse3 handlers over one :class:`Views`."""

    enable_writeback_cache = True
    supports_dot_lookup = False

    def __init__(self, views: Views) -> None:
        check_pyfuse3()
        super().__init__()
        self.views = views
        #: open directories by the handle the kernel holds (see :meth:`opendir`)
        self._dirs: dict[int, _OpenDir] = {}
        self._next_dir_fh = 1
        #: set once the mount is up (serve): checks of the callers confined to a VEE
        self.confinement: Confinement | None = None
        #: EntryAttributes of shared inodes, made once: their attributes never change (pyfuse3
        #: copies the fields into each reply, so one object can answer every lookup/readdir)
        self._shared_attrs: dict[int, pyfuse3.EntryAttributes] = {}

    def _check(self, ctx: Any, *inodes: int) -> None:
        """EACCES for a caller confined to one VEE touching another's inodes (confine.py)."""
        if self.confinement is not None and ctx is not None:
            self.confinement.check(ctx.pid, *inodes)

    def _entry(self, a: Attr) -> pyfuse3.EntryAttributes:
        if not a.shared:
            return entry_attributes(a)
        e = self._shared_attrs.get(a.ino)
        if e is None:
            e = self._shared_attrs[a.ino] = entry_attributes(a)
        return e

    @_errno
    async def lookup(self, parent_inode: int, name: bytes, ctx: Any = None) -> Any:
        try:
            return self._entry(self.views.lookup(parent_inode, name))
        except VfsError as e:
            if e.errno != errno.ENOENT or parent_inode == ROOT_INO:
                raise
            # A missing name is cached by the kernel too (an entry with inode 0): a program
            # start probes ~100 absent paths, update-ca-certificates 18,000. Names of a VEE
            # appear only through this mount, where the kernel drops its negative entry
            # itself; the mount root, whose VEE names appear by `vee add`, is not cached.
            return _NEGATIVE

    async def forget(self, inode_list: Any) -> None:
        # A file the view drops here gets the same inode number at its next lookup (numbers
        # come from identities), so a listing the kernel cached keeps a right d_ino.
        self.views.forget(inode_list)

    @_errno
    async def getattr(self, inode: int, ctx: Any = None) -> Any:
        return self._entry(self.views.getattr(inode))

    @_errno
    async def setattr(self, inode: int, attr: Any, fields: Any, fh: Any, ctx: Any) -> Any:
        self._check(ctx, inode)
        ch = SetAttr(
            mode=attr.st_mode if fields.update_mode else None,
            uid=attr.st_uid if fields.update_uid else None,
            gid=attr.st_gid if fields.update_gid else None,
            size=attr.st_size if fields.update_size else None,
            atime_ns=attr.st_atime_ns if fields.update_atime else None,
            mtime_ns=attr.st_mtime_ns if fields.update_mtime else None,
        )
        return entry_attributes(await self.views.setattr(inode, ch, fh))

    @_errno
    async def readlink(self, inode: int, ctx: Any) -> bytes:
        self._check(ctx, inode)
        return self.views.readlink(inode)

    @_errno
    async def mknod(self, parent_inode: int, name: bytes, mode: int, rdev: int, ctx: Any) -> Any:
        self._check(ctx, parent_inode)
        return entry_attributes(self.views.mknod(parent_inode, name, mode, rdev, ctx.uid, ctx.gid))

    @_errno
    async def mkdir(self, parent_inode: int, name: bytes, mode: int, ctx: Any) -> Any:
        self._check(ctx, parent_inode)
        return entry_attributes(self.views.mkdir(parent_inode, name, mode, ctx.uid, ctx.gid))

    @_errno
    async def unlink(self, parent_inode: int, name: bytes, ctx: Any) -> None:
        self._check(ctx, parent_inode)
        self.views.unlink(parent_inode, name)

    @_errno
    async def rmdir(self, parent_inode: int, name: bytes, ctx: Any) -> None:
        self._check(ctx, parent_inode)
        self.views.rmdir(parent_inode, name)

    @_errno
    async def symlink(self, parent_inode: int, name: bytes, target: bytes, ctx: Any) -> Any:
        self._check(ctx, parent_inode)
        return entry_attributes(self.views.symlink(parent_inode, name, target, ctx.uid, ctx.gid))

    @_errno
    async def rename(
        self, parent_old: int, name_old: bytes, parent_new: int, name_new: bytes, flags: int, ctx
    ) -> None:
        self._check(ctx, parent_old, parent_new)
        await self.views.rename(parent_old, name_old, parent_new, name_new, flags)

    @_errno
    async def link(self, inode: int, new_parent_inode: int, new_name: bytes, ctx: Any) -> Any:
        self._check(ctx, inode, new_parent_inode)
        return entry_attributes(await self.views.link(inode, new_parent_inode, new_name))

    @_errno
    async def open(self, inode: int, flags: int, ctx: Any) -> Any:
        self._check(ctx, inode)
        fh = await self.views.open(inode, flags)
        return pyfuse3.FileInfo(fh=fh, keep_cache=True)

    @_errno
    async def create(self, parent_inode: int, name: bytes, mode: int, flags: int, ctx: Any) -> Any:
        self._check(ctx, parent_inode)
        fh, attr = self.views.create(parent_inode, name, mode, flags, ctx.uid, ctx.gid)
        return pyfuse3.FileInfo(fh=fh, keep_cache=True), entry_attributes(attr)

    @_errno
    async def read(self, fh: int, off: int, size: int) -> bytes:
        return await self.views.read(fh, off, size)

    @_errno
    async def write(self, fh: int, off: int, buf: bytes) -> int:
        return self.views.write(fh, off, buf)

    async def flush(self, fh: int) -> None:
        # Nothing to do on close(2): answering ENOSYS makes the kernel stop sending FLUSH.
        raise pyfuse3.FUSEError(errno.ENOSYS)

    @_errno
    async def release(self, fh: int) -> None:
        self.views.release(fh)

    @_errno
    async def fsync(self, fh: int, datasync: bool) -> None:
        await self.views.fsync(fh, datasync)

    @_errno
    async def fallocate(self, fh: int, mode: int, offset: int, length: int) -> None:
        await self.views.fallocate(fh, mode, offset, length)

    @_errno
    async def opendir(self, inode: int, ctx: Any) -> Any:
        """Directories of a VEE are listed from the kernel's readdir cache, kept across opens.

        The kernel drops a directory's cache itself when the directory changes through the
        mount (create, mknod, mkdir, symlink, link, unlink, rmdir, rename: ``fuse_dir_changed``).
        What changes without it is invalidated here: a name whose inode changes (unsharing, a
        template file becoming a VEE's own: :func:`invalidate_entry`); a VEE whose template is
        swapped (upgrade) gets new directory nodes altogether. (A file node the view drops at
        FORGET comes back with the same number: inode numbers come from identities.) The mount
        root is never cached: ``vfsd vee add/rm`` change it behind the kernel's back.

        The view's listing is made by :meth:`readdir` when the kernel reads from offset 0, so a
        warm open (the kernel lists from its cache) costs only these checks.
        """
        self._check(ctx, inode)
        if not self.views.node(inode).is_dir:  # ESTALE for a directory that is gone
            raise pyfuse3.FUSEError(errno.ENOTDIR)
        fh = self._next_dir_fh
        self._next_dir_fh += 1
        self._dirs[fh] = _OpenDir(inode)
        if inode == ROOT_INO or not DIR_CACHE:
            return fh
        return pyfuse3.FileInfo(fh=fh, keep_cache=True, cache_readdir=True)

    @_errno
    async def readdir(self, fh: int, start_id: int, token: Any) -> None:
        d = self._dirs[fh]
        if start_id == 0 or d.listing is None:
            # The listing is taken when it is read from its start, not at opendir: a kernel
            # reading into an empty cache has noted the directory's version just before, so a
            # change after this point makes it drop what it caches now; and rewinddir(3) shows
            # the directory as it is now (POSIX). A warm listing costs no listing at all.
            if d.listing is not None:
                self.views.releasedir(d.listing)
                d.listing = None
            d.listing = self.views.opendir(d.ino)
        # readdirplus: the view counts a lookup for each entry the kernel's buffer took
        self.views.readdir(
            d.listing,
            start_id,
            lambda name, attr, next_id: pyfuse3.readdir_reply(
                token, name, self._entry(attr), next_id
            ),
        )

    @_errno
    async def releasedir(self, fh: int) -> None:
        d = self._dirs.pop(fh, None)
        if d is not None and d.listing is not None:
            self.views.releasedir(d.listing)

    @_errno
    async def fsyncdir(self, fh: int, datasync: bool) -> None:
        await self.views.fsyncdir(self._dirs[fh].ino)

    @_errno
    async def statfs(self, ctx: Any) -> Any:
        st = self.views.statfs()
        s = pyfuse3.StatvfsData()
        s.f_bsize = st.f_bsize
        s.f_frsize = st.f_frsize
        s.f_blocks = st.f_blocks
        s.f_bfree = st.f_bfree
        s.f_bavail = st.f_bavail
        s.f_files = st.f_files
        s.f_ffree = st.f_ffree
        s.f_favail = st.f_favail
        s.f_namemax = 255
        return s

    @_errno
    async def setxattr(self, inode: int, name: bytes, value: bytes, ctx: Any) -> None:
        self._check(ctx, inode)
        await self.views.setxattr(inode, name, value)

    @_errno
    async def getxattr(self, inode: int, name: bytes, ctx: Any) -> bytes:
        self._check(ctx, inode)
        return self.views.getxattr(inode, name)

    @_errno
    async def listxattr(self, inode: int, ctx: Any) -> list[bytes]:
        self._check(ctx, inode)
        return self.views.listxattr(inode)

    @_errno
    async def removexattr(self, inode: int, name: bytes, ctx: Any) -> None:
        self._check(ctx, inode)
        await self.views.removexattr(inode, name)


def set_read_ahead(mountpoint: str, kb: int = 1024) -> bool:
    """Raise the FUSE mount's read-ahead: bigger read requests, the largest single gain for cold
    sequential reads (docs/perf-notes.md)."""
    # not os.stat(mountpoint): that would wait for this very daemon to answer GETATTR
    devno = mount_devno(mountpoint)
    if devno is None:
        log.warning("%s not found in /proc/self/mountinfo", mountpoint)
        return False
    path = f"/sys/class/bdi/{devno}/read_ahead_kb"
    try:
        with open(path, "w") as f:
            f.write(str(kb))
        return True
    except OSError as e:
        log.warning("could not set %s: %s", path, e)
        return False


def mount_devno(mountpoint: str) -> str | None:
    """'major:minor' of the file system mounted at ``mountpoint`` (last mount wins)."""
    target = mountpoint  # already absolute and resolved: realpath would stat through FUSE
    found = None
    with open("/proc/self/mountinfo") as f:
        for line in f:
            fields = line.split()
            if fields[4].encode().decode("unicode_escape") == target:
                found = fields[2]
    return found
