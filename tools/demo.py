"""`make demo`: the main job end to end, with real parts, printed as a transcript.

Everything happens under one scratch directory (``--workdir``, default a new temp dir that is
removed afterwards unless ``--keep``), with a real nginx on 127.0.0.1. Each part of vfs adds a
section; a section that fails stops the demo with a non-zero exit.
"""

from __future__ import annotations

import argparse
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent


def banner(text: str) -> None:
    print(f"\n=== {text} " + "=" * max(0, 70 - len(text)), flush=True)


def run(*args: str | Path, check: bool = True, env: dict | None = None) -> str:
    """Run a vfs CLI (or any command), echo it like a shell transcript, return stdout."""
    argv = [str(a) for a in args]
    if argv[0] in ("vfsd", "vimg", "vmctl"):
        argv[0] = str(BIN / argv[0])
    shown = " ".join(shlex.quote(a) for a in [Path(argv[0]).name, *argv[1:]])
    print(f"$ {shown}", flush=True)
    t0 = time.perf_counter()
    r = subprocess.run(argv, capture_output=True, text=True, env=env)
    dt = time.perf_counter() - t0
    out = r.stdout.rstrip()
    if out:
        print("\n".join("  " + line for line in out.splitlines()[:40]))
    if r.returncode != 0:
        print(f"  [exit {r.returncode} after {dt:.2f}s] {r.stderr.strip()}", flush=True)
        if check:
            raise SystemExit(f"demo step failed: {shown}")
    return r.stdout


def demo_redirect(work: Path, nginx) -> None:
    banner("vfs.redirect: publish objects, fetch them through the resolver")
    repo = nginx.webroot / "demo"
    run("vfsd", "repo", "init", repo)
    files = []
    for name, size in (("small.bin", 64 << 10), ("medium.bin", 4 << 20), ("large.bin", 64 << 20)):
        p = work / name
        with open(p, "wb") as f:
            f.write(os.urandom(size))
        files.append(p)
    out = run("vfsd", "repo", "put", "--repo", repo, "--ref", "large", files[2])
    large = out.split()[0]
    out = run("vfsd", "repo", "put", "--repo", repo, *files[:2])
    store = work / "store"
    url = nginx.url("demo")
    print("\n# second redirection: not local -> fetched over HTTP, verified, stored")
    run("vfsd", "repo", "get", "--repo", url, "--store", store, "large")
    print("# first redirection: now local")
    run("vfsd", "repo", "get", "--repo", url, "--store", store, large)
    print("\n# the same over mutual TLS (server checked against our CA, client certificate sent)")
    store2 = work / "store-mtls"
    pki = nginx.pki
    mtls = nginx.url("demo", "mtls")
    run("vfsd", "repo", "get", "--repo", mtls, "--ca", pki / "ca.pem", "--cert",
        pki / "client.pem", "--key", pki / "client.key", "--store", store2, "large")  # fmt: skip
    print("# ...and without a client certificate the server refuses, with a one-line error")
    run("vfsd", "repo", "get", "--repo", mtls, "--ca", pki / "ca.pem", "--store", store2,
        "--retries", "0", "large", check=False)  # fmt: skip
    print("\n# a lying server: the object on the web server no longer matches its id")
    victim = repo / "objects" / large[:2] / large
    os.chmod(victim, 0o644)
    with open(victim, "r+b") as f:
        f.seek(1 << 20)
        f.write(b"tampered")
    run("vfsd", "repo", "get", "--repo", url, "--store", work / "store3", large, check=False)
    run("vfsd", "store", "stats", "--store", work / "store3")
    run("vfsd", "store", "stats", "--store", store)
    run("vfsd", "store", "verify", "--store", store)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="vfs end-to-end demo")
    ap.add_argument("--workdir", type=Path)
    ap.add_argument("--keep", action="store_true", help="keep the work directory")
    args = ap.parse_args(argv)
    sys.path.insert(0, str(HERE))
    from tools.nginx import start_nginx, stop_nginx

    work = args.workdir or Path(tempfile.mkdtemp(prefix="vfs-demo-"))
    work.mkdir(parents=True, exist_ok=True)
    os.environ["VFS_ROOT"] = str(work / "root")
    proc, nginx = start_nginx(work / "nginx")
    t0 = time.perf_counter()
    try:
        demo_redirect(work, nginx)
        for name in ("demo_image", "demo_tree", "demo_export", "demo_vmctl"):
            mod = _optional(name)
            if mod is not None:
                mod.run_demo(work, nginx, run, banner)
    finally:
        stop_nginx(proc)
        if not args.keep and args.workdir is None:
            shutil.rmtree(work, ignore_errors=True)
    banner(f"demo finished in {time.perf_counter() - t0:.1f}s")
    return 0


def _optional(name: str):
    """Sections of the parts that have landed (tools/demo_image.py, demo_tree.py, ...)."""
    import importlib

    try:
        return importlib.import_module(f"tools.{name}")
    except ModuleNotFoundError as e:
        if e.name != f"tools.{name}":
            raise
        return None


if __name__ == "__main__":
    sys.exit(main())
