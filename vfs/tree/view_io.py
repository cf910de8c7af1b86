"""File I/O and attributes of VEE views: handles, open/read/write/fsync/fallocate/release,
setattr and extended attributes. A part of :class:`vfs.tree.view.Views` (mixed into it; the
state it uses is the view's: the inode table, copy-up, the handles, the thread limiters)."""

from __future__ import annotations

import contextlib
import errno
import functools
import logging
import os
import stat
from collections.abc import Iterator

import trio

from vfs.errors import IntegrityError, NotFound, RemoteError, VfsError
from vfs.tree.inodes import request
from vfs.tree.nodes import (
    ROOT_INO,
    Attr,
    FsError,
    Handle,
    Node,
    SetAttr,
    Vee,
    private_open_flags,
)
from vfs.tree.private import (
    PRIVATE_XATTR_PREFIX,
    chown_fd,
    fallocate,
    proc_path,
    reopen,
)

log = logging.getLogger(__name__)


class FileOps:
    """Mixed into :class:`vfs.tree.view.Views`."""

    # -- setattr and xattrs ----------------------------------------------------------------

    @request
    async def setattr(self, ino: int, ch: SetAttr, fh: int | None = None) -> Attr:
        node = self.node(ino)
        if not node.upper and node.ino != ROOT_INO and _changes_nothing(self.getattr(ino), ch):
            # e.g. the writeback cache flushing unchanged times when a template file the VEE
            # unlinked is closed: no reason to copy up (or to ESTALE a shared inode's close)
            return self.getattr(ino)
        vee = await self.copyup.writable(node, with_data=ch.size != 0)
        if node.is_dir:
            self._setattr_dir(vee, node, ch)
        else:
            self._setattr_file(node, ch, self.handles.get(fh) if fh is not None else None)
        return self.getattr(ino)

    def _setattr_file(self, node: Node, ch: SetAttr, h: Handle | None) -> None:
        """Every change through the pinned inode (``node.fd``): works after the last name is
        gone (the writeback cache sends a SETATTR when an unlinked file is closed)."""
        pin = self._pin(node)
        assert pin is not None
        if ch.size is not None:
            if h is not None and h.fd is not None and h.writable:
                os.ftruncate(h.fd, ch.size)
            else:
                fd = reopen(pin, os.O_WRONLY)
                try:
                    os.ftruncate(fd, ch.size)
                finally:
                    os.close(fd)
        if ch.uid is not None or ch.gid is not None:
            chown_fd(pin, -1 if ch.uid is None else ch.uid, -1 if ch.gid is None else ch.gid)
        symlink = node.kind == stat.S_IFLNK
        if ch.mode is not None and not symlink:
            os.chmod(proc_path(pin), stat.S_IMODE(ch.mode))
        if ch.atime_ns is not None or ch.mtime_ns is not None:
            if ch.atime_ns is None or ch.mtime_ns is None:
                st = os.stat(pin)
                times = (
                    st.st_atime_ns if ch.atime_ns is None else ch.atime_ns,
                    st.st_mtime_ns if ch.mtime_ns is None else ch.mtime_ns,
                )
            else:
                times = (ch.atime_ns, ch.mtime_ns)  # both given (utimensat, tar): no fstat
            if not symlink:
                os.utime(proc_path(pin), ns=times)
            elif node.links:  # a symlink's own times: through a name (no fd-level call)
                assert isinstance(node.vee, Vee)
                with node.vee.layer.at(self.path(node)) as (fd, name):
                    os.utime(name, ns=times, dir_fd=fd, follow_symlinks=False)

    def _setattr_dir(self, vee: Vee, node: Node, ch: SetAttr) -> None:
        if ch.size is not None:
            raise FsError(errno.EISDIR)
        path = self.path(node)
        if ch.uid is not None or ch.gid is not None:
            with vee.layer.dirfd(path) as fd:
                chown_fd(fd, -1 if ch.uid is None else ch.uid, -1 if ch.gid is None else ch.gid)
        if ch.mode is not None:
            with vee.layer.dirfd(path) as fd:
                os.chmod(proc_path(fd), stat.S_IMODE(ch.mode))
        if ch.atime_ns is not None or ch.mtime_ns is not None:
            with vee.layer.dirfd(path) as fd:
                if ch.atime_ns is None or ch.mtime_ns is None:
                    st = os.stat(fd)
                    times = (
                        st.st_atime_ns if ch.atime_ns is None else ch.atime_ns,
                        st.st_mtime_ns if ch.mtime_ns is None else ch.mtime_ns,
                    )
                else:
                    times = (ch.atime_ns, ch.mtime_ns)
                os.utime(proc_path(fd), ns=times)

    def _xattr_target(self, node: Node) -> tuple[bytes | str, bool]:
        """(path, follow_symlinks) for the xattr calls naming exactly this private entry: the
        pinned inode's magic link (followed), or a directory's walked path (not followed)."""
        pin = self._pin(node)
        if pin is not None:
            return proc_path(pin), True
        vee = self._vee(node)
        return vee.layer.xattr_path(self.path(node)), False

    def listxattr(self, ino: int) -> list[bytes]:
        node = self.node(ino)
        if node.ino == ROOT_INO:
            return []
        if node.upper:
            if node.kind == stat.S_IFLNK:
                return []
            target, follow = self._xattr_target(node)
            names = [os.fsencode(n) for n in os.listxattr(target, follow_symlinks=follow)]
        else:
            assert node.lower is not None
            names = list(node.lower.xattrs)
        return [n for n in names if not n.startswith(PRIVATE_XATTR_PREFIX)]

    def getxattr(self, ino: int, name: bytes) -> bytes:
        node = self.node(ino)
        if name.startswith(PRIVATE_XATTR_PREFIX) or node.ino == ROOT_INO:
            raise FsError(errno.ENODATA)
        if node.upper:
            if node.kind == stat.S_IFLNK:
                raise FsError(errno.ENODATA)
            target, follow = self._xattr_target(node)
            return os.getxattr(target, name, follow_symlinks=follow)
        assert node.lower is not None
        try:
            return node.lower.xattrs[name]
        except KeyError:
            raise FsError(errno.ENODATA) from None

    @request
    async def setxattr(self, ino: int, name: bytes, value: bytes) -> None:
        if name.startswith(PRIVATE_XATTR_PREFIX):
            raise FsError(errno.EPERM, "this xattr namespace is reserved")
        node = self.node(ino)
        await self.copyup.writable(node)
        if node.kind == stat.S_IFLNK:
            raise FsError(errno.EPERM)
        target, follow = self._xattr_target(node)
        os.setxattr(target, name, value, follow_symlinks=follow)

    @request
    async def removexattr(self, ino: int, name: bytes) -> None:
        if name.startswith(PRIVATE_XATTR_PREFIX):
            raise FsError(errno.ENODATA)
        node = self.node(ino)
        if not node.upper and node.lower is not None and name not in node.lower.xattrs:
            raise FsError(errno.ENODATA)
        await self.copyup.writable(node)
        target, follow = self._xattr_target(node)
        os.removexattr(target, name, follow_symlinks=follow)

    # -- files -----------------------------------------------------------------------------

    def _new_handle(self, node: Node, fd: int | None, writable: bool) -> int:
        fh = self._next_fh
        self._next_fh += 1
        self.handles[fh] = Handle(node, fd, writable)
        node.opens += 1
        return fh

    @request
    async def open(self, ino: int, flags: int) -> int:
        node = self.node(ino)
        if node.is_dir:
            raise FsError(errno.EISDIR)
        writing = (flags & os.O_ACCMODE) != os.O_RDONLY or bool(flags & os.O_TRUNC)
        if not writing:
            pin = self._pin(node)
            fd = reopen(pin, os.O_RDONLY) if pin is not None else None
            return self._new_handle(node, fd, False)
        await self.copyup.writable(node, with_data=not flags & os.O_TRUNC)
        pin = self._pin(node)
        assert pin is not None
        return self._new_handle(node, reopen(pin, private_open_flags(flags)), True)

    async def read(self, fh: int, off: int, size: int) -> bytes:
        h = self.handles[fh]
        node = h.node
        if node.upper:
            if h.fd is None:  # opened on the template file, copied up since
                pin = self._pin(node)
                assert pin is not None
                h.fd = reopen(pin, os.O_RDONLY)
            return os.pread(h.fd, size, off)
        e = node.lower
        assert e is not None
        if off >= e.size or not e.oid:
            return b""
        size = min(size, e.size - off)
        # The kernel caches these bytes in the mount's own inode: the store file's pages are
        # dropped (drop_cache), or two copies would halve the density shared inodes exist for.
        # First redirection inline (a local read is cheaper than a thread hop); the second
        # (a fetch) in a thread, so other VEEs keep being served.
        with self.content_errors(node):
            # expected_size: the manifest's size; an object of another length (a lying
            # manifest, or a lying server) is refused before a byte of it is served
            data = self.content.read_local(e.oid, off, size, drop_cache=True, expected_size=e.size)
            if data is None:
                data = await trio.to_thread.run_sync(
                    functools.partial(
                        self.content.read, e.oid, off, size, drop_cache=True, expected_size=e.size
                    ),
                    limiter=self.fetch_threads,
                )
        return data

    @contextlib.contextmanager
    def content_errors(self, node: Node) -> Iterator[None]:
        """A template file whose object is missing, damaged or unreachable reads as EIO (never
        ENOENT: the name exists), with one log line naming the object and the file."""
        try:
            yield
        except (NotFound, IntegrityError, RemoteError) as exc:
            e = node.lower
            where = self._describe(node)
            oid = e.oid if e is not None and e.oid else "?"
            msg = str(exc) if oid in str(exc) else f"object {oid}: {exc}"
            log.error("template file %s: %s", where, msg)
            raise FsError(errno.EIO, f"content of {where} unavailable") from None

    def _describe(self, node: Node) -> str:
        """A path of a template file for log lines (VEE path, else its template path)."""
        try:
            if isinstance(node.vee, Vee) and node.links:
                return f"{node.vee.name}:/" + os.fsdecode(b"/".join(self.path(node)))
            tmpl = node.template or (node.vee.template if isinstance(node.vee, Vee) else None)
            if tmpl is not None and node.lower is not None:
                path = self.inodes.paths(tmpl)[node.lower.ino][0]
                return f"template {tmpl.digest[:12]}:/" + os.fsdecode(path)
        except (VfsError, KeyError, IndexError):
            pass
        return f"inode {node.ino}"

    def write(self, fh: int, off: int, data: bytes) -> int:
        h = self.handles[fh]
        if h.fd is None or not h.writable:
            raise FsError(errno.EBADF)
        return os.pwrite(h.fd, data, off)

    async def fsync(self, fh: int, datasync: bool) -> None:
        h = self.handles[fh]
        if h.fd is not None and h.writable:
            sync = os.fdatasync if datasync else os.fsync
            await trio.to_thread.run_sync(sync, h.fd, limiter=self.disk_threads)

    async def fallocate(self, fh: int, mode: int, offset: int, length: int) -> None:
        """fallocate(2) with ``mode`` on the private file of a writable handle.

        The host file system answers every mode for itself (EOPNOTSUPP where it has none, so
        glibc's posix_fallocate falls back to writing as it would there); the kernel forwards
        only 0, KEEP_SIZE, PUNCH_HOLE|KEEP_SIZE and ZERO_RANGE, and keeps i_size itself
        (writeback cache). Allocation can wait on the journal: it runs in a worker thread.
        """
        h = self.handles[fh]
        if h.fd is None or not h.writable:
            raise FsError(errno.EBADF)
        await trio.to_thread.run_sync(
            fallocate, h.fd, mode, offset, length, limiter=self.disk_threads
        )

    def release(self, fh: int) -> None:
        h = self.handles.pop(fh, None)
        if h is None:
            return
        if h.fd is not None:
            os.close(h.fd)
        h.node.opens -= 1
        self.inodes.unref(h.node)


def _changes_nothing(a: Attr, ch: SetAttr) -> bool:
    """Whether a setattr request leaves every attribute as it is (``a`` = current)."""
    return (
        (ch.mode is None or stat.S_IMODE(ch.mode) == stat.S_IMODE(a.mode))
        and (ch.uid is None or ch.uid == a.uid)
        and (ch.gid is None or ch.gid == a.gid)
        and (ch.size is None or ch.size == a.size)
        and (ch.atime_ns is None or ch.atime_ns == a.atime_ns)
        and (ch.mtime_ns is None or ch.mtime_ns == a.mtime_ns)
    )
