"""Moving a VEE to a newer template while keeping its private changes.

The private layer is kept exactly as it is; only the template under it changes. That gives the
rules users of overlayfs expect: a private file wins over any template version, a whiteout keeps
hiding the name (also if the new template changed that file), an opaque directory keeps hiding
the template directory. What the operator must hear about is a *conflict*: a path the VEE changed
privately (a private file, a whiteout, a redirected directory) whose template entry also changed
between the old and the new version — the VEE will not see that template change.

Entries are compared on what a program sees of them (type, mode, owner, size, content object,
symlink target, device number, xattrs); timestamps alone do not make a conflict.
"""

from __future__ import annotations

import stat
from dataclasses import dataclass, field

from vfs.tree.entry import Entry
from vfs.tree.nodes import TemplateLike
from vfs.tree.private import PrivateLayer, is_whiteout


@dataclass
class Conflict:
    path: str  # path in the VEE, '/'-separated, no leading slash
    private: str  # 'file' 'whiteout' 'dir-opaque' 'dir-redirect' 'dir'
    template_change: str  # 'added' 'removed' 'changed'

    def to_json(self) -> dict[str, str]:
        return {"path": self.path, "private": self.private, "template": self.template_change}


@dataclass
class UpgradeReport:
    name: str
    old: str
    new: str
    private_entries: int = 0
    conflicts: list[Conflict] = field(default_factory=list)

    def to_json(self) -> dict[str, object]:
        return {
            "vee": self.name,
            "old_template": self.old,
            "new_template": self.new,
            "private_entries": self.private_entries,
            "conflicts": [c.to_json() for c in self.conflicts],
        }


def same_entry(a: Entry | None, b: Entry | None) -> bool:
    """Do two template entries look the same to a program (times ignored)?"""
    if a is None or b is None:
        return a is b
    return (
        a.kind == b.kind
        and a.mode == b.mode
        and a.uid == b.uid
        and a.gid == b.gid
        and a.oid == b.oid
        and (a.kind == "dir" or a.size == b.size)
        and a.target == b.target
        and a.rdev == b.rdev
        and dict(a.xattrs) == dict(b.xattrs)
    )


def _change(a: Entry | None, b: Entry | None) -> str:
    if a is None:
        return "added"
    if b is None:
        return "removed"
    return "changed"


def plan_upgrade(
    name: str, layer: PrivateLayer, old: TemplateLike, new: TemplateLike
) -> UpgradeReport:
    """Find the conflicts of moving ``layer`` from template ``old`` to ``new`` (reads only)."""
    report = UpgradeReport(name, old.digest, new.digest)
    # (private path, template path of the directory's lower content)
    stack: list[tuple[tuple[bytes, ...], bytes | None]] = [((), b"")]
    while stack:
        path, tpath = stack.pop()
        for child, st in sorted(layer.listdir(path)):
            cpath = path + (child,)
            ctpath = None if tpath is None else (tpath + b"/" + child).lstrip(b"/")
            vpath = b"/".join(cpath).decode(errors="surrogateescape")
            report.private_entries += 1
            if stat.S_ISDIR(st.st_mode):
                redirect = layer.redirect(cpath)
                if layer.is_opaque(cpath):
                    kind, sub = "dir-opaque", None
                elif redirect is not None:
                    # absolute ("/a/b", what the FUSE engine and overlayfs across directories
                    # write) or relative to the parent's template directory (overlayfs's for a
                    # rename within one directory: the kernel engine)
                    if redirect.startswith(b"/"):
                        kind, sub = "dir-redirect", redirect.lstrip(b"/")
                    elif tpath is None:
                        kind, sub = "dir-redirect", None
                    else:
                        kind, sub = "dir-redirect", (tpath + b"/" + redirect).lstrip(b"/")
                    if sub is None:
                        stack.append((cpath, None))
                        continue
                    a, b = old.resolve(sub), new.resolve(sub)
                    if (a is None) != (b is None) or (
                        a is not None and b is not None and a.kind != b.kind
                    ):
                        report.conflicts.append(Conflict(vpath, kind, _change(a, b)))
                else:
                    kind, sub = "dir", ctpath
                stack.append((cpath, sub))
                if ctpath is not None and kind != "dir":
                    # the name itself: a private dir over a template entry that changed
                    a, b = old.resolve(ctpath), new.resolve(ctpath)
                    if kind == "dir-opaque" and not same_entry(a, b):
                        report.conflicts.append(Conflict(vpath, kind, _change(a, b)))
                continue
            if ctpath is None:
                continue
            a, b = old.resolve(ctpath), new.resolve(ctpath)
            if same_entry(a, b):
                continue
            if is_whiteout(st):
                if b is not None:  # both deleting it is no conflict; something new hidden is
                    report.conflicts.append(Conflict(vpath, "whiteout", _change(a, b)))
            else:
                report.conflicts.append(Conflict(vpath, "file", _change(a, b)))
    report.conflicts.sort(key=lambda c: c.path)
    return report
