"""The QMP client against real QEMU (TCG here): status, stop/cont with their events on the
stream, command errors carrying what was sent, a big reply, timeouts, and a QEMU killed under
the client reported as a named error at once."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pytest
import trio

from tests.vmctl.helpers import guest_spec
from tools.guest import Guest
from vmctl.disks import Blockdevs
from vmctl.errors import QMPConnectionLost, QMPExecuteError, QMPTimeout
from vmctl.machine import MachineSpec
from vmctl.qemu import run_qemu
from vmctl.qmp import Runstate

pytestmark = pytest.mark.qemu


def bare(name: str = "bare") -> MachineSpec:
    """A machine with no guest at all (firmware only): QEMU in ~50 ms, for protocol tests."""
    return MachineSpec(name, memory_mib=64)


async def test_status_stop_cont_events_and_the_guest_goes_on(tmp_path: Path, guest: Guest):
    spec = guest_spec(guest, run="dirty", params={"dirty_mb": 4})
    async with run_qemu(spec, tmp_path / "vm", marker="vfsguest: ready") as vm:
        qmp = vm.qmp
        assert qmp.qemu_version is not None and qmp.qemu_version >= (7, 0, 0)
        assert (await qmp.execute("query-status"))["status"] == "running"
        await vm.wait_serial(r"vfsguest: dirty 3\n", timeout=30)
        with qmp.listen("STOP", "RESUME") as events:
            await qmp.execute("stop")
            await events.wait_for("STOP", timeout=5)
            assert (await qmp.execute("query-status"))["status"] == "paused"
            paused_at = vm.serial_text()
            await trio.sleep(0.5)  # a paused guest prints nothing (a negative check needs time)
            assert vm.serial_text() == paused_at
            await qmp.execute("cont")
            await events.wait_for("RESUME", timeout=5)
        last = max(dirty_counters(paused_at))
        await vm.wait_serial(rf"vfsguest: dirty {last + 2}\n", timeout=30)
    counters = dirty_counters(vm.serial_text())
    assert counters == list(range(1, len(counters) + 1))  # no gap, no restart, no CORRUPT


def dirty_counters(serial: str) -> list[int]:
    return [int(x.split()[-1]) for x in serial.splitlines() if x.startswith("vfsguest: dirty")]


async def test_command_errors_carry_what_was_sent(tmp_path: Path):
    async with run_qemu(bare(), tmp_path / "vm") as vm:
        with pytest.raises(QMPExecuteError) as info:
            await vm.qmp.execute("no-such-command")
        assert info.value.error_class == "CommandNotFound"
        assert info.value.sent["execute"] == "no-such-command"
        args = {"driver": "file", "filename": str(tmp_path / "missing.img"), "node-name": "x"}
        with pytest.raises(QMPExecuteError) as info:
            await vm.qmp.execute("blockdev-add", args)
        assert info.value.sent["arguments"] == args
        assert "missing.img" in info.value.desc
        # The connection is fine after errors; a big reply (the schema, ~hundreds of KiB) too.
        schema = await vm.qmp.execute("query-qmp-schema")
        assert len(schema) > 500


async def test_a_stopped_qemu_times_out_then_recovers(tmp_path: Path):
    async with run_qemu(bare(), tmp_path / "vm") as vm:
        os.kill(vm.pid, signal.SIGSTOP)
        try:
            with pytest.raises(QMPTimeout) as info:
                await vm.qmp.execute("query-status", timeout=0.3)
            assert info.value.sent["execute"] == "query-status"
        finally:
            os.kill(vm.pid, signal.SIGCONT)
        assert (await vm.qmp.execute("query-status"))["running"] is True


async def test_qemu_killed_under_the_client_is_a_named_error_at_once(tmp_path: Path):
    async with run_qemu(bare(), tmp_path / "vm") as vm:
        qmp = vm.qmp
        outcome: list[BaseException] = []
        with qmp.listen() as events:
            os.kill(vm.pid, signal.SIGSTOP)  # so the command below is surely in flight

            async def pending() -> None:
                try:
                    await qmp.execute("query-status", timeout=30)
                except QMPConnectionLost as e:
                    outcome.append(e)

            async with trio.open_nursery() as nursery:
                nursery.start_soon(pending)
                await trio.sleep(0.1)
                t0 = time.monotonic()
                os.kill(vm.pid, signal.SIGKILL)
            took = time.monotonic() - t0
            assert took < 2.0, f"a dead QEMU took {took:.2f}s to be noticed"
            assert outcome and outcome[0].sent["execute"] == "query-status"
            assert "closed the connection" in str(outcome[0])
            with pytest.raises(QMPConnectionLost):
                await events.get(timeout=2)
        assert qmp.runstate is Runstate.LOST
        with trio.fail_after(1), pytest.raises(QMPConnectionLost):
            await qmp.execute("query-status")
        assert await vm.wait_exit(5) == -signal.SIGKILL
    assert not vm.paths.qmp_socket.exists()


async def test_blockdev_disk_spec_reaches_qemu(tmp_path: Path):
    import subprocess

    img = tmp_path / "d.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(img), "16M"], check=True)
    disk = Blockdevs([
        {"driver": "file", "filename": str(img), "node-name": "f0"},
        {"driver": "qcow2", "file": "f0", "node-name": "d0"},
    ])  # fmt: skip
    spec = MachineSpec("bd", memory_mib=64, disks=[disk])
    async with run_qemu(spec, tmp_path / "vm") as vm:
        nodes = {n["node-name"]: n for n in await vm.qmp.execute("query-named-block-nodes")}
        assert nodes["d0"]["drv"] == "qcow2" and nodes["d0"]["image"]["virtual-size"] == 16 << 20
