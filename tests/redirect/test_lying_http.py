"""A lying mirror against the redirect layer (tools/lying_http.py, a real server on 127.0.0.1):
sizes it cannot make us exceed (issue 8, items 5 and 6) and protocol lies it cannot make us
believe (wrong Content-Range, 200 to a Range, redirect loops, gzip, huge headers)."""

from __future__ import annotations

import os
import time

import pytest

from tools.lying_http import LyingServer
from vfs.errors import FormatError, IntegrityError, RemoteError, SizeMismatch
from vfs.redirect import LocalStore, Resolver, open_remote
from vfs.redirect.file_remote import FileRemote
from vfs.redirect.resolver import DEFAULT_MAX_UNSIZED

pytestmark = pytest.mark.network

ELEVEN = b"hello world"


@pytest.fixture
def repo(tmp_path):
    return FileRemote(tmp_path / "repo", create=True)


@pytest.fixture
def lying(repo):
    with LyingServer(repo.root) as srv:
        yield srv


@pytest.fixture
def store(tmp_path):
    with LocalStore(tmp_path / "store", quota=64 << 20) as s:
        yield s


def nothing_stored(store: LocalStore, *keep: str) -> bool:
    return sorted(store.list()) == sorted(keep) and list((store.root / "tmp").iterdir()) == []


def obj_path(oid: str) -> str:
    return f"/objects/{oid[:2]}/{oid}"


# --------------------------------------------------------------------------- item 5: sizes

MORE = {
    # 64 MiB more than the 11 bytes, announced truthfully: refused at the headers
    "content-length-says-more": dict(extra=64 << 20, length=11 + (64 << 20)),
    # no Content-Length, the body ends when the server closes: cut off at byte 12
    "close-delimited": dict(extra=64 << 20, length="omit"),
    "chunked": dict(extra=64 << 20, chunked=True),
}


@pytest.mark.parametrize("how", sorted(MORE))
def test_eleven_byte_file_never_fills_a_64_mib_store(repo, lying, store, how):
    oid = repo.put(ELEVEN)
    lying.lie("/objects/", **MORE[how])
    with open_remote(lying.url, retries=2, backoff=0.01) as r:
        res = Resolver(store, r)
        t0 = time.monotonic()
        with pytest.raises(IntegrityError, match=oid) as info:
            res.read(oid, 0, 11, expected_size=11)
        assert time.monotonic() - t0 < 10
    assert "11" in str(info.value)
    assert not isinstance(info.value, SizeMismatch) or how == "content-length-says-more"
    assert nothing_stored(store) and store.usage() == 0
    # The client hung up at once: the server got rid of socket buffers' worth, not 64 MiB.
    assert lying.sent.get(obj_path(oid), 0) < 16 << 20
    # A lie is final: not retried (a retry would be told the same)
    assert sum(p == obj_path(oid) for _, p, _ in lying.requests) == 1


def test_fetch_without_a_size_is_bounded_by_default(repo, lying, store, tmp_path):
    assert DEFAULT_MAX_UNSIZED == 1 << 30
    oid = repo.put(ELEVEN)
    lying.lie("/objects/", extra=8 << 20, length="omit")
    with open_remote(lying.url, retries=0) as r:
        res = Resolver(store, r, max_unsized=1 << 20)
        with pytest.raises(IntegrityError, match="more than the expected 1048576 bytes"):
            res.ensure(oid)  # a caller that knows no size still cannot fill the store
        with pytest.raises(IntegrityError, match="more than the expected 100 bytes"):
            res.get(oid, max_size=100)
    assert nothing_stored(store)


def test_content_length_smaller_than_the_body_keeps_the_junk_out(repo, lying, store):
    """Content-Length: 11, then 1 MiB of junk on a keep-alive connection: the object is read
    to its length and is right; the junk poisons no later request on that connection."""
    oid = repo.put(ELEVEN)
    other = repo.put(b"another object")
    lying.lie(obj_path(oid), extra=1 << 20)
    with open_remote(lying.url, retries=0) as r:
        res = Resolver(store, r)
        assert res.read(oid, 0, 11, expected_size=11) == ELEVEN
        time.sleep(0.1)  # let the junk arrive
        assert res.read(other, 0, 100, expected_size=14) == b"another object"
    assert sorted(store.list()) == sorted([oid, other])


@pytest.mark.log_warnings
def test_cut_body_is_resumed_with_range(repo, lying, store):
    data = os.urandom(200_000)
    oid = repo.put(data)
    lying.lie("/objects/", cut=50_000, times=1)  # cut once: resumed with Range
    with open_remote(lying.url, backoff=0.01) as r:
        assert Resolver(store, r).read(oid, 0, len(data), expected_size=len(data)) == data
    ranges = [h.get("Range") for _, p, h in lying.requests if p == obj_path(oid)]
    assert ranges == [None, "bytes=50000-"]


@pytest.mark.log_warnings
def test_object_shorter_than_its_size_over_http(repo, lying, store):
    """A server whose object is 6 bytes while the manifest says 1 TiB: the Content-Length
    disagrees and nothing is read; without a Content-Length the short end is the lie."""
    six = repo.put(b"6bytes")
    with open_remote(lying.url, retries=1, backoff=0.01) as r:
        res = Resolver(store, r)
        with pytest.raises(SizeMismatch, match=f"{six}.* 6 bytes where 1099511627776"):
            res.read(six, 0, 4096, expected_size=1 << 40)
        lying.lie("/objects/", chunked=True)
        with pytest.raises(SizeMismatch, match=f"{six}.* 6 bytes where 1000 were expected"):
            res.read(six, 0, 4096, expected_size=1000)
    assert nothing_stored(store)


# --------------------------------------------------------------------------- item 6: size lies


@pytest.mark.parametrize("where", ["local", "file", "http"])
def test_size_lie_is_refused_before_a_byte_is_served(repo, lying, store, where):
    six = repo.put(b"6bytes")
    if where == "local":
        store.put(b"6bytes")
        remote = None
    else:
        remote = open_remote(lying.url if where == "http" else str(repo.root))
    res = Resolver(store, remote)
    for call in (
        lambda: res.read(six, 0, 4096, expected_size=1 << 40),
        lambda: res.read(six, 6, 4096, expected_size=1 << 40),  # past byte 6: never zeros
        lambda: res.ensure(six, expected_size=1 << 40),
        lambda: res.get(six, expected_size=5),
    ):
        with pytest.raises(SizeMismatch, match=f"object {six}: .*6 bytes where"):
            call()
    if where == "local":
        with pytest.raises(SizeMismatch):
            res.read_local(six, 0, 10, expected_size=7)  # not None: that would mean "fetch"
        assert store.has(six)  # the object is genuine: the reference lies, nothing quarantined
        assert res.read(six, 0, 100, expected_size=6) == b"6bytes"
    else:
        assert not store.has(six) and res.fetches == 0  # refused before the store saw a byte
        remote.close()


def test_size_lie_cannot_flush_the_store(repo, lying, tmp_path):
    """A manifest that claims 900 KB for a 6-byte object must not make a 1 MB store evict
    what it holds before the fetch even starts (room is made for verified bytes only)."""
    six = repo.put(b"6bytes")
    with LocalStore(tmp_path / "small", quota=1_000_000) as s:
        kept = [s.put(os.urandom(300_000)) for _ in range(3)]
        for url in (lying.url, str(repo.root)):
            with open_remote(url, retries=0) as r, pytest.raises(SizeMismatch):
                Resolver(s, r).ensure(six, expected_size=900_000)
        assert sorted(s.list()) == sorted(kept)


def test_file_repository_objects_are_bounded_too(repo, store, tmp_path):
    oid = repo.put(ELEVEN)
    path = repo.root / "objects" / oid[:2] / oid
    with open(path, "ab") as f:
        f.write(b"\0" * (1 << 20))  # a damaged or hostile share: the file grew
    res = Resolver(store, repo)
    with pytest.raises(SizeMismatch, match="1048587 bytes where 11"):
        res.ensure(oid, expected_size=11)
    path.unlink()
    path.symlink_to("/dev/zero")  # endless: refused, not read
    with pytest.raises(FormatError, match="not a regular file"):
        res.ensure(oid, expected_size=11)
    with pytest.raises(FormatError, match="not a regular file"):
        res.ensure(oid)
    assert nothing_stored(store)


# --------------------------------------------------------------------------- protocol lies


def _fetch(lying, store, oid, size, **kw):
    with open_remote(lying.url, backoff=0.01, **kw) as r:
        return Resolver(store, r).read(oid, 0, size, expected_size=size)


@pytest.mark.log_warnings
@pytest.mark.parametrize(
    "content_range",
    [
        "bytes 0-199999/200000",  # restarts from zero: would duplicate the first 50,000 bytes
        "bytes 50001-199999/200000",  # off by one
        "bytes 50000-199999/300000",  # another total than the first answer's length
        "bytes 50000-99999/200000",  # a part only
        "bytes 50000-199999/*",
        "bytes 50000-199999/" + "9" * 5000,
        "garbage",
        "",
    ],
)
def test_wrong_content_range_on_resume_is_refused(repo, lying, store, content_range):
    data = os.urandom(200_000)
    oid = repo.put(data)
    lying.lie("/objects/", cut=50_000, times=1)
    headers = {"Content-Range": content_range} if content_range else {}
    lying.lie("/objects/", range="wrong", headers=headers)
    with pytest.raises(RemoteError, match="answered Range: bytes=50000- with Content-Range"):
        _fetch(lying, store, oid, len(data))
    assert nothing_stored(store)


@pytest.mark.log_warnings
def test_200_to_a_range_request_is_refused_not_concatenated(repo, lying, store):
    data = os.urandom(200_000)
    oid = repo.put(data)
    lying.lie("/objects/", cut=50_000, times=1)
    lying.lie("/objects/", range="ignore")
    with pytest.raises(RemoteError, match="ignored Range on resume"):
        _fetch(lying, store, oid, len(data))
    assert nothing_stored(store)


def test_redirects_are_not_followed_so_a_loop_cannot_happen(repo, lying, store):
    oid = repo.put(ELEVEN)
    lying.lie("/objects/", status=302, headers={"Location": lying.url + obj_path(oid)})
    t0 = time.monotonic()
    with pytest.raises(RemoteError, match="HTTP 302 .*follows no redirects"):
        _fetch(lying, store, oid, 11, retries=5)
    assert time.monotonic() - t0 < 5
    assert sum(p == obj_path(oid) for _, p, _ in lying.requests) == 1
    lying.lie("/vfs-repo.json", status=301, headers={"Location": "/vfs-repo.json"})
    with (
        open_remote(lying.url, retries=5) as r,
        pytest.raises(RemoteError, match="vfs-repo.json: server answered HTTP 301"),
    ):
        r.list_refs()


@pytest.mark.parametrize("path", ["/objects/", "/vfs-repo.json", "/refs.json"])
def test_content_encoding_is_refused(repo, lying, store, path):
    oid = repo.put(ELEVEN)
    lying.lie(path, gzip=True)
    with (
        pytest.raises(RemoteError, match="Content-Encoding 'gzip'"),
        open_remote(lying.url, retries=3) as r,
    ):
        r.list_refs()
        Resolver(store, r).ensure(oid, expected_size=11)
    assert nothing_stored(store)


@pytest.mark.parametrize(
    "headers",
    [{"X-Huge": "a" * 70_000}, {f"X-Many-{i}": "x" for i in range(150)}],
    ids=["70-KB-header", "150-headers"],
)
def test_huge_headers_are_an_error_not_retried(repo, lying, store, headers):
    oid = repo.put(ELEVEN)
    lying.lie("/objects/", headers=headers)
    with pytest.raises(RemoteError, match="malformed response"):
        _fetch(lying, store, oid, 11, retries=5)
    assert sum(p == obj_path(oid) for _, p, _ in lying.requests) == 1


@pytest.mark.parametrize("length", ["abc", "-5", "9" * 5000, "11, 12"])
def test_nonsense_content_length_is_no_length(repo, lying, store, length):
    """http.client reads an unparsable Content-Length as none: the body then runs to the
    close, and the size bound still holds."""
    oid = repo.put(ELEVEN)
    lying.lie("/objects/", length=length, extra=1 << 20)
    with pytest.raises(IntegrityError, match="more than the expected 11 bytes"):
        _fetch(lying, store, oid, 11)
    lying.truth()
    lying.lie("/objects/", length=length)
    assert _fetch(lying, store, oid, 11) == ELEVEN


@pytest.mark.parametrize("status", [204, 206, 203])
def test_unexpected_success_status_is_refused(repo, lying, store, status):
    oid = repo.put(ELEVEN)
    lying.lie("/objects/", status=status)
    with pytest.raises(RemoteError, match=f"unexpected HTTP {status}"):
        _fetch(lying, store, oid, 11)
