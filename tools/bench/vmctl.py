"""Benchmark of vmctl's migration and hibernation, against QEMU's own in the same run.

The guest: the tools/guest kernel + initramfs, 256 MiB, a 1 GiB ext4 disk (``--disk-mib``),
running the ``append`` workload (a line fsynced every 100 ms) and ``dirty`` (rewriting
``--dirty-mib`` MiB of memory round after round), under TCG here. Peers, each from a fresh boot:

- ``vmctl``: ``vmctl migrate --ram live`` of the guest on a vimg disk (two stages: disk copy and
  dirty rounds through the export, RAM pre-copy, pause, last clusters, switch);
- ``vmctl-paused``: ``vmctl migrate --ram paused`` (the default under TCG: the disks move live,
  the RAM with the guest paused, since QEMU 7.2's live pre-copy loses writes under TCG);
- ``qemu-shared``: QEMU's own migration, both QEMUs on one raw file (shared storage: no disk
  copy at all, the lower bound);
- ``qemu-mirror``: libvirt's ``--copy-storage-all``: the destination QEMU exports its empty
  disk over NBD, the source mirrors into it (``blockdev-mirror``, sync=full) until ready, then
  migrates; the mirror is completed while the source is paused.

All use the same bandwidth cap and downtime limit, and the same bound on pre-copy (after
``--precopy-timeout`` s the downtime limit is lifted: stop and copy). Reported per peer:
median QEMU-reported downtime, median wall-clock pause (pause to resumed on the destination,
vmctl only: it sees both ends), total time; then ``vmctl hibernate`` and ``vmctl restore``
times and the bundle's size. Usage::

    python -m tools.bench.vmctl [--runs 3] [--disk-mib 1024] [--dirty-mib 32] [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import trio

from tools.guest import build_guest, make_disk
from vmctl.disks import ImageFile
from vmctl.machine import MachineSpec
from vmctl.qemu import run_qemu

PEERS = ["vmctl", "vmctl-paused", "qemu-shared", "qemu-mirror"]


def vmctl(*args: str, root: Path) -> subprocess.CompletedProcess[str]:
    r = subprocess.run(
        [sys.executable, "-c", "from vmctl.cli import main; main()", *args, "--root", str(root)],
        capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    if r.returncode:
        raise SystemExit(f"vmctl {' '.join(args)}: {r.stderr.strip()}")
    return r


def vimg_disk(work: Path, mib: int) -> Path:
    raw = make_disk(work / "disk.raw", size=f"{mib}M")
    out = work / "disk.vimg"
    subprocess.run([sys.executable, "-c", "from vfs.cli.vimg import main; main()", "convert",
                    "-f", "raw", "-O", "vimg", str(raw), str(out)], check=True)  # fmt: skip
    raw.unlink()
    return out


def wait_synced(serial: Path, n: int, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while serial.read_text(errors="replace").count("vfsguest: synced ") < n:
        if time.monotonic() > deadline:
            raise SystemExit("the guest did not start appending")
        time.sleep(0.1)


def run_vmctl(work: Path, guest, args, ram: str = "live") -> dict:
    disk = vimg_disk(work, args.disk_mib)
    src, dst = work / "src", work / "dst"
    vmctl("run", "b", "--disk", str(disk), "--kernel", str(guest.kernel), "--initrd",
          str(guest.initrd), "--append", guest.append("append,dirty", dirty_mb=args.dirty_mib),
          "--wait-for", "vfsguest: ready", root=src)  # fmt: skip
    wait_synced(src / "b" / "serial.log", 5)
    rep = json.loads(vmctl("migrate", "b", "--to", str(dst), "--json", "--ram", ram, "--bandwidth",
                           args.bandwidth, "--downtime-ms", str(args.downtime_ms),
                           "--precopy-timeout", str(args.precopy_timeout),
                           root=src).stdout)  # fmt: skip
    vmctl("stop", "b", root=dst)
    return {"downtime_ms": rep["qemu_downtime_ms"], "pause_ms": rep["downtime_ms"],
            "total_s": rep["total_s"], "mode": rep["mode"], "disk_bytes": rep["disk_bytes"],
            "ram_bytes": rep["ram_bytes"]}  # fmt: skip


async def _wait(qmp, timeout: float = 600, precopy_timeout: float | None = None) -> dict:
    t0 = time.monotonic()
    forced = False
    while True:
        st = await qmp.execute("query-migrate")
        if st.get("status") == "completed":
            st["forced"] = forced
            return st
        if st.get("status") in ("failed", "cancelled"):
            raise SystemExit(f"migration failed: {st.get('error-desc')}")
        if precopy_timeout and not forced and time.monotonic() - t0 > precopy_timeout:
            await qmp.execute("migrate-set-parameters", {"downtime-limit": 600_000})
            forced = True
        if time.monotonic() - t0 > timeout:
            raise SystemExit("migration did not finish")
        await trio.sleep(0.01)


def run_qemu_peer(work: Path, guest, args, mirror: bool) -> dict:
    disk = make_disk(work / "disk.raw", size=f"{args.disk_mib}M")
    dest_disk = disk
    if mirror:
        dest_disk = work / "dest.raw"
        subprocess.run(["truncate", "-s", f"{args.disk_mib}M", str(dest_disk)], check=True)

    def spec(path: Path) -> MachineSpec:
        return MachineSpec("b", kernel=guest.kernel, initrd=guest.initrd,
                           append=guest.append("append,dirty", dirty_mb=args.dirty_mib),
                           machine="pc-q35-7.2", disks=[ImageFile(path, "raw")])  # fmt: skip

    async def main() -> dict:
        async with run_qemu(spec(disk), work / "src", marker="vfsguest: ready") as s:
            while (s.serial_text()).count("vfsguest: synced ") < 5:
                await trio.sleep(0.1)
            t0 = time.monotonic()
            mirrored = 0
            async with run_qemu(spec(dest_disk), work / "dst", incoming="defer") as d:
                sock = work / "dst" / "mig.sock"
                await d.qmp.execute("migrate-incoming", {"uri": f"unix:{sock}"})
                if mirror:
                    nbd = str(work / "dst" / "nbd.sock")
                    await d.qmp.execute(
                        "nbd-server-start", {"addr": {"type": "unix", "data": {"path": nbd}}}
                    )
                    await d.qmp.execute(
                        "block-export-add",
                        {"type": "nbd", "id": "e0", "node-name": "disk0", "writable": True},
                    )
                    await s.qmp.execute(
                        "blockdev-add",
                        {
                            "driver": "nbd",
                            "node-name": "tgt",
                            "server": {"type": "unix", "path": nbd},
                            "export": "disk0",
                        },
                    )
                    await s.qmp.execute("blockdev-mirror", {"job-id": "m0", "device": "disk0",
                                        "target": "tgt", "sync": "full"})  # fmt: skip
                    while True:
                        jobs = await s.qmp.execute("query-block-jobs")
                        if jobs and jobs[0].get("ready"):
                            mirrored = jobs[0]["offset"]
                            break
                        await trio.sleep(0.05)
                await s.qmp.execute(
                    "migrate-set-parameters",
                    {"max-bandwidth": _size(args.bandwidth), "downtime-limit": args.downtime_ms},
                )
                await s.qmp.execute("migrate", {"uri": f"unix:{sock}"})
                st = await _wait(s.qmp, precopy_timeout=args.precopy_timeout)
                if mirror:  # the source is paused: complete the mirror in sync, as libvirt does
                    await s.qmp.execute("block-job-cancel", {"device": "m0"})
                    while await s.qmp.execute("query-block-jobs"):
                        await trio.sleep(0.01)
                    await d.qmp.execute("nbd-server-stop")
                await _wait(d.qmp)
                await d.qmp.execute("cont")
                total = time.monotonic() - t0
                await s.stop()
                await d.stop()
        return {"downtime_ms": st.get("downtime"), "pause_ms": None, "total_s": round(total, 3),
                "mode": "stop-and-copy" if st["forced"] else "precopy",
                "disk_bytes": mirrored,
                "ram_bytes": st.get("ram", {}).get("transferred")}  # fmt: skip

    return trio.run(main)


def _size(text: str) -> int:
    from vfs.units import parse_size

    return parse_size(text)


def run_hibernate(work: Path, guest, args) -> dict:
    disk = vimg_disk(work, args.disk_mib)
    src, dst = work / "src", work / "dst"
    vmctl("run", "h", "--disk", str(disk), "--kernel", str(guest.kernel), "--initrd",
          str(guest.initrd), "--append", guest.append("append,dirty", dirty_mb=args.dirty_mib),
          "--wait-for", "vfsguest: ready", root=src)  # fmt: skip
    wait_synced(src / "h" / "serial.log", 5)
    t0 = time.monotonic()
    rep = json.loads(vmctl("hibernate", "h", str(work / "bundle"), "--json", root=src).stdout)
    t1 = time.monotonic()
    restored = json.loads(vmctl("restore", str(work / "bundle"), "--json", root=dst).stdout)
    t2 = time.monotonic()
    vmctl("stop", "h", root=dst)
    size = sum(p.stat().st_size for p in (work / "bundle").iterdir())
    return {"hibernate_s": round(t1 - t0, 3), "save_s": rep["save_s"],
            "restore_s": round(t2 - t1, 3), "load_s": restored.get("load_s"),
            "bundle_bytes": size}  # fmt: skip


def median(rows: list[dict], key: str):
    vals = [r[key] for r in rows if r.get(key) is not None]
    return round(statistics.median(vals), 3) if vals else None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--disk-mib", type=int, default=1024)
    ap.add_argument("--dirty-mib", type=int, default=32)
    ap.add_argument("--bandwidth", default="1G")
    ap.add_argument("--downtime-ms", type=int, default=100)
    ap.add_argument("--precopy-timeout", type=float, default=30.0)
    ap.add_argument("--peers", default=",".join(PEERS))
    ap.add_argument("--dir", default=None)
    ap.add_argument("--json", dest="json_out")
    args = ap.parse_args()
    guest = build_guest()
    peers = [p for p in args.peers.split(",") if p]
    results: dict = {"params": vars(args), "migrate": {}, "hibernate": []}
    for i in range(args.runs):
        for peer in peers:  # interleaved: each run of each peer sees the same machine load
            with tempfile.TemporaryDirectory(prefix="vmctl-bench-", dir=args.dir) as tmp:
                work = Path(tmp)
                if peer.startswith("vmctl"):
                    row = run_vmctl(
                        work, guest, args, "paused" if peer == "vmctl-paused" else "live"
                    )
                else:
                    row = run_qemu_peer(work, guest, args, mirror=peer == "qemu-mirror")
            results["migrate"].setdefault(peer, []).append(row)
            print(f"run {i + 1} {peer}: {row}", file=sys.stderr)
        with tempfile.TemporaryDirectory(prefix="vmctl-bench-", dir=args.dir) as tmp:
            row = run_hibernate(Path(tmp), guest, args)
        results["hibernate"].append(row)
        print(f"run {i + 1} hibernate: {row}", file=sys.stderr)
    print(f"guest 256 MiB, disk {args.disk_mib} MiB, dirtying {args.dirty_mib} MiB per round, "
          f"appending; bandwidth {args.bandwidth}, downtime limit {args.downtime_ms} ms; "
          f"medians of {args.runs}")  # fmt: skip
    print("| peer | QEMU downtime ms | guest pause ms (STOP→RESUME) | total s | modes "
          "| disk MiB sent |")  # fmt: skip
    print("|---|---|---|---|---|---|")
    for peer, rows in results["migrate"].items():
        modes = ",".join(sorted({r["mode"] for r in rows}))
        disk = median(rows, "disk_bytes")
        print(f"| {peer} | {median(rows, 'downtime_ms')} | {median(rows, 'pause_ms') or '-'} | "
              f"{median(rows, 'total_s')} | {modes} | {(disk or 0) / (1 << 20):.1f} |")  # fmt: skip
    h = results["hibernate"]
    print(
        f"hibernate {median(h, 'hibernate_s')} s (state saved in {median(h, 'save_s')} s), "
        f"restore {median(h, 'restore_s')} s, bundle {median(h, 'bundle_bytes') / 2**20:.0f} MiB"
    )
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
