"""Repository metadata (vfs-repo.json, refs.json, refs/<name>) is parsed strictly: every hostile
document is one FormatError (or UnsupportedFeature) naming the file, never a TypeError,
RecursionError or a quietly wrong value. Hand-picked attacks, then hypothesis fuzzing."""

from __future__ import annotations

import json
import time

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vfs.errors import FormatError, UnsupportedFeature
from vfs.redirect.file_remote import FileRemote
from vfs.redirect.repometa import (
    MAX_DEPTH,
    MAX_META_BYTES,
    MAX_REFS_BYTES,
    REPO_VERSION,
    RepoMeta,
    parse_ref,
    parse_refs_index,
    parse_repo_meta,
)

OID = "ab" * 32
WHERE = "http://mirror/repo/vfs-repo.json"


def meta(**fields) -> bytes:
    doc = {"format": "vfs-repo", "version": 1, "features": []}
    doc.update(fields)
    return json.dumps(doc).encode()


def deep(n: int) -> bytes:
    return (
        b'{"format": "vfs-repo", "version": 1, "features": [], "x": ' + b"[" * n + b"]" * n + b"}"
    )


#: (document, error class, words the one-line message must contain)
HOSTILE_META = {
    "features-object": (meta(features=[{}]), FormatError, "invalid feature name {}"),
    "features-string": (meta(features="abc"), FormatError, "features must be a list"),
    "features-nested": (meta(features=[["a"]]), FormatError, "invalid feature name"),
    "features-number": (meta(features=[1]), FormatError, "invalid feature name 1"),
    "features-dup": (meta(features=["a", "a"]), FormatError, "listed twice"),
    "features-missing": (b'{"format": "vfs-repo", "version": 1}', FormatError, "no features"),
    "features-unknown": (meta(features=["zstd-objects"]), UnsupportedFeature, "zstd-objects"),
    "version-negative": (meta(version=-5), FormatError, "invalid version -5"),
    "version-zero": (meta(version=0), FormatError, "invalid version 0"),
    "version-true": (meta(version=True), FormatError, "must be an integer, not True"),
    "version-float": (meta(version=1.0), FormatError, "must be an integer, not 1.0"),
    "version-string": (meta(version="1"), FormatError, "must be an integer, not '1'"),
    "version-missing": (b'{"format": "vfs-repo", "features": []}', FormatError, "not None"),
    "version-huge": (meta(version=10**30), UnsupportedFeature, "newer than this vfs"),
    "version-newer": (meta(version=REPO_VERSION + 1), UnsupportedFeature, "newer"),
    "version-digits": (
        b'{"format":"vfs-repo","version":' + b"9" * 5000 + b"}",
        FormatError,
        "not valid JSON",
    ),  # fmt: skip
    "nested-100000": (deep(100_000), FormatError, "larger than 65536"),  # the size bound first
    "nested-30000": (deep(30_000), FormatError, "nested deeper"),  # past the C decoder's limit
    "nested-500": (deep(500), FormatError, "nested deeper"),
    "nested-top": (b"[" * 60_000, FormatError, "nested deeper"),
    "huge": (meta(pad="x" * MAX_META_BYTES), FormatError, "larger than 65536 bytes"),
    "not-json": (b"<html>404</html>", FormatError, "not valid JSON"),
    "empty": (b"", FormatError, "not valid JSON"),
    "not-utf8": (b'{"format": "vfs-repo\xff"}', FormatError, "not UTF-8"),
    "nan": (b'{"format": "vfs-repo", "version": NaN, "features": []}', FormatError, "NaN"),
    "dup-key": (
        b'{"format": "vfs-repo", "version": 1, "version": 1, "features": []}',
        FormatError,
        "duplicate key 'version'",
    ),  # fmt: skip
    "array": (b'["vfs-repo", 1]', FormatError, "expected a JSON object"),
    "number": (b"1", FormatError, "expected a JSON object"),
    "wrong-format": (meta(format="vfs-store"), FormatError, "not a vfs repository"),
    "format-object": (meta(format={"a": 1}), FormatError, "not a vfs repository"),
    "bom": (b"\xef\xbb\xbf" + meta(), FormatError, "not valid JSON"),
}


@pytest.mark.parametrize("case", sorted(HOSTILE_META))
def test_hostile_repo_meta_is_one_clear_error(case):
    raw, cls, words = HOSTILE_META[case]
    t0 = time.monotonic()
    with pytest.raises(cls) as info:
        parse_repo_meta(raw, WHERE)
    assert time.monotonic() - t0 < 1.0
    msg = str(info.value)
    assert type(info.value) is cls and msg.startswith(WHERE + ": ") and "\n" not in msg
    assert words in msg, msg


def test_valid_repo_meta_and_room_to_grow():
    assert parse_repo_meta(meta(), WHERE) == RepoMeta(1, ())
    # Unknown keys are for newer writers that stay readable: ignored, within the bounds.
    grown = meta(created_by={"tool": "vfs", "hosts": [["a"]]}, comment="x" * 1000)
    assert parse_repo_meta(grown, WHERE) == RepoMeta(1, ())
    assert parse_repo_meta(deep(MAX_DEPTH - 1), WHERE).version == 1
    with pytest.raises(FormatError):
        parse_repo_meta(deep(MAX_DEPTH), WHERE)


HOSTILE_REFS = {
    "array": (b"[]", "expected a JSON object"),
    "value-number": (b'{"t": 5}', "ref 't' names no object id: 5"),
    "value-upper": (json.dumps({"t": OID.upper()}).encode(), "names no object id"),
    "value-list": (json.dumps({"t": [OID]}).encode(), "names no object id"),
    "name-dotdot": (json.dumps({"../x": OID}).encode(), "invalid ref name '../x'"),
    "name-slash": (json.dumps({"a/b": OID}).encode(), "invalid ref name"),
    "name-empty": (json.dumps({"": OID}).encode(), "invalid ref name"),
    "duplicate": (b'{"t": "%s", "t": "%s"}' % (OID.encode(), OID.encode()), "duplicate key"),
    "nested": (b'{"t": ' + b"[" * 100_000 + b"}", "nested deeper"),
    "huge": (b'{"t": "' + b"x" * MAX_REFS_BYTES + b'"}', "larger than"),
}


@pytest.mark.parametrize("case", sorted(HOSTILE_REFS))
def test_hostile_refs_index_is_one_clear_error(case):
    raw, words = HOSTILE_REFS[case]
    with pytest.raises(FormatError) as info:
        parse_refs_index(raw, "R/refs.json")
    assert str(info.value).startswith("R/refs.json: ") and words in str(info.value)


def test_refs_index_and_ref_files():
    assert parse_refs_index(json.dumps({"debian-12": OID, "a:b@c+d": OID}).encode(), "R") == {
        "debian-12": OID,
        "a:b@c+d": OID,
    }
    assert parse_ref(OID.encode() + b"\n", "R/refs/t") == OID
    for bad in [b"", b"x" * 64, OID.upper().encode(), b"\xff" * 64, OID.encode() * 2,
                OID.encode() + b" " * 300]:  # fmt: skip
        with pytest.raises(FormatError, match="R/refs/t: "):
            parse_ref(bad, "R/refs/t")


def test_file_repository_refuses_hostile_meta_refs_and_special_files(tmp_path):
    import os

    d = tmp_path / "r"
    FileRemote.init(d)
    oid = FileRemote(d).put(b"x")
    (d / "vfs-repo.json").write_bytes(HOSTILE_META["features-object"][0])
    with pytest.raises(FormatError, match="r/vfs-repo.json: invalid feature name"):
        FileRemote(d)
    with pytest.raises(FormatError, match="invalid feature name"):
        FileRemote.init(d)  # init of an existing repository checks it, not "ready"
    (d / "vfs-repo.json").write_bytes(meta())
    (d / "refs" / "t").write_bytes(b"../../etc/passwd\n")
    r = FileRemote(d)
    with pytest.raises(FormatError, match="refs/t: not an object id"):
        r.get_ref("t")
    with pytest.raises(FormatError, match="refs/t: not an object id"):
        r.list_refs()
    (d / "refs" / "t").write_bytes(oid.encode() * 100)  # a huge ref file: read 257 bytes only
    with pytest.raises(FormatError, match="larger than 256 bytes"):
        r.get_ref("t")
    (d / "refs" / "t").unlink()
    os.mkfifo(d / "refs" / "t")  # would block an open(): refused without waiting for a writer
    with pytest.raises(FormatError, match="not a regular file"):
        r.get_ref("t")
    os.unlink(d / "refs" / "t")
    (d / "refs" / "README~").write_text("editor leftover")  # not a ref name: not a ref
    (d / "refs" / "sub").mkdir()
    assert r.list_refs() == {}
    os.unlink(d / "vfs-repo.json")
    os.mkfifo(d / "vfs-repo.json")
    with pytest.raises(FormatError, match="not a regular file"):
        FileRemote(d)


# --------------------------------------------------------------------------- fuzzing

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner,
                                                                max_size=4),
    max_leaves=20,
)  # fmt: skip

PARSERS = [parse_repo_meta, parse_refs_index, parse_ref]


def _only_clean_errors(parser, raw: bytes):
    try:
        return parser(raw, "F")
    except FormatError as e:  # UnsupportedFeature is one
        assert str(e).startswith("F: ") and "\n" not in str(e)
        return None


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=200), st.sampled_from(PARSERS))
def test_fuzz_arbitrary_bytes(raw, parser):
    _only_clean_errors(parser, raw)


@settings(max_examples=300, deadline=None)
@given(json_values, st.sampled_from(["format", "version", "features", None]))
def test_fuzz_repo_meta_fields(value, field):
    doc = {"format": "vfs-repo", "version": 1, "features": []}
    doc = value if field is None else {**doc, field: value}
    got = _only_clean_errors(parse_repo_meta, json.dumps(doc).encode())
    if got is not None:  # accepted: then it really is a version-1 repository without features
        assert got == RepoMeta(1, ()) and type(doc["version"]) is int


@settings(max_examples=200, deadline=None)
@given(st.dictionaries(st.text(max_size=10), json_values | st.just(OID), max_size=5))
def test_fuzz_refs_index(doc):
    got = _only_clean_errors(parse_refs_index, json.dumps(doc).encode())
    if got is not None:
        assert all(isinstance(v, str) and len(v) == 64 for v in got.values())


@settings(max_examples=200, deadline=None)
@given(st.integers(0, 80), st.binary(min_size=1, max_size=3))
def test_fuzz_mutated_valid_meta(pos, junk):
    raw = meta(features=[])
    pos = min(pos, len(raw))
    _only_clean_errors(parse_repo_meta, raw[:pos] + junk + raw[pos + len(junk) :])
