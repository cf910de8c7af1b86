"""VEE views: many VEE roots, each a template plus a private layer, under one inode space.

This is the plain-Python core of the ``vfsd`` mount (the FUSE adapter in
``vfs.daemon.fuse_ops`` only translates). This module holds the VEEs, lookups, attributes and
directories; the namespace changes are in :mod:`vfs.tree.view_names`, file I/O, setattr and
xattrs in :mod:`vfs.tree.view_io`, the inode table in :mod:`vfs.tree.inodes` and copy-up in
:mod:`vfs.tree.copyup`. It knows inode numbers because the kernel addresses
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
import logging
import os
import stat
from collections.abc import Callable, Iterable

import trio

from vfs.errors import NotFound, VfsError
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
    StaleHandle,
    TemplateLike,
    Vee,
    stat_attr,
)
from vfs.tree.private import (
    PrivateLayer,
    check_name,
    is_whiteout,
)
from vfs.tree.view_io import FileOps
from vfs.tree.view_names import NamespaceOps

log = logging.getLogger(__name__)

#: The mount root (whose entries are the VEE roots) is root's alone: the mount allows other
#: users (containers run as any uid) and keeps device nodes and setuid binaries working for
#: the VEEs, so no other host user may reach a VEE's setuid binaries or devices through it.
#: Containers reach their VEE root through a bind mount, which never traverses the mount root.
ROOT_MODE = 0o700
#: Threads for fetches of objects from the remote, and for local disk work (docs/vee-layer.md).
FETCH_THREADS = 16
DISK_THREADS = 16


class Views(NamespaceOps, FileOps):
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
            return stat_attr(node, os.stat(node.fd))  # fstat of the pinned inode: no walk
        if node.upper:
            vee = self._vee(node)
            st = vee.layer.lstat(self.path(node))
            if st is None:
                raise FsError(errno.ENOENT)
            attr = stat_attr(node, st)
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

    def statfs(self) -> os.statvfs_result:
        vee = next(iter(self.vees.values()), None)
        return os.statvfs(vee.layer.upper if vee else "/")

    def close(self) -> None:
        for fh in list(self.handles):
            self.release(fh)
        self.inodes.close()
        for vee in self.vees.values():
            vee.layer.close()
