"""vmctl.qmp.framing under hostile input: whatever the peer sends, the framer and decoder return
messages or raise QMPProtocolError, never anything else, in bounded memory."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vmctl.errors import QMPProtocolError
from vmctl.qmp import framing
from vmctl.qmp.framing import LineFramer

json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**63)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=30),
    lambda children: st.lists(children, max_size=5) | st.dictionaries(st.text(max_size=10),
                                                                      children, max_size=5),
    max_leaves=12,
)  # fmt: skip
json_objects = st.dictionaries(st.text(max_size=10), json_values, max_size=6)


def _chunks(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts})
    out, prev = [], 0
    for p in points:
        out.append(data[prev:p])
        prev = p
    out.append(data[prev:])
    return out


def _feed_all(framer: LineFramer, pieces: list[bytes]) -> list[bytes]:
    lines = []
    for piece in pieces:
        lines += framer.feed(piece)
    return lines


@settings(max_examples=150, deadline=None)
@given(st.lists(json_objects, max_size=6), st.lists(st.integers(0, 10_000), max_size=20))
def test_messages_survive_any_chunking(msgs: list[dict], cuts: list[int]):
    wire = b"".join(framing.encode(m) for m in msgs)
    framer = LineFramer()
    lines = _feed_all(framer, _chunks(wire, cuts))
    framer.eof()
    assert [framing.decode(line) for line in lines] == msgs


#: Bytes that look like QMP often enough to reach past the first parse error.
qmp_ish = st.lists(
    st.sampled_from([b"{", b"}", b"[", b"]", b'"', b":", b",", b"\\", b"\n", b"\r\n", b" ", b"1",
                     b'"id"', b'"return"', b'"error"', b'"event"', b"null", b"NaN", b"\xff",
                     b'{"return": {}, "id": "q-1"}', b"x" * 600]),
    max_size=60,
).map(b"".join)  # fmt: skip


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=2000) | qmp_ish, st.lists(st.integers(0, 4000), max_size=20))
def test_garbage_gives_lines_or_protocol_errors_and_chunking_does_not_matter(
    data: bytes, cuts: list[int]
):
    def run(pieces: list[bytes]):
        framer = LineFramer(max_line=512)
        out = []
        try:
            for line in _feed_all(framer, pieces):
                try:
                    out.append(("msg", framing.decode(line)))
                except QMPProtocolError as e:
                    out.append(("bad", e.received))
            framer.eof()
        except QMPProtocolError:
            out.append(("fatal", None))
        return out

    whole = run([data])
    assert run(_chunks(data, cuts)) == whole
    for kind, value in whole:
        if kind == "msg":
            assert isinstance(value, dict)


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=300) | st.text(max_size=300).map(str.encode))
def test_decode_only_ever_raises_protocol_errors(line: bytes):
    try:
        assert isinstance(framing.decode(line), dict)
    except QMPProtocolError as e:
        assert e.received is not None and len(e.received) <= 256


@settings(max_examples=200, deadline=None)
@given(json_objects)
def test_message_shapes_are_checked_not_trusted(msg: dict):
    # Whatever object arrives, classifying it raises QMPProtocolError or succeeds.
    for check in (framing.parse_event, framing.parse_greeting, framing.check_reply):
        try:
            check(msg)
        except QMPProtocolError:
            pass


def test_huge_line_is_refused_in_bounded_memory():
    framer = LineFramer(max_line=1 << 20)
    with pytest.raises(QMPProtocolError, match="longer than"):
        for _ in range(100):
            framer.feed(b"x" * 65536)  # no newline, ever
    assert framer.buffered <= (1 << 20) + 65536


def test_big_reply_in_small_pieces():
    big = {"return": [{"name": f"cmd-{i}", "arg-type": "x" * 50} for i in range(20000)], "id": "a"}
    wire = framing.encode(big)
    assert len(wire) > 1 << 20
    framer = LineFramer()
    lines = _feed_all(framer, [wire[i : i + 4096] for i in range(0, len(wire), 4096)])
    assert [framing.decode(line) for line in lines] == [big]


@pytest.mark.parametrize(
    "line",
    [
        b"[" * 100_000 + b"]" * 100_000,  # nesting deep enough to overflow the parser's stack
        b'{"return": NaN, "id": "x"}',
        b'{"return": Infinity}',
        b"\xff\xfe{}",
        b"[1, 2]",
        b'"just a string"',
        b'{"return": 1',
    ],
)
def test_hostile_lines(line: bytes):
    with pytest.raises(QMPProtocolError):
        framing.decode(line)


def test_truncated_message_at_eof():
    framer = LineFramer()
    assert framer.feed(b'{"return": {}, "id": "1"}\r\n{"event": "ST') == [
        b'{"return": {}, "id": "1"}\r'
    ]
    with pytest.raises(QMPProtocolError, match="middle of a message"):
        framer.eof()


def test_crlf_and_blank_lines():
    framer = LineFramer()
    lines = framer.feed(b'\r\n\n{"a": 1}\r\n  \n')
    assert [framing.decode(line) for line in lines] == [{"a": 1}]
    framer.eof()


def test_shapes():
    ev = framing.parse_event(
        {"event": "STOP", "timestamp": {"seconds": 10, "microseconds": 500000}}
    )
    assert ev.name == "STOP" and ev.data == {} and ev.timestamp == 10.5
    with pytest.raises(QMPProtocolError):
        framing.parse_event({"event": "STOP", "timestamp": {"seconds": "soon"}})
    with pytest.raises(QMPProtocolError):
        framing.parse_event({"event": 3})
    g = framing.parse_greeting(json.loads(
        '{"QMP": {"version": {"qemu": {"micro": 22, "minor": 2, "major": 7}}, "capabilities": []}}'
    ))  # fmt: skip
    assert framing.qemu_version(g) == (7, 2, 22)
    with pytest.raises(QMPProtocolError):
        framing.check_reply({"error": {"class": 1}, "id": "x"})
    framing.check_reply({"return": None, "id": "x"})
