"""The QEMU runner: command lines, the accelerator choice, and that no QEMU is ever left behind —
not when QEMU refuses its arguments, not when the guest never comes up, not when the start is
cancelled, not when QEMU ignores quit and SIGTERM."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import pytest
import trio

from tests.vmctl.helpers import guest_spec, processes_mentioning
from tools.guest import Guest
from vfs.errors import BusyError, NotFound, UsageError
from vmctl.disks import Blockdevs, ImageFile
from vmctl.errors import GuestTimeout, QemuStartError
from vmctl.host import choose_accelerator
from vmctl.machine import MachineSpec, build_argv, check_migration_capabilities
from vmctl.qemu import read_pidfile, run_qemu

# -- pure parts -----------------------------------------------------------------------------------


def test_argv_for_tcg_and_kvm(tmp_path: Path):
    img = tmp_path / "a,b.qcow2"
    img.write_bytes(b"")
    spec = MachineSpec("vm1", memory_mib=512, cpus=2, disks=[ImageFile(img, "qcow2")],
                       kernel=Path("/k"), append="console=ttyS0")  # fmt: skip
    tcg = build_argv(spec, binary="qemu", accel="tcg", qmp_fd=7, serial_log=tmp_path / "s,1.log")
    assert tcg[tcg.index("-accel") + 1] == "tcg" and "-cpu" not in tcg
    assert tcg[tcg.index("-m") + 1] == "512M" and tcg[tcg.index("-smp") + 1] == "2"
    assert "socket,id=qmp,fd=7,server=on,wait=off" in tcg
    assert f"file,id=serial0,path={tmp_path}/s,,1.log" in tcg  # QEMU's comma escaping
    blockdevs = [json.loads(tcg[i + 1]) for i, a in enumerate(tcg) if a == "-blockdev"]
    assert blockdevs[0]["filename"] == str(img.resolve()) and blockdevs[1]["driver"] == "qcow2"
    assert "virtio-blk-pci,drive=disk0,id=vd0" in tcg
    assert "microvm" not in " ".join(tcg)
    kvm = build_argv(spec, binary="qemu", accel="kvm", qmp_fd=7, serial_log=tmp_path / "s")
    assert kvm[kvm.index("-cpu") + 1] == "host"


def test_spec_refuses_what_qemu_would_choke_on(tmp_path: Path):
    with pytest.raises(UsageError):
        MachineSpec("../escape")
    with pytest.raises(UsageError):
        MachineSpec("vm", machine="microvm")
    with pytest.raises(UsageError):
        MachineSpec("vm", memory_mib=1)
    with pytest.raises(UsageError):
        MachineSpec("vm", initrd=Path("/i"))
    with pytest.raises(NotFound):
        ImageFile(tmp_path / "missing.qcow2")
    with pytest.raises(UsageError):
        Blockdevs([{"driver": "file", "node-name": "bad name!"}])
    with pytest.raises(UsageError):
        check_migration_capabilities("tcg", {"auto-converge": True})
    check_migration_capabilities("kvm", {"auto-converge": True})


def test_accelerator_choice_says_why(tmp_path: Path):
    assert choose_accelerator({"VMCTL_ACCEL": "tcg"}).reason == "forced by VMCTL_ACCEL"
    with pytest.raises(UsageError):
        choose_accelerator({"VMCTL_ACCEL": "xen"})
    no_dev = choose_accelerator({}, dev=tmp_path / "kvm")
    assert no_dev.name == "tcg" and "no " in no_dev.reason
    fake = tmp_path / "fake-kvm"
    fake.write_bytes(b"")  # not a KVM device: the API ioctl fails
    assert "KVM_GET_API_VERSION" in choose_accelerator({}, dev=fake).reason
    here = choose_accelerator({})
    if "kvm_pvm" in here.facts["kvm_modules"]:
        assert here.name == "tcg" and "kvm_pvm" in here.reason
    assert here.reason


# -- no QEMU left behind ---------------------------------------------------------------------------


@pytest.mark.qemu
async def test_bad_arguments_fail_with_qemus_message_and_leave_nothing(tmp_path: Path):
    state = tmp_path / "vm"
    spec = MachineSpec("bad", memory_mib=64, extra_args=["-device", "no-such-device-model"])
    with trio.fail_after(30), pytest.raises(QemuStartError) as info:
        async with run_qemu(spec, state):
            pytest.fail("QEMU started with a bogus device")
    e = info.value
    assert "no-such-device-model" in e.stderr_tail and e.returncode == 1 and e.argv
    assert "no-such-device-model" in str(e)
    assert processes_mentioning(state) == []
    assert not (state / "qmp.sock").exists() and not (state / "qemu.pid").exists()


@pytest.mark.qemu
async def test_missing_disk_behind_a_blockdev_spec(tmp_path: Path):
    state = tmp_path / "vm"
    disk = Blockdevs([{"driver": "file", "filename": str(tmp_path / "gone.raw"), "node-name": "f"},
                      {"driver": "raw", "file": "f", "node-name": "d"}])  # fmt: skip
    with pytest.raises(QemuStartError, match="gone.raw"):
        async with run_qemu(MachineSpec("nodisk", memory_mib=64, disks=[disk]), state):
            pass
    assert processes_mentioning(state) == []


@pytest.mark.qemu
async def test_guest_that_never_prints_the_marker_is_killed(tmp_path: Path, guest: Guest):
    state = tmp_path / "vm"
    with pytest.raises(GuestTimeout, match="QEMU killed") as info:
        async with run_qemu(guest_spec(guest), state, marker="never printed", boot_timeout=1):
            pass
    assert isinstance(info.value.serial_tail, str)
    assert processes_mentioning(state) == []


@pytest.mark.qemu
async def test_guest_that_powers_off_before_the_marker(tmp_path: Path, guest: Guest):
    state = tmp_path / "vm"
    with pytest.raises(QemuStartError, match=r"exited \(status 0\) before the guest printed"):
        async with run_qemu(guest_spec(guest, run="poweroff"), state, marker="never printed"):
            pass
    assert processes_mentioning(state) == []


@pytest.mark.qemu
async def test_cancelled_start_leaves_nothing(tmp_path: Path, guest: Guest):
    state = tmp_path / "vm"
    with trio.move_on_after(0.5) as scope:
        async with run_qemu(guest_spec(guest), state, marker="vfsguest: ready"):
            pytest.fail("booted in 0.5 s under TCG?")
    assert scope.cancelled_caught
    assert processes_mentioning(state) == []


@pytest.mark.qemu
async def test_stop_escalates_to_sigkill_and_a_busy_state_dir_is_refused(tmp_path: Path):
    state = tmp_path / "vm"
    spec = MachineSpec("stuck", memory_mib=64)
    async with run_qemu(spec, state) as vm:
        assert read_pidfile(state / "qemu.pid") == vm.pid
        with pytest.raises(BusyError, match=str(vm.pid)):
            async with run_qemu(spec, state):
                pass
        os.kill(vm.pid, signal.SIGSTOP)  # answers neither quit nor SIGTERM now
        with trio.fail_after(10):
            rc = await vm.stop(timeout=0.5, term_timeout=0.5)
        assert rc == -signal.SIGKILL
    assert processes_mentioning(state) == []
    assert read_pidfile(state / "qemu.pid") is None
    record = json.loads((state / "vm.json").read_text())
    assert record["accel"] in ("kvm", "tcg") and record["accel_reason"]
