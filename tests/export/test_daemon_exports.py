"""Exports managed by a running `vfsd serve`: add/list/dirty/rm through its control socket, an
export killed is restarted, the daemon stops them with itself and brings them back."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from tests.daemon.conftest import unmount, wait_for
from tests.export.conftest import lazy_copy_over_mtls, make_image, run
from vfs.daemon import mounts
from vfs.export import NbdClient

pytestmark = pytest.mark.fuse

VFSD = [sys.executable, "-c", "from vfs.cli.vfsd import main; main()"]
VIMG = [sys.executable, "-c", "from vfs.cli.vimg import main; main()"]


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


class Serve:
    def __init__(self, tmp) -> None:
        self.tmp = tmp
        self.state = tmp / "state"
        self.mnt = tmp / "mnt"
        self.mnt.mkdir()
        self.proc: subprocess.Popen | None = None
        self.pids: set[int] = set()  # every export pid seen: the fixture kills what is left
        self.mounts: list = []  # FUSE files of exports: unmounted by the fixture if left

    def kill9(self) -> None:
        assert self.proc is not None
        self.proc.kill()
        self.proc.wait(10)
        self.unmount_all()

    def unmount_all(self) -> None:
        """The FUSE mount, and whatever else a daemon left below the state or the mount."""
        mounts.detach_all_under(self.mnt, self.state)

    def start(self) -> None:
        with open(self.tmp / f"vfsd-{time.monotonic_ns()}.log", "wb") as log:
            self.proc = subprocess.Popen(
                [*VFSD, "-v", "serve", "--state", str(self.state), "--mount", str(self.mnt),
                 "--store", str(self.tmp / "store"), "--engine", "fuse"],
                stdout=log, stderr=subprocess.STDOUT,
            )  # fmt: skip
        wait_for(lambda: self.cli("export", "list", check=False).returncode == 0,
                 what="vfsd control socket", proc=self.proc)  # fmt: skip

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self.unmount_all()

    def cli(self, *args: str, check: bool = True):
        return run(*VFSD, *args, "--state", str(self.state), check=check)

    def list(self) -> dict:
        out = {e["name"]: e for e in json.loads(self.cli("export", "list", "--json").stdout)}
        self.pids.update(e["pid"] for e in out.values() if e.get("pid"))
        return out


@pytest.fixture
def serve(tmp_path):
    s = Serve(tmp_path)
    try:
        yield s
    finally:
        if s.proc and s.proc.poll() is None:
            s.list()
        s.stop()
        for pid in s.pids:
            if pid_alive(pid):
                os.kill(pid, signal.SIGKILL)
        for m in s.mounts:
            unmount(m)


def test_daemon_manages_exports(serve, tmp_path):
    img = make_image(tmp_path / "vm1.vimg", "16M", "write -P 9 0 64k")
    sock = tmp_path / "vm1.sock"
    serve.start()
    r = json.loads(serve.cli("export", "add", "vm1", str(img), "--nbd", str(sock), "--json").stdout)
    assert r["state"] == "running" and r["pid"]
    dup = serve.cli("export", "add", "vm1b", str(img), "--nbd", str(tmp_path / "x.sock"),
                    check=False)  # fmt: skip
    assert dup.returncode == 4 and "already exported" in dup.stderr
    with NbdClient(sock, "vm1") as c:
        assert c.pread(0, 4) == b"\x09" * 4
        c.pwrite(b"new", 1 << 20)
        c.flush()
    js = json.loads(serve.cli("export", "dirty", "vm1", "--json").stdout)
    assert [(d["offset"], d["length"]) for d in js["dirty"]] == [(1 << 20, 64 << 10)]
    # an export that dies is restarted
    pid = r["pid"]
    os.kill(pid, signal.SIGKILL)
    wait_for(lambda: (e := serve.list()["vm1"])["state"] == "running" and e["pid"] != pid,
             timeout=30, what="restart")  # fmt: skip
    with NbdClient(sock, "vm1") as c:
        assert c.pread(1 << 20, 3) == b"new"  # flushed before the kill
    # the daemon stops its exports with itself, and brings them back
    pid2 = serve.list()["vm1"]["pid"]
    serve.stop()
    assert not pid_alive(pid2)
    serve.start()
    wait_for(lambda: serve.list()["vm1"]["state"] == "running", what="export back")
    with NbdClient(sock, "vm1") as c:
        assert c.pread(1 << 20, 3) == b"new"
    serve.cli("export", "rm", "vm1")
    assert serve.list() == {}
    assert json.loads((serve.state / "exports.json").read_text())["exports"] == []
    bad = serve.cli("export", "add", "../x", str(img), "--nbd", str(sock), check=False)
    assert bad.returncode == 2 and "invalid export name" in bad.stderr


def test_daemon_killed_leaves_no_second_writer(serve, tmp_path):
    """kill -9 of the daemon leaves its export running (guests keep their disk); the next
    daemon stops that process (it commits and closes) before starting its own."""
    img = make_image(tmp_path / "vm2.vimg", "8M", "write -P 7 0 64k")
    sock = tmp_path / "vm2.sock"
    serve.start()
    serve.cli("export", "add", "vm2", str(img), "--nbd", str(sock))
    old = serve.list()["vm2"]["pid"]
    with NbdClient(sock, "vm2") as c:
        c.pwrite(b"acked", 4096)
        c.flush()
    serve.kill9()
    assert pid_alive(old)
    with NbdClient(sock, "vm2") as c:  # still serving without its daemon
        assert c.pread(4096, 5) == b"acked"
    serve.start()
    wait_for(lambda: (e := serve.list()["vm2"])["state"] == "running" and e["pid"] != old,
             timeout=60, what="export restarted by the new daemon")  # fmt: skip
    wait_for(lambda: not pid_alive(old), what="old export gone")
    assert serve.list()["vm2"]["restarts"] == 0  # never refused by the image lock
    with NbdClient(sock, "vm2") as c:
        assert c.pread(4096, 5) == b"acked"
    serve.cli("export", "rm", "vm2")
    r = run(*VIMG, "check", str(img), check=False)
    assert r.returncode == 0, r.stdout + r.stderr


def test_daemon_export_that_cannot_start(serve, tmp_path):
    """An image the export cannot open: `export add` says so in one line and the daemon
    forgets it (nothing restarted in a loop, nothing in the registry)."""
    bad = tmp_path / "bad.vimg"
    bad.write_bytes(b"VIMG" + os.urandom(8188))
    serve.start()
    r = serve.cli("export", "add", "bad", str(bad), "--nbd", str(tmp_path / "b.sock"),
                  check=False)  # fmt: skip
    assert r.returncode != 0 and "did not start" in r.stderr and "Traceback" not in r.stderr
    assert serve.list() == {}
    gone = serve.cli("export", "add", "nope", str(tmp_path / "nope.vimg"), "--nbd",
                     str(tmp_path / "n.sock"), check=False)  # fmt: skip
    assert gone.returncode == 4 and "does not exist" in gone.stderr
    assert serve.cli("export", "rm", "nope", check=False).returncode == 4


def test_daemon_export_with_a_fuse_file(serve, tmp_path):
    """The raw file of a daemon's export is mounted by its export process (the daemon's own
    mount is the VEE tree) and goes away with `export rm`."""
    img = make_image(tmp_path / "vm3.vimg", "8M", "write -P 5 0 64k")
    raw = tmp_path / "vm3.raw"
    serve.mounts.append(raw)
    serve.start()
    serve.cli("export", "add", "vm3", str(img), "--fuse", str(raw), "--nbd",
              str(tmp_path / "vm3.sock"))  # fmt: skip
    assert raw.stat().st_size == 8 << 20  # the mount: the empty file has the disk's size
    with open(raw, "r+b") as f:
        assert f.read(4) == b"\x05" * 4
        f.seek(1 << 20)
        f.write(b"fuse")
        os.fsync(f.fileno())
    js = json.loads(serve.cli("export", "dirty", "vm3", "--json").stdout)
    assert [(d["offset"], d["length"]) for d in js["dirty"]] == [(1 << 20, 64 << 10)]
    serve.cli("export", "rm", "vm3")
    assert raw.stat().st_size == 0  # unmounted: the mount point file again
    r = run(*VIMG, "io", str(img), "-c", "read -P 0x66 1048576 1", check=False)
    assert r.returncode == 0, r.stdout + r.stderr


def test_hostile_export_specs_are_refused(serve, tmp_path):
    """Specs sent straight to the control socket (not through the CLI): malformed JSON, unknown
    fields, wrong types, relative paths, names with '/' — each a one-line error with the
    exit code of its class; nothing registered, nothing started, the daemon still answers."""
    from vfs.daemon import control as C
    from vfs.errors import VfsError

    img = make_image(tmp_path / "ok.vimg", "4M")
    good = {"image": str(img), "name": "ok", "nbd": [str(tmp_path / "ok.sock")]}
    bad = [
        "{not json",
        "[]",
        json.dumps({**good, "argv": ["--evil"]}),
        json.dumps({**good, "readonly": "yes"}),
        json.dumps({**good, "nbd": "/tmp/x.sock"}),
        json.dumps({**good, "nbd": ["relative.sock"]}),
        json.dumps({**good, "image": "ok.vimg"}),
        json.dumps({**good, "name": "a/b"}),
        json.dumps({**good, "name": "x" * 65}),
        json.dumps({**good, "nbd": [], "tcp": [], "fuse": None}),
        json.dumps({**good, "image": str(tmp_path / "missing.vimg")}),
    ]
    serve.start()
    for spec in bad:
        with pytest.raises(VfsError) as err:
            C.call(serve.state, {"op": "export_add", "spec": spec}, timeout=30)
        assert "\n" not in str(err.value) and err.value.exit_code in (2, 4), (spec, err.value)
    with pytest.raises(VfsError):
        C.call(serve.state, {"op": "export_add", "spec": 7}, timeout=30)  # not a string
    assert serve.list() == {}
    assert (
        not (serve.state / "exports.json").exists()
        or json.loads((serve.state / "exports.json").read_text())["exports"] == []
    )


def test_daemon_export_of_a_remote_image_over_mutual_tls(serve, nginx, tmp_path):
    """`export add` takes the repository options of every command; the daemon keeps them in its
    registry and hands them to the export after a restart of either."""
    img = make_image(tmp_path / "src.vimg", "8M", "write -P 5 0 64k", "write -P 6 2M 64k")
    tmpl, url, tls = lazy_copy_over_mtls(nginx, img, tmp_path)
    sock = tmp_path / "r.sock"
    serve.start()
    serve.cli("export", "add", "r", str(tmpl), "--nbd", str(sock), "--repo", url, *tls,
              "--store", str(tmp_path / "store-b"), "--grace", "30")  # fmt: skip
    spec = json.loads((serve.state / "exports.json").read_text())["exports"][0]
    assert spec["repo"] == {"url": url, "ca": nginx.ca, "cert": nginx.client_cert,
                            "key": nginx.client_key, "grace": 30.0}  # fmt: skip
    with NbdClient(sock, "r") as c:
        assert c.pread(0, 64 << 10) == b"\x05" * (64 << 10)
    serve.stop()
    serve.start()
    wait_for(lambda: serve.list()["r"]["state"] == "running", what="export back")
    with NbdClient(sock, "r") as c:  # a cluster not fetched before the restart
        assert c.pread(2 << 20, 64 << 10) == b"\x06" * (64 << 10)
    serve.cli("export", "rm", "r")
