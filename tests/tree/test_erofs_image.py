"""Template images (vfs/tree/erofs_image.py): every entry kind, owner, mode, time, xattr, hard
link and device number of a manifest, read back by the real kernel (a file-backed EROFS mount,
then an overlay with the store as data layer) and by erofs-utils' fsck."""

from __future__ import annotations

import os
import random
import shutil
import socket
import stat
import struct
import subprocess
from pathlib import Path

import pytest

from tests.daemon.vee_helpers import publish
from vfs.errors import FormatError, UnsupportedFeature
from vfs.tree.entry import Entry
from vfs.tree.erofs_image import (
    ImageCache,
    build_image,
    check_image,
    data_path,
)
from vfs.tree.template import Template

ROOT_NEEDED = pytest.mark.skipif(os.geteuid() != 0, reason="mounts need root")


def _mount(image: Path, target: Path) -> None:
    from vfs.daemon.mounts import mount_erofs

    target.mkdir(exist_ok=True)
    mount_erofs(image, target)


def _umount(target: Path) -> None:
    from vfs.daemon.mounts import umount

    umount(target)


def make_every_kind(src: Path) -> None:
    """Every kind a manifest holds, with owners, odd modes, ns times (also before 1970),
    xattrs of every namespace EROFS has, hard links, long names and a directory of many
    blocks."""
    src.mkdir()
    (src / "d").mkdir()
    (src / "d" / "f").write_bytes(b"hello\n")
    os.chown(src / "d" / "f", 100000, 65534)
    os.chmod(src / "d" / "f", 0o640)
    (src / "empty").write_bytes(b"")
    (src / "big").write_bytes(os.urandom(100_000) + bytes(1 << 20) + b"end")
    (src / "suid").write_bytes(b"s")
    os.chmod(src / "suid", 0o4755)
    (src / "sgid-dir").mkdir()
    os.chmod(src / "sgid-dir", 0o2775)
    (src / "sticky").mkdir()
    os.chmod(src / "sticky", 0o1777)
    os.link(src / "d" / "f", src / "hard")
    (src / "short").symlink_to("d/f")
    (src / "long").symlink_to("x" * 3000)
    os.mkfifo(src / "fifo")
    os.mknod(src / "null", stat.S_IFCHR | 0o666, os.makedev(1, 3))
    os.mknod(src / "loop", stat.S_IFBLK | 0o660, os.makedev(7, 300))
    s = socket.socket(socket.AF_UNIX)
    s.bind(os.fspath(src / "sock"))
    s.close()
    name = bytes(range(1, 47)) + b"\xff\xfe name\n"  # any byte but / and NUL
    (src / os.fsdecode(name.replace(b"/", b"_"))).write_bytes(b"odd name")
    os.setxattr(src / "d" / "f", "user.colour", b"blue")
    os.setxattr(src / "d" / "f", "trusted.t", b"\x00\x01")
    # cap_net_raw+ep, as ping has it (VFS_CAP_REVISION_2 | effective, permitted bit 13)
    os.setxattr(
        src / "suid", "security.capability", struct.pack("<5I", 0x02000001, 1 << 13, 0, 0, 0)
    )
    os.setxattr(src / "d", "user.on-a-dir", b"d")
    os.setxattr(src / "short", "trusted.link", b"on a symlink", follow_symlinks=False)
    many = src / "many"
    many.mkdir()
    for i in range(600):
        (many / f"entry-with-a-fairly-long-name-{i:04d}").write_bytes(b"%d" % i)
    os.utime(src / "d" / "f", ns=(1, 1_600_000_001_987_654_321))
    os.utime(src / "empty", ns=(1, -1_500_000_000_123_456_789))


def _compare(tree: Path, t: Template, *, objects: bool) -> None:
    """Every entry of ``t`` as the kernel shows it under ``tree``."""
    seen: dict[int, int] = {}
    for path, e in t.walk():
        if objects and not path:
            continue  # an overlay's root is its upper directory's (empty here)
        p = tree / os.fsdecode(path) if path else tree
        st = os.lstat(p)
        assert st.st_mode == e.mode, path
        assert (st.st_uid, st.st_gid) == (e.uid, e.gid), path
        assert st.st_mtime_ns == e.mtime_ns, path
        assert st.st_nlink == e.nlink, path
        if e.kind in ("reg", "lnk"):
            assert st.st_size == e.size, path
        if e.kind in ("chr", "blk"):
            assert st.st_rdev == e.rdev, path
        if e.kind == "lnk":
            assert os.readlink(p) == os.fsdecode(e.target), path
        if e.kind == "dir":
            assert sorted(os.listdir(os.fsencode(p))) == sorted(n for n, _ in t.readdir(e.ino))
        names = set(os.listxattr(p, follow_symlinks=False))
        want = {k.decode() for k in e.xattrs}
        if objects:  # through an overlay the markers are hidden
            assert names == want, path
            if e.kind == "reg" and e.oid:
                assert len(p.read_bytes()) == e.size
        else:
            if e.kind == "reg" and e.oid:
                want |= {"trusted.overlay.metacopy", "trusted.overlay.redirect"}
                red = os.getxattr(p, "trusted.overlay.redirect", follow_symlinks=False)
                assert red == data_path(e.oid)
            assert names == want, path
        for k, v in e.xattrs.items():
            assert os.getxattr(p, k, follow_symlinks=False) == v
        if e.nlink > 1 and e.kind != "dir":
            assert seen.setdefault(e.ino, st.st_ino) == st.st_ino  # one inode, many names


@ROOT_NEEDED
def test_image_is_the_template_for_the_kernel(tmp_path):
    make_every_kind(tmp_path / "src")
    pub = publish(tmp_path / "src", tmp_path)
    try:
        image = tmp_path / "t.erofs"
        image.write_bytes(build_image(pub.template))
        lower = tmp_path / "lower"
        _mount(image, lower)
        try:
            _compare(lower, pub.template, objects=False)
            st = os.stat(lower / "big")
            assert st.st_size == 100_000 + (1 << 20) + 3
            # an overlay with the store as its data layer reads every file's bytes
            from vfs.daemon.mounts import mount_fs

            mnt = tmp_path / "mnt"
            for d in ("mnt", "upper", "work"):
                (tmp_path / d).mkdir()
            mount_fs(
                "overlay",
                mnt,
                strings=[
                    ("lowerdir+", str(lower)),
                    ("datadir+", str(pub.store.objects_dir)),
                    ("upperdir", str(tmp_path / "upper")),
                    ("workdir", str(tmp_path / "work")),
                    ("metacopy", "on"),
                    ("redirect_dir", "on"),
                ],
            )
            try:
                _compare(mnt, pub.template, objects=True)
                for dirpath, _, files in os.walk(tmp_path / "src"):
                    for f in files:
                        s = Path(dirpath) / f
                        if stat.S_ISREG(os.lstat(s).st_mode):
                            rel = s.relative_to(tmp_path / "src")
                            assert (mnt / rel).read_bytes() == s.read_bytes(), rel
            finally:
                _umount(mnt)
        finally:
            _umount(lower)
    finally:
        pub.close()


def test_image_is_deterministic_and_accepted_by_fsck_erofs(tmp_path):
    make_every_kind(tmp_path / "src")
    pub = publish(tmp_path / "src", tmp_path)
    try:
        a, b = build_image(pub.template), build_image(pub.template)
        assert a == b
        image = tmp_path / "t.erofs"
        image.write_bytes(a)
        r = subprocess.run(["fsck.erofs", str(image)], capture_output=True, text=True)
        assert r.returncode == 0, r.stderr
        check_image(image, pub.template.digest)
    finally:
        pub.close()


def _random_template(rng: random.Random) -> Template:
    """A random valid template built from entries, without a manifest: kinds, names of any
    bytes, hard links, deep and wide directories, big xattrs."""
    entries: list[Entry] = []
    dirents: list[tuple[int, bytes, int]] = []

    def new(kind: str, **kw) -> Entry:
        ino = len(entries) + 1
        kinds = {"dir": stat.S_IFDIR, "reg": stat.S_IFREG, "lnk": stat.S_IFLNK,
                 "fifo": stat.S_IFIFO, "chr": stat.S_IFCHR, "blk": stat.S_IFBLK,
                 "sock": stat.S_IFSOCK}  # fmt: skip
        mode = kinds[kind] | rng.choice([0o755, 0o644, 0o4711, 0o1777, 0])
        uid, gid, mtime = (
            rng.randrange(1 << 32),
            rng.randrange(70000),
            rng.randrange(-(1 << 40), 1 << 62),
        )
        e = Entry(
            ino,
            kind,
            mode,
            uid,
            gid,
            kw.get("size", 0),
            mtime,
            kw.get("nlink", 1),
            kw.get("rdev", 0),
            kw.get("target"),
            kw.get("oid"),
            kw.get("xattrs", {}),
        )
        entries.append(e)
        return e

    root = new("dir", nlink=2)
    dirs = [root]
    regs: list[Entry] = []
    for _ in range(rng.randrange(1, 300)):
        parent = rng.choice(dirs)
        name = bytes(rng.choice([c for c in range(1, 256) if c != 47])
                     for _ in range(rng.randrange(1, 40)))  # fmt: skip
        if name in (b".", b"..") or any(p == parent.ino and n == name for p, n, _ in dirents):
            continue
        kind = rng.choice(["dir", "reg", "reg", "lnk", "fifo", "chr", "blk", "sock", "link"])
        if kind == "link" and regs:
            dirents.append((parent.ino, name, rng.choice(regs).ino))
            continue
        if kind == "link":
            kind = "reg"
        xattrs = {}
        if rng.random() < 0.2:
            # user.* only on files and directories (the kernel hides it on special files)
            ns = b"user." if kind in ("dir", "reg") else b"trusted."
            xattrs = {ns + b"k%d" % i: os.urandom(rng.randrange(0, 3000)) for i in range(3)}
        if kind == "dir":
            e = new("dir", nlink=2, xattrs=xattrs)
            dirs.append(e)
        elif kind == "reg":
            size = rng.choice([0, 1, 5000, 1 << 40])
            e = new("reg", size=size, oid=os.urandom(32).hex() if size else None, xattrs=xattrs)
            regs.append(e)
        elif kind == "lnk":
            target = b"t" * rng.randrange(1, 4096)
            e = new("lnk", size=len(target), target=target, xattrs=xattrs)
        elif kind in ("chr", "blk"):
            e = new(kind, rdev=os.makedev(rng.randrange(4096), rng.randrange(1 << 20)))
        else:
            e = new(kind, xattrs=xattrs)
        dirents.append((parent.ino, name, e.ino))
    # link counts as a manifest has them
    counts: dict[int, int] = {}
    subdirs: dict[int, int] = {}
    for p, _, c in dirents:
        counts[c] = counts.get(c, 0) + 1
        if entries[c - 1].kind == "dir":
            subdirs[p] = subdirs.get(p, 0) + 1
    fixed = []
    for e in entries:
        n = 2 + subdirs.get(e.ino, 0) if e.kind == "dir" else counts.get(e.ino, 1)
        fixed.append(Entry(e.ino, e.kind, e.mode, e.uid, e.gid, e.size, e.mtime_ns, n, e.rdev,
                           e.target, e.oid, e.xattrs))  # fmt: skip
    dirents.sort(key=lambda d: (d[0], d[1]))
    return Template(os.urandom(32).hex(), fixed, dirents, 0)


@pytest.mark.parametrize("seed", range(12))
def test_random_templates_pass_fsck_and_extract_exactly(tmp_path, seed):
    rng = random.Random(seed)
    print("seed", seed)
    t = _random_template(rng)
    image = tmp_path / "r.erofs"
    image.write_bytes(build_image(t))
    r = subprocess.run(["fsck.erofs", str(image)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


@ROOT_NEEDED
@pytest.mark.parametrize("seed", range(3))
def test_random_templates_mount_and_read_back(tmp_path, seed):
    t = _random_template(random.Random(1000 + seed))
    image = tmp_path / "r.erofs"
    image.write_bytes(build_image(t))
    lower = tmp_path / "lower"
    _mount(image, lower)
    try:
        _compare(lower, t, objects=False)
    finally:
        _umount(lower)


def _tiny(xattrs: dict[bytes, bytes]) -> Template:
    root = Entry(1, "dir", stat.S_IFDIR | 0o755, 0, 0, 0, 0, 2, 0, None, None, {})
    f = Entry(2, "reg", stat.S_IFREG | 0o644, 0, 0, 0, 0, 1, 0, None, None, xattrs)
    return Template("ab" * 32, [root, f], [(1, b"f", 2)], 0)


def test_what_erofs_cannot_hold_is_refused_with_one_line():
    with pytest.raises(UnsupportedFeature, match="system.nfs4_acl"):
        build_image(_tiny({b"system.nfs4_acl": b"x"}))
    with pytest.raises(UnsupportedFeature, match="too large"):
        build_image(_tiny({b"user.big": bytes(65536)}))
    # overlay markers can never come from a template (publish refuses them; so does this)
    with pytest.raises(FormatError, match="reserved"):
        build_image(_tiny({b"trusted.overlay.opaque": b"y"}))


@pytest.mark.log_warnings
def test_cache_builds_once_checks_every_use_and_rebuilds_damage(tmp_path):
    make_every_kind(tmp_path / "src")
    pub = publish(tmp_path / "src", tmp_path)
    try:
        cache = ImageCache(tmp_path / "images")
        p = cache.ensure(pub.template)
        assert cache.built == 1 and cache.ensure(pub.template) == p and cache.built == 1
        good = p.read_bytes()
        raw = bytearray(good)
        raw[5000] ^= 0x40
        p.write_bytes(bytes(raw))
        with pytest.raises(FormatError, match="checksum"):
            check_image(p, pub.template.digest)
        assert cache.ensure(pub.template) == p and cache.built == 2
        assert p.read_bytes() == good
        p.write_bytes(good[:3000])  # truncated
        cache.ensure(pub.template)
        assert cache.built == 3 and p.read_bytes() == good
        with pytest.raises(FormatError, match="not"):
            check_image(p, "0" * 64)  # another template's digest
        shutil.rmtree(tmp_path / "images")
        cache = ImageCache(tmp_path / "images")
        assert cache.ensure(pub.template).read_bytes() == good  # missing: built again
    finally:
        pub.close()
