"""The QMP client: one connection to one QEMU, on trio.

In the manner of ``qemu.qmp`` (QEMU's own Python library; it is asyncio-only and alpha), written
for trio: explicit connection states with guards, errors that carry what was sent and received
(:mod:`vmctl.errors`), events as a stream, a child logger per connection, command ids, timeouts
and a clean disconnect. Framing and message shapes live in :mod:`vmctl.qmp.framing`, apart from
this API.

Runstates and their transitions::

    IDLE ──connect──► CONNECTING ──greeting + qmp_capabilities──► RUNNING ──disconnect──► CLOSING
                          │ failure                                  │ EOF, reset, bad data     │
                          ▼                                          ▼                          ▼
                        CLOSED ◄───────────────disconnect──────────LOST                     CLOSED

``execute`` and ``listen`` need RUNNING. In LOST they raise :class:`QMPConnectionLost` naming the
cause (QEMU killed, QEMU quit, a protocol violation) at once, so a dead QEMU is a named error and
never a hang; anything waiting when the connection dies — a command, an event stream — gets the
same error. A connection is used once: after CLOSED, open a new one.

Use::

    async with open_qmp("/run/vm/qmp.sock", name="vm1") as qmp:
        with qmp.listen("STOP") as events:
            await qmp.execute("stop")
            await events.wait_for("STOP", timeout=5)
        status = await qmp.execute("query-status")

The reader task lives in the nursery that ``open_qmp`` opens; it never raises into it (a broken
connection is a state, reported to the callers that need the connection), so a dying QEMU does
not cancel the caller's own work.
"""

from __future__ import annotations

import enum
import functools
import inspect
import itertools
import logging
import math
import os
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass, field
from typing import Any, TypeVar

import trio

from vmctl.errors import (
    QMPConnectError,
    QMPConnectionLost,
    QMPError,
    QMPEventOverflow,
    QMPExecuteError,
    QMPProtocolError,
    QMPStateError,
    QMPTimeout,
)
from vmctl.qmp import framing
from vmctl.qmp.framing import Event

log = logging.getLogger("vmctl.qmp")

F = TypeVar("F", bound=Callable[..., Any])

#: How long a command may take by default. Most answer in a millisecond; a few (a big
#: ``blockdev-add``, ``query-qmp-schema`` under TCG) take longer. Pass ``timeout=`` per call.
DEFAULT_COMMAND_TIMEOUT = 60.0
DEFAULT_CONNECT_TIMEOUT = 30.0
#: Events a listener may hold unread before it is declared overflowed.
DEFAULT_EVENT_BUFFER = 1024


class Runstate(enum.Enum):
    IDLE = "idle"
    CONNECTING = "connecting"
    RUNNING = "running"
    LOST = "lost"
    CLOSING = "closing"
    CLOSED = "closed"

    def __str__(self) -> str:
        return self.value


def _require_running(fn: F) -> F:
    """Guard: the call needs a RUNNING connection; a LOST one raises why it was lost.

    For a coroutine the check runs when it is awaited, right before its body, with no
    checkpoint between them (a state checked at call time could be stale by then).
    """
    if inspect.iscoroutinefunction(fn):

        @functools.wraps(fn)
        async def async_wrapper(self: QMPClient, *args: Any, **kwargs: Any) -> Any:
            self._check_running(fn.__name__)
            return await fn(self, *args, **kwargs)

        return async_wrapper  # type: ignore[return-value]

    @functools.wraps(fn)
    def wrapper(self: QMPClient, *args: Any, **kwargs: Any) -> Any:
        self._check_running(fn.__name__)
        return fn(self, *args, **kwargs)

    return wrapper  # type: ignore[return-value]


@dataclass
class _Pending:
    sent: dict[str, Any]
    done: trio.Event = field(default_factory=trio.Event)
    reply: dict[str, Any] | None = None
    error: QMPError | None = None


class EventListener:
    """A stream of the events whose names it was given (all events when given none).

    Iterate it (``async for ev in listener``) or call :meth:`get` / :meth:`wait_for`. Events are
    buffered from the moment the listener is made; one that falls ``buffer`` events behind is
    closed and raises :class:`QMPEventOverflow` (events were dropped, so silence would lie).
    When the connection dies, buffered events are still delivered, then the stream raises
    :class:`QMPConnectionLost`.
    """

    def __init__(self, client: QMPClient, names: frozenset[str], buffer: int) -> None:
        self._client = client
        self.names = names
        self._send, self._recv = trio.open_memory_channel(buffer)
        self._ended: QMPError | None = None

    def __enter__(self) -> EventListener:
        return self

    def __exit__(self, *exc: object) -> None:
        self._client._listeners.discard(self)
        self._send.close()

    def __aiter__(self) -> AsyncIterator[Event]:
        return self

    async def __anext__(self) -> Event:
        return await self.get()

    def _deliver(self, ev: Event) -> None:
        if self.names and ev.name not in self.names:
            return
        try:
            self._send.send_nowait(ev)
        except trio.WouldBlock:
            behind = self._recv.statistics().current_buffer_used
            self._end(QMPEventOverflow(f"event listener fell {behind} events behind; events lost"))
        except trio.ClosedResourceError:
            pass

    def _end(self, error: QMPError) -> None:
        if self._ended is None:
            self._ended = error
        self._send.close()

    async def get(self, timeout: float | None = None) -> Event:
        """The next event (QMPTimeout after ``timeout`` seconds without one)."""
        with trio.move_on_after(math.inf if timeout is None else timeout):
            try:
                return await self._recv.receive()
            except trio.EndOfChannel:
                raise self._ended or QMPConnectionLost("event listener closed") from None
        raise QMPTimeout(f"no event among {sorted(self.names) or 'all'} within {timeout}s")

    async def wait_for(
        self,
        name: str,
        timeout: float | None = None,
        match: Callable[[Event], bool] | None = None,
    ) -> Event:
        """Skip events until one named ``name`` (and satisfying ``match``) arrives."""
        with trio.move_on_after(math.inf if timeout is None else timeout):
            while True:
                ev = await self.get()
                if ev.name == name and (match is None or match(ev)):
                    return ev
        raise QMPTimeout(f"no {name} event within {timeout}s")

    def drain(self) -> list[Event]:
        """The events already buffered, without waiting."""
        out = []
        while True:
            try:
                out.append(self._recv.receive_nowait())
            except (trio.WouldBlock, trio.EndOfChannel):
                return out


class QMPClient:
    """One QMP connection. Make it with :func:`open_qmp` (which owns its reader task)."""

    def __init__(
        self,
        name: str = "qmp",
        *,
        command_timeout: float = DEFAULT_COMMAND_TIMEOUT,
        max_line: int = framing.DEFAULT_MAX_LINE,
        oob: bool = False,
    ) -> None:
        self.name = name
        #: Ask for out-of-band execution at negotiation (when the greeting offers it).
        self.want_oob = oob
        #: Whether it was enabled: ``execute(..., oob=True)`` then bypasses QEMU's main loop.
        self.oob = False
        self.command_timeout = command_timeout
        self.logger = log.getChild(name.replace(".", "_"))
        self.greeting: dict[str, Any] | None = None
        self.qemu_version: tuple[int, int, int] | None = None
        self._runstate = Runstate.IDLE
        self._runstate_changed = trio.Event()
        self._stream: trio.abc.Stream | None = None
        self._framer = framing.LineFramer(max_line)
        self._lines: list[bytes] = []
        self._send_lock = trio.Lock()
        self._ids = itertools.count(1)
        self._pending: dict[str, _Pending] = {}
        self._abandoned: set[str] = set()
        self._listeners: set[EventListener] = set()
        self._lost: QMPConnectionLost | None = None
        self._reader_scope: trio.CancelScope | None = None
        self._expect_eof = False

    # -- state -----------------------------------------------------------------------------------

    @property
    def runstate(self) -> Runstate:
        return self._runstate

    def _set_runstate(self, state: Runstate) -> None:
        if state is self._runstate:
            return
        self.logger.debug("runstate %s -> %s", self._runstate, state)
        self._runstate = state
        self._runstate_changed.set()
        self._runstate_changed = trio.Event()

    async def wait_runstate(self, *states: Runstate, timeout: float | None = None) -> Runstate:
        """Wait until the connection is in one of ``states`` (e.g. LOST: QEMU went away)."""
        with trio.move_on_after(math.inf if timeout is None else timeout):
            while self._runstate not in states:
                await self._runstate_changed.wait()
            return self._runstate
        raise QMPTimeout(f"connection still {self._runstate} after {timeout}s")

    @property
    def lost_reason(self) -> QMPConnectionLost | None:
        """Why the connection was lost (None while it is fine or was closed by us)."""
        return self._lost

    def _check_running(self, what: str) -> None:
        if self._runstate is Runstate.RUNNING:
            return
        if self._runstate is Runstate.LOST and self._lost is not None:
            raise QMPConnectionLost(self._lost.message, cause=self._lost.cause)
        raise QMPStateError(f"{what}: the QMP connection is {self._runstate}", self._runstate)

    # -- session ---------------------------------------------------------------------------------

    async def _start(self, stream: trio.abc.Stream, nursery: trio.Nursery, timeout: float) -> None:
        if self._runstate is not Runstate.IDLE:
            raise QMPStateError(f"connect: the QMP connection is {self._runstate}", self._runstate)
        self._set_runstate(Runstate.CONNECTING)
        self._stream = stream
        sent: dict[str, Any] = {"execute": "qmp_capabilities", "id": "negotiate"}
        try:
            with trio.fail_after(timeout):
                greeting = await self._read_message()
                if greeting is None:
                    raise QMPConnectError("the peer closed the connection before its greeting")
                self.greeting = framing.parse_greeting(greeting)
                self.qemu_version = framing.qemu_version(self.greeting)
                if self.want_oob and "oob" in self.greeting.get("capabilities", []):
                    sent["arguments"] = {"enable": ["oob"]}
                await self._send_line(framing.encode(sent))
                reply = await self._read_message()
                while reply is not None and framing.is_event(reply):
                    reply = await self._read_message()  # events may come before the answer
                if reply is None:
                    raise QMPConnectError("the peer closed the connection during negotiation")
                if "return" not in reply:
                    raise QMPConnectError(
                        f"qmp_capabilities refused: {reply.get('error')}", sent, reply
                    )
        except trio.TooSlowError:
            await self._abort()
            raise QMPConnectError(f"no QMP session within {timeout}s") from None
        except QMPProtocolError as e:
            await self._abort()
            raise QMPConnectError(f"QMP negotiation failed: {e}") from e
        except (OSError, trio.BrokenResourceError) as e:
            await self._abort()
            raise QMPConnectError(f"QMP connection failed: {e}") from e
        except BaseException:
            await self._abort()
            raise
        self.oob = "arguments" in sent
        v = self.qemu_version
        self.logger.debug("connected to QEMU %s", ".".join(map(str, v)) if v else "(unknown)")
        self._set_runstate(Runstate.RUNNING)
        nursery.start_soon(self._reader)

    async def _abort(self) -> None:
        if self._stream is not None:
            with trio.CancelScope(shield=True):
                await self._stream.aclose()
        self._set_runstate(Runstate.CLOSED)

    async def _read_message(self) -> dict[str, Any] | None:
        """The next message (None at EOF); only used before the reader task runs."""
        assert self._stream is not None
        while not self._lines:
            data = await self._stream.receive_some(65536)
            if not data:
                self._framer.eof()
                return None
            self._lines.extend(self._framer.feed(data))
        return framing.decode(self._lines.pop(0))

    async def disconnect(self) -> None:
        """Close the connection; anything still waiting gets QMPConnectionLost. Idempotent."""
        if self._runstate in (Runstate.CLOSING, Runstate.CLOSED):
            return
        was = self._runstate
        self._set_runstate(Runstate.CLOSING)
        if self._reader_scope is not None:
            self._reader_scope.cancel()
        if self._stream is not None:
            with trio.CancelScope(shield=True):
                await self._stream.aclose()
        if was is not Runstate.LOST:
            self._fail_waiters(QMPConnectionLost("disconnected by the client"))
        self._set_runstate(Runstate.CLOSED)

    # -- commands --------------------------------------------------------------------------------

    @_require_running
    async def execute(
        self,
        command: str,
        arguments: dict[str, Any] | None = None,
        *,
        timeout: float | None = None,
        fds: tuple[int, ...] = (),
        oob: bool = False,
    ) -> Any:
        """Run a command; its ``return`` value, or QMPExecuteError / QMPTimeout /
        QMPConnectionLost (each carrying the message sent). ``fds`` are passed to QEMU with
        the command (SCM_RIGHTS, as ``getfd`` wants them). ``oob``: out of band
        (``exec-oob``), answered by QEMU's monitor thread even while its main loop is blocked
        (as a post-copy destination's is, on a page that never comes); only for commands that
        allow it, on a connection negotiated with ``oob``."""
        if oob and not self.oob:
            raise QMPStateError(f"{command}: out-of-band execution was not negotiated",
                                self._runstate)  # fmt: skip
        msg_id = f"{self.name}-{next(self._ids)}"
        sent: dict[str, Any] = {"exec-oob" if oob else "execute": command}
        if arguments is not None:
            sent["arguments"] = arguments
        sent["id"] = msg_id
        pending = _Pending(sent)
        self._pending[msg_id] = pending
        limit = self.command_timeout if timeout is None else timeout
        try:
            if command == "quit":
                self._expect_eof = True
            try:
                await self._send_line(framing.encode(sent), fds)
            except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as e:
                self._connection_lost(QMPConnectionLost("QMP connection broken", cause=e))
            with trio.move_on_after(limit):
                await pending.done.wait()
        finally:
            del self._pending[msg_id]
            if not pending.done.is_set():
                # Timed out or cancelled: a late answer with this id is expected, not a stranger.
                self._abandoned.add(msg_id)
        if not pending.done.is_set():
            raise QMPTimeout(f"{command}: no answer within {limit}s", sent)
        if pending.error is not None:
            if isinstance(pending.error, QMPConnectionLost):
                raise QMPConnectionLost(
                    pending.error.message, sent=sent, cause=pending.error.cause
                ) from pending.error.cause
            raise pending.error
        reply = pending.reply
        assert reply is not None
        if "error" in reply:
            raise QMPExecuteError(sent, reply)
        return reply["return"]

    async def _send_line(self, data: bytes, fds: tuple[int, ...] = ()) -> None:
        assert self._stream is not None
        async with self._send_lock:
            self.logger.debug("-> %s", data[:500].decode(errors="replace").rstrip())
            if fds:
                # The descriptors ride on the first bytes of the command (QEMU takes them from
                # the message that carries them); the rest, if any, goes as usual.
                import array
                import socket

                sock = getattr(self._stream, "socket", None)
                if sock is None or sock.family != socket.AF_UNIX:
                    raise QMPError("file descriptors can only be passed over a Unix socket")
                anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds).tobytes())]
                data = data[await sock.sendmsg([data], anc) :]
            if data:
                await self._stream.send_all(data)

    # -- events ----------------------------------------------------------------------------------

    @_require_running
    def listen(self, *names: str, buffer: int = DEFAULT_EVENT_BUFFER) -> EventListener:
        """A stream of the named events (all if none), buffered from now; use as ``with``."""
        listener = EventListener(self, frozenset(names), buffer)
        self._listeners.add(listener)
        return listener

    # -- the reader ------------------------------------------------------------------------------

    async def _reader(self) -> None:
        assert self._stream is not None
        with trio.CancelScope() as scope:
            self._reader_scope = scope
            try:
                for line in self._lines:
                    self._dispatch(framing.decode(line))
                self._lines.clear()
                while True:
                    data = await self._stream.receive_some(65536)
                    if not data:
                        self._framer.eof()
                        why = "QEMU quit" if self._expect_eof else "QEMU closed the connection"
                        self._connection_lost(QMPConnectionLost(why))
                        return
                    for line in self._framer.feed(data):
                        self._dispatch(framing.decode(line))
            except QMPProtocolError as e:
                self.logger.info("protocol error, dropping the connection: %s", e)
                self._connection_lost(QMPConnectionLost("QMP protocol violation", cause=e))
            except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as e:
                # A reset is how a dying QEMU often hangs up (it left our bytes unread).
                self._connection_lost(QMPConnectionLost("QEMU closed the connection", cause=e))

    def _dispatch(self, msg: dict[str, Any]) -> None:
        if framing.is_event(msg):
            ev = framing.parse_event(msg)
            self.logger.debug("<- event %s %s", ev.name, ev.data)
            for listener in list(self._listeners):
                listener._deliver(ev)
            return
        msg_id = msg.get("id")
        pending = self._pending.get(msg_id) if isinstance(msg_id, str) else None
        if pending is not None:
            self.logger.debug("<- %s", str(msg)[:500])
            try:
                framing.check_reply(msg, pending.sent)
            except QMPProtocolError as e:
                pending.error = e
            else:
                pending.reply = msg
            pending.done.set()
            return
        if "id" not in msg and "error" in msg:
            # QEMU answers without an id only when it could not parse what it got: our stream
            # and its parser disagree, and nothing said after this can be trusted.
            raise QMPProtocolError("an error without an id: the server could not parse us", msg)
        if isinstance(msg_id, str) and msg_id in self._abandoned:
            self._abandoned.discard(msg_id)
            self.logger.debug("late answer to abandoned command %s dropped", msg_id)
            return
        # qmp-spec: clients should drop responses with an unknown id.
        self.logger.warning("answer with an unknown id %r dropped", msg_id)

    def _connection_lost(self, error: QMPConnectionLost) -> None:
        if self._runstate is not Runstate.RUNNING:
            return
        if error.cause is not None or not self._expect_eof:
            self.logger.info("%s", error)
        self._lost = error
        self._set_runstate(Runstate.LOST)
        self._fail_waiters(error)

    def _fail_waiters(self, error: QMPConnectionLost) -> None:
        for pending in self._pending.values():
            if not pending.done.is_set():
                pending.error = error
                pending.done.set()
        for listener in list(self._listeners):
            listener._end(error)


@asynccontextmanager
async def open_qmp(
    target: str | os.PathLike[str] | trio.abc.Stream,
    *,
    name: str = "qmp",
    connect_timeout: float = DEFAULT_CONNECT_TIMEOUT,
    command_timeout: float = DEFAULT_COMMAND_TIMEOUT,
    max_line: int = framing.DEFAULT_MAX_LINE,
    oob: bool = False,
) -> AsyncIterator[QMPClient]:
    """Connect to a QMP unix socket (or use a connected stream), negotiate (with out-of-band
    execution if ``oob`` and QEMU offers it), yield the client; disconnect on the way out,
    whatever happened."""
    client = QMPClient(name, command_timeout=command_timeout, max_line=max_line, oob=oob)
    if isinstance(target, trio.abc.Stream):
        stream = target
    else:
        try:
            stream = await trio.open_unix_socket(os.fspath(target))
        except OSError as e:
            why = e.strerror or e
            raise QMPConnectError(f"cannot connect to QMP socket {target}: {why}") from e
    with _unwrap_single_exception():
        async with trio.open_nursery() as nursery:
            await client._start(stream, nursery, connect_timeout)
            try:
                yield client
            finally:
                await client.disconnect()


@contextmanager
def _unwrap_single_exception() -> Iterator[None]:
    """The reader task never raises, so an exception group out of the nursery holds only the
    caller's own exception: give the caller that, not a group it did not ask for."""
    try:
        yield
    except BaseExceptionGroup as group:
        if len(group.exceptions) == 1:
            raise group.exceptions[0] from None
        raise
