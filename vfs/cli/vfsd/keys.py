"""`vfsd key gen|show|reseal`: identities, keyrings and the recipients of encrypted refs.

Thin: formats are in :mod:`vfs.redirect.keys`, rewrapping in
:func:`vfs.redirect.sealed_remote.reseal`; docs/encryption.md says what each key protects.
"""

from __future__ import annotations

from pathlib import Path

import click

from vfs.cli.edge import emit_json, handle_errors, json_option
from vfs.cli.options import repo_options
from vfs.cli.sealed import keys as sealed_keys
from vfs.cli.sealed import unsealing_options
from vfs.errors import UsageError
from vfs.redirect.keys import SCRYPT_LOG_N, SCRYPT_LOG_N_RANGE


def register(main: click.Group) -> None:
    main.add_command(key)


@click.group()
def key() -> None:
    """Key pairs (X25519 + Ed25519) and keyrings for encrypted repositories."""


@key.command("gen")
@click.option(
    "-o",
    "--output",
    required=True,
    type=click.Path(dir_okay=False, path_type=Path),
    help="The secret key file to create (mode 0600; never overwritten).",
)
@click.option("--keyring", "is_keyring", is_flag=True, help="Make a keyring, not an identity.")
@click.option(
    "--passphrase-file",
    type=click.Path(dir_okay=False),
    help="Protect the identity with the passphrase in this file (mode 0600; scrypt).",
)
@click.option(
    "--passphrase", "ask", is_flag=True, help="Protect the identity with a passphrase asked for."
)
@click.option(
    "--work-factor",
    type=click.IntRange(*SCRYPT_LOG_N_RANGE),
    default=SCRYPT_LOG_N,
    show_default=True,
    hidden=True,
    help="scrypt log2 N (tests use less).",
)
@json_option
@handle_errors
def key_gen(output, is_keyring, passphrase_file, ask, work_factor, as_json):
    """Make a new identity (or keyring) in OUTPUT; print its public key (or keyring id).

    With --passphrase-file F (or --passphrase, asked twice on the terminal) the identity's
    secret is sealed under a key derived from the passphrase with scrypt (docs/encryption.md
    §3.1); every command that loads it then takes --passphrase-file or asks."""
    from vfs.redirect.keys import Identity, Keyring, read_passphrase_file, write_secret

    pw = None
    if passphrase_file and ask:
        raise UsageError("--passphrase-file and --passphrase exclude each other")
    if (passphrase_file or ask) and is_keyring:
        raise UsageError("a keyring file cannot have a passphrase (yet); keep it 0600")
    if passphrase_file:
        pw = read_passphrase_file(passphrase_file)
    elif ask:
        pw = click.prompt(
            "passphrase", hide_input=True, confirmation_prompt=True, err=True
        ).encode()
    if is_keyring:
        ring = Keyring.generate()
        write_secret(output, ring.to_text())
        out = {"file": str(output), "keyring": ring.id.hex()}
        if as_json:
            emit_json(out)
        else:
            click.echo(f"keyring {ring.id.hex()[:16]} in {output}")
        return
    ident = Identity.generate()
    write_secret(output, ident.to_text(pw, work_factor))
    out = {
        "file": str(output),
        "public": str(ident.public),
        "fingerprint": ident.public.fingerprint,
    }
    if as_json:
        emit_json(out)
    else:
        click.echo(str(ident.public))
        click.echo(f"identity {ident.public.fingerprint} in {output}", err=True)


@key.command("show")
@click.argument("spec")
@click.option(
    "--passphrase-file",
    "passphrase_file",
    type=click.Path(dir_okay=False),
    help="Passphrase of a protected identity SPEC [default: asked on the terminal].",
)
@json_option
@handle_errors
def key_show(spec, passphrase_file, as_json):
    """Print the public key of SPEC (an identity file, a public key file or a public key)."""
    from vfs.cli.sealed import passphrase
    from vfs.redirect.keys import PUBLIC_PREFIX, load_identity, load_public, protected_file

    if not spec.startswith(PUBLIC_PREFIX) and protected_file(spec):
        opts = {"identity": spec} | (
            {"passphrase_file": passphrase_file} if passphrase_file else {}
        )
        pub = load_identity(spec, passphrase(opts)).public
    else:
        pub = load_public(spec)
    if as_json:
        emit_json({"public": str(pub), "fingerprint": pub.fingerprint})
    else:
        click.echo(str(pub))


@key.command("reseal")
@repo_options
@unsealing_options
@click.option("--add", "add", multiple=True, metavar="PUB", help="New recipient (repeatable).")
@click.option("--remove", "remove", multiple=True, metavar="PUB", help="Recipient to drop.")
@json_option
@click.argument("ref")
@handle_errors
def key_reseal(repo, add, remove, as_json, ref):
    """Rewrap encrypted ref REF for new recipients without re-encrypting its content.

    --identity must open REF (be one of its recipients); it signs the new version of the ref.
    A removed recipient opens neither the resealed ref nor a version published after it.
    """
    from vfs.redirect import FileRemote
    from vfs.redirect.keys import load_public
    from vfs.redirect.sealed_remote import reseal

    if not add and not remove:
        raise UsageError("nothing to do: give --add PUB and/or --remove PUB")
    adds = [load_public(p) for p in add]
    removes = [load_public(p) for p in remove]
    with repo.open() as r:
        if not isinstance(r, FileRemote):
            raise UsageError(f"{repo.url}: read-only repository: reseal in the directory")
        old, ref_id, recipients = reseal(r, ref, sealed_keys(), add=adds, remove=removes)
    out = {
        "ref": ref,
        "signed_ref": ref_id,
        "previous": old.ref_id,
        "recipients": [{"public": str(p), "fingerprint": p.fingerprint} for p in recipients],
    }
    if as_json:
        emit_json(out)
        return
    click.echo(f"{ref}: resealed as {ref_id} for {len(recipients)} recipients")
    for p in recipients:
        click.echo(f"  {p.fingerprint}  {p}")
