"""The private layer on its own: name checks (fuzzed), markers, atomic creation, confinement."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vfs.errors import UsageError
from vfs.tree.private import (
    OPAQUE_XATTR,
    REDIRECT_XATTR,
    FileMeta,
    PrivateLayer,
    check_name,
    is_whiteout,
)

ROOT_META = FileMeta(stat.S_IFDIR | 0o755, 0, 0, 0, 0)


@pytest.fixture
def layer(tmp_path: Path) -> PrivateLayer:
    lay = PrivateLayer(tmp_path / "vee")
    lay.ensure_upper(ROOT_META)
    yield lay
    lay.close()


@given(st.binary(min_size=0, max_size=300))
@settings(max_examples=300, deadline=None)
def test_check_name_fuzz(name: bytes) -> None:
    try:
        check_name(name)
    except UsageError:
        assert not name or name in (b".", b"..") or b"/" in name or b"\0" in name or len(name) > 255
    else:
        assert name not in (b"", b".", b"..") and b"/" not in name and b"\0" not in name


@given(
    st.lists(st.sampled_from([b"..", b".", b"a", b"/etc", b"x/../..", b"\0", b"ok"]), max_size=4)
)
@settings(max_examples=100, deadline=None)
def test_hostile_paths_never_leave_the_layer(tmp_path_factory, comps) -> None:  # type: ignore[no-untyped-def]
    base = tmp_path_factory.mktemp("conf")
    lay = PrivateLayer(base / "vee")
    lay.ensure_upper(ROOT_META)
    try:
        path = tuple(comps) + (b"f",)
        try:
            lay.copy_file(path, FileMeta(0o100644, 0, 0, 0, 0), lambda fd: os.write(fd, b"x"))
        except (UsageError, OSError):
            pass
        outside = [p for p in base.rglob("*") if not str(p).startswith(str(base / "vee"))]
        assert outside == []
    finally:
        lay.close()


def test_root_gets_template_root_metadata(tmp_path: Path) -> None:
    lay = PrivateLayer(tmp_path / "v")
    lay.ensure_upper(FileMeta(stat.S_IFDIR | 0o751, 12, 34, 10**18, 10**18))
    st_ = os.stat(lay.upper)
    assert stat.S_IMODE(st_.st_mode) == 0o751 and (st_.st_uid, st_.st_gid) == (12, 34)
    assert stat.S_IMODE(os.stat(lay.root).st_mode) == 0o700  # the layer itself is private
    lay.close()


def test_markers_are_overlayfs_format(layer: PrivateLayer) -> None:
    layer.make_dir((b"d",), 0o40755, 0, 0, opaque=True)
    layer.make_dir((b"r",), 0o40755, 0, 0, redirect=b"/data")
    layer.whiteout((b"gone",))
    assert os.getxattr(layer.upper / "d", OPAQUE_XATTR) == b"y" and layer.is_opaque((b"d",))
    assert layer.redirect((b"r",)) == b"/data" == os.getxattr(layer.upper / "r", REDIRECT_XATTR)
    st_ = os.lstat(layer.upper / "gone")
    assert stat.S_ISCHR(st_.st_mode) and st_.st_rdev == 0 and is_whiteout(st_)
    # a directory replaces a whiteout atomically (RENAME_EXCHANGE), nothing left in work/
    layer.make_dir((b"gone",), 0o40700, 0, 0, opaque=True, replace_marker=True)
    assert os.path.isdir(layer.upper / "gone") and list(layer.work.iterdir()) == []
    # and a file replaces a whiteout atomically too
    layer.whiteout((b"f",))
    fd = layer.create((b"f",), os.O_WRONLY, 0o640, 5, 6, replace=True)
    os.close(fd)
    st_ = os.lstat(layer.upper / "f")
    assert stat.S_ISREG(st_.st_mode) and stat.S_IMODE(st_.st_mode) == 0o640 and st_.st_uid == 5


def test_make_dir_refuses_existing(layer: PrivateLayer) -> None:
    layer.make_dir((b"d",), 0o40755, 0, 0)
    with pytest.raises(FileExistsError):
        layer.make_dir((b"d",), 0o40755, 0, 0)
    assert list(layer.work.iterdir()) == []


def test_copy_file_sets_metadata_before_rename(layer: PrivateLayer) -> None:
    meta = FileMeta(0o104750, 7, 8, 10**17, 2 * 10**17, {b"user.k": b"v"})
    layer.copy_file((b"f",), meta, lambda fd: os.write(fd, b"content"))
    p = layer.upper / "f"
    st_ = os.stat(p)
    assert p.read_bytes() == b"content"
    assert stat.S_IMODE(st_.st_mode) == 0o4750 and (st_.st_uid, st_.st_gid) == (7, 8)
    assert st_.st_mtime_ns == 2 * 10**17 and os.getxattr(p, "user.k") == b"v"
