"""The kernel engine's second data-only layer: a read-only FUSE file system of objects.

Every kernel-engine overlay mount has two data-only lower layers, searched in order for a
metacopy stub's redirect ``/<ab>/<id>`` (``docs/kernel-engine.md``): first the store's
``objects/`` directory (first redirection, in the kernel), then this mount (second
redirection): an object that is not local yet is fetched from the remote when it is opened,
verified against its id and its size, stored, and served from the store. Once an object is
local, overlay inodes made after that find it in the first layer and never come here.

The layer answers only for objects of the templates the daemon mounts (:meth:`register`):
their sizes come from the manifests, so a lookup costs no fetch, and a size a manifest lies
about is refused at the fetch (:class:`vfs.errors.SizeMismatch`), never served. Two templates
that disagree about an object's size are refused when the second one is registered.

Everything is immutable, so the kernel may cache all of it: hour-long entry and attribute
timeouts, ``keep_cache`` on every open, read-ahead raised. The mount is only root's (no
``allow_other``): overlayfs reaches it with the credentials of the daemon that mounted the
overlays; no other user can read objects through it.
"""

from __future__ import annotations

import errno
import logging
import os
import stat
from typing import Any

import pyfuse3
import trio

from vfs.errors import IntegrityError, SizeMismatch, VfsError
from vfs.redirect.objectid import check_object_id

log = logging.getLogger(__name__)

ROOT = pyfuse3.ROOT_INODE
CACHE_TIMEOUT = 3600.0
#: inode numbers: 2..257 the 256 shard directories, files from here up (small numbers: an
#: overlay with xino never has to fall back for them)
FIRST_FILE_INO = 1024
FETCH_THREADS = 16
MOUNT_OPTIONS = {"fsname=vfsd-data", "subtype=vfsd", "ro", "nodev", "nosuid", "default_permissions"}
_SHARDS = [f"{i:02x}".encode() for i in range(256)]


class DataLayerOperations(pyfuse3.Operations):
    """pyfuse3 handlers serving ``/<ab>/<id>`` for the objects of the registered templates."""

    supports_dot_lookup = False

    def __init__(self, resolver: Any) -> None:
        super().__init__()
        self.resolver = resolver
        #: object id -> size, from the manifests of the templates the daemon mounts
        self.sizes: dict[str, int] = {}
        self._ino_of: dict[str, int] = {}
        self._by_ino: dict[int, str] = {}
        self._lookups: dict[int, int] = {}
        self._next_ino = FIRST_FILE_INO
        self._handles: dict[int, str] = {}
        self._next_fh = 1
        self.fetch_threads = trio.CapacityLimiter(FETCH_THREADS)
        self.fetched = 0  #: objects fetched through this layer (tests, stats)

    # -- what it serves ----------------------------------------------------------------------

    def register(self, objects: dict[str, int], what: str) -> None:
        """Serve ``objects`` (id -> size) from now on; refuse the lot if one of them is known
        with another size (one of the two manifests lies)."""
        for oid, size in objects.items():
            known = self.sizes.get(oid)
            if known is not None and known != size:
                raise SizeMismatch(
                    f"object {oid}: {what} says {size} bytes, another template says {known}; "
                    "refusing the template",
                    oid=oid,
                    actual=known,
                    expected=size,
                )
        self.sizes.update(objects)

    # -- attributes ----------------------------------------------------------------------------

    def _dir_attr(self, ino: int) -> pyfuse3.EntryAttributes:
        e = pyfuse3.EntryAttributes()
        e.st_ino = ino
        e.st_mode = stat.S_IFDIR | 0o555
        e.st_nlink = 2 if ino != ROOT else 258
        e.st_size = 0
        e.entry_timeout = CACHE_TIMEOUT
        e.attr_timeout = CACHE_TIMEOUT
        return e

    def _file_attr(self, ino: int, oid: str) -> pyfuse3.EntryAttributes:
        e = pyfuse3.EntryAttributes()
        e.st_ino = ino
        e.st_mode = stat.S_IFREG | 0o444
        e.st_nlink = 1
        e.st_size = self.sizes[oid]
        e.st_blksize = 4096
        e.st_blocks = (e.st_size + 511) // 512
        e.entry_timeout = CACHE_TIMEOUT
        e.attr_timeout = CACHE_TIMEOUT
        return e

    def _file_ino(self, oid: str) -> int:
        ino = self._ino_of.get(oid)
        if ino is None:
            ino = self._ino_of[oid] = self._next_ino
            self._by_ino[ino] = oid
            self._next_ino += 1
        return ino

    # -- handlers ------------------------------------------------------------------------------

    async def lookup(self, parent_inode: int, name: bytes, ctx: Any = None) -> Any:
        if parent_inode == ROOT:
            if len(name) == 2 and name in _SHARDS:
                return self._dir_attr(2 + int(name, 16))
            raise pyfuse3.FUSEError(errno.ENOENT)
        if not 2 <= parent_inode < 2 + 256:
            raise pyfuse3.FUSEError(errno.ENOENT)
        try:
            oid = check_object_id(name.decode("ascii"))
        except (UnicodeDecodeError, VfsError):
            raise pyfuse3.FUSEError(errno.ENOENT) from None
        if int(oid[:2], 16) != parent_inode - 2 or oid not in self.sizes:
            raise pyfuse3.FUSEError(errno.ENOENT)
        ino = self._file_ino(oid)
        self._lookups[ino] = self._lookups.get(ino, 0) + 1
        return self._file_attr(ino, oid)

    async def forget(self, inode_list: Any) -> None:
        for ino, n in inode_list:
            left = self._lookups.get(ino, 0) - n
            if left > 0:
                self._lookups[ino] = left
                continue
            self._lookups.pop(ino, None)
            if ino not in self._handles.values():
                oid = self._by_ino.pop(ino, None)
                if oid is not None:
                    self._ino_of.pop(oid, None)

    async def getattr(self, inode: int, ctx: Any = None) -> Any:
        if inode == ROOT or 2 <= inode < 2 + 256:
            return self._dir_attr(inode)
        oid = self._by_ino.get(inode)
        if oid is None:
            raise pyfuse3.FUSEError(errno.ENOENT)
        return self._file_attr(inode, oid)

    async def open(self, inode: int, flags: int, ctx: Any) -> Any:
        oid = self._by_ino.get(inode)
        if oid is None:
            raise pyfuse3.FUSEError(errno.ENOENT)
        if flags & os.O_ACCMODE != os.O_RDONLY or flags & os.O_TRUNC:
            raise pyfuse3.FUSEError(errno.EROFS)
        size = self.sizes[oid]
        if not self.resolver.has_local(oid):
            try:
                await trio.to_thread.run_sync(
                    lambda: self.resolver.ensure(oid, expected_size=size),
                    limiter=self.fetch_threads,
                )
                self.fetched += 1
            except VfsError as e:
                log.error("data layer: object %s (%d bytes) unavailable: %s", oid, size, e)
                raise pyfuse3.FUSEError(errno.EIO) from None
        fh = self._next_fh
        self._next_fh += 1
        self._handles[fh] = oid
        return pyfuse3.FileInfo(fh=fh, keep_cache=True)

    async def read(self, fh: int, off: int, size: int) -> bytes:
        oid = self._handles[fh]
        expected = self.sizes[oid]
        try:
            # First redirection inline (a local read from the page cache is cheaper than a
            # thread hop); the object was made local at open.
            data = self.resolver.read_local(oid, off, size, drop_cache=True, expected_size=expected)
            if data is None:
                data = await trio.to_thread.run_sync(
                    lambda: self.resolver.read(
                        oid, off, size, drop_cache=True, expected_size=expected
                    ),
                    limiter=self.fetch_threads,
                )
            return data
        except IntegrityError as e:
            log.error("data layer: object %s failed verification: %s", oid, e)
            raise pyfuse3.FUSEError(errno.EIO) from None
        except VfsError as e:
            log.error("data layer: object %s unreadable: %s", oid, e)
            raise pyfuse3.FUSEError(errno.EIO) from None

    async def release(self, fh: int) -> None:
        self._handles.pop(fh, None)

    async def flush(self, fh: int) -> None:
        raise pyfuse3.FUSEError(errno.ENOSYS)

    async def opendir(self, inode: int, ctx: Any) -> Any:
        if inode == ROOT or 2 <= inode < 2 + 256:
            return inode
        raise pyfuse3.FUSEError(errno.ENOTDIR)

    async def readdir(self, fh: int, start_id: int, token: Any) -> None:
        """The root lists the 256 shards; a shard lists the known objects in it (for an
        operator's ``ls``: overlayfs itself only looks names up)."""
        if fh == ROOT:
            for i in range(start_id, 256):
                if not pyfuse3.readdir_reply(token, _SHARDS[i], self._dir_attr(2 + i), i + 1):
                    return
            return
        prefix = _SHARDS[fh - 2].decode()
        names = sorted(o for o in self.sizes if o.startswith(prefix))
        for i in range(start_id, len(names)):
            oid = names[i]
            ino = self._file_ino(oid)
            if not pyfuse3.readdir_reply(token, oid.encode(), self._file_attr(ino, oid), i + 1):
                return
            self._lookups[ino] = self._lookups.get(ino, 0) + 1

    async def releasedir(self, fh: int) -> None:
        return None

    async def statfs(self, ctx: Any) -> Any:
        s = pyfuse3.StatvfsData()
        s.f_bsize = 4096
        s.f_frsize = 4096
        s.f_namemax = 255
        return s
