"""Remote repositories: where objects live when they are not on this host (second redirection).

One layout, served two ways (docs/redirect.md, "Repository")::

    REPO/vfs-repo.json      {"format": "vfs-repo", "version": 1, "features": []}
    REPO/objects/ab/<id>    the object's plain bytes (so any static server can do Range on it)
    REPO/refs/<name>        a named reference: "<id>\\n"
    REPO/refs.json          every ref, {"name": "<id>"} (the listing a static server cannot make)

Backends: :class:`FileRemote` (a directory, e.g. an NFS share; the only one that can ``put``) and
:class:`HttpRemote` (any static web server, CDN or bucket: ``GET`` with ``Range``, keep-alive,
bounded retries with backoff, server certificate checked against the user's CA, optional client
certificate for mutual TLS). A repository is published over HTTP by copying the directory to
the web root (``rsync -a REPO/ host:/var/www/repo/``): objects first, refs last.

Remotes never decide what is trusted: callers verify every byte against its id (the resolver
does it before anything is stored; :meth:`Remote.get` does it for small objects).
"""

from __future__ import annotations

import contextlib
import errno
import http.client
import json
import logging
import os
import re
import socket
import ssl
import threading
import time
import urllib.parse
from abc import ABC, abstractmethod
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

from vfs.durable import atomic_writer, fsync_dir, tmp_name, write_atomic
from vfs.errors import (
    FormatError,
    IntegrityError,
    NotFound,
    ObjectNotFound,
    RemoteError,
    RemoteUnavailable,
    StoreFull,
    UnsupportedFeature,
    UsageError,
)
from vfs.redirect.objectid import check_object_id, new_hasher, object_id, shard

log = logging.getLogger(__name__)

REPO_FORMAT = "vfs-repo"
REPO_VERSION = 1
KNOWN_FEATURES: frozenset[str] = frozenset()
BLOCK = 1 << 20
_REF_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:@+-]{0,127}")


def check_ref_name(name: object) -> str:
    """Ref names are single path components of safe characters: no '/', no '..', no NUL."""
    if not isinstance(name, str) or _REF_NAME.fullmatch(name) is None or ".." in name:
        raise UsageError(
            f"invalid ref name {name!r}: use letters, digits and . _ : @ + - (max 128)"
        )
    return name


class Remote(ABC):
    """A repository of objects. Subclasses are thread-safe."""

    url: str

    @abstractmethod
    def has(self, oid: str) -> bool: ...

    @abstractmethod
    def iter_object(self, oid: str, block: int = BLOCK) -> Iterator[bytes]:
        """The object's bytes in blocks, as the repository has them (unverified)."""

    def get(self, oid: str, max_size: int = 1 << 30) -> bytes:
        """The whole object, verified against its id. For small objects (manifests, clusters)."""
        check_object_id(oid)
        parts = []
        n = 0
        for block in self.iter_object(oid):
            n += len(block)
            if n > max_size:
                raise IntegrityError(f"object {oid}: larger than {max_size} bytes", oid=oid)
            parts.append(block)
        data = b"".join(parts)
        if object_id(data) != oid:
            raise IntegrityError(
                f"object {oid}: bytes from {self.url} do not match the id (lying or damaged "
                "repository); refused",
                oid=oid,
            )
        return data

    def put(self, data: bytes) -> str:
        raise UsageError(f"{self.url}: read-only repository (publish by copying the directory)")

    def put_file(self, path: str | os.PathLike[str]) -> str:
        raise UsageError(f"{self.url}: read-only repository (publish by copying the directory)")

    def put_stream(self, src: BinaryIO) -> str:
        raise UsageError(f"{self.url}: read-only repository (publish by copying the directory)")

    def set_ref(self, name: str, oid: str) -> None:
        raise UsageError(f"{self.url}: read-only repository (publish by copying the directory)")

    @abstractmethod
    def get_ref(self, name: str) -> str: ...

    @abstractmethod
    def list_refs(self) -> dict[str, str]: ...

    def close(self) -> None:  # noqa: B027 - optional hook, most backends hold nothing
        """Release connections."""

    def __enter__(self) -> Remote:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# --------------------------------------------------------------------------- file://


class FileRemote(Remote):
    """A repository in a local or network-mounted directory."""

    def __init__(self, path: str | os.PathLike[str], *, create: bool = False) -> None:
        self.root = Path(path)
        self.url = f"file://{self.root.resolve()}"
        marker = self.root / "vfs-repo.json"
        if not marker.exists():
            if not create:
                raise NotFound(f"{self.url}: not a vfs repository (vfs-repo.json missing)")
            self.init(self.root)
        try:
            meta = json.loads(marker.read_text())
        except (OSError, ValueError) as e:
            raise FormatError(f"{self.url}: unreadable vfs-repo.json: {e}") from None
        _check_repo_meta(meta, self.url)
        self._refs_lock = threading.Lock()

    @staticmethod
    def init(path: str | os.PathLike[str]) -> Path:
        """Create an empty repository (idempotent)."""
        root = Path(path)
        (root / "objects").mkdir(parents=True, exist_ok=True)
        (root / "refs").mkdir(exist_ok=True)
        marker = root / "vfs-repo.json"
        if not marker.exists():
            meta = {"format": REPO_FORMAT, "version": REPO_VERSION, "features": []}
            write_atomic(marker, json.dumps(meta, indent=2).encode() + b"\n")
        if not (root / "refs.json").exists():
            write_atomic(root / "refs.json", b"{}\n")
        return root

    def _path(self, oid: str) -> Path:
        return self.root / "objects" / shard(check_object_id(oid))

    def has(self, oid: str) -> bool:
        return self._path(oid).exists()

    def iter_object(self, oid: str, block: int = BLOCK) -> Iterator[bytes]:
        try:
            f = open(self._path(oid), "rb")  # noqa: SIM115 - generator owns it
        except FileNotFoundError:
            raise ObjectNotFound(f"object {oid} not in repository {self.url}", oid=oid) from None
        except OSError as e:
            raise RemoteUnavailable(f"{self.url}: cannot read object {oid}: {e}") from e
        with f:
            while data := f.read(block):
                yield data

    def size(self, oid: str) -> int:
        try:
            return self._path(oid).stat().st_size
        except FileNotFoundError:
            raise ObjectNotFound(f"object {oid} not in repository {self.url}", oid=oid) from None

    def put(self, data: bytes) -> str:
        oid = object_id(data)
        dest = self._path(oid)
        if dest.exists():
            return oid
        dest.parent.mkdir(exist_ok=True)
        with atomic_writer(dest) as f:
            f.write(data)
        return oid

    def put_file(self, path: str | os.PathLike[str]) -> str:
        """Upload a file, streaming: hashed while copied to a temp file, renamed when complete."""
        with open(path, "rb") as src:
            return self.put_stream(src)

    def put_stream(self, src: BinaryIO) -> str:
        """Upload everything readable from ``src`` (read once, constant memory)."""
        tmp = tmp_name(self.root / "objects")
        h = new_hasher()
        try:
            with open(tmp, "xb") as dst:
                while data := src.read(BLOCK):
                    h.update(data)
                    dst.write(data)
                dst.flush()
                os.fsync(dst.fileno())
            oid = h.hexdigest()
            dest = self._path(oid)
            if dest.exists():
                os.unlink(tmp)
                return oid
            dest.parent.mkdir(exist_ok=True)
            os.replace(tmp, dest)
            fsync_dir(dest.parent)
            return oid
        except BaseException as e:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
                raise StoreFull(f"no space left in repository {self.url}") from e
            raise

    def set_ref(self, name: str, oid: str) -> None:
        """Point ``name`` at ``oid``. The object must already be in the repository (refs are
        written last, so a reader that sees a ref can fetch everything it names)."""
        check_ref_name(name)
        check_object_id(oid)
        if not self.has(oid):
            raise ObjectNotFound(f"cannot set ref {name}: object {oid} is not in {self.url}")
        with self._refs_lock, _flock(self.root / ".refs.lock"):
            write_atomic(self.root / "refs" / name, oid.encode() + b"\n")
            refs = self._scan_refs()
            write_atomic(
                self.root / "refs.json", json.dumps(refs, indent=2, sort_keys=True).encode()
            )

    def _scan_refs(self) -> dict[str, str]:
        refs = {}
        for p in sorted((self.root / "refs").iterdir()):
            if p.name.startswith("."):
                continue
            with contextlib.suppress(UsageError, OSError):
                refs[check_ref_name(p.name)] = check_object_id(p.read_text().strip())
        return refs

    def get_ref(self, name: str) -> str:
        check_ref_name(name)
        try:
            text = (self.root / "refs" / name).read_text()
        except FileNotFoundError:
            raise NotFound(f"no ref {name!r} in {self.url}") from None
        return check_object_id(text.strip())

    def list_refs(self) -> dict[str, str]:
        return self._scan_refs()

    def iter_oids(self) -> Iterator[str]:
        for sub in sorted((self.root / "objects").iterdir()):
            if sub.is_dir():
                for p in sorted(sub.iterdir()):
                    if len(p.name) == 64:
                        yield p.name


@contextlib.contextmanager
def _flock(path: Path) -> Iterator[None]:
    import fcntl

    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _check_repo_meta(meta: object, url: str) -> None:
    if not isinstance(meta, dict) or meta.get("format") != REPO_FORMAT:
        raise FormatError(f"{url}: not a vfs repository")
    version = meta.get("version")
    if not isinstance(version, int) or version > REPO_VERSION:
        raise UnsupportedFeature(f"{url}: repository version {version!r} is newer than this vfs")
    unknown = set(meta.get("features", [])) - KNOWN_FEATURES
    if unknown:
        raise UnsupportedFeature(f"{url}: repository uses unknown features {sorted(unknown)}")


# --------------------------------------------------------------------------- http(s)://

_RETRY_STATUS = {408, 429, 500, 502, 503, 504}


class _HttpStatus(Exception):
    def __init__(self, status: int, reason: str) -> None:
        super().__init__(f"HTTP {status} {reason}")
        self.status = status


class HttpRemote(Remote):
    """A repository behind any static HTTP(S) server.

    Keep-alive connections are pooled (one per concurrent caller). Every request gets
    ``retries`` more attempts after a connection error, timeout or 5xx, sleeping
    ``backoff * 2**n`` in between; a body cut short is resumed with ``Range`` from the last byte
    received, so a retry never restarts a large object from zero.
    """

    def __init__(
        self,
        url: str,
        *,
        ca: str | None = None,
        cert: str | None = None,
        key: str | None = None,
        timeout: float = 10.0,
        retries: int = 4,
        backoff: float = 0.2,
        proxy: str | None = None,
    ) -> None:
        parts = urllib.parse.urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise UsageError(f"invalid repository URL {url!r}")
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
        self._meta_checked = False
        self._has_cert = bool(cert)

    # -- connections

    def _conn(self) -> http.client.HTTPConnection:
        with self._pool_lock:
            if self._pool:
                return self._pool.pop()
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
        with self._pool_lock:
            if len(self._pool) < 16:
                self._pool.append(conn)
                return
        conn.close()

    def close(self) -> None:
        with self._pool_lock:
            pool, self._pool = self._pool, []
        for c in pool:
            c.close()

    # -- requests

    def _attempts(self, what: str) -> Iterator[int]:
        for attempt in range(self.retries + 1):
            if attempt:
                delay = self.backoff * (2 ** (attempt - 1))
                log.info("%s: retry %d/%d in %.2fs", what, attempt, self.retries, delay)
                time.sleep(delay)
            yield attempt

    def _open(
        self, method: str, path: str, headers: dict[str, str]
    ) -> tuple[http.client.HTTPConnection, http.client.HTTPResponse]:
        """One request on a pooled connection; raises OSError/HTTPException/_HttpStatus."""
        conn = self._conn()
        try:
            target = self._base + path
            if self._proxy is not None and not self._https:
                # absolute-form request target for a forward proxy (RFC 9112 §3.2.2)
                headers = {**headers, "Host": f"{self._host}:{self._port}"}
                target = f"http://{self._host}:{self._port}{target}"
            conn.request(method, target, headers=headers)
            resp = conn.getresponse()
        except BaseException:
            conn.close()
            raise
        if resp.status >= 400:
            body = resp.read(4096)
            conn.close()
            del body
            raise _HttpStatus(resp.status, resp.reason)
        return conn, resp

    def _classify(self, e: BaseException, what: str) -> BaseException | None:
        """None if retryable; else the error to raise."""
        if isinstance(e, _HttpStatus):
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
        if isinstance(e, (OSError, http.client.HTTPException, socket.timeout)):
            return None
        return e

    def _request_bytes(self, path: str, what: str, limit: int = 1 << 20) -> bytes:
        last: BaseException | None = None
        for _ in self._attempts(what):
            try:
                conn, resp = self._open("GET", path, {})
                data = resp.read(limit + 1)
                if len(data) > limit:
                    conn.close()
                    raise RemoteError(f"{what}: response larger than {limit} bytes")
                if resp.isclosed():
                    self._release(conn)
                else:
                    conn.close()
                return data
            except RemoteError:
                raise
            except BaseException as e:
                fatal = self._classify(e, what)
                if fatal is not None:
                    raise fatal from None
                last = e
        raise RemoteUnavailable(
            f"{what}: {self.url} unreachable after {self.retries + 1} attempts: {last}"
        )

    def _check_meta(self) -> None:
        if self._meta_checked:
            return
        raw = self._request_bytes("/vfs-repo.json", f"{self.url}/vfs-repo.json")
        try:
            meta = json.loads(raw)
        except ValueError:
            raise FormatError(f"{self.url}: vfs-repo.json is not JSON") from None
        _check_repo_meta(meta, self.url)
        self._meta_checked = True

    def has(self, oid: str) -> bool:
        path = "/objects/" + shard(check_object_id(oid))
        what = f"HEAD {self.url}{path}"
        last: BaseException | None = None
        for _ in self._attempts(what):
            try:
                conn, resp = self._open("HEAD", path, {})
                resp.read()
                self._release(conn)
                return True
            except BaseException as e:
                fatal = self._classify(e, what)
                if isinstance(fatal, NotFound):
                    return False
                if fatal is not None:
                    raise fatal from None
                last = e
        raise RemoteUnavailable(f"{what}: unreachable after {self.retries + 1} attempts: {last}")

    def iter_object(self, oid: str, block: int = BLOCK) -> Iterator[bytes]:
        self._check_meta()
        path = "/objects/" + shard(check_object_id(oid))
        what = f"GET {self.url}{path}"
        received = 0
        total: int | None = None
        last: BaseException | None = None
        for _ in self._attempts(what):
            headers = {"Range": f"bytes={received}-"} if received else {}
            try:
                conn, resp = self._open("GET", path, headers)
            except BaseException as e:
                fatal = self._classify(e, what)
                if isinstance(fatal, NotFound):
                    raise ObjectNotFound(
                        f"object {oid} not in repository {self.url}", oid=oid
                    ) from None
                if fatal is not None:
                    raise fatal from None
                last = e
                continue
            try:
                if received:
                    if resp.status != 206 or not _range_starts_at(resp, received):
                        conn.close()
                        raise RemoteError(f"{what}: server ignored Range on resume")
                elif resp.status != 200:
                    conn.close()
                    raise RemoteError(f"{what}: unexpected HTTP {resp.status}")
                if total is None:
                    length = resp.getheader("Content-Length")
                    total = int(length) if length is not None else None
                while True:
                    data = resp.read(block)
                    if not data:
                        break
                    received += len(data)
                    yield data
                if total is not None and received < total:
                    raise http.client.IncompleteRead(b"", total - received)
                self._release(conn)
                return
            except RemoteError:
                raise
            except GeneratorExit:
                conn.close()
                raise
            except BaseException as e:
                conn.close()
                fatal = self._classify(e, what)
                if fatal is not None:
                    raise fatal from None
                last = e
                log.warning("%s: interrupted at byte %d (%s); resuming", what, received, e)
        raise RemoteUnavailable(
            f"{what}: {self.url} unreachable after {self.retries + 1} attempts: {last}"
        )

    def get_ref(self, name: str) -> str:
        check_ref_name(name)
        self._check_meta()
        try:
            raw = self._request_bytes(f"/refs/{name}", f"{self.url}/refs/{name}", limit=256)
        except NotFound:
            raise NotFound(f"no ref {name!r} in {self.url}") from None
        return check_object_id(raw.decode("ascii", "replace").strip())

    def list_refs(self) -> dict[str, str]:
        self._check_meta()
        raw = self._request_bytes("/refs.json", f"{self.url}/refs.json", limit=16 << 20)
        try:
            refs = json.loads(raw)
        except ValueError:
            raise FormatError(f"{self.url}/refs.json is not JSON") from None
        if not isinstance(refs, dict):
            raise FormatError(f"{self.url}/refs.json is not an object")
        return {check_ref_name(k): check_object_id(v) for k, v in refs.items()}


def _range_starts_at(resp: http.client.HTTPResponse, start: int) -> bool:
    cr = resp.getheader("Content-Range") or ""
    m = re.match(r"bytes (\d+)-", cr)
    return m is not None and int(m.group(1)) == start


def open_remote(
    url: str,
    *,
    ca: str | None = None,
    cert: str | None = None,
    key: str | None = None,
    timeout: float = 10.0,
    retries: int = 4,
    backoff: float = 0.2,
    create: bool = False,
    proxy: str | None = None,
) -> Remote:
    """A repository from its URL: ``file:///dir``, a plain path, or ``http(s)://host/path``
    (optionally through an HTTP forward ``proxy``)."""
    if url.startswith(("http://", "https://")):
        return HttpRemote(
            url,
            ca=ca,
            cert=cert,
            key=key,
            timeout=timeout,
            retries=retries,
            backoff=backoff,
            proxy=proxy,
        )
    if proxy:
        raise UsageError("--proxy applies only to http(s):// repositories")
    if cert or key or ca:
        raise UsageError("--ca/--cert/--key apply only to https:// repositories")
    if url.startswith("file://"):
        path = urllib.parse.unquote(urllib.parse.urlsplit(url).path)
    elif "://" in url:
        raise UsageError(f"unsupported repository URL scheme in {url!r} (file, http, https)")
    else:
        path = url
    if not path:
        raise UsageError(f"invalid repository URL {url!r}")
    return FileRemote(path, create=create)
