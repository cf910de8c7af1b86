"""publish_template: every entry kind round-trips from a directory and from GNU tar; incremental
uploads; big files are streamed; bad sources are refused without touching the repository."""

from __future__ import annotations

import hashlib
import io
import os
import shutil
import socket
import stat
import subprocess
import tarfile
import tempfile
import tracemalloc
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vfs.errors import FormatError, NotFound, StoreFull
from vfs.redirect import FileRemote, LocalStore, Resolver
from vfs.tree.dirsource import data_extents
from vfs.tree.manifest_build import canonical_extents
from vfs.tree.manifest_diff import diff_templates
from vfs.tree.template import Template, publish_template

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root (mknod, chown, trusted.*)")


@pytest.fixture
def repo(tmp_path):
    return FileRemote(tmp_path / "repo", create=True)


def n_objects(repo: FileRemote) -> int:
    return sum(1 for _ in repo.iter_oids())


def make_rich_tree(root: Path) -> None:
    """One of everything a template must carry (run as root)."""
    root.mkdir()
    (root / "bin").mkdir()
    f = root / "bin" / "tool"
    f.write_bytes(b"#!/bin/sh\necho hi\n")
    os.chmod(f, 0o4755)
    os.chown(f, 1234, 5678)
    os.setxattr(f, "user.comment", b"hello")
    os.setxattr(f, "security.capability", b"\x01\x00\x00\x02" + bytes(16))
    os.link(f, root / "bin" / "tool-hardlink")
    os.link(f, root / "tool-third-name")
    (root / "tmp").mkdir(mode=0o777)
    os.chmod(root / "tmp", 0o1777)
    (root / "shared").mkdir()
    os.chmod(root / "shared", 0o2775)
    os.chown(root / "shared", 0, 100)
    os.setxattr(root / "shared", "trusted.vfs-test.x", b"")
    os.setxattr(root / "shared", "user.bin", bytes(range(256)))
    (root / "empty").write_bytes(b"")
    (root / "data").write_bytes(os.urandom(300_000))
    (root / "same-as-data").write_bytes((root / "data").read_bytes())
    os.symlink("bin/tool", root / "rel-link")
    os.symlink("/etc/passwd", root / "abs-link")
    os.symlink("does/not/exist", root / "dangling")
    os.mkfifo(root / "fifo", 0o640)
    os.mknod(root / "null", 0o666 | stat.S_IFCHR, os.makedev(1, 3))
    os.mknod(root / "loop9", 0o660 | stat.S_IFBLK, os.makedev(7, 9))
    os.mknod(root / "bigdev", 0o600 | stat.S_IFCHR, os.makedev(259, 70000))
    (root / b"caf\xe9-latin1".decode("utf-8", "surrogateescape")).write_bytes(b"x")
    with open(root / "sparse", "wb") as sp:
        sp.truncate(64 << 20)
        sp.seek(40 << 20)
        sp.write(b"island")
    s = socket.socket(socket.AF_UNIX)
    s.bind(str(root / "sock"))
    s.close()
    os.utime(root / "data", ns=(1_000_000_001, 2_000_000_002))
    os.utime(root / "bin", ns=(-5_000_000_000, 1_600_000_000_123_456_789))


def snapshot(root: Path) -> dict[bytes, os.stat_result]:
    """lstat of every path, listing directories with O_NOATIME so looking changes nothing."""
    out = {b"": os.lstat(root)}
    stack = [(os.fsencode(root), b"")]
    while stack:
        full, rel = stack.pop()
        fd = os.open(full, os.O_RDONLY | os.O_DIRECTORY | os.O_NOATIME)
        try:
            names = [os.fsencode(n) for n in os.listdir(fd)]
        finally:
            os.close(fd)
        for n in names:
            st = os.lstat(full + b"/" + n)
            out[rel + n] = st
            if stat.S_ISDIR(st.st_mode):
                stack.append((full + b"/" + n, rel + n + b"/"))
    return out


def _read_noatime(path: bytes) -> bytes:
    fd = os.open(path, os.O_RDONLY | os.O_NOATIME)
    with os.fdopen(fd, "rb") as f:
        return f.read()


def _list_noatime(path: bytes) -> list[bytes]:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOATIME)
    try:
        return [os.fsencode(n) for n in os.listdir(fd)]
    finally:
        os.close(fd)


def assert_matches_source(t: Template, root: Path, repo: FileRemote, snap) -> None:
    paths = dict(t.walk())
    assert set(paths) == set(snap)
    inos: dict[tuple[int, int], int] = {}
    for path, sr in snap.items():
        e = paths[path]
        full = os.path.join(os.fsencode(root), path) if path else os.fsencode(root)
        assert e.mode == sr.st_mode, path
        assert (e.uid, e.gid) == (sr.st_uid, sr.st_gid), path
        assert e.mtime_ns == sr.st_mtime_ns, path
        assert e.atime_ns == e.ctime_ns == e.mtime_ns, path  # a template keeps no atime, ctime
        assert e.rdev == (sr.st_rdev if e.kind in ("chr", "blk") else 0), path
        want_x = {os.fsencode(k): os.getxattr(full, k, follow_symlinks=False)
                  for k in os.listxattr(full, follow_symlinks=False)}  # fmt: skip
        assert dict(e.xattrs) == want_x, path
        if e.kind == "reg":
            assert e.size == sr.st_size
            assert e.nlink == sr.st_nlink  # every link of the source lies inside the tree
            if sr.st_size == 0:
                assert e.oid is None
            else:
                h = hashlib.sha256()
                for chunk in repo.iter_object(e.oid):
                    h.update(chunk)
                assert h.hexdigest() == e.oid
                assert e.oid == hashlib.sha256(_read_noatime(full)).hexdigest()
            assert inos.setdefault((sr.st_dev, sr.st_ino), e.ino) == e.ino  # hard links
            if sr.st_blocks * 512 < sr.st_size:  # holes: their map, and du's number
                fd = os.open(full, os.O_RDONLY | os.O_NOATIME)
                try:
                    want = canonical_extents(data_extents(fd, sr.st_size), sr.st_size)
                finally:
                    os.close(fd)
                assert e.extents == want and e.blocks <= sr.st_blocks, path
            else:
                assert e.extents is None, path
        elif e.kind == "lnk":
            assert e.target == os.readlink(full)
        elif e.kind == "dir":
            assert e.nlink == sr.st_nlink
            assert [n for n, _ in t.readdir(e.ino)] == sorted(_list_noatime(full))


@needs_root
def test_directory_round_trip_of_every_entry_kind(tmp_path, repo):
    src = tmp_path / "src"
    make_rich_tree(src)
    before = snapshot(src)
    res = publish_template(src, repo, name="rich")
    after = snapshot(src)
    assert {p: (s.st_atime_ns, s.st_ctime_ns) for p, s in after.items() if not
            stat.S_ISLNK(s.st_mode)} == {p: (s.st_atime_ns, s.st_ctime_ns) for p, s in
            before.items() if not stat.S_ISLNK(s.st_mode)}  # fmt: skip
    assert repo.get_ref("rich") == res.digest
    t = Template.load(repo, res.digest)
    assert_matches_source(t, src, repo, before)
    kinds = {e.kind for _, e in t.walk()}
    assert kinds == {"reg", "dir", "lnk", "fifo", "chr", "blk", "sock"}
    tool = t.resolve(b"bin/tool")
    assert tool.nlink == 3 and t.resolve(b"tool-third-name") is tool
    assert t.resolve(b"data").oid == t.resolve(b"same-as-data").oid
    # 3 distinct non-empty contents... plus the small ones, plus the manifest
    assert res.objects == res.objects_uploaded == n_objects(repo)
    assert res.entries == len(t) and res.paths == len(before)


@needs_root
def test_gnu_tar_with_xattrs_round_trips_like_the_directory(tmp_path, repo):
    src = tmp_path / "src"
    make_rich_tree(src)
    tar = tmp_path / "tree.tar.gz"
    subprocess.run(
        ["tar", "--xattrs", "--xattrs-include=*", "--format=posix", "--numeric-owner",
         "--sparse", "-czf", str(tar), "-C", str(src), "."],
        check=True, capture_output=True,
    )  # fmt: skip
    from_dir = Template.load(repo, publish_template(src, repo).digest)
    res = publish_template(tar, repo)
    from_tar = Template.load(repo, res.digest)
    # tar cannot carry sockets; everything else (contents, modes, owners, devices, hard links,
    # xattrs, mtimes to the ns) must be identical
    changes = diff_templates(from_dir, from_tar)
    assert [(c.path, c.status) for c in changes] == [(b"sock", "removed")]
    assert res.objects_uploaded == 1  # only the manifest: the contents were all there already
    tool = from_tar.resolve(b"bin/tool")
    assert from_tar.resolve(b"bin/tool-hardlink") is tool and tool.nlink == 3
    assert tool.xattrs[b"security.capability"].startswith(b"\x01\x00\x00\x02")


@needs_root
def test_republish_after_cp_a_and_reads_gives_the_same_digest(tmp_path, repo):
    """Reading a source tree (cp -a of it, cat, ls -lR) changes its atimes, never its digest:
    a template keeps no atime (issue 10, "Template identity")."""
    src = tmp_path / "src"
    make_rich_tree(src)
    day = 86_400 * 10**9
    for path, sr in snapshot(src).items():  # atimes older than mtimes: any read now updates them
        full = os.path.join(os.fsencode(src), path) if path else os.fsencode(src)
        os.utime(full, ns=(sr.st_mtime_ns - day, sr.st_mtime_ns), follow_symlinks=False)
    r1 = publish_template(src, repo, name="t")
    before = snapshot(src)
    subprocess.run(["cp", "-a", str(src), str(tmp_path / "copy")], check=True)
    subprocess.run("find . -type f -exec cat {} + >/dev/null && ls -lR >/dev/null", shell=True,
                   cwd=src, check=True)  # fmt: skip
    after = snapshot(src)
    read = [p for p in before if before[p].st_atime_ns != after[p].st_atime_ns]
    assert b"data" in read and b"bin" in read and len(read) > 5  # the reads did change atimes
    assert all(before[p].st_ctime_ns == after[p].st_ctime_ns for p in before)
    r2 = publish_template(src, repo, name="t")
    assert r2.digest == r1.digest and r2.objects_uploaded == 0
    t = Template.load(repo, r2.digest)
    assert all(e.atime_ns == e.mtime_ns for _, e in t.walk())  # what a VEE shows as atime


def test_tar_atime_records_do_not_change_the_digest():
    def tar(atime: str) -> io.BytesIO:
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tf:
            ti = tarfile.TarInfo("f")
            ti.size = 2
            ti.pax_headers = {"mtime": "1700000000.5", "atime": atime}
            tf.addfile(ti, io.BytesIO(b"hi"))
        buf.seek(0)
        return buf

    repo = MemRepo()
    digests = {publish_template(tar(a), repo).digest for a in ("1.0", "1800000000.25", "-5")}
    assert len(digests) == 1


def test_tar_built_with_tarfile_keeps_metadata(tmp_path, repo):
    tar = tmp_path / "t.tar"
    with tarfile.open(tar, "w", format=tarfile.PAX_FORMAT) as tf:

        def add(name, type_, data=b"", **kw):
            ti = tarfile.TarInfo(name)
            ti.type = type_
            ti.size = len(data)
            pax = kw.pop("pax", {})
            for k, v in kw.items():
                setattr(ti, k, v)
            ti.pax_headers = pax
            tf.addfile(ti, io.BytesIO(data) if data else None)

        add("./usr/", tarfile.DIRTYPE, mode=0o755)
        add("./usr/bin/su", tarfile.REGTYPE, b"su!", mode=0o4755, uid=0, gid=0,
            pax={"mtime": "1700000000.123456789", "SCHILY.xattr.user.k": "v"})  # fmt: skip
        add("usr/bin/su-again", tarfile.LNKTYPE, linkname="./usr/bin/su")
        add("dev/sda", tarfile.BLKTYPE, devmajor=8, devminor=0, mode=0o660, gid=6)
        add("link", tarfile.SYMTYPE, linkname="usr/bin/su")
        add("/abs/file", tarfile.REGTYPE, b"abs")
        add("fifo", tarfile.FIFOTYPE, mode=0o600)
        add("empty", tarfile.REGTYPE, mode=0o644, uid=1000, gid=1000)
    t = Template.load(repo, publish_template(tar, repo).digest)
    su = t.resolve(b"usr/bin/su")
    assert su.mode == stat.S_IFREG | 0o4755 and su.mtime_ns == 1_700_000_000_123_456_789
    assert dict(su.xattrs) == {b"user.k": b"v"} and su.nlink == 2
    assert t.resolve(b"usr/bin/su-again") is su
    assert repo.get(su.oid) == b"su!"
    sda = t.resolve(b"dev/sda")
    assert sda.kind == "blk" and sda.rdev == os.makedev(8, 0) and sda.gid == 6
    implicit = t.resolve(b"dev")  # not in the archive: created
    assert implicit.kind == "dir" and implicit.mode == stat.S_IFDIR | 0o755
    assert t.resolve(b"abs/file").size == 3
    assert t.resolve(b"link").target == b"usr/bin/su"
    e = t.resolve(b"empty")
    assert e.oid is None and (e.uid, e.gid) == (1000, 1000)


@pytest.mark.parametrize(
    "name,link",
    [("../evil", None), ("a/../../evil", None), ("ok", "../outside")],
)
def test_tar_with_dotdot_is_refused_and_repository_untouched(tmp_path, repo, name, link):
    tar = tmp_path / "evil.tar"
    with tarfile.open(tar, "w") as tf:
        ti = tarfile.TarInfo(name)
        if link:
            ti.type = tarfile.LNKTYPE
            ti.linkname = link
        tf.addfile(ti, io.BytesIO(b""))
    before = n_objects(repo)
    with pytest.raises(FormatError, match=r"'\.\.'"):
        publish_template(tar, repo, name="evil")
    assert n_objects(repo) == before
    with pytest.raises(NotFound):
        repo.get_ref("evil")


def test_not_a_tar_and_missing_source(tmp_path, repo):
    junk = tmp_path / "junk"
    junk.write_bytes(b"this is not a tar archive" * 40)
    with pytest.raises(FormatError, match="not a readable tar"):
        publish_template(junk, repo)
    with pytest.raises(NotFound):
        publish_template(tmp_path / "missing", repo)
    trunc = tmp_path / "trunc.tar"
    src = tmp_path / "s"
    src.mkdir()
    (src / "f").write_bytes(os.urandom(50_000))
    with tarfile.open(trunc, "w") as tf:
        tf.add(src, arcname=".")
    trunc.write_bytes(trunc.read_bytes()[:20_000])
    with pytest.raises(FormatError):
        publish_template(trunc, repo)


def test_incremental_publish_uploads_only_what_changed(tmp_path, repo):
    src = tmp_path / "src"
    src.mkdir()
    for i in range(40):
        (src / f"f{i:02d}").write_bytes(f"content {i}\n".encode() * 100)
    (src / "dup").write_bytes((src / "f00").read_bytes())
    r1 = publish_template(src, repo, name="app")
    assert r1.objects_uploaded == 41 and r1.objects_skipped == 0  # 40 contents + manifest
    assert n_objects(repo) == 41

    again = publish_template(src, repo, name="app")
    assert again.digest == r1.digest
    assert again.objects_uploaded == 0 and again.bytes_uploaded == 0
    assert n_objects(repo) == 41

    (src / "f03").write_bytes(b"changed\n")
    (src / "f07").write_bytes(b"changed too\n")
    (src / "new").write_bytes(b"brand new\n")
    (src / "f09").unlink()
    os.chmod(src / "f10", 0o600)  # metadata only: no content upload
    r2 = publish_template(src, repo, name="app")
    assert r2.digest != r1.digest
    assert r2.objects_uploaded == 4  # 3 new contents + the new manifest
    assert r2.bytes_uploaded == len(b"changed\n") + len(b"changed too\n") + len(b"brand new\n") + (
        r2.manifest_bytes
    )
    assert n_objects(repo) == 45
    assert repo.get_ref("app") == r2.digest
    changes = {c.path: c for c in diff_templates(Template.load(repo, r1.digest),
                                                 Template.load(repo, r2.digest))}  # fmt: skip
    assert changes[b"new"].status == "added" and changes[b"f09"].status == "removed"
    assert changes[b"f03"].fields[0] == "size" and "content" in changes[b"f03"].fields
    assert changes[b"f10"].fields == ("mode",)


def test_big_sparse_file_is_streamed_not_loaded(tmp_path, repo):
    src = tmp_path / "src"
    src.mkdir()
    big = src / "big.img"
    with open(big, "wb") as f:
        f.truncate(96 << 20)
        f.seek(50 << 20)
        f.write(b"needle")
    tar = tmp_path / "big.tar"
    with tarfile.open(tar, "w") as tf:
        tf.add(src, arcname=".")
    tracemalloc.start()
    try:
        r = publish_template(src, repo)
        r_tar = publish_template(tar, repo)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 16 << 20, f"publish held {peak >> 20} MiB in memory"
    assert r.digest == publish_template(src, repo).digest
    e = Template.load(repo, r.digest).resolve(b"big.img")
    assert e.size == 96 << 20 and repo.size(e.oid) == 96 << 20
    assert Template.load(repo, r_tar.digest).resolve(b"big.img").oid == e.oid
    with open(repo.root / "objects" / e.oid[:2] / e.oid, "rb") as f:
        f.seek(50 << 20)
        assert f.read(6) == b"needle"


def test_publish_also_fills_a_local_store(tmp_path, repo):
    src = tmp_path / "src"
    src.mkdir()
    (src / "a").write_bytes(b"aaa")
    (src / "b").write_bytes(os.urandom(5 << 20))  # > SMALL_FILE: the put_file path
    with LocalStore(tmp_path / "store") as store:
        r = publish_template(src, repo, store=store)
        t = Template.load(Resolver(store, None), r.digest)  # no remote: all local
        assert store.get(t.resolve(b"a").oid) == b"aaa"
        assert store.size(t.resolve(b"b").oid) == 5 << 20


def test_publish_via_resolver_second_redirection(tmp_path, repo):
    src = tmp_path / "src"
    src.mkdir()
    (src / "hello").write_bytes(b"world")
    r = publish_template(src, repo)
    with LocalStore(tmp_path / "store") as store:
        res = Resolver(store, repo)
        assert not res.has_local(r.digest)
        t = Template.load(res, r.digest)  # fetched, verified, stored
        assert res.has_local(r.digest)
        assert res.read(t.resolve(b"hello").oid, 1, 3) == b"orl"


def test_source_deeper_than_the_limit_is_refused(tmp_path, repo, monkeypatch):
    from vfs.errors import UsageError
    from vfs.tree import manifest_layout

    monkeypatch.setattr(manifest_layout, "MAX_DEPTH", 5)
    src = tmp_path / "src"
    (src / "a/b/c/d/e/f/g").mkdir(parents=True)
    with pytest.raises(UsageError, match="deeper"):
        publish_template(src, repo)
    shutil.rmtree(src / "a/b/c/d/e/f")
    publish_template(src, repo)


def test_tar_from_a_stream(tmp_path, repo):
    src = tmp_path / "src"
    src.mkdir()
    (src / "f").write_bytes(b"streamed")
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:xz") as tf:
        tf.add(src, arcname=".")
    buf.seek(0)
    t = Template.load(repo, publish_template(buf, repo).digest)
    assert repo.get(t.resolve(b"f").oid) == b"streamed"


class MemRepo:
    """An in-memory repository for fuzzing (the file:// one is tested above)."""

    def __init__(self):
        self.objects: dict[str, bytes] = {}

    def has(self, oid):
        return oid in self.objects

    def put(self, data):
        oid = hashlib.sha256(data).hexdigest()
        self.objects[oid] = bytes(data)
        return oid

    def put_file(self, path):
        return self.put(Path(path).read_bytes())


def _small_tar() -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tf:
        for name, data in [("d/a", b"alpha"), ("d/b", b"")]:
            ti = tarfile.TarInfo(name)
            ti.size = len(data)
            ti.pax_headers = {"SCHILY.xattr.user.x": "1", "mtime": "1.5"}
            tf.addfile(ti, io.BytesIO(data))
        ti = tarfile.TarInfo("d/h")
        ti.type = tarfile.LNKTYPE
        ti.linkname = "d/a"
        tf.addfile(ti)
        ti = tarfile.TarInfo("dev")
        ti.type = tarfile.CHRTYPE
        ti.devmajor, ti.devminor = 1, 3
        tf.addfile(ti)
        ti = tarfile.TarInfo("sparse")  # a PAX 0.1 sparse member: 3 + 2 data bytes in 40
        ti.size = 5
        ti.pax_headers = {"GNU.sparse.map": "0,3,30,2", "GNU.sparse.size": "40"}
        tf.addfile(ti, io.BytesIO(b"abcde"))
    return buf.getvalue()


_TAR = _small_tar()


@pytest.mark.log_warnings  # a mutated xattr name may fall outside the namespaces: skipped, logged
@given(st.lists(st.tuples(st.integers(0, len(_TAR) - 1), st.integers(0, 255)), max_size=8))
@settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_fuzz_tar_input_gives_only_format_errors(edits):
    data = bytearray(_TAR)
    for pos, val in edits:
        data[pos] = val
    repo = MemRepo()
    try:
        r = publish_template(io.BytesIO(bytes(data)), repo)
    except FormatError as e:
        assert "\n" not in str(e)
    else:
        Template.from_bytes(repo.objects[r.digest], r.digest)


class FailingRepo:
    """Wraps a repository; the n-th put fails as a full disk would."""

    def __init__(self, inner: FileRemote, fail_at: int):
        self.inner, self.fail_at, self.puts = inner, fail_at, 0

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def put(self, data):
        self.puts += 1
        if self.puts >= self.fail_at:
            raise StoreFull("no space left in repository (test)")
        return self.inner.put(data)


def test_upload_failure_stops_the_publish_before_manifest_and_ref(tmp_path, repo):
    src = tmp_path / "src"
    src.mkdir()
    for i in range(200):
        (src / f"f{i}").write_bytes(b"%d" % i)
    old = publish_template(src, repo, name="app")
    (src / "f0").write_bytes(b"new content")
    for i in range(200, 260):
        (src / f"f{i}").write_bytes(b"%d" % i)
    failing = FailingRepo(repo, fail_at=20)
    with pytest.raises(StoreFull):
        publish_template(src, failing, name="app")
    assert repo.get_ref("app") == old.digest
    present = set(repo.iter_oids())
    assert len(present) < 201 + 61  # no manifest of the new version was written
    res = publish_template(src, repo, name="app")
    assert res.digest not in present and repo.get_ref("app") == res.digest


_fs_names = st.sampled_from(["a", "b", "c", "d e", "ünï", "x" * 200, ".hidden"])
_ops = st.lists(
    st.tuples(
        st.sampled_from(["file", "dir", "link", "symlink", "fifo", "chmod", "xattr", "utime"]),
        st.lists(_fs_names, min_size=1, max_size=3),
        st.binary(max_size=64),
        st.integers(0, 0o7777),
    ),
    max_size=25,
)


@needs_root
@given(_ops)
@settings(
    max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
def test_random_trees_round_trip(tmp_path, ops):
    """Random trees built on disk by real syscalls publish to templates that match lstat."""
    base = Path(tempfile.mkdtemp(dir=tmp_path))
    src = base / "src"
    src.mkdir()
    files: list[Path] = []
    for op, parts, data, mode in ops:
        p = src.joinpath(*parts)
        try:
            p.parent.mkdir(parents=True, exist_ok=True)
            if op in ("file", "dir", "link", "symlink", "fifo") and os.path.lexists(p):
                continue  # (and never open a fifo: that would block)
            if op == "file":
                p.write_bytes(data)
                files.append(p)
            elif op == "dir":
                p.mkdir()
            elif op == "link" and files:
                os.link(files[len(data) % len(files)], p)
            elif op == "symlink":
                os.symlink(data.hex() or "t", p)
            elif op == "fifo":
                os.mkfifo(p)
            elif op == "chmod" and not p.is_symlink():
                os.chmod(p, mode | 0o700)
            elif op == "xattr":
                os.setxattr(p, "user." + parts[-1], data, follow_symlinks=False)
            elif op == "utime":
                os.utime(p, ns=(mode * 10**9 + 7, mode * 10**9 + 9), follow_symlinks=False)
        except (FileExistsError, FileNotFoundError, NotADirectoryError, IsADirectoryError):
            pass
        except OSError as e:  # user.* xattrs on symlinks/fifos: EPERM
            if e.errno not in (1, 95):
                raise
    repo = FileRemote(base / "repo", create=True)
    snap = snapshot(src)
    r = publish_template(src, repo)
    assert_matches_source(Template.load(repo, r.digest), src, repo, snap)
    assert publish_template(src, repo).objects_uploaded == 0
    shutil.rmtree(base)


@pytest.mark.parametrize("second", [b"B" * (5 << 20), b"A" * (5 << 20) + b"longer"])
def test_big_source_file_changing_between_hash_and_upload_is_refused(repo, second):
    from vfs.errors import IntegrityError
    from vfs.tree.sink import ObjectSink

    reads = [b"A" * (5 << 20), second]

    def opener():
        return io.BytesIO(reads.pop(0))

    with ObjectSink(repo) as sink, pytest.raises(IntegrityError, match="changed while"):
        sink.put_file(opener, 5 << 20)
    assert list(repo.iter_oids()) in ([], [hashlib.sha256(second).hexdigest()])


@pytest.mark.parametrize(
    "pax",
    [
        {"mtime": "1e30"},
        {"mtime": "inf"},
        {"mtime": "nan"},
        {"uid": "99999999999"},
        {"gid": "4294967295"},
        {"SCHILY.xattr.user." + "n" * 300: "v"},
        {"SCHILY.xattr.user.big": "v" * 70000},
        {"LIBARCHIVE.xattr.user.x": "!!notbase64!!"},
    ],
    ids=lambda p: next(iter(p))[:24],
)
def test_tar_with_out_of_range_pax_values_is_refused(tmp_path, pax):
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tf:
        ti = tarfile.TarInfo("f")
        ti.pax_headers = pax
        tf.addfile(ti)
    buf.seek(0)
    with pytest.raises(FormatError, match="tar"):
        publish_template(buf, MemRepo())


def test_tar_device_number_out_of_range_is_refused():
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.GNU_FORMAT) as tf:
        ti = tarfile.TarInfo("dev")
        ti.type = tarfile.CHRTYPE
        ti.devmajor, ti.devminor = 1 << 40, 1
        tf.addfile(ti)
    buf.seek(0)
    with pytest.raises(FormatError, match="device number"):
        publish_template(buf, MemRepo())


@pytest.mark.log_warnings
def test_tar_xattr_outside_supported_namespaces_is_skipped_with_a_warning(caplog):
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tf:
        ti = tarfile.TarInfo("f")
        ti.pax_headers = {"SCHILY.xattr.weird.ns": "1", "SCHILY.xattr.user.ok": "2"}
        tf.addfile(ti)
    buf.seek(0)
    repo = MemRepo()
    r = publish_template(buf, repo)
    t = Template.from_bytes(repo.objects[r.digest])
    assert dict(t.resolve(b"f").xattrs) == {b"user.ok": b"2"}
    assert "weird.ns" in caplog.text


@pytest.mark.parametrize("as_tar", [False, True])
def test_exclude_patterns(tmp_path, repo, as_tar):
    src = tmp_path / "src"
    for d in ("app/.git/objects", "app/src", "var/cache/apt", "var/lib", "cache"):
        (src / d).mkdir(parents=True)
    for f in ("app/.git/HEAD", "app/src/m.py", "app/src/m.pyc", "var/cache/apt/pkg", "var/lib/db",
              "cache/keep", "top.pyc"):  # fmt: skip
        (src / f).write_bytes(f.encode())
    os.link(src / "app/src/m.py", src / "var/lib/m-link")
    path: Path = src
    if as_tar:
        path = tmp_path / "src.tar"
        with tarfile.open(path, "w") as tf:
            tf.add(src, arcname=".")
    r = publish_template(path, repo, exclude=[".git", "*.pyc", "/var/cache/*", "/cache/"])
    names = {p for p, _ in Template.load(repo, r.digest).walk()}
    assert names == {
        b"", b"app", b"app/src", b"app/src/m.py", b"var", b"var/cache", b"var/lib",
        b"var/lib/db", b"var/lib/m-link",
    }  # fmt: skip
    t = Template.load(repo, r.digest)
    assert t.resolve(b"var/lib/m-link") is t.resolve(b"app/src/m.py")
    assert t.resolve(b"app/src/m.py").nlink == 2
    from vfs.errors import UsageError

    with pytest.raises(UsageError):
        publish_template(path, repo, exclude=["/"])


@needs_root
def test_export_to_gnu_tar_and_back_is_identical_for_rsync(tmp_path, repo):
    """publish → vfsd template export → GNU tar -x: rsync -aHAX sees nothing to copy but the
    socket (which a tar cannot hold), and publishing the extracted tree gives the same entries."""
    from click.testing import CliRunner

    from vfs.cli.vfsd import main

    src = tmp_path / "src"
    make_rich_tree(src)
    r1 = publish_template(src, repo, name="rich")
    out = tmp_path / "export.tar"
    res = CliRunner().invoke(
        main, ["template", "export", "rich", "--repo", str(repo.root), "-o", str(out)]
    )
    assert res.exit_code == 0, res.output
    assert "1 sockets left out" in res.stderr
    dst = tmp_path / "dst"
    dst.mkdir()
    subprocess.run(
        ["tar", "-xpf", str(out), "-C", str(dst), "--xattrs", "--xattrs-include=*",
         "--numeric-owner"],
        check=True, capture_output=True,
    )  # fmt: skip
    itemized = subprocess.run(
        ["rsync", "-aHAXn", "--itemize-changes", f"{src}/", f"{dst}/"],
        check=True, capture_output=True, text=True,
    ).stdout.splitlines()  # fmt: skip
    assert [line.split()[-1] for line in itemized] == ["sock"], itemized
    back = Template.load(repo, publish_template(dst, repo).digest)
    changes = diff_templates(Template.load(repo, r1.digest), back)
    assert [(c.path, c.status) for c in changes] == [(b"sock", "removed")]
    bin_dir = back.resolve(b"bin")
    assert bin_dir.mtime_ns == 1_600_000_000_123_456_789  # ns survive the round trip


def test_export_refuses_an_object_that_does_not_match(tmp_path, repo):
    from vfs.errors import IntegrityError
    from vfs.tree.tarexport import export_tar

    src = tmp_path / "src"
    src.mkdir()
    (src / "f").write_bytes(b"good bytes")
    t = Template.load(repo, publish_template(src, repo).digest)
    oid = t.resolve(b"f").oid
    (repo.root / "objects" / oid[:2] / oid).write_bytes(b"evil bytes")  # same length
    with pytest.raises(IntegrityError, match="does not match"):
        export_tar(t, repo, io.BytesIO())
    (repo.root / "objects" / oid[:2] / oid).write_bytes(b"short")
    with pytest.raises(IntegrityError, match="5 bytes where 10 were expected"):
        export_tar(t, repo, io.BytesIO())
