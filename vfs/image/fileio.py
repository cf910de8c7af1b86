"""Byte access to image files: one small class per kind of file, all through os.pread/os.pwrite,
and :func:`probe_format` (which format a file is, from its first bytes).

The :class:`Image` core talks to its file only through :class:`ImageFile`, so tests can wrap it
(e.g. record every pwrite/fsync to replay power failures) without touching the core.
"""

from __future__ import annotations

import errno
import fcntl
import os
import stat

from vfs.errors import BusyError, UsageError

_PUNCH_HOLE, _KEEP_SIZE = 0x02, 0x01


def _load_fallocate():  # type: ignore[no-untyped-def]
    """libc fallocate(2) for hole punching (os has only posix_fallocate); None if absent."""
    try:
        import ctypes

        fn = ctypes.CDLL(None, use_errno=True).fallocate
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
    fn.restype = ctypes.c_int
    return fn


_fallocate = _load_fallocate()


def open_file(path: str, flags: int, *, block_ok: bool = True) -> int:
    """``os.open`` for image files that never blocks and never opens what is not a disk: the
    open itself is non-blocking (a FIFO would wait for a writer forever), and anything but a
    regular file (or a block device, when ``block_ok``) is refused with a clear error."""
    try:
        fd = os.open(path, flags | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC, 0o644)
    except OSError as e:
        if e.errno == errno.ENXIO:  # a FIFO without a reader, opened for writing
            raise UsageError(f"{path}: not a regular file") from None
        raise  # FileNotFoundError and the like: the caller names them
    try:
        mode = os.fstat(fd).st_mode
        if not (stat.S_ISREG(mode) or (block_ok and stat.S_ISBLK(mode))):
            what = "a regular file or a block device" if block_ok else "a regular file"
            raise UsageError(f"{path}: not {what}")
        fl = fcntl.fcntl(fd, fcntl.F_GETFL)
        fcntl.fcntl(fd, fcntl.F_SETFL, fl & ~os.O_NONBLOCK)
    except BaseException:
        os.close(fd)
        raise
    return fd


def fd_size(fd: int) -> int:
    """Bytes in a file or block device (fstat says 0 for block devices)."""
    st = os.fstat(fd)
    if stat.S_ISBLK(st.st_mode):
        return os.lseek(fd, 0, os.SEEK_END)
    return st.st_size


class ImageFile:
    """An open image file: positional reads/writes, fsync, size, and its lock (flock)."""

    def __init__(self, path: str, *, writable: bool, create: bool = False) -> None:
        flags = os.O_RDWR if writable else os.O_RDONLY
        if create:
            flags |= os.O_CREAT | os.O_EXCL
        self.path = path
        if create:
            self.fd = os.open(path, flags | os.O_CLOEXEC, 0o644)
        else:
            self.fd = open_file(path, flags)
        # One writer or many readers (as QEMU's image locking): a reader of an image that is
        # being written could follow clusters the writer has freed and reused since.
        try:
            fcntl.flock(self.fd, (fcntl.LOCK_EX if writable else fcntl.LOCK_SH) | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(self.fd)
            what = "in use" if writable else "being written by another process"
            raise BusyError(f"{path}: image is {what}") from None

    def pread(self, size: int, offset: int) -> bytes:
        return os.pread(self.fd, size, offset)

    def preadv(self, buf: memoryview, offset: int) -> int:
        """Read into ``buf`` (no intermediate object); returns the bytes read."""
        return os.preadv(self.fd, [buf], offset)

    def pwrite(self, data: bytes, offset: int) -> None:
        view = memoryview(data)
        while view:
            n = os.pwrite(self.fd, view, offset)
            view = view[n:]
            offset += n

    def fsync(self) -> None:
        os.fsync(self.fd)

    def punch(self, offset: int, length: int) -> None:
        """Give a range's blocks back to the file system (reads return zeros); best effort."""
        if _fallocate is not None:
            _fallocate(self.fd, _PUNCH_HOLE | _KEEP_SIZE, offset, length)

    def allocate(self, offset: int, length: int) -> bool:
        """Reserve blocks for a range (fallocate mode 0: the file grows, reads give zeros).
        Best effort and never emulated by writing zeros; returns whether it worked."""
        if _fallocate is None:
            return False
        return _fallocate(self.fd, 0, offset, length) == 0

    def size(self) -> int:
        return fd_size(self.fd)

    def truncate(self, size: int) -> None:
        os.ftruncate(self.fd, size)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


class RawFile:
    """A raw disk image (used as a backing file, or as convert/compare input and output)."""

    format = "raw"

    def __init__(self, path: str, *, writable: bool = False, create_size: int | None = None):
        self.path = path
        if create_size is not None:
            # an output: a regular file, created or emptied (holes must read as zeros)
            fd = open_file(path, os.O_RDWR | os.O_CREAT, block_ok=False)
            try:
                os.ftruncate(fd, 0)
                os.ftruncate(fd, create_size)
            except BaseException:
                os.close(fd)
                raise
        else:
            try:
                fd = open_file(path, os.O_RDWR if writable else os.O_RDONLY)
            except FileNotFoundError:
                raise UsageError(f"{path}: no such file") from None
        self.fd = fd
        self.size = fd_size(fd)
        self.writable = writable or create_size is not None
        self._extents: list[tuple[int, int, bool]] | None = None

    def read(self, offset: int, length: int) -> bytes:
        data = os.pread(self.fd, length, offset) if offset < self.size else b""
        if len(data) < length:
            data += bytes(length - len(data))
        return data

    def readinto(self, offset: int, buf: bytearray | memoryview) -> int:
        """Fill ``buf`` from ``offset`` (zeros past the end of the file); returns ``len(buf)``."""
        mv = memoryview(buf).cast("B")
        got = os.preadv(self.fd, [mv], offset) if offset < self.size else 0
        if got < len(mv):
            mv[got:] = bytes(len(mv) - got)
        return len(mv)

    def write(self, offset: int, data: bytes) -> None:
        os.pwrite(self.fd, data, offset)
        self.size = max(self.size, offset + len(data))

    def write_zeroes(self, offset: int, length: int) -> None:
        end = offset + length
        while offset < end:
            n = min(end - offset, 1 << 20)
            os.pwrite(self.fd, bytes(n), offset)
            offset += n
        self.size = max(self.size, end)

    def resize(self, size: int) -> None:
        os.ftruncate(self.fd, size)
        self.size = size

    def flush(self) -> None:
        os.fsync(self.fd)

    def extents(self) -> list[tuple[int, int, bool]]:
        """(start, length, is_data) covering the file, from SEEK_DATA/SEEK_HOLE (computed once
        for a read-only file: a backing file or a convert source does not change under us)."""
        if self._extents is not None:
            return self._extents
        out = self._scan_extents()
        if not self.writable:
            self._extents = out
        return out

    def _scan_extents(self) -> list[tuple[int, int, bool]]:
        out: list[tuple[int, int, bool]] = []
        pos = 0
        while pos < self.size:
            try:
                data = os.lseek(self.fd, pos, os.SEEK_DATA)
            except OSError:
                data = self.size
            if data > pos:
                out.append((pos, min(data, self.size) - pos, False))
            if data >= self.size:
                break
            hole = os.lseek(self.fd, data, os.SEEK_HOLE)
            out.append((data, hole - data, True))
            pos = hole
        return out

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __enter__(self) -> RawFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


#: First bytes of a qcow2 image (qemu's "QFI\xfb").
QCOW2_MAGIC = b"QFI\xfb"


def probe_format(path: str) -> str:
    """'vimg', 'qcow2' or 'raw' from the first bytes of the file (no other parsing)."""
    from vfs.image.layout import HEADER_COPY_OFFSETS, MAGIC

    try:
        fd = open_file(path, os.O_RDONLY)
    except FileNotFoundError:
        raise UsageError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise UsageError(f"{path}: is a directory") from None
    try:
        head = os.pread(fd, max(HEADER_COPY_OFFSETS) + 8, 0)
    finally:
        os.close(fd)
    # Any header copy may hold the current header (a torn write can damage the others).
    if any(head[o : o + 8] == MAGIC for o in HEADER_COPY_OFFSETS):
        return "vimg"
    if head[:4] == QCOW2_MAGIC:
        return "qcow2"
    return "raw"
