"""``python -m tools.guest [--json]``: build (or find in the cache) the test guest, print it."""

from __future__ import annotations

import argparse
import json
import sys
import time

from tools.guest.build import GuestBuildError, build_guest, manifest


def main() -> int:
    ap = argparse.ArgumentParser(prog="python -m tools.guest", description=__doc__)
    ap.add_argument("--json", action="store_true", help="machine-readable output")
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
    if args.json:
        print(json.dumps(info, indent=2))
    else:
        for k in ("kernel", "initrd", "kernel_release", "seconds", "build_seconds"):
            print(f"{k + ':':16} {info.get(k)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
