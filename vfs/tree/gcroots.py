"""The objects templates need: the gc root of a ``vfsd`` state directory, and a template's
references for repository garbage collection.

A state directory's VEEs use templates; while they do, the local store must keep what the VEEs
cannot do without (:mod:`vfs.redirect.roots`): with no repository behind the daemon, every object
of every template in use (nothing could fetch it back); with one, the manifests are kept and the
content objects are cache (evicted under quota pressure, fetched again on the next read).

:class:`StateRoot` keeps that root true as the daemon changes its VEEs. The order is the safety:
a template's objects join the root *before* a VEE depends on them (before the registry names the
template) and leave it only *after* no VEE does (after the registry forgot it), and a template
being added or upgraded to counts as used from the first step (``hold``) to the last.

The roots name the ids the store keeps the objects *under*: a daemon that keeps encrypted
templates encrypted (``vfsd serve --keep-encrypted``, docs/encryption.md §9.1) stores each
object as its ciphertext, under the ciphertext's id, so its root names those ids
(``stored_id``, the resolver's mapping), never plaintext ids the store does not hold.
"""

from __future__ import annotations

import logging
import os
import threading
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from vfs.errors import SizeMismatch
from vfs.redirect.roots import GcRoots, ObjectSet
from vfs.tree.template import Template

log = logging.getLogger(__name__)

KIND = "vee-state"


def content_objects(t: Template) -> set[str]:
    """Every content object a template's files name (hard links and repeats once)."""
    return {e.oid for _, e in t.walk() if e.oid is not None}


def _same(oid: str) -> str:
    return oid


def template_set(
    t: Template, *, fetchable: bool, stored_id: Callable[[str], str] = _same
) -> ObjectSet:
    """What a VEE on ``t`` needs from the store: the manifest always kept; the content kept
    too, or only cached when a repository can give it back (``fetchable``). ``stored_id``:
    the id the store keeps an object under (the object's own id unless it is kept
    encrypted)."""
    manifest = {stored_id(t.digest)}
    content = {stored_id(oid) for oid in content_objects(t)}
    if fetchable:
        return ObjectSet(keep=manifest, cache=content)
    return ObjectSet(keep=manifest | content)


def object_sizes(t: Template) -> dict[str, int]:
    """Object id -> size of every content object ``t``'s files name (the manifest's sizes).
    By inode, not by path: called at every kernel-engine mount, it builds no path names."""
    entries = (t.getattr(ino) for ino in range(1, len(t) + 1))
    return {e.oid: e.size for e in entries if e.oid is not None}


@dataclass(frozen=True)
class MissingObject:
    """A content object of a template that the store lacks."""

    oid: str
    size: int  # the manifest's
    path: bytes  # the first path (walk order) that names it, for messages


def missing_objects(t: Template, store: Any) -> list[MissingObject]:
    """Every content object of ``t`` that ``store`` (a :class:`LocalStore`) lacks, once each,
    in walk order. One ``stat`` per object: a local object of another size than the manifest
    says is :class:`SizeMismatch` (the manifest lies, or the object is not this one: the
    kernel engine would serve its bytes as they are, and the FUSE engine would fail every
    read of it), so the template is refused here, before a VEE uses it."""
    out: list[MissingObject] = []
    seen: set[str] = set()
    for path, e in t.walk():
        if e.oid is None or e.oid in seen:
            continue
        seen.add(e.oid)
        try:
            actual = os.stat(store.object_path(e.oid)).st_size
        except FileNotFoundError:
            out.append(MissingObject(e.oid, e.size, path))
            continue
        if actual != e.size:
            raise SizeMismatch(
                f"object {e.oid}: the manifest says {e.size} bytes, the store's copy has "
                f"{actual} (the manifest lies); refusing the template",
                oid=e.oid,
                actual=actual,
                expected=e.size,
            )
    return out


class StateRoot:
    """The gc root of one state directory in one store (thread-safe: the daemon calls it from
    worker threads)."""

    def __init__(
        self,
        roots: GcRoots,
        state_dir: str | os.PathLike[str],
        repo: str | None,
        *,
        stored_id: Callable[[str], str] = _same,
    ):
        self.roots = roots
        self.stored_id = stored_id
        self.path = os.path.abspath(os.fspath(state_dir))
        self.repo = repo
        self._lock = threading.Lock()
        self._held: Counter[str] = Counter()
        self._templates: dict[str, Template] = {}
        self._sets: dict[str, ObjectSet] = {}  # computed once per template (a walk of it)

    def _set(self, digest: str, t: Template | None, old: Mapping[str, ObjectSet]) -> ObjectSet:
        if t is not None:
            s = self._sets.get(digest)
            if s is None:
                s = self._sets[digest] = template_set(
                    t, fetchable=self.repo is not None, stored_id=self.stored_id
                )
            return s
        # Not loaded (its manifest is unreachable now, or its key is missing): whatever the
        # root had for it stays.
        return old.get(digest) or ObjectSet(keep={self.stored_id(digest)})

    def hold(self, digest: str, t: Template | None = None) -> None:
        """``digest`` is about to be used (a VEE is being added or upgraded to it): its
        objects join the root now (the manifest alone until ``t``, the loaded template, is
        known). Durable when this returns. Pair with :meth:`release`."""
        with self._lock:
            if t is not None:
                self._templates[digest] = t
            if self._held[digest] == 0 or t is not None:
                old = self._old_sets()
                self.roots.update(
                    KIND, self.path, add={digest: self._set(digest, t, old)}, repo=self.repo
                )
            self._held[digest] += 1

    def release(self, digest: str) -> None:
        """The operation that held ``digest`` is over (it succeeded: the registry names it;
        or it failed: the next :meth:`sync` drops it)."""
        with self._lock:
            self._held[digest] -= 1
            if self._held[digest] <= 0:
                del self._held[digest]

    def sync(self, in_use: Mapping[str, Template | None]) -> None:
        """Make the root exactly the templates ``in_use`` (digest → loaded template, or None
        when it could not be loaded) plus those held: called after the registry changed."""
        with self._lock:
            for d, t in in_use.items():
                if t is not None:
                    self._templates[d] = t
            old = self._old_sets()
            wanted = set(in_use) | set(self._held)
            sets = {d: self._set(d, self._templates.get(d), old) for d in sorted(wanted)}
            for d in list(self._templates):
                if d not in wanted:
                    del self._templates[d]
                    self._sets.pop(d, None)
            self.roots.put(KIND, self.path, sets, repo=self.repo)

    def _old_sets(self) -> dict[str, ObjectSet]:
        r = self.roots.get(KIND, self.path)
        return dict(r.sets) if r is not None else {}
