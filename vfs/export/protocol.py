"""The NBD protocol, sans I/O: the server side of the fixed-newstyle handshake, request parsing,
request validation and reply encoding. No sockets here: :mod:`vfs.export.nbd_server` moves the
bytes, tests (and the fuzzer) drive these classes with byte strings.

Reference: the NBD protocol (NetworkBlockDevice/nbd ``doc/proto.md``), as spoken by qemu-nbd
7.2, nbdkit 1.32 and libnbd 1.14. What this server supports (``docs/export.md``):

- fixed newstyle only (no oldstyle), ``NO_ZEROES``; options ``EXPORT_NAME``, ``ABORT``, ``LIST``,
  ``INFO``, ``GO``, ``STRUCTURED_REPLY``, ``LIST_META_CONTEXT``, ``SET_META_CONTEXT``;
  ``STARTTLS`` is refused with ``ERR_POLICY`` (sockets are local: 0600 Unix sockets or
  127.0.0.1), every other option with ``ERR_UNSUP``;
- commands ``READ``, ``WRITE`` (``FUA``), ``DISC``, ``FLUSH``, ``TRIM`` (``FUA``),
  ``CACHE``, ``WRITE_ZEROES`` (``FUA``, ``NO_HOLE``, ``FAST_ZERO``), ``BLOCK_STATUS``
  (``REQ_ONE``), with simple or structured replies;
- meta contexts ``base:allocation``, ``qemu:allocation-depth`` and ``qemu:dirty-bitmap:NAME``.

Hostile input never raises anything but :class:`ProtocolError` (whose answer is a hard
disconnect, as the spec allows for violations) and never allocates more than the bounds below.
"""

from __future__ import annotations

import errno as _errno
import logging
import struct
from dataclasses import dataclass, field

log = logging.getLogger(__name__)

# ---------------------------------------------------------------------------- magic numbers
NBDMAGIC = 0x4E42444D41474943  # "NBDMAGIC"
IHAVEOPT = 0x49484156454F5054  # "IHAVEOPT"
OPTION_REPLY_MAGIC = 0x0003E889045565A9
REQUEST_MAGIC = 0x25609513
SIMPLE_REPLY_MAGIC = 0x67446698
STRUCTURED_REPLY_MAGIC = 0x668E33EF

# handshake flags (server) and client flags
FLAG_FIXED_NEWSTYLE = 1 << 0
FLAG_NO_ZEROES = 1 << 1
FLAG_C_FIXED_NEWSTYLE = 1 << 0
FLAG_C_NO_ZEROES = 1 << 1

# transmission flags
FLAG_HAS_FLAGS = 1 << 0
FLAG_READ_ONLY = 1 << 1
FLAG_SEND_FLUSH = 1 << 2
FLAG_SEND_FUA = 1 << 3
FLAG_ROTATIONAL = 1 << 4
FLAG_SEND_TRIM = 1 << 5
FLAG_SEND_WRITE_ZEROES = 1 << 6
FLAG_SEND_DF = 1 << 7
FLAG_CAN_MULTI_CONN = 1 << 8
FLAG_SEND_RESIZE = 1 << 9
FLAG_SEND_CACHE = 1 << 10
FLAG_SEND_FAST_ZERO = 1 << 11

# options
OPT_EXPORT_NAME = 1
OPT_ABORT = 2
OPT_LIST = 3
OPT_STARTTLS = 5
OPT_INFO = 6
OPT_GO = 7
OPT_STRUCTURED_REPLY = 8
OPT_LIST_META_CONTEXT = 9
OPT_SET_META_CONTEXT = 10

# option replies
REP_ACK = 1
REP_SERVER = 2
REP_INFO = 3
REP_META_CONTEXT = 4
REP_ERR_UNSUP = (1 << 31) + 1
REP_ERR_POLICY = (1 << 31) + 2
REP_ERR_INVALID = (1 << 31) + 3
REP_ERR_PLATFORM = (1 << 31) + 4
REP_ERR_TLS_REQD = (1 << 31) + 5
REP_ERR_UNKNOWN = (1 << 31) + 6
REP_ERR_SHUTDOWN = (1 << 31) + 7
REP_ERR_BLOCK_SIZE_REQD = (1 << 31) + 8
REP_ERR_TOO_BIG = (1 << 31) + 9

# NBD_INFO_* (in NBD_REP_INFO)
INFO_EXPORT = 0
INFO_NAME = 1
INFO_DESCRIPTION = 2
INFO_BLOCK_SIZE = 3

# commands
CMD_READ = 0
CMD_WRITE = 1
CMD_DISC = 2
CMD_FLUSH = 3
CMD_TRIM = 4
CMD_CACHE = 5
CMD_WRITE_ZEROES = 6
CMD_BLOCK_STATUS = 7
CMD_NAMES = {
    CMD_READ: "READ",
    CMD_WRITE: "WRITE",
    CMD_DISC: "DISC",
    CMD_FLUSH: "FLUSH",
    CMD_TRIM: "TRIM",
    CMD_CACHE: "CACHE",
    CMD_WRITE_ZEROES: "WRITE_ZEROES",
    CMD_BLOCK_STATUS: "BLOCK_STATUS",
}

# command flags
CMD_FLAG_FUA = 1 << 0
CMD_FLAG_NO_HOLE = 1 << 1
CMD_FLAG_DF = 1 << 2
CMD_FLAG_REQ_ONE = 1 << 3
CMD_FLAG_FAST_ZERO = 1 << 4

# structured reply types and flags
REPLY_FLAG_DONE = 1 << 0
REPLY_TYPE_NONE = 0
REPLY_TYPE_OFFSET_DATA = 1
REPLY_TYPE_OFFSET_HOLE = 2
REPLY_TYPE_BLOCK_STATUS = 5
REPLY_TYPE_ERROR = (1 << 15) + 1
REPLY_TYPE_ERROR_OFFSET = (1 << 15) + 2

# block status flags
STATE_HOLE = 1 << 0
STATE_ZERO = 1 << 1
STATE_DIRTY = 1 << 0

# errors on the wire (the spec's values, which are Linux's)
EPERM = 1
EIO = 5
ENOMEM = 12
EINVAL = 22
ENOSPC = 28
EOVERFLOW = 75
ENOTSUP = 95
ESHUTDOWN = 108
WIRE_ERRORS = {EPERM, EIO, ENOMEM, EINVAL, ENOSPC, EOVERFLOW, ENOTSUP, ESHUTDOWN}

# meta contexts
CTX_BASE_ALLOCATION = "base:allocation"
CTX_ALLOCATION_DEPTH = "qemu:allocation-depth"
CTX_DIRTY_BITMAP_PREFIX = "qemu:dirty-bitmap:"

# ---------------------------------------------------------------------------- bounds
#: Largest option payload accepted (export names and queries are at most 4096 bytes each;
#: a SET_META_CONTEXT may carry several). Longer: ERR_TOO_BIG after skipping it, past
#: MAX_OPTION_SKIP: a hard disconnect.
MAX_OPTION = 64 * 1024
MAX_OPTION_SKIP = 16 << 20
#: Options a client may send before choosing an export (a client looping forever is cut off).
MAX_OPTIONS = 1024
MAX_STRING = 4096
#: Largest READ/WRITE payload (the block size maximum we advertise, as qemu-nbd: 32 MiB).
MAX_PAYLOAD = 32 << 20
#: Write payloads past MAX_PAYLOAD are read and dropped (answered EINVAL) up to this many bytes
#: in total; a client sending more is disconnected.
MAX_SKIP = 1 << 32
#: Preferred and minimum block sizes we advertise (byte-granular requests work).
MIN_BLOCK = 1
PREFERRED_BLOCK = 4096

_OPT_HDR = struct.Struct(">QII")
_OPT_REPLY = struct.Struct(">QIII")
_REQ = struct.Struct(">IHHQQI")
_SIMPLE = struct.Struct(">IIQ")
_CHUNK = struct.Struct(">IHHQI")
_U16 = struct.Struct(">H")
_U32 = struct.Struct(">I")
_U64 = struct.Struct(">Q")
REQUEST_SIZE = _REQ.size  # 28


class ProtocolError(Exception):
    """The peer broke a MUST of the protocol: the connection ends (hard disconnect)."""


@dataclass(frozen=True)
class ExportInfo:
    """What the handshake tells a client about one export."""

    name: str
    size: int
    readonly: bool
    description: str = ""
    #: Meta contexts this export can serve, in id order (ids are list indexes).
    contexts: tuple[str, ...] = (CTX_BASE_ALLOCATION, CTX_ALLOCATION_DEPTH)
    multi_conn: bool = True
    rotational: bool = False
    min_block: int = MIN_BLOCK
    preferred_block: int = PREFERRED_BLOCK
    max_block: int = MAX_PAYLOAD

    def transmission_flags(self, structured: bool) -> int:
        f = FLAG_HAS_FLAGS | FLAG_SEND_FLUSH | FLAG_SEND_FUA | FLAG_SEND_CACHE
        if self.readonly:
            f |= FLAG_READ_ONLY
        else:
            f |= FLAG_SEND_TRIM | FLAG_SEND_WRITE_ZEROES | FLAG_SEND_FAST_ZERO
        if structured:
            f |= FLAG_SEND_DF
        if self.multi_conn:
            f |= FLAG_CAN_MULTI_CONN
        if self.rotational:
            f |= FLAG_ROTATIONAL
        return f


@dataclass
class Negotiated:
    """The outcome of a handshake: which export, in which mode."""

    export: ExportInfo
    structured: bool
    #: context id -> context name, as selected by the client's last SET_META_CONTEXT.
    contexts: dict[int, str] = field(default_factory=dict)
    flags: int = 0


# ---------------------------------------------------------------------------- handshake
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
        exp = self._find(name)
        if exp is None:
            self._error(opt, REP_ERR_UNKNOWN, f"no export named {name[:256]!r}")
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
        exp = self._find(name)
        if exp is None:
            self._error(opt, REP_ERR_UNKNOWN, f"no export named {name[:256]!r}")
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


# ---------------------------------------------------------------------------- requests
@dataclass(slots=True)
class Request:
    """One transmission-phase request. ``payload`` is the data of a WRITE; ``error`` is set
    when the parser already knows the answer (an oversized write whose data it dropped)."""

    flags: int
    cmd: int
    handle: int
    offset: int
    length: int
    payload: bytes | bytearray | None = None
    error: int = 0


class RequestParser:
    """Splits the client's byte stream into :class:`Request` objects.

    A bad magic is a :class:`ProtocolError` (we cannot find the next request). A WRITE longer
    than ``max_payload`` has its data read and dropped (bounded by :data:`MAX_SKIP`), and is
    returned with ``error = EINVAL``: the client gets an error, not a disconnect. A payload is
    copied once, from what ``feed`` is given into the request's own buffer."""

    def __init__(self, max_payload: int = MAX_PAYLOAD) -> None:
        self.max_payload = max_payload
        self._hdr = bytearray()  # a partial request header
        self._req: Request | None = None  # a WRITE whose payload is arriving
        self._payload: bytearray | None = None
        self._have = 0
        self._skip = 0  # bytes of an oversized payload still to drop

    def feed(self, data: bytes | bytearray | memoryview) -> list[Request]:
        mv = memoryview(data)
        if mv.format != "B" or mv.ndim != 1:
            mv = mv.cast("B")
        n = len(mv)
        pos = 0
        out: list[Request] = []
        unpack = _REQ.unpack_from
        while True:
            req = self._req
            if req is not None:
                if self._skip:
                    k = min(self._skip, n - pos)
                    pos += k
                    self._skip -= k
                    if self._skip:
                        break
                else:
                    payload = self._payload
                    assert payload is not None
                    k = min(len(payload) - self._have, n - pos)
                    payload[self._have : self._have + k] = mv[pos : pos + k]
                    self._have += k
                    pos += k
                    if self._have < len(payload):
                        break
                    req.payload = payload  # type: ignore[assignment]
                    self._payload = None
                out.append(req)
                self._req = None
                continue
            if self._hdr:
                k = min(REQUEST_SIZE - len(self._hdr), n - pos)
                self._hdr += mv[pos : pos + k]
                pos += k
                if len(self._hdr) < REQUEST_SIZE:
                    break
                fields = unpack(self._hdr)
                self._hdr.clear()
            elif n - pos >= REQUEST_SIZE:
                fields = unpack(mv, pos)
                pos += REQUEST_SIZE
            else:
                if pos < n:
                    self._hdr += mv[pos:]
                break
            magic, flags, cmd, handle, offset, length = fields
            if magic != REQUEST_MAGIC:
                raise ProtocolError(f"bad request magic {magic:#x}")
            if cmd != CMD_WRITE:
                out.append(Request(flags, cmd, handle, offset, length))
                continue
            if length > self.max_payload:
                if length > MAX_SKIP:
                    raise ProtocolError(f"WRITE of {length} bytes")
                self._req = Request(flags, cmd, handle, offset, length, None, EINVAL)
                self._skip = length
                continue
            if n - pos >= length:  # the whole payload is here: one copy
                out.append(
                    Request(flags, cmd, handle, offset, length, bytes(mv[pos : pos + length]))
                )
                pos += length
                continue
            self._req = Request(flags, cmd, handle, offset, length)
            self._payload = bytearray(length)
            self._have = 0
        return out

    @property
    def pending(self) -> int:
        """Bytes held for an incomplete request (for tests)."""
        return len(self._hdr) + (self._have if self._payload is not None else 0)


_ALLOWED_FLAGS = {
    CMD_READ: CMD_FLAG_DF,
    CMD_WRITE: CMD_FLAG_FUA,
    CMD_DISC: 0,
    CMD_FLUSH: 0,
    CMD_TRIM: CMD_FLAG_FUA,
    CMD_CACHE: 0,
    CMD_WRITE_ZEROES: CMD_FLAG_FUA | CMD_FLAG_NO_HOLE | CMD_FLAG_FAST_ZERO,
    CMD_BLOCK_STATUS: CMD_FLAG_REQ_ONE,
}
_WRITES = (CMD_WRITE, CMD_TRIM, CMD_WRITE_ZEROES)


def check_request(req: Request, neg: Negotiated) -> tuple[int, str]:
    """The error a request gets before it touches the export ((0, '') when it is valid):
    unknown commands and flags, ranges past the end, writes to a read-only export, lengths
    over the limits. Writes past the end get ENOSPC, other ranges EINVAL (as nbdkit)."""
    if req.error:
        return req.error, f"{CMD_NAMES.get(req.cmd, req.cmd)} of {req.length} bytes is too long"
    cmd = req.cmd
    allowed = _ALLOWED_FLAGS.get(cmd)
    if allowed is None:
        return EINVAL, f"unknown command {cmd}"
    if req.flags & ~allowed:
        return EINVAL, f"unsupported flags {req.flags:#x} for {CMD_NAMES[cmd]}"
    if cmd == CMD_READ and req.flags & CMD_FLAG_DF and not neg.structured:
        return EINVAL, "DF without structured replies"
    exp = neg.export
    if cmd in _WRITES and exp.readonly:
        return EPERM, "export is read-only"
    if cmd in (CMD_DISC, CMD_FLUSH):
        if req.offset or req.length:
            return EINVAL, f"{CMD_NAMES[cmd]} takes no offset or length"
        return 0, ""
    if cmd == CMD_BLOCK_STATUS:
        if not neg.contexts:
            return EINVAL, "no meta context was negotiated"
        if not req.length:
            return EINVAL, "zero-length BLOCK_STATUS"
    if cmd in (CMD_READ, CMD_WRITE) and req.length > exp.max_block:
        return (EOVERFLOW if cmd == CMD_READ and neg.structured else EINVAL), "request too long"
    if req.offset > exp.size or req.length > exp.size - req.offset:
        return (ENOSPC if cmd in _WRITES else EINVAL), (
            f"range {req.offset}+{req.length} is past the end of the export ({exp.size})"
        )
    if cmd == CMD_WRITE_ZEROES and req.flags & CMD_FLAG_FAST_ZERO and req.flags & CMD_FLAG_NO_HOLE:
        # writing real zeros is as slow as a write: the fast-zero contract says to refuse
        return ENOTSUP, "a fast zero cannot keep the range allocated"
    return 0, ""


def wire_errno(err: int) -> int:
    """Map a host errno to one of the values the protocol defines (others become EIO)."""
    if err in WIRE_ERRORS:
        return err
    if err in (_errno.EROFS, _errno.EACCES):
        return EPERM
    if err == _errno.EDQUOT:
        return ENOSPC
    if err == _errno.EOPNOTSUPP:
        return ENOTSUP
    return EIO


# ---------------------------------------------------------------------------- replies
def simple_reply(handle: int, error: int = 0) -> bytes:
    return _SIMPLE.pack(SIMPLE_REPLY_MAGIC, error, handle)


def chunk_header(flags: int, rtype: int, handle: int, length: int) -> bytes:
    return _CHUNK.pack(STRUCTURED_REPLY_MAGIC, flags, rtype, handle, length)


def structured_none(handle: int) -> bytes:
    return _CHUNK.pack(STRUCTURED_REPLY_MAGIC, REPLY_FLAG_DONE, REPLY_TYPE_NONE, handle, 0)


def structured_data_header(handle: int, offset: int, length: int, done: bool = True) -> bytes:
    """The header of an OFFSET_DATA chunk; ``length`` bytes of data follow it."""
    return _CHUNK.pack(
        STRUCTURED_REPLY_MAGIC,
        REPLY_FLAG_DONE if done else 0,
        REPLY_TYPE_OFFSET_DATA,
        handle,
        8 + length,
    ) + _U64.pack(offset)


def structured_hole(handle: int, offset: int, length: int, done: bool = False) -> bytes:
    return _CHUNK.pack(
        STRUCTURED_REPLY_MAGIC,
        REPLY_FLAG_DONE if done else 0,
        REPLY_TYPE_OFFSET_HOLE,
        handle,
        12,
    ) + struct.pack(">QI", offset, length)


def structured_error(handle: int, error: int, message: str = "") -> bytes:
    msg = message.encode()[:MAX_STRING]
    return (
        _CHUNK.pack(STRUCTURED_REPLY_MAGIC, REPLY_FLAG_DONE, REPLY_TYPE_ERROR, handle, 6 + len(msg))
        + struct.pack(">IH", error, len(msg))
        + msg
    )


def block_status_chunk(
    handle: int, ctx_id: int, extents: list[tuple[int, int]], done: bool
) -> bytes:
    """A BLOCK_STATUS chunk: (length, flags) descriptors for one meta context."""
    body = b"".join(struct.pack(">II", n, f) for n, f in extents)
    return (
        _CHUNK.pack(
            STRUCTURED_REPLY_MAGIC,
            REPLY_FLAG_DONE if done else 0,
            REPLY_TYPE_BLOCK_STATUS,
            handle,
            4 + len(body),
        )
        + _U32.pack(ctx_id)
        + body
    )


def error_reply(neg: Negotiated, req: Request, error: int, message: str) -> bytes:
    """An error answer in the negotiated style (structured replies carry the message)."""
    if neg.structured:
        return structured_error(req.handle, error, message)
    return simple_reply(req.handle, error)
