"""Backing chains (spec section 8): naming, confining, probing and opening the layers below an
image.

Every layer below the top is opened read-only; a chain refuses loops and absurd depths. A
backing name is data from the file (and the file may come from anyone), so a layer is opened
only if its real path (symbolic links resolved) lies inside an allowed directory: the top
image's own directory, plus those the caller names (``--backing-dir``). ``qemu-img`` follows
any name; libvirt and OpenStack confine it from the outside, this does it in the reader.
"""

from __future__ import annotations

import os

from vfs.errors import FormatError, NotFound, UsageError
from vfs.image import layout as L
from vfs.image.core import Backing, Resolver
from vfs.image.fileio import RawFile, probe_format

MAX_CHAIN_DEPTH = 64


def resolve_name(name: str, image_path: str) -> str:
    """The path a backing name stands for: relative names are relative to the image's
    directory (as qemu-img), absolute ones are themselves."""
    if os.path.isabs(name):
        return name
    return os.path.join(os.path.dirname(os.path.abspath(image_path)), name)


def allowed_dirs(image_path: str, extra: tuple[str, ...] | list[str] = ()) -> tuple[str, ...]:
    """The directories backing files of ``image_path`` may lie in (real paths): its own, and
    ``extra``."""
    own = os.path.realpath(os.path.dirname(os.path.abspath(image_path)))
    return tuple(dict.fromkeys([own, *(os.path.realpath(d) for d in extra)]))


def confine(name: str, image_path: str, allowed: tuple[str, ...]) -> str:
    """The real path of backing file ``name`` of ``image_path``, if it lies inside one of the
    ``allowed`` directories; else a UsageError that says how to allow it."""
    real = os.path.realpath(resolve_name(name, image_path))
    for d in allowed:
        if real == d or real.startswith(d if d.endswith("/") else d + "/"):
            return real
    raise UsageError(
        f"backing file {name!r} of {image_path} is {real}, outside the allowed directories "
        f"({', '.join(allowed)}); allow its directory with --backing-dir"
    )


def backing_format_of(path: str) -> str:
    """The format of a would-be backing file (raw or vimg; anything else is refused)."""
    if not os.path.exists(path):
        raise UsageError(f"backing file {path!r} does not exist")
    fmt = probe_format(path)
    if fmt not in L.BACKING_FORMAT_CODES:
        raise UsageError(f"backing format {fmt!r} not supported (raw or vimg)")
    return fmt


def check_backing_name(
    name: str, fmt: str | None, image_path: str, allowed: tuple[str, ...]
) -> str:
    """Validate a backing name for ``image_path``; return its format (probed if not given)."""
    if len(name.encode()) > L.MAX_BACKING_NAME:
        raise UsageError("backing file name too long")
    if "\0" in name:
        raise UsageError("backing file name contains a NUL byte")
    path = resolve_name(name, image_path)
    if not os.path.exists(path):
        raise UsageError(f"backing file {name!r} does not exist")
    path = confine(name, image_path, allowed)
    fmt = fmt or backing_format_of(path)
    if fmt not in L.BACKING_FORMAT_CODES:
        raise UsageError(f"backing format {fmt!r} not supported (raw or vimg)")
    return fmt


def virtual_size_of(name: str, fmt: str, image_path: str, allowed: tuple[str, ...]) -> int:
    """The guest size a backing file offers (for ``create -b`` without a size)."""
    path = confine(name, image_path, allowed)
    if fmt == "vimg":
        from vfs.image.image import Image

        with Image.open(path, readonly=True, with_backing=False) as b:
            return b.size
    with RawFile(path) as r:
        return r.size


def open_layer(
    name: str,
    fmt: str,
    image_path: str,
    resolver: Resolver | None,
    chain: tuple[str, ...],
    allowed: tuple[str, ...],
) -> Backing:
    """Open the backing file ``name`` of ``image_path`` read-only, if it lies in an ``allowed``
    directory. ``chain`` holds the real paths of the layers above it (loop detection)."""
    path = resolve_name(name, image_path)
    real = confine(name, image_path, allowed)
    if real in chain:
        raise FormatError(f"backing chain loops back to {path}")
    if len(chain) >= MAX_CHAIN_DEPTH:
        raise FormatError("backing chain too deep")
    if not os.path.exists(real):
        raise NotFound(f"backing file {name!r} of {image_path} not found")
    if fmt == "raw":
        return RawFile(real)
    from vfs.image.image import Image

    return Image.open(real, readonly=True, resolver=resolver, _chain=chain, _allowed=allowed)
