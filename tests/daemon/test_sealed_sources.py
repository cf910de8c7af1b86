"""STATE/sealed/sources.json (where a daemon's encrypted templates came from): strict, fuzzed."""

from __future__ import annotations

import json

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vfs.daemon.sealed_sources import FORMAT, SealedSources
from vfs.errors import FormatError, VfsError

OID = "ab" * 32
GOOD = {"url": "https://m/repo", "ref": "web", "signed_ref": "cd" * 32, "index": "ef" * 32}


def _write(tmp, doc) -> SealedSources:
    s = SealedSources(tmp)
    s.dir.mkdir(parents=True, exist_ok=True)
    s.file.write_bytes(doc if isinstance(doc, bytes) else json.dumps(doc).encode())
    return s


def test_good_file_loads_and_bad_sources_are_format_errors(tmp_path):
    doc = {"format": FORMAT, "version": 1, "sources": {OID: GOOD}}
    assert _write(tmp_path, doc).load() == {OID: GOOD}
    for bad in (
        {**GOOD, "url": 5},
        {**GOOD, "ref": "../x"},
        {**GOOD, "index": "../../etc/passwd"},
        {k: v for k, v in GOOD.items() if k != "url"},
    ):
        s = _write(tmp_path, {"format": FORMAT, "version": 1, "sources": {OID: bad}})
        try:
            s.load()
        except FormatError as e:
            assert "malformed source" in str(e)
        else:
            raise AssertionError(f"accepted {bad}")
    s = _write(tmp_path, {"format": FORMAT, "version": 1, "sources": {"../x": GOOD}})
    try:
        s.load()
    except FormatError:
        pass
    else:
        raise AssertionError("accepted a bad digest")


_json = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=70),
    lambda c: st.lists(c, max_size=4) | st.dictionaries(st.text(max_size=8), c, max_size=4),
    max_leaves=12,
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow,
          HealthCheck.function_scoped_fixture])  # fmt: skip
@given(
    st.sampled_from(["url", "ref", "signed_ref", "index", None]),
    _json,
    st.binary(max_size=200),
)
def test_fuzz_sources_file(tmp_path, field, value, raw):
    if field is None:
        doc = raw
    else:
        doc = {"format": FORMAT, "version": 1, "sources": {OID: {**GOOD, field: value}}}
    try:
        out = _write(tmp_path, doc).load()
    except VfsError:
        return
    for v in out.values():
        assert all(isinstance(v[k], str) for k in GOOD)
