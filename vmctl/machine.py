"""A guest's platform as data (:class:`MachineSpec`) and the QEMU command line it becomes.

Kept pure (no processes, no files opened) so the command line can be tested and recorded: the
VM's state directory keeps the spec, and hibernate/restore will compare platforms from it.

Choices, and why:

- machine ``q35`` (or ``pc``), never ``microvm``: microvm hung in 2 of 3 boots on these hosts;
- ``-accel kvm -cpu host`` only where :func:`vmctl.host.choose_accelerator` says KVM really works,
  else ``-accel tcg`` with QEMU's default CPU model (the same on every TCG host, so state moves);
- ``-nodefaults -no-user-config``: no devices or config the spec does not name (what is not in
  the spec cannot silently differ between a saved guest and its restore);
- QMP on a listening socket the runner creates and hands over by fd (``-chardev socket,fd=N``):
  the socket exists before QEMU starts, so connecting never races QEMU creating it;
- the serial console into a file (``-chardev file``), which outlives any client;
- ``-no-reboot``: a guest that reboots or panics ends QEMU instead of looping.

Under TCG, migration must never enable QEMU's ``auto-converge`` (it corrupted guest memory in 4
of 11 migrations here): :func:`check_migration_capabilities` is the one place that refuses it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vfs.errors import UsageError
from vmctl.disks import Disk

MACHINES = ("q35", "pc")
#: Versioned machine types (what q35/pc resolve to): a restore names the one it was saved on.
_VERSIONED = re.compile(r"^pc-(q35|i440fx)-\d+\.\d+$")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$")


def check_vm_name(name: str) -> str:
    if not _NAME.match(name) or name in (".", ".."):
        raise UsageError(
            f"bad VM name {name!r}: letters, digits, '.', '_', '-' (at most 63), "
            "starting with a letter or digit"
        )
    return name


@dataclass
class MachineSpec:
    name: str
    memory_mib: int = 256
    cpus: int = 1
    machine: str = "q35"
    kernel: Path | None = None
    initrd: Path | None = None
    append: str | None = None
    disks: list[Disk] = field(default_factory=list)
    #: CPU model; None: ``host`` under KVM, QEMU's default under TCG.
    cpu_model: str | None = None
    #: Extra QEMU arguments, appended as given (for what the spec does not model yet).
    extra_args: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        check_vm_name(self.name)
        if self.machine not in MACHINES and not _VERSIONED.match(self.machine):
            raise UsageError(
                f"machine type must be one of {', '.join(MACHINES)} (or a versioned pc-q35-X.Y, "
                f"pc-i440fx-X.Y), not {self.machine!r}"
            )
        if not 16 <= self.memory_mib <= 1 << 20:
            raise UsageError(f"memory must be between 16 MiB and 1 TiB, not {self.memory_mib} MiB")
        if not 1 <= self.cpus <= 64:
            raise UsageError(f"cpus must be between 1 and 64, not {self.cpus}")
        if (self.initrd or self.append) and not self.kernel:
            raise UsageError("--initrd and --append need --kernel")
        names = [d.node_name for d in self.disks]
        if len(set(names)) != len(names):
            raise UsageError(f"two disks with one node name: {names}")

    def describe(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "memory_mib": self.memory_mib,
            "cpus": self.cpus,
            "machine": self.machine,
            "cpu_model": self.cpu_model,
            "kernel": str(self.kernel) if self.kernel else None,
            "initrd": str(self.initrd) if self.initrd else None,
            "append": self.append,
            "disks": [d.describe() for d in self.disks],
            "extra_args": list(self.extra_args),
        }


def build_argv(
    spec: MachineSpec,
    *,
    binary: str,
    accel: str,
    qmp_fd: int,
    serial_log: Path,
    incoming: str | None = None,
) -> list[str]:
    """The QEMU command line for ``spec``; ``qmp_fd`` is a listening unix socket QEMU inherits."""
    if accel not in ("kvm", "tcg"):
        raise UsageError(f"accelerator must be kvm or tcg, not {accel!r}")
    cpu = spec.cpu_model or ("host" if accel == "kvm" else None)
    argv = [
        binary,
        "-name", f"guest={spec.name},debug-threads=on",
        "-machine", spec.machine,
        "-accel", accel,
        "-m", f"{spec.memory_mib}M",
        "-smp", str(spec.cpus),
        "-nodefaults", "-no-user-config",
        "-display", "none",
        "-no-reboot",
        "-chardev", f"socket,id=qmp,fd={qmp_fd},server=on,wait=off",
        "-mon", "chardev=qmp,mode=control",
        "-chardev", f"file,id=serial0,path={_opt(str(serial_log))}",
        "-serial", "chardev:serial0",
    ]  # fmt: skip
    if cpu:
        argv += ["-cpu", cpu]
    if spec.kernel:
        argv += ["-kernel", str(spec.kernel)]
    if spec.initrd:
        argv += ["-initrd", str(spec.initrd)]
    if spec.append:
        argv += ["-append", spec.append]
    for i, disk in enumerate(spec.disks):
        argv += disk.argv(i)
    if incoming:
        # Paused after the stream is loaded (-S): the caller checks it, then resumes it.
        argv += ["-S", "-incoming", incoming]
    return argv + list(spec.extra_args)


def _opt(value: str) -> str:
    # QEMU's option syntax: a comma inside a value is written twice.
    return value.replace(",", ",,")


def check_migration_capabilities(accel: str, capabilities: dict[str, bool]) -> None:
    """Refuse capability sets known to corrupt guests here (auto-converge under TCG)."""
    if accel == "tcg" and capabilities.get("auto-converge"):
        raise UsageError("auto-converge is not allowed under TCG (it corrupts guest memory)")
