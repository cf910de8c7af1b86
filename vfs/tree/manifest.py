"""Encode and decode template manifests (format in ``docs/template-format.md``).

:func:`decode` is the single gate every manifest passes before a VEE sees one name of it, so it
trusts nothing: lengths, counts, order, names, link counts, kinds, depth, extents. Every
violation is a :class:`~vfs.errors.FormatError` with a one-line reason; no other exception
escapes it for any input (the fuzz tests hold it to that).

A template's identity is the SHA-256 of its manifest, so a tree must have exactly one manifest:
:func:`decode` accepts a byte string only if it is *the* canonical encoding of what it decodes
to, ``encode(*decode(x)) == x``. The structural checks below (breadth-first numbering, sorted
tables, heap packed in order, reserved bytes zero, a feature bit set only when used) already
leave no freedom; as a belt-and-braces check the result is re-encoded and compared byte for
byte, so a gap in them can never become a second digest for one tree.

:func:`encode` writes that canonical form from tables that :mod:`vfs.tree.manifest_build`
builds; ``decode(encode(e, d)) == (e, d)``.
"""

from __future__ import annotations

import struct
from types import MappingProxyType

from vfs.errors import FormatError, UnsupportedFeature
from vfs.tree import manifest_layout as L
from vfs.tree.entry import KIND_TO_IFMT, Entry, Extents

NO_XATTRS: MappingProxyType[bytes, bytes] = MappingProxyType({})
_ZERO_OID = bytes(32)
_S_IFMT = 0o170000

Dirent = tuple[int, bytes, int]  # (parent ino, name, child ino)


def _bad(msg: str) -> FormatError:
    return FormatError(f"invalid template manifest: {msg}")


# -- encode -------------------------------------------------------------------------------------


def encode(entries: list[Entry], dirents: list[Dirent]) -> bytes:
    """Serialize canonical tables (entries[i].ino == i + 1; dirents in canonical order).

    The result is validated by :func:`decode` before it is returned, so a publisher can never
    produce a manifest that loaders refuse.
    """
    data = _encode(entries, dirents)
    decode(data)  # never publish what a reader would refuse
    return data


def _encode(entries: list[Entry], dirents: list[Dirent]) -> bytes:
    inode_tab = bytearray()
    dirent_tab = bytearray()
    xattr_tab = bytearray()
    extent_tab = bytearray()
    heap = bytearray()
    xattr_count = extent_count = 0
    incompat = 0
    pack_inode, pack_extent = L.INODE.pack, L.EXTENT.pack
    for i, e in enumerate(entries):
        if e.ino != i + 1:
            raise ValueError(f"entry {i} has ino {e.ino}")
        flags = 0
        oid = _ZERO_OID
        if e.oid is not None:
            flags |= L.FLAG_HAS_OID
            oid = bytes.fromhex(e.oid)
        if e.extents is not None:
            flags |= L.FLAG_SPARSE
            incompat |= L.INCOMPAT_SPARSE
            for off, n in e.extents:
                extent_tab += pack_extent(e.ino, 0, off, n)
                extent_count += 1
        target = e.target or b""
        try:
            inode_tab += pack_inode(
                L.KIND_CODES[e.kind],
                flags,
                len(target),
                e.mode,
                e.uid,
                e.gid,
                e.nlink,
                e.size,
                e.rdev,
                e.mtime_ns,
                0,  # reserved (was ctime: a template keeps none)
                oid,
            )
        except struct.error:
            raise FormatError(f"entry {e.ino}: a value is out of range for the format") from None
    for parent, name, child in dirents:
        dirent_tab += L.DIRENT.pack(parent, child, len(name), 0)
        heap += name
    for e in entries:
        if e.target is not None:
            heap += e.target
    for e in entries:
        if e.xattrs:
            for name in sorted(e.xattrs):
                value = e.xattrs[name]
                xattr_tab += L.XATTR.pack(e.ino, len(name), 0, len(value))
                heap += name
                heap += value
                xattr_count += 1
    try:
        header = L.HEADER.pack(
            L.MAGIC,
            L.VERSION,
            0,
            incompat,
            len(entries),
            len(dirents),
            xattr_count,
            extent_count,
            len(heap),
            L.RESERVED_TAIL,
        )
    except struct.error:
        raise FormatError("template too big for the format (a count is out of range)") from None
    return b"".join((header, inode_tab, dirent_tab, xattr_tab, extent_tab, heap))


# -- decode -------------------------------------------------------------------------------------


def decode(data: bytes, *, max_entries: int = L.MAX_INODES) -> tuple[list[Entry], list[Dirent]]:
    """Parse and validate a manifest; return (entries by ino - 1, dirents in canonical order).

    ``max_entries`` bounds inodes and dirents (each) below the format limit, so a reader can
    refuse a template too big for its memory before parsing anything.
    """
    if not isinstance(data, bytes | bytearray | memoryview):
        raise _bad("not bytes")
    data = bytes(data)
    entries, dirents = _parse(data, max_entries)
    again = _encode(entries, dirents)
    if again != data:  # unreachable while _parse is complete: the guarantee, not the check
        at = next((i for i, (a, b) in enumerate(zip(again, data, strict=False)) if a != b), None)
        at = min(len(again), len(data)) if at is None else at
        raise _bad(f"not in canonical form (byte {at} differs from the canonical encoding)")
    return entries, dirents


def _header(data: bytes, max_entries: int) -> tuple[int, int, int, int, int, int]:
    if not data.startswith(L.MAGIC):
        raise FormatError("not a vfs template manifest (bad magic)")
    if len(data) < L.HEADER_LEN:
        raise _bad(f"{len(data)} bytes, shorter than the header")
    fields = L.HEADER.unpack_from(data, 0)
    _magic, version, rsv1, incompat, n_ino, n_dir, n_xat, n_ext, heap_len, rsv2 = fields
    if version > L.VERSION:
        raise UnsupportedFeature(
            f"template manifest version {version} is newer than this reader ({L.VERSION})"
        )
    if version == 1:
        raise UnsupportedFeature(
            "template manifest version 1 (a pre-release format) is no longer read: "
            "publish the template again"
        )
    if version != L.VERSION:
        raise _bad(f"unknown version {version}")
    unknown = incompat & ~L.INCOMPAT_KNOWN
    if unknown:
        bits = ", ".join(str(b) for b in range(32) if unknown >> b & 1)
        raise UnsupportedFeature(
            f"template manifest uses unknown incompatible feature bits {unknown:#x} (bit {bits}):"
            " it needs a newer reader"
        )
    if rsv1 or rsv2 != L.RESERVED_TAIL:
        raise _bad("reserved header fields are not zero")
    if not 1 <= n_ino <= L.MAX_INODES or n_dir > L.MAX_DIRENTS or n_xat > L.MAX_XATTRS:
        raise _bad(f"absurd counts ({n_ino} inodes, {n_dir} dirents, {n_xat} xattrs)")
    if n_ext > L.MAX_EXTENTS:
        raise _bad(f"absurd extent count {n_ext}")
    if n_ext and not incompat & L.INCOMPAT_SPARSE:
        raise _bad(f"{n_ext} extents without the sparse-files feature bit")
    if n_ino > max_entries or n_dir > max_entries:
        raise UnsupportedFeature(
            f"template has {max(n_ino, n_dir)} entries, more than this reader accepts "
            f"({max_entries})"
        )
    tables = n_ino * L.INODE.size + n_dir * L.DIRENT.size + n_xat * L.XATTR.size
    tables += n_ext * L.EXTENT.size
    body_len = len(data) - L.HEADER_LEN
    if body_len != tables + heap_len or body_len > L.MAX_BODY:
        raise _bad(
            f"{body_len} bytes after the header, its tables and heap need {tables} + {heap_len}"
        )
    return incompat, n_ino, n_dir, n_xat, n_ext, heap_len


def _parse(data: bytes, max_entries: int = L.MAX_INODES) -> tuple[list[Entry], list[Dirent]]:
    """The structural checks: every rule of the format, each with its own message."""
    incompat, n_ino, n_dir, n_xat, n_ext, _heap_len = _header(data, max_entries)
    body = memoryview(data)[L.HEADER_LEN :]
    body_len = len(body)
    off_dir = n_ino * L.INODE.size
    off_xat = off_dir + n_dir * L.DIRENT.size
    off_ext = off_xat + n_xat * L.XATTR.size
    cur = off_ext + n_ext * L.EXTENT.size  # heap cursor: names, then targets, then xattrs

    raw = list(L.INODE.iter_unpack(body[:off_dir]))
    kinds: list[str] = []
    n_sparse = 0
    for i, (code, flags, tlen, mode, uid, gid, _nl, size, rdev, _mt, rsv, oid) in enumerate(raw):
        ino = i + 1
        kind = L.CODE_KINDS.get(code)
        if kind is None:
            raise _bad(f"inode {ino}: unknown kind {code}")
        if rsv:
            raise _bad(f"inode {ino}: reserved field is not zero")
        kinds.append(kind)
        if mode & _S_IFMT != KIND_TO_IFMT[kind] or mode & ~(_S_IFMT | 0o7777):
            raise _bad(f"inode {ino}: mode {mode:#o} does not fit kind {kind}")
        if flags & ~L.FLAGS_KNOWN:
            raise _bad(f"inode {ino}: unknown flags {flags:#x}")
        if uid == L.BAD_ID or gid == L.BAD_ID:
            raise _bad(f"inode {ino}: owner -1")
        if size > L.MAX_FILE_SIZE:
            raise _bad(f"inode {ino}: absurd size {size}")
        has_oid = bool(flags & L.FLAG_HAS_OID)
        if has_oid != (kind == "reg" and size > 0) or (not has_oid and oid != _ZERO_OID):
            raise _bad(f"inode {ino}: content reference does not fit a {kind} of size {size}")
        if flags & L.FLAG_SPARSE:
            if not has_oid:
                raise _bad(f"inode {ino}: a {kind} of size {size} cannot be sparse")
            if not incompat & L.INCOMPAT_SPARSE:
                raise _bad(f"inode {ino}: sparse without the sparse-files feature bit")
            n_sparse += 1
        if (kind == "lnk") != (tlen > 0) or tlen > L.MAX_TARGET:
            raise _bad(f"inode {ino}: symlink target length {tlen} for a {kind}")
        if kind == "lnk" and size != tlen:
            raise _bad(f"inode {ino}: symlink size {size} != target length {tlen}")
        if kind in ("fifo", "sock", "chr", "blk") and size:
            raise _bad(f"inode {ino}: {kind} with size {size}")
        if rdev and kind not in ("chr", "blk"):
            raise _bad(f"inode {ino}: device number on a {kind}")
    if kinds[0] != "dir":
        raise _bad("the root (inode 1) is not a directory")
    if incompat & L.INCOMPAT_SPARSE and not n_sparse:
        raise _bad("the sparse-files feature bit is set but no file is sparse")

    # Directory entries: sorted by (parent, name); new inode numbers appear in order
    # (breadth-first numbering), which at the same time proves that every inode is reachable
    # from the root, that no directory has two names and that there are no cycles.
    dirents: list[Dirent] = []
    names_seen = [0] * (n_ino + 1)
    subdirs = [0] * (n_ino + 1)
    depth = [0] * (n_ino + 1)
    assigned = 1
    prev_parent, prev_name = 0, b""
    for parent, child, nlen, rsv in L.DIRENT.iter_unpack(body[off_dir:off_xat]):
        if rsv:
            raise _bad("reserved dirent field is not zero")
        if not 1 <= nlen <= L.MAX_NAME:
            raise _bad(f"name of length {nlen} in directory {parent}")
        name = bytes(body[cur : cur + nlen])
        cur += nlen
        if len(name) != nlen or cur > body_len:
            raise _bad("names run past the heap")
        if b"/" in name or b"\0" in name or name in (b".", b".."):
            raise _bad(f"illegal name {name!r} in directory {parent}")
        if parent < prev_parent or (parent == prev_parent and name <= prev_name):
            raise _bad(f"directory entries out of order or duplicate at {name!r} in {parent}")
        if not 1 <= parent <= assigned or kinds[parent - 1] != "dir":
            raise _bad(f"entry {name!r}: parent {parent} is not a reachable directory")
        if child == assigned + 1 and child <= n_ino:
            assigned = child
            if kinds[child - 1] == "dir":
                subdirs[parent] += 1
                depth[child] = depth[parent] + 1
                if depth[child] > L.MAX_DEPTH:
                    raise _bad(f"directories nested deeper than {L.MAX_DEPTH}")
        elif 1 <= child <= assigned:
            if kinds[child - 1] == "dir":
                raise _bad(f"directory inode {child} has a second name {name!r} (loop)")
        else:
            raise _bad(f"entry {name!r}: inode {child} out of order or out of range")
        names_seen[child] += 1
        prev_parent, prev_name = parent, name
        dirents.append((parent, name, child))
    if assigned != n_ino:
        raise _bad(f"{n_ino - assigned} inodes are not reachable from the root")

    targets: dict[int, bytes] = {}
    for i, r in enumerate(raw):
        tlen = r[2]
        if tlen:
            t = bytes(body[cur : cur + tlen])
            cur += tlen
            if len(t) != tlen or cur > body_len:
                raise _bad("symlink targets run past the heap")
            if b"\0" in t:
                raise _bad(f"inode {i + 1}: NUL in symlink target")
            targets[i + 1] = t

    xattrs: dict[int, dict[bytes, bytes]] = {}
    prev_ino, prev_xname, list_len = 0, b"", 0
    for ino, nlen, rsv, vlen in L.XATTR.iter_unpack(body[off_xat:off_ext]):
        if rsv:
            raise _bad("reserved xattr field is not zero")
        if not 1 <= ino <= n_ino:
            raise _bad(f"xattr on inode {ino} out of range")
        if not 1 <= nlen <= L.MAX_XATTR_NAME or vlen > L.MAX_XATTR_VALUE:
            raise _bad(f"inode {ino}: xattr name/value length {nlen}/{vlen}")
        xname = bytes(body[cur : cur + nlen])
        cur += nlen
        value = bytes(body[cur : cur + vlen])
        cur += vlen
        if cur > body_len:
            raise _bad("xattrs run past the heap")
        if b"\0" in xname or not xname.startswith(L.XATTR_NAMESPACES):
            raise _bad(f"inode {ino}: illegal xattr name {xname!r}")
        if xname.startswith(L.RESERVED_XATTR_PREFIX):
            raise _bad(f"inode {ino}: reserved xattr {xname[:60]!r} (overlay marker)")
        if ino < prev_ino or (ino == prev_ino and xname <= prev_xname):
            raise _bad(f"inode {ino}: xattrs out of order or duplicate at {xname!r}")
        if ino != prev_ino:
            list_len = 0
        list_len += nlen + 1
        if list_len > L.MAX_XATTR_LIST:
            raise _bad(f"inode {ino}: xattr names exceed {L.MAX_XATTR_LIST} bytes")
        xattrs.setdefault(ino, {})[xname] = value
        prev_ino, prev_xname = ino, xname
    if cur != body_len:
        raise _bad(f"{body_len - cur} unused bytes at the end of the heap")

    extents = _parse_extents(body[off_ext : off_ext + n_ext * L.EXTENT.size], raw)

    entries: list[Entry] = []
    for i, (_c, flags, _tl, mode, uid, gid, nlink, size, rdev, mt, _rsv, oid) in enumerate(raw):
        ino = i + 1
        kind = kinds[i]
        want = 2 + subdirs[ino] if kind == "dir" else names_seen[ino]
        if nlink != want:
            raise _bad(f"inode {ino}: link count {nlink}, the tree gives it {want}")
        xa = xattrs.get(ino)
        entries.append(
            Entry(
                ino,
                kind,
                mode,
                uid,
                gid,
                size,
                mt,
                nlink,
                rdev,
                targets.get(ino),
                oid.hex() if flags & L.FLAG_HAS_OID else None,
                MappingProxyType(xa) if xa else NO_XATTRS,
                extents.get(ino, ()) if flags & L.FLAG_SPARSE else None,
            )
        )
    return entries, dirents


def _parse_extents(table, raw: list[tuple]) -> dict[int, Extents]:
    """Extent records: sorted by (ino, offset), only on sparse inodes, non-empty, inside the
    file, a hole of at least one byte between two extents of a file, and never the single
    extent covering the whole file (that file is not sparse: its flag must be clear)."""
    out: dict[int, list[tuple[int, int]]] = {}
    prev_ino, prev_end = 0, 0
    for ino, rsv, off, n in L.EXTENT.iter_unpack(table):
        if rsv:
            raise _bad("reserved extent field is not zero")
        if not 1 <= ino <= len(raw) or not raw[ino - 1][1] & L.FLAG_SPARSE:
            raise _bad(f"extent on inode {ino}, which is not a sparse file")
        if ino < prev_ino:
            raise _bad(f"inode {ino}: extents out of order")
        size = raw[ino - 1][7]
        if n == 0 or off + n > size:
            raise _bad(f"inode {ino}: extent {off}+{n} is empty or outside the file ({size})")
        if ino == prev_ino and off <= prev_end:
            raise _bad(f"inode {ino}: extent at {off} overlaps, touches or precedes the last")
        out.setdefault(ino, []).append((off, n))
        prev_ino, prev_end = ino, off + n
    for ino, ext in out.items():
        if ext == [(0, raw[ino - 1][7])]:
            raise _bad(f"inode {ino}: sparse with no hole (its sparse flag must be clear)")
    return {ino: tuple(ext) for ino, ext in out.items()}
