"""Benchmark: the vimg export (NBD and FUSE raw file) vs qemu-nbd, qemu-storage-daemon's FUSE
export and the raw file, same machine, same run.

    python -m tools.bench.export            # 256 MiB image, 3 repetitions (about 2 min)
    python -m tools.bench.export --full     # 1 GiB image

The client is ``qemu-img bench`` at queue depth 16 (``-d 16``, issue 11) for every path:
- raw file: the image as a raw file, ``-t none`` (O_DIRECT): the floor of the kernel path;
- qemu-nbd (qcow2): ``qemu-nbd -f qcow2 -k SOCK`` serving the same data as qcow2 (cache
  writeback, its defaults), the client on ``nbd+unix://``;
- vfsd NBD (vimg): ``vfsd export IMAGE --nbd SOCK`` on the same data as vimg (dirty bitmap on,
  as deployed), the same client;
- qsd FUSE (qcow2): ``qemu-storage-daemon --export fuse`` of a qcow2 copy, the client on the
  mounted file with ``-t none``;
- vfsd FUSE (vimg): the raw file of the same ``vfsd export`` process (``--fuse``), ``-t none``.

Workloads (medians of ``--reps``; the peers alternate inside each repetition so that the noise
of a shared machine spreads over all of them): 4 KiB "random" read and write IOPS (qemu-img
bench has no random mode: a far-apart stride of an odd number of 4 KiB blocks, so requests are
4 KiB-aligned as fio's randread/randwrite issue them), 4 KiB writes at the odd byte stride of
``tools.bench.image`` (each straddles two 4 KiB blocks: the worst case of vimg's subcluster
sums), 1 MiB sequential read and write MB/s, on fully allocated images of random data held in
the page cache (read in before every repetition).
Writes end with the bench's flush: every server commits what it acknowledged.

Remote image: the same data with every other MiB a hole, pushed to a ``file://`` repository,
pulled metadata-only on a "fresh host" and exported with an empty store; ``qemu-img convert``
of the export reads it whole. Reported: bytes fetched vs the image size and its allocated bytes
(the goal: only the clusters read are fetched), and the convert time vs a local vimg export.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

VFSD = [sys.executable, "-c", "from vfs.cli.vfsd import main; main()"]
VIMG = [sys.executable, "-c", "from vfs.cli.vimg import main; main()"]
MiB = 1 << 20
DEPTH = 16
PATHS = ("raw file", "qemu-nbd (qcow2)", "vfsd NBD (vimg)", "qsd FUSE (qcow2)", "vfsd FUSE (vimg)")


def sh(*args: str, timeout: float = 900) -> str:
    p = subprocess.run(list(args), capture_output=True, text=True, timeout=timeout)
    if p.returncode != 0:
        raise SystemExit(f"{' '.join(args)} failed: {p.stderr.strip()[:500]}")
    return p.stdout


def wait_until(cond, what: str, proc: subprocess.Popen | None = None, timeout: float = 60):
    deadline = time.monotonic() + timeout
    while not cond():
        if proc is not None and proc.poll() is not None:
            raise SystemExit(f"{what}: the server exited with {proc.returncode}")
        if time.monotonic() > deadline:
            raise SystemExit(f"{what}: not ready after {timeout:.0f} s")
        time.sleep(0.05)


def connectable(path: Path) -> bool:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        s.connect(str(path))
        return True
    except OSError:
        return False
    finally:
        s.close()


@contextlib.contextmanager
def process(argv: list[str], log: Path) -> Iterator[subprocess.Popen]:
    """A server process, always stopped (SIGTERM, SIGKILL after 30 s) by its pid."""
    with open(log, "wb") as f:
        proc = subprocess.Popen(argv, stdout=f, stderr=subprocess.STDOUT)
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)


def unmount(path: Path) -> None:
    """Detach a mount of ours that a killed server left (by its path)."""
    with open("/proc/self/mountinfo") as f:
        mounted = any(line.split()[4] == str(path) for line in f)
    if mounted:
        subprocess.run(["fusermount3", "-u", "-z", str(path)], capture_output=True)


@contextlib.contextmanager
def servers(work: Path, raw: Path, qcow2: Path, qcow2_fuse: Path, vimg: Path):
    """Every peer running; yields {path name: qemu-img bench arguments of its target}."""
    with contextlib.ExitStack() as stack:
        qsock = work / "qemu-nbd.sock"
        argv = ["qemu-nbd", "-f", "qcow2", "-k", str(qsock), "-x", "disk", "-t", "-e", "4",
                str(qcow2)]  # fmt: skip
        q = stack.enter_context(process(argv, work / "qemu-nbd.log"))
        wait_until(lambda: connectable(qsock), "qemu-nbd", q)
        qfile = work / "qsd.raw"
        qfile.touch()
        stack.callback(unmount, qfile)
        argv = ["qemu-storage-daemon",
                "--blockdev", f"driver=file,node-name=file0,filename={qcow2_fuse}",
                "--blockdev", "driver=qcow2,node-name=fmt0,file=file0",
                "--export", f"type=fuse,id=exp0,node-name=fmt0,mountpoint={qfile},writable=on",
                ]  # fmt: skip
        qsd = stack.enter_context(process(argv, work / "qsd.log"))
        size = raw.stat().st_size
        wait_until(lambda: qfile.stat().st_size == size, "qemu-storage-daemon fuse", qsd)
        vsock = work / "vfsd.sock"
        vmnt = work / "vfsd.raw"
        vmnt.touch()
        stack.callback(unmount, vmnt)
        argv = [*VFSD, "export", str(vimg), "--nbd", str(vsock), "--name", "disk",
                "--fuse", str(vmnt)]  # fmt: skip
        v = stack.enter_context(process(argv, work / "vfsd.log"))
        wait_until(lambda: ready(Path(str(vsock) + ".ctl")), "vfsd export", v)
        yield {
            "raw file": ["-f", "raw", "-t", "none", str(raw)],
            "qemu-nbd (qcow2)": ["-f", "raw", f"nbd+unix:///disk?socket={qsock}"],
            "vfsd NBD (vimg)": ["-f", "raw", f"nbd+unix:///disk?socket={vsock}"],
            "qsd FUSE (qcow2)": ["-f", "raw", "-t", "none", str(qfile)],
            "vfsd FUSE (vimg)": ["-f", "raw", "-t", "none", str(vmnt)],
        }


def ready(ctl: Path) -> bool:
    from vfs.export.client import ExportControl

    if not ctl.exists():
        return False
    try:
        return bool(ExportControl(ctl).ping().get("ready"))
    except Exception:
        return False


def bench_seconds(target: list[str], count: int, size: str, step: str, write: bool) -> float:
    cmd = ["qemu-img", "bench", "-d", str(DEPTH), "-c", str(count), "-s", size, "-S", step]
    if write:
        cmd += ["-w", "--pattern", "0xa5"]  # not zeros: vimg stores those as ZERO entries
    out = sh(*cmd, *target)
    m = re.search(r"Run completed in ([0-9.]+) seconds", out)
    if not m:
        raise SystemExit(f"unexpected bench output: {out!r}")
    return float(m.group(1))


def warm(paths: list[Path]) -> None:
    """Read the image files into the page cache (this machine's caches get dropped by other
    jobs: a cold read would measure the virtual disk, not the servers)."""
    buf = bytearray(4 * MiB)
    for p in paths:
        with open(p, "rb", buffering=0) as f:
            while f.readinto(buf):
                pass


def random_file(path: Path, size: int, holes: bool = False) -> None:
    with open(path, "wb") as f:
        f.truncate(size)
        for off in range(0, size, 2 * MiB if holes else MiB):
            f.seek(off)
            f.write(os.urandom(MiB))


def run(work: Path, size: int, reps: int, only: set[str]) -> dict:
    raw = work / "full.raw"
    random_file(raw, size)
    qcow2, qcow2_fuse, vimg = work / "full.qcow2", work / "fuse.qcow2", work / "full.vimg"
    sh("qemu-img", "convert", "-f", "raw", "-O", "qcow2", str(raw), str(qcow2))
    shutil.copyfile(qcow2, qcow2_fuse)
    sh(*VIMG, "convert", "-f", "raw", "-O", "vimg", str(raw), str(vimg))
    n4k = 20000
    n1m = max(256, size // MiB)
    # Far-apart walks that wrap around the image: 4 KiB-aligned, as fio's randread/randwrite
    # (an odd number of 4 KiB blocks: every block of the image is visited in turn), and the
    # odd byte stride of tools.bench.image (every request straddles two 4 KiB blocks).
    step = str((size // 3 // 4096 | 1) * 4096)
    odd = str(size // 3 + 4096 * 7)
    cases = {
        "4k read IOPS": (n4k, "4k", step, False),
        "1M seq read MB/s": (n1m, "1M", "1M", False),
        "4k write IOPS": (n4k, "4k", step, True),
        "4k write IOPS, unaligned": (n4k, "4k", odd, True),
        "1M seq write MB/s": (n1m, "1M", "1M", True),
    }
    res: dict = {"size": size, "reps": reps, "depth": DEPTH, "bench": {}, "samples": {}}
    with servers(work, raw, qcow2, qcow2_fuse, vimg) as targets:
        for case, (count, bsize, stp, write) in cases.items():
            if only and not any(o in case for o in only):
                continue
            secs: dict[str, list[float]] = {p: [] for p in PATHS}
            for _ in range(reps):
                warm([raw, qcow2, qcow2_fuse, vimg])
                for p in PATHS:
                    secs[p].append(bench_seconds(targets[p], count, bsize, stp, write))
            unit = count if "IOPS" in case else count * MiB / 1e6
            res["bench"][case] = {p: unit / statistics.median(s) for p, s in secs.items()}
            res["samples"][case] = {p: [round(unit / x) for x in s] for p, s in secs.items()}
            print(f"  {case}: " + ", ".join(f"{p} {v:.0f}" for p, v in res["bench"][case].items()),
                  file=sys.stderr)  # fmt: skip
    if not only or "remote" in only:
        res["remote"] = remote(work, size)
    return res


def remote(work: Path, size: int) -> dict:
    """Fetched bytes of a whole ``qemu-img convert`` of a remote image, and its time vs the
    same convert of the image exported locally."""
    from vfs.export.client import ExportControl

    src = work / "remote-src.raw"
    random_file(src, size, holes=True)
    local, pushed = work / "remote-local.vimg", work / "remote-pushed.vimg"
    sh(*VIMG, "convert", "-f", "raw", "-O", "vimg", str(src), str(local))
    shutil.copyfile(local, pushed)  # push moves the clusters out: the local peer keeps its own
    repo = f"file://{work / 'repo'}"
    sh(*VIMG, "push", "-q", "--repo", repo, "--ref", "b", str(pushed))
    lazy = work / "host-b.vimg"
    sh(*VIMG, "pull", "--ref", "b", "--repo", repo, "--lazy", str(lazy))
    out: dict = {"image_size": size, "allocated": size // 2, "template_file": lazy.stat().st_size}
    warm([local])
    for label, img, extra in (
        ("local", local, []),
        ("remote", lazy, ["--store", str(work / "store-b"), "--repo", repo]),
    ):
        sock = work / f"{label}.sock"
        with process([*VFSD, "export", str(img), "--nbd", str(sock), "--name", "disk", *extra],
                     work / f"{label}.log") as p:  # fmt: skip
            ctl = Path(str(sock) + ".ctl")
            wait_until(lambda c=ctl: ready(c), f"vfsd export ({label})", p)
            dst = work / f"{label}-copy.raw"
            t0 = time.perf_counter()
            sh("qemu-img", "convert", "-f", "raw", "-O", "raw",
               f"nbd+unix:///disk?socket={sock}", str(dst))  # fmt: skip
            out[f"{label}_convert_s"] = time.perf_counter() - t0
            st = ExportControl(ctl).status()
            out[f"{label}_fetched"] = st["fetched_bytes"]
        same = subprocess.run(["cmp", "-s", str(src), str(dst)]).returncode == 0
        out[f"{label}_identical"] = same
        dst.unlink()
    return out


def table(r: dict) -> str:
    mib = r["size"] >> 20
    lines = [
        f"Image {mib} MiB of random data, qemu-img bench -d {r['depth']}, medians of {r['reps']}.",
        "",
        "| workload | raw file | qemu-nbd (qcow2) | vfsd NBD (vimg) | NBD ratio (best) | "
        "qsd FUSE (qcow2) | vfsd FUSE (vimg) | FUSE ratio (best) |",
        "|---|---|---|---|---|---|---|---|",
    ]

    def ratio(case: str, ours: str, peer: str) -> str:
        v, s = r["bench"][case], r["samples"][case]
        return f"{v[ours] / v[peer]:.2f} ({max(s[ours]) / max(s[peer]):.2f})"

    for case, v in r["bench"].items():
        lines.append(
            f"| {case} | {v['raw file']:.0f} | {v['qemu-nbd (qcow2)']:.0f} | "
            f"{v['vfsd NBD (vimg)']:.0f} | {ratio(case, 'vfsd NBD (vimg)', 'qemu-nbd (qcow2)')} | "
            f"{v['qsd FUSE (qcow2)']:.0f} | {v['vfsd FUSE (vimg)']:.0f} | "
            f"{ratio(case, 'vfsd FUSE (vimg)', 'qsd FUSE (qcow2)')} |"
        )
    lines.append("")
    lines.append(
        "NBD ratio = vfsd NBD / qemu-nbd; FUSE ratio = vfsd FUSE / qsd FUSE; medians (best "
        "sample / best sample: the least disturbed moment of a shared machine)."
    )
    if "remote" in r:
        m = r["remote"]
        lines += [
            "",
            f"Remote image ({m['image_size'] >> 20} MiB, {m['allocated'] >> 20} MiB allocated, "
            f"template on the new host {m['template_file'] / 1024:.0f} KiB): qemu-img convert "
            f"fetched {m['remote_fetched'] / MiB:.1f} MiB "
            f"({m['remote_fetched'] / m['image_size']:.0%} of the image, "
            f"{m['remote_fetched'] / m['allocated']:.0%} of its data) in "
            f"{m['remote_convert_s']:.2f} s vs {m['local_convert_s']:.2f} s local; "
            f"copies identical: {m['remote_identical'] and m['local_identical']}.",
        ]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--full", action="store_true", help="1 GiB image (default 256 MiB)")
    ap.add_argument("--size", type=int, default=0, help="image size in MiB (overrides --full)")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument(
        "--only", action="append", default=[], help="only workloads with TEXT (4k, 1M, remote)"
    )
    ap.add_argument("--dir", default=None, help="work directory (default: a temp dir)")
    ap.add_argument("--keep", action="store_true", help="keep the work directory (server logs)")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    for tool in ("qemu-img", "qemu-nbd", "qemu-storage-daemon", "fusermount3"):
        if shutil.which(tool) is None:
            raise SystemExit(f"{tool} is required (make setup installs it)")
    size = (args.size or (1024 if args.full else 256)) * MiB
    work = Path(tempfile.mkdtemp(prefix="export-bench-", dir=args.dir))
    try:
        results = run(work, size, args.reps, set(args.only))
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    if args.json:
        print(json.dumps(results, indent=2))
    else:
        print(table(results))


if __name__ == "__main__":
    main()
