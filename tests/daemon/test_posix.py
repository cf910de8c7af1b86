"""POSIX conformance of a root, part 1: open files and inode identity.

Each case runs on a plain ext4 directory, a kernel overlayfs mount and a VEE root (the
``posix_root`` fixture, see ``posix_support.py``) and asserts exactly what ext4 does. The
other parts: ``test_posix_dirs.py`` (link counts, readdir, rename, link/unlink, special
files), ``test_posix_attrs.py`` (modes, owners, permissions, times, statfs) and
``test_posix_space.py`` (truncate, open flags, fallocate, O_TMPFILE).

A regular file under test is one of four kinds (``file_of_kind``): an untouched template file,
a template file another VEE of the template has written (in the VEE engine that makes it a
per-VEE inode; elsewhere the same as untouched), a template file this root has copied up, and
a file created here.
"""

from __future__ import annotations

import mmap
import os
import stat

import pytest

from tests.daemon.posix_support import (
    FILE_DATA,
    HARD_DATA,
    OTHER,
    PosixRoot,
    err,
    pread_all,
    read_file,
    set_times,
    tick,
    write_file,
)

FILE_KINDS = ["template", "unshared", "copied", "private"]


def file_of_kind(root: PosixRoot, kind: str) -> str:
    """A regular file holding FILE_DATA, mode 0644, owned by root, of the given kind."""
    if kind == "private":
        write_file("t/new", FILE_DATA)
        return "t/new"
    if kind == "unshared":
        root.unshare("t/file")
    elif kind == "copied":
        os.close(os.open("t/file", os.O_WRONLY))  # copy-up without a change
    return "t/file"


# -- a file that lost its last name keeps working ---------------------------------------------

OPEN_MODES = {"rdwr": os.O_RDWR, "rdonly": os.O_RDONLY, "path": os.O_PATH}


@pytest.mark.parametrize("mode", list(OPEN_MODES))
@pytest.mark.parametrize("how", ["unlink", "rename_over"])
@pytest.mark.parametrize("kind", FILE_KINDS)
def test_fd_of_removed_file(posix_root: PosixRoot, kind: str, how: str, mode: str) -> None:
    """unlink(f) (or rename(g, f)) with f open: the fd keeps the file; fstat says nlink 0;
    every fd operation the open mode allows works on it; close succeeds."""
    p = file_of_kind(posix_root, kind)
    fd = os.open(p, OPEN_MODES[mode])
    try:
        if how == "unlink":
            os.unlink(p)
            assert err(os.lstat, p) == "ENOENT"
        else:
            write_file("t/repl", b"replacement")
            os.rename("t/repl", p)
            assert read_file(p) == b"replacement"
        st = os.fstat(fd)
        lower_only = kind in ("template", "unshared") and mode != "rdwr"
        frozen = posix_root.nameless_lower_frozen(lower_only=lower_only, kind=kind)
        nlink = posix_root.nameless_lower_nlink() if frozen else 0
        assert (st.st_nlink, st.st_size, stat.S_IFMT(st.st_mode)) == (nlink, 4096, stat.S_IFREG)
        assert stat.S_IMODE(st.st_mode) == 0o644
        if mode == "path":
            _o_path_fd_of_removed_file(fd, nlink, frozen)
        else:
            _open_fd_of_removed_file(fd, nlink, frozen, writable=mode == "rdwr")
    finally:
        os.close(fd)  # raises if the file system fails the close (FUSE: a late SETATTR)
    if how == "rename_over":
        assert read_file(p) == b"replacement"


def _change(frozen: str | None, fn, *args) -> bool:  # type: ignore[no-untyped-def]
    """Make a change through a nameless file's fd: it must work (True), or, on a lower file
    that cannot be copied up, fail with the root's documented errno ``frozen`` (False)."""
    if frozen:
        assert err(fn, *args) == frozen, f"{fn.__name__}{args}"
        return False
    fn(*args)
    return True


def _open_fd_of_removed_file(fd: int, nlink: int, frozen: str | None, *, writable: bool) -> None:
    assert pread_all(fd) == FILE_DATA
    if writable:
        assert os.pwrite(fd, b"more", 4096) == 4
        assert os.fstat(fd).st_size == 4100
        os.ftruncate(fd, 10)
        assert os.fstat(fd).st_size == 10
        assert pread_all(fd) == FILE_DATA[:10]
    else:
        assert err(os.ftruncate, fd, 10) == "EINVAL"
        assert err(os.write, fd, b"x") == "EBADF"
    if _change(frozen, os.fchmod, fd, 0o600):
        assert stat.S_IMODE(os.fstat(fd).st_mode) == 0o600
    if _change(frozen, os.fchown, fd, OTHER, OTHER):
        st = os.fstat(fd)
        assert (st.st_uid, st.st_gid) == (OTHER, OTHER)
    if _change(frozen, set_times, fd, 1_000_000_001, 2_000_000_002):
        st = os.fstat(fd)
        assert (st.st_atime_ns, st.st_mtime_ns) == (1_000_000_001, 2_000_000_002)
    if _change(frozen, os.setxattr, fd, "user.k", b"v"):
        assert os.getxattr(fd, "user.k") == b"v"
    os.fsync(fd)
    os.fdatasync(fd)
    if frozen == "ESTALE":
        # the shared inode belongs to every VEE: once the kernel asks again it reports the
        # template's link count (docs/vee-layer.md §8)
        assert os.fstat(fd).st_nlink in (nlink, 1)
    else:
        assert os.fstat(fd).st_nlink == nlink


def _o_path_fd_of_removed_file(fd: int, nlink: int, frozen: str | None) -> None:
    """An O_PATH fd allows fstat and the /proc/self/fd magic link, nothing that touches data."""
    assert err(os.pread, fd, 10, 0) == "EBADF"
    assert err(os.fchmod, fd, 0o600) == "EBADF"
    assert err(os.fchown, fd, OTHER, OTHER) == "EBADF"
    assert err(os.fsync, fd) == "EBADF"
    proc = f"/proc/self/fd/{fd}"
    # the magic link leads to the nameless file itself
    if _change(frozen, os.chmod, proc, 0o600):
        assert stat.S_IMODE(os.fstat(fd).st_mode) == 0o600
    if _change(frozen, os.chown, proc, OTHER, OTHER):
        assert os.fstat(fd).st_uid == OTHER
    if _change(frozen, set_times, proc, 1_000_000_001, 2_000_000_002):
        assert os.fstat(fd).st_mtime_ns == 2_000_000_002
    again = os.open(proc, os.O_RDONLY)  # reopening a nameless file through /proc works
    try:
        assert pread_all(again) == FILE_DATA
        assert os.fstat(again).st_ino == os.fstat(fd).st_ino
    finally:
        os.close(again)
    if not frozen:
        again = os.open(proc, os.O_RDWR)
        try:
            os.pwrite(again, b"AB", 0)
            assert os.pread(again, 3, 0) == b"AB" + FILE_DATA[2:3]
        finally:
            os.close(again)
    st = os.fstat(fd)
    # (a VEE's shared inode reports the template's link count once the kernel asks again)
    assert st.st_size == 4096 and st.st_nlink in ((nlink, 1) if frozen == "ESTALE" else (nlink,))


@pytest.mark.parametrize("kind", ["template", "private"])
def test_fd_of_file_that_lost_one_of_two_names(posix_root: PosixRoot, kind: str) -> None:
    """Unlinking one name of a hard-linked file: the fd and the other name are one file."""
    if kind == "template":
        a, b = "t/hard1", "t/hard2"
    else:
        a, b = "t/pa", "t/pb"
        write_file(a, HARD_DATA)
        os.link(a, b)
    fd = os.open(a, os.O_RDWR)
    try:
        os.unlink(a)
        assert os.fstat(fd).st_nlink == 1
        assert os.stat(b).st_nlink == 1
        os.pwrite(fd, b"via fd", 0)
        os.fchmod(fd, 0o640)
        os.fsync(fd)
        assert read_file(b) == b"via fd" + HARD_DATA[6:]
        st = os.stat(b)
        assert (stat.S_IMODE(st.st_mode), st.st_ino) == (0o640, os.fstat(fd).st_ino)
    finally:
        os.close(fd)


@pytest.mark.parametrize("op", ["rename", "link", "unlink-other-name", "rename-over-it"])
@pytest.mark.parametrize("kind", FILE_KINDS)
def test_close_after_a_name_change_of_an_open_file(posix_root: PosixRoot, kind: str, op: str):
    """Name changes set the file's ctime; with the file open read-only, fstat shows the new
    ctime and close succeeds (a FUSE writeback cache flushes that ctime at close)."""
    p = file_of_kind(posix_root, kind)
    if op == "unlink-other-name":
        os.link(p, "t/second")
    fd = os.open(p, os.O_RDONLY)
    try:
        before = os.fstat(fd).st_ctime_ns
        tick()
        if op == "rename":
            os.rename(p, "t/deep/moved")
        elif op == "link":
            os.link(p, "t/deep/linked")
        elif op == "unlink-other-name":
            os.unlink("t/second")
        else:
            write_file("t/other", b"other")
            os.rename("t/other", p)  # the open file loses its name this way
        st = os.fstat(fd)
        lower_only = kind in ("template", "unshared") and op == "rename-over-it"
        detached = posix_root.shared_inode_detached(kind) and op in ("rename", "link")
        # overlayfs's frozen lower file keeps its ctime (the VEE's shared inode is given the
        # new ctime by the kernel, as POSIX wants)
        frozen = posix_root.nameless_lower_frozen(lower_only=lower_only, kind=kind)
        if frozen == "EEXIST" or detached:
            assert st.st_ctime_ns == before
        else:
            assert st.st_ctime_ns > before
        assert pread_all(fd) == FILE_DATA
    finally:
        os.close(fd)


# -- inode identity ------------------------------------------------------------------------------

NEW_TYPES = ["reg", "lnk", "dir", "fifo"]


def _make(kind: str, path: str, i: int) -> None:
    if kind == "reg":
        write_file(path, b"C" * 100)
    elif kind == "lnk":
        os.symlink(f"target{i}", path)
    elif kind == "dir":
        os.mkdir(path)
    else:
        os.mkfifo(path)


def _check_new(kind: str, path: str, i: int) -> None:
    st = os.lstat(path)
    want = {"reg": stat.S_IFREG, "lnk": stat.S_IFLNK, "dir": stat.S_IFDIR, "fifo": stat.S_IFIFO}
    assert stat.S_IFMT(st.st_mode) == want[kind], path
    if kind == "reg":
        assert st.st_size == 100 and st.st_nlink == 1
        assert read_file(path) == b"C" * 100
    elif kind == "lnk":
        assert os.readlink(path) == f"target{i}"
        assert st.st_size == len(f"target{i}")
    elif kind == "dir":
        assert st.st_nlink == 2 and os.listdir(path) == []


@pytest.mark.parametrize("new", NEW_TYPES)
@pytest.mark.parametrize("holder", ["path", "rdonly"])
@pytest.mark.parametrize("dead", ["private", "copied"])
def test_new_file_never_inherits_a_deleted_file(
    posix_root: PosixRoot, dead: str, holder: str, new: str
) -> None:
    """A file deleted while an fd (O_PATH or open) still holds it, then new entries: each new
    entry is itself (type, size, content), none shares the held file's st_ino, and the held
    file stays what it was. (ext4 reuses a freed inode number at once.)"""
    a = file_of_kind(posix_root, dead)
    fd = os.open(a, os.O_PATH if holder == "path" else os.O_RDONLY)
    try:
        held = os.fstat(fd)
        os.unlink(a)
        made = []
        for i in range(4):
            path = f"t/C{i}"
            _make(new, path, i)
            made.append(path)
            assert os.lstat(path).st_ino != held.st_ino, f"{path} got the deleted file's inode"
        for i, path in enumerate(made):
            _check_new(new, path, i)
        st = os.fstat(fd)  # last: the nameless file itself (see test_fd_of_removed_file)
        assert (st.st_ino, st.st_nlink, st.st_size) == (held.st_ino, 0, 4096)
        assert stat.S_ISREG(st.st_mode)
        if holder == "rdonly":
            assert pread_all(fd) == FILE_DATA
    finally:
        os.close(fd)
    for i, path in enumerate(made):
        _check_new(new, path, i)


def _live_inodes() -> dict[int, set[str]]:
    inos: dict[int, set[str]] = {}
    for dirpath, dirnames, filenames in os.walk("."):
        for name in dirnames + filenames:
            p = os.path.join(dirpath, name)[2:]
            inos.setdefault(os.lstat(p).st_ino, set()).add(p)
    inos.setdefault(os.lstat(".").st_ino, set()).add(".")
    return inos


def test_st_ino_unique_among_live_files(posix_root: PosixRoot) -> None:
    """Distinct live entries have distinct st_ino; hard links share theirs; fstat of an fd
    and stat of its name agree; all entries are on one st_dev."""
    os.mkdir("t/pdir")
    write_file("t/pdir/f", b"1")
    os.link("t/pdir/f", "t/pdir/f-link")
    os.symlink("f", "t/pdir/sym")
    os.mkfifo("t/pdir/fifo")
    write_file("t/file", b"copied up")  # a copied-up template file
    os.link("t/file", "t/file-link")
    os.mkdir("t/dir/c")  # a merged directory gets a private child
    os.unlink("t/file2")
    write_file("t/file2", b"new file at a template name")
    groups = [paths for paths in _live_inodes().values() if len(paths) > 1]
    assert sorted(sorted(g) for g in groups) == [
        ["t/file", "t/file-link"],
        ["t/hard1", "t/hard2"],
        ["t/pdir/f", "t/pdir/f-link"],
    ]
    devs = set()
    for dirpath, dirnames, filenames in os.walk("."):
        for name in dirnames + filenames:
            devs.add(os.lstat(os.path.join(dirpath, name)).st_dev)
    assert devs == {os.lstat(".").st_dev}
    for p in ("t/file", "t/hard1", "t/pdir/f", "t/exec"):
        fd = os.open(p, os.O_RDONLY)
        try:
            assert os.fstat(fd).st_ino == os.stat(p).st_ino
        finally:
            os.close(fd)


@pytest.mark.parametrize("kind", FILE_KINDS)
def test_st_ino_stable_across_a_write(posix_root: PosixRoot, kind: str) -> None:
    """A file keeps its st_ino when it is written (copied up): tar, rsync -H and find rely on
    st_ino naming the same file for as long as it exists (ext4 and overlayfs keep it)."""
    p = file_of_kind(posix_root, kind)
    before = os.stat(p).st_ino
    fd = os.open(p, os.O_RDONLY)
    try:
        with open(p, "ab") as f:
            f.write(b"more")
        if posix_root.shared_inode_detached(kind):
            assert os.stat(p).st_ino != before  # the VEE's own inode from now on
            after = os.stat(p).st_ino
            with open(p, "ab") as f:
                f.write(b"more")
            assert os.stat(p).st_ino == after  # and it keeps that one
        else:
            assert os.stat(p).st_ino == before
        assert os.fstat(fd).st_ino == before
    finally:
        os.close(fd)
    d = os.stat("t/dir").st_ino
    os.mkdir("t/dir/c")
    assert os.stat("t/dir").st_ino == d


def test_st_ino_survives_the_kernel_forgetting_an_inode(posix_root: PosixRoot) -> None:
    """st_ino names a file for as long as it exists, not for as long as the kernel happens to
    cache its inode: after the kernel drops its dentries and inodes (a FUSE file system gets
    FORGET), every entry reports the st_ino it had. (find -inum, tar and rsync -H rely on it.)"""
    os.mkdir("t/pdir")
    write_file("t/pdir/f", b"private")
    os.symlink("f", "t/pdir/sym")
    os.mkfifo("t/pdir/fifo")
    write_file("t/file2", b"copied up")
    os.rename("t/pdir/f", "t/pdir/g")
    names = ["t/pdir", "t/pdir/g", "t/pdir/sym", "t/pdir/fifo", "t/file2", "t/file", "t/dir"]
    before = {n: os.lstat(n).st_ino for n in names}
    with open("/proc/sys/vm/drop_caches", "w") as f:
        f.write("2")  # dentries and inodes (no page cache): the kernel forgets unused inodes
    assert {n: os.lstat(n).st_ino for n in names} == before


def test_hard_links_share_everything(posix_root: PosixRoot) -> None:
    """Template and new hard links: one st_ino and nlink on every name, and a write through one
    name (the first write copies a template file up) is seen through every other name."""
    a, b = os.stat("t/hard1"), os.stat("t/hard2")
    assert a.st_ino == b.st_ino and a.st_nlink == b.st_nlink == 2
    os.link("t/hard1", "t/hard3")
    # (one st_ino on all names; that it is still a's is test_st_ino_stable_across_a_write's)
    ino = os.stat("t/hard3").st_ino
    for n in ("t/hard1", "t/hard2", "t/hard3"):
        st = os.stat(n)
        assert (st.st_ino, st.st_nlink) == (ino, 3), n
    with open("t/hard2", "r+b") as f:
        f.write(b"written via hard2")
    for n in ("t/hard1", "t/hard3"):
        assert read_file(n) == b"written via hard2" + HARD_DATA[17:], n
    os.chmod("t/hard3", 0o600)
    assert stat.S_IMODE(os.stat("t/hard1").st_mode) == 0o600
    os.unlink("t/hard1")
    assert os.stat("t/hard2").st_nlink == os.stat("t/hard3").st_nlink == 2


# -- reads and writes -----------------------------------------------------------------------------


@pytest.mark.parametrize("kind", FILE_KINDS)
def test_write_then_read_back(posix_root: PosixRoot, kind: str) -> None:
    """pwrite inside, across and beyond the end (a hole reads as zeros), read back exactly."""
    p = file_of_kind(posix_root, kind)
    fd = os.open(p, os.O_RDWR)
    try:
        assert os.pwrite(fd, b"inside", 100) == 6
        assert os.pwrite(fd, b"across-the-end", 4090) == 14
        assert os.pwrite(fd, b"far", 20000) == 3
        want = bytearray(FILE_DATA)
        want[100:106] = b"inside"
        want[4090:] = b"across-the-end"
        want += bytes(20000 - len(want)) + b"far"
        assert os.fstat(fd).st_size == 20003
        assert pread_all(fd) == bytes(want)
        assert os.pread(fd, 10, 20003) == b""
        os.lseek(fd, 0, os.SEEK_SET)
        assert os.read(fd, 6) == FILE_DATA[:6]
        assert os.lseek(fd, 0, os.SEEK_END) == 20003
    finally:
        os.close(fd)
    assert read_file(p) == bytes(want)
    assert os.stat(p).st_size == 20003


@pytest.mark.parametrize("kind", FILE_KINDS)
def test_fd_opened_before_a_write_sees_it(posix_root: PosixRoot, kind: str) -> None:
    """Every fd of a file reads what any fd wrote, also one opened read-only before the first
    write copied the file up (overlayfs has done so since 4.19)."""
    p = file_of_kind(posix_root, kind)
    ro = os.open(p, os.O_RDONLY)
    try:
        assert os.pread(ro, 4, 0) == FILE_DATA[:4]
        with open(p, "r+b") as f:
            f.write(b"NEW!")
        if posix_root.shared_inode_detached(kind):
            assert pread_all(ro) == FILE_DATA  # the old fd keeps the template's content
            ro2 = os.open(p, os.O_RDONLY)  # a new open sees the write
            try:
                assert os.pread(ro2, 4, 0) == b"NEW!"
            finally:
                os.close(ro2)
            return
        assert os.pread(ro, 4, 0) == b"NEW!"
        os.truncate(p, 8)
        assert os.fstat(ro).st_size == 8
        assert pread_all(ro) == b"NEW!" + FILE_DATA[4:8]
    finally:
        os.close(ro)


@pytest.mark.parametrize("kind", FILE_KINDS)
def test_shared_mmap_write(posix_root: PosixRoot, kind: str) -> None:
    """A MAP_SHARED store reaches the file: read(2) through another fd sees it, and after
    msync and unmap, so does a fresh open."""
    p = file_of_kind(posix_root, kind)
    fd = os.open(p, os.O_RDWR)
    other = os.open(p, os.O_RDONLY)
    try:
        m = mmap.mmap(fd, 4096, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        assert m[:8] == FILE_DATA[:8]
        m[0:6] = b"mapped"
        assert os.pread(other, 6, 0) == b"mapped"
        m.flush()
        m.close()
    finally:
        os.close(fd)
        os.close(other)
    assert read_file(p) == b"mapped" + FILE_DATA[6:]


@pytest.mark.parametrize("kind", FILE_KINDS)
def test_fsync_and_fdatasync(posix_root: PosixRoot, kind: str) -> None:
    """fsync/fdatasync succeed on read-only and read-write fds of files and on directories."""
    p = file_of_kind(posix_root, kind)
    for flags in (os.O_RDONLY, os.O_RDWR):
        fd = os.open(p, flags)
        try:
            if flags == os.O_RDWR:
                os.write(fd, b"synced")
            os.fsync(fd)
            os.fdatasync(fd)
        finally:
            os.close(fd)
    for d in (".", "t", "t/dir"):
        fd = os.open(d, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(fd)
            os.fdatasync(fd)
        finally:
            os.close(fd)
    assert read_file(p)[:6] == b"synced"
