"""Encode and decode template manifests (format in ``docs/template-format.md``).

:func:`decode` is the single gate every manifest passes before a VEE sees one name of it, so it
trusts nothing: lengths, counts, order, names, link counts, kinds, depth. Every violation is a
:class:`~vfs.errors.FormatError` with a one-line reason; no other exception escapes it for any
input (the fuzz tests hold it to that). It also checks that the manifest is in *canonical form*
(inode numbers assigned breadth-first in name order, tables sorted, heap packed in order), so
that one tree has exactly one manifest and so one digest.

:func:`encode` writes that canonical form from tables that :mod:`vfs.tree.manifest_build` builds;
``decode(encode(e, d)) == (e, d)``.
"""

from __future__ import annotations

import struct
from types import MappingProxyType

import zstandard

from vfs.errors import FormatError, UnsupportedFeature
from vfs.tree import manifest_layout as L
from vfs.tree.entry import KIND_TO_IFMT, Entry

NO_XATTRS: MappingProxyType[bytes, bytes] = MappingProxyType({})
_ZERO_OID = bytes(32)
_S_IFMT = 0o170000
_SLICE = 256  # bytes of compressed input per decompression step

Dirent = tuple[int, bytes, int]  # (parent ino, name, child ino)


def _bad(msg: str) -> FormatError:
    return FormatError(f"invalid template manifest: {msg}")


# -- encode -------------------------------------------------------------------------------------


def encode(entries: list[Entry], dirents: list[Dirent], *, compress: bool = True) -> bytes:
    """Serialize canonical tables (entries[i].ino == i + 1; dirents in canonical order).

    The result is validated by :func:`decode` before it is returned, so a publisher can never
    produce a manifest that loaders refuse.
    """
    inode_tab = bytearray()
    dirent_tab = bytearray()
    xattr_tab = bytearray()
    heap = bytearray()
    xattr_count = 0
    for i, e in enumerate(entries):
        if e.ino != i + 1:
            raise ValueError(f"entry {i} has ino {e.ino}")
        flags = 0
        oid = _ZERO_OID
        if e.oid is not None:
            flags |= L.FLAG_HAS_OID
            oid = bytes.fromhex(e.oid)
        target = e.target or b""
        try:
            packed = L.INODE.pack(
                L.KIND_CODES[e.kind],
                flags,
                len(target),
                e.mode,
                e.uid,
                e.gid,
                e.nlink,
                e.size,
                e.rdev,
                e.atime_ns,
                e.mtime_ns,
                e.ctime_ns,
                oid,
            )
        except struct.error:
            raise FormatError(f"entry {e.ino}: a value is out of range for the format") from None
        inode_tab += packed
    for parent, name, child in dirents:
        dirent_tab += L.DIRENT.pack(parent, child, len(name), 0)
        heap += name
    for e in entries:
        if e.target is not None:
            heap += e.target
    for e in entries:
        for name in sorted(e.xattrs):
            value = e.xattrs[name]
            xattr_tab += L.XATTR.pack(e.ino, len(name), 0, len(value))
            heap += name
            heap += value
            xattr_count += 1
    body = bytes(inode_tab + dirent_tab + xattr_tab + heap)
    incompat = 0
    stored = body
    if compress:
        incompat |= L.INCOMPAT_ZSTD
        stored = zstandard.ZstdCompressor(level=9, write_content_size=True).compress(body)
    header = L.HEADER.pack(
        L.MAGIC,
        L.VERSION,
        L.HEADER_LEN,
        incompat,
        0,
        len(entries),
        len(dirents),
        xattr_count,
        0,
        len(heap),
        len(body),
        len(stored),
        0,
    )
    data = header + stored
    decode(data)  # never publish what a reader would refuse
    return data


# -- decode -------------------------------------------------------------------------------------


def _read_body(data: bytes, header_len: int, incompat: int, body_len: int, stored_len: int):
    stored = memoryview(data)[header_len:]
    if len(stored) != stored_len:
        raise _bad(f"stored body is {len(stored)} bytes, header says {stored_len}")
    if not incompat & L.INCOMPAT_ZSTD:
        if stored_len != body_len:
            raise _bad(f"uncompressed body is {stored_len} bytes, header says {body_len}")
        return stored
    # Bounded decompression: the frame is fed in small slices, so a frame that produces more
    # than body_len bytes (a "bomb") is refused after at most one slice's worth of output
    # (RLE blocks expand ~32k:1, so a 256-byte slice yields at most ~8 MiB).
    dobj = zstandard.ZstdDecompressor().decompressobj()
    out = bytearray()
    try:
        for pos in range(0, len(stored), _SLICE):
            out += dobj.decompress(stored[pos : pos + _SLICE])
            if len(out) > body_len:
                raise _bad(f"compressed body is longer than the header says ({body_len} bytes)")
            if dobj.eof:
                if dobj.unused_data or pos + _SLICE < len(stored):
                    raise _bad("data after the compressed body")
                break
    except zstandard.ZstdError as e:
        raise _bad(f"compressed body is corrupt ({e})") from None
    if not dobj.eof:
        raise _bad("compressed body is truncated")
    if len(out) != body_len:
        raise _bad(f"body decompresses to {len(out)} bytes, header says {body_len}")
    return memoryview(bytes(out))


def decode(data: bytes, *, max_entries: int = L.MAX_INODES) -> tuple[list[Entry], list[Dirent]]:
    """Parse and validate a manifest; return (entries by ino - 1, dirents in canonical order).

    ``max_entries`` bounds inodes and dirents (each) below the format limit, so a reader can
    refuse a template too big for its memory before decompressing anything.
    """
    if not isinstance(data, bytes | bytearray | memoryview):
        raise _bad("not bytes")
    data = bytes(data)
    if not data.startswith(L.MAGIC):
        raise FormatError("not a vfs template manifest (bad magic)")
    if len(data) < L.HEADER_LEN:
        raise _bad(f"{len(data)} bytes, shorter than the header")
    (
        magic,
        version,
        header_len,
        incompat,
        _compat,
        n_ino,
        n_dir,
        n_xat,
        rsv1,
        heap_len,
        body_len,
        stored_len,
        rsv2,
    ) = L.HEADER.unpack_from(data, 0)
    if magic != L.MAGIC:
        raise FormatError("not a vfs template manifest (bad magic)")
    if version > L.VERSION:
        raise UnsupportedFeature(
            f"template manifest version {version} is newer than this reader ({L.VERSION})"
        )
    if version != L.VERSION:
        raise _bad(f"unknown version {version}")
    if incompat & ~L.INCOMPAT_KNOWN:
        unknown = incompat & ~L.INCOMPAT_KNOWN
        raise UnsupportedFeature(
            f"template manifest uses unknown incompatible features {unknown:#x}"
        )
    if header_len < L.HEADER_LEN or header_len > len(data):
        raise _bad(f"header length {header_len}")
    if rsv1 or rsv2:
        raise _bad("reserved header fields are not zero")
    if not 1 <= n_ino <= L.MAX_INODES or n_dir > L.MAX_DIRENTS or n_xat > L.MAX_XATTRS:
        raise _bad(f"absurd counts ({n_ino} inodes, {n_dir} dirents, {n_xat} xattrs)")
    if n_ino > max_entries or n_dir > max_entries:
        raise UnsupportedFeature(
            f"template has {max(n_ino, n_dir)} entries, more than this reader accepts "
            f"({max_entries})"
        )
    tables = n_ino * L.INODE.size + n_dir * L.DIRENT.size + n_xat * L.XATTR.size
    if body_len != tables + heap_len or body_len > L.MAX_BODY:
        raise _bad(f"body length {body_len} does not match its tables ({tables} + {heap_len})")
    body = _read_body(data, header_len, incompat, body_len, stored_len)
    return _decode_body(body, n_ino, n_dir, n_xat, body_len)


def _decode_body(body, n_ino: int, n_dir: int, n_xat: int, body_len: int):
    off_dir = n_ino * L.INODE.size
    off_xat = off_dir + n_dir * L.DIRENT.size
    cur = off_xat + n_xat * L.XATTR.size  # heap cursor: names, then targets, then xattrs

    raw = list(L.INODE.iter_unpack(body[:off_dir]))
    kinds: list[str] = []
    for i, (code, flags, tlen, mode, uid, gid, _nl, size, rdev, *_t, oid) in enumerate(raw):
        ino = i + 1
        kind = L.CODE_KINDS.get(code)
        if kind is None:
            raise _bad(f"inode {ino}: unknown kind {code}")
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
    for ino, nlen, rsv, vlen in L.XATTR.iter_unpack(body[off_xat : off_xat + n_xat * L.XATTR.size]):
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

    entries: list[Entry] = []
    for i, (_c, _f, _tl, mode, uid, gid, nlink, size, rdev, at, mt, ct, oid) in enumerate(raw):
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
                at,
                mt,
                ct,
                nlink,
                rdev,
                targets.get(ino),
                oid.hex() if kind == "reg" and size else None,
                MappingProxyType(xa) if xa else NO_XATTRS,
            )
        )
    return entries, dirents
