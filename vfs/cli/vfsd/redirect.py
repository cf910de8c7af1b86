"""`vfsd store ...` and `vfsd repo ...`: see and operate the redirect layer by hand."""

from __future__ import annotations

import sys
import time
from pathlib import Path

import click

from vfs.cli.edge import emit_json, handle_errors, json_option
from vfs.cli.options import repo_options
from vfs.cli.options import store_option as make_store_option
from vfs.errors import IntegrityError, NotFound, UsageError
from vfs.paths import default_store
from vfs.redirect import LocalStore, RepoConfig, Resolver, check_object_id
from vfs.redirect.file_remote import FileRemote
from vfs.units import parse_duration, parse_size

store_option = make_store_option()


def open_store(store_dir: Path | None, **kw) -> LocalStore:
    return LocalStore(store_dir or default_store(), **kw)


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
        raise IntegrityError(
            f"{len(rep.bad)} of {rep.checked} objects are damaged (--repair removes them)"
        )


@store.command("gc")
@store_option
@click.option(
    "--target",
    help="Evict LRU objects until usage <= this, the cache objects of gc roots included "
    "(default: the quota, or every object no root needs when there is no quota).",
)
@json_option
@handle_errors
def store_gc(store_dir, target, as_json):
    """Evict least recently used objects nothing on this host needs.

    Never evicted: objects a gc root keeps (templates of VEEs served without a repository,
    every template's manifest, images registered without one: see `vfsd store roots`) and
    pinned objects. Objects a root can fetch back again (cache) go only for --target."""
    with open_store(store_dir, create=False) as s:
        notes = refresh_image_roots(s)
        res = s.gc(parse_size(target) if target else None)
        keep, cache = s.roots.protected()
        res["roots"] = len(s.roots.roots())
        res["kept_by_roots"] = len(keep)
        res["cached_by_roots"] = len(cache)
    for n in notes:
        click.echo(f"vfsd: note: {n}", err=True)
    if as_json:
        emit_json(res)
    else:
        click.echo(
            f"removed {res['removed']} objects, freed {_human(res['freed_bytes'])}, "
            f"usage now {_human(res['usage'])}; {res['roots']} gc roots keep "
            f"{res['kept_by_roots']} objects and cache {res['cached_by_roots']}"
        )


def refresh_image_roots(s: LocalStore) -> list[str]:
    """Image roots follow their images (push and pull change which clusters are remote):
    recompute each from its file before a gc. An image that is gone or unreadable keeps its
    last set (say so): only `vfsd store root rm` forgets a root."""
    from vfs.cli.gc import image_set
    from vfs.errors import VfsError

    notes = []
    for r in s.roots.roots():
        if r.kind != "vimg":
            continue
        try:
            sets = {"image": image_set(r.path, r.repo)}
        except (VfsError, OSError) as e:
            notes.append(f"gc root {r.path}: kept as it was ({e})")
            continue
        s.roots.put("vimg", r.path, sets, repo=r.repo)
    return notes


@store.command("roots")
@store_option
@json_option
@handle_errors
def store_roots(store_dir, as_json):
    """List the gc roots: what on this host needs objects of the store.

    `vfsd serve` registers its state directory; `vimg push --store` its image; `vfsd store
    root add` anything else."""
    with open_store(store_dir, create=False) as s:
        rows = [r.summary() for r in s.roots.roots()]
    if as_json:
        emit_json(rows)
        return
    for r in rows:
        where = f"repo {r['repo']}" if r["repo"] else "no repo: nothing can be fetched back"
        gone = "" if r["present"] else "  (path missing)"
        click.echo(
            f"{r['kind']:9} {r['path']}: keeps {r['keep_objects']}, caches "
            f"{r['cache_objects']} ({where}){gone}"
        )


@store.group("root")
def store_root() -> None:
    """Register or forget a gc root by hand."""


@store_root.command("add")
@store_option
@json_option
@click.option(
    "--repo",
    "repo_url",
    metavar="URL",
    help="Where its objects can be fetched back from: they are then cache, not kept.",
)
@click.argument("path", type=click.Path(exists=True, path_type=Path))
@handle_errors
def store_root_add(store_dir, as_json, repo_url, path):
    """Register PATH (a vimg image, or a vfsd state directory) as a gc root of the store."""
    from vfs.cli.gc import image_set, state_sets

    with open_store(store_dir, create=False) as s:
        if path.is_dir():
            if not (path / "vees.json").exists() and not (path / "vees").is_dir():
                raise UsageError(f"{path}: not a vfsd state directory (no vees.json)")
            root = s.roots.update(
                "vee-state", path, add=state_sets(path, s, repo_url is not None), repo=repo_url
            )
        else:
            root = s.roots.put("vimg", path, {"image": image_set(path, repo_url)}, repo=repo_url)
    info = root.summary()
    if as_json:
        emit_json(info)
        return
    click.echo(
        f"{info['kind']} {info['path']}: keeps {info['keep_objects']}, caches "
        f"{info['cache_objects']}"
    )


@store_root.command("rm")
@store_option
@json_option
@click.argument("path", type=click.Path(path_type=Path))
@handle_errors
def store_root_rm(store_dir, as_json, path):
    """Forget the gc root PATH: its objects become ordinary cache (evictable)."""
    with open_store(store_dir, create=False) as s:
        removed = [k for k in ("vee-state", "vimg") if s.roots.remove(k, path)]
    if not removed:
        raise NotFound(f"{path}: no gc root of this store")
    if as_json:
        emit_json({"path": str(path), "removed": removed})
        return
    click.echo(f"{path}: gc root removed")


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
@json_option
@click.argument("files", nargs=-1, required=True, type=click.Path(exists=True, dir_okay=False))
@handle_errors
def store_put(store_dir, as_json, files):
    """Add files to the store; print their ids."""
    results = []
    with open_store(store_dir) as s:
        for f in files:
            oid = s.put_file(f)
            results.append({"file": f, "id": oid})
            if not as_json:
                click.echo(f"{oid}  {f}")
    if as_json:
        emit_json(results)


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
def repo_put(repo, ref_name, as_json, files):
    """Upload files as objects (file:// repositories; publish HTTP ones by copying the dir)."""
    if ref_name and len(files) != 1:
        raise UsageError("--ref needs exactly one file")
    results = []
    with repo.open() as r:
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
    repo, store_dir, output, expected_size, max_size,
    as_json, ref,
):  # fmt: skip
    """Resolve REF (an id or a ref name) through the local store: fetch, verify, store."""
    exact = parse_size(expected_size) if expected_size is not None else None
    bound = parse_size(max_size)
    with repo.open() as r, open_store(store_dir) as s:
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
def repo_ls(repo, as_json):
    """List the named refs of a repository."""
    with repo.open() as r:
        refs = r.list_refs()
    if as_json:
        emit_json(refs)
    else:
        for name, oid in refs.items():
            click.echo(f"{oid}  {name}")


@repo.command("ref")
@repo_options
@click.option(
    "-d",
    "--delete",
    is_flag=True,
    help="Remove NAME (print the id it named); the objects stay until `vfsd repo gc`.",
)
@click.argument("name")
@click.argument("oid", required=False)
@handle_errors
def repo_ref(repo, delete, name, oid):
    """Show NAME's object id, point NAME at OID, or remove NAME (--delete)."""
    if delete and oid:
        raise UsageError("--delete takes a NAME only, no OID")
    with repo.open() as r:
        if delete:
            click.echo(r.delete_ref(name))
            return
        if oid:
            r.set_ref(name, check_object_id(oid))
        click.echo(r.get_ref(name))


@repo.command("gc")
@click.option(
    "--repo",
    "repo_url",
    required=True,
    metavar="DIR",
    help="The repository directory (file:///DIR or DIR; a web server's copy is not collected).",
)
@click.option("--dry-run", is_flag=True, help="Only count what would be removed.")
@click.option(
    "--grace",
    "grace_text",
    metavar="DURATION",
    default="1d",
    show_default=True,
    help="Keep unreferenced objects younger than this (30s, 10m, 2h, 7d): longer than any "
    "publish, so one running now loses nothing.",
)
@click.option(
    "--image",
    "images",
    multiple=True,
    type=click.Path(exists=True, dir_okay=False),
    help="Also keep the remote clusters of this local vimg image (repeatable): images pushed "
    "without --ref are named by no ref.",
)
@make_store_option(
    "Also keep what the gc roots of this local object store name (the templates of its host's "
    "VEEs, its images), where the repository has it.",
    param="host_store",
)
@json_option
@click.argument("digests", nargs=-1)
@handle_errors
def repo_gc(repo_url, dry_run, grace_text, images, host_store, as_json, digests):
    """Remove the objects of a repository that no ref, DIGEST, --image or --store reaches.

    Marks from every ref (templates and everything they name, images pushed with --ref and
    their clusters, plain objects) and from each DIGEST given (a template, an image or an
    object), then removes every other object older than --grace. Nothing is removed if a
    ref names a missing object or a reachable manifest cannot be read."""
    from vfs.cli.gc import image_objects, object_references
    from vfs.redirect import repo_gc

    grace = parse_duration(grace_text)
    extra = [check_object_id(d) for d in digests]
    for img in images:
        extra.extend(sorted(image_objects(img)))
    host: set[str] = set()
    if host_store is not None:
        with open_store(host_store, create=False) as s:
            keep, cache = s.roots.protected()
        host = keep | cache
    with RepoConfig(repo_url).open() as r:
        if not isinstance(r, FileRemote):
            raise UsageError(f"{repo_url}: repo gc needs the repository directory (file://)")
        # a host's roots also name objects of other repositories and local-only ones: those
        # are no concern of this repository's gc (a digest given by hand must be here)
        extra.extend(sorted(o for o in host if r.has(o)))
        rep = repo_gc.collect(r, object_references, extra_roots=extra, grace=grace, dry_run=dry_run)
    if as_json:
        emit_json(rep.to_json())
    else:
        verb = "would remove" if dry_run else "removed"
        click.echo(
            f"{rep.refs} refs, {rep.roots} roots: {rep.marked_objects} objects reachable "
            f"({_human(rep.marked_bytes)}); {verb} {rep.swept_objects} objects "
            f"({_human(rep.swept_bytes)}); kept {rep.young_objects} younger than {grace_text} "
            f"({_human(rep.young_bytes)})"
        )
    err = repo_gc.missing_error(rep, r.url)
    if err is not None:
        raise err


def _looks_like_id(text: str) -> bool:
    return len(text) == 64 and all(c in "0123456789abcdef" for c in text)


@click.command("fetch", hidden=True)
@repo_options
@store_option
@click.argument("oids", nargs=-1, required=True)
@handle_errors
def fetch(repo, store_dir, oids):
    """Make objects local (used by tests racing processes)."""
    with repo.open() as r, open_store(store_dir) as s:
        res = Resolver(s, r)
        for oid in oids:
            res.ensure(check_object_id(oid))
        click.echo(f"fetched {res.fetches}")
