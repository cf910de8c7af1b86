"""QMP framing and message shapes, with no I/O (the client feeds it bytes and gets messages).

QMP (QEMU's ``docs/interop/qmp-spec``) is one JSON object per line in both directions; QEMU ends
its lines with CRLF. The server speaks first with a greeting, then sends replies to commands
(matched by the ``id`` the client chose) and asynchronous events, interleaved::

    greeting  {"QMP": {"version": {...}, "capabilities": [...]}}
    success   {"return": VALUE, "id": ID}
    error     {"error": {"class": STR, "desc": STR}, "id": ID}
    event     {"event": STR, "data": {...}, "timestamp": {"seconds": N, "microseconds": N}}

Everything from the peer is untrusted: bytes that are not UTF-8 JSON, a value that is not an
object, an object of none of these shapes, NaN, nesting deep enough to blow the parser's stack,
a line longer than ``max_line`` — each is a :class:`QMPProtocolError` carrying (a prefix of) what
was received, never another exception and never unbounded memory. ``LineFramer`` scans each byte
once, so a multi-megabyte reply arriving in small pieces costs linear time.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from vmctl.errors import QMPProtocolError

#: Longest line accepted from the peer. QEMU's biggest replies (query-qmp-schema) are ~200 KiB;
#: libvirt allows 10 MiB. Past this the connection is dropped rather than buffering forever.
DEFAULT_MAX_LINE = 16 << 20
#: How much of a bad line an error keeps.
_SHOWN = 256


class LineFramer:
    """Split a byte stream into lines of at most ``max_line`` bytes (without the newline)."""

    def __init__(self, max_line: int = DEFAULT_MAX_LINE) -> None:
        self.max_line = max_line
        self._buf = bytearray()
        self._scanned = 0  # bytes of _buf known to hold no newline

    def feed(self, data: bytes) -> list[bytes]:
        """Add received bytes; return every line they complete (blank lines dropped)."""
        self._buf += data
        lines: list[bytes] = []
        start = 0
        while True:
            nl = self._buf.find(b"\n", max(start, self._scanned))
            if nl < 0:
                break
            line = bytes(self._buf[start:nl])
            self._check_length(len(line), line)
            if line.strip():
                lines.append(line)
            start = nl + 1
            self._scanned = start
        if start:
            del self._buf[:start]
        self._scanned = len(self._buf)
        self._check_length(len(self._buf), bytes(self._buf[:_SHOWN]))
        return lines

    def eof(self) -> None:
        """The peer closed: anything left unterminated is a truncated message."""
        if self._buf.strip():
            raise QMPProtocolError(
                "connection closed in the middle of a message", bytes(self._buf[:_SHOWN])
            )

    @property
    def buffered(self) -> int:
        return len(self._buf)

    def _check_length(self, n: int, head: bytes) -> None:
        if n > self.max_line:
            raise QMPProtocolError(
                f"line longer than {self.max_line} bytes from the peer", head[:_SHOWN]
            )


def _reject_constant(name: str) -> Any:
    raise ValueError(f"non-standard JSON constant {name}")


def decode(line: bytes) -> dict[str, Any]:
    """One line → one JSON object, or QMPProtocolError."""
    try:
        value = json.loads(line.decode("utf-8"), parse_constant=_reject_constant)
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        raise QMPProtocolError(f"not JSON: {e}", line[:_SHOWN]) from None
    if not isinstance(value, dict):
        raise QMPProtocolError("a QMP message must be a JSON object", line[:_SHOWN])
    return value


def encode(msg: dict[str, Any]) -> bytes:
    """A message as one line (compact JSON, ASCII-safe, newline-terminated)."""
    return json.dumps(msg, separators=(",", ":"), allow_nan=False).encode() + b"\n"


@dataclass(frozen=True)
class Event:
    """An asynchronous event from QEMU (``STOP``, ``RESUME``, ``BLOCK_JOB_READY``...)."""

    name: str
    data: dict[str, Any] = field(default_factory=dict)
    #: Seconds since the epoch, from QEMU's clock (``timestamp.seconds + microseconds/1e6``).
    timestamp: float = 0.0


def is_event(msg: dict[str, Any]) -> bool:
    return "event" in msg


def parse_event(msg: dict[str, Any]) -> Event:
    name, data, ts = msg.get("event"), msg.get("data", {}), msg.get("timestamp", {})
    if not isinstance(name, str) or not isinstance(data, dict) or not isinstance(ts, dict):
        raise QMPProtocolError("malformed event", msg)
    secs, usecs = ts.get("seconds", 0), ts.get("microseconds", 0)
    if not all(isinstance(v, int) and not isinstance(v, bool) for v in (secs, usecs)):
        raise QMPProtocolError("malformed event timestamp", msg)
    return Event(name, data, secs + usecs / 1e6)


def parse_greeting(msg: dict[str, Any]) -> dict[str, Any]:
    """The ``QMP`` member of a greeting (version and capabilities), checked for shape."""
    body = msg.get("QMP")
    if not isinstance(body, dict):
        raise QMPProtocolError("expected the QMP greeting", msg)
    caps = body.get("capabilities", [])
    if not isinstance(caps, list) or not isinstance(body.get("version", {}), dict):
        raise QMPProtocolError("malformed QMP greeting", msg)
    return body


def qemu_version(greeting: dict[str, Any]) -> tuple[int, int, int] | None:
    v = greeting.get("version", {}).get("qemu", {})
    try:
        return int(v["major"]), int(v["minor"]), int(v["micro"])
    except (KeyError, TypeError, ValueError):
        return None


def check_reply(msg: dict[str, Any], sent: dict[str, Any] | None = None) -> None:
    """A routed reply must hold ``return``, or ``error`` with string ``class`` and ``desc``."""
    if "return" in msg:
        return
    err = msg.get("error")
    if (
        isinstance(err, dict)
        and isinstance(err.get("class"), str)
        and isinstance(err.get("desc"), str)
    ):
        return
    raise QMPProtocolError("malformed reply (neither return nor a well-formed error)", msg, sent)
