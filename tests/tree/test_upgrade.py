"""vee upgrade: private files win, whiteouts keep hiding, conflicts are reported."""

from __future__ import annotations

import os
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


async def test_private_files_identical_to_the_new_version_are_no_conflict(tmp_path: Path):
    """After `apt-get install` in a VEE, v2 (the same packages installed) adds the very files
    the VEE wrote privately: no conflict. A difference a program sees (bytes, mode, owner,
    target, xattrs) still is one."""
    make_sample_tree(tmp_path / "src")
    pub = publish(tmp_path / "src", tmp_path)
    try:
        v2src = tmp_path / "src2"
        copy_tree(tmp_path / "src", v2src)
        (v2src / "etc/added").write_bytes(b"installed by a package\n")
        (v2src / "etc/added-big").write_bytes(b"x" * (3 << 20))
        (v2src / "etc/other-bytes").write_bytes(b"v2's bytes\n")
        (v2src / "etc/other-mode").write_bytes(b"same bytes\n")
        (v2src / "etc/other-mode").chmod(0o600)
        (v2src / "data/f1").write_bytes(b"changed the same way\n")  # changed, equal privately
        (v2src / "etc/link").symlink_to("added")
        (v2src / "etc/link2").symlink_to("added")
        (v2src / "etc/tagged").write_bytes(b"tagged\n")
        os.setxattr(v2src / "etc/tagged", "user.pkg", b"v2")
        v2 = Template.load(
            pub.resolver, publish_template(v2src, pub.remote, store=pub.store).digest
        )
        views = Views(pub.resolver)
        layer = PrivateLayer(tmp_path / "state" / "x")
        views.add_vee("x", pub.template, layer)
        c = VeeClient(views, "x")
        await c.write("etc/added", b"installed by a package\n")
        await c.write("etc/added-big", b"x" * (3 << 20))
        await c.write("etc/other-bytes", b"the VEE's bytes\n")
        await c.write("etc/other-mode", b"same bytes\n")
        await c.write("data/f1", b"changed the same way\n", trunc=True)
        await c.write("etc/tagged", b"tagged\n")  # no user.pkg xattr privately
        views.symlink(c.ino("etc"), b"link", b"added", 0, 0)
        views.symlink(c.ino("etc"), b"link2", b"elsewhere", 0, 0)
        report = plan_upgrade("x", layer, pub.template, v2)
        got = {(k.path, k.private, k.template_change) for k in report.conflicts}
        assert got == {
            ("etc/other-bytes", "file", "added"),
            ("etc/other-mode", "file", "added"),
            ("etc/tagged", "file", "added"),
            ("etc/link2", "file", "added"),
        }
        assert report.identical == 4
        assert report.to_json()["identical_to_new"] == 4
        views.close()
    finally:
        pub.close()


async def test_hidden_additions_under_an_opaque_directory_or_a_whiteout_are_reported(
    tmp_path: Path,
):
    """A private directory that was deleted and made again is opaque: it hides everything the
    template has beneath it, also what a new version adds there; a whiteout over a directory
    hides the same. Both are reported (today's report did not), path by path."""
    make_sample_tree(tmp_path / "src")
    pub = publish(tmp_path / "src", tmp_path)
    try:
        v2src = tmp_path / "src2"
        copy_tree(tmp_path / "src", v2src)
        (v2src / "etc/conf.d/c.conf").write_bytes(b"c=3\n")  # added under the opaque dir
        (v2src / "etc/conf.d/b.conf").write_bytes(b"b=22\n")  # changed under it
        (v2src / "etc/conf.d/d.conf").write_bytes(b"d=4\n")  # added, and the VEE has it
        (v2src / "etc/conf.d/sub").mkdir()  # an added directory: reported once
        (v2src / "etc/conf.d/sub/x").write_bytes(b"x\n")
        (v2src / "data/f9").write_bytes(b"new\n")  # added under a whited-out directory
        v2 = Template.load(
            pub.resolver, publish_template(v2src, pub.remote, store=pub.store).digest
        )
        views = Views(pub.resolver)
        layer = PrivateLayer(tmp_path / "state" / "x")
        views.add_vee("x", pub.template, layer)
        c = VeeClient(views, "x")
        for n in ("a.conf", "b.conf"):
            c.unlink(f"etc/conf.d/{n}")
        c.rmdir("etc/conf.d")
        c.mkdir("etc/conf.d")  # opaque now
        await c.write("etc/conf.d/d.conf", b"d=4\n")
        assert layer.is_opaque((b"etc", b"conf.d"))
        for i in range(5):
            c.unlink(f"data/f{i}")
        c.rmdir("data")  # a whiteout over the directory
        report = plan_upgrade("x", layer, pub.template, v2)
        got = {(k.path, k.private, k.template_change, k.hidden_by) for k in report.conflicts}
        assert got == {
            ("etc/conf.d/b.conf", "dir-opaque", "changed", "etc/conf.d"),
            ("etc/conf.d/c.conf", "dir-opaque", "added", "etc/conf.d"),
            ("etc/conf.d/sub", "dir-opaque", "added", "etc/conf.d"),
            ("data/f9", "whiteout", "added", "data"),
        }
        j = {c["path"]: c for c in report.to_json()["conflicts"]}
        assert j["etc/conf.d/c.conf"]["hidden_by"] == "etc/conf.d"
        # and upgrading does what the report says: hidden stays hidden
        views.remove_vee("x")
        views.add_vee("x", v2, layer)
        c = VeeClient(views, "x")
        assert sorted(c.listdir("etc/conf.d")) == ["d.conf"]
        assert not c.exists("data")
        views.close()
    finally:
        pub.close()


def test_upgrade_plan_reads_relative_dir_redirects_as_overlayfs_writes_them(tmp_path: Path):
    """A directory renamed within its parent by kernel overlayfs (the kernel engine) carries a
    redirect relative to its parent's template directory: the plan compares what is below it
    with that template directory, as the kernel will show it."""
    make_sample_tree(tmp_path / "src")
    pub = publish(tmp_path / "src", tmp_path)
    try:
        v2src = tmp_path / "src2"
        copy_tree(tmp_path / "src", v2src)
        (v2src / "etc/conf.d/a.conf").write_bytes(b"a=2\n")  # changed under the old name
        v2 = Template.load(
            pub.resolver, publish_template(v2src, pub.remote, store=pub.store).digest
        )
        layer = PrivateLayer(tmp_path / "state" / "z")
        moved = layer.upper / "etc" / "conf.e"  # `mv etc/conf.d etc/conf.e` in the kernel
        moved.mkdir(parents=True)
        os.setxattr(moved, "trusted.overlay.redirect", b"conf.d")
        (moved / "a.conf").write_bytes(b"mine\n")  # a private file over the template's a.conf
        (moved / "b.conf").write_bytes(b"mine too\n")  # b.conf is the same in v2: no conflict
        report = plan_upgrade("z", layer, pub.template, v2)
        assert [(k.path, k.private, k.template_change) for k in report.conflicts] == [
            ("etc/conf.e/a.conf", "file", "changed")
        ]
        # the same layer with an absolute redirect (the FUSE engine's form) plans the same
        os.setxattr(moved, "trusted.overlay.redirect", b"/etc/conf.d")
        again = plan_upgrade("z", layer, pub.template, v2)
        assert [(k.path, k.private) for k in again.conflicts] == [("etc/conf.e/a.conf", "file")]
        layer.close()
    finally:
        pub.close()


def test_new_directories_kernel_overlayfs_marks_opaque_hide_only_what_the_vee_lacks(
    tmp_path: Path,
):
    """Kernel overlayfs marks every directory made in a merged directory opaque. After `apt-get
    install` on the kernel engine, a new version with the same packages adds those directories:
    the directory itself is no conflict, files the VEE has the same are identical, and only what
    the new version adds there and the VEE lacks is reported as hidden."""
    make_sample_tree(tmp_path / "src")
    pub = publish(tmp_path / "src", tmp_path)
    try:
        v2src = tmp_path / "src2"
        copy_tree(tmp_path / "src", v2src)
        (v2src / "etc/newpkg").mkdir()
        (v2src / "etc/newpkg/conf").write_bytes(b"installed\n")
        (v2src / "etc/newpkg/extra").write_bytes(b"only in v2\n")
        v2 = Template.load(
            pub.resolver, publish_template(v2src, pub.remote, store=pub.store).digest
        )
        layer = PrivateLayer(tmp_path / "state" / "k")
        made = layer.upper / "etc" / "newpkg"  # `mkdir etc/newpkg` on the kernel engine
        made.mkdir(parents=True)
        os.setxattr(made, "trusted.overlay.opaque", b"y")
        (made / "conf").write_bytes(b"installed\n")
        shutil.copystat(v2src / "etc/newpkg/conf", made / "conf")
        report = plan_upgrade("k", layer, pub.template, v2)
        got = [(k.path, k.private, k.template_change, k.hidden_by) for k in report.conflicts]
        assert got == [("etc/newpkg/extra", "dir-opaque", "added", "etc/newpkg")]
        assert report.identical == 1
        layer.close()
    finally:
        pub.close()
