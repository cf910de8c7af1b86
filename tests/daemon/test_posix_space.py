"""POSIX conformance of a root, part 5: file sizes and open flags — truncate, O_CREAT|O_EXCL,
O_TRUNC, O_APPEND, O_NOFOLLOW, fallocate(2) and O_TMPFILE.

See ``test_posix.py`` for how the cases run.
"""

from __future__ import annotations

import os
import stat

import pytest

from tests.daemon.posix_support import (
    FALLOC_FL_COLLAPSE_RANGE,
    FALLOC_FL_INSERT_RANGE,
    FALLOC_FL_KEEP_SIZE,
    FALLOC_FL_PUNCH_HOLE,
    FALLOC_FL_ZERO_RANGE,
    FILE_DATA,
    HARD_DATA,
    PosixRoot,
    err,
    fallocate,
    linkat,
    pread_all,
    read_file,
    tick,
    write_file,
)
from tests.daemon.test_posix import FILE_KINDS, file_of_kind

# -- truncate --------------------------------------------------------------------------------------


@pytest.mark.parametrize("via", ["path", "fd"])
@pytest.mark.parametrize("kind", FILE_KINDS)
def test_truncate_down_then_up_reads_zeros(posix_root: PosixRoot, kind: str, via: str) -> None:
    """Bytes cut off by a truncate are gone: growing the file again shows zeros, not them."""
    p = file_of_kind(posix_root, kind)

    def trunc(size: int) -> None:
        if via == "path":
            os.truncate(p, size)
            return
        fd = os.open(p, os.O_WRONLY)
        try:
            os.ftruncate(fd, size)
        finally:
            os.close(fd)

    for size, want in [
        (10, FILE_DATA[:10]),
        (5000, FILE_DATA[:10] + bytes(4990)),
        (3, FILE_DATA[:3]),
        (1 << 20, FILE_DATA[:3] + bytes((1 << 20) - 3)),
        (0, b""),
    ]:
        before = os.stat(p)
        tick()
        trunc(size)
        st = os.stat(p)
        assert st.st_size == size
        assert st.st_mtime_ns > before.st_mtime_ns and st.st_ctime_ns > before.st_ctime_ns
        assert read_file(p) == want


def test_truncate_of_a_hard_linked_template_file(posix_root: PosixRoot) -> None:
    os.truncate("t/hard1", 5)
    assert read_file("t/hard2") == HARD_DATA[:5] and os.stat("t/hard2").st_size == 5
    os.truncate("t/hard2", 20)
    assert read_file("t/hard1") == HARD_DATA[:5] + bytes(15)


def test_truncate_up_makes_a_hole(posix_root: PosixRoot) -> None:
    """ext4 allocates nothing for a hole: a file grown by truncate has no blocks."""
    write_file("t/sparse", b"")
    os.truncate("t/sparse", 64 << 20)
    st = os.stat("t/sparse")
    assert (st.st_size, st.st_blocks) == (64 << 20, 0)
    os.truncate("t/empty", 1 << 20)  # a template file
    st = os.stat("t/empty")
    assert (st.st_size, st.st_blocks) == (1 << 20, 0)


def test_truncate_errors(posix_root: PosixRoot) -> None:
    assert err(os.truncate, "t/file", -1) == "EINVAL"
    assert err(os.truncate, "t/dir", 0) == "EISDIR"
    assert err(os.truncate, "t/missing", 0) == "ENOENT"
    assert err(os.truncate, "t/fifo", 0) == "EINVAL"
    fd = os.open("t/file", os.O_RDONLY)
    try:
        assert err(os.ftruncate, fd, 0) == "EINVAL"
    finally:
        os.close(fd)
    assert read_file("t/file") == FILE_DATA


# -- open flags ---------------------------------------------------------------------------------


def test_o_creat_o_excl(posix_root: PosixRoot) -> None:
    write_file("t/private", b"p")
    flags = os.O_CREAT | os.O_EXCL | os.O_WRONLY
    for p in ("t/file", "t/private", "t/sym", "t/dangling", "t/dir", "t/fifo", "t/hard2"):
        assert err(os.open, p, flags, 0o600) == "EEXIST", p
    assert err(lambda: os.lstat("t/nowhere")) == "ENOENT"  # the dangling link was not followed
    os.umask(0o077)
    fd = os.open("t/fresh", flags, 0o777)
    os.close(fd)
    st = os.stat("t/fresh")
    assert (stat.S_IMODE(st.st_mode), st.st_size, st.st_uid) == (0o700, 0, 0)
    assert err(os.open, "t/fresh", flags, 0o600) == "EEXIST"
    assert err(os.open, "t/dir", os.O_CREAT | os.O_WRONLY, 0o600) == "EISDIR"
    assert err(os.open, "t/missing/x", flags, 0o600) == "ENOENT"
    assert err(os.open, "t/file/x", flags, 0o600) == "ENOTDIR"


def test_o_creat_through_a_dangling_symlink(posix_root: PosixRoot) -> None:
    fd = os.open("t/dangling", os.O_CREAT | os.O_WRONLY, 0o644)
    try:
        os.write(fd, b"created through the link")
    finally:
        os.close(fd)
    assert read_file("t/nowhere") == b"created through the link"
    assert os.readlink("t/dangling") == "nowhere"


@pytest.mark.parametrize("kind", FILE_KINDS)
def test_o_trunc(posix_root: PosixRoot, kind: str) -> None:
    p = file_of_kind(posix_root, kind)
    before = os.stat(p)
    tick()
    fd = os.open(p, os.O_WRONLY | os.O_TRUNC)
    try:
        st = os.fstat(fd)
        assert st.st_size == 0
    finally:
        os.close(fd)
    st = os.stat(p)
    assert st.st_size == 0 and read_file(p) == b""
    assert st.st_mtime_ns > before.st_mtime_ns and st.st_ctime_ns > before.st_ctime_ns


def test_o_trunc_of_empty_and_linked_files(posix_root: PosixRoot) -> None:
    """O_TRUNC of an existing empty file still sets mtime and ctime (Linux, POSIX); of one name
    of a hard-linked file empties every name."""
    before = os.stat("t/empty")
    tick()
    os.close(os.open("t/empty", os.O_WRONLY | os.O_TRUNC))
    st = os.stat("t/empty")
    assert st.st_mtime_ns > before.st_mtime_ns and st.st_ctime_ns > before.st_ctime_ns
    os.close(os.open("t/hard1", os.O_RDWR | os.O_TRUNC))
    assert (os.stat("t/hard2").st_size, read_file("t/hard2")) == (0, b"")


@pytest.mark.parametrize("kind", FILE_KINDS)
def test_o_append(posix_root: PosixRoot, kind: str) -> None:
    """Every write of an O_APPEND fd goes to the end of the file as it is then, whatever the
    offset (Linux: pwrite too), also with another O_APPEND fd writing in between."""
    p = file_of_kind(posix_root, kind)
    a = os.open(p, os.O_WRONLY | os.O_APPEND)
    b = os.open(p, os.O_RDWR | os.O_APPEND)
    try:
        os.lseek(a, 0, os.SEEK_SET)
        assert os.write(a, b"<a1>") == 4
        assert os.write(b, b"<b1>") == 4
        assert os.write(a, b"<a2>") == 4
        assert os.pwrite(b, b"<b2>", 0) == 4
        assert os.lseek(a, 0, os.SEEK_CUR) == 4096 + 12
        assert os.fstat(a).st_size == 4096 + 16
    finally:
        os.close(a)
        os.close(b)
    assert read_file(p) == FILE_DATA + b"<a1><b1><a2><b2>"


def test_o_nofollow_and_eloop(posix_root: PosixRoot) -> None:
    for link in ("t/sym", "t/dangling"):
        assert err(os.open, link, os.O_RDONLY | os.O_NOFOLLOW) == "ELOOP", link
        assert err(os.open, link, os.O_CREAT | os.O_WRONLY | os.O_NOFOLLOW) == "ELOOP", link
    fd = os.open("t/sym", os.O_PATH | os.O_NOFOLLOW)  # the link itself
    try:
        assert stat.S_ISLNK(os.fstat(fd).st_mode)
    finally:
        os.close(fd)
    os.close(os.open("t/file", os.O_RDONLY | os.O_NOFOLLOW))  # not a link: fine
    os.symlink("loop-b", "t/loop-a")
    os.symlink("loop-a", "t/loop-b")
    assert err(os.stat, "t/loop-a") == "ELOOP"
    assert err(os.open, "t/loop-a", os.O_RDONLY) == "ELOOP"
    # a chain of 40 links resolves (MAXSYMLINKS); of 41 does not
    os.symlink("file", "t/chain0")
    for i in range(1, 41):
        os.symlink(f"chain{i - 1}", f"t/chain{i}")
    assert read_file("t/chain39") == FILE_DATA
    assert err(os.stat, "t/chain40") == "ELOOP"
    assert err(os.open, "t/file", os.O_RDONLY | os.O_DIRECTORY) == "ENOTDIR"
    assert err(os.open, "t/dir", os.O_WRONLY) == "EISDIR"
    assert err(os.open, "t/sym/x", os.O_RDONLY) == "ENOTDIR"


# -- fallocate and O_TMPFILE ------------------------------------------------------------------


def _blocks(fd: int) -> int:
    return os.fstat(fd).st_blocks


@pytest.mark.parametrize("kind", ["template", "private"])
def test_fallocate(posix_root: PosixRoot, kind: str) -> None:
    """Each fallocate(2) mode ext4 has, through the root (posix_fallocate(3) would hide a
    missing one by writing zeros)."""
    p = file_of_kind(posix_root, kind)
    fd = os.open(p, os.O_RDWR)
    try:
        fallocate(fd, 0, 0, 1 << 20)  # allocate and extend
        assert os.fstat(fd).st_size == 1 << 20 and _blocks(fd) >= (1 << 20) // 512
        assert os.pread(fd, 4096, 0) == FILE_DATA and os.pread(fd, 8, 4096) == bytes(8)
        fallocate(fd, FALLOC_FL_KEEP_SIZE, 1 << 20, 1 << 20)  # beyond the end, size kept
        assert os.fstat(fd).st_size == 1 << 20 and _blocks(fd) >= (2 << 20) // 512
        before = _blocks(fd)
        fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, 0, 4096)
        assert os.pread(fd, 4096, 0) == bytes(4096) and os.fstat(fd).st_size == 1 << 20
        assert _blocks(fd) == before - 8
        os.pwrite(fd, b"z" * 8192, 8192)
        fallocate(fd, FALLOC_FL_ZERO_RANGE, 8192, 4096)
        assert os.pread(fd, 8192, 8192) == bytes(4096) + b"z" * 4096
        os.ftruncate(fd, 0)
        os.pwrite(fd, b"A" * 4096 + b"B" * 4096 + b"C" * 4096, 0)
        fallocate(fd, FALLOC_FL_COLLAPSE_RANGE, 4096, 4096)
        assert pread_all(fd) == b"A" * 4096 + b"C" * 4096
        fallocate(fd, FALLOC_FL_INSERT_RANGE, 4096, 4096)
        assert pread_all(fd) == b"A" * 4096 + bytes(4096) + b"C" * 4096
        assert err(fallocate, fd, FALLOC_FL_COLLAPSE_RANGE, 100, 4096) == "EINVAL"
        assert err(fallocate, fd, 0, 0, 0) == "EINVAL"
    finally:
        os.close(fd)
    assert read_file(p) == b"A" * 4096 + bytes(4096) + b"C" * 4096


def test_fallocate_needs_a_writable_fd(posix_root: PosixRoot) -> None:
    fd = os.open("t/file", os.O_RDONLY)
    try:
        assert err(fallocate, fd, 0, 0, 8192) == "EBADF"
    finally:
        os.close(fd)
    assert os.stat("t/file").st_size == 4096


@pytest.mark.parametrize("where", ["t", "t/dir/a", "t/new"])
def test_o_tmpfile(posix_root: PosixRoot, where: str) -> None:
    """An O_TMPFILE file has no name (nlink 0, not listed) until linkat gives it one; with
    O_EXCL it can never get one."""
    if where == "t/new":
        os.mkdir(where)
    names = sorted(os.listdir(where))
    fd = os.open(where, os.O_TMPFILE | os.O_RDWR, 0o600)
    try:
        os.write(fd, b"anonymous")
        st = os.fstat(fd)
        assert (st.st_nlink, st.st_size, stat.S_IMODE(st.st_mode)) == (0, 9, 0o600)
        assert stat.S_ISREG(st.st_mode)
        assert sorted(os.listdir(where)) == names
        linkat(f"/proc/self/fd/{fd}", f"{where}/named", follow=True)
        st = os.stat(f"{where}/named")
        assert (st.st_nlink, st.st_ino) == (1, os.fstat(fd).st_ino)
        assert os.fstat(fd).st_nlink == 1
    finally:
        os.close(fd)
    assert read_file(f"{where}/named") == b"anonymous"
    fd = os.open(where, os.O_TMPFILE | os.O_RDWR | os.O_EXCL, 0o600)
    try:
        assert err(lambda: linkat(f"/proc/self/fd/{fd}", f"{where}/never", follow=True)) == "ENOENT"
    finally:
        os.close(fd)
    assert sorted(os.listdir(where)) == sorted([*names, "named"])
    assert err(os.open, "t/file", os.O_TMPFILE | os.O_RDWR, 0o600) == "ENOTDIR"
