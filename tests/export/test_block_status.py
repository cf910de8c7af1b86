"""Block status as the exports answer it: REQ_ONE and SEEK_DATA scan the chain in growing
windows (a convert asks once per extent; scanning the whole remaining disk each time was
quadratic). Hypothesis lays out data, zero and hole runs; the windowed answers must equal the
first run of the plain whole-range answer, wherever the windows cut."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vfs.export import backend as B
from vfs.export import protocol as P
from vfs.export.backend import ExportBackend
from vfs.image import Image

CLUSTER = 4096
CLUSTERS = 64
SIZE = CLUSTER * CLUSTERS


def merged(ext: list[tuple[int, int]]) -> list[tuple[int, int]]:
    out: list[tuple[int, int]] = []
    for n, f in ext:
        if out and out[-1][1] == f:
            out[-1] = (out[-1][0] + n, f)
        else:
            out.append((n, f))
    return out


@pytest.fixture
def small_windows(monkeypatch):
    monkeypatch.setattr(B, "STATUS_WINDOW", 2 * CLUSTER)  # many windows on a small disk


layouts = st.lists(st.sampled_from("dzh"), min_size=CLUSTERS, max_size=CLUSTERS)


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(layout=layouts, offset=st.integers(0, SIZE - 1), data=st.data())
def test_req_one_and_seek_match_the_whole_answer(tmp_path_factory, small_windows, layout, offset,
                                                 data):  # fmt: skip
    path = tmp_path_factory.mktemp("bs") / "d.vimg"
    img = Image.create(str(path), SIZE, cluster_size=CLUSTER)
    try:
        for ci, kind in enumerate(layout):
            if kind == "d":
                img.write(ci * CLUSTER, bytes([ci + 1]) * CLUSTER)
            elif kind == "z":
                img.write_zeroes(ci * CLUSTER, CLUSTER)  # a ZERO entry: no data
        img.flush()
        b = ExportBackend(img, name="bs")
        length = data.draw(st.integers(1, SIZE - offset))
        for ctx in (P.CTX_BASE_ALLOCATION, P.CTX_ALLOCATION_DEPTH):
            whole = merged(b.block_status(ctx, offset, length))
            assert sum(n for n, _f in whole) == length
            assert b.block_status(ctx, offset, length, one=True) == whole[:1]
        # the windows cover the range exactly, in order
        ext = list(b.chain_extents(offset, SIZE))
        assert ext[0].offset == offset and ext[-1].offset + ext[-1].length == SIZE
        assert all(a.offset + a.length == c.offset for a, c in zip(ext, ext[1:], strict=False))
        # SEEK_DATA as the FUSE file answers it: the first data byte at or after offset
        want = next((max(e.offset, offset) for e in ext if e.data), None)
        ci0 = offset // CLUSTER
        first = next((ci for ci in range(ci0, CLUSTERS) if layout[ci] == "d"), None)
        assert want == (None if first is None else max(first * CLUSTER, offset))
    finally:
        img.close()
