"""The NBD protocol core without sockets: handshake, options, request parsing and checking,
and fuzzing with malformed input (only ProtocolError may come out, never another exception)."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vfs.export import protocol as P
from vfs.export.handshake import ServerHandshake

EXPORT = P.ExportInfo(
    "disk",
    1 << 20,
    False,
    "a disk",
    contexts=(P.CTX_BASE_ALLOCATION, P.CTX_ALLOCATION_DEPTH, "qemu:dirty-bitmap:dirty"),
)


def opt(o: int, data: bytes = b"") -> bytes:
    return struct.pack(">QII", P.IHAVEOPT, o, len(data)) + data


def replies(out: bytes) -> list[tuple[int, int, bytes]]:
    """(option, reply type, data) of every option reply in ``out``."""
    res = []
    pos = 0
    while pos < len(out):
        magic, o, t, n = struct.unpack_from(">QIII", out, pos)
        assert magic == P.OPTION_REPLY_MAGIC
        res.append((o, t, out[pos + 20 : pos + 20 + n]))
        pos += 20 + n
    return res


def meta_data(name: str, queries: list[str]) -> bytes:
    q = b"".join(struct.pack(">I", len(x.encode())) + x.encode() for x in queries)
    return struct.pack(">I", len(name)) + name.encode() + struct.pack(">I", len(queries)) + q


def go_data(name: str, infos: tuple[int, ...] = ()) -> bytes:
    return (
        struct.pack(">I", len(name))
        + name.encode()
        + struct.pack(">H", len(infos))
        + b"".join(struct.pack(">H", i) for i in infos)
    )


def started(exports: dict | None = None) -> ServerHandshake:
    hs = ServerHandshake(exports or {"disk": EXPORT})
    greeting = hs.outgoing()
    assert greeting[:16] == b"NBDMAGICIHAVEOPT"
    assert struct.unpack(">H", greeting[16:18])[0] == P.FLAG_FIXED_NEWSTYLE | P.FLAG_NO_ZEROES
    hs.feed(struct.pack(">I", P.FLAG_C_FIXED_NEWSTYLE | P.FLAG_C_NO_ZEROES))
    return hs


def test_go_with_meta_contexts_and_block_sizes():
    hs = started()
    hs.feed(opt(P.OPT_STRUCTURED_REPLY))
    hs.feed(opt(P.OPT_SET_META_CONTEXT, meta_data("disk", ["base:allocation", "x-nope:y"])))
    r = replies(hs.outgoing())
    assert r[0] == (P.OPT_STRUCTURED_REPLY, P.REP_ACK, b"")
    assert r[1] == (P.OPT_SET_META_CONTEXT, P.REP_META_CONTEXT, b"\0\0\0\0base:allocation")
    assert r[2][1] == P.REP_ACK
    hs.feed(opt(P.OPT_GO, go_data("disk", (P.INFO_NAME, P.INFO_BLOCK_SIZE))) + b"leftover")
    r = replies(hs.outgoing())
    info = {struct.unpack(">H", d[:2])[0]: d[2:] for _o, t, d in r if t == P.REP_INFO}
    size, flags = struct.unpack(">QH", info[P.INFO_EXPORT])
    assert size == 1 << 20
    assert flags & P.FLAG_SEND_FLUSH and flags & P.FLAG_SEND_FAST_ZERO and flags & P.FLAG_SEND_DF
    assert not flags & P.FLAG_READ_ONLY
    assert info[P.INFO_NAME] == b"disk"
    assert struct.unpack(">III", info[P.INFO_BLOCK_SIZE]) == (1, 4096, 32 << 20)
    assert r[-1][1] == P.REP_ACK
    assert hs.done and hs.result is not None
    assert hs.result.contexts == {0: "base:allocation"}
    assert hs.leftover == b"leftover"


def test_list_meta_contexts_by_namespace():
    hs = started()
    hs.feed(opt(P.OPT_LIST_META_CONTEXT, meta_data("disk", [])))  # before structured replies
    assert replies(hs.outgoing())[0][1] == P.REP_ERR_INVALID
    hs.feed(opt(P.OPT_STRUCTURED_REPLY))
    hs.outgoing()
    for queries, want in (
        ([], list(EXPORT.contexts)),
        (["qemu:"], ["qemu:allocation-depth", "qemu:dirty-bitmap:dirty"]),
        (["qemu:dirty-bitmap:"], ["qemu:dirty-bitmap:dirty"]),
        (["base:"], ["base:allocation"]),
        (["nbd-server:foo"], []),
    ):
        hs.feed(opt(P.OPT_LIST_META_CONTEXT, meta_data("", queries)))
        r = replies(hs.outgoing())
        assert [d[4:].decode() for _o, t, d in r if t == P.REP_META_CONTEXT] == want
        assert r[-1][1] == P.REP_ACK
    # SET with a namespace only selects nothing (as qemu-nbd)
    hs.feed(opt(P.OPT_SET_META_CONTEXT, meta_data("disk", ["qemu:"])))
    assert [t for _o, t, _d in replies(hs.outgoing())] == [P.REP_ACK]


def test_unknown_export_options_and_errors():
    hs = started({"a": EXPORT, "b": EXPORT})  # no default: "" is unknown
    hs.feed(opt(P.OPT_GO, go_data("")))
    assert replies(hs.outgoing())[0][1] == P.REP_ERR_UNKNOWN
    hs.feed(opt(P.OPT_INFO, b"\0\0\0\x05ab"))  # truncated
    assert replies(hs.outgoing())[0][1] == P.REP_ERR_INVALID
    hs.feed(opt(P.OPT_STARTTLS))
    assert replies(hs.outgoing())[0][1] == P.REP_ERR_POLICY
    hs.feed(opt(4242, b"xyz"))
    assert replies(hs.outgoing())[0][1] == P.REP_ERR_UNSUP
    hs.feed(opt(P.OPT_LIST))
    r = replies(hs.outgoing())
    names = [d[4 : 4 + struct.unpack(">I", d[:4])[0]] for _o, t, d in r if t == P.REP_SERVER]
    assert names == [b"a", b"b"] and r[-1][1] == P.REP_ACK
    hs.feed(opt(P.OPT_LIST, b"junk"))
    assert replies(hs.outgoing())[0][1] == P.REP_ERR_INVALID
    hs.feed(opt(P.OPT_STRUCTURED_REPLY) + opt(P.OPT_STRUCTURED_REPLY))
    assert [t for _o, t, _d in replies(hs.outgoing())] == [P.REP_ACK, P.REP_ERR_INVALID]
    hs.feed(opt(P.OPT_ABORT))
    assert replies(hs.outgoing())[0][1] == P.REP_ACK and hs.closed


def test_export_name_old_style_end_of_options():
    hs = ServerHandshake({"disk": EXPORT})
    hs.outgoing()
    hs.feed(struct.pack(">I", P.FLAG_C_FIXED_NEWSTYLE))  # no NO_ZEROES
    hs.feed(opt(P.OPT_EXPORT_NAME, b""))
    out = hs.outgoing()
    assert len(out) == 8 + 2 + 124
    assert struct.unpack(">Q", out[:8])[0] == 1 << 20
    with pytest.raises(P.ProtocolError):
        bad = started()
        bad.feed(opt(P.OPT_EXPORT_NAME, b"nope"))  # cannot answer an error: disconnect


def test_handshake_violations_disconnect():
    hs = ServerHandshake({"disk": EXPORT})
    with pytest.raises(P.ProtocolError, match="client flags"):
        hs.feed(struct.pack(">I", 0x80))
    with pytest.raises(P.ProtocolError, match="fixed newstyle"):
        ServerHandshake({"disk": EXPORT}).feed(b"\0\0\0\0")
    with pytest.raises(P.ProtocolError, match="magic"):
        started().feed(struct.pack(">QII", 0x1234, 1, 0))


def test_oversized_option_is_skipped_then_refused():
    hs = started()
    big = P.MAX_OPTION + 10
    hs.feed(struct.pack(">QII", P.IHAVEOPT, P.OPT_LIST, big))
    for i in range(0, big, 9999):
        assert not hs.outgoing()
        hs.feed(b"x" * min(9999, big - i))
    assert replies(hs.outgoing()) == [(P.OPT_LIST, P.REP_ERR_TOO_BIG, b"option too long")]
    hs.feed(opt(P.OPT_GO, go_data("disk")))
    assert hs.done


def test_too_many_options():
    hs = started()
    with pytest.raises(P.ProtocolError, match="too many"):
        hs.feed(opt(4242) * (P.MAX_OPTIONS + 1))


NEG = P.Negotiated(EXPORT, True, {0: P.CTX_BASE_ALLOCATION}, 0)


def req(cmd: int, offset: int = 0, length: int = 0, flags: int = 0, handle: int = 7) -> bytes:
    return struct.pack(">IHHQQI", P.REQUEST_MAGIC, flags, cmd, handle, offset, length)


def test_parser_byte_by_byte_and_payloads():
    stream = req(P.CMD_READ, 0, 512) + req(P.CMD_WRITE, 4096, 5) + b"hello" + req(P.CMD_FLUSH)
    p = P.RequestParser()
    got = []
    for i in range(len(stream)):
        got += p.feed(stream[i : i + 1])
    assert [(r.cmd, r.offset, r.length, r.payload) for r in got] == [
        (P.CMD_READ, 0, 512, None),
        (P.CMD_WRITE, 4096, 5, b"hello"),
        (P.CMD_FLUSH, 0, 0, None),
    ]
    assert p.pending == 0


def test_oversized_write_is_dropped_and_answered_einval():
    p = P.RequestParser(max_payload=100)
    out = p.feed(req(P.CMD_WRITE, 0, 300) + b"z" * 250)
    assert out == []
    out = p.feed(b"z" * 50 + req(P.CMD_FLUSH))
    assert [(r.cmd, r.error) for r in out] == [(P.CMD_WRITE, P.EINVAL), (P.CMD_FLUSH, 0)]
    assert P.check_request(out[0], NEG)[0] == P.EINVAL


def test_bad_request_magic():
    with pytest.raises(P.ProtocolError):
        P.RequestParser().feed(b"\0" * 28)


@pytest.mark.parametrize(
    ("cmd", "offset", "length", "flags", "want"),
    [
        (P.CMD_READ, 0, 4096, 0, 0),
        (P.CMD_READ, (1 << 20) - 1, 1, 0, 0),
        (P.CMD_READ, 1 << 20, 1, 0, P.EINVAL),
        (P.CMD_READ, 2**64 - 1, 2**32 - 1, 0, P.EOVERFLOW),
        (P.CMD_READ, 2**64 - 1, 4096, 0, P.EINVAL),
        (P.CMD_WRITE, (1 << 20) - 1, 2, 0, P.ENOSPC),
        (P.CMD_WRITE_ZEROES, 1 << 20, 1, 0, P.ENOSPC),
        (P.CMD_TRIM, 0, 1 << 20, P.CMD_FLAG_FUA, 0),
        (P.CMD_READ, 0, 4096, P.CMD_FLAG_FUA, P.EINVAL),
        (P.CMD_READ, 0, 33 << 20, 0, P.EOVERFLOW),
        (P.CMD_FLUSH, 1, 0, 0, P.EINVAL),
        (P.CMD_BLOCK_STATUS, 0, 0, 0, P.EINVAL),
        (P.CMD_BLOCK_STATUS, 0, 1 << 20, P.CMD_FLAG_REQ_ONE, 0),
        (P.CMD_WRITE_ZEROES, 0, 4096, P.CMD_FLAG_FAST_ZERO | P.CMD_FLAG_NO_HOLE, P.ENOTSUP),
        (99, 0, 0, 0, P.EINVAL),
    ],
)
def test_check_request(cmd, offset, length, flags, want):
    r = P.Request(flags, cmd, 1, offset, length)
    assert P.check_request(r, NEG)[0] == want


def test_readonly_and_no_context():
    ro = P.Negotiated(P.ExportInfo("r", 1 << 20, True), False, {}, 0)
    for cmd in (P.CMD_WRITE, P.CMD_TRIM, P.CMD_WRITE_ZEROES):
        assert P.check_request(P.Request(0, cmd, 1, 0, 1), ro)[0] == P.EPERM
    assert P.check_request(P.Request(0, P.CMD_BLOCK_STATUS, 1, 0, 1), ro)[0] == P.EINVAL
    assert P.check_request(P.Request(P.CMD_FLAG_DF, P.CMD_READ, 1, 0, 1), ro)[0] == P.EINVAL


# ---------------------------------------------------------------------------- fuzzing
@settings(max_examples=400, deadline=None)
@given(st.lists(st.binary(max_size=64), max_size=12))
def test_fuzz_handshake_random_bytes(chunks):
    hs = started()
    try:
        for c in chunks:
            hs.feed(c)
            hs.outgoing()
    except P.ProtocolError:
        pass


_options = st.sampled_from([1, 2, 3, 5, 6, 7, 8, 9, 10, 11, 12, 0, 4242, 2**32 - 1])


@st.composite
def option_streams(draw):
    out = b""
    for _ in range(draw(st.integers(0, 6))):
        o = draw(_options)
        if draw(st.booleans()):
            data = draw(st.binary(max_size=80))
        else:
            queries = st.sampled_from(["base:", "qemu:", "base:allocation", "", "q:x"])
            name = draw(st.sampled_from(["", "disk", "x"]))
            data = meta_data(name, draw(st.lists(queries, max_size=3)))
        n = draw(st.sampled_from([len(data), len(data), 0, len(data) + 3, 2**32 - 1]))
        out += struct.pack(">QII", P.IHAVEOPT, o, n) + data
    return out


@settings(max_examples=400, deadline=None)
@given(option_streams(), st.integers(1, 50))
def test_fuzz_handshake_options(stream, step):
    hs = started()
    try:
        for i in range(0, len(stream), step):
            hs.feed(stream[i : i + step])
            out = hs.outgoing()
            if hs.done:  # EXPORT_NAME ends with the size and flags, not an option reply
                break
            replies(out)  # every reply is well formed
            if hs.closed:
                break
    except P.ProtocolError:
        return
    if hs.done:
        assert hs.result is not None
        assert set(hs.result.contexts.values()) <= set(EXPORT.contexts)


@st.composite
def request_streams(draw):
    out = b""
    for _ in range(draw(st.integers(0, 8))):
        cmd = draw(st.sampled_from([0, 1, 2, 3, 4, 5, 6, 7, 8, 77]))
        flags = draw(st.integers(0, 0xFFFF) | st.sampled_from([0, 1, 2, 4, 8, 16]))
        off = draw(st.integers(0, 2**64 - 1) | st.integers(0, 1 << 21))
        length = draw(st.integers(0, 2**32 - 1) | st.integers(0, 300))
        out += struct.pack(">IHHQQI", P.REQUEST_MAGIC, flags, cmd, 1, off, length)
        if cmd == 1 and length <= 300:
            out += draw(st.binary(min_size=length, max_size=length))
    if draw(st.booleans()):
        out += draw(st.binary(max_size=40))  # garbage at the end
    return out


@settings(max_examples=400, deadline=None)
@given(request_streams(), st.integers(1, 64))
def test_fuzz_requests(stream, step):
    p = P.RequestParser(max_payload=200)
    try:
        for i in range(0, len(stream), step):
            for r in p.feed(stream[i : i + step]):
                err, msg = P.check_request(r, NEG)
                assert err in P.WIRE_ERRORS or err == 0
                if not err and r.cmd not in (P.CMD_DISC, P.CMD_FLUSH):
                    assert r.offset + r.length <= EXPORT.size
                if r.cmd == P.CMD_WRITE and not err:
                    assert r.payload is not None and len(r.payload) == r.length
    except P.ProtocolError:
        pass
