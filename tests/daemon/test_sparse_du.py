"""Sparse template files through a real mount: ``du`` in a VEE root counts their data, not their
holes, whether the template came from a directory or from a GNU tar, and copy-up keeps them
sparse."""

from __future__ import annotations

import hashlib
import os
import subprocess
from pathlib import Path

import pytest

pytestmark = pytest.mark.fuse

HOLE = 10 << 20


def _make(src: Path) -> None:
    src.mkdir()
    with open(src / "hole.img", "wb") as f:  # 4 KiB data, a 10 MiB hole, 4 bytes
        f.write(b"head" * 1024)
        f.seek(HOLE, os.SEEK_CUR)
        f.write(b"tail")
    with open(src / "all-hole", "wb") as f:
        f.truncate(HOLE)


def _du_kib(path: Path, *flags: str) -> int:
    out = subprocess.run(["du", "-s", "-k", *flags, str(path)], check=True, capture_output=True,
                         text=True).stdout  # fmt: skip
    return int(out.split()[0])


def test_du_in_a_vee_root_sees_the_holes(daemon):
    src = daemon.root / "sparse-src"
    _make(src)
    tar = daemon.root / "sparse.tar"
    subprocess.run(["tar", "--sparse", "--format=posix", "-cf", str(tar), "-C", str(src), "."],
                   check=True, capture_output=True)  # fmt: skip
    daemon.publish(src, "sparse-dir")
    daemon.publish(tar, "sparse-tar")
    daemon.vee("add", "sd", "--template", "sparse-dir")
    daemon.vee("add", "st", "--template", "sparse-tar")
    want = hashlib.sha256((src / "hole.img").read_bytes()).hexdigest()
    for vee in ("sd", "st"):
        root = daemon.mnt / vee
        assert _du_kib(root / "hole.img", "--apparent-size") == (4096 + HOLE + 4 + 1023) // 1024
        assert _du_kib(root / "hole.img") <= 8  # 4 KiB + 4 bytes, not 10 MiB
        assert _du_kib(root / "all-hole") == 0
        assert _du_kib(root) < 64, vee  # the whole VEE root
        assert os.stat(root / "hole.img").st_blocks == 9
        assert hashlib.sha256((root / "hole.img").read_bytes()).hexdigest() == want
    # copy-up through the kernel (chmod copies the data up): still sparse, same bytes
    root = daemon.mnt / "sd"
    os.chmod(root / "hole.img", 0o600)
    upper = daemon.state / "vees" / "sd" / "upper" / "hole.img"
    assert upper.exists() and os.stat(upper).st_blocks <= 16
    assert _du_kib(root / "hole.img") <= 8
    assert hashlib.sha256((root / "hole.img").read_bytes()).hexdigest() == want
    assert os.stat(daemon.mnt / "st" / "hole.img").st_blocks == 9  # the other VEE: unchanged
