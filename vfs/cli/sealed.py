"""The CLI options of encrypted repositories, shared by every command that takes them.

Publishing (``vfsd template publish``, ``vimg push``): ``--encrypt-for PUB`` (repeatable),
``--identity KEY`` (the publisher's key: it signs the ref and is a recipient too),
``--keyring FILE`` or ``--no-dedup``. Fetching (``vfsd serve``, ``vimg pull``, ``template
show``...): ``--identity KEY`` (the client's key), ``--trust PUB`` (repeatable: only refs signed by
these publishers), ``--pins FILE`` (the newest signed refs seen, against replay). Both:
``--passphrase-file F`` for an identity protected by a passphrase (else asked on a terminal).

Options are kept in the click context (``expose_value=False``) and read back with
:func:`sealing` and :func:`keys`, so commands keep their signatures and the options can move
with the commands into one package later. ``--identity`` and not ``--key``: ``--key`` is the
mutual-TLS client key already, and age calls the same thing an identity.
"""

from __future__ import annotations

import os
import sys
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


#: Every option of encrypted repositories, defined once; :func:`sealing_options` and
#: :func:`unsealing_options` pick theirs (shown by --help in this order).
_OPTIONS: dict[str, tuple[str, dict[str, Any]]] = {
    "encrypt_for": (
        "--encrypt-for",
        dict(
            multiple=True,
            metavar="PUB",
            help="Encrypt for this public key (vfs-pub-1-... or a file; repeatable).",
        ),
    ),
    "identity": (
        "--identity",
        dict(
            type=click.Path(dir_okay=False),
            help="Your identity (a `vfsd key gen` file, mode 0600): opens refs sealed to it; "
            "with --encrypt-for it also signs the ref.",
        ),
    ),
    "passphrase_file": (
        "--passphrase-file",
        dict(
            type=click.Path(dir_okay=False),
            help="File holding the passphrase of a protected --identity (mode 0600) "
            "[default: asked on the terminal].",
        ),
    ),
    "keyring": (
        "--keyring",
        dict(
            type=click.Path(dir_okay=False),
            help="Keyring file (`vfsd key gen --keyring`): identical files are stored once "
            "within it [default: the keyring derived from --identity].",
        ),
    ),
    "no_dedup": (
        "--no-dedup",
        dict(
            is_flag=True,
            help="Random object keys: nothing, not even equal files, is linked (no dedup).",
        ),
    ),
    "trust": (
        "--trust",
        dict(
            multiple=True,
            metavar="PUB",
            help="Accept only refs signed by this publisher key (repeatable); unsigned refs "
            "are refused.",
        ),
    ),
    "keep_encrypted": (
        "--keep-encrypted",
        dict(
            is_flag=True,
            help="Keep encrypted objects encrypted in the local store; decrypt on read "
            "(docs/encryption.md §9.1).",
        ),
    ),
    "pins": (
        "--pins",
        dict(
            type=click.Path(dir_okay=False),
            help="File of the newest signed refs seen (replays refused) "
            "[default: $VFS_ROOT/pins.json; vfsd serve: STATE/pins.json].",
        ),
    ),
}


def _options(*names: str):
    def decorate(fn):
        for name in reversed(names):
            flag, kw = _OPTIONS[name]
            fn = click.option(flag, name, expose_value=False, callback=_store, **kw)(fn)
        return fn

    return decorate


#: --encrypt-for, --identity, --passphrase-file, --keyring, --no-dedup (publishing encrypted).
sealing_options = _options("encrypt_for", "identity", "passphrase_file", "keyring", "no_dedup")
#: --identity, --passphrase-file, --trust, --pins (opening encrypted refs).
unsealing_options = _options("identity", "passphrase_file", "trust", "pins")
#: --keep-encrypted (readers that keep what they fetch: vimg, vfsd export).
keep_encrypted_option = _options("keep_encrypted")


def keep_encrypted() -> bool:
    """Whether the running command was given --keep-encrypted."""
    return bool(_meta().get("keep_encrypted"))


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
    identity = load_identity(m["identity"], passphrase(m))
    if "no_dedup" in m:
        keyring = None
    elif "keyring" in m:
        keyring = load_keyring(m["keyring"])
    else:
        keyring = identity.default_keyring()
    return Sealing(identity, recipients, keyring)


def sealing_remote(remote: Any, name: str, seal: Sealing, kind: str = "template") -> Any:
    """``remote`` wrapped for an encrypted publish of ref ``name``
    (:class:`vfs.redirect.sealed_remote.SealingRemote`): the previous version, opened with the
    publisher's identity, lends the keys of its unchanged objects and its counter."""
    from vfs.redirect.sealed_refs import Keys
    from vfs.redirect.sealed_remote import SealingRemote, previous_ref

    previous, counter = previous_ref(remote, name, Keys(identity=seal.identity))
    return SealingRemote(
        remote,
        signer=seal.identity,
        recipients=seal.recipients,
        keyring=seal.keyring,
        kind=kind,
        previous=previous,
        previous_counter=counter,
    )


def passphrase(m: dict[str, Any] | None = None):
    """How the running command gets the passphrase of a protected identity (called only for
    one): ``--passphrase-file``, else a prompt when stdin is a terminal, else None (the
    loader then says to give --passphrase-file)."""
    from vfs.redirect.keys import read_passphrase_file

    m = _meta() if m is None else m
    path = m.get("passphrase_file")

    def get() -> bytes | None:
        if path is not None:
            return read_passphrase_file(path)
        if sys.stdin.isatty():
            prompt = f"passphrase of {m.get('identity')}"
            return click.prompt(prompt, hide_input=True, err=True).encode()
        return None

    return get


def default_pins() -> Path:
    return Path(os.environ.get("VFS_PINS", str(vfs_root() / "pins.json")))


def keys(pins: str | os.PathLike[str] | None = None):
    """The client keys of the running command (:class:`vfs.redirect.sealed_refs.Keys`):
    identity, trusted publishers, pins (``--pins``, else ``pins``, else the default)."""
    from vfs.redirect.sealed_refs import Keys

    m = _meta()
    return Keys.from_files(
        m.get("identity"),
        m.get("trust", ()),
        m.get("pins") or pins or default_pins(),
        passphrase=passphrase(m),
    )


def key_files(pins: str | os.PathLike[str] | None = None) -> dict[str, Any]:
    """The client key options of the running command as absolute file names (for a process
    started elsewhere, as the exports of ``vfsd serve``): ``identity`` (or None), ``trust``
    (keys as given, files made absolute), ``pins``."""

    def absolute(p: str) -> str:
        return os.path.abspath(p) if os.path.exists(p) else p

    m = _meta()
    return {
        "identity": os.path.abspath(m["identity"]) if "identity" in m else None,
        "trust": [absolute(p) for p in m.get("trust", ())],
        "pins": os.path.abspath(m.get("pins") or pins or default_pins()),
        "passphrase_file": (
            os.path.abspath(m["passphrase_file"]) if "passphrase_file" in m else None
        ),
        "keep_encrypted": bool(m.get("keep_encrypted")),
    }
