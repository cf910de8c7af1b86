"""HTTP(S) repositories against a real nginx on 127.0.0.1 (and a deliberately flaky server)."""

from __future__ import annotations

import http.server
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from vfs.errors import IntegrityError, ObjectNotFound, RemoteError, RemoteUnavailable, UsageError
from vfs.redirect import LocalStore, Resolver, open_remote
from vfs.redirect.file_remote import FileRemote

pytestmark = pytest.mark.network


def publish(nginx_repo, data: bytes) -> tuple[str, str]:
    path, name = nginx_repo
    return FileRemote(path).put(data), name


@pytest.fixture
def store(tmp_path):
    with LocalStore(tmp_path / "store") as s:
        yield s


def test_fetch_over_http_keepalive_and_refs(nginx, nginx_repo, store):
    path, name = nginx_repo
    fr = FileRemote(path)
    blobs = [os.urandom(70_000 + i) for i in range(5)]
    oids = [fr.put(b) for b in blobs]
    fr.set_ref("current", oids[0])
    with open_remote(nginx.url(name)) as r:
        assert r.list_refs() == {"current": oids[0]}
        assert r.get_ref("current") == oids[0]
        assert r.has(oids[1]) and not r.has("3" * 64)
        res = Resolver(store, r)
        for oid, data in zip(oids, blobs, strict=True):
            assert res.read(oid, 1000, 5000) == data[1000:6000]
        assert res.fetches == 5
        assert len(r._pool) == 1  # one keep-alive connection served everything


def test_https_with_ca_and_mutual_tls(nginx, nginx_repo, store):
    data = os.urandom(50_000)
    oid, name = publish(nginx_repo, data)
    with open_remote(nginx.url(name, "https"), ca=nginx.ca) as r:
        assert r.get(oid) == data
    with open_remote(
        nginx.url(name, "mtls"), ca=nginx.ca, cert=nginx.client_cert, key=nginx.client_key
    ) as r:
        assert Resolver(store, r).get(oid) == data


def test_tls_refusals_are_clear_errors(nginx, nginx_repo):
    oid, name = publish(nginx_repo, b"secret")
    with (
        open_remote(nginx.url(name, "https"), retries=0) as r,
        pytest.raises(RemoteError, match="certificate verification failed"),
    ):
        r.get(oid)  # server certificate from a CA we were not told to trust
    with (
        open_remote(nginx.url(name, "mtls"), ca=nginx.ca, retries=0) as r,
        pytest.raises(RemoteError, match="HTTP 400"),
    ):
        r.get(oid)  # no client certificate
    pki = nginx.pki
    with (
        open_remote(
            nginx.url(name, "mtls"),
            ca=nginx.ca,
            cert=str(pki / "rogue-client.pem"),
            key=str(pki / "rogue-client.key"),
            retries=0,
        ) as r,
        pytest.raises(RemoteError),
    ):
        r.get(oid)  # client certificate from an untrusted CA


def test_corrupt_object_on_server_is_refused(nginx, nginx_repo, store):
    path, name = nginx_repo
    oid = FileRemote(path).put(b"original" * 10_000)
    (path / "objects" / oid[:2] / oid).write_bytes(b"tampered" * 10_000)
    with open_remote(nginx.url(name)) as r, pytest.raises(IntegrityError, match=oid):
        Resolver(store, r).ensure(oid)
    assert not store.has(oid) and store.stats().objects == 0


def test_missing_object_is_not_retried(nginx, nginx_repo, store):
    _, name = nginx_repo
    with open_remote(nginx.url(name), retries=3, backoff=5) as r:
        t0 = time.monotonic()
        with pytest.raises(ObjectNotFound):
            Resolver(store, r).ensure("4" * 64)
        assert time.monotonic() - t0 < 2


def test_unreachable_remote_fails_after_bounded_retries(store):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again: nothing listens there
    with open_remote(f"http://127.0.0.1:{port}/repo", retries=3, backoff=0.05) as r:
        t0 = time.monotonic()
        with pytest.raises(RemoteUnavailable, match="after 4 attempts"):
            Resolver(store, r).ensure("5" * 64)
        assert time.monotonic() - t0 < 5


class _Flaky(http.server.SimpleHTTPRequestHandler):
    """Serves a directory but cuts the first object response half-way (honours Range after)."""

    cut_once: dict = {}

    def log_message(self, *args):
        pass

    def do_GET(self):
        if "/objects/" not in self.path:
            return super().do_GET()
        path = self.translate_path(self.path)
        data = Path(path).read_bytes()
        rng = self.headers.get("Range")
        start = int(rng.split("=")[1].rstrip("-")) if rng else 0
        self.send_response(206 if rng else 200)
        self.send_header("Content-Length", str(len(data) - start))
        if rng:
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        self.end_headers()
        if not self.cut_once.get(self.path):
            self.cut_once[self.path] = True
            self.wfile.write(data[start : start + len(data) // 2])
            self.wfile.flush()
            self.connection.shutdown(socket.SHUT_RDWR)
            self.close_connection = True
            return
        self.wfile.write(data[start:])


@pytest.mark.log_warnings
def test_cut_transfer_is_resumed_with_range(tmp_path, store):
    repo = tmp_path / "repo"
    oid = FileRemote(repo, create=True).put(data := os.urandom(3 << 20))

    def handler(*a, **kw):
        return _Flaky(*a, directory=str(repo), **kw)

    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()
    try:
        with open_remote(f"http://127.0.0.1:{srv.server_port}", backoff=0.01) as r:
            res = Resolver(store, r)
            assert res.get(oid) == data
            assert res.fetched_bytes == len(data)  # resumed, not restarted from zero
    finally:
        srv.shutdown()
        srv.server_close()


FETCH = [sys.executable, "-m", "vfs.cli.vfsd", "fetch"]


def _vfsd(*args: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-c", "from vfs.cli.vfsd import main; main()", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )


def test_two_processes_racing_for_one_object_cause_one_fetch(nginx, nginx_repo, tmp_path):
    data = os.urandom(3 << 20)  # ~1.5 s at the slow server's 2 MB/s: the race overlaps
    oid, name = publish(nginx_repo, data)
    store_dir = tmp_path / "shared-store"
    LocalStore(store_dir).close()
    args = ("fetch", "--repo", nginx.url(name, "slow"), "--store", str(store_dir), oid)
    procs = [_vfsd(*args) for _ in range(2)]
    outs = [p.communicate(timeout=60) for p in procs]
    for p, (_, err) in zip(procs, outs, strict=True):
        assert p.returncode == 0, err.decode()
    fetched = sorted(int(out.split()[-1]) for out, _ in outs)
    assert fetched == [0, 1]
    with LocalStore(store_dir) as s:
        assert s.get(oid) == data


def test_killed_fetch_leaves_nothing_half_stored(nginx, nginx_repo, tmp_path):
    data = os.urandom(6 << 20)
    oid, name = publish(nginx_repo, data)
    store_dir = tmp_path / "store"
    LocalStore(store_dir).close()
    args = ("fetch", "--repo", nginx.url(name, "slow"), "--store", str(store_dir), oid)
    p = _vfsd(*args)
    deadline = time.monotonic() + 20
    tmp = store_dir / "tmp"
    while time.monotonic() < deadline:
        files = list(tmp.iterdir())
        if files and files[0].stat().st_size > (1 << 20):
            break
        time.sleep(0.02)
    else:
        pytest.fail("fetch did not start")
    p.send_signal(signal.SIGKILL)
    p.wait()
    assert not (store_dir / "objects" / oid[:2] / oid).exists()
    # The next user recovers (drops the temp file) and fetches the object whole.
    with LocalStore(store_dir) as s:
        assert list(tmp.iterdir()) == []
        assert not s.has(oid)
        with open_remote(nginx.url(name)) as r:
            assert Resolver(s, r).get(oid) == data
        assert s.verify().bad == []


def test_fetch_through_a_caching_forward_proxy(nginx, nginx_repo, tmp_path):
    """CernVM-FS style: hosts fetch through a site proxy; immutable objects are cached there,
    so the origin can even go away for objects the site has seen."""
    path, name = nginx_repo
    data = os.urandom(300_000)
    oid = FileRemote(path).put(data)
    with LocalStore(tmp_path / "host1") as s, open_remote(nginx.url(name), proxy=nginx.proxy) as r:
        assert Resolver(s, r).get(oid) == data
    (path / "objects" / oid[:2] / oid).unlink()  # gone from the origin
    with open_remote(nginx.url(name)) as direct, pytest.raises(ObjectNotFound):
        direct.get(oid)
    with LocalStore(tmp_path / "host2") as s, open_remote(nginx.url(name), proxy=nginx.proxy) as r:
        assert Resolver(s, r).get(oid) == data  # served by the proxy's cache
    cli = _vfsd("repo", "get", "--repo", nginx.url(name), "--proxy", nginx.proxy,
                "--store", str(tmp_path / "host3"), oid)  # fmt: skip
    out, err = cli.communicate(timeout=60)
    assert cli.returncode == 0, err
    with pytest.raises(UsageError, match="proxy"):
        open_remote(str(path), proxy=nginx.proxy)


class _Unavailable(http.server.BaseHTTPRequestHandler):
    """Always 503, counting the requests it got."""

    hits = 0

    def log_message(self, *args):
        pass

    def do_GET(self):
        type(self).hits += 1
        self.send_response(503)
        self.send_header("Content-Length", "0")
        self.end_headers()


class _IgnoresRange(_Flaky):
    """Cuts the first response, then answers a Range request with the whole body (200)."""

    def do_GET(self):
        if "/objects/" in self.path and self.headers.get("Range"):
            del self.headers["Range"]
        return super().do_GET()


def _serve(handler_cls, directory=None):
    def handler(*a, **kw):
        if directory is not None:
            return handler_cls(*a, directory=str(directory), **kw)
        return handler_cls(*a, **kw)

    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    return srv


def test_5xx_is_retried_a_bounded_number_of_times(store):
    srv = _serve(_Unavailable)
    try:
        url = f"http://127.0.0.1:{srv.server_port}"
        with (
            open_remote(url, retries=2, backoff=0.01) as r,
            pytest.raises(RemoteUnavailable, match="after 3 attempts"),
        ):
            Resolver(store, r).ensure("6" * 64)
        assert _Unavailable.hits == 3
    finally:
        srv.shutdown()
        srv.server_close()


@pytest.mark.log_warnings
def test_server_ignoring_range_on_resume_is_an_error_not_a_corrupt_object(tmp_path, store):
    repo = tmp_path / "repo"
    oid = FileRemote(repo, create=True).put(os.urandom(1 << 20))
    _IgnoresRange.cut_once = {}
    srv = _serve(_IgnoresRange, repo)
    try:
        url = f"http://127.0.0.1:{srv.server_port}"
        with open_remote(url, backoff=0.01) as r, pytest.raises(RemoteError, match="ignored Range"):
            Resolver(store, r).ensure(oid)
        assert not store.has(oid) and list((store.root / "tmp").iterdir()) == []
    finally:
        srv.shutdown()
        srv.server_close()
