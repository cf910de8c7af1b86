"""A private layer written by kernel overlayfs (metacopy=on, redirect_dir=on), made plain for
the FUSE engine's view (vfs/tree/ovl_upper.py): the VEE reads exactly the same before and
after, through a real kernel overlay first and the view core after."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from tests.daemon.vee_helpers import make_sample_tree, publish
from tests.daemon.view_client import VeeClient
from vfs.daemon.mounts import mount_erofs, mount_fs, umount
from vfs.tree.erofs_image import build_image
from vfs.tree.ovl_upper import KERNEL_WORK, METACOPY, REDIRECT, needs_normalizing, normalize_upper
from vfs.tree.private import PrivateLayer
from vfs.tree.view import Views

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="mounts need root")


def _snapshot(root: Path) -> dict[str, tuple]:
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for n in dirnames + filenames:
            p = Path(dirpath) / n
            st = os.lstat(p)
            data = p.read_bytes() if stat.S_ISREG(st.st_mode) else None
            out[str(p.relative_to(root))] = (stat.S_IFMT(st.st_mode), stat.S_IMODE(st.st_mode),
                                             st.st_uid, data)  # fmt: skip
    return out


async def test_kernel_written_layer_reads_the_same_in_the_fuse_view(tmp_path):
    make_sample_tree(tmp_path / "src")
    pub = publish(tmp_path / "src", tmp_path)
    layer_root = tmp_path / "vees" / "v"
    PrivateLayer(layer_root)
    Views.prepare_layer(pub.template, PrivateLayer(layer_root))
    (layer_root / KERNEL_WORK).mkdir()
    (tmp_path / "image").write_bytes(build_image(pub.template))
    lower, mnt = tmp_path / "lower", tmp_path / "mnt"
    lower.mkdir()
    mnt.mkdir()
    mount_erofs(tmp_path / "image", lower)
    try:
        mount_fs("overlay", mnt, strings=[
            ("lowerdir+", str(lower)), ("datadir+", str(pub.store.objects_dir)),
            ("upperdir", str(layer_root / "upper")), ("workdir", str(layer_root / KERNEL_WORK)),
            ("metacopy", "on"), ("redirect_dir", "on"), ("index", "off"),
        ])  # fmt: skip
        try:
            os.chmod(mnt / "etc" / "passwd", 0o600)  # metadata-only copy
            os.chown(mnt / "data" / "f1", 1000, 1000)
            os.rename(mnt / "data" / "f2", mnt / "data" / "f2-moved")  # metacopy + redirect
            os.rename(mnt / "big", mnt / "etc" / "big-moved")  # absolute file redirect
            os.rename(mnt / "etc" / "conf.d", mnt / "etc" / "conf.renamed")  # relative redirect
            os.mkdir(mnt / "newdir")
            os.rename(mnt / "data", mnt / "newdir" / "data")  # absolute dir redirect
            (mnt / "newdir" / "data" / "f3").write_bytes(b"written\n")  # full copy-up
            before = _snapshot(mnt)
        finally:
            umount(mnt)
    finally:
        umount(lower)
    upper = layer_root / "upper"
    meta = [p for p in upper.rglob("*") if p.is_file() and METACOPY.decode() in os.listxattr(p)]
    assert len(meta) >= 4, "the kernel wrote metadata-only copies"
    rel = os.getxattr(upper / "etc" / "conf.renamed", REDIRECT)
    assert not rel.startswith(b"/")  # overlay's relative redirect

    assert needs_normalizing(layer_root)
    rep = normalize_upper(layer_root, pub.template, pub.resolver.read)
    assert rep.completed >= 4 and rep.redirects == 1 and rep.orphans == 0
    assert not needs_normalizing(layer_root)
    for p in upper.rglob("*"):
        if p.is_file() and not p.is_symlink():
            assert METACOPY.decode() not in os.listxattr(p)
    assert os.getxattr(upper / "etc" / "conf.renamed", REDIRECT) == b"/etc/conf.d"
    assert oct(os.stat(upper / "etc" / "passwd").st_mode) == oct(stat.S_IFREG | 0o600)
    assert os.stat(upper / "newdir" / "data" / "f1").st_uid == 1000

    # The FUSE engine's view of the normalized layer shows what the kernel showed.
    views = Views(pub.resolver)
    try:
        views.add_vee("v", pub.template, PrivateLayer(layer_root))
        c = VeeClient(views, "v")
        for path, (_fmt, _mode, _uid, data) in before.items():
            assert c.exists(path), path
            if data is not None:
                assert await c.read(path) == data, path
        want = set(os.listdir(tmp_path / "src" / "etc")) - {"conf.d"} | {
            "big-moved",
            "conf.renamed",
        }
        assert sorted(c.listdir("etc")) == sorted(want)
    finally:
        views.close()
        pub.close()
