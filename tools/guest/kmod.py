"""Kernel modules for the guest: read each module's ``depends=`` and order them for insmod.

The guest has no modprobe database (no modules.dep, no depmod run): its init loads a fixed list
with ``insmod`` in order. The order is computed here, on the host, from the modules themselves:
every ``.ko`` carries a ``.modinfo`` ELF section of NUL-separated ``key=value`` strings, among them
``depends=a,b``. Reading it from the section (not grepping the file) keeps a stray string in the
code from being taken for a dependency. Compressed modules (``.ko.xz``, ``.ko.zst``, ``.ko.gz``,
as newer Debian kernels ship) are decompressed here, so the guest only ever sees plain ``.ko``.
"""

from __future__ import annotations

import gzip
import lzma
import struct
from pathlib import Path

_SUFFIXES = (".ko", ".ko.xz", ".ko.zst", ".ko.gz")


def read_module(path: Path) -> bytes:
    """The plain ELF bytes of a module file, decompressed if it is compressed."""
    raw = path.read_bytes()
    name = path.name
    if name.endswith(".xz"):
        return lzma.decompress(raw)
    if name.endswith(".gz"):
        return gzip.decompress(raw)
    if name.endswith(".zst"):
        import zstandard

        return zstandard.ZstdDecompressor().decompress(raw, max_output_size=64 << 20)
    return raw


def modinfo(elf: bytes) -> dict[str, str]:
    """The ``.modinfo`` section of an ELF64 little-endian module as a dict (first value wins)."""
    if elf[:4] != b"\x7fELF" or elf[4] != 2 or elf[5] != 1:
        raise ValueError("not an ELF64 little-endian kernel module")
    (shoff,) = struct.unpack_from("<Q", elf, 0x28)
    shentsize, shnum, shstrndx = struct.unpack_from("<HHH", elf, 0x3A)

    def section(i: int) -> tuple[int, int, int]:
        name, _type, _flags, _addr, offset, size = struct.unpack_from(
            "<IIQQQQ", elf, shoff + i * shentsize
        )
        return name, offset, size

    _, str_off, str_size = section(shstrndx)
    names = elf[str_off : str_off + str_size]
    for i in range(shnum):
        name_off, offset, size = section(i)
        end = names.index(b"\0", name_off)
        if names[name_off:end] == b".modinfo":
            info: dict[str, str] = {}
            for item in elf[offset : offset + size].split(b"\0"):
                key, sep, value = item.partition(b"=")
                if sep:
                    info.setdefault(key.decode(), value.decode(errors="replace"))
            return info
    raise ValueError("kernel module without a .modinfo section")


def find_modules(modules_dir: Path) -> dict[str, Path]:
    """Every module under ``lib/modules/<version>/kernel`` by its name (``virtio_pci``)."""
    found: dict[str, Path] = {}
    for suffix in _SUFFIXES:
        for p in modules_dir.rglob(f"*{suffix}"):
            found.setdefault(p.name[: -len(suffix)].replace("-", "_"), p)
    return found


def load_order(wanted: list[str], available: dict[str, Path]) -> list[tuple[str, bytes]]:
    """The wanted modules plus everything they depend on, each after its dependencies.

    Returns (name, plain ELF bytes) in insmod order; among modules that do not depend on each
    other the order of ``wanted`` is kept, so the result is deterministic. A module that is
    missing or a dependency cycle is an error (the guest would fail to load it at boot).
    """
    order: list[tuple[str, bytes]] = []
    done: set[str] = set()
    visiting: set[str] = set()

    def visit(name: str, chain: tuple[str, ...]) -> None:
        if name in done:
            return
        if name in visiting:
            raise ValueError(f"module dependency cycle: {' -> '.join((*chain, name))}")
        path = available.get(name)
        if path is None:
            raise ValueError(
                f"kernel module {name!r} not found" + (f" (needed by {chain[-1]})" if chain else "")
            )
        visiting.add(name)
        elf = read_module(path)
        for dep in filter(None, modinfo(elf).get("depends", "").split(",")):
            visit(dep.replace("-", "_"), (*chain, name))
        visiting.discard(name)
        done.add(name)
        order.append((name, elf))

    for name in wanted:
        visit(name, ())
    return order
