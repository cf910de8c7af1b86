"""fsx-style model test: seeded random operations on an Image against an in-memory model.

On failure the seed and the last operations are printed so the run can be replayed exactly
(``VIMG_FSX_SEED=<seed> pytest tests/image/test_model.py``).
"""

from __future__ import annotations

import os
import random
import shutil
from collections import deque

import pytest

from vfs.image.chain import commit
from vfs.image.check import check, verify
from vfs.image.image import Image

SEEDS = [int(os.environ["VIMG_FSX_SEED"])] if "VIMG_FSX_SEED" in os.environ else [1, 2, 3, 4]


def _data(r: random.Random, n: int) -> bytes:
    kind = r.random()
    if kind < 0.3:
        return bytes([r.randrange(1, 256)]) * n
    if kind < 0.4:
        return bytes(n)
    return r.randbytes(n)


def _run(
    tmp_path,
    seed: int,
    *,
    compress: bool,
    cluster: int,
    backing: bool,
    nops: int,
    l2_limit: int = 0,
) -> None:
    r = random.Random(seed)
    size = 2 << 20
    base_model = bytearray(size)
    bpath = str(tmp_path / f"base-{seed}.vimg")
    path = str(tmp_path / f"img-{seed}.vimg")
    if backing:
        with Image.create(bpath, size, cluster_size=cluster * 2) as b:
            d = r.randbytes(size // 2)
            b.write(size // 4, d)
            base_model[size // 4 : size // 4 + len(d)] = d
        img = Image.create(
            path, size, cluster_size=cluster, compress=compress, backing=os.path.basename(bpath)
        )
        model = bytearray(base_model)
    else:
        img = Image.create(path, size, cluster_size=cluster, compress=compress)
        model = bytearray(size)
    if l2_limit:
        img._core.l2_limit = l2_limit  # force L2 cache eviction all the time
    snaps: dict[str, bytes] = {}
    applicable: set[str] = set()
    log: deque[str] = deque(maxlen=25)
    try:
        for i in range(nops):
            op = r.choices(
                [
                    "write",
                    "read",
                    "discard",
                    "zero",
                    "flush",
                    "snap",
                    "apply",
                    "delsnap",
                    "resize",
                    "reopen",
                    "commit",
                ],
                weights=[30, 20, 6, 6, 5, 2, 2, 1, 3, 2, 2 if backing else 0],
            )[0]
            size = len(model)
            off = r.randrange(0, size)
            n = min(
                r.choice([1, 511, 4096, cluster, 3 * cluster + 7, r.randrange(1, 70000)]),
                size - off,
            )
            if op == "write":
                d = _data(r, n)
                log.append(f"{i}: write {off:#x}+{n:#x}")
                img.write(off, d)
                model[off : off + n] = d
            elif op == "read":
                log.append(f"{i}: read {off:#x}+{n:#x}")
                got = img.read(off, n)
                if got != bytes(model[off : off + n]):
                    bad = next(j for j in range(n) if got[j] != model[off + j])
                    raise AssertionError(f"read mismatch at {off + bad:#x}")
            elif op in ("discard", "zero"):
                log.append(f"{i}: {op} {off:#x}+{n:#x}")
                (img.discard if op == "discard" else img.write_zeroes)(off, n)
                model[off : off + n] = bytes(n)
            elif op == "flush":
                log.append(f"{i}: flush")
                img.flush()
            elif op == "snap":
                name = f"s{i}"
                log.append(f"{i}: snapshot -c {name}")
                img.snapshot_create(name)
                snaps[name] = bytes(model)
                applicable.add(name)
            elif op == "apply" and applicable:
                name = r.choice(sorted(applicable))
                log.append(f"{i}: snapshot -a {name}")
                img.snapshot_apply(name)
                model = bytearray(snaps[name])
            elif op == "delsnap" and snaps:
                name = r.choice(sorted(snaps))
                log.append(f"{i}: snapshot -d {name}")
                img.snapshot_delete(name)
                del snaps[name]
                applicable.discard(name)
            elif op == "resize":
                new = r.randrange(1, 5 << 20) // 512 * 512 or 512
                log.append(f"{i}: resize {new:#x}")
                img.resize(new)
                if new < len(model):
                    del model[new:]
                else:
                    model += bytes(new - len(model))
            elif op == "reopen":
                log.append(f"{i}: reopen")
                img.close()
                img = Image.open(path)
                if l2_limit:
                    img._core.l2_limit = l2_limit
            elif op == "commit":
                log.append(f"{i}: commit")
                commit(img)
                # A snapshot's unallocated ranges read the backing file, which commit changed:
                # its content is no longer the one the model saved.
                applicable.clear()
                with Image.open(bpath, readonly=True) as b:
                    n2 = min(b.size, len(model))
                    assert b.read(0, n2) == bytes(model[:n2]), "backing differs after commit"
        img.flush()
        assert img.size == len(model)
        assert img.read(0, len(model)) == bytes(model)
        assert verify(img) == []
        img.close()
        res = check(path)
        assert res.corruptions == 0 and res.leaks == 0, res.messages[:10]
        with Image.open(path, readonly=True) as again:
            assert again.read(0, len(model)) == bytes(model)
            assert sorted(s.name for s in again.snapshots) == sorted(snaps)
        # every snapshot still holds what the model saved (applied on a copy of the image)
        for name in sorted(applicable)[:3]:
            copy = str(tmp_path / f"copy-{seed}.vimg")
            shutil.copy(path, copy)
            with Image.open(copy) as c:
                c.snapshot_apply(name)
                assert c.read(0, c.size) == snaps[name], f"snapshot {name} content"
            os.unlink(copy)
    except BaseException:
        print(f"FSX FAILED: seed={seed} compress={compress} cluster={cluster} backing={backing}")
        print("last operations:\n  " + "\n  ".join(log))
        raise
    finally:
        img.close()


@pytest.mark.parametrize("seed", SEEDS)
def test_fsx_plain(tmp_path, seed):
    _run(tmp_path, seed, compress=False, cluster=4096, backing=False, nops=400)


@pytest.mark.parametrize("seed", SEEDS)
def test_fsx_compressed(tmp_path, seed):
    _run(tmp_path, seed, compress=True, cluster=8192, backing=False, nops=300)


@pytest.mark.parametrize("seed", SEEDS)
def test_fsx_backing(tmp_path, seed):
    _run(tmp_path, seed, compress=False, cluster=4096, backing=True, nops=300)


@pytest.mark.slow
@pytest.mark.parametrize("seed", range(100, 110))
def test_fsx_long(tmp_path, seed):
    _run(
        tmp_path,
        seed,
        compress=seed % 2 == 0,
        cluster=4096 << (seed % 3),
        backing=seed % 3 == 0,
        nops=1500,
    )


@pytest.mark.parametrize("seed", SEEDS)
def test_fsx_tiny_l2_cache(tmp_path, seed):
    _run(tmp_path, seed, compress=False, cluster=4096, backing=True, nops=300, l2_limit=2)
