"""A whole VM's start and stop: its disks' exports and its QEMU, in the right order.

Start: refuse a busy state directory, stop exports a dead QEMU left behind (they hold their
images' locks), start the exports, start QEMU (optionally waiting for an incoming migration
stream, then running ``on_up`` — restore feeds the saved state there), detach it. Any failure
on the way stops whatever was started, so nothing outlives a failed start.

Stop: QEMU first (it flushes its disks as it quits), then the exports (their last commit).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from vfs.errors import BusyError
from vmctl.exports import check_not_shared, start_exports, stop_vm_exports
from vmctl.host import Accelerator
from vmctl.machine import MachineSpec
from vmctl.qemu import QemuVM, VmPaths, read_pidfile, run_qemu, stop_detached


async def start_vm(
    spec: MachineSpec,
    paths: VmPaths,
    *,
    marker: str | None = None,
    timeout: float = 120.0,
    incoming: str | None = None,
    on_up: Callable[[QemuVM], Awaitable[None]] | None = None,
    accel: Accelerator | None = None,
    netns: str | None = None,
) -> dict[str, Any]:
    """Start ``spec`` in ``paths`` and leave it running; returns what ``vmctl run`` reports.
    ``netns``: its QEMU and exports run in that network namespace (vmctl/netns.py)."""
    running = read_pidfile(paths.pidfile)
    if running is not None:
        raise BusyError(f"VM {spec.name!r} already runs (QEMU pid {running}) in {paths.dir}")
    check_not_shared(spec.disks)
    paths.dir.mkdir(parents=True, exist_ok=True)
    await stop_vm_exports(paths.dir)  # left by a QEMU that died or powered off
    ok = False
    await start_exports(spec.disks, netns)
    try:
        async with run_qemu(spec, paths.dir, marker=marker, boot_timeout=timeout,
                            connect_timeout=timeout, incoming=incoming,
                            accel=accel, netns=netns) as vm:  # fmt: skip
            if on_up is not None:
                await on_up(vm)
            vm.detach()
            info = {"name": spec.name, "pid": vm.pid, "accel": vm.accel.name,
                    "accel_reason": vm.accel.reason, "state_dir": str(paths.dir),
                    "serial_log": str(paths.serial_log)}  # fmt: skip
        ok = True
        return info
    finally:
        if not ok:
            import trio

            with trio.CancelScope(shield=True):
                await stop_vm_exports(paths.dir)


async def stop_vm(paths: VmPaths, *, force: bool = False, timeout: float = 20.0) -> bool:
    """Stop QEMU, then the disks' exports; False if neither was running."""
    qemu = await stop_detached(paths, force=force, timeout=timeout)
    exports = await stop_vm_exports(paths.dir)
    return bool(qemu or exports)
