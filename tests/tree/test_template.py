"""The Template read API that the VEE view and the daemon build on."""

from __future__ import annotations

import hashlib

import pytest

from vfs.errors import IntegrityError, NotFound, UnsupportedFeature, UsageError
from vfs.tree import manifest
from vfs.tree.manifest_build import Node, build_tables
from vfs.tree.template import ROOT_INO, Template, resolve_ref


def _tree() -> Template:
    root = Node("dir", 0o755)
    etc = Node("dir", 0o755)
    pw = Node("reg", 0o644, size=4, oid=hashlib.sha256(b"root").hexdigest())
    etc.children.update({b"passwd": pw, b"group": Node("reg", 0o644), b"sub": Node("dir", 0o700)})
    root.children.update({b"etc": etc, b"pw-link": pw, b"z": Node("lnk", 0o777, target=b"etc")})
    data = manifest.encode(*build_tables(root))
    return Template.from_bytes(data, hashlib.sha256(data).hexdigest())


class Getter:
    def __init__(self, objects: dict[str, bytes]):
        self.objects = objects
        self.calls = 0

    def get(self, oid: str, *, max_size: int) -> bytes:
        self.calls += 1
        return self.objects[oid]


def test_root_lookup_getattr_readdir():
    t = _tree()
    assert t.root.ino == ROOT_INO and t.root.kind == "dir" and t.getattr(1) is t.root
    etc = t.lookup(ROOT_INO, b"etc")
    assert etc is not None and etc.kind == "dir"
    assert t.lookup(ROOT_INO, b"nope") is None
    assert t.lookup(etc.ino, b"..") is None and t.lookup(etc.ino, b".") is None
    pw = t.lookup(etc.ino, b"passwd")
    assert t.lookup(pw.ino, b"x") is None  # not a directory
    assert [n for n, _ in t.readdir(ROOT_INO)] == [b"etc", b"pw-link", b"z"]
    assert [n for n, _ in t.readdir(etc.ino)] == [b"group", b"passwd", b"sub"]
    assert t.readdir(etc.ino) is t.readdir(etc.ino)  # precomputed, not rebuilt
    assert t.readdir(t.resolve(b"etc/sub").ino) == []
    with pytest.raises(NotFound):
        t.getattr(0)
    with pytest.raises(NotFound):
        t.getattr(len(t) + 1)
    with pytest.raises(NotFound):
        t.readdir(pw.ino)


def test_resolve_and_walk():
    t = _tree()
    assert t.resolve(b"") is t.root and t.resolve(b"/") is t.root
    assert t.resolve(b"/etc//passwd") is t.resolve(b"etc/passwd") is t.resolve(b"pw-link")
    assert t.resolve(b"etc/passwd/x") is None
    assert t.resolve(b"etc/../etc") is None and t.resolve(b"z/passwd") is None  # no following
    assert [p for p, _ in t.walk()] == [
        b"", b"etc", b"etc/group", b"etc/passwd", b"etc/sub", b"pw-link", b"z"
    ]  # fmt: skip
    paths = t.paths()
    assert paths[t.resolve(b"pw-link").ino] == [b"etc/passwd", b"pw-link"]
    assert t.resolve(b"pw-link").nlink == 2


def test_entries_are_immutable():
    t = _tree()
    with pytest.raises(AttributeError):
        t.root.mode = 0o777  # type: ignore[misc]
    with pytest.raises(TypeError):
        t.resolve(b"etc").xattrs[b"user.x"] = b"1"  # type: ignore[index]


def test_load_verifies_the_digest():
    data = manifest.encode(*build_tables(Node("dir", 0o755)))
    good = hashlib.sha256(data).hexdigest()
    g = Getter({good: data, "a" * 64: data})
    assert Template.load(g, good).digest == good
    with pytest.raises(IntegrityError):
        Template.load(g, "a" * 64)
    with pytest.raises(UsageError):
        Template.load(g, "../../etc/passwd")


def test_resolve_ref():
    class Refs:
        def get_ref(self, name):
            return {"base": "b" * 64, "bad": "not-a-digest"}[name]

    assert resolve_ref("c" * 64, Refs()) == "c" * 64
    assert resolve_ref("base", Refs()) == "b" * 64
    with pytest.raises(UsageError):
        resolve_ref("bad", Refs())


def test_loading_20000_entries():
    """Correctness of a big template's index (its load time is a benchmark figure:
    ``python -m tools.bench.template``, not a timed test)."""
    root = Node("dir", 0o755)
    k = 0
    for i in range(200):
        d = Node("dir", 0o755)
        root.children[b"dir%03d" % i] = d
        for j in range(100):
            k += 1
            d.children[b"file-%05d.txt" % j] = Node(
                "reg", 0o644, size=j + 1, oid=hashlib.sha256(b"%d" % k).hexdigest(), mtime_ns=k
            )
    data = manifest.encode(*build_tables(root))
    t = Template.from_bytes(data)
    assert len(t) == 20_201
    for i in range(200):
        e = t.lookup(i + 2, b"file-00042.txt")
        assert e is not None and e.size == 43


def test_entries_are_hashable_and_too_big_templates_refused():
    t = _tree()
    assert len({e for _, e in t.walk()}) == len(t)
    data = manifest.encode(*build_tables(Node("dir", 0o755, children={b"a": Node("fifo", 0)})))
    with pytest.raises(UnsupportedFeature, match="more than this reader accepts"):
        Template.from_bytes(data, max_entries=1)
    assert len(Template.from_bytes(data, max_entries=2)) == 2
