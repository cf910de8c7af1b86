"""`vmctl run/list/status/console/stop` as a user runs them: separate processes, a guest that
outlives `vmctl run`, one-line errors with exit codes, nothing left running afterwards."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import trio

from tests.vmctl.helpers import processes_mentioning, synced_numbers
from tools.guest import APPEND_LOG, Guest, make_disk, read_disk_file
from vmctl.qemu import VmPaths, stop_detached


def vmctl(*args: str, root: Path, timeout: float = 180) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", "from vmctl.cli import main; main()", *args, "--root", str(root)],
        capture_output=True, text=True, timeout=timeout,
    )  # fmt: skip


@pytest.fixture
def root(tmp_path: Path):
    """A state root; whatever a failing test left running in it is stopped afterwards."""
    root = tmp_path / "vms"
    root.mkdir()
    yield root
    for d in root.iterdir():
        trio.run(lambda d=d: stop_detached(VmPaths(d), force=True))
    assert processes_mentioning(root) == []


@pytest.mark.qemu
def test_run_list_status_console_stop(root: Path, tmp_path: Path, guest: Guest):
    disk = make_disk(tmp_path / "disk.qcow2", fmt="qcow2")
    r = vmctl(
        "run", "web1", "--disk", str(disk), "--kernel", str(guest.kernel),
        "--initrd", str(guest.initrd), "--append", guest.append("append"),
        "--wait-for", "vfsguest: ready", "--json", root=root,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    started = json.loads(r.stdout)
    assert started["accel"] in ("kvm", "tcg") and started["accel_reason"]
    # vmctl has exited; the guest runs on, appending.
    assert processes_mentioning(root / "web1") == [started["pid"]]

    listed = json.loads(vmctl("list", "--json", root=root).stdout)
    assert [(v["name"], v["state"], v["pid"]) for v in listed] == [
        ("web1", "running", started["pid"])
    ]
    status = json.loads(vmctl("status", "web1", "--json", root=root).stdout)
    assert status["state"] == "running" and status["qemu_version"].startswith("7.")
    assert status["disks"][0]["format"] == "qcow2"

    busy = vmctl("run", "web1", "--disk", str(disk), root=root)
    assert busy.returncode == 9 and "already runs" in busy.stderr
    assert busy.stderr.count("\n") == 1

    console = vmctl("console", "web1", "--no-follow", root=root)
    assert "vfsguest: ready run=append disk=yes" in console.stdout

    stopped = vmctl("stop", "web1", root=root)
    assert stopped.returncode == 0, stopped.stderr
    assert processes_mentioning(root) == []
    after = json.loads(vmctl("status", "web1", "--json", root=root).stdout)
    assert after["state"] == "stopped" and after["pid"] is None

    # What the guest had fsynced before the stop is on the disk.
    acked = synced_numbers((root / "web1" / "serial.log").read_text())
    data = read_disk_file(disk, APPEND_LOG)
    assert data is not None
    lines = [int(x.split()[1]) for x in data.decode().splitlines()]
    assert lines == list(range(1, len(lines) + 1)) and len(lines) >= (acked[-1] if acked else 0)

    again = vmctl("stop", "web1", root=root)
    assert again.returncode == 1 and "not running" in again.stderr


def test_bad_input_is_one_line_and_an_exit_code(root: Path, tmp_path: Path):
    cases = [
        (["run", "x", "--disk", str(tmp_path / "missing.qcow2")], 4, "does not exist"),
        (["run", "../up"], 2, "bad VM name"),
        (["run", "x", "--memory", "lots"], 2, "invalid size"),
        (["run", "x", "--append", "quiet"], 2, "need --kernel"),
        (["status", "ghost"], 4, "no VM named"),
        (["stop", "ghost"], 4, "no VM named"),
        (["console", "ghost"], 4, "no VM named"),
    ]
    vimg = tmp_path / "disk.vimg"
    vimg.write_bytes(b"VIMG\r\n\x1a\n" + b"\0" * 8192)
    cases.append((["run", "x", "--disk", str(vimg)], 6, "no valid vimg header"))
    for args, code, text in cases:
        r = vmctl(*args, root=root)
        assert (r.returncode, r.stderr.count("\n")) == (code, 1), (args, r.stderr)
        assert text in r.stderr and "Traceback" not in r.stderr, (args, r.stderr)
    assert vmctl("list", root=root).stdout == ""
    assert "Start guest NAME" in vmctl("run", "--help", root=root).stdout
