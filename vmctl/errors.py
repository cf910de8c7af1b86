"""vmctl's errors: one branch of vfs's hierarchy (:mod:`vfs.errors`), so the CLI edge maps them
to a one-line message and an exit code like every other vfs error.

Each error carries what the user needs to see what happened: the QMP message that was sent and
what came back, the QEMU command line and the tail of its stderr or serial log.

::

    VfsError (vfs.errors)
    └── VmError                    vmctl's own errors
        ├── QMPError               anything on a QMP connection
        │   ├── QMPStateError      a call the connection's runstate does not allow (.runstate)
        │   ├── QMPConnectError    no session: socket refused, no greeting, negotiation refused
        │                          (.sent, .received: the negotiation, when it got that far)
        │   ├── QMPProtocolError   the peer sent something that is not QMP (.received, .sent)
        │   ├── QMPExecuteError    QEMU answered a command with an error
        │   │                      (.sent, .received, .error_class, .desc)
        │   ├── QMPTimeout         no answer in time (.sent); the connection stays usable
        │   ├── QMPEventOverflow   an event listener fell too far behind (its events were lost)
        │   └── QMPConnectionLost  the connection closed under a caller: QEMU died or hung up
        │                          (.sent: the command in flight, if any; .cause: why)
        └── QemuError              the QEMU process
            ├── QemuStartError     QEMU exited, or never came up, before the guest was running
            │                      (.argv, .returncode, .stderr_tail)
            ├── QemuExited         QEMU was gone when it was needed (.returncode, .stderr_tail)
            └── GuestTimeout       the guest did not print what we waited for (.serial_tail)
"""

from __future__ import annotations

from typing import Any

from vfs.errors import VfsError


class VmError(VfsError):
    """Base of vmctl's errors."""


# -- QMP ----------------------------------------------------------------------------------------


class QMPError(VmError):
    """Something went wrong on a QMP connection."""


class QMPStateError(QMPError):
    def __init__(self, message: str, runstate: object) -> None:
        super().__init__(message, runstate=str(runstate))
        self.runstate = runstate


class QMPConnectError(QMPError):
    """No QMP session could be established (.sent/.received: the negotiation, if it got there)."""

    def __init__(self, message: str, sent: dict | None = None, received: dict | None = None):
        super().__init__(message)
        self.sent = sent
        self.received = received


class QMPProtocolError(QMPError):
    """The peer broke the protocol: not JSON, not an object, a line too long, a bad reply."""

    def __init__(
        self, message: str, received: bytes | dict | None = None, sent: dict | None = None
    ) -> None:
        super().__init__(message)
        #: What came in: the raw bytes (truncated for huge lines) or the decoded message.
        self.received = received
        #: The command the bad reply answered, when it could be routed to one.
        self.sent = sent

    def __str__(self) -> str:
        if self.received is None:
            return self.message
        shown = repr(self.received)
        if len(shown) > 200:
            shown = shown[:200] + "..."
        return f"{self.message} (received {shown})"


class QMPExecuteError(QMPError):
    """QEMU answered a command with ``{"error": {"class": ..., "desc": ...}}``."""

    def __init__(self, sent: dict, received: dict) -> None:
        err = received.get("error", {})
        self.error_class: str = err.get("class", "")
        self.desc: str = err.get("desc", "")
        super().__init__(f"{sent.get('execute')}: {self.desc} ({self.error_class})")
        self.sent = sent
        self.received = received


class QMPTimeout(QMPError):
    def __init__(self, message: str, sent: dict | None = None) -> None:
        super().__init__(message)
        self.sent = sent


class QMPEventOverflow(QMPError):
    pass


class QMPConnectionLost(QMPError):
    """The connection is gone (EOF, reset, a protocol error) while a caller needed it."""

    def __init__(self, message: str, sent: dict | None = None, cause: BaseException | None = None):
        super().__init__(message)
        self.sent = sent
        self.cause = cause

    def __str__(self) -> str:
        what = f"{self.sent.get('execute')}: " if self.sent else ""
        why = f": {self.cause}" if self.cause is not None and str(self.cause) else ""
        return f"{what}{self.message}{why}"


# -- the QEMU process ---------------------------------------------------------------------------


class QemuError(VmError):
    pass


class QemuStartError(QemuError):
    def __init__(
        self,
        message: str,
        argv: list[str] | None = None,
        returncode: int | None = None,
        stderr_tail: str = "",
        **context: Any,
    ) -> None:
        super().__init__(message, **context)
        self.argv = argv or []
        self.returncode = returncode
        self.stderr_tail = stderr_tail

    def __str__(self) -> str:
        tail = self.stderr_tail.strip().splitlines()
        return self.message + (f": {tail[-1]}" if tail else "")


class QemuExited(QemuError):
    def __init__(self, message: str, returncode: int | None = None, stderr_tail: str = "") -> None:
        super().__init__(message)
        self.returncode = returncode
        self.stderr_tail = stderr_tail


class GuestTimeout(QemuError):
    def __init__(self, message: str, serial_tail: str = "") -> None:
        super().__init__(message)
        self.serial_tail = serial_tail
