"""Benchmark of the redirect layer against curl, same machine, same run.

    python -m tools.bench.redirect [--runs 5] [--json]

* cold fetch (second redirection) of 1 MiB and 64 MiB objects from nginx on 127.0.0.1 through
  the Resolver (fetch + SHA-256 verify + chunked store write + fsync + rename), vs
  ``curl -o file`` of the same URL (download only, no verification, no fsync);
* warm hit (first redirection): ``Resolver.read`` of 4 KiB from a present object, µs per op,
  vs a plain ``os.pread`` of the same file bytes;
* encrypted (docs/encryption.md): cold fetch of the same sizes sealed (AES-256-GCM STREAM,
  decrypted as it streams, then verified and stored) vs the plain fetch of the same object,
  both over an open connection (the signed ref was just fetched on it), runs interleaved in the
  same loop (goal: >= 0.9x); the time to open a signed ref (fetch, Ed25519 verify, X25519
  unseal, fetch and decrypt the index, pin); and publish of N small files (``--files``,
  default 20,000) encrypted (``SealingRemote``, convergent keys, 2 recipients) vs plain
  ``publish_template`` into an empty file:// repository.

Reports medians and ratios (vfs / curl, encrypted / plain: < 1 means slower than the peer).
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

from tools.bench.template import make_tree
from tools.nginx import start_nginx, stop_nginx
from vfs.redirect import LocalStore, Resolver, open_remote
from vfs.redirect.file_remote import FileRemote
from vfs.redirect.keys import Identity
from vfs.redirect.sealed_refs import Keys, PinStore
from vfs.redirect.sealed_remote import SealingRemote, UnsealingRemote
from vfs.tree.template import publish_template

PUBLISHER = Identity.generate()
CLIENT = Identity.generate()


def sealing(repo: FileRemote) -> SealingRemote:
    return SealingRemote(
        repo,
        signer=PUBLISHER,
        recipients=[CLIENT.public],
        keyring=PUBLISHER.default_keyring(),
    )


def plain_fetch(base: Path, url: str, ref: str, oid: str, size: int) -> float:
    """The plain fetch over an already open connection: the peer of :func:`sealed_fetch`,
    whose connection is open once the signed ref is (a daemon keeps its connection)."""
    store_dir = base / "store-warm"
    with LocalStore(store_dir) as store:
        remote = open_remote(url)
        remote.get_ref(ref)  # one request: the connection is up
        t0 = time.perf_counter()
        Resolver(store, remote).ensure(oid, expected_size=size)
        dt = time.perf_counter() - t0
        remote.close()
    shutil.rmtree(store_dir)
    return dt


def sealed_fetch(base: Path, url: str, name: str, oid: str, size: int, pins: Path):
    """(seconds to open the signed ref, seconds to fetch + decrypt + verify + store)."""
    store_dir = base / "store-sealed"
    with LocalStore(store_dir) as store:
        remote = open_remote(url)
        unsealing = UnsealingRemote(None, Keys(identity=CLIENT, pins=PinStore(pins)))
        t0 = time.perf_counter()
        got = unsealing.resolve(remote, name)
        t1 = time.perf_counter()
        Resolver(store, unsealing).ensure(got, expected_size=size)
        t2 = time.perf_counter()
        remote.close()
    shutil.rmtree(store_dir)
    assert got == oid
    return t1 - t0, t2 - t1


def publish_rows(base: Path, files: int, runs: int) -> dict[str, dict]:
    src = base / "tree"
    make_tree(src, files)
    plain_t, enc_t = [], []
    for i in range(runs):
        for label, times in (("plain", plain_t), ("enc", enc_t)):
            repo_dir = base / f"pub-{label}-{i}"
            repo = FileRemote(repo_dir, create=True)
            target = repo if label == "plain" else sealing(repo)
            t0 = time.perf_counter()
            publish_template(src, target, name="app")
            times.append(time.perf_counter() - t0)
            shutil.rmtree(repo_dir)
    shutil.rmtree(src)
    p, e = statistics.median(plain_t), statistics.median(enc_t)
    return {
        f"publish {files} files": {
            "enc_s": round(e, 2),
            "plain_s": round(p, 2),
            "ratio": round(p / e, 2),
        }
    }


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
    ap.add_argument("--files", type=int, default=20000, help="files of the publish rows")
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
            ref = f"sealed-{size}"
            s = sealing(repo)
            assert s.put(data) == oid
            s.set_ref(ref, oid)
            del data
            obj_url = f"{url}/objects/{oid[:2]}/{oid}"
            vfs_t, curl_t, enc_t, open_t, warm_t = [], [], [], [], []
            for i in range(args.runs):
                with LocalStore(base / f"store-{label[:-4]}-{i}") as store:
                    remote = open_remote(url)
                    t0 = time.perf_counter()
                    Resolver(store, remote).ensure(oid)
                    vfs_t.append(time.perf_counter() - t0)
                    remote.close()
                shutil.rmtree(base / f"store-{label[:-4]}-{i}")
                warm_t.append(plain_fetch(base, url, ref, oid, size))
                o, e = sealed_fetch(base, url, ref, oid, size, base / f"pins-{size}-{i}.json")
                open_t.append(o)
                enc_t.append(e)
                out = base / "curl.out"
                t0 = time.perf_counter()
                subprocess.run(["curl", "-s", "-f", "-o", str(out), obj_url], check=True)
                curl_t.append(time.perf_counter() - t0)
                out.unlink()
            v, c = statistics.median(vfs_t), statistics.median(curl_t)
            e, w = statistics.median(enc_t), statistics.median(warm_t)
            results[f"fetch {label}"] = {
                "vfs_MBps": round(size / v / 1e6, 1),
                "curl_MBps": round(size / c / 1e6, 1),
                "ratio": round(c / v, 2),
            }
            results[f"enc fetch {label}"] = {
                "vfs_MBps": round(size / e / 1e6, 1),
                "curl_MBps": round(size / w / 1e6, 1),
                "ratio": round(w / e, 2),
            }
            results[f"open signed ref ({label} template)"] = {
                "vfs_us": round(statistics.median(open_t) * 1e6, 0),
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
        results.update(publish_rows(base, args.files, args.runs))
    finally:
        stop_nginx(proc)
        shutil.rmtree(base, ignore_errors=True)

    if args.json:
        print(json.dumps(results, indent=2))
    else:
        print(f"{'case':<32} {'vfs':>12} {'peer':>12} {'vfs/peer':>9}")
        for case, r in results.items():
            if "vfs_MBps" in r:
                print(
                    f"{case:<32} {r['vfs_MBps']:>7} MB/s {r['curl_MBps']:>7} MB/s {r['ratio']:>9}"
                )
            elif "enc_s" in r:
                print(f"{case:<32} {r['enc_s']:>10} s {r['plain_s']:>10} s {r['ratio']:>9}")
            elif "pread_us" in r:
                print(f"{case:<32} {r['vfs_us']:>9} µs {r['pread_us']:>9} µs {r['ratio']:>9}")
            else:
                print(f"{case:<32} {r['vfs_us']:>9} µs")
        print("peer: curl -o FILE for fetches, os.pread of the object file for warm hits;")
        print("enc rows: encrypted vs plain vfs, same run (fetch: over an open connection);")
        print(f"medians of {args.runs} runs")
    return 0


if __name__ == "__main__":
    sys.exit(main())
