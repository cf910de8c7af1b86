"""How a guest's disks reach QEMU: each disk is a stack of ``-blockdev`` nodes and one device.

The runner only asks a disk for its blockdev specs (QAPI ``BlockdevOptions``, bottom node first,
the top one named ``node_name``) and puts a ``virtio-blk-pci`` on the top node. What is under it
is the disk's business:

- :class:`ImageFile`: a local raw or qcow2 file (``file`` node, then the format node);
- :class:`Blockdevs`: any stack given as specs;
- :class:`vmctl.exports.VimgDisk`: a vimg image behind its ``vfsd export`` (an ``nbd`` node).

QEMU takes its own locks on local image files (``file-posix`` ``locking=auto``), so a second
QEMU cannot open a disk another one writes; vmctl relies on that rather than adding its own.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vfs.errors import NotFound, UsageError

_NODE = re.compile(r"^[A-Za-z][A-Za-z0-9_-]{0,30}$")
FORMATS = ("raw", "qcow2")


def check_node_name(name: str) -> str:
    # QEMU's own rule for node names: a letter, then letters, digits, '-', '_' (at most 31).
    if not _NODE.match(name):
        raise UsageError(f"bad block node name {name!r}")
    return name


class Disk:
    """Base: something a guest sees as one virtio disk."""

    node_name: str
    read_only: bool = False

    def blockdevs(self) -> list[dict[str, Any]]:
        raise NotImplementedError

    def describe(self) -> dict[str, Any]:
        """For the VM's state and ``status``: what this disk is, in plain data."""
        return {"node": self.node_name, "blockdevs": self.blockdevs()}

    def device_args(self, index: int) -> list[str]:
        return ["-device", f"virtio-blk-pci,drive={self.node_name},id=vd{index}"]

    def argv(self, index: int) -> list[str]:
        args: list[str] = []
        for spec in self.blockdevs():
            args += ["-blockdev", json.dumps(spec, separators=(",", ":"))]
        return args + self.device_args(index)


@dataclass
class ImageFile(Disk):
    """A raw or qcow2 image file on the host."""

    path: Path
    format: str = "qcow2"
    node_name: str = "disk0"
    read_only: bool = False
    #: Guest flushes reach the host file (cache.no-flush off); page cache on (cache.direct off).
    cache_direct: bool = False

    def __post_init__(self) -> None:
        self.path = Path(self.path)
        check_node_name(self.node_name)
        if self.format not in FORMATS:
            raise UsageError(
                f"disk format must be one of {', '.join(FORMATS)}, not {self.format!r}"
            )
        if not self.path.exists():
            raise NotFound(f"disk image {self.path} does not exist")

    def blockdevs(self) -> list[dict[str, Any]]:
        file_node = f"{self.node_name}-file"
        return [
            {
                "driver": "file",
                "filename": str(self.path.resolve()),
                "node-name": file_node,
                "cache": {"direct": self.cache_direct, "no-flush": False},
                "read-only": self.read_only,
            },
            {
                "driver": self.format,
                "file": file_node,
                "node-name": self.node_name,
                "read-only": self.read_only,
            },
        ]

    def describe(self) -> dict[str, Any]:
        return {"node": self.node_name, "path": str(self.path), "format": self.format,
                "read_only": self.read_only}  # fmt: skip


@dataclass
class Blockdevs(Disk):
    """A disk given as ready blockdev specs (bottom first; the last one is the guest's disk)."""

    specs: list[dict[str, Any]] = field(default_factory=list)
    read_only: bool = False

    def __post_init__(self) -> None:
        if not self.specs:
            raise UsageError("a blockdev disk needs at least one node")
        for spec in self.specs:
            if not isinstance(spec.get("driver"), str):
                raise UsageError(f"blockdev spec without a driver: {spec}")
            check_node_name(str(spec.get("node-name", "")))
        self.node_name = self.specs[-1]["node-name"]

    def blockdevs(self) -> list[dict[str, Any]]:
        return [dict(s) for s in self.specs]


def open_disk(path: Path, index: int, state_dir: Path | None = None) -> Disk:
    """The disk ``vmctl run --disk PATH`` gives the guest as its ``index``-th virtio disk.

    A raw or qcow2 image is opened by QEMU itself (format probed by vfs.image); a vimg image
    is served by a ``vfsd export`` process on an NBD socket in ``state_dir``
    (:class:`vmctl.exports.VimgDisk`; the caller starts it with ``start_exports``).
    """
    path = Path(path)
    if not path.exists():
        raise NotFound(f"disk image {path} does not exist")
    from vfs.image.fileio import probe_format

    fmt = probe_format(str(path))
    if fmt == "vimg":
        if state_dir is None:
            raise UsageError(f"{path}: a vimg disk needs the VM's state directory (its export)")
        from vmctl.exports import vimg_disk

        return vimg_disk(path, index, state_dir)
    if fmt not in FORMATS:
        raise UsageError(f"{path}: cannot use a {fmt} image as a disk (raw, qcow2 or vimg)")
    return ImageFile(path, fmt, node_name=f"disk{index}")
