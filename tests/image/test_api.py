"""The Image API's guard rails: locking, read-only, bounds, existing files, backing loops."""

from __future__ import annotations

import pytest
from click.testing import CliRunner

from vfs.cli.vimg import main
from vfs.errors import AlreadyExists, BusyError, FormatError, ReadOnlyError, UsageError
from vfs.image import layout as L
from vfs.image.image import Image

from .helpers import write_header


def test_one_writer_or_many_readers(tmp_path):
    p = str(tmp_path / "a.vimg")
    with Image.create(p, 1 << 20):
        with pytest.raises(BusyError, match="in use"):
            Image.open(p)
        with pytest.raises(BusyError, match="being written"):
            Image.open(p, readonly=True)
        r = CliRunner().invoke(main, ["info", p])
        assert r.exit_code == 9 and "error: " in r.output and "being written" in r.output
    with Image.open(p, readonly=True) as r1, Image.open(p, readonly=True) as r2:
        assert r1.read(0, 10) == r2.read(0, 10) == bytes(10)
        with pytest.raises(BusyError):
            Image.open(p)


def test_guard_rails(tmp_path):
    p = str(tmp_path / "a.vimg")
    with Image.create(p, 1 << 20, cluster_size=4096) as img:
        with pytest.raises(UsageError, match="outside the image"):
            img.read((1 << 20) - 10, 11)
        with pytest.raises(UsageError):
            img.write(1 << 20, b"x")
        img.snapshot_create("s")
        with pytest.raises(AlreadyExists):
            img.snapshot_create("s")
    with pytest.raises(AlreadyExists):
        Image.create(p, 1 << 20)
    with Image.open(p, readonly=True) as img, pytest.raises(ReadOnlyError):
        img.write(0, b"x")
    with pytest.raises(UsageError, match="cluster size"):
        Image.create(str(tmp_path / "b.vimg"), 1 << 20, cluster_size=1 << 22)


def test_backing_loop_is_refused(tmp_path):
    a, b = str(tmp_path / "a.vimg"), str(tmp_path / "b.vimg")
    Image.create(a, 1 << 20).close()
    Image.create(b, 1 << 20, backing="a.vimg").close()
    # make a.vimg point at b.vimg without opening the chain (rebase -u would open it)
    from vfs.image.fileio import ImageFile
    from vfs.image.header import read_current_header

    f = ImageFile(a, writable=True)
    h = read_current_header(f)
    f.close()
    h.backing_name, h.backing_format, h.sequence = "b.vimg", L.BACKING_VIMG, h.sequence + 1
    write_header(a, h)
    with pytest.raises(FormatError, match="loops"):
        Image.open(b, readonly=True)


def _status(exts):
    return [(e.offset, e.length, e.allocated, e.data, e.zero, e.depth) for e in exts]


def test_block_status_of_one_layer_and_of_the_chain(tmp_path):
    """What NBD base:allocation needs: runs of data / zero / hole, for this layer alone or
    through the chain (depth says which layer decided)."""
    cs = 4096
    raw = tmp_path / "base.raw"
    with open(raw, "wb") as f:  # raw backing: data at 0..8k, a hole, data at 32k..36k, end 48k
        f.write(b"r" * 8192)
        f.seek(32768)
        f.write(b"r" * 4096)
        f.truncate(49152)
    top = str(tmp_path / "top.vimg")
    with Image.create(top, 64 * cs, cluster_size=cs, backing="base.raw", backing_format="raw") as t:
        t.write(0, b"t" * cs)  # LOCAL over backing data
        t.write_zeroes(cs, cs)  # ZERO over backing data
        t.write(5 * cs, b"t" * 10)  # LOCAL over a backing hole
        layer = _status(t.block_status(0, 64 * cs))
        assert layer == [
            (0, cs, True, True, False, 0),
            (cs, cs, True, False, True, 0),
            (2 * cs, 3 * cs, False, False, False, 0),
            (5 * cs, cs, True, True, False, 0),
            (6 * cs, 58 * cs, False, False, False, 0),
        ]
        chain = _status(t.block_status(0, 64 * cs, chain=True))
        assert chain == [
            (0, cs, True, True, False, 0),
            (cs, cs, True, False, True, 0),
            (2 * cs, 3 * cs, True, False, True, 1),  # the raw file's hole
            (5 * cs, cs, True, True, False, 0),
            (6 * cs, 2 * cs, True, False, True, 1),
            (8 * cs, cs, True, True, False, 1),  # raw data at 32k
            (9 * cs, 3 * cs, True, False, True, 1),
            (12 * cs, 52 * cs, False, False, True, 1),  # past the backing file: zeros
        ]
        assert all(e.hole == (not e.data) for e in t.block_status(0, 64 * cs, chain=True))
        # a window inside runs, and host offsets on request
        (e,) = t.block_status(100, 50, host_offsets=True)
        assert (e.offset, e.length, e.host_offset is not None) == (100, 50, True)
        allocated = [(e.offset, e.length, e.data) for e in t.iter_allocated()]
        assert allocated == [(0, cs, True), (cs, cs, False), (5 * cs, cs, True)]
        with pytest.raises(UsageError):
            t.block_status(60 * cs, 5 * cs)


def test_write_zeroes_may_keep_clusters_allocated(tmp_path):
    p = str(tmp_path / "a.vimg")
    with Image.create(p, 1 << 20, cluster_size=4096) as img:
        img.write(0, b"x" * 8192)
        img.write_zeroes(0, 4096)  # a hole: a ZERO entry, space freed
        img.write_zeroes(4096, 4096, unmap=False)  # NO_HOLE: stays allocated, holds zeros
        img.write_zeroes(20000, 100, unmap=False)  # partial: zeroed in place
        assert img.entry(0).kind == L.ZERO and img.entry(1).kind == L.LOCAL
        assert img.read(0, 8192) == bytes(8192) and img.read(20000, 100) == bytes(100)
        st = img.block_status(0, 8192)
        assert [(e.data, e.zero) for e in st] == [(False, True), (True, False)]


def test_iter_entries_and_drop_cluster(tmp_path):
    base = str(tmp_path / "base.vimg")
    with Image.create(base, 1 << 20, cluster_size=4096) as b:
        b.write(0, b"b" * (1 << 20))
    top = str(tmp_path / "top.vimg")
    with Image.create(top, 1 << 20, cluster_size=4096, backing="base.vimg") as t:
        t.write(4096, b"t" * 4096)
        t.write_zeroes(8192, 4096)
        entries = list(t.iter_entries())
        assert [(ci, e.kind) for ci, e in entries] == [(1, L.LOCAL), (2, L.ZERO)]
        assert t.cluster_data(1, entries[0][1]) == b"t" * 4096
        t.drop_cluster(1)
        t.drop_cluster(2)
        assert t.read(4096, 8192) == b"b" * 8192  # reads through again
        assert list(t.iter_entries()) == []
