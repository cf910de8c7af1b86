"""`vfsd`: the daemon and its administrative commands.

Subcommand groups live in their own modules (store/repo, template, serve/vee) so that each part of
the system owns its own CLI surface; this module only assembles them.
"""

from __future__ import annotations

import click

from vfs.cli.edge import OneLineErrorGroup, setup_logging
from vfs.cli.vfsd import export, keys, redirect, template, vee


@click.group(cls=OneLineErrorGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("-v", "--verbose", count=True, help="More logging (-vv for debug).")
def main(verbose: int) -> None:
    """vfs daemon: the object store, repositories, templates, VEE trees, image exports."""
    setup_logging(verbose)


redirect.register(main)
template.register(main)
vee.register(main)
export.register(main)
keys.register(main)
