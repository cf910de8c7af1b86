"""Golden round trips against the real qemu-img: raw -> qcow2 -> vimg -> raw, compare, map."""

from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [
    pytest.mark.qemu,
    pytest.mark.skipif(shutil.which("qemu-img") is None, reason="qemu-img not installed"),
]

VIMG = [str(Path(sys.executable).parent / "vimg")]


def run(*args: str, ok: bool = True) -> subprocess.CompletedProcess:
    p = subprocess.run(list(args), capture_output=True, text=True)
    if ok and p.returncode != 0:
        raise AssertionError(f"{args} failed ({p.returncode}): {p.stderr}")
    assert "Traceback" not in p.stderr
    return p


def make_raw(path: Path, size: int, seed: int) -> None:
    """Random data with holes, zero runs and repeated patterns, at odd offsets."""
    r = random.Random(seed)
    with open(path, "wb") as f:
        f.truncate(size)
        pos = 0
        while pos < size:
            pos += r.choice([0, 4096, 65536, 300_000, 1 << 20])
            n = min(r.choice([512, 4096, 70_000, 200_000]), size - pos)
            if n <= 0:
                break
            kind = r.random()
            data = r.randbytes(n) if kind < 0.6 else bytes([r.randrange(1, 256)]) * n
            f.seek(pos)
            f.write(data)
            pos += n


def data_ranges(m: list[dict]) -> list[tuple[int, int]]:
    out: list[tuple[int, int]] = []
    for d in m:
        if d["data"]:
            if out and out[-1][1] == d["start"]:
                out[-1] = (out[-1][0], d["start"] + d["length"])
            else:
                out.append((d["start"], d["start"] + d["length"]))
    return out


def flags(m: list[dict]) -> list[tuple]:
    """Map extents merged by (depth, present, zero, data), host offsets ignored."""
    out: list[list] = []
    for d in m:
        key = (d["depth"], d["present"], d["zero"], d["data"])
        if out and out[-1][0] == key and out[-1][2] == d["start"]:
            out[-1][2] = d["start"] + d["length"]
        else:
            out.append([key, d["start"], d["start"] + d["length"]])
    return [tuple(x) for x in out]


@pytest.mark.parametrize("compress", [False, True])
def test_raw_qcow2_vimg_raw_round_trip(tmp_path, compress):
    raw = tmp_path / "orig.raw"
    make_raw(raw, 24 << 20, seed=7)
    qcow = tmp_path / "a.qcow2"
    run("qemu-img", "convert", "-f", "raw", "-O", "qcow2", str(raw), str(qcow))
    vimg = tmp_path / "a.vimg"
    args = ["convert", "-f", "qcow2", "-O", "vimg", str(qcow), str(vimg)]
    run(*VIMG, *(args[:5] + ["-c"] + args[5:] if compress else args))
    back = tmp_path / "back.raw"
    run(*VIMG, "convert", "-O", "raw", str(vimg), str(back))
    run("qemu-img", "compare", "-f", "raw", "-F", "raw", str(raw), str(back))
    # vimg's own compare agrees, in both directions and across formats
    run(*VIMG, "compare", str(raw), str(vimg))
    run(*VIMG, "compare", str(qcow), str(vimg))
    assert run(*VIMG, "check", str(vimg)).returncode == 0
    assert run(*VIMG, "verify", str(vimg)).returncode == 0
    # map: same allocation as qemu-img on the qcow2 (at cluster granularity both 64 KiB)
    qmap = json.loads(run("qemu-img", "map", "--output=json", str(qcow)).stdout)
    vmap = json.loads(run(*VIMG, "map", "--json", str(vimg)).stdout)
    assert data_ranges(vmap) == data_ranges(qmap)
    assert flags(vmap) == flags(qmap)  # holes and zeros too, not only data
    assert {k for d in vmap for k in d} <= {k for d in qmap for k in d}
    assert sum(d["length"] for d in vmap) == 24 << 20
    # and back out to qcow2 through qemu-img, compared by qemu-img
    out = tmp_path / "out.qcow2"
    run(*VIMG, "convert", "-O", "qcow2", str(vimg), str(out))
    run("qemu-img", "compare", str(raw), str(out))
    info = json.loads(run(*VIMG, "info", "--json", str(vimg)).stdout)
    assert info["virtual-size"] == 24 << 20 and info["format"] == "vimg"


def test_compare_reports_first_difference(tmp_path):
    raw = tmp_path / "a.raw"
    make_raw(raw, 4 << 20, seed=3)
    vimg = tmp_path / "a.vimg"
    run(*VIMG, "convert", "-O", "vimg", str(raw), str(vimg))
    run(*VIMG, "io", str(vimg), "-c", "write -P 0x5a 1234567 1")
    p = run(*VIMG, "compare", str(raw), str(vimg), ok=False)
    assert p.returncode == 1
    assert "Content mismatch at offset 1234567!" in p.stdout
    q = run("qemu-img", "compare", str(raw), str(tmp_path / "a.raw"))
    assert q.returncode == 0


def test_qemu_io_written_data_reads_back_through_vimg(tmp_path):
    qcow = tmp_path / "q.qcow2"
    run("qemu-img", "create", "-f", "qcow2", str(qcow), "8M")
    run("qemu-io", "-c", "write -P 0xab 0 64k", "-c", "write -P 0xcd 3M 12k", str(qcow))
    vimg = tmp_path / "v.vimg"
    run(*VIMG, "convert", "-O", "vimg", str(qcow), str(vimg))
    run(
        *VIMG,
        "io",
        str(vimg),
        "-c",
        "read -P 0xab 0 64k",
        "-c",
        "read -P 0xcd 3M 12k",
        "-c",
        "read -P 0 64k 64k",
    )
    bad = run(*VIMG, "io", str(vimg), "-c", "read -P 0xab 3M 4k", ok=False)
    assert bad.returncode != 0 and "Pattern verification failed" in bad.stderr


def test_measure_matches_actual_size(tmp_path):
    raw = tmp_path / "a.raw"
    make_raw(raw, 16 << 20, seed=5)
    m = json.loads(run(*VIMG, "measure", "--json", "-O", "vimg", str(raw)).stdout)
    vimg = tmp_path / "a.vimg"
    run(*VIMG, "convert", "-O", "vimg", str(raw), str(vimg))
    end = json.loads(run(*VIMG, "check", "--json", str(vimg)).stdout)["image-end-offset"]
    assert end <= m["required"] <= m["fully-allocated"]
    q = json.loads(run(*VIMG, "measure", "--json", "-O", "qcow2", str(raw)).stdout)
    assert q["required"] > 0
    assert os.path.getsize(vimg) <= m["required"] + (64 << 10)


def test_compressed_qcow2_with_backing_chain_is_flattened(tmp_path):
    """qemu-img made a compressed base and an overlay; vimg convert sees the guest view."""
    raw = tmp_path / "base.raw"
    make_raw(raw, 8 << 20, seed=11)
    base = tmp_path / "base.qcow2"
    run("qemu-img", "convert", "-c", "-f", "raw", "-O", "qcow2", str(raw), str(base))
    top = tmp_path / "top.qcow2"
    run("qemu-img", "create", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", str(top))
    run("qemu-io", "-c", "write -P 0x99 1M 192k", "-c", "write -z 5M 64k", str(top))
    v = tmp_path / "flat.vimg"
    run(*VIMG, "convert", "-O", "vimg", str(top), str(v))
    run(*VIMG, "compare", str(top), str(v))
    run("qemu-img", "compare", str(top), str(raw), ok=False)  # top differs from base
    back = tmp_path / "back.raw"
    run(*VIMG, "convert", "-O", "raw", str(v), str(back))
    run("qemu-img", "compare", "-F", "raw", str(top), str(back))
    # and a vimg chain converted to qcow2 is flattened the same way
    vbase = tmp_path / "vbase.vimg"
    run(*VIMG, "convert", "-O", "vimg", "-c", str(base), str(vbase))
    vtop = tmp_path / "vtop.vimg"
    run(*VIMG, "create", "-b", "vbase.vimg", str(vtop))
    run(*VIMG, "io", str(vtop), "-c", "write -P 0x99 1M 192k", "-c", "write -z 5M 64k")
    out = tmp_path / "out.qcow2"
    run(*VIMG, "convert", "-O", "qcow2", str(vtop), str(out))
    run("qemu-img", "compare", str(top), str(out))
