"""Compare two templates path by path (``vfsd template diff``; also what an upgrade needs to know:
which paths changed between two template versions).

Entries are compared on what a user of the tree can observe (templates keep no atime and no
ctime).
"""

from __future__ import annotations

from dataclasses import dataclass

from vfs.tree.entry import Entry
from vfs.tree.template import Template

#: Fields compared, as (name shown to users, Entry attribute).
FIELDS: tuple[tuple[str, str], ...] = (
    ("kind", "kind"),
    ("mode", "mode"),
    ("uid", "uid"),
    ("gid", "gid"),
    ("size", "size"),
    ("content", "oid"),
    ("allocation", "extents"),  # sparse or not, and where the holes are
    ("target", "target"),
    ("rdev", "rdev"),
    ("mtime", "mtime_ns"),
    ("xattrs", "xattrs"),
    ("nlink", "nlink"),
)


@dataclass(frozen=True, slots=True)
class Change:
    path: bytes
    status: str  # 'added' | 'removed' | 'modified'
    fields: tuple[str, ...] = ()  # for 'modified': the names from FIELDS that differ

    def to_json(self) -> dict[str, object]:
        return {
            "path": self.path.decode("utf-8", "backslashreplace"),
            "status": self.status,
            "fields": list(self.fields),
        }


def entry_changes(a: Entry, b: Entry) -> tuple[str, ...]:
    """Names of the observable fields in which two entries differ."""
    out = []
    for label, attr in FIELDS:
        va, vb = getattr(a, attr), getattr(b, attr)
        if attr == "xattrs":
            va, vb = dict(va), dict(vb)
        if attr == "size" and a.kind == "dir" and b.kind == "dir":
            continue  # a directory's st_size is file-system noise
        if va != vb:
            out.append(label)
    return tuple(out)


def diff_templates(a: Template, b: Template) -> list[Change]:
    """Every path added, removed or modified from ``a`` to ``b``, sorted by path."""
    pa = dict(a.walk())
    pb = dict(b.walk())
    changes: list[Change] = []
    for path in sorted(pa.keys() | pb.keys()):
        ea, eb = pa.get(path), pb.get(path)
        if ea is None:
            changes.append(Change(path, "added"))
        elif eb is None:
            changes.append(Change(path, "removed"))
        else:
            f = entry_changes(ea, eb)
            if f:
                changes.append(Change(path, "modified", f))
    return changes
