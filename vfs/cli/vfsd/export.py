"""``vfsd export``: serve an image over NBD / as a raw file, and talk to running exports.

- ``vfsd export IMAGE --nbd SOCKET [--tcp 127.0.0.1:PORT] [--fuse FILE] [--readonly]`` runs one
  export in the foreground (as ``qemu-nbd`` does without ``--fork``) until SIGTERM;
- ``vfsd export add|rm|list`` manage the exports of a running ``vfsd serve`` (it starts one
  such process per image and restarts it when it dies);
- ``vfsd export status|dirty|mark|take|flush|hydrate|stop TARGET`` talk to one export: TARGET is
  its control socket (``SOCKET.ctl`` by default) or the name of an export of ``vfsd serve``.

Kept in one module (the CLIs are to move into one package as a whole).
"""

from __future__ import annotations

import ipaddress
import sys
import time
from pathlib import Path
from typing import Any

import click

from vfs.cli.edge import emit_json, handle_errors, json_option
from vfs.cli.options import default_state, repo_options, state_option, store_option
from vfs.cli.sealed import keep_encrypted_option, unsealing_options
from vfs.errors import UsageError, VfsError


class DefaultRunGroup(click.Group):
    """``vfsd export IMAGE ...`` is ``vfsd export run IMAGE ...``: the first word that is not
    a subcommand (nor an option of the group) starts the foreground export."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        if args and args[0] not in self.commands and args[0] not in ("-h", "--help"):
            args = ["run", *args]
        return super().parse_args(ctx, args)


def register(main: click.Group) -> None:
    main.add_command(export)


@click.group("export", cls=DefaultRunGroup)
def export() -> None:
    """Serve vimg images to guests and tools: NBD (Unix socket, loopback TCP) and a raw file
    on FUSE; dirty maps, hydration. `vfsd export IMAGE --nbd SOCK` runs one in the foreground."""


def _parse_tcp(values: tuple[str, ...]) -> list[tuple[str, int]]:
    out = []
    for v in values:
        host, _, port = v.rpartition(":")
        host = host.strip("[]")
        try:
            p = int(port)
        except ValueError:
            raise UsageError(f"--tcp wants HOST:PORT, not {v!r}") from None
        if not host or not 0 < p < 65536:
            raise UsageError(f"--tcp wants HOST:PORT, not {v!r}")
        try:  # checked before the image is opened (the listener checks again)
            loopback = ipaddress.ip_address(host).is_loopback
        except ValueError:
            raise UsageError(f"--tcp wants an IP address, not {host!r}") from None
        if not loopback:
            raise UsageError(f"TCP exports listen on loopback addresses only (no TLS), not {host}")
        out.append((host, p))
    return out


def _config(image, nbd, tcp, fuse, readonly, name, bitmap, no_bitmap, control, store, repo,
            backing_dirs, description):  # fmt: skip
    from vfs.export.service import ExportConfig

    return ExportConfig(
        image=str(Path(image).resolve()),
        name=name or "",
        nbd=[str(Path(p).absolute()) for p in nbd],
        tcp=_parse_tcp(tcp),
        fuse=str(Path(fuse).absolute()) if fuse else None,
        readonly=readonly,
        bitmap=None if no_bitmap else bitmap,
        control=str(Path(control).absolute()) if control else None,
        store=None if store is None else str(store),
        repo=repo,  # a RepoConfig (vfs.cli.options.repo_options) or None
        **_key_files(repo.url if repo is not None else None),
        backing_dirs=list(backing_dirs),
        description=description or "",
    )


def _key_files(repo: str | None) -> dict[str, Any]:
    """--identity, --trust, --pins as absolute names (an export of `vfsd serve` runs elsewhere);
    only an encrypted image's address URL#REF uses them."""
    from vfs.cli.sealed import key_files

    f = key_files()
    if not (repo and "#" in repo):
        if f["identity"] or f["trust"] or f["keep_encrypted"]:
            raise UsageError(
                "--identity/--trust/--keep-encrypted apply only with --repo URL#REF "
                "(an encrypted image)"
            )
        return {}
    return f


def _export_opts(fn: Any) -> Any:
    opts = [
        click.option("--nbd", multiple=True, metavar="SOCKET", help="Unix socket to serve NBD on."),
        click.option("--tcp", multiple=True, metavar="HOST:PORT", help="Loopback TCP address."),
        click.option(
            "--fuse", metavar="FILE", help="Also serve the disk as a raw file mounted onto FILE."
        ),
        click.option("--readonly", "-r", is_flag=True, help="Refuse writes (shared image lock)."),
        click.option("--name", "-x", help="Export name [default: the image's file name stem]."),
        click.option(
            "--bitmap",
            "-B",
            default="dirty",
            show_default=True,
            help="Dirty bitmap to keep (created if missing).",
        ),
        click.option("--no-bitmap", is_flag=True, help="Keep no dirty bitmap."),
        click.option("--control", metavar="SOCKET", help="Control socket [default: SOCKET.ctl]."),
        store_option("Local object store.", param="store"),
        repo_options(
            required=False,
            help="Repository of remote clusters (file:///DIR, http(s)://; URL#REF: the "
            "encrypted image REF in it, opened with --identity).",
        ),
        click.option(
            "--backing-dir",
            "backing_dirs",
            multiple=True,
            type=click.Path(file_okay=False),
            help="Another directory backing files may lie in.",
        ),
        click.option("--description", help="Export description (nbdinfo shows it)."),
    ]
    for o in reversed(opts):
        fn = o(fn)
    return keep_encrypted_option(unsealing_options(fn))


@export.command("run")
@click.argument("image", type=click.Path(dir_okay=False))
@_export_opts
@handle_errors
def run_cmd(image, nbd, tcp, fuse, readonly, name, bitmap, no_bitmap, control, store, repo,
            backing_dirs, description):  # fmt: skip
    """Export IMAGE until SIGTERM (`vfsd export IMAGE ...` is the same)."""
    import trio

    from vfs.export.service import run_export

    if not Path(image).exists():
        raise UsageError(f"{image}: no such file")
    cfg = _config(image, nbd, tcp, fuse, readonly, name, bitmap, no_bitmap, control, store,
                  repo, backing_dirs, description)  # fmt: skip
    try:
        trio.run(run_export, cfg)
    except BaseExceptionGroup as eg:
        raise _single(eg) from None


def _single(eg: BaseExceptionGroup) -> BaseException:
    """The one error inside nested task groups (so the CLI prints it as one line), else the
    group itself (a bug: its traceback is what a report needs)."""
    leaves: list[BaseException] = []

    def walk(e: BaseException) -> None:
        if isinstance(e, BaseExceptionGroup):
            for x in e.exceptions:
                walk(x)
        else:
            leaves.append(e)

    walk(eg)
    return leaves[0] if len(leaves) == 1 else eg


# ------------------------------------------------------------------ the daemon's exports
def _state(state_dir: Path | None) -> Path:
    return state_dir or default_state()


_state_opt = state_option  # the running vfsd serve's (vfs.cli.options)


@export.command("add")
@_state_opt
@click.argument("export_name", metavar="NAME")
@click.argument("image", type=click.Path(dir_okay=False))
@_export_opts
@json_option
@handle_errors
def add_cmd(state_dir, export_name, image, nbd, tcp, fuse, readonly, name, bitmap, no_bitmap,
            control, store, repo, backing_dirs, description, as_json):  # fmt: skip
    """Have the running `vfsd serve` export IMAGE as NAME (kept across daemon restarts)."""
    from vfs.daemon import control as C

    if name and name != export_name:
        raise UsageError("--name and NAME differ: give the export name once")
    if control:
        raise UsageError("the daemon chooses the control socket of its exports")
    if repo is not None:  # the daemon resolves no path relative to this shell's directory
        repo = repo.with_absolute_paths()
    cfg = _config(image, nbd, tcp, fuse, readonly, export_name, bitmap, no_bitmap,
                  "/unused", store, repo, backing_dirs, description)  # fmt: skip
    spec = cfg.to_json()
    spec.pop("control")
    spec.update(store=cfg.store, repo=cfg.repo.to_json() if cfg.repo else None,
                backing_dirs=cfg.backing_dirs,
                description=cfg.description)  # fmt: skip
    if cfg.repo is not None and "#" in cfg.repo.url:
        spec.update(identity=cfg.identity, trust=cfg.trust, pins=cfg.pins,
                    passphrase_file=cfg.passphrase_file,
                    keep_encrypted=cfg.keep_encrypted)  # fmt: skip
    r = C.call(_state(state_dir), {"op": "export_add", "spec": _encode(spec)})
    if as_json:
        emit_json(r)
    else:
        click.echo(f"{r['name']}: exporting {r['image']} (pid {r['pid']})")


def _encode(spec: dict[str, Any]) -> str:
    import json

    return json.dumps(spec)


@export.command("rm")
@_state_opt
@click.argument("export_name", metavar="NAME")
@json_option
@handle_errors
def rm_cmd(state_dir, export_name, as_json):
    """Stop export NAME of the running `vfsd serve` and forget it."""
    from vfs.daemon import control as C

    r = C.call(_state(state_dir), {"op": "export_rm", "name": export_name})
    if as_json:
        emit_json(r)
    else:
        click.echo(f"{export_name}: stopped")


@export.command("list")
@_state_opt
@json_option
@handle_errors
def list_cmd(state_dir, as_json):
    """List the exports of the running `vfsd serve`."""
    from vfs.daemon import control as C

    r = C.call(_state(state_dir), {"op": "export_list"})
    if as_json:
        emit_json(r)
        return
    for e in r:
        where = " ".join(e["nbd"] + e["tcp"] + ([e["fuse"]] if e["fuse"] else []))
        click.echo(f"{e['name']}\t{e['state']}\t{e['image']}\t{where}")


# ------------------------------------------------------------------ one export
def _target(target: str, state_dir: Path | None) -> str:
    """A control socket path: TARGET itself when it is one, else the daemon's export TARGET."""
    p = Path(target)
    if "/" in target or p.exists():
        return str(p)
    from vfs.daemon import control as C

    for e in C.call(_state(state_dir), {"op": "export_list"}):
        if e["name"] == target:
            return e["control"]
    raise UsageError(f"no export named {target!r} in the running vfsd (see vfsd export list)")


def _call(target: str, state_dir: Path | None, req: dict[str, Any], timeout: float = 600) -> Any:
    from vfs.export.client import ExportControl

    return ExportControl(_target(target, state_dir)).call(req, timeout=timeout)


_target_arg = click.argument("target", metavar="TARGET")

_bitmap_opt = click.option(
    "--bitmap", "-B", default="dirty", show_default=True, help="Name of the dirty bitmap."
)


def _target_command(name: str, *options: Any, bitmap: bool = False, json: bool = True) -> Any:
    """A command on one export: ``vfsd export NAME [--state DIR] TARGET [--bitmap B]
    [OPTIONS] [--json]``, its errors one line (the stack every such command shares)."""

    def decorate(fn: Any) -> Any:
        fn = handle_errors(fn)
        if json:
            fn = json_option(fn)
        for o in reversed(options):
            fn = o(fn)
        if bitmap:
            fn = _bitmap_opt(fn)
        return export.command(name)(_state_opt(_target_arg(fn)))

    return decorate


@_target_command("status")
def status_cmd(state_dir, target, as_json):
    """Counters, bitmaps and hydration progress of export TARGET."""
    r = _call(target, state_dir, {"op": "status"})
    if as_json:
        emit_json(r)
        return
    ro = ", read-only" if r["readonly"] else ""
    click.echo(f"{r['name']}: {r['image']} ({r['size']} bytes{ro})")
    click.echo(f"  pid {r['pid']}, {r['connections']} connection(s), {r['commits']} commit(s)")
    for b in r["bitmaps"]:
        stale = " (stale: all dirty)" if b["stale"] else ""
        click.echo(f"  bitmap {b['name']}: {b['dirty_bytes']} bytes dirty{stale}")
    h = r["hydrate"]
    if h["state"] != "idle":
        click.echo(f"  hydrate: {h['state']} {h['done']}/{h['total']} {h['error']}".rstrip())


def _print_ranges(ranges: list[list[int]], as_json: bool, bitmap: str) -> None:
    if as_json:
        emit_json({"bitmap": bitmap, "dirty": [{"offset": o, "length": n} for o, n in ranges],
                   "dirty_bytes": sum(n for _o, n in ranges)})  # fmt: skip
        return
    for o, n in ranges:
        click.echo(f"{o}\t{n}")
    click.echo(f"{sum(n for _o, n in ranges)} bytes dirty", err=True)


@_target_command("dirty", bitmap=True)
def dirty_cmd(state_dir, target, bitmap, as_json):
    """The ranges written since the last mark (offset, length; --json for scripts)."""
    _print_ranges(_call(target, state_dir, {"op": "dirty", "bitmap": bitmap}), as_json, bitmap)


@_target_command("take", bitmap=True)
def take_cmd(state_dir, target, bitmap, as_json):
    """The dirty ranges and a new mark, atomically (what a copier copies next)."""
    _print_ranges(_call(target, state_dir, {"op": "take", "bitmap": bitmap}), as_json, bitmap)


@_target_command(
    "mark",
    click.option("--granularity", default=0, help="Bytes per bit of a new bitmap."),
    bitmap=True,
)
def mark_cmd(state_dir, target, bitmap, granularity, as_json):
    """A new point in time: clear the bitmap (create it when missing)."""
    r = _call(target, state_dir, {"op": "mark", "bitmap": bitmap, "granularity": granularity})
    emit_json(r) if as_json else click.echo(f"{bitmap}: marked")


@_target_command("flush", json=False)
def flush_cmd(state_dir, target):
    """Commit what was written to export TARGET."""
    _call(target, state_dir, {"op": "flush"})


@_target_command("stop", json=False)
def stop_cmd(state_dir, target):
    """Stop a foreground export (SIGTERM does the same)."""
    _call(target, state_dir, {"op": "stop"})


@_target_command(
    "hydrate",
    click.option("--wait", is_flag=True, help="Wait until every cluster is local, with progress."),
)
def hydrate_cmd(state_dir, target, wait, as_json):
    """Fetch the remote clusters of export TARGET into its image, in the background."""
    r = _call(target, state_dir, {"op": "hydrate", "wait": False})
    while wait and r["state"] == "running":
        if not as_json:
            sys.stderr.write(f"\rhydrate: {r['done']}/{r['total']} clusters")
            sys.stderr.flush()
        time.sleep(0.5)
        r = _call(target, state_dir, {"op": "status"})["hydrate"]
    if wait and not as_json:
        sys.stderr.write("\n")
    if as_json:
        emit_json(r)
    else:
        click.echo(f"hydrate: {r['state']} {r['done']}/{r['total']} {r['error']}".rstrip())
    if r["state"] == "failed":
        raise VfsError(f"hydrate failed: {r['error']}")
