"""One entry of a template: the immutable metadata of one inode, as the manifest records it.

Kept in its own module so the manifest codec and the template index share it without importing
each other. Instances are created once at template load and shared by every lookup, so they are
frozen (nobody may change the template under a VEE) and slotted (20,000+ of them per template).

A template records no atime (it is not part of a template's identity: reading a source tree
must not change its digest); :attr:`Entry.atime_ns` is the mtime, as CernVM-FS presents it.
"""

from __future__ import annotations

import stat
from collections.abc import Mapping
from dataclasses import dataclass

#: Entry kinds and the file-type bits of ``st_mode`` each one must carry.
KIND_TO_IFMT: dict[str, int] = {
    "reg": stat.S_IFREG,
    "dir": stat.S_IFDIR,
    "lnk": stat.S_IFLNK,
    "fifo": stat.S_IFIFO,
    "chr": stat.S_IFCHR,
    "blk": stat.S_IFBLK,
    "sock": stat.S_IFSOCK,
}
IFMT_TO_KIND: dict[int, str] = {v: k for k, v in KIND_TO_IFMT.items()}

ROOT_INO = 1

#: Data extents of a sparse file: ``(offset, length)`` pairs, sorted, each non-empty, with a hole
#: of at least one byte between two of them, inside ``[0, size)``.
Extents = tuple[tuple[int, int], ...]


@dataclass(frozen=True, slots=True)
class Entry:
    """Metadata of one template inode (hard links: several names, one Entry)."""

    ino: int  # stable within a template; 1 = root; hard links share one ino
    kind: str  # 'reg' 'dir' 'lnk' 'fifo' 'chr' 'blk' 'sock'
    mode: int  # full st_mode (file-type bits | permission bits incl. suid/sgid/sticky)
    uid: int
    gid: int
    size: int  # reg: content length; lnk: len(target); dir: as recorded; others 0
    mtime_ns: int
    nlink: int  # non-dir: number of names in the template; dir: 2 + number of subdirs
    rdev: int  # device number for chr/blk, else 0
    target: bytes | None  # symlink target (lnk only)
    oid: str | None  # content object id (SHA-256 hex) for non-empty regular files
    xattrs: Mapping[bytes, bytes]
    #: reg only: None = fully allocated; else the data extents, the rest being holes (zeros)
    extents: Extents | None = None

    def __hash__(self) -> int:
        # xattrs is a read-only mapping (unhashable): hash what identifies an entry in practice
        return hash((self.ino, self.kind, self.mode, self.size, self.mtime_ns, self.oid))

    @property
    def is_dir(self) -> bool:
        return self.kind == "dir"

    @property
    def atime_ns(self) -> int:
        """Templates keep no atime: a view shows the mtime (docs/template-format.md)."""
        return self.mtime_ns

    @property
    def ctime_ns(self) -> int:
        """Templates keep no ctime either (nothing can set it, so it only records when the
        source was made): a view shows the mtime, as EROFS images do."""
        return self.mtime_ns

    @property
    def data_extents(self) -> Extents:
        """Where the file's bytes are allocated: its extents, or all of it when not sparse."""
        if self.extents is not None:
            return self.extents
        return ((0, self.size),) if self.size else ()

    @property
    def blocks(self) -> int:
        """``st_blocks`` (512-byte units): a sparse file counts its data extents only."""
        if self.extents is None:
            return (self.size + 511) // 512
        return sum((n + 511) // 512 for _, n in self.extents)
