"""The kernel engine (vfs/daemon/kernel_engine.py, docs/kernel-engine.md) as an operator meets it:
one page-cache copy for many VEEs, cold objects through the FUSE data layer, a lying repository,
upgrades with and without users, kill -9 of the daemon with a local and a lazy template, and a
VEE moving between the engines across restarts."""

from __future__ import annotations

import errno
import json
import os
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.daemon.conftest import (
    Daemon,
    fuse_available,
    is_mounted,
    kernel_engine_available,
    vfsd,
    wait_for,
)
from tests.daemon.test_page_cache import cached_bytes
from tests.daemon.vee_helpers import make_sample_tree
from tools.lying_http import LyingServer
from vfs.daemon import control, mounts

pytestmark = [pytest.mark.fuse, pytest.mark.kernel]


def _new_daemon(tmp_path: Path, engine: str = "kernel") -> Daemon:
    reason = fuse_available() or kernel_engine_available()
    if reason:
        pytest.skip(reason)
    d = Daemon(tmp_path, tmp_path / "state", tmp_path / "mnt", tmp_path / "store",
               tmp_path / "repo", engine=engine)  # fmt: skip
    d.mnt.mkdir()
    vfsd("repo", "init", str(d.repo))
    return d


@pytest.fixture
def kd(tmp_path: Path):
    d = _new_daemon(tmp_path)
    try:
        yield d
    finally:
        d.stop()
        bad = [ln for ln in d.log_text().splitlines() if "Traceback" in ln]
        assert not bad, d.log_text()


def _add(d: Daemon, name: str, template: str) -> None:
    control.call(d.state, {"op": "add", "name": name, "template": template})


def test_engine_is_said_at_start_up_and_in_vee_list(kd, tmp_path):
    make_sample_tree(tmp_path / "src")
    kd.publish(tmp_path / "src", "base")
    kd.start()
    kd.vee("add", "a", "--template", "base")
    out = kd.vee("list").stdout
    assert out.splitlines()[0].startswith("engine: kernel (")
    listed = json.loads(kd.vee("list", "--json").stdout)
    assert listed[0]["engine"] == "kernel" and "overlayfs" in listed[0]["engine_reason"]
    assert "engine: kernel" in kd.log_text()
    m = [
        ln for ln in Path("/proc/self/mountinfo").read_text().splitlines() if f" {kd.mnt}/a " in ln
    ]
    assert len(m) == 1 and " - overlay " in m[0] and "metacopy=on" in m[0]
    assert os.stat(kd.mnt).st_mode & 0o777 == 0o700


@pytest.mark.slow
def test_twenty_vees_reading_one_template_file_cost_one_page_cache_copy(kd, tmp_path):
    size = 32 << 20
    src = tmp_path / "lib"
    src.mkdir()
    (src / "libbig.so").write_bytes(os.urandom(size))
    digest = kd.publish(src, "lib")
    kd.start()
    for i in range(20):
        _add(kd, f"v{i}", digest)
    paths = [kd.mnt / f"v{i}" / "libbig.so" for i in range(20)]
    os.sync()
    subprocess.run(["sh", "-c", "echo 1 > /proc/sys/vm/drop_caches"], check=True)
    before = cached_bytes()
    for p in paths:
        with open(p, "rb") as f:
            while f.read(1 << 20):
                pass
    grown = cached_bytes() - before
    # 20 copies would be 640 MiB; the object file's pages are the only copy
    assert grown < 2.5 * size, f"page cache grew by {grown >> 20} MiB for 20 readers"


def test_cold_object_reaches_a_vee_through_the_fuse_data_layer_verified(kd, tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    payload = os.urandom(3 << 20) + bytes(1 << 20) + b"tail"
    (src / "cold").write_bytes(payload)
    (src / "small").write_bytes(b"small\n")
    digest = kd.publish(src, "t", to_store=False)  # the host store has none of the objects
    kd.start()
    _add(kd, "a", digest)
    _add(kd, "b", digest)
    objects = kd.store / "objects"
    assert not any(p.is_file() for p in objects.rglob("*") if len(p.name) == 64 and
                   p.name != digest)  # fmt: skip
    assert (kd.mnt / "a" / "cold").read_bytes() == payload  # second redirection: FUSE layer
    oid = __import__("hashlib").sha256(payload).hexdigest()
    local = objects / oid[:2] / oid
    assert local.read_bytes() == payload  # fetched, verified, stored as a plain file
    assert local.stat().st_blocks * 512 < len(payload) - (1 << 20) + (64 << 10)  # holes kept
    assert f"fetching {oid}" in kd.log_text()
    # b opens it after it is local: the first data layer (the store) serves it, no fetch
    n = kd.log_text().count(f"fetching {oid}")
    assert (kd.mnt / "b" / "cold").read_bytes() == payload
    assert kd.log_text().count(f"fetching {oid}") == n


@pytest.mark.log_warnings
def test_a_lying_repository_serves_no_bad_byte(tmp_path):
    d = _new_daemon(tmp_path)
    src = tmp_path / "src"
    src.mkdir()
    good = os.urandom(200_000)
    (src / "wrong-bytes").write_bytes(good)
    (src / "short").write_bytes(b"twelve bytes")
    (src / "fine").write_bytes(b"fine\n")
    digest = d.publish(src, "t", to_store=False)
    import hashlib

    bad_oid = hashlib.sha256(good).hexdigest()
    short_oid = hashlib.sha256(b"twelve bytes").hexdigest()
    with LyingServer(d.repo) as srv:
        srv.lie(bad_oid, body=os.urandom(200_000))  # right size, wrong bytes
        srv.lie(short_oid, body=b"twelve", length=6)  # shorter than the manifest says
        d.remote_url = srv.url
        d.start()
        try:
            _add(d, "a", digest)
            for name in ("wrong-bytes", "short"):
                with pytest.raises(OSError) as ei:
                    (d.mnt / "a" / name).read_bytes()
                assert ei.value.errno == errno.EIO, name
            assert (d.mnt / "a" / "fine").read_bytes() == b"fine\n"
            for oid in (bad_oid, short_oid):
                assert not (d.store / "objects" / oid[:2] / oid).exists()
            assert "unavailable" in d.log_text()
            # the truth again: the same VEE now reads the right bytes
            srv.truth()
            assert (d.mnt / "a" / "wrong-bytes").read_bytes() == good
        finally:
            d.stop()


def _holder(path: Path) -> subprocess.Popen:
    """A process with its working directory in a VEE and a file of it open."""
    p = subprocess.Popen(
        [sys.executable, "-c", "import sys,time; f=open(sys.argv[1]); print('ok', flush=True);"
         " time.sleep(600)", str(path)],
        cwd=path.parent, stdout=subprocess.PIPE,
    )  # fmt: skip
    assert p.stdout is not None and p.stdout.readline().strip() == b"ok"
    return p


def test_upgrade_remounts_at_once_or_names_who_holds_the_vee(kd, tmp_path):
    src = tmp_path / "src"
    make_sample_tree(src)
    v1 = kd.publish(src, "base")
    (src / "etc" / "hosts").write_bytes(b"127.0.0.1 v2\n")
    (src / "new-in-v2").write_bytes(b"v2\n")
    v2 = kd.publish(src, "base")
    kd.start()
    _add(kd, "a", v1)
    a = kd.mnt / "a"
    os.chmod(a / "etc" / "passwd", 0o600)  # a metadata-only copy in the private layer
    (a / "mine").write_bytes(b"private\n")
    passwd = (a / "etc" / "passwd").read_bytes()
    holder = _holder(a / "etc" / "hosts")
    try:
        r = kd.vee("upgrade", "a", "--template", v2, check=False)
        assert r.returncode == 9, r.stderr
        assert f"pid {holder.pid}" in r.stderr and r.stderr.count("\n") == 1
        assert (a / "etc" / "hosts").read_bytes() == b"127.0.0.1 localhost\n"  # unchanged
        r = kd.vee("rm", "a", check=False)
        assert r.returncode == 9 and f"pid {holder.pid}" in r.stderr
    finally:
        holder.kill()
        holder.wait()
    r = kd.vee("upgrade", "a", "--template", v2, "--json")
    assert json.loads(r.stdout)["applied"] is True
    assert (a / "etc" / "hosts").read_bytes() == b"127.0.0.1 v2\n"
    assert (a / "new-in-v2").read_bytes() == b"v2\n"
    assert (a / "mine").read_bytes() == b"private\n"
    assert (a / "etc" / "passwd").read_bytes() == passwd and os.stat(
        a / "etc" / "passwd"
    ).st_mode & 0o777 == 0o600
    # --force: remounted although a process holds it (it keeps the old view)
    holder = _holder(a / "etc" / "hosts")
    try:
        r = kd.vee("upgrade", "a", "--template", v1, "--force", "--json")
        assert json.loads(r.stdout)["applied"] is True
        assert (a / "etc" / "hosts").read_bytes() == b"127.0.0.1 localhost\n"
    finally:
        holder.kill()
        holder.wait()


@pytest.mark.slow
def test_kill9_with_a_local_and_a_lazy_template(kd, tmp_path):
    """The mounts outlive the daemon: the local template's VEE keeps working all along; the
    lazy one serves what is local and fails cleanly for the rest, never a wrong byte; the
    restart replaces the lazy VEE's mount (nothing holds it) and keeps the local one's (a
    process holds it).

    An object that a VEE first opened through the FUSE data layer stays bound to it in that
    overlay (overlayfs looks the data up once per inode, at the first open), so after the
    daemon died that VEE answers ENOTCONN for it until its mount is replaced; an object made
    local through another VEE is found in the store by the VEEs that had not opened it yet
    (docs/kernel-engine.md, "When the daemon dies")."""
    local_src, lazy_src = tmp_path / "local", tmp_path / "lazy"
    make_sample_tree(local_src)
    lazy_src.mkdir()
    for i in range(4):
        (lazy_src / f"f{i}").write_bytes(os.urandom(100_000 + i))
    local = kd.publish(local_src, "local")
    lazy = kd.publish(lazy_src, "lazy", to_store=False)
    kd.start()
    _add(kd, "loc", local)
    _add(kd, "lz", lazy)
    _add(kd, "lz2", lazy)
    want = {i: (lazy_src / f"f{i}").read_bytes() for i in range(4)}
    assert (kd.mnt / "lz" / "f0").read_bytes() == want[0]  # fetched through lz's data layer
    assert (kd.mnt / "lz2" / "f1").read_bytes() == want[1]  # fetched through lz2: local now
    (kd.mnt / "loc" / "written").write_bytes(b"before the crash\n")
    holder = _holder(kd.mnt / "loc" / "etc" / "hosts")
    try:
        kd.kill9()
        # daemon gone: the local template's VEE works, reads and writes
        assert (kd.mnt / "loc" / "big").read_bytes() == (local_src / "big").read_bytes()
        (kd.mnt / "loc" / "during").write_bytes(b"while the daemon was dead\n")
        # local, never opened in lz: the store (first data layer) serves it
        assert (kd.mnt / "lz" / "f1").read_bytes() == want[1]
        for i in (2, 3):
            with pytest.raises(OSError) as ei:
                (kd.mnt / "lz" / f"f{i}").read_bytes()  # needs the dead data layer
            assert ei.value.errno in (errno.ENOTCONN, errno.EIO)
        try:  # bound to the dead data layer (unless the kernel dropped the inode meanwhile)
            assert (kd.mnt / "lz" / "f0").read_bytes() == want[0]
        except OSError as e:
            assert e.errno == errno.ENOTCONN
        kd.start()
        listed = {v["name"]: v for v in json.loads(kd.vee("list", "--json").stdout)}
        assert listed["loc"]["state"] == "mounted" and listed["loc"].get("reused_mount")
        # the kept overlay's image is kept in memory again (the dead daemon's pin died with
        # it), besides the lazy template's, mounted afresh
        images = kd.state / "kernel" / "images"
        sizes = {d: (images / f"{d}.erofs").stat().st_size for d in (local, lazy)}
        assert kd.proc is not None and _vm_locked(kd.proc.pid) >= sum(sizes.values())
        for vee in ("lz", "lz2"):
            assert listed[vee]["state"] == "mounted" and not listed[vee].get("reused_mount")
            for i in range(4):
                assert (kd.mnt / vee / f"f{i}").read_bytes() == want[i]
        assert (kd.mnt / "loc" / "during").read_bytes() == b"while the daemon was dead\n"
        assert (kd.mnt / "loc" / "written").read_bytes() == b"before the crash\n"
        kd.vee("rm", "lz")
        kd.vee("rm", "lz2")
        locked = _vm_locked(kd.proc.pid)
        assert sizes[local] <= locked < sizes[local] + sizes[lazy]
    finally:
        holder.kill()
        holder.wait()
    # once nothing holds it, the next restart replaces the kept mount too
    kd.stop()
    assert not is_mounted(kd.mnt / "loc")
    kd.start()
    listed = {v["name"]: v for v in json.loads(kd.vee("list", "--json").stdout)}
    assert not listed["loc"].get("reused_mount")
    assert (kd.mnt / "loc" / "during").read_bytes() == b"while the daemon was dead\n"


def test_a_vee_moves_between_engines_across_restarts(kd, tmp_path):
    src = tmp_path / "src"
    make_sample_tree(src)
    digest = kd.publish(src, "base")
    kd.start()
    _add(kd, "a", digest)
    a = kd.mnt / "a"
    os.chmod(a / "etc" / "passwd", 0o600)  # metadata-only copy
    os.rename(a / "data" / "f1", a / "data" / "f1-moved")  # metacopy with a redirect
    os.rename(a / "etc" / "conf.d", a / "etc" / "conf.e")  # relative directory redirect
    with open(a / "etc" / "hosts", "ab") as f:
        f.write(b"kernel\n")
    os.unlink(a / "data" / "f2")

    def snapshot() -> dict[str, tuple]:
        out = {}
        for dirpath, dirnames, filenames in os.walk(a):
            for n in sorted(dirnames + filenames):
                p = Path(dirpath) / n
                st = os.lstat(p)
                body = p.read_bytes() if p.is_file() and not p.is_symlink() else None
                # a directory's st_size is each file system's own (EROFS: its bytes)
                size = None if stat.S_ISDIR(st.st_mode) else st.st_size
                out[str(p.relative_to(a))] = (st.st_mode, st.st_uid, st.st_gid, size, body)
        return out

    before = snapshot()
    kd.stop()
    kd.engine = "fuse"
    kd.start()
    assert snapshot() == before
    (a / "etc" / "conf.e" / "fuse").write_bytes(b"fuse\n")
    before = snapshot()
    kd.stop()
    kd.engine = "kernel"
    kd.start()
    assert snapshot() == before
    assert not list((kd.state / "vees" / "a" / "upper").rglob("*.tmp*"))


def test_rm_unmounts_and_a_dead_vee_mountpoint_does_not_linger(kd, tmp_path):
    make_sample_tree(tmp_path / "src")
    digest = kd.publish(tmp_path / "src", "base")
    kd.start()
    _add(kd, "a", digest)
    _add(kd, "b", digest)
    assert is_mounted(kd.mnt / "a")
    kd.vee("rm", "a")
    assert not is_mounted(kd.mnt / "a") and sorted(os.listdir(kd.mnt)) == ["b"]
    kd.stop()
    assert os.listdir(kd.mnt) == [] or not any(is_mounted(kd.mnt / n) for n in os.listdir(kd.mnt))
    lower = kd.state / "kernel" / "lower"
    assert not any(is_mounted(p) for p in lower.iterdir()) if lower.exists() else True
    # the image cache survives, and a damaged image is rebuilt at the next start
    img = kd.state / "kernel" / "images" / f"{digest}.erofs"
    raw = bytearray(img.read_bytes())
    raw[2000] ^= 1
    img.write_bytes(bytes(raw))
    stale = img.with_name("0" * 64 + ".erofs")  # a template no VEE uses any more
    stale.write_bytes(b"old")
    kd.start()
    assert (kd.mnt / "b" / "etc" / "hosts").read_bytes() == b"127.0.0.1 localhost\n"
    wait_for(lambda: "rebuilding" in kd.log_text(), what="image rebuilt")
    assert img.exists() and not stale.exists()


def _vm_locked(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmLck:"):
            return int(line.split()[1]) * 1024
    return 0


def _resident(path: Path) -> int:
    out = subprocess.run(["fincore", "--bytes", "--noheadings", "--output", "RES", str(path)],
                         check=True, capture_output=True, text=True).stdout  # fmt: skip
    return int(out.split()[0])


def test_template_metadata_stays_in_memory_through_drop_caches(kd, tmp_path):
    """The image's blocks are locked in memory while a VEE uses it (vfs/daemon/pin.py): after
    drop_caches every page of the image is still resident, so a cold walk reads no metadata
    from the disk; the last VEE's rm unlocks them."""
    make_sample_tree(tmp_path / "src")
    for i in range(300):
        (tmp_path / "src" / "etc" / f"conf{i}").write_text(f"{i}\n")
    digest = kd.publish(tmp_path / "src", "base")
    kd.start()
    _add(kd, "a", digest)
    assert kd.proc is not None
    image = kd.state / "kernel" / "images" / f"{digest}.erofs"
    size = image.stat().st_size
    assert "kept in memory" in kd.vee("list").stdout.splitlines()[0]
    assert _vm_locked(kd.proc.pid) >= size
    os.sync()
    Path("/proc/sys/vm/drop_caches").write_text("3\n")
    assert _resident(image) >= size
    names = subprocess.run(["find", str(kd.mnt / "a"), "-printf", "%s %m %p\n"],
                           check=True, capture_output=True, text=True).stdout  # fmt: skip
    assert f"{kd.mnt}/a/etc/conf299" in names
    kd.vee("rm", "a")
    assert _vm_locked(kd.proc.pid) == 0
    Path("/proc/sys/vm/drop_caches").write_text("3\n")
    assert _resident(image) < size
    # --no-pin-images: the same VEE, nothing locked, said so
    kd.stop()
    kd.extra_args = ["--no-pin-images"]
    kd.start()
    _add(kd, "b", digest)
    assert "kept in memory" not in kd.vee("list").stdout.splitlines()[0]
    assert _vm_locked(kd.proc.pid) == 0
    assert (kd.mnt / "b" / "etc" / "conf299").read_text() == "299\n"


# -- what the daemon mounted goes with it, on every exit path --------------------------------


def _mounted_below(*dirs: Path) -> list[str]:
    ps = [os.fspath(d) for d in dirs]
    return sorted(
        m.mountpoint
        for m in mounts.mountinfo()
        if any(m.mountpoint == p or m.mountpoint.startswith(p + "/") for p in ps)
    )


def _loop_devices_of(state: Path) -> list[str]:
    """Loop devices whose backing file is below ``state`` (the template images)."""
    out = []
    for f in Path("/sys/block").glob("loop*/loop/backing_file"):
        try:
            backing = f.read_text().strip()
        except OSError:
            continue  # cleared meanwhile
        if backing.startswith(os.fspath(state) + "/"):
            out.append(f.parent.parent.name)
    return out


def _lazy_and_local(kd: Daemon, tmp_path: Path) -> tuple[str, str]:
    make_sample_tree(tmp_path / "local")
    (tmp_path / "lazy").mkdir()
    (tmp_path / "lazy" / "f").write_bytes(os.urandom(50_000))
    return kd.publish(tmp_path / "local", "local"), kd.publish(
        tmp_path / "lazy", "lazy", to_store=False
    )


def test_sigterm_unmounts_vees_images_and_the_data_layer_even_while_held(kd, tmp_path):
    local, lazy = _lazy_and_local(kd, tmp_path)
    kd.start()
    _add(kd, "a", local)
    _add(kd, "b", lazy)
    assert (kd.mnt / "b" / "f").read_bytes() == (tmp_path / "lazy" / "f").read_bytes()
    assert len(_mounted_below(kd.mnt, kd.state)) == 5  # 2 VEEs, 2 images, the data layer
    holder = _holder(kd.mnt / "a" / "etc" / "hosts")
    try:
        assert kd.proc is not None
        kd.proc.send_signal(signal.SIGTERM)
        assert kd.proc.wait(timeout=30) == 0
        kd.proc = None
        assert _mounted_below(kd.mnt, kd.state) == []
    finally:
        holder.kill()
        holder.wait()
    # the images' loop devices (autoclear) went with the last overlay that held them
    wait_for(lambda: _loop_devices_of(kd.state) == [], what="loop devices cleared")


def test_sigterm_during_start_up_stops_it_and_unmounts_what_it_mounted(kd, tmp_path):
    """A signal queued while the daemon probes, takes inventory and mounts its VEEs is not
    the default (fatal) SIGTERM: start-up stops after the VEE it is mounting, and everything
    mounted so far is unmounted."""
    local, lazy = _lazy_and_local(kd, tmp_path)
    kd.start()
    for i in range(6):
        _add(kd, f"v{i}", local if i % 2 else lazy)
    kd.stop()
    assert _mounted_below(kd.mnt, kd.state) == []
    wait_for(lambda: _loop_devices_of(kd.state) == [], what="loop devices cleared")
    for _ in range(3):
        kd.start_process()
        assert kd.proc is not None
        # at once after the probe: before the loop runs (a tight poll; wait_for backs off)
        deadline = time.monotonic() + 30
        while "engine: kernel" not in kd.log_text():
            assert kd.proc.poll() is None and time.monotonic() < deadline, kd.log_text()
            time.sleep(0.001)
        kd.proc.send_signal(signal.SIGTERM)
        assert kd.proc.wait(timeout=30) == 0, kd.log_text()
        kd.proc = None
        assert _mounted_below(kd.mnt, kd.state) == [], kd.log_text()


def test_an_error_during_start_up_unmounts_what_it_mounted(kd, tmp_path):
    local, lazy = _lazy_and_local(kd, tmp_path)
    kd.start()
    _add(kd, "a", local)
    _add(kd, "b", lazy)
    kd.stop()
    # the control socket cannot be bound: start-up fails after the VEEs are mounted
    sock = control.socket_path(kd.state)
    sock.mkdir()
    (sock / "x").write_bytes(b"")
    kd.start_process()
    assert kd.proc is not None
    assert kd.proc.wait(timeout=60) != 0
    kd.proc = None
    log_text = kd.log_text()
    assert _mounted_below(kd.mnt, kd.state) == [], log_text
    assert "Traceback" not in log_text and os.fspath(sock) in log_text, log_text
    (sock / "x").unlink()
    sock.rmdir()
    kd.start()
    assert (kd.mnt / "a" / "etc" / "hosts").read_bytes() == b"127.0.0.1 localhost\n"


def test_kill9_then_a_restart_replaces_everything_left_with_either_engine(kd, tmp_path):
    local, lazy = _lazy_and_local(kd, tmp_path)
    kd.start()
    _add(kd, "a", local)
    _add(kd, "b", lazy)
    before = _mounted_below(kd.mnt, kd.state)
    assert len(before) == 5
    kd.kill9()
    assert _mounted_below(kd.mnt, kd.state) == before  # the kernel's, not the daemon's
    kd.start()  # the kernel engine again: one of each, all fresh (nothing holds them)
    assert _mounted_below(kd.mnt, kd.state) == before
    assert (kd.mnt / "b" / "f").read_bytes() == (tmp_path / "lazy" / "f").read_bytes()
    kd.kill9()
    kd.engine = "fuse"  # the FUSE engine detaches the kernel engine's leftovers first
    kd.start()
    assert _mounted_below(kd.mnt, kd.state) == [os.fspath(kd.mnt)]
    assert (kd.mnt / "a" / "etc" / "hosts").read_bytes() == b"127.0.0.1 localhost\n"
    assert (kd.mnt / "b" / "f").read_bytes() == (tmp_path / "lazy" / "f").read_bytes()
    kd.stop()
    assert _mounted_below(kd.mnt, kd.state) == []
    wait_for(lambda: _loop_devices_of(kd.state) == [], what="loop devices cleared")


def test_the_fuse_engine_does_not_serve_a_vee_a_killed_kernel_engine_left_in_use(kd, tmp_path):
    """Two writers on one private layer (a held overlay of the killed daemon and the FUSE
    view) must not happen: that VEE is broken until its users leave; the others are served."""
    local, _ = _lazy_and_local(kd, tmp_path)
    kd.start()
    _add(kd, "a", local)
    _add(kd, "b", local)
    holder = _holder(kd.mnt / "a" / "etc" / "hosts")
    try:
        kd.kill9()
        kd.engine = "fuse"
        kd.start()
        listed = {v["name"]: v for v in json.loads(kd.vee("list", "--json").stdout)}
        assert listed["a"]["state"] == "broken" and "in use" in listed["a"]["error"]
        assert listed["b"]["state"] == "mounted"
        assert (kd.mnt / "b" / "etc" / "hosts").read_bytes() == b"127.0.0.1 localhost\n"
    finally:
        holder.kill()
        holder.wait()
    kd.stop()
    kd.start()  # nothing holds it now: detached, and served
    assert (kd.mnt / "a" / "etc" / "hosts").read_bytes() == b"127.0.0.1 localhost\n"
    kd.stop()
    assert _mounted_below(kd.mnt, kd.state) == []
