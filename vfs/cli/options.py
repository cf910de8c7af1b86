"""The options the CLIs share, defined once: the repository (``--repo`` and how to reach it),
the local store, the state directory.

:func:`repo_options` adds ``--repo URL``, ``--ca``, ``--cert``, ``--key``, ``--proxy``,
``--timeout``, ``--retries``, ``--min-rate`` and ``--grace`` to a command and hands it one
parameter, ``repo``: a :class:`vfs.redirect.RepoConfig` (or None when ``--repo`` is optional and
not given). ``vfsd repo|template|serve`` and ``vimg`` use it, so a flag is spelled, defaulted and
checked the same everywhere.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from vfs.errors import UsageError
from vfs.paths import default_store, vfs_root
from vfs.redirect.repoconfig import (
    DEFAULT_GRACE,
    DEFAULT_MIN_RATE,
    DEFAULT_RETRIES,
    DEFAULT_TIMEOUT,
    RepoConfig,
)
from vfs.units import parse_size

_REPO_PARAMS = (
    "repo_url", "ca", "cert", "key", "proxy", "repo_timeout", "retries", "min_rate", "grace",
)  # fmt: skip
_ALIAS = "vfs.repo_alias"


def _min_rate(ctx: click.Context, param: click.Parameter, value: str | None) -> int | None:
    if value is None:
        return None
    try:
        return parse_size(value)
    except UsageError as e:  # at parse time: click's one-line usage error, exit 2
        raise click.BadParameter(str(e)) from None


def _alias(ctx: click.Context, param: click.Parameter, value: str | None) -> None:
    if value is not None:
        ctx.meta[_ALIAS] = value
        click.echo(
            f"{ctx.find_root().info_name}: note: --remote is now called --repo "
            "(the old name goes away in the next release)",
            err=True,
        )


def repo_options(
    fn: Callable[..., Any] | None = None,
    *,
    required: bool = True,
    help: str = "Repository: file:///DIR, DIR, http://HOST/PATH or https://...",
    alias_remote: bool = False,
    timeout_flag: str = "--timeout",
) -> Any:
    """Decorator: the repository options; the command receives ``repo`` (a RepoConfig, or
    None when not ``required`` and not given). ``alias_remote``: also accept the old
    ``--remote`` (hidden) for ``--repo``. ``timeout_flag``: the name of the per-operation
    timeout option, for a command whose own ``--timeout`` means something else (vmctl)."""

    def decorate(f: Callable[..., Any]) -> Any:
        @functools.wraps(f)
        def wrapper(*args: Any, **kw: Any) -> Any:
            v = {k: kw.pop(k) for k in _REPO_PARAMS}
            ctx = click.get_current_context(silent=True)
            alias = ctx.meta.get(_ALIAS) if ctx is not None else None
            if alias is not None and v["repo_url"] is not None:
                raise click.UsageError("--remote is the old name of --repo: give one", ctx)
            url = v["repo_url"] or alias
            if url is None and required:
                raise click.UsageError("Missing option '--repo'.", ctx)
            tls = [f"--{k}" for k in ("ca", "cert", "key", "proxy") if v[k]]
            if url is None and tls:
                raise click.UsageError(f"{'/'.join(tls)} need --repo", ctx)
            kw["repo"] = (
                None
                if url is None
                else RepoConfig(
                    url,
                    ca=v["ca"],
                    cert=v["cert"],
                    key=v["key"],
                    proxy=v["proxy"],
                    timeout=v["repo_timeout"],
                    retries=v["retries"],
                    min_rate=DEFAULT_MIN_RATE if v["min_rate"] is None else v["min_rate"],
                    grace=DEFAULT_GRACE if v["grace"] is None else v["grace"],
                )
            )
            return f(*args, **kw)

        opts = [
            click.option("--repo", "repo_url", metavar="URL", help=help),
            click.option(
                "--ca",
                type=click.Path(dir_okay=False),
                help="CA bundle that signs the repository server's certificate (https).",
            ),
            click.option(
                "--cert", type=click.Path(dir_okay=False), help="Client certificate (mutual TLS)."
            ),
            click.option("--key", type=click.Path(dir_okay=False), help="Client key (mutual TLS)."),
            click.option(
                "--proxy",
                metavar="URL",
                help="HTTP forward proxy (e.g. a site cache) for http(s):// repositories.",
            ),
            click.option(
                timeout_flag,
                "repo_timeout",
                type=click.FloatRange(min=0, min_open=True),
                default=DEFAULT_TIMEOUT,
                show_default=True,
                help="Seconds any one connect, TLS handshake or read may take.",
            ),
            click.option(
                "--retries",
                type=click.IntRange(min=0),
                default=DEFAULT_RETRIES,
                show_default=True,
                help="Retries after a failed request (exponential backoff, within the deadline).",
            ),
            click.option(
                "--min-rate",
                metavar="BYTES",
                callback=_min_rate,
                help="Bytes/s an HTTP fetch must average once its grace is over, else it is cut "
                f"off (e.g. 64K; 0: no overall deadline) [default: {DEFAULT_MIN_RATE // 1024}K].",
            ),
            click.option(
                "--grace",
                type=click.FloatRange(min=0),
                help="Seconds an HTTP fetch may take before --min-rate applies "
                f"[default: {DEFAULT_GRACE:g}].",
            ),
        ]
        if alias_remote:
            opts.append(
                click.option(
                    "--remote", metavar="URL", hidden=True, expose_value=False, callback=_alias
                )
            )
        for opt in reversed(opts):
            wrapper = opt(wrapper)
        return wrapper

    return decorate(fn) if fn is not None else decorate


STORE_HELP = "Local object store [default: $VFS_STORE or $VFS_ROOT/store, VFS_ROOT=/var/lib/vfs]."


def store_option(help: str = STORE_HELP, *, param: str = "store_dir") -> Any:
    """``--store DIR`` (parameter ``param``: a Path, or None for the default)."""
    return click.option(
        "--store",
        param,
        metavar="DIR",
        type=click.Path(file_okay=False, path_type=Path),
        default=None,
        help=help,
    )


def default_state() -> Path:
    return Path(os.environ.get("VFS_STATE", str(vfs_root() / "state")))


state_option = click.option(
    "--state",
    "state_dir",
    metavar="DIR",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Daemon state directory [default: $VFS_STATE or $VFS_ROOT/state].",
)

__all__ = [
    "STORE_HELP",
    "RepoConfig",
    "default_state",
    "default_store",
    "repo_options",
    "state_option",
    "store_option",
]
