"""VEE views: many VEE roots, each a template plus a private layer, under one inode space.

This is the plain-Python core of the ``vfsd`` mount (the FUSE adapter in
``vfs.daemon.fuse_ops`` only translates). It knows inode numbers because the kernel addresses
everything by them, but nothing of FUSE: it raises :mod:`vfs.errors` classes (``FsError``
carries the errno a local file system would give) and lets ``OSError`` from the private layer
through.

Inode space (``docs/vee-layer.md``):

- inode 1 is the mount root; its entries are the VEE roots;
- a *shared* inode stands for one unmodified template regular file or symlink and is the same
  in every VEE root — and in every version of a template that has the identical file (key: the
  file's identity: its path, content and metadata) —, so the kernel caches its pages once;
- everything else is a *per-VEE* node: directories (merged listings differ per VEE), files in the
  private layer, and template files that were "unshared" (see below).

Inode numbers are derived from what a node stands for (a hash of its identity), not handed out
in order: a file keeps its number when the kernel forgets its inode and looks it up again, and
across daemon restarts.

The trap of shared inodes: a request on a shared inode does not say which VEE asks. So when a
shared inode is about to be modified (open for write, setattr, xattr change, link), the view
marks that template file unshared everywhere, invalidates the names that point at it, and answers
:class:`StaleHandle` (ESTALE): the kernel retries the path walk with a fresh lookup, which now
yields a per-VEE node of the asking VEE, and copy-up happens on that node.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import logging
import os
import stat
import time
from collections.abc import Callable, Iterable, Iterator

import trio

from vfs.durable import fsync_dir
from vfs.errors import IntegrityError, NotFound, RemoteError, VfsError
from vfs.tree.copyup import CopyUp, entry_meta
from vfs.tree.entry import Entry
from vfs.tree.inodes import InodeTable, request
from vfs.tree.nodes import (
    _DEAD,
    ROOT_INO,
    Attr,
    Content,
    FsError,
    Handle,
    Node,
    SetAttr,
    StaleHandle,
    TemplateLike,
    Vee,
)
from vfs.tree.private import (
    OPAQUE_XATTR,
    PRIVATE_XATTR_PREFIX,
    REDIRECT_XATTR,
    RENAME_NOREPLACE,
    RENAME_WHITEOUT,
    FileMeta,
    PrivateLayer,
    check_name,
    chown_fd,
    fallocate,
    is_whiteout,
    proc_path,
    renameat2,
    reopen,
)

log = logging.getLogger(__name__)

#: The mount root (whose entries are the VEE roots) is root's alone: the mount allows other
#: users (containers run as any uid) and keeps device nodes and setuid binaries working for
#: the VEEs, so no other host user may reach a VEE's setuid binaries or devices through it.
#: Containers reach their VEE root through a bind mount, which never traverses the mount root.
ROOT_MODE = 0o700
#: Threads for fetches of objects from the remote, and for local disk work (docs/vee-layer.md).
FETCH_THREADS = 16
DISK_THREADS = 16


class Views:
    """The inode space of one ``vfsd`` mount: VEE roots and every node below them."""

    def __init__(
        self,
        content: Content,
        *,
        invalidate_entry: Callable[[int, bytes], None] | None = None,
        invalidate_attr: Callable[[int], None] | None = None,
    ) -> None:
        self.content = content
        self.invalidate_entry: Callable[[int, bytes], None] = lambda parent, name: None
        self.invalidate_attr: Callable[[int], None] = lambda ino: None
        self.vees: dict[str, Vee] = {}
        self.inodes = InodeTable()
        self.root = self.inodes.root
        self.handles: dict[int, Handle] = {}
        self.dir_handles: dict[int, tuple[Node, list[bytes]]] = {}
        self._next_fh = 1
        # Worker threads in two pools: fetches wait on a network that may stall or drip (a
        # lying server), local work (copy-up staging, fsync) on this host's disks. Apart, 50
        # stalled fetches cannot make a copy-up or an fsync of another VEE wait for a thread.
        self.fetch_threads = trio.CapacityLimiter(FETCH_THREADS)
        self.disk_threads = trio.CapacityLimiter(DISK_THREADS)
        self.copyup = CopyUp(
            self,
            self.inodes,
            content,
            fetch_threads=self.fetch_threads,
            disk_threads=self.disk_threads,
        )
        self.attach_kernel(invalidate_entry, invalidate_attr)

    def attach_kernel(
        self,
        invalidate_entry: Callable[[int, bytes], None] | None,
        invalidate_attr: Callable[[int], None] | None = None,
    ) -> None:
        """Set how to drop what the kernel cached (names, attributes) when the view changes it
        behind the kernel's back. Until the mount is up there is nothing to drop (and the
        kernel refuses notifications before its INIT), so the daemon attaches them then."""
        if invalidate_entry is not None:
            self.invalidate_entry = invalidate_entry
        if invalidate_attr is not None:
            self.invalidate_attr = invalidate_attr

    # -- VEE set ---------------------------------------------------------------------------

    @staticmethod
    def prepare_layer(template: TemplateLike, layer: PrivateLayer) -> None:
        """Create the layer's root directory (the VEE root) if it does not exist yet: the one
        step of mounting a VEE that writes to disk, so callers can do it before committing to
        the VEE (a full disk fails here, before anything changed)."""
        layer.ensure_upper(entry_meta(template.root))

    def add_vee(self, name: str, template: TemplateLike, layer: PrivateLayer) -> Vee:
        check_name(name.encode())
        if name in self.vees:
            raise FsError(errno.EEXIST, f"VEE {name!r} already mounted")
        self.prepare_layer(template, layer)
        vee = Vee(name, template, layer)
        root = self.inodes.new(vee, stat.S_IFDIR, template.root, (name, "root"))
        root.parent = self.root
        root.name = name.encode()
        root.upper = layer.lstat(()) is not None
        if root.upper and layer.is_opaque(()):
            root.lower = None
        vee.root = root
        self.vees[name] = vee
        # a negative dentry of the name and the mount root's link count are stale now
        self.invalidate_entry(ROOT_INO, name.encode())
        self.invalidate_attr(ROOT_INO)
        log.info("VEE %s mounted (template %s…)", name, template.digest[:16])
        return vee

    def remove_vee(self, name: str) -> None:
        """Detach a VEE: its names vanish from the mount; its nodes answer ENOENT/ESTALE."""
        vee = self.vees.pop(name, None)
        if vee is None:
            raise NotFound(f"no VEE named {name!r}")
        for h in list(self.handles.values()):
            if h.node.vee is vee and h.fd is not None:
                with contextlib.suppress(OSError):
                    os.fsync(h.fd)
        self.inodes.kill_vee(vee)  # its nodes answer ESTALE; their pins are closed
        vee.layer.close()
        self.invalidate_entry(ROOT_INO, name.encode())

    # -- node bookkeeping ------------------------------------------------------------------

    def node(self, ino: int) -> Node:
        return self.inodes.node(ino)

    def _pin(self, node: Node) -> int | None:
        """The pinned fd of a private file (taken again by one of its names if the table shed
        it, checked to be the same host inode), None for nodes without one."""
        if node.fd is not None:
            self.inodes.used_pin(node)
            return node.fd
        if not InodeTable.unpinned(node):
            return None
        vee = self._vee(node)
        fd = vee.layer.pin(self.path(node))
        st = os.stat(fd)
        if ("u", st.st_dev, st.st_ino) != node.key:
            os.close(fd)
            log.error("%s: private file replaced behind the daemon", self._describe(node))
            raise FsError(errno.ESTALE, "private file replaced behind the daemon")
        self.inodes.add_pin(node, fd)
        return fd

    def _vee(self, node: Node) -> Vee:
        if node.vee is None or node.vee is _DEAD:
            raise FsError(errno.EPERM if node.ino == ROOT_INO else errno.ESTALE)
        return node.vee

    def path(self, node: Node) -> tuple[bytes, ...]:
        """Components of a per-VEE node's path below its VEE root (ENOENT: a file whose last
        name is gone — fd-level operations reach it through ``node.fd`` instead)."""
        if not node.is_dir:
            if not node.links:
                raise FsError(errno.ENOENT, "file has no name left")
            parent, name = next(iter(node.links))
            return self.path(parent) + (name,)
        parts: list[bytes] = []
        n = node
        while n.parent is not None and n.parent.ino != ROOT_INO:
            parts.append(n.name)
            n = n.parent
        return tuple(reversed(parts))

    def forget(self, items: Iterable[tuple[int, int]]) -> None:
        self.inodes.forget(items)

    # -- isolation (the FUSE adapter's confinement checks) -----------------------------------

    def confinement_of(self, root_ino: int) -> str | None:
        """The VEE a process whose root directory is inode ``root_ino`` is confined to: its
        name, None for the mount root (a host chroot: not confined), or a name no VEE has for
        an inode that is not a live VEE directory."""
        if root_ino == ROOT_INO:
            return None
        node = self.inodes.nodes.get(root_ino)
        if node is None or not isinstance(node.vee, Vee):
            return "\0gone"
        return node.vee.name

    def visible_in(self, ino: int, vee_name: str) -> bool:
        """Whether inode ``ino`` belongs to VEE ``vee_name``: its own per-VEE inodes and the
        shared inodes of its own template, never the mount root or another VEE's inodes."""
        if ino == ROOT_INO:
            return False
        node = self.inodes.nodes.get(ino)
        if node is None or node.vee is _DEAD:
            return True  # unknown or gone: the request answers ESTALE by itself
        if isinstance(node.vee, Vee):
            return node.vee.name == vee_name
        vee = self.vees.get(vee_name)
        return vee is not None and self.inodes.shared_visible(node, vee.template.digest)

    def count_lookup(self, ino: int) -> None:
        self.inodes.count_lookup(ino)

    # -- resolution ------------------------------------------------------------------------

    def child(self, parent: Node, name: bytes) -> Node | None:
        """The node at ``name`` in directory ``parent`` (no lookup count), None if absent."""
        if parent.ino == ROOT_INO:
            vee = self.vees.get(os.fsdecode(name))
            return vee.root if vee else None
        if not parent.is_dir:
            raise FsError(errno.ENOTDIR)
        vee = self._vee(parent)
        if len(name) > 255:
            raise FsError(errno.ENAMETOOLONG)
        tmpl = vee.template
        st = None
        if parent.upper:
            st = vee.layer.lstat(self.path(parent) + (name,))
            if st is not None and is_whiteout(st):
                return None
        if st is not None:
            if stat.S_ISDIR(st.st_mode):
                node = vee.dirs.get((parent.ino, name))
                lower = self._dir_lower(vee, parent, name)
                if node is None:
                    ident = self._dir_identity(vee, lower, st)
                    node = self.inodes.new(vee, stat.S_IFDIR, None, ident)
                    node.parent, node.name = parent, name
                    vee.dirs[(parent.ino, name)] = node
                if not node.upper:
                    node.upper = True
                    node.nsub = None
                node.lower = lower
                return node
            return self._upper_file_node(vee, parent, name, st)
        if parent.lower is None:
            return None
        e = tmpl.lookup(parent.lower.ino, name)
        if e is None:
            return None
        if e.kind == "dir":
            node = vee.dirs.get((parent.ino, name))
            if node is None:
                node = self.inodes.new(vee, stat.S_IFDIR, e, self._dir_identity(vee, e, None))
                node.parent, node.name = parent, name
                vee.dirs[(parent.ino, name)] = node
            return node
        ident = self.inodes.identity(tmpl, e)
        if (
            e.kind in ("reg", "lnk")
            and ident not in self.inodes.unshared
            and ident not in vee.own
            # a hard-linked file this VEE removed a name of counts fewer links here than in
            # other VEEs: it is this VEE's own inode then (also after a restart)
            and (e.nlink == 1 or self._visible_names(vee, e) == e.nlink)
        ):
            node = self.inodes.shared_node(tmpl, e, ident)
            node.seen.add((parent, name))
            return node
        key = ("l", e.ino)
        node = vee.files.get(key)
        if node is None:
            node = self.inodes.new(vee, stat.S_IFMT(e.mode), e, (vee.name, "file", ident))
            node.key = key
            vee.files[key] = node
        node.links.add((parent, name))
        return node

    def _dir_identity(
        self, vee: Vee, lower: Entry | None, st: os.stat_result | None
    ) -> tuple[object, ...]:
        """A VEE directory is the template directory it merges (by template path: the same in
        every version, and after a rename, which carries a redirect), or its host directory."""
        if lower is not None:
            return (vee.name, "dir", self.inodes.paths(vee.template)[lower.ino][0])
        assert st is not None
        return (vee.name, "host", st.st_dev, st.st_ino)

    def _upper_file_node(self, vee: Vee, parent: Node, name: bytes, st: os.stat_result) -> Node:
        """The node of a private non-directory: one node per host inode (hard links), found by
        (st_dev, st_ino) — safe because every live node pins its inode (``Node.fd``)."""
        key = ("u", st.st_dev, st.st_ino)
        node = vee.files.get(key)
        if node is None:
            fd = vee.layer.pin(self.path(parent) + (name,))
            try:
                pst = os.stat(fd)
                key = ("u", pst.st_dev, pst.st_ino)
                node = vee.files.get(key)  # only differs from st if the entry just changed
                if node is None:
                    origin = PrivateLayer.origin_of(fd)
                    ident = (
                        (vee.name, "file", origin)
                        if origin is not None
                        else (vee.name, "host", pst.st_dev, pst.st_ino)
                    )
                    node = self.inodes.new(vee, stat.S_IFMT(pst.st_mode), None, ident)
                    node.upper = True
                    node.key = key
                    self.inodes.add_pin(node, fd)
                    fd = -1
                    vee.files[key] = node
            finally:
                if fd >= 0:
                    os.close(fd)
        node.links.add((parent, name))
        return node

    def _dir_lower(self, vee: Vee, parent: Node, name: bytes) -> Entry | None:
        """The template directory merged below the private directory ``parent/name``."""
        path = self.path(parent) + (name,)
        if vee.layer.is_opaque(path):
            return None
        redirect = vee.layer.redirect(path)
        if redirect is not None:
            e = vee.template.resolve(redirect)
            return e if e is not None and e.kind == "dir" else None
        if parent.lower is None:
            return None
        e = vee.template.lookup(parent.lower.ino, name)
        return e if e is not None and e.kind == "dir" else None

    def _natural_lower(self, parent: Node, name: bytes) -> Entry | None:
        if parent.lower is None or parent.vee is None or parent.vee is _DEAD:
            return None
        return parent.vee.template.lookup(parent.lower.ino, name)

    @request
    def lookup(self, parent_ino: int, name: bytes) -> Attr:
        parent = self.node(parent_ino)
        node = self.child(parent, name)
        if node is None:
            raise FsError(errno.ENOENT)
        attr = self.getattr(node.ino)
        node.nlookup += 1
        return attr

    # -- attributes ------------------------------------------------------------------------

    def getattr(self, ino: int) -> Attr:
        node = self.node(ino)
        if node.ino == ROOT_INO:
            return Attr(
                ROOT_INO, stat.S_IFDIR | ROOT_MODE, 2 + len(self.vees), 0, 0, 0, 4096, 8, 0, 0, 0
            )
        if node.fd is not None:
            return _stat_attr(node, os.stat(node.fd))  # fstat of the pinned inode: no walk
        if node.upper:
            vee = self._vee(node)
            st = vee.layer.lstat(self.path(node))
            if st is None:
                raise FsError(errno.ENOENT)
            attr = _stat_attr(node, st)
            if node.is_dir:
                attr.nlink = 2 + self._subdirs(node, st)
            return attr
        if node.attr is not None:
            return node.attr
        e = node.lower
        if e is None:
            raise FsError(errno.ENOENT)
        if node.is_dir:
            nlink = 2 + self._subdirs(node, None)
        else:
            nlink = e.nlink if node.shared else self._template_links(node)
        attr = Attr(
            node.ino,
            e.mode,
            nlink,
            e.uid,
            e.gid,
            e.rdev,
            e.size,
            e.blocks,
            e.atime_ns,
            e.mtime_ns,
            e.ctime_ns,
            shared=node.shared,
            generation=node.gen,
        )
        if attr.shared:
            node.attr = attr  # the template entry is immutable and the node never changes
        return attr

    def _template_links(self, node: Node) -> int:
        """Link count of a per-VEE template file (not copied up): the template names of its
        inode that still show it in this VEE (the VEE may have removed some)."""
        e = node.lower
        assert e is not None and isinstance(node.vee, Vee)
        if e.nlink == 1:
            return 1 if node.links else 0
        return self._visible_names(node.vee, e)

    def _visible_names(self, vee: Vee, e: Entry) -> int:
        """How many of template inode ``e``'s names show it in ``vee``: neither whited out nor
        replaced in the private layer, nor under an opaque directory (no nodes are made)."""
        count = 0
        for tpath in self.inodes.paths(vee.template).get(e.ino, []):
            comps = tuple(tpath.split(b"/"))
            parent = vee.root
            for c in comps[:-1]:  # directories only: their nodes are kept anyway
                if parent is None or parent.lower is None:
                    break
                parent = self.child(parent, c)
            if parent is None or not parent.is_dir or parent.lower is None:
                continue
            if parent.upper and vee.layer.lstat(self.path(parent) + comps[-1:]) is not None:
                continue  # a whiteout or a private entry hides the template's
            if vee.template.lookup(parent.lower.ino, comps[-1]) is e:
                count += 1
        return count

    def _subdirs(self, node: Node, st: os.stat_result | None) -> int:
        """Visible subdirectories of a VEE directory (its link count is 2 + this, as on ext4).

        Counted once and kept on the node; mkdir, rmdir and directory renames reset the count of
        the directories they change (creating or removing files never changes it)."""
        if node.nsub is not None:
            return node.nsub
        vee = self._vee(node)
        upper: dict[bytes, bool] = {}
        if node.upper:
            if node.lower is None and st is not None and st.st_nlink >= 2:
                node.nsub = st.st_nlink - 2  # a private-only directory: the host counted
                return node.nsub
            upper = {n: stat.S_ISDIR(s.st_mode) for n, s in vee.layer.listdir(self.path(node))}
        count = sum(upper.values())
        if node.lower is not None:
            count += sum(
                1 for n, e in vee.template.readdir(node.lower.ino) if e.is_dir and n not in upper
            )
        node.nsub = count
        return count

    def readlink(self, ino: int) -> bytes:
        node = self.node(ino)
        if node.kind != stat.S_IFLNK:
            raise FsError(errno.EINVAL)
        if node.fd is not None:
            return os.readlink(b"", dir_fd=node.fd)  # readlinkat(fd, "") on the pinned link
        if node.upper:
            vee = self._vee(node)
            with vee.layer.at(self.path(node)) as (fd, name):
                return os.readlink(name, dir_fd=fd)
        assert node.lower is not None
        return node.lower.target or b""

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
        fd = vee.layer.create(path, _open_flags(flags), mode, uid, gid, replace=replace)
        try:
            st = os.fstat(fd)  # the new file's identity and attributes, without another walk
            node = self._upper_file_node(vee, parent, name, st)
        except BaseException:
            os.close(fd)
            raise
        node.nlookup += 1
        return self._new_handle(node, fd, True), _stat_attr(node, st)

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

    def _template_path(self, vee: Vee, e: Entry) -> bytes:
        return self.inodes.paths(vee.template)[e.ino][0]

    # -- directories -----------------------------------------------------------------------

    def opendir(self, ino: int) -> int:
        node = self.node(ino)
        if not node.is_dir:
            raise FsError(errno.ENOTDIR)
        if node.ino == ROOT_INO:
            names = [n.encode() for n in sorted(self.vees)]
        else:
            names = self._names(node, noatime=False)  # the VEE reads it
        fh = self._next_fh
        self._next_fh += 1
        self.dir_handles[fh] = (node, [b".", b"..", *names])
        return fh

    @request
    def readdir(
        self, fh: int, start: int, emit: Callable[[bytes, Attr, int], bool] | None = None
    ) -> list[tuple[bytes, Attr, int]]:
        """Entries from index ``start``, ``.`` and ``..`` first (as on a local disk).

        ``emit(name, attr, next_index)`` hands an entry to the kernel (readdirplus) and says
        whether it took it; each entry taken, but for ``.`` and ``..``, is a lookup reference
        (the kernel counts none for those two). Without ``emit`` every entry is taken.
        Returns the entries taken."""
        node, names = self.dir_handles[fh]
        if node.vee is _DEAD and start < len(names):
            raise StaleHandle("directory removed")
        out: list[tuple[bytes, Attr, int]] = []
        for i in range(start, len(names)):
            name = names[i]
            if name in (b".", b".."):
                target = node if name == b"." else (node.parent or node)
                attr = self.getattr(target.ino)
                if emit is not None and not emit(name, attr, i + 1):
                    return out
                out.append((name, attr, i + 1))
                continue
            try:
                child = self.child(node, name)
                if child is None:
                    continue  # removed since opendir
                attr = self.getattr(child.ino)
            except (VfsError, OSError):
                continue
            if emit is not None and not emit(name, attr, i + 1):
                return out
            child.nlookup += 1
            out.append((name, attr, i + 1))
        return out

    def releasedir(self, fh: int) -> None:
        self.dir_handles.pop(fh, None)

    async def fsyncdir(self, ino: int) -> None:
        """fsync of a directory: its private directory, if it has one (a VEE that made a file
        and fsyncs the file and its directory must find the name after a crash)."""
        node = self.node(ino)
        if node.upper and isinstance(node.vee, Vee):
            with node.vee.layer.dirfd(self.path(node)) as pfd:
                fd = os.open(".", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC, dir_fd=pfd)
            try:
                await trio.to_thread.run_sync(os.fsync, fd, limiter=self.disk_threads)
            finally:
                os.close(fd)

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
        return self._new_handle(node, reopen(pin, _open_flags(flags)), True)

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

    def statfs(self) -> os.statvfs_result:
        vee = next(iter(self.vees.values()), None)
        return os.statvfs(vee.layer.upper if vee else "/")

    def close(self) -> None:
        for fh in list(self.handles):
            self.release(fh)
        self.inodes.close()
        for vee in self.vees.values():
            vee.layer.close()


def _stat_attr(node: Node, st: os.stat_result) -> Attr:
    return Attr(
        node.ino,
        st.st_mode,
        st.st_nlink,
        st.st_uid,
        st.st_gid,
        st.st_rdev,
        st.st_size,
        st.st_blocks,
        st.st_atime_ns,
        st.st_mtime_ns,
        st.st_ctime_ns,
        generation=node.gen,
    )


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


def _open_flags(flags: int) -> int:
    """Open flags for the private file: the kernel runs the page cache (writeback), so O_APPEND
    is its business and a write-only open must be able to read (partial page writes)."""
    flags &= ~(os.O_CREAT | os.O_EXCL | os.O_NOCTTY | os.O_APPEND | os.O_DIRECT | os.O_NOFOLLOW)
    if flags & os.O_ACCMODE == os.O_WRONLY:
        flags = (flags & ~os.O_ACCMODE) | os.O_RDWR
    return flags


def _now_ns() -> int:
    return time.time_ns()
