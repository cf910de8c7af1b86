"""ext4 disk images for the test guest, made and read back on the host without mounting.

``make_disk`` runs ``mkfs.ext4 -d`` (the file system is filled from a directory at creation, no
loop device or root needed) and converts to qcow2 with ``qemu-img`` when asked. ``read_disk_file``
reads a file back the way an operator would after a guest died or was stopped hard: on a *copy*
of the image (the original is never modified), ``e2fsck -fy`` replays the journal and checks the
file system, then ``debugfs`` dumps the file. Replaying matters: after an fsync, ext4 may hold the
new inode size only in its journal, and reading the image without replaying it would lose lines
the guest had acknowledged.
"""

from __future__ import annotations

import subprocess
import tempfile
from pathlib import Path

#: Where the guest's append workload writes (relative to the disk's root).
APPEND_LOG = "vfsguest/append.log"


def _run(args: list[str], ok: tuple[int, ...] = (0,)) -> subprocess.CompletedProcess[str]:
    r = subprocess.run(args, capture_output=True, text=True)
    if r.returncode not in ok:
        raise RuntimeError(f"{' '.join(args)} exited {r.returncode}: {r.stderr.strip()}")
    return r


def make_disk(
    path: Path, size: str = "64M", files: dict[str, bytes] | None = None, fmt: str = "raw"
) -> Path:
    """An ext4 image at ``path`` (raw or qcow2) holding ``files`` ({relative path: bytes})."""
    path = Path(path)
    with tempfile.TemporaryDirectory(dir=path.parent, prefix=".mkdisk-") as tmp:
        src = Path(tmp) / "root"
        src.mkdir()
        for rel, data in (files or {}).items():
            if rel.startswith("/") or ".." in Path(rel).parts:
                raise ValueError(f"bad path for a disk file: {rel!r}")
            (src / rel).parent.mkdir(parents=True, exist_ok=True)
            (src / rel).write_bytes(data)
        raw = path if fmt == "raw" else Path(tmp) / "disk.raw"
        _run(["mkfs.ext4", "-q", "-F", "-L", "vfsguest", "-E", "root_owner=0:0",
              "-d", str(src), str(raw), size])  # fmt: skip
        if fmt == "qcow2":
            _run(["qemu-img", "convert", "-f", "raw", "-O", "qcow2", str(raw), str(path)])
        elif fmt != "raw":
            raise ValueError(f"unknown disk format {fmt!r}")
    return path


def read_disk_file(image: Path, rel: str, fmt: str | None = None) -> bytes | None:
    """The bytes of ``rel`` on the ext4 image (None if the file does not exist).

    Works on a copy: converts it to raw (``qemu-img convert``, which also reads qcow2), replays
    the journal and checks it with ``e2fsck -fy`` (exit 0 or 1 — "errors corrected", which a
    journal replay can report — is fine; anything worse raises), then dumps the file.
    """
    image = Path(image)
    with tempfile.TemporaryDirectory(prefix="vfsguest-read-") as tmp:
        copy = Path(tmp) / "disk.raw"
        fmt_args = ["-f", fmt] if fmt else []
        _run(["qemu-img", "convert", *fmt_args, "-O", "raw", str(image), str(copy)])
        _run(["e2fsck", "-fy", str(copy)], ok=(0, 1))
        out = Path(tmp) / "out"
        _run(["debugfs", "-R", f"dump /{rel.lstrip('/')} {out}", str(copy)])
        return out.read_bytes() if out.exists() else None
