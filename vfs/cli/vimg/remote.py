"""``vimg`` verbs for I/O and remote clusters: bench, io, push, pull (hydrate) (registered on
the group of :mod:`vfs.cli.vimg.common`)."""

from __future__ import annotations

from typing import Any

import click

from vfs.cli.edge import handle_errors
from vfs.cli.options import repo_options, store_option
from vfs.cli.sealed import keys as sealed_keys
from vfs.cli.sealed import sealing, sealing_options, sealing_remote
from vfs.cli.vimg.common import (
    Progress,
    backing_opts,
    check_vimg,
    close_image,
    main,
    open_image,
    probe,
    remote_opts,
)
from vfs.errors import UsageError
from vfs.redirect.repoconfig import RepoConfig
from vfs.units import parse_size


# ----------------------------------------------------------------------------------- bench
@main.command()
@click.option("-c", "count", default=75000, show_default=True, help="Number of requests.")
@click.option(
    "-d", "depth", default=64, show_default=True, help="Reported only (requests are sequential)."
)
@click.option("-f", "fmt", type=click.Choice(["raw", "vimg"]), help="Format of FILE.")
@click.option("-n", "nocache", is_flag=True, help="Accepted for qemu-img compatibility.")
@click.option("-o", "offset", default="0", help="Start offset.")
@click.option("-s", "size", default="4k", show_default=True, help="Request size.")
@click.option("-S", "step", default=None, help="Step between requests [default: request size].")
@click.option("-t", "cache", default="writeback", help="Accepted for qemu-img compatibility.")
@click.option("-w", "write", is_flag=True, help="Write requests (default: read).")
@click.option("--pattern", default="0", help="Byte written by -w (as qemu-img: 0).")
@click.option("--flush-interval", default=0, help="Flush after this many writes.")
@click.option("--no-drain", is_flag=True, help="Accepted for qemu-img compatibility.")
@remote_opts
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
    kind = fmt or probe(file)
    if kind == "raw":
        img: Any = RawFile(file, writable=write)
    elif kind == "vimg":
        img = open_image(file, readonly=not write, store=store, repo=repo)
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
        close_image(img)
    click.echo(f"Run completed in {dt:.3f} seconds.")


# ----------------------------------------------------------------------------------- io
@main.command()
@click.option("-c", "commands", multiple=True, required=True, help="Command (repeatable).")
@click.option("-f", "fmt", type=click.Choice(["vimg"]), help="Only vimg.")
@remote_opts
@click.argument("file", type=click.Path(dir_okay=False))
@handle_errors
def io(commands, fmt, store, repo, file):
    """Run qemu-io style commands: write [-P PAT] [-z] OFF LEN, read [-P PAT] OFF LEN,
    discard OFF LEN, flush. A read that does not match its pattern fails (exit 5)."""
    from vfs.image.qemuio import run_command

    check_vimg(file, fmt)
    writes = any(c.split()[:1] in (["write"], ["discard"], ["flush"]) for c in commands)
    img = open_image(file, readonly=not writes, store=store, repo=repo)
    try:
        for c in commands:
            run_command(img, c, click.echo)
    finally:
        close_image(img)


# ----------------------------------------------------------------------------------- push/pull
@main.command()
@repo_options(help="Repository (file:///dir or a directory).")
@store_option("Also keep a copy of each cluster in this local object store.", param="store")
@click.option("-q", "quiet", is_flag=True, help="No progress.")
@click.option("--ref", "ref", help="Also publish the image as a template under this name.")
@sealing_options
@click.argument("file", type=click.Path(dir_okay=False))
@backing_opts
@handle_errors
def push(repo, store, quiet, ref, file):
    """Move FILE's clusters into a repository: entries become remote objects (SHA-256).

    Resumable: progress is committed every 256 clusters; run it again after an interruption.
    With --ref NAME the image itself (metadata only, a few KiB) is published as a template that
    `vimg pull --ref NAME --repo URL NEW.vimg` fetches on another host.

    With --encrypt-for PUB (and --identity, --ref), every cluster and the template are
    encrypted and NAME is a signed ref sealed to each PUB and to --identity
    (docs/encryption.md); FILE itself is left as it is (its clusters stay local). Readers
    give --identity, and the address URL#NAME as --repo once the template is fetched.
    """
    from vfs.image.remote import publish_template
    from vfs.image.remote import push as do_push

    check_vimg(file, None)
    seal = sealing()
    if "#" in repo.url:
        raise UsageError(f"{repo.url}: push to the repository URL; name the ref with --ref")
    if seal is not None:
        if not ref:
            raise UsageError("--encrypt-for needs --ref: an encrypted image is a signed ref")
        return _push_sealed(repo, store, quiet, ref, file, seal)
    # A directory repository is created on first push; http(s) ones are read-only (the remote
    # says so in one line: publish by copying the directory to a web root).
    remote = repo.open(create=not repo.is_http)
    st = None
    if store:
        from vfs.redirect import LocalStore

        st = LocalStore(store)
    img = open_image(file, readonly=False, store=store, repo=repo)
    try:
        n = do_push(img, remote, store=st, progress=Progress("push", not quiet))
        if ref:
            oid = publish_template(img, remote, ref)
            click.echo(f"published template {ref} = {oid}")
        if st is not None:
            # the local copies serve this image's reads: a gc root of the store, as cache (the
            # repository gives them back), refreshed by every `vfsd store gc`
            from vfs.cli.gc import open_image_set

            st.roots.put("vimg", file, {"image": open_image_set(img, remote.url)}, repo=remote.url)
    finally:
        close_image(img)
        remote.close()
        if st is not None:
            st.close()
    click.echo(f"pushed {n} clusters to {repo.url}")


def _push_sealed(repo: RepoConfig, store: str | None, quiet: bool, ref: str, file: str,
                 seal: Any) -> None:  # fmt: skip
    """``push --encrypt-for``: FILE is read (not changed) and published encrypted as ``ref``."""
    from vfs.image.remote import publish_sealed
    from vfs.redirect.repometa import check_ref_name

    check_ref_name(ref)  # before the work, not after it
    remote = repo.open(create=not repo.is_http)
    st = None
    try:
        if repo.is_http:
            raise UsageError(
                f"{repo.url}: HTTP repositories are read-only: push to the repository "
                "directory, then copy it to the web root (objects first, refs last)"
            )
        sealer = sealing_remote(remote, ref, seal, kind="image")
        if store:
            from vfs.redirect import LocalStore

            st = LocalStore(store)
        img = open_image(file, readonly=True, store=store, repo=repo)
        try:
            oid, n = publish_sealed(img, sealer, ref, store=st,
                                    progress=Progress("push", not quiet))  # fmt: skip
        finally:
            close_image(img)
    finally:
        remote.close()
        if st is not None:
            st.close()
    click.echo(f"published encrypted template {ref} = {oid} (signed ref {sealer.ref_id})")
    click.echo(
        f"sealed {n} clusters to {repo.url} ({sealer.reused} kept from the previous version) "
        f"for {len(sealer.recipients)} recipients"
    )


def _pull(
    repo: RepoConfig | None, store: str | None, quiet: bool, file: str, ref: str | None, lazy: bool
) -> None:
    from vfs.image.remote import fetch_template
    from vfs.image.remote import pull as do_pull

    if ref:
        if repo is None:
            raise UsageError("--ref needs --repo")
        if "#" in repo.url:
            raise UsageError(f"{repo.url}: give the repository URL and the ref with --ref")
        from vfs.redirect.sealed_remote import UnsealingRemote

        with repo.open() as plain:
            remote = UnsealingRemote(plain, sealed_keys())
            oid = fetch_template(remote, ref, file)
            sealed = bool(remote.opened)
        click.echo(f"fetched {'encrypted ' if sealed else ''}template {ref} = {oid}")
        if sealed:  # its clusters are read through the address URL#REF
            repo = repo.replace(url=f"{repo.url}#{ref}")
            if lazy:
                click.echo(f"read it with --repo {repo.url} and --identity", err=True)
        if lazy:
            return
    elif lazy:
        raise UsageError("--lazy only applies with --ref")
    check_vimg(file, None)
    img = open_image(file, readonly=False, store=store, repo=repo)
    try:
        n = do_pull(img, progress=Progress("pull", not quiet))
    finally:
        close_image(img)
    click.echo(f"hydrated {n} clusters" if n else "nothing to pull: every cluster is local")


_ref_opt = click.option("--ref", help="Fetch template NAME from --repo into the new FILE first.")
_lazy_opt = click.option(
    "--lazy", is_flag=True, help="With --ref: stop after the template; fetch clusters on read."
)


@main.command()
@remote_opts
@_ref_opt
@_lazy_opt
@click.option("-q", "quiet", is_flag=True, help="No progress.")
@click.argument("file", type=click.Path(dir_okay=False))
@handle_errors
def pull(repo, store, ref, lazy, quiet, file):
    """Fetch FILE's remote clusters back into the file (verified; resumable). Also: hydrate.

    With --ref NAME, first fetch the template NAME from --repo into the new FILE."""
    _pull(repo, store, quiet, file, ref, lazy)


main.add_command(pull, name="hydrate")  # the same command under the name docs/design.md uses
