"""The nouns of the VEE view: nodes (inodes), VEEs, open handles, attributes, errors.

Kept apart from :mod:`vfs.tree.view` (the behaviour) so that the data each inode carries, and
what every field means, is in one short place.
"""

from __future__ import annotations

import os
import secrets
import stat
from dataclasses import dataclass
from typing import Protocol

from vfs.errors import FsError, StaleHandle  # noqa: F401 - re-exported for view users
from vfs.tree.entry import Entry
from vfs.tree.private import PrivateLayer

ROOT_INO = 1
#: Attribute/entry cache time handed to the kernel. Everything the kernel caches changes only
#: through this daemon, which invalidates what it changes behind the kernel's back.
CACHE_TIMEOUT = 3600.0


class Content(Protocol):
    """Where template file contents come from (a :class:`vfs.redirect.Resolver`).

    ``expected_size`` is the length the manifest gives the object: a fetch never reads past
    it, and an object of another length is refused (IntegrityError) before a byte is served."""

    def has_local(self, oid: str) -> bool: ...
    def ensure(self, oid: str, *, expected_size: int | None = None) -> None: ...
    def read_local(
        self,
        oid: str,
        offset: int,
        size: int,
        *,
        drop_cache: bool = False,
        expected_size: int | None = None,
    ) -> bytes | None: ...
    def read(
        self,
        oid: str,
        offset: int,
        size: int,
        *,
        drop_cache: bool = False,
        expected_size: int | None = None,
    ) -> bytes: ...


class TemplateLike(Protocol):
    digest: str
    root: Entry

    def lookup(self, parent_ino: int, name: bytes) -> Entry | None: ...
    def readdir(self, ino: int) -> list[tuple[bytes, Entry]]: ...
    def resolve(self, path: bytes) -> Entry | None: ...
    def paths(self) -> dict[int, list[bytes]]: ...


@dataclass(slots=True)
class Attr:
    """What getattr/lookup answer; ``shared`` says the inode is a shared template inode."""

    ino: int
    mode: int
    nlink: int
    uid: int
    gid: int
    rdev: int
    size: int
    blocks: int
    atime_ns: int
    mtime_ns: int
    ctime_ns: int
    shared: bool = False
    generation: int = 0


@dataclass(slots=True)
class SetAttr:
    """The fields of a setattr request that are to change (None = unchanged)."""

    mode: int | None = None
    uid: int | None = None
    gid: int | None = None
    size: int | None = None
    atime_ns: int | None = None
    mtime_ns: int | None = None


class Node:
    """One inode of the mount.

    ``vee`` is None for the mount root and for shared nodes. ``lower`` is the template entry the
    node shows (files: content not yet copied up; dirs: the template directory merged below).
    ``upper`` says a private object exists. Directories have one location (``parent``,
    ``name``); files may have several names (``links``), and may have none left while the
    kernel still holds them (unlinked, still open).

    Identity and lifetime: a private non-directory node holds ``fd``, an ``O_PATH`` fd of its
    host inode, from its creation until it is dropped (no kernel lookup reference and no open
    handle left). The fd is what identifies the file: the host cannot reuse the inode number
    while it is held, so the (st_dev, st_ino) index never attaches a new file to a dead node,
    and fd-level operations work after the last name is gone.
    """

    __slots__ = (
        "ino",
        "vee",
        "kind",
        "lower",
        "upper",
        "parent",
        "name",
        "links",
        "nlookup",
        "key",
        "template",
        "seen",
        "attr",
        "fd",
        "opens",
        "nsub",
        "gen",
    )

    def __init__(self, ino: int, vee: Vee | None, kind: int, lower: Entry | None) -> None:
        self.ino = ino
        self.vee = vee
        self.kind = kind  # stat.S_IFMT value
        self.lower = lower
        self.upper = False
        self.parent: Node | None = None
        self.name = b""
        self.links: set[tuple[Node, bytes]] = set()
        self.nlookup = 0
        self.key: tuple[object, ...] = ()
        self.template: TemplateLike | None = None
        #: shared nodes: the (parent node, name) pairs that resolved to it, for invalidation
        self.seen: set[tuple[Node, bytes]] = set()
        #: shared nodes: their attributes, made once (a template entry never changes)
        self.attr: Attr | None = None
        #: private non-directories: O_PATH fd of the host inode (the node's identity)
        self.fd: int | None = None
        #: open handles (the node lives while it has any, or a kernel lookup reference)
        self.opens = 0
        #: directories: number of visible subdirectories (None = not counted yet)
        self.nsub: int | None = None
        #: the file-handle generation: random, so a VEE cannot forge a handle of another
        #: VEE's inode for open_by_handle_at (node numbers are small sequential integers)
        self.gen = 0 if ino == ROOT_INO else secrets.randbits(32)

    @property
    def is_dir(self) -> bool:
        return self.kind == stat.S_IFDIR

    @property
    def shared(self) -> bool:
        return self.vee is None and self.ino != ROOT_INO


class Vee:
    """One VEE root: its template, its private layer and its per-VEE node indexes."""

    def __init__(self, name: str, template: TemplateLike, layer: PrivateLayer) -> None:
        self.name = name
        self.template = template
        self.layer = layer
        self.root: Node | None = None
        self.dirs: dict[tuple[int, bytes], Node] = {}
        self.files: dict[tuple[object, ...], Node] = {}
        #: identities of template files this VEE sees as its own per-VEE inodes while other
        #: VEEs keep sharing them (renamed or linked here, or a name of a hard link removed)
        self.own: set[bytes] = set()


class Handle:
    """An open file: the node, and the private fd once the node has a private copy."""

    __slots__ = ("node", "fd", "writable")

    def __init__(self, node: Node, fd: int | None, writable: bool) -> None:
        self.node = node
        self.fd = fd
        self.writable = writable


class _Dead:
    """Marker VEE of removed nodes."""


_DEAD: Vee = _Dead()  # type: ignore[assignment]


def stat_attr(node: Node, st: os.stat_result) -> Attr:
    return Attr(
        node.ino,
        st.st_mode,
        st.st_nlink,
        st.st_uid,
        st.st_gid,
        st.st_rdev,
        st.st_size,
        st.st_blocks,
        st.st_atime_ns,
        st.st_mtime_ns,
        st.st_ctime_ns,
        generation=node.gen,
    )


def private_open_flags(flags: int) -> int:
    """Open flags for the private file: the kernel runs the page cache (writeback), so O_APPEND
    is its business and a write-only open must be able to read (partial page writes)."""
    flags &= ~(os.O_CREAT | os.O_EXCL | os.O_NOCTTY | os.O_APPEND | os.O_DIRECT | os.O_NOFOLLOW)
    if flags & os.O_ACCMODE == os.O_WRONLY:
        flags = (flags & ~os.O_ACCMODE) | os.O_RDWR
    return flags
