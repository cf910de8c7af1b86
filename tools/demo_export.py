"""`make demo` section: a vimg image served to the tools that cannot read vimg — qemu-img,
nbdinfo and nbdcopy over NBD, mkfs/mount/e2fsck on the FUSE raw file — the dirty map, and a
remote image served from nginx with only what is read fetched."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

BIN = Path(sys.executable).parent


def _start(argv: list[str], log: Path, ctl: Path) -> subprocess.Popen:
    """A `vfsd export` in the background, waited on until its control socket says ready."""
    from vfs.export.client import ExportControl

    shown = " ".join(["vfsd", *argv])
    print(f"$ {shown} &", flush=True)
    with open(log, "wb") as f:
        proc = subprocess.Popen([str(BIN / "vfsd"), *argv], stdout=f, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"demo step failed: {shown}: {log.read_text()[-2000:]}")
        try:
            if ctl.exists() and ExportControl(ctl).ping().get("ready"):
                return proc
        except Exception:
            pass
        time.sleep(0.05)
    proc.kill()
    raise SystemExit(f"demo step failed: {shown} not ready in 60 s")


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


def run_demo(work: Path, nginx, run, banner) -> None:
    banner("vfs.export: a vimg disk over NBD and as a raw file (qemu-img, nbdinfo, mkfs)")
    d = work / "export"
    d.mkdir()
    img = d / "vm1.vimg"
    run("vimg", "create", "-f", "vimg", img, "256M")
    run("vimg", "io", img, "-c", "write -P 0x5a 0 1M", "-c", "write -P 0xa5 128M 64k")
    sock, fuse = d / "vm1.sock", d / "vm1.raw"
    fuse.touch()
    uri = f"nbd+unix:///vm1?socket={sock}"
    proc = _start(["export", str(img), "--nbd", str(sock), "--fuse", str(fuse)], d / "vm1.log",
                  Path(f"{sock}.ctl"))  # fmt: skip
    try:
        run("nbdinfo", uri)
        run("nbdinfo", "--map", uri)  # holes and data as QEMU sees them
        run("vfsd", "export", "mark", f"{sock}.ctl")  # a point in time for the dirty map
        run("qemu-io", "-f", "raw", "-c", "write -P 0x77 64M 128k", "-c", "flush", uri)
        run("vfsd", "export", "dirty", f"{sock}.ctl", "--json")
        run("nbdinfo", "--map=qemu:dirty-bitmap:dirty", uri)
        run("qemu-img", "convert", "-p", "-f", "raw", "-O", "qcow2", uri, d / "copy.qcow2")
        run("qemu-img", "compare", "-f", "raw", "-F", "qcow2", uri, d / "copy.qcow2")

        print("\n# the same disk as a file: a file system on it, written through the kernel")
        mnt = d / "mnt"
        mnt.mkdir()
        run("mkfs.ext4", "-q", "-F", "-E", "nodiscard", fuse)  # a discard would dirty it all
        run("mount", "-o", "loop", fuse, mnt)
        try:
            run("cp", "-a", str(Path(__file__).parent), mnt / "tools")
        finally:
            run("umount", mnt)
        run("e2fsck", "-fn", fuse)
        run("vfsd", "export", "status", f"{sock}.ctl")
    finally:
        _stop(proc)
    run("vimg", "check", img)

    print("\n# a remote image: pushed to nginx, served on 'another host' with an empty store;")
    print("# a whole qemu-img convert fetches only the clusters that hold data")
    repo = nginx.webroot / "export-images"
    run("vfsd", "repo", "init", repo)
    run("vimg", "push", img, "--repo", repo, "--ref", "vm1", "-q")
    url = nginx.url("export-images")
    lazy = d / "host-b.vimg"
    run("vimg", "pull", "--ref", "vm1", "--lazy", "--repo", url, lazy)
    sock_b = d / "b.sock"
    argv = ["export", str(lazy), "--nbd", str(sock_b), "--name", "vm1", "--store",
            str(d / "store-b"), "--repo", url]  # fmt: skip
    proc = _start(argv, d / "b.log", Path(f"{sock_b}.ctl"))
    try:
        run("qemu-img", "convert", "-f", "raw", "-O", "raw", f"nbd+unix:///vm1?socket={sock_b}",
            d / "b.raw")  # fmt: skip
        st = json.loads(run("vfsd", "export", "status", f"{sock_b}.ctl", "--json"))
        print(f"  fetched {st['fetched_bytes']} bytes of a {st['size']}-byte image")
        run("vfsd", "export", "hydrate", f"{sock_b}.ctl", "--wait")
    finally:
        _stop(proc)
    run("vimg", "check", lazy)
