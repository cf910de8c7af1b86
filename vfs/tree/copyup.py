"""Copy-up: how a VEE's template file or directory gets its private copy, and the ESTALE rule.

A collaborator of :class:`vfs.tree.view.Views` (which resolves names and answers requests),
kept apart because it is the one place where the view writes template content into a private
layer, and where a shared inode stops being shared (``docs/vee-layer.md`` §3-4):

- a directory's copy-up copies its metadata only, parents first, and leaves each parent's
  atime/mtime as they were (a copy-up is not a change the VEE made);
- a file's copy-up stages the complete copy in ``work/`` in a worker thread (content, owner,
  mode, xattrs, times, fsync) and renames it into place on the loop, only if the name still
  shows the file; its other hard-link names are linked to it; the copy carries the template
  file's identity (``trusted.overlay.vfs.origin``) so its inode number stays the same;
- a file the VEE removed the last name of while holding it gets a copy no name shows;
- a shared inode is never written: it is *unshared* (every VEE gets per-VEE inodes of it from
  now on) or made one VEE's *own*, and the request is answered ESTALE so the VFS retries it on
  a fresh lookup.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import logging
import os
import stat
from collections.abc import Callable
from typing import Protocol

import trio

from vfs.errors import VfsError
from vfs.tree.entry import Entry
from vfs.tree.inodes import InodeTable
from vfs.tree.nodes import _DEAD, ROOT_INO, Content, FsError, Node, StaleHandle, Vee
from vfs.tree.private import ORIGIN_XATTR, PRIVATE_XATTR_PREFIX, FileMeta

log = logging.getLogger(__name__)


class Namespace(Protocol):
    """What copy-up needs of the view: names, and the kernel's caches."""

    def path(self, node: Node) -> tuple[bytes, ...]: ...
    def child(self, parent: Node, name: bytes) -> Node | None: ...
    def invalidate_entry(self, parent: int, name: bytes) -> None: ...
    def content_errors(self, node: Node) -> contextlib.AbstractContextManager[None]: ...


def entry_meta(e: Entry) -> FileMeta:
    """What a private copy of template entry ``e`` starts with. Xattrs in the overlay marker
    namespace are never carried into the private layer, whatever a template says: there they
    would act as opaque/redirect markers (and the kernel engine reads the same names)."""
    xattrs = {k: v for k, v in e.xattrs.items() if not k.startswith(PRIVATE_XATTR_PREFIX)}
    return FileMeta(e.mode, e.uid, e.gid, e.atime_ns, e.mtime_ns, xattrs, e.rdev)


class CopyUp:
    """Copy-up and unsharing for the nodes of one :class:`InodeTable`."""

    def __init__(
        self,
        names: Namespace,
        inodes: InodeTable,
        content: Content,
        *,
        fetch_threads: trio.CapacityLimiter,
        disk_threads: trio.CapacityLimiter,
    ) -> None:
        self.names = names
        self.inodes = inodes
        self.content = content
        self.fetch_threads = fetch_threads
        self.disk_threads = disk_threads
        self._locks: dict[int, trio.Lock] = {}

    # -- the ESTALE rule ---------------------------------------------------------------------

    def unshare(self, node: Node) -> StaleHandle:
        """Turn a shared inode into per-VEE inodes from now on (the ESTALE rule)."""
        assert node.template is not None and node.lower is not None
        key = self.inodes.identity(node.template, node.lower)
        self.inodes.unshared.add(key)
        for parent, name in node.seen:
            self.names.invalidate_entry(parent.ino, name)
        node.seen.clear()
        log.debug("unshared template file %s", key.hex())
        return StaleHandle("shared template inode modified: look the name up again")

    def own(self, vee: Vee, node: Node) -> StaleHandle:
        """Make a shared inode's file this VEE's own (other VEEs keep sharing it): this VEE's
        names of it are looked up again and yield a per-VEE inode (the ESTALE rule, for one
        VEE: possible where the request names the VEE, i.e. for names, not inodes)."""
        assert node.template is not None and node.lower is not None
        vee.own.add(self.inodes.identity(vee.template, node.lower))
        for p, n in [(p, n) for p, n in node.seen if p.vee is vee]:
            node.seen.discard((p, n))
            self.names.invalidate_entry(p.ino, n)
        return StaleHandle("template file becomes this VEE's own: look the name up again")

    # -- copy-up -------------------------------------------------------------------------------

    async def writable(self, node: Node, *, with_data: bool = True) -> Vee:
        """Make ``node`` privately modifiable in its VEE (copy-up), ESTALE if it is shared."""
        if node.ino == ROOT_INO:
            raise FsError(errno.EPERM)
        if node.shared:
            raise self.unshare(node)
        vee = _vee_of(node)
        if node.upper:
            return vee  # already private (the common case: no copy-up, no lock)
        if node.is_dir:
            self.ensure_dir(node)
        else:
            for _ in range(3):  # a rename racing the copy-up: copy again at the new name
                try:
                    await self._copy_file(node, with_data=with_data)
                    break
                except FsError as e:
                    if e.errno != errno.EAGAIN:
                        raise
            else:
                raise FsError(errno.EBUSY, "file keeps being renamed during its copy-up")
        return vee

    def ensure_dir(self, node: Node) -> None:
        """Give directory ``node`` (and its parents) a private directory (metadata copy-up).

        The parent keeps its times: a copy-up is not a change the VEE made."""
        if node.upper:
            return
        vee = _vee_of(node)
        assert node.parent is not None
        self.ensure_dir(node.parent)
        e = node.lower
        assert e is not None
        path = self.names.path(node)
        with vee.layer.keeping_times(path[:-1]):
            vee.layer.make_dir(
                path,
                e.mode,
                e.uid,
                e.gid,
                xattrs=entry_meta(e).xattrs,
                times_ns=(e.atime_ns, e.mtime_ns),
            )
        node.upper = True
        node.nsub = None

    async def _copy_file(self, node: Node, *, with_data: bool = True) -> None:
        """Give a per-VEE template file a private copy (all its hard-link names too).

        A file whose last name the VEE removed while holding it gets a private copy that no
        name shows (made in ``work/``, pinned, unlinked there), as the host would keep it."""
        if node.upper:
            return
        lock = self._locks.setdefault(node.ino, trio.Lock())
        async with lock:
            if node.upper:
                return
            vee = _vee_of(node)
            e = node.lower
            assert e is not None and not node.is_dir
            path = self.names.path(node) if node.links else None
            if path is not None:
                self.ensure_dir(next(iter(node.links))[0])
            meta = entry_meta(e)
            # the private copy remembers the template file it came from: its node keeps the
            # same inode number when it is made again (after a FORGET, after a restart)
            meta.xattrs[ORIGIN_XATTR] = self.inodes.identity(vee.template, e)
            if stat.S_ISREG(e.mode):
                fill = self._filler(e) if with_data and e.oid and e.size else None
                # Staging (copy + fsync) runs in a thread whatever the size: an fsync costs
                # milliseconds, the thread hop ~0.1 ms, and the loop keeps serving every VEE.
                # Only the atomic rename into place happens here, if the name still shows
                # this file.
                with self.names.content_errors(node):
                    if fill is not None and not self.content.has_local(e.oid or ""):
                        await trio.to_thread.run_sync(
                            functools.partial(self.content.ensure, e.oid, expected_size=e.size),
                            limiter=self.fetch_threads,
                        )
                    tmp = await trio.to_thread.run_sync(
                        vee.layer.stage, meta, fill, limiter=self.disk_threads
                    )
                if node.vee is not vee:
                    vee.layer.discard(tmp)
                    raise FsError(errno.ESTALE, "VEE removed during a copy-up")
                try:
                    still = path is not None and self.names.path(node) == path
                except FsError:
                    still = False
                if not still:
                    if node.links:  # renamed meanwhile: the next attempt copies it anew
                        vee.layer.discard(tmp)
                        raise FsError(errno.EAGAIN, "file renamed during its copy-up")
                    self._set_upper(node, vee, vee.layer.pin_staged(tmp))
                    return
                with vee.layer.keeping_times(path[:-1]):
                    vee.layer.install(tmp, path)
            elif path is None:
                raise FsError(errno.ENOENT, "a removed special file cannot be changed")
            else:
                with vee.layer.keeping_times(path[:-1]):
                    vee.layer.make_special(path, meta, target=e.target)
            # hard links: every other template name of this inode that still shows it
            if e.nlink > 1:
                self._relink_group(vee, node, path)
            self._set_upper(node, vee, vee.layer.pin(path))
        self._locks.pop(node.ino, None)

    def _set_upper(self, node: Node, vee: Vee, fd: int) -> None:
        """Node ``node`` now shows the private inode pinned by ``fd``."""
        st = os.stat(fd)
        node.upper = True
        self.inodes.add_pin(node, fd)
        if vee.files.get(node.key) is node:
            del vee.files[node.key]
        node.key = ("u", st.st_dev, st.st_ino)
        vee.files[node.key] = node

    def _relink_group(self, vee: Vee, node: Node, path: tuple[bytes, ...]) -> None:
        """After a copy-up of a hard-linked template file at ``path``, link every other name of
        the template inode that still shows it in this VEE (whether through ``node`` or the
        shared inode) to the copy, so the names stay one file."""
        e = node.lower
        assert e is not None
        for tpath in self.inodes.paths(vee.template).get(e.ino, []):
            comps = tuple(tpath.split(b"/"))
            if comps == path:
                continue
            try:
                parent = self._walk(vee, comps[:-1])
                if parent is None:
                    continue
                child = self.names.child(parent, comps[-1])
                if child is None or (child is not node and (child.upper or child.lower is not e)):
                    continue  # the name was removed or replaced in this VEE
                self.ensure_dir(parent)
                with (
                    vee.layer.keeping_times(comps[:-1]),
                    vee.layer.at(path) as (sfd, sname),
                    vee.layer.at(comps) as (dfd, dname),
                ):
                    os.link(sname, dname, src_dir_fd=sfd, dst_dir_fd=dfd, follow_symlinks=False)
                if child is not node:  # the shared inode's name now shows the private copy
                    child.seen.discard((parent, comps[-1]))
                    self.names.invalidate_entry(parent.ino, comps[-1])
                node.links.add((parent, comps[-1]))
            except (VfsError, OSError) as exc:
                log.warning("hard link %r not re-created after copy-up: %s", tpath, exc)

    def _walk(self, vee: Vee, comps: tuple[bytes, ...]) -> Node | None:
        n = vee.root
        for c in comps:
            if n is None or not n.is_dir:
                return None
            n = self.names.child(n, c)
        return n

    def _filler(self, e: Entry) -> Callable[[int], None]:
        content = self.content
        oid, size, extents = e.oid, e.size, e.data_extents
        assert oid is not None

        def fill(fd: int) -> None:
            """Copy the template content's data extents, leaving holes and all-zero blocks as
            holes (sparse files)."""
            os.ftruncate(fd, size)
            zero = bytes(1 << 16)
            for start, length in extents:
                off, end = start, start + length
                while off < end:
                    chunk = content.read(oid, off, min(1 << 20, end - off), expected_size=size)
                    if not chunk:
                        raise FsError(errno.EIO, f"template object {oid[:16]}… is short")
                    for i in range(0, len(chunk), 1 << 16):
                        piece = chunk[i : i + (1 << 16)]
                        if piece != zero[: len(piece)]:
                            os.pwrite(fd, piece, off + i)
                    off += len(chunk)

        return fill


def _vee_of(node: Node) -> Vee:
    if node.vee is None or node.vee is _DEAD:
        raise FsError(errno.EPERM if node.ino == ROOT_INO else errno.ESTALE)
    assert isinstance(node.vee, Vee)
    return node.vee
