"""Random corruption of a template's objects and manifest in the repository, served to a VEE
(issue 8): every outcome is a clean error or the right bytes, never wrong data.

Each round copies a published repository, damages one object file (the manifest or a file's
content: bit flips, truncation, extension, replacement by another object's bytes), and serves it
through a fresh store to a VEE view that reads every file. The seed is printed and replays
(``VFS_CORRUPT_SEED``)."""

from __future__ import annotations

import os
import random
import shutil
from pathlib import Path

import pytest

from tests.daemon.vee_helpers import make_sample_tree, publish
from tests.daemon.view_client import VeeClient
from vfs.errors import VfsError
from vfs.redirect import LocalStore, Resolver
from vfs.redirect.file_remote import FileRemote
from vfs.tree.private import PrivateLayer
from vfs.tree.template import Template
from vfs.tree.view import Views

ROUNDS = int(os.environ.get("VFS_CORRUPT_ROUNDS", 60))


def _files(src: Path) -> dict[str, bytes]:
    out = {}
    for dirpath, _, names in os.walk(src):
        for n in names:
            p = Path(dirpath) / n
            if p.is_file() and not p.is_symlink():
                out[str(p.relative_to(src))] = p.read_bytes()
    return out


def _damage(rng: random.Random, path: Path, others: list[Path]) -> str:
    data = bytearray(path.read_bytes())
    how = rng.choice(["flip", "truncate", "extend", "swap", "zero"])
    if how == "flip" and data:
        for _ in range(rng.randint(1, 4)):
            i = rng.randrange(len(data))
            data[i] ^= 1 << rng.randrange(8)
    elif how == "truncate" and data:
        del data[rng.randrange(len(data)) :]
    elif how == "extend":
        data += rng.randbytes(rng.randint(1, 5000))
    elif how == "swap" and others:
        data = bytearray(rng.choice(others).read_bytes())
    else:
        data = bytearray(len(data))
    path.write_bytes(bytes(data))
    return how


@pytest.mark.slow
@pytest.mark.log_warnings  # every refused object is logged (one line each)
async def test_corrupt_repository_never_serves_wrong_data(tmp_path):
    seed = int(os.environ.get("VFS_CORRUPT_SEED", random.randrange(1 << 32)))
    print(f"corruption seed {seed} (replay: VFS_CORRUPT_SEED={seed})")
    rng = random.Random(seed)
    src = tmp_path / "src"
    make_sample_tree(src)
    pub = publish(src, tmp_path / "pub")
    digest = pub.digest
    pub.close()
    want = _files(src)
    outcomes = {"error": 0, "right": 0}
    for r in range(ROUNDS):
        work = tmp_path / f"r{r}"
        repo = work / "repo"
        shutil.copytree(tmp_path / "pub" / "repo", repo)
        objects = sorted((repo / "objects").rglob("*"))
        objects = [p for p in objects if p.is_file()]
        target = next(p for p in objects if p.name == digest) if r % 4 == 0 else rng.choice(objects)
        _damage(rng, target, [p for p in objects if p != target])
        store = LocalStore(work / "store")
        try:
            resolver = Resolver(store, FileRemote(repo))
            try:
                template = Template.load(resolver, digest)
            except VfsError:
                outcomes["error"] += 1  # a damaged manifest: refused at load
                continue
            views = Views(resolver)
            views.add_vee("v", template, PrivateLayer(work / "layer"))
            client = VeeClient(views, "v")
            for path, data in want.items():
                try:
                    got = await client.read(path)
                except VfsError:
                    outcomes["error"] += 1
                    continue
                assert got == data, f"round {r} (seed {seed}): {path} served wrong bytes"
                outcomes["right"] += 1
            views.close()
        finally:
            store.close()
        shutil.rmtree(work)
    assert outcomes["error"] > 0 and outcomes["right"] > 0, outcomes
