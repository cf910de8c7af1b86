"""The test guest for real under QEMU (TCG): it boots to its marker, and what its disk workload
acknowledged on the console is on the disk afterwards, read back on the host."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import trio

from tests.vmctl.helpers import guest_spec, synced_numbers
from tools.guest import APPEND_LOG, Guest, make_disk, read_disk_file
from vmctl.disks import Blockdevs, ImageFile
from vmctl.qemu import run_qemu

pytestmark = pytest.mark.qemu


def disk_lines(image: Path) -> list[int]:
    data = read_disk_file(image, APPEND_LOG)
    assert data is not None, "the guest never created its log"
    lines = data.decode().splitlines()
    assert all(line.startswith("line ") for line in lines), lines[:5]
    return [int(line.split()[1]) for line in lines]


async def test_guest_boots_to_its_marker(tmp_path: Path, guest: Guest):
    t0 = time.monotonic()
    async with run_qemu(guest_spec(guest), tmp_path / "vm", marker="vfsguest: ready") as vm:
        booted = time.monotonic() - t0
        ready = [x for x in vm.serial_text().splitlines() if x.startswith("vfsguest: ready")]
        assert ready and "run=idle" in ready[0] and "disk=no" in ready[0]
        assert "insmod" not in vm.serial_text()  # every module loaded
        assert vm.accel.name in ("kvm", "tcg")
    print(f"boot to marker: {booted:.2f}s under {vm.accel.name}")


async def test_fsynced_lines_survive_a_stop_and_read_back_on_the_host(tmp_path: Path, guest: Guest):
    image = make_disk(tmp_path / "disk.qcow2", "64M", fmt="qcow2")
    spec = guest_spec(guest, run="append", disks=[ImageFile(image, "qcow2")])
    async with run_qemu(spec, tmp_path / "vm", marker="vfsguest: ready run=append disk=yes") as vm:
        await vm.wait_serial(r"vfsguest: synced 15\n", timeout=60)
        # Leaving the block stops QEMU (quit over QMP) while the guest keeps appending.
    acknowledged = synced_numbers(vm.serial_text())
    on_disk = disk_lines(image)
    assert on_disk == list(range(1, len(on_disk) + 1)), "a gap or a duplicate on disk"
    assert len(on_disk) >= acknowledged[-1], "a line the guest had fsynced is lost"
    assert len(on_disk) <= acknowledged[-1] + 1  # at most the one in flight


async def test_poweroff_workload_and_numbering_goes_on_across_boots(tmp_path: Path, guest: Guest):
    image = make_disk(tmp_path / "disk.raw", "32M", files={"README": b"test disk\n"})
    for boot in range(2):
        spec = guest_spec(guest, run="append,poweroff", count=5, disks=[ImageFile(image, "raw")],
                          params={"interval": 0})  # fmt: skip
        async with run_qemu(spec, tmp_path / f"vm{boot}", marker="vfsguest: ready") as vm:
            assert await vm.wait_exit(120) == 0  # the guest powered itself off
        assert synced_numbers(vm.serial_text()) == list(range(5 * boot + 1, 5 * boot + 6))
    assert disk_lines(image) == list(range(1, 11))
    assert read_disk_file(image, "README") == b"test disk\n"


async def test_a_disk_behind_nbd_plugs_in_as_blockdev_specs(tmp_path: Path, guest: Guest):
    """The shape the vimg export (issue 11) will take: a driver=nbd node over a unix socket.
    qemu-nbd stands in for the export here; the guest's fsynced lines must reach the image."""
    import os
    import signal
    import subprocess

    image = make_disk(tmp_path / "disk.qcow2", "32M", fmt="qcow2")
    sock, pidfile = tmp_path / "nbd.sock", tmp_path / "nbd.pid"
    subprocess.run(
        ["qemu-nbd", "--fork", f"--socket={sock}", f"--pid-file={pidfile}", "--format=qcow2",
         "--export-name=disk0", "--cache=writeback", "--persistent", str(image)],
        check=True, timeout=30,
    )  # fmt: skip
    nbd_pid = int(pidfile.read_text())
    pidfd = os.pidfd_open(nbd_pid)
    try:
        disk = Blockdevs([{"driver": "nbd", "server": {"type": "unix", "path": str(sock)},
                           "export": "disk0", "node-name": "nbd0"}])  # fmt: skip
        spec = guest_spec(guest, run="append", disks=[disk])
        async with run_qemu(
            spec, tmp_path / "vm", marker="vfsguest: ready run=append disk=yes"
        ) as vm:
            await vm.wait_serial(r"vfsguest: synced 5\n", timeout=60)
        acknowledged = synced_numbers(vm.serial_text())
    finally:
        os.kill(nbd_pid, signal.SIGTERM)
        with trio.fail_after(10):
            await trio.lowlevel.wait_readable(pidfd)
        os.close(pidfd)
    on_disk = disk_lines(image)
    assert on_disk == list(range(1, len(on_disk) + 1)) and len(on_disk) >= acknowledged[-1]
