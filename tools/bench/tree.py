"""Benchmark of the VEE tree: vfsd's two engines vs native ext4, kernel overlayfs, fuse-overlayfs.

All five serve the same data in the same run (``vfsd-fuse``: ``vfsd serve --engine fuse``, one
FUSE mount answering every request in Python; ``vfsd-kernel``: ``--engine kernel``, an overlay
per VEE over the template's EROFS image, docs/kernel-engine.md):

- cold / warm sequential read of one big file (default 256 MiB, ``--full``: 1 GiB);
- ``find`` + stat and ``cat`` of 20,000 small files, cold and warm;
- untar of a 20,000-file archive into the tree (the write path);
- page cache used when 20 roots read the same 200 MiB (``Cached`` delta of /proc/meminfo):
  20 VEEs of each vfsd daemon, 20 overlayfs mounts over one lower dir, 20 fuse-overlayfs mounts;
- ``debian``, a real distribution (the cached Debian 12 minbase root of tools/debian_root.py:
  native = a ``cp -a`` copy, overlay/fuse-overlayfs = the root as lowerdir, vfsd = a VEE of it
  published as a template): ``dpkg -i`` of its repository's 25 ``.deb`` files (chrooted with
  /proc and /dev, in a fresh copy/mount/VEE each run), ``find / -xdev`` of the root cold and
  warm, and 10 x ``python3 -c 'import json, email, http.client, sqlite3'`` chrooted;
- ``cold``, vfsd only: the first read of a 64 MiB object that is not local, from nginx on
  127.0.0.1 (each daemon's repository served over HTTP, ``--remote``): fetch, verify, store,
  serve (the kernel engine through its FUSE data layer), one fresh object per run.

Cold = ``sync; echo 3 > /proc/sys/vm/drop_caches`` before each run (every peer the same way),
warm = after one untimed run; both the median of ``--repeat`` runs. Needs root. Usage::

    python -m tools.bench.tree [--full] [--repeat N] [--dir DIR] [--json OUT]
                               [--only seq,find,cat,untar,pc,debian] [--peers overlay,vfsd]
                               [--profile OUT]

``--only``/``--peers`` run a subset (for iterating on one workload); ``--profile OUT`` records
the vfsd daemon with ``py-spy`` (raw folded stacks) for the whole run.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tarfile
import time
from collections.abc import Callable
from pathlib import Path

SMALL_FILES = 20_000
VEES = 20
PC_BYTES = 200 << 20
PEERS = ["native", "overlay", "fuse-overlayfs", "vfsd-fuse", "vfsd-kernel"]
VFSD_ENGINES = {"vfsd-fuse": "fuse", "vfsd-kernel": "kernel"}
WORKLOADS = ["seq", "find", "cat", "untar", "pc", "debian", "cold"]
COLD_BYTES = 64 << 20
PY_IMPORTS = "import json, email, http.client, sqlite3"


def drop_caches() -> None:
    os.sync()
    with open("/proc/sys/vm/drop_caches", "w") as f:
        f.write("3\n")


def cached_kib() -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("Cached:"):
                return int(line.split()[1])
    raise RuntimeError("no Cached in /proc/meminfo")


def timed(fn: Callable[[], object]) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def read_file(path: Path) -> int:
    n = 0
    fd = os.open(path, os.O_RDONLY)
    try:
        while True:
            b = os.read(fd, 1 << 20)
            if not b:
                return n
            n += len(b)
    finally:
        os.close(fd)


def sh(*cmd: str, **kw: object) -> None:
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, **kw)  # type: ignore[call-overload]


# -- data -------------------------------------------------------------------------------------


def make_data(src: Path, big_bytes: int) -> None:
    if (src / ".complete").exists() and (src / "big").stat().st_size == big_bytes:
        return
    shutil.rmtree(src, ignore_errors=True)
    src.mkdir(parents=True)
    block = os.urandom(1 << 20)
    with open(src / "big", "wb") as f:
        for i in range(big_bytes >> 20):
            f.write(block[i % 4096 :] + block[: i % 4096])
    small = src / "small"
    for d in range(SMALL_FILES // 100):
        dd = small / f"d{d:03}"
        dd.mkdir(parents=True)
        for i in range(100):
            (dd / f"f{i:03}").write_bytes(os.urandom(512 + (i * 37) % 3500))
    pc = src / "pc"
    pc.mkdir()
    for i in range(PC_BYTES // (4 << 20)):
        (pc / f"lib{i:02}.so").write_bytes(os.urandom(4 << 20))
    (src / ".complete").write_bytes(b"")


def make_cold(src: Path, n: int) -> None:
    """``n`` different 64 MiB files: a template whose objects each daemon fetches once."""
    if (src / ".complete").exists() and len(list(src.glob("c*"))) == n:
        return
    shutil.rmtree(src, ignore_errors=True)
    src.mkdir(parents=True)
    for i in range(n):
        with open(src / f"c{i}", "wb") as f:
            for _ in range(COLD_BYTES >> 20):
                f.write(os.urandom(1 << 20))
    (src / ".complete").write_bytes(b"")


# -- peers ------------------------------------------------------------------------------------


class Mounts:
    """Everything mounted or started, undone in reverse order whatever happens."""

    def __init__(self) -> None:
        self.mounts: list[Path] = []
        self.procs: list[subprocess.Popen] = []
        self.vfsd_pids: set[int] = set()
        self.nginx: subprocess.Popen | None = None
        #: per vfsd peer: its state directory, mount directory and published digests
        self.vfsd_state: dict[str, Path] = {}
        self.vfsd_mnt: dict[str, Path] = {}
        self.digests: dict[str, dict[str, str]] = {}

    def overlay(self, lower: Path, base: Path) -> Path:
        for d in ("upper", "work", "mnt"):
            (base / d).mkdir(parents=True, exist_ok=True)
        opts = f"lowerdir={lower},upperdir={base}/upper,workdir={base}/work"
        sh("mount", "-t", "overlay", "overlay", "-o", opts, str(base / "mnt"))
        self.mounts.append(base / "mnt")
        return base / "mnt"

    def fuse_overlay(self, lower: Path, base: Path) -> Path:
        for d in ("upper", "work", "mnt"):
            (base / d).mkdir(parents=True, exist_ok=True)
        opts = f"lowerdir={lower},upperdir={base}/upper,workdir={base}/work"
        sh("fuse-overlayfs", "-o", opts, str(base / "mnt"))
        self.mounts.append(base / "mnt")
        return base / "mnt"

    def vfsd(
        self,
        peer: str,
        work: Path,
        src: Path,
        names: list[str],
        more: dict[str, Path] | None = None,
        remote: tuple[str, Path, Path] | None = None,
    ) -> Path:
        """A ``vfsd serve --engine E`` (E from ``peer``) with VEEs ``names`` of the template of
        ``src``; ``more`` (name -> source) are published too, for add_vee. Each daemon has
        its own repository and store: nothing one fetched or cached helps the other.
        ``remote`` = (url, webroot, cold source): the repository is served at ``url`` and the
        daemon fetches from there; the cold source is published to the repository only."""
        from vfs.daemon import control

        vfsd = str(Path(sys.executable).with_name("vfsd"))
        repo, store, state, mnt = work / "repo", work / "store", work / "state", work / "mnt"
        mnt.mkdir(parents=True, exist_ok=True)
        sh(vfsd, "repo", "init", str(repo))
        for name, path in {"bench": src, **(more or {})}.items():
            out = subprocess.run(
                [vfsd, "template", "publish", str(path), "--repo", str(repo), "--store",
                 str(store), "--json"],
                check=True, capture_output=True, text=True,
            ).stdout  # fmt: skip
            self.digests.setdefault(peer, {})[name] = json.loads(out)["digest"]
        extra: list[str] = []
        if remote is not None:
            url, webroot, cold_src = remote
            (webroot / peer).symlink_to(repo)
            out = subprocess.run(
                [vfsd, "template", "publish", str(cold_src), "--repo", str(repo), "--json"],
                check=True, capture_output=True, text=True,
            ).stdout  # fmt: skip
            self.digests[peer]["cold"] = json.loads(out)["digest"]
            extra = ["--remote", url]
        digest = self.digests[peer]["bench"]
        argv = [vfsd, "serve", "--state", str(state), "--mount", str(mnt), "--store",
                str(store), "--engine", VFSD_ENGINES[peer], *extra]  # fmt: skip
        p = subprocess.Popen(argv, stderr=open(work / "vfsd.log", "wb"))  # noqa: SIM115
        self.procs.append(p)
        self.mounts.append(mnt)
        self.vfsd_pids.add(p.pid)
        deadline = time.monotonic() + 30
        while True:
            try:
                control.call(state, {"op": "ping"}, timeout=5)
                break
            except control.DaemonNotRunning:
                if p.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"vfsd did not start: see {work}/vfsd.log") from None
                time.sleep(0.05)
        self.vfsd_state[peer], self.vfsd_mnt[peer] = state, mnt
        for n in names:
            self.add_vee(peer, n, digest)
        return mnt

    def add_vee(self, peer: str, name: str, digest: str) -> Path:
        from vfs.daemon import control

        control.call(self.vfsd_state[peer], {"op": "add", "name": name, "template": digest})
        return self.vfsd_mnt[peer] / name

    def close(self) -> None:
        for m in reversed(self.mounts):
            subprocess.run(["umount", str(m)], check=False, stderr=subprocess.DEVNULL)
            if os.path.ismount(m):
                subprocess.run(["umount", "-l", str(m)], check=False)
        for p in self.procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM if p.pid in self.vfsd_pids else signal.SIGINT)
                try:
                    p.wait(timeout=15)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait()
        from vfs.daemon.mounts import detach_all_under

        # whatever a daemon left (a killed one's VEE overlays, images, data layer)
        detach_all_under(*self.vfsd_mnt.values(), *self.vfsd_state.values())
        if self.nginx is not None:
            from tools.nginx import stop_nginx

            stop_nginx(self.nginx)


# -- workloads ---------------------------------------------------------------------------------


def untar(tarball: Path, dest: Path) -> float:
    """Seconds of ``tar -xf`` into ``dest``; NaN, with tar's complaint, when it fails (e.g. the
    FUSE engine's daemon out of file descriptors: it holds one per private inode the kernel
    caches, and a host that denies CAP_SYS_RESOURCE caps it at the hard limit)."""
    start = time.perf_counter()
    p = subprocess.run(
        ["tar", "-xf", str(tarball), "-C", str(dest)], capture_output=True, text=True
    )
    t = time.perf_counter() - start
    if p.returncode != 0:
        err = p.stderr.strip().splitlines()
        print(f"  tar -xf failed in {dest} ({len(err)} errors), first: {err[0] if err else '?'}")
        return float("nan")
    return t


def find_stat(root: Path) -> None:
    sh("find", str(root / "small"), "-printf", "%s %m\n")


def cat_all(root: Path) -> None:
    subprocess.run(
        f"find {root / 'small'} -type f -print0 | xargs -0 cat > /dev/null", shell=True, check=True
    )


class DebianRoots:
    """Fresh instances of the Debian root for each peer: a copy, an overlay or fuse-overlayfs
    mount over it, or a new VEE of its template."""

    def __init__(self, mounts: Mounts, base: Path, root: Path) -> None:
        self.mounts, self.base, self.root = mounts, base, root
        self.n = 0

    def make(self, peer: str) -> Path:
        self.n += 1
        d = self.base / f"deb-{peer}-{self.n}"
        if peer == "native":
            d.parent.mkdir(parents=True, exist_ok=True)
            sh("cp", "-a", str(self.root), str(d))
            return d
        if peer == "overlay":
            return self.mounts.overlay(self.root, d)
        if peer == "fuse-overlayfs":
            return self.mounts.fuse_overlay(self.root, d)
        return self.mounts.add_vee(peer, f"deb{self.n}", self.mounts.digests[peer]["debian"])


def dpkg_install(root: Path, batches: list[list[Path]]) -> float:
    """Seconds of ``dpkg -i`` of every batch, chrooted (copying the .debs in is not timed);
    NaN, with dpkg's complaint printed, when it fails (a broken peer must not hide the others)."""
    from tools.debian_root import chroot_run

    inside = root / "var/tmp/debs"
    inside.mkdir(parents=True)
    t = 0.0
    for i, batch in enumerate(batches):
        (inside / str(i)).mkdir()
        for deb in batch:
            shutil.copy(deb, inside / str(i))
    os.sync()
    for i, _ in enumerate(batches):
        start = time.perf_counter()
        p = chroot_run(root, ["sh", "-c", f"dpkg -i /var/tmp/debs/{i}/*.deb"])
        t += time.perf_counter() - start
        if p.returncode != 0:
            print(f"  dpkg -i failed in {root} ({p.returncode}):\n{p.stderr[-2000:]}")
            return float("nan")
    return t


def find_root(root: Path) -> None:
    """``find / -xdev`` of the root (the walk a chrooted ``find / -xdev`` does)."""
    sh("find", str(root), "-xdev")


def python_imports(root: Path) -> None:
    from tools.debian_root import CHROOT_ENV, chroot_argv

    loop = f"for i in 1 2 3 4 5 6 7 8 9 10; do python3 -c '{PY_IMPORTS}' || exit 1; done"
    subprocess.run(chroot_argv(root, ["sh", "-c", loop]), env=CHROOT_ENV, check=True)


def run(args: argparse.Namespace) -> dict[str, object]:
    work = Path(args.dir)
    big_bytes = (1 << 30) if args.full else args.big_mib << 20
    src = work / "src"
    print(f"preparing data in {src} (big file {big_bytes >> 20} MiB, {SMALL_FILES} small files)")
    make_data(src, big_bytes)
    tarball = work / "small.tar"
    if not tarball.exists():
        with tarfile.open(tarball, "w") as t:
            t.add(src / "small", arcname="small")
    for d in ("peers", "vfsd", *VFSD_ENGINES):
        shutil.rmtree(work / d, ignore_errors=True)
    mounts = Mounts()
    results: dict[str, dict[str, float]] = {}
    try:
        peers = [p for p in PEERS if p in args.peers.split(",")]
        only = args.only.split(",")
        roots = {
            "native": src,
            "overlay": mounts.overlay(src, work / "peers" / "ov0"),
            "fuse-overlayfs": mounts.fuse_overlay(src, work / "peers" / "fo0"),
        }
        debian = None
        if "debian" in only:
            from tools.debian_root import ensure

            debian = ensure(progress=lambda m: print(f"debian_root: {m}"))
        more = {"debian": debian.root} if debian else {}
        nginx = None
        if "cold" in only:
            from tools.nginx import start_nginx

            make_cold(work / "cold-src", args.repeat)
            shutil.rmtree(work / "nginx", ignore_errors=True)
            proc, nginx = start_nginx(work / "nginx")
            mounts.nginx = proc
        vmnts: dict[str, Path] = {}
        for peer in VFSD_ENGINES:
            if peer in peers:
                remote = None
                if nginx is not None:
                    remote = (nginx.url(peer), nginx.webroot, work / "cold-src")
                vmnts[peer] = mounts.vfsd(
                    peer, work / peer, src, [f"v{i}" for i in range(VEES)], more, remote
                )
                roots[peer] = vmnts[peer] / "v0"
        if "vfsd-fuse" in vmnts:
            with open(f"/sys/class/bdi/{_devno(vmnts['vfsd-fuse'])}/read_ahead_kb") as f:
                print(f"vfsd-fuse read_ahead_kb = {f.read().strip()}")
        if args.profile and "vfsd-fuse" in vmnts:
            spy = str(Path(sys.executable).with_name("py-spy"))
            pid = next(p.pid for p in mounts.procs if p.pid in mounts.vfsd_pids)
            mounts.procs.insert(0, subprocess.Popen(
                [spy, "record", "-p", str(pid), "-f", "raw", "-r", "250",
                 "-o", args.profile], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            ))  # fmt: skip
            time.sleep(1)

        def measure(
            name: str,
            fn: Callable[[Path], object],
            cold: bool,
            unit: str,
            where: dict[str, Path] = roots,
        ) -> None:
            row = results.setdefault(name, {"unit": unit})  # type: ignore[dict-item]
            for peer in peers:
                vals = []
                for _ in range(args.repeat):
                    if cold:
                        drop_caches()
                    else:
                        fn(where[peer])
                    vals.append(timed(lambda p=peer: fn(where[p])))
                t = statistics.median(vals)
                row[peer] = big_bytes / t / 1e6 if unit == "MB/s" else t
                print(f"  {name:28} {peer:15} {row[peer]:10.3f} {unit}")

        if "seq" in only:
            measure("seq read cold", lambda r: read_file(r / "big"), True, "MB/s")
            measure("seq read warm", lambda r: read_file(r / "big"), False, "MB/s")
        if "find" in only:
            measure("find+stat 20k cold", find_stat, True, "s")
            measure("find+stat 20k warm", find_stat, False, "s")
        if "cat" in only:
            measure("cat 20k cold", cat_all, True, "s")
            measure("cat 20k warm", cat_all, False, "s")
        row = results.setdefault("untar 20k", {"unit": "s"})  # type: ignore[dict-item]
        for peer in peers if "untar" in only else []:
            dest = roots[peer] / f"untar-{time.monotonic_ns()}"
            if peer == "native":
                dest = work / "peers" / "native-untar"
                shutil.rmtree(dest, ignore_errors=True)
            dest.mkdir(parents=True)
            row[peer] = untar(tarball, dest)
            print(f"  {'untar 20k':28} {peer:15} {row[peer]:10.3f} s")
        if "untar" not in only:
            del results["untar 20k"]
        if "pc" in only:
            results["page cache, 20 roots x 200 MiB"] = page_cache(mounts, work, src, vmnts, peers)
        if debian is not None:
            fresh = DebianRoots(mounts, work / "peers", debian.root)
            row = results.setdefault("dpkg -i 25 debs", {"unit": "s"})  # type: ignore[dict-item]
            for peer in peers:
                vals = [
                    dpkg_install(fresh.make(peer), debian.dpkg_batches())
                    for _ in range(args.repeat)
                ]  # a failed run (NaN) makes the cell NaN: no median of the survivors
                row[peer] = float("nan") if any(map(math.isnan, vals)) else statistics.median(vals)
                print(f"  {'dpkg -i 25 debs':28} {peer:15} {row[peer]:10.3f} s")
            droots = {p: fresh.make(p) for p in peers}
            measure("find / -xdev cold", find_root, True, "s", droots)
            measure("find / -xdev warm", find_root, False, "s", droots)
            measure("python3 imports x10", python_imports, False, "s", droots)
        if nginx is not None:
            results["first read of a cold 64 MiB object"] = cold_reads(mounts, peers, args.repeat)
    finally:
        mounts.close()
        # keep only the sources and the tarball for the next run
        for d in ("peers", "nginx", *VFSD_ENGINES):
            shutil.rmtree(work / d, ignore_errors=True)
    tradeoff = read_tradeoff(work)
    return {
        "big_bytes": big_bytes,
        "small_files": SMALL_FILES,
        "results": results,
        "local_read_tradeoff_us": tradeoff,
    }


def page_cache(
    mounts: Mounts, work: Path, src: Path, vmnts: dict[str, Path], peers: list[str]
) -> dict[str, float]:
    row: dict[str, float] = {"unit": "MiB"}  # type: ignore[dict-item]
    makers = {
        "native": lambda: [src] * VEES,
        "overlay": lambda: [mounts.overlay(src, work / "peers" / f"pov{i}") for i in range(VEES)],
        "fuse-overlayfs": lambda: [
            mounts.fuse_overlay(src, work / "peers" / f"pfo{i}") for i in range(VEES)
        ],
        "vfsd-fuse": lambda: [vmnts["vfsd-fuse"] / f"v{i}" for i in range(VEES)],
        "vfsd-kernel": lambda: [vmnts["vfsd-kernel"] / f"v{i}" for i in range(VEES)],
    }
    sets = {p: makers[p]() for p in peers}
    for peer in peers:
        drop_caches()
        before = cached_kib()
        for root in sets[peer]:
            for f in sorted((root / "pc").iterdir()):
                read_file(f)
        row[peer] = (cached_kib() - before) / 1024
        print(f"  {'page cache 20x200MiB':28} {peer:15} {row[peer]:10.1f} MiB")
    return row


def cold_reads(mounts: Mounts, peers: list[str], n: int) -> dict[str, float]:
    """MB/s of the first read of each of ``n`` objects no daemon has (median), in a VEE of the
    cold template: the fetch from nginx, its verification and storing, and the read."""
    row: dict[str, float] = {"unit": "MB/s"}  # type: ignore[dict-item]
    for peer in peers:
        if peer not in VFSD_ENGINES:
            continue
        root = mounts.add_vee(peer, "cold", mounts.digests[peer]["cold"])
        vals = []
        for i in range(n):
            drop_caches()
            vals.append(COLD_BYTES / timed(lambda p=root / f"c{i}": read_file(p)) / 1e6)
        row[peer] = statistics.median(vals)
        print(f"  {'cold 64 MiB first read':28} {peer:15} {row[peer]:10.1f} MB/s")
    return row


def read_tradeoff(work: Path, n: int = 3000) -> dict[str, float]:
    """µs per 4 KiB read of a local (page-cached) object: inline vs trio.to_thread."""
    import trio

    from vfs.redirect import LocalStore, Resolver

    shutil.rmtree(work / "tradeoff-store", ignore_errors=True)
    store = LocalStore(work / "tradeoff-store")
    try:
        oid = store.put(os.urandom(1 << 20))
        res = Resolver(store)
        offsets = [(i * 4096 * 7) % ((1 << 20) - 4096) for i in range(n)]

        async def inline() -> None:
            for off in offsets:
                if res.has_local(oid):
                    res.read(oid, off, 4096)
                await trio.lowlevel.checkpoint()

        async def threaded() -> None:
            for off in offsets:
                await trio.to_thread.run_sync(res.read, oid, off, 4096)

        out = {"unit": "us"}
        for name, fn in (("inline", inline), ("to_thread", threaded)):
            trio.run(fn)  # warm
            t = timed(lambda f=fn: trio.run(f))
            out[name] = t / n * 1e6  # type: ignore[assignment]
            print(f"  {'local 4 KiB object read':28} {name:15} {out[name]:10.1f} us")
        return out  # type: ignore[return-value]
    finally:
        store.close()


def _devno(mnt: Path) -> str:
    from vfs.daemon.fuse_ops import mount_devno

    return mount_devno(str(mnt)) or "0:0"


#: the ratio columns: (numerator, denominator); the kernel engine's goals are against kernel
#: overlayfs (docs/kernel-engine.md), the FUSE engine's against fuse-overlayfs
RATIOS = [
    ("vfsd-kernel", "overlay"),
    ("vfsd-kernel", "native"),
    ("vfsd-fuse", "fuse-overlayfs"),
    ("vfsd-kernel", "vfsd-fuse"),
]


def table(res: dict[str, object]) -> str:
    heads = ["native ext4", "kernel overlay", "fuse-overlayfs", "vfsd fuse", "vfsd kernel"]
    heads += [f"{a.removeprefix('vfsd-')}/{b.removeprefix('vfsd-')}" for a, b in RATIOS]
    lines = ["| workload | " + " | ".join(heads) + " |", "|---" * (len(heads) + 1) + "|"]
    for name, row in res["results"].items():  # type: ignore[attr-defined]
        unit = row["unit"]
        cells = [
            "–" if p not in row else f"{row[p]:.3g}" if unit != "MB/s" else f"{row[p]:.0f}"
            for p in PEERS
        ]
        ratios = [
            f"{row[a] / row[b]:.2f}" if a in row and b in row and row[b] else "–" for a, b in RATIOS
        ]
        lines.append(f"| {name} ({unit}) | " + " | ".join(cells + ratios) + " |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--full", action="store_true", help="1 GiB big file (default: --big-mib)")
    ap.add_argument("--big-mib", type=int, default=256)
    ap.add_argument(
        "--repeat", type=int, default=3, help="runs of each measure (cold and warm), median"
    )
    ap.add_argument("--dir", default="/var/tmp/vfs-bench-tree")
    ap.add_argument("--json", default="bench-results/tree.json")
    ap.add_argument("--only", default=",".join(WORKLOADS), help="workloads: " + ",".join(WORKLOADS))
    ap.add_argument("--peers", default=",".join(PEERS), help="peers: " + ",".join(PEERS))
    ap.add_argument("--profile", metavar="OUT", help="py-spy record the vfsd daemon into OUT")
    args = ap.parse_args()
    if os.geteuid() != 0:
        sys.exit("tools.bench.tree: needs root (mounts, drop_caches)")
    res = run(args)
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(res, indent=1))
    print()
    print(table(res))
    print("(ratios: time ratios for s/MiB rows, throughput ratios for MB/s rows)")
    t = res["local_read_tradeoff_us"]
    print(
        f"local 4 KiB object read: inline {t['inline']:.1f} us, "
        f"trio.to_thread {t['to_thread']:.1f} us per read"
    )


if __name__ == "__main__":
    main()
