"""The CLI options of encrypted repositories, shared by every command that takes them.

Publishing (``vfsd template publish``, ``vimg push``): ``--encrypt-for PUB`` (repeatable),
``--identity KEY`` (the publisher's key: it signs the ref and is a recipient too),
``--keyring FILE`` or ``--no-dedup``. Fetching (``vfsd serve``, ``vimg pull``, ``template
show``...): ``--identity KEY`` (the client's key), ``--trust PUB`` (repeatable: only refs signed by
these publishers), ``--pins FILE`` (the newest signed refs seen, against replay).

Options are kept in the click context (``expose_value=False``) and read back with
:func:`sealing` and :func:`keys`, so commands keep their signatures and the options can move
with the commands into one package later. ``--identity`` and not ``--key``: ``--key`` is the
mutual-TLS client key already, and age calls the same thing an identity.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import click

from vfs.errors import UsageError
from vfs.paths import vfs_root

_META = "vfs.sealed"


def _store(ctx: click.Context, param: click.Parameter, value: Any) -> None:
    if value not in (None, (), False):
        ctx.meta.setdefault(_META, {})[param.name] = value


def _opt(*names: str, **kw: Any):
    return click.option(*names, expose_value=False, callback=_store, **kw)


_identity_help = "Your identity (a `vfsd key gen` file, mode 0600)."


def sealing_options(fn):
    """--encrypt-for, --identity, --keyring, --no-dedup (publishing encrypted)."""
    fn = _opt(
        "--no-dedup",
        "no_dedup",
        is_flag=True,
        help="Random object keys: nothing, not even equal files, is linked (no dedup).",
    )(fn)
    fn = _opt(
        "--keyring",
        "keyring",
        type=click.Path(dir_okay=False),
        help="Keyring file (`vfsd key gen --keyring`): identical files are stored once within "
        "it [default: the keyring derived from --identity].",
    )(fn)
    fn = _opt(
        "--identity",
        "identity",
        type=click.Path(dir_okay=False),
        help=_identity_help + " With --encrypt-for: signs the ref, and can open it.",
    )(fn)
    fn = _opt(
        "--encrypt-for",
        "encrypt_for",
        multiple=True,
        metavar="PUB",
        help="Encrypt for this public key (vfs-pub-1-... or a file; repeatable).",
    )(fn)
    return fn


def unsealing_options(fn):
    """--identity, --trust, --pins (opening encrypted refs)."""
    fn = _opt(
        "--pins",
        "pins",
        type=click.Path(dir_okay=False),
        help="File of the newest signed refs seen (replays refused) "
        "[default: $VFS_ROOT/pins.json; vfsd serve: STATE/pins.json].",
    )(fn)
    fn = _opt(
        "--trust",
        "trust",
        multiple=True,
        metavar="PUB",
        help="Accept only refs signed by this publisher key (repeatable); unsigned refs are "
        "refused.",
    )(fn)
    fn = _opt("--identity", "identity", type=click.Path(dir_okay=False), help=_identity_help)(fn)
    return fn


def _meta() -> dict[str, Any]:
    ctx = click.get_current_context(silent=True)
    return dict(ctx.meta.get(_META, {})) if ctx is not None else {}


@dataclass
class Sealing:
    """What an encrypted publish needs, loaded and checked."""

    identity: Any
    recipients: list[Any]
    keyring: Any  # None: --no-dedup


def sealing() -> Sealing | None:
    """The encrypted-publish options of the running command; None if it publishes plain."""
    from vfs.redirect.keys import load_identity, load_keyring, load_public

    m = _meta()
    recipients = [load_public(p) for p in m.get("encrypt_for", ())]
    if not recipients:
        for opt in ("keyring", "no_dedup"):
            if opt in m:
                raise UsageError(f"--{opt.replace('_', '-')} applies only with --encrypt-for")
        return None
    if "identity" not in m:
        raise UsageError("--encrypt-for needs --identity (the publisher's key signs the ref)")
    if "keyring" in m and "no_dedup" in m:
        raise UsageError("--keyring and --no-dedup exclude each other")
    identity = load_identity(m["identity"])
    if "no_dedup" in m:
        keyring = None
    elif "keyring" in m:
        keyring = load_keyring(m["keyring"])
    else:
        keyring = identity.default_keyring()
    return Sealing(identity, recipients, keyring)


def default_pins() -> Path:
    return Path(os.environ.get("VFS_PINS", str(vfs_root() / "pins.json")))


def keys(pins: str | os.PathLike[str] | None = None):
    """The client keys of the running command (:class:`vfs.redirect.sealed_refs.Keys`):
    identity, trusted publishers, pins (``--pins``, else ``pins``, else the default)."""
    from vfs.redirect.keys import load_identity, load_public
    from vfs.redirect.sealed_refs import Keys, PinStore

    m = _meta()
    identity = load_identity(m["identity"]) if "identity" in m else None
    trusted = tuple(load_public(p) for p in m.get("trust", ()))
    path = m.get("pins") or pins or default_pins()
    return Keys(identity=identity, trusted=trusted, pins=PinStore(path))
