"""`vfsd`: the daemon and its administrative commands.

Subcommand groups live in their own modules (store/repo, template, serve/vee) so that each part of
the system owns its own CLI surface; this module only assembles them.
"""

from __future__ import annotations

import click

from vfs.cli_util import OneLineErrorGroup, setup_logging
from vfs.daemon import cli_export, cli_keys, cli_redirect, cli_template, cli_vee


@click.group(cls=OneLineErrorGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("-v", "--verbose", count=True, help="More logging (-vv for debug).")
def main(verbose: int) -> None:
    """vfs daemon: the object store, repositories, templates, VEE trees, image exports."""
    setup_logging(verbose)


cli_redirect.register(main)
cli_template.register(main)
cli_vee.register(main)
cli_export.register(main)
cli_keys.register(main)
