"""The inode table of a VEE mount: which nodes exist, what number each has, how long it lives.

Split from :mod:`vfs.tree.view` (which resolves names and answers requests) because the rules
here are few and strict, and every request depends on them (``docs/vee-layer.md`` §3):

- *Numbers come from identities.* A node's inode number is 63 bits of a hash of what it stands
  for (:meth:`InodeTable.ino_for`): a file keeps its number when the kernel forgets its inode
  and looks it up again, and across daemon restarts. Numbers from 2^63 up are a counter for
  the rare hash collision with a live node, and for a node the kernel still holds from before
  (a removed VEE or directory) while a new node stands for the same thing.
- *Shared inodes by file identity.* An unmodified template file is one shared node for every
  VEE and every template version holding the identical file (:meth:`InodeTable.identity`).
- *Lifetime.* A per-VEE non-directory node lives while the kernel holds a lookup reference or
  a handle is open; nodes a request made but handed to nobody are dropped when the request
  ends (:func:`request`), with their pinned fds. Directory and shared nodes stay.
- *Pins are bounded.* A private file's pin (``Node.fd``, its identity) is what keeps its host
  inode number from being reused while the node lives. A file that still has a name the view
  knows cannot lose its host inode behind the daemon's back (only the daemon removes names in a
  private layer), so its pin may be closed and taken again by that name when needed
  (:meth:`InodeTable.add_pin`, least recently used first): a VEE that creates more files than
  the daemon may hold fds (an untar of 100k files before the kernel forgets any) keeps working.
  A file with no known name left, or with open handles, keeps its pin.
"""

from __future__ import annotations

import contextvars
import functools
import hashlib
import inspect
import logging
import os
import resource
import stat
from collections import OrderedDict
from collections.abc import Callable, Iterable
from typing import Any, TypeVar

from vfs.tree.entry import Entry
from vfs.tree.nodes import _DEAD, ROOT_INO, Node, StaleHandle, TemplateLike, Vee

log = logging.getLogger(__name__)

F = TypeVar("F", bound=Callable[..., Any])

#: Inode numbers from here up are handed out in order (collisions of the identity hash).
FALLBACK_INO = 1 << 63

#: Nodes made during the current request (per trio task): those the kernel did not take a
#: lookup reference to by the end of the request (names only checked, readdir entries the
#: kernel's buffer had no room for) are dropped then, with their pinned fds.
_FRESH: contextvars.ContextVar[list[Node] | None] = contextvars.ContextVar(
    "vfs_view_fresh", default=None
)


def request(fn: F) -> F:
    """Mark a public entry point of an object with an ``inodes`` table: nodes it makes and
    hands to nobody are dropped at its end (never call one such entry point from another)."""
    if inspect.iscoroutinefunction(fn):

        @functools.wraps(fn)
        async def awrapper(self: Any, *args: Any, **kwargs: Any) -> Any:
            token = _FRESH.set([])
            try:
                return await fn(self, *args, **kwargs)
            finally:
                fresh = _FRESH.get()
                _FRESH.reset(token)
                self.inodes.sweep(fresh)

        return awrapper  # type: ignore[return-value]

    @functools.wraps(fn)
    def wrapper(self: Any, *args: Any, **kwargs: Any) -> Any:
        token = _FRESH.set([])
        try:
            return fn(self, *args, **kwargs)
        finally:
            fresh = _FRESH.get()
            _FRESH.reset(token)
            self.inodes.sweep(fresh)

    return wrapper  # type: ignore[return-value]


def default_pin_budget() -> int:
    """Pins held at most: half the open-file limit (the rest is for open handles, the store
    and the FUSE channel), at least 64."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        soft = 1 << 20
    return max(64, soft // 2)


class InodeTable:
    """Every node of one mount, by inode number, and the shared nodes by file identity."""

    def __init__(self, pin_budget: int | None = None) -> None:
        self.nodes: dict[int, Node] = {}
        #: nodes holding a pinned fd, least recently used first (:meth:`add_pin`)
        self.pins: OrderedDict[int, Node] = OrderedDict()
        self.pin_budget = default_pin_budget() if pin_budget is None else pin_budget
        #: shared inodes by file identity (:meth:`identity`), and the identities unshared
        self.shared: dict[bytes, Node] = {}
        self.unshared: set[bytes] = set()
        #: identity -> digests of the templates whose VEEs resolved that shared inode
        self._shared_in: dict[bytes, set[str]] = {}
        self._identities: dict[tuple[str, int], bytes] = {}
        self._paths: dict[str, dict[int, list[bytes]]] = {}
        self._fallback_ino = FALLBACK_INO
        self.root = Node(ROOT_INO, None, stat.S_IFDIR, None)
        self.nodes[ROOT_INO] = self.root

    # -- numbers and identities ------------------------------------------------------------

    def ino_for(self, identity: tuple[object, ...]) -> int:
        """The inode number of a node standing for ``identity``: 63 bits of its hash, so the
        same file gets the same number whenever a node is made for it."""
        h = hashlib.blake2b(repr(identity).encode(), digest_size=8, person=b"vfs-ino").digest()
        ino = int.from_bytes(h, "little") & (FALLBACK_INO - 1)
        taken = self.nodes.get(ino)
        if ino > ROOT_INO and taken is None:
            return ino
        # A node of a removed VEE (or a removed directory) the kernel still holds keeps its
        # number until it is forgotten: the new node for the same file gets another one. Any
        # other case is a real collision of two identities' hashes.
        if taken is not None and taken.vee is not _DEAD:
            log.warning("inode number collision for %r: numbered %d", identity, ino)
        ino = self._fallback_ino
        self._fallback_ino += 1
        return ino

    def identity(self, tmpl: TemplateLike, e: Entry) -> bytes:
        """What makes a template file the same file in any template version: its path (the
        first of its names), kind, content, metadata and hard-link count. Identical files at
        different paths stay distinct inodes; an unchanged file of v1 and v2 is one."""
        key = (tmpl.digest, e.ino)
        ident = self._identities.get(key)
        if ident is None:
            fields = (
                self.paths(tmpl)[e.ino][0],
                e.kind,
                e.oid,
                e.target,
                e.mode,
                e.uid,
                e.gid,
                e.size,
                e.mtime_ns,
                e.nlink,
                e.rdev,
                sorted(e.xattrs.items()),
                e.extents,
            )
            ident = hashlib.blake2b(repr(fields).encode(), digest_size=16).digest()
            self._identities[key] = ident
        return ident

    def paths(self, tmpl: TemplateLike) -> dict[int, list[bytes]]:
        """Template inode -> its paths (made once per template, on first need)."""
        paths = self._paths.get(tmpl.digest)
        if paths is None:
            paths = self._paths[tmpl.digest] = tmpl.paths()
        return paths

    # -- making, finding and dropping nodes --------------------------------------------------

    def new(
        self, vee: Vee | None, kind: int, lower: Entry | None, identity: tuple[object, ...]
    ) -> Node:
        """A node whose inode number is derived from ``identity`` (what it stands for)."""
        node = Node(self.ino_for(identity), vee, kind, lower)
        self.nodes[node.ino] = node
        if kind != stat.S_IFDIR and vee is not None:
            fresh = _FRESH.get()
            if fresh is not None:
                fresh.append(node)
        return node

    def node(self, ino: int) -> Node:
        n = self.nodes.get(ino)
        if n is None or n.vee is _DEAD:
            raise StaleHandle(f"inode {ino} is gone")
        return n

    def shared_node(self, tmpl: TemplateLike, e: Entry, ident: bytes) -> Node:
        """The shared node of a template file (made on first need), visible to ``tmpl``."""
        node = self.shared.get(ident)
        if node is None:
            node = self.new(None, stat.S_IFMT(e.mode), e, ("shared", ident))
            node.template = tmpl
            node.key = ("s", ident)
            self.shared[ident] = node
            self._shared_in[ident] = {tmpl.digest}
        elif node.template is not tmpl:
            self._shared_in[ident].add(tmpl.digest)
        return node

    def shared_visible(self, node: Node, template_digest: str) -> bool:
        """Whether a VEE of template ``template_digest`` may see shared node ``node``."""
        templates = self._shared_in.get(node.key[1]) if node.key else None
        return templates is not None and template_digest in templates

    def unref(self, node: Node) -> None:
        """Drop a per-VEE non-directory node nobody refers to any more (no kernel lookup
        reference, no open handle): its pinned fd is closed, its index entry removed.

        Directories stay (their nodes carry the merged path the children hang off); shared
        nodes stay (one per template file, bounded by the templates)."""
        if node.nlookup > 0 or node.opens > 0 or node.is_dir or node.vee is None:
            return
        if self.nodes.get(node.ino) is node:
            del self.nodes[node.ino]
        vee = node.vee
        if isinstance(vee, Vee) and vee.files.get(node.key) is node:
            del vee.files[node.key]
        self.drop_pin(node)

    # -- pins ------------------------------------------------------------------------------

    def add_pin(self, node: Node, fd: int) -> None:
        """``node`` now holds ``fd`` as its pin; over the budget, the least recently used
        pins of files that still have a known name and no open handle are closed (they are
        taken again by name, :meth:`unpinned`)."""
        if node.fd is not None and node.fd != fd:
            os.close(node.fd)
        node.fd = fd
        self.pins[node.ino] = node
        self.pins.move_to_end(node.ino)
        if len(self.pins) > self.pin_budget:
            self._shed_pins(node)

    def used_pin(self, node: Node) -> None:
        """``node``'s pin was just used (it moves to the most recently used end)."""
        if node.ino in self.pins:
            self.pins.move_to_end(node.ino)

    def drop_pin(self, node: Node) -> None:
        if node.fd is not None:
            os.close(node.fd)
            node.fd = None
        if self.pins.get(node.ino) is node:
            del self.pins[node.ino]

    @staticmethod
    def unpinned(node: Node) -> bool:
        """Whether ``node`` is a private file whose pin was shed (taken again by name)."""
        return node.fd is None and node.upper and not node.is_dir and isinstance(node.vee, Vee)

    def _shed_pins(self, newest: Node) -> None:
        """Close pins down to 7/8 of the budget (so that shedding is rare), oldest first;
        never ``newest``, whose pin its caller is about to use."""
        target = self.pin_budget - self.pin_budget // 8
        kept: list[Node] = []
        while len(self.pins) + len(kept) > target and self.pins:
            _, node = self.pins.popitem(last=False)
            if node is newest or node.opens > 0 or not node.links or node.vee is _DEAD:
                kept.append(node)  # no name to take it again by, or in use: it keeps its pin
                continue
            if node.fd is not None:
                os.close(node.fd)
                node.fd = None
        for node in reversed(kept):
            self.pins[node.ino] = node
            self.pins.move_to_end(node.ino, last=False)

    def sweep(self, fresh: list[Node] | None) -> None:
        for node in fresh or ():
            self.unref(node)

    def forget(self, items: Iterable[tuple[int, int]]) -> list[Node]:
        """The kernel gives back lookup references; returns the nodes dropped."""
        dropped = []
        for ino, count in items:
            node = self.nodes.get(ino)
            if node is None:
                continue
            node.nlookup = max(node.nlookup - count, 0)
            if node.nlookup == 0:
                self.unref(node)
                if ino not in self.nodes:
                    dropped.append(node)
        return dropped

    def count_lookup(self, ino: int) -> None:
        self.nodes[ino].nlookup += 1

    def kill_vee(self, vee: Vee) -> None:
        """Every node of a removed VEE answers ESTALE from now on; their pins are closed."""
        for node in list(self.nodes.values()):
            if node.vee is vee:
                node.vee = _DEAD
                self.drop_pin(node)
        for node in self.shared.values():
            node.seen = {(p, n) for p, n in node.seen if p.vee is not _DEAD}

    def close(self) -> None:
        for node in self.nodes.values():
            self.drop_pin(node)
