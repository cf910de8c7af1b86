"""Bringing a local store back to the truth of its files: recovery after a crash, scrubbing
(``vfsd store verify``) and the one-time migration of a format-1 store.

Kept apart from :mod:`vfs.redirect.store` (the read/write paths, quota and eviction) because
none of this runs on a hot path: each function walks the whole store.

The truth is the object files (``objects/ab/<id>``, exactly the object's bytes); the index and
the checksum sidecars are derived from them. So recovery drops what has no file (index rows,
sidecars), adds what the index lacks, and removes temp files of dead processes; verification
re-hashes every object against its id and rebuilds sidecars that are missing or damaged
(``docs/redirect.md`` sections 4-6).
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from vfs.durable import fsync_dir, pid_alive, tmp_name, tmp_owner_pid
from vfs.errors import IntegrityError, UsageError
from vfs.redirect.objectid import check_object_id, new_hasher
from vfs.redirect.objfile import SumsBuilder, sums_for, write_sparse
from vfs.redirect.objfile_v1 import v1_chunks

if TYPE_CHECKING:
    from vfs.redirect.store import LocalStore

log = logging.getLogger(__name__)

_READ = 1 << 20


@dataclass
class VerifyReport:
    checked: int
    bad: list[str]
    removed: list[str]
    #: objects that were good but whose checksum sidecar was missing or damaged (rebuilt)
    sums_rebuilt: list[str] = field(default_factory=list)


def iter_object_files(objects_dir: Path) -> Iterator[tuple[str, Path]]:
    """Every ``(oid, path)`` under ``objects/``: names that are well-formed ids in their
    shard directory (anything else, e.g. an operator's stray file, is not an object)."""
    for sub in sorted(os.scandir(objects_dir), key=lambda e: e.name):
        if not sub.is_dir(follow_symlinks=False):
            continue
        for entry in os.scandir(sub.path):
            name = entry.name
            if len(name) == 64 and name.startswith(sub.name):
                try:
                    check_object_id(name)
                except UsageError:
                    continue
                yield name, Path(entry.path)


def recover(store: LocalStore) -> dict[str, int]:
    """Reconcile the index (and sidecars) with the object files; drop temp files of dead
    processes. Safe while other processes use the store: it removes only temp files whose
    owner is dead, sidecars whose object is gone, and reconciles rows with files."""
    removed_tmp = 0
    for entry in os.scandir(store.tmp_dir):
        pid = tmp_owner_pid(entry.name)
        if pid is None or pid == os.getpid() or not pid_alive(pid):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(entry.path)
            removed_tmp += 1
    on_disk: dict[str, int] = {}
    for oid, path in iter_object_files(store.objects_dir):
        try:
            on_disk[oid] = path.stat().st_size
        except FileNotFoundError:
            pass
    removed_sums = 0
    if store.sums_dir.is_dir():
        for oid, path in iter_object_files(store.sums_dir):
            if oid not in on_disk and not os.path.exists(store.object_path(oid)):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(path)
                removed_sums += 1
    rows = store.index.stored_by_oid()
    drop = [oid for oid in rows.keys() - on_disk.keys()]
    add = [(oid, size, size) for oid, size in on_disk.items() if rows.get(oid) != size]
    dropped, added = store.index.reconcile(drop, add)
    result = {
        "removed_tmp": removed_tmp,
        "added_rows": added,
        "dropped_rows": dropped,
        "removed_sidecars": removed_sums,
    }
    log.info("store recovery: %s", result)
    return result


def verify(
    store: LocalStore, *, repair: bool = False, progress: Callable[[int], None] | None = None
) -> VerifyReport:
    """Re-hash every object against its id, and check each large object's sidecar against the
    object. A damaged object is reported (and with ``repair`` removed, so a resolver fetches
    it again); a damaged or missing sidecar of a good object is rebuilt either way."""
    rep = VerifyReport(0, [], [])
    for oid, path in iter_object_files(store.objects_dir):
        rep.checked += 1
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            continue
        try:
            try:
                fresh = sums_for(fd, oid, store.chunk_size)
                good = True
            except IntegrityError:
                good = False
        finally:
            os.close(fd)
        if not good:
            rep.bad.append(oid)
            log.info("store: object %s is damaged", oid)
            if repair:
                store.quarantine(oid)
                rep.removed.append(oid)
        elif fresh.size > store.chunk_size and store.read_sums(oid) != fresh:
            log.warning("store: checksum sidecar of %s missing or damaged: rebuilt", oid)
            store.write_sums(oid, fresh)
            rep.sums_rebuilt.append(oid)
        if progress:
            progress(rep.checked)
    return rep


def migrate_v1(store: LocalStore) -> dict[str, int]:
    """Rewrite every format-1 container as a plain object file (with its sidecar), in place.

    Runs while this process has the store alone (exclusive lock). Per object: a container
    whose decoded bytes hash to its id is rewritten (temp file, fsync, rename over it); a file
    already plain (its bytes hash to its id: a migration that was interrupted) gets its
    sidecar; anything else is damaged and removed (a resolver can fetch it again). A crash at
    any point leaves every object in one of the two formats, and the next open resumes: the
    store is marked format 2 only when every object is plain."""
    converted = plain = damaged = 0
    touched_dirs: set[Path] = set()
    for oid, path in iter_object_files(store.objects_dir):
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            container = v1_chunks(fd)
            ok = False
            if container is not None:
                ok = _convert(store, oid, container)
            if ok:
                converted += 1
                touched_dirs.add(path.parent)
                continue
            try:
                sums = sums_for(fd, oid, store.chunk_size)
            except IntegrityError:
                log.warning("store migration: object %s is damaged: removing it", oid)
                store.quarantine(oid)
                damaged += 1
                continue
            if sums.size > store.chunk_size and store.read_sums(oid) != sums:
                store.write_sums(oid, sums)
            plain += 1
        finally:
            os.close(fd)
    for d in touched_dirs:
        fsync_dir(d)
    result = {"converted": converted, "already_plain": plain, "damaged": damaged}
    log.info("store %s migrated to format 2: %s", store.root, result)
    return result


def _convert(store: LocalStore, oid: str, container: tuple) -> bool:
    """Write the decoded container as a plain temp file; rename it over the container if
    its bytes hash to ``oid``. False (nothing changed) if they do not."""
    size, chunks = container
    tmp = tmp_name(store.tmp_dir)
    wfd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o444)
    try:
        h = new_hasher()
        b = SumsBuilder(store.chunk_size)
        off = 0
        try:
            for c in chunks:
                h.update(c)
                b.update(c)
                write_sparse(wfd, c, off)
                off += len(c)
        except Exception as e:  # a damaged container chunk
            log.debug("store migration: %s: %s", oid, e)
            return False
        if off != size or h.hexdigest() != oid:
            return False
        os.ftruncate(wfd, size)
        os.fsync(wfd)
        sums = b.finish()
        if size > store.chunk_size:
            store.write_sums(oid, sums)
        os.replace(tmp, store.object_path(oid))
        return True
    finally:
        os.close(wfd)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
