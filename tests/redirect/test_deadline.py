"""A slow or stalled server is cut off in bounded time (issue 8, item 7): every HTTP fetch has an
overall deadline (grace + received / min_rate) on top of the per-operation socket timeout, its
retries stay inside it, the error names the object and the server, and nothing is half-stored.
The servers are real: tools/lying_http.py (plain and TLS) and nginx's 2 MB/s limit_rate."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time

import pytest

from tools.lying_http import LyingServer
from vfs.errors import RemoteTimeout, RemoteUnavailable
from vfs.redirect import LocalStore, Resolver, open_remote
from vfs.redirect.file_remote import FileRemote
from vfs.redirect.http_remote import DEFAULT_GRACE, DEFAULT_MIN_RATE, DEFAULT_TIMEOUT

pytestmark = pytest.mark.network


@pytest.fixture
def repo(tmp_path):
    return FileRemote(tmp_path / "repo", create=True)


@pytest.fixture(params=["http", "https"])
def lying(request, repo):
    if request.param == "https":
        nginx = request.getfixturevalue("nginx")  # its throw-away CA and server certificate
        srv = LyingServer(repo.root, cert=str(nginx.pki / "server.pem"),
                          key=str(nginx.pki / "server.key"))  # fmt: skip
        srv.ca = nginx.ca
    else:
        srv = LyingServer(repo.root)
        srv.ca = None
    with srv:
        yield srv


@pytest.fixture
def store(tmp_path):
    with LocalStore(tmp_path / "store") as s:
        yield s


def remote(lying, **kw):
    kw.setdefault("backoff", 0.05)
    return open_remote(lying.url, ca=lying.ca, **kw)


def nothing_stored(store: LocalStore) -> bool:
    return store.list() == [] and list((store.root / "tmp").iterdir()) == []


def timed_fetch(r, store, oid, size):
    t0 = time.monotonic()
    with pytest.raises(RemoteTimeout) as info:
        Resolver(store, r).ensure(oid, expected_size=size)
    return time.monotonic() - t0, str(info.value)


def test_defaults_are_documented_numbers():
    assert (DEFAULT_TIMEOUT, DEFAULT_GRACE, DEFAULT_MIN_RATE) == (10.0, 20.0, 16384)


def test_drip_is_cut_off_at_the_deadline(repo, lying, store):
    oid = repo.put(os.urandom(2000))
    lying.lie("/objects/", drip=0.1)  # one byte per 0.1 s: never trips a 5 s socket timeout
    with remote(lying, timeout=5, retries=3, grace=1.5, min_rate=1024) as r:
        dt, msg = timed_fetch(r, store, oid, 2000)
    assert 1.4 < dt < 3.5, dt
    assert f"object {oid} from {lying.url}: cut off after" in msg
    assert "--min-rate, --grace" in msg and "\n" not in msg
    assert nothing_stored(store)
    objects = [p for _, p, _ in lying.requests if p.startswith("/objects/")]
    assert len(objects) == 1  # no retry can start once the deadline has passed


@pytest.mark.parametrize(
    "how",
    [dict(stall=True), dict(header_drip=0.1), dict(continues=True, header_drip=0.01)],
    ids=["stall-after-headers", "header-drip", "endless-100-continue"],
)
def test_stalls_end_at_the_deadline_not_the_socket_timeout(repo, lying, store, how):
    """With a 30 s socket timeout, only the deadline can end these in about a second: a
    stall after the headers, headers dripped a byte at a time, 100 Continue forever."""
    oid = repo.put(b"x" * 100)
    lying.lie("/objects/", **how)
    with remote(lying, timeout=30, retries=0, grace=1.0) as r:
        dt, msg = timed_fetch(r, store, oid, 100)
    assert 0.9 < dt < 3.0, dt
    assert oid in msg and lying.url in msg
    assert nothing_stored(store)


@pytest.mark.log_warnings
def test_retries_stay_inside_the_deadline(repo, lying, store):
    """Each attempt times out after 0.4 s and is retried, 20 times allowed, backoff doubling:
    without an overall deadline this would run for hours (0.05 s * 2**19); it ends at 2 s."""
    oid = repo.put(b"x" * 100)
    lying.lie("/objects/", stall=True)
    with remote(lying, timeout=0.4, retries=20, grace=2.0) as r:
        dt, msg = timed_fetch(r, store, oid, 100)
    assert 1.9 < dt < 3.5, dt
    attempts = sum(p.startswith("/objects/") for _, p, _ in lying.requests)
    assert 2 <= attempts <= 6, attempts
    assert nothing_stored(store)


def test_metadata_fetch_has_a_deadline_too(repo, lying):
    lying.lie("/vfs-repo.json", drip=0.2)
    t0 = time.monotonic()
    with remote(lying, timeout=5, grace=1.0) as r, pytest.raises(RemoteTimeout) as info:
        r.list_refs()
    assert time.monotonic() - t0 < 3.0
    assert f"{lying.url}/vfs-repo.json: cut off" in str(info.value)


def test_without_a_floor_a_slow_fetch_completes(repo, lying, store):
    oid = repo.put(b"12345")
    lying.lie("/objects/", drip=0.15)
    with remote(lying, timeout=5, grace=0.1, min_rate=0) as r:
        assert Resolver(store, r).read(oid, 0, 5, expected_size=5) == b"12345"


def test_forty_stalled_fetches_all_end_in_bounded_time(repo, lying, tmp_path):
    """The daemon's worker pool gets its threads back: forty fetches of forty objects from a
    server that stalls every one end together at the deadline."""
    oids = [repo.put(b"%d" % i) for i in range(40)]
    lying.lie("/objects/", stall=True)
    errors: list[BaseException] = []
    with LocalStore(tmp_path / "s") as s, remote(lying, timeout=30, retries=2, grace=1.5) as r:
        res = Resolver(s, r)

        def fetch(oid: str) -> None:
            try:
                res.ensure(oid, expected_size=len(repo.get(oid)))
            except BaseException as e:
                errors.append(e)

        t0 = time.monotonic()
        threads = [threading.Thread(target=fetch, args=(o,)) for o in oids]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=30)
        dt = time.monotonic() - t0
        assert nothing_stored(s)
    assert len(errors) == 40 and all(isinstance(e, RemoteTimeout) for e in errors), errors[:3]
    assert dt < 6.0, dt


def test_the_floor_against_a_real_rate_limited_nginx(nginx, nginx_repo, tmp_path):
    path, name = nginx_repo
    data = os.urandom(3 << 20)  # 1.5 s at the slow server's 2 MB/s
    oid = FileRemote(path).put(data)
    url = nginx.url(name, "slow")
    with LocalStore(tmp_path / "a") as s, open_remote(url, grace=0.5, min_rate=512 << 10) as r:
        assert Resolver(s, r).read(oid, 0, 10, expected_size=len(data)) == data[:10]
    with LocalStore(tmp_path / "b") as s, open_remote(url, grace=0.5, min_rate=8 << 20) as r:
        t0 = time.monotonic()
        with pytest.raises(RemoteTimeout, match="at least 8192 KiB/s"):
            Resolver(s, r).ensure(oid, expected_size=len(data))
        assert time.monotonic() - t0 < 1.4  # cut at ~0.6 s, long before the 1.5 s transfer
        assert nothing_stored(s)


def test_connect_timeout_to_a_silent_port_is_bounded(store):
    """A listening socket that never accepts (backlog full) or answers: the per-operation
    timeout ends each attempt, the deadline the whole fetch."""
    import socket

    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(0)
        port = listener.getsockname()[1]
        t0 = time.monotonic()
        with (
            open_remote(f"http://127.0.0.1:{port}", timeout=0.5, retries=50, grace=1.5) as r,
            pytest.raises(RemoteUnavailable),
        ):
            r.list_refs()
        assert time.monotonic() - t0 < 3.5


# --------------------------------------------------------------------------- the real CLI


def vfsd(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", "from vfs.cli.vfsd import main; main()", *args],
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.mark.parametrize("lying", ["http"], indirect=True)
def test_repo_get_with_timeout_and_no_retries_ends_in_bounded_time(repo, lying, tmp_path):
    """The issue's reproduction (`vfsd repo get --timeout 5 --retries 0` still running at
    45 s against a one-byte-per-second drip), now with --grace 3: exit 7 at ~3 s."""
    oid = repo.put(os.urandom(1000))
    lying.lie("/objects/", drip=1.0)
    store = tmp_path / "store"
    t0 = time.monotonic()
    r = vfsd("repo", "get", "--repo", lying.url, "--store", str(store), "--timeout", "5",
             "--retries", "0", "--grace", "3", "--min-rate", "1k", oid)  # fmt: skip
    dt = time.monotonic() - t0
    assert r.returncode == 7, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in r.stderr
    assert f"object {oid} from {lying.url}: cut off after 3." in lines[0]
    assert dt < 3 + 5, dt  # process start-up included; the drip alone would take 1000 s
    assert list((store / "objects").rglob("*")) == [] or all(
        p.is_dir() for p in (store / "objects").rglob("*")
    )
    assert list((store / "tmp").iterdir()) == []


@pytest.mark.parametrize("lying", ["http"], indirect=True)
@pytest.mark.parametrize(
    "flag, value, words",
    [
        ("--min-rate", "lots", "invalid size"),
        ("--grace", "-1", "-1"),
        ("--timeout", "0", "0"),
        ("--retries", "-2", "-2"),
    ],  # fmt: skip
)
def test_bad_deadline_flags_are_one_line_errors(lying, tmp_path, flag, value, words):
    r = vfsd("repo", "ls", "--repo", lying.url, flag, value)
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in r.stderr and words in lines[0], r.stderr
