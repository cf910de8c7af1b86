"""`vfsd template ...`: publish, ls, show, diff, check, tag and export templates.

Thin: the work is in :mod:`vfs.tree` (publish, manifest, diff, check, tar export); this module
parses options, opens the repository and prints. Reading commands fetch the manifest straight
from the repository, verified against its digest, unless ``--store`` asks to go through (and
fill) a local store.
"""

from __future__ import annotations

import contextlib
import os
import stat
import sys
import time
from pathlib import Path

import click

from vfs.cli.edge import emit_json, handle_errors, json_option
from vfs.cli.options import repo_options, store_option
from vfs.cli.sealed import keys as sealed_keys
from vfs.cli.sealed import sealing, sealing_options, sealing_remote, unsealing_options
from vfs.cli.vfsd.redirect import open_store
from vfs.errors import Differs, IntegrityError, NotFound, UsageError
from vfs.redirect import HttpRemote, Resolver, check_ref_name
from vfs.tree.entry import Entry
from vfs.tree.gcroots import content_objects
from vfs.tree.manifest_check import check_template
from vfs.tree.manifest_diff import diff_templates
from vfs.tree.template import Template, publish_template, resolve_ref

_store_opt = store_option(
    "Local object store: publish also puts the objects there; show/diff read through it."
)


def register(main: click.Group) -> None:
    """Attach this module's commands to the `vfsd` group."""
    main.add_command(template)


@click.group()
def template() -> None:
    """Templates: immutable trees published to a repository, named by digest or by name."""


@contextlib.contextmanager
def _loader(repo, store_dir):
    """Yield (remote, getter): getter.get(oid) reads via the store when one is given. Both see
    through encrypted refs opened with --identity (the remote is an UnsealingRemote)."""
    from vfs.redirect.sealed_remote import UnsealingRemote

    with repo.open() as plain:
        r = UnsealingRemote(plain, sealed_keys())
        if store_dir is None:
            yield r, r
        else:
            with open_store(store_dir) as s:
                yield r, Resolver(s, r)


def _progress():
    if not sys.stderr.isatty():
        return None
    last = [0.0]

    def report(files: int, nbytes: int) -> None:
        now = time.monotonic()
        if now - last[0] >= 0.5:
            last[0] = now
            click.echo(f"\r{files} files, {nbytes / 1e6:.1f} MB hashed", err=True, nl=False)

    return report


@template.command("publish")
@repo_options
@sealing_options
@_store_opt
@click.option("--name", help="Point this name (a ref) at the new template, last.")
@click.option(
    "--exclude",
    multiple=True,
    metavar="PATTERN",
    help="Leave out matching paths (repeatable): 'NAME*' anywhere, '/a/b' from the root, "
    "'dir/' directories only.",
)
@json_option
@click.argument("src", type=click.Path(path_type=Path))
@handle_errors
def publish(repo, store_dir, name, exclude, as_json, src):
    """Publish SRC (a directory, a tar archive, or - for a tar on stdin); print the digest.

    Uploads only the objects the repository lacks: content objects first, then the manifest,
    then the name, so an interrupted publish leaves the old name and no partial template.

    With --encrypt-for, every object and the manifest are encrypted, and the name is a signed
    ref (signed with --identity) whose data key is sealed to each PUB and to --identity
    (docs/encryption.md).
    """
    progress = _progress()
    seal = sealing()
    if seal is not None and name is None:
        raise UsageError("--encrypt-for needs --name: an encrypted template is a signed ref")
    with repo.open() as r:
        if isinstance(r, HttpRemote):  # refuse before hashing the whole tree, not after
            raise UsageError(
                f"{repo.url}: HTTP repositories are read-only: publish to the repository "
                "directory, then copy it to the web root (objects first, refs last)"
            )
        if name is not None:
            check_ref_name(name)  # refuse a bad name before the work, not after it
        with contextlib.ExitStack() as stack:
            store = stack.enter_context(open_store(store_dir)) if store_dir else None
            t0 = time.perf_counter()
            source = sys.stdin.buffer if str(src) == "-" else src
            target = r if seal is None else sealing_remote(r, name, seal)
            res = publish_template(
                source, target, name=name, store=store, progress=progress, exclude=exclude
            )
            dt = time.perf_counter() - t0
    if progress is not None:
        click.echo("", err=True)
    if as_json:
        emit_json({**res.to_json(), "seconds": round(dt, 3)})
        return
    click.echo(res.digest)
    click.echo(
        f"{res.entries} entries ({res.paths} paths), {res.objects} objects: "
        f"{res.objects_uploaded} uploaded ({res.bytes_uploaded} bytes), "
        f"{res.objects_skipped} already present; manifest {res.manifest_bytes} bytes; "
        f"{dt:.2f} s" + (f"; name {name!r} -> {res.digest[:16]}…" if name else ""),
        err=True,
    )


@template.command("ls")
@repo_options
@unsealing_options
@_store_opt
@click.option("-l", "--long", "long_", is_flag=True, help="Also load each template: sizes.")
@json_option
@handle_errors
def ls(repo, store_dir, long_, as_json):
    """List the template names of a repository and their digests."""
    with _loader(repo, store_dir) as (r, getter):
        refs = r.list_refs()
        if not long_:
            if as_json:
                emit_json(refs)
            else:
                for ref_name, digest in sorted(refs.items()):
                    click.echo(f"{digest}  {ref_name}")
            return
        rows = []
        for ref_name in sorted(refs):
            digest = resolve_ref(ref_name, r)
            t = Template.load(getter, digest)
            content = {e.oid: e.size for _, e in t.walk() if e.oid is not None}
            rows.append(
                {
                    "name": ref_name,
                    "digest": digest,
                    "entries": len(t),
                    "objects": len(content),
                    "content_bytes": sum(content.values()),
                    "manifest_bytes": t.manifest_size,
                }
            )
    if as_json:
        emit_json(rows)
        return
    for row in rows:
        click.echo(
            f"{row['digest']}  {row['entries']:>8} entries {row['content_bytes']:>14} bytes  "
            f"{row['name']}"
        )


def _text(b: bytes | None) -> str | None:
    return None if b is None else b.decode("utf-8", "backslashreplace")


def entry_json(path: bytes, e: Entry) -> dict[str, object]:
    d: dict[str, object] = {
        "path": _text(path),
        "ino": e.ino,
        "kind": e.kind,
        "mode": f"{e.mode:o}",
        "uid": e.uid,
        "gid": e.gid,
        "size": e.size,
        "nlink": e.nlink,
        "atime_ns": e.atime_ns,
        "mtime_ns": e.mtime_ns,
        "ctime_ns": e.ctime_ns,
    }
    if e.kind in ("chr", "blk"):
        d["rdev"] = [os.major(e.rdev), os.minor(e.rdev)]
    if e.target is not None:
        d["target"] = _text(e.target)
    if e.oid is not None:
        d["oid"] = e.oid
    if e.xattrs:
        d["xattrs"] = {_text(k): v.hex() for k, v in sorted(e.xattrs.items())}
    return d


def _ls_line(path: bytes, e: Entry) -> str:
    size = f"{os.major(e.rdev)}, {os.minor(e.rdev)}" if e.kind in ("chr", "blk") else str(e.size)
    when = time.strftime("%Y-%m-%d %H:%M", time.gmtime(e.mtime_ns // 1_000_000_000))
    name = _text(path) or "."
    if e.target is not None:
        name += f" -> {_text(e.target)}"
    return f"{stat.filemode(e.mode)} {e.nlink:>3} {e.uid:>5} {e.gid:>5} {size:>12} {when} {name}"


@template.command("show")
@repo_options
@unsealing_options
@_store_opt
@click.option("-x", "--xattrs", "show_xattrs", is_flag=True, help="Also list xattrs.")
@json_option
@click.argument("ref")
@click.argument("path", required=False, default="")
@handle_errors
def show(repo, store_dir, show_xattrs, as_json, ref, path):
    """List the entries of template REF (a name or a digest) like ls -lR, or those under PATH."""
    with _loader(repo, store_dir) as (r, getter):
        digest = resolve_ref(ref, r)
        t = Template.load(getter, digest)
    want = path.strip("/").encode("utf-8", "surrogateescape")
    if want and t.resolve(want) is None:
        raise NotFound(f"{path}: no such path in template {digest[:16]}…")
    prefix = want + b"/"
    rows = [(p, e) for p, e in t.walk() if not want or p == want or p.startswith(prefix)]
    if as_json:
        emit_json({"digest": digest, "entries": [entry_json(p, e) for p, e in rows]})
        return
    for p, e in rows:
        click.echo(_ls_line(p, e))
        if show_xattrs:
            for k, v in sorted(e.xattrs.items()):
                shown = _text(v) if v.isascii() and v.decode().isprintable() else "0x" + v.hex()
                click.echo(f"    {_text(k)}={shown}")


@template.command("diff")
@repo_options
@unsealing_options
@_store_opt
@json_option
@click.option("--exit-code", is_flag=True, help="Exit 1 when the templates differ (like diff).")
@click.argument("a")
@click.argument("b")
@handle_errors
def diff(repo, store_dir, as_json, exit_code, a, b):
    """Compare templates A and B (names or digests): paths added, removed, modified."""
    with _loader(repo, store_dir) as (r, getter):
        ta = Template.load(getter, resolve_ref(a, r))
        tb = Template.load(getter, resolve_ref(b, r))
    changes = diff_templates(ta, tb)
    if as_json:
        emit_json({"a": ta.digest, "b": tb.digest, "changes": [c.to_json() for c in changes]})
    else:
        marks = {"added": "+", "removed": "-", "modified": "M"}
        for c in changes:
            extra = f"  ({', '.join(c.fields)})" if c.fields else ""
            click.echo(f"{marks[c.status]} {_text(c.path) or '.'}{extra}")
    if exit_code and changes:
        raise Differs()  # as diff --exit-code: 1 when they differ


@template.command("check")
@repo_options
@click.option("--verify", is_flag=True, help="Read and hash every object, not only find it.")
@json_option
@click.argument("ref")
@handle_errors
def check(repo, verify, as_json, ref):
    """Check that template REF is complete in the repository: its manifest loads and verifies,
    and every content object it names is present (--verify: and hashes right)."""
    with repo.open() as r:
        t = Template.load(r, resolve_ref(ref, r))
        rep = check_template(t, r, verify=verify)
    if as_json:
        emit_json(rep.to_json())
    else:
        for label, oids in (("missing", rep.missing), ("corrupt", rep.corrupt)):
            for oid in oids:
                click.echo(f"{label} {oid}  {_text(rep.paths[oid])}")
        how = "verified" if verify else "present"
        click.echo(
            f"{rep.digest}: {rep.entries} entries, {rep.objects} objects ({rep.bytes} bytes) "
            f"{how}: {len(rep.missing)} missing, {len(rep.corrupt)} corrupt"
        )
    if not rep.ok:
        raise IntegrityError(
            f"template {rep.digest[:16]}… is incomplete: {len(rep.missing)} objects missing, "
            f"{len(rep.corrupt)} corrupt"
        )


@template.command("tag")
@repo_options
@json_option
@click.argument("name")
@click.argument("ref")
@handle_errors
def tag(repo, as_json, name, ref):
    """Point NAME at template REF (a digest or another name), e.g. to roll a name back.

    REF must load as a valid template first: a name never points at something that is not one.
    """
    check_ref_name(name)
    with repo.open() as r:
        t = Template.load(r, resolve_ref(ref, r))
        freshen = getattr(r, "freshen", None)
        if freshen is not None:
            # A directory repository: every object of the template is marked as in use again
            # (and must be there) before the name points at it, so a repo gc running now
            # cannot take an old template's objects from under the new name.
            for oid in sorted(content_objects(t)):
                if not freshen(oid):
                    raise IntegrityError(
                        f"template {t.digest[:16]}… is incomplete: object {oid} is missing "
                        "(vfsd template check); the name was not changed"
                    )
        r.set_ref(name, t.digest)
    if as_json:
        emit_json({"name": name, "digest": t.digest})
        return
    click.echo(f"{t.digest}  {name}")


@template.command("rm")
@repo_options
@json_option
@click.argument("names", nargs=-1, required=True)
@handle_errors
def rm(repo, as_json, names):
    """Retire template names: each NAME stops resolving; its template stays in the repository.

    VEEs on it keep running (they know it by digest) and `template show DIGEST` still works.
    Its objects are removed by the next `vfsd repo gc` once no other name and no DIGEST given
    to the gc reaches them: give the gc the digests VEEs still use (`vfsd vee list`). Every
    NAME is checked before any is removed: a name that is no ref removes nothing.
    """
    for name in names:
        check_ref_name(name)
    retired = []
    with repo.open() as r:
        refs = r.list_refs()
        unknown = [n for n in names if n not in refs]
        if unknown:
            raise NotFound(f"no template named {', '.join(map(repr, unknown))} in {r.url}")
        for name in dict.fromkeys(names):
            retired.append({"name": name, "digest": r.delete_ref(name)})
    if as_json:
        emit_json(retired)
        return
    for x in retired:
        click.echo(f"retired {x['name']} (was {x['digest']})")


@template.command("export")
@repo_options
@unsealing_options
@_store_opt
@click.option(
    "-o", "--output", type=click.Path(dir_okay=False), help="Write the tar here [default: stdout]."
)
@click.argument("ref")
@handle_errors
def export(repo, store_dir, output, ref):
    """Write template REF as a pax tar (owners, modes, ns times, xattrs, hard links, devices):
    extract it with `tar -xpf - --xattrs --xattrs-include='*' --numeric-owner`."""
    from vfs.tree.tarexport import export_tar

    with _loader(repo, store_dir) as (r, getter):
        t = Template.load(getter, resolve_ref(ref, r))
        source = getter if store_dir is not None else r
        if output is None:
            if sys.stdout.isatty():
                raise UsageError("refusing to write a tar to a terminal: use -o FILE or a pipe")
            res = export_tar(t, source, sys.stdout.buffer)
            sys.stdout.buffer.flush()
        else:
            with open(output, "wb") as f:
                res = export_tar(t, source, f)
    skipped = f", {res.skipped_sockets} sockets left out" if res.skipped_sockets else ""
    click.echo(f"{t.digest}: {res.members} members, {res.bytes} bytes{skipped}", err=True)
