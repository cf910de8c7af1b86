"""The Image API's guard rails: locking, read-only, bounds, existing files, backing loops."""

from __future__ import annotations

import pytest
from click.testing import CliRunner

from vfs.errors import AlreadyExists, BusyError, FormatError, ReadOnlyError, UsageError
from vfs.image.cli import main
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
    from vfs.image import layout as L
    from vfs.image.fileio import ImageFile
    from vfs.image.header import read_current_header

    f = ImageFile(a, writable=True)
    h = read_current_header(f)
    f.close()
    h.backing_name, h.backing_format, h.sequence = "b.vimg", L.BACKING_VIMG, h.sequence + 1
    write_header(a, h)
    with pytest.raises(FormatError, match="loops"):
        Image.open(b, readonly=True)
