"""Moving a VEE to a newer template while keeping its private changes.

The private layer is kept exactly as it is; only the template under it changes. That gives the
rules users of overlayfs expect: a private file wins over any template version, a whiteout keeps
hiding the name (also if the new template changed that file), an opaque directory keeps hiding
the template directory. What the operator must hear about is a *conflict*: a path where the VEE
will not see what the new version brings.

- A private entry (file, symlink, device...) over a template path that changed between the two
  versions is a conflict — unless the private entry *is* what the new version has there (same
  type, mode, owner, bytes, target, xattrs): after ``apt-get install`` in a VEE, the files the
  new version adds by installing the same packages are such files, and nothing is lost.
- A whiteout hides what the new version has at its name (a conflict if that changed); over a
  directory, it hides everything the new version adds or changes beneath.
- An opaque private directory hides the template directory, at every depth: every path beneath
  that the new version adds or changes, and that the private layer does not have itself, is a
  conflict (``hidden_by`` names the directory).
- A redirected directory (renamed away from its template place) conflicts when its template
  directory exists in only one version, or changed type.

Entries are compared on what a program sees of them (type, mode, owner, size, content object,
symlink target, device number, xattrs); timestamps alone do not make a conflict.
"""

from __future__ import annotations

import errno
import hashlib
import os
import stat
from collections.abc import Iterator
from dataclasses import dataclass, field

from vfs.tree.entry import IFMT_TO_KIND, Entry
from vfs.tree.nodes import TemplateLike
from vfs.tree.private import PRIVATE_XATTR_PREFIX, PrivateLayer, is_whiteout


@dataclass
class Conflict:
    path: str  # path in the VEE, '/'-separated, no leading slash
    private: str  # 'file' 'whiteout' 'dir-opaque' 'dir-redirect' 'dir'
    template_change: str  # 'added' 'removed' 'changed'
    hidden_by: str | None = None  # the opaque directory or whiteout that hides ``path``

    def to_json(self) -> dict[str, str]:
        d = {"path": self.path, "private": self.private, "template": self.template_change}
        if self.hidden_by is not None:
            d["hidden_by"] = self.hidden_by
        return d


@dataclass
class UpgradeReport:
    name: str
    old: str
    new: str
    private_entries: int = 0
    #: private entries over a changed template path that equal the new version's entry
    identical: int = 0
    conflicts: list[Conflict] = field(default_factory=list)

    def to_json(self) -> dict[str, object]:
        return {
            "vee": self.name,
            "old_template": self.old,
            "new_template": self.new,
            "private_entries": self.private_entries,
            "identical_to_new": self.identical,
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


def private_matches(layer: PrivateLayer, path: tuple[bytes, ...], st: os.stat_result,
                    e: Entry | None) -> bool:  # fmt: skip
    """Is the private entry at ``path`` (its lstat ``st``) what template entry ``e`` is, as a
    program sees it: type, mode, owner, xattrs, and the bytes, target or device number?"""
    if e is None or IFMT_TO_KIND.get(stat.S_IFMT(st.st_mode)) != e.kind:
        return False
    if st.st_mode & 0o7777 != e.mode & 0o7777 or (st.st_uid, st.st_gid) != (e.uid, e.gid):
        return False
    if e.kind == "reg":
        if st.st_size != e.size or not _same_bytes(layer, path, e):
            return False
    elif e.kind == "lnk":
        with layer.at(path) as (pfd, name):
            if os.readlink(name, dir_fd=pfd) != e.target:
                return False
    elif e.kind in ("chr", "blk") and st.st_rdev != e.rdev:
        return False
    return _private_xattrs(layer, path) == dict(e.xattrs)


def _same_bytes(layer: PrivateLayer, path: tuple[bytes, ...], e: Entry) -> bool:
    if e.size == 0:
        return True
    fd = layer.open(path, os.O_RDONLY | os.O_NOATIME)
    try:
        h = hashlib.sha256()
        while chunk := os.read(fd, 1 << 20):
            h.update(chunk)
        return h.hexdigest() == e.oid
    finally:
        os.close(fd)


def _private_xattrs(layer: PrivateLayer, path: tuple[bytes, ...]) -> dict[bytes, bytes]:
    p = layer.xattr_path(path)
    try:
        names = os.listxattr(p, follow_symlinks=False)
    except OSError as e:
        if e.errno in (errno.ENOTSUP, errno.EPERM):
            return {}
        raise
    out = {}
    for n in names:
        nb = os.fsencode(n)
        if nb.startswith(PRIVATE_XATTR_PREFIX):  # ours (origin, opaque, redirect): not the VEE's
            continue
        out[nb] = os.getxattr(p, n, follow_symlinks=False)
    return out


def _walk_template(t: TemplateLike, root: bytes) -> Iterator[tuple[bytes, Entry]]:
    """(path relative to ``root``, entry) of everything beneath directory ``root`` of ``t``."""
    top = t.resolve(root)
    if top is None or top.kind != "dir":
        return
    stack: list[tuple[bytes, Entry]] = [(b"", top)]
    while stack:
        rel, d = stack.pop()
        for name, e in t.readdir(d.ino):
            sub = rel + b"/" + name if rel else name
            yield sub, e
            if e.kind == "dir":
                stack.append((sub, e))


def _join(a: bytes, b: bytes) -> bytes:
    return (a + b"/" + b).lstrip(b"/") if a else b


class _Planner:
    def __init__(self, name: str, layer: PrivateLayer, old: TemplateLike, new: TemplateLike):
        self.layer, self.old, self.new = layer, old, new
        self.report = UpgradeReport(name, old.digest, new.digest)

    def add(self, cpath: tuple[bytes, ...] | bytes, private: str, change: str,
            hidden_by: tuple[bytes, ...] | None = None) -> None:  # fmt: skip
        p = cpath if isinstance(cpath, bytes) else b"/".join(cpath)
        by = None if hidden_by is None else b"/".join(hidden_by).decode(errors="surrogateescape")
        self.report.conflicts.append(
            Conflict(p.decode(errors="surrogateescape"), private, change, by)
        )

    def hidden(self, cpath: tuple[bytes, ...], tpath: bytes, private: str) -> None:
        """Report what the new version adds or changes beneath template directory ``tpath``,
        hidden by the marker at ``cpath`` (an opaque directory: except where the private layer
        has the path itself; a whiteout: all of it)."""
        skip: list[bytes] = []  # added directories: reported once, not their contents
        for rel, b in _walk_template(self.new, tpath):
            if any(rel.startswith(s + b"/") for s in skip):
                continue
            a = self.old.resolve(_join(tpath, rel))
            if same_entry(a, b):
                continue
            vee_path = cpath + tuple(rel.split(b"/"))
            if private == "dir-opaque" and self.layer.lstat(vee_path) is not None:
                continue  # the private layer has it: compared where the walk meets it
            if b.kind == "dir" and a is None:
                skip.append(rel)
            self.add(vee_path, private, _change(a, b), hidden_by=cpath)

    def plan(self) -> UpgradeReport:
        # (private path, template path of the directory's lower content or None)
        stack: list[tuple[tuple[bytes, ...], bytes | None]] = [((), b"")]
        while stack:
            path, tpath = stack.pop()
            for child, st in sorted(self.layer.listdir(path)):
                self.entry(path + (child,), st, tpath, stack)
        self.report.conflicts.sort(key=lambda c: c.path)
        return self.report

    def entry(self, cpath: tuple[bytes, ...], st: os.stat_result, tpath: bytes | None,
              stack: list) -> None:  # fmt: skip
        ctpath = None if tpath is None else _join(tpath, cpath[-1])
        self.report.private_entries += 1
        old, new = self.old, self.new
        if stat.S_ISDIR(st.st_mode):
            redirect = self.layer.redirect(cpath)
            if self.layer.is_opaque(cpath):
                # hides the template directory below at every depth; the private entries
                # inside are still compared with the template paths they shadow
                stack.append((cpath, ctpath))
                if ctpath is not None:
                    a, b = old.resolve(ctpath), new.resolve(ctpath)
                    if a is None and b is not None and b.kind == "dir":
                        # a directory the VEE made where the old version had nothing (kernel
                        # overlayfs marks every new directory in a merged one opaque): only
                        # what the new version adds beneath it and the VEE lacks is hidden
                        self.hidden(cpath, ctpath, "dir-opaque")
                    elif not same_entry(a, b):
                        self.add(cpath, "dir-opaque", _change(a, b))
                    elif b is not None and b.kind == "dir":
                        self.hidden(cpath, ctpath, "dir-opaque")
            elif redirect is not None:
                # absolute ("/a/b", what the FUSE engine and overlayfs across directories
                # write) or relative to the parent's template directory (overlayfs's for a
                # rename within one directory: the kernel engine)
                if redirect.startswith(b"/"):
                    sub = redirect.lstrip(b"/")
                elif tpath is None:
                    stack.append((cpath, None))  # below a directory with no template content
                    return
                else:
                    sub = _join(tpath, redirect)
                a, b = old.resolve(sub), new.resolve(sub)
                if (a is None) != (b is None) or (
                    a is not None and b is not None and a.kind != b.kind
                ):
                    self.add(cpath, "dir-redirect", _change(a, b))
                stack.append((cpath, sub))
            else:
                stack.append((cpath, ctpath))
            return
        if ctpath is None:
            return
        a, b = old.resolve(ctpath), new.resolve(ctpath)
        if is_whiteout(st):
            if b is None:
                return  # deleted here, gone there too (or never there): nothing hidden
            if not same_entry(a, b):
                self.add(cpath, "whiteout", _change(a, b))
            elif b.kind == "dir":
                self.hidden(cpath, ctpath, "whiteout")
            return
        if same_entry(a, b):
            return
        if private_matches(self.layer, cpath, st, b):
            self.report.identical += 1  # the VEE already has what the new version brings
            return
        self.add(cpath, "file", _change(a, b))


def plan_upgrade(
    name: str, layer: PrivateLayer, old: TemplateLike, new: TemplateLike
) -> UpgradeReport:
    """Find the conflicts of moving ``layer`` from template ``old`` to ``new`` (reads only)."""
    return _Planner(name, layer, old, new).plan()
