"""``python -m tools.guest [--json] [--boot N] [--append WORDS]``: build (or find in the cache)
the test guest and print where it is; with ``--boot N``, also boot it N times under QEMU (the
accelerator vmctl picks) and report the time from spawning QEMU to the guest's marker."""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

from tools.guest.build import Guest, GuestBuildError, build_guest, manifest


def boot_times(guest: Guest, n: int, extra: str = "") -> list[float]:
    import trio

    from vmctl.machine import MachineSpec
    from vmctl.qemu import run_qemu

    async def one(state: Path) -> float:
        spec = MachineSpec("boot", kernel=guest.kernel, initrd=guest.initrd,
                           append=guest.append(extra=extra))  # fmt: skip
        t0 = time.monotonic()
        async with run_qemu(spec, state, marker="vfsguest: ready"):
            return time.monotonic() - t0

    out = []
    with tempfile.TemporaryDirectory(prefix="guest-boot-") as tmp:
        for i in range(n):
            out.append(trio.run(one, Path(tmp) / f"vm{i}"))
    return out


def main() -> int:
    ap = argparse.ArgumentParser(prog="python -m tools.guest", description=__doc__)
    ap.add_argument("--json", action="store_true", help="machine-readable output")
    ap.add_argument("--boot", type=int, default=0, metavar="N", help="boot N times, time it")
    ap.add_argument("--append", default="", help="extra kernel command-line words (with --boot)")
    args = ap.parse_args()
    t0 = time.monotonic()
    try:
        guest = build_guest()
    except GuestBuildError as e:
        print(f"tools.guest: error: {e}", file=sys.stderr)
        return 1
    info = {
        "directory": str(guest.directory),
        "kernel": str(guest.kernel),
        "initrd": str(guest.initrd),
        "kernel_release": guest.kernel_release,
        "seconds": round(time.monotonic() - t0, 3),
        **manifest(guest),
    }
    if args.boot:
        times = boot_times(guest, args.boot, args.append)
        info["boot_seconds"] = [round(t, 2) for t in times]
        info["boot_median"] = round(statistics.median(times), 2)
    if args.json:
        print(json.dumps(info, indent=2))
    else:
        for k in ("kernel", "initrd", "kernel_release", "seconds", "build_seconds",
                  "boot_seconds", "boot_median"):  # fmt: skip
            if k in info:
                print(f"{k + ':':16} {info[k]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
