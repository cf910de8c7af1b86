"""`vmctl migrate` between two "hosts": two network namespaces joined by a veth pair, each with
its own state root and exports. The RAM stream and the disk copy go over TCP to the other
namespace's veth address (the destination's loopback is out of the source's reach), and the
bytes counted on the destination's end of the veth say they did."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.vmctl.helpers import processes_mentioning, synced_numbers
from tests.vmctl.vimg_helpers import check_clean, make_vimg_disk, read_vimg_file, wait_for_synced
from tools.guest import APPEND_LOG, Guest
from vmctl.qemu import read_pidfile


@dataclass
class Host:
    netns: str
    dev: str
    address: str

    def run(self, *argv: str, timeout: float = 240) -> subprocess.CompletedProcess[str]:
        return subprocess.run(["ip", "netns", "exec", self.netns, *argv], capture_output=True,
                              text=True, timeout=timeout)  # fmt: skip

    def vmctl(self, *args: str, root: Path) -> subprocess.CompletedProcess[str]:
        return self.run(sys.executable, "-c", "from vmctl.cli import main; main()", *args,
                        "--root", str(root))  # fmt: skip

    def rx_bytes(self) -> int:
        r = self.run("cat", f"/sys/class/net/{self.dev}/statistics/rx_bytes")
        assert r.returncode == 0, r.stderr
        return int(r.stdout)

    def net_ns_id(self) -> str:
        return self.run("readlink", "/proc/self/ns/net").stdout.strip()


def _ip(*args: str) -> None:
    r = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30)
    assert r.returncode == 0, f"ip {' '.join(args)}: {r.stderr}"


def _kill_namespace_processes(netns: str) -> None:
    """Every process still in the namespace: only this test's can be (its name is ours)."""
    r = subprocess.run(["ip", "netns", "pids", netns], capture_output=True, text=True)
    for pid in r.stdout.split():
        try:
            os.kill(int(pid), signal.SIGKILL)
        except ProcessLookupError:
            pass


@pytest.fixture
def two_hosts():
    """Namespaces A (10.213.0.1) and B (10.213.0.2) joined by a veth pair; always deleted, and
    whatever still runs in them killed, however the test ends."""
    if os.geteuid() != 0 or shutil.which("ip") is None:
        pytest.skip("network namespaces need root and iproute2")
    tag = f"{os.getpid()}"
    a = Host(f"vfs-a{tag}", "veth-a", "10.213.0.1")
    b = Host(f"vfs-b{tag}", "veth-b", "10.213.0.2")
    made: list[str] = []
    try:
        for h in (a, b):
            _ip("netns", "add", h.netns)
            made.append(h.netns)
        _ip("link", "add", a.dev, "netns", a.netns, "type", "veth", "peer", "name", b.dev,
            "netns", b.netns)  # fmt: skip
        for h in (a, b):
            _ip("-n", h.netns, "addr", "add", f"{h.address}/24", "dev", h.dev)
            _ip("-n", h.netns, "link", "set", h.dev, "up")
            _ip("-n", h.netns, "link", "set", "lo", "up")
        yield a, b
    finally:
        for ns in made:
            _kill_namespace_processes(ns)
            subprocess.run(["ip", "netns", "del", ns], check=False)


@pytest.mark.qemu
def test_migrate_across_a_veth_link(two_hosts, vm_root, tmp_path: Path, guest: Guest):
    a, b = two_hosts
    src_root, dst_root = vm_root("src"), vm_root("dst")
    disk = make_vimg_disk(tmp_path / "disk.vimg")
    r = a.vmctl("run", "n", "--disk", str(disk), "--kernel", str(guest.kernel),
                "--initrd", str(guest.initrd), "--memory", "128M",
                "--append", guest.append("append,dirty", dirty_mb=24),
                "--wait-for", "vfsguest: ready", root=src_root)  # fmt: skip
    assert r.returncode == 0, r.stderr
    src_pid = read_pidfile(src_root / "n" / "qemu.pid")
    assert os.readlink(f"/proc/{src_pid}/ns/net") == a.net_ns_id()
    wait_for_synced(src_root / "n" / "serial.log", 5)

    # The destination namespace does not know the source's loopback: a migration that
    # fell back to 127.0.0.1 or a Unix socket would not cross the veth.
    rx = b.rx_bytes()
    r = a.vmctl("migrate", "n", "--to", str(dst_root), "--dest-address", b.address,
                "--dest-netns", b.netns, "--json", root=src_root)  # fmt: skip
    assert r.returncode == 0, r.stderr
    rep = json.loads(r.stdout)
    received = b.rx_bytes() - rx
    assert rep["transport"] == f"tcp {b.address}"
    assert rep["disk_bytes"] > 0 and rep["ram_bytes"] > 8 << 20, rep
    # Everything the migration sent arrived through B's end of the link.
    assert received >= rep["disk_bytes"] + rep["ram_bytes"], (received, rep)
    dst_pid = read_pidfile(dst_root / "n" / "qemu.pid")
    assert dst_pid and os.readlink(f"/proc/{dst_pid}/ns/net") == b.net_ns_id()
    status = json.loads(b.vmctl("status", "n", "--json", root=dst_root).stdout)
    assert status["state"] == "running" and status["netns"] == b.netns, status
    export_pid = read_pidfile(dst_root / "n" / "d0.pid")
    assert export_pid and os.readlink(f"/proc/{export_pid}/ns/net") == b.net_ns_id()
    assert processes_mentioning(src_root) == []
    # Once it runs there, the guest's disk is no longer served on the network.
    probe = b.run(sys.executable, "-c", "import socket,sys; s=socket.socket(); "
                  f"sys.exit(s.connect_ex(('{b.address}', {49152})))")  # fmt: skip
    assert probe.returncode != 0

    before = synced_numbers((src_root / "n" / "serial.log").read_text(errors="replace"))
    serial = dst_root / "n" / "serial.log"
    after = wait_for_synced(serial, max(before) + 5)
    text = serial.read_text(errors="replace")
    assert "vfsguest: ready" not in text and "CORRUPT" not in text
    assert after[0] in (max(before) + 1, max(before) + 2), (before[-3:], after[:3])
    assert after == list(range(after[0], after[0] + len(after)))

    r = b.vmctl("stop", "n", root=dst_root)
    assert r.returncode == 0, r.stderr
    acked = synced_numbers(serial.read_text(errors="replace"))
    dest_disk = dst_root / "n" / "disk0.vimg"
    check_clean(dest_disk)
    lines = (read_vimg_file(dest_disk, APPEND_LOG) or b"").decode().splitlines()
    assert lines == [f"line {n}" for n in range(1, len(lines) + 1)]
    assert len(lines) >= max(acked)  # no line the guest had fsynced is missing


@pytest.mark.qemu
def test_bad_dest_address_or_netns_keeps_the_source(two_hosts, vm_root, tmp_path: Path,
                                                    guest: Guest):  # fmt: skip
    a, b = two_hosts
    src_root, dst_root = vm_root("src"), vm_root("dst")
    disk = make_vimg_disk(tmp_path / "disk.vimg", size="16M")
    r = a.vmctl("run", "v", "--disk", str(disk), "--kernel", str(guest.kernel),
                "--initrd", str(guest.initrd), "--append", guest.append("idle"),
                "--wait-for", "vfsguest: ready", root=src_root)  # fmt: skip
    assert r.returncode == 0, r.stderr
    cases = [
        (["--dest-address", "host-b.example"], "wants an IP address"),
        (["--dest-address", b.address, "--dest-netns", "vfs-no-such-ns"], "no network namespace"),
        (["--dest-address", b.address, "--dest-netns", "../x"], "not a network namespace name"),
        # An address nobody answers on in the destination's namespace: QEMU cannot listen.
        (["--dest-address", "10.213.9.9", "--dest-netns", b.netns], "source runs on"),
    ]
    for args, text in cases:
        r = a.vmctl("migrate", "v", "--to", str(dst_root), *args, root=src_root)
        assert r.returncode != 0 and text in r.stderr, (args, r.stderr)
        assert r.stderr.count("\n") == 1 and "Traceback" not in r.stderr, r.stderr
        assert not (dst_root / "v").exists()
    status = json.loads(a.vmctl("status", "v", "--json", root=src_root).stdout)
    assert status["state"] == "running"
    assert a.vmctl("stop", "v", root=src_root).returncode == 0


def _lines_until(stream, needle: str, seen: list[str]) -> None:
    for line in stream:
        seen.append(line)
        if needle in line:
            return
    raise AssertionError(f"no {needle!r} in the progress: {''.join(seen)}")


@pytest.mark.qemu
@pytest.mark.parametrize("half_open", [False, True], ids=["reset", "half-open"])
def test_postcopy_recovers_when_the_link_breaks(two_hosts, vm_root, tmp_path: Path,
                                                guest: Guest, half_open: bool):  # fmt: skip
    """After the switch the link breaks: both QEMUs pause in postcopy-paused, vmctl keeps
    dialling the destination until the link is back, hands the new connection to the source
    QEMU, and post-copy completes; the guest loses nothing. "reset": the connection is reset
    (both ends see it), then the link goes down; "half-open": the link goes down first, so
    the destination never hears of the break and vmctl cuts its stream (migrate-pause)."""
    a, b = two_hosts
    src_root, dst_root = vm_root("src"), vm_root("dst")
    disk = make_vimg_disk(tmp_path / "disk.vimg")
    r = a.vmctl("run", "p", "--disk", str(disk), "--kernel", str(guest.kernel),
                "--initrd", str(guest.initrd), "--memory", "128M",
                "--append", guest.append("append"), "--wait-for", "vfsguest: ready",
                root=src_root)  # fmt: skip
    assert r.returncode == 0, r.stderr
    wait_for_synced(src_root / "p" / "serial.log", 3)
    proc = subprocess.Popen(
        ["ip", "netns", "exec", a.netns, sys.executable, "-c", "from vmctl.cli import main; main()",
         "migrate", "p", "--to", str(dst_root), "--dest-address", b.address, "--dest-netns",
         b.netns, "--ram", "live", "--bandwidth", "8M", "--precopy-timeout", "2", "--postcopy",
         "--postcopy-bandwidth", "16M", "--json", "--root", str(src_root)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    seen: list[str] = []
    try:
        assert proc.stderr is not None
        _lines_until(proc.stderr, "switched:", seen)
        if half_open:
            _ip("-n", a.netns, "link", "set", a.dev, "down")
        r = a.run("ss", "-K", "dst", b.address)  # the source's end of the stream is gone
        assert r.returncode == 0, r.stderr
        if not half_open:
            _ip("-n", a.netns, "link", "set", a.dev, "down")
        _lines_until(proc.stderr, "recovering", seen)
        _lines_until(proc.stderr, "attempt 2 to reach", seen)  # it retries while down
        _ip("-n", a.netns, "link", "set", a.dev, "up")
        out, rest = proc.communicate(timeout=180)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    seen.append(rest)
    assert proc.returncode == 0, "".join(seen)
    rep = json.loads(out)
    assert rep["mode"] == "postcopy" and rep["recoveries"] >= 1 and rep["recovery_s"] > 0, rep
    assert "reconnected to" in rest and "Traceback" not in rest
    assert ("half-open stream" in "".join(seen) + rest) == half_open
    assert processes_mentioning(src_root) == []

    before = synced_numbers((src_root / "p" / "serial.log").read_text(errors="replace"))
    serial = dst_root / "p" / "serial.log"
    after = wait_for_synced(serial, max(before) + 3)
    assert after[0] in (max(before) + 1, max(before) + 2), (before[-3:], after[:3])
    assert after == list(range(after[0], after[0] + len(after)))
    assert b.vmctl("stop", "p", root=dst_root).returncode == 0
    acked = synced_numbers(serial.read_text(errors="replace"))
    dest_disk = dst_root / "p" / "disk0.vimg"
    check_clean(dest_disk)
    lines = (read_vimg_file(dest_disk, APPEND_LOG) or b"").decode().splitlines()
    assert lines == [f"line {n}" for n in range(1, len(lines) + 1)]
    assert len(lines) >= max(acked)


@pytest.mark.qemu
def test_postcopy_kept_when_the_link_stays_down_then_recover(two_hosts, vm_root, tmp_path: Path,
                                                             guest: Guest):  # fmt: skip
    """The link stays down past --recover-timeout: vmctl gives up with one line and keeps both
    QEMUs (killing either would lose the guest); `vmctl migrate --recover` finishes it once
    the link is back."""
    a, b = two_hosts
    src_root, dst_root = vm_root("src"), vm_root("dst")
    disk = make_vimg_disk(tmp_path / "disk.vimg")
    r = a.vmctl("run", "q", "--disk", str(disk), "--kernel", str(guest.kernel),
                "--initrd", str(guest.initrd), "--memory", "128M",
                "--append", guest.append("append"), "--wait-for", "vfsguest: ready",
                root=src_root)  # fmt: skip
    assert r.returncode == 0, r.stderr
    wait_for_synced(src_root / "q" / "serial.log", 3)
    proc = subprocess.Popen(
        ["ip", "netns", "exec", a.netns, sys.executable, "-c", "from vmctl.cli import main; main()",
         "migrate", "q", "--to", str(dst_root), "--dest-address", b.address, "--dest-netns",
         b.netns, "--ram", "live", "--bandwidth", "8M", "--precopy-timeout", "2", "--postcopy",
         "--postcopy-bandwidth", "16M", "--recover-timeout", "3", "--root", str(src_root)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    seen: list[str] = []
    try:
        assert proc.stderr is not None
        _lines_until(proc.stderr, "switched:", seen)
        assert a.run("ss", "-K", "dst", b.address).returncode == 0
        _ip("-n", a.netns, "link", "set", a.dev, "down")
        _, rest = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode != 0, "".join(seen) + rest
    last = rest.strip().splitlines()[-1]
    assert "did not recover" in last and "both QEMUs are kept" in last and "--recover" in last
    assert "Traceback" not in rest
    for root in (src_root, dst_root):  # both alive
        assert read_pidfile(root / "q" / "qemu.pid"), root

    # Still down: --recover gives up the same way, nothing killed.
    r = a.vmctl("migrate", "q", "--to", str(dst_root), "--recover", "--recover-timeout", "1",
                root=src_root)  # fmt: skip
    assert r.returncode != 0 and "Network is unreachable" in r.stderr, r.stderr
    assert read_pidfile(src_root / "q" / "qemu.pid") and read_pidfile(dst_root / "q" / "qemu.pid")

    _ip("-n", a.netns, "link", "set", a.dev, "up")
    r = a.vmctl("migrate", "q", "--to", str(dst_root), "--recover", "--json", root=src_root)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["recoveries"] >= 1
    assert processes_mentioning(src_root) == []

    before = synced_numbers((src_root / "q" / "serial.log").read_text(errors="replace"))
    serial = dst_root / "q" / "serial.log"
    after = wait_for_synced(serial, max(before) + 3)
    assert after[0] in (max(before) + 1, max(before) + 2), (before[-3:], after[:3])
    assert after == list(range(after[0], after[0] + len(after)))
    assert b.vmctl("stop", "q", root=dst_root).returncode == 0
    acked = synced_numbers(serial.read_text(errors="replace"))
    dest_disk = dst_root / "q" / "disk0.vimg"
    check_clean(dest_disk)
    lines = (read_vimg_file(dest_disk, APPEND_LOG) or b"").decode().splitlines()
    assert lines == [f"line {n}" for n in range(1, len(lines) + 1)]
    assert len(lines) >= max(acked)
