"""fallocate(2) in a VEE root, as on ext4: every mode the kernel forwards, through a real mount,
against a plain directory on the same file system in the same test.

The kernel's FUSE client forwards 0, KEEP_SIZE, PUNCH_HOLE|KEEP_SIZE and ZERO_RANGE (with or
without KEEP_SIZE) and answers EOPNOTSUPP itself for COLLAPSE_RANGE and INSERT_RANGE; O_TMPFILE
cannot be served through libfuse 3.14 at all (docs/vee-layer.md §8). Both limits are pinned here.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import hashlib
import os
import random
import struct
import subprocess
from pathlib import Path

import pytest
import trio

from tests.daemon.vee_helpers import make_sample_tree, publish
from vfs.tree.nodes import FsError
from vfs.tree.private import PrivateLayer
from vfs.tree.view import Views

pytestmark = pytest.mark.fuse

KEEP_SIZE = 0x01
PUNCH_HOLE = 0x02
COLLAPSE_RANGE = 0x08
ZERO_RANGE = 0x10
INSERT_RANGE = 0x20
KIB, MIB = 1 << 10, 1 << 20

_libc = ctypes.CDLL(None, use_errno=True)
_libc.fallocate.argtypes = (ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64)


def fallocate(fd: int, mode: int, offset: int, length: int) -> None:
    if _libc.fallocate(fd, mode, offset, length) != 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e))


FS_IOC_FIEMAP = 0xC020660B
FIEMAP_FLAG_SYNC = 0x1
FIEMAP_EXTENT_LAST = 0x1
FIEMAP_EXTENT_UNWRITTEN = 0x800
_FIEMAP_HEAD = struct.Struct("=QQIIII")
_FIEMAP_EXTENT = struct.Struct("=QQQ2QI3I")


def allocation(path: Path) -> list[tuple[int, int, bool]]:
    """The file's allocated byte ranges (logical start, end, unwritten) from FIEMAP, adjacent
    ranges merged: where the data is allocated, whatever the physical layout (two writers
    fragment a file differently, and ext4 counts extent-tree blocks in st_blocks)."""
    out: list[tuple[int, int, bool]] = []
    fd = os.open(path, os.O_RDONLY)
    try:
        start, count = 0, 256
        while True:
            buf = bytearray(_FIEMAP_HEAD.size + count * _FIEMAP_EXTENT.size)
            _FIEMAP_HEAD.pack_into(buf, 0, start, (1 << 64) - 1 - start, FIEMAP_FLAG_SYNC, 0,
                                   count, 0)  # fmt: skip
            fcntl.ioctl(fd, FS_IOC_FIEMAP, buf)
            mapped = _FIEMAP_HEAD.unpack_from(buf)[3]
            last = False
            for i in range(mapped):
                e = _FIEMAP_EXTENT.unpack_from(buf, _FIEMAP_HEAD.size + i * _FIEMAP_EXTENT.size)
                logical, length, flags = e[0], e[2], e[5]
                unwritten = bool(flags & FIEMAP_EXTENT_UNWRITTEN)
                if out and out[-1][1] == logical and out[-1][2] == unwritten:
                    out[-1] = (out[-1][0], logical + length, unwritten)
                else:
                    out.append((logical, logical + length, unwritten))
                start = logical + length
                last = bool(flags & FIEMAP_EXTENT_LAST)
            if last or mapped == 0:
                return out
    finally:
        os.close(fd)


def blob(seed: int, size: int) -> bytes:
    """Incompressible bytes without a zero block (a copy-up would leave zero blocks as holes)."""
    return random.Random(seed).randbytes(size)


def content(fd: int) -> bytes:
    return os.pread(fd, os.fstat(fd).st_size + 1, 0)


class Pair:
    """The same file opened in the VEE and in a plain directory: every call goes to both."""

    def __init__(self, vee: Path, plain: Path, host: Path) -> None:
        self.paths = (vee, plain)
        self.host = host  # the VEE file's private-layer file
        self.fds = [os.open(p, os.O_RDWR) for p in self.paths]

    def do(self, fn) -> list[object]:  # type: ignore[no-untyped-def]
        """Run ``fn(fd)`` on both; both must succeed or fail with the same errno."""
        out: list[object] = []
        for fd in self.fds:
            try:
                out.append(fn(fd))
            except OSError as e:
                out.append(("error", e.errno))
        return out

    def same(self, what: str, *, reopen: bool = False, unwritten: bool = True) -> None:
        """Size, bytes and allocated ranges as on ext4, and the st_blocks the host file has.

        The kernel refreshes st_blocks itself after FALLOCATE; after plain writes only at close
        (``reopen``: with the writeback cache it does not track i_blocks, and FSYNC does not
        refresh them)."""
        for fd in self.fds:
            os.fsync(fd)
        if reopen:
            self.close()
            self.fds = [os.open(p, os.O_RDWR) for p in self.paths]
        (va, pa) = (os.stat(p) for p in self.paths)
        assert va.st_size == pa.st_size, f"{what}: size {va.st_size} != ext4 {pa.st_size}"
        hb = os.stat(self.host).st_blocks
        assert va.st_blocks == hb, f"{what}: st_blocks {va.st_blocks}, the host file has {hb}"
        va_map, pa_map = allocation(self.host), allocation(self.paths[1])
        if not unwritten:
            va_map, pa_map = ([r for r in m if not r[2]] for m in (va_map, pa_map))
        assert va_map == pa_map, f"{what}: allocated {va_map}, on ext4 {pa_map}"
        vd, pd = (content(fd) for fd in self.fds)
        assert vd == pd, f"{what}: data differs from ext4 (first at {_first_diff(vd, pd)})"

    def close(self) -> None:
        for fd in self.fds:
            os.close(fd)


def _first_diff(a: bytes, b: bytes) -> int:
    return next(
        (i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b))
    )


def host(daemon, name: str) -> Path:
    """The private-layer file behind VEE c's ``name``."""
    return daemon.state / "vees" / "c" / "upper" / name


@pytest.fixture
def fa(daemon, tmp_path: Path):
    """VEE 'c' on a template with a 256 KiB blob; a plain directory on the same file system."""
    src = tmp_path / "fa-src"
    src.mkdir()
    (src / "blob").write_bytes(blob(1, 256 * KIB))
    daemon.publish(src, "fa")
    daemon.vee("add", "c", "--template", "fa")
    plain = tmp_path / "plain"
    plain.mkdir()
    return daemon, daemon.mnt / "c", plain


@pytest.mark.parametrize("where", ["private", "template"])
def test_modes_match_ext4(fa, where):
    daemon, vee, plain = fa
    if where == "template":  # the first fallocate copies the template file up
        (plain / "blob").write_bytes((vee / "blob").read_bytes())
    else:
        for d in (vee, plain):
            (d / "blob").write_bytes(blob(2, 256 * KIB))
    f = Pair(vee / "blob", plain / "blob", host(daemon, "blob"))
    try:
        f.same("start", reopen=True)
        assert f.do(lambda fd: fallocate(fd, 0, 0, MIB)) == [None, None]
        f.same("mode 0 extends to 1 MiB")
        assert os.stat(vee / "blob").st_size == MIB
        f.do(lambda fd: fallocate(fd, KEEP_SIZE, MIB, MIB))
        f.same("KEEP_SIZE past EOF")
        assert os.stat(vee / "blob").st_blocks * 512 >= 2 * MIB  # allocated, size unchanged
        # dirty page-cache data in the range must be written back before the hole is punched
        f.do(lambda fd: os.pwrite(fd, b"D" * 20_000, 60_000))
        f.do(lambda fd: fallocate(fd, PUNCH_HOLE | KEEP_SIZE, 64 * KIB, 64 * KIB))
        f.same("PUNCH_HOLE over dirty pages")
        assert os.pread(f.fds[0], 8, 64 * KIB) == bytes(8)
        assert os.pread(f.fds[0], 8, 60_000) == b"D" * 8
        before = os.stat(vee / "blob")
        f.do(lambda fd: fallocate(fd, ZERO_RANGE, 200_000, 50_000))
        f.same("ZERO_RANGE inside")
        after = os.stat(vee / "blob")  # as on ext4: the data changed, so did mtime and ctime
        assert after.st_mtime_ns > before.st_mtime_ns and after.st_ctime_ns > before.st_ctime_ns
        f.do(lambda fd: fallocate(fd, ZERO_RANGE, MIB + 100, 5000))
        f.same("ZERO_RANGE extends")
        assert os.fstat(f.fds[0]).st_size == MIB + 5100
        f.do(lambda fd: fallocate(fd, PUNCH_HOLE | KEEP_SIZE, MIB - 4 * KIB, 64 * KIB))
        f.same("PUNCH_HOLE across EOF keeps the size")
        # errors the kernel and ext4 give alike
        assert (
            f.do(lambda fd: fallocate(fd, PUNCH_HOLE, 0, 4096)) == [("error", errno.EOPNOTSUPP)] * 2
        )
        assert f.do(lambda fd: fallocate(fd, 0, 0, 0)) == [("error", errno.EINVAL)] * 2
        f.same("after the refused calls")
    finally:
        f.close()
    # what the VEE shows is what its private layer holds
    assert host(daemon, "blob").read_bytes() == (plain / "blob").read_bytes()
    assert daemon.mnt.joinpath("c", "blob").read_bytes() == (plain / "blob").read_bytes()


def test_size_seen_after_reopen_and_by_stat(fa):
    """The writeback cache keeps i_size in the kernel: an extending fallocate must update it."""
    _, vee, _ = fa
    fd = os.open(vee / "grow", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        os.write(fd, b"abc")
        fallocate(fd, 0, 0, 3 * MIB)
        assert os.fstat(fd).st_size == 3 * MIB
        assert os.stat(vee / "grow").st_size == 3 * MIB
        assert os.lseek(fd, 0, os.SEEK_END) == 3 * MIB
        os.write(fd, b"end")  # appends at the new EOF
    finally:
        os.close(fd)
    data = (vee / "grow").read_bytes()
    assert len(data) == 3 * MIB + 3 and data[:3] == b"abc" and data[-3:] == b"end"
    assert data[3:-3] == bytes(3 * MIB - 3)


def test_kernel_limits_collapse_insert_and_read_only(fa):
    _, vee, plain = fa
    for d in (vee, plain):
        (d / "f").write_bytes(blob(3, 64 * KIB))
    pfd = os.open(plain / "f", os.O_RDWR)
    vfd = os.open(vee / "f", os.O_RDWR)
    try:
        fallocate(pfd, COLLAPSE_RANGE, 0, 4096)  # ext4 can
        fallocate(pfd, INSERT_RANGE, 0, 4096)
        for mode in (COLLAPSE_RANGE, INSERT_RANGE):  # the FUSE client never forwards them
            with pytest.raises(OSError) as ei:
                fallocate(vfd, mode, 0, 4096)
            assert ei.value.errno == errno.EOPNOTSUPP
    finally:
        os.close(pfd)
        os.close(vfd)
    rfd = os.open(vee / "f", os.O_RDONLY)
    try:
        with pytest.raises(OSError) as ei:
            fallocate(rfd, 0, 0, MIB)
        assert ei.value.errno == errno.EBADF
    finally:
        os.close(rfd)
    assert os.stat(vee / "f").st_size == 64 * KIB


def test_o_tmpfile_is_eopnotsupp(fa):
    """libfuse 3.14 has no TMPFILE op: it answers ENOSYS, which the kernel turns into EOPNOTSUPP
    for good (docs/vee-layer.md §8). A plain directory can."""
    _, vee, plain = fa
    os.close(os.open(plain, os.O_TMPFILE | os.O_RDWR, 0o600))
    with pytest.raises(OSError) as ei:
        os.open(vee, os.O_TMPFILE | os.O_RDWR, 0o600)
    assert ei.value.errno == errno.EOPNOTSUPP


def test_util_linux_fallocate(fa):
    daemon, vee, plain = fa
    for d in (vee, plain):
        (d / "u").write_bytes(blob(4, 300 * KIB) + bytes(200 * KIB) + blob(5, 100 * KIB))
    cmds = [
        ["-l", "4MiB"],
        ["-n", "-o", "4MiB", "-l", "1MiB"],
        ["-p", "-o", "64KiB", "-l", "128KiB"],
        ["-z", "-o", "1MiB", "-l", "256KiB"],
        ["-d"],  # dig holes: reads the file, punches its zero blocks
    ]
    for args in cmds:
        for d in (vee, plain):
            subprocess.run(["fallocate", *args, str(d / "u")], check=True, capture_output=True)
            os.sync()
        v, p, h = os.stat(vee / "u"), os.stat(plain / "u"), os.stat(host(daemon, "u"))
        assert (v.st_size, v.st_blocks) == (p.st_size, h.st_blocks), args
        assert allocation(host(daemon, "u")) == allocation(plain / "u"), args
        assert _sha(vee / "u") == _sha(plain / "u"), args
    r = subprocess.run(["fallocate", "-c", "-l", "4KiB", str(vee / "u")], capture_output=True)
    assert r.returncode != 0 and b"not supported" in r.stderr.lower()


def _sha(p: Path) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


def test_fsx_with_fallocate(fa):
    """fsx-style: seeded random writes, truncates, fallocates (every forwarded mode), reads and
    reopens on one VEE file and one ext4 file; every read and size must agree."""
    daemon, vee, plain = fa
    seed = int(os.environ.get("VFS_FSX_SEED", random.randrange(1 << 32)))
    rng = random.Random(seed)
    for d in (vee, plain):
        (d / "fsx").write_bytes(b"")
    f = Pair(vee / "fsx", plain / "fsx", host(daemon, "fsx"))
    limit = 2 * MIB
    log: list[str] = []
    try:
        for step in range(300):
            op = rng.choice(["write", "write", "read", "read", "trunc", "falloc", "reopen"])
            off = rng.randrange(limit)
            ln = rng.randrange(1, 256 * KIB)
            if op == "write":
                data = rng.randbytes(min(ln, 64 * KIB))
                log.append(f"{step} write {off} {len(data)}")
                f.do(lambda fd, data=data, off=off: os.pwrite(fd, data, off))
            elif op == "read":
                log.append(f"{step} read {off} {ln}")
                got = f.do(lambda fd, off=off, ln=ln: os.pread(fd, ln, off))
                assert got[0] == got[1], _fsx_fail(seed, log, "read differs")
            elif op == "trunc":
                log.append(f"{step} truncate {off}")
                f.do(lambda fd, off=off: os.ftruncate(fd, off))
            elif op == "falloc":
                mode = rng.choice([0, KEEP_SIZE, PUNCH_HOLE | KEEP_SIZE, ZERO_RANGE,
                                   ZERO_RANGE | KEEP_SIZE])  # fmt: skip
                log.append(f"{step} fallocate mode={mode:#x} {off} {ln}")
                got = f.do(lambda fd, mode=mode, off=off, ln=ln: fallocate(fd, mode, off, ln))
                assert got[0] == got[1], _fsx_fail(seed, log, f"fallocate results {got}")
            else:
                log.append(f"{step} reopen")
                f.close()
                f = Pair(*f.paths, f.host)
            sizes = [os.fstat(fd).st_size for fd in f.fds]
            assert sizes[0] == sizes[1], _fsx_fail(seed, log, f"sizes {sizes}")
        # Only the written ranges: with the writeback cache a truncate can reach the host before
        # the write that had extended the file, and then (as on ext4 for an extending truncate)
        # blocks preallocated past EOF survive as unwritten extents (docs/vee-layer.md §8).
        f.same(_fsx_fail(seed, log, "at the end"), reopen=True, unwritten=False)
    finally:
        f.close()


def _fsx_fail(seed: int, log: list[str], what: str) -> str:
    return f"{what}; replay with VFS_FSX_SEED={seed}; last ops:\n" + "\n".join(log[-15:])


# -- the view core, no mount ----------------------------------------------------------------


async def test_view_fallocate_needs_a_writable_private_fd(tmp_path: Path):
    make_sample_tree(tmp_path / "src")
    pub = publish(tmp_path / "src", tmp_path)
    views = Views(pub.resolver)
    try:
        views.add_vee("a", pub.template, PrivateLayer(tmp_path / "state" / "a"))
        root = views.lookup(1, b"a").ino
        fh, attr = views.create(root, b"f", 0o100644, os.O_RDWR, 0, 0)
        await views.fallocate(fh, 0, 0, MIB)
        await views.fallocate(fh, PUNCH_HOLE | KEEP_SIZE, 0, 4096)
        with pytest.raises(OSError) as ei:
            await views.fallocate(fh, PUNCH_HOLE, 0, 4096)  # the host answers for itself
        assert ei.value.errno == errno.EOPNOTSUPP
        views.release(fh)
        st = os.stat(tmp_path / "state" / "a" / "upper" / "f")
        assert st.st_size == MIB and st.st_blocks * 512 == MIB - 4096
        ro = await views.open(attr.ino, os.O_RDONLY)
        with pytest.raises(FsError) as fe:
            await views.fallocate(ro, 0, 0, 2 * MIB)
        assert fe.value.errno == errno.EBADF
        views.release(ro)
        # a shared template file has no private fd: open for write unshares it first (ESTALE)
        shared = views.lookup(root, b"big").ino
        ro = await views.open(shared, os.O_RDONLY)
        with pytest.raises(FsError) as fe:
            await views.fallocate(ro, 0, 0, MIB)
        assert fe.value.errno == errno.EBADF
        views.release(ro)
        await trio.lowlevel.checkpoint()
    finally:
        views.close()
        pub.close()
