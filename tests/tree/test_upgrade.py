"""vee upgrade: private files win, whiteouts keep hiding, conflicts are reported."""

from __future__ import annotations

import shutil
from pathlib import Path

from tests.daemon.vee_helpers import copy_tree, make_sample_tree, publish
from tests.daemon.view_client import VeeClient
from vfs.tree.private import PrivateLayer
from vfs.tree.template import Template, publish_template
from vfs.tree.upgrade import plan_upgrade
from vfs.tree.view import Views


async def test_upgrade_keeps_private_changes_and_reports_conflicts(tmp_path: Path):
    make_sample_tree(tmp_path / "src")
    pub = publish(tmp_path / "src", tmp_path)
    try:
        # v2 of the template: hosts and f1 changed, passwd removed, a new file, f2 unchanged
        v2src = tmp_path / "src2"
        copy_tree(tmp_path / "src", v2src)
        (v2src / "etc/hosts").write_bytes(b"127.0.0.1 v2\n")
        (v2src / "data/f1").write_bytes(b"v2 f1\n")
        (v2src / "etc/passwd").unlink()
        (v2src / "etc/new").write_bytes(b"new in v2\n")
        d2 = publish_template(v2src, pub.remote, store=pub.store).digest
        v2 = Template.load(pub.resolver, d2)

        views = Views(pub.resolver)
        layer = PrivateLayer(tmp_path / "state" / "x")
        views.add_vee("x", pub.template, layer)
        c = VeeClient(views, "x")
        await c.write("etc/hosts", b"private hosts\n", trunc=True)  # conflict: changed in v2
        c.unlink("data/f1")  # conflict: whiteout over a changed file
        await c.write("data/f2", b"private f2\n", trunc=True)  # no conflict: f2 same in v2
        c.unlink("etc/conf.d/a.conf")  # no conflict

        report = plan_upgrade("x", layer, pub.template, v2)
        got = {(k.path, k.private, k.template_change) for k in report.conflicts}
        assert got == {("etc/hosts", "file", "changed"), ("data/f1", "whiteout", "changed")}
        assert report.to_json()["conflicts"][0]["path"] == "data/f1"

        views.remove_vee("x")
        views.add_vee("x", v2, layer)
        c = VeeClient(views, "x")
        assert await c.read("etc/hosts") == b"private hosts\n"  # private file wins
        assert not c.exists("data/f1")  # whiteout keeps hiding
        assert await c.read("data/f2") == b"private f2\n"
        assert await c.read("etc/new") == b"new in v2\n"  # template change shows
        assert not c.exists("etc/passwd")
        assert not c.exists("etc/conf.d/a.conf") and c.exists("etc/conf.d/b.conf")
        views.close()
    finally:
        pub.close()


async def test_upgrade_redirected_dir_whose_template_dir_vanished(tmp_path: Path):
    make_sample_tree(tmp_path / "src")
    pub = publish(tmp_path / "src", tmp_path)
    try:
        v2src = tmp_path / "src2"
        copy_tree(tmp_path / "src", v2src)
        shutil.rmtree(v2src / "data")
        v2 = Template.load(
            pub.resolver, publish_template(v2src, pub.remote, store=pub.store).digest
        )
        views = Views(pub.resolver)
        layer = PrivateLayer(tmp_path / "state" / "y")
        views.add_vee("y", pub.template, layer)
        await VeeClient(views, "y").rename("data", "moved")
        report = plan_upgrade("y", layer, pub.template, v2)
        assert [(k.path, k.private, k.template_change) for k in report.conflicts] == [
            ("moved", "dir-redirect", "removed")
        ]
        views.close()
    finally:
        pub.close()
