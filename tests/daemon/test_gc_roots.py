"""Nothing a VEE needs is evicted: `vfsd store gc` and quota eviction against a real `vfsd serve`
(running, and stopped), with and without a repository behind it.

The way it was found (issue 10): a template published into the store, served without --repo;
`vfsd store gc` removed every object and the VEE's files answered ENOENT.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pytest

from tests.daemon.conftest import running_daemon, vfsd
from vfs.redirect import LocalStore

pytestmark = pytest.mark.fuse


def _files(root: Path) -> dict[str, str]:
    """path -> sha256 of every regular file under root (read now, through whatever it is)."""
    out = {}
    for dirpath, _, names in os.walk(root):
        for n in names:
            p = Path(dirpath) / n
            if p.is_file() and not p.is_symlink():
                out[str(p.relative_to(root))] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def _one_line(r, code: int, *words: str) -> None:
    assert r.returncode == code, (r.returncode, r.stderr)
    assert r.stderr.count("\n") == 1 and "Traceback" not in r.stderr, r.stderr
    for w in words:
        assert w in r.stderr, r.stderr


def _store_objects(store: Path) -> set[str]:
    with LocalStore(store, create=False) as s:
        return set(s.list())


@pytest.fixture
def local_daemon(tmp_path: Path):
    """A daemon served from the local store alone (no --repo), one VEE 'a' on the sample tree
    (named by its digest: there is no repository to resolve names)."""
    with running_daemon(tmp_path, vees=("a",), by_digest=True, use_remote=False) as d:
        yield d


def test_store_gc_and_quota_leave_a_local_vee_running_and_stopped(local_daemon, tmp_path):
    d = local_daemon
    want = _files(tmp_path / "src")
    before = _store_objects(d.store)
    roots = json.loads(vfsd("store", "roots", "--store", str(d.store), "--json").stdout)
    assert [(r["kind"], r["path"], r["repo"]) for r in roots] == [("vee-state", str(d.state), None)]
    assert roots[0]["keep_objects"] == len(before) and roots[0]["cache_objects"] == 0

    # an unrelated object is garbage: a plain gc takes it, and nothing else
    junk = tmp_path / "junk"
    junk.write_bytes(os.urandom(4096))
    vfsd("store", "put", "--store", str(d.store), str(junk))
    r = json.loads(vfsd("store", "gc", "--store", str(d.store), "--json").stdout)
    assert r["removed"] == 1 and _store_objects(d.store) == before
    r = json.loads(vfsd("store", "gc", "--store", str(d.store), "--target", "0", "--json").stdout)
    assert r["removed"] == 0 and _store_objects(d.store) == before
    # read for the first time after the gc (nothing in the page cache): every byte is there
    assert _files(d.mnt / "a") == want

    # quota: a store that is full of what the VEE needs refuses a new object, evicts nothing
    usage = json.loads(vfsd("store", "stats", "--store", str(d.store), "--json").stdout)
    vfsd("store", "init", "--store", str(d.store), "--quota", str(usage["stored_bytes"] + 8192))
    big = tmp_path / "big-new"
    big.write_bytes(os.urandom(64 << 10))
    r = vfsd("store", "put", "--store", str(d.store), str(big), check=False)
    _one_line(r, 8, "quota", "gc root")
    assert _store_objects(d.store) == before

    # the daemon stopped: the root is on disk, the same holds
    d.stop()
    r = json.loads(vfsd("store", "gc", "--store", str(d.store), "--target", "0", "--json").stdout)
    assert r["removed"] == 0 and r["roots"] == 1
    _one_line(vfsd("store", "put", "--store", str(d.store), str(big), check=False), 8, "quota")
    assert _store_objects(d.store) == before
    d.start()
    assert _files(d.mnt / "a") == want

    # once no VEE uses the template, its objects are garbage
    d.vee("rm", "a", "--purge")
    r = json.loads(vfsd("store", "gc", "--store", str(d.store), "--target", "0", "--json").stdout)
    assert r["removed"] == len(before) and _store_objects(d.store) == set()


def test_add_refuses_a_template_the_store_does_not_hold_whole(local_daemon, tmp_path):
    """Without a repository nothing can fetch a missing object: refused before any VEE uses it,
    with one line, instead of EIO on a read later."""
    d = local_daemon
    digest = d.templates["base"]
    with LocalStore(d.store) as s:
        victim = hashlib.sha256((tmp_path / "src" / "etc" / "passwd").read_bytes()).hexdigest()
        s.roots.remove("vee-state", d.state)  # (by hand: the daemon's root protects it)
        s.delete(victim)
    r = d.vee("add", "b", "--template", digest, check=False)
    _one_line(r, 4, "not in the local store", "/etc/passwd", "--store")
    assert sorted(os.listdir(d.mnt)) == ["a"]
    assert [v["name"] for v in json.loads(d.vee("list", "--json").stdout)] == ["a"]


def test_with_a_repository_content_is_cache_and_manifests_stay(daemon, tmp_path):
    """Served with --repo, a VEE's content objects are a cache (fetched again on the next
    read); a plain gc keeps them, --target may take them, the manifest is never taken."""
    d = daemon
    digest = d.templates["base"]
    want = _files(tmp_path / "src")
    before = _store_objects(d.store)
    roots = json.loads(vfsd("store", "roots", "--store", str(d.store), "--json").stdout)
    (root,) = roots
    assert root["repo"] and root["keep_objects"] == 1  # the manifest
    assert root["cache_objects"] == len(before) - 1
    r = json.loads(vfsd("store", "gc", "--store", str(d.store), "--json").stdout)
    assert r["removed"] == 0 and _store_objects(d.store) == before
    r = json.loads(vfsd("store", "gc", "--store", str(d.store), "--target", "0", "--json").stdout)
    assert r["removed"] == len(before) - 1 and _store_objects(d.store) == {digest}
    assert _files(d.mnt / "b") == want  # fetched again from the repository
    # the daemon restarts from the kept manifest (a VEE must start also while the repository
    # is slow or down; the manifest is all it needs to appear)
    d.stop()
    d.start()
    assert [v["state"] for v in json.loads(d.vee("list", "--json").stdout)] == ["mounted"] * 2
