"""POSIX conformance of a root, part 4: modes, owners, permissions, times, xattrs, statfs.

See ``test_posix.py`` for how the cases run. Cases as a non-root user run in a forked child
that drops to nobody (``as_user``); the template tree gives nobody a directory and files of
its own (``t/nobody``), a world-writable directory (``t/pub``) and a sticky one
(``t/sticky``).
"""

from __future__ import annotations

import os
import stat

import pytest

from tests.daemon.posix_support import (
    FILE_DATA,
    NOBODY,
    OTHER,
    T_MTIME_NS,
    PosixRoot,
    as_user,
    err,
    fresh_lstat,
    now_ns,
    read_file,
    tick,
    utimensat,
    write_file,
)
from tests.daemon.test_posix import FILE_KINDS, file_of_kind


def mode(p: str) -> int:
    return stat.S_IMODE(os.lstat(p).st_mode)


def append(p: str, data: bytes = b"+") -> None:
    fd = os.open(p, os.O_WRONLY | os.O_APPEND)
    try:
        os.write(fd, data)
    finally:
        os.close(fd)


# -- chmod and chown ------------------------------------------------------------------------


@pytest.mark.parametrize("kind", FILE_KINDS)
def test_chmod_sets_every_bit_and_ctime_only(posix_root: PosixRoot, kind: str) -> None:
    p = file_of_kind(posix_root, kind)
    before = os.stat(p)
    for m in (0o7777, 0o4755, 0o2711, 0o1700, 0o0, 0o640):
        tick()
        c0 = os.stat(p).st_ctime_ns
        os.chmod(p, m)
        st = os.stat(p)
        assert stat.S_IMODE(st.st_mode) == m
        assert st.st_ctime_ns > c0
        assert (st.st_mtime_ns, st.st_size) == (before.st_mtime_ns, 4096)
    os.chmod("t/sym", 0o600)  # follows the link
    assert (mode("t/file"), mode("t/sym")) == (0o600, 0o777)
    for d in ("t/dir", "t/emptydir"):
        os.chmod(d, 0o3751)
        assert mode(d) == 0o3751


@pytest.mark.parametrize("kind", FILE_KINDS)
def test_chown_by_root(posix_root: PosixRoot, kind: str) -> None:
    """Owner and group change; Linux clears S_ISUID (and S_ISGID with group-exec) of a regular
    file on every chown, by root too, even one to the same owner; directories keep theirs."""
    p = file_of_kind(posix_root, kind)
    tick()
    c0 = os.stat(p).st_ctime_ns
    os.chown(p, OTHER, OTHER + 1)
    st = os.stat(p)
    assert (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == (OTHER, OTHER + 1, 0o644)
    assert st.st_ctime_ns > c0
    os.chown(p, -1, 0)
    assert (os.stat(p).st_uid, os.stat(p).st_gid) == (OTHER, 0)
    os.chmod(p, 0o6755)
    os.chown(p, -1, -1)
    assert mode(p) == 0o755
    os.chmod(p, 0o6745)  # setgid without group-exec is not cleared
    os.chown(p, 0, 0)
    assert mode(p) == 0o2745
    for suid in ("t/suid", "t/sgid"):
        os.chown(suid, 0, 0)
    assert (mode("t/suid"), mode("t/sgid")) == (0o755, 0o755)
    os.chmod("t/dir", 0o6755)
    os.chown("t/dir", OTHER, OTHER)
    assert mode("t/dir") == 0o6755


def test_chmod_and_chown_as_a_user(posix_root: PosixRoot) -> None:
    """Only the owner may chmod; a user gives a file only to itself and its own groups; a
    user's chmod g+s of a file whose group it is not in drops the bit silently."""
    assert as_user(os.chmod, "t/file", 0o777) == "EPERM"
    assert as_user(os.chown, "t/file", NOBODY, NOBODY) == "EPERM"
    assert as_user(os.chmod, "t/nobody/f", 0o600) is None
    assert mode("t/nobody/f") == 0o600
    assert as_user(os.chown, "t/nobody/f", 0, -1) == "EPERM"
    assert as_user(os.chown, "t/nobody/f", -1, 0) == "EPERM"
    os.chown("t/nobody/f", NOBODY, 0)
    assert as_user(os.chmod, "t/nobody/f", 0o2755) is None
    assert mode("t/nobody/f") == 0o755
    assert as_user(os.chown, "t/nobody/suid", NOBODY, NOBODY) is None
    assert mode("t/nobody/suid") == 0o755


@pytest.mark.parametrize("how", ["write", "truncate", "ftruncate"])
@pytest.mark.parametrize("kind", ["template", "private"])
def test_a_users_write_clears_setuid_and_setgid(posix_root: PosixRoot, kind: str, how: str):
    """Writing or truncating a setuid/setgid file without CAP_FSETID clears both bits
    (setgid only with group-exec); root's writes keep them."""
    p = "t/nobody/suid"
    if kind == "private":
        p = "t/nobody/new"
        write_file(p, b"private setuid\n")
        os.chown(p, NOBODY, NOBODY)
        os.chmod(p, 0o6755)

    def change(path: str) -> None:
        if how == "write":
            append(path)
        elif how == "truncate":
            os.truncate(path, 3)
        else:
            fd = os.open(path, os.O_WRONLY)
            try:
                os.ftruncate(fd, 3)
            finally:
                os.close(fd)

    append(p, b"by root")
    assert mode(p) == 0o6755
    assert as_user(change, p) is None
    assert mode(p) == 0o755
    os.chmod(p, 0o2745)  # setgid without group-exec: a locking mark, kept
    assert as_user(change, p) is None
    assert mode(p) == 0o2745


# -- permissions and the sticky bit ------------------------------------------------------------


def _open_close(p: str, flags: int) -> None:
    os.close(os.open(p, flags, 0o644))


def test_permission_checks_as_a_user(posix_root: PosixRoot) -> None:
    cases = [
        (_open_close, ("t/ro/private", os.O_RDONLY), "EACCES"),
        (_open_close, ("t/ro/f", os.O_WRONLY), "EACCES"),
        (_open_close, ("t/ro/f", os.O_RDONLY | os.O_TRUNC), "EACCES"),
        (_open_close, ("t/ro/f", os.O_RDONLY), None),
        (_open_close, ("t/ro/new", os.O_CREAT | os.O_WRONLY), "EACCES"),
        (os.mkdir, ("t/ro/d",), "EACCES"),
        (os.symlink, ("x", "t/ro/s"), "EACCES"),
        (os.mkfifo, ("t/ro/p",), "EACCES"),
        (os.unlink, ("t/ro/f",), "EACCES"),
        (os.rename, ("t/ro/f", "t/pub/f"), "EACCES"),
        (os.rename, ("t/nobody/f", "t/ro/f2"), "EACCES"),
        (os.link, ("t/nobody/f", "t/ro/l"), "EACCES"),
        (os.truncate, ("t/ro/f", 0), "EACCES"),
        (os.stat, ("t/secret/f",), "EACCES"),
        (os.listdir, ("t/secret",), "EACCES"),
        (os.chdir, ("t/secret",), "EACCES"),
        (os.access, ("t/exec", os.X_OK), True),
        (os.access, ("t/file", os.X_OK), False),
        (os.access, ("t/ro/f", os.W_OK), False),
        (os.access, ("t/ro/f", os.R_OK), True),
        (os.link, ("t/ro/private", "t/pub/l"), "EPERM"),  # fs.protected_hardlinks
        (_open_close, ("t/pub/mine", os.O_CREAT | os.O_WRONLY), None),
    ]
    got = [(fn.__name__, args, as_user(fn, *args)) for fn, args, _ in cases]
    assert got == [(fn.__name__, args, want) for fn, args, want in cases]
    st = os.stat("t/pub/mine")
    assert (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == (NOBODY, NOBODY, 0o644)


@pytest.mark.parametrize("kind", ["template", "merged", "private"])
def test_permission_checks_follow_changes(posix_root: PosixRoot, kind: str) -> None:
    """Modes set in this root are what the kernel checks, for template, copied-up and new
    entries alike."""
    if kind == "template":
        d, f = "t/ro", "t/ro/f"
    elif kind == "merged":
        d, f = "t/ro", "t/ro/new"
        write_file(f, b"new in a template dir")
    else:
        d, f = "t/pd", "t/pd/f"
        os.mkdir(d)
        write_file(f, b"new")
    assert as_user(read_file, f) in (b"read only\n", b"new in a template dir", b"new")
    os.chmod(f, 0o600)
    assert as_user(read_file, f) == "EACCES"
    os.chmod(f, 0o606)
    assert as_user(write_file, f, b"by nobody") is None
    assert read_file(f) == b"by nobody"
    os.chmod(d, 0o711)
    assert as_user(os.listdir, d) == "EACCES"
    assert as_user(os.stat, f) is not None and as_user(read_file, f) == b"by nobody"
    os.chmod(d, 0o700)
    assert as_user(read_file, f) == "EACCES"
    os.chmod(d, 0o777)
    assert as_user(os.unlink, f) is None
    assert err(os.lstat, f) == "ENOENT"


def test_sticky_directory(posix_root: PosixRoot) -> None:
    """In a sticky directory only a file's owner, the directory's owner and root may remove
    or rename it."""
    s = "t/sticky"
    assert as_user(os.unlink, f"{s}/other") == "EPERM"
    assert as_user(os.rename, f"{s}/other", f"{s}/taken") == "EPERM"
    assert as_user(os.rename, f"{s}/mine", f"{s}/other") == "EPERM"
    assert as_user(write_file, f"{s}/created", b"by nobody") is None
    assert as_user(os.rename, f"{s}/mine", f"{s}/mine2") is None
    assert as_user(os.unlink, f"{s}/mine2") is None
    assert as_user(os.unlink, f"{s}/created") is None
    assert as_user(os.unlink, f"{s}/other", uid=OTHER, gid=OTHER) is None
    assert os.listdir(s) == []
    # a sticky directory made here, owned by nobody: its owner may remove anyone's file
    os.mkdir("t/pub/s")
    os.chown("t/pub/s", NOBODY, NOBODY)
    os.chmod("t/pub/s", 0o1777)
    assert as_user(write_file, "t/pub/s/f", b"other's", uid=OTHER, gid=OTHER) is None
    assert as_user(os.unlink, "t/pub/s/f") is None
    write_file("t/pub/s/r", b"root's")
    assert as_user(os.unlink, "t/pub/s/r", uid=OTHER, gid=OTHER) == "EPERM"
    os.unlink("t/pub/s/r")


# -- utimensat and the times operations change ---------------------------------------------------


def times(p: str, *, follow: bool = True) -> tuple[int, int, int]:
    st = os.stat(p) if follow else os.lstat(p)
    return st.st_atime_ns, st.st_mtime_ns, st.st_ctime_ns


@pytest.mark.parametrize("kind", [*FILE_KINDS, "dir"])
def test_utimensat(posix_root: PosixRoot, kind: str) -> None:
    p = "t/emptydir" if kind == "dir" else file_of_kind(posix_root, kind)
    a0, m0, c0 = times(p)
    tick()
    utimensat(p, "omit", "omit")
    assert times(p) == (a0, m0, c0)
    utimensat(p, 1_234_567_890_123_456_789, "omit")
    a, m, c = times(p)
    assert (a, m) == (1_234_567_890_123_456_789, m0) and c > c0
    utimensat(p, "omit", -1_500_000_001)  # before 1970, odd nanoseconds
    assert times(p)[:2] == (1_234_567_890_123_456_789, -1_500_000_001)
    utimensat(p, 4_102_444_800_000_000_001, 4_102_444_800_000_000_002)  # 2100
    assert times(p)[:2] == (4_102_444_800_000_000_001, 4_102_444_800_000_000_002)
    before = now_ns()
    tick()
    utimensat(p, "now", "now")
    a, m, c = times(p)
    assert before <= a <= now_ns() and before <= m <= now_ns() and before <= c <= now_ns()
    fd = os.open(p, os.O_RDONLY)
    try:
        os.utime(fd, ns=(7_000_000_007, 8_000_000_008))  # futimens
        assert times(p)[:2] == (7_000_000_007, 8_000_000_008)
    finally:
        os.close(fd)


def test_utimensat_of_a_symlink(posix_root: PosixRoot) -> None:
    target = times("t/file")
    utimensat("t/sym", 5_000_000_005, 6_000_000_006, follow=False)
    assert times("t/sym", follow=False)[:2] == (5_000_000_005, 6_000_000_006)
    assert times("t/file")[:2] == target[:2]
    utimensat("t/sym", 9_000_000_009, "omit")
    assert times("t/file")[0] == 9_000_000_009


def test_utimensat_permissions_as_a_user(posix_root: PosixRoot) -> None:
    """Anyone who may write a file may set its times to now; only its owner (or root) may set
    them to anything else."""
    assert as_user(utimensat, "t/sticky/other", "now", "now") is None  # 0666, not nobody's
    assert as_user(utimensat, "t/sticky/other", 1, 1) == "EPERM"
    assert as_user(utimensat, "t/file", "now", "now") == "EACCES"
    assert as_user(utimensat, "t/file", 1, 1) == "EPERM"
    assert as_user(utimensat, "t/nobody/f", 1_000_000_000, 2_000_000_000) is None
    assert times("t/nobody/f")[:2] == (1_000_000_000, 2_000_000_000)


def _assert_changed(before: tuple[int, int, int], p: str, *, m: bool, c: bool) -> None:
    _, m1, c1 = times(p, follow=False)
    assert (m1 != before[1], c1 != before[2]) == (m, c), p
    if m:
        assert m1 > before[1]
    if c:
        assert c1 > before[2]


@pytest.mark.parametrize("parent", ["template", "new"])
def test_times_of_parents_and_entries(posix_root: PosixRoot, parent: str) -> None:
    """create, mkdir, mknod, symlink, link, unlink, rmdir and rename set the changed
    directories' mtime and ctime; link, unlink and rename set the file's ctime; a new entry's
    three times are now."""
    d = "t/deep/x"
    if parent == "new":
        d = "t/pd"
        os.mkdir(d)
    ops = [
        ("create", lambda: os.close(os.open(f"{d}/f", os.O_CREAT | os.O_WRONLY)), f"{d}/f"),
        ("mkdir", lambda: os.mkdir(f"{d}/sub"), f"{d}/sub"),
        ("mkfifo", lambda: os.mkfifo(f"{d}/fifo"), f"{d}/fifo"),
        ("symlink", lambda: os.symlink("f", f"{d}/s"), f"{d}/s"),
    ]
    for name, op, new in ops:
        before = times(d)
        tick()
        t0 = now_ns()
        op()
        _assert_changed(before, d, m=True, c=True)
        a, m, c = times(new, follow=False)
        assert t0 - 10_000_000 <= m <= c <= now_ns() and a == m, name  # coarse clock: 10 ms
        if posix_root.kind != "overlay":  # overlayfs makes some entries in its workdir first
            assert m == c, name
    # (operation, the file's name before it, after it)
    for op, fa, fb in [
        (lambda: os.link(f"{d}/f", f"{d}/l"), f"{d}/f", f"{d}/f"),
        (lambda: os.unlink(f"{d}/l"), f"{d}/f", f"{d}/f"),
        (lambda: os.rename(f"{d}/f", f"{d}/g"), f"{d}/f", f"{d}/g"),
        (lambda: os.rename(f"{d}/g", "t/emptydir/g"), f"{d}/g", "t/emptydir/g"),
    ]:
        before, fbefore = times(d), times(fa)
        tick()
        op()
        _assert_changed(before, d, m=True, c=True)
        _assert_changed(fbefore, fb, m=False, c=True)
    before = times(d)
    tick()
    os.rmdir(f"{d}/sub")
    _assert_changed(before, d, m=True, c=True)
    assert times("t/emptydir")[1] > T_MTIME_NS  # the rename target directory


@pytest.mark.parametrize("kind", FILE_KINDS)
def test_times_of_a_file(posix_root: PosixRoot, kind: str) -> None:
    """write and truncate set mtime and ctime; chmod, chown and setxattr set ctime only; a
    read sets neither; none of these touches the directory."""
    p = file_of_kind(posix_root, kind)
    dir_before = times("t")
    for op, m, c in [
        (lambda: read_file(p), False, False),
        (lambda: append(p), True, True),
        (lambda: os.truncate(p, 100), True, True),
        (lambda: os.chmod(p, 0o600), False, True),
        (lambda: os.chown(p, OTHER, -1), False, True),
        (lambda: os.setxattr(p, "user.t", b"1"), False, True),
    ]:
        before = times(p)
        tick()
        op()
        _assert_changed(before, p, m=m, c=c)
    # (mtime only: a copied-up directory's ctime is its copy-up time, in overlayfs too)
    assert times("t")[1] == dir_before[1]


@pytest.mark.parametrize(
    "change", ["read", "append", "chmod", "setxattr", "truncate", "hardlink-write"]
)
def test_copy_up_keeps_the_times_of_the_parents(posix_root: PosixRoot, change: str) -> None:
    """Changing (or reading) a template file deep in the tree does not change the mtime of the
    directories above it (a copy-up is no change to them), nor its own mtime unless the change
    is to its data."""
    f = "t/deep/x/y/file"
    chain = ["t/deep/x/y", "t/deep/x", "t/deep", "t"]
    if change == "read":
        read_file(f)
    elif change == "append":
        append(f)
    elif change == "chmod":
        os.chmod(f, 0o600)
    elif change == "setxattr":
        os.setxattr(f, "user.k", b"v")
    elif change == "truncate":
        os.truncate(f, 2)
    else:
        f, chain = "t/hard2", ["t"]
        append("t/hard1")
    data_changed = change in ("append", "truncate", "hardlink-write")
    for stat_fn in (os.lstat, fresh_lstat):
        for d in chain:
            assert stat_fn(d).st_mtime_ns == T_MTIME_NS, (d, stat_fn.__name__)
        assert (stat_fn(f).st_mtime_ns == T_MTIME_NS) == (not data_changed)


# -- xattrs and statfs ----------------------------------------------------------------------------


@pytest.mark.parametrize("kind", [*FILE_KINDS, "dir"])
def test_user_xattrs(posix_root: PosixRoot, kind: str) -> None:
    p = "t/dir" if kind == "dir" else file_of_kind(posix_root, kind)
    assert err(os.getxattr, p, "user.missing") == "ENODATA"
    os.setxattr(p, "user.a", b"1")
    os.setxattr(p, "user.b", b"\0binary\xff" * 100)
    assert os.getxattr(p, "user.b") == b"\0binary\xff" * 100
    assert err(os.setxattr, p, "user.a", b"2", os.XATTR_CREATE) == "EEXIST"
    assert err(os.setxattr, p, "user.c", b"2", os.XATTR_REPLACE) == "ENODATA"
    os.setxattr(p, "user.a", b"", os.XATTR_REPLACE)
    assert os.getxattr(p, "user.a") == b""
    assert sorted(n for n in os.listxattr(p) if n.startswith("user.")) == ["user.a", "user.b"]
    os.removexattr(p, "user.a")
    assert err(os.removexattr, p, "user.a") == "ENODATA"
    assert [n for n in os.listxattr(p) if n.startswith("user.")] == ["user.b"]
    if kind != "dir":
        assert read_file(p) == FILE_DATA
    # user.* xattrs are for regular files and directories only
    assert err(lambda: os.setxattr("t/sym", "user.x", b"1", follow_symlinks=False)) == "EPERM"


def test_statfs(posix_root: PosixRoot) -> None:
    s = os.statvfs(".")
    assert s.f_namemax == 255
    assert s.f_bsize > 0 and s.f_frsize > 0
    assert s.f_blocks >= s.f_bfree >= s.f_bavail > 0
    assert s.f_files >= s.f_ffree > 0
    fd = os.open("t/file", os.O_RDONLY)
    try:
        f = os.fstatvfs(fd)
    finally:
        os.close(fd)
    for t in (f, os.statvfs("t/deep/x")):
        assert (t.f_bsize, t.f_frsize, t.f_blocks, t.f_files, t.f_namemax) == (
            s.f_bsize,
            s.f_frsize,
            s.f_blocks,
            s.f_files,
            s.f_namemax,
        )
