"""`vfsd store` / `vfsd repo`: outputs, exit codes, one-line errors (run as real processes)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest


def vfsd(*args: str, env_root=None) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    if env_root is not None:
        env["VFS_ROOT"] = str(env_root)
    return subprocess.run(
        [sys.executable, "-c", "from vfs.cli.vfsd import main; main()", *args],
        capture_output=True,
        text=True,
        env=env,
    )


def assert_one_line_error(r: subprocess.CompletedProcess, code: int, text: str) -> None:
    assert r.returncode == code, (r.returncode, r.stderr)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in r.stderr, r.stderr
    assert text in lines[0]


@pytest.fixture
def repo(tmp_path):
    r = vfsd("repo", "init", str(tmp_path / "repo"))
    assert r.returncode == 0, r.stderr
    return tmp_path / "repo"


def test_put_get_stats_verify_gc(tmp_path, repo):
    f = tmp_path / "data"
    f.write_bytes(os.urandom(300_000))
    r = vfsd("repo", "put", "--repo", str(repo), "--ref", "blob", str(f), "--json")
    assert r.returncode == 0, r.stderr
    oid = json.loads(r.stdout)[0]["id"]
    store = tmp_path / "store"
    out = tmp_path / "out"
    r = vfsd("repo", "get", "--repo", f"file://{repo}", "--store", str(store), "blob",
             "-o", str(out), "--json")  # fmt: skip
    assert r.returncode == 0, r.stderr
    info = json.loads(r.stdout)
    assert info["id"] == oid and info["redirection"].startswith("second")
    assert out.read_bytes() == f.read_bytes()
    r = vfsd("repo", "get", "--repo", str(repo), "--store", str(store), oid, "--json")
    assert json.loads(r.stdout)["redirection"].startswith("first")
    st = json.loads(vfsd("store", "stats", "--store", str(store), "--json").stdout)
    assert st["objects"] == 1 and st["logical_bytes"] == 300_000
    assert vfsd("store", "verify", "--store", str(store)).returncode == 0
    r = vfsd("store", "gc", "--store", str(store), "--json")
    assert json.loads(r.stdout)["removed"] == 1
    refs = json.loads(vfsd("repo", "ls", "--repo", str(repo), "--json").stdout)
    assert refs == {"blob": oid}


def test_verify_reports_damage_with_exit_5(tmp_path):
    store = tmp_path / "store"
    f = tmp_path / "x"
    f.write_bytes(b"y" * 100_000)
    oid = vfsd("store", "put", "--store", str(store), str(f)).stdout.split()[0]
    p = store / "objects" / oid[:2] / oid
    os.chmod(p, 0o644)
    with open(p, "r+b") as fh:
        fh.write(b"X")
    r = vfsd("store", "verify", "--store", str(store))
    assert r.returncode == 5 and f"damaged: {oid}" in r.stdout
    assert vfsd("store", "verify", "--store", str(store), "--repair").returncode == 0
    assert vfsd("store", "verify", "--store", str(store)).returncode == 0


def test_bad_input_is_one_line_and_nonzero(tmp_path, repo):
    assert_one_line_error(
        vfsd("repo", "get", "--repo", str(tmp_path / "nope"), "x"), 4, "not a vfs repository"
    )
    assert_one_line_error(
        vfsd("repo", "get", "--repo", str(repo), "--store", str(tmp_path / "s"), "../etc"),
        2,
        "invalid ref name",
    )
    assert_one_line_error(
        vfsd("repo", "get", "--repo", str(repo), "--store", str(tmp_path / "s"), "a" * 64),
        4,
        "not in repository",
    )
    assert_one_line_error(
        vfsd("repo", "get", "--repo", "gopher://x/y", "a" * 64), 2, "unsupported repository"
    )
    assert_one_line_error(
        vfsd("store", "stats", "--store", str(tmp_path / "none")), 2, "no store here"
    )
    assert_one_line_error(
        vfsd("store", "init", "--store", str(tmp_path / "s2"), "--quota", "lots"), 2,
        "invalid size",
    )  # fmt: skip
    r = vfsd("store", "frobnicate")
    assert r.returncode == 2 and "No such command" in r.stderr


def test_repo_get_size_bounds(tmp_path, repo):
    f = tmp_path / "eleven"
    f.write_bytes(b"hello world")
    oid = vfsd("repo", "put", "--repo", str(repo), str(f)).stdout.split()[0]
    store = str(tmp_path / "store")
    assert_one_line_error(
        vfsd("repo", "get", "--repo", str(repo), "--store", store, "--size", "5", oid),
        5,
        "11 bytes where 5 were expected",
    )
    assert_one_line_error(
        vfsd("repo", "get", "--repo", str(repo), "--store", store, "--max-size", "5", oid),
        5,
        "more than the expected 5 bytes",
    )
    r = vfsd("repo", "get", "--repo", str(repo), "--store", store, "--size", "11", oid, "--json")
    assert r.returncode == 0 and json.loads(r.stdout)["size"] == 11, r.stderr
