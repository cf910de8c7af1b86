"""What objects name other objects, across formats: the glue between garbage collection
(:mod:`vfs.redirect.repo_gc`, :mod:`vfs.redirect.roots`, which know no formats) and the formats
(:mod:`vfs.tree` manifests, :mod:`vfs.image` vimg images).

- :func:`object_references`: the objects one repository object names — a template manifest
  its content objects, a vimg image (``vimg push --ref``: a metadata-only image) its remote
  clusters, anything else (a plain ``repo put``) none.
- :func:`image_objects`: the remote clusters a local vimg image needs — its active view, every
  snapshot, and every vimg image of its backing chain.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from vfs.errors import FormatError
from vfs.image import layout as IL
from vfs.image.image import Image
from vfs.redirect.roots import ObjectSet
from vfs.tree import manifest_layout as TL
from vfs.tree.gcroots import content_objects
from vfs.tree.template import MAX_MANIFEST_BYTES, Template

_PROBE = max(IL.HEADER_COPY_OFFSETS) + len(IL.MAGIC)


def _kind(path: Path) -> str:
    with open(path, "rb") as f:
        head = f.read(_PROBE)
    if head.startswith(TL.MAGIC):
        return "template"
    if any(head[o : o + len(IL.MAGIC)] == IL.MAGIC for o in IL.HEADER_COPY_OFFSETS):
        return "vimg"
    return "object"


def object_references(oid: str, path: Path) -> set[str]:
    """The object ids the repository object ``oid`` (stored plain at ``path``) names."""
    kind = _kind(path)
    if kind == "template":
        if path.stat().st_size > MAX_MANIFEST_BYTES:
            raise FormatError(f"manifest {oid} is larger than any manifest may be")
        return content_objects(Template.from_bytes(path.read_bytes(), oid))
    if kind == "vimg":
        return image_objects(path, chain=False)
    return set()


def image_objects(
    path: str | os.PathLike[str], *, chain: bool = True, backing_dirs: tuple[str, ...] = ()
) -> set[str]:
    """Every remote cluster (object id) of the vimg image at ``path``: the active view and
    every snapshot, and with ``chain`` those of the vimg images below it (followed only into
    the image's own directory and ``backing_dirs``, as every vimg command)."""
    out: set[str] = set()
    with Image.open(
        os.fspath(path), readonly=True, with_backing=chain, backing_dirs=backing_dirs
    ) as img:
        layer: object = img
        while isinstance(layer, Image):
            out |= _layer_objects(layer)
            layer = layer.backing
    return out


def _layer_objects(img: Image) -> set[str]:
    out = {e.oid.hex() for _, e in img.iter_entries() if e.kind == IL.REMOTE}
    for snap in img.snapshots:
        out |= {e.oid.hex() for _, e in img.iter_entries(snap.name) if e.kind == IL.REMOTE}
    return out


def image_set(path: str | os.PathLike[str], repo: str | None) -> ObjectSet:
    """The gc-root set of a local image: its own remote clusters (every snapshot too; an image
    below it in a chain is a root of its own), cache when a repository can give them back
    (``repo``), kept otherwise."""
    objs = image_objects(path, chain=False)
    return ObjectSet(cache=objs) if repo else ObjectSet(keep=objs)


def open_image_set(img: Image, repo: str | None) -> ObjectSet:
    """:func:`image_set` of an image this process has open (a writer holds the image's lock:
    opening it a second time would be refused as "being written by another process")."""
    objs = _layer_objects(img)
    return ObjectSet(cache=objs) if repo else ObjectSet(keep=objs)


def state_sets(
    state_dir: str | os.PathLike[str], store: Any, fetchable: bool
) -> dict[str, ObjectSet]:
    """The gc-root sets of a ``vfsd`` state directory, from its registry and the manifests in
    ``store`` (a template whose manifest is not there keeps at least its manifest's id)."""
    from vfs.errors import VfsError
    from vfs.redirect.resolver import Resolver
    from vfs.tree.gcroots import template_set
    from vfs.tree.vee import VeeRegistry

    digests = {r.template for r in VeeRegistry(state_dir).vees.values()}
    sets = {}
    for d in sorted(digests):
        try:
            sets[d] = template_set(Template.load(Resolver(store), d), fetchable=fetchable)
        except VfsError:
            sets[d] = ObjectSet(keep={d})
    return sets
