"""Benchmark of template publishing and loading against rsync and tar, same machine, same run.

    python -m tools.bench.template [--files 5000] [--runs 3] [--full] [--json]

On a tree of N small files (4 KiB, distinct contents, 100 per directory) published to a
file:// repository:

* cold publish: ``publish_template`` into an empty repository (hash, upload each object with
  fsync + rename, manifest, ref) vs ``rsync -a --fsync src/ dst/`` (the durable copy an operator
  would otherwise make) and ``tar -cf`` of the tree (one sequential stream, one fsync);
* republish unchanged: vs ``rsync -a`` of the unchanged tree (its quick check: stat only);
* incremental: 10 files changed, vs ``rsync -a --fsync``;
* load: ``Template.load`` of the manifest (fetch, SHA-256 verify, decode, validate, index);
* one big file of random bytes (256 MiB; 1 GiB with ``--full``): publish (hash, spool, upload
  with fsync) vs ``cp`` + fsync of the copy.

Reports medians and ratios (peer time / vfs time: > 1 means vfs is faster). ``--full`` uses
20,000 files.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

from vfs.redirect import FileRemote
from vfs.tree.template import Template, publish_template


def make_tree(root: Path, n: int) -> None:
    for i in range(n):
        d = root / f"d{i // 100:04d}"
        if i % 100 == 0:
            d.mkdir(parents=True)
        (d / f"f{i:06d}").write_bytes(i.to_bytes(8, "little") * 512)


def timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def run(cmd: list[str]) -> None:
    subprocess.run(cmd, check=True, capture_output=True)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--files", type=int, default=5000)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--full", action="store_true", help="20,000 files")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    n = 20_000 if args.full else args.files

    base = Path(tempfile.mkdtemp(prefix="vfs-bench-template-"))
    res: dict[str, dict[str, list[float]]] = {
        k: {"vfs": [], "peer": [], "peer2": []}
        for k in ("cold publish", "republish unchanged", "incremental (10 files)", "load")
    }
    big_label = f"big file {'1 GiB' if args.full else '256 MiB'} (vs cp + fsync)"
    res[big_label] = {"vfs": [], "peer": [], "peer2": []}
    try:
        src = base / "src"
        make_tree(src, n)
        os.sync()
        for i in range(args.runs):
            repo_dir = base / f"repo{i}"
            repo = FileRemote(repo_dir, create=True)
            dst = base / f"rsync{i}"
            r: list = []
            res["cold publish"]["vfs"].append(
                timed(lambda: r.append(publish_template(src, repo, name="bench")))  # noqa: B023
            )
            res["cold publish"]["peer"].append(
                timed(lambda: run(["rsync", "-a", "--fsync", f"{src}/", f"{dst}/"]))  # noqa: B023
            )
            tar = base / f"t{i}.tar"
            res["cold publish"]["peer2"].append(
                timed(lambda: run(["tar", "-cf", str(tar), "-C", str(src), "."]) or os.sync())  # noqa: B023
            )
            res["republish unchanged"]["vfs"].append(
                timed(lambda: publish_template(src, repo, name="bench"))  # noqa: B023
            )
            res["republish unchanged"]["peer"].append(
                timed(lambda: run(["rsync", "-a", f"{src}/", f"{dst}/"]))  # noqa: B023
            )
            for k in range(10):
                (src / "d0000" / f"f{k:06d}").write_bytes(os.urandom(4096))
            res["incremental (10 files)"]["vfs"].append(
                timed(lambda: publish_template(src, repo, name="bench"))  # noqa: B023
            )
            res["incremental (10 files)"]["peer"].append(
                timed(lambda: run(["rsync", "-a", "--fsync", f"{src}/", f"{dst}/"]))  # noqa: B023
            )
            digest = r[0].digest
            res["load"]["vfs"].append(timed(lambda: Template.load(repo, digest)))  # noqa: B023
            shutil.rmtree(repo_dir)
            shutil.rmtree(dst)
            tar.unlink()
        big = base / "big"
        big.mkdir()
        with open(big / "blob", "wb") as f:
            for _ in range((1024 if args.full else 256) // 16):
                f.write(os.urandom(16 << 20))
        os.sync()
        for i in range(args.runs):
            repo = FileRemote(base / f"bigrepo{i}", create=True)
            res[big_label]["vfs"].append(timed(lambda: publish_template(big, repo)))  # noqa: B023
            dst = base / f"bigcopy{i}"
            res[big_label]["peer"].append(
                timed(lambda: run(["cp", str(big / "blob"), str(dst)]) or _fsync(dst))  # noqa: B023
            )
            shutil.rmtree(base / f"bigrepo{i}")
            dst.unlink()
    finally:
        shutil.rmtree(base, ignore_errors=True)

    summary = {}
    for k, v in res.items():
        row = {"vfs_s": statistics.median(v["vfs"])}
        if v["peer"]:
            row["rsync_s"] = statistics.median(v["peer"])
            row["rsync_over_vfs"] = row["rsync_s"] / row["vfs_s"]
        if v["peer2"]:
            row["tar_s"] = statistics.median(v["peer2"])
            row["tar_over_vfs"] = row["tar_s"] / row["vfs_s"]
        summary[k] = row
    if args.json:
        print(json.dumps({"files": n, "runs": args.runs, "results": summary}, indent=2))
        return 0
    print(f"{n} files of 4 KiB, {args.runs} runs, medians")
    print("| operation | vfs | rsync -a (cp) | peer/vfs | tar -cf | tar/vfs |")
    print("|---|---|---|---|---|---|")
    for k, row in summary.items():
        rs = (
            f"{row['rsync_s']:.3f} s | {row['rsync_over_vfs']:.2f}" if "rsync_s" in row else "– | –"
        )
        ts = f"{row['tar_s']:.3f} s | {row['tar_over_vfs']:.2f}" if "tar_s" in row else "– | –"
        print(f"| {k} | {row['vfs_s']:.3f} s | {rs} | {ts} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
