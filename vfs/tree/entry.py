"""One entry of a template: the immutable metadata of one inode, as the manifest records it.

Kept in its own module so the manifest codec and the template index share it without importing
each other. Instances are created once at template load and shared by every lookup, so they are
frozen (nobody may change the template under a VEE) and slotted (20,000+ of them per template).
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


@dataclass(frozen=True, slots=True)
class Entry:
    """Metadata of one template inode (hard links: several names, one Entry)."""

    ino: int  # stable within a template; 1 = root; hard links share one ino
    kind: str  # 'reg' 'dir' 'lnk' 'fifo' 'chr' 'blk' 'sock'
    mode: int  # full st_mode (file-type bits | permission bits incl. suid/sgid/sticky)
    uid: int
    gid: int
    size: int  # reg: content length; lnk: len(target); dir: as recorded; others 0
    atime_ns: int
    mtime_ns: int
    ctime_ns: int
    nlink: int  # non-dir: number of names in the template; dir: 2 + number of subdirs
    rdev: int  # device number for chr/blk, else 0
    target: bytes | None  # symlink target (lnk only)
    oid: str | None  # content object id (SHA-256 hex) for non-empty regular files
    xattrs: Mapping[bytes, bytes]

    def __hash__(self) -> int:
        # xattrs is a read-only mapping (unhashable): hash what identifies an entry in practice
        return hash((self.ino, self.kind, self.mode, self.size, self.mtime_ns, self.oid))

    @property
    def is_dir(self) -> bool:
        return self.kind == "dir"
