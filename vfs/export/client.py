"""The Python API of a running export, for vmctl and scripts (synchronous, thread-safe per
object as long as each thread uses its own).

- :class:`ExportControl`: the export's control socket — status, dirty maps (mark / dirty /
  take: what a two-stage migration or an incremental backup copies), flush, hydrate, stop;
- :class:`NbdClient`: a small NBD client (fixed newstyle, structured replies, meta contexts)
  to read and write the disk and to read block status and dirty bitmaps over the wire;
- :func:`blockdev_spec`: the QEMU ``-blockdev`` node that opens an export.

Migration sketch (issue 12)::

    ctl = ExportControl(ctl_path)
    ctl.mark("migration")                  # a new point in time
    copy(everything)                       # stage 1, the guest keeps running
    while big(ranges := ctl.take("migration")):
        copy(ranges)                       # what the guest dirtied meanwhile
    pause guest; ctl.flush(); copy(ctl.take("migration")); resume on the destination
"""

from __future__ import annotations

import socket
import struct
from pathlib import Path
from typing import Any

from vfs.errors import FormatError, UsageError, VfsError
from vfs.export import protocol as P


class ExportControl:
    """The control socket of one export process."""

    def __init__(self, path: str | Path) -> None:
        self.path = str(path)

    def call(self, req: dict[str, Any], timeout: float = 600.0) -> Any:
        from vfs.daemon.control import call_socket

        return call_socket(self.path, req, timeout, f"export control socket {self.path}")

    def ping(self) -> dict[str, Any]:
        return self.call({"op": "ping"}, timeout=10)

    def status(self) -> dict[str, Any]:
        return self.call({"op": "status"})

    def bitmaps(self) -> list[dict[str, Any]]:
        return self.call({"op": "bitmaps"})

    def mark(self, bitmap: str = "dirty", granularity: int = 0) -> None:
        """Start a new point in time: the bitmap is cleared (created when missing)."""
        self.call({"op": "mark", "bitmap": bitmap, "granularity": granularity})

    def dirty(self, bitmap: str = "dirty") -> list[tuple[int, int]]:
        """(offset, length) of every range written since the last mark (the whole disk when
        the bitmap is stale: after a crash of the export)."""
        return [(o, n) for o, n in self.call({"op": "dirty", "bitmap": bitmap})]

    def take(self, bitmap: str = "dirty") -> list[tuple[int, int]]:
        """:meth:`dirty` and :meth:`mark` in one step: no write falls between them."""
        return [(o, n) for o, n in self.call({"op": "take", "bitmap": bitmap})]

    def remove_bitmap(self, bitmap: str) -> None:
        self.call({"op": "bitmap_rm", "bitmap": bitmap})

    def flush(self) -> None:
        """Commit every write the export has answered (durable when this returns)."""
        self.call({"op": "flush"})

    def hydrate(self, wait: bool = False) -> dict[str, Any]:
        """Start fetching every remote cluster into the image; progress in ``status()``."""
        return self.call({"op": "hydrate", "wait": wait})

    def stop(self) -> None:
        self.call({"op": "stop"}, timeout=30)


def blockdev_spec(
    socket_path: str | Path, export: str, node_name: str, *, read_only: bool = False
) -> dict[str, Any]:
    """The QEMU blockdev (QAPI ``BlockdevOptionsNbd``) for an export on a Unix socket."""
    return {
        "driver": "nbd",
        "server": {"type": "unix", "path": str(socket_path)},
        "export": export,
        "node-name": node_name,
        "read-only": read_only,
    }


class NbdError(VfsError):
    """The server answered a request with an error."""

    def __init__(self, message: str, error: int) -> None:
        super().__init__(message)
        self.error = error


class NbdClient:
    """A blocking NBD client of one export (one request at a time)."""

    def __init__(
        self,
        address: str | Path | tuple[str, int],
        export: str = "",
        *,
        contexts: tuple[str, ...] = (),
        structured: bool = True,
        timeout: float = 60.0,
    ) -> None:
        if isinstance(address, tuple):
            self.sock = socket.create_connection(address, timeout=timeout)
        else:
            self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            self.sock.settimeout(timeout)
            self.sock.connect(str(address))
        self._handle = 0
        self.contexts: dict[int, str] = {}
        try:
            self._negotiate(export, contexts, structured)
        except BaseException:
            self.sock.close()
            raise

    # ------------------------------------------------------------------ plumbing
    def _recv(self, n: int) -> bytes:
        buf = bytearray()
        while len(buf) < n:
            chunk = self.sock.recv(n - len(buf))
            if not chunk:
                raise FormatError("NBD server closed the connection")
            buf += chunk
        return bytes(buf)

    def _option(self, opt: int, data: bytes = b"") -> None:
        self.sock.sendall(struct.pack(">QII", P.IHAVEOPT, opt, len(data)) + data)

    def _option_reply(self, opt: int) -> tuple[int, bytes]:
        magic, ropt, rtype, n = struct.unpack(">QIII", self._recv(20))
        if magic != P.OPTION_REPLY_MAGIC or ropt != opt:
            raise FormatError("bad NBD option reply")
        return rtype, self._recv(n)

    def _negotiate(self, export: str, contexts: tuple[str, ...], structured: bool) -> None:
        magic, ihaveopt, flags = struct.unpack(">QQH", self._recv(18))
        if magic != P.NBDMAGIC or ihaveopt != P.IHAVEOPT or not flags & P.FLAG_FIXED_NEWSTYLE:
            raise FormatError("not a fixed-newstyle NBD server")
        self.sock.sendall(struct.pack(">I", P.FLAG_C_FIXED_NEWSTYLE | P.FLAG_C_NO_ZEROES))
        self.structured = False
        if structured or contexts:
            self._option(P.OPT_STRUCTURED_REPLY)
            rtype, _ = self._option_reply(P.OPT_STRUCTURED_REPLY)
            self.structured = rtype == P.REP_ACK
        name = export.encode()
        if contexts:
            if not self.structured:
                raise UsageError("meta contexts need structured replies")
            qs = b"".join(struct.pack(">I", len(q.encode())) + q.encode() for q in contexts)
            self._option(
                P.OPT_SET_META_CONTEXT,
                struct.pack(">I", len(name)) + name + struct.pack(">I", len(contexts)) + qs,
            )
            while True:
                rtype, data = self._option_reply(P.OPT_SET_META_CONTEXT)
                if rtype == P.REP_ACK:
                    break
                if rtype != P.REP_META_CONTEXT:
                    raise NbdError(f"SET_META_CONTEXT refused: {data.decode(errors='replace')}", 0)
                self.contexts[struct.unpack(">I", data[:4])[0]] = data[4:].decode()
        self._option(P.OPT_GO, struct.pack(">I", len(name)) + name + struct.pack(">H", 0))
        self.size = self.flags = 0
        while True:
            rtype, data = self._option_reply(P.OPT_GO)
            if rtype == P.REP_ACK:
                break
            if rtype & (1 << 31):
                raise NbdError(f"export {export!r}: {data.decode(errors='replace')}", rtype)
            if rtype == P.REP_INFO and struct.unpack(">H", data[:2])[0] == P.INFO_EXPORT:
                self.size, self.flags = struct.unpack(">QH", data[2:12])

    def _request(self, cmd: int, offset: int = 0, length: int = 0, flags: int = 0,
                 payload: bytes = b"") -> int:  # fmt: skip
        self._handle += 1
        hdr = struct.pack(">IHHQQI", P.REQUEST_MAGIC, flags, cmd, self._handle, offset, length)
        self.sock.sendall(hdr + payload)
        return self._handle

    def _reply(self, handle: int, read_into: bytearray | None = None, base: int = 0) -> list:
        """Read the (simple or structured) reply to ``handle``; block status chunks are
        returned as (ctx_id, [(length, flags)...])."""
        out: list = []
        while True:
            (magic,) = struct.unpack(">I", self._recv(4))
            if magic == P.SIMPLE_REPLY_MAGIC:
                err, h = struct.unpack(">IQ", self._recv(12))
                if h != handle:
                    raise FormatError("reply to another request")
                if err:
                    raise NbdError(f"NBD error {err}", err)
                if read_into is not None:
                    read_into[:] = self._recv(len(read_into))
                return out
            if magic != P.STRUCTURED_REPLY_MAGIC:
                raise FormatError(f"bad NBD reply magic {magic:#x}")
            flags, rtype, h, n = struct.unpack(">HHQI", self._recv(16))
            data = self._recv(n)
            if h != handle:
                raise FormatError("reply to another request")
            if rtype == P.REPLY_TYPE_OFFSET_DATA:
                (off,) = struct.unpack(">Q", data[:8])
                assert read_into is not None
                read_into[off - base : off - base + n - 8] = data[8:]
            elif rtype == P.REPLY_TYPE_OFFSET_HOLE:
                off, hn = struct.unpack(">QI", data)
                assert read_into is not None
                read_into[off - base : off - base + hn] = bytes(hn)
            elif rtype == P.REPLY_TYPE_BLOCK_STATUS:
                (ctx,) = struct.unpack(">I", data[:4])
                ext = [struct.unpack(">II", data[i : i + 8]) for i in range(4, len(data), 8)]
                out.append((ctx, ext))
            elif rtype in (P.REPLY_TYPE_ERROR, P.REPLY_TYPE_ERROR_OFFSET):
                err, mlen = struct.unpack(">IH", data[:6])
                raise NbdError(data[6 : 6 + mlen].decode(errors="replace") or f"error {err}", err)
            if flags & P.REPLY_FLAG_DONE:
                return out

    # ------------------------------------------------------------------ requests
    def pread(self, offset: int, length: int) -> bytes:
        buf = bytearray(length)
        self._reply(self._request(P.CMD_READ, offset, length), buf, offset)
        return bytes(buf)

    def pwrite(self, data: bytes, offset: int, *, fua: bool = False) -> None:
        flags = P.CMD_FLAG_FUA if fua else 0
        self._reply(self._request(P.CMD_WRITE, offset, len(data), flags, data))

    def zero(self, offset: int, length: int, *, no_hole: bool = False, fast: bool = False) -> None:
        flags = (P.CMD_FLAG_NO_HOLE if no_hole else 0) | (P.CMD_FLAG_FAST_ZERO if fast else 0)
        self._reply(self._request(P.CMD_WRITE_ZEROES, offset, length, flags))

    def trim(self, offset: int, length: int) -> None:
        self._reply(self._request(P.CMD_TRIM, offset, length))

    def flush(self) -> None:
        self._reply(self._request(P.CMD_FLUSH))

    def cache(self, offset: int, length: int) -> None:
        self._reply(self._request(P.CMD_CACHE, offset, length))

    def block_status(self, offset: int, length: int) -> dict[str, list[tuple[int, int]]]:
        """Descriptors (length, flags) per negotiated context name."""
        chunks = self._reply(self._request(P.CMD_BLOCK_STATUS, offset, length))
        return {self.contexts[c]: ext for c, ext in chunks}

    def extents(self, context: str) -> list[tuple[int, int, int]]:
        """(offset, length, flags) of ``context`` over the whole disk."""
        out: list[tuple[int, int, int]] = []
        pos = 0
        while pos < self.size:
            ext = self.block_status(pos, min(self.size - pos, 1 << 30))[context]
            for n, f in ext:
                n = min(n, self.size - pos)
                if out and out[-1][2] == f and out[-1][0] + out[-1][1] == pos:
                    out[-1] = (out[-1][0], out[-1][1] + n, f)
                else:
                    out.append((pos, n, f))
                pos += n
        return out

    def close(self) -> None:
        try:
            self._request(P.CMD_DISC)
        except OSError:
            pass
        self.sock.close()

    def __enter__(self) -> NbdClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
