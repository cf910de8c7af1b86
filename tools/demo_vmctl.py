"""`make demo` section: a real guest (TCG here) on a vimg disk served by the export, writing to
it; hibernated, restored in another state root, migrated live to a third; its disk read back."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path


def _wait_lines(serial: Path, n: int, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while serial.read_text(errors="replace").count("vfsguest: synced ") < n:
        if time.monotonic() > deadline:
            raise SystemExit(f"the guest did not append {n} lines")
        time.sleep(0.1)


def _last_synced(serial: Path) -> str:
    lines = [x for x in serial.read_text(errors="replace").splitlines() if "synced" in x]
    return lines[-1].strip() if lines else "(none)"


def run_demo(work: Path, nginx, run, banner) -> None:
    from tools.guest import APPEND_LOG, build_guest, make_disk, read_disk_file

    banner("vmctl: a guest on a vimg disk: run, hibernate, restore, migrate")
    d = work / "vmctl"
    d.mkdir()
    guest = build_guest()
    raw = make_disk(d / "web.raw", size="256M")
    disk = d / "web.vimg"
    run("vimg", "convert", "-f", "raw", "-O", "vimg", raw, disk)
    raw.unlink()
    host_a, host_b, host_c = d / "host-a", d / "host-b", d / "host-c"
    run("vmctl", "host")
    print("\n# the guest appends a line to its disk every 100 ms, fsynced (tools/guest)")
    run("vmctl", "run", "web", "--disk", disk, "--kernel", guest.kernel, "--initrd",
        guest.initrd, "--append", guest.append("append,dirty", dirty_mb=16),
        "--wait-for", "vfsguest: ready", "--root", host_a)  # fmt: skip
    run("vmctl", "status", "web", "--root", host_a)
    _wait_lines(host_a / "web" / "serial.log", 10)

    print("\n# hibernate: pause, save memory + devices, freeze a snapshot of the disk, stop")
    run("vmctl", "hibernate", "web", d / "web.bundle", "--root", host_a)
    print(f"  last line on host-a's console: {_last_synced(host_a / 'web' / 'serial.log')}")
    run("vimg", "snapshot", "-l", disk)
    print("\n# restore under another state root: the guest goes on counting")
    run("vmctl", "restore", d / "web.bundle", "--root", host_b)
    _wait_lines(host_b / "web" / "serial.log", 10)
    first = next(
        x for x in (host_b / "web" / "serial.log").read_text().splitlines() if "synced" in x
    )
    print(f"  first line on host-b's console: {first.strip()}")
    print("# the same bundle again, while that guest runs on its disk: refused")
    run("vmctl", "restore", d / "web.bundle", "--name", "web2", "--root", host_c, check=False)

    print("\n# live migration to host-c: disk copied while it runs, RAM pre-copy, short pause")
    out = run("vmctl", "migrate", "web", "--to", host_c, "--json", "--root", host_b)
    rep = json.loads(out)
    disk_mib, ram_mib = rep["disk_bytes"] / 2**20, rep["ram_bytes"] / 2**20
    print(f"  downtime {rep['downtime_ms']} ms (QEMU: {rep['qemu_downtime_ms']} ms), "
          f"{disk_mib:.1f} MiB of disk, {ram_mib:.0f} MiB of RAM")  # fmt: skip
    _wait_lines(host_c / "web" / "serial.log", 5)
    run("vmctl", "list", "--root", host_c)
    run("vmctl", "stop", "web", "--root", host_c)

    print("\n# the migrated disk, read back on the host: every fsynced line, in order")
    moved = host_c / "web" / "disk0.vimg"
    run("vimg", "check", moved)
    flat = d / "readback.raw"
    run("vimg", "convert", "-O", "raw", moved, flat)
    lines = (read_disk_file(flat, APPEND_LOG, fmt="raw") or b"").decode().splitlines()
    ok = lines == [f"line {n}" for n in range(1, len(lines) + 1)]
    print(f"  {len(lines)} lines, {'consecutive from 1' if ok else 'NOT CONSECUTIVE'}; "
          f"last: {lines[-1] if lines else '(none)'}")  # fmt: skip
    if not ok:
        sys.exit("demo: the guest's lines are not all there")
