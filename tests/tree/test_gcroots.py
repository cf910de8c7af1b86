"""What a template needs from the store (vfs/tree/gcroots.py): the one ``missing_objects`` both
engines use before a VEE depends on a template."""

from __future__ import annotations

import hashlib

import pytest

from vfs.errors import SizeMismatch
from vfs.redirect import LocalStore
from vfs.tree import manifest
from vfs.tree.gcroots import missing_objects, object_sizes
from vfs.tree.manifest_build import Node, build_tables
from vfs.tree.template import Template

A, B, C = b"alpha\n", b"bravo, twice\n", b"charlie" * 100


def _template() -> Template:
    def reg(data: bytes) -> Node:
        return Node("reg", 0o644, size=len(data), oid=hashlib.sha256(data).hexdigest())

    root, etc = Node("dir", 0o755), Node("dir", 0o755)
    b = reg(B)
    etc.children.update({b"a": reg(A), b"b": b, b"empty": Node("reg", 0o644)})
    root.children.update({b"etc": etc, b"b-link": b, b"c": reg(C), b"c-again": reg(C)})
    data = manifest.encode(*build_tables(root))
    return Template.from_bytes(data, hashlib.sha256(data).hexdigest())


def test_missing_objects_once_each_in_walk_order_with_their_first_path(tmp_path):
    t = _template()
    assert object_sizes(t) == {hashlib.sha256(x).hexdigest(): len(x) for x in (A, B, C)}
    with LocalStore(tmp_path / "store") as store:
        got = missing_objects(t, store)
        assert [(m.path, m.size) for m in got] == [(b"b-link", len(B)), (b"c", len(C)),
                                                   (b"etc/a", len(A))]  # fmt: skip
        store.put(B)
        store.put(C)
        assert [m.oid for m in missing_objects(t, store)] == [hashlib.sha256(A).hexdigest()]
        store.put(A)
        assert missing_objects(t, store) == []


def test_a_local_object_of_another_size_than_the_manifest_says_is_refused(tmp_path):
    t = _template()
    with LocalStore(tmp_path / "store") as store:
        for x in (A, B, C):
            store.put(x)
        path = store.object_path(hashlib.sha256(C).hexdigest())
        with open(path, "ab") as f:  # the kernel engine would serve these bytes as they are
            f.write(b"!")
        with pytest.raises(SizeMismatch, match="manifest says 700 bytes"):
            missing_objects(t, store)
