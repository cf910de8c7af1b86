"""HTTP(S) repositories: any static web server, CDN or bucket — and every way one can lie.

The client (docs/redirect.md, "HTTP client behaviour") pools keep-alive connections, retries
connection errors, timeouts and 5xx a bounded number of times with exponential backoff, and
resumes a body cut short with ``Range`` from the last byte received. Against a server that lies
or stalls it holds these lines:

- **Sizes.** An object fetch reads at most the size its caller expects (or may accept): a
  ``Content-Length`` that disagrees is refused before a body byte is read, a body that runs
  past the bound is cut off, one that ends short of it is resumed or refused. Metadata
  documents have their own bounds (:mod:`vfs.redirect.repometa`).
- **Time.** Every system call has the per-operation ``timeout``, and every fetch (all its
  attempts and back-off sleeps) an overall deadline: once ``grace`` seconds have passed it must
  have averaged ``min_rate`` bytes per second, i.e. it ends at the latest at
  ``start + grace + received / min_rate``. A socket timeout bounds one ``recv``, not a fetch: a
  server that drips a byte every few seconds, into the body, the headers or an endless run of
  ``100 Continue``, never trips it; the :class:`_Watchdog` thread shuts such a connection down.
- **Protocol.** Only 200 (206 on a resume, with the exact ``Content-Range``) is an answer;
  redirects are not followed (as CernVM-FS by default: a mirror cannot send us elsewhere, and a
  redirect loop cannot happen); a ``Content-Encoding`` other than identity is refused (we never
  ask for one); oversized or endless headers are an error, not retried.
"""

from __future__ import annotations

import contextlib
import http.client
import logging
import math
import os
import re
import select
import socket
import ssl
import threading
import time
import urllib.parse
from collections.abc import Iterator

from vfs.errors import (
    FormatError,
    NotFound,
    ObjectNotFound,
    RemoteError,
    RemoteTimeout,
    RemoteUnavailable,
    UsageError,
    VfsError,
)
from vfs.redirect.bounds import fetch_bound, size_mismatch, too_large
from vfs.redirect.objectid import check_object_id, shard
from vfs.redirect.remote import BLOCK, Remote
from vfs.redirect.repometa import (
    MAX_META_BYTES,
    MAX_REF_BYTES,
    MAX_REFS_BYTES,
    RepoMeta,
    check_ref_name,
    parse_ref,
    parse_refs_index,
    parse_repo_meta,
)

log = logging.getLogger(__name__)

DEFAULT_TIMEOUT = 10.0
DEFAULT_RETRIES = 4
DEFAULT_BACKOFF = 0.2
#: The bytes-per-second floor of a fetch once its grace period is over (0: no floor and no
#: overall deadline). 16 KiB/s: a slow site link shared by dozens of fetches stays above it.
DEFAULT_MIN_RATE = 16 * 1024
#: Seconds a fetch may take before the floor applies: connect, TLS, one stalled attempt
#: (the 10 s timeout) and a retry.
DEFAULT_GRACE = 20.0

_RETRY_STATUS = {408, 429, 500, 502, 503, 504}
_CONTENT_RANGE = re.compile(r"bytes (\d{1,20})-(\d{1,20})/(\d{1,20}|\*)")


class _HttpStatus(Exception):
    def __init__(self, status: int, reason: str, location: str | None = None) -> None:
        super().__init__(f"HTTP {status} {reason}".rstrip())
        self.status = status
        self.location = location


def _rate(n: float) -> str:
    return f"{n / 1024:g} KiB/s" if n >= 1024 else f"{n:g} B/s"


class _Fetch:
    """One logical request, every attempt and back-off included, and its deadline."""

    def __init__(self, remote: HttpRemote, what: str) -> None:
        self.what = what
        self.start = time.monotonic()
        self.grace = remote.grace
        self.min_rate = remote.min_rate
        self.received = 0
        self.attempts_made = 0
        self.cut_off = False
        self._conn: http.client.HTTPConnection | None = None
        self._lock = threading.Lock()

    def expires(self) -> float:
        if self.min_rate <= 0:
            return math.inf
        return self.start + self.grace + self.received / self.min_rate

    def expired(self) -> bool:
        return self.cut_off or time.monotonic() >= self.expires()

    def error(self, why: str = "") -> RemoteTimeout:
        elapsed = time.monotonic() - self.start
        return RemoteTimeout(
            f"{self.what}: cut off after {elapsed:.1f} s and {self.attempts_made} attempt(s), "
            f"{self.received} bytes received{why}: a fetch must average at least "
            f"{_rate(self.min_rate)} once its {self.grace:g} s grace is over (--min-rate, --grace)",
            received=self.received,
            seconds=round(elapsed, 3),
        )

    def check(self) -> None:
        """Raise the deadline error if the fetch is past its deadline."""
        if self.expired():
            raise self.error()

    def attach(self, conn: http.client.HTTPConnection) -> None:
        """``conn`` carries the next attempt: the one the watchdog cuts."""
        with self._lock:
            self._conn = conn
        self.check()

    def cut(self) -> None:
        """Called by the watchdog: wake the fetching thread from whatever read it is in."""
        with self._lock:
            self.cut_off = True
            conn = self._conn
        sock = getattr(conn, "sock", None)
        if sock is not None:
            # socket.socket's own shutdown, also for an SSLSocket: the blocked SSL_read in
            # the other thread sees EOF; SSLSocket.shutdown would unwrap under its feet.
            with contextlib.suppress(OSError):
                socket.socket.shutdown(sock, socket.SHUT_RDWR)

    def attempts(self, retries: int, backoff: float) -> Iterator[int]:
        for attempt in range(retries + 1):
            if attempt:
                delay = backoff * (2 ** (attempt - 1))
                if time.monotonic() + delay >= self.expires():
                    raise self.error(f" (the retry in {delay:.1f} s would start past it)")
                log.info("%s: retry %d/%d in %.2fs", self.what, attempt, retries, delay)
                time.sleep(delay)
            self.attempts_made = attempt + 1
            yield attempt


class _Watchdog:
    """One thread per process that cuts the connection of every fetch past its deadline."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._fetches: set[_Fetch] = set()
        self._thread: threading.Thread | None = None

    def watch(self, f: _Fetch) -> None:
        with self._cond:
            self._fetches.add(f)
            if self._thread is None:
                self._thread = threading.Thread(
                    target=self._run, name="vfs-http-deadlines", daemon=True
                )
                self._thread.start()
            self._cond.notify()

    def forget(self, f: _Fetch) -> None:
        with self._cond:
            self._fetches.discard(f)

    def _run(self) -> None:
        with self._cond:
            while True:
                now = time.monotonic()
                wake = math.inf
                for f in list(self._fetches):
                    t = f.expires()
                    if t <= now:
                        self._fetches.discard(f)
                        log.debug("%s: past its deadline: cutting the connection", f.what)
                        f.cut()
                    else:
                        wake = min(wake, t)
                self._cond.wait(None if wake == math.inf else wake - now + 0.005)


_watchdog = _Watchdog()


def _new_watchdog_after_fork() -> None:
    global _watchdog
    _watchdog = _Watchdog()  # the parent's thread (and maybe its held lock) did not come along


os.register_at_fork(after_in_child=_new_watchdog_after_fork)


def _idle(conn: http.client.HTTPConnection) -> bool:
    """Nothing to read on an idle keep-alive connection (no junk, no EOF): it can carry the
    next request. poll, not select: a daemon's descriptors go past FD_SETSIZE."""
    sock = conn.sock
    if sock is None:
        return True  # closed by http.client ("Connection: close"): reconnects on next use
    if isinstance(sock, ssl.SSLSocket) and sock.pending():
        return False
    p = select.poll()
    p.register(sock, select.POLLIN | select.POLLPRI)
    return not p.poll(0)


class HttpRemote(Remote):
    """A repository behind any static HTTP(S) server (read-only).

    ``timeout``: seconds any one connect, TLS handshake or socket read may take. ``retries``:
    more attempts after a connection error, timeout or 408/429/5xx, sleeping ``backoff * 2**n``
    in between. ``min_rate`` (bytes/s) and ``grace`` (s): the overall deadline of each fetch
    (module docstring). Keep-alive connections are pooled (one per concurrent caller).
    """

    def __init__(
        self,
        url: str,
        *,
        ca: str | None = None,
        cert: str | None = None,
        key: str | None = None,
        timeout: float = DEFAULT_TIMEOUT,
        retries: int = DEFAULT_RETRIES,
        backoff: float = DEFAULT_BACKOFF,
        proxy: str | None = None,
        min_rate: float = DEFAULT_MIN_RATE,
        grace: float = DEFAULT_GRACE,
    ) -> None:
        parts = urllib.parse.urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise UsageError(f"invalid repository URL {url!r}")
        for name, v, low in (
            ("timeout", timeout, 0.0),
            ("min-rate", min_rate, 0.0),
            ("grace", grace, 0.0),
            ("backoff", backoff, 0.0),
        ):
            if not (isinstance(v, (int, float)) and math.isfinite(v) and v >= low):
                raise UsageError(f"invalid --{name} {v!r}: a finite number >= {low:g}")
        if timeout <= 0:
            raise UsageError(f"invalid --timeout {timeout!r}: must be > 0")
        if type(retries) is not int or retries < 0:
            raise UsageError(f"invalid --retries {retries!r}: an integer >= 0")
        self._proxy: tuple[str, int] | None = None
        if proxy:
            pp = urllib.parse.urlsplit(proxy if "://" in proxy else f"http://{proxy}")
            if pp.scheme != "http" or not pp.hostname:
                raise UsageError(f"invalid proxy {proxy!r}: expected http://HOST:PORT")
            self._proxy = (pp.hostname, pp.port or 3128)
        self.url = url.rstrip("/")
        self._https = parts.scheme == "https"
        self._host = parts.hostname
        self._port = parts.port or (443 if self._https else 80)
        self._base = parts.path.rstrip("/")
        self.timeout = timeout
        self.retries = retries
        self.backoff = backoff
        self.min_rate = min_rate
        self.grace = grace
        self._pool: list[http.client.HTTPConnection] = []
        self._pool_lock = threading.Lock()
        self._ssl: ssl.SSLContext | None = None
        if self._https:
            try:
                ctx = ssl.create_default_context(cafile=ca)
                if cert:
                    ctx.load_cert_chain(cert, key)
            except (OSError, ssl.SSLError) as e:
                raise UsageError(f"TLS set-up failed (--ca/--cert/--key): {e}") from None
            self._ssl = ctx
        elif cert or ca:
            raise UsageError("--ca/--cert/--key need an https:// repository URL")
        self.meta: RepoMeta | None = None
        self._has_cert = bool(cert)

    # -- connections

    def _conn(self) -> http.client.HTTPConnection:
        while True:
            with self._pool_lock:
                if not self._pool:
                    break
                conn = self._pool.pop()
            if _idle(conn):
                return conn
            conn.close()  # the server closed it while it idled, or sent something unasked
        if self._proxy is not None:
            # Through a (caching) forward proxy, as CernVM-FS clients use site squids: objects
            # are immutable, so a proxy may cache them forever. HTTPS is tunnelled (CONNECT),
            # so TLS and client certificates stay end to end.
            host, port = self._proxy
            if self._https:
                conn: http.client.HTTPConnection = http.client.HTTPSConnection(
                    host, port, timeout=self.timeout, context=self._ssl
                )
                conn.set_tunnel(self._host, self._port)
                return conn
            return http.client.HTTPConnection(host, port, timeout=self.timeout)
        if self._https:
            return http.client.HTTPSConnection(
                self._host, self._port, timeout=self.timeout, context=self._ssl
            )
        return http.client.HTTPConnection(self._host, self._port, timeout=self.timeout)

    def _release(self, conn: http.client.HTTPConnection) -> None:
        if not _idle(conn):
            # Bytes after the end of a response (a Content-Length shorter than the body):
            # the next response on this connection would be read from them. Not reused.
            conn.close()
            return
        with self._pool_lock:
            if len(self._pool) < 16:
                self._pool.append(conn)
                return
        conn.close()

    def _finish(self, conn: http.client.HTTPConnection, resp: http.client.HTTPResponse) -> None:
        """The body was read to its end: pool the connection if the response is complete."""
        if not resp.isclosed() and resp.length == 0:
            resp.read()  # marks a length-delimited response done (read1 does not)
        if resp.isclosed():
            self._release(conn)
        else:
            conn.close()

    def close(self) -> None:
        with self._pool_lock:
            pool, self._pool = self._pool, []
        for c in pool:
            c.close()

    # -- requests

    @contextlib.contextmanager
    def _fetch(self, what: str) -> Iterator[_Fetch]:
        f = _Fetch(self, what)
        if self.min_rate > 0:
            _watchdog.watch(f)
        try:
            yield f
        finally:
            _watchdog.forget(f)

    def _open(
        self, f: _Fetch, method: str, path: str, headers: dict[str, str]
    ) -> tuple[http.client.HTTPConnection, http.client.HTTPResponse]:
        """One request on a pooled connection; a 2xx response whose body is plain bytes.
        Raises OSError/HTTPException/_HttpStatus/RemoteError; closes the connection then."""
        conn = self._conn()
        try:
            f.attach(conn)
            if conn.sock is None:
                conn.connect()  # here, not inside request(): the watchdog can only cut a socket
                f.check()
            target = self._base + path
            if self._proxy is not None and not self._https:
                # absolute-form request target for a forward proxy (RFC 9112 §3.2.2)
                headers = {**headers, "Host": f"{self._host}:{self._port}"}
                target = f"http://{self._host}:{self._port}{target}"
            conn.request(method, target, headers=headers)  # sends Accept-Encoding: identity
            resp = conn.getresponse()
            f.check()
        except BaseException:
            conn.close()
            raise
        if resp.status >= 300:
            # Not read: an error body is of no use, and a hostile one could be endless.
            conn.close()
            raise _HttpStatus(resp.status, resp.reason, resp.getheader("Location"))
        encoding = (resp.getheader("Content-Encoding") or "identity").strip().lower()
        if encoding != "identity":
            conn.close()
            raise RemoteError(
                f"{f.what}: server sent Content-Encoding {encoding[:40]!r} though vfs asks for "
                "identity (the plain bytes of the file); refused"
            )
        return conn, resp

    def _classify(self, e: BaseException, f: _Fetch) -> BaseException | None:
        """None if retryable; else the error to raise."""
        what = f.what
        if isinstance(e, VfsError):
            return e
        if f.expired():
            return f.error()
        if isinstance(e, _HttpStatus):
            if 300 <= e.status < 400:
                to = f" to {e.location[:200]!r}" if e.location else ""
                return RemoteError(
                    f"{what}: server answered {e}{to}; vfs follows no redirects (give the "
                    "final URL as the repository)"
                )
            if e.status == 404:
                return NotFound(f"{what}: not found (HTTP 404)")
            if e.status in _RETRY_STATUS:
                return None
            hint = ""
            if self._https and not self._has_cert and e.status in (400, 401, 403, 495, 496):
                hint = " (does the server require a client certificate? --cert/--key)"
            return RemoteError(f"{what}: server answered {e}{hint}")
        if isinstance(e, ssl.SSLCertVerificationError):
            return RemoteError(f"{what}: TLS certificate verification failed: {e.verify_message}")
        if isinstance(e, ssl.SSLError):
            return RemoteError(f"{what}: TLS error: {e.reason or e}")
        if isinstance(e, http.client.LineTooLong) or type(e) is http.client.HTTPException:
            # a header line over 64 KiB, more than 100 headers: a broken or hostile server
            return RemoteError(f"{what}: malformed response from the server: {e}")
        if isinstance(e, (OSError, http.client.HTTPException)):
            return None
        if isinstance(e, ValueError):
            return RemoteError(f"{what}: malformed response from the server: {e}")
        return e

    def _gave_up(self, f: _Fetch, last: BaseException | None) -> RemoteUnavailable:
        return RemoteUnavailable(
            f"{f.what}: gave up after {f.attempts_made} attempts (last error: {last or 'none'})"
        )

    @staticmethod
    def _body(f: _Fetch, resp: http.client.HTTPResponse, bound: int, block: int):
        """The body in pieces of at most one ``recv`` each (so a drip is seen as one), never
        reading more than ``bound + 1`` bytes. IncompleteRead if it ends before its
        Content-Length."""
        n = 0
        while True:
            data = resp.read1(min(block, bound - n + 1))
            f.check()
            if not data:
                break
            n += len(data)
            f.received += len(data)
            yield data
        if resp.length:
            raise http.client.IncompleteRead(b"", resp.length)

    def _request_bytes(self, path: str, what: str, limit: int) -> bytes:
        """A small document: at most ``limit`` bytes are read (``limit + 1`` returned means
        larger: the parser refuses it)."""
        with self._fetch(what) as f:
            last: BaseException | None = None
            for _ in f.attempts(self.retries, self.backoff):
                conn = None
                try:
                    conn, resp = self._open(f, "GET", path, {})
                    if resp.status != 200:
                        raise RemoteError(f"{what}: unexpected HTTP {resp.status} (not 200)")
                    if resp.length is not None and resp.length > limit:
                        raise FormatError(
                            f"{what}: larger than {limit} bytes (Content-Length "
                            f"{resp.length}); refused before parsing"
                        )
                    data = b"".join(self._body(f, resp, limit, limit + 1))
                    self._finish(conn, resp)
                    return data
                except BaseException as e:
                    if conn is not None:
                        conn.close()
                    fatal = self._classify(e, f)
                    if fatal is not None:
                        raise fatal from None
                    last = e
            raise self._gave_up(f, last)

    def _check_meta(self) -> None:
        if self.meta is not None:
            return
        what = f"{self.url}/vfs-repo.json"
        self.meta = parse_repo_meta(
            self._request_bytes("/vfs-repo.json", what, MAX_META_BYTES), what
        )

    def has(self, oid: str) -> bool:
        path = "/objects/" + shard(check_object_id(oid))
        with self._fetch(f"HEAD {self.url}{path}") as f:
            last: BaseException | None = None
            for _ in f.attempts(self.retries, self.backoff):
                conn = None
                try:
                    conn, resp = self._open(f, "HEAD", path, {})
                    if resp.status != 200:
                        raise RemoteError(f"{f.what}: unexpected HTTP {resp.status} (not 200)")
                    resp.read()  # HEAD: no body
                    self._finish(conn, resp)
                    return True
                except BaseException as e:
                    if conn is not None:
                        conn.close()
                    fatal = self._classify(e, f)
                    if isinstance(fatal, NotFound):
                        return False
                    if fatal is not None:
                        raise fatal from None
                    last = e
            raise self._gave_up(f, last)

    def iter_object(
        self,
        oid: str,
        block: int = BLOCK,
        *,
        expected_size: int | None = None,
        limit: int | None = None,
    ) -> Iterator[bytes]:
        check_object_id(oid)
        bound = fetch_bound(oid, expected_size, limit)
        self._check_meta()
        path = "/objects/" + shard(oid)
        received = 0
        total: int | None = None  # the length the server declared (Content-Length/-Range)
        with self._fetch(f"object {oid} from {self.url}") as f:
            last: BaseException | None = None
            for _ in f.attempts(self.retries, self.backoff):
                conn = None
                headers = {"Range": f"bytes={received}-"} if received else {}
                try:
                    conn, resp = self._open(f, "GET", path, headers)
                    total = self._check_answer(f, resp, oid, received, total, expected_size, bound)
                    # A body without a declared length ends where the server ends it (a
                    # chunked body's last chunk, or the close): then that is its length.
                    for data in self._body(f, resp, bound - received, block):
                        received += len(data)
                        if received > bound:
                            raise too_large(oid, bound, self.url)
                        yield data
                    if total is not None and received < total:
                        raise http.client.IncompleteRead(b"", total - received)
                    if expected_size is not None and received != expected_size:
                        raise size_mismatch(oid, received, expected_size, self.url)
                    self._finish(conn, resp)
                    return
                except GeneratorExit:
                    if conn is not None:
                        conn.close()
                    raise
                except BaseException as e:
                    if conn is not None:
                        conn.close()
                    fatal = self._classify(e, f)
                    if isinstance(fatal, NotFound):
                        raise ObjectNotFound(
                            f"object {oid} not in repository {self.url}", oid=oid
                        ) from None
                    if fatal is not None:
                        raise fatal from None
                    last = e
                    log.warning("%s: interrupted at byte %d (%s); resuming", f.what, received, e)
            raise self._gave_up(f, last)

    def _check_answer(
        self,
        f: _Fetch,
        resp: http.client.HTTPResponse,
        oid: str,
        received: int,
        total: int | None,
        expected_size: int | None,
        bound: int,
    ) -> int | None:
        """Check the status and length headers of an object response; the object's total
        length if known now."""
        if not received:
            if resp.status != 200:
                raise RemoteError(f"{f.what}: unexpected HTTP {resp.status} (not 200)")
            length = resp.length  # parsed Content-Length; None when chunked or absent
            if length is not None:
                where = f"{self.url} (Content-Length)"
                if expected_size is not None and length != expected_size:
                    raise size_mismatch(oid, length, expected_size, where)
                if length > bound:
                    raise too_large(oid, bound, where)
                total = length
            return total
        if resp.status != 206:
            raise RemoteError(
                f"{f.what}: server ignored Range on resume (HTTP {resp.status} to "
                f"Range: bytes={received}-); refused rather than restarted"
            )
        cr = (resp.getheader("Content-Range") or "").strip()
        m = _CONTENT_RANGE.fullmatch(cr)
        whole = int(m[3]) if m is not None and m[3] != "*" else None
        known = total if total is not None else expected_size
        ok = (
            m is not None
            and whole is not None
            and int(m[1]) == received
            and (total is None or whole == total)
            and int(m[2]) == whole - 1
            and (resp.length is None or resp.length == whole - received)
        )
        if not ok:
            end = f"{known - 1}/{known}" if known is not None else "END/LENGTH"
            raise RemoteError(
                f"{f.what}: answered Range: bytes={received}- with Content-Range "
                f"{cr[:80]!r} (expected bytes {received}-{end}); refused"
            )
        assert whole is not None
        if expected_size is not None and whole != expected_size:
            raise size_mismatch(oid, whole, expected_size, f"{self.url} (Content-Range)")
        if whole > bound:
            raise too_large(oid, bound, f"{self.url} (Content-Range)")
        return whole

    def get_ref(self, name: str) -> str:
        check_ref_name(name)
        self._check_meta()
        what = f"{self.url}/refs/{name}"
        try:
            raw = self._request_bytes(f"/refs/{name}", what, MAX_REF_BYTES)
        except NotFound:
            raise NotFound(f"no ref {name!r} in {self.url}") from None
        return parse_ref(raw, what)

    def list_refs(self) -> dict[str, str]:
        self._check_meta()
        what = f"{self.url}/refs.json"
        return parse_refs_index(self._request_bytes("/refs.json", what, MAX_REFS_BYTES), what)
