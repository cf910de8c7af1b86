"""Build the canonical manifest tables from a tree of source nodes.

Sources (a directory walker, a tar reader) produce :class:`Node` objects: one per inode, a hard
link being the same Node under two names. :func:`build_tables` numbers them breadth-first in name
order and computes link counts from the tree itself (never from the source's ``st_nlink``, which
counts names outside the published tree too), and brings data extents into their one canonical
shape (:func:`canonical_extents`), which is the canonical form that
:func:`vfs.tree.manifest.decode` insists on.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field
from types import MappingProxyType

from vfs.tree.entry import KIND_TO_IFMT, Entry, Extents
from vfs.tree.manifest import NO_XATTRS, Dirent


@dataclass(eq=False, slots=True)
class Node:
    """A mutable inode under construction (identity = inode; hard links share the object)."""

    kind: str
    mode: int  # permission bits 0o7777 (type bits are added from kind)
    uid: int = 0
    gid: int = 0
    size: int = 0
    mtime_ns: int = 0
    rdev: int = 0
    target: bytes | None = None
    oid: str | None = None
    xattrs: dict[bytes, bytes] = field(default_factory=dict)
    #: reg: where the source has data, ``(offset, length)`` in any order (None: all of it)
    extents: list[tuple[int, int]] | None = None
    children: dict[bytes, Node] | None = None  # dirs only

    def __post_init__(self) -> None:
        if self.kind == "dir" and self.children is None:
            self.children = {}


def canonical_extents(ranges: Iterable[tuple[int, int]] | None, size: int) -> Extents | None:
    """The one way to write a file's allocation: data ranges clipped to the file, empty ones
    dropped, overlapping or touching ones merged, sorted; None when that is the whole file
    (not sparse)."""
    if ranges is None or size <= 0:
        return None
    merged: list[list[int]] = []
    for start, end in sorted((max(0, off), min(off + n, size)) for off, n in ranges):
        if end <= start:
            continue
        if merged and start <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], end)
        else:
            merged.append([start, end])
    out = tuple((a, b - a) for a, b in merged)
    return None if out == ((0, size),) else out


def build_tables(root: Node) -> tuple[list[Entry], list[Dirent]]:
    """Number the tree breadth-first (root = 1, children in byte order of their names)."""
    ino_of: dict[int, int] = {id(root): 1}
    order: list[Node] = [root]
    dirents: list[Dirent] = []
    names: dict[int, int] = {}
    subdirs: dict[int, int] = {}
    queue: deque[tuple[int, Node]] = deque([(1, root)])
    while queue:
        pino, d = queue.popleft()
        assert d.children is not None
        for name in sorted(d.children):
            child = d.children[name]
            cino = ino_of.get(id(child))
            if cino is None:
                cino = len(order) + 1
                ino_of[id(child)] = cino
                order.append(child)
                if child.kind == "dir":
                    subdirs[pino] = subdirs.get(pino, 0) + 1
                    queue.append((cino, child))
            elif child.kind == "dir":
                raise ValueError(f"directory {name!r} has two names")
            names[cino] = names.get(cino, 0) + 1
            dirents.append((pino, name, cino))
    entries: list[Entry] = []
    for i, n in enumerate(order):
        ino = i + 1
        nlink = 2 + subdirs.get(ino, 0) if n.kind == "dir" else names.get(ino, 0)
        size = n.size
        if n.kind == "lnk":
            size = len(n.target or b"")
        elif n.kind in ("fifo", "sock", "chr", "blk"):
            size = 0
        entries.append(
            Entry(
                ino=ino,
                kind=n.kind,
                mode=KIND_TO_IFMT[n.kind] | (n.mode & 0o7777),
                uid=n.uid,
                gid=n.gid,
                size=size,
                mtime_ns=n.mtime_ns,
                nlink=nlink,
                rdev=n.rdev if n.kind in ("chr", "blk") else 0,
                target=n.target if n.kind == "lnk" else None,
                oid=n.oid if n.kind == "reg" and size > 0 else None,
                xattrs=MappingProxyType(dict(n.xattrs)) if n.xattrs else NO_XATTRS,
                extents=canonical_extents(n.extents, size) if n.kind == "reg" else None,
            )
        )
    return entries, dirents
