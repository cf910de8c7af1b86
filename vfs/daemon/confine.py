"""Which VEE a calling process is confined to: the FUSE engine's defence against cross-VEE
access through file handles (``docs/vee-layer.md`` §3, "Isolation").

All VEE roots of the FUSE engine are one superblock, and the mount root (node 1, generation 0)
is always in the kernel's inode cache: a process with ``CAP_DAC_READ_SEARCH`` in the host's user
namespace can ``open_by_handle_at`` the mount root from inside its own VEE, and walk from there
into another VEE through dentries the kernel has cached, without the daemon being asked. What
the daemon always sees is the caller's pid. So every request that reveals content or changes
anything (open, opendir, readlink, xattrs, setattr and every namespace change) is checked: a
process whose root directory lies inside the mount is *confined* to the VEE that directory
belongs to, and gets EACCES on any node of another VEE (or the mount root). Lookups and
getattrs are not refused — a refused revalidation makes the kernel invalidate the dentry and
detach every mount below it, which would let one VEE unmount another's ``/proc`` — so a
confined process with that capability can still learn names and attributes it guesses; the
kernel engine (one superblock per VEE) closes that too.

The caller's root is read with ``statx(AT_STATX_DONT_SYNC)`` on ``/proc/<pid>/root``: from the
kernel's caches, never a request to this daemon (which is busy answering the caller: a stat
that needed it would deadlock). Answers are kept for a second per pid (a pid cannot be reused
within a second: the kernel hands out pids in order up to ``pid_max``).
"""

from __future__ import annotations

import ctypes
import errno
import os
import time
from typing import Final

from vfs.errors import FsError

_libc = ctypes.CDLL(None, use_errno=True)
_AT_EMPTY_PATH: Final = 0x1000
_AT_STATX_DONT_SYNC: Final = 0x4000
_STATX_INO: Final = 0x100
_STATX_SIZE: Final = 256  # struct statx, with its spare room
_libc.statx.argtypes = [
    ctypes.c_int,
    ctypes.c_char_p,
    ctypes.c_int,
    ctypes.c_uint,
    ctypes.c_void_p,
]

#: Not confined: the caller's root is outside this mount (a host process).
HOST: Final = None
TTL = 1.0


def root_identity(pid: int) -> tuple[int, int] | None:
    """(st_dev, st_ino) of process ``pid``'s root directory from the kernel's caches, or None
    if the process is gone."""
    try:
        fd = os.open(f"/proc/{pid}/root", os.O_PATH | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        buf = ctypes.create_string_buffer(_STATX_SIZE)
        flags = _AT_EMPTY_PATH | _AT_STATX_DONT_SYNC
        if _libc.statx(fd, b"", flags, _STATX_INO, buf) != 0:
            return None
        ino = int.from_bytes(buf.raw[32:40], "little")
        major = int.from_bytes(buf.raw[136:140], "little")
        minor = int.from_bytes(buf.raw[140:144], "little")
        return os.makedev(major, minor), ino
    finally:
        os.close(fd)


class Confinement:
    """Answers "may process ``pid`` touch inode ``ino``?" for one mount, with the view's
    ``confinement_of(root_ino)`` (the VEE a root directory belongs to) and
    ``visible_in(ino, vee)`` (whether a VEE may see an inode)."""

    def __init__(self, mount_dev: int, views: object) -> None:
        self.mount_dev = mount_dev
        self.views = views
        self._cache: dict[int, tuple[float, str | None]] = {}

    def confined_to(self, pid: int) -> str | None:
        """The name of the VEE process ``pid`` is confined to, or None (not confined)."""
        now = time.monotonic()
        hit = self._cache.get(pid)
        if hit is not None and hit[0] > now:
            return hit[1]
        vee = self._lookup(pid)
        if len(self._cache) > 4096:
            self._cache = {p: v for p, v in self._cache.items() if v[0] > now}
        self._cache[pid] = (now + TTL, vee)
        return vee

    def _lookup(self, pid: int) -> str | None:
        ident = root_identity(pid) if pid > 0 else None
        if ident is None or ident[0] != self.mount_dev:
            return HOST
        return self.views.confinement_of(ident[1])  # type: ignore[attr-defined]

    def check(self, pid: int, *inos: int) -> None:
        """EACCES unless every inode is visible to the VEE ``pid`` is confined to."""
        vee = self.confined_to(pid)
        if vee is HOST:
            return
        for ino in inos:
            if not self.views.visible_in(ino, vee):  # type: ignore[attr-defined]
                raise FsError(errno.EACCES, f"inode {ino} belongs to another VEE")
