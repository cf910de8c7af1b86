"""Publish a directory or a tar archive as a template: objects, then manifest, then ref.

The order is the crash story (``docs/template-format.md``, "Publishing"): every content object
is durably in the repository before the manifest that names it, and the manifest before the ref
that names it. A publish killed at any point leaves only unreferenced objects (harmless, reused
by the next publish) and the previous ref untouched.

Only objects the repository lacks are sent (``remote.has``), so publishing the same tree twice
uploads nothing, and a new version uploads only the files that changed. Big files are streamed,
never held in memory whole.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, BinaryIO

from vfs.errors import NotFound
from vfs.tree import manifest
from vfs.tree.dirsource import read_directory
from vfs.tree.manifest_build import build_tables
from vfs.tree.sink import (
    SMALL_FILE,
    UPLOAD_WORKERS,
    Exclude,
    HoleCheck,
    ObjectSink,
    Progress,
    freshening_has,
)
from vfs.tree.tarsource import read_tar

__all__ = [
    "SMALL_FILE",
    "UPLOAD_WORKERS",
    "Exclude",
    "HoleCheck",
    "ObjectSink",
    "Progress",
    "PublishResult",
    "publish_template",
]

log = logging.getLogger(__name__)


@dataclass
class PublishResult:
    """What a publish did: the template digest and how much it had to send."""

    digest: str
    name: str | None
    entries: int  # inodes in the template (hard links count once)
    paths: int  # names in the template, the root included
    objects: int  # distinct objects the template references, its manifest included
    objects_uploaded: int
    objects_skipped: int  # already in the repository
    bytes_total: int  # bytes of those distinct objects
    bytes_uploaded: int
    manifest_bytes: int

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def publish_template(
    src: Path | str | BinaryIO,
    remote: Any,
    *,
    name: str | None = None,
    store: Any = None,
    progress: Progress | None = None,
    spool_dir: str | Path | None = None,
    exclude: Iterable[str] = (),
) -> PublishResult:
    """Publish ``src``: a directory, or a tar archive of any compression tarfile reads (a path,
    or an open binary stream read once, e.g. ``sys.stdin.buffer``).

    ``exclude`` holds patterns of paths to leave out (see :class:`Exclude`).
    Uploads what ``remote`` lacks, then the manifest, then (with ``name``) sets the ref
    ``name`` → digest. With ``store`` (a LocalStore), the objects are also put there, so a
    daemon on this host serves the template without fetching it back.
    """
    skip = Exclude(exclude)
    with ObjectSink(remote, store, progress, spool_dir) as sink:
        if hasattr(src, "read"):
            root = read_tar(src, sink, skip)  # type: ignore[arg-type]
        else:
            src = Path(src)
            if src.is_dir():
                root = read_directory(src, sink, skip)
            elif src.exists():
                root = read_tar(src, sink, skip)  # a file, or a pipe such as /dev/stdin
            else:
                raise NotFound(f"{src}: no such file or directory")
        sink.drain()  # every content object is durable before the manifest is written
    entries, dirents = build_tables(root)
    data = manifest.encode(entries, dirents)
    digest = hashlib.sha256(data).hexdigest()
    if digest not in sink.seen:
        sink.seen[digest] = len(data)
        if not freshening_has(remote)(digest):
            ObjectSink._check(digest, remote.put(data))
            sink.uploaded += 1
            sink.bytes_uploaded += len(data)
        if store is not None and not store.has(digest):
            ObjectSink._check(digest, store.put(data))
    if name is not None:
        remote.set_ref(name, digest)  # last: only now does the name see the new template
    n_obj = len(sink.seen)
    result = PublishResult(
        digest=digest,
        name=name,
        entries=len(entries),
        paths=len(dirents) + 1,
        objects=n_obj,
        objects_uploaded=sink.uploaded,
        objects_skipped=n_obj - sink.uploaded,
        bytes_total=sum(sink.seen.values()),
        bytes_uploaded=sink.bytes_uploaded,
        manifest_bytes=len(data),
    )
    log.info(
        "published %s: %d entries, %d/%d objects uploaded",
        digest,
        result.entries,
        result.objects_uploaded,
        result.objects,
    )
    return result
