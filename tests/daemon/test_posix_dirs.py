"""POSIX conformance of a root, part 2: directories — link counts, readdir, mkdir/rmdir.

See ``test_posix.py`` for how the cases run. A directory under test is a template directory
nobody touched, a template directory with private changes (in overlayfs terms *merged*), or a
directory created in the case.
"""

from __future__ import annotations

import os
import stat

import pytest

from tests.daemon.posix_support import DT, PosixRoot, err, getdents, write_file

#: subdirectories of t/ in the template tree
T_SUBDIRS = 8


def nlink(p: str) -> int:
    return os.lstat(p).st_nlink


# -- link counts -------------------------------------------------------------------------------


def test_template_directory_link_counts(posix_root: PosixRoot) -> None:
    """An untouched template directory has 2 + its subdirectories, as on ext4."""
    assert nlink("t/dir") == 4
    assert nlink("t/dir/a") == 2
    assert nlink("t/emptydir") == 2
    assert nlink("t/deep") == 3
    assert nlink("t/deep/x/y") == 2
    assert nlink("t") == 2 + T_SUBDIRS
    # the root's own upper directory exists from the start in overlayfs and the VEE engine
    assert nlink(".") == posix_root.dir_nlink(3, merged=True)


def test_link_counts_follow_mkdir_and_rmdir_in_a_template_dir(posix_root: PosixRoot) -> None:
    r = posix_root
    os.mkdir("t/dir/c")
    assert nlink("t/dir") == r.dir_nlink(5, merged=True)
    assert nlink("t/dir/c") == 2
    write_file("t/dir/g", b"a file is no subdirectory")
    os.symlink("a", "t/dir/s")
    assert nlink("t/dir") == r.dir_nlink(5, merged=True)
    os.rmdir("t/dir/c")
    assert nlink("t/dir") == r.dir_nlink(4, merged=True)
    os.rmdir("t/dir/b")  # a template subdirectory
    assert nlink("t/dir") == r.dir_nlink(3, merged=True)
    os.mkdir("t/dir/b")
    assert nlink("t/dir") == r.dir_nlink(4, merged=True)
    assert nlink("t") == r.dir_nlink(2 + T_SUBDIRS, merged=True)
    fd = os.open("t/dir", os.O_RDONLY | os.O_DIRECTORY)
    try:
        assert os.fstat(fd).st_nlink == r.dir_nlink(4, merged=True)
    finally:
        os.close(fd)


def test_link_counts_follow_mkdir_and_rmdir_in_a_new_dir(posix_root: PosixRoot) -> None:
    r = posix_root
    os.mkdir("t/p")
    assert nlink("t/p") == 2
    assert nlink("t") == r.dir_nlink(3 + T_SUBDIRS, merged=True)
    os.mkdir("t/p/a")
    os.mkdir("t/p/b")
    write_file("t/p/f", b"")
    assert nlink("t/p") == 4
    os.rmdir("t/p/a")
    assert nlink("t/p") == 3
    os.rmdir("t/p/b")
    os.unlink("t/p/f")
    assert nlink("t/p") == 2
    os.rmdir("t/p")
    assert nlink("t") == r.dir_nlink(2 + T_SUBDIRS, merged=True)


def test_link_counts_follow_renames_of_a_new_dir(posix_root: PosixRoot) -> None:
    """A directory renamed into another parent moves one link (its '..') along."""
    r = posix_root
    os.mkdir("t/dir/c")
    os.rename("t/dir/c", "t/emptydir/c")
    assert nlink("t/dir") == r.dir_nlink(4, merged=True)
    assert nlink("t/emptydir") == r.dir_nlink(3, merged=True)
    assert os.stat("t/emptydir/c/..").st_ino == os.stat("t/emptydir").st_ino
    os.rename("t/emptydir/c", "t/emptydir/c2")  # within one parent: no change
    assert nlink("t/emptydir") == r.dir_nlink(3, merged=True)
    os.mkdir("t/q")
    os.rename("t/emptydir/c2", "t/q/c")
    assert (nlink("t/emptydir"), nlink("t/q")) == (r.dir_nlink(2, merged=True), 3)
    os.rename("t/q", "t/dir/q")  # a directory holding a directory
    assert nlink("t/dir") == r.dir_nlink(5, merged=True)
    assert nlink("t") == r.dir_nlink(2 + T_SUBDIRS, merged=True)
    assert nlink("t/dir/q") == 3
    write_file("t/dir/q/c/f", b"")
    os.rename("t/dir/q/c/f", "t/f")  # files move no directory link
    assert (nlink("t/dir/q/c"), nlink("t")) == (2, r.dir_nlink(2 + T_SUBDIRS, merged=True))


def test_link_counts_follow_renames_of_a_template_dir(posix_root: PosixRoot) -> None:
    r = posix_root
    e = err(os.rename, "t/dir/b", "t/emptydir/b")
    if r.lower_dir_rename_exdev:
        assert e == "EXDEV"
        return
    assert e is None
    assert (nlink("t/dir"), nlink("t/emptydir")) == (3, 3)
    assert os.stat("t/emptydir/b/..").st_ino == os.stat("t/emptydir").st_ino
    os.rename("t/dir/a", "t/deep/x/a")  # a template dir with a template file in it
    assert (nlink("t/dir"), nlink("t/deep/x")) == (2, 4)
    assert os.listdir("t/deep/x/a") == ["x"]
    os.rename("t/deep/x/a", "t/emptydir/b")  # over an empty (renamed template) directory
    assert (nlink("t/deep/x"), nlink("t/emptydir")) == (3, 3)
    assert os.listdir("t/emptydir/b") == ["x"]
    os.rename("t/dir", "t/dir2")
    assert nlink("t") == 2 + T_SUBDIRS
    assert nlink("t/dir2") == 2


# -- readdir: . and .. and every name exactly once -------------------------------------------


def _check_listing(d: str, *, parent_checked: bool = True) -> None:
    ents = getdents(d)
    names = [n for n, _, _ in ents]
    assert len(names) == len(set(names)), f"{d}: a name listed twice: {names}"
    assert sorted(names) == sorted([b".", b".."] + [os.fsencode(n) for n in os.listdir(d)])
    by_name = {n: (ino, typ) for n, ino, typ in ents}
    assert by_name[b"."] == (os.stat(d).st_ino, DT[stat.S_IFDIR]), f"{d}: '.'"
    if parent_checked:
        assert by_name[b".."] == (os.stat(f"{d}/..").st_ino, DT[stat.S_IFDIR]), f"{d}: '..'"
    for name, (ino, typ) in by_name.items():
        if name in (b".", b".."):
            continue
        st = os.lstat(os.path.join(os.fsencode(d), name))
        assert (ino, typ) == (st.st_ino, DT[stat.S_IFMT(st.st_mode)]), f"{d}/{name!r}"


def test_readdir_of_template_dirs(posix_root: PosixRoot) -> None:
    """getdents64 of untouched template directories: '.', '..', each name once, with the
    st_ino and type stat gives."""
    _check_listing(".", parent_checked=False)  # the root's '..' is another file system's
    for d in ("t", "t/dir", "t/dir/a", "t/emptydir", "t/deep/x/y", "t/sticky"):
        _check_listing(d)
    assert [n for n, _, _ in getdents("t/emptydir")] in ([b".", b".."], [b"..", b"."])


def test_readdir_of_changed_and_new_dirs(posix_root: PosixRoot) -> None:
    os.mkdir("t/dir/c")
    os.unlink("t/dir/f")  # a template name gone
    os.rmdir("t/dir/b")
    write_file("t/dir/g", b"new")
    os.symlink("g", "t/dir/s")
    os.mkfifo("t/dir/p")
    write_file("t/file", b"copied up")
    os.mkdir("t/new")
    write_file("t/new/f", b"")
    os.mkdir("t/new/sub")
    for d in ("t", "t/dir", "t/dir/c", "t/new", "t/new/sub"):
        _check_listing(d)
    assert sorted(os.listdir("t/dir")) == ["a", "c", "g", "p", "s"]


def test_readdir_of_renamed_dirs(posix_root: PosixRoot) -> None:
    os.mkdir("t/new")
    write_file("t/new/f", b"")
    os.rename("t/new", "t/dir/moved")
    _check_listing("t/dir/moved")
    _check_listing("t/dir")
    if err(os.rename, "t/dir/a", "t/emptydir/a") == "EXDEV":
        assert posix_root.lower_dir_rename_exdev
        return
    _check_listing("t/emptydir/a")
    _check_listing("t/emptydir")
    assert os.listdir("t/emptydir/a") == ["x"]


@pytest.mark.parametrize("where", ["t/dir", "t/p"])
def test_readdir_of_a_big_dir(posix_root: PosixRoot, where: str) -> None:
    """More entries than one getdents buffer holds (64 KiB): each exactly once."""
    if where == "t/p":
        os.mkdir(where)
    made = {f"{i:04d}-" + "n" * 200 for i in range(400)}
    for n in made:
        os.close(os.open(f"{where}/{n}", os.O_CREAT | os.O_WRONLY, 0o644))
    _check_listing(where)
    assert set(os.listdir(where)) - {"a", "b", "f"} == made


# -- mkdir and rmdir -------------------------------------------------------------------------


def test_mkdir_and_rmdir_errors(posix_root: PosixRoot) -> None:
    assert err(os.mkdir, "t/dir") == "EEXIST"
    assert err(os.mkdir, "t/file") == "EEXIST"
    assert err(os.mkdir, "t/sym") == "EEXIST"
    assert err(os.mkdir, "t/dangling") == "EEXIST"
    assert err(os.mkdir, "t/nodir/x") == "ENOENT"
    assert err(os.mkdir, "t/file/x") == "ENOTDIR"
    assert err(os.rmdir, "t/dir") == "ENOTEMPTY"
    assert err(os.rmdir, "t/dir/a") == "ENOTEMPTY"
    assert err(os.rmdir, "t/file") == "ENOTDIR"
    assert err(os.rmdir, "t/sym") == "ENOTDIR"
    assert err(os.rmdir, "t/missing") == "ENOENT"
    assert err(os.rmdir, "t/dir/.") == "EINVAL"
    assert err(os.rmdir, "t/dir/a/..") == "ENOTEMPTY"
    assert err(os.unlink, "t/dir") == "EISDIR"
    os.mkdir("t/p")
    write_file("t/p/f", b"")
    assert err(os.rmdir, "t/p") == "ENOTEMPTY"
    os.unlink("t/p/f")
    os.rmdir("t/p")
    assert err(os.lstat, "t/p") == "ENOENT"


def test_mkdir_mode_and_owner(posix_root: PosixRoot) -> None:
    os.umask(0o027)
    os.mkdir("t/p", 0o777)
    st = os.stat("t/p")
    assert (stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid) == (0o750, 0, 0)
    os.umask(0)
    os.mkdir("t/dir/q", 0o1777)
    assert stat.S_IMODE(os.stat("t/dir/q").st_mode) == 0o1777
    os.chmod("t/p", 0o2755)
    os.chown("t/p", -1, 4242)
    os.mkdir("t/p/sub", 0o755)  # a setgid parent passes on its group and the bit
    st = os.stat("t/p/sub")
    assert (stat.S_IMODE(st.st_mode), st.st_gid) == (0o2755, 4242)
    write_file("t/p/f", b"")
    st = os.stat("t/p/f")
    assert (stat.S_IMODE(st.st_mode), st.st_gid) == (0o644, 4242)


def test_a_recreated_template_dir_starts_empty(posix_root: PosixRoot) -> None:
    """rmdir of a template directory, then mkdir at its name: no template entry comes back."""
    os.unlink("t/dir/a/x")
    os.rmdir("t/dir/a")
    os.mkdir("t/dir/a")
    assert os.listdir("t/dir/a") == []
    assert err(os.lstat, "t/dir/a/x") == "ENOENT"
    assert nlink("t/dir/a") == 2
    for name in os.listdir("t/dir"):
        if name == "a":
            continue
        if os.path.isdir(f"t/dir/{name}"):
            os.rmdir(f"t/dir/{name}")
        else:
            os.unlink(f"t/dir/{name}")
    os.rmdir("t/dir/a")
    os.rmdir("t/dir")
    os.mkdir("t/dir")
    assert os.listdir("t/dir") == []
    _check_listing("t/dir")
    assert nlink("t/dir") == 2
