"""The server side of NBD's fixed-newstyle handshake, sans I/O: options in, replies out, and
the negotiated export and mode (:class:`vfs.export.protocol.Negotiated`) at the end. The
constants, bounds and the transmission phase are :mod:`vfs.export.protocol`'s; what is
supported is listed there. Hostile input raises only :class:`ProtocolError`.
"""

from __future__ import annotations

import logging
import struct

from vfs.export.protocol import (
    CTX_DIRTY_BITMAP_PREFIX,
    FLAG_C_FIXED_NEWSTYLE,
    FLAG_C_NO_ZEROES,
    FLAG_FIXED_NEWSTYLE,
    FLAG_NO_ZEROES,
    IHAVEOPT,
    INFO_BLOCK_SIZE,
    INFO_DESCRIPTION,
    INFO_EXPORT,
    INFO_NAME,
    MAX_OPTION,
    MAX_OPTION_SKIP,
    MAX_OPTIONS,
    MAX_STRING,
    NBDMAGIC,
    OPT_ABORT,
    OPT_EXPORT_NAME,
    OPT_GO,
    OPT_INFO,
    OPT_LIST,
    OPT_LIST_META_CONTEXT,
    OPT_SET_META_CONTEXT,
    OPT_STARTTLS,
    OPT_STRUCTURED_REPLY,
    OPTION_REPLY_MAGIC,
    REP_ACK,
    REP_ERR_INVALID,
    REP_ERR_POLICY,
    REP_ERR_TOO_BIG,
    REP_ERR_UNKNOWN,
    REP_ERR_UNSUP,
    REP_INFO,
    REP_META_CONTEXT,
    REP_SERVER,
    ExportInfo,
    Negotiated,
    ProtocolError,
)

log = logging.getLogger(__name__)

_OPT_HDR = struct.Struct(">QII")
_OPT_REPLY = struct.Struct(">QIII")
_U16 = struct.Struct(">H")
_U32 = struct.Struct(">I")
_U64 = struct.Struct(">Q")


class ServerHandshake:
    """The server side of the fixed-newstyle handshake of one connection.

    ``feed(data)`` takes what the client sent; ``outgoing()`` gives what to send back.
    When :attr:`done` is set, :attr:`result` holds the negotiation and :attr:`leftover` the
    bytes the client sent after it (its first requests); when :attr:`closed` is set the
    connection ends (the client aborted). Violations raise :class:`ProtocolError`.
    """

    def __init__(self, exports: dict[str, ExportInfo], default: str | None = None) -> None:
        #: The exports by name; ``default`` is the one an empty name selects (the only one,
        #: when there is one).
        self.exports = exports
        if default is None and len(exports) == 1:
            default = next(iter(exports))
        self.default = default
        self._buf = bytearray()
        greeting = _U64.pack(NBDMAGIC) + _U64.pack(IHAVEOPT)
        self._out: list[bytes] = [greeting + _U16.pack(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES)]
        self._state = "client_flags"
        self._skip = 0  # bytes of an oversized option still to drop
        self._skip_opt = 0
        self.no_zeroes = False
        self.structured = False
        self._meta_export: str | None = None
        self._meta: dict[int, str] = {}
        self.options_seen = 0
        self.done = False
        self.closed = False
        self.result: Negotiated | None = None
        self.leftover = b""

    # -- I/O-free interface -----------------------------------------------------------------
    def outgoing(self) -> bytes:
        out = b"".join(self._out)
        self._out.clear()
        return out

    def feed(self, data: bytes | bytearray | memoryview) -> None:
        if self.done or self.closed:
            raise ProtocolError("data after the handshake ended")
        self._buf += data
        while not (self.done or self.closed):
            if not self._step():
                break

    # -- the state machine ------------------------------------------------------------------
    def _step(self) -> bool:
        buf = self._buf
        if self._skip:
            n = min(self._skip, len(buf))
            del buf[:n]
            self._skip -= n
            if self._skip:
                return False
            self._reply(self._skip_opt, REP_ERR_TOO_BIG, b"option too long")
            return True
        if self._state == "client_flags":
            if len(buf) < 4:
                return False
            (flags,) = _U32.unpack_from(buf)
            del buf[:4]
            if flags & ~(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES):
                raise ProtocolError(f"unknown client flags {flags:#x}")
            if not flags & FLAG_C_FIXED_NEWSTYLE:
                # Only EXPORT_NAME is valid in non-fixed newstyle; we speak fixed newstyle only
                # (as qemu-nbd and nbdkit do): such a client has no error path, so cut it off.
                raise ProtocolError("client does not speak fixed newstyle")
            self.no_zeroes = bool(flags & FLAG_C_NO_ZEROES)
            self._state = "options"
            return True
        if len(buf) < _OPT_HDR.size:
            return False
        magic, opt, length = _OPT_HDR.unpack_from(buf)
        if magic != IHAVEOPT:
            raise ProtocolError(f"bad option magic {magic:#x}")
        self.options_seen += 1
        if self.options_seen > MAX_OPTIONS:
            raise ProtocolError("too many options")
        if length > MAX_OPTION:
            if opt == OPT_EXPORT_NAME or length > MAX_OPTION_SKIP:
                raise ProtocolError(f"option {opt} of {length} bytes")
            del buf[: _OPT_HDR.size]
            self._skip, self._skip_opt = length, opt
            return True
        if len(buf) < _OPT_HDR.size + length:
            return False
        data = bytes(buf[_OPT_HDR.size : _OPT_HDR.size + length])
        del buf[: _OPT_HDR.size + length]
        self._option(opt, data)
        if self.done:
            self.leftover = bytes(buf)
            buf.clear()
        return True

    def _reply(self, opt: int, rtype: int, data: bytes = b"") -> None:
        self._out.append(_OPT_REPLY.pack(OPTION_REPLY_MAGIC, opt, rtype, len(data)) + data)

    def _error(self, opt: int, rtype: int, message: str) -> None:
        self._reply(opt, rtype, message.encode()[:MAX_STRING])

    def _find(self, name: str) -> ExportInfo | None:
        if name == "" and self.default is not None:
            return self.exports.get(self.default)
        return self.exports.get(name)

    def _option(self, opt: int, data: bytes) -> None:
        log.debug("option %d (%d bytes)", opt, len(data))
        if opt == OPT_EXPORT_NAME:
            name = _decode(data)
            exp = self._find(name) if name is not None else None
            if exp is None:
                # EXPORT_NAME cannot fail with an error reply: the spec says to disconnect
                raise ProtocolError(f"no export named {data[:64]!r}")
            self._finish(exp)
            flags = self.result.flags if self.result else 0
            self._out.append(_U64.pack(exp.size) + _U16.pack(flags))
            if not self.no_zeroes:
                self._out.append(bytes(124))
        elif opt == OPT_ABORT:
            if data:
                self._error(opt, REP_ERR_INVALID, "ABORT takes no data")
                return
            self._reply(opt, REP_ACK)
            self.closed = True
        elif opt == OPT_LIST:
            if data:
                self._error(opt, REP_ERR_INVALID, "LIST takes no data")
                return
            for name, exp in self.exports.items():
                n = name.encode()
                self._reply(opt, REP_SERVER, _U32.pack(len(n)) + n + exp.description.encode())
            self._reply(opt, REP_ACK)
        elif opt == OPT_STARTTLS:
            self._error(opt, REP_ERR_POLICY, "TLS is not offered on this local export")
        elif opt in (OPT_INFO, OPT_GO):
            self._info(opt, data)
        elif opt == OPT_STRUCTURED_REPLY:
            if data:
                self._error(opt, REP_ERR_INVALID, "STRUCTURED_REPLY takes no data")
            elif self.structured:
                self._error(opt, REP_ERR_INVALID, "structured replies already negotiated")
            else:
                self.structured = True
                self._reply(opt, REP_ACK)
        elif opt in (OPT_LIST_META_CONTEXT, OPT_SET_META_CONTEXT):
            self._meta_context(opt, data)
        else:
            self._error(opt, REP_ERR_UNSUP, f"option {opt} is not supported")

    def _info(self, opt: int, data: bytes) -> None:
        parsed = _parse_info(data)
        if parsed is None:
            self._error(opt, REP_ERR_INVALID, "malformed INFO/GO request")
            return
        name, requests = parsed
        exp = self._named(opt, name)
        if exp is None:
            return
        flags = exp.transmission_flags(self.structured)
        self._reply(opt, REP_INFO, _U16.pack(INFO_EXPORT) + _U64.pack(exp.size) + _U16.pack(flags))
        if INFO_NAME in requests:
            self._reply(opt, REP_INFO, _U16.pack(INFO_NAME) + exp.name.encode())
        if INFO_DESCRIPTION in requests and exp.description:
            self._reply(opt, REP_INFO, _U16.pack(INFO_DESCRIPTION) + exp.description.encode())
        # Block sizes are always sent (qemu-nbd does): a client that did not ask may ignore them.
        self._reply(
            opt,
            REP_INFO,
            _U16.pack(INFO_BLOCK_SIZE)
            + struct.pack(">III", exp.min_block, exp.preferred_block, exp.max_block),
        )
        self._reply(opt, REP_ACK)
        if opt == OPT_GO:
            self._finish(exp)

    def _named(self, opt: int, name: str) -> ExportInfo | None:
        """The export ``name`` selects, or None after telling the client there is none."""
        exp = self._find(name)
        if exp is None:
            self._error(opt, REP_ERR_UNKNOWN, f"no export named {name[:256]!r}")
        return exp

    def _finish(self, exp: ExportInfo) -> None:
        contexts = dict(self._meta) if self._meta_export == exp.name else {}
        self.result = Negotiated(
            exp, self.structured, contexts, exp.transmission_flags(self.structured)
        )
        self.done = True

    def _meta_context(self, opt: int, data: bytes) -> None:
        if not self.structured:
            self._error(opt, REP_ERR_INVALID, "negotiate structured replies first")
            return
        parsed = _parse_meta(data)
        if parsed is None:
            self._error(opt, REP_ERR_INVALID, "malformed meta context request")
            return
        name, queries = parsed
        exp = self._named(opt, name)
        if exp is None:
            return
        listing = opt == OPT_LIST_META_CONTEXT
        chosen: list[int] = []
        if not queries:
            chosen = list(range(len(exp.contexts))) if listing else []
        else:
            for q in queries:
                for i in match_contexts(exp.contexts, q, listing):
                    if i not in chosen:
                        chosen.append(i)
        if not listing:
            self._meta_export = exp.name
            self._meta = {i: exp.contexts[i] for i in chosen}
        for i in chosen:
            ctx_id = 0 if listing else i
            self._reply(opt, REP_META_CONTEXT, _U32.pack(ctx_id) + exp.contexts[i].encode())
        self._reply(opt, REP_ACK)


def match_contexts(contexts: tuple[str, ...], query: str, listing: bool) -> list[int]:
    """Indexes of the contexts a query selects: an exact name; or, when listing, a namespace
    (``base:``, ``qemu:``) or ``qemu:dirty-bitmap:`` alone for all of its contexts. Unknown
    namespaces select nothing (not an error)."""
    if query in contexts:
        return [contexts.index(query)]
    if not listing:
        return []
    if query in ("base:", "qemu:") or query == CTX_DIRTY_BITMAP_PREFIX:
        return [i for i, c in enumerate(contexts) if c.startswith(query)]
    return []


def _decode(data: bytes) -> str | None:
    if len(data) > MAX_STRING or b"\0" in data:
        return None
    try:
        return data.decode()
    except UnicodeDecodeError:
        return None


def _parse_info(data: bytes) -> tuple[str, list[int]] | None:
    if len(data) < 6:
        return None
    (n,) = _U32.unpack_from(data)
    if n > MAX_STRING or 4 + n + 2 > len(data):
        return None
    name = _decode(data[4 : 4 + n])
    (count,) = _U16.unpack_from(data, 4 + n)
    if name is None or len(data) != 4 + n + 2 + 2 * count:
        return None
    reqs = [_U16.unpack_from(data, 6 + n + 2 * i)[0] for i in range(count)]
    return name, reqs


def _parse_meta(data: bytes) -> tuple[str, list[str]] | None:
    if len(data) < 8:
        return None
    (n,) = _U32.unpack_from(data)
    if n > MAX_STRING or 4 + n + 4 > len(data):
        return None
    name = _decode(data[4 : 4 + n])
    pos = 4 + n
    (count,) = _U32.unpack_from(data, pos)
    pos += 4
    if name is None or count > len(data):
        return None
    queries = []
    for _ in range(count):
        if pos + 4 > len(data):
            return None
        (qn,) = _U32.unpack_from(data, pos)
        pos += 4
        if qn > MAX_STRING or pos + qn > len(data):
            return None
        q = _decode(data[pos : pos + qn])
        if q is None:
            return None
        queries.append(q)
        pos += qn
    if pos != len(data):
        return None
    return name, queries
