"""A remote image (its clusters pushed to a repository) served on "another host" (a fresh
store, a metadata-only template): clusters come on demand, only the ones read; hydration fills
the rest in the background; a restart keeps what was fetched."""

from __future__ import annotations

import json
import os
import shutil
import sys

import pytest

from tests.export.conftest import need, run
from vfs.export import NbdClient

VIMG = [sys.executable, "-c", "from vfs.cli.vimg import main; main()"]
VFSD = [sys.executable, "-c", "from vfs.cli.vfsd import main; main()"]
MiB = 1 << 20


@pytest.fixture
def remote_image(tmp_path):
    """(template path on the new host, repository url, its store dir, the original's data)."""
    raw = tmp_path / "src.raw"  # distinct clusters (identical ones would be one object)
    with open(raw, "wb") as f:
        f.truncate(64 * MiB)
        f.write(os.urandom(4 * MiB))
        f.seek(32 * MiB)
        f.write(os.urandom(2 * MiB))
    src = tmp_path / "src.vimg"
    run(*VIMG, "convert", "-O", "vimg", str(raw), str(src))
    repo = f"file://{tmp_path / 'repo'}"
    run(*VIMG, "push", "-q", "--repo", repo, "--store", str(tmp_path / "store-a"),
        "--ref", "golden", str(src))  # fmt: skip
    host_b = tmp_path / "host-b"
    host_b.mkdir()
    tmpl = host_b / "disk.vimg"
    run(*VIMG, "pull", "--ref", "golden", "--repo", repo, "--lazy", str(tmpl))
    assert tmpl.stat().st_size < 1 * MiB  # metadata only: no data on host b
    return tmpl, repo, host_b / "store", raw.read_bytes()


@pytest.mark.qemu
def test_convert_fetches_only_what_it_reads_then_hydrate(exports, remote_image, tmp_path):
    need("qemu-img", "qemu-io")
    tmpl, repo, store, data = remote_image
    e = exports.start(tmpl, "--store", str(store), "--repo", repo)
    # a partial read fetches just its clusters
    run("qemu-io", "-f", "raw", "-c", "read 1M 256k", e.uri)
    st = e.control.status()
    assert st["fetched_bytes"] == 256 << 10 and st["fetched_objects"] == 4
    # a whole convert reads only the allocated 6 MiB (holes come from block status)
    out = tmp_path / "copy.qcow2"
    run("qemu-img", "convert", "-f", "raw", "-O", "qcow2", e.uri, str(out))
    st = e.control.status()
    print(f"fetched {st['fetched_bytes']} bytes of a {st['size']}-byte image")
    assert st["fetched_bytes"] == 6 * MiB
    raw = tmp_path / "copy.raw"
    run("qemu-img", "convert", "-f", "qcow2", "-O", "raw", str(out), str(raw))
    assert raw.read_bytes() == data
    # hydrate in the background while serving: every cluster becomes local
    r = run(*VFSD, "export", "hydrate", str(e.ctl), "--wait", "--json")
    h = json.loads(r.stdout)
    assert h["state"] == "done" and h["done"] == h["total"] == 96
    assert e.stop() == 0
    # local now: served with neither the store nor the repository
    shutil.rmtree(store)
    e2 = exports.start(tmpl, "--store", str(tmp_path / "empty-store"), name="disk")
    with NbdClient(e2.sock, "disk") as c:
        assert c.pread(0, 32 * MiB) + c.pread(32 * MiB, 32 * MiB) == data
    assert e2.control.status()["fetched_bytes"] == 0


def test_restart_keeps_what_was_fetched(exports, remote_image, tmp_path):
    tmpl, repo, store, data = remote_image
    e = exports.start(tmpl, "--store", str(store), "--repo", repo)
    with NbdClient(e.sock, "disk") as c:
        assert c.pread(32 * MiB, MiB) == data[32 * MiB : 33 * MiB]
        c.cache(0, 2 * MiB)  # NBD CACHE: prefetch into the store
    assert e.control.status()["fetched_bytes"] == 3 * MiB
    e.stop(sig=9)
    # the repository is gone; what was fetched is in the store and still served
    gone = f"file://{tmp_path / 'nowhere'}"
    e2 = exports.start(tmpl, "--store", str(store), "--repo", gone, name="disk")
    with NbdClient(e2.sock, "disk") as c:
        assert c.pread(32 * MiB, MiB) == data[32 * MiB : 33 * MiB]
        assert c.pread(0, 2 * MiB) == data[: 2 * MiB]
        from vfs.export import NbdError

        with pytest.raises(NbdError) as err:
            c.pread(3 * MiB, 4096)  # never fetched, no repository: an error, not zeros
        assert err.value.error == 5
    assert e2.control.ping()


def test_remote_image_over_mutual_tls(exports, nginx, tmp_path):
    """The repository options of an export are those of every command (--ca, --cert, --key,
    deadlines): a remote image behind HTTPS with client certificates is served on demand, and
    the same export without a client certificate serves an error, never zeros."""
    from tests.export.conftest import lazy_copy_over_mtls, make_image
    from vfs.export import NbdError

    src = make_image(tmp_path / "src.vimg", "8M", "write -P 7 0 1M", "write -P 8 4M 64k")
    tmpl, url, tls = lazy_copy_over_mtls(nginx, src, tmp_path)
    e = exports.start(tmpl, "--store", str(tmp_path / "store-b"), "--repo", url, *tls,
                      "--timeout", "5", "--retries", "1", "--min-rate", "64K")  # fmt: skip
    with NbdClient(e.sock, "disk") as c:
        assert c.pread(4 * MiB, 64 << 10) == b"\x08" * (64 << 10)
    assert e.control.status()["fetched_bytes"] == 64 << 10
    assert e.stop() == 0
    e2 = exports.start(tmpl, "--store", str(tmp_path / "store-c"), "--repo", url,
                       "--ca", nginx.ca, "--retries", "0", name="nocert")  # fmt: skip
    with NbdClient(e2.sock, "nocert") as c:
        with pytest.raises(NbdError) as err:
            c.pread(0, 4096)
        assert err.value.error == 5
