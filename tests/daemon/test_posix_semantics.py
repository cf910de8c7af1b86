"""Regression tests for the POSIX findings of a real Debian in a VEE root (issue 7), through a
real mount. Each test repeats the measured failure the way it was found; the same operations on a
plain host directory in the same test are the reference where the expected value is not obvious.
"""

from __future__ import annotations

import os
import stat
import subprocess
from pathlib import Path

import pytest

from tests.daemon.conftest import wait_for
from tests.daemon.vee_helpers import make_sample_tree

pytestmark = pytest.mark.fuse


def _fd_ops_after_last_name_gone(root: Path, how: str) -> dict[str, object]:
    """Open f, remove its last name (unlink, or rename another file over it), use the fd."""
    f = root / "f"
    f.write_bytes(b"x" * 10)
    fd = os.open(f, os.O_RDWR)
    try:
        if how == "unlink":
            os.unlink(f)
        else:
            (root / "g").write_bytes(b"new")
            os.rename(root / "g", f)
        out: dict[str, object] = {"nlink": os.fstat(fd).st_nlink}
        os.write(fd, b"hello")
        os.ftruncate(fd, 3)
        os.fchmod(fd, 0o600)
        os.utime(fd, ns=(1_000_000_000, 2_000_000_000))
        os.fsync(fd)
        os.fdatasync(fd)
        st = os.fstat(fd)
        out.update(size=st.st_size, mode=stat.S_IMODE(st.st_mode), mtime=st.st_mtime_ns)
        os.lseek(fd, 0, os.SEEK_SET)
        out["data"] = os.read(fd, 100)
        out["name"] = f.read_bytes() if f.exists() else None
    finally:
        os.close(fd)  # the writeback cache sends a SETATTR here: this close used to fail (EIO)
    return out


@pytest.mark.parametrize("how", ["unlink", "rename-over"])
def test_open_file_keeps_working_after_its_last_name_is_gone(daemon, tmp_path, how):
    plain = tmp_path / "plain"
    plain.mkdir()
    want = _fd_ops_after_last_name_gone(plain, how)
    assert want["nlink"] == 0 and want["data"] == b"hel"
    assert _fd_ops_after_last_name_gone(daemon.mnt / "a", how) == want
    # the same on a template file (per-VEE copy-up of a file that has no name any more)
    vee = daemon.mnt / "a"
    fd = os.open(vee / "data/f2", os.O_RDONLY)
    try:
        os.unlink(vee / "data/f2")
        assert os.fstat(fd).st_nlink == 0
        assert os.read(fd, 100) == b"file 2\n" * 3
    finally:
        os.close(fd)


def test_issue_repro_close_of_unlinked_file(daemon):
    code = (
        'import os; open("f","w").write("x"); fd=os.open("f",os.O_RDONLY); '
        'os.unlink("f"); os.close(fd)'
    )
    p = subprocess.run(
        ["python3", "-c", code], cwd=daemon.mnt / "a", capture_output=True, text=True
    )
    assert p.returncode == 0, p.stderr


def test_new_file_never_inherits_a_deleted_files_node(daemon):
    """ext4 reuses a freed inode number at once: a file created while the kernel still holds a
    deleted file's node must get a node of its own (it got the dead one: wrong size on disk)."""
    vee = daemon.mnt / "a"
    upper = daemon.state / "vees" / "a" / "upper"
    for i in range(20):  # inode reuse is likely, not certain: try often
        a = vee / f"A{i}"
        a.write_bytes(b"A" * 4096)
        keep = os.open(a, os.O_PATH)
        try:
            os.unlink(a)
            c = vee / f"C{i}"
            c.write_bytes(b"C" * 100)
            assert os.stat(c).st_size == 100
            assert c.read_bytes() == b"C" * 100
            assert (upper / f"C{i}").read_bytes() == b"C" * 100
            s = vee / f"S{i}"  # the dpkg failure: a new symlink on a dead regular file's node
            os.unlink(c)
            os.symlink("target", s)
            assert os.readlink(s) == "target" and stat.S_ISLNK(os.lstat(s).st_mode)
            assert os.fstat(keep).st_nlink == 0
        finally:
            os.close(keep)


def test_directory_link_counts(daemon, tmp_path):
    """2 + subdirectories, as on ext4, for template, merged and private directories."""
    vee = daemon.mnt / "a"
    plain = tmp_path / "plain"
    make_sample_tree(plain)

    def counts(root: Path) -> list[int]:
        out = [os.stat(root / p).st_nlink for p in ("", "etc", "etc/conf.d", "data")]
        os.mkdir(root / "etc/new1")
        os.mkdir(root / "etc/new2")
        os.mkdir(root / "etc/new1/sub")
        out += [os.stat(root / p).st_nlink for p in ("etc", "etc/new1", "etc/new1/sub")]
        os.rename(root / "etc/new2", root / "data/moved")
        out += [os.stat(root / p).st_nlink for p in ("etc", "data")]
        os.rename(root / "etc/conf.d", root / "data/conf.d")  # a template dir moves
        out += [os.stat(root / p).st_nlink for p in ("etc", "data")]
        os.rmdir(root / "data/moved")
        os.rmdir(root / "etc/new1/sub")
        out += [os.stat(root / p).st_nlink for p in ("data", "etc/new1")]
        return out

    want = counts(plain)
    assert want[:4] == [5, 3, 2, 2]  # sanity of the reference (root: etc bin data + 2)
    assert counts(vee) == want
    assert os.stat(daemon.mnt).st_nlink == 2 + 2  # VEEs a and b


def test_readdir_has_dot_and_dotdot(daemon):
    vee = daemon.mnt / "a"
    os.mkdir(vee / "newdir")
    for d in (vee / "newdir", vee / "etc", vee):
        out = subprocess.run(["ls", "-1ai", str(d)], capture_output=True, text=True, check=True)
        entries = {line.split()[1]: int(line.split()[0]) for line in out.stdout.splitlines()}
        assert entries["."] == os.stat(d).st_ino
        assert entries[".."] == os.stat(d / "..").st_ino
    assert len(os.listdir(vee / "newdir")) == 0
    out = subprocess.run(["ls", "-la", str(vee / "newdir")], capture_output=True, text=True)
    assert len(out.stdout.splitlines()) == 3  # total, ., ..


def test_copy_up_keeps_parent_directory_times(daemon):
    """`echo x >> usr/share/doc/bash/copyright` must not re-time usr, share, doc and bash."""
    vee = daemon.mnt / "a"
    before = {p: os.stat(vee / p).st_mtime_ns for p in ("", "etc", "etc/conf.d")}
    src = {p: os.stat(daemon.root / "src" / p).st_mtime_ns for p in before}
    assert before == src
    with open(vee / "etc/conf.d/a.conf", "ab") as f:
        f.write(b"x\n")
    os.chmod(vee / "etc/hosts", 0o600)  # metadata-only change: a copy-up too
    after = {p: os.stat(vee / p).st_mtime_ns for p in before}
    assert after == before
    upper = daemon.state / "vees" / "a" / "upper"
    assert os.stat(upper / "etc/conf.d").st_mtime_ns == src["etc/conf.d"]
    # `tar` reading the tree after the change sees nothing move under it
    p = subprocess.run(["tar", "-cf", "/dev/null", "."], cwd=vee, capture_output=True, text=True)
    assert p.returncode == 0 and "changed as we read it" not in p.stderr, p.stderr


def test_rename_of_one_hard_link_of_a_template_file_keeps_the_link(daemon):
    """First rename per template inode in a fresh daemon: the names must stay one file."""
    vee = daemon.mnt / "a"
    other = daemon.mnt / "b"
    os.stat(vee / "bin/tool-link")  # both names known to the kernel before the rename
    os.rename(vee / "bin/tool", vee / "bin/tool2")
    s1 = os.stat(vee / "bin/tool2")
    assert s1.st_nlink == 2
    # The kernel drops its name of the other link after the rename returns (the invalidation
    # waits for the rename's directory lock): for that moment it still shows the template's
    # inode, with the same bytes (docs/vee-layer.md §8). Then the two names are one file.
    wait_for(
        lambda: os.stat(vee / "bin/tool-link").st_ino == s1.st_ino,
        timeout=10,
        what="the other name to show the VEE's own inode",
    )
    assert os.stat(vee / "bin/tool-link").st_nlink == 2
    with open(vee / "bin/tool-link", "ab") as f:
        f.write(b"# changed\n")
    assert (vee / "bin/tool2").read_bytes().endswith(b"# changed\n")
    assert not (vee / "bin/tool").exists()
    # the other VEE still has the template's two names, untouched and still shared
    assert (other / "bin/tool").read_bytes() == b"#!/bin/sh\necho template-tool\n"
    assert os.stat(other / "bin/tool").st_ino == os.stat(other / "bin/tool-link").st_ino
