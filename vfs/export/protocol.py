"""The NBD protocol, sans I/O: its constants and bounds, request parsing, request validation
and reply encoding (the server side of the handshake is :mod:`vfs.export.handshake`). No
sockets here: :mod:`vfs.export.nbd_server` moves the bytes, tests (and the fuzzer) drive these
classes with byte strings.

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

_REQ = struct.Struct(">IHHQQI")
_SIMPLE = struct.Struct(">IIQ")
_CHUNK = struct.Struct(">IHHQI")
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
