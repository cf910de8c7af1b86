"""``vimg`` verbs that change an image's state: commit, rebase, snapshot, bitmap, vmstate,
resize (registered on the group of :mod:`vfs.cli.vimg.common`)."""

from __future__ import annotations

import click

from vfs.cli.edge import emit_json, handle_errors, json_option
from vfs.cli.vimg.common import (
    Progress,
    backing_opts,
    check_vimg,
    close_image,
    json_opts,
    main,
    open_image,
    remote_opts,
    want_json,
)
from vfs.errors import UsageError
from vfs.units import parse_size


# ----------------------------------------------------------------------------------- commit
@main.command()
@click.option("-f", "fmt", type=click.Choice(["vimg"]), help="Only vimg.")
@click.option("-d", "keep", is_flag=True, help="Do not empty FILE after the commit.")
@click.option("-p", "progress", is_flag=True, help="Show progress on stderr.")
@remote_opts
@click.argument("file", type=click.Path(dir_okay=False))
@handle_errors
def commit(fmt, keep, progress, store, repo, file):
    """Write FILE's data into its backing file (then empty FILE, unless -d)."""
    from vfs.image.chain import commit as do_commit

    check_vimg(file, fmt)
    img = open_image(file, readonly=False, store=store, repo=repo)
    try:
        do_commit(img, keep=keep, progress=Progress("commit") if progress else None)
    finally:
        close_image(img)
    click.echo("Image committed.")


# ----------------------------------------------------------------------------------- rebase
@main.command()
@click.option("-f", "fmt", type=click.Choice(["vimg"]), help="Only vimg.")
@click.option("-u", "unsafe", is_flag=True, help="Only change the reference; copy nothing.")
@click.option("-b", "backing", required=True, help="New backing file ('' for none).")
@click.option(
    "-F", "backing_fmt", type=click.Choice(["raw", "vimg"]), help="Format of the backing file."
)
@remote_opts
@click.argument("file", type=click.Path(dir_okay=False))
@handle_errors
def rebase(fmt, unsafe, backing, backing_fmt, store, repo, file):
    """Change FILE's backing file; safe mode keeps the guest view identical."""
    from vfs.image.chain import rebase as do_rebase

    check_vimg(file, fmt)
    # -u works even when the old backing file is gone (the usual reason to use it)
    img = open_image(file, readonly=False, store=store, repo=repo, with_backing=not unsafe)
    try:
        do_rebase(img, backing or None, backing_fmt, unsafe=unsafe)
    finally:
        close_image(img)


# ----------------------------------------------------------------------------------- snapshot
@main.command()
@click.option("-c", "create_name", help="Create a snapshot.")
@click.option("-l", "list_", is_flag=True, help="List snapshots.")
@click.option("-a", "apply_name", help="Revert the image to a snapshot.")
@click.option("-d", "delete_name", help="Delete a snapshot.")
@json_opts
@click.argument("file", type=click.Path(dir_okay=False))
@handle_errors
def snapshot(create_name, list_, apply_name, delete_name, as_json, output, file):
    """Create, list, apply or delete internal snapshots (exactly one of -c -l -a -d)."""
    chosen = [x for x in (create_name, apply_name, delete_name) if x is not None]
    if len(chosen) + bool(list_) != 1:
        raise UsageError("give exactly one of -c NAME, -l, -a NAME, -d NAME")
    check_vimg(file, None)
    img = open_image(file, readonly=bool(list_), with_backing=False)  # snapshots never read data
    try:
        if list_:
            from vfs.image.ops import info_text, snapshot_info

            snaps = [snapshot_info(s) for s in img.snapshots]
            if want_json(as_json, output):
                emit_json(snaps)
            elif snaps:
                text = info_text(
                    {
                        "filename": file,
                        "snapshots": snaps,
                        "format": "vimg",
                        "virtual-size": img.size,
                        "actual-size": 0,
                    }
                )
                click.echo(text[text.index("Snapshot list:") :])
        elif create_name is not None:
            img.snapshot_create(create_name)
        elif apply_name is not None:
            img.snapshot_apply(apply_name)
        else:
            img.snapshot_delete(delete_name)
    finally:
        close_image(img)


# ----------------------------------------------------------------------------------- bitmap
@main.command()
@click.option("--add", "op", flag_value="add", help="Create NAME (enabled, all clear).")
@click.option("--remove", "op", flag_value="remove", help="Delete NAME.")
@click.option("--clear", "op", flag_value="clear", help="Reset NAME to all clear.")
@click.option("--enable", "op", flag_value="enable", help="Record writes in NAME.")
@click.option("--disable", "op", flag_value="disable", help="Stop recording writes in NAME.")
@click.option("--dirty", "op", flag_value="dirty", help="List NAME's dirty ranges.")
@click.option("--list", "op", flag_value="list", help="List the bitmaps of FILE.")
@click.option("-g", "granularity", help="With --add: bytes per bit (power of two, 512..2G).")
@json_option
@click.argument("file", type=click.Path(dir_okay=False))
@click.argument("name", required=False)
@handle_errors
def bitmap(op, granularity, as_json, file, name):
    """Persistent dirty bitmaps of FILE (as qemu-img bitmap): which ranges changed since a
    bitmap was added or cleared. A bitmap flagged in-use (after a crash, a repair) reads as
    all dirty until cleared."""
    from vfs.image.ops import bitmap_info

    if op is None:
        raise UsageError("give one of --add --remove --clear --enable --disable --dirty --list")
    if op != "list" and not name:
        raise UsageError(f"--{op} needs a bitmap NAME")
    check_vimg(file, None)
    img = open_image(file, readonly=op in ("dirty", "list"), with_backing=False)
    try:
        if op == "list":
            items = [bitmap_info(b) for b in img.bitmap_list()]
            if as_json:
                emit_json(items)
            for b in [] if as_json else items:
                flags = ",".join(b["flags"]) or "-"
                click.echo(f"{b['name']}\t{b['granularity']}\t{flags}\t{b['dirty']}")
        elif op == "dirty":
            ranges = img.bitmap_dirty(name)
            if as_json:
                emit_json([{"start": o, "length": n} for o, n in ranges])
            for o, n in [] if as_json else ranges:
                click.echo(f"{o:#x}\t{n:#x}")
        elif op == "add":
            img.bitmap_add(name, granularity=parse_size(granularity) if granularity else None)
        elif op == "remove":
            img.bitmap_remove(name)
        elif op == "clear":
            img.bitmap_clear(name)
        else:
            img.bitmap_enable(name, op == "enable")
    finally:
        close_image(img)


# ----------------------------------------------------------------------------------- vmstate
@main.command()
@click.option(
    "--save",
    "save_from",
    type=click.Path(dir_okay=False, allow_dash=True),
    help="Store the VM state read from this file ('-': stdin).",
)
@click.option(
    "--load",
    "load_to",
    type=click.Path(dir_okay=False, allow_dash=True),
    help="Write the VM state to this file ('-': stdout).",
)
@click.argument("file", type=click.Path(dir_okay=False))
@click.argument("snapshot_name")
@handle_errors
def vmstate(save_from, load_to, file, snapshot_name):
    """The VM state saved with snapshot SNAPSHOT_NAME of FILE (device and memory state, e.g.
    a QEMU migration stream): --save stores one (replacing any), --load reads it back
    (verified); without either, print its size."""
    if save_from and load_to:
        raise UsageError("give --save or --load, not both")
    check_vimg(file, None)
    img = open_image(file, readonly=not save_from, with_backing=False)
    try:
        if save_from:
            with click.open_file(save_from, "rb") as src:
                n = img.save_vmstate(snapshot_name, src)
            click.echo(f"saved {n} bytes of VM state with snapshot {snapshot_name!r}", err=True)
        elif load_to:
            with click.open_file(load_to, "wb") as dst:
                for chunk in img.load_vmstate(snapshot_name):
                    dst.write(chunk)
        else:
            click.echo(img.vmstate_size(snapshot_name))
    finally:
        close_image(img)


# ----------------------------------------------------------------------------------- resize
@main.command(context_settings={"ignore_unknown_options": True})
@click.option("--shrink", is_flag=True, help="Allow shrinking (data past the new end is lost).")
@click.argument("file", type=click.Path(dir_okay=False))
@click.argument("size")
@backing_opts
@handle_errors
def resize(shrink, file, size):
    """Set FILE's virtual size to SIZE, or grow/shrink by +SIZE / -SIZE."""
    check_vimg(file, None)
    img = open_image(file, readonly=False)
    try:
        if size.startswith(("+", "-")):
            new = img.size + (1 if size[0] == "+" else -1) * parse_size(size[1:])
        else:
            new = parse_size(size)
        if new < img.size and not shrink:
            raise UsageError("use --shrink to shrink an image (data past the new end is lost)")
        if new < 0:
            raise UsageError("size would be negative")
        img.resize(new)
    finally:
        close_image(img)
    click.echo("Image resized.")
