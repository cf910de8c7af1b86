"""`vfsd store ...` and `vfsd repo ...`: see and operate the redirect layer by hand."""

from __future__ import annotations

import sys
import time
from pathlib import Path

import click

from vfs.cli_util import emit_json, handle_errors, json_option, parse_size
from vfs.errors import UsageError
from vfs.paths import default_store
from vfs.redirect import LocalStore, Resolver, check_object_id, http_remote, open_remote
from vfs.redirect.remote import FileRemote

store_option = click.option(
    "--store",
    "store_dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Local object store directory [default: $VFS_STORE or $VFS_ROOT/store, "
    "VFS_ROOT=/var/lib/vfs].",
)


def _store_proxy(ctx: click.Context, param: click.Parameter, value: str | None) -> None:
    if value:
        ctx.meta["vfs.proxy"] = value


def _store_min_rate(ctx: click.Context, param: click.Parameter, value: str | None) -> None:
    if value is not None:
        try:
            ctx.meta["vfs.min_rate"] = parse_size(value)
        except UsageError as e:  # parsing time: click's one-line usage error, not a traceback
            raise click.BadParameter(str(e)) from None


def _store_grace(ctx: click.Context, param: click.Parameter, value: float | None) -> None:
    if value is not None:
        ctx.meta["vfs.grace"] = value


def current_proxy() -> str | None:
    """--proxy of the running command (kept in the click context, not in every signature)."""
    ctx = click.get_current_context(silent=True)
    return ctx.meta.get("vfs.proxy") if ctx is not None else None


def _current(key: str):
    ctx = click.get_current_context(silent=True)
    return ctx.meta.get(key) if ctx is not None else None


def repo_options(fn):
    """--repo URL plus the TLS, proxy and deadline options of HTTP(S) repositories."""
    fn = click.option(
        "--proxy",
        metavar="URL",
        expose_value=False,
        callback=_store_proxy,
        help="HTTP forward proxy (e.g. a site cache) for http(s):// repositories.",
    )(fn)
    fn = click.option(
        "--grace",
        type=click.FloatRange(min=0),
        expose_value=False,
        callback=_store_grace,
        help=f"Seconds an HTTP fetch may take before --min-rate applies "
        f"[default: {http_remote.DEFAULT_GRACE:g}].",
    )(fn)
    fn = click.option(
        "--min-rate",
        metavar="BYTES",
        expose_value=False,
        callback=_store_min_rate,
        help="Bytes/s an HTTP fetch must average once its grace is over, else it is cut off "
        f"(e.g. 64K; 0: no overall deadline) [default: {http_remote.DEFAULT_MIN_RATE // 1024}K].",
    )(fn)
    fn = click.option(
        "--timeout",
        type=click.FloatRange(min=0, min_open=True),
        default=http_remote.DEFAULT_TIMEOUT,
        show_default=True,
        help="Seconds any one connect, TLS handshake or read may take.",
    )(fn)
    fn = click.option(
        "--retries",
        type=click.IntRange(min=0),
        default=http_remote.DEFAULT_RETRIES,
        show_default=True,
        help="Retries after a failed request (exponential backoff, within the deadline).",
    )(fn)
    fn = click.option("--key", type=click.Path(dir_okay=False), help="Client key (mutual TLS).")(fn)
    fn = click.option(
        "--cert", type=click.Path(dir_okay=False), help="Client certificate (mutual TLS)."
    )(fn)
    fn = click.option(
        "--ca",
        type=click.Path(dir_okay=False),
        help="CA bundle that signs the server's certificate.",
    )(fn)
    fn = click.option(
        "--repo",
        "repo_url",
        required=True,
        metavar="URL",
        help="Repository: file:///DIR, DIR, http://HOST/PATH or https://...",
    )(fn)
    return fn


def open_store(store_dir: Path | None, **kw) -> LocalStore:
    return LocalStore(store_dir or default_store(), **kw)


def open_repo(repo_url, ca, cert, key, timeout, retries, create=False):
    """The repository of a command's --repo/--ca/--cert/--key/--timeout/--retries/--proxy."""
    return open_remote(
        repo_url,
        ca=ca,
        cert=cert,
        key=key,
        timeout=timeout,
        retries=retries,
        create=create,
        proxy=current_proxy(),
        min_rate=_current("vfs.min_rate"),
        grace=_current("vfs.grace"),
    )


def _human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def register(main: click.Group) -> None:
    main.add_command(store)
    main.add_command(repo)
    main.add_command(fetch)


# --------------------------------------------------------------------------- store


@click.group()
def store() -> None:
    """The host's local object store (first redirection)."""


@store.command("init")
@store_option
@click.option("--quota", help="Quota (e.g. 10G); least recently used unpinned objects go first.")
@handle_errors
def store_init(store_dir, quota):
    """Create a store (or change its quota).

    Objects are plain files (the kernel engine reads them directly); for compression at rest
    put the store on a compressing file system (btrfs compress=zstd, zfs)."""
    q = parse_size(quota) if quota else None
    with open_store(store_dir, quota=q) as s:
        click.echo(f"store {s.root}: quota {_human(s.quota) if s.quota else 'none'}")


@store.command("stats")
@store_option
@json_option
@handle_errors
def store_stats(store_dir, as_json):
    """Objects, bytes and quota of the store."""
    with open_store(store_dir, create=False) as s:
        st = s.stats_dict()
    if as_json:
        emit_json(st)
        return
    click.echo(f"store:     {st['root']}")
    click.echo(f"objects:   {st['objects']}")
    click.echo(f"logical:   {_human(st['logical_bytes'])}")
    click.echo(f"on disk:   {_human(st['stored_bytes'])}")
    click.echo(f"quota:     {_human(st['quota']) if st['quota'] else 'none'}")
    click.echo(f"pinned:    {st['pinned_objects']}")


@store.command("verify")
@store_option
@click.option("--repair", is_flag=True, help="Remove damaged objects (they can be fetched again).")
@json_option
@handle_errors
def store_verify(store_dir, repair, as_json):
    """Re-hash every object against its id. Exit 5 if any is damaged."""
    with open_store(store_dir, create=False) as s:
        progress = None
        if not as_json and sys.stderr.isatty():

            def progress(n):
                click.echo(f"\rchecked {n}", err=True, nl=False)

        rep = s.verify(repair=repair, progress=progress)
    if as_json:
        emit_json(
            {
                "checked": rep.checked,
                "damaged": rep.bad,
                "removed": rep.removed,
                "sidecars_rebuilt": rep.sums_rebuilt,
            }
        )
    else:
        click.echo(f"checked {rep.checked} objects, {len(rep.bad)} damaged")
        if rep.sums_rebuilt:
            click.echo(f"rebuilt {len(rep.sums_rebuilt)} damaged checksum sidecars")
        for oid in rep.bad:
            click.echo(f"damaged: {oid}{' (removed)' if oid in rep.removed else ''}")
    if rep.bad and not repair:
        sys.exit(5)


@store.command("gc")
@store_option
@click.option(
    "--target",
    help="Evict LRU unpinned objects until usage <= this (default: quota, "
    "or everything unpinned when there is no quota).",
)
@json_option
@handle_errors
def store_gc(store_dir, target, as_json):
    """Evict least recently used unpinned objects."""
    with open_store(store_dir, create=False) as s:
        res = s.gc(parse_size(target) if target else None)
    if as_json:
        emit_json(res)
    else:
        click.echo(
            f"removed {res['removed']} objects, freed {_human(res['freed_bytes'])}, "
            f"usage now {_human(res['usage'])}"
        )


@store.command("rebuild")
@store_option
@json_option
@handle_errors
def store_rebuild(store_dir, as_json):
    """Rescan the object files and repair the usage index (runs by itself after a crash)."""
    with open_store(store_dir, create=False) as s:
        res = s.recover()
    if as_json:
        emit_json(res)
    else:
        click.echo(", ".join(f"{k.replace('_', ' ')}: {v}" for k, v in res.items()))


@store.command("put")
@store_option
@click.argument("files", nargs=-1, required=True, type=click.Path(exists=True, dir_okay=False))
@handle_errors
def store_put(store_dir, files):
    """Add files to the store; print their ids."""
    with open_store(store_dir) as s:
        for f in files:
            click.echo(f"{s.put_file(f)}  {f}")


@store.command("cat")
@store_option
@click.argument("oid")
@handle_errors
def store_cat(store_dir, oid):
    """Write a local object's bytes to stdout (verified)."""
    check_object_id(oid)
    with open_store(store_dir, create=False) as s:
        s.export(oid, sys.stdout.buffer)


# --------------------------------------------------------------------------- repo


@click.group()
def repo() -> None:
    """Object repositories (file:// directories, http(s):// static servers)."""


@repo.command("init")
@click.argument("directory", type=click.Path(file_okay=False, path_type=Path))
@handle_errors
def repo_init(directory):
    """Create an empty repository directory (serve it with any static web server)."""
    FileRemote.init(directory)
    click.echo(f"repository {directory.resolve()} ready")


@repo.command("put")
@repo_options
@click.option("--ref", "ref_name", help="Also point this named ref at the (single) object.")
@json_option
@click.argument("files", nargs=-1, required=True, type=click.Path(exists=True, dir_okay=False))
@handle_errors
def repo_put(repo_url, ca, cert, key, timeout, retries, ref_name, as_json, files):
    """Upload files as objects (file:// repositories; publish HTTP ones by copying the dir)."""
    if ref_name and len(files) != 1:
        raise UsageError("--ref needs exactly one file")
    results = []
    with open_repo(repo_url, ca, cert, key, timeout, retries) as r:
        for f in files:
            oid = r.put_file(f)
            results.append({"file": f, "id": oid})
        if ref_name:
            r.set_ref(ref_name, results[0]["id"])
    if as_json:
        emit_json(results)
    else:
        for item in results:
            click.echo(f"{item['id']}  {item['file']}")


@repo.command("get")
@repo_options
@store_option
@click.option("-o", "--output", type=click.Path(dir_okay=False), help="Write the object here.")
@click.option(
    "--size",
    "expected_size",
    metavar="BYTES",
    help="The object's exact size: refuse one of any other (read nothing past it).",
)
@click.option(
    "--max-size",
    metavar="BYTES",
    default="1G",
    show_default=True,
    help="Refuse a larger object (when --size is not given).",
)
@json_option
@click.argument("ref")
@handle_errors
def repo_get(
    repo_url, ca, cert, key, timeout, retries, store_dir, output, expected_size, max_size,
    as_json, ref,
):  # fmt: skip
    """Resolve REF (an id or a ref name) through the local store: fetch, verify, store."""
    exact = parse_size(expected_size) if expected_size is not None else None
    bound = parse_size(max_size)
    with open_repo(repo_url, ca, cert, key, timeout, retries) as r, open_store(store_dir) as s:
        oid = ref if _looks_like_id(ref) else r.get_ref(ref)
        res = Resolver(s, r)
        local = s.has(oid)
        t0 = time.perf_counter()
        res.ensure(oid, expected_size=exact, max_size=bound)
        dt = time.perf_counter() - t0
        size = s.size(oid)
        if output:
            with open(output, "wb") as out:
                s.export(oid, out)
    info = {
        "id": oid,
        "size": size,
        "redirection": "first (local)" if local else "second (fetched)",
        "seconds": round(dt, 6),
        "output": output,
    }
    if as_json:
        emit_json(info)
    else:
        rate = f", {size / dt / 1e6:.1f} MB/s" if not local and dt > 0 else ""
        click.echo(f"{oid}  {_human(size)}  {info['redirection']} in {dt * 1000:.1f} ms{rate}")


@repo.command("ls")
@repo_options
@json_option
@handle_errors
def repo_ls(repo_url, ca, cert, key, timeout, retries, as_json):
    """List the named refs of a repository."""
    with open_repo(repo_url, ca, cert, key, timeout, retries) as r:
        refs = r.list_refs()
    if as_json:
        emit_json(refs)
    else:
        for name, oid in refs.items():
            click.echo(f"{oid}  {name}")


@repo.command("ref")
@repo_options
@click.argument("name")
@click.argument("oid", required=False)
@handle_errors
def repo_ref(repo_url, ca, cert, key, timeout, retries, name, oid):
    """Show NAME's object id, or point NAME at OID."""
    with open_repo(repo_url, ca, cert, key, timeout, retries) as r:
        if oid:
            r.set_ref(name, check_object_id(oid))
        click.echo(r.get_ref(name))


def _looks_like_id(text: str) -> bool:
    return len(text) == 64 and all(c in "0123456789abcdef" for c in text)


@click.command("fetch", hidden=True)
@repo_options
@store_option
@click.argument("oids", nargs=-1, required=True)
@handle_errors
def fetch(repo_url, ca, cert, key, timeout, retries, store_dir, oids):
    """Make objects local (used by tests racing processes)."""
    with open_repo(repo_url, ca, cert, key, timeout, retries) as r, open_store(store_dir) as s:
        res = Resolver(s, r)
        for oid in oids:
            res.ensure(check_object_id(oid))
        click.echo(f"fetched {res.fetches}")
