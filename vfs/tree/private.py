"""The private layer of one VEE: a plain host directory in overlayfs "upper" format.

Why this representation: an operator can inspect, back up (``tar --xattrs``, ``rsync -aHAX``) and
migrate it with ordinary tools, and it is the format kernel overlayfs itself uses, so the same
directory can be mounted as ``upperdir`` over an extracted template for forensics
(``docs/vee-layer.md``). Layout under the state directory::

    vees/<name>/upper/   the private layer: files the VEE created or changed, with their real
                         owner, mode, times and xattrs
    vees/<name>/work/    scratch space on the same file system (copy-up temp files, emptied
                         at start)

Markers (exactly overlayfs's):

- whiteout: a character device 0/0 at the deleted name hides the template entry of that name;
- opaque directory: xattr ``trusted.overlay.opaque = "y"`` hides the whole template directory
  below it (a directory deleted and recreated);
- redirect: xattr ``trusted.overlay.redirect = "/old/path"`` on a directory renamed away from
  its template location says where its template content lives (rename without EXDEV).

Safety: every path is walked component by component with ``O_NOFOLLOW``, so a symlink a VEE
planted in its own layer can never lead an operation outside that layer; names with ``/``,
NUL, ``.``/``..`` or over 255 bytes are refused before any system call.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import logging
import os
import secrets
import stat
from collections import OrderedDict
from collections.abc import Callable, Iterator
from pathlib import Path

from vfs.durable import fsync_dir
from vfs.errors import UsageError

log = logging.getLogger(__name__)

OPAQUE_XATTR = b"trusted.overlay.opaque"
REDIRECT_XATTR = b"trusted.overlay.redirect"
#: On a copied-up file: the identity of the template file it was copied from (16 bytes), so its
#: inode number stays the same (overlayfs keeps a lower file handle in ``trusted.overlay.origin``
#: for the same purpose; ours is a name overlayfs does not use, and it ignores unknown names).
ORIGIN_XATTR = b"trusted.overlay.vfs.origin"
#: xattrs in this namespace are ours: hidden from the VEE and refused when it sets them.
PRIVATE_XATTR_PREFIX = b"trusted.overlay."
NAME_MAX = 255
FD_CACHE = 1024
COPY_CHUNK = 1 << 20

RENAME_NOREPLACE = 1
RENAME_EXCHANGE = 2
RENAME_WHITEOUT = 4
_libc = ctypes.CDLL(None, use_errno=True)

_DIR_FLAGS = os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


def check_name(name: bytes) -> bytes:
    """A single path component the layer may create: no '/', NUL, '.', '..', at most 255 bytes."""
    if not name or name in (b".", b"..") or b"/" in name or b"\0" in name or len(name) > NAME_MAX:
        raise UsageError(f"invalid file name {name!r}")
    return name


def is_whiteout(st: os.stat_result) -> bool:
    return stat.S_ISCHR(st.st_mode) and st.st_rdev == 0


class PrivateLayer:
    """Operations on one VEE's private directory, addressed by component tuples.

    A path is a tuple of ``bytes`` components relative to the upper root (``()`` = the root).
    Methods raise ``OSError`` with the errno the VEE should see (ENOENT, ENOTDIR, EEXIST...), as
    a local file system would: the view passes these through unchanged.
    """

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        self.upper = self.root / "upper"
        self.work = self.root / "work"
        self._fds: OrderedDict[tuple[bytes, ...], int] = OrderedDict()
        self.root.mkdir(mode=0o700, parents=True, exist_ok=True)
        self.work.mkdir(mode=0o700, exist_ok=True)
        os.chmod(self.root, 0o700)
        self._clean_work()

    def ensure_upper(self, meta: FileMeta) -> None:
        """Create the upper root (the VEE root directory) with the template root's owner and
        mode, atomically, if it does not exist yet."""
        if self.upper.exists():
            return
        tmp = self.work / "root-new"
        tmp.mkdir(mode=0o700)
        os.chown(tmp, meta.uid, meta.gid)
        os.chmod(tmp, stat.S_IMODE(meta.mode))
        for k, v in meta.xattrs.items():
            os.setxattr(tmp, k, v)
        os.utime(tmp, ns=(meta.atime_ns, meta.mtime_ns))
        os.rename(tmp, self.upper)
        fsync_dir(self.root)

    def _clean_work(self) -> None:
        """Remove copy-up leftovers of a crash: they were never renamed into place, so no VEE
        ever saw them and nothing acknowledged lives only there."""
        for p in self.work.iterdir():
            log.info("removing copy-up leftover %s", p)
            if p.is_dir() and not p.is_symlink():
                for sub in sorted(p.rglob("*"), reverse=True):
                    if sub.is_dir() and not sub.is_symlink():
                        sub.rmdir()
                    else:
                        sub.unlink()
                p.rmdir()
            else:
                p.unlink()

    # -- walking ---------------------------------------------------------------------------

    @contextlib.contextmanager
    def dirfd(self, path: tuple[bytes, ...]) -> Iterator[int]:
        """An O_PATH fd of directory ``path``, walked without following any symlink.

        Directory fds are cached (LRU, :data:`FD_CACHE` entries): an O_PATH fd keeps naming the
        directory it was opened on, and every operation that renames or removes a directory
        calls :meth:`forget_dirs`, so a cached fd is always the walk's answer.
        """
        yield self._dirfd(path)

    def _dirfd(self, path: tuple[bytes, ...]) -> int:
        fds = self._fds
        fd = fds.get(path)
        if fd is not None:
            fds.move_to_end(path)
            return fd
        if not path:
            fd = os.open(self.upper, _DIR_FLAGS)
        else:
            parent = self._dirfd(path[:-1])
            fd = os.open(check_name(path[-1]), _DIR_FLAGS, dir_fd=parent)
        fds[path] = fd
        if len(fds) > FD_CACHE:
            # the oldest entry: never a parent of this walk (those were just used)
            os.close(fds.popitem(last=False)[1])
        return fd

    def forget_dirs(self) -> None:
        """Drop the cached directory fds (after a directory was renamed or removed)."""
        fds, self._fds = self._fds, OrderedDict()
        for fd in fds.values():
            os.close(fd)

    def close(self) -> None:
        self.forget_dirs()

    @contextlib.contextmanager
    def workfd(self) -> Iterator[int]:
        fd = os.open(self.work, _DIR_FLAGS)
        try:
            yield fd
        finally:
            os.close(fd)

    def lstat(self, path: tuple[bytes, ...]) -> os.stat_result | None:
        """lstat of ``path`` in the layer, or None when it (or a parent) is absent."""
        if not path:
            return os.lstat(self.upper)
        try:
            return os.stat(
                check_name(path[-1]), dir_fd=self._dirfd(path[:-1]), follow_symlinks=False
            )
        except (FileNotFoundError, NotADirectoryError):
            return None
        except OSError as e:
            if e.errno == errno.ELOOP:  # a symlink where a directory was expected
                return None
            raise

    def listdir(
        self, path: tuple[bytes, ...], *, noatime: bool = True
    ) -> list[tuple[bytes, os.stat_result]]:
        """Entries of a private directory with their lstat. ``noatime``: the daemon's own
        look (counting subdirectories, checking emptiness) is not a read by the VEE and must
        not move the directory's atime; a VEE's readdir passes False."""
        flags = os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC | (os.O_NOATIME if noatime else 0)
        with self.dirfd(path) as pfd:
            fd = os.open(".", flags, dir_fd=pfd)
            try:
                names = os.listdir(fd)
            finally:
                os.close(fd)
            out = []
            for n in names:
                nb = os.fsencode(n)
                with contextlib.suppress(FileNotFoundError):
                    out.append((nb, os.stat(nb, dir_fd=pfd, follow_symlinks=False)))
            return out

    # -- markers ---------------------------------------------------------------------------

    def _getxattr(self, path: tuple[bytes, ...], name: bytes) -> bytes | None:
        try:
            with self.dirfd(path) as fd:
                return os.getxattr(f"/proc/self/fd/{fd}", name)
        except OSError as e:
            if e.errno in (errno.ENODATA, errno.ENOENT, errno.ENOTDIR, errno.ELOOP):
                return None
            raise

    def is_opaque(self, path: tuple[bytes, ...]) -> bool:
        return self._getxattr(path, OPAQUE_XATTR) == b"y"

    def redirect(self, path: tuple[bytes, ...]) -> bytes | None:
        return self._getxattr(path, REDIRECT_XATTR)

    def set_dir_marker(self, path: tuple[bytes, ...], name: bytes, value: bytes | None) -> None:
        with self.dirfd(path) as fd:
            p = f"/proc/self/fd/{fd}"
            if value is None:
                with contextlib.suppress(OSError):
                    os.removexattr(p, name)
            else:
                os.setxattr(p, name, value)

    def whiteout(self, path: tuple[bytes, ...]) -> None:
        """Hide the template entry at ``path`` (replacing whatever private entry is there)."""
        with self.workfd() as wfd, self.dirfd(path[:-1]) as fd:
            name = check_name(path[-1])
            tmp = b"wh-" + secrets.token_hex(8).encode()
            os.mknod(tmp, stat.S_IFCHR | 0o000, os.makedev(0, 0), dir_fd=wfd)
            os.rename(tmp, name, src_dir_fd=wfd, dst_dir_fd=fd)
            fsync_dir(fd)

    # -- creating entries ------------------------------------------------------------------

    def remove(self, path: tuple[bytes, ...]) -> None:
        """Remove a private entry (file, marker or empty dir); absent is fine."""
        with self.dirfd(path[:-1]) as fd:
            name = check_name(path[-1])
            try:
                st = os.stat(name, dir_fd=fd, follow_symlinks=False)
            except FileNotFoundError:
                return
            if stat.S_ISDIR(st.st_mode):
                self._rmtree_at(fd, name)
            else:
                os.unlink(name, dir_fd=fd)
                return
        self.forget_dirs()

    def _rmtree_at(self, pfd: int, name: bytes) -> None:
        """Remove a private directory and its content (whiteouts of an opaque-replaced dir)."""
        fd = os.open(name, _DIR_FLAGS, dir_fd=pfd)
        try:
            rfd = os.open(".", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC, dir_fd=fd)
            try:
                names = os.listdir(rfd)
            finally:
                os.close(rfd)
            for n in names:
                st = os.stat(n, dir_fd=fd, follow_symlinks=False)
                if stat.S_ISDIR(st.st_mode):
                    self._rmtree_at(fd, os.fsencode(n))
                else:
                    os.unlink(n, dir_fd=fd)
        finally:
            os.close(fd)
        os.rmdir(name, dir_fd=pfd)

    def make_dir(
        self,
        path: tuple[bytes, ...],
        mode: int,
        uid: int,
        gid: int,
        *,
        xattrs: dict[bytes, bytes] | None = None,
        times_ns: tuple[int, int] | None = None,
        opaque: bool = False,
        redirect: bytes | None = None,
        replace_marker: bool = False,
    ) -> None:
        """Create a directory atomically with its final metadata and markers.

        Built in ``work/`` and renamed into place, so after a crash the name either does not
        exist or is a complete directory with its owner, mode and opaque/redirect markers (a
        half-made directory without its opaque marker would show template entries a VEE
        deleted). ``replace_marker``: a whiteout may be at the name and is replaced.
        """
        tmp = b"dir-" + secrets.token_hex(8).encode()
        with self.workfd() as wfd, self.dirfd(path[:-1]) as pfd:
            name = check_name(path[-1])
            os.mkdir(tmp, 0o700, dir_fd=wfd)
            p = f"/proc/self/fd/{wfd}/{os.fsdecode(tmp)}"
            os.chown(p, uid, gid)
            os.chmod(p, stat.S_IMODE(mode))
            for k, v in (xattrs or {}).items():
                os.setxattr(p, k, v)
            if opaque:
                os.setxattr(p, OPAQUE_XATTR, b"y")
            if redirect is not None:
                os.setxattr(p, REDIRECT_XATTR, redirect)
            if times_ns is not None:
                os.utime(p, ns=times_ns)
            if not replace_marker and _exists_at(pfd, name):
                os.rmdir(tmp, dir_fd=wfd)
                raise FileExistsError(errno.EEXIST, "File exists", os.fsdecode(name))
            st = None
            if replace_marker:
                with contextlib.suppress(FileNotFoundError):
                    st = os.stat(name, dir_fd=pfd, follow_symlinks=False)
                    if not is_whiteout(st):
                        os.rmdir(tmp, dir_fd=wfd)
                        raise FileExistsError(errno.EEXIST, "File exists", os.fsdecode(name))
            if st is not None:
                # a directory cannot be renamed over the whiteout: swap them atomically
                renameat2(wfd, tmp, pfd, name, RENAME_EXCHANGE)
                os.unlink(tmp, dir_fd=wfd)
            else:
                os.rename(tmp, name, src_dir_fd=wfd, dst_dir_fd=pfd)
            fsync_dir(pfd)

    def copy_file(
        self,
        path: tuple[bytes, ...],
        meta: FileMeta,
        fill: Callable[[int], None] | None,
    ) -> None:
        """Create a regular file at ``path`` atomically: :meth:`stage` then :meth:`install`.

        This is the copy-up: a crash leaves either no private file (the template one still
        shows) or the complete copy, never a truncated one.
        """
        self.install(self.stage(meta, fill), path)

    def stage(self, meta: FileMeta, fill: Callable[[int], None] | None) -> bytes:
        """Make the complete file in ``work/``: content written by ``fill(fd)``, metadata set,
        fsynced. Returns its name there. Touches no shared state (safe in a worker thread)."""
        tmp = b"copy-" + secrets.token_hex(8).encode()
        with self.workfd() as wfd:
            fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600, dir_fd=wfd)
            try:
                if fill is not None:
                    fill(fd)
                os.fchown(fd, meta.uid, meta.gid)
                os.fchmod(fd, stat.S_IMODE(meta.mode))
                for k, v in meta.xattrs.items():
                    os.setxattr(fd, k, v)
                os.utime(fd, ns=(meta.atime_ns, meta.mtime_ns))
                os.fsync(fd)
            except BaseException:
                os.close(fd)
                os.unlink(tmp, dir_fd=wfd)
                raise
            os.close(fd)
        return tmp

    def install(self, tmp: bytes, path: tuple[bytes, ...]) -> None:
        """Rename a staged file into place and fsync the directory (the atomic step)."""
        with self.workfd() as wfd, self.dirfd(path[:-1]) as pfd:
            os.rename(tmp, check_name(path[-1]), src_dir_fd=wfd, dst_dir_fd=pfd)
            fsync_dir(pfd)

    def discard(self, tmp: bytes) -> None:
        with self.workfd() as wfd, contextlib.suppress(FileNotFoundError):
            os.unlink(tmp, dir_fd=wfd)

    def make_special(
        self, path: tuple[bytes, ...], meta: FileMeta, *, target: bytes | None = None
    ) -> None:
        """Create a symlink, fifo, socket or device node atomically with its metadata."""
        tmp = b"spec-" + secrets.token_hex(8).encode()
        with self.workfd() as wfd:
            if stat.S_ISLNK(meta.mode):
                os.symlink(target or b"", tmp, dir_fd=wfd)
            else:
                os.mknod(tmp, stat.S_IFMT(meta.mode) | 0o600, meta.rdev, dir_fd=wfd)
            os.chown(tmp, meta.uid, meta.gid, dir_fd=wfd, follow_symlinks=False)
            where = f"/proc/self/fd/{wfd}/{os.fsdecode(tmp)}"
            if not stat.S_ISLNK(meta.mode):
                os.chmod(where, stat.S_IMODE(meta.mode))
                for k, v in meta.xattrs.items():
                    os.setxattr(where, k, v)
            else:  # a symlink takes trusted.* xattrs only (our origin marker among them)
                for k, v in meta.xattrs.items():
                    if k.startswith(b"trusted."):
                        os.setxattr(where, k, v, follow_symlinks=False)
            os.utime(tmp, ns=(meta.atime_ns, meta.mtime_ns), dir_fd=wfd, follow_symlinks=False)
            with self.dirfd(path[:-1]) as pfd:
                name = check_name(path[-1])
                st = None
                with contextlib.suppress(FileNotFoundError):
                    st = os.stat(name, dir_fd=pfd, follow_symlinks=False)
                if st is not None and not is_whiteout(st):
                    os.unlink(tmp, dir_fd=wfd)
                    raise FileExistsError(errno.EEXIST, "File exists", os.fsdecode(name))
                os.rename(tmp, name, src_dir_fd=wfd, dst_dir_fd=pfd)
                fsync_dir(pfd)

    def open(self, path: tuple[bytes, ...], flags: int, mode: int = 0o600) -> int:
        fd = self._dirfd(path[:-1])
        return os.open(check_name(path[-1]), flags | os.O_NOFOLLOW | os.O_CLOEXEC, mode, dir_fd=fd)

    def create(
        self, path: tuple[bytes, ...], flags: int, mode: int, uid: int, gid: int, *, replace: bool
    ) -> int:
        """Create a new regular file (O_EXCL) owned by uid:gid, its three times equal (now).

        ``replace``: a whiteout at the name is replaced atomically (the file is made in
        ``work/`` and renamed over it), so a crash never shows the deleted template file again.
        """
        oflags = (flags & ~os.O_TRUNC) | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
        with self.dirfd(path[:-1]) as pfd:
            name = check_name(path[-1])
            st = None
            if replace:
                with contextlib.suppress(FileNotFoundError):
                    st = os.stat(name, dir_fd=pfd, follow_symlinks=False)
            if st is None or not is_whiteout(st):
                fd = os.open(name, oflags, 0o600, dir_fd=pfd)
                os.fchown(fd, uid, gid)
                os.fchmod(fd, stat.S_IMODE(mode))
                os.utime(fd)  # after chown/chmod: atime = mtime = ctime, as one creat() gives
                return fd
            tmp = b"new-" + secrets.token_hex(8).encode()
            with self.workfd() as wfd:
                fd = os.open(tmp, oflags, 0o600, dir_fd=wfd)
                try:
                    os.fchown(fd, uid, gid)
                    os.fchmod(fd, stat.S_IMODE(mode))
                    os.rename(tmp, name, src_dir_fd=wfd, dst_dir_fd=pfd)
                    os.utime(fd)  # the rename moved ctime: all three now
                except BaseException:
                    os.close(fd)
                    with contextlib.suppress(OSError):
                        os.unlink(tmp, dir_fd=wfd)
                    raise
                return fd

    def touch_new(self, path: tuple[bytes, ...]) -> None:
        """Give a just-made entry atime = mtime = ctime = now (one utimensat(NULL) sets all
        three from one clock reading): what a single mkdir/mknod/symlink gives on a local disk,
        where ours were built in ``work/`` (chown, chmod, markers) and renamed into place."""
        with self.dirfd(path[:-1]) as pfd:
            os.utime(check_name(path[-1]), dir_fd=pfd, follow_symlinks=False)

    @staticmethod
    def origin_of(fd: int) -> bytes | None:
        """The template file a pinned private file was copied up from (``ORIGIN_XATTR``)."""
        try:
            # the magic link is followed to the inode itself (also a symlink's, not its target)
            return os.getxattr(proc_path(fd), ORIGIN_XATTR)
        except OSError as e:
            if e.errno in (errno.ENODATA, errno.ENOTSUP, errno.EPERM):
                return None
            raise

    def pin(self, path: tuple[bytes, ...]) -> int:
        """An ``O_PATH|O_NOFOLLOW`` fd of the entry at ``path``: the identity of a private
        inode for as long as the view's node lives. Holding it keeps the host inode (and so its
        inode number) from being freed and reused while the kernel still knows the node, and
        every fd-level operation (fstat, ftruncate, fchmod, fchown, utimes, xattrs, reopen)
        reaches the file through it, also after its last name was removed (libfuse's
        passthrough_hp keeps the same fd per inode)."""
        with self.dirfd(path[:-1]) as pfd:
            return os.open(
                check_name(path[-1]), os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=pfd
            )

    def pin_staged(self, tmp: bytes) -> int:
        """Pin a file staged in ``work/`` and remove its name there: a private copy that no
        name shows (the copy-up of a file whose last name a VEE removed while holding it)."""
        with self.workfd() as wfd:
            fd = os.open(tmp, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=wfd)
            os.unlink(tmp, dir_fd=wfd)
            return fd

    @contextlib.contextmanager
    def keeping_times(self, path: tuple[bytes, ...]) -> Iterator[None]:
        """Restore directory ``path``'s atime and mtime after the body changed its entries.

        A copy-up is not a change the VEE made: the parents of a copied-up entry keep the times
        they had (as overlayfs restores them), or ``tar`` reports "file changed as we read it"
        and make-style tools see a directory modified by a read. ctime cannot be kept."""
        with self.dirfd(path) as cached:
            fd = os.open(".", _DIR_FLAGS, dir_fd=cached)  # own fd: the body may drop the cache
        try:
            before = os.stat(fd)
            yield
            os.utime(proc_path(fd), ns=(before.st_atime_ns, before.st_mtime_ns))
        finally:
            os.close(fd)

    def replace_dir_with_whiteout(self, path: tuple[bytes, ...]) -> None:
        """Atomically replace a private directory (holding only markers) by a whiteout: a
        whiteout made in ``work/`` is exchanged with it, then the old directory is removed from
        ``work/`` (a crash in between leaves garbage only in ``work/``)."""
        tmp = b"rmdir-" + secrets.token_hex(8).encode()
        with self.workfd() as wfd, self.dirfd(path[:-1]) as pfd:
            name = check_name(path[-1])
            os.mknod(tmp, stat.S_IFCHR, os.makedev(0, 0), dir_fd=wfd)
            renameat2(wfd, tmp, pfd, name, RENAME_EXCHANGE)
            fsync_dir(pfd)
            self._rmtree_at(wfd, tmp)
        self.forget_dirs()

    def remove_dir_atomically(self, path: tuple[bytes, ...]) -> None:
        """Remove a private directory holding only markers in one step: it is renamed into
        ``work/`` (the name vanishes atomically), then deleted there."""
        tmp = b"old-" + secrets.token_hex(8).encode()
        with self.workfd() as wfd, self.dirfd(path[:-1]) as pfd:
            os.rename(check_name(path[-1]), tmp, src_dir_fd=pfd, dst_dir_fd=wfd)
            self._rmtree_at(wfd, tmp)
        self.forget_dirs()

    @contextlib.contextmanager
    def at(self, path: tuple[bytes, ...]) -> Iterator[tuple[int, bytes]]:
        """(parent O_PATH fd, checked name) of ``path`` for *at system calls."""
        yield self._dirfd(path[:-1]), check_name(path[-1])

    def xattr_path(self, path: tuple[bytes, ...]) -> bytes:
        """A path naming exactly the entry at ``path`` for the ``l*xattr`` calls (Python's
        ``follow_symlinks=False``): ``/proc/self/fd/<parent O_PATH fd>/<name>``. The parent is
        the walked, cached directory fd and the last component is not followed, so this names
        what :meth:`handle` names without opening and closing an fd per call. Only for calls
        made with ``follow_symlinks=False``."""
        if not path:
            return b"/proc/self/fd/%d/." % self._dirfd(())
        return b"/proc/self/fd/%d/%s" % (self._dirfd(path[:-1]), check_name(path[-1]))

    @contextlib.contextmanager
    def handle(self, path: tuple[bytes, ...]) -> Iterator[str]:
        """A ``/proc/self/fd/N`` path naming exactly the entry at ``path`` (not following a
        final symlink), for calls that take no dir_fd (chmod, xattrs)."""
        if not path:
            fd = os.open(self.upper, _DIR_FLAGS)
        else:
            with self.dirfd(path[:-1]) as pfd:
                fd = os.open(
                    check_name(path[-1]), os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=pfd
                )
        try:
            yield f"/proc/self/fd/{fd}"
        finally:
            os.close(fd)


def renameat2(sfd: int, sname: bytes, dfd: int, dname: bytes, flags: int) -> None:
    """renameat2(2) (RENAME_EXCHANGE, RENAME_WHITEOUT: atomic steps os.rename lacks)."""
    if flags == 0:
        os.rename(sname, dname, src_dir_fd=sfd, dst_dir_fd=dfd)
        return
    rc = _libc.renameat2(sfd, sname, dfd, dname, ctypes.c_uint(flags))
    if rc != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err), os.fsdecode(sname))


AT_EMPTY_PATH = 0x1000
_libc.fchownat.argtypes = [
    ctypes.c_int,
    ctypes.c_char_p,
    ctypes.c_uint,
    ctypes.c_uint,
    ctypes.c_int,
]


def proc_path(fd: int) -> str:
    """``/proc/self/fd/N``: names exactly the inode an (``O_PATH``) fd holds, even after its last
    name is gone — for calls that take no fd (chmod, utime, xattrs) and to reopen the file."""
    return f"/proc/self/fd/{fd}"


def chown_fd(fd: int, uid: int, gid: int) -> None:
    """fchownat(fd, "", AT_EMPTY_PATH): chown the inode an ``O_PATH`` fd holds (also a symlink,
    also with no name left); ``os.chown(fd)`` is fchown, which refuses ``O_PATH`` fds."""
    if _libc.fchownat(fd, b"", ctypes.c_uint(uid), ctypes.c_uint(gid), AT_EMPTY_PATH) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


_libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]


def fallocate(fd: int, mode: int, offset: int, length: int) -> None:
    """fallocate(2) with any ``mode`` (``os.posix_fallocate`` has none): the host file system
    answers each mode for itself."""
    if _libc.fallocate(fd, mode, offset, length) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


def reopen(fd: int, flags: int) -> int:
    """A real open file of the inode an ``O_PATH`` fd holds (works after unlink, as the kernel
    keeps the inode). ``O_NOFOLLOW`` is dropped: the magic link itself is a symlink."""
    flags &= ~(os.O_NOFOLLOW | os.O_CREAT | os.O_EXCL | os.O_DIRECTORY)
    return os.open(proc_path(fd), flags | os.O_CLOEXEC)


def _exists_at(dfd: int, name: bytes) -> bool:
    try:
        os.stat(name, dir_fd=dfd, follow_symlinks=False)
        return True
    except FileNotFoundError:
        return False


class FileMeta:
    """Metadata to give a private copy (from a template entry or an existing private file)."""

    __slots__ = ("mode", "uid", "gid", "rdev", "atime_ns", "mtime_ns", "xattrs")

    def __init__(
        self,
        mode: int,
        uid: int,
        gid: int,
        atime_ns: int,
        mtime_ns: int,
        xattrs: dict[bytes, bytes] | None = None,
        rdev: int = 0,
    ) -> None:
        self.mode = mode
        self.uid = uid
        self.gid = gid
        self.rdev = rdev
        self.atime_ns = atime_ns
        self.mtime_ns = mtime_ns
        self.xattrs = dict(xattrs or {})
