"""Helpers shared by the tests that run real QEMU."""

from __future__ import annotations

from pathlib import Path

from tools.guest import Guest
from vmctl.disks import Disk
from vmctl.machine import MachineSpec


def processes_mentioning(text: str | Path) -> list[int]:
    """Pids of live processes (zombies included) whose command line contains ``text``.

    Every QEMU the runner starts has its state directory in its command line (the serial log
    path), so this finds any QEMU a test left behind, reaped or not.
    """
    needle = str(text).encode()
    found = []
    for p in Path("/proc").iterdir():
        if not p.name.isdigit():
            continue
        try:
            if needle in (p / "cmdline").read_bytes():
                found.append(int(p.name))
        except OSError:
            continue  # gone while we looked
    return found


def guest_spec(
    guest: Guest, name: str = "g", run: str = "idle", disks: list[Disk] | None = None, **kw
) -> MachineSpec:
    count = kw.pop("count", 0)
    params = kw.pop("params", {})
    return MachineSpec(
        name,
        kernel=guest.kernel,
        initrd=guest.initrd,
        append=guest.append(run, count=count, **params),
        disks=disks or [],
        **kw,
    )


def synced_numbers(serial: str) -> list[int]:
    return [int(line.split()[-1]) for line in serial.splitlines() if "vfsguest: synced " in line]
