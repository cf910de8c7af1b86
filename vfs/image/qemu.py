"""The qemu-img subprocess, used for reading and writing qcow2 (vimg does not parse qcow2).

Format probing (magic bytes) is :func:`vfs.image.fileio.probe_format`.
"""

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
