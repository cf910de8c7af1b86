"""`vmctl`: a thin launcher of QEMU guests on vimg images.

Only the host probe exists yet (`vmctl host`): which accelerator a guest would get here. The
launcher, migration and hibernation commands come with their own issue.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import click

from vfs.cli_util import OneLineErrorGroup, emit_json, handle_errors, json_option, setup_logging


def probe_host() -> dict:
    """What this host offers a guest: QEMU binary and version, KVM device and its flavour.

    ``kvm_pvm`` (a paravirtual KVM found inside some cloud VMs) cannot run stock guest kernels,
    so it counts as unusable and guests fall back to TCG.
    """
    qemu = shutil.which("qemu-system-x86_64")
    version = None
    if qemu:
        out = subprocess.run([qemu, "--version"], capture_output=True, text=True).stdout
        version = out.splitlines()[0] if out else None
    modules = (
        sorted(
            m.name
            for m in Path("/sys/module").glob("kvm*")
            if m.name in ("kvm_intel", "kvm_amd", "kvm_pvm")
        )
        if Path("/sys/module").exists()
        else []
    )
    dev = Path("/dev/kvm").exists()
    usable = dev and any(m in ("kvm_intel", "kvm_amd") for m in modules)
    return {
        "qemu": qemu,
        "qemu_version": version,
        "dev_kvm": dev,
        "kvm_modules": modules,
        "accelerator": "kvm" if usable else "tcg",
        "reason": (
            "hardware KVM available"
            if usable
            else "kvm_pvm cannot run stock guest kernels"
            if "kvm_pvm" in modules
            else "no usable /dev/kvm"
        ),
    }


@click.group(cls=OneLineErrorGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("-v", "--verbose", count=True, help="More logging (-vv for debug).")
def main(verbose: int) -> None:
    """Launch and move QEMU guests on vimg images (host probe only, so far)."""
    setup_logging(verbose)


@main.command()
@json_option
@handle_errors
def host(as_json: bool) -> None:
    """Show what this host offers guests: QEMU version and the accelerator (kvm or tcg)."""
    info = probe_host()
    if as_json:
        emit_json(info)
        return
    click.echo(f"qemu:        {info['qemu_version'] or 'not installed'}")
    click.echo(
        f"/dev/kvm:    {'present' if info['dev_kvm'] else 'absent'}"
        f" ({', '.join(info['kvm_modules']) or 'no kvm module'})"
    )
    click.echo(f"accelerator: {info['accelerator']} ({info['reason']})")
