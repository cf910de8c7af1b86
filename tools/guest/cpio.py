"""A writer of the cpio "newc" format, the one the Linux kernel unpacks as an initramfs.

No cpio tool is needed: the format is a 110-byte ASCII header per entry, the name, the data, each
padded to 4 bytes, and a last entry named ``TRAILER!!!`` (the kernel's own reference is
``Documentation/driver-api/early-userspace/buffer-format.rst``)::

    Byte 0 - 5     magic "070701"
    then 13 fields of 8 ASCII hex digits each:
                   ino, mode, uid, gid, nlink, mtime, filesize,
                   devmajor, devminor, rdevmajor, rdevminor,
                   namesize (including the trailing NUL), check (0 for newc)
    Byte 110 -     name, NUL, zero padding to a multiple of 4 (counted from the header start)
    then           filesize bytes of data (a symlink's data is its target), padding to 4

Entries are written in the order given; a directory must come before what it holds (the kernel
creates entries as it meets them). Everything is owned by root with a fixed mtime, so the same
inputs give the same bytes (a reproducible initramfs, and a cache key that means something).
"""

from __future__ import annotations

import stat
from typing import BinaryIO

MAGIC = b"070701"
TRAILER = "TRAILER!!!"
HEADER_SIZE = 110
_MAX_FIELD = 0xFFFFFFFF


def _pad(n: int) -> bytes:
    return b"\0" * (-n % 4)


class NewcWriter:
    """Write entries to a binary stream; call :meth:`close` (or use ``with``) for the trailer.

    Names are relative paths without a leading ``/`` (``bin/busybox``), as the kernel expects.
    """

    def __init__(self, out: BinaryIO, mtime: int = 0) -> None:
        self._out = out
        self._mtime = mtime
        self._ino = 1
        self._names: set[str] = set()
        self._closed = False

    def __enter__(self) -> NewcWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        if exc[0] is None:
            self.close()

    # -- entry kinds ---------------------------------------------------------------------------

    def directory(self, name: str, mode: int = 0o755) -> None:
        self._entry(name, stat.S_IFDIR | mode, b"", nlink=2)

    def file(self, name: str, data: bytes, mode: int = 0o644) -> None:
        self._entry(name, stat.S_IFREG | mode, data)

    def symlink(self, name: str, target: str) -> None:
        self._entry(name, stat.S_IFLNK | 0o777, target.encode())

    def char_device(self, name: str, major: int, minor: int, mode: int = 0o600) -> None:
        self._entry(name, stat.S_IFCHR | mode, b"", rdev=(major, minor))

    def close(self) -> None:
        if self._closed:
            return
        self._write(TRAILER, 0, b"", ino=0, nlink=1, rdev=(0, 0))
        self._closed = True

    # -- the format ----------------------------------------------------------------------------

    def _entry(
        self, name: str, mode: int, data: bytes, nlink: int = 1, rdev: tuple[int, int] = (0, 0)
    ) -> None:
        if self._closed:
            raise ValueError("cpio archive already closed")
        if not name or name.startswith("/") or ".." in name.split("/") or "\0" in name:
            raise ValueError(f"bad cpio entry name {name!r}")
        if name == TRAILER or name in self._names:
            raise ValueError(f"duplicate cpio entry {name!r}")
        self._names.add(name)
        self._write(name, mode, data, ino=self._ino, nlink=nlink, rdev=rdev)
        self._ino += 1

    def _write(
        self, name: str, mode: int, data: bytes, *, ino: int, nlink: int, rdev: tuple[int, int]
    ) -> None:
        encoded = name.encode() + b"\0"
        if len(data) > _MAX_FIELD:
            raise ValueError(f"{name}: too large for newc ({len(data)} bytes)")
        fields = (
            ino, mode, 0, 0, nlink, self._mtime, len(data),
            0, 0, rdev[0], rdev[1], len(encoded), 0,
        )  # fmt: skip
        header = MAGIC + b"".join(b"%08X" % f for f in fields)
        assert len(header) == HEADER_SIZE
        self._out.write(header + encoded + _pad(HEADER_SIZE + len(encoded)))
        self._out.write(data + _pad(len(data)))


def read_newc(blob: bytes) -> list[tuple[str, int, bytes, tuple[int, int]]]:
    """Parse a newc archive into (name, mode, data, rdev) entries, stopping at the trailer.

    The reverse of :class:`NewcWriter`, for tests and for checking a built initramfs; raises
    ValueError on anything malformed rather than reading past the end.
    """
    entries = []
    pos = 0
    while True:
        header = blob[pos : pos + HEADER_SIZE]
        if len(header) < HEADER_SIZE or header[:6] != MAGIC:
            raise ValueError(f"bad cpio header at offset {pos}")
        try:
            f = [int(header[6 + 8 * i : 14 + 8 * i], 16) for i in range(13)]
        except ValueError:
            raise ValueError(f"bad cpio header field at offset {pos}") from None
        mode, filesize, rdev, namesize = f[1], f[6], (f[9], f[10]), f[11]
        name_end = pos + HEADER_SIZE + namesize
        if namesize < 1 or name_end > len(blob) or blob[name_end - 1] != 0:
            raise ValueError(f"bad cpio name at offset {pos}")
        name = blob[pos + HEADER_SIZE : name_end - 1].decode()
        data_start = name_end + (-(HEADER_SIZE + namesize) % 4)
        data_end = data_start + filesize
        if data_end > len(blob):
            raise ValueError(f"cpio entry {name!r} runs past the end")
        if name == TRAILER:
            return entries
        entries.append((name, mode, blob[data_start:data_end], rdev))
        pos = data_end + (-filesize % 4)
