"""The VMs of one state root: ``<root>/<name>/`` per VM, as :mod:`vmctl.qemu` lays it out.

The root is ``--root``, else ``$VMCTL_ROOT``, else ``$VFS_ROOT/vmctl`` (``/var/lib/vfs/vmctl``),
read at call time. What is running is read from the directories themselves (the pidfile with
the process's start time, the QMP socket), never from a separate registry that could drift.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import trio

from vfs.errors import NotFound
from vmctl.errors import QMPError
from vmctl.machine import check_vm_name
from vmctl.qemu import VmPaths, read_pidfile
from vmctl.qmp import open_qmp


def default_root() -> Path:
    env = os.environ.get("VMCTL_ROOT")
    if env:
        return Path(env)
    from vfs.paths import vfs_root

    return vfs_root() / "vmctl"


def vm_paths(root: Path, name: str) -> VmPaths:
    return VmPaths(Path(root) / check_vm_name(name))


def _record(paths: VmPaths) -> dict[str, Any]:
    try:
        return json.loads(paths.spec.read_text())
    except (OSError, ValueError):
        return {}


def list_vms(root: Path) -> list[dict[str, Any]]:
    """Every VM that has a state directory under ``root``: name, state, pid."""
    out = []
    if not Path(root).is_dir():
        return out
    for d in sorted(Path(root).iterdir()):
        paths = VmPaths(d)
        if not paths.spec.exists():
            continue
        pid = read_pidfile(paths.pidfile)
        rec = _record(paths)
        out.append({
            "name": d.name,
            "state": "running" if pid else "stopped",
            "pid": pid,
            "accel": rec.get("accel"),
            "memory_mib": rec.get("spec", {}).get("memory_mib"),
        })  # fmt: skip
    return out


async def vm_status(root: Path, name: str) -> dict[str, Any]:
    """One VM in detail; for a running one, QEMU's own view over QMP (run state, version)."""
    paths = vm_paths(root, name)
    if not paths.spec.exists():
        raise NotFound(f"no VM named {name!r} in {root}")
    rec = _record(paths)
    pid = read_pidfile(paths.pidfile)
    status: dict[str, Any] = {
        "name": name,
        "state": "stopped",
        "pid": pid,
        "accel": rec.get("accel"),
        "accel_reason": rec.get("accel_reason"),
        "netns": rec.get("netns"),  # the network namespace its processes run in (None: ours)
        **{k: rec.get("spec", {}).get(k) for k in ("memory_mib", "cpus", "machine", "disks")},
        "state_dir": str(paths.dir),
        "serial_log": str(paths.serial_log),
        "qmp_socket": str(paths.qmp_socket) if pid else None,
    }
    if pid:
        status["state"] = "running"
        try:
            async with open_qmp(paths.qmp_socket, name="status", connect_timeout=5) as qmp:
                run = await qmp.execute("query-status", timeout=5)
                status["state"] = run["status"]  # running, paused, inmigrate, ...
                status["qemu_version"] = ".".join(map(str, qmp.qemu_version or ()))
        except QMPError as e:
            status["qmp_error"] = str(e)
    return status


async def follow_serial(paths: VmPaths, out, follow: bool = True, poll: float = 0.1) -> None:
    """Copy the serial log to ``out`` (a binary file); with ``follow``, keep copying what the
    guest prints until its QEMU exits."""
    pos = 0
    while True:
        alive = follow and read_pidfile(paths.pidfile) is not None
        try:
            with open(paths.serial_log, "rb") as f:
                f.seek(pos)
                data = f.read()
        except FileNotFoundError:
            data = b""
        if data:
            pos += len(data)
            out.write(data)
            out.flush()
        if not alive:  # read once more after the exit was seen: nothing printed is missed
            return
        await trio.sleep(poll)
