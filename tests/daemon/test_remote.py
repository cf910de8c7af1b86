"""Second redirection through the daemon: a slow HTTP fetch never stalls the other VEEs."""

from __future__ import annotations

import hashlib
import os
import threading
import time

import pytest

from tests.daemon.conftest import Daemon, fuse_available, vfsd, wait_for
from vfs.redirect import LocalStore
from vfs.tree.view import FETCH_THREADS

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


class _StallingRepo:
    """A static HTTP server over a repository directory that never answers object GETs (it
    holds each connection open, sending nothing): a stalled mirror."""

    def __init__(self, root: os.PathLike[str]) -> None:
        import http.server
        import socketserver

        self.release = threading.Event()
        self.stalled = 0
        release = self.release
        directory = os.fspath(root)
        outer = self

        class Handler(http.server.SimpleHTTPRequestHandler):
            def __init__(self, *a, **kw):  # type: ignore[no-untyped-def]
                super().__init__(*a, directory=directory, **kw)

            def do_GET(self) -> None:  # noqa: N802 - http.server's name
                if self.path.startswith("/objects/"):
                    outer.stalled += 1
                    release.wait(120)  # stall: headers never come
                    return
                super().do_GET()

            def log_message(self, *args) -> None:  # type: ignore[no-untyped-def]
                pass

        class Server(socketserver.ThreadingMixIn, http.server.HTTPServer):
            daemon_threads = True
            allow_reuse_address = True

        self.server = Server(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.release.set()
        self.server.shutdown()
        self.server.server_close()


def test_stalled_fetches_do_not_starve_copy_ups_of_other_vees(tmp_path):
    """50 VEE reads waiting on a mirror that stalls must leave threads for another VEE's
    copy-up and fsync of local files (they waited 23-25 s for the worker pool)."""
    reason = fuse_available()
    if reason:
        pytest.skip(reason)
    d = Daemon(
        tmp_path, tmp_path / "state", tmp_path / "mnt", tmp_path / "store", tmp_path / "repo"
    )
    d.mnt.mkdir()
    vfsd("repo", "init", str(d.repo))
    src = tmp_path / "src"
    (src / "cold").mkdir(parents=True)
    for i in range(50):
        (src / "cold" / f"f{i}").write_bytes(os.urandom(1000) + b"%d" % i)
    (src / "local").write_bytes(b"local file\n")
    digest = d.publish(src, "t")
    store = LocalStore(d.store)  # the cold files are not local: they must come from the mirror
    try:
        for i in range(50):
            data = (src / "cold" / f"f{i}").read_bytes()
            store.delete(hashlib.sha256(data).hexdigest())
    finally:
        store.close()
    mirror = _StallingRepo(d.repo)
    d.remote_url = mirror.url
    d.start()
    threads = []
    try:
        d.vee("add", "a", "--template", digest)
        d.vee("add", "b", "--template", digest)
        for i in range(50):
            t = threading.Thread(
                target=lambda i=i: _swallow(lambda: (d.mnt / "a" / "cold" / f"f{i}").read_bytes()),
                daemon=True,
            )
            t.start()
            threads.append(t)
        # the fetches hold their threads, stalled at the mirror
        wait_for(lambda: mirror.stalled >= FETCH_THREADS, what="stalled fetches", proc=d.proc)
        t0 = time.monotonic()
        with open(d.mnt / "b" / "local", "ab") as f:  # copy-up + fsync in another VEE
            f.write(b"appended\n")
            f.flush()
            os.fsync(f.fileno())
        took = time.monotonic() - t0
        assert (d.mnt / "b" / "local").read_bytes() == b"local file\nappended\n"
        assert took < 5.0, f"copy-up of a local file waited {took:.1f} s behind stalled fetches"
    finally:
        mirror.close()
        for t in threads:
            t.join(timeout=60)
        d.stop()


def _swallow(fn) -> None:  # type: ignore[no-untyped-def]
    try:
        fn()
    except OSError:
        pass
