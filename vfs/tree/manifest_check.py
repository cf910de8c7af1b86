"""Check that a published template is complete in a repository (``vfsd template check``).

Loading a template already proves its manifest (digest, format, every invariant). What loading
does not prove is that the repository still holds every content object the manifest names, and
that those bytes are right: this module checks that, as ``cvmfs_server check`` does, either by
presence (cheap: one ``has`` per object) or fully (``--verify``: read and hash every object, and
check that the holes of every sparse file that uses it read as zeros).
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from vfs.errors import ObjectNotFound, VfsError
from vfs.tree.sink import HoleCheck
from vfs.tree.template import Template

log = logging.getLogger(__name__)


@dataclass
class CheckReport:
    digest: str
    entries: int
    objects: int  # distinct content objects the template names
    bytes: int
    verified: bool  # contents were read and hashed, not only found
    missing: list[str] = field(default_factory=list)
    corrupt: list[str] = field(default_factory=list)  # wrong bytes, wrong size, data in a hole
    paths: dict[str, bytes] = field(default_factory=dict)  # oid -> one path naming it

    @property
    def ok(self) -> bool:
        return not self.missing and not self.corrupt

    def to_json(self) -> dict[str, Any]:
        def where(oid: str) -> dict[str, str]:
            return {"oid": oid, "path": self.paths[oid].decode("utf-8", "backslashreplace")}

        return {
            "digest": self.digest,
            "ok": self.ok,
            "entries": self.entries,
            "objects": self.objects,
            "bytes": self.bytes,
            "verified": self.verified,
            "missing": [where(o) for o in self.missing],
            "corrupt": [where(o) for o in self.corrupt],
        }


def check_template(
    t: Template,
    remote: Any,
    *,
    verify: bool = False,
    progress: Callable[[int, int], None] | None = None,
) -> CheckReport:
    """Check every content object of ``t`` in ``remote`` (``has``; with ``verify`` also
    ``iter_object`` + SHA-256 + size). Never raises for a missing or bad object: reports it."""
    sizes: dict[str, int] = {}
    paths: dict[str, bytes] = {}
    sparse: dict[str, set] = {}  # oid -> the distinct extent maps of the sparse files using it
    for path, e in t.walk():
        if e.oid is not None and e.oid not in sizes:
            sizes[e.oid] = e.size
            paths[e.oid] = path
        if e.oid is not None and e.extents is not None:
            sparse.setdefault(e.oid, set()).add(e.extents)
    rep = CheckReport(t.digest, len(t), len(sizes), sum(sizes.values()), verify, paths=paths)
    for i, (oid, size) in enumerate(sorted(sizes.items())):
        if not verify:
            if not remote.has(oid):
                rep.missing.append(oid)
        else:
            h = hashlib.sha256()
            n = 0
            holes = [HoleCheck(x, "a sparse file's hole holds data") for x in sparse.get(oid, ())]
            try:
                for chunk in remote.iter_object(oid, expected_size=size):
                    for check in holes:
                        check(chunk, n)
                    h.update(chunk)
                    n += len(chunk)
            except ObjectNotFound:
                rep.missing.append(oid)
                continue
            except VfsError as e:
                log.debug("object %s unreadable: %s", oid, e)
                rep.corrupt.append(oid)
                continue
            if h.hexdigest() != oid or n != size:
                rep.corrupt.append(oid)
        if progress is not None:
            progress(i + 1, len(sizes))
    return rep
