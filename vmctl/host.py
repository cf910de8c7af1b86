"""What this host offers a guest: the QEMU binary, and whether KVM really works or TCG it is.

A ``/dev/kvm`` is not enough. On the machines this project grew up on it belongs to ``kvm_pvm``,
a paravirtual KVM inside a cloud VM that cannot run stock guest kernels: ``-cpu host`` aborts
("failed to set MSR 0x10a") and other CPU models crawl, then die on an emulation failure. So the
probe asks, in order, and the first "no" is the reason given for TCG:

1. ``$VMCTL_ACCEL`` set to ``kvm`` or ``tcg``: the operator decided (an unknown value is an error).
2. ``/dev/kvm`` exists and this process can open it read-write.
3. ``KVM_GET_API_VERSION`` on it answers 12 (the only stable KVM API there has ever been).
4. No ``kvm_pvm`` module is loaded (it answers the API call, then cannot run the guest).
5. ``kvm_intel`` or ``kvm_amd`` is loaded, and the CPU flags show ``vmx`` or ``svm``.

All cheap (no QEMU started). Whatever is chosen, the reason travels with it into the VM's state
and ``status``, so an operator who wonders why a guest is slow reads why.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import subprocess
from dataclasses import asdict, dataclass, field
from pathlib import Path

from vfs.errors import UsageError

KVM_GET_API_VERSION = 0xAE00
KVM_API_VERSION = 12


@dataclass(frozen=True)
class Accelerator:
    name: str  # "kvm" or "tcg"
    reason: str
    facts: dict[str, object] = field(default_factory=dict)


def _kvm_api_version(dev: Path) -> int | None:
    try:
        fd = os.open(dev, os.O_RDWR | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        return fcntl.ioctl(fd, KVM_GET_API_VERSION)
    except OSError:
        return None
    finally:
        os.close(fd)


def _cpu_flags(cpuinfo: Path) -> set[str]:
    try:
        text = cpuinfo.read_text()
    except OSError:
        return set()
    for line in text.splitlines():
        if line.startswith("flags"):
            return set(line.partition(":")[2].split())
    return set()


def choose_accelerator(
    env: dict[str, str] | None = None,
    dev: Path = Path("/dev/kvm"),
    sys_module: Path = Path("/sys/module"),
    cpuinfo: Path = Path("/proc/cpuinfo"),
) -> Accelerator:
    """KVM where it really works, TCG otherwise, with the reason (see the module docstring)."""
    env = os.environ if env is None else env
    modules = sorted(
        m for m in ("kvm", "kvm_intel", "kvm_amd", "kvm_pvm") if (sys_module / m).exists()
    )
    flags = _cpu_flags(cpuinfo) & {"vmx", "svm", "hypervisor"}
    facts: dict[str, object] = {
        "dev_kvm": dev.exists(),
        "kvm_modules": modules,
        "cpu_flags": sorted(flags),
    }
    forced = env.get("VMCTL_ACCEL", "").strip().lower()
    if forced:
        if forced not in ("kvm", "tcg"):
            raise UsageError(f"VMCTL_ACCEL must be kvm or tcg, not {forced!r}")
        return Accelerator(forced, "forced by VMCTL_ACCEL", facts)
    if not dev.exists():
        return Accelerator("tcg", f"no {dev}", facts)
    if not os.access(dev, os.R_OK | os.W_OK):
        return Accelerator("tcg", f"{dev} is not read-writable by this user", facts)
    api = _kvm_api_version(dev)
    facts["kvm_api_version"] = api
    if api != KVM_API_VERSION:
        return Accelerator("tcg", f"{dev} does not answer KVM_GET_API_VERSION with 12", facts)
    if "kvm_pvm" in modules:
        return Accelerator("tcg", "kvm_pvm (paravirtual KVM) cannot run stock guest kernels", facts)
    if not ({"kvm_intel", "kvm_amd"} & set(modules)):
        return Accelerator("tcg", "neither kvm_intel nor kvm_amd is loaded", facts)
    if not ({"vmx", "svm"} & flags):
        return Accelerator("tcg", "the CPU shows no vmx/svm flag", facts)
    return Accelerator("kvm", "hardware KVM available", facts)


def qemu_binary() -> str | None:
    return shutil.which("qemu-system-x86_64")


def qemu_version(binary: str) -> str | None:
    try:
        out = subprocess.run([binary, "--version"], capture_output=True, text=True).stdout
    except OSError:
        return None
    return out.splitlines()[0] if out else None


def probe_host() -> dict:
    """Everything ``vmctl host`` shows: the QEMU binary and version, the accelerator and why."""
    qemu = qemu_binary()
    accel = choose_accelerator()
    return {
        "qemu": qemu,
        "qemu_version": qemu_version(qemu) if qemu else None,
        "dev_kvm": accel.facts["dev_kvm"],
        "kvm_modules": accel.facts["kvm_modules"],
        "accelerator": accel.name,
        "reason": accel.reason,
        "facts": asdict(accel)["facts"],
    }
