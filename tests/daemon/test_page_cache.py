"""Density: 50 VEEs reading the same template file cost the page cache of one copy."""

from __future__ import annotations

import os

import pytest

from vfs.daemon import control

pytestmark = [pytest.mark.fuse, pytest.mark.slow]

SIZE = 32 << 20
VEES = 50


def cached_bytes() -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("Cached:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no Cached: line in /proc/meminfo")


def test_fifty_vees_share_one_page_cache_copy(daemon, tmp_path):
    src = tmp_path / "lib"
    src.mkdir()
    (src / "libbig.so").write_bytes(os.urandom(SIZE))
    digest = daemon.publish(src, "lib")
    for i in range(VEES):
        control.call(daemon.state, {"op": "add", "name": f"v{i}", "template": digest})
    paths = [daemon.mnt / f"v{i}" / "libbig.so" for i in range(VEES)]
    assert len({os.stat(p).st_ino for p in paths}) == 1  # one inode in every VEE root

    os.sync()
    before = cached_bytes()
    first = paths[0].read_bytes()
    for p in paths[1:]:
        with open(p, "rb") as f:
            while f.read(1 << 20):
                pass
    grown = cached_bytes() - before
    assert len(first) == SIZE
    # 50 private copies would add 1.6 GB; one shared copy adds SIZE (the store's own pages of
    # the object are dropped after reading). Allow generous slack for the rest of the system.
    assert grown < 3 * SIZE, f"page cache grew by {grown / 2**20:.0f} MiB for {VEES} readers"
