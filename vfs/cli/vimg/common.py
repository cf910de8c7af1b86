"""What the ``vimg`` command modules share: the click group, options (remote, TLS, backing
directories, JSON), opening and closing images, progress, header warnings.

Every command is wrapped by :func:`vfs.cli.edge.handle_errors`: a bad input is one line on stderr
and a non-zero exit code, never a traceback. JSON output uses qemu-img's field names.
"""

from __future__ import annotations

import os
import threading
import time
from typing import Any

import click

from vfs.cli.edge import OneLineErrorGroup, json_option, setup_logging
from vfs.cli.options import repo_options, store_option
from vfs.cli.sealed import keep_encrypted_option, unsealing_options
from vfs.errors import UsageError
from vfs.image.image import Image
from vfs.redirect.repoconfig import RepoConfig

FMT = click.Choice(["raw", "qcow2", "vimg"])


class LazyResolver:
    """Opens the local store (and the repository) only when a remote cluster is read.

    A repository given as the address ``URL#REF`` holds an image pushed encrypted (``vimg push
    --encrypt-for``): REF is opened with the command's ``--identity`` (and ``--trust``,
    ``--pins``) when the first remote cluster is read, and its clusters are decrypted and
    verified after fetch. The key files are loaded here, in the command's thread (a read may
    come from a worker thread, which has no click context)."""

    def __init__(self, store: str | None, repo: RepoConfig | None) -> None:
        from vfs.cli.sealed import keep_encrypted, keys

        self.store_dir, self.repo = store, repo
        self._r: Any = None
        self._objs: list[Any] = []
        self._lock = threading.Lock()
        self.sealed_ref: str | None = None
        self.keys: Any = None
        self.keep_encrypted = keep_encrypted()
        if repo is not None:
            from vfs.redirect.sealed_remote import split_address

            url, ref = split_address(repo.url)
            if url is not None:
                self.repo, self.sealed_ref, self.keys = repo.replace(url=url), ref, keys()
        if self.sealed_ref is None and self.keep_encrypted:
            raise UsageError(
                "--keep-encrypted applies only with --repo URL#REF (an encrypted image)"
            )

    def resolver(self) -> Any:
        with self._lock:
            return self._resolver()

    def _resolver(self) -> Any:
        if self._r is None:
            from vfs.paths import default_store
            from vfs.redirect import LocalStore, Resolver

            store = LocalStore(self.store_dir or default_store())
            self._objs.append(store)
            remote = self.repo.open() if self.repo is not None else None
            if remote is not None:
                self._objs.append(remote)  # closed by close(), also when opening REF fails
            if remote is not None and self.sealed_ref is not None:
                from vfs.redirect.sealed_remote import UnsealingRemote

                remote = UnsealingRemote.for_ref(remote, self.sealed_ref, self.keys)
                if self.keep_encrypted:
                    from vfs.redirect.sealed_store import SealedStoreResolver

                    self._r = SealedStoreResolver(store, remote)
                    return self._r
            self._r = Resolver(store, remote)
        return self._r

    def get(self, oid: str, *, expected_size: int | None = None) -> bytes:
        return self.resolver().get(oid, expected_size=expected_size)

    def ensure(self, oid: str, *, expected_size: int | None = None) -> None:
        self.resolver().ensure(oid, expected_size=expected_size)

    def close(self) -> None:
        for o in reversed(self._objs):
            o.close()


def _store_backing_dirs(ctx: click.Context, param: click.Parameter, value: tuple) -> None:
    if value:
        ctx.meta.setdefault("vimg.backing_dirs", []).extend(value)


def backing_opts(fn: Any) -> Any:
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


def backing_dirs() -> tuple[str, ...]:
    """Directories backing files may lie in beyond the image's own (spec 8)."""
    ctx = click.get_current_context(silent=True)
    dirs = list(ctx.meta.get("vimg.backing_dirs", [])) if ctx is not None else []
    env = os.environ.get("VIMG_BACKING_DIRS", "")
    dirs += [d for d in env.split(os.pathsep) if d]
    return tuple(dirs)


def remote_opts(fn: Any) -> Any:
    """--repo and how to reach it (:func:`vfs.cli.options.repo_options`: parameter ``repo``, a
    RepoConfig or None), --store, --backing-dir."""
    fn = backing_opts(fn)
    fn = store_option(param="store")(fn)
    fn = keep_encrypted_option(unsealing_options(fn))
    return repo_options(
        fn,
        required=False,
        help="Repository of remote clusters (file:///dir, /dir, http(s)://...; URL#REF: the "
        "encrypted image REF in it, opened with --identity).",
    )


def json_opts(fn: Any) -> Any:
    fn = json_option(fn)
    fn = click.option(
        "--output",
        "output",
        type=click.Choice(["human", "json"]),
        default="human",
        help="Output format (as qemu-img --output).",
    )(fn)
    return fn


def want_json(as_json: bool, output: str) -> bool:
    return as_json or output == "json"


def open_image(
    path: str,
    *,
    readonly: bool,
    store: str | None = None,
    repo: str | None = None,
    with_backing: bool = True,
) -> Image:
    res = LazyResolver(store, repo)
    img = Image.open(
        path,
        readonly=readonly,
        resolver=res,
        with_backing=with_backing,
        backing_dirs=backing_dirs(),
    )
    warn_header(img)
    return img


def header_problems(src: Any) -> list[str]:
    """Header problems of a vimg source and every vimg layer below it."""
    from vfs.image.ops import header_problems

    out: list[str] = []
    while isinstance(src, Image):
        out += [f"{src.path}: {p}" for p in header_problems(src)]
        src = src.backing
    return out


def warn_header(src: Any) -> None:
    """A possible roll-back is never silent: one warning line per problem on stderr."""
    for p in header_problems(src):
        click.echo(f"vimg: warning: {p}", err=True)


def close_image(img: Any) -> None:
    """Close an image and the store/repository its lazy resolver may have opened."""
    res = getattr(img, "resolver", None)
    try:
        img.close()
    finally:
        if isinstance(res, LazyResolver):
            res.close()


def check_vimg(path: str, fmt: str | None) -> None:
    if fmt not in (None, "vimg"):
        raise UsageError(f"this command works on vimg images only (got -f {fmt})")
    from vfs.image.fileio import probe_format

    if os.path.exists(path) and probe_format(path) != "vimg":
        raise UsageError(f"{path}: not a vimg image (found {probe_format(path)})")


class Progress:
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


@click.group(cls=OneLineErrorGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("-v", "--verbose", count=True, help="More logging (repeat for debug).")
def main(verbose: int) -> None:
    """vimg: create, inspect, check and convert vimg disk images (qemu-img style).

    vimg images checksum every cluster (xxh3, verified on every read), may keep clusters in a
    remote repository (push/pull), and survive crashes at any instant (shadow paging).
    """
    setup_logging(verbose)


def probe(path: str) -> str:
    from vfs.image.fileio import probe_format

    return probe_format(path)
