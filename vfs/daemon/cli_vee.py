"""Placeholder: this command group is being written."""

from __future__ import annotations

import click


def register(main: click.Group) -> None:
    """Attach this module's commands to the `vfsd` group."""
