"""vimg disks for the guest tests: made with the real `vimg` CLI, read back with it."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from tools.guest import make_disk, read_disk_file


def vimg(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    r = subprocess.run(
        [sys.executable, "-c", "from vfs.cli.vimg import main; main()", *args],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    if check and r.returncode != 0:
        raise AssertionError(f"vimg {' '.join(args)}: exit {r.returncode}: {r.stderr}")
    return r


def vmctl(*args: str, root: Path, timeout: float = 240) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", "from vmctl.cli import main; main()", *args, "--root", str(root)],
        capture_output=True, text=True, timeout=timeout,
    )  # fmt: skip


def make_vimg_disk(path: Path, size: str = "64M") -> Path:
    """An ext4 file system in a vimg image (mkfs.ext4 into raw, then `vimg convert -O vimg`)."""
    raw = make_disk(path.with_suffix(".raw"), size=size)
    vimg("convert", "-f", "raw", "-O", "vimg", str(raw), str(path))
    raw.unlink()
    return path


def read_vimg_file(image: Path, rel: str, backing_dir: Path | None = None) -> bytes | None:
    """``rel`` on the ext4 file system of a vimg image, read through `vimg convert` to raw."""
    raw = image.with_name(image.name + ".readback.raw")
    extra = ["--backing-dir", str(backing_dir)] if backing_dir else []
    try:
        vimg("convert", *extra, "-O", "raw", str(image), str(raw))
        return read_disk_file(raw, rel, fmt="raw")
    finally:
        raw.unlink(missing_ok=True)


def check_clean(image: Path) -> None:
    r = vimg("check", str(image), check=False)
    assert r.returncode == 0, r.stdout + r.stderr


def snapshots(image: Path) -> list[str]:
    info = json.loads(vimg("snapshot", "-l", "--json", str(image)).stdout)
    return [s["name"] for s in info]


def wait_for_synced(serial_log: Path, n: int, timeout: float = 120.0) -> list[int]:
    """Wait until the guest printed "synced N" for some N >= ``n``; the numbers so far."""
    import time

    from tests.vmctl.helpers import synced_numbers

    deadline = time.monotonic() + timeout
    while True:
        try:
            got = synced_numbers(serial_log.read_text(errors="replace"))
        except FileNotFoundError:
            got = []
        if got and max(got) >= n:
            return got
        assert time.monotonic() < deadline, f"the guest did not sync line {n} in {timeout}s"
        time.sleep(0.1)
