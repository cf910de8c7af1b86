"""The VEE view core without a mount: sharing, ESTALE rule, copy-up, whiteouts, opaque dirs,
renames, hard links, xattrs, restart from the private layer."""

from __future__ import annotations

import errno
import os
import stat
from pathlib import Path

import pytest

from tests.daemon.vee_helpers import make_sample_tree, publish
from tests.daemon.view_client import VeeClient
from vfs.tree.nodes import FsError, SetAttr, StaleHandle
from vfs.tree.private import OPAQUE_XATTR, REDIRECT_XATTR, PrivateLayer, is_whiteout
from vfs.tree.view import Views


@pytest.fixture
def world(tmp_path: Path):
    make_sample_tree(tmp_path / "src")
    pub = publish(tmp_path / "src", tmp_path)
    invalidated: list[tuple[int, bytes]] = []
    views = Views(pub.resolver, invalidate_entry=lambda p, n: invalidated.append((p, n)))
    for name in ("a", "b"):
        views.add_vee(name, pub.template, PrivateLayer(tmp_path / "state" / name))
    invalidated.clear()  # the VEE names added at the mount root
    yield views, pub, invalidated, tmp_path
    views.close()
    pub.close()


def upper(tmp_path: Path, vee: str) -> Path:
    return tmp_path / "state" / vee / "upper"


async def test_template_visible_and_shared(world):
    views, pub, _, _ = world
    a, b = VeeClient(views, "a"), VeeClient(views, "b")
    assert await a.read("etc/hosts") == b"127.0.0.1 localhost\n"
    assert a.ino("etc/hosts") == b.ino("etc/hosts")  # one inode for every VEE
    assert views.getattr(a.ino("etc/hosts")).shared
    assert a.ino("etc") != b.ino("etc")  # merged directories are per VEE
    assert a.ino("bin/tool") == a.ino("bin/tool-link")  # template hard link
    assert sorted(a.listdir("")) == sorted(["big", "bin", "data", "empty", "etc", "fifo", "suid"])
    assert views.readlink(a.ino("bin/sh-link")) == b"tool"
    big = await a.read("big")
    assert len(big) == (2 << 20) + 4 and big.endswith(b"tail")


async def test_write_to_shared_inode_is_estale_then_private(world):
    views, _, invalidated, tmp = world
    a, b = VeeClient(views, "a"), VeeClient(views, "b")
    shared = a.ino("etc/hosts")
    b.ino("etc/hosts")
    with pytest.raises(StaleHandle):
        await views.open(shared, os.O_WRONLY)
    # both VEEs' names for the shared inode were invalidated
    assert {n for _, n in invalidated} == {b"hosts"} and len(invalidated) == 2
    ino_a = a.ino("etc/hosts")
    assert ino_a != shared and ino_a != b.ino("etc/hosts")
    await a.write("etc/hosts", b"10.0.0.1 a\n", trunc=True)
    assert await a.read("etc/hosts") == b"10.0.0.1 a\n"
    assert await b.read("etc/hosts") == b"127.0.0.1 localhost\n"
    assert (upper(tmp, "a") / "etc" / "hosts").read_bytes() == b"10.0.0.1 a\n"
    assert not (upper(tmp, "b") / "etc").exists()
    # the private copy kept the template's xattrs and owner
    assert views.getxattr(ino_a, b"user.origin") == b"template"


async def test_chmod_copies_up_content_and_keeps_sparse(world):
    views, _, _, tmp = world
    a = VeeClient(views, "a")
    await a.chmod("big", 0o600)
    attr = views.getattr(a.ino("big"))
    assert stat.S_IMODE(attr.mode) == 0o600 and not attr.shared
    data = await a.read("big")
    assert len(data) == (2 << 20) + 4 and data[1 << 20 : 2 << 20] == bytes(1 << 20)
    st = os.stat(upper(tmp, "a") / "big")
    assert st.st_blocks * 512 < st.st_size  # the zero MiB stayed a hole


async def test_unlink_whiteout_and_recreate(world):
    views, _, _, tmp = world
    a, b = VeeClient(views, "a"), VeeClient(views, "b")
    a.unlink("etc/passwd")
    assert not a.exists("etc/passwd") and b.exists("etc/passwd")
    assert "passwd" not in a.listdir("etc")
    assert is_whiteout(os.lstat(upper(tmp, "a") / "etc" / "passwd"))
    await a.write("etc/passwd", b"new\n")
    assert await a.read("etc/passwd") == b"new\n"
    assert await b.read("etc/passwd") == b"root:x:0:0::/root:/bin/sh\n"


async def test_rmdir_then_mkdir_is_opaque(world):
    views, _, _, tmp = world
    a = VeeClient(views, "a")
    with pytest.raises(FsError) as ei:
        a.rmdir("etc/conf.d")
    assert ei.value.errno == errno.ENOTEMPTY
    a.unlink("etc/conf.d/a.conf")
    a.unlink("etc/conf.d/b.conf")
    a.rmdir("etc/conf.d")
    assert not a.exists("etc/conf.d")
    a.mkdir("etc/conf.d")
    assert a.listdir("etc/conf.d") == []
    assert os.getxattr(upper(tmp, "a") / "etc" / "conf.d", OPAQUE_XATTR) == b"y"


async def test_rename_template_dir_no_exdev(world):
    views, _, _, tmp = world
    a, b = VeeClient(views, "a"), VeeClient(views, "b")
    await a.rename("data", "moved")
    assert not a.exists("data") and sorted(a.listdir("moved")) == [f"f{i}" for i in range(5)]
    assert await a.read("moved/f3") == b"file 3\n" * 4
    assert os.getxattr(upper(tmp, "a") / "moved", REDIRECT_XATTR) == b"/data"
    assert b.exists("data")
    # a file renamed inside the moved dir, then the dir moved again
    await a.rename("moved/f1", "moved/g1")
    await a.rename("moved", "etc/deeper")
    assert sorted(a.listdir("etc/deeper")) == ["f0", "f2", "f3", "f4", "g1"]
    assert await a.read("etc/deeper/g1") == b"file 1\n" * 2


async def test_rename_file_over_file(world):
    views, _, _, _ = world
    a = VeeClient(views, "a")
    await a.rename("etc/hosts", "etc/passwd")
    assert not a.exists("etc/hosts")
    assert await a.read("etc/passwd") == b"127.0.0.1 localhost\n"
    with pytest.raises(FsError) as ei:
        await a.rename("etc/passwd", "etc/conf.d")
    assert ei.value.errno == errno.EISDIR


async def test_hard_links_survive_copy_up(world):
    views, _, _, tmp = world
    a, b = VeeClient(views, "a"), VeeClient(views, "b")
    await a.write("bin/tool", b"#!/bin/sh\necho private\n", trunc=True)
    assert await a.read("bin/tool-link") == b"#!/bin/sh\necho private\n"
    assert a.ino("bin/tool") == a.ino("bin/tool-link")
    assert os.stat(upper(tmp, "a") / "bin" / "tool").st_nlink == 2
    assert await b.read("bin/tool-link") == b"#!/bin/sh\necho template-tool\n"


async def test_xattrs(world):
    views, _, _, _ = world
    a = VeeClient(views, "a")
    ino = a.ino("etc/passwd")
    assert views.listxattr(ino) == []
    with pytest.raises(StaleHandle):
        await views.setxattr(ino, b"user.k", b"v")
    ino = a.ino("etc/passwd")
    await views.setxattr(ino, b"user.k", b"v")
    assert views.getxattr(ino, b"user.k") == b"v"
    with pytest.raises(FsError) as ei:
        await views.setxattr(ino, b"trusted.overlay.opaque", b"y")
    assert ei.value.errno == errno.EPERM
    a.mkdir("d")
    a.unlink("etc/conf.d/a.conf")
    assert b"trusted.overlay.opaque" not in views.listxattr(a.ino("etc"))


async def test_layer_never_follows_planted_symlink(world, tmp_path):
    views, _, _, tmp = world
    outside = tmp_path / "outside"
    outside.mkdir()
    a = VeeClient(views, "a")
    views.symlink(a.ino(""), b"evil", str(outside).encode(), 0, 0)
    with pytest.raises(FsError) as ei:
        views.mkdir(a.ino("evil"), b"x", 0o755, 0, 0)
    assert ei.value.errno == errno.ENOTDIR
    layer = PrivateLayer(tmp / "state" / "a")
    with pytest.raises(OSError), layer.dirfd((b"evil",)):
        pass
    assert list(outside.iterdir()) == []


async def test_restart_sees_private_state(world):
    views, pub, _, tmp = world
    a = VeeClient(views, "a")
    await a.write("etc/hosts", b"changed\n", trunc=True)
    a.unlink("etc/passwd")
    await a.rename("data", "moved")
    a.unlink("moved/f0")
    views.close()
    again = Views(pub.resolver)
    again.add_vee("a", pub.template, PrivateLayer(tmp / "state" / "a"))
    c = VeeClient(again, "a")
    assert await c.read("etc/hosts") == b"changed\n"
    assert not c.exists("etc/passwd") and not c.exists("data")
    assert sorted(c.listdir("moved")) == ["f1", "f2", "f3", "f4"]


async def test_setattr_truncate_and_times(world):
    views, _, _, _ = world
    a = VeeClient(views, "a")
    with pytest.raises(StaleHandle):
        await views.setattr(a.ino("data/f2"), SetAttr(size=3))
    attr = await views.setattr(a.ino("data/f2"), SetAttr(size=3, mtime_ns=10**18))
    assert attr.size == 3 and attr.mtime_ns == 10**18
    assert await a.read("data/f2") == b"fil"


async def test_copy_up_crash_leaves_no_partial_file(world):
    """A copy-up that dies half-way (here: the filler raises) leaves nothing visible, and
    the next start removes the temp file from work/."""
    views, pub, _, tmp = world
    layer = PrivateLayer(tmp / "state" / "c")

    def boom(fd: int) -> None:
        os.write(fd, b"half")
        raise RuntimeError("killed")

    from vfs.tree.private import FileMeta

    with pytest.raises(RuntimeError):
        layer.copy_file((b"f",), FileMeta(0o100644, 0, 0, 0, 0), boom)
    assert not (layer.upper / "f").exists()
    assert list(layer.work.iterdir()) == []
    (layer.work / "copy-leftover").write_bytes(b"x")
    PrivateLayer(tmp / "state" / "c")
    assert list(layer.work.iterdir()) == []
