"""`make demo` section: vimg end to end, with qemu-img/qemu-io as the peers and nginx serving
the repository of remote clusters."""

from __future__ import annotations

import json
from pathlib import Path


def run_demo(work: Path, nginx, run, banner) -> None:
    banner("vfs.image: qcow2 -> vimg, snapshots, a flipped bit, remote clusters")
    d = work / "image"
    d.mkdir()
    q, v = d / "guest.qcow2", d / "guest.vimg"
    run("qemu-img", "create", "-q", "-f", "qcow2", q, "64M")
    run("qemu-io", "-c", "write -P 0xab 0 1M", "-c", "write -P 0xcd 32M 64k", q)
    run("vimg", "convert", "-O", "vimg", q, v)
    run("vimg", "compare", q, v)
    run("vimg", "info", v)
    run("vimg", "snapshot", "-c", "clean", v)
    run("vimg", "io", v, "-c", "write -P 0x11 0 4k")
    run("vimg", "snapshot", "-a", "clean", v)
    run("vimg", "io", v, "-c", "read -P 0xab 0 4k")

    print("\n# flip one bit of stored guest data: reads fail naming the guest offset")
    rotten = d / "rotten.vimg"
    rotten.write_bytes(v.read_bytes())
    extents = json.loads(run("vimg", "map", "--json", rotten))
    off = next(e["offset"] for e in extents if e.get("data") and "offset" in e)
    with open(rotten, "r+b") as f:
        f.seek(off + 100)
        b = f.read(1)
        f.seek(off + 100)
        f.write(bytes([b[0] ^ 1]))
    run("vimg", "verify", rotten, check=False)
    run("vimg", "io", rotten, "-c", "read 0 4k", check=False)
    run("vimg", "check", v)

    print("\n# flip one bit of the current header: its mirror copy keeps the disk (no roll-back);")
    print("# check reports the damaged copy, the next writer rewrites it")
    hdr = d / "header.vimg"
    hdr.write_bytes(v.read_bytes())
    seq = json.loads(run("vimg", "info", "--json", hdr))["format-specific"]["data"]["sequence"]
    with open(hdr, "r+b") as f:
        f.seek((seq % 2) * 4096 + 60)
        b = f.read(1)
        f.seek((seq % 2) * 4096 + 60)
        f.write(bytes([b[0] ^ 1]))
    run("vimg", "compare", q, hdr)
    run("vimg", "check", hdr, check=False)
    run("vimg", "io", hdr, "-c", "write -P 0xab 0 4k")
    run("vimg", "check", hdr)

    print("\n# a backing name is followed only inside the image's directory (or --backing-dir)")
    run(
        "vimg",
        "create",
        "-F",
        "raw",
        "-b",
        "../../../../../etc/passwd",
        d / "evil.vimg",
        check=False,
    )

    print("\n# a persistent dirty bitmap: which ranges changed since it was added (or cleared)")
    run("vimg", "bitmap", "--add", v, "since-demo")
    run("vimg", "io", v, "-c", "write -P 0x22 8M 128k", "-c", "write -z 16M 64k")
    run("vimg", "bitmap", "--dirty", v, "since-demo")
    run("vimg", "bitmap", "--remove", v, "since-demo")

    print("\n# push the clusters to a repository served by nginx; 'another host' pulls lazily")
    repo = nginx.webroot / "images"
    run("vfsd", "repo", "init", repo)
    run("vimg", "push", v, "--repo", repo, "--ref", "demo", "-q")
    url = nginx.url("images")
    copy = d / "copy.vimg"
    store = d / "store"
    run("vimg", "pull", "--ref", "demo", "--lazy", "--repo", url, copy)
    run("vimg", "io", "--repo", url, "--store", store, copy, "-c", "read -P 0xcd 32M 64k")
    run("vimg", "pull", "--repo", url, "--store", store, "-q", copy)
    run("vimg", "check", copy)
    # the copy is the pushed image (with the bitmap section's writes, so not the qcow2 any more):
    # compare it with the original, whose clusters now live in the repository
    run("vimg", "compare", "--repo", repo, v, copy)
