"""`vfsd serve` and `vfsd vee add|rm|list|upgrade`: run the VEE mount, change it while it runs.

Thin: ``serve`` hands over to :mod:`vfs.daemon.serve`; the ``vee`` commands send one request to
the running daemon through its control socket (:mod:`vfs.daemon.control`).
"""

from __future__ import annotations

import os
from pathlib import Path

import click
import trio

from vfs.cli_sealed import keys as sealed_keys
from vfs.cli_sealed import unsealing_options
from vfs.cli_util import emit_json, handle_errors, json_option
from vfs.daemon import control
from vfs.paths import default_store, vfs_root


def _default_state() -> Path:
    return Path(os.environ.get("VFS_STATE", str(vfs_root() / "state")))


_state_opt = click.option(
    "--state",
    "state_dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Daemon state directory [default: $VFS_STATE or $VFS_ROOT/state].",
)


def register(main: click.Group) -> None:
    """Attach this module's commands to the `vfsd` group."""
    main.add_command(serve_cmd)
    main.add_command(vee)


@click.command("serve")
@_state_opt
@click.option(
    "--mount",
    "mount",
    required=True,
    type=click.Path(file_okay=False, path_type=Path),
    help="Mountpoint (an empty directory); its entries are the VEE roots.",
)
@click.option("--remote", "remote_url", metavar="URL", help="Repository for cold objects.")
@click.option("--ca", type=click.Path(dir_okay=False), help="CA of an https:// remote's server.")
@click.option("--cert", type=click.Path(dir_okay=False), help="Client certificate (mutual TLS).")
@click.option("--key", type=click.Path(dir_okay=False), help="Client key (mutual TLS).")
@click.option("--proxy", metavar="URL", help="HTTP forward proxy (site cache) for the remote.")
@click.option(
    "--store",
    "store_dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Local object store [default: $VFS_STORE or $VFS_ROOT/store].",
)
@unsealing_options
@click.option("--debug-fuse", is_flag=True, hidden=True)
@handle_errors
def serve_cmd(state_dir, mount, remote_url, ca, cert, key, proxy, store_dir, debug_fuse):
    """Serve every VEE of STATE as a directory of one FUSE mount at MOUNT (until SIGTERM).

    With --identity, VEEs start from encrypted templates sealed to it (`vfsd vee add NAME
    --template URL#REF`); with --trust, only from refs those publishers signed."""
    from vfs.daemon.serve import serve

    state = state_dir or _default_state()
    keys = sealed_keys(pins=state / "pins.json")  # key files are checked before mounting
    trio.run(
        lambda: serve(
            state,
            mount,
            store_dir=store_dir or default_store(),
            remote_url=remote_url,
            remote_tls={"ca": ca, "cert": cert, "key": key, "proxy": proxy},
            keys=keys,
            debug_fuse=debug_fuse,
        )
    )


@click.group()
def vee() -> None:
    """Add, remove, list and upgrade the VEEs of a running `vfsd serve`."""


@vee.command("add")
@_state_opt
@click.argument("name")
@click.option(
    "--template",
    "ref",
    required=True,
    help="Template digest, ref name of --remote, or address URL#REF (e.g. an encrypted one).",
)
@json_option
@handle_errors
def vee_add(state_dir, name, ref, as_json):
    """Create VEE NAME on a template; it appears as MOUNT/NAME at once."""
    r = control.call(state_dir or _default_state(), {"op": "add", "name": name, "template": ref})
    if as_json:
        emit_json(r)
    else:
        click.echo(f"{r['name']}: template {r['template']}")


@vee.command("rm")
@_state_opt
@click.argument("name")
@click.option("--purge", is_flag=True, help="Delete the private layer instead of keeping it.")
@json_option
@handle_errors
def vee_rm(state_dir, name, purge, as_json):
    """Remove VEE NAME from the mount (its private layer is kept aside unless --purge)."""
    r = control.call(state_dir or _default_state(), {"op": "rm", "name": name, "purge": purge})
    if as_json:
        emit_json(r)
    elif r["kept_layer"]:
        click.echo(f"{name}: removed; private layer kept at {r['kept_layer']}")
    else:
        click.echo(f"{name}: removed")


@vee.command("list")
@_state_opt
@json_option
@handle_errors
def vee_list(state_dir, as_json):
    """List the VEEs and their templates."""
    r = control.call(state_dir or _default_state(), {"op": "list"})
    if as_json:
        emit_json(r)
        return
    for v in r:
        extra = f"  ({v['error']})" if v["state"] == "broken" else ""
        click.echo(f"{v['name']}\t{v['template']}\t{v['state']}{extra}")


@vee.command("upgrade")
@_state_opt
@click.argument("name")
@click.option("--template", "ref", required=True, help="New template digest or name.")
@click.option("--dry-run", is_flag=True, help="Only report the conflicts.")
@json_option
@handle_errors
def vee_upgrade(state_dir, name, ref, dry_run, as_json):
    """Move VEE NAME to a newer template, keeping its private changes; report conflicts."""
    r = control.call(
        state_dir or _default_state(),
        {"op": "upgrade", "name": name, "template": ref, "dry_run": dry_run},
    )
    if as_json:
        emit_json(r)
        return
    verb = "upgraded" if r["applied"] else "would upgrade" if dry_run else "unchanged"
    click.echo(f"{name}: {verb} {r['old_template'][:16]}… -> {r['new_template'][:16]}…")
    for c in r["conflicts"]:
        click.echo(f"conflict: {c['path']}: private {c['private']}, template {c['template']}")
