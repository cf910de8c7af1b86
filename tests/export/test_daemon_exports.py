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
from tests.export.conftest import make_image, run
from vfs.export import NbdClient

pytestmark = pytest.mark.fuse

VFSD = [sys.executable, "-c", "from vfs.daemon.cli import main; main()"]


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

    def start(self) -> None:
        with open(self.tmp / f"vfsd-{time.monotonic_ns()}.log", "wb") as log:
            self.proc = subprocess.Popen(
                [*VFSD, "-v", "serve", "--state", str(self.state), "--mount", str(self.mnt),
                 "--store", str(self.tmp / "store")],
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
        unmount(self.mnt)

    def cli(self, *args: str, check: bool = True):
        return run(*VFSD, *args, "--state", str(self.state), check=check)

    def list(self) -> dict:
        return {e["name"]: e for e in json.loads(self.cli("export", "list", "--json").stdout)}


@pytest.fixture
def serve(tmp_path):
    s = Serve(tmp_path)
    try:
        yield s
    finally:
        for e in s.list().values() if s.proc and s.proc.poll() is None else []:
            if e.get("pid"):
                os.kill(e["pid"], signal.SIGKILL)
        s.stop()


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
