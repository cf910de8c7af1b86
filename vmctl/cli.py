"""`vmctl`: a thin launcher of QEMU guests on vimg images.

Only the host probe exists yet (`vmctl host`): which accelerator a guest would get here. The
launcher, migration and hibernation commands come with their own issue.
"""

from __future__ import annotations

import click

from vfs.cli_util import OneLineErrorGroup, emit_json, handle_errors, json_option, setup_logging
from vmctl.host import probe_host

__all__ = ["main", "probe_host"]


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
