"""VM state saved with a snapshot (spec 6.1): the blob API vmctl's hibernation uses, its crash
story, verification, and what check and repair do with it."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from vfs.errors import CorruptionError, NotFound
from vfs.image.check import check, verify
from vfs.image.image import Image

from .helpers import Recorder, apply_ops

CS = 4096
VIMG = str(Path(sys.executable).parent / "vimg")


def _state(n: int = 300_003) -> bytes:
    """Like a migration stream: some random pages, long zero runs, an odd length."""
    return os.urandom(70_000) + bytes(200_000) + os.urandom(n - 270_000)


@pytest.mark.parametrize("kind", ["bytes", "file", "chunks"])
def test_save_and_load(tmp_path, kind):
    p = str(tmp_path / "a.vimg")
    st = _state()
    src = {
        "bytes": st,
        "file": io.BytesIO(st),
        "chunks": (st[i : i + 777] for i in range(0, len(st), 777)),
    }
    with Image.create(p, 1 << 20, cluster_size=CS) as img:
        img.write(0, b"disk" * 1024)
        img.snapshot_create("hib", vm_state=src[kind], vm_clock_nsec=5 * 10**9)
        img.write(0, b"after" * 100)
    with Image.open(p, readonly=True) as img:
        assert b"".join(img.load_vmstate("hib")) == st
        assert img.vmstate_size("hib") == len(st)
        assert all(len(c) <= CS for c in img.load_vmstate("hib"))
        s = img.snapshots[0]
        assert s.vm_clock_nsec == 5 * 10**9
        # zero clusters are not stored: 200 KB of zeros take no clusters
        assert sum(1 for _ in img.load_vmstate("hib")) == -(-len(st) // CS)
    res = check(p)
    assert (res.corruptions, res.leaks) == (0, 0)
    with Image.open(p, readonly=True) as img:
        assert verify(img) == []


def test_replace_and_delete_free_the_state(tmp_path):
    p = str(tmp_path / "a.vimg")
    with Image.create(p, 1 << 20, cluster_size=CS) as img:
        img.snapshot_create("s", vm_state=_state())
        end = img.header.host_clusters
        img.save_vmstate("s", b"small")
        assert b"".join(img.load_vmstate("s")) == b"small"
        img.save_vmstate("s", _state())  # reuses what the first state freed
        assert img.header.host_clusters <= end + 8  # metadata churn, not another state
        img.snapshot_apply("s")
        assert img.vmstate_size("s") > 0  # applying keeps the snapshot and its state
        img.snapshot_delete("s")
        with pytest.raises(NotFound):
            img.vmstate_size("s")
    res = check(p)
    assert (res.corruptions, res.leaks) == (0, 0)


def test_a_flipped_bit_in_the_state_is_caught_before_it_is_returned(tmp_path):
    p = str(tmp_path / "a.vimg")
    with Image.create(p, 1 << 20, cluster_size=CS) as img:
        img.snapshot_create("s", vm_state=os.urandom(5 * CS))
    with Image.open(p, readonly=True) as img:
        s = img.snapshots[0]
        table_off = s.vm_state_table_offset
    with open(p, "rb") as f:
        f.seek(table_off + 16 * 2)
        third = int.from_bytes(f.read(8), "little")
    with open(p, "r+b") as f:
        f.seek(third + 77)
        b = f.read(1)
        f.seek(third + 77)
        f.write(bytes([b[0] ^ 0x10]))
    with Image.open(p, readonly=True) as img:
        got = []
        with pytest.raises(CorruptionError, match="cluster 2"):
            for chunk in img.load_vmstate("s"):
                got.append(chunk)
        assert len(got) == 2  # the damaged cluster was never handed out
        bad = verify(img)
        assert [b.get("vm-state") for b in bad] == [True]


def test_damaged_state_table_is_dropped_by_repair_and_the_snapshot_kept(tmp_path):
    p = str(tmp_path / "a.vimg")
    with Image.create(p, 1 << 20, cluster_size=CS) as img:
        img.write(0, b"1" * CS)
        img.snapshot_create("s", vm_state=os.urandom(3 * CS))
        img.write(0, b"2" * CS)
        table_off = img.snapshots[0].vm_state_table_offset
    with open(p, "r+b") as f:  # flipped, so the byte changes whatever the random state made it
        f.seek(table_off + 1)
        old = f.read(1)[0]
        f.seek(table_off + 1)
        f.write(bytes([old ^ 0xEE]))
    assert check(p).exit_code == 2
    res = check(p, "all")
    assert res.exit_code == 0 and any("VM state" in m for m in res.messages)
    with Image.open(p) as img:
        assert img.vmstate_size("s") == 0
        img.snapshot_apply("s")
        assert img.read(0, CS) == b"1" * CS
    assert check(p).exit_code == 0


def test_power_failure_during_save(tmp_path):
    """Cut the write stream at every fsync of a save_vmstate: the snapshot has its old state
    or the new one, whole; check is clean."""
    rec = Recorder()
    p = str(tmp_path / "a.vimg")
    old, new = os.urandom(6 * CS), os.urandom(9 * CS + 5)
    with Image.create(p, 1 << 20, cluster_size=CS, opener=rec.opener) as img:
        img.snapshot_create("s", vm_state=old)
        start = len(rec.ops)
        img.save_vmstate("s", new)
    syncs = [i for i, op in enumerate(rec.ops) if op[0] == "sync" and i >= start]
    crash = str(tmp_path / "crash.vimg")
    seen = set()
    for cut in [start - 1] + syncs:
        apply_ops(crash, rec.ops[: cut + 1])
        with Image.open(crash, readonly=True) as img:
            got = b"".join(img.load_vmstate("s"))
        assert got in (old, new)
        seen.add(got == new)
        res = check(crash)
        assert (res.corruptions, res.leaks) == (0, 0), res.messages[:3]
    assert seen == {False, True}


def test_vmstate_cli(tmp_path):
    p = str(tmp_path / "a.vimg")
    st = tmp_path / "state.bin"
    st.write_bytes(_state())
    run = lambda *a, **k: subprocess.run([VIMG, *a], capture_output=True, **k)  # noqa: E731
    assert run("create", p, "1M").returncode == 0
    assert run("snapshot", "-c", "hib", p).returncode == 0
    assert run("vmstate", "--save", str(st), p, "hib").returncode == 0
    out = run("vmstate", "--load", "-", p, "hib")
    assert out.returncode == 0 and out.stdout == st.read_bytes()
    assert run("vmstate", p, "hib").stdout.strip() == str(len(st.read_bytes())).encode()
    info = json.loads(run("info", "--json", p).stdout)
    assert info["snapshots"][0]["vm-state-size"] == len(st.read_bytes())
    r = run("vmstate", "--load", "-", p, "nope")
    assert r.returncode == 4 and b"no snapshot" in r.stderr
