"""``vimg``: the command line of the vimg image format, mirroring qemu-img's verbs and flags.

This module holds the verbs that inspect and copy images (create, info, check, verify, map,
convert, compare, measure); :mod:`vfs.cli.vimg.state` those that change an image's state
(commit, rebase, snapshot, bitmap, vmstate, resize) and :mod:`vfs.cli.vimg.remote` I/O and
remote clusters (bench, io, push, pull/hydrate). Shared options: :mod:`vfs.cli.vimg.common`.
"""

from __future__ import annotations

import os
from typing import Any

import click

from vfs.cli.edge import emit_json, handle_errors
from vfs.cli.vimg.common import (
    FMT,
    LazyResolver,
    Progress,
    backing_dirs,
    backing_opts,
    check_vimg,
    close_image,
    header_problems,
    json_opts,
    main,
    open_image,
    probe,
    remote_opts,
    want_json,
    warn_header,
)
from vfs.errors import (
    CheckCorruption,
    CheckLeaks,
    CorruptionError,
    Differs,
    IntegrityError,
    UsageError,
)
from vfs.image.image import Image
from vfs.units import parse_size


# ----------------------------------------------------------------------------------- create
@main.command()
@click.option("-f", "fmt", type=click.Choice(["vimg"]), default="vimg", help="Only vimg.")
@click.option("-s", "--size", "size_opt", help="Virtual size (k, M, G, T suffixes).")
@click.option(
    "-c", "--cluster-size", "cluster", default="64k", show_default=True, help="Cluster size."
)
@click.option("-b", "--backing", "backing", help="Backing file (relative to the new image).")
@click.option("-F", "backing_fmt", type=click.Choice(["raw", "vimg"]), help="Backing format.")
@click.option(
    "--compress",
    type=click.Choice(["zstd", "none"]),
    default="none",
    help="Compress the clusters written (zstd).",
)
@click.argument("file", type=click.Path(dir_okay=False))
@click.argument("size", required=False)
@backing_opts
@handle_errors
def create(fmt, size_opt, cluster, backing, backing_fmt, compress, file, size):
    """Create a new, empty image FILE of SIZE bytes (or the backing file's size)."""
    text = size_opt or size
    if text is None and not backing:
        raise UsageError("a size is required (-s SIZE) unless a backing file is given")
    nbytes = parse_size(text) if text is not None else -1
    with Image.create(
        file,
        nbytes,
        cluster_size=parse_size(cluster),
        backing=backing,
        backing_format=backing_fmt,
        compress=compress == "zstd",
        backing_dirs=backing_dirs(),
    ) as img:
        click.echo(
            f"Formatting '{file}', fmt=vimg cluster_size={img.cluster_size} "
            f"compression={compress} size={img.size}"
            + (f" backing_file={backing} backing_fmt={img.backing_format}" if backing else "")
        )


# ----------------------------------------------------------------------------------- info
@main.command()
@click.option("-f", "fmt", type=FMT, help="Format of FILE (probed if omitted).")
@click.option("--backing-chain", is_flag=True, help="Show every image of the backing chain.")
@json_opts
@click.argument("file", type=click.Path(dir_okay=False))
@backing_opts
@handle_errors
def info(fmt, backing_chain, as_json, output, file):
    """Show the header, backing file and snapshots of FILE (qcow2: asks qemu-img)."""
    from vfs.image.ops import image_info, info_text, open_source

    if (fmt or probe(file)) == "qcow2":
        from vfs.image.backing import allowed_dirs
        from vfs.image.ops import confine_qcow2_chain
        from vfs.image.qemu import qemu_img

        confine_qcow2_chain(file, allowed_dirs(file, backing_dirs()))
        extra = ["--backing-chain"] if backing_chain else []
        if want_json(as_json, output):
            click.echo(qemu_img("info", "--output=json", *extra, "-f", "qcow2", file), nl=False)
        else:
            click.echo(qemu_img("info", *extra, "-f", "qcow2", file), nl=False)
        return

    from vfs.image.backing import allowed_dirs, confine

    allowed = allowed_dirs(file, backing_dirs())
    infos = []
    path, f = file, fmt
    seen: set[str] = set()
    while path:
        real = os.path.realpath(path)
        if real in seen:
            raise UsageError(f"backing chain loops at {path}")
        seen.add(real)
        probed = f or probe(path)
        if probed == "vimg":  # each layer is opened by this loop: not its chain
            src: Any = Image.open(path, readonly=True, with_backing=False)
        else:
            src = open_source(path, probed)
        try:
            if isinstance(src, Image):
                infos.append(image_info(src))
                path = confine(src.backing_name, path, allowed) if src.backing_name else ""
                f = src.backing_format or None
            else:
                st = os.stat(path)
                infos.append(
                    {
                        "virtual-size": src.size,
                        "filename": path,
                        "format": src.format,
                        "actual-size": st.st_blocks * 512,
                        "dirty-flag": False,
                    }
                )
                path = ""
        finally:
            src.close()
        if not backing_chain:
            break
    if want_json(as_json, output):
        emit_json(infos if backing_chain else infos[0])
    else:
        click.echo("\n\n".join(info_text(i) for i in infos))
    problems = [
        f"{i['filename']}: {p}"
        for i in infos
        for p in i.get("format-specific", {}).get("data", {}).get("header-problems", [])
    ]
    if problems:  # never silent: a possible roll-back or damaged header copies
        raise CorruptionError("; ".join(problems) + " (see 'vimg check')")


# ----------------------------------------------------------------------------------- check
@main.command()
@click.option("-f", "fmt", type=FMT, help="Format of FILE (probed if omitted).")
@click.option("-r", "repair", type=click.Choice(["leaks", "all"]), help="Repair leaks or all.")
@json_opts
@click.argument("file", type=click.Path(dir_okay=False))
@handle_errors
def check(fmt, repair, as_json, output, file):
    """Check metadata consistency. Exit 0 clean, 2 corruption, 3 leaked clusters."""
    from vfs.image.check import check as do_check

    check_vimg(file, fmt)
    res = do_check(file, repair)
    if want_json(as_json, output):
        emit_json(res.to_json())
    else:
        for m in res.messages:
            click.echo(m)
        left_c = res.corruptions - res.corruptions_fixed
        left_l = res.leaks - res.leaks_fixed
        if res.leaks_fixed or res.corruptions_fixed:
            click.echo(
                f"The following inconsistencies were found and repaired:\n\n"
                f"    {res.leaks_fixed} leaked clusters\n    {res.corruptions_fixed} corruptions\n"
            )
        if left_c:
            click.echo(f"\n{left_c} errors were found on the image.")
            click.echo("Data may be corrupted, or further writes to the image may corrupt it.")
        if left_l:
            click.echo(f"\n{left_l} leaked clusters were found on the image.")
            click.echo("This means waste of disk space, but no harm to data.")
        if not left_c and not left_l:
            click.echo("No errors were found on the image.")
        click.echo(
            f"{res.allocated_clusters}/{res.total_clusters} = "
            f"{100.0 * res.allocated_clusters / max(res.total_clusters, 1):.2f}% allocated, "
            f"{res.compressed_clusters} compressed, {res.remote_clusters} remote clusters"
        )
        click.echo(f"Image end offset: {res.image_end_offset}")
    if res.exit_code == 2:
        raise CheckCorruption()  # exit 2 and 3 as qemu-img check: results, not usage errors
    if res.exit_code == 3:
        raise CheckLeaks()


# ----------------------------------------------------------------------------------- verify
@main.command()
@json_opts
@remote_opts
@click.argument("file", type=click.Path(dir_okay=False))
@handle_errors
def verify(as_json, output, store, repo, file):
    """Read every stored cluster (all snapshots too) and check its checksum.

    Remote clusters are verified only with --repo/--store. Exit 5 if any cluster is bad.
    """
    from vfs.image.check import verify as do_verify

    check_vimg(file, None)
    img = open_image(file, readonly=True, store=store, repo=repo)
    try:
        if not (store or repo):
            img.resolver = None  # remote clusters are then skipped, not fetched
        bad = do_verify(img)
        problems = header_problems(img)
    finally:
        close_image(img)
    if want_json(as_json, output):
        emit_json({"filename": file, "bad-clusters": bad, "header-problems": problems})
    else:
        for b in bad:
            click.echo(f"bad cluster ({b['root']}) at guest offset {b['offset']:#x}: {b['error']}")
        click.echo(f"{len(bad)} bad clusters" if bad else "All checksums verified.")
    if problems:
        raise CorruptionError("; ".join(problems) + " (see 'vimg check')")
    if bad:
        raise IntegrityError(f"{len(bad)} bad cluster(s) in {file}")


# ----------------------------------------------------------------------------------- map
@main.command(name="map")
@click.option("-f", "fmt", type=FMT, help="Format of FILE (probed if omitted).")
@json_opts
@remote_opts
@click.argument("file", type=click.Path(dir_okay=False))
@handle_errors
def map_cmd(fmt, as_json, output, store, repo, file):
    """Show where each guest range lives (same fields as qemu-img map; qcow2: asks qemu-img)."""
    from vfs.image.ops import image_map, open_source

    if (fmt or probe(file)) == "qcow2":
        from vfs.image.backing import allowed_dirs
        from vfs.image.ops import confine_qcow2_chain
        from vfs.image.qemu import qemu_img

        confine_qcow2_chain(file, allowed_dirs(file, backing_dirs()))
        out = "--output=json" if want_json(as_json, output) else "--output=human"
        click.echo(qemu_img("map", out, "-f", "qcow2", file), nl=False)
        return

    src = open_source(file, fmt, backing_dirs=backing_dirs())
    try:
        warn_header(src)
        m = image_map(src)
    finally:
        src.close()
    if want_json(as_json, output):
        click.echo(
            "["
            + ",\n".join("{ " + ", ".join(f'"{k}": {_j(v)}' for k, v in d.items()) + "}" for d in m)
            + "]"
        )
        return
    click.echo(f"{'Offset':<16}{'Length':<16}{'Mapped to':<16}File")
    for d in m:
        if d["data"]:
            where = f"{d['offset']:#x}" if "offset" in d else "-"
            click.echo(f"{d['start']:<#16x}{d['length']:<#16x}{where:<16}{file}")


def _j(v: Any) -> str:
    return "true" if v is True else "false" if v is False else str(v)


# ----------------------------------------------------------------------------------- convert
@main.command()
@click.option("-f", "src_fmt", type=FMT, help="Input format (probed if omitted).")
@click.option("-O", "dst_fmt", type=FMT, default="raw", show_default=True, help="Output format.")
@click.option("-c", "compress", is_flag=True, help="Compress the output (zstd for vimg).")
@click.option("--cluster-size", default="64k", show_default=True, help="vimg output only.")
@click.option("-p", "progress", is_flag=True, help="Show progress on stderr.")
@remote_opts
@click.argument("src", type=click.Path(dir_okay=False))
@click.argument("dst", type=click.Path(dir_okay=False))
@handle_errors
def convert(src_fmt, dst_fmt, compress, cluster_size, progress, store, repo, src, dst):
    """Convert SRC to DST (raw, qcow2 or vimg), flattening any backing chain.

    qcow2 is read and written through the qemu-img program (it must be installed): a qcow2
    input is first converted to a temporary sparse raw file, a qcow2 output is made from one.
    """
    from vfs.image.ops import convert as do_convert

    res = LazyResolver(store, repo) if (store or repo) else None
    try:
        do_convert(
            src,
            dst,
            src_fmt=src_fmt,
            dst_fmt=dst_fmt,
            compress=compress,
            cluster_size=parse_size(cluster_size),
            resolver=res,
            progress=Progress("convert") if progress else None,
            on_source=warn_header,
            backing_dirs=backing_dirs(),
        )
    finally:
        if res is not None:
            res.close()


# ----------------------------------------------------------------------------------- compare
@main.command()
@click.option("-f", "fmt1", type=FMT, help="Format of FILE1 (probed if omitted).")
@click.option("-F", "fmt2", type=FMT, help="Format of FILE2 (probed if omitted).")
@click.option("-s", "strict", is_flag=True, help="Strict: images of different sizes differ.")
@click.option("-q", "quiet", is_flag=True, help="Print nothing: the exit code says it.")
@remote_opts
@click.argument("file1", type=click.Path(dir_okay=False))
@click.argument("file2", type=click.Path(dir_okay=False))
@handle_errors
def compare(fmt1, fmt2, strict, quiet, store, repo, file1, file2):
    """Compare the guest views of two images. Exit 0 identical, 1 different."""
    from vfs.image.ops import compare as do_compare
    from vfs.image.ops import open_source

    res = LazyResolver(store, repo) if (store or repo) else None
    a = open_source(file1, fmt1, res, backing_dirs())
    try:
        warn_header(a)
        b = open_source(file2, fmt2, res, backing_dirs())
        try:
            warn_header(b)
            if a.size != b.size and not quiet:
                click.echo("Warning: Image size mismatch!")
            off = do_compare(a, b, strict=strict)
        finally:
            b.close()
    finally:
        a.close()
        if res is not None:
            res.close()
    if off is None:
        if not quiet:
            click.echo("Images are identical.")
        return
    if not quiet:
        click.echo(f"Content mismatch at offset {off}!")
    raise Differs()  # exit 1, as qemu-img compare and cmp


# ----------------------------------------------------------------------------------- measure
@main.command()
@click.option("-f", "fmt", type=FMT, help="Format of FILE (probed if omitted).")
@click.option(
    "-O", "out_fmt", type=FMT, default="vimg", show_default=True, help="Format to measure for."
)
@click.option("--size", "size", help="Measure an empty image of this size instead of FILE.")
@click.option("--cluster-size", default="64k", show_default=True, help="vimg output only.")
@json_opts
@click.argument("file", required=False, type=click.Path(dir_okay=False))
@backing_opts
@handle_errors
def measure(fmt, out_fmt, size, cluster_size, as_json, output, file):
    """Bytes a new image needs to hold FILE (or an empty one of --size). qcow2 via qemu-img."""
    from vfs.image.ops import measure as do_measure
    from vfs.image.ops import open_source

    if (file is None) == (size is None):
        raise UsageError("give either FILE or --size")
    if out_fmt == "qcow2":
        from vfs.image.qemu import qemu_img

        if file and (fmt or "") != "vimg" and probe(file) != "vimg":
            args = ["measure", "--output=json", "-O", "qcow2", file]
        elif size:
            args = ["measure", "--output=json", "-O", "qcow2", "--size", str(parse_size(size))]
        else:
            raise UsageError("measuring a vimg input for qcow2 output: convert it first")
        import json

        result = json.loads(qemu_img(*args))
    else:
        src = open_source(file, fmt, backing_dirs=backing_dirs()) if file else None
        try:
            if out_fmt == "raw":
                n = src.size if src is not None else parse_size(size)
                result = {"required": n, "fully-allocated": n}
            else:
                result = do_measure(
                    src, parse_size(size) if size else None, parse_size(cluster_size)
                )
        finally:
            if src is not None:
                src.close()
    if want_json(as_json, output):
        emit_json(result)
    else:
        click.echo(f"required size: {result['required']}")
        click.echo(f"fully allocated size: {result['fully-allocated']}")


# The other verbs register themselves on ``main`` when imported.
from vfs.cli.vimg import remote, state  # noqa: E402, F401

__all__ = ["main"]
