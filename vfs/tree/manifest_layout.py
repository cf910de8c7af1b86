"""Byte layout of the template manifest (format version 1): structures and limits only.

The prose, the invariants and the crash story are in ``docs/template-format.md``; the logic that
reads and writes these structures is :mod:`vfs.tree.manifest`. All integers are little-endian.
"""

from __future__ import annotations

import struct

MAGIC = b"VFSTMPL\n"
VERSION = 1

#: Header: magic, version, header_len, incompat, compat, inode_count, dirent_count,
#: xattr_count, reserved, heap_len, body_len, stored_len, reserved.
HEADER = struct.Struct("<8sHHIIIIIIQQQI")
HEADER_LEN = HEADER.size  # 64

#: Incompatible feature bits: a reader that does not know a set bit must refuse the manifest.
INCOMPAT_ZSTD = 1 << 0  # the body is one zstd frame
INCOMPAT_KNOWN = INCOMPAT_ZSTD
#: Compatible feature bits: unknown ones are ignored (none defined in version 1).
COMPAT_KNOWN = 0

#: Inode record (ino = index + 1): kind, flags, target_len, mode, uid, gid, nlink, size, rdev,
#: atime_ns, mtime_ns, ctime_ns, oid (32 raw bytes of SHA-256, zero when absent).
INODE = struct.Struct("<BBHIIIIQQqqq32s")
FLAG_HAS_OID = 1 << 0
FLAGS_KNOWN = FLAG_HAS_OID

#: Directory entry: parent ino, child ino, name_len, reserved (0). The name is in the heap.
DIRENT = struct.Struct("<IIHH")

#: Extended attribute: ino, name_len, reserved (0), value_len. Name then value are in the heap.
XATTR = struct.Struct("<IHHI")

KIND_CODES: dict[str, int] = {
    "reg": 1,
    "dir": 2,
    "lnk": 3,
    "fifo": 4,
    "chr": 5,
    "blk": 6,
    "sock": 7,
}
CODE_KINDS: dict[int, str] = {v: k for k, v in KIND_CODES.items()}

# -- format limits (a manifest beyond them is refused as hostile) ------------------------------
MAX_INODES = 1 << 24
MAX_DIRENTS = 1 << 24
MAX_XATTRS = 1 << 24
MAX_BODY = 1 << 30  # uncompressed body bytes
MAX_NAME = 255  # bytes of one name (NAME_MAX)
MAX_TARGET = 4095  # bytes of a symlink target (PATH_MAX - 1)
MAX_DEPTH = 1024  # directory nesting below the root
MAX_FILE_SIZE = 1 << 48  # bytes of one regular file (256 TiB)
MAX_XATTR_NAME = 255  # XATTR_NAME_MAX
MAX_XATTR_VALUE = 65536  # XATTR_SIZE_MAX
MAX_XATTR_LIST = 65536  # total of name lengths + 1 per inode (XATTR_LIST_MAX)
XATTR_NAMESPACES = (b"user.", b"trusted.", b"security.", b"system.")
BAD_ID = 0xFFFFFFFF  # (uid_t)-1 means "no change" to chown: never a real owner
