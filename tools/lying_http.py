"""A lying HTTP server on 127.0.0.1, for tests: a static server that lies the way a hostile or
broken mirror does.

It serves a directory as any static server would (GET, HEAD, ``Range: bytes=N-``, keep-alive),
except for the paths it was told to lie about::

    with LyingServer(repo_dir) as srv:
        srv.lie("/objects/", extra=64 << 20)          # 64 MiB of junk after every object
        srv.lie("/vfs-repo.json", body=b'{"features": "abc"}')
        srv.lie("/refs.json", drip=1.0)                # one byte of the body per second
        ... open_remote(srv.url) ...

Each response is written byte by byte as told (raw socket writes, no HTTP library deciding for
it), so the client meets exactly the lie. :attr:`LyingServer.sent` counts the body bytes the
server managed to push to each path (what a client that does not stop reading would take).
"""

from __future__ import annotations

import gzip
import http.server
import os
import socket
import ssl
import sys
import threading
import urllib.parse
from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class Lie:
    """How to answer requests whose path contains ``match`` (the first matching lie wins).

    ``body``      bytes to serve instead of the file (hostile JSON, a wrong object)
    ``status``    the status code (e.g. 302 with ``headers={"Location": ...}``)
    ``headers``   extra header lines, sent as given (Content-Encoding, Content-Range, huge ones)
    ``length``    the Content-Length to announce: an int (a lie), None for the truth, "omit"
                  for none, any other text as is ("abc"); without an int the body ends when
                  the server closes the connection
    ``extra``     junk bytes sent after the body (more than asked), then the connection closes
    ``chunked``   send the body with Transfer-Encoding: chunked
    ``gzip``      gzip the body and say Content-Encoding: gzip
    ``drip``      seconds between body bytes, one byte at a time
    ``header_drip`` seconds between bytes of the status line and headers
    ``stall``     send the headers, then nothing until the server stops
    ``continues`` send ``100 Continue`` interim responses forever (``header_drip`` apart)
    ``cut``       close the connection after this many body bytes
    ``range``     on a Range request: "ignore" answers 200 with the whole body; "wrong" answers
                  206 with the given ``headers`` (a wrong Content-Range); None serves the range
    ``times``     lie this many times, then tell the truth (None: always)
    """

    match: str
    body: bytes | None = None
    status: int | None = None
    headers: dict[str, str] = field(default_factory=dict)
    length: int | str | None = None
    extra: int = 0
    chunked: bool = False
    gzip: bool = False
    drip: float = 0.0
    header_drip: float = 0.0
    stall: bool = False
    continues: bool = False
    cut: int | None = None
    range: str | None = None
    times: int | None = None


class _Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _Server

    def setup(self) -> None:
        if isinstance(self.request, ssl.SSLSocket):
            self.request.do_handshake()  # here, in the connection's thread, not in accept()
        super().setup()

    def log_message(self, *args: object) -> None:
        pass

    def do_HEAD(self) -> None:
        self._answer(head=True)

    def do_GET(self) -> None:
        self._answer(head=False)

    # -- the truth, then the lie

    def _file(self) -> bytes | None:
        path = urllib.parse.unquote(urllib.parse.urlsplit(self.path).path)
        parts = [p for p in path.split("/") if p]
        if any(p in (".", "..") for p in parts):
            return None
        f = self.server.root.joinpath(*parts)
        try:
            return f.read_bytes() if f.is_file() else None
        except OSError:
            return None

    def _answer(self, head: bool) -> None:
        srv = self.server
        with srv.lock:
            srv.requests.append((self.command, self.path, dict(self.headers)))
            lie = srv.pick(self.path)
        data = self._file() if lie is None or lie.body is None else lie.body
        rng = self.headers.get("Range")
        start = 0
        if rng and rng.startswith("bytes=") and rng.endswith("-"):
            start = int(rng[6:-1])
        status = 200 if data is not None else 404
        headers: list[tuple[str, str]] = []
        if data is None:
            data = b""
        elif rng and (lie is None or lie.range is None):
            status = 206
            headers.append(("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}"))
            data = data[start:]
        elif rng and lie is not None and lie.range == "wrong":
            status = 206
            data = data[start:]
        if lie is not None and lie.gzip:
            data = gzip.compress(data)
            headers.append(("Content-Encoding", "gzip"))
        if lie is not None and lie.status is not None:
            status = lie.status
        if lie is not None:
            headers.extend(lie.headers.items())
        length: int | str | None = len(data)
        if lie is not None and lie.length is not None:
            length = lie.length
        chunked = lie is not None and lie.chunked
        # A body without a usable Content-Length ends with the connection.
        close = lie is not None and (isinstance(length, str) or lie.cut is not None)
        head_lines = [f"HTTP/1.1 {status} Lie\r\n"]
        if chunked:
            head_lines.append("Transfer-Encoding: chunked\r\n")
        elif length != "omit":
            head_lines.append(f"Content-Length: {length}\r\n")
        if close:
            head_lines.append("Connection: close\r\n")
        head_lines.extend(f"{k}: {v}\r\n" for k, v in headers)
        head_lines.append("\r\n")
        try:
            if lie is not None and lie.continues:
                while not srv.stopping.is_set():
                    self._send(b"HTTP/1.1 100 Continue\r\n\r\n", lie.header_drip or 0.5)
                return
            self._send("".join(head_lines).encode("latin-1"), lie.header_drip if lie else 0)
            if lie is not None and lie.stall:
                srv.stopping.wait()
                return
            if head:
                return
            body = data
            if lie is not None and lie.extra:
                body = data + b"\0" * lie.extra
            if lie is not None and lie.cut is not None:
                body = body[: lie.cut]
            if chunked:
                self._send_chunked(body, lie.drip if lie else 0)
            else:
                self._send_body(body, lie.drip if lie else 0)
        except OSError:
            pass  # the client hung up: what a lie should make it do
        if close:
            self.close_connection = True
            if lie is not None and lie.cut is not None:
                self.connection.shutdown(socket.SHUT_RDWR)

    def _send(self, raw: bytes, drip: float) -> None:
        if not drip:
            self.wfile.write(raw)
            return
        for i in range(len(raw)):
            if self.server.stopping.wait(drip):
                return
            self.wfile.write(raw[i : i + 1])

    def _send_body(self, body: bytes, drip: float) -> None:
        srv = self.server
        step = 1 if drip else 1 << 16
        for i in range(0, len(body), step):
            if drip and srv.stopping.wait(drip):
                return
            piece = body[i : i + step]
            self.wfile.write(piece)
            with srv.lock:
                srv.sent[self.path] = srv.sent.get(self.path, 0) + len(piece)

    def _send_chunked(self, body: bytes, drip: float) -> None:
        step = 1 if drip else 1 << 16
        for i in range(0, len(body), step):
            if drip and self.server.stopping.wait(drip):
                return
            piece = body[i : i + step]
            self.wfile.write(b"%x\r\n%s\r\n" % (len(piece), piece))
        self.wfile.write(b"0\r\n\r\n")


class _Server(http.server.ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False

    def __init__(self, root: Path, tls: ssl.SSLContext | None) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.root = root
        self.tls = tls
        self.lock = threading.Lock()
        self.lies: list[Lie] = []
        self.requests: list[tuple[str, str, dict[str, str]]] = []
        self.sent: dict[str, int] = {}
        self.stopping = threading.Event()
        self.errors: list[BaseException | None] = []  # the server's own failures, for tests

    def get_request(self) -> tuple[socket.socket, object]:
        sock, addr = super().get_request()
        if self.tls is not None:
            sock = self.tls.wrap_socket(sock, server_side=True, do_handshake_on_connect=False)
        return sock, addr

    def handle_error(self, request: object, client_address: object) -> None:
        err = sys.exc_info()[1]
        if not isinstance(err, OSError):  # a client hanging up is what lies are for
            self.errors.append(err)

    def pick(self, path: str) -> Lie | None:
        for lie in self.lies:
            if lie.match in path and (lie.times is None or lie.times > 0):
                if lie.times is not None:
                    lie.times -= 1
                return lie
        return None


class LyingServer:
    """The server, started on a free port of 127.0.0.1 (a context manager; stop() ends every
    drip and stall at once). ``cert``/``key``: serve HTTPS with that certificate."""

    def __init__(
        self, root: str | os.PathLike[str], *, cert: str | None = None, key: str | None = None
    ) -> None:
        tls = None
        if cert is not None:
            tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            tls.load_cert_chain(cert, key)
        self._https = tls is not None
        self._srv = _Server(Path(root), tls)
        self._thread = threading.Thread(
            target=self._srv.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )

    @property
    def url(self) -> str:
        scheme = "https" if self._https else "http"
        return f"{scheme}://127.0.0.1:{self._srv.server_port}"

    @property
    def requests(self) -> list[tuple[str, str, dict[str, str]]]:
        """(method, path, headers) of every request so far."""
        with self._srv.lock:
            return list(self._srv.requests)

    @property
    def sent(self) -> dict[str, int]:
        """Body bytes written per request path (sum over requests)."""
        with self._srv.lock:
            return dict(self._srv.sent)

    def lie(self, match: str, **how: object) -> Lie:
        """Answer paths containing ``match`` as ``how`` says (see :class:`Lie`); lies are
        tried in the order they were told, the first that matches (and has ``times`` left)
        answers."""
        lie = Lie(match, **how)  # type: ignore[arg-type]
        with self._srv.lock:
            self._srv.lies.append(lie)
        return lie

    def truth(self) -> None:
        """Forget every lie."""
        with self._srv.lock:
            self._srv.lies.clear()

    def start(self) -> LyingServer:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._srv.stopping.set()
        self._srv.shutdown()
        self._srv.server_close()
        if self._srv.errors:
            raise RuntimeError(f"the lying server itself failed: {self._srv.errors[0]!r}")

    def __enter__(self) -> LyingServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
