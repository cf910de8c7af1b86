"""Fast paths of the VEE view: store-first reads of template files (damaged and missing objects
still take the resolver's path), shared attributes built once, xattrs of private entries reached
through their parent's directory fd (odd names, the VEE root)."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest

from tests.daemon.vee_helpers import make_sample_tree, publish
from tests.daemon.view_client import VeeClient
from vfs.redirect import Resolver
from vfs.redirect.objectid import shard
from vfs.tree.nodes import ROOT_INO, FsError
from vfs.tree.private import PrivateLayer
from vfs.tree.view import Views

HOSTS = b"127.0.0.1 localhost\n"


@pytest.fixture
def pub(tmp_path: Path):
    make_sample_tree(tmp_path / "src")
    p = publish(tmp_path / "src", tmp_path)
    yield p
    p.close()


def _views(pub, tmp_path: Path, *, remote: bool = True) -> Views:
    content = pub.resolver if remote else Resolver(pub.store)
    views = Views(content)
    views.add_vee("a", pub.template, PrivateLayer(tmp_path / "state" / "a"))
    return views


def _hosts_oid(views: Views, a: VeeClient) -> str:
    e = views.inodes.nodes[a.ino("etc/hosts")].lower
    assert e is not None and e.oid
    return e.oid


def _damage(pub, oid: str) -> None:
    p = pub.store.objects_dir / shard(oid)
    data = bytearray(p.read_bytes())
    data[0] ^= 0xFF  # a payload byte: the chunk checksum no longer matches
    p.write_bytes(bytes(data))


async def test_template_read_goes_to_the_store(pub, tmp_path):
    views = _views(pub, tmp_path)
    a = VeeClient(views, "a")
    assert await a.read("etc/hosts") == HOSTS
    assert await a.read("big") == (await a.read("big"))  # multi-chunk object, reader reused
    assert pub.resolver.fetches == 0
    views.close()


@pytest.mark.log_warnings
async def test_damaged_object_is_fetched_again_from_the_remote(pub, tmp_path):
    views = _views(pub, tmp_path)
    a = VeeClient(views, "a")
    _damage(pub, _hosts_oid(views, a))
    assert await a.read("etc/hosts") == HOSTS
    assert pub.resolver.fetches == 1
    views.close()


@pytest.mark.log_warnings
@pytest.mark.log_warnings
async def test_damaged_object_without_remote_is_an_error_not_data(pub, tmp_path, caplog):
    views = _views(pub, tmp_path, remote=False)
    a = VeeClient(views, "a")
    oid = _hosts_oid(views, a)
    _damage(pub, oid)
    with pytest.raises(FsError) as exc:
        await a.read("etc/hosts")
    assert exc.value.errno == errno.EIO
    assert not pub.store.has(oid)  # quarantined: a later fetch can replace it
    # one log line names the object and the file
    errors = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert len(errors) == 1 and oid in errors[0] and "/etc/hosts" in errors[0]
    views.close()


@pytest.mark.log_warnings
async def test_missing_object_without_remote_reads_as_eio_not_enoent(pub, tmp_path, caplog):
    views = _views(pub, tmp_path, remote=False)
    a = VeeClient(views, "a")
    oid = _hosts_oid(views, a)
    pub.store.delete(oid)
    for attempt in (a.read("etc/hosts"), a.write("etc/hosts", b"x")):  # read, and copy-up
        with pytest.raises(FsError) as exc:
            await attempt
        assert exc.value.errno == errno.EIO
    errors = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert len(errors) == 2 and all(oid in m and "/etc/hosts" in m for m in errors)
    views.close()


async def test_missing_object_is_fetched(pub, tmp_path):
    views = _views(pub, tmp_path)
    a = VeeClient(views, "a")
    oid = _hosts_oid(views, a)
    pub.store.delete(oid)
    assert await a.read("etc/hosts") == HOSTS
    assert pub.resolver.fetches == 1 and pub.store.has(oid)
    views.close()


async def test_shared_attributes_are_made_once_and_right(pub, tmp_path):
    views = _views(pub, tmp_path)
    a = VeeClient(views, "a")
    ino = a.ino("etc/hosts")
    first = views.getattr(ino)
    assert first.shared and first.ino == ino and first.size == len(HOSTS)
    assert views.getattr(ino) is first
    st = os.stat(tmp_path / "src" / "etc" / "hosts")
    assert (first.mode, first.mtime_ns) == (st.st_mode, st.st_mtime_ns)
    views.close()


async def test_xattrs_of_private_entries_odd_names_and_vee_root(pub, tmp_path):
    views = _views(pub, tmp_path)
    a = VeeClient(views, "a")
    data = a.ino("data")
    for name in (b"caf\xe9", b"sp ace", b"-x"):
        fh, attr = views.create(data, name, 0o100644, os.O_WRONLY, 0, 0)
        views.release(fh)
        await views.setxattr(attr.ino, b"user.k", b"v-" + name)
        assert views.getxattr(attr.ino, b"user.k") == b"v-" + name
        assert b"user.k" in views.listxattr(attr.ino)
        with pytest.raises(OSError) as exc:
            views.getxattr(attr.ino, b"user.absent")
        assert exc.value.errno == errno.ENODATA
    # the copied-up template file keeps its template xattr; the VEE root has its own
    await a.write("etc/hosts", b"changed\n", trunc=True)
    assert views.getxattr(a.ino("etc/hosts"), b"user.origin") == b"template"
    root = views.lookup(ROOT_INO, b"a").ino
    await views.setxattr(root, b"user.root", b"r")
    assert views.getxattr(root, b"user.root") == b"r"
    assert b"user.root" in views.listxattr(root)
    # a private symlink: no xattrs are read through it
    link = views.symlink(data, b"ln", b"/etc/passwd", 0, 0)
    with pytest.raises(FsError) as fexc:
        views.getxattr(link.ino, b"user.k")
    assert fexc.value.errno == errno.ENODATA
    views.close()


@pytest.mark.log_warnings
async def test_a_manifest_lying_about_a_size_is_never_served(pub, tmp_path, caplog):
    """A manifest claiming 1 TiB for a 6-byte object (issue 8): no byte is served (it was a
    1 TiB file of zeros past byte 6), neither read nor copied up; one log line names it."""
    import hashlib

    from vfs.tree import manifest
    from vfs.tree.manifest_build import Node, build_tables
    from vfs.tree.template import Template

    data = b"6bytes"
    oid = pub.store.put(data)
    root = Node("dir", 0o755)
    root.children[b"liar"] = Node("reg", 0o644, size=1 << 40, oid=oid)
    root.children[b"honest"] = Node("reg", 0o644, size=len(data), oid=oid)
    blob = manifest.encode(*build_tables(root))
    t = Template.from_bytes(blob, hashlib.sha256(blob).hexdigest())
    views = Views(pub.resolver)
    views.add_vee("a", t, PrivateLayer(tmp_path / "state" / "liar"))
    a = VeeClient(views, "a")
    assert await a.read("honest") == data
    for attempt in (a.read("liar"), a.write("liar", b"x", offset=7)):
        with pytest.raises(FsError) as exc:
            await attempt
        assert exc.value.errno == errno.EIO
    assert not (tmp_path / "state" / "liar" / "upper" / "liar").exists()
    errors = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert len(errors) == 2 and all("/liar" in m and oid in m for m in errors), errors
    views.close()
