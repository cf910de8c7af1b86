"""Read a tar archive into manifest nodes (for ``publish_template``).

The archive is read as a stream (any compression :mod:`tarfile` knows), each member once, so a
compressed archive of any size is never held in memory. What a tar can carry is kept exactly:
numeric owners, modes with setuid/setgid/sticky, device numbers, hard links, PAX nanosecond
``mtime`` (a template keeps no atime and no ctime: those records are ignored), xattrs in both
common PAX spellings (``SCHILY.xattr.NAME`` as GNU tar/star write them,
``LIBARCHIVE.xattr.NAME`` base64 as bsdtar), and the data map of sparse members (GNU ``S``
members and PAX sparse formats 0.0, 0.1 and 1.0, as ``tar --sparse`` writes them;
:mod:`tarfile` parses them and reads holes as zeros).

Member names are normalised like ``tar -x`` does (leading ``/`` and ``./`` dropped); a name with a
``..`` component is refused (a template never contains a path that escapes its root). A parent
directory the archive does not list is created with mode 0755, owner 0:0 and time 0.
"""

from __future__ import annotations

import base64
import binascii
import gzip
import logging
import lzma
import os
import tarfile
import zlib
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import BinaryIO
from urllib.parse import unquote_to_bytes

from vfs.errors import FormatError
from vfs.tree import manifest_layout as L
from vfs.tree.manifest_build import Node
from vfs.tree.sink import Exclude, ObjectSink

log = logging.getLogger(__name__)

_ENC = "utf-8"
_ERR = "surrogateescape"


def _b(text: str) -> bytes:
    return text.encode(_ENC, _ERR)


_I64 = 1 << 63
_U32_MAX = 0xFFFFFFFE  # 0xFFFFFFFF is (uid_t)-1


def _split(name: str, what: str = "") -> list[bytes]:
    parts = [p for p in _b(name).split(b"/") if p and p != b"."]
    if b".." in parts:
        label = f"tar member {what} {name!r}" if what else f"tar member {name!r}"
        raise FormatError(f"{label}: '..' in path, refusing the archive")
    for p in parts:
        if len(p) > L.MAX_NAME or b"\0" in p:
            raise FormatError(f"tar member {name!r}: illegal name component")
    if len(parts) > L.MAX_DEPTH:
        raise FormatError(f"tar member {name!r}: nested deeper than {L.MAX_DEPTH}")
    return parts


def _ns(pax: dict[str, str], key: str, default: int) -> int:
    text = pax.get(key)
    if text is None:
        return default
    try:
        ns = int(Decimal(text) * 1_000_000_000)
    except (InvalidOperation, ValueError, OverflowError):
        raise FormatError(f"tar: bad PAX {key} record {text[:40]!r}") from None
    if not -_I64 <= ns < _I64:
        raise FormatError(f"tar: PAX {key} record {text[:40]!r} out of range")
    return ns


def _xattrs(pax: dict[str, str]) -> dict[bytes, bytes]:
    out: dict[bytes, bytes] = {}
    for key, value in pax.items():
        if key.startswith("SCHILY.xattr."):
            out[_b(key[len("SCHILY.xattr.") :])] = _b(value)
        elif key.startswith("LIBARCHIVE.xattr."):
            try:
                name = unquote_to_bytes(key[len("LIBARCHIVE.xattr.") :])
                out[name] = base64.b64decode(value + "=" * (-len(value) % 4), validate=True)
            except binascii.Error:
                raise FormatError(f"tar: bad base64 xattr value for {key!r}") from None
    for k, v in out.items():
        if not 0 < len(k) <= L.MAX_XATTR_NAME or b"\0" in k or len(v) > L.MAX_XATTR_VALUE:
            raise FormatError(f"tar: illegal xattr {k[:40]!r} ({len(v)} bytes)")
    marker = next((k for k in out if k.startswith(L.RESERVED_XATTR_PREFIX)), None)
    if marker is not None:
        raise FormatError(
            f"tar: xattr {marker[:60]!r} is an overlay marker: a template cannot carry one"
        )
    bad = [k for k in out if not k.startswith(L.XATTR_NAMESPACES)]
    for k in bad:
        log.warning("tar: skipping xattr %r (namespace not supported)", k)
        del out[k]
    return out


class _Tree:
    def __init__(self) -> None:
        self.root = Node(kind="dir", mode=0o755)

    def parent_of(self, parts: list[bytes]) -> Node:
        d = self.root
        for p in parts[:-1]:
            assert d.children is not None
            nxt = d.children.get(p)
            if nxt is None:
                nxt = Node(kind="dir", mode=0o755)
                d.children[p] = nxt
            elif nxt.kind != "dir":
                raise FormatError(f"tar: {b'/'.join(parts)!r} lies below a non-directory")
            d = nxt
        return d

    def find(self, parts: list[bytes]) -> Node | None:
        d: Node | None = self.root
        for p in parts:
            if d is None or d.children is None:
                return None
            d = d.children.get(p)
        return d


def _rdev(m: tarfile.TarInfo) -> int:
    try:
        rdev = os.makedev(m.devmajor, m.devminor)
    except (OverflowError, ValueError, TypeError):
        raise FormatError(f"tar member {m.name!r}: bad device number") from None
    if not 0 <= rdev < 1 << 64:
        raise FormatError(f"tar member {m.name!r}: bad device number")
    return rdev


def _kind(m: tarfile.TarInfo) -> str:
    if m.isreg():
        return "reg"
    if m.isdir():
        return "dir"
    if m.issym():
        return "lnk"
    if m.isfifo():
        return "fifo"
    if m.ischr():
        return "chr"
    if m.isblk():
        return "blk"
    raise FormatError(f"tar member {m.name!r}: unsupported type {m.type!r}")


def read_tar(src: Path | BinaryIO, sink: ObjectSink, exclude: Exclude | None = None) -> Node:
    """Stream the archive ``src`` (a path, or a binary stream such as stdin) and return the
    root node of its tree."""
    tree = _Tree()
    what = getattr(src, "name", "<stream>") if not isinstance(src, Path) else src
    kw = {"fileobj": src} if not isinstance(src, Path) else {"name": src}
    try:
        with tarfile.open(mode="r|*", encoding=_ENC, errors=_ERR, **kw) as tf:
            for m in tf:
                if exclude and _excluded(exclude, m):
                    continue
                _add(tree, tf, m, sink)
    except (tarfile.TarError, zlib.error, lzma.LZMAError, gzip.BadGzipFile, ValueError) as e:
        # (ValueError: tarfile's own int() of a malformed GNU sparse map)
        raise FormatError(f"{what}: not a readable tar archive ({e})") from None
    except EOFError:
        raise FormatError(f"{what}: tar archive is truncated") from None
    return tree.root


def _excluded(exclude: Exclude, m: tarfile.TarInfo) -> bool:
    """A member is left out if it, or any directory above it, matches a pattern."""
    parts = _split(m.name)
    for i in range(1, len(parts) + 1):
        if exclude(b"/".join(parts[:i]), i < len(parts) or m.isdir()):
            return True
    return False


def _sparse_map(m: tarfile.TarInfo) -> list[tuple[int, int]] | None:
    """A sparse member's data map, checked: sorted, non-overlapping, inside the file (tarfile
    assumes all three when it reads the member, and reads every other byte as zero)."""
    if m.sparse is None:
        return None
    out: list[tuple[int, int]] = []
    end = 0
    for off, n in m.sparse:
        if n == 0 and 0 <= off <= m.size:
            continue  # GNU's end marker (size, 0) and the unused (0, 0) slots of an S header
        if off < end or n < 0 or off + n > m.size:
            raise FormatError(f"tar member {m.name!r}: bad sparse map at {off}+{n}")
        out.append((off, n))
        end = off + n
    return out


def _add(tree: _Tree, tf: tarfile.TarFile, m: tarfile.TarInfo, sink: ObjectSink) -> None:
    parts = _split(m.name)
    if not (0 <= m.uid <= _U32_MAX and 0 <= m.gid <= _U32_MAX):
        raise FormatError(f"tar member {m.name!r}: owner {m.uid}:{m.gid} out of range")
    pax = m.pax_headers
    if "mtime" in pax:
        mtime = _ns(pax, "mtime", 0)
    else:
        try:
            mtime = int(m.mtime) * 1_000_000_000
        except (ValueError, OverflowError, TypeError):
            raise FormatError(f"tar member {m.name!r}: bad mtime") from None
    if m.islnk():
        tparts = _split(m.linkname, "link target")
        target = tree.find(tparts)
        if target is None or target.kind == "dir" or not parts:
            raise FormatError(f"tar: hard link {m.name!r} -> {m.linkname!r}: no such file")
        parent = tree.parent_of(parts)
        assert parent.children is not None
        old = parent.children.get(parts[-1])
        if old is not None and old.kind == "dir":
            raise FormatError(f"tar: hard link {m.name!r} would replace a directory")
        parent.children[parts[-1]] = target
        return
    kind = _kind(m)
    node = Node(
        kind=kind,
        mode=m.mode & 0o7777,
        uid=m.uid,
        gid=m.gid,
        mtime_ns=mtime,
        rdev=_rdev(m) if kind in ("chr", "blk") else 0,
        xattrs=_xattrs(pax),
    )
    if kind == "lnk":
        node.target = _b(m.linkname)
        if not node.target or len(node.target) > L.MAX_TARGET or b"\0" in node.target:
            raise FormatError(f"tar member {m.name!r}: illegal symlink target")
    elif kind == "reg" and m.size > 0:
        node.extents = _sparse_map(m)
        f = tf.extractfile(m)
        assert f is not None
        node.oid, node.size = sink.put_stream(f, m.size, extents=node.extents)
        if node.size == 0:
            node.oid = None
    if not parts:  # the archive's "." entry describes the root
        if kind != "dir":
            raise FormatError(f"tar member {m.name!r}: the root must be a directory")
        for f in Node.__slots__:
            if f != "children":
                setattr(tree.root, f, getattr(node, f))
        return
    parent = tree.parent_of(parts)
    assert parent.children is not None
    old = parent.children.get(parts[-1])
    if old is not None and (old.kind == "dir") != (kind == "dir"):
        raise FormatError(f"tar: {m.name!r} appears both as a directory and as a file")
    if old is not None and kind == "dir":
        node.children = old.children  # a directory listed again: new metadata, same contents
    parent.children[parts[-1]] = node
