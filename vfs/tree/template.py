"""A published template, loaded: an in-memory index over its manifest for the FUSE hot path.

A template is immutable and named by the digest of its manifest object
(``docs/template-format.md``).
:meth:`Template.load` fetches that object through a resolver, checks it against the digest,
validates it completely (a hostile manifest is refused here, before any VEE can see a name from
it) and builds plain dicts, so that ``lookup`` is one dict probe and ``readdir`` returns a list
built once. Nothing here does I/O after load: file contents are read by the caller with
``resolver.read(entry.oid, offset, size)`` (one object per regular file, no chunking).
"""

from __future__ import annotations

import hashlib
import logging
import re
from collections.abc import Iterator
from typing import Protocol

from vfs.errors import IntegrityError, NotFound, UsageError
from vfs.tree import manifest
from vfs.tree import manifest_layout as L
from vfs.tree.entry import ROOT_INO, Entry
from vfs.tree.publish import PublishResult, publish_template

__all__ = [
    "ROOT_INO",
    "Entry",
    "PublishResult",
    "Template",
    "publish_template",
    "resolve_ref",
]

log = logging.getLogger(__name__)

_DIGEST_RE = re.compile(r"[0-9a-f]{64}")

#: Default bound on the inodes (and on the names) of a template this process will index:
#: 4 Mi entries is ~2 GiB of index, ten times a full distribution with development tools.
MAX_ENTRIES = 1 << 22

#: The most bytes a manifest fetch may take (a digest is all a ref says of a manifest, so its
#: size is unknown until fetched): the format's body limit, zstd's worst-case expansion of it
#: and room for the header. A server that sends more is cut off there.
MAX_MANIFEST_BYTES = L.MAX_BODY + (L.MAX_BODY >> 8) + (1 << 20)


class _Getter(Protocol):
    def get(self, oid: str, *, max_size: int) -> bytes: ...


class Template:
    """Read-only view of one template: entries by inode number, directory maps, paths.

    ``readdir`` hands out the list it built at load time: callers must not mutate it.
    """

    __slots__ = ("digest", "root", "_entries", "_children", "_listing", "manifest_size")

    def __init__(
        self, digest: str, entries: list[Entry], dirents: list[tuple[int, bytes, int]], size: int
    ) -> None:
        """Build the index from validated manifest tables (use :meth:`load` or :meth:`from_bytes`).

        ``entries[i]`` has ino ``i + 1``; ``dirents`` are ``(parent_ino, name, child_ino)`` sorted
        by parent then name, as :func:`vfs.tree.manifest.decode` guarantees.
        """
        self.digest = digest
        self.manifest_size = size
        self._entries = entries
        children: dict[int, dict[bytes, Entry]] = {}
        listing: dict[int, list[tuple[bytes, Entry]]] = {}
        for e in entries:
            if e.kind == "dir":
                children[e.ino] = {}
                listing[e.ino] = []
        for parent, name, child in dirents:
            ce = entries[child - 1]
            children[parent][name] = ce
            listing[parent].append((name, ce))
        self._children = children
        self._listing = listing
        self.root = entries[ROOT_INO - 1]

    # -- construction ----------------------------------------------------------------------

    @classmethod
    def load(cls, resolver: _Getter, digest: str, *, max_entries: int = MAX_ENTRIES) -> Template:
        """Fetch the manifest object ``digest`` via ``resolver.get`` (at most
        :data:`MAX_MANIFEST_BYTES`), verify and index it.

        Raises IntegrityError when the bytes do not hash to ``digest``, FormatError (or
        UnsupportedFeature) when the manifest is malformed or hostile, or has more than
        ``max_entries`` inodes or names (the index costs ~0.5 KiB per entry).
        """
        digest = check_digest(digest)
        data = resolver.get(digest, max_size=MAX_MANIFEST_BYTES)
        return cls.from_bytes(data, digest, max_entries=max_entries)

    @classmethod
    def from_bytes(
        cls, data: bytes, digest: str | None = None, *, max_entries: int = MAX_ENTRIES
    ) -> Template:
        """Index a manifest held in memory; verify it against ``digest`` when given."""
        actual = hashlib.sha256(data).hexdigest()
        if digest is not None and actual != digest:
            raise IntegrityError(
                f"manifest {digest[:16]}…: content hashes to {actual[:16]}…, refusing it",
                oid=digest,
            )
        entries, dirents = manifest.decode(data, max_entries=max_entries)
        log.debug("loaded template %s: %d entries", actual[:16], len(entries))
        return cls(actual, entries, dirents, len(data))

    # -- the read API (hot path) -----------------------------------------------------------

    def __len__(self) -> int:
        """Number of inodes (hard links count once)."""
        return len(self._entries)

    def getattr(self, ino: int) -> Entry:
        """The entry with inode number ``ino``; NotFound if the template has none."""
        if 0 < ino <= len(self._entries):
            return self._entries[ino - 1]
        raise NotFound(f"template {self.digest[:16]}…: no inode {ino}", ino=ino)

    def lookup(self, parent_ino: int, name: bytes) -> Entry | None:
        """The child ``name`` of directory ``parent_ino``, or None (also if it is no dir)."""
        d = self._children.get(parent_ino)
        if d is None:
            return None
        return d.get(name)

    def children(self, ino: int) -> dict[bytes, Entry]:
        """Name → entry map of a directory (shared: do not mutate); NotFound if no dir."""
        try:
            return self._children[ino]
        except KeyError:
            raise NotFound(f"template {self.digest[:16]}…: inode {ino} is no directory") from None

    def readdir(self, ino: int) -> list[tuple[bytes, Entry]]:
        """Entries of directory ``ino`` sorted by name, without ``.``/``..`` (shared list)."""
        try:
            return self._listing[ino]
        except KeyError:
            raise NotFound(f"template {self.digest[:16]}…: inode {ino} is no directory") from None

    def resolve(self, path: bytes) -> Entry | None:
        """Entry at ``path`` relative to the root (``b''`` or ``b'/'`` is the root).

        Symlinks are not followed (like lstat); empty components and leading slashes are ignored;
        a ``.``/``..`` component never matches anything.
        """
        e = self.root
        for comp in path.split(b"/"):
            if not comp:
                continue
            d = self._children.get(e.ino)
            if d is None:
                return None
            nxt = d.get(comp)
            if nxt is None:
                return None
            e = nxt
        return e

    def walk(self) -> Iterator[tuple[bytes, Entry]]:
        """Every path, depth first in name order: ``(b'', root)`` first, then ``b'a'``,
        ``b'a/b'``... A hard-linked inode is yielded once per name."""
        yield b"", self.root
        stack: list[tuple[bytes, list[tuple[bytes, Entry]], int]] = [
            (b"", self._listing[ROOT_INO], 0)
        ]
        while stack:
            prefix, items, i = stack.pop()
            if i >= len(items):
                continue
            stack.append((prefix, items, i + 1))
            name, e = items[i]
            path = prefix + name
            yield path, e
            if e.kind == "dir":
                stack.append((path + b"/", self._listing[e.ino], 0))

    def paths(self) -> dict[int, list[bytes]]:
        """Inode number → all its paths (computed on demand, O(entries))."""
        out: dict[int, list[bytes]] = {}
        for path, e in self.walk():
            out.setdefault(e.ino, []).append(path)
        return out


def check_digest(text: str) -> str:
    """A template digest is a manifest object id: 64 lowercase hex characters."""
    if not isinstance(text, str) or not _DIGEST_RE.fullmatch(text):
        raise UsageError(f"not a template digest: {text!r}")
    return text


def is_digest(text: str) -> bool:
    return bool(_DIGEST_RE.fullmatch(text))


def resolve_ref(ref: str, remote: object) -> str:
    """A template reference (a digest, or a name published with ``--name``) → digest.

    Names are looked up with ``remote.get_ref(name)``; a digest is returned unchanged. A remote
    that has ``resolve_name`` (:class:`vfs.redirect.sealed_remote.UnsealingRemote`) resolves
    the name itself: an encrypted ref is verified and opened there, and the digest it names
    is then loaded through that remote like any other.
    """
    if is_digest(ref):
        return ref
    resolve_name = getattr(remote, "resolve_name", None)
    if resolve_name is not None:
        return check_digest(resolve_name(ref))
    digest = remote.get_ref(ref)  # type: ignore[attr-defined]
    return check_digest(digest)
