"""Read a directory tree into manifest nodes (for ``publish_template``).

No atime is recorded (a template keeps none: reading a tree must not change its digest), but
everything is still opened with ``O_NOATIME`` where the kernel allows it (we run as the owner or
as root), so publishing leaves the source's atimes as they were for whoever else uses them.
Hard links are found by ``(st_dev, st_ino)``; link counts are recomputed from the published tree.

Sparse files: a file that has fewer blocks than its size needs (the test ``cp`` and GNU tar use)
is mapped with ``SEEK_DATA``/``SEEK_HOLE``, and its data extents go into the manifest; while the
file is hashed its holes are checked to read as zeros, so the map and the content agree.
"""

from __future__ import annotations

import errno
import logging
import os
import stat
from pathlib import Path
from typing import BinaryIO

from vfs.errors import UsageError
from vfs.tree import manifest_layout as L
from vfs.tree.entry import IFMT_TO_KIND
from vfs.tree.manifest_build import Node
from vfs.tree.sink import Exclude, ObjectSink

log = logging.getLogger(__name__)

_NOATIME = getattr(os, "O_NOATIME", 0)


def _open(path: bytes, flags: int) -> int:
    try:
        return os.open(path, flags | _NOATIME | os.O_CLOEXEC)
    except PermissionError:
        if not _NOATIME:
            raise
        return os.open(path, flags | os.O_CLOEXEC)  # O_NOATIME needs ownership


def _xattrs(path: bytes) -> dict[bytes, bytes]:
    try:
        names = os.listxattr(path, follow_symlinks=False)
    except OSError as e:
        if e.errno in (errno.ENOTSUP, errno.EOPNOTSUPP):
            return {}
        raise
    out: dict[bytes, bytes] = {}
    for n in names:
        key = os.fsencode(n)
        if not key.startswith(L.XATTR_NAMESPACES):
            log.warning("%s: skipping xattr %r (namespace not supported)", path, key)
            continue
        if key.startswith(L.RESERVED_XATTR_PREFIX):
            raise UsageError(
                f"{os.fsdecode(path)}: xattr {os.fsdecode(key)} is an overlay marker: a template "
                "cannot carry one (publish the merged tree, not an overlay's upper directory)"
            )
        try:
            out[key] = os.getxattr(path, n, follow_symlinks=False)
        except OSError as e:
            if e.errno == errno.ENODATA:  # removed meanwhile
                continue
            raise
    return out


def data_extents(fd: int, size: int) -> list[tuple[int, int]] | None:
    """Where an open file has data, from SEEK_DATA/SEEK_HOLE; None if the file system cannot
    tell (then the file counts as fully allocated)."""
    out: list[tuple[int, int]] = []
    pos = 0
    while pos < size:
        try:
            start = os.lseek(fd, pos, os.SEEK_DATA)
        except OSError as e:
            if e.errno == errno.ENXIO:  # nothing but a hole from pos to the end
                break
            if e.errno in (errno.EINVAL, errno.EOPNOTSUPP):
                return None
            raise
        end = min(os.lseek(fd, start, os.SEEK_HOLE), size)
        if end <= start:
            break
        out.append((start, end - start))
        pos = end
    return out


def _node(path: bytes, st: os.stat_result, sink: ObjectSink) -> Node:
    kind = IFMT_TO_KIND.get(stat.S_IFMT(st.st_mode))
    if kind is None:
        raise UsageError(f"{os.fsdecode(path)}: unsupported file type {st.st_mode:#o}")
    node = Node(
        kind=kind,
        mode=stat.S_IMODE(st.st_mode),
        uid=st.st_uid,
        gid=st.st_gid,
        size=st.st_size if kind in ("reg", "dir") else 0,
        mtime_ns=st.st_mtime_ns,
        rdev=st.st_rdev if kind in ("chr", "blk") else 0,
        xattrs=_xattrs(path),
    )
    if kind == "lnk":
        node.target = os.readlink(path)
    elif kind == "reg" and st.st_size > 0:

        def opener() -> BinaryIO:
            fd = _open(path, os.O_RDONLY | os.O_NOFOLLOW)
            return os.fdopen(fd, "rb", buffering=0)

        if st.st_blocks * 512 < st.st_size:  # fewer blocks than bytes: it may have holes
            with opener() as f:
                node.extents = data_extents(f.fileno(), st.st_size)
        node.oid, node.size = sink.put_file(opener, st.st_size, extents=node.extents)
        if node.size != st.st_size:
            log.warning("%s changed size while being published", os.fsdecode(path))
        if node.size == 0:
            node.oid = None
    return node


def read_directory(src: Path, sink: ObjectSink, exclude: Exclude | None = None) -> Node:
    """Walk ``src`` (not following symlinks below it) and return the root node."""
    top = os.fsencode(os.path.realpath(src))  # a symlink to the tree publishes the tree
    root = _node(top, os.stat(top), sink)
    if root.kind != "dir":
        raise UsageError(f"{src}: not a directory")
    hardlinks: dict[tuple[int, int], Node] = {}
    stack: list[tuple[bytes, Node, int]] = [(top, root, 0)]
    while stack:
        path, dnode, depth = stack.pop()
        fd = _open(path, os.O_RDONLY | os.O_DIRECTORY | (os.O_NOFOLLOW if depth else 0))
        try:
            with os.scandir(fd) as it:
                items = [(os.fsencode(de.name), de.stat(follow_symlinks=False)) for de in it]
        finally:
            os.close(fd)
        assert dnode.children is not None
        for name, st in sorted(items):
            cpath = path + b"/" + name
            if exclude and exclude(cpath[len(top) + 1 :], stat.S_ISDIR(st.st_mode)):
                continue
            key = (st.st_dev, st.st_ino)
            if not stat.S_ISDIR(st.st_mode) and st.st_nlink > 1 and key in hardlinks:
                dnode.children[name] = hardlinks[key]
                continue
            child = _node(cpath, st, sink)
            dnode.children[name] = child
            if child.kind == "dir":
                if depth + 1 > L.MAX_DEPTH:
                    raise UsageError(f"{os.fsdecode(cpath)}: nested deeper than {L.MAX_DEPTH}")
                stack.append((cpath, child, depth + 1))
            elif st.st_nlink > 1:
                hardlinks[key] = child
    return root
