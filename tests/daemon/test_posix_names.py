"""POSIX conformance of a root, part 3: names — rename, link, unlink, symlink, special files,
name lengths.

See ``test_posix.py`` for how the cases run.
"""

from __future__ import annotations

import os
import stat

import pytest

from tests.daemon.posix_support import (
    FILE2_DATA,
    FILE_DATA,
    HARD_DATA,
    RENAME_EXCHANGE,
    RENAME_NOREPLACE,
    PosixRoot,
    err,
    linkat,
    read_file,
    renameat2,
    write_file,
)

# -- rename --------------------------------------------------------------------------------------


def _file(kind: str, name: str, data: bytes) -> str:
    """A file of ``kind`` ("template": t/file or t/file2 as they are; "private": new)."""
    if kind == "template":
        assert read_file(name) == data
        return name
    name = name + "-new"
    write_file(name, data)
    return name


@pytest.mark.parametrize("dst", ["absent", "template", "private"])
@pytest.mark.parametrize("src", ["template", "private"])
def test_rename_file(posix_root: PosixRoot, src: str, dst: str) -> None:
    """rename(a, b): b is a's file (content, st_ino), a is gone, b's old file is unlinked."""
    a = _file(src, "t/file", FILE_DATA)
    ino = os.stat(a).st_ino
    b = "t/deep/x/target" if dst == "absent" else _file(dst, "t/file2", FILE2_DATA)
    os.rename(a, b)
    assert err(os.lstat, a) == "ENOENT"
    assert read_file(b) == FILE_DATA
    st = os.stat(b)
    assert (st.st_nlink, stat.S_IMODE(st.st_mode)) == (1, 0o644)
    os.rename(b, a)  # and back
    assert read_file(a) == FILE_DATA and err(os.lstat, b) == "ENOENT"
    if posix_root.shared_inode_detached(src):
        assert st.st_ino != ino  # the first rename made the template file the VEE's own
        assert os.stat(a).st_ino == st.st_ino  # which the rename back kept
    else:
        assert st.st_ino == ino  # rename moves the file itself


@pytest.mark.parametrize("dst", ["template", "private"])
@pytest.mark.parametrize("src", ["template", "private"])
def test_rename_dir_over_empty_dir(posix_root: PosixRoot, src: str, dst: str) -> None:
    if src == "template":
        a = "t/dir/a"
    else:
        a = "t/pa"
        os.mkdir(a)
        write_file("t/pa/x", b"x\n")
    if dst == "template":
        b = "t/emptydir"
    else:
        b = "t/pb"
        os.mkdir(b)
    ino = os.stat(a).st_ino
    e = err(os.rename, a, b)
    if src == "template" and posix_root.lower_dir_rename_exdev:
        assert e == "EXDEV"
        return
    assert e is None
    assert err(os.lstat, a) == "ENOENT"
    assert os.listdir(b) == ["x"] and read_file(f"{b}/x") == b"x\n"
    assert os.stat(b).st_ino == ino


@pytest.mark.parametrize("src", ["template", "private"])
def test_rename_errors(posix_root: PosixRoot, src: str) -> None:
    """ENOTEMPTY, EISDIR, ENOTDIR, EINVAL (into its own subdirectory), ENOENT."""
    if src == "template":
        d, f = "t/deep", "t/file"
    else:
        d, f = "t/pd", "t/pf"
        os.makedirs("t/pd/x/y")
        write_file(f, b"f")
    os.mkdir("t/full")
    write_file("t/full/f", b"")
    for target in ("t/dir", "t/full"):  # a template and a new non-empty directory
        e = err(os.rename, d, target)
        if src == "template" and posix_root.lower_dir_rename_exdev and e == "EXDEV":
            continue  # overlayfs answers EXDEV before it looks at the target
        assert e == "ENOTEMPTY", target
    assert err(os.rename, f, "t/dir") == "EISDIR"
    assert err(os.rename, f, "t/full") == "EISDIR"
    assert err(os.rename, d, "t/file2") == "ENOTDIR"
    assert err(os.rename, d, f) == "ENOTDIR"
    assert err(os.rename, d, f"{d}/x/y/inside") == "EINVAL"
    assert err(os.rename, d, f"{d}/x") == "EINVAL"
    assert err(os.rename, "t/missing", "t/m2") == "ENOENT"
    assert err(os.rename, f, "t/missing/m2") == "ENOENT"
    assert err(os.rename, f, "t/file2/x") == "ENOTDIR"
    assert read_file(f) in (FILE_DATA, b"f") and os.path.isdir(f"{d}/x")


@pytest.mark.parametrize("kind", ["template", "private"])
def test_rename_between_hard_links_of_one_file_is_a_no_op(posix_root: PosixRoot, kind: str) -> None:
    """POSIX: if old and new are links to the same file, rename does nothing."""
    if kind == "template":
        a, b = "t/hard1", "t/hard2"
    else:
        a, b = "t/pa", "t/pb"
        write_file(a, HARD_DATA)
        os.link(a, b)
    ino = os.stat(a).st_ino
    os.rename(a, b)
    os.rename(a, a)
    for n in (a, b):
        st = os.stat(n)
        assert (st.st_ino, st.st_nlink) == (ino, 2), n
        assert read_file(n) == HARD_DATA


def test_rename_one_name_of_a_template_hard_link(posix_root: PosixRoot) -> None:
    """The renamed name stays a link of the other (no split, also on the first rename)."""
    os.rename("t/hard1", "t/moved")
    a, b = os.stat("t/moved"), os.stat("t/hard2")
    assert (a.st_ino, a.st_nlink, b.st_nlink) == (b.st_ino, 2, 2)
    with open("t/moved", "r+b") as f:
        f.write(b"via the moved name")
    assert read_file("t/hard2") == b"via the moved name" + HARD_DATA[18:]
    os.rename("t/hard2", "t/deep/x/moved2")
    assert os.stat("t/deep/x/moved2").st_ino == os.stat("t/moved").st_ino
    assert os.stat("t/moved").st_nlink == 2


def test_rename_over_a_hard_link_of_another_file(posix_root: PosixRoot) -> None:
    os.rename("t/file", "t/hard1")
    assert read_file("t/hard1") == FILE_DATA
    assert os.stat("t/hard1").st_nlink == 1
    st = os.stat("t/hard2")
    assert (st.st_nlink, read_file("t/hard2")) == (1, HARD_DATA)


def test_rename_a_template_dir_keeps_its_content(posix_root: PosixRoot) -> None:
    e = err(os.rename, "t/dir", "t/deep/x/dir2")
    if posix_root.lower_dir_rename_exdev:
        assert e == "EXDEV"
        return
    assert e is None
    assert sorted(os.listdir("t/deep/x/dir2")) == ["a", "b", "f"]
    assert read_file("t/deep/x/dir2/a/x") == b"x\n"
    assert err(os.lstat, "t/dir") == "ENOENT"
    os.mkdir("t/dir")  # the old name is free, and empty
    assert os.listdir("t/dir") == []
    os.rename("t/deep/x/dir2/a", "t/dir/a")  # a template dir out of a renamed template dir
    assert read_file("t/dir/a/x") == b"x\n"
    assert sorted(os.listdir("t/deep/x/dir2")) == ["b", "f"]


@pytest.mark.parametrize("kind", ["template", "private"])
def test_rename_noreplace(posix_root: PosixRoot, kind: str) -> None:
    a = _file(kind, "t/file", FILE_DATA)
    assert err(renameat2, a, "t/file2", RENAME_NOREPLACE) == "EEXIST"
    assert err(renameat2, a, "t/dir", RENAME_NOREPLACE) == "EEXIST"
    assert err(renameat2, a, "t/sym", RENAME_NOREPLACE) == "EEXIST"
    assert read_file(a) == FILE_DATA and read_file("t/file2") == FILE2_DATA
    renameat2(a, "t/fresh", RENAME_NOREPLACE)
    assert read_file("t/fresh") == FILE_DATA and err(os.lstat, a) == "ENOENT"
    os.mkdir("t/pd")
    renameat2("t/pd", "t/pd2", RENAME_NOREPLACE)
    assert err(renameat2, "t/pd2", "t/emptydir", RENAME_NOREPLACE) == "EEXIST"


def test_rename_exchange(posix_root: PosixRoot) -> None:
    """RENAME_EXCHANGE swaps two names atomically, also a file with a directory. An engine
    that does not claim it answers EINVAL to the first attempt; one that does must swap."""
    os.mkdir("t/pd")
    write_file("t/pd/in", b"in pd")
    write_file("t/pf", b"private file")
    e = err(renameat2, "t/file", "t/pf", RENAME_EXCHANGE)
    if e == "EINVAL" and posix_root.kind == "vee":
        assert read_file("t/file") == FILE_DATA and read_file("t/pf") == b"private file"
        return
    assert e is None
    assert read_file("t/file") == b"private file" and read_file("t/pf") == FILE_DATA
    renameat2("t/file2", "t/pd", RENAME_EXCHANGE)  # a file and a directory
    assert read_file("t/pd") == FILE2_DATA and read_file("t/file2/in") == b"in pd"
    assert os.stat("t/file2/..").st_ino == os.stat("t").st_ino
    assert err(renameat2, "t/file", "t/missing", RENAME_EXCHANGE) == "ENOENT"
    assert err(renameat2, "t/file", "t/pf", RENAME_EXCHANGE | RENAME_NOREPLACE) == "EINVAL"


# -- link and unlink ----------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["template", "private"])
def test_link(posix_root: PosixRoot, kind: str) -> None:
    a = _file(kind, "t/file", FILE_DATA)
    os.link(a, "t/deep/x/l")
    st, lt = os.stat(a), os.stat("t/deep/x/l")
    assert (st.st_ino, st.st_nlink, lt.st_nlink) == (lt.st_ino, 2, 2)
    assert read_file("t/deep/x/l") == FILE_DATA
    assert err(os.link, a, "t/file2") == "EEXIST"
    assert err(os.link, a, "t/dir") == "EEXIST"
    assert err(os.link, "t/dir", "t/dirlink") == "EPERM"
    assert err(os.link, "t/missing", "t/l2") == "ENOENT"
    assert err(os.link, a, "t/missing/l2") == "ENOENT"
    os.unlink(a)
    assert os.stat("t/deep/x/l").st_nlink == 1
    assert read_file("t/deep/x/l") == FILE_DATA


def test_link_of_symlinks_and_special_files(posix_root: PosixRoot) -> None:
    os.link("t/sym", "t/sym-l", follow_symlinks=False)  # link(2) does not follow
    assert os.readlink("t/sym-l") == "file"
    assert os.lstat("t/sym-l").st_ino == os.lstat("t/sym").st_ino
    assert os.lstat("t/sym").st_nlink == 2
    os.link("t/fifo", "t/fifo-l")
    assert stat.S_ISFIFO(os.lstat("t/fifo-l").st_mode)
    assert os.lstat("t/fifo").st_nlink == 2
    linkat("t/sym", "t/sym-followed", follow=True)
    assert os.lstat("t/sym-followed").st_ino == os.stat("t/file").st_ino


def test_unlink(posix_root: PosixRoot) -> None:
    for p in ("t/file", "t/sym", "t/dangling", "t/fifo", "t/empty"):
        os.unlink(p)
        assert err(os.lstat, p) == "ENOENT", p
    assert read_file("t/hard2") == HARD_DATA  # another file, unaffected
    assert err(os.unlink, "t/file") == "ENOENT"
    assert err(os.unlink, "t/dir") == "EISDIR"
    assert err(os.unlink, "t/file2/x") == "ENOTDIR"
    os.unlink("t/hard1")
    assert os.stat("t/hard2").st_nlink == 1
    write_file("t/hard1", b"a new file at the old name")
    assert os.stat("t/hard1").st_ino != os.stat("t/hard2").st_ino
    assert (os.stat("t/hard2").st_nlink, read_file("t/hard2")) == (1, HARD_DATA)
    write_file("t/file", b"new")
    assert read_file("t/file") == b"new" and os.stat("t/file").st_nlink == 1


# -- symlinks ----------------------------------------------------------------------------------


def test_symlink_and_readlink(posix_root: PosixRoot) -> None:
    assert os.readlink("t/sym") == "file"
    assert os.lstat("t/sym").st_size == 4
    assert read_file("t/sym") == FILE_DATA
    targets = ["file", "../t/./file", "/etc/../nowhere", "x" * 4095, "spaces and \n\t", "ü"]
    for i, target in enumerate(targets):
        os.symlink(target, f"t/s{i}")
        st = os.lstat(f"t/s{i}")
        assert stat.S_ISLNK(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o777
        assert st.st_size == len(os.fsencode(target))
        assert os.readlink(f"t/s{i}") == target
    assert err(os.symlink, "x" * 4096, "t/toolong") == "ENAMETOOLONG"
    assert err(os.symlink, "", "t/emptytarget") == "ENOENT"
    assert err(os.symlink, "file", "t/file2") == "EEXIST"
    assert err(os.symlink, "file", "t/dangling") == "EEXIST"
    assert err(os.readlink, "t/file") == "EINVAL"
    assert err(os.readlink, "t/dir") == "EINVAL"
    assert err(os.stat, "t/dangling") == "ENOENT"
    os.symlink("dir", "t/symdir")
    assert sorted(os.listdir("t/symdir")) == ["a", "b", "f"]
    assert read_file("t/symdir/a/x") == b"x\n"


def test_symlink_metadata_is_its_own(posix_root: PosixRoot) -> None:
    """lchown and lutimes change the link, not its target."""
    for link in ("t/sym", "t/s-new"):
        if link == "t/s-new":
            os.symlink("file", link)
        os.chown(link, 1000, 1001, follow_symlinks=False)
        os.utime(link, ns=(5_000_000_000, 6_000_000_000), follow_symlinks=False)
        st, ft = os.lstat(link), os.stat("t/file")
        assert (st.st_uid, st.st_gid, st.st_mtime_ns) == (1000, 1001, 6_000_000_000)
        assert (ft.st_uid, ft.st_gid) == (0, 0) and ft.st_mtime_ns != 6_000_000_000
        assert stat.S_ISLNK(st.st_mode)


# -- special files -------------------------------------------------------------------------------


@pytest.mark.parametrize("where", ["template", "new"])
def test_fifo(posix_root: PosixRoot, where: str) -> None:
    p = "t/fifo"
    if where == "new":
        p = "t/newfifo"
        os.mkfifo(p, 0o640)
        assert stat.S_IMODE(os.stat(p).st_mode) == 0o640
    assert stat.S_ISFIFO(os.stat(p).st_mode)
    r = os.open(p, os.O_RDONLY | os.O_NONBLOCK)
    try:
        w = os.open(p, os.O_WRONLY | os.O_NONBLOCK)
        try:
            assert os.write(w, b"through the pipe") == 16
            assert os.read(r, 100) == b"through the pipe"
        finally:
            os.close(w)
    finally:
        os.close(r)
    assert os.stat(p).st_size == 0
    assert err(os.mkfifo, p) == "EEXIST"


def test_mknod(posix_root: PosixRoot) -> None:
    os.mknod("t/null", stat.S_IFCHR | 0o666, os.makedev(1, 3))
    st = os.lstat("t/null")
    assert stat.S_ISCHR(st.st_mode) and st.st_rdev == os.makedev(1, 3)
    fd = os.open("t/null", os.O_RDWR)  # the device itself: writes vanish, reads are empty
    try:
        assert os.write(fd, b"gone") == 4 and os.read(fd, 10) == b""
    finally:
        os.close(fd)
    os.mknod("t/blk", stat.S_IFBLK | 0o600, os.makedev(7, 200))
    st = os.lstat("t/blk")
    assert stat.S_ISBLK(st.st_mode) and st.st_rdev == os.makedev(7, 200)
    os.mknod("t/reg", stat.S_IFREG | 0o600)
    st = os.lstat("t/reg")
    assert stat.S_ISREG(st.st_mode) and st.st_size == 0 and stat.S_IMODE(st.st_mode) == 0o600
    os.mknod("t/sock", stat.S_IFSOCK | 0o600)
    assert stat.S_ISSOCK(os.lstat("t/sock").st_mode)
    assert err(os.mknod, "t/file", stat.S_IFCHR | 0o600, os.makedev(1, 3)) == "EEXIST"
    assert sorted(n for n in os.listdir("t") if n in ("null", "blk", "reg", "sock")) == [
        "blk",
        "null",
        "reg",
        "sock",
    ]


def test_mknod_of_a_0_0_char_device(posix_root: PosixRoot) -> None:
    """A 0:0 character device is an overlayfs whiteout in a layer: overlayfs refuses to create
    one (EPERM); ext4 makes it. Either is fine; a device that turns into a whiteout is not."""
    e = err(os.mknod, "t/zero", stat.S_IFCHR | 0o600, os.makedev(0, 0))
    if e == "EPERM" and posix_root.kind != "plain":
        assert "zero" not in os.listdir("t")
        return
    assert e is None
    st = os.lstat("t/zero")
    assert stat.S_ISCHR(st.st_mode) and st.st_rdev == 0
    assert "zero" in os.listdir("t")
    e = err(os.mknod, "t/file", stat.S_IFCHR | 0o600, os.makedev(0, 0))
    assert e == "EEXIST" and read_file("t/file") == FILE_DATA


# -- name lengths --------------------------------------------------------------------------------


@pytest.mark.parametrize("where", ["t", "t/new"])
def test_name_max(posix_root: PosixRoot, where: str) -> None:
    """255 bytes is a name; 256 is ENAMETOOLONG for every call that takes one."""
    if where == "t/new":
        os.mkdir(where)
    ok, long = f"{where}/{'n' * 255}", f"{where}/{'n' * 256}"
    write_file(ok, b"255")
    assert read_file(ok) == b"255"
    os.rename(ok, ok[:-1] + "m")
    os.link(ok[:-1] + "m", ok)
    os.unlink(ok[:-1] + "m")
    os.symlink("x", f"{where}/{'s' * 255}")
    os.mkdir(f"{where}/{'d' * 255}")
    assert {len(n) for n in os.listdir(where) if n[0] in "nsd" and len(n) > 200} == {255}
    for fn, args in [
        (os.open, (long, os.O_CREAT | os.O_WRONLY, 0o644)),
        (os.open, (long, os.O_RDONLY)),
        (os.stat, (long,)),
        (os.mkdir, (long,)),
        (os.symlink, ("x", long)),
        (os.link, (ok, long)),
        (os.rename, (ok, long)),
        (os.rename, (long, f"{where}/short")),
        (os.unlink, (long,)),
        (os.rmdir, (long,)),
        (os.mkfifo, (long,)),
        (os.readlink, (long,)),
        (os.chmod, (long, 0o600)),
    ]:
        assert err(fn, *args) == "ENAMETOOLONG", (fn.__name__, args[0][-20:])
    assert read_file(ok) == b"255"
    deep = "/".join(["d" * 200] * 21)  # > PATH_MAX (4096)
    assert err(os.stat, deep) == "ENAMETOOLONG"
