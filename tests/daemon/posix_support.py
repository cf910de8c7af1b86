"""What the POSIX conformance suite (``test_posix*.py``) stands on: the tree every root starts
from, the three roots, and the system calls Python does not wrap.

Every case runs on three roots in one session, with the test's working directory inside the
root (paths in the cases are relative, as in pjdfstest):

- ``plain``: a copy of the tree in a directory on the host's ext4 — the reference;
- ``overlay``: kernel overlayfs, lower = a copy of the tree, a fresh upper/work per case;
- ``vee``: a VEE root of a real ``vfsd serve``, the tree published as a fresh template per
  case (a salt file makes its digest unique, so no case sees another's unshared inodes).

Overlayfs is mounted with ``index=on``: without it, copying up one name of a hard-linked lower
file splits the link (a documented overlayfs limitation, not POSIX). It still deviates from
ext4 in three known ways the cases encode: a directory merged from both layers reports
``st_nlink`` 1; renaming a directory that has a lower layer fails with EXDEV (``redirect_dir``
is off in this kernel's defaults); and a lower file that lost its name while held by a
read-only or O_PATH fd (never copied up) still reports ``st_nlink`` 1 through that fd. The VEE
root must behave as ext4 in all three.

The non-root cases run in a forked child that changes to the root directory, then drops to
nobody (:func:`as_user`), so no ancestor directory needs to be searchable by nobody.
"""

from __future__ import annotations

import ctypes
import errno
import os
import pickle
import stat
import struct
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

#: the times every template entry starts with (2020-09-13, odd nanoseconds on purpose)
T_ATIME_NS = 1_600_000_000_123_456_789
T_MTIME_NS = 1_600_000_001_987_654_321
NOBODY = 65534
OTHER = 1000  # a user that is neither root nor nobody
FILE_DATA = bytes(range(256)) * 16  # t/file: 4096 bytes
FILE2_DATA = b"second file\n" * 8
HARD_DATA = b"hard-linked\n" * 25


def make_posix_tree(src: Path) -> None:
    """The template tree of the suite: every kind of entry, with fixed owners and times.

    ``t/dir`` has two subdirectories (st_nlink 4); ``t/sticky`` is 1777 with a file of
    nobody's and one of another user's; ``t/nobody`` belongs to nobody; ``t/pub`` is 0777.
    """
    src.mkdir(mode=0o755)
    t = src / "t"
    t.mkdir()

    def file(rel: str, data: bytes, mode: int = 0o644, uid: int = 0, gid: int = 0) -> Path:
        p = src / rel
        p.write_bytes(data)
        os.chown(p, uid, gid)
        os.chmod(p, mode)
        return p

    def directory(rel: str, mode: int = 0o755, uid: int = 0, gid: int = 0) -> Path:
        p = src / rel
        p.mkdir()
        os.chown(p, uid, gid)
        os.chmod(p, mode)
        return p

    file("t/file", FILE_DATA)
    file("t/file2", FILE2_DATA)
    file("t/exec", b"#!/bin/sh\nexit 0\n", 0o755)
    file("t/suid", b"setuid\n", 0o4755)
    file("t/sgid", b"setgid\n", 0o2755)
    file("t/empty", b"")
    file("t/hard1", HARD_DATA)
    os.link(src / "t/hard1", src / "t/hard2")
    os.symlink("file", src / "t/sym")
    os.symlink("nowhere", src / "t/dangling")
    os.mkfifo(src / "t/fifo", 0o644)
    directory("t/dir")
    directory("t/dir/a")
    file("t/dir/a/x", b"x\n")
    directory("t/dir/b")
    file("t/dir/f", b"f\n")
    directory("t/emptydir")
    directory("t/deep")
    directory("t/deep/x")
    directory("t/deep/x/y")
    file("t/deep/x/y/file", b"deep\n")
    directory("t/sticky", 0o1777)
    file("t/sticky/mine", b"nobody's\n", 0o644, NOBODY, NOBODY)
    file("t/sticky/other", b"other's\n", 0o666, OTHER, OTHER)
    directory("t/secret", 0o700)
    file("t/secret/f", b"secret\n", 0o600)
    directory("t/ro", 0o755)
    file("t/ro/f", b"read only\n", 0o644)
    file("t/ro/private", b"root only\n", 0o600)
    directory("t/nobody", 0o755, NOBODY, NOBODY)
    file("t/nobody/f", b"nobody's file\n", 0o644, NOBODY, NOBODY)
    file("t/nobody/suid", b"nobody's setuid\n", 0o6755, NOBODY, NOBODY)
    directory("t/pub", 0o777)
    # fixed times, children before their directories (setting a child's time does not touch
    # the directory's mtime, but creating one does)
    for dirpath, dirnames, filenames in os.walk(src, topdown=False):
        for name in filenames + dirnames:
            os.utime(Path(dirpath) / name, ns=(T_ATIME_NS, T_MTIME_NS), follow_symlinks=False)
    os.utime(src, ns=(T_ATIME_NS, T_MTIME_NS))


# -- the roots ------------------------------------------------------------------------------


@dataclass
class PosixRoot:
    """One directory under test; the case runs with its working directory here."""

    kind: str  # "plain", "overlay" or "vee"
    path: Path
    #: VEE roots: a second VEE of the same template (unsharing happens there)
    sibling: Path | None = None
    #: VEE roots: the daemon's log, and where this case's part of it starts
    log: Path | None = None
    log_start: int = 0
    cleanup: list[Callable[[], None]] = field(default_factory=list)

    @property
    def merged_nlink_is_1(self) -> bool:
        """Overlayfs reports st_nlink 1 for a directory merged from both layers."""
        return self.kind == "overlay"

    @property
    def lower_dir_rename_exdev(self) -> bool:
        """Overlayfs (redirect_dir=off) refuses to rename a directory with a lower layer."""
        return self.kind == "overlay"

    def nameless_lower_frozen(self, *, lower_only: bool, kind: str = "") -> str | None:
        """The errno with which changes fail through a read-only or O_PATH fd of a lower file
        that lost its last name (never copied up), or None where they work (POSIX, ext4).

        Overlayfs cannot copy such a file up: through that fd it still reports st_nlink 1 (the
        lower file keeps its name in the lower layer) and its old ctime; changes fail EEXIST.
        The VEE root's FUSE engine cannot tell which VEE asks about a *shared* template inode
        (docs/vee-layer.md §8): it answers st_nlink 0, and changes with no name left to retry
        through fail ESTALE. Other files of a VEE (unshared, copied, private) behave as ext4."""
        if lower_only and self.kind == "overlay":
            return "EEXIST"
        if lower_only and self.kind == "vee" and kind == "template":
            return "ESTALE"
        return None

    def nameless_lower_nlink(self) -> int:
        """st_nlink through the fd of such a frozen file (overlayfs: the lower file's 1)."""
        return 1 if self.kind == "overlay" else 0

    def shared_inode_detached(self, kind: str) -> bool:
        """The FUSE engine's shared template inodes (docs/vee-layer.md §3, the ESTALE rule):
        the first change of an unmodified template file through a name (a write, a rename, a
        link) makes it the VEE's own inode: it has a new st_ino, and an fd opened on the
        shared inode before keeps the template's content, times and st_ino. Overlayfs (since
        Linux 4.19) keeps one inode; so does the kernel engine. A documented limit."""
        return self.kind == "vee" and kind == "template"

    def unshare(self, rel: str) -> None:
        """Make the template file ``rel`` per-VEE without touching it in this root: in the VEE
        engine, a write in another VEE of the same template does that (the ESTALE rule). On
        the other roots a template file has no such state: nothing to do."""
        if self.sibling is None:
            return
        fd = os.open(self.sibling / rel, os.O_WRONLY | os.O_APPEND)
        os.close(fd)

    def dir_nlink(self, ext4: int, *, merged: bool) -> int:
        """The st_nlink a directory must report: ext4's, or 1 for an overlayfs merged dir."""
        return 1 if merged and self.merged_nlink_is_1 else ext4


def mount_overlay(lower: Path, upper: Path, work: Path, mnt: Path) -> None:
    opts = f"lowerdir={lower},upperdir={upper},workdir={work},index=on"
    subprocess.run(["mount", "-t", "overlay", "overlay", "-o", opts, str(mnt)], check=True)


def umount(mnt: Path) -> None:
    r = subprocess.run(["umount", str(mnt)], capture_output=True, check=False)
    if r.returncode != 0:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


# -- outcomes and other users ---------------------------------------------------------------


def outcome(fn: Callable[..., Any], *args: Any) -> Any:
    """``fn(*args)``'s value, or the errno name it failed with (``"EACCES"``)."""
    try:
        return fn(*args)
    except OSError as e:
        return errno.errorcode.get(e.errno or 0, str(e.errno))


def err(fn: Callable[..., Any], *args: Any) -> str | None:
    """The errno name ``fn(*args)`` fails with, None if it succeeds."""
    try:
        fn(*args)
    except OSError as e:
        return errno.errorcode.get(e.errno or 0, str(e.errno))
    return None


def as_user(fn: Callable[..., Any], *args: Any, uid: int = NOBODY, gid: int = NOBODY) -> Any:
    """Run ``fn(*args)`` in a forked child as ``uid``/``gid`` (no supplementary groups), in the
    current directory; return its :func:`outcome` (a value must pickle)."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        code = 0
        try:
            os.close(r)
            os.setgroups([])
            os.setgid(gid)
            os.setuid(uid)
            os.umask(0o022)
            data = pickle.dumps(("ok", outcome(fn, *args)))
        except BaseException as e:  # reported to the parent
            data = pickle.dumps(("exc", f"{type(e).__name__}: {e}"))
            code = 1
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(w, view) :]
        finally:
            os._exit(code)
    os.close(w)
    chunks = []
    with os.fdopen(r, "rb") as f:
        chunks.append(f.read())
    os.waitpid(pid, 0)
    kind, value = pickle.loads(b"".join(chunks))
    if kind != "ok":
        raise AssertionError(f"child as uid {uid} failed: {value}")
    return value


# -- system calls Python does not wrap ------------------------------------------------------

_libc = ctypes.CDLL(None, use_errno=True)
AT_FDCWD = -100
AT_SYMLINK_NOFOLLOW = 0x100
UTIME_NOW = (1 << 30) - 1
UTIME_OMIT = (1 << 30) - 2
RENAME_NOREPLACE = 1
RENAME_EXCHANGE = 2
FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02
FALLOC_FL_COLLAPSE_RANGE = 0x08
FALLOC_FL_ZERO_RANGE = 0x10
FALLOC_FL_INSERT_RANGE = 0x20
_SYS_GETDENTS64 = 217  # x86_64


def _check(ret: int, what: str) -> int:
    if ret < 0:
        e = ctypes.get_errno()
        raise OSError(e, f"{what}: {os.strerror(e)}")
    return ret


class _Timespec(ctypes.Structure):
    _fields_ = [("tv_sec", ctypes.c_long), ("tv_nsec", ctypes.c_long)]


def utimensat(path: str, atime: int | str, mtime: int | str, *, follow: bool = True) -> None:
    """utimensat(2) with each time a nanosecond count, ``"now"`` or ``"omit"``."""

    def ts(v: int | str) -> _Timespec:
        if v == "now":
            return _Timespec(0, UTIME_NOW)
        if v == "omit":
            return _Timespec(0, UTIME_OMIT)
        assert isinstance(v, int)
        return _Timespec(*divmod(v, 1_000_000_000))

    times = (_Timespec * 2)(ts(atime), ts(mtime))
    flags = 0 if follow else AT_SYMLINK_NOFOLLOW
    _check(_libc.utimensat(AT_FDCWD, os.fsencode(path), times, flags), "utimensat")


def renameat2(src: str, dst: str, flags: int) -> None:
    _check(
        _libc.renameat2(AT_FDCWD, os.fsencode(src), AT_FDCWD, os.fsencode(dst), flags),
        "renameat2",
    )


AT_SYMLINK_FOLLOW = 0x400


def linkat(src: str, dst: str, *, follow: bool) -> None:
    """linkat(2); ``follow`` sets AT_SYMLINK_FOLLOW (os.link calls link(2), which does not
    follow, whatever follow_symlinks says)."""
    flags = AT_SYMLINK_FOLLOW if follow else 0
    _check(_libc.linkat(AT_FDCWD, os.fsencode(src), AT_FDCWD, os.fsencode(dst), flags), "linkat")


def fallocate(fd: int, mode: int, offset: int, length: int) -> None:
    """fallocate(2) itself (os.posix_fallocate may fall back to writing zeros)."""
    fn = _libc.fallocate64
    fn.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
    _check(fn(fd, mode, offset, length), "fallocate")


def getdents(path: str) -> list[tuple[bytes, int, int]]:
    """Every entry getdents64(2) returns, ``.`` and ``..`` included: (name, d_ino, d_type)."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    out: list[tuple[bytes, int, int]] = []
    buf = ctypes.create_string_buffer(1 << 16)
    try:
        while True:
            n = _check(_libc.syscall(_SYS_GETDENTS64, fd, buf, len(buf)), "getdents64")
            if n == 0:
                return out
            raw = buf.raw[:n]
            off = 0
            while off < n:
                d_ino, _d_off, reclen, d_type = struct.unpack_from("<QqHB", raw, off)
                name = raw[off + 19 : off + reclen].split(b"\0", 1)[0]
                out.append((name, d_ino, d_type))
                off += reclen
    finally:
        os.close(fd)


DT = {stat.S_IFREG: 8, stat.S_IFDIR: 4, stat.S_IFLNK: 10, stat.S_IFIFO: 1, stat.S_IFCHR: 2}


# -- small helpers of the cases -------------------------------------------------------------


def fresh_lstat(path: str) -> os.stat_result:
    """lstat after a readdir of the parent: a FUSE mount caches attributes, and a readdir at
    offset 0 is a READDIRPLUS that refreshes every entry's, so a change the file system made
    without telling the kernel shows here (and the cached answer is checked before)."""
    getdents(os.path.dirname(path) or ".")
    return os.lstat(path)


def tick() -> None:
    """Let the coarse kernel clock move on (HZ=250: 4 ms), so a time that must change does."""
    time.sleep(0.012)


def now_ns() -> int:
    return time.time_ns()


def set_times(target: str | int, atime_ns: int, mtime_ns: int) -> None:
    os.utime(target, ns=(atime_ns, mtime_ns))


def write_file(path: str, data: bytes, mode: int = 0o644) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        assert os.write(fd, data) == len(data)
    finally:
        os.close(fd)


def read_file(path: str) -> bytes:
    fd = os.open(path, os.O_RDONLY)
    try:
        return _read_all(fd)
    finally:
        os.close(fd)


def _read_all(fd: int) -> bytes:
    chunks = []
    off = 0
    while True:
        b = os.pread(fd, 1 << 20, off)
        if not b:
            return b"".join(chunks)
        chunks.append(b)
        off += len(b)


def pread_all(fd: int) -> bytes:
    return _read_all(fd)
