"""Namespace operations of VEE views: creating names (mkdir, mknod, symlink, create, link),
removing them (unlink, rmdir) and rename. A part of :class:`vfs.tree.view.Views` (mixed into
it): each change goes to the private layer first (copy-up of the parents, whiteouts, opaque
directories; docs/vee-layer.md), then the node table follows what the private layer now says."""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import stat
import time

from vfs.durable import fsync_dir
from vfs.tree.inodes import request
from vfs.tree.nodes import (
    _DEAD,
    ROOT_INO,
    Attr,
    FsError,
    Node,
    Vee,
    private_open_flags,
    stat_attr,
)
from vfs.tree.private import (
    OPAQUE_XATTR,
    REDIRECT_XATTR,
    RENAME_NOREPLACE,
    RENAME_WHITEOUT,
    FileMeta,
    check_name,
    is_whiteout,
    renameat2,
)

log = logging.getLogger(__name__)


class NamespaceOps:
    """Mixed into :class:`vfs.tree.view.Views`."""

    # -- creating names --------------------------------------------------------------------

    def _prepare_new(self, parent_ino: int, name: bytes) -> tuple[Vee, Node, tuple[bytes, ...]]:
        parent = self.node(parent_ino)
        if parent.ino == ROOT_INO:
            raise FsError(errno.EPERM, "VEE roots are made with `vfsd vee add`")
        if not parent.is_dir:
            raise FsError(errno.ENOTDIR)
        vee = self._vee(parent)
        if len(name) > 255:
            raise FsError(errno.ENAMETOOLONG)
        check_name(name)
        if self.child(parent, name) is not None:
            raise FsError(errno.EEXIST)
        self.copyup.ensure_dir(parent)
        return vee, parent, self.path(parent) + (name,)

    def _owner(self, parent: Node, uid: int, gid: int, mode: int) -> tuple[int, int]:
        """(gid, mode) for a new entry: setgid directories pass on their group (and the bit)."""
        pattr = self.getattr(parent.ino)
        if pattr.mode & stat.S_ISGID:
            if stat.S_ISDIR(mode):
                mode |= stat.S_ISGID
            return pattr.gid, mode
        return gid, mode

    def _finish_new(self, parent: Node, name: bytes) -> Attr:
        node = self.child(parent, name)
        if node is None:
            raise FsError(errno.EIO, "new entry vanished")
        attr = self.getattr(node.ino)
        node.nlookup += 1
        return attr

    @request
    def mkdir(self, parent_ino: int, name: bytes, mode: int, uid: int, gid: int) -> Attr:
        vee, parent, path = self._prepare_new(parent_ino, name)
        gid, mode = self._owner(parent, uid, gid, stat.S_IFDIR | mode)
        lower = self._natural_lower(parent, name)
        vee.layer.make_dir(path, mode, uid, gid, opaque=lower is not None, replace_marker=True)
        vee.layer.touch_new(path)
        old = vee.dirs.pop((parent.ino, name), None)
        if old is not None:
            old.parent = None
        parent.nsub = None
        return self._finish_new(parent, name)

    @request
    def mknod(self, parent_ino: int, name: bytes, mode: int, rdev: int, uid: int, gid: int) -> Attr:
        if stat.S_ISCHR(mode) and rdev == 0:
            # a 0/0 character device is the whiteout format of the private layer: refused
            # before anything is made (overlayfs answers EPERM too)
            raise FsError(errno.EPERM, "a 0/0 character device cannot be created in a VEE")
        vee, parent, path = self._prepare_new(parent_ino, name)
        gid, mode = self._owner(parent, uid, gid, mode)
        now = _now_ns()
        if stat.S_ISREG(mode) or stat.S_IFMT(mode) == 0:
            fd = vee.layer.create(path, os.O_WRONLY, mode, uid, gid, replace=True)
            os.close(fd)
        else:
            vee.layer.make_special(path, FileMeta(mode, uid, gid, now, now, rdev=rdev))
            vee.layer.touch_new(path)
        return self._finish_new(parent, name)

    @request
    def symlink(self, parent_ino: int, name: bytes, target: bytes, uid: int, gid: int) -> Attr:
        vee, parent, path = self._prepare_new(parent_ino, name)
        gid, _ = self._owner(parent, uid, gid, stat.S_IFLNK)
        now = _now_ns()
        vee.layer.make_special(
            path, FileMeta(stat.S_IFLNK | 0o777, uid, gid, now, now), target=target
        )
        vee.layer.touch_new(path)
        return self._finish_new(parent, name)

    @request
    def create(
        self, parent_ino: int, name: bytes, mode: int, flags: int, uid: int, gid: int
    ) -> tuple[int, Attr]:
        vee, parent, path = self._prepare_new(parent_ino, name)
        gid, mode = self._owner(parent, uid, gid, mode)
        # a whiteout can only be where the template has the name (invariant 2)
        replace = self._natural_lower(parent, name) is not None
        fd = vee.layer.create(path, private_open_flags(flags), mode, uid, gid, replace=replace)
        try:
            st = os.fstat(fd)  # the new file's identity and attributes, without another walk
            node = self._upper_file_node(vee, parent, name, st)
        except BaseException:
            os.close(fd)
            raise
        node.nlookup += 1
        return self._new_handle(node, fd, True), stat_attr(node, st)

    @request
    async def link(self, ino: int, new_parent_ino: int, new_name: bytes) -> Attr:
        node = self.node(ino)
        if node.is_dir:
            raise FsError(errno.EPERM)
        vee, parent, path = self._prepare_new(new_parent_ino, new_name)
        if node.vee is not vee and not node.shared:
            raise FsError(errno.EXDEV)
        if node.shared:
            raise self.copyup.own(vee, node)  # the VFS retries the link after a fresh lookup
        await self.copyup.writable(node)
        with vee.layer.at(self.path(node)) as (sfd, sname), vee.layer.at(path) as (dfd, dname):
            st = None
            with contextlib.suppress(FileNotFoundError):
                st = os.stat(dname, dir_fd=dfd, follow_symlinks=False)
            if st is not None and is_whiteout(st):
                with vee.layer.workfd() as wfd:
                    tmp = b"link-" + os.urandom(8).hex().encode()
                    os.link(sname, tmp, src_dir_fd=sfd, dst_dir_fd=wfd, follow_symlinks=False)
                    os.rename(tmp, dname, src_dir_fd=wfd, dst_dir_fd=dfd)
            else:
                os.link(sname, dname, src_dir_fd=sfd, dst_dir_fd=dfd, follow_symlinks=False)
        node.links.add((parent, new_name))
        attr = self.getattr(node.ino)
        node.nlookup += 1
        return attr

    # -- removing names --------------------------------------------------------------------

    def _existing(self, parent_ino: int, name: bytes) -> tuple[Vee, Node, Node]:
        parent = self.node(parent_ino)
        if parent.ino == ROOT_INO:
            raise FsError(errno.EPERM, "VEE roots are removed with `vfsd vee rm`")
        vee = self._vee(parent)
        node = self.child(parent, name)
        if node is None:
            raise FsError(errno.ENOENT)
        return vee, parent, node

    def _drop_name(self, vee: Vee, parent: Node, name: bytes) -> None:
        """Make ``name`` absent in the private layer: whiteout if the template has it."""
        path = self.path(parent) + (name,)
        if self._natural_lower(parent, name) is not None:
            self.copyup.ensure_dir(parent)
            vee.layer.whiteout(path)
        elif parent.upper:
            vee.layer.remove(path)

    def _name_gone(self, node: Node, parent: Node, name: bytes) -> None:
        """Bookkeeping after ``parent/name`` stopped showing the non-directory ``node``."""
        node.links.discard((parent, name))
        node.seen.discard((parent, name))
        if node.shared and node.lower is not None and node.lower.nlink > 1:
            # its other names in this VEE now show a per-VEE inode with one link fewer
            assert isinstance(parent.vee, Vee)
            self.copyup.own(parent.vee, node)

    @request
    def unlink(self, parent_ino: int, name: bytes) -> None:
        vee, parent, node = self._existing(parent_ino, name)
        if node.is_dir:
            raise FsError(errno.EISDIR)
        self._pin(node)  # a file that may lose its last name holds its pin from now on
        self._drop_name(vee, parent, name)
        self._name_gone(node, parent, name)

    def _names(self, node: Node, *, noatime: bool = True) -> list[bytes]:
        """The names a VEE directory shows (sorted), without making nodes for them."""
        vee = self._vee(node)
        names: dict[bytes, bool] = {}
        if node.upper:
            for n, st in vee.layer.listdir(self.path(node), noatime=noatime):
                names[n] = not is_whiteout(st)
        if node.lower is not None:
            for n, _ in vee.template.readdir(node.lower.ino):
                names.setdefault(n, True)
        return sorted(n for n, shown in names.items() if shown)

    @request
    def rmdir(self, parent_ino: int, name: bytes) -> None:
        vee, parent, node = self._existing(parent_ino, name)
        if not node.is_dir:
            raise FsError(errno.ENOTDIR)
        if self._names(node):
            raise FsError(errno.ENOTEMPTY)
        path = self.path(node)
        if self._natural_lower(parent, name) is not None:
            self.copyup.ensure_dir(parent)
            if node.upper:
                vee.layer.replace_dir_with_whiteout(path)
            else:
                vee.layer.whiteout(path)
        elif node.upper:
            vee.layer.remove(path)
        vee.dirs.pop((parent.ino, name), None)
        node.parent = None
        node.vee = _DEAD
        parent.nsub = None
        vee.layer.forget_dirs()

    # -- rename ----------------------------------------------------------------------------

    @request
    async def rename(self, p1_ino: int, n1: bytes, p2_ino: int, n2: bytes, flags: int = 0) -> None:
        if flags & ~RENAME_NOREPLACE:
            raise FsError(errno.EINVAL, "only RENAME_NOREPLACE is supported")
        vee, p1, src = self._existing(p1_ino, n1)
        p2 = self.node(p2_ino)
        if p2.ino == ROOT_INO or self._vee(p2) is not vee:
            raise FsError(errno.EXDEV)
        if len(n2) > 255:
            raise FsError(errno.ENAMETOOLONG)
        check_name(n2)
        dst = self.child(p2, n2)
        if dst is src:
            return
        if dst is not None:
            if flags & RENAME_NOREPLACE:
                raise FsError(errno.EEXIST)
            if src.is_dir and not dst.is_dir:
                raise FsError(errno.ENOTDIR)
            if not src.is_dir and dst.is_dir:
                raise FsError(errno.EISDIR)
            if dst.is_dir and self._names(dst):
                raise FsError(errno.ENOTEMPTY)
        # 1. the source gets a private object at its old name
        if src.is_dir:
            self.copyup.ensure_dir(src)
        elif src.shared:
            # the name moves, and the kernel would move its dentry of the shared inode with
            # it: instead the file becomes this VEE's own, and the retried rename (the VFS
            # retries an ESTALE rename after a fresh lookup) moves the per-VEE inode
            raise self.copyup.own(vee, src)
        else:
            await self.copyup.writable(src)
        self.copyup.ensure_dir(p2)
        spath = self.path(p1) + (n1,)
        dpath = self.path(p2) + (n2,)
        # 2. directories carry where their template content lives (or that it has none)
        if src.is_dir:
            if src.lower is not None:
                tpath = self._template_path(vee, src.lower)
                vee.layer.set_dir_marker(spath, REDIRECT_XATTR, b"/" + tpath)
            elif self._natural_lower(p2, n2) is not None:
                vee.layer.set_dir_marker(spath, OPAQUE_XATTR, b"y")
        # 3. the target name: an empty private dir holding only markers goes away first
        if dst is not None and dst.is_dir and dst.upper:
            vee.layer.remove_dir_atomically(dpath)
        elif dst is None or not dst.upper:
            # a whiteout (or nothing) at the target: rename replaces a whiteout atomically
            st = vee.layer.lstat(dpath)
            if st is not None and is_whiteout(st) and src.is_dir:
                vee.layer.remove(dpath)
        # 4. move, leaving a whiteout when the template has the old name (a file renamed
        # over may lose its last name: it holds its pin from now on)
        if dst is not None and not dst.is_dir:
            self._pin(dst)
        hide = self._natural_lower(p1, n1) is not None
        with vee.layer.at(spath) as (sfd, sname), vee.layer.at(dpath) as (dfd, dname):
            renameat2(sfd, sname, dfd, dname, RENAME_WHITEOUT if hide else 0)
            fsync_dir(dfd)
            if sfd != dfd:
                fsync_dir(sfd)
        # 5. bookkeeping (cached directory fds may name moved or removed directories)
        if src.is_dir or (dst is not None and dst.is_dir):
            vee.layer.forget_dirs()
            p1.nsub = p2.nsub = None
        if dst is not None:
            if dst.is_dir:
                vee.dirs.pop((p2.ino, n2), None)
                dst.parent = None
                dst.vee = _DEAD
            else:
                self._name_gone(dst, p2, n2)
        if src.is_dir:
            vee.dirs.pop((p1.ino, n1), None)
            vee.dirs[(p2.ino, n2)] = src
            src.parent, src.name = p2, n2
        else:
            src.links.discard((p1, n1))
            src.links.add((p2, n2))


def _now_ns() -> int:
    return time.time_ns()
