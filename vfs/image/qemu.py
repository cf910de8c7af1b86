"""The qemu-img subprocess, used for reading and writing qcow2 (vimg does not parse qcow2)."""

from __future__ import annotations

import shutil
import subprocess

from vfs.errors import FormatError, UsageError


def qemu_img(*args: str) -> str:
    """Run ``qemu-img ARGS``; return stdout; a failure becomes one-line FormatError."""
    exe = shutil.which("qemu-img")
    if exe is None:
        raise UsageError("qemu-img is not installed (needed to read or write qcow2)")
    proc = subprocess.run([exe, *args], capture_output=True, text=True)
    if proc.returncode != 0:
        lines = [ln for ln in proc.stderr.strip().splitlines() if ln.strip()]
        raise FormatError(f"qemu-img {args[0]} failed: {lines[-1] if lines else proc.returncode}")
    return proc.stdout


def probe_format(path: str) -> str:
    """'vimg', 'qcow2' or 'raw' from the first bytes of the file."""
    from vfs.image.layout import HEADER_SLOT_OFFSETS, MAGIC

    try:
        with open(path, "rb") as fh:
            head = fh.read(8192)
    except FileNotFoundError:
        raise UsageError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise UsageError(f"{path}: is a directory") from None
    # Either slot may hold the current header (a torn write can damage the other one).
    if any(head[o : o + 8] == MAGIC for o in HEADER_SLOT_OFFSETS):
        return "vimg"
    if head[:4] == b"QFI\xfb":
        return "qcow2"
    return "raw"
