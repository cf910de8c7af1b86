"""The raw-file export on FUSE, with the programs that want a file: mkfs.ext4 + mount -o loop +
e2fsck, dd with O_DIRECT, SEEK_DATA/SEEK_HOLE, fallocate, fio with verify=crc32c, qemu-img."""

from __future__ import annotations

import errno
import json
import mmap
import os
import subprocess
import sys

import pytest

from tests.export.conftest import make_image, need, run
from vfs.export import NbdClient

pytestmark = pytest.mark.fuse


@pytest.fixture
def raw_export(exports, tmp_path):
    img = make_image(tmp_path / "d.vimg", "128M", "write -P 0xab 0 1M", "write -P 0xcd 64M 64k")
    f = tmp_path / "disk.raw"
    e = exports.start(img, "--fuse", str(f))
    yield e, f
    exports.close()
    assert not os.path.ismount(f)


def test_file_shape_and_seek_data_hole(raw_export):
    e, f = raw_export
    st = os.stat(f)
    assert st.st_size == 128 << 20
    fd = os.open(f, os.O_RDONLY)
    try:
        assert os.lseek(fd, 0, os.SEEK_DATA) == 0
        assert os.lseek(fd, 0, os.SEEK_HOLE) == 1 << 20
        assert os.lseek(fd, 2 << 20, os.SEEK_DATA) == 64 << 20
        assert os.lseek(fd, 64 << 20, os.SEEK_HOLE) == (64 << 20) + (64 << 10)
        with pytest.raises(OSError) as err:
            os.lseek(fd, 65 << 20, os.SEEK_DATA)
        assert err.value.errno == errno.ENXIO
        assert os.pread(fd, 4, 64 << 20) == b"\xcd" * 4
    finally:
        os.close(fd)
    # qemu-img sees the same holes through the file (it walks them with SEEK_DATA/HOLE)
    m = json.loads(run("qemu-img", "map", "--output=json", "-f", "raw", str(f)).stdout)
    assert [(x["start"], x["length"]) for x in m if x["data"]] == [
        (0, 1 << 20),
        (64 << 20, 64 << 10),
    ]


def test_o_direct_fsync_and_nbd_see_the_same_disk(raw_export, tmp_path):
    e, f = raw_export
    data = os.urandom(1 << 20)
    fd = os.open(f, os.O_RDWR | os.O_DIRECT)
    try:
        buf = mmap.mmap(-1, 1 << 20)  # O_DIRECT wants aligned memory
        buf[:] = data
        assert os.pwrite(fd, buf, 8 << 20) == 1 << 20
        os.fsync(fd)
        back = mmap.mmap(-1, 1 << 20)
        assert os.preadv(fd, [back], 8 << 20) == 1 << 20
        assert bytes(back) == data
    finally:
        os.close(fd)
    with NbdClient(e.sock, "disk") as c:  # the NBD side of the same export
        assert c.pread(8 << 20, 1 << 20) == data
        c.pwrite(b"\x77" * 4096, 9 << 20)
    with open(f, "rb") as fh:  # direct_io: no stale page cache on the FUSE side
        fh.seek(9 << 20)
        assert fh.read(4096) == b"\x77" * 4096
    # writes past the end of the disk fail; the size cannot change
    fd = os.open(f, os.O_RDWR)
    try:
        with pytest.raises(OSError) as err:
            os.pwrite(fd, b"x", 128 << 20)
        assert err.value.errno == errno.ENOSPC
    finally:
        os.close(fd)
    with pytest.raises(OSError):
        os.truncate(f, 1 << 20)


def test_fallocate_punch_and_zero(raw_export):
    need("fallocate")
    e, f = raw_export
    run("fallocate", "-p", "-o", "0", "-l", str(512 << 10), str(f))
    run("fallocate", "-z", "-o", str(64 << 20), "-l", "4096", str(f))
    with open(f, "rb") as fh:
        assert fh.read(512 << 10) == bytes(512 << 10)
        assert fh.read(4096) == b"\xab" * 4096
        fh.seek(64 << 20)
        assert fh.read(8192) == bytes(4096) + b"\xcd" * 4096


@pytest.mark.slow
def test_mkfs_mount_loop_e2fsck_diff(raw_export, exports, tmp_path):
    need("mkfs.ext4", "e2fsck")
    e, f = raw_export
    run("mkfs.ext4", "-q", "-F", str(f))
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    src = os.path.join(os.path.dirname(__file__), "..", "..", "vfs")
    run("mount", "-o", "loop", str(f), str(mnt))
    try:
        run("cp", "-a", src, str(mnt / "tree"))
    finally:
        run("umount", str(mnt))
    r = run("e2fsck", "-fn", str(f), check=False)
    assert r.returncode == 0, r.stdout + r.stderr
    # durable: the export restarts on the same image and the file system is still there
    assert e.stop() == 0
    exports.start(e.image, "--fuse", str(f))
    run("mount", "-o", "loop,ro", str(f), str(mnt))
    try:
        run("diff", "-r", src, str(mnt / "tree"))
    finally:
        run("umount", str(mnt))


@pytest.mark.slow
def test_fio_verify_crc32c(raw_export):
    need("fio")
    e, f = raw_export
    r = subprocess.run(
        ["fio", "--name=verify", f"--filename={f}", "--rw=randwrite", "--bs=4k",
         "--size=16M", "--offset=32M", "--direct=1", "--ioengine=psync", "--iodepth=1",
         "--verify=crc32c", "--verify_fatal=1", "--do_verify=1", "--output-format=json",
         "--verify_state_save=0"],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr + r.stdout[-2000:]
    job = json.loads(r.stdout)["jobs"][0]
    assert job["error"] == 0 and job["write"]["io_bytes"] == 16 << 20
    # and again after a commit and a restart: the data fio verified is in the image
    e.control.flush()
    assert e.stop() == 0
    vimg = [sys.executable, "-c", "from vfs.cli.vimg import main; main()"]
    run(*vimg, "check", str(e.image))
