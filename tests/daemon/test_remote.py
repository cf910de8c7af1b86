"""Second redirection through the daemon: a slow HTTP fetch never stalls the other VEEs."""

from __future__ import annotations

import os
import threading
import time

import pytest

from tests.daemon.conftest import Daemon, fuse_available

pytestmark = [pytest.mark.fuse, pytest.mark.network]


def test_cold_fetch_does_not_block_other_vees(tmp_path, nginx, nginx_repo):
    reason = fuse_available()
    if reason:
        pytest.skip(reason)
    repo_dir, name = nginx_repo
    d = Daemon(tmp_path, tmp_path / "state", tmp_path / "mnt", tmp_path / "store", repo_dir)
    d.remote_url = nginx.url(name, "slow")  # 2 MB/s
    d.mnt.mkdir()
    src = tmp_path / "src"
    src.mkdir()
    payload = os.urandom(3 << 20)  # ~1.5 s at 2 MB/s
    (src / "cold").write_bytes(payload)
    (src / "small").write_bytes(b"small file\n")
    digest = d.publish(src, "t", to_store=False)  # the host store has nothing yet
    d.start()
    try:
        d.vee("add", "a", "--template", digest)
        d.vee("add", "b", "--template", digest)
        done = threading.Event()
        result: dict[str, bytes] = {}

        def cold_reader() -> None:
            result["a"] = (d.mnt / "a" / "cold").read_bytes()
            done.set()

        t = threading.Thread(target=cold_reader)
        t0 = time.monotonic()
        t.start()
        # while a's fetch is running, b is served: lookups, listings, small reads
        latencies = []
        while not done.is_set() and time.monotonic() - t0 < 60:
            s = time.monotonic()
            os.listdir(d.mnt / "b")
            os.stat(d.mnt / "b" / "small")
            latencies.append(time.monotonic() - s)
            time.sleep(0.02)
        t.join(timeout=60)
        fetch_time = time.monotonic() - t0
        assert result["a"] == payload
        assert fetch_time > 0.8, "the fetch was not slow: the test proves nothing"
        assert len(latencies) >= 10 and max(latencies) < 0.5, latencies
        # now local (first redirection): the small file comes from the store
        assert (d.mnt / "b" / "small").read_bytes() == b"small file\n"
    finally:
        d.stop()
    assert "Traceback" not in d.log_text(), d.log_text()


def test_templates_served_from_a_mutual_tls_repository(tmp_path, nginx, nginx_repo):
    reason = fuse_available()
    if reason:
        pytest.skip(reason)
    repo_dir, name = nginx_repo
    d = Daemon(tmp_path, tmp_path / "state", tmp_path / "mnt", tmp_path / "store", repo_dir)
    d.remote_url = nginx.url(name, "mtls")
    d.extra_args = ["--ca", nginx.ca, "--cert", nginx.client_cert, "--key", nginx.client_key]
    d.mnt.mkdir()
    src = tmp_path / "src"
    (src / "etc").mkdir(parents=True)
    (src / "etc" / "motd").write_bytes(b"served over mutual TLS\n")
    d.publish(src, "secure", to_store=False)
    d.start()
    try:
        d.vee("add", "v", "--template", "secure")  # the name is resolved over https too
        assert (d.mnt / "v" / "etc" / "motd").read_bytes() == b"served over mutual TLS\n"
    finally:
        d.stop()
    assert "Traceback" not in d.log_text(), d.log_text()
