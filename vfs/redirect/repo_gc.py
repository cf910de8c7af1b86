"""Garbage collection of a directory repository: mark from every ref, sweep the rest.

**Mark.** The roots are every ref (``refs/*``) and the object ids the caller adds (digests on the
command line, the clusters of local images). From each root the marker follows references: the
caller's ``references(oid, path)`` says which objects one object names (a template manifest its
content objects, a vimg image its remote clusters; anything else names none). This module knows
no formats: the caller does. A root or a reachable object that cannot be read or decoded stops
the whole collection before anything is deleted — a marker that misreads one manifest would
otherwise sweep a whole template (composefs's first gc marked every object dead).

**Sweep, safe against a concurrent writer: a grace period on object age, with freshening.**
An object that no root reaches is removed only if its mtime is older than ``grace`` seconds
before the mark started. Why this and not a two-phase mark: a publish writes objects first,
its manifest next, its ref last, so for the whole of a publish its objects are reachable from no
ref; a two-phase mark needs every writer to take part in a protocol (register in-flight objects,
wait for a gc to finish), which a writer on another host, over NFS, or an old vfs would not do.
The grace period needs only what every writer already does, plus one rule: a writer that finds
an object present and reuses it *freshens* it (sets its mtime to now,
:meth:`vfs.redirect.file_remote.FileRemote.freshen`; ``put`` of present bytes and ``set_ref`` do
it). So every object a publish depends on — written or reused — is younger than the grace
until well after its ref exists (git's ``prune --expire`` with freshened loose objects is the
same design). The rule's limit: ``grace`` must be longer than the longest publish (default: one
day).

The check and the unlink are not one step: a writer could freshen an object between the
collector's ``stat`` and its ``unlink``. So the sweep *renames* the object aside
(``objects/ab/.gc.<pid>.<id>``), looks at its mtime again, and deletes it only if it is still
old; otherwise it renames it back (a writer that tried to freshen it in between found it gone
and uploaded it again: the same bytes, so the rename back may replace that copy). A collector
killed between the two renames leaves a ``.gc.`` file; the next collection restores it if it
is young and removes it otherwise. ``.tmp.`` files of dead writers older than the grace go too.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path

from vfs.durable import TMP_PREFIX, fsync_dir, pid_alive, tmp_owner_pid
from vfs.errors import IntegrityError, NotFound, UsageError, VfsError
from vfs.redirect.file_remote import FileRemote
from vfs.redirect.objectid import check_object_id

log = logging.getLogger(__name__)

#: The default grace period: longer than any publish this project has seen, short enough that
#: space comes back the next day.
DEFAULT_GRACE = 24 * 3600.0
TRASH_PREFIX = ".gc."

References = Callable[[str, Path], Iterable[str]]


@dataclass
class GcReport:
    """What a collection found and did (``--json``: these field names)."""

    dry_run: bool
    grace_seconds: float
    refs: int = 0
    roots: int = 0
    marked_objects: int = 0
    marked_bytes: int = 0
    swept_objects: int = 0
    swept_bytes: int = 0
    young_objects: int = 0  #: unreachable but inside the grace period: kept
    young_bytes: int = 0
    restored_objects: int = 0  #: freshened while being swept: put back
    temp_files_removed: int = 0
    missing: list[str] = field(default_factory=list)  #: reachable ids with no object file

    def to_json(self) -> dict[str, object]:
        return asdict(self)


def _object_files(remote: FileRemote) -> Iterable[tuple[str, Path, os.stat_result]]:
    objects = remote.root / "objects"
    for sub in sorted(os.scandir(objects), key=lambda e: e.name):
        if not sub.is_dir(follow_symlinks=False) or len(sub.name) != 2:
            continue
        for entry in sorted(os.scandir(sub.path), key=lambda e: e.name):
            if len(entry.name) == 64 and entry.name.startswith(sub.name):
                try:
                    st = entry.stat(follow_symlinks=False)
                    yield check_object_id(entry.name), Path(entry.path), st
                except (FileNotFoundError, UsageError):
                    continue


def mark(
    remote: FileRemote,
    references: References,
    extra_roots: Iterable[str] = (),
    report: GcReport | None = None,
) -> set[str]:
    """Every object reachable from the refs and ``extra_roots`` (the object ids themselves).

    Raises (and so deletes nothing) when a root names an object that is not there, or when an
    object that is there cannot be read or decoded by ``references``."""
    rep = report if report is not None else GcReport(dry_run=True, grace_seconds=0)
    refs = remote.list_refs()
    rep.refs = len(refs)
    roots: dict[str, str] = {}
    for name, oid in refs.items():
        roots.setdefault(oid, f"ref {name!r}")
    for oid in extra_roots:
        roots.setdefault(check_object_id(oid), f"object {oid}")
    rep.roots = len(roots)
    for oid, what in roots.items():
        if not remote.has(oid):
            raise NotFound(
                f"{what} names object {oid}, which is not in {remote.url}: repair the "
                "repository (or drop the ref) first; nothing was deleted"
            )
    marked: set[str] = set()
    stack = list(roots)
    while stack:
        oid = stack.pop()
        if oid in marked:
            continue
        path = remote.object_path(oid)
        try:
            size = path.stat().st_size
        except FileNotFoundError:
            rep.missing.append(oid)  # a damaged template or image: reported, not fatal
            continue
        marked.add(oid)
        rep.marked_objects += 1
        rep.marked_bytes += size
        try:
            children = list(references(oid, path))
        except VfsError as e:
            raise type(e)(
                f"cannot read object {oid} to follow its references ({e}); nothing was "
                "deleted (repair the object or drop what refers to it)",
                **e.context,
            ) from None
        stack.extend(c for c in children if c not in marked)
    rep.missing.sort()
    return marked


def collect(
    remote: FileRemote,
    references: References,
    *,
    extra_roots: Iterable[str] = (),
    grace: float = DEFAULT_GRACE,
    dry_run: bool = False,
    now: float | None = None,
) -> GcReport:
    """Mark, then sweep every unreachable object older than ``grace`` seconds (module
    docstring). ``dry_run``: count what would go, touch nothing."""
    if not isinstance(remote, FileRemote):
        raise UsageError(
            f"{remote.url}: garbage collection works on the repository directory (file://), "
            "not through a web server"
        )
    if grace < 0:
        raise UsageError("--grace must not be negative")
    rep = GcReport(dry_run=dry_run, grace_seconds=grace)
    start = time.time() if now is None else now
    cutoff = start - grace
    if not dry_run:
        _recover_trash(remote, cutoff, rep)
    marked = mark(remote, references, extra_roots, rep)
    for oid, path, st in _object_files(remote):
        if oid in marked:
            continue
        if st.st_mtime >= cutoff:
            rep.young_objects += 1
            rep.young_bytes += st.st_size
            continue
        if dry_run:
            rep.swept_objects += 1
            rep.swept_bytes += st.st_size
            continue
        _sweep_one(oid, path, cutoff, rep)
    _remove_temp_files(remote, cutoff, rep, dry_run)
    log.info("repo gc %s: %s", remote.url, rep.to_json())
    if rep.missing and not dry_run:
        log.info("repo gc: %d reachable objects are missing", len(rep.missing))
    return rep


def _sweep_one(oid: str, path: Path, cutoff: float, rep: GcReport) -> None:
    trash = path.with_name(f"{TRASH_PREFIX}{os.getpid()}.{oid}")
    try:
        os.rename(path, trash)
    except FileNotFoundError:
        return  # removed meanwhile
    st = os.stat(trash)
    if st.st_mtime >= cutoff:
        # freshened between our look and the rename: a writer relies on it
        os.replace(trash, path)
        rep.restored_objects += 1
        log.info("repo gc: %s was reused while being swept: kept", oid)
        return
    os.unlink(trash)
    rep.swept_objects += 1
    rep.swept_bytes += st.st_size


def _recover_trash(remote: FileRemote, cutoff: float, rep: GcReport) -> None:
    """``.gc.`` files a killed collector left between its two renames."""
    objects = remote.root / "objects"
    for sub in os.scandir(objects):
        if not sub.is_dir(follow_symlinks=False):
            continue
        for entry in os.scandir(sub.path):
            if not entry.name.startswith(TRASH_PREFIX):
                continue
            pid_s, _, oid = entry.name[len(TRASH_PREFIX) :].partition(".")
            with contextlib.suppress(ValueError):
                if int(pid_s) != os.getpid() and pid_alive(int(pid_s)):
                    continue  # another collector is at work on it
            try:
                st = os.stat(entry.path)
                check_object_id(oid)
            except (FileNotFoundError, UsageError):
                continue
            dest = Path(sub.path) / oid
            if st.st_mtime >= cutoff and not dest.exists():
                os.rename(entry.path, dest)
                rep.restored_objects += 1
            else:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(entry.path)
            fsync_dir(sub.path)


def _remove_temp_files(remote: FileRemote, cutoff: float, rep: GcReport, dry_run: bool) -> None:
    """Temporary files of writers that died (objects/ and objects/ab/), past the grace."""
    objects = remote.root / "objects"
    dirs = [objects] + [
        Path(e.path) for e in os.scandir(objects) if e.is_dir(follow_symlinks=False)
    ]
    for d in dirs:
        for entry in os.scandir(d):
            if not entry.name.startswith(TMP_PREFIX):
                continue
            pid = tmp_owner_pid(entry.name)
            try:
                st = entry.stat(follow_symlinks=False)
            except FileNotFoundError:
                continue
            if (pid is not None and pid_alive(pid)) or st.st_mtime >= cutoff:
                continue
            rep.temp_files_removed += 1
            if not dry_run:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(entry.path)


def missing_error(rep: GcReport, url: str) -> IntegrityError | None:
    """The error a caller raises after reporting, when reachable objects were missing."""
    if not rep.missing:
        return None
    return IntegrityError(
        f"{url}: {len(rep.missing)} object(s) that refs reach are missing (first "
        f"{rep.missing[0]}): the repository is damaged (vfsd template check)"
    )
