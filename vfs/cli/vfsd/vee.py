"""`vfsd serve` and `vfsd vee add|rm|list|upgrade`: run the VEE mount, change it while it runs.

Thin: ``serve`` hands over to :mod:`vfs.daemon.serve`; the ``vee`` commands send one request to
the running daemon through its control socket (:mod:`vfs.daemon.control`).
"""

from __future__ import annotations

from pathlib import Path

import click
import trio

from vfs.cli.edge import emit_json, handle_errors, json_option
from vfs.cli.options import default_state, repo_options, state_option, store_option
from vfs.cli.sealed import keep_encrypted, keep_encrypted_option, unsealing_options
from vfs.cli.sealed import keys as sealed_keys
from vfs.daemon import control
from vfs.paths import default_store


def register(main: click.Group) -> None:
    """Attach this module's commands to the `vfsd` group."""
    main.add_command(serve_cmd)
    main.add_command(vee)


@click.command("serve")
@state_option
@click.option(
    "--mount",
    "mount",
    required=True,
    type=click.Path(file_okay=False, path_type=Path),
    help="Mountpoint (an empty directory); its entries are the VEE roots.",
)
@repo_options(
    required=False,
    alias_remote=True,
    help="Repository for cold objects (file:///DIR, DIR, http(s)://...). Without it, templates "
    "must be in the local store whole, and every object of a VEE's template is kept there.",
)
@click.option(
    "--engine",
    type=click.Choice(["auto", "kernel", "fuse"]),
    default="auto",
    show_default=True,
    help="kernel: each VEE an overlayfs mount over an EROFS image of its template (needs "
    "Linux 6.12+); fuse: one FUSE mount for all VEEs; auto: kernel where the host can.",
)
@click.option(
    "--pin-images/--no-pin-images",
    default=True,
    show_default=True,
    help="Kernel engine: keep each used template's EROFS image (metadata only, ~200 bytes per "
    "entry) locked in memory, so cold VEEs read only their data from the disk.",
)
@store_option()
@unsealing_options
@keep_encrypted_option
@click.option("--debug-fuse", is_flag=True, hidden=True)
@handle_errors
def serve_cmd(state_dir, mount, repo, engine, pin_images, store_dir, debug_fuse):
    """Serve every VEE of STATE at MOUNT/<name> (until SIGTERM).

    The kernel engine mounts each VEE root as its own overlayfs; the FUSE engine serves them
    all from one FUSE mount at MOUNT. The engine is said at start-up and by `vfsd vee list`.

    With --identity, VEEs start from encrypted templates sealed to it (`vfsd vee add NAME
    --template URL#REF`); with --trust, only from refs those publishers signed; with
    --keep-encrypted, their objects stay encrypted in the store and are decrypted on every
    read (FUSE engine only)."""
    from vfs.daemon.serve import KEEP_ENCRYPTED_NOT_KERNEL, serve
    from vfs.errors import UsageError

    state = state_dir or default_state()
    keep = keep_encrypted()
    if keep and engine == "kernel":  # before a passphrase is asked for
        raise UsageError(KEEP_ENCRYPTED_NOT_KERNEL)
    keys = sealed_keys(pins=state / "pins.json")  # key files are checked before mounting
    if keep and keys.identity is None:
        raise UsageError("--keep-encrypted needs --identity (the key that opens the templates)")
    trio.run(
        lambda: serve(
            state_dir or default_state(),
            mount,
            store_dir=store_dir or default_store(),
            repo=repo,
            keys=keys,
            debug_fuse=debug_fuse,
            engine=engine,
            keep_encrypted=keep,
            pin_images=pin_images,
        )
    )


@click.group()
def vee() -> None:
    """Add, remove, list and upgrade the VEEs of a running `vfsd serve`."""


@vee.command("add")
@state_option
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
    r = control.call(state_dir or default_state(), {"op": "add", "name": name, "template": ref})
    if as_json:
        emit_json(r)
    else:
        click.echo(f"{r['name']}: template {r['template']}")


@vee.command("rm")
@state_option
@click.argument("name")
@click.option("--purge", is_flag=True, help="Delete the private layer instead of keeping it.")
@json_option
@handle_errors
def vee_rm(state_dir, name, purge, as_json):
    """Remove VEE NAME from the mount (its private layer is kept aside unless --purge)."""
    r = control.call(state_dir or default_state(), {"op": "rm", "name": name, "purge": purge})
    if as_json:
        emit_json(r)
    elif r["kept_layer"]:
        click.echo(f"{name}: removed; private layer kept at {r['kept_layer']}")
    else:
        click.echo(f"{name}: removed")


@vee.command("list")
@state_option
@json_option
@handle_errors
def vee_list(state_dir, as_json):
    """List the VEEs and their templates."""
    state = state_dir or default_state()
    r = control.call(state, {"op": "list"})
    if as_json:
        emit_json(r)
        return
    info = control.call(state, {"op": "ping"})
    click.echo(f"engine: {info.get('engine', '?')} ({info.get('engine_reason', '')})")
    for v in r:
        extra = f"  ({v['error']})" if v["state"] == "broken" else ""
        click.echo(f"{v['name']}\t{v['template']}\t{v['state']}{extra}")


@vee.command("upgrade")
@state_option
@click.argument("name")
@click.option("--template", "ref", required=True, help="New template digest or name.")
@click.option("--dry-run", is_flag=True, help="Only report the conflicts.")
@click.option(
    "--force",
    is_flag=True,
    help="Kernel engine: remount even while processes hold the VEE (they keep the old view).",
)
@json_option
@handle_errors
def vee_upgrade(state_dir, name, ref, dry_run, force, as_json):
    """Move VEE NAME to a newer template, keeping its private changes; report conflicts.

    With the kernel engine the VEE is remounted on the new template: refused while processes
    hold it (they are listed), unless --force."""
    r = control.call(
        state_dir or default_state(),
        {"op": "upgrade", "name": name, "template": ref, "dry_run": dry_run, "force": force},
    )
    if as_json:
        emit_json(r)
        return
    verb = "upgraded" if r["applied"] else "would upgrade" if dry_run else "unchanged"
    click.echo(f"{name}: {verb} {r['old_template'][:16]}… -> {r['new_template'][:16]}…")
    for c in r["conflicts"]:
        by = f" (hidden by {c['hidden_by']})" if "hidden_by" in c else ""
        click.echo(f"conflict: {c['path']}: private {c['private']}, template {c['template']}{by}")
    if r.get("identical_to_new"):
        click.echo(
            f"{r['identical_to_new']} private files already equal the new version's: no conflict"
        )
