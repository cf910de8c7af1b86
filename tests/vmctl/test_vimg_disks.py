"""`vmctl run --disk x.vimg`: the disk is served by a `vfsd export` over NBD; the guest's
fsynced writes are in the image after `vmctl stop`, read back with `vimg`."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import pytest

from tests.vmctl.helpers import processes_mentioning, synced_numbers
from tests.vmctl.vimg_helpers import (
    check_clean,
    make_vimg_disk,
    read_vimg_file,
    vmctl,
    wait_for_synced,
)
from tools.guest import APPEND_LOG, Guest
from vmctl.qemu import VmPaths, read_pidfile


def _run(root: Path, name: str, disk: Path, guest: Guest, run: str = "append", **kw) -> dict:
    r = vmctl(
        "run", name, "--disk", str(disk), "--kernel", str(guest.kernel),
        "--initrd", str(guest.initrd), "--append", guest.append(run, **kw),
        "--wait-for", "vfsguest: ready", "--json", root=root,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


@pytest.mark.qemu
def test_vimg_disk_written_by_guest_reads_back(vm_root, tmp_path: Path, guest: Guest):
    root = vm_root()
    disk = make_vimg_disk(tmp_path / "disk.vimg")
    started = _run(root, "v1", disk, guest)
    paths = VmPaths(root / "v1")
    status = json.loads(vmctl("status", "v1", "--json", root=root).stdout)
    assert status["disks"][0]["format"] == "vimg"
    export_pid = read_pidfile(root / "v1" / "d0.pid")
    assert export_pid and export_pid != started["pid"]

    # The image is the export's alone while the guest runs: a second user is refused.
    busy = vmctl("run", "v2", "--disk", str(disk), "--kernel", str(guest.kernel), root=root)
    assert busy.returncode != 0 and "Traceback" not in busy.stderr, busy.stderr
    assert busy.stderr.count("\n") == 1 and "v1" not in busy.stderr
    assert processes_mentioning(root / "v2") == []

    wait_for_synced(paths.serial_log, 5)
    r = vmctl("stop", "v1", root=root)
    assert r.returncode == 0, r.stderr
    assert processes_mentioning(root) == []
    synced = synced_numbers(paths.serial_log.read_text(errors="replace"))
    assert synced[:5] == [1, 2, 3, 4, 5]

    check_clean(disk)
    data = read_vimg_file(disk, APPEND_LOG)
    assert data is not None
    lines = data.decode().splitlines()
    assert lines == [f"line {n}" for n in range(1, len(lines) + 1)]
    assert len(lines) >= max(synced)  # every line the guest had fsynced is in the image

    # The dirty bitmap the export keeps is in the image, and was written back at its stop.
    from tests.vmctl.vimg_helpers import vimg

    bitmaps = vimg("bitmap", "--list", "--json", str(disk), check=False)
    assert "dirty" in bitmaps.stdout, bitmaps.stdout + bitmaps.stderr


@pytest.mark.qemu
@pytest.mark.log_warnings
def test_export_killed_loses_no_fsynced_line(vm_root, tmp_path: Path, guest: Guest):
    """SIGKILL the export under a writing guest: every line the guest saw fsynced is in the
    image, which checks clean; `vmctl stop` then cleans up the rest."""
    root = vm_root()
    disk = make_vimg_disk(tmp_path / "disk.vimg")
    _run(root, "k1", disk, guest)
    paths = VmPaths(root / "k1")
    wait_for_synced(paths.serial_log, 8)
    pid = read_pidfile(root / "k1" / "d0.pid")
    assert pid
    os.kill(pid, signal.SIGKILL)
    synced_before_kill = synced_numbers(paths.serial_log.read_text(errors="replace"))
    r = vmctl("stop", "k1", "--force", root=root)
    assert r.returncode == 0, r.stderr
    assert processes_mentioning(root) == []
    check_clean(disk)
    data = read_vimg_file(disk, APPEND_LOG)
    lines = (data or b"").decode().splitlines()
    assert lines[: max(synced_before_kill)] == [
        f"line {n}" for n in range(1, max(synced_before_kill) + 1)
    ]


@pytest.mark.qemu
def test_missing_and_wrong_disks_are_refused(vm_root, tmp_path: Path, guest: Guest):
    root = vm_root()
    r = vmctl("run", "m1", "--disk", str(tmp_path / "nope.vimg"), root=root)
    assert r.returncode != 0 and "does not exist" in r.stderr and "Traceback" not in r.stderr
    disk = make_vimg_disk(tmp_path / "d.vimg", size="16M")
    r = vmctl("run", "m2", "--disk", str(disk), "--disk", str(disk), root=root)
    assert r.returncode != 0 and "same image" in r.stderr, r.stderr
    assert processes_mentioning(tmp_path) == []
