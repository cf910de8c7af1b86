"""Write a template out as a POSIX (pax) tar stream: ``vfsd template export``.

The inverse of :mod:`vfs.tree.tarsource`, for getting a template back onto a disk with ordinary
tools (``tar -x --xattrs``) and for proving round trips with them: numeric owners, full modes,
nanosecond mtime (PAX records; atime and ctime are written as the mtime, which is what a
template shows), xattrs (``SCHILY.xattr.*``, binary-safe), hard links (the first name carries the
content, later names are links to it), symlinks, fifos and device nodes. Sparse files are
written as GNU PAX sparse members, format 1.0 (what ``tar --sparse --format=posix`` writes and
GNU tar, bsdtar and :mod:`tarfile` read): only their data extents are stored, and ``tar -x``
re-creates the holes. Sockets cannot be put in a tar (GNU tar skips them too): they are left out
and counted. Contents are streamed object by object, never held whole, and each is checked
against its id as it goes, holes included (a mismatch stops the export with IntegrityError: the
tar written so far is incomplete).
"""

from __future__ import annotations

import hashlib
import io
import itertools
import logging
import os
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, BinaryIO

from vfs.errors import IntegrityError
from vfs.tree.entry import Entry, Extents
from vfs.tree.sink import HoleCheck
from vfs.tree.template import Template

log = logging.getLogger(__name__)

_ENC = "utf-8"
_ERR = "surrogateescape"
_CHUNK = 1 << 20
_TYPES = {
    "reg": tarfile.REGTYPE,
    "dir": tarfile.DIRTYPE,
    "lnk": tarfile.SYMTYPE,
    "fifo": tarfile.FIFOTYPE,
    "chr": tarfile.CHRTYPE,
    "blk": tarfile.BLKTYPE,
}


@dataclass
class ExportResult:
    members: int
    bytes: int  # content bytes written
    skipped_sockets: int


def _s(b: bytes) -> str:
    return b.decode(_ENC, _ERR)


def _ns_text(ns: int) -> str:
    sign = "-" if ns < 0 else ""
    sec, frac = divmod(abs(ns), 1_000_000_000)
    return f"{sign}{sec}.{frac:09d}"


def _object_chunks(source: Any, oid: str, size: int) -> Iterator[bytes]:
    """The bytes of one object in order, from ``iter_object`` (a remote) or ``read`` (a resolver
    or store), checked: exactly ``size`` bytes hashing to ``oid``. The last chunk is handed out
    only once the whole object has matched, so a bad object never completes a member."""
    if hasattr(source, "iter_object"):
        chunks: Iterator[bytes] = iter(source.iter_object(oid, expected_size=size))
    else:
        offsets = range(0, size, _CHUNK)
        chunks = (source.read(oid, off, _CHUNK, expected_size=size) for off in offsets)
    h = hashlib.sha256()
    n = 0
    for chunk in chunks:
        n += len(chunk)
        if n > size:
            raise IntegrityError(f"object {oid[:16]}… is longer than its entry")
        h.update(chunk)
        if n == size and h.hexdigest() != oid:
            # a remote's iter_object hands out raw bytes: nothing unverified leaves here
            raise IntegrityError(f"object {oid[:16]}… does not match its id")
        yield chunk
    if n != size:
        raise IntegrityError(f"object {oid[:16]}… is shorter than its entry")


def _data_only(chunks: Iterator[bytes], oid: str, extents: Extents) -> Iterator[bytes]:
    """The bytes of ``chunks`` that lie in ``extents``; every other byte must be zero."""
    holes = HoleCheck(extents, f"object {oid[:16]}… has data where its template entry has a hole")
    pos = 0
    i = 0
    for chunk in chunks:
        holes(chunk, pos)
        end = pos + len(chunk)
        while i < len(extents):
            off, n = extents[i]
            lo, hi = max(off, pos), min(off + n, end)
            if lo < hi:
                yield chunk[lo - pos : hi - pos]
            if off + n > end:
                break
            i += 1
        pos = end


def _last_after_all(parts: Iterator[bytes]) -> Iterator[bytes]:
    """``parts`` one behind: the last is handed out only once ``parts`` is exhausted, so every
    check in it (hash, holes) has run before a member can be complete. (tarfile stops reading
    at the member's size, which for a sparse file ends before the object does.)"""
    held = None
    for p in parts:
        if held is not None:
            yield held
        held = p
    if held is not None:
        yield held


class _Stream(io.RawIOBase):
    """A read-once stream over an iterator of byte strings (what ``tarfile.addfile`` reads)."""

    def __init__(self, parts: Iterator[bytes]) -> None:
        self.parts = parts
        self.buf = b""

    def readable(self) -> bool:
        return True

    def readinto(self, b) -> int:  # type: ignore[override]
        while not self.buf:
            nxt = next(self.parts, None)
            if nxt is None:
                return 0
            self.buf = nxt
        n = min(len(b), len(self.buf))
        b[:n] = self.buf[:n]
        self.buf = self.buf[n:]
        return n


def _sparse_map_block(e: Entry) -> bytes:
    """The data map that opens a PAX 1.0 sparse member: decimal numbers one a line (count, then
    offset and length of each extent, the last being ``size 0`` as GNU tar writes it), NUL-padded
    to a 512-byte block."""
    assert e.extents is not None
    pairs = [*e.extents, (e.size, 0)]
    text = f"{len(pairs)}\n" + "".join(f"{off}\n{n}\n" for off, n in pairs)
    raw = text.encode("ascii")
    return raw + bytes(-len(raw) % tarfile.BLOCKSIZE)


def _info(path: bytes, e: Entry) -> tarfile.TarInfo:
    ti = tarfile.TarInfo(_s(path) if path else ".")
    ti.type = _TYPES[e.kind]
    ti.mode = e.mode & 0o7777
    ti.uid, ti.gid = e.uid, e.gid
    ti.uname = ti.gname = ""
    ti.mtime = e.mtime_ns // 1_000_000_000
    ti.size = e.size if e.kind == "reg" else 0
    if e.kind == "lnk":
        ti.linkname = _s(e.target or b"")
    if e.kind in ("chr", "blk"):
        ti.devmajor, ti.devminor = os.major(e.rdev), os.minor(e.rdev)
    pax = {
        "mtime": _ns_text(e.mtime_ns),
        "atime": _ns_text(e.atime_ns),
        "ctime": _ns_text(e.ctime_ns),
    }
    for k, v in e.xattrs.items():
        pax["SCHILY.xattr." + _s(k)] = _s(v)
    ti.pax_headers = pax
    return ti


def export_tar(t: Template, source: Any, out: BinaryIO) -> ExportResult:
    """Write ``t`` to ``out`` as an uncompressed pax tar, contents from ``source`` (anything
    with ``iter_object(oid)`` or ``read(oid, offset, size)``)."""
    first_name: dict[int, bytes] = {}
    res = ExportResult(0, 0, 0)
    with tarfile.open(fileobj=out, mode="w|", format=tarfile.PAX_FORMAT, encoding=_ENC,
                      errors=_ERR) as tf:  # fmt: skip
        for path, e in t.walk():
            if e.kind == "sock":
                res.skipped_sockets += 1
                log.info("export: %s is a socket, which a tar cannot hold: left out", _s(path))
                continue
            ti = _info(path, e)
            if e.kind != "dir" and e.nlink > 1:
                if e.ino in first_name:
                    ti.type = tarfile.LNKTYPE
                    ti.linkname = _s(first_name[e.ino])
                    ti.size = 0
                    tf.addfile(ti)
                    res.members += 1
                    continue
                first_name[e.ino] = path
            if e.kind == "reg" and e.size > 0:
                assert e.oid is not None
                chunks = _object_chunks(source, e.oid, e.size)
                if e.extents is not None:
                    block = _sparse_map_block(e)
                    # GNU tar's convention: a stand-in name (so that a reader without sparse
                    # support extracts the raw member aside), the real one in GNU.sparse.name
                    ti.pax_headers.update(
                        {
                            "GNU.sparse.major": "1",
                            "GNU.sparse.minor": "0",
                            "GNU.sparse.name": ti.name,
                            "GNU.sparse.realsize": str(e.size),
                        }
                    )
                    ti.name = f"GNUSparseFile.0/{e.ino}"
                    ti.size = len(block) + sum(n for _, n in e.extents)
                    chunks = _last_after_all(
                        itertools.chain((block,), _data_only(chunks, e.oid, e.extents))
                    )
                tf.addfile(ti, io.BufferedReader(_Stream(chunks), _CHUNK))
                res.bytes += e.size
            else:
                tf.addfile(ti)
            res.members += 1
    return res
