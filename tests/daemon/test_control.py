"""`vfsd vee add|rm|list|upgrade` against a running daemon; restarts keep the VEEs."""

from __future__ import annotations

import json
import os

import pytest

from tests.daemon.conftest import vfsd
from tests.daemon.vee_helpers import copy_tree
from vfs.redirect.file_remote import FileRemote

pytestmark = pytest.mark.fuse


def test_vee_lifecycle_and_restart(daemon, tmp_path):
    out = json.loads(daemon.vee("list", "--json").stdout)
    assert [v["name"] for v in out] == ["a", "b"]
    assert {v["template"] for v in out} == {daemon.templates["base"]}
    (daemon.mnt / "a" / "mine").write_bytes(b"private\n")
    # bad input: one line, non-zero, nothing changed
    for args, code in (
        (("add", "a", "--template", "base"), 4),
        (("add", "../x", "--template", "base"), 2),
        (("add", "x", "--template", "nosuchname"), 4),
        (("add", "x", "--template", "0" * 64), 4),
        (("rm", "nosuch"), 4),
    ):
        r = daemon.vee(*args, check=False)
        assert r.returncode == code, (args, r.stderr)
        assert r.stderr.count("\n") == 1 and "Traceback" not in r.stderr
    # a hostile "manifest" (any object that is not one): refused with one line, daemon serves on
    bad = FileRemote(daemon.repo).put(b"../../etc/passwd\0" * 10)
    r = daemon.vee("add", "x", "--template", bad, check=False)
    assert r.returncode == 6 and r.stderr.count("\n") == 1 and "Traceback" not in r.stderr
    assert sorted(os.listdir(daemon.mnt)) == ["a", "b"]
    assert not (daemon.state / "vees" / "x").exists()
    # a VEE with open private files is not pulled from under them (a read-only open of an
    # unmodified template file is of a shared inode, which belongs to no VEE in particular)
    (daemon.mnt / "b" / "note").write_bytes(b"b's own\n")
    with open(daemon.mnt / "b" / "note", "rb"):
        r = daemon.vee("rm", "b", check=False)
        assert r.returncode == 9 and "open files" in r.stderr
        r = daemon.vee("upgrade", "b", "--template", "base", check=False)
        assert r.returncode == 0  # same template: nothing to switch, nothing refused
    # remove b: gone from the mount, its layer kept aside
    r = json.loads(daemon.vee("rm", "b", "--json").stdout)
    assert r["kept_layer"] and os.path.isdir(r["kept_layer"])
    assert sorted(os.listdir(daemon.mnt)) == ["a"]
    # restart: the same VEEs and their private data
    daemon.stop()
    daemon.start()
    assert sorted(os.listdir(daemon.mnt)) == ["a"]
    assert (daemon.mnt / "a" / "mine").read_bytes() == b"private\n"
    r = vfsd("vee", "list", "--state", str(tmp_path / "nostate"), check=False)
    assert r.returncode == 3 and "no vfsd serving" in r.stderr


def test_vee_upgrade_cli(daemon, tmp_path):
    v2 = tmp_path / "src2"
    copy_tree(tmp_path / "src", v2)
    (v2 / "etc/hosts").write_bytes(b"v2 hosts\n")
    (v2 / "etc/motd").write_bytes(b"welcome to v2\n")
    daemon.publish(v2, "base")  # the name now points at v2
    a = daemon.mnt / "a"
    with open(a / "etc/hosts", "ab") as f:
        f.write(b"mine\n")
    r = json.loads(daemon.vee("upgrade", "a", "--template", "base", "--dry-run", "--json").stdout)
    assert not r["applied"]
    assert r["conflicts"] == [{"path": "etc/hosts", "private": "file", "template": "changed"}]
    r = daemon.vee("upgrade", "a", "--template", "base")
    assert "upgraded" in r.stdout and "conflict: etc/hosts" in r.stdout
    assert (a / "etc/motd").read_bytes() == b"welcome to v2\n"
    assert (a / "etc/hosts").read_bytes().endswith(b"mine\n")
    assert (daemon.mnt / "b" / "etc/hosts").read_bytes() == b"127.0.0.1 localhost\n"
    listing = {v["name"]: v for v in json.loads(daemon.vee("list", "--json").stdout)}
    assert listing["a"]["template"] == daemon.templates["base"]
    assert listing["b"]["template"] != daemon.templates["base"]
