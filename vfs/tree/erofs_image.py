"""A template as an EROFS image of metadata only: the kernel engine's lower layer.

Every entry of the manifest becomes an EROFS inode with its kind, mode, owner, mtime (EROFS
shows it as atime and ctime too, as templates do), xattrs, link count and device number; hard
links are one inode under several names. A non-empty regular file becomes an overlayfs
*metacopy stub*: a chunk-based inode of the file's size whose only chunks are holes, with
``trusted.overlay.metacopy`` (empty: no fs-verity digest) and ``trusted.overlay.redirect =
/<ab>/<id>``, so an overlay mount with the store's ``objects/`` (and vfsd's FUSE data layer)
as data-only lower layers reads the file's bytes from the object file (``docs/kernel-engine.md``).
Templates never carry ``trusted.overlay.*`` xattrs (publish refuses them), so every overlay
marker in an image is one this module wrote.

Written directly, not with ``mkfs.erofs``: the manifest is already the tree, so building a
staging directory of stubs (20,000 creates, truncates, chowns, setxattrs, utimes) to have it
read back would cost more than the image, and a staging file system limits xattr sizes (ext4:
one block) and needs root. The writer is deterministic: the same template gives the same bytes.

Layout (``docs/kernel-engine.md`` "Template images" has the table)::

    0      1024  vfs image header: magic, version, template digest, SHA-256 of the rest
    1024    128  EROFS superblock (meta_blkaddr 0, xattr_blkaddr 0, 4 KiB blocks)
    1152     ..  inodes (extended, 64 bytes + inline xattrs + inline tail), root first
    ..       ..  directory and long-symlink blocks (4 KiB-aligned)

The header makes the cached image self-checking: :func:`check_image` refuses an image whose
digest, writer version or checksum is wrong, and the cache rebuilds it (an image is derived
data, never fetched from anywhere).
"""

from __future__ import annotations

import hashlib
import logging
import os
import stat
import struct
from dataclasses import dataclass
from pathlib import Path

from vfs.durable import atomic_writer
from vfs.errors import FormatError, UnsupportedFeature
from vfs.tree.entry import ROOT_INO, Entry
from vfs.tree.template import Template

log = logging.getLogger(__name__)

# -- the vfs header in the first 1024 bytes (EROFS leaves them to us) ---------------------------
HEADER_MAGIC = b"VFSEROFS"
#: The writer's layout version: an image of another version is rebuilt (the cache key is the
#: template digest; this makes a changed writer take effect on existing caches).
WRITER_VERSION = 1
HEADER = struct.Struct("<8sII32s32sQ")  # magic, version, flags, digest, sha256(rest), length
HEADER_SIZE = 1024

# -- EROFS on-disk constants (linux fs/erofs/erofs_fs.h) -----------------------------------------
EROFS_MAGIC = 0xE0F5E1E2
SUPER_OFFSET = 1024
BLKSZ_BITS = 12
BLOCK = 1 << BLKSZ_BITS
FEATURE_COMPAT_MTIME = 0x2
FEATURE_INCOMPAT_CHUNKED_FILE = 0x4
SUPERBLOCK = struct.Struct("<IIIBBHQQIIII16s16sIHHHBBIQB23s")
assert SUPERBLOCK.size == 128
#: extended inode: format, xattr_icount, mode, nb (0), size, i_u, ino, uid, gid, mtime,
#: mtime_nsec, nlink, reserved[16]
INODE_EXT = struct.Struct("<HHHHQIIIIQII16s")
assert INODE_EXT.size == 64
LAYOUT_FLAT_PLAIN = 0
LAYOUT_FLAT_INLINE = 2
LAYOUT_CHUNK_BASED = 4
#: chunk format: chunk size = block << 31 (8 TiB): one 4-byte "null" block-map entry covers a
#: file, and a hole is all an overlay stub needs
CHUNK_BLKBITS = 31
CHUNK_BITS = BLKSZ_BITS + CHUNK_BLKBITS
NULL_ADDR = 0xFFFFFFFF
DIRENT = struct.Struct("<QHBB")
assert DIRENT.size == 12
FT = {"reg": 1, "dir": 2, "chr": 3, "blk": 4, "fifo": 5, "sock": 6, "lnk": 7}
XATTR_IBODY_HEADER = 12
XATTR_ENTRY = struct.Struct("<BBH")
#: name prefix -> EROFS xattr name index (the whole name for the two ACLs)
XATTR_PREFIXES: tuple[tuple[bytes, int], ...] = (
    (b"user.", 1),
    (b"system.posix_acl_access", 2),
    (b"system.posix_acl_default", 3),
    (b"trusted.", 4),
    (b"security.", 6),
)
#: inline data (directory tails, symlink targets) at most this long; longer goes to blocks
INLINE_MAX = BLOCK // 2

METACOPY_XATTR = b"trusted.overlay.metacopy"
REDIRECT_XATTR = b"trusted.overlay.redirect"
OVERLAY_PREFIX = b"trusted.overlay."


def data_path(oid: str) -> bytes:
    """Where an object is in a data-only layer: what a stub's redirect names."""
    return f"/{oid[:2]}/{oid}".encode()


@dataclass
class ImageInfo:
    digest: str
    length: int
    inodes: int
    sha256: str


def _align(n: int, a: int) -> int:
    return (n + a - 1) // a * a


def _encode_dev(rdev: int, path: str) -> int:
    """The kernel's ``new_encode_dev``: 12 bits of major, 20 of minor."""
    major, minor = os.major(rdev), os.minor(rdev)
    if major > 0xFFF or minor > 0xFFFFF:
        raise UnsupportedFeature(
            f"{path}: device number {major}:{minor} does not fit an EROFS inode (12:20 bits)"
        )
    return (minor & 0xFF) | (major << 8) | ((minor & ~0xFF) << 12)


def _xattr_blob(e: Entry, path: str) -> bytes:
    """The inode's inline xattr area (header + entries), or b"" when it has none."""
    items = list(e.xattrs.items())
    for k in e.xattrs:
        if k.startswith(OVERLAY_PREFIX):
            # publish refuses these; a template that has one anyway must not add markers
            raise FormatError(f"{path}: template xattr {k!r} is reserved for overlay markers")
    if e.kind == "reg" and e.oid is not None:
        items.append((METACOPY_XATTR, b""))
        items.append((REDIRECT_XATTR, data_path(e.oid)))
    if not items:
        return b""
    out = bytearray(XATTR_IBODY_HEADER)  # name filter 0 (feature off), no shared xattrs
    for name, value in items:
        for prefix, index in XATTR_PREFIXES:
            if name.startswith(prefix) and (index not in (2, 3) or name == prefix):
                suffix = name[len(prefix) :]
                break
        else:
            raise UnsupportedFeature(
                f"{path}: xattr {name.decode(errors='replace')!r} has no EROFS namespace "
                "(user., trusted., security. and the two POSIX ACLs have)"
            )
        if len(suffix) > 255 or len(value) > 0xFFFF:
            raise UnsupportedFeature(
                f"{path}: xattr {name.decode(errors='replace')!r} is too large for EROFS"
            )
        out += XATTR_ENTRY.pack(len(suffix), index, len(value)) + suffix + value
        out += bytes(-len(out) % 4)
    if (len(out) - XATTR_IBODY_HEADER) // 4 + 1 > 0xFFFF:
        raise UnsupportedFeature(f"{path}: xattrs too large for one EROFS inode")
    return bytes(out)


def _dir_blocks(entries: list[tuple[bytes, int]]) -> list[list[tuple[bytes, int]]]:
    """Split sorted ``(name, ino)`` dirents into 4 KiB blocks (dirent structs, then names)."""
    blocks: list[list[tuple[bytes, int]]] = [[]]
    used = 0
    for name, ino in entries:
        need = DIRENT.size + len(name)
        if used + need > BLOCK:
            blocks.append([])
            used = 0
        blocks[-1].append((name, ino))
        used += need
    return blocks


def _dir_size(blocks: list[list[tuple[bytes, int]]]) -> int:
    last = sum(DIRENT.size + len(n) for n, _ in blocks[-1])
    return (len(blocks) - 1) * BLOCK + last


@dataclass
class _Node:
    e: Entry
    path: str
    xattrs: bytes
    layout: int
    size: int
    inline: bytes | None  # tail data stored after the xattrs (dir tail: filled in later)
    inline_len: int
    nblocks: int  # data blocks outside the inode
    dir_blocks: list[list[tuple[bytes, int]]] | None = None
    pos: int = 0
    blkaddr: int = 0

    @property
    def record_len(self) -> int:
        return INODE_EXT.size + len(self.xattrs) + self.inline_len


def _plan(template: Template) -> list[_Node]:
    paths: dict[int, str] = {}
    for p, e in template.walk():
        paths.setdefault(e.ino, "/" + p.decode(errors="replace"))
    nodes: list[_Node] = []
    parents: dict[int, int] = {ROOT_INO: ROOT_INO}
    for ino in range(1, len(template) + 1):
        e = template.getattr(ino)
        if e.kind == "dir":
            for _, child in template.readdir(ino):
                if child.kind == "dir":
                    parents[child.ino] = ino
    for ino in range(1, len(template) + 1):
        e = template.getattr(ino)
        path = paths.get(ino, f"inode {ino}")
        xb = _xattr_blob(e, path)
        if e.kind == "dir":
            ents = [(b".", ino), (b"..", parents.get(ino, ino))]
            ents += [(name, child.ino) for name, child in template.readdir(ino)]
            ents.sort(key=lambda t: t[0])
            blocks = _dir_blocks(ents)
            size = _dir_size(blocks)
            tail = size - (len(blocks) - 1) * BLOCK
            if 0 < tail <= INLINE_MAX:
                n = _Node(e, path, xb, LAYOUT_FLAT_INLINE, size, None, tail, len(blocks) - 1)
            else:
                n = _Node(e, path, xb, LAYOUT_FLAT_PLAIN, size, None, 0, len(blocks))
            n.dir_blocks = blocks
        elif e.kind == "lnk":
            target = e.target or b""
            if len(target) <= INLINE_MAX:
                n = _Node(e, path, xb, LAYOUT_FLAT_INLINE, len(target), target, len(target), 0)
            else:
                n = _Node(e, path, xb, LAYOUT_FLAT_PLAIN, len(target), None, 0, 1)
        elif e.kind == "reg" and e.size > 0:
            chunks = -(-e.size // (1 << CHUNK_BITS))
            cmap = struct.pack("<I", NULL_ADDR) * chunks
            n = _Node(e, path, xb, LAYOUT_CHUNK_BASED, e.size, cmap, len(cmap), 0)
        else:  # empty regular file, fifo, socket, device: no data
            n = _Node(e, path, xb, LAYOUT_FLAT_PLAIN, 0, None, 0, 0)
        nodes.append(n)
    return nodes


def _place(nodes: list[_Node]) -> int:
    """Give every inode its offset (root first, right after the superblock) and every data
    block its address; return the image length."""
    pos = SUPER_OFFSET + SUPERBLOCK.size
    for n in nodes:
        pos = _align(pos, 32)
        if n.layout == LAYOUT_FLAT_INLINE and n.inline_len:
            # the inline tail may not cross a block boundary
            start = pos + INODE_EXT.size + len(n.xattrs)
            if start // BLOCK != (start + n.inline_len - 1) // BLOCK:
                pos = _align(pos, BLOCK)
                start = pos + INODE_EXT.size + len(n.xattrs)
                if start // BLOCK != (start + n.inline_len - 1) // BLOCK:
                    # xattrs fill the block: store the tail in a data block instead
                    n.layout = LAYOUT_FLAT_PLAIN
                    n.inline_len = 0
                    n.nblocks += 1
        n.pos = pos
        pos += n.record_len
    if nodes[0].pos // 32 > 0xFFFF:
        raise FormatError("EROFS root inode beyond the 16-bit root nid")
    blk = _align(pos, BLOCK) // BLOCK
    for n in nodes:
        if n.nblocks:
            n.blkaddr = blk
            blk += n.nblocks
    return blk * BLOCK


def _encode_dir_block(
    entries: list[tuple[bytes, int]], ftypes: dict[int, int], nids: dict[int, int]
) -> bytes:
    head = bytearray()
    names = bytearray()
    nameoff = DIRENT.size * len(entries)
    for name, ino in entries:
        head += DIRENT.pack(nids[ino], nameoff + len(names), ftypes[ino], 0)
        names += name
    return bytes(head + names)


def build_image(template: Template) -> bytes:
    """The image of ``template`` (header included), deterministic."""
    nodes = _plan(template)
    length = _place(nodes)
    img = bytearray(length)
    nids = {n.e.ino: n.pos // 32 for n in nodes}
    ftypes = {n.e.ino: FT[n.e.kind] for n in nodes}
    chunked = False
    for n in nodes:
        e = n.e
        if e.kind in ("chr", "blk"):
            i_u = _encode_dev(e.rdev, n.path)
        elif n.layout == LAYOUT_CHUNK_BASED:
            i_u = CHUNK_BLKBITS
            chunked = True
        elif n.nblocks:
            i_u = n.blkaddr
        else:
            i_u = 0
        if not 0 <= e.uid <= 0xFFFFFFFF or not 0 <= e.gid <= 0xFFFFFFFF:
            raise UnsupportedFeature(f"{n.path}: owner {e.uid}:{e.gid} out of range")
        sec, nsec = divmod(e.mtime_ns, 1_000_000_000)
        xcount = (len(n.xattrs) - XATTR_IBODY_HEADER) // 4 + 1 if n.xattrs else 0
        rec = INODE_EXT.pack(
            1 | (n.layout << 1),
            xcount,
            stat.S_IFMT(e.mode) | stat.S_IMODE(e.mode),
            0,
            n.size,
            i_u,
            e.ino,
            e.uid,
            e.gid,
            sec & 0xFFFFFFFFFFFFFFFF,
            nsec,
            e.nlink,
            bytes(16),
        )
        p = n.pos
        img[p : p + 64] = rec
        p += 64
        img[p : p + len(n.xattrs)] = n.xattrs
        p += len(n.xattrs)
        data: bytes | None = None
        if n.dir_blocks is not None:
            data = b"".join(
                _encode_dir_block(b, ftypes, nids).ljust(BLOCK, b"\0")
                if i < len(n.dir_blocks) - 1
                else _encode_dir_block(b, ftypes, nids)
                for i, b in enumerate(n.dir_blocks)
            )
        elif e.kind == "lnk":
            data = e.target or b""
        if n.layout == LAYOUT_CHUNK_BASED:
            assert n.inline is not None
            img[p : p + len(n.inline)] = n.inline
        elif data is not None:
            full = n.nblocks * BLOCK if n.layout == LAYOUT_FLAT_INLINE else len(data)
            if n.layout == LAYOUT_FLAT_INLINE:
                img[p : p + n.inline_len] = data[full:]
                head = data[:full]
            else:
                head = data
            if n.nblocks:
                b0 = n.blkaddr * BLOCK
                img[b0 : b0 + len(head)] = head
    root = nodes[0]
    sb = SUPERBLOCK.pack(
        EROFS_MAGIC,
        0,  # no superblock checksum (the vfs header's SHA-256 covers the image)
        FEATURE_COMPAT_MTIME,
        BLKSZ_BITS,
        0,
        root.pos // 32,
        len(nodes),
        0,
        0,
        length // BLOCK,
        0,  # meta_blkaddr: nids are offsets / 32 from the start
        0,  # xattr_blkaddr (no shared xattrs)
        bytes.fromhex(template.digest[:32]),
        b"vfs-template",
        FEATURE_INCOMPAT_CHUNKED_FILE if chunked else 0,
        0,
        0,
        0,
        0,
        0,
        0,
        0,
        0,
        bytes(23),
    )
    img[SUPER_OFFSET : SUPER_OFFSET + SUPERBLOCK.size] = sb
    body_sum = hashlib.sha256(memoryview(img)[HEADER_SIZE:]).digest()
    img[0 : HEADER.size] = HEADER.pack(
        HEADER_MAGIC, WRITER_VERSION, 0, bytes.fromhex(template.digest), body_sum, length
    )
    return bytes(img)


def check_image(path: str | os.PathLike[str], digest: str) -> ImageInfo:
    """Check a cached image: header, template digest, writer version and the SHA-256 of
    everything after the header. FormatError says what is wrong."""
    with open(path, "rb") as f:
        head = f.read(HEADER_SIZE)
        if len(head) < HEADER.size:
            raise FormatError(f"{path}: truncated image")
        magic, version, _flags, dig, body_sum, length = HEADER.unpack_from(head)
        if magic != HEADER_MAGIC:
            raise FormatError(f"{path}: not a vfs template image")
        if version != WRITER_VERSION:
            raise FormatError(f"{path}: image layout {version}, this vfs writes {WRITER_VERSION}")
        if dig.hex() != digest:
            raise FormatError(f"{path}: image of template {dig.hex()[:16]}…, not {digest[:16]}…")
        if os.fstat(f.fileno()).st_size != length:
            raise FormatError(f"{path}: image length is not the {length} bytes it was built with")
        h = hashlib.sha256()
        while block := f.read(1 << 20):
            h.update(block)
        if h.digest() != body_sum:
            raise FormatError(f"{path}: image checksum mismatch (damaged)")
    return ImageInfo(digest, length, 0, body_sum.hex())


class ImageCache:
    """Template images by digest in one directory: built when missing, rebuilt when damaged.

    Crash story: an image is written to a temp file in the same directory, fsynced and renamed
    into place (:func:`vfs.durable.atomic_writer`), so a visible image is whole; and every use
    checks it (:func:`check_image`), so a damaged one is replaced, never mounted.
    """

    def __init__(self, directory: str | os.PathLike[str]) -> None:
        self.dir = Path(directory)
        self.dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.built = 0  #: images built by this cache (tests, stats)

    def path(self, digest: str) -> Path:
        return self.dir / f"{digest}.erofs"

    def ensure(self, template: Template) -> Path:
        """The checked image of ``template``, building (or rebuilding) it if needed.
        Blocking (hashing, maybe building): run it in a worker thread from an event loop."""
        dest = self.path(template.digest)
        if dest.exists():
            try:
                check_image(dest, template.digest)
                return dest
            except (FormatError, OSError) as e:
                log.warning("template image %s unusable (%s): rebuilding it", dest, e)
        data = build_image(template)
        with atomic_writer(dest, mode=0o600) as f:
            f.write(data)
        self.built += 1
        log.info("built template image %s (%d inodes, %d KiB)", dest.name, len(template),
                 len(data) >> 10)  # fmt: skip
        return dest

    def remove_unused(self, keep: set[str]) -> int:
        """Delete images of templates not in ``keep`` (no VEE uses them); return how many."""
        n = 0
        for p in self.dir.glob("*.erofs"):
            if p.stem not in keep:
                p.unlink(missing_ok=True)
                n += 1
        return n
