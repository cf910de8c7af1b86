"""Benchmark of the redirect layer against curl, same machine, same run.

    python -m tools.bench.redirect [--runs 5] [--json]

* cold fetch (second redirection) of 1 MiB and 64 MiB objects from nginx on 127.0.0.1 through
  the Resolver (fetch + SHA-256 verify + chunked store write + fsync + rename), vs
  ``curl -o file`` of the same URL (download only, no verification, no fsync);
* warm hit (first redirection): ``Resolver.read`` of 4 KiB from a present object, µs per op,
  vs a plain ``os.pread`` of the same file bytes.

Reports medians and ratios (vfs / curl: < 1 means slower than curl).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from tools.nginx import start_nginx, stop_nginx
from vfs.redirect import LocalStore, Resolver, open_remote
from vfs.redirect.file_remote import FileRemote


def drop_caches() -> None:
    try:
        os.sync()
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
    except OSError:
        pass


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--warm-ops", type=int, default=20000)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)

    base = Path(tempfile.mkdtemp(prefix="vfs-bench-redirect-"))
    proc, server = start_nginx(base / "nginx")
    port = server.ports["http"]
    results: dict[str, dict] = {}
    try:
        repo = FileRemote(server.webroot / "repo", create=True)
        url = f"http://127.0.0.1:{port}/repo"
        for label, size in (("1 MiB", 1 << 20), ("64 MiB", 64 << 20)):
            data = os.urandom(size)
            oid = repo.put(data)
            del data
            obj_url = f"{url}/objects/{oid[:2]}/{oid}"
            vfs_t, curl_t = [], []
            for i in range(args.runs):
                with LocalStore(base / f"store-{label[:-4]}-{i}") as store:
                    remote = open_remote(url)
                    t0 = time.perf_counter()
                    Resolver(store, remote).ensure(oid)
                    vfs_t.append(time.perf_counter() - t0)
                    remote.close()
                out = base / "curl.out"
                t0 = time.perf_counter()
                subprocess.run(["curl", "-s", "-f", "-o", str(out), obj_url], check=True)
                curl_t.append(time.perf_counter() - t0)
                out.unlink()
                shutil.rmtree(base / f"store-{label[:-4]}-{i}")
            v, c = statistics.median(vfs_t), statistics.median(curl_t)
            results[f"fetch {label}"] = {
                "vfs_MBps": round(size / v / 1e6, 1),
                "curl_MBps": round(size / c / 1e6, 1),
                "ratio": round(c / v, 2),
            }

        # Warm hit: first redirection, 4 KiB reads at random offsets of a present 64 MiB object.
        with LocalStore(base / "warm") as store:
            oid = store.put(os.urandom(64 << 20))
            res = Resolver(store)
            import random

            rnd = random.Random(1)
            offs = [rnd.randrange(0, (64 << 20) - 4096) for _ in range(args.warm_ops)]
            res.read(oid, 0, 4096)
            runs = []
            for _ in range(args.runs):
                t0 = time.perf_counter()
                for o in offs:
                    res.read(oid, o, 4096)
                runs.append((time.perf_counter() - t0) / len(offs) * 1e6)
            path = store.root / "objects" / oid[:2] / oid
            fd = os.open(path, os.O_RDONLY)
            raw = []
            for _ in range(args.runs):
                t0 = time.perf_counter()
                for o in offs:
                    os.pread(fd, 4096, o)
                raw.append((time.perf_counter() - t0) / len(offs) * 1e6)
            os.close(fd)
            results["warm hit 4 KiB"] = {
                "vfs_us": round(statistics.median(runs), 2),
                "pread_us": round(statistics.median(raw), 2),
                "ratio": round(statistics.median(raw) / statistics.median(runs), 2),
            }
    finally:
        stop_nginx(proc)
        shutil.rmtree(base, ignore_errors=True)

    if args.json:
        print(json.dumps(results, indent=2))
    else:
        print(f"{'case':<16} {'vfs':>12} {'peer':>12} {'vfs/peer':>9}")
        for case, r in results.items():
            if "vfs_MBps" in r:
                print(
                    f"{case:<16} {r['vfs_MBps']:>8} MB/s {r['curl_MBps']:>7} MB/s {r['ratio']:>9}"
                )
            else:
                print(f"{case:<16} {r['vfs_us']:>9} µs {r['pread_us']:>9} µs {r['ratio']:>9}")
        print("peer: curl -o FILE for fetches, os.pread of the object file for warm hits;")
        print(f"medians of {args.runs} runs")
    return 0


if __name__ == "__main__":
    sys.exit(main())
