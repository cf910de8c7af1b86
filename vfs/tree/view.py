"""VEE views: many VEE roots, each a template plus a private layer, under one inode space.

This is the plain-Python core of the ``vfsd`` mount (the FUSE adapter in
``vfs.daemon.fuse_ops`` only translates). It knows inode numbers because the kernel addresses
everything by them, but nothing of FUSE: it raises :mod:`vfs.errors` classes (``FsError``
carries the errno a local file system would give) and lets ``OSError`` from the private layer
through.

Inode space (``docs/vee-layer.md``):

- inode 1 is the mount root; its entries are the VEE roots;
- a *shared* inode stands for one unmodified template regular file or symlink and is the same
  in every VEE root (key: template digest + template inode), so the kernel caches its pages once;
- everything else is a *per-VEE* node: directories (merged listings differ per VEE), files in the
  private layer, and template files that were "unshared" (see below).

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

from vfs.errors import NotFound, VfsError
from vfs.tree.entry import Entry
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
    RENAME_EXCHANGE,
    RENAME_NOREPLACE,
    RENAME_WHITEOUT,
    FileMeta,
    PrivateLayer,
    check_name,
    fsync_dir,
    is_whiteout,
    renameat2,
)

log = logging.getLogger(__name__)


def _entry_meta(e: Entry) -> FileMeta:
    return FileMeta(e.mode, e.uid, e.gid, e.atime_ns, e.mtime_ns, dict(e.xattrs), e.rdev)


class Views:
    """The inode space of one ``vfsd`` mount: VEE roots and every node below them."""

    def __init__(
        self,
        content: Content,
        *,
        invalidate_entry: Callable[[int, bytes], None] | None = None,
    ) -> None:
        self.content = content
        self.invalidate_entry = invalidate_entry or (lambda parent, name: None)
        self.vees: dict[str, Vee] = {}
        self.nodes: dict[int, Node] = {}
        self.shared: dict[tuple[str, int], Node] = {}
        self.unshared: set[tuple[str, int]] = set()
        self.handles: dict[int, Handle] = {}
        self.dir_handles: dict[int, list[tuple[bytes, Node]]] = {}
        self._next_ino = ROOT_INO + 1
        self._next_fh = 1
        self._paths_cache: dict[str, dict[int, list[bytes]]] = {}
        self._copy_locks: dict[int, trio.Lock] = {}
        root = Node(ROOT_INO, None, stat.S_IFDIR, None)
        self.nodes[ROOT_INO] = root
        self.root = root

    # -- VEE set ---------------------------------------------------------------------------

    def add_vee(self, name: str, template: TemplateLike, layer: PrivateLayer) -> Vee:
        check_name(name.encode())
        if name in self.vees:
            raise FsError(errno.EEXIST, f"VEE {name!r} already mounted")
        layer.ensure_upper(_entry_meta(template.root))
        vee = Vee(name, template, layer)
        root = self._new_node(vee, stat.S_IFDIR, template.root)
        root.parent = self.root
        root.name = name.encode()
        root.upper = layer.lstat(()) is not None
        if root.upper and layer.is_opaque(()):
            root.lower = None
        vee.root = root
        self.vees[name] = vee
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
        for node in list(self.nodes.values()):
            if node.vee is vee:
                node.vee = _DEAD
        for node in self.shared.values():
            node.seen = {(p, n) for p, n in node.seen if p.vee is not _DEAD}
        vee.layer.close()
        self.invalidate_entry(ROOT_INO, name.encode())

    # -- node bookkeeping ------------------------------------------------------------------

    def _new_node(self, vee: Vee | None, kind: int, lower: Entry | None) -> Node:
        node = Node(self._next_ino, vee, kind, lower)
        self._next_ino += 1
        self.nodes[node.ino] = node
        return node

    def node(self, ino: int) -> Node:
        n = self.nodes.get(ino)
        if n is None or n.vee is _DEAD:
            raise StaleHandle(f"inode {ino} is gone")
        return n

    def _vee(self, node: Node) -> Vee:
        if node.vee is None or node.vee is _DEAD:
            raise FsError(errno.EPERM if node.ino == ROOT_INO else errno.ESTALE)
        return node.vee

    def path(self, node: Node) -> tuple[bytes, ...]:
        """Components of a per-VEE node's path below its VEE root."""
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
        for ino, count in items:
            node = self.nodes.get(ino)
            if node is None:
                continue
            node.nlookup -= count
            if node.nlookup <= 0 and not node.is_dir and not node.shared:
                node.nlookup = 0
                if any(h.node is node for h in self.handles.values()):
                    continue
                del self.nodes[ino]
                vee = node.vee
                if isinstance(vee, Vee) and vee.files.get(node.key) is node:
                    del vee.files[node.key]

    # -- resolution ------------------------------------------------------------------------

    def _child(self, parent: Node, name: bytes) -> Node | None:
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
                if node is None:
                    node = self._new_node(vee, stat.S_IFDIR, None)
                    node.parent, node.name = parent, name
                    vee.dirs[(parent.ino, name)] = node
                node.upper = True
                node.lower = self._dir_lower(vee, parent, name)
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
                node = self._new_node(vee, stat.S_IFDIR, e)
                node.parent, node.name = parent, name
                vee.dirs[(parent.ino, name)] = node
            return node
        skey = (tmpl.digest, e.ino)
        if e.kind in ("reg", "lnk") and skey not in self.unshared:
            node = self.shared.get(skey)
            if node is None:
                node = self._new_node(None, stat.S_IFMT(e.mode), e)
                node.template = tmpl
                self.shared[skey] = node
            node.seen.add((parent, name))
            return node
        key = ("l", e.ino)
        node = vee.files.get(key)
        if node is None:
            node = self._new_node(vee, stat.S_IFMT(e.mode), e)
            node.key = key
            vee.files[key] = node
        node.links.add((parent, name))
        return node

    def _upper_file_node(self, vee: Vee, parent: Node, name: bytes, st: os.stat_result) -> Node:
        """The node of a private non-directory (hard links: one node per host inode)."""
        key = ("u", st.st_dev, st.st_ino)
        node = vee.files.get(key)
        if node is None:
            node = self._new_node(vee, stat.S_IFMT(st.st_mode), None)
            node.upper = True
            node.key = key
            vee.files[key] = node
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

    def lookup(self, parent_ino: int, name: bytes) -> Attr:
        parent = self.node(parent_ino)
        node = self._child(parent, name)
        if node is None:
            raise FsError(errno.ENOENT)
        node.nlookup += 1
        return self.getattr(node.ino)

    # -- attributes ------------------------------------------------------------------------

    def getattr(self, ino: int) -> Attr:
        node = self.node(ino)
        if node.ino == ROOT_INO:
            return Attr(ROOT_INO, stat.S_IFDIR | 0o755, 2, 0, 0, 0, 4096, 8, 0, 0, 0)
        if node.upper:
            vee = self._vee(node)
            st = vee.layer.lstat(self.path(node))
            if st is None:
                raise FsError(errno.ENOENT)
            return _stat_attr(node, st)
        if node.attr is not None:
            return node.attr
        e = node.lower
        if e is None:
            raise FsError(errno.ENOENT)
        attr = Attr(
            node.ino,
            e.mode,
            1 if node.is_dir else e.nlink,
            e.uid,
            e.gid,
            e.rdev,
            e.size,
            (e.size + 511) // 512,
            e.atime_ns,
            e.mtime_ns,
            e.ctime_ns,
            shared=node.shared,
        )
        if attr.shared:
            node.attr = attr  # the template entry is immutable and the node never changes
        return attr

    def readlink(self, ino: int) -> bytes:
        node = self.node(ino)
        if node.kind != stat.S_IFLNK:
            raise FsError(errno.EINVAL)
        if node.upper:
            vee = self._vee(node)
            with vee.layer.at(self.path(node)) as (fd, name):
                return os.readlink(name, dir_fd=fd)
        assert node.lower is not None
        return node.lower.target or b""

    # -- unsharing and copy-up -------------------------------------------------------------

    def _unshare(self, node: Node) -> StaleHandle:
        """Turn a shared inode into per-VEE inodes from now on (the ESTALE rule)."""
        assert node.template is not None and node.lower is not None
        key = (node.template.digest, node.lower.ino)
        self.unshared.add(key)
        for parent, name in node.seen:
            self.invalidate_entry(parent.ino, name)
        node.seen.clear()
        log.debug("unshared template inode %s", key)
        return StaleHandle("shared template inode modified: look the name up again")

    def _ensure_dir_upper(self, node: Node) -> None:
        """Give directory ``node`` (and its parents) a private directory (metadata copy-up)."""
        if node.upper:
            return
        vee = self._vee(node)
        assert node.parent is not None
        self._ensure_dir_upper(node.parent)
        e = node.lower
        assert e is not None
        vee.layer.make_dir(
            self.path(node),
            e.mode,
            e.uid,
            e.gid,
            xattrs=dict(e.xattrs),
            times_ns=(e.atime_ns, e.mtime_ns),
        )
        node.upper = True

    async def _copy_up(self, node: Node, *, with_data: bool = True) -> None:
        """Give a per-VEE template file a private copy (all its hard-link names too)."""
        if node.upper:
            return
        if node.shared:
            raise self._unshare(node)
        lock = self._copy_locks.setdefault(node.ino, trio.Lock())
        async with lock:
            if node.upper:
                return
            vee = self._vee(node)
            e = node.lower
            assert e is not None
            path = self.path(node)
            parent = next(iter(node.links))[0]
            self._ensure_dir_upper(parent)
            if node.is_dir:
                raise AssertionError("directories use _ensure_dir_upper")
            meta = _entry_meta(e)
            if stat.S_ISREG(e.mode):
                fill = self._filler(e) if with_data and e.oid and e.size else None
                if fill is not None and not self.content.has_local(e.oid or ""):
                    await trio.to_thread.run_sync(self.content.ensure, e.oid)
                # Staging (copy + fsync) runs in a thread whatever the size: an fsync costs
                # milliseconds, the thread hop ~0.1 ms, and the loop keeps serving every VEE.
                # Only the atomic rename into place happens here, if the name still shows
                # this file.
                tmp = await trio.to_thread.run_sync(vee.layer.stage, meta, fill)
                try:
                    still = node.vee is vee and self.path(node) == path
                except FsError:
                    still = False
                if not still:
                    vee.layer.discard(tmp)
                    raise FsError(errno.ENOENT, "file removed during its copy-up")
                vee.layer.install(tmp, path)
            else:
                vee.layer.make_special(path, meta, target=e.target)
            # hard links: every other template name of this inode that still shows it
            if e.nlink > 1:
                self._relink_group(vee, node, path)
            st = vee.layer.lstat(path)
            assert st is not None
            node.upper = True
            if vee.files.get(node.key) is node:
                del vee.files[node.key]
            node.key = ("u", st.st_dev, st.st_ino)
            vee.files[node.key] = node
        self._copy_locks.pop(node.ino, None)

    def _relink_group(self, vee: Vee, node: Node, path: tuple[bytes, ...]) -> None:
        assert node.lower is not None
        paths = self._paths_cache.get(vee.template.digest)
        if paths is None:
            paths = self._paths_cache[vee.template.digest] = vee.template.paths()
        for tpath in paths.get(node.lower.ino, []):
            comps = tuple(tpath.split(b"/"))
            if comps == path:
                continue
            try:
                parent = self._walk(vee, comps[:-1])
                if parent is None or self._child(parent, comps[-1]) is not node:
                    continue
                self._ensure_dir_upper(parent)
                with vee.layer.at(path) as (sfd, sname), vee.layer.at(comps) as (dfd, dname):
                    os.link(sname, dname, src_dir_fd=sfd, dst_dir_fd=dfd, follow_symlinks=False)
                node.links.add((parent, comps[-1]))
            except (VfsError, OSError) as exc:
                log.warning("hard link %r not re-created after copy-up: %s", tpath, exc)

    def _walk(self, vee: Vee, comps: tuple[bytes, ...]) -> Node | None:
        n = vee.root
        for c in comps:
            if n is None or not n.is_dir:
                return None
            n = self._child(n, c)
        return n

    def _filler(self, e: Entry) -> Callable[[int], None]:
        content = self.content
        oid, size = e.oid, e.size
        assert oid is not None

        def fill(fd: int) -> None:
            """Copy the template content, leaving all-zero blocks as holes (sparse files)."""
            os.ftruncate(fd, size)
            off = 0
            zero = bytes(1 << 16)
            while off < size:
                chunk = content.read(oid, off, min(1 << 20, size - off))
                if not chunk:
                    raise FsError(errno.EIO, f"template object {oid[:16]}… is short")
                for i in range(0, len(chunk), 1 << 16):
                    piece = chunk[i : i + (1 << 16)]
                    if piece != zero[: len(piece)]:
                        os.pwrite(fd, piece, off + i)
                off += len(chunk)

        return fill

    async def _writable(self, node: Node, *, with_data: bool = True) -> Vee:
        """Make ``node`` privately modifiable in its VEE (copy-up), ESTALE if it is shared."""
        if node.ino == ROOT_INO:
            raise FsError(errno.EPERM)
        if node.shared:
            raise self._unshare(node)
        vee = self._vee(node)
        if node.upper:
            return vee  # already private (the common case: no copy-up, no lock)
        if node.is_dir:
            self._ensure_dir_upper(node)
        else:
            await self._copy_up(node, with_data=with_data)
        return vee

    # -- setattr and xattrs ----------------------------------------------------------------

    async def setattr(self, ino: int, ch: SetAttr, fh: int | None = None) -> Attr:
        node = self.node(ino)
        vee = await self._writable(node, with_data=ch.size != 0)
        path = self.path(node)
        if ch.size is not None:
            h = self.handles.get(fh) if fh is not None else None
            if node.is_dir:
                raise FsError(errno.EISDIR)
            if h is not None and h.fd is not None and h.writable:
                os.ftruncate(h.fd, ch.size)
            else:
                fd = vee.layer.open(path, os.O_WRONLY)
                try:
                    os.ftruncate(fd, ch.size)
                finally:
                    os.close(fd)
        if ch.uid is not None or ch.gid is not None:
            with vee.layer.at(path) if path else _root_at(vee) as (fd, name):
                os.chown(
                    name,
                    -1 if ch.uid is None else ch.uid,
                    -1 if ch.gid is None else ch.gid,
                    dir_fd=fd,
                    follow_symlinks=False,
                )
        if ch.mode is not None and node.kind != stat.S_IFLNK:
            with vee.layer.handle(path) as p:
                os.chmod(p, stat.S_IMODE(ch.mode))
        if ch.atime_ns is not None or ch.mtime_ns is not None:
            if ch.atime_ns is not None and ch.mtime_ns is not None:
                times = (ch.atime_ns, ch.mtime_ns)  # both given (utimensat, tar): no lstat
            else:
                st = vee.layer.lstat(path)
                assert st is not None
                times = (
                    st.st_atime_ns if ch.atime_ns is None else ch.atime_ns,
                    st.st_mtime_ns if ch.mtime_ns is None else ch.mtime_ns,
                )
            with vee.layer.at(path) if path else _root_at(vee) as (fd, name):
                os.utime(name, ns=times, dir_fd=fd, follow_symlinks=False)
        return self.getattr(ino)

    def listxattr(self, ino: int) -> list[bytes]:
        node = self.node(ino)
        if node.ino == ROOT_INO:
            return []
        if node.upper:
            vee = self._vee(node)
            if node.kind == stat.S_IFLNK:
                return []
            p = vee.layer.xattr_path(self.path(node))
            names = [os.fsencode(n) for n in os.listxattr(p, follow_symlinks=False)]
        else:
            assert node.lower is not None
            names = list(node.lower.xattrs)
        return [n for n in names if not n.startswith(PRIVATE_XATTR_PREFIX)]

    def getxattr(self, ino: int, name: bytes) -> bytes:
        node = self.node(ino)
        if name.startswith(PRIVATE_XATTR_PREFIX) or node.ino == ROOT_INO:
            raise FsError(errno.ENODATA)
        if node.upper:
            vee = self._vee(node)
            if node.kind == stat.S_IFLNK:
                raise FsError(errno.ENODATA)
            return os.getxattr(vee.layer.xattr_path(self.path(node)), name, follow_symlinks=False)
        assert node.lower is not None
        try:
            return node.lower.xattrs[name]
        except KeyError:
            raise FsError(errno.ENODATA) from None

    async def setxattr(self, ino: int, name: bytes, value: bytes) -> None:
        if name.startswith(PRIVATE_XATTR_PREFIX):
            raise FsError(errno.EPERM, "this xattr namespace is reserved")
        node = self.node(ino)
        vee = await self._writable(node)
        if node.kind == stat.S_IFLNK:
            raise FsError(errno.EPERM)
        with vee.layer.handle(self.path(node)) as p:
            os.setxattr(p, name, value)

    async def removexattr(self, ino: int, name: bytes) -> None:
        if name.startswith(PRIVATE_XATTR_PREFIX):
            raise FsError(errno.ENODATA)
        node = self.node(ino)
        if not node.upper and node.lower is not None and name not in node.lower.xattrs:
            raise FsError(errno.ENODATA)
        vee = await self._writable(node)
        with vee.layer.handle(self.path(node)) as p:
            os.removexattr(p, name)

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
        if self._child(parent, name) is not None:
            raise FsError(errno.EEXIST)
        self._ensure_dir_upper(parent)
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
        node = self._child(parent, name)
        if node is None:
            raise FsError(errno.EIO, "new entry vanished")
        node.nlookup += 1
        return self.getattr(node.ino)

    def mkdir(self, parent_ino: int, name: bytes, mode: int, uid: int, gid: int) -> Attr:
        vee, parent, path = self._prepare_new(parent_ino, name)
        gid, mode = self._owner(parent, uid, gid, stat.S_IFDIR | mode)
        lower = self._natural_lower(parent, name)
        vee.layer.make_dir(path, mode, uid, gid, opaque=lower is not None, replace_marker=True)
        old = vee.dirs.pop((parent.ino, name), None)
        if old is not None:
            old.parent = None
        return self._finish_new(parent, name)

    def mknod(self, parent_ino: int, name: bytes, mode: int, rdev: int, uid: int, gid: int) -> Attr:
        vee, parent, path = self._prepare_new(parent_ino, name)
        gid, mode = self._owner(parent, uid, gid, mode)
        now = _now_ns()
        if stat.S_ISREG(mode) or stat.S_IFMT(mode) == 0:
            fd = vee.layer.create(path, os.O_WRONLY, mode, uid, gid, replace=True)
            os.close(fd)
        else:
            vee.layer.make_special(path, FileMeta(mode, uid, gid, now, now, rdev=rdev))
        return self._finish_new(parent, name)

    def symlink(self, parent_ino: int, name: bytes, target: bytes, uid: int, gid: int) -> Attr:
        vee, parent, path = self._prepare_new(parent_ino, name)
        gid, _ = self._owner(parent, uid, gid, stat.S_IFLNK)
        now = _now_ns()
        vee.layer.make_special(
            path, FileMeta(stat.S_IFLNK | 0o777, uid, gid, now, now), target=target
        )
        return self._finish_new(parent, name)

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

    async def link(self, ino: int, new_parent_ino: int, new_name: bytes) -> Attr:
        node = self.node(ino)
        if node.is_dir:
            raise FsError(errno.EPERM)
        vee, parent, path = self._prepare_new(new_parent_ino, new_name)
        if node.vee is not vee and not node.shared:
            raise FsError(errno.EXDEV)
        await self._writable(node)
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
        node.nlookup += 1
        return self.getattr(node.ino)

    # -- removing names --------------------------------------------------------------------

    def _existing(self, parent_ino: int, name: bytes) -> tuple[Vee, Node, Node]:
        parent = self.node(parent_ino)
        if parent.ino == ROOT_INO:
            raise FsError(errno.EPERM, "VEE roots are removed with `vfsd vee rm`")
        vee = self._vee(parent)
        node = self._child(parent, name)
        if node is None:
            raise FsError(errno.ENOENT)
        return vee, parent, node

    def _drop_name(self, vee: Vee, parent: Node, name: bytes) -> None:
        """Make ``name`` absent in the private layer: whiteout if the template has it."""
        path = self.path(parent) + (name,)
        if self._natural_lower(parent, name) is not None:
            self._ensure_dir_upper(parent)
            vee.layer.whiteout(path)
        elif parent.upper:
            vee.layer.remove(path)

    def unlink(self, parent_ino: int, name: bytes) -> None:
        vee, parent, node = self._existing(parent_ino, name)
        if node.is_dir:
            raise FsError(errno.EISDIR)
        self._drop_name(vee, parent, name)
        node.links.discard((parent, name))
        node.seen.discard((parent, name))

    def _merged_names(self, node: Node) -> list[tuple[bytes, Node]]:
        vee = self._vee(node)
        names: dict[bytes, None] = {}
        if node.upper:
            for n, _st in vee.layer.listdir(self.path(node)):
                names[n] = None
        if node.lower is not None:
            for n, _ in vee.template.readdir(node.lower.ino):
                names[n] = None
        out = []
        for n in sorted(names):
            child = self._child(node, n)
            if child is not None:
                out.append((n, child))
        return out

    def rmdir(self, parent_ino: int, name: bytes) -> None:
        vee, parent, node = self._existing(parent_ino, name)
        if not node.is_dir:
            raise FsError(errno.ENOTDIR)
        if self._merged_names(node):
            raise FsError(errno.ENOTEMPTY)
        path = self.path(node)
        if self._natural_lower(parent, name) is not None:
            self._ensure_dir_upper(parent)
            if node.upper:
                self._exchange_with_whiteout(vee, path)
            else:
                vee.layer.whiteout(path)
        elif node.upper:
            vee.layer.remove(path)
        vee.dirs.pop((parent.ino, name), None)
        node.parent = None
        node.vee = _DEAD
        vee.layer.forget_dirs()

    def _exchange_with_whiteout(self, vee: Vee, path: tuple[bytes, ...]) -> None:
        """Atomically replace a private directory (holding only markers) by a whiteout."""
        tmp = b"rmdir-" + os.urandom(8).hex().encode()
        with vee.layer.workfd() as wfd, vee.layer.at(path) as (pfd, name):
            os.mknod(tmp, stat.S_IFCHR, os.makedev(0, 0), dir_fd=wfd)
            renameat2(wfd, tmp, pfd, name, RENAME_EXCHANGE)
            fsync_dir(pfd)
            vee.layer._rmtree_at(wfd, tmp)

    # -- rename ----------------------------------------------------------------------------

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
        dst = self._child(p2, n2)
        if dst is src:
            return
        if dst is not None:
            if flags & RENAME_NOREPLACE:
                raise FsError(errno.EEXIST)
            if src.is_dir and not dst.is_dir:
                raise FsError(errno.ENOTDIR)
            if not src.is_dir and dst.is_dir:
                raise FsError(errno.EISDIR)
            if dst.is_dir and self._merged_names(dst):
                raise FsError(errno.ENOTEMPTY)
        # 1. the source gets a private object at its old name
        if src.is_dir:
            self._ensure_dir_upper(src)
        elif src.shared:
            await self._copy_shared(vee, p1, n1, src)
        else:
            await self._copy_up(src)
        self._ensure_dir_upper(p2)
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
            with vee.layer.workfd() as wfd, vee.layer.at(dpath) as (dfd, dname):
                tmp = b"old-" + os.urandom(8).hex().encode()
                os.rename(dname, tmp, src_dir_fd=dfd, dst_dir_fd=wfd)
                vee.layer._rmtree_at(wfd, tmp)
        elif dst is None or not dst.upper:
            # a whiteout (or nothing) at the target: rename replaces a whiteout atomically
            st = vee.layer.lstat(dpath)
            if st is not None and is_whiteout(st) and src.is_dir:
                vee.layer.remove(dpath)
        # 4. move, leaving a whiteout when the template has the old name
        hide = self._natural_lower(p1, n1) is not None
        with vee.layer.at(spath) as (sfd, sname), vee.layer.at(dpath) as (dfd, dname):
            renameat2(sfd, sname, dfd, dname, RENAME_WHITEOUT if hide else 0)
            fsync_dir(dfd)
            if sfd != dfd:
                fsync_dir(sfd)
        # 5. bookkeeping (cached directory fds may name moved or removed directories)
        if src.is_dir or (dst is not None and dst.is_dir):
            vee.layer.forget_dirs()
        if dst is not None:
            if dst.is_dir:
                vee.dirs.pop((p2.ino, n2), None)
                dst.parent = None
                dst.vee = _DEAD
            else:
                dst.links.discard((p2, n2))
                dst.seen.discard((p2, n2))
        if src.is_dir:
            vee.dirs.pop((p1.ino, n1), None)
            vee.dirs[(p2.ino, n2)] = src
            src.parent, src.name = p2, n2
        else:
            src.links.discard((p1, n1))
            src.seen.discard((p1, n1))
            if src.shared:
                src.seen.add((p2, n2))
            else:
                src.links.add((p2, n2))

    async def _copy_shared(self, vee: Vee, parent: Node, name: bytes, node: Node) -> None:
        """Private copy of a shared file at one name (rename of an unmodified file)."""
        e = node.lower
        assert e is not None
        key = ("l", e.ino)
        tmpnode = vee.files.get(key)
        if tmpnode is None:
            tmpnode = Node(0, vee, node.kind, e)
            tmpnode.key = key
        tmpnode.links.add((parent, name))
        try:
            await self._copy_up(tmpnode)
        finally:
            tmpnode.links.discard((parent, name))
            if tmpnode.ino == 0:
                vee.files.pop(tmpnode.key, None)

    def _template_path(self, vee: Vee, e: Entry) -> bytes:
        paths = self._paths_cache.get(vee.template.digest)
        if paths is None:
            paths = self._paths_cache[vee.template.digest] = vee.template.paths()
        return paths[e.ino][0]

    # -- directories -----------------------------------------------------------------------

    def opendir(self, ino: int) -> int:
        node = self.node(ino)
        if not node.is_dir:
            raise FsError(errno.ENOTDIR)
        if node.ino == ROOT_INO:
            listing = [(n.encode(), v.root) for n, v in sorted(self.vees.items())]
            listing = [(n, r) for n, r in listing if r is not None]
        else:
            listing = self._merged_names(node)
        fh = self._next_fh
        self._next_fh += 1
        self.dir_handles[fh] = listing  # type: ignore[assignment]
        return fh

    def readdir(self, fh: int, start: int) -> Iterable[tuple[bytes, Attr, int]]:
        """Entries from index ``start``; the consumer takes a lookup reference per entry it
        accepts (readdirplus), by calling :meth:`count_lookup`."""
        listing = self.dir_handles[fh]
        for i in range(start, len(listing)):
            name, node = listing[i]
            try:
                attr = self.getattr(node.ino)
            except (VfsError, OSError):
                continue
            yield name, attr, i + 1

    def count_lookup(self, ino: int) -> None:
        self.nodes[ino].nlookup += 1

    def releasedir(self, fh: int) -> None:
        self.dir_handles.pop(fh, None)

    def fsyncdir(self, ino: int) -> None:
        node = self.node(ino)
        if node.upper and isinstance(node.vee, Vee):
            with node.vee.layer.dirfd(self.path(node)) as fd:
                fsync_dir(fd)

    # -- files -----------------------------------------------------------------------------

    def _new_handle(self, node: Node, fd: int | None, writable: bool) -> int:
        fh = self._next_fh
        self._next_fh += 1
        self.handles[fh] = Handle(node, fd, writable)
        return fh

    async def open(self, ino: int, flags: int) -> int:
        node = self.node(ino)
        if node.is_dir:
            raise FsError(errno.EISDIR)
        writing = (flags & os.O_ACCMODE) != os.O_RDONLY or bool(flags & os.O_TRUNC)
        if not writing:
            fd = None
            if node.upper:
                vee = self._vee(node)
                fd = vee.layer.open(self.path(node), os.O_RDONLY)
            return self._new_handle(node, fd, False)
        vee = await self._writable(node, with_data=not flags & os.O_TRUNC)
        fd = vee.layer.open(self.path(node), _open_flags(flags))
        return self._new_handle(node, fd, True)

    async def read(self, fh: int, off: int, size: int) -> bytes:
        h = self.handles[fh]
        node = h.node
        if node.upper:
            if h.fd is None:
                vee = self._vee(node)
                h.fd = vee.layer.open(self.path(node), os.O_RDONLY)
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
        data = self.content.read_local(e.oid, off, size, drop_cache=True)
        if data is None:
            data = await trio.to_thread.run_sync(
                functools.partial(self.content.read, e.oid, off, size, drop_cache=True)
            )
        return data

    def write(self, fh: int, off: int, data: bytes) -> int:
        h = self.handles[fh]
        if h.fd is None or not h.writable:
            raise FsError(errno.EBADF)
        return os.pwrite(h.fd, data, off)

    async def fsync(self, fh: int, datasync: bool) -> None:
        h = self.handles[fh]
        if h.fd is not None and h.writable:
            await trio.to_thread.run_sync(os.fdatasync if datasync else os.fsync, h.fd)

    async def fallocate(self, fh: int, mode: int, offset: int, length: int) -> None:
        """fallocate(2) with ``mode`` on the private file of a writable handle.

        The host file system answers every mode for itself (EOPNOTSUPP where it has none, so
        glibc's posix_fallocate falls back to writing as it would there); the kernel forwards
        only 0, KEEP_SIZE, PUNCH_HOLE|KEEP_SIZE and ZERO_RANGE, and keeps i_size itself
        (writeback cache). Allocation can wait on the journal: it runs in a worker thread.
        """
        import ctypes

        h = self.handles[fh]
        if h.fd is None or not h.writable:
            raise FsError(errno.EBADF)
        fd = h.fd
        libc = ctypes.CDLL(None, use_errno=True)
        libc.fallocate.argtypes = (ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64)

        def call() -> None:
            if libc.fallocate(fd, mode, offset, length) != 0:
                e = ctypes.get_errno()
                raise OSError(e, os.strerror(e))

        await trio.to_thread.run_sync(call)

    def release(self, fh: int) -> None:
        h = self.handles.pop(fh, None)
        if h is not None and h.fd is not None:
            os.close(h.fd)

    def statfs(self) -> os.statvfs_result:
        vee = next(iter(self.vees.values()), None)
        return os.statvfs(vee.layer.upper if vee else "/")

    def close(self) -> None:
        for fh in list(self.handles):
            self.release(fh)
        for vee in self.vees.values():
            vee.layer.close()


@contextlib.contextmanager
def _root_at(vee: Vee) -> Iterator[tuple[int, bytes]]:
    """(fd, ".") naming the VEE root directory itself, like PrivateLayer.at for a child."""
    with vee.layer.dirfd(()) as fd:
        yield fd, b"."


def _stat_attr(node: Node, st: os.stat_result) -> Attr:
    return Attr(
        node.ino,
        st.st_mode,
        1 if node.is_dir else st.st_nlink,
        st.st_uid,
        st.st_gid,
        st.st_rdev,
        st.st_size,
        st.st_blocks,
        st.st_atime_ns,
        st.st_mtime_ns,
        st.st_ctime_ns,
    )


def _open_flags(flags: int) -> int:
    """Open flags for the private file: the kernel runs the page cache (writeback), so O_APPEND
    is its business and a write-only open must be able to read (partial page writes)."""
    flags &= ~(os.O_CREAT | os.O_EXCL | os.O_NOCTTY | os.O_APPEND | os.O_DIRECT)
    if flags & os.O_ACCMODE == os.O_WRONLY:
        flags = (flags & ~os.O_ACCMODE) | os.O_RDWR
    return flags


def _now_ns() -> int:
    return time.time_ns()
