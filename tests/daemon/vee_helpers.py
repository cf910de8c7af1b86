"""Helpers shared by the VEE view, upgrade and daemon tests: a sample tree, published for real."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from vfs.redirect import LocalStore, Resolver
from vfs.redirect.file_remote import FileRemote
from vfs.tree.template import Template, publish_template


def make_sample_tree(src: Path) -> None:
    """A small tree with every kind the view must handle."""
    src.mkdir(parents=True, exist_ok=True)
    (src / "etc").mkdir()
    (src / "etc" / "hosts").write_bytes(b"127.0.0.1 localhost\n")
    (src / "etc" / "passwd").write_bytes(b"root:x:0:0::/root:/bin/sh\n")
    (src / "etc" / "conf.d").mkdir()
    (src / "etc" / "conf.d" / "a.conf").write_bytes(b"a=1\n")
    (src / "etc" / "conf.d" / "b.conf").write_bytes(b"b=2\n")
    (src / "bin").mkdir()
    tool = src / "bin" / "tool"
    tool.write_bytes(b"#!/bin/sh\necho template-tool\n")
    tool.chmod(0o755)
    os.link(tool, src / "bin" / "tool-link")
    (src / "bin" / "sh-link").symlink_to("tool")
    (src / "empty").write_bytes(b"")
    big = src / "big"
    with open(big, "wb") as f:
        f.write(os.urandom(1 << 20) + bytes(1 << 20) + b"tail")
    (src / "data").mkdir()
    for i in range(5):
        (src / "data" / f"f{i}").write_bytes(f"file {i}\n".encode() * (i + 1))
    os.setxattr(src / "etc" / "hosts", "user.origin", b"template")
    (src / "suid").write_bytes(b"x")
    os.chmod(src / "suid", 0o4755)
    os.mkfifo(src / "fifo")


@dataclass
class Published:
    template: Template
    resolver: Resolver
    store: LocalStore
    remote: FileRemote
    digest: str

    def close(self) -> None:
        self.store.close()


def publish(src: Path, work: Path, *, name: str | None = None) -> Published:
    remote = FileRemote(work / "repo", create=True)
    store = LocalStore(work / "store")
    res = publish_template(src, remote, name=name, store=store)
    resolver = Resolver(store, remote)
    return Published(Template.load(resolver, res.digest), resolver, store, remote, res.digest)


def copy_tree(src: Path, dst: Path) -> None:
    """cp -a (keeps fifos, hard links, xattrs: shutil.copytree does not)."""
    import subprocess

    subprocess.run(["cp", "-a", str(src), str(dst)], check=True)
