"""The vimg command line: verbs, qemu-img compatible output, exit codes, and bad input."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from vfs.cli.vimg import main
from vfs.errors import UsageError
from vfs.image.image import Image

VIMG = str(Path(sys.executable).parent / "vimg")


@pytest.fixture(autouse=True)
def _isolated_root(tmp_path, monkeypatch):
    """Keep the default object store inside the test's directory."""
    monkeypatch.setenv("VFS_ROOT", str(tmp_path / "vfsroot"))


def vimg(*args: str, code: int = 0) -> str:
    r = CliRunner().invoke(main, list(args), catch_exceptions=False)
    assert r.exit_code == code, f"vimg {' '.join(args)} -> {r.exit_code}: {r.output}"
    return r.output


def test_create_info_snapshot_resize(tmp_path):
    a = str(tmp_path / "a.vimg")
    assert "Formatting" in vimg("create", "-s", "10M", a)
    vimg("io", a, "-c", "write -P 0x11 0 64k", "-c", "write -z 1M 64k")
    info = json.loads(vimg("info", "--json", a))
    assert info["virtual-size"] == 10 << 20 and info["cluster-size"] == 65536
    vimg("snapshot", "-c", "first", a)
    vimg("io", a, "-c", "write -P 0x22 0 4k")
    listed = json.loads(vimg("snapshot", "-l", "--json", a))
    assert [s["name"] for s in listed] == ["first"]
    assert "first" in vimg("snapshot", "-l", a)
    vimg("snapshot", "-a", "first", a)
    vimg("io", a, "-c", "read -P 0x11 0 64k")
    vimg("snapshot", "-d", "first", a)
    assert "snapshots" not in json.loads(vimg("info", "--json", a))
    vimg("resize", a, "+2M")
    assert json.loads(vimg("info", "--output=json", a))["virtual-size"] == 12 << 20
    vimg("resize", a, "1M", code=2)  # shrinking needs --shrink
    vimg("resize", "--shrink", a, "1M")
    vimg("io", a, "-c", "read -P 0x11 0 64k")
    assert vimg("check", a).count("No errors") == 1


def test_backing_chain_commit_rebase(tmp_path):
    base = str(tmp_path / "base.vimg")
    top = str(tmp_path / "top.vimg")
    vimg("create", "-s", "4M", base)
    vimg("io", base, "-c", "write -P 0xaa 0 1M")
    vimg("create", "-b", "base.vimg", top)  # relative to the new image, size from backing
    vimg("io", top, "-c", "read -P 0xaa 0 1M", "-c", "write -P 0xbb 512k 4k")
    chain = json.loads(vimg("info", "--json", "--backing-chain", top))
    assert [c["filename"].split("/")[-1] for c in chain] == ["top.vimg", "base.vimg"]
    assert chain[0]["backing-filename"] == "base.vimg"
    m = json.loads(vimg("map", "--json", top))
    assert {d["depth"] for d in m if d["data"]} == {0, 1}
    # rebase (safe) onto nothing: the overlay copies what it read from base
    copy = str(tmp_path / "copy.vimg")
    vimg("convert", "-O", "vimg", top, copy)
    vimg("rebase", "-b", "", top)
    vimg("compare", top, copy)
    assert "backing-filename" not in json.loads(vimg("info", "--json", top))
    # commit: a new overlay's change lands in base, and the overlay is emptied
    top2 = str(tmp_path / "top2.vimg")
    vimg("create", "-b", base, "-F", "vimg", top2)
    vimg("io", top2, "-c", "write -P 0xcc 2M 64k")
    vimg("commit", top2)
    vimg("io", base, "-c", "read -P 0xcc 2M 64k", "-c", "read -P 0xaa 0 4k")
    assert all(d["depth"] == 1 or not d["data"] for d in json.loads(vimg("map", "--json", top2)))
    # unsafe rebase only rewrites the reference
    vimg("rebase", "-u", "-b", "copy.vimg", top2)
    assert json.loads(vimg("info", "--json", top2))["backing-filename"] == "copy.vimg"


def test_check_exit_codes_and_json(tmp_path):
    a = str(tmp_path / "a.vimg")
    vimg("create", "-s", "1M", "-c", "4k", a)
    vimg("io", a, "-c", "write -P 1 0 64k")
    out = json.loads(vimg("check", "--json", a))
    assert out["format"] == "vimg" and out["check-errors"] == 0 and "corruptions" not in out
    with Image.open(a) as img:
        img._core.alloc.alloc()  # leak one cluster
    assert json.loads(vimg("check", "--json", a, code=3))["leaks"] == 1
    out = json.loads(vimg("check", "-r", "leaks", "--json", a))
    assert out["leaks-fixed"] == 1
    vimg("check", a)
    # corruption: damage the L2 table
    with Image.open(a, readonly=True) as img:
        l2 = next(img.roots())[2][0][0]
    with open(a, "r+b") as f:
        f.seek(l2 + 20)
        f.write(b"\xff")
    assert json.loads(vimg("check", "--json", a, code=2))["corruptions"] >= 1
    vimg("verify", a, code=5)
    vimg("check", "-r", "all", a)
    vimg("check", a)
    vimg("verify", a)


def test_measure_and_bench(tmp_path):
    out = json.loads(vimg("measure", "--json", "--size", "1G"))
    assert 0 < out["required"] < out["fully-allocated"]
    a = str(tmp_path / "a.vimg")
    vimg("create", "-s", "8M", a)
    w = vimg("bench", "-w", "-c", "200", "-s", "4k", "-S", "12k", "--pattern", "0xa5", a)
    assert "Sending 200 write requests, 4096 bytes each" in w
    assert "Run completed in" in vimg("bench", "-c", "200", "-s", "64k", a)
    vimg("io", a, "-c", "read -P 0xa5 0 4k")  # bench -w wrote its pattern


def test_push_pull_file_repo(tmp_path):
    a = str(tmp_path / "a.vimg")
    orig = str(tmp_path / "orig.raw")
    repo = tmp_path / "repo"
    vimg("create", "-s", "4M", "-c", "16k", a)
    vimg("io", a, "-c", "write -P 0x31 0 100k", "-c", "write -P 0x32 3M 16k")
    vimg("convert", "-O", "raw", a, orig)
    used = os.stat(a).st_blocks
    assert "pushed 8 clusters" in vimg("push", "-q", a, "--repo", f"file://{repo}")
    assert os.stat(a).st_blocks < used - 8 * 16 * 2  # the pushed clusters were punched out
    info = json.loads(vimg("info", "--json", a))
    assert "remote clusters" in info["format-specific"]["data"]["incompatible-features"]
    assert json.loads(vimg("check", "--json", a))["remote-clusters"] == 8
    m = json.loads(vimg("map", "--json", a))
    assert m[0]["data"] and "offset" not in m[0]
    # without a repository, remote clusters cannot be read: a clear error, not zeros
    r = CliRunner().invoke(main, ["io", a, "-c", "read -P 0x31 0 4k"])
    assert r.exit_code == 4 and "not in local store" in r.output
    store = str(tmp_path / "store")
    vimg("io", "--repo", str(repo), "--store", store, a, "-c", "read -P 0x31 0 100k")
    vimg("verify", "--repo", str(repo), "--store", store, a)
    vimg("compare", "--repo", str(repo), "--store", store, a, orig)
    # a damaged object in the repository is caught (SHA-256 and xxh3), never returned
    objs = [p for p in (repo / "objects").rglob("*") if p.is_file()]
    assert len(objs) == 3  # 100k of 0x31 = 6 clusters, 5 identical full + 1 partial; 1 of 0x32
    assert "hydrated 8 clusters" in vimg("pull", "-q", a, "--repo", str(repo), "--store", store)
    assert "nothing to pull" in vimg("pull", "-q", a)
    assert json.loads(vimg("check", "--json", a))["remote-clusters"] == 0
    vimg("compare", a, orig)


def test_pull_is_resumable(tmp_path):
    """An interrupted pull (here: the repository vanishes half-way) keeps what it committed."""
    from vfs.image.remote import pull, push
    from vfs.redirect import FileRemote, LocalStore, Resolver

    a = str(tmp_path / "a.vimg")
    repo = FileRemote(tmp_path / "repo", create=True)
    with Image.create(a, 1 << 20, cluster_size=4096) as img:
        for i in range(40):
            img.write(i * 4096, bytes([i + 1]) * 4096)
        push(img, repo)
    store = LocalStore(tmp_path / "store")
    calls = {"n": 0}

    class Flaky:
        def get(self, oid, *, expected_size=None):
            calls["n"] += 1
            if calls["n"] > 25:
                raise KeyboardInterrupt  # the process is stopped
            return Resolver(store, repo).get(oid, expected_size=expected_size)

    img = Image.open(a, resolver=Flaky())
    with pytest.raises(KeyboardInterrupt):
        pull(img, batch=10)
    img._core.f.close()  # the process dies: no final flush
    with Image.open(a, resolver=Resolver(store, repo)) as img:
        left = sum(img.entry(i)[0] == 4 for i in range(256))
        assert left == 40 - 20  # two batches of 10 were committed
        assert pull(img) == 20
        assert img.read(0, 40 * 4096) == b"".join(bytes([i + 1]) * 4096 for i in range(40))
    store.close()


def test_template_push_fetch_overlay(tmp_path):
    """Publish an image as a template; another 'host' fetches it (metadata only), reads it
    lazily, layers an overlay on it, then hydrates it."""
    a = str(tmp_path / "a.vimg")
    repo = str(tmp_path / "repo")
    vimg("create", "-s", "8M", "-c", "8k", a)
    vimg("io", a, "-c", "write -P 0x61 0 1M", "-c", "write -P 0x62 6M 100k", "-c", "write -z 7M 8k")
    out = vimg("push", "-q", "--ref", "base-os", a, "--repo", repo)
    assert "published template base-os" in out
    host2 = tmp_path / "host2"
    host2.mkdir()
    t = str(host2 / "base.vimg")
    store = str(host2 / "store")
    vimg("pull", "--ref", "base-os", "--lazy", "--repo", repo, t)
    assert os.path.getsize(t) < 200 << 10  # metadata only
    vimg(
        "io",
        "--repo",
        repo,
        "--store",
        store,
        t,
        "-c",
        "read -P 0x61 0 1M",
        "-c",
        "read -P 0 7M 8k",
    )
    top = str(host2 / "vm.vimg")
    vimg("create", "-b", "base.vimg", top)
    vimg(
        "io",
        "--repo",
        repo,
        "--store",
        store,
        top,
        "-c",
        "write -P 0x63 4k 4k",
        "-c",
        "read -P 0x62 6M 100k",
        "-c",
        "read -P 0x61 0 4k",
        "-c",
        "read -P 0x63 4k 4k",
    )
    vimg("pull", "-q", "--repo", repo, "--store", store, t)
    vimg("io", t, "-c", "read -P 0x61 0 1M")  # no repository needed any more
    vimg("check", t)
    vimg("pull", "--ref", "base-os", "--repo", repo, t, code=4)  # exists
    vimg("pull", "--ref", "../etc", "--repo", repo, str(host2 / "x.vimg"), code=2)
    vimg("pull", "--ref", "nope", "--repo", repo, str(host2 / "y.vimg"), code=4)
    assert not os.path.exists(host2 / "y.vimg")


@pytest.mark.network
def test_remote_clusters_over_http(tmp_path, nginx, nginx_repo):
    repo_dir, name = nginx_repo
    a = str(tmp_path / "a.vimg")
    vimg("create", "-s", "2M", "-c", "8k", a)
    vimg("io", a, "-c", "write -P 0x41 0 64k", "-c", "write -P 0x42 1M 8k")
    vimg("push", "-q", "--ref", "tmpl", a, "--repo", str(repo_dir))
    url = nginx.url(name, "http")
    # the template travels over HTTP too, and reads through it fetch clusters on demand
    t = str(tmp_path / "t.vimg")
    vimg("pull", "--ref", "tmpl", "--lazy", "--repo", url, t)
    vimg("io", "--repo", url, "--store", str(tmp_path / "s0"), t, "-c", "read -P 0x41 0 64k")
    store = str(tmp_path / "store")
    vimg(
        "io",
        "--repo",
        url,
        "--store",
        store,
        a,
        "-c",
        "read -P 0x41 0 64k",
        "-c",
        "read -P 0x42 1M 8k",
    )
    # over mutual TLS: with the client certificate it reads, without it the server refuses
    mtls = nginx.url(name, "mtls")
    tls = ["--ca", nginx.ca, "--cert", nginx.client_cert, "--key", nginx.client_key]
    vimg("io", "--repo", mtls, *tls, "--store", str(tmp_path / "s1"), a, "-c", "read -P 0x41 0 64k")
    r = CliRunner().invoke(
        main,
        [
            "io",
            "--repo",
            mtls,
            "--ca",
            nginx.ca,
            "--store",
            str(tmp_path / "s3"),
            a,
            "-c",
            "read 0 4k",
        ],
    )
    assert r.exit_code == 7 and "Traceback" not in r.output, r.output
    # damage the object for 0x42 on the server; a fresh store must refuse it
    victim = None
    for p in (repo_dir / "objects").rglob("*"):
        if p.is_file() and b"\x42" * 16 in p.read_bytes():
            victim = p
    assert victim is not None  # objects are stored as plain bytes in a file:// repository
    data = bytearray(victim.read_bytes())
    data[-1] ^= 0xFF
    victim.write_bytes(bytes(data))
    r = CliRunner().invoke(
        main, ["io", "--repo", url, "--store", str(tmp_path / "s2"), a, "-c", "read 1M 8k"]
    )
    assert r.exit_code == 5, r.output  # IntegrityError: refused, not returned
    assert "Traceback" not in r.output


BAD = [
    ["create", "x.vimg"],  # no size
    ["create", "-s", "banana", "x.vimg"],
    ["create", "-s", "1000", "x.vimg"],  # not a multiple of 512
    ["create", "-s", "1M", "-c", "3k", "x.vimg"],
    ["create", "-s", "1M", "-b", "missing.vimg", "x.vimg"],
    ["info", "missing.vimg"],
    ["info", "."],
    ["check", "junk.bin"],
    ["map", "missing.vimg"],
    ["io", "good.vimg", "-c", "read -P 0x1 0 4k"],  # pattern mismatch
    ["io", "good.vimg", "-c", "read 0 2M"],  # past the end
    ["io", "good.vimg", "-c", "frobnicate 0 1"],
    ["io", "good.vimg", "-c", "write -P 300 0 1"],
    ["snapshot", "-a", "nope", "good.vimg"],
    ["snapshot", "good.vimg"],
    ["resize", "good.vimg", "1001"],
    ["convert", "-O", "vimg", "missing.raw", "o.vimg"],
    ["convert", "-O", "raw", "-c", "good.vimg", "o.raw"],
    ["compare", "good.vimg", "missing.raw"],
    ["convert", "-O", "raw", "good.vimg", "good.vimg"],
    ["commit", "good.vimg"],  # no backing file
    ["push", "good.vimg", "--repo", "ftp://x/y"],
    ["bench", "-s", "4M", "good.vimg"],
    ["rebase", "-b", "missing.vimg", "good.vimg"],
    ["rebase", "-u", "-b", "good.vimg", "good.vimg"],  # a loop
]


@pytest.mark.parametrize("args", BAD, ids=[" ".join(a) for a in BAD])
def test_bad_input_is_one_line_and_nonzero(tmp_path, args):
    subprocess.run(
        [VIMG, "create", "-s", "1M", "good.vimg"], cwd=tmp_path, check=True, capture_output=True
    )
    (tmp_path / "junk.bin").write_bytes(os.urandom(10000))
    before = (tmp_path / "good.vimg").read_bytes()
    p = subprocess.run(
        [VIMG, *args],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        env={**os.environ, "VFS_ROOT": str(tmp_path / "root")},
    )
    assert p.returncode != 0
    assert "Traceback" not in p.stderr
    lines = [ln for ln in p.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("vimg: error: "), p.stderr
    if args[0] not in ("io",) or "write" not in " ".join(args):
        assert (tmp_path / "good.vimg").read_bytes() == before


def test_backing_moved_away(tmp_path):
    """qemu-img habits: info and snapshot work without the backing file, rebase -u repairs the
    reference, and reading a range that needs the missing file is an error, not zeros."""
    base, top = str(tmp_path / "base.vimg"), str(tmp_path / "top.vimg")
    vimg("create", "-s", "2M", base)
    vimg("io", base, "-c", "write -P 0x71 0 1M")
    vimg("create", "-b", "base.vimg", top)
    vimg("io", top, "-c", "write -P 0x72 1M 64k")
    os.rename(base, tmp_path / "moved.vimg")
    assert json.loads(vimg("info", "--json", top))["backing-filename"] == "base.vimg"
    vimg("snapshot", "-c", "s1", top)
    r = CliRunner().invoke(main, ["io", top, "-c", "read 0 4k"])
    assert r.exit_code == 4 and "not found" in r.output
    from vfs.image.image import Image as _Image

    with _Image.open(top, with_backing=False, readonly=True) as img:
        assert img.read(1 << 20, 4096) == b"\x72" * 4096  # its own data reads fine
        with pytest.raises(UsageError, match="without its backing file"):
            img.read(0, 4096)
    vimg("rebase", "-u", "-b", "moved.vimg", top)
    vimg("io", top, "-c", "read -P 0x71 0 1M", "-c", "read -P 0x72 1M 64k")


VOCAB = [
    "create",
    "info",
    "check",
    "verify",
    "map",
    "convert",
    "compare",
    "measure",
    "commit",
    "rebase",
    "snapshot",
    "resize",
    "bench",
    "io",
    "push",
    "pull",
    "hydrate",
    "-s",
    "-c",
    "-b",
    "-F",
    "-f",
    "-O",
    "-r",
    "-l",
    "-a",
    "-d",
    "-u",
    "-w",
    "-S",
    "-q",
    "--json",
    "--output",
    "--size",
    "--repo",
    "--store",
    "--ref",
    "--lazy",
    "--shrink",
    "--compress",
    "--backing-chain",
    "all",
    "leaks",
    "json",
    "raw",
    "qcow2",
    "vimg",
    "zstd",
    "1M",
    "-1M",
    "+1M",
    "0",
    "4k",
    "0xff",
    "banana",
    "read 0 4k",
    "write -P 1 0 4k",
    "discard 0 1",
    "flush",
    "good.vimg",
    "junk.bin",
    "missing.vimg",
    "out.vimg",
    ".",
    "../x",
    "s1",
]


def test_random_command_lines_never_traceback(tmp_path, monkeypatch):
    """Hypothesis throws random command lines at vimg: every outcome is an exit code."""
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("VFS_ROOT", str(tmp_path / "root"))
    (tmp_path / "junk.bin").write_bytes(os.urandom(9000))

    @settings(
        max_examples=int(os.environ.get("VIMG_FUZZ_EXAMPLES", "150")),
        deadline=None,
        derandomize="VIMG_FUZZ_EXAMPLES" not in os.environ,
        suppress_health_check=list(HealthCheck),
    )
    @given(st.lists(st.sampled_from(VOCAB), min_size=1, max_size=7))
    def run(args):
        if not (tmp_path / "good.vimg").exists():
            Image.create(str(tmp_path / "good.vimg"), 1 << 20).close()
        r = CliRunner().invoke(main, args)
        assert r.exception is None or isinstance(r.exception, SystemExit), (args, r.exception)
        assert "Traceback" not in r.output

    run()


def test_push_with_a_store_registers_the_image_as_a_gc_root(tmp_path):
    """`vimg push --store` keeps a local copy of each cluster and registers the image with the
    store, so `vfsd store gc` leaves its clusters; once the image is retired (the file removed
    and the root forgotten) they go. (The push used to open the image a second time to compute
    the root while holding its write lock: exit 9, "being written by another process".)"""
    from vfs.cli.vfsd import main as vfsd_main

    def vfsd(*args: str) -> str:
        r = CliRunner().invoke(vfsd_main, list(args), prog_name="vfsd")
        assert r.exit_code == 0, r.output
        return r.stdout

    a = tmp_path / "a.vimg"
    repo, store = tmp_path / "repo", str(tmp_path / "store")
    vimg("create", "-s", "4M", "-c", "16k", str(a))
    vimg("io", str(a), "-c", "write -P 0x31 0 32k", "-c", "write -P 0x32 1M 16k")
    assert "pushed 3 clusters" in vimg("push", "-q", str(a), "--repo", str(repo), "--store", store)
    (root,) = json.loads(vfsd("store", "roots", "--store", store, "--json"))
    assert root["kind"] == "vimg" and root["path"] == str(a) and root["cache_objects"] == 2
    assert "removed 0 objects" in vfsd("store", "gc", "--store", store)
    # the image reads from the store alone (no --repo): its clusters are all there
    vimg("io", "--store", store, str(a), "-c", "read -P 0x31 0 32k", "-c", "read -P 0x32 1M 16k")
    a.unlink()
    assert "gc root removed" in vfsd("store", "root", "rm", str(a), "--store", store)
    assert "removed 2 objects" in vfsd("store", "gc", "--store", store)
