"""Write a template out as a POSIX (pax) tar stream: ``vfsd template export``.

The inverse of :mod:`vfs.tree.tarsource`, for getting a template back onto a disk with ordinary
tools (``tar -x --xattrs``) and for proving round trips with them: numeric owners, full modes,
nanosecond mtime/atime/ctime (PAX records), xattrs (``SCHILY.xattr.*``, binary-safe), hard links
(the first name carries the content, later names are links to it), symlinks, fifos and device
nodes. Sockets cannot be put in a tar (GNU tar skips them too): they are left out and counted.
Contents are streamed object by object, never held whole, and each is checked against its id as
it goes (a mismatch stops the export with IntegrityError: the tar written so far is incomplete).
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, BinaryIO

from vfs.errors import IntegrityError
from vfs.tree.entry import Entry
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


class _ObjectReader(io.RawIOBase):
    """A read-once stream over one object, from ``iter_object`` (a remote) or ``read`` (a
    resolver or store), checking that it is exactly ``size`` bytes long."""

    def __init__(self, source: Any, oid: str, size: int) -> None:
        self.size = size
        self.pos = 0
        self.buf = b""
        if hasattr(source, "iter_object"):
            self.chunks: Iterator[bytes] = iter(source.iter_object(oid))
        else:
            self.chunks = (source.read(oid, off, _CHUNK) for off in range(0, size, _CHUNK))
        self.oid = oid
        self.hash = hashlib.sha256()

    def readable(self) -> bool:
        return True

    def readinto(self, b) -> int:  # type: ignore[override]
        if not self.buf:
            self.buf = next(self.chunks, b"")
            if not self.buf:
                if self.pos != self.size:
                    raise IntegrityError(f"object {self.oid[:16]}… is shorter than its entry")
                return 0
        n = min(len(b), len(self.buf))
        b[:n] = self.buf[:n]
        self.hash.update(self.buf[:n])
        self.buf = self.buf[n:]
        self.pos += n
        if self.pos > self.size:
            raise IntegrityError(f"object {self.oid[:16]}… is longer than its entry")
        if self.pos == self.size and self.hash.hexdigest() != self.oid:
            # a remote's iter_object hands out raw bytes: nothing unverified leaves here
            raise IntegrityError(f"object {self.oid[:16]}… does not match its id")
        return n


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
                tf.addfile(ti, io.BufferedReader(_ObjectReader(source, e.oid, e.size), _CHUNK))
                res.bytes += e.size
            else:
                tf.addfile(ti)
            res.members += 1
    return res
