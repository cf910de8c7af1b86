"""A hostile tenant against the FUSE engine (issue 8): each test attacks the way it was found."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from tests.daemon.conftest import vfsd
from vfs.daemon import control

pytestmark = pytest.mark.fuse

#: Runs chrooted into a VEE root as root (so with CAP_DAC_READ_SEARCH, as in a privileged
#: container): forges file handles for open_by_handle_at and reports what each attempt gave.
ATTACK = textwrap.dedent(
    r"""
    import ctypes, errno, json, os, struct, sys
    libc = ctypes.CDLL(None, use_errno=True)
    os.chroot(sys.argv[1]); os.chdir("/")
    out = {}

    def handle_of(path):
        buf = ctypes.create_string_buffer(8 + 128)
        struct.pack_into("I", buf, 0, 128)
        mount_id = ctypes.c_int()
        if libc.name_to_handle_at(-100, path.encode(), buf, ctypes.byref(mount_id), 0) != 0:
            raise OSError(ctypes.get_errno(), "name_to_handle_at")
        size, htype = struct.unpack_from("Ii", buf, 0)
        return htype, buf.raw[8 : 8 + size]

    def open_handle(htype, data, flags):
        buf = ctypes.create_string_buffer(struct.pack("Ii", len(data), htype) + data)
        mfd = os.open("/", os.O_RDONLY | os.O_DIRECTORY)
        try:
            fd = libc.open_by_handle_at(mfd, buf, flags)
            if fd < 0:
                return "err:" + errno.errorcode[ctypes.get_errno()]
            return fd
        finally:
            os.close(mfd)

    def attempt(key, fn):
        try:
            out[key] = fn()
        except OSError as e:
            out[key] = "err:" + errno.errorcode.get(e.errno, str(e.errno))

    htype, own = handle_of("/etc")
    out["own_handle_len"] = len(own)
    nodeid_hi, nodeid_lo, gen = struct.unpack("<III", own[:12])
    out["own_generation_nonzero"] = gen != 0
    # the mount root: node 1, generation 0 (the kernel always holds it)
    root = struct.pack("<III", 0, 1, 0)
    fd = open_handle(htype, root, os.O_PATH | os.O_DIRECTORY)
    out["root_opath"] = "ok" if isinstance(fd, int) else fd
    if isinstance(fd, int):  # no /proc in the chroot: every step is an *at call on fd
        def read_other():
            f = os.open("b/etc/hosts", os.O_RDONLY, dir_fd=fd)
            return os.read(f, 100).decode()

        def plant_other():
            os.close(os.open("b/planted", os.O_CREAT | os.O_WRONLY, 0o644, dir_fd=fd))
            return "ok"

        def list_at(path):
            f = os.open(path, os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)
            return sorted(os.listdir(f))

        attempt("read_other", read_other)
        attempt("plant_other", plant_other)
        attempt("list_root", lambda: list_at("."))
        attempt("list_other", lambda: list_at("b/etc"))
    fd = open_handle(htype, root, os.O_RDONLY | os.O_DIRECTORY)
    out["root_open"] = "ok" if isinstance(fd, int) else fd
    # b's inodes with generation 0 (what a handle of a small sequential node number was)
    forged = []
    for ino in range(2, 200):
        r = open_handle(htype, struct.pack("<III", 0, ino, 0), os.O_PATH)
        forged.append("ok" if isinstance(r, int) else r)
    out["forged_ok"] = forged.count("ok")
    # the VEE's own files keep working
    attempt("own_read", lambda: open("/etc/hosts", "rb").read().decode())
    attempt("own_write", lambda: open("/mine", "wb").write(b"x"))
    print(json.dumps(out))
    """
)


def test_no_cross_vee_access_through_file_handles(daemon):
    (daemon.mnt / "b" / "etc" / "hosts").write_bytes(b"b secret\n")
    os.listdir(daemon.mnt / "b" / "etc")  # the kernel caches b's names (host side)
    p = subprocess.run(
        [sys.executable, "-c", ATTACK, str(daemon.mnt / "a")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert p.returncode == 0, p.stderr
    out = json.loads(p.stdout)
    assert out["own_generation_nonzero"]
    assert out["read_other"] == "err:EACCES", out
    assert out["plant_other"] == "err:EACCES", out
    assert out["list_root"] == "err:EACCES" and out["list_other"] == "err:EACCES", out
    assert out["root_open"] == "err:EACCES", out
    assert out["forged_ok"] == 0, out
    assert out["own_read"] == "127.0.0.1 localhost\n" and out["own_write"] == 1, out
    assert not (daemon.mnt / "b" / "planted").exists()
    assert (daemon.mnt / "b" / "etc" / "hosts").read_bytes() == b"b secret\n"


def _as_nobody(args: list[str]) -> subprocess.CompletedProcess:
    def drop() -> None:
        os.setgroups([])
        os.setgid(65534)
        os.setuid(65534)

    return subprocess.run(args, capture_output=True, text=True, preexec_fn=drop, timeout=30)


def test_host_users_cannot_reach_vee_roots(daemon):
    """The mount allows other users (containers) and keeps suid/dev for the VEEs: only root
    may traverse the mount root, or any host user could run a VEE's setuid-root binary."""
    assert os.stat(daemon.mnt).st_mode & 0o777 == 0o700
    p = _as_nobody(["stat", str(daemon.mnt / "a" / "suid")])
    assert p.returncode != 0 and "Permission denied" in p.stderr
    p = _as_nobody(["ls", str(daemon.mnt)])
    assert p.returncode != 0 and "Permission denied" in p.stderr
    os.stat(daemon.mnt / "a" / "suid")  # root still can


def test_whiteout_device_cannot_be_made(daemon):
    vee = daemon.mnt / "a"
    with pytest.raises(PermissionError):
        os.mknod(vee / "x", 0o600 | 0o020000, os.makedev(0, 0))
    assert not os.path.lexists(vee / "x")
    (vee / "x").write_bytes(b"fine")  # the name was left free
    assert not (daemon.state / "vees" / "a" / "upper" / "etc").exists()
    os.mknod(vee / "null", 0o666 | 0o020000, os.makedev(1, 3))  # a real device still works
    assert os.stat(vee / "null").st_rdev == os.makedev(1, 3)


def test_overlay_marker_xattrs_cannot_enter_a_template(daemon, tmp_path):
    src = tmp_path / "evil"
    (src / "d").mkdir(parents=True)
    (src / "d" / "f").write_bytes(b"x")
    os.setxattr(src / "d", "trusted.overlay.opaque", b"y")
    p = vfsd("template", "publish", str(src), "--repo", str(daemon.repo), check=False)
    assert p.returncode != 0 and "overlay marker" in p.stderr
    assert "Traceback" not in p.stderr and len(p.stderr.strip().splitlines()) == 1
    tar = tmp_path / "evil.tar"
    os.removexattr(src / "d", "trusted.overlay.opaque")
    os.setxattr(src / "d", "trusted.overlay.redirect", b"/etc")
    subprocess.run(
        ["tar", "--xattrs", "--xattrs-include=*", "-cf", tar, "-C", src, "."], check=True
    )
    p = vfsd("template", "publish", str(tar), "--repo", str(daemon.repo), check=False)
    assert p.returncode != 0 and "overlay marker" in p.stderr
    # a VEE cannot set one either
    with pytest.raises(PermissionError):
        os.setxattr(daemon.mnt / "a" / "etc", "trusted.overlay.opaque", b"y")


def _raw_control(state: Path, payload: bytes) -> dict:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(10)
    s.connect(str(state / "control.sock"))
    s.sendall(payload + b"\n")
    buf = b""
    while not buf.endswith(b"\n"):
        chunk = s.recv(65536)
        if not chunk:
            break
        buf += chunk
    s.close()
    return json.loads(buf)


def test_control_requests_are_validated_strictly(daemon):
    layer = daemon.state / "vees" / "a" / "upper"
    (daemon.mnt / "a" / "keep").write_bytes(b"mine")
    for bad in (
        {"op": "rm", "name": "a", "purge": "no"},
        {"op": "rm", "name": "a", "purge": 1},
        {"op": "rm", "name": ["a"]},
        {"op": "rm", "name": "a", "force": True},
        {"op": "upgrade", "name": "a", "template": {"x": 1}},
        {"op": "nope"},
    ):
        reply = _raw_control(daemon.state, json.dumps(bad).encode())
        assert reply["ok"] is False and reply["exit_code"] == 2, (bad, reply)
    deep = b'{"op": "add", "name": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    reply = _raw_control(daemon.state, deep)
    assert reply["ok"] is False and reply["exit_code"] == 2
    assert (layer / "keep").read_bytes() == b"mine"  # nothing was purged
    assert {v["name"] for v in control.call(daemon.state, {"op": "list"})} == {"a", "b"}
    assert "Traceback" not in daemon.log_text()


def test_full_state_directory_leaves_no_ghost_vee(daemon, tmp_path):
    """ENOSPC in the state directory: `vee add` fails with exit 8 and one line, and the VEE is
    in neither the list, the registry nor the mount; after space returns it can be added."""
    small = tmp_path / "small"
    small.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(small)], check=True)
    d = type(daemon)(
        small,
        small / "state",
        tmp_path / "mnt2",
        daemon.store,
        daemon.repo,
        templates=daemon.templates,
    )
    d.mnt.mkdir()
    try:
        d.start()
        d.vee("add", "first", "--template", "base")
        filler = small / "filler"
        with open(filler, "wb") as f:  # fill the file system to the last block
            try:
                while True:
                    f.write(b"\0" * 65536)
                    f.flush()
            except OSError:
                pass
        for _ in range(50):  # and the last inodes' worth of small files
            try:
                (small / f"f{_}").write_bytes(b"x" * 512)
            except OSError:
                break
        p = d.vee("add", "ghost", "--template", "base", check=False)
        assert p.returncode == 8, p.stderr
        assert len(p.stderr.strip().splitlines()) == 1 and "Traceback" not in p.stderr
        names = {v["name"] for v in json.loads(d.vee("list", "--json").stdout)}
        assert names == {"first"}
        assert "ghost" not in json.loads((d.state / "vees.json").read_text())["vees"]
        assert not (d.mnt / "ghost").exists()
        p = d.vee("rm", "first", check=False)  # a failed save must not half-remove either
        if p.returncode != 0:
            assert p.returncode == 8
            assert {v["name"] for v in json.loads(d.vee("list", "--json").stdout)} == {"first"}
            assert (d.mnt / "first").is_dir()
        os.unlink(filler)
        d.vee("add", "ghost", "--template", "base")
        assert (d.mnt / "ghost" / "etc" / "hosts").read_bytes() == b"127.0.0.1 localhost\n"
    finally:
        d.stop()
        subprocess.run(["umount", "-l", str(small)], check=False)
