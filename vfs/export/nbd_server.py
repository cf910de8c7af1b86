"""The NBD server: sockets and tasks around :mod:`vfs.export.protocol` and
:class:`~vfs.export.backend.ExportBackend`.

One trio task per connection reads the client's bytes, parses every complete request in
them and answers each one inline when it can (data in the image file or the local store:
the common case), collecting the replies of a batch into one ``sendmsg``. A request that
needs a fetch, a FLUSH and a FUA write go to a task of their own, so later requests are
answered meanwhile (replies leave out of order, as NBD allows). A connection holds at most
:data:`MAX_INFLIGHT` such tasks; past that it stops reading (back-pressure).

Sockets are plain non-blocking ones waited on with ``trio.lowlevel`` (the fewest wake-ups
per request). A client that vanishes mid-request loses nothing it was told was written: a
write is applied only once its whole payload has arrived, and durable once a FLUSH (or its
FUA) has been answered.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import socket
from typing import Any

import trio

from vfs.errors import UsageError
from vfs.export import protocol as P
from vfs.export.backend import ExportBackend, NeedFetch, errno_of
from vfs.export.handshake import ServerHandshake

log = logging.getLogger(__name__)

#: Requests of one connection being answered by their own tasks.
MAX_INFLIGHT = 64
RECV_SIZE = 1 << 20
HANDSHAKE_TIMEOUT = 30.0
_IOV_MAX = 512
#: Replies of a batch up to this size are joined into one buffer before sending.
JOIN_LIMIT = 256 * 1024
#: Reads from this size on go into reused buffers (at most POOL_PER_SIZE kept per size).
POOL_MIN = 128 * 1024
POOL_PER_SIZE = 32
#: Socket send buffer asked for (root may exceed net.core.wmem_max): fewer partial sends of
#: large replies.
SNDBUF = 4 << 20


async def recv_into(sock: socket.socket, buf: memoryview) -> int:
    while True:
        try:
            return sock.recv_into(buf)
        except BlockingIOError:
            await trio.lowlevel.wait_readable(sock)
        except (ConnectionResetError, BrokenPipeError):
            return 0


async def send_all(sock: socket.socket, bufs: list[Any]) -> None:
    """Send every buffer (bytes, bytearray, memoryview) in order, with as few syscalls as
    the kernel allows."""
    if len(bufs) > 1 and sum(map(len, bufs)) <= JOIN_LIMIT:
        bufs = [b"".join(bufs)]  # one copy is cheaper than many small iovecs
    views = [memoryview(b) for b in bufs if len(b)]
    i = 0
    while i < len(views):
        try:
            sent = sock.sendmsg(views[i : i + _IOV_MAX])
        except BlockingIOError:
            await trio.lowlevel.wait_writable(sock)
            continue
        while sent:
            n = len(views[i])
            if sent >= n:
                sent -= n
                i += 1
            else:
                views[i] = views[i][sent:]
                sent = 0


class Connection:
    """The transmission phase of one client."""

    def __init__(self, sock: socket.socket, neg: P.Negotiated, backend: ExportBackend):
        self.sock = sock
        self.neg = neg
        self.backend = backend
        self.structured = neg.structured
        self.out: list[Any] = []
        self._send_lock = trio.Lock()
        self._slots = trio.Semaphore(MAX_INFLIGHT)
        self.broken = False
        #: Read buffers of large replies, reused once sent: a fresh 1 MiB bytearray costs its
        #: page faults on every request (more than the read itself).
        self._pool: dict[int, list[bytearray]] = {}
        self._lent: list[bytearray] = []

    async def run(self, leftover: bytes) -> None:
        parser = P.RequestParser()
        buf = bytearray(RECV_SIZE)
        mv = memoryview(buf)
        counts = self.backend.stats.requests
        async with trio.open_nursery() as nursery:
            # Inside the nursery: a violation ends the reading, the requests already being
            # answered finish (a ProtocolError must not leave as an exception group).
            try:
                reqs = parser.feed(leftover)
                while True:
                    for req in reqs:
                        name = P.CMD_NAMES.get(req.cmd, "other")
                        counts[name] = counts.get(name, 0) + 1
                        if req.cmd == P.CMD_DISC and not req.error:
                            await self.send()
                            return  # the nursery waits for the requests still being answered
                        if not self.backend.gate_open:
                            await self.send()
                            await self.backend.wait_open()
                        if not self.inline(req):
                            await self._spawn(nursery, req)
                    await self.send()
                    n = await recv_into(self.sock, mv)
                    if n == 0:
                        return
                    reqs = parser.feed(mv[:n])
            except P.ProtocolError as e:
                log.info("NBD client dropped: %s", e)
                await self.send()  # the answers to the requests before the violation

    async def send(self) -> None:
        if not self.out:
            await trio.lowlevel.checkpoint()
            return
        async with self._send_lock:
            while self.out and not self.broken:
                bufs, self.out = self.out, []
                lent, self._lent = self._lent, []
                try:
                    await send_all(self.sock, bufs)
                except OSError as e:  # the client went away: what is applied stays applied
                    log.debug("connection lost while replying: %s", e)
                    self.broken = True
                del bufs
                for b in lent:
                    free = self._pool.setdefault(len(b), [])
                    if len(free) < POOL_PER_SIZE:
                        free.append(b)
            if self.broken:
                self.out.clear()

    def _error(self, req: P.Request, err: int, msg: str) -> None:
        self.backend.stats.errors += 1
        self.out.append(P.error_reply(self.neg, req, err, msg))

    def inline(self, req: P.Request) -> bool:
        """Answer a request on the spot (a plain call: the common case costs no task and no
        await); False when it needs a task of its own (a fetch, FLUSH, CACHE, FUA)."""
        err, msg = P.check_request(req, self.neg)
        if err:
            self._error(req, err, msg)
            return True
        cmd = req.cmd
        if cmd == P.CMD_FLUSH or cmd == P.CMD_CACHE or req.flags & P.CMD_FLAG_FUA:
            return False
        try:
            self.execute(req)
        except NeedFetch:
            if cmd == P.CMD_WRITE_ZEROES and req.flags & P.CMD_FLAG_FAST_ZERO:
                self._error(req, P.ENOTSUP, "zeroing part of a remote cluster is not fast")
                return True
            return False
        except Exception as e:
            self._fail(req, e)
        return True

    def _fail(self, req: P.Request, e: BaseException) -> None:
        if not isinstance(e, OSError | ValueError) and not hasattr(e, "errno"):
            log.exception("%s request failed", P.CMD_NAMES.get(req.cmd, req.cmd))
        else:
            log.info("%s %d+%d: %s", P.CMD_NAMES.get(req.cmd), req.offset, req.length, e)
        self._error(req, errno_of(e), str(e))

    async def _spawn(self, nursery: trio.Nursery, req: P.Request) -> None:
        await self._slots.acquire()
        nursery.start_soon(self._slow, req)

    async def _slow(self, req: P.Request) -> None:
        b = self.backend
        try:
            cmd = req.cmd
            if cmd == P.CMD_CACHE:
                await b.cache(req.offset, req.length)
                self.out.append(self._ok(req))
            elif cmd == P.CMD_FLUSH:
                await b.flush()
                self.out.append(self._ok(req))
            else:
                replies: list[Any] = []
                await b.retry(lambda: self.execute(req, replies), req.offset, req.length)
                if req.flags & P.CMD_FLAG_FUA:
                    await b.flush()
                self.out.extend(replies)
        except Exception as e:
            self._fail(req, e)
        finally:
            self._slots.release()
        await self.send()

    def _ok(self, req: P.Request) -> bytes:
        return P.simple_reply(req.handle)

    def execute(self, req: P.Request, out: list[Any] | None = None) -> None:
        """Do a validated request against the image and queue its reply (synchronous: may
        raise NeedFetch before anything is queued)."""
        if out is None:
            out = self.out
        b = self.backend
        cmd = req.cmd
        if cmd == P.CMD_READ:
            n = req.length
            if n >= POOL_MIN:
                free = self._pool.get(n)
                data: Any = free.pop() if free else bytearray(n)
                b.readinto(req.offset, data)
                self._lent.append(data)
            else:
                data = b.read(req.offset, n)
            if self.structured:
                out.append(P.structured_data_header(req.handle, req.offset, req.length))
            else:
                out.append(P.simple_reply(req.handle))
            out.append(data)
            return
        if cmd == P.CMD_WRITE:
            assert req.payload is not None
            b.write(req.offset, req.payload)
        elif cmd == P.CMD_WRITE_ZEROES:
            if req.length:
                b.write_zeroes(req.offset, req.length, unmap=not req.flags & P.CMD_FLAG_NO_HOLE)
        elif cmd == P.CMD_TRIM:
            if req.length:
                b.discard(req.offset, req.length)
        elif cmd == P.CMD_BLOCK_STATUS:
            out.extend(self._block_status(req))
            return
        elif cmd == P.CMD_CACHE or cmd == P.CMD_FLUSH:
            pass
        out.append(P.simple_reply(req.handle))

    def _block_status(self, req: P.Request) -> list[bytes]:
        chunks = []
        items = sorted(self.neg.contexts.items())
        for k, (ctx_id, ctx) in enumerate(items):
            ext = self.backend.block_status(
                ctx, req.offset, req.length, one=bool(req.flags & P.CMD_FLAG_REQ_ONE)
            )
            chunks.append(P.block_status_chunk(req.handle, ctx_id, ext, k == len(items) - 1))
        return chunks


class NbdServer:
    """Serves one or more exports (by name) on any number of listening sockets."""

    def __init__(self, exports: dict[str, ExportBackend], default: str | None = None):
        if not exports:
            raise UsageError("an NBD server needs at least one export")
        self.exports = exports
        self.default = default
        self.connections = 0
        self._listeners: list[socket.socket] = []

    def handshake(self) -> ServerHandshake:
        infos = {name: b.info(name) for name, b in self.exports.items()}
        return ServerHandshake(infos, self.default)

    # ------------------------------------------------------------------ listening
    @staticmethod
    def unix_listener(path: str) -> socket.socket:
        if len(os.fsencode(path)) >= 108:
            raise UsageError(f"socket path too long for a Unix socket: {path}")
        with contextlib.suppress(FileNotFoundError):
            st = os.lstat(path)
            import stat

            if not stat.S_ISSOCK(st.st_mode):
                raise UsageError(f"{path} exists and is not a socket")
            os.unlink(path)
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        old = os.umask(0o177)  # 0600: whoever can connect can write the disk
        try:
            s.bind(path)
        finally:
            os.umask(old)
        s.listen(128)
        s.setblocking(False)
        return s

    @staticmethod
    def tcp_listener(host: str, port: int) -> socket.socket:
        import ipaddress

        try:
            ip = ipaddress.ip_address(host)
        except ValueError:
            raise UsageError(f"--tcp wants an IP address, not {host!r}") from None
        if not ip.is_loopback:
            raise UsageError(
                f"TCP exports listen on loopback addresses only (no TLS here), not {host}"
            )
        fam = socket.AF_INET6 if ip.version == 6 else socket.AF_INET
        s = socket.socket(fam, socket.SOCK_STREAM)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError as e:
            s.close()
            raise UsageError(f"cannot listen on {host}:{port}: {e.strerror}") from None
        s.listen(128)
        s.setblocking(False)
        return s

    async def serve(self, listener: socket.socket) -> None:
        """Accept connections on ``listener`` until cancelled."""
        async with trio.open_nursery() as nursery:
            while True:
                try:
                    conn, _addr = listener.accept()
                except BlockingIOError:
                    await trio.lowlevel.wait_readable(listener)
                    continue
                except OSError as e:
                    if e.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                        log.warning("accept: %s (waiting)", e)
                        await trio.sleep(0.1)
                        continue
                    raise
                conn.setblocking(False)
                with contextlib.suppress(OSError):
                    conn.setsockopt(
                        socket.SOL_SOCKET, getattr(socket, "SO_SNDBUFFORCE", 32), SNDBUF
                    )
                    conn.setsockopt(
                        socket.SOL_SOCKET, getattr(socket, "SO_RCVBUFFORCE", 33), SNDBUF
                    )
                if conn.family != socket.AF_UNIX:
                    conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                nursery.start_soon(self.connection, conn)

    async def connection(self, sock: socket.socket) -> None:
        self.connections += 1
        try:
            with sock:
                neg, leftover = await self._handshake(sock)
                if neg is None:
                    return
                backend = self.exports[neg.export.name]
                log.debug("client on export %r (structured %s)", neg.export.name, neg.structured)
                await Connection(sock, neg, backend).run(leftover)
        except P.ProtocolError as e:
            log.info("NBD client dropped: %s", e)
        except OSError as e:
            log.debug("NBD connection: %s", e)
        except Exception:  # a bug must cost one connection, never the server
            log.exception("NBD connection failed")
        finally:
            self.connections -= 1

    async def _handshake(self, sock: socket.socket) -> tuple[P.Negotiated | None, bytes]:
        hs = self.handshake()
        buf = bytearray(65536)
        mv = memoryview(buf)
        with trio.move_on_after(HANDSHAKE_TIMEOUT) as scope:
            await send_all(sock, [hs.outgoing()])
            while not hs.done and not hs.closed:
                n = await recv_into(sock, mv)
                if n == 0:
                    return None, b""
                hs.feed(mv[:n])
                out = hs.outgoing()
                if out:
                    await send_all(sock, [out])
        if scope.cancelled_caught:
            log.info("NBD client did not finish the handshake in %.0f s", HANDSHAKE_TIMEOUT)
            return None, b""
        if hs.closed or hs.result is None:
            return None, b""
        return hs.result, hs.leftover
