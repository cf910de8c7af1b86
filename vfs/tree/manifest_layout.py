"""Byte layout of the template manifest (format version 2): structures and limits only.

The prose, the invariants and the crash story are in ``docs/template-format.md``; the logic that
reads and writes these structures is :mod:`vfs.tree.manifest`. All integers are little-endian.
"""

from __future__ import annotations

import struct

MAGIC = b"VFSTMPL\n"
VERSION = 2

#: Header (64 bytes): magic, version, reserved (u16), incompat_features, inode_count,
#: dirent_count, xattr_count, extent_count, heap_len, reserved (24 bytes).
HEADER = struct.Struct("<8sHHIIIIIQ24s")
HEADER_LEN = HEADER.size  # 64
RESERVED_TAIL = bytes(24)

#: Incompatible feature bits: a reader that does not know a set bit must refuse the manifest.
#: A writer sets a bit only when the template uses the feature, so a template that does not
#: use it stays readable by readers that predate it.
INCOMPAT_SPARSE = 1 << 0  # some regular files carry data extents (holes)
INCOMPAT_KNOWN = INCOMPAT_SPARSE
INCOMPAT_NAMES = {INCOMPAT_SPARSE: "sparse files"}

#: Inode record (ino = index + 1): kind, flags, target_len, mode, uid, gid, nlink, size, rdev,
#: mtime_ns, reserved (8 bytes, 0), oid (32 raw bytes of SHA-256, zero when absent). No atime
#: and no ctime: see the doc.
INODE = struct.Struct("<BBHIIIIQQqq32s")
FLAG_HAS_OID = 1 << 0
FLAG_SPARSE = 1 << 1  # the file's data extents are in the extent table (needs INCOMPAT_SPARSE)
FLAGS_KNOWN = FLAG_HAS_OID | FLAG_SPARSE

#: Directory entry: parent ino, child ino, name_len, reserved (0). The name is in the heap.
DIRENT = struct.Struct("<IIHH")

#: Extended attribute: ino, name_len, reserved (0), value_len. Name then value are in the heap.
XATTR = struct.Struct("<IHHI")

#: Data extent of a sparse regular file: ino, reserved (0), offset, length (bytes).
EXTENT = struct.Struct("<IIQQ")

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
MAX_EXTENTS = 1 << 24
MAX_BODY = 1 << 30  # bytes after the header
MAX_NAME = 255  # bytes of one name (NAME_MAX)
MAX_TARGET = 4095  # bytes of a symlink target (PATH_MAX - 1)
MAX_DEPTH = 1024  # directory nesting below the root
MAX_FILE_SIZE = 1 << 48  # bytes of one regular file (256 TiB)
MAX_XATTR_NAME = 255  # XATTR_NAME_MAX
MAX_XATTR_VALUE = 65536  # XATTR_SIZE_MAX
MAX_XATTR_LIST = 65536  # total of name lengths + 1 per inode (XATTR_LIST_MAX)
XATTR_NAMESPACES = (b"user.", b"trusted.", b"security.", b"system.")
#: Reserved: overlayfs's markers (whiteouts, opaque and redirect directories, metacopy). In a
#: private layer they mean something, and the kernel engine reads them in its images: no
#: template may carry one (publish refuses them, the decoder too).
RESERVED_XATTR_PREFIX = b"trusted.overlay."
BAD_ID = 0xFFFFFFFF  # (uid_t)-1 means "no change" to chown: never a real owner
