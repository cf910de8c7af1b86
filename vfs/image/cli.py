"""``vimg``: the command line of the vimg image format, mirroring qemu-img's verbs and flags.

Every command is wrapped by :func:`vfs.cli_util.handle_errors`: a bad input is one line on stderr
and a non-zero exit code, never a traceback. JSON output uses qemu-img's field names.
"""

from __future__ import annotations

import os
import sys
import threading
import time
from typing import Any

import click

from vfs.cli_util import emit_json, handle_errors, json_option, setup_logging
from vfs.errors import CorruptionError, IntegrityError, UsageError
from vfs.image.image import Image
from vfs.image.qemuio import parse_size

FMT = click.Choice(["raw", "qcow2", "vimg"])


class _LazyResolver:
    """Opens the local store (and the repository) only when a remote cluster is read."""

    def __init__(self, store: str | None, repo: str | None) -> None:
        self.store_dir, self.repo = store, repo
        self._r: Any = None
        self._objs: list[Any] = []
        self._lock = threading.Lock()
        self._tls = _tls()  # captured now: fetch threads have no click context

    def resolver(self) -> Any:
        with self._lock:
            return self._resolver()

    def _resolver(self) -> Any:
        if self._r is None:
            from vfs.paths import default_store
            from vfs.redirect import LocalStore, Resolver, open_remote

            store = LocalStore(self.store_dir or default_store())
            self._objs.append(store)
            remote = open_remote(self.repo, **self._tls) if self.repo else None
            if remote is not None:
                self._objs.append(remote)
            self._r = Resolver(store, remote)
        return self._r

    def get(self, oid: str) -> bytes:
        return self.resolver().get(oid)

    def ensure(self, oid: str, *, size_hint: int | None = None) -> None:
        self.resolver().ensure(oid, size_hint=size_hint)

    def close(self) -> None:
        for o in reversed(self._objs):
            o.close()


def _tls() -> dict[str, str]:
    """--ca/--cert/--key of the current command (for https:// repositories, mutual TLS)."""
    ctx = click.get_current_context(silent=True)
    return dict(ctx.meta.get("vimg.tls", {})) if ctx is not None else {}


def _store_tls(ctx: click.Context, param: click.Parameter, value: str | None) -> None:
    if value:
        ctx.meta.setdefault("vimg.tls", {})[param.name] = value


def _tls_opts(fn: Any) -> Any:
    for name, text in (
        ("proxy", "HTTP forward proxy (e.g. a site cache) for http(s):// repositories."),
        ("key", "Client key (mutual TLS)."),
        ("cert", "Client certificate (mutual TLS)."),
        ("ca", "CA bundle that signs the repository server's certificate."),
    ):
        fn = click.option(
            f"--{name}",
            name,
            type=click.Path(dir_okay=False),
            expose_value=False,
            callback=_store_tls,
            help=text,
        )(fn)
    return fn


def _store_backing_dirs(ctx: click.Context, param: click.Parameter, value: tuple) -> None:
    if value:
        ctx.meta.setdefault("vimg.backing_dirs", []).extend(value)


def _backing_opts(fn: Any) -> Any:
    return click.option(
        "--backing-dir",
        "backing_dirs",
        multiple=True,
        type=click.Path(file_okay=False),
        expose_value=False,
        callback=_store_backing_dirs,
        help="Also follow backing files in DIR (repeatable; default: only the image's own "
        "directory; also $VIMG_BACKING_DIRS, colon-separated).",
    )(fn)


def _backing_dirs() -> tuple[str, ...]:
    """Directories backing files may lie in beyond the image's own (spec 8)."""
    ctx = click.get_current_context(silent=True)
    dirs = list(ctx.meta.get("vimg.backing_dirs", [])) if ctx is not None else []
    env = os.environ.get("VIMG_BACKING_DIRS", "")
    dirs += [d for d in env.split(os.pathsep) if d]
    return tuple(dirs)


def _remote_opts(fn: Any) -> Any:
    fn = _backing_opts(fn)
    fn = _tls_opts(fn)
    fn = click.option(
        "--store",
        "store",
        type=click.Path(file_okay=False),
        help="Local object store [default: $VFS_STORE or $VFS_ROOT/store].",
    )(fn)
    fn = click.option(
        "--repo", "repo", help="Repository of remote clusters (file:///dir, /dir, http(s)://...)."
    )(fn)
    return fn


def _json_opts(fn: Any) -> Any:
    fn = json_option(fn)
    fn = click.option(
        "--output",
        "output",
        type=click.Choice(["human", "json"]),
        default="human",
        help="Output format (as qemu-img --output).",
    )(fn)
    return fn


def _want_json(as_json: bool, output: str) -> bool:
    return as_json or output == "json"


def _open(
    path: str,
    *,
    readonly: bool,
    store: str | None = None,
    repo: str | None = None,
    with_backing: bool = True,
) -> Image:
    res = _LazyResolver(store, repo)
    img = Image.open(
        path,
        readonly=readonly,
        resolver=res,
        with_backing=with_backing,
        backing_dirs=_backing_dirs(),
    )
    _warn_header(img)
    return img


def _header_problems(src: Any) -> list[str]:
    """Header problems of a vimg source and every vimg layer below it."""
    from vfs.image.ops import header_problems

    out: list[str] = []
    while isinstance(src, Image):
        out += [f"{src.path}: {p}" for p in header_problems(src)]
        src = src.backing
    return out


def _warn_header(src: Any) -> None:
    """A possible roll-back is never silent: one warning line per problem on stderr."""
    for p in _header_problems(src):
        click.echo(f"vimg: warning: {p}", err=True)


def _close(img: Any) -> None:
    """Close an image and the store/repository its lazy resolver may have opened."""
    res = getattr(img, "resolver", None)
    try:
        img.close()
    finally:
        if isinstance(res, _LazyResolver):
            res.close()


def _check_vimg(path: str, fmt: str | None) -> None:
    if fmt not in (None, "vimg"):
        raise UsageError(f"this command works on vimg images only (got -f {fmt})")
    from vfs.image.fileio import probe_format

    if os.path.exists(path) and probe_format(path) != "vimg":
        raise UsageError(f"{path}: not a vimg image (found {probe_format(path)})")


class _Progress:
    """Progress on stderr, at most a few lines per second, resumable work reported as done/total."""

    def __init__(self, what: str, enabled: bool = True) -> None:
        self.what, self.enabled, self._last = what, enabled, 0.0

    def __call__(self, done: int, total: int) -> None:
        now = time.monotonic()
        if not self.enabled or (now - self._last < 0.2 and done != total):
            return
        self._last = now
        pct = 100.0 * done / total if total else 100.0
        click.echo(f"\r{self.what}: {done}/{total} ({pct:.1f}%)", err=True, nl=done == total)


class _OneLineErrors(click.Group):
    """Usage errors (unknown option, missing argument) as one line, like every other error."""

    def main(self, *args: Any, **kwargs: Any) -> Any:  # type: ignore[override]
        kwargs["standalone_mode"] = False
        try:
            rv = super().main(*args, **kwargs)
        except click.ClickException as e:
            no_args = getattr(click.exceptions, "NoArgsIsHelpError", ())
            if isinstance(e, no_args) and getattr(e, "ctx", None) is not None:
                click.echo(e.ctx.get_help(), err=True)  # type: ignore[union-attr]
                sys.exit(2)
            click.echo(f"vimg: error: {e.format_message()}", err=True)
            sys.exit(e.exit_code)
        except click.Abort:
            click.echo("vimg: interrupted", err=True)
            sys.exit(130)
        sys.exit(rv if isinstance(rv, int) else 0)


@click.group(cls=_OneLineErrors, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("-v", "--verbose", count=True, help="More logging (repeat for debug).")
def main(verbose: int) -> None:
    """vimg: create, inspect, check and convert vimg disk images (qemu-img style).

    vimg images checksum every cluster (xxh3, verified on every read), may keep clusters in a
    remote repository (push/pull), and survive crashes at any instant (shadow paging).
    """
    setup_logging(verbose)


# ----------------------------------------------------------------------------------- create
@main.command()
@click.option("-f", "fmt", type=click.Choice(["vimg"]), default="vimg", help="Only vimg.")
@click.option("-s", "--size", "size_opt", help="Virtual size (k, M, G, T suffixes).")
@click.option("-c", "--cluster-size", "cluster", default="64k", show_default=True)
@click.option("-b", "--backing", "backing", help="Backing file (relative to the new image).")
@click.option("-F", "backing_fmt", type=click.Choice(["raw", "vimg"]), help="Backing format.")
@click.option("--compress", type=click.Choice(["zstd", "none"]), default="none")
@click.argument("file", type=click.Path(dir_okay=False))
@click.argument("size", required=False)
@_backing_opts
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
        backing_dirs=_backing_dirs(),
    ) as img:
        click.echo(
            f"Formatting '{file}', fmt=vimg cluster_size={img.cluster_size} "
            f"compression={compress} size={img.size}"
            + (f" backing_file={backing} backing_fmt={img.backing_format}" if backing else "")
        )


# ----------------------------------------------------------------------------------- info
@main.command()
@click.option("-f", "fmt", type=FMT)
@click.option("--backing-chain", is_flag=True, help="Show every image of the backing chain.")
@_json_opts
@click.argument("file", type=click.Path(dir_okay=False))
@_backing_opts
@handle_errors
def info(fmt, backing_chain, as_json, output, file):
    """Show the header, backing file and snapshots of FILE (qcow2: asks qemu-img)."""
    from vfs.image.ops import image_info, info_text, open_source

    if (fmt or _probe(file)) == "qcow2":
        from vfs.image.qemu import qemu_img

        extra = ["--backing-chain"] if backing_chain else []
        if _want_json(as_json, output):
            click.echo(qemu_img("info", "--output=json", *extra, "-f", "qcow2", file), nl=False)
        else:
            click.echo(qemu_img("info", *extra, "-f", "qcow2", file), nl=False)
        return

    from vfs.image.backing import allowed_dirs, confine

    allowed = allowed_dirs(file, _backing_dirs())
    infos = []
    path, f = file, fmt
    seen: set[str] = set()
    while path:
        real = os.path.realpath(path)
        if real in seen:
            raise UsageError(f"backing chain loops at {path}")
        seen.add(real)
        probed = f or _probe(path)
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
    if _want_json(as_json, output):
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
@click.option("-f", "fmt", type=FMT)
@click.option("-r", "repair", type=click.Choice(["leaks", "all"]), help="Repair leaks or all.")
@_json_opts
@click.argument("file", type=click.Path(dir_okay=False))
@handle_errors
def check(fmt, repair, as_json, output, file):
    """Check metadata consistency. Exit 0 clean, 2 corruption, 3 leaked clusters."""
    from vfs.image.check import check as do_check

    _check_vimg(file, fmt)
    res = do_check(file, repair)
    if _want_json(as_json, output):
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
    sys.exit(res.exit_code)


# ----------------------------------------------------------------------------------- verify
@main.command()
@_json_opts
@_remote_opts
@click.argument("file", type=click.Path(dir_okay=False))
@handle_errors
def verify(as_json, output, store, repo, file):
    """Read every stored cluster (all snapshots too) and check its checksum.

    Remote clusters are verified only with --repo/--store. Exit 5 if any cluster is bad.
    """
    from vfs.image.check import verify as do_verify

    _check_vimg(file, None)
    img = _open(file, readonly=True, store=store, repo=repo)
    try:
        if not (store or repo):
            img.resolver = None  # remote clusters are then skipped, not fetched
        bad = do_verify(img)
        problems = _header_problems(img)
    finally:
        _close(img)
    if _want_json(as_json, output):
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
@click.option("-f", "fmt", type=FMT)
@_json_opts
@_remote_opts
@click.argument("file", type=click.Path(dir_okay=False))
@handle_errors
def map_cmd(fmt, as_json, output, store, repo, file):
    """Show where each guest range lives (same fields as qemu-img map; qcow2: asks qemu-img)."""
    from vfs.image.ops import image_map, open_source

    if (fmt or _probe(file)) == "qcow2":
        from vfs.image.qemu import qemu_img

        out = "--output=json" if _want_json(as_json, output) else "--output=human"
        click.echo(qemu_img("map", out, "-f", "qcow2", file), nl=False)
        return

    src = open_source(file, fmt, backing_dirs=_backing_dirs())
    try:
        _warn_header(src)
        m = image_map(src)
    finally:
        src.close()
    if _want_json(as_json, output):
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
@click.option("-O", "dst_fmt", type=FMT, default="raw", show_default=True)
@click.option("-c", "compress", is_flag=True, help="Compress the output (zstd for vimg).")
@click.option("--cluster-size", default="64k", show_default=True, help="vimg output only.")
@click.option("-p", "progress", is_flag=True, help="Show progress on stderr.")
@_remote_opts
@click.argument("src", type=click.Path(dir_okay=False))
@click.argument("dst", type=click.Path(dir_okay=False))
@handle_errors
def convert(src_fmt, dst_fmt, compress, cluster_size, progress, store, repo, src, dst):
    """Convert SRC to DST (raw, qcow2 or vimg), flattening any backing chain.

    qcow2 is read and written through the qemu-img program (it must be installed): a qcow2
    input is first converted to a temporary sparse raw file, a qcow2 output is made from one.
    """
    from vfs.image.ops import convert as do_convert

    res = _LazyResolver(store, repo) if (store or repo) else None
    try:
        do_convert(
            src,
            dst,
            src_fmt=src_fmt,
            dst_fmt=dst_fmt,
            compress=compress,
            cluster_size=parse_size(cluster_size),
            resolver=res,
            progress=_Progress("convert") if progress else None,
            on_source=_warn_header,
            backing_dirs=_backing_dirs(),
        )
    finally:
        if res is not None:
            res.close()


# ----------------------------------------------------------------------------------- compare
@main.command()
@click.option("-f", "fmt1", type=FMT)
@click.option("-F", "fmt2", type=FMT)
@click.option("-s", "strict", is_flag=True, help="Strict: images of different sizes differ.")
@click.option("-q", "quiet", is_flag=True)
@_remote_opts
@click.argument("file1", type=click.Path(dir_okay=False))
@click.argument("file2", type=click.Path(dir_okay=False))
@handle_errors
def compare(fmt1, fmt2, strict, quiet, store, repo, file1, file2):
    """Compare the guest views of two images. Exit 0 identical, 1 different."""
    from vfs.image.ops import compare as do_compare
    from vfs.image.ops import open_source

    res = _LazyResolver(store, repo) if (store or repo) else None
    a = open_source(file1, fmt1, res, _backing_dirs())
    try:
        _warn_header(a)
        b = open_source(file2, fmt2, res, _backing_dirs())
        try:
            _warn_header(b)
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
    sys.exit(1)


# ----------------------------------------------------------------------------------- measure
@main.command()
@click.option("-f", "fmt", type=FMT)
@click.option("-O", "out_fmt", type=FMT, default="vimg", show_default=True)
@click.option("--size", "size", help="Measure an empty image of this size instead of FILE.")
@click.option("--cluster-size", default="64k", show_default=True)
@_json_opts
@click.argument("file", required=False, type=click.Path(dir_okay=False))
@_backing_opts
@handle_errors
def measure(fmt, out_fmt, size, cluster_size, as_json, output, file):
    """Bytes a new image needs to hold FILE (or an empty one of --size). qcow2 via qemu-img."""
    from vfs.image.ops import measure as do_measure
    from vfs.image.ops import open_source

    if (file is None) == (size is None):
        raise UsageError("give either FILE or --size")
    if out_fmt == "qcow2":
        from vfs.image.qemu import qemu_img

        if file and (fmt or "") != "vimg" and _probe(file) != "vimg":
            args = ["measure", "--output=json", "-O", "qcow2", file]
        elif size:
            args = ["measure", "--output=json", "-O", "qcow2", "--size", str(parse_size(size))]
        else:
            raise UsageError("measuring a vimg input for qcow2 output: convert it first")
        import json

        result = json.loads(qemu_img(*args))
    else:
        src = open_source(file, fmt, backing_dirs=_backing_dirs()) if file else None
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
    if _want_json(as_json, output):
        emit_json(result)
    else:
        click.echo(f"required size: {result['required']}")
        click.echo(f"fully allocated size: {result['fully-allocated']}")


def _probe(path: str) -> str:
    from vfs.image.fileio import probe_format

    return probe_format(path)


# ----------------------------------------------------------------------------------- commit
@main.command()
@click.option("-f", "fmt", type=click.Choice(["vimg"]))
@click.option("-d", "keep", is_flag=True, help="Do not empty FILE after the commit.")
@click.option("-p", "progress", is_flag=True)
@_remote_opts
@click.argument("file", type=click.Path(dir_okay=False))
@handle_errors
def commit(fmt, keep, progress, store, repo, file):
    """Write FILE's data into its backing file (then empty FILE, unless -d)."""
    from vfs.image.chain import commit as do_commit

    _check_vimg(file, fmt)
    img = _open(file, readonly=False, store=store, repo=repo)
    try:
        do_commit(img, keep=keep, progress=_Progress("commit") if progress else None)
    finally:
        _close(img)
    click.echo("Image committed.")


# ----------------------------------------------------------------------------------- rebase
@main.command()
@click.option("-f", "fmt", type=click.Choice(["vimg"]))
@click.option("-u", "unsafe", is_flag=True, help="Only change the reference; copy nothing.")
@click.option("-b", "backing", required=True, help="New backing file ('' for none).")
@click.option("-F", "backing_fmt", type=click.Choice(["raw", "vimg"]))
@_remote_opts
@click.argument("file", type=click.Path(dir_okay=False))
@handle_errors
def rebase(fmt, unsafe, backing, backing_fmt, store, repo, file):
    """Change FILE's backing file; safe mode keeps the guest view identical."""
    from vfs.image.chain import rebase as do_rebase

    _check_vimg(file, fmt)
    # -u works even when the old backing file is gone (the usual reason to use it)
    img = _open(file, readonly=False, store=store, repo=repo, with_backing=not unsafe)
    try:
        do_rebase(img, backing or None, backing_fmt, unsafe=unsafe)
    finally:
        _close(img)


# ----------------------------------------------------------------------------------- snapshot
@main.command()
@click.option("-c", "create_name", help="Create a snapshot.")
@click.option("-l", "list_", is_flag=True, help="List snapshots.")
@click.option("-a", "apply_name", help="Revert the image to a snapshot.")
@click.option("-d", "delete_name", help="Delete a snapshot.")
@_json_opts
@click.argument("file", type=click.Path(dir_okay=False))
@handle_errors
def snapshot(create_name, list_, apply_name, delete_name, as_json, output, file):
    """Create, list, apply or delete internal snapshots (exactly one of -c -l -a -d)."""
    chosen = [x for x in (create_name, apply_name, delete_name) if x is not None]
    if len(chosen) + bool(list_) != 1:
        raise UsageError("give exactly one of -c NAME, -l, -a NAME, -d NAME")
    _check_vimg(file, None)
    img = _open(file, readonly=bool(list_), with_backing=False)  # snapshots never read data
    try:
        if list_:
            from vfs.image.ops import info_text, snapshot_info

            snaps = [snapshot_info(s) for s in img.snapshots]
            if _want_json(as_json, output):
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
        _close(img)


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
    _check_vimg(file, None)
    img = _open(file, readonly=op in ("dirty", "list"), with_backing=False)
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
        _close(img)


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
    _check_vimg(file, None)
    img = _open(file, readonly=not save_from, with_backing=False)
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
        _close(img)


# ----------------------------------------------------------------------------------- resize
@main.command(context_settings={"ignore_unknown_options": True})
@click.option("--shrink", is_flag=True, help="Allow shrinking (data past the new end is lost).")
@click.argument("file", type=click.Path(dir_okay=False))
@click.argument("size")
@_backing_opts
@handle_errors
def resize(shrink, file, size):
    """Set FILE's virtual size to SIZE, or grow/shrink by +SIZE / -SIZE."""
    _check_vimg(file, None)
    img = _open(file, readonly=False)
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
        _close(img)
    click.echo("Image resized.")


# ----------------------------------------------------------------------------------- bench
@main.command()
@click.option("-c", "count", default=75000, show_default=True, help="Number of requests.")
@click.option(
    "-d", "depth", default=64, show_default=True, help="Reported only (requests are sequential)."
)
@click.option("-f", "fmt", type=click.Choice(["raw", "vimg"]))
@click.option("-n", "nocache", is_flag=True, help="Accepted for qemu-img compatibility.")
@click.option("-o", "offset", default="0", help="Start offset.")
@click.option("-s", "size", default="4k", show_default=True, help="Request size.")
@click.option("-S", "step", default=None, help="Step between requests [default: request size].")
@click.option("-t", "cache", default="writeback", help="Accepted for qemu-img compatibility.")
@click.option("-w", "write", is_flag=True, help="Write requests (default: read).")
@click.option("--pattern", default="0", help="Byte written by -w (as qemu-img: 0).")
@click.option("--flush-interval", default=0, help="Flush after this many writes.")
@click.option("--no-drain", is_flag=True, help="Accepted for qemu-img compatibility.")
@_remote_opts
@click.argument("file", type=click.Path(dir_okay=False))
@handle_errors
def bench(
    count,
    depth,
    fmt,
    nocache,
    offset,
    size,
    step,
    cache,
    write,
    pattern,
    flush_interval,
    no_drain,
    store,
    repo,
    file,
):
    """Run a simple I/O benchmark on FILE (the request loop of qemu-img bench)."""
    from vfs.image.bench import run_bench
    from vfs.image.fileio import RawFile

    nbytes = parse_size(size)
    step_b = parse_size(step) if step is not None else nbytes
    off = parse_size(offset)
    try:
        pat = int(pattern, 0)
    except ValueError:
        raise UsageError(f"bad pattern {pattern!r}") from None
    if flush_interval and not write:
        raise UsageError("--flush-interval is only available in write tests")
    kind = fmt or _probe(file)
    if kind == "raw":
        img: Any = RawFile(file, writable=write)
    elif kind == "vimg":
        img = _open(file, readonly=not write, store=store, repo=repo)
    else:
        raise UsageError(f"vimg bench runs on raw or vimg images (got {kind}); use qemu-img bench")
    click.echo(
        f"Sending {count} {'write' if write else 'read'} requests, {nbytes} bytes each, "
        f"{depth} in parallel (starting at offset {off}, step size {step_b})"
    )
    if flush_interval:
        click.echo(f"Sending flush every {flush_interval} requests")
    try:
        dt = run_bench(
            img,
            count=count,
            size=nbytes,
            step=step_b,
            offset=off,
            write=write,
            pattern=pat,
            flush_interval=flush_interval,
        )
    finally:
        _close(img)
    click.echo(f"Run completed in {dt:.3f} seconds.")


# ----------------------------------------------------------------------------------- io
@main.command()
@click.option("-c", "commands", multiple=True, required=True, help="Command (repeatable).")
@click.option("-f", "fmt", type=click.Choice(["vimg"]))
@_remote_opts
@click.argument("file", type=click.Path(dir_okay=False))
@handle_errors
def io(commands, fmt, store, repo, file):
    """Run qemu-io style commands: write [-P PAT] [-z] OFF LEN, read [-P PAT] OFF LEN,
    discard OFF LEN, flush. A read that does not match its pattern fails (exit 5)."""
    from vfs.image.qemuio import run_command

    _check_vimg(file, fmt)
    writes = any(c.split()[:1] in (["write"], ["discard"], ["flush"]) for c in commands)
    img = _open(file, readonly=not writes, store=store, repo=repo)
    try:
        for c in commands:
            run_command(img, c, click.echo)
    finally:
        _close(img)


# ----------------------------------------------------------------------------------- push/pull
@main.command()
@click.option("--repo", required=True, help="Repository (file:///dir or a directory).")
@click.option("--store", type=click.Path(file_okay=False), help="Also keep a copy in this store.")
@click.option("-q", "quiet", is_flag=True, help="No progress.")
@click.option("--ref", "ref", help="Also publish the image as a template under this name.")
@click.argument("file", type=click.Path(dir_okay=False))
@_backing_opts
@handle_errors
def push(repo, store, quiet, ref, file):
    """Move FILE's clusters into a repository: entries become remote objects (SHA-256).

    Resumable: progress is committed every 256 clusters; run it again after an interruption.
    With --ref NAME the image itself (metadata only, a few KiB) is published as a template that
    `vimg pull --ref NAME --repo URL NEW.vimg` fetches on another host.
    """
    from vfs.image.remote import publish_template
    from vfs.image.remote import push as do_push
    from vfs.redirect import open_remote

    _check_vimg(file, None)
    # A directory repository is created on first push; http(s) ones are read-only (the remote
    # says so in one line: publish by copying the directory to a web root).
    remote = open_remote(repo, create=not repo.startswith(("http://", "https://")), **_tls())
    st = None
    if store:
        from vfs.redirect import LocalStore

        st = LocalStore(store)
    img = _open(file, readonly=False, store=store, repo=repo)
    try:
        n = do_push(img, remote, store=st, progress=_Progress("push", not quiet))
        if ref:
            oid = publish_template(img, remote, ref)
            click.echo(f"published template {ref} = {oid}")
    finally:
        _close(img)
        remote.close()
        if st is not None:
            st.close()
    click.echo(f"pushed {n} clusters to {repo}")


def _pull(
    repo: str | None, store: str | None, quiet: bool, file: str, ref: str | None, lazy: bool
) -> None:
    from vfs.image.remote import fetch_template
    from vfs.image.remote import pull as do_pull

    if ref:
        if not repo:
            raise UsageError("--ref needs --repo")
        from vfs.redirect import open_remote

        with open_remote(repo, **_tls()) as remote:
            oid = fetch_template(remote, ref, file)
        click.echo(f"fetched template {ref} = {oid}")
        if lazy:
            return
    elif lazy:
        raise UsageError("--lazy only applies with --ref")
    _check_vimg(file, None)
    img = _open(file, readonly=False, store=store, repo=repo)
    try:
        n = do_pull(img, progress=_Progress("pull", not quiet))
    finally:
        _close(img)
    click.echo(f"hydrated {n} clusters" if n else "nothing to pull: every cluster is local")


_ref_opt = click.option("--ref", help="Fetch template NAME from --repo into the new FILE first.")
_lazy_opt = click.option(
    "--lazy", is_flag=True, help="With --ref: stop after the template; fetch clusters on read."
)


@main.command()
@_remote_opts
@_ref_opt
@_lazy_opt
@click.option("-q", "quiet", is_flag=True, help="No progress.")
@click.argument("file", type=click.Path(dir_okay=False))
@handle_errors
def pull(repo, store, ref, lazy, quiet, file):
    """Fetch FILE's remote clusters back into the file (verified; resumable). Also: hydrate.

    With --ref NAME, first fetch the template NAME from --repo into the new FILE."""
    _pull(repo, store, quiet, file, ref, lazy)


main.add_command(pull, name="hydrate")  # the same command under the name DESIGN.md uses
