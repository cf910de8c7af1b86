"""Sparse template files: the allocation read from a directory (SEEK_DATA/SEEK_HOLE) and from
GNU tar (every sparse format it writes), reported by the view (st_blocks), kept by copy-up, and
written back out by ``template export`` as sparse tar members that GNU tar extracts as holes."""

from __future__ import annotations

import hashlib
import io
import os
import subprocess
import tarfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.daemon.vee_helpers import publish
from tests.daemon.view_client import VeeClient
from vfs.errors import FormatError, IntegrityError
from vfs.redirect import FileRemote
from vfs.tree import manifest
from vfs.tree.manifest_build import Node, build_tables
from vfs.tree.manifest_check import check_template
from vfs.tree.manifest_diff import diff_templates
from vfs.tree.private import PrivateLayer
from vfs.tree.sink import ObjectSink
from vfs.tree.tarexport import export_tar
from vfs.tree.template import Template, publish_template
from vfs.tree.view import Views

HOLE = 10 << 20
#: hole.img: a 4 KiB data block, a 10 MiB hole, 4 bytes at the end (as ext4 maps it)
HOLE_EXTENTS = ((0, 4096), (4096 + HOLE, 4))
HOLE_BLOCKS = 8 + 1  # st_blocks: 4096 / 512, and the 4-byte tail rounded up to one block


def make_sparse_tree(src: Path) -> None:
    src.mkdir(parents=True)
    with open(src / "hole.img", "wb") as f:
        f.write(b"head" * 1024)
        f.seek(HOLE, os.SEEK_CUR)
        f.write(b"tail")
    with open(src / "all-hole", "wb") as f:
        f.truncate(HOLE)
    (src / "dense").write_bytes(os.urandom(8192))
    (src / "zeros").write_bytes(bytes(1 << 20))  # written zeros: allocated, not a hole


def gnu_tar(src: Path, out: Path, *args: str) -> Path:
    subprocess.run(["tar", "--sparse", *args, "-cf", str(out), "-C", str(src), "."],
                   check=True, capture_output=True)  # fmt: skip
    return out


@pytest.fixture
def repo(tmp_path):
    return FileRemote(tmp_path / "repo", create=True)


def test_directory_source_records_the_holes(tmp_path, repo):
    make_sparse_tree(tmp_path / "src")
    assert os.stat(tmp_path / "src" / "hole.img").st_blocks * 512 < HOLE  # ext4 made holes
    t = Template.load(repo, publish_template(tmp_path / "src", repo).digest)
    e = t.resolve(b"hole.img")
    assert e.size == 4096 + HOLE + 4 and e.extents == HOLE_EXTENTS and e.blocks == HOLE_BLOCKS
    assert e.oid == hashlib.sha256((tmp_path / "src" / "hole.img").read_bytes()).hexdigest()
    assert t.resolve(b"all-hole").extents == () and t.resolve(b"all-hole").blocks == 0
    assert t.resolve(b"dense").extents is None and t.resolve(b"dense").blocks == 16
    assert t.resolve(b"zeros").extents is None and t.resolve(b"zeros").blocks == 2048


@pytest.mark.parametrize(
    "fmt",
    [
        ("--format=posix",),  # PAX sparse 1.0 (GNU tar's default for posix)
        ("--format=posix", "--sparse-version=0.1"),
        ("--format=posix", "--sparse-version=0.0"),
        ("--format=gnu",),  # old GNU 'S' members
    ],
    ids=["pax-1.0", "pax-0.1", "pax-0.0", "gnu-S"],
)
def test_gnu_tar_sparse_members_give_the_directory_allocation(tmp_path, repo, fmt):
    make_sparse_tree(tmp_path / "src")
    from_dir = Template.load(repo, publish_template(tmp_path / "src", repo).digest)
    tar = gnu_tar(tmp_path / "src", tmp_path / "t.tar", *fmt)
    assert tar.stat().st_size < 2 << 20  # the 20 MiB of holes are not in the archive
    from_tar = Template.load(repo, publish_template(tar, repo).digest)
    for name in (b"hole.img", b"all-hole", b"dense", b"zeros"):
        a, b = from_dir.resolve(name), from_tar.resolve(name)
        assert (b.oid, b.size, b.extents, b.blocks) == (a.oid, a.size, a.extents, a.blocks), name
    if "--format=gnu" not in fmt:  # (GNU format times are whole seconds)
        assert diff_templates(from_dir, from_tar) == []


@pytest.mark.parametrize("source", ["dir", "tar"])
async def test_view_reports_the_allocation_and_copy_up_keeps_the_holes(tmp_path, source):
    make_sparse_tree(tmp_path / "src")
    src = tmp_path / "src" if source == "dir" else gnu_tar(tmp_path / "src", tmp_path / "t.tar")
    pub = publish(src, tmp_path)
    views = Views(pub.resolver)
    views.add_vee("a", pub.template, PrivateLayer(tmp_path / "state" / "a"))
    try:
        a = VeeClient(views, "a")
        attr = views.getattr(a.ino("hole.img"))
        assert attr.shared and attr.size == 4096 + HOLE + 4 and attr.blocks == HOLE_BLOCKS
        assert views.getattr(a.ino("all-hole")).blocks == 0
        assert views.getattr(a.ino("dense")).blocks == 16
        want = (tmp_path / "src" / "hole.img").read_bytes()
        assert await a.read("hole.img") == want
        # copy-up (a chmod copies the data): the private copy has the same holes
        await a.chmod("hole.img", 0o600)
        await a.chmod("all-hole", 0o600)
        upper = tmp_path / "state" / "a" / "upper"
        st = os.stat(upper / "hole.img")
        assert st.st_size == len(want) and st.st_blocks <= 16  # two 4 KiB blocks, no hole filled
        assert (upper / "hole.img").read_bytes() == want
        assert os.stat(upper / "all-hole").st_blocks == 0
        after = views.getattr(a.ino("hole.img"))
        assert not after.shared and after.blocks == st.st_blocks
        assert await a.read("hole.img") == want
    finally:
        views.close()
        pub.close()


def test_export_writes_sparse_members_that_gnu_tar_extracts_as_holes(tmp_path, repo):
    make_sparse_tree(tmp_path / "src")
    r = publish_template(tmp_path / "src", repo)
    t = Template.load(repo, r.digest)
    out = tmp_path / "export.tar"
    with open(out, "wb") as f:
        export_tar(t, repo, f)
    assert out.stat().st_size < 2 << 20  # data extents only: not the 20 MiB of holes
    dst = tmp_path / "dst"
    dst.mkdir()
    subprocess.run(["tar", "-xpf", str(out), "-C", str(dst)], check=True, capture_output=True)
    assert sorted(os.listdir(dst)) == ["all-hole", "dense", "hole.img", "zeros"]  # real names
    for name in ("hole.img", "all-hole", "dense", "zeros"):
        assert (dst / name).read_bytes() == (tmp_path / "src" / name).read_bytes(), name
    assert os.stat(dst / "hole.img").st_blocks <= 16 and os.stat(dst / "all-hole").st_blocks == 0
    # back in: from the extracted tree, and from the exported tar itself
    again = Template.load(repo, publish_template(dst, repo).digest)
    via_tar = Template.load(repo, publish_template(out, repo).digest)
    for back in (again, via_tar):
        for name in (b"hole.img", b"all-hole", b"dense"):
            assert back.resolve(name).extents == t.resolve(name).extents, name
            assert back.resolve(name).oid == t.resolve(name).oid, name


def _lying_template(repo: FileRemote) -> Template:
    """A template whose only file claims a hole where its content object has data."""
    content = b"x" * 100
    oid = repo.put(content)
    root = Node("dir", 0o755)
    root.children[b"liar"] = Node("reg", 0o644, size=100, oid=oid, extents=[(0, 10)])
    data = manifest.encode(*build_tables(root))
    return Template.load(repo, repo.put(data))


def test_data_in_a_hole_is_found_by_export_and_check(repo):
    t = _lying_template(repo)
    with pytest.raises(IntegrityError, match="has data where its template entry has a hole"):
        export_tar(t, repo, io.BytesIO())
    assert check_template(t, repo).ok  # present...
    rep = check_template(t, repo, verify=True)  # ...but not what the manifest says
    assert rep.corrupt == [t.resolve(b"liar").oid]


@pytest.mark.parametrize("size", [100, 5 << 20])  # the in-memory and the streamed path
def test_a_hole_filled_while_publishing_is_refused(repo, size):
    with ObjectSink(repo) as sink, pytest.raises(IntegrityError, match="changed while"):
        sink.put_file(lambda: io.BytesIO(b"d" * 4 + b"z" * (size - 4)), size, extents=[(0, 4)])
    with ObjectSink(repo) as sink:  # zeros where the map says hole: fine
        oid, n = sink.put_file(lambda: io.BytesIO(b"d" * 4 + bytes(size - 4)), size,
                               extents=[(0, 4)])  # fmt: skip
        assert n == size


def _pax01_tar(sparse_map: str, stored: bytes, realsize: int) -> io.BytesIO:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tf:
        ti = tarfile.TarInfo("f")
        ti.size = len(stored)
        ti.pax_headers = {"GNU.sparse.map": sparse_map, "GNU.sparse.size": str(realsize)}
        tf.addfile(ti, io.BytesIO(stored))
    buf.seek(0)
    return buf


def test_tar_sparse_maps_are_checked(repo):
    t = Template.load(repo, publish_template(_pax01_tar("0,4,96,4", b"abcdwxyz", 100), repo).digest)
    e = t.resolve(b"f")
    assert e.extents == ((0, 4), (96, 4)) and repo.get(e.oid) == b"abcd" + bytes(92) + b"wxyz"
    for bad, stored, size in [
        ("0,10,5,10", b"a" * 20, 30),  # overlapping
        ("50,10,0,10", b"a" * 20, 60),  # out of order
        ("0,10,95,10", b"a" * 20, 100),  # past the end of the file
        ("x,y", b"a" * 2, 2),  # not numbers (tarfile's int() raises ValueError)
    ]:
        with pytest.raises(FormatError, match="sparse map|not a readable tar"):
            publish_template(_pax01_tar(bad, stored, size), repo)


@given(st.lists(st.tuples(st.integers(0, 63), st.integers(1, 3)), max_size=6), st.integers(0, 4))
@settings(
    max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
def test_random_sparse_files_round_trip_through_export(tmp_path_factory, blocks, tail):
    """Random files of 4 KiB data blocks and holes: the directory's map, the template's, the
    exported tar's and the re-imported template's are one and the same."""
    work = tmp_path_factory.mktemp("rnd")
    src = work / "src"
    src.mkdir()
    size = 64 * 4096 + tail
    with open(src / "f", "wb") as f:
        f.truncate(size)
        for blk, n in blocks:
            f.seek(blk * 4096)
            f.write(os.urandom(min(n * 4096, size - blk * 4096)))
    repo = FileRemote(work / "repo", create=True)
    t = Template.load(repo, publish_template(src, repo).digest)
    e = t.resolve(b"f")
    assert e.oid == hashlib.sha256((src / "f").read_bytes()).hexdigest()
    assert sum(n for _, n in e.data_extents) <= os.stat(src / "f").st_blocks * 512
    out = io.BytesIO()
    export_tar(t, repo, out)
    out.seek(0)
    back = Template.load(repo, publish_template(out, repo).digest).resolve(b"f")
    assert (back.oid, back.extents) == (e.oid, e.extents)
