"""vmctl.qmp's client against a scripted peer over an in-memory stream: states, ids, timeouts,
events, errors that carry what was sent and received, and a hostile peer (fuzzed). The same
client against a real QEMU is in test_qmp_qemu.py."""

from __future__ import annotations

import logging
from contextlib import asynccontextmanager
from typing import Any

import pytest
import trio
import trio.testing
from hypothesis import given, settings
from hypothesis import strategies as st

from vmctl.errors import (
    QMPConnectError,
    QMPConnectionLost,
    QMPEventOverflow,
    QMPExecuteError,
    QMPProtocolError,
    QMPStateError,
    QMPTimeout,
)
from vmctl.qmp import Runstate, open_qmp
from vmctl.qmp.framing import LineFramer, decode, encode

GREETING = {
    "QMP": {
        "version": {"qemu": {"major": 7, "minor": 2, "micro": 22}, "package": "test"},
        "capabilities": ["oob"],
    }
}


class Peer:
    """The server end, scripted by the test."""

    def __init__(self, stream: trio.abc.Stream) -> None:
        self.stream = stream
        self.framer = LineFramer()
        self.lines: list[bytes] = []

    async def send(self, msg: dict | bytes) -> None:
        await self.stream.send_all(msg if isinstance(msg, bytes) else encode(msg))

    async def recv(self) -> dict[str, Any]:
        while not self.lines:
            data = await self.stream.receive_some(65536)
            assert data, "client closed"
            self.lines += self.framer.feed(data)
        return decode(self.lines.pop(0))

    async def handshake(self) -> None:
        await self.send(GREETING)
        msg = await self.recv()
        assert msg["execute"] == "qmp_capabilities"
        assert "arguments" not in msg  # no oob asked for
        await self.send({"return": {}, "id": msg["id"]})

    async def answer(self, result: Any = None) -> dict[str, Any]:
        msg = await self.recv()
        await self.send({"return": {} if result is None else result, "id": msg["id"]})
        return msg


@asynccontextmanager
async def connected(**kwargs: Any):
    client_end, server_end = trio.testing.memory_stream_pair()
    peer = Peer(server_end)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(peer.handshake)
        async with open_qmp(client_end, name="t", **kwargs) as qmp:
            yield qmp, peer


async def test_execute_matches_replies_by_id_out_of_order():
    async with connected() as (qmp, peer):
        assert qmp.runstate is Runstate.RUNNING and qmp.qemu_version == (7, 2, 22)
        results: dict[str, Any] = {}

        async def run(cmd: str) -> None:
            results[cmd] = await qmp.execute(cmd, {"n": cmd})

        async with trio.open_nursery() as nursery:
            nursery.start_soon(run, "a")
            nursery.start_soon(run, "b")
            first, second = await peer.recv(), await peer.recv()
            assert first["id"] != second["id"]
            for msg in (second, first):  # answer in the other order
                await peer.send({"return": msg["arguments"]["n"].upper(), "id": msg["id"]})
        assert results == {"a": "A", "b": "B"}
    assert qmp.runstate is Runstate.CLOSED


async def test_error_reply_carries_what_was_sent_and_received():
    async with connected() as (qmp, peer):
        async with trio.open_nursery() as nursery:

            async def bad() -> None:
                msg = await peer.recv()
                await peer.send(
                    {"error": {"class": "GenericError", "desc": "no such thing"}, "id": msg["id"]}
                )

            nursery.start_soon(bad)
            with pytest.raises(QMPExecuteError) as info:
                await qmp.execute("frob", {"x": 1})
        e = info.value
        assert e.sent["execute"] == "frob" and e.sent["arguments"] == {"x": 1}
        assert e.received["error"]["desc"] == "no such thing"
        assert e.error_class == "GenericError" and "no such thing" in str(e)
        assert qmp.runstate is Runstate.RUNNING  # an error reply is not a broken connection


@pytest.mark.log_warnings
async def test_unknown_ids_are_dropped_with_a_warning(caplog: pytest.LogCaptureFixture):
    async with connected() as (qmp, peer):
        async with trio.open_nursery() as nursery:

            async def answer() -> None:
                msg = await peer.recv()
                await peer.send({"return": "stranger", "id": "nobody-asked"})
                await peer.send({"return": "stranger", "id": 12})
                await peer.send({"return": "mine", "id": msg["id"]})

            nursery.start_soon(answer)
            with caplog.at_level(logging.WARNING, logger="vmctl"):
                assert await qmp.execute("x") == "mine"
        assert sum("unknown id" in r.getMessage() for r in caplog.records) == 2


async def test_timeout_carries_sent_and_a_late_answer_is_dropped_quietly():
    async with connected() as (qmp, peer):
        with pytest.raises(QMPTimeout) as info:
            await qmp.execute("slow", timeout=0.1)
        late = await peer.recv()
        assert info.value.sent == late
        await peer.send({"return": "too late", "id": late["id"]})  # no warning for this one
        async with trio.open_nursery() as nursery:
            nursery.start_soon(peer.answer, "fine")
            assert await qmp.execute("next") == "fine"


async def test_malformed_reply_is_a_protocol_error_with_both_sides():
    async with connected() as (qmp, peer):
        async with trio.open_nursery() as nursery:

            async def answer() -> None:
                msg = await peer.recv()
                await peer.send({"id": msg["id"], "neither": "return nor error"})

            nursery.start_soon(answer)
            with pytest.raises(QMPProtocolError) as info:
                await qmp.execute("x")
        assert info.value.sent["execute"] == "x"
        assert info.value.received["neither"] == "return nor error"


async def test_error_without_id_drops_the_connection_and_says_why():
    async with connected() as (qmp, peer):
        async with trio.open_nursery() as nursery:

            async def answer() -> None:
                await peer.recv()
                await peer.send({"error": {"class": "GenericError", "desc": "JSON parse error"}})

            nursery.start_soon(answer)
            with pytest.raises(QMPConnectionLost) as info:
                await qmp.execute("x")
        assert info.value.sent["execute"] == "x"
        assert isinstance(info.value.cause, QMPProtocolError)
        assert qmp.runstate is Runstate.LOST
        with trio.fail_after(1):
            with pytest.raises(QMPConnectionLost, match="protocol violation"):
                await qmp.execute("y")
            with pytest.raises(QMPConnectionLost):
                qmp.listen()


async def test_peer_going_away_ends_commands_and_event_streams():
    async with connected() as (qmp, peer):
        with qmp.listen() as events:
            async with trio.open_nursery() as nursery:

                async def die() -> None:
                    await peer.recv()
                    await peer.send({"event": "SHUTDOWN", "data": {"guest": True},
                                     "timestamp": {"seconds": 1, "microseconds": 0}})  # fmt: skip
                    await peer.stream.aclose()

                nursery.start_soon(die)
                with trio.fail_after(2), pytest.raises(QMPConnectionLost) as info:
                    await qmp.execute("x")
            assert "closed the connection" in str(info.value) and info.value.sent["execute"] == "x"
            # The event sent before the end is still delivered, then the stream says why.
            assert (await events.get(timeout=1)).name == "SHUTDOWN"
            with pytest.raises(QMPConnectionLost):
                await events.get(timeout=1)


async def test_events_are_filtered_waited_for_and_overflow_is_loud():
    async with connected() as (qmp, peer):
        with qmp.listen("STOP", "RESUME") as ours, qmp.listen(buffer=2) as small:
            for i, name in enumerate(["RESUME", "POWERDOWN", "STOP", "RTC_CHANGE", "STOP"]):
                await peer.send({"event": name, "data": {"i": i},
                                 "timestamp": {"seconds": i, "microseconds": 0}})  # fmt: skip
            ev = await ours.wait_for("STOP", timeout=1)
            assert ev.data == {"i": 2} and ev.timestamp == 2.0
            assert [e.data["i"] for e in [await ours.get(timeout=1)]] == [4]
            with pytest.raises(QMPTimeout):
                await ours.get(timeout=0.05)
            assert [e.name for e in small.drain()] == ["RESUME", "POWERDOWN"]
            with pytest.raises(QMPEventOverflow):
                await small.get(timeout=1)


async def test_states_are_guarded():
    async with connected() as (qmp, _peer):
        pass
    assert qmp.runstate is Runstate.CLOSED
    with pytest.raises(QMPStateError, match="closed"):
        await qmp.execute("x")
    await qmp.disconnect()  # idempotent


@pytest.mark.parametrize(
    "script, match",
    [
        ([b"not json at all\n"], "negotiation failed"),
        ([encode({"hello": 1})], "expected the QMP greeting"),
        ([encode(GREETING), "recv", encode({"error": {"class": "X", "desc": "no"}, "id": "n"})],
         "refused"),
        ([], "closed the connection before its greeting"),
        (["hang"], "no QMP session within"),
    ],
)  # fmt: skip
async def test_connect_failures_are_named(script: list, match: str):
    client_end, server_end = trio.testing.memory_stream_pair()
    peer = Peer(server_end)

    async def serve() -> None:
        for step in script:
            if step == "recv":
                await peer.recv()
            elif step == "hang":
                await trio.sleep_forever()
            else:
                await peer.send(step)
        if "hang" not in script:
            await server_end.aclose()

    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(serve)
            with pytest.raises(QMPConnectError, match=match) as info:
                async with open_qmp(client_end, connect_timeout=0.2):
                    pass
            nursery.cancel_scope.cancel()
    if "refused" in match:  # got as far as negotiating: both sides are in the error
        assert info.value.sent["execute"] == "qmp_capabilities"
        assert info.value.received["error"]["desc"] == "no"


async def test_connect_to_missing_socket(tmp_path):
    with pytest.raises(QMPConnectError, match="cannot connect"):
        async with open_qmp(tmp_path / "nothing.sock"):
            pass


# -- a hostile peer ------------------------------------------------------------------------------

_lines = st.one_of(
    st.binary(max_size=80).map(lambda b: b.replace(b"\n", b"") + b"\n"),
    st.sampled_from([
        b"\n", b"{}\n", b"[]\n", b"null\n", b'{"return": NaN, "id": "t-1"}\n',
        b'{"error": {"class": "E", "desc": "d"}}\n', b'{"error": "flat", "id": "t-1"}\n',
        b'{"event": 5}\n', b'{"event": "X", "timestamp": {"seconds": "a"}}\n',
        b'{"return": 1, "id": ["t-1"]}\n', b'{"return": 1, "id": "t-99"}\n',
        b'{"event": "STOP", "timestamp": {"seconds": 1, "microseconds": 2}}\n',
        b"x" * 5000 + b"\n", b'{"return": {}, "id": "t-1"', b"\xff\xfe\n",
    ]),
    st.builds(lambda r: encode({"return": r, "id": "t-1"}), st.integers() | st.text(max_size=5)),
)  # fmt: skip


@pytest.mark.log_warnings
@settings(max_examples=150, deadline=None)
@given(st.lists(_lines, max_size=12), st.booleans())
def test_hostile_peer_never_hangs_or_raises_anything_unnamed(lines: list[bytes], close: bool):
    outcome: list[object] = []

    async def main() -> None:
        client_end, server_end = trio.testing.memory_stream_pair()
        peer = Peer(server_end)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(peer.handshake)
            async with open_qmp(client_end, name="t", max_line=4096) as qmp:

                async def hostile() -> None:
                    await peer.recv()
                    for line in lines:
                        await peer.send(line)
                    if close:
                        await server_end.aclose()

                nursery.start_soon(hostile)
                try:
                    outcome.append(await qmp.execute("x", timeout=5))
                except (QMPExecuteError, QMPProtocolError, QMPTimeout, QMPConnectionLost) as e:
                    outcome.append(type(e))
                # Whatever happened, the state says it: still usable, or lost with a reason.
                assert qmp.runstate in (Runstate.RUNNING, Runstate.LOST)
                if qmp.runstate is Runstate.LOST:
                    assert qmp.lost_reason is not None
                nursery.cancel_scope.cancel()

    clock = trio.testing.MockClock(autojump_threshold=0)  # timeouts pass instantly
    trio.run(main, clock=clock)
    assert len(outcome) == 1


async def test_oob_is_negotiated_when_asked_and_offered():
    client_end, server_end = trio.testing.memory_stream_pair()
    peer = Peer(server_end)

    async def serve() -> None:
        await peer.send(GREETING)
        msg = await peer.recv()
        assert msg["arguments"] == {"enable": ["oob"]}
        await peer.send({"return": {}, "id": msg["id"]})
        msg = await peer.recv()  # an out-of-band command: exec-oob, with its id
        assert msg["exec-oob"] == "migrate-pause" and msg["id"]
        await peer.send({"return": {}, "id": msg["id"]})

    async with trio.open_nursery() as nursery:
        nursery.start_soon(serve)
        async with open_qmp(client_end, name="t", oob=True) as qmp:
            assert qmp.oob
            assert await qmp.execute("migrate-pause", oob=True) == {}


async def test_oob_refused_when_not_negotiated():
    async with connected() as (qmp, _peer):
        assert not qmp.oob
        with pytest.raises(QMPStateError, match="out-of-band"):
            await qmp.execute("migrate-pause", oob=True)


async def test_file_descriptors_travel_with_the_command():
    """getfd's descriptor rides on the command's bytes (SCM_RIGHTS) over a Unix socket."""
    import array
    import os
    import socket

    a, b = trio.socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    peer = Peer(trio.SocketStream(b))
    r, w = os.pipe()
    got: list[int] = []

    async def serve() -> None:
        await peer.handshake()
        fds = array.array("i")
        data, anc, _flags, _addr = await b.recvmsg(65536, socket.CMSG_SPACE(fds.itemsize))
        for level, kind, payload in anc:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                fds.frombytes(payload[: len(payload) - len(payload) % fds.itemsize])
        got.extend(fds)
        peer.lines += peer.framer.feed(data)
        msg = await peer.recv()
        assert msg["execute"] == "getfd" and msg["arguments"] == {"fdname": "x"}
        await peer.send({"return": {}, "id": msg["id"]})

    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(serve)
            async with open_qmp(trio.SocketStream(a), name="t") as qmp:
                assert await qmp.execute("getfd", {"fdname": "x"}, fds=(w,)) == {}
        assert len(got) == 1
        os.write(got[0], b"through")  # the peer's copy is the same pipe
        assert os.read(r, 16) == b"through"
    finally:
        for fd in (r, w, *got):
            os.close(fd)
