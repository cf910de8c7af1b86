"""Keep the blocks of a mounted template image in memory (``mmap`` + ``mlock``).

Why: a template image holds only metadata (~200 bytes per entry: 4 MiB for 20,000 files), and
EROFS reads it one 4 KiB block at a time with no read-ahead (``erofs_bread`` ->
``read_mapping_folio``). On a cold cache every block a lookup needs is a synchronous trip
through the loop device (a request, a switch to its worker, a buffered read of the image
file); a cold ``find``+stat of 20k files spent more time there than overlayfs over ext4 spends
in all its inode reads. Pinned, EROFS finds every block in the page cache, also after memory
pressure or ``drop_caches``: a cold VEE pays only for its data. The cost is the image's size
in locked memory, per mounted template, charged to the daemon (docs/kernel-engine.md §5).

What is pinned is the page cache EROFS itself reads: the loop device's (``/dev/loopN``, a
shared read-only mapping of the block device) or, file-backed, the image file's. The mapping
holds the device open, so an autoclear loop device detaches only when both the mount and the
pin are gone; :meth:`Pin.close` (or the daemon's death) drops it.

Where ``mlock`` is refused (no CAP_IPC_LOCK and a small RLIMIT_MEMLOCK) the image is not
pinned and everything works as before, only colder; that is logged once.
"""

from __future__ import annotations

import ctypes
import logging
import os

log = logging.getLogger(__name__)

_libc = ctypes.CDLL(None, use_errno=True)
_libc.mmap.restype = ctypes.c_void_p
_libc.mmap.argtypes = [
    ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long
]  # fmt: skip
_libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
_libc.mlock.argtypes = [ctypes.c_void_p, ctypes.c_size_t]

PROT_READ = 0x1
MAP_SHARED = 0x1
MAP_FAILED = ctypes.c_void_p(-1).value

_refused_logged = False


class Pin:
    """``length`` bytes of ``path`` mapped and locked in memory until :meth:`close`."""

    def __init__(self, path: str, addr: int, length: int) -> None:
        self.path, self._addr, self.length = path, addr, length

    def close(self) -> None:
        if self._addr:
            _libc.munmap(ctypes.c_void_p(self._addr), self.length)  # unlocks too
            self._addr = 0

    def __repr__(self) -> str:
        return f"Pin({self.path!r}, {self.length} bytes)"


def pin(path: str) -> Pin | None:
    """Map ``path`` (a block device or a regular file) read-only and lock all of it in memory
    (reading it in, sequentially, now). None where the kernel refuses (logged once)."""
    global _refused_logged
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as e:
        log.info("not pinning %s: %s", path, e.strerror)
        return None
    try:
        length = os.lseek(fd, 0, os.SEEK_END)
        if length <= 0:
            return None
        addr = _libc.mmap(None, length, PROT_READ, MAP_SHARED, fd, 0)
        if addr is None or addr == MAP_FAILED:
            err = ctypes.get_errno()
            raise OSError(err, os.strerror(err))
        if _libc.mlock(ctypes.c_void_p(addr), length) != 0:
            err = ctypes.get_errno()
            _libc.munmap(ctypes.c_void_p(addr), length)
            raise OSError(err, os.strerror(err))
    except OSError as e:
        if not _refused_logged:
            _refused_logged = True
            log.warning("template images are not kept in memory (mlock of %s: %s): cold "
                        "metadata reads go to the disk", path, e.strerror)  # fmt: skip
        return None
    finally:
        os.close(fd)  # the mapping keeps the file (and a loop device) open
    return Pin(path, addr, length)
