"""`make demo` section: publish a template to a repository behind nginx, serve two VEEs from
one FUSE mount (contents fetched on first read), copy-up, upgrade, kill -9 and restart."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

from vfs.daemon import mounts

BIN = Path(sys.executable).parent


def _make_tree(src: Path, version: int) -> None:
    (src / "etc").mkdir(parents=True, exist_ok=True)
    (src / "bin").mkdir(exist_ok=True)
    (src / "usr" / "share" / "doc").mkdir(parents=True, exist_ok=True)
    (src / "etc" / "hostname").write_text("template\n")
    (src / "etc" / "release").write_text(f"demo-os {version}\n")
    (src / "etc" / "app.conf").write_text("workers = 4\n")
    shutil.copy2("/bin/ls", src / "bin" / "ls")
    with open(src / "usr" / "share" / "doc" / "big.bin", "wb") as f:
        f.write(os.urandom(8 << 20))
    for i in range(200):
        (src / "usr" / "share" / "doc" / f"page{i:03}.txt").write_text(f"page {i}\n" * 20)


def _wait(cond, what: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return
        time.sleep(0.05)
    raise SystemExit(f"demo: timed out waiting for {what}")


def run_demo(work: Path, nginx, run, banner) -> None:
    banner("vfs.tree: one template, many VEEs, one FUSE mount")
    d = work / "tree"
    repo = nginx.webroot / "templates"
    run("vfsd", "repo", "init", repo)
    src = d / "rootfs"
    _make_tree(src, 1)
    run("vfsd", "template", "publish", src, "--repo", repo, "--name", "demo-os")
    run("vfsd", "template", "publish", src, "--repo", repo, "--name", "demo-os")
    print("  (the second publish uploaded nothing new)")
    run("vfsd", "template", "show", "demo-os", "--repo", repo, "etc")

    state, mnt, store = d / "state", d / "mnt", d / "store"
    mnt.mkdir(parents=True)
    url = nginx.url("templates")
    log = open(d / "vfsd.log", "wb")  # noqa: SIM115 - closed in finally

    def start() -> subprocess.Popen:
        print(f"$ vfsd serve --state {state} --mount {mnt} --repo {url} --store {store} &")
        p = subprocess.Popen(
            [BIN / "vfsd", "serve", "--state", state, "--mount", mnt, "--repo", url,
             "--store", store], stdout=log, stderr=subprocess.STDOUT,
        )  # fmt: skip

        def ready() -> bool:
            if p.poll() is not None:
                raise SystemExit(f"demo: vfsd serve exited with {p.returncode}")
            ping = subprocess.run(
                [BIN / "vfsd", "vee", "list", "--state", state], capture_output=True
            )
            # the control socket answers once the VEEs are served (FUSE engine: the one mount
            # at MNT; kernel engine: a mount per VEE below MNT)
            return ping.returncode == 0

        _wait(ready, "the daemon")
        return p

    proc = start()
    try:
        run("vfsd", "vee", "add", "web1", "--template", "demo-os", "--state", state)
        v1 = run("vfsd", "vee", "add", "web2", "--template", "demo-os", "--state", state).split()[
            -1
        ]
        run("vfsd", "vee", "list", "--state", state)
        run("ls", "-l", mnt / "web1" / "etc")
        print("\n# second redirection on first read: the content comes from nginx into the store")
        run("vfsd", "store", "stats", "--store", store)
        run(
            "md5sum", mnt / "web1" / "usr/share/doc/big.bin", mnt / "web2" / "usr/share/doc/big.bin"
        )
        run("vfsd", "store", "stats", "--store", store)
        print(
            "\n# an unmodified template file is the same inode in every VEE (one page cache copy)"
        )
        run("stat", "-c", "%i %n", mnt / "web1/bin/ls", mnt / "web2/bin/ls")
        run(mnt / "web1/bin/ls", mnt / "web1/etc")
        print("\n# web1 writes: copy-up into its private layer; web2 still sees the template")
        with open(mnt / "web1/etc/app.conf", "a") as f:
            f.write("workers = 16  # web1 only\n")
        os.unlink(mnt / "web1/etc/hostname")
        run("cat", mnt / "web1/etc/app.conf", mnt / "web2/etc/app.conf")
        run("ls", mnt / "web1/etc", mnt / "web2/etc")
        run("stat", "-c", "%i %n", mnt / "web1/etc/app.conf", mnt / "web2/etc/app.conf")
        print("# the private layer is a plain directory (overlayfs upper format):")
        run("find", state / "vees" / "web1", "-path", "*/etc/*", "-printf", "%y %M %p\n")

        print("\n# a new template version; web1 moves to it and keeps its changes")
        (src / "etc" / "release").write_text("demo-os 2\n")
        (src / "etc" / "app.conf").write_text("workers = 8\n")
        run("vfsd", "template", "publish", src, "--repo", repo, "--name", "demo-os")
        run("vfsd", "vee", "upgrade", "web1", "--template", "demo-os", "--state", state)
        run("cat", mnt / "web1/etc/release", mnt / "web1/etc/app.conf")

        print("\n# version 1 has no name now, but web2 runs on it: a repository gc must be told")
        run("vfsd", "repo", "gc", "--repo", repo, "--grace", "0", "--dry-run")
        print(
            "# ...by the digest, or by the store of the host, whose gc roots name what its VEEs use"
        )
        run("vfsd", "repo", "gc", "--repo", repo, "--grace", "0", "--dry-run", v1)
        run("vfsd", "repo", "gc", "--repo", repo, "--grace", "0", "--store", store)
        run("vfsd", "template", "check", v1, "--repo", repo)

        print("\n# kill -9 the daemon: fsynced data survives, the VEEs come back on restart")
        fd = os.open(mnt / "web2/etc/journal", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        os.write(fd, b"acknowledged record\n")
        os.fsync(fd)
        os.close(fd)
        print(f"$ kill -9 {proc.pid}")
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        proc = start()
        run("vfsd", "vee", "list", "--state", state)
        run("cat", mnt / "web2/etc/journal")
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        # whatever a daemon of either engine left (VEE overlays, its data layer, the FUSE mount)
        mounts.detach_all_under(mnt, state)
        log.close()
