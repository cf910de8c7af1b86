"""The disk as a raw file on FUSE: the export mounted onto a regular file (as
``qemu-storage-daemon --export fuse`` does), for tools that want a file: dd, mkfs, losetup,
``mount -o loop``, QEMU's ``file`` driver (``cache=none`` / O_DIRECT works), fio.

A thin adapter: every handler is a call of :class:`~vfs.export.backend.ExportBackend` (the
same one the NBD server of the process uses). The file is opened ``direct_io``: the kernel
keeps no page cache of it, so reads always see what NBD clients of the same export wrote and
``fsync`` (the commit) covers everything a ``write`` returned for. ``SEEK_DATA``/``SEEK_HOLE``
answer from the image's block status (the ``lseek`` op of the patched pyfuse3,
``tools/pyfuse3/patches/0004-lseek.patch``); ``fallocate`` PUNCH_HOLE is a discard and
ZERO_RANGE a zeroing.

pyfuse3 allows one mount per process: this runs in the export's own process (``vfsd export``),
never in ``vfsd serve``, whose mount is the VEE tree.
"""

from __future__ import annotations

import errno
import logging
import os
import stat
import subprocess
import time
from typing import Any

import pyfuse3
import trio

from vfs.errors import BusyError, UsageError, VfsError
from vfs.export.backend import ExportBackend, NeedFetch, errno_of

log = logging.getLogger(__name__)

ROOT = pyfuse3.ROOT_INODE
FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02
FALLOC_FL_ZERO_RANGE = 0x10
ATTR_TIMEOUT = 3600.0
MOUNT_OPTIONS = {"fsname=vfsd-export", "subtype=vimg", "default_permissions", "allow_other"}


class RawFileOperations(pyfuse3.Operations):
    """The FUSE file system of one export: its root inode is the disk."""

    enable_writeback_cache = False

    def __init__(self, backend: ExportBackend) -> None:
        super().__init__()
        self.b = backend
        now = time.time_ns()
        self.times = (now, now, now)
        self.uid, self.gid = os.getuid(), os.getgid()
        self.open_count = 0

    # ------------------------------------------------------------------ helpers
    async def _call(self, fn: Any, offset: int, length: int) -> Any:
        b = self.b
        try:
            if b.gate_open:
                try:
                    return fn()
                except NeedFetch:
                    pass
            return await b.retry(fn, offset, length)
        except VfsError as e:
            log.info("FUSE %d+%d: %s", offset, length, e)
            raise pyfuse3.FUSEError(e.errno) from None
        except OSError as e:
            raise pyfuse3.FUSEError(e.errno or errno.EIO) from None

    def _attr(self) -> pyfuse3.EntryAttributes:
        a = pyfuse3.EntryAttributes()
        a.st_ino = ROOT
        a.st_mode = stat.S_IFREG | (0o400 if self.b.readonly else 0o600)
        a.st_nlink = 1
        a.st_uid, a.st_gid = self.uid, self.gid
        a.st_size = self.b.size
        a.st_blksize = 4096
        try:  # what the disk really takes on the host: the image file's blocks
            a.st_blocks = os.stat(self.b.image.path).st_blocks
        except OSError:
            a.st_blocks = 0
        a.st_atime_ns, a.st_mtime_ns, a.st_ctime_ns = self.times
        a.attr_timeout = ATTR_TIMEOUT
        a.entry_timeout = ATTR_TIMEOUT
        return a

    def _check(self, inode: int) -> None:
        if inode != ROOT:
            raise pyfuse3.FUSEError(errno.ENOENT)

    # ------------------------------------------------------------------ metadata
    async def getattr(self, inode: int, ctx: Any = None) -> pyfuse3.EntryAttributes:
        self._check(inode)
        return self._attr()

    async def lookup(self, parent_inode: int, name: bytes, ctx: Any = None) -> Any:
        raise pyfuse3.FUSEError(errno.ENOTDIR)

    async def setattr(self, inode: int, attr: Any, fields: Any, fh: Any, ctx: Any) -> Any:
        self._check(inode)
        if fields.update_size and attr.st_size != self.b.size:
            raise pyfuse3.FUSEError(errno.EPERM)  # a disk's size changes with vimg resize
        if fields.update_mtime:
            self.times = (self.times[0], attr.st_mtime_ns, time.time_ns())
        return self._attr()

    async def statfs(self, ctx: Any) -> pyfuse3.StatvfsData:
        s = pyfuse3.StatvfsData()
        s.f_bsize = s.f_frsize = 4096
        s.f_blocks = self.b.size // 4096
        s.f_bfree = s.f_bavail = 0
        s.f_files, s.f_ffree, s.f_favail = 1, 0, 0
        s.f_namemax = 255
        return s

    # ------------------------------------------------------------------ data
    async def open(self, inode: int, flags: int, ctx: Any) -> pyfuse3.FileInfo:
        self._check(inode)
        if self.b.readonly and flags & (os.O_WRONLY | os.O_RDWR):
            raise pyfuse3.FUSEError(errno.EROFS)
        if flags & os.O_TRUNC and not self.b.readonly:
            raise pyfuse3.FUSEError(errno.EPERM)
        self.open_count += 1
        return pyfuse3.FileInfo(fh=ROOT, direct_io=True, keep_cache=False)

    async def release(self, fh: int) -> None:
        self.open_count -= 1

    async def flush(self, fh: int) -> None:
        raise pyfuse3.FUSEError(errno.ENOSYS)  # close() is not a durability point: fsync is

    async def read(self, fh: int, off: int, size: int) -> Any:
        n = min(size, self.b.size - off)
        if n <= 0:
            return b""
        return await self._call(lambda: self.b.read(off, n), off, n)

    async def write(self, fh: int, off: int, buf: bytes) -> int:
        if self.b.readonly:
            raise pyfuse3.FUSEError(errno.EROFS)
        n = min(len(buf), self.b.size - off)
        if n <= 0:
            raise pyfuse3.FUSEError(errno.ENOSPC)  # a disk does not grow by writing past it
        data = buf if n == len(buf) else memoryview(buf)[:n]
        await self._call(lambda: self.b.write(off, data), off, n)
        return n

    async def fsync(self, fh: int, datasync: bool) -> None:
        try:
            await self.b.flush()
        except (VfsError, OSError) as e:
            log.error("fsync of %s failed: %s", self.b.image.path, e)
            raise pyfuse3.FUSEError(errno_of(e) if isinstance(e, VfsError) else errno.EIO) from None

    async def fallocate(self, fh: int, mode: int, offset: int, length: int) -> None:
        b = self.b
        if b.readonly:
            raise pyfuse3.FUSEError(errno.EROFS)
        if offset < 0 or length <= 0:
            raise pyfuse3.FUSEError(errno.EINVAL)
        end = min(offset + length, b.size)
        if mode & FALLOC_FL_PUNCH_HOLE:
            if offset < end:
                await self._call(lambda: b.discard(offset, end - offset), offset, end - offset)
            return
        if mode & FALLOC_FL_ZERO_RANGE:
            if offset + length > b.size and not mode & FALLOC_FL_KEEP_SIZE:
                raise pyfuse3.FUSEError(errno.EOPNOTSUPP)
            if offset < end:
                await self._call(lambda: b.write_zeroes(offset, end - offset), offset, end - offset)
            return
        # plain allocation: a thin image allocates on write; refuse only growing the disk
        if offset + length > b.size and not mode & FALLOC_FL_KEEP_SIZE:
            raise pyfuse3.FUSEError(errno.EOPNOTSUPP)

    async def lseek(self, fh: int, offset: int, whence: int) -> int:
        b = self.b
        if offset < 0:
            raise pyfuse3.FUSEError(errno.EINVAL)
        if offset >= b.size:
            raise pyfuse3.FUSEError(errno.ENXIO)
        if whence not in (os.SEEK_DATA, os.SEEK_HOLE):
            raise pyfuse3.FUSEError(errno.EINVAL)
        await b.wait_open()
        for e in b.chain_extents(offset, b.size):
            if (whence == os.SEEK_DATA) == e.data:
                return max(e.offset, offset)
        if whence == os.SEEK_DATA:
            raise pyfuse3.FUSEError(errno.ENXIO)
        return b.size


def check_lseek() -> None:
    if getattr(pyfuse3.Operations, "lseek", None) is None:
        raise VfsError(
            f"pyfuse3 {pyfuse3.__version__} has no Operations.lseek (not the vfs-patched build): "
            "run `make setup` (tools/pyfuse3/build.py)"
        )


def prepare_mountpoint(path: str) -> None:
    """The FUSE export mounts onto a regular file: create it if missing, detach the dead
    mount a killed export left on it."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        os.close(fd)
        return
    except OSError as e:
        if e.errno != errno.ENOTCONN:
            raise
        log.warning("%s: dead FUSE mount of a previous export: detaching it", path)
        subprocess.run(["umount", "-l", path], check=False)
        st = os.stat(path)
    if not stat.S_ISREG(st.st_mode):
        raise UsageError(f"--fuse {path}: must be a regular file (the disk is mounted onto it)")
    if _is_mounted(path):
        raise BusyError(f"{path} is already a mount point")


def _is_mounted(path: str) -> bool:
    real = os.path.realpath(path)
    with open("/proc/self/mountinfo") as f:
        for line in f:
            parts = line.split()
            if len(parts) > 4 and parts[4].encode().decode("unicode_escape") == real:
                return True
    return False


async def serve_fuse(
    backend: ExportBackend,
    mountpoint: str,
    scope: trio.CancelScope,
    *,
    task_status: Any = trio.TASK_STATUS_IGNORED,
) -> None:
    """Mount the disk onto ``mountpoint`` and answer the kernel until cancelled."""
    check_lseek()
    prepare_mountpoint(mountpoint)
    ops = RawFileOperations(backend)
    pyfuse3.init(ops, mountpoint, set(MOUNT_OPTIONS))
    try:
        async with trio.open_nursery() as n:
            n.start_soon(_main, scope)
            # a stat from a worker thread returns once this loop answered INIT and GETATTR
            await trio.to_thread.run_sync(os.stat, mountpoint)
            task_status.started()
    finally:
        pyfuse3.close(unmount=True)


async def _main(scope: trio.CancelScope) -> None:
    await pyfuse3.main(max_tasks=256)
    scope.cancel()  # the mount went away (fusermount -u): the export ends with it
