"""The kernel's readdir cache on VEE directories (FOPEN_CACHE_DIR + FOPEN_KEEP_CACHE).

A warm listing costs the daemon no READDIRPLUS; every change through the mount shows at once
(the kernel drops the cache itself); what changes behind the kernel's back (unsharing, a node the
daemon drops, an upgrade, the VEE set) shows too. Each listing is checked against a plain
directory that went through the same operations, and every d_ino against st_ino.
"""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

import pytest

from tests.daemon.conftest import Daemon, running_daemon, wait_for

pytestmark = pytest.mark.fuse


@pytest.fixture
def dd(tmp_path: Path):
    """A daemon logging every FUSE request (--debug-fuse), VEEs a and b on the sample tree."""
    with running_daemon(tmp_path, extra_args=["--debug-fuse"]) as d:
        yield d


def readdirs(d: Daemon, path: Path) -> int:
    """READDIRPLUS requests the daemon got so far for the directory at ``path``."""
    ino = os.stat(path).st_ino
    pat = re.compile(rf"opcode: READDIRPLUS \(44\), nodeid: {ino},")
    return sum(1 for line in d.log_text().splitlines() if pat.search(line))


def listing(path: Path) -> dict[str, int]:
    """name → d_ino, after checking that every d_ino is the st_ino a stat gives."""
    ents = {e.name: e.inode() for e in os.scandir(path)}
    for name, d_ino in ents.items():
        st_ino = os.stat(path / name, follow_symlinks=False).st_ino
        assert d_ino == st_ino, f"{path / name}: d_ino {d_ino} != st_ino {st_ino}"
    return ents


def consistent(path: Path) -> bool:
    try:
        listing(path)
        return True
    except AssertionError:
        return False


def test_warm_listing_sends_no_readdir(dd):
    a = dd.mnt / "a"
    (a / "data" / "mine").write_bytes(b"private")  # a merged template + private directory
    for d in (a / "data", a / "etc", a):
        # twice: the copy-up of data/ changed the mtime of a's private root, and the kernel
        # resets a cached listing when it sees the directory's mtime change (a GETATTR here)
        listing(d)
        listing(d)
        first = readdirs(dd, d)
        assert first >= 1
        for _ in range(3):
            listing(d)
        assert readdirs(dd, d) == first, f"{d} listed again by the daemon"
    # the mount root is not cached: `vfsd vee add/rm` change it behind the kernel's back
    os.listdir(dd.mnt)
    n = readdirs(dd, dd.mnt)
    os.listdir(dd.mnt)
    assert readdirs(dd, dd.mnt) > n


OPS = [
    ("create", lambda d: (d / "new").write_bytes(b"n")),
    ("mkfifo", lambda d: os.mkfifo(d / "fifo2")),
    ("mkdir", lambda d: (d / "sub").mkdir()),
    ("symlink", lambda d: (d / "ln").symlink_to("f0")),
    ("link", lambda d: os.link(d / "f1", d / "f1-link")),
    ("unlink template file", lambda d: (d / "f2").unlink()),
    ("unlink private file", lambda d: (d / "new").unlink()),
    ("rename within", lambda d: os.rename(d / "f3", d / "f3-renamed")),
    ("rename over", lambda d: os.rename(d / "f4", d / "f0")),
    ("rename dir out", lambda d: os.rename(d / "sub", d.parent / "sub-moved")),
    ("rename dir in", lambda d: os.rename(d.parent / "sub-moved", d / "sub-back")),
    ("rmdir", lambda d: (d / "sub-back").rmdir()),
    ("rename from elsewhere", lambda d: os.rename(d.parent / "empty", d / "empty")),
]


def test_changes_through_the_mount_show_at_once(dd, tmp_path: Path):
    vee = dd.mnt / "a" / "data"
    plain = tmp_path / "plain" / "data"  # a copy of the template: the same names as VEE a
    subprocess.run(["cp", "-a", str(tmp_path / "src"), str(plain.parent)], check=True)
    for what, op in OPS:
        for d in (vee, vee.parent, plain, plain.parent):
            listing(d)  # warm (the VEE's from the kernel's cache after the first round)
        op(vee)
        op(plain)
        for v, p in ((vee, plain), (vee.parent, plain.parent)):
            assert sorted(listing(v)) == sorted(os.listdir(p)), f"after {what}: {v}"
    assert readdirs(dd, vee) > 1  # refetched after changes: the cache was really in use


@pytest.mark.parametrize("dentry", ["cached", "reclaimed"])
def test_unshare_changes_the_inode_behind_a_cached_listing(dd, dentry):
    """Unsharing gives a name a new inode. The kernel drops the listing itself only while it
    still has the name's dentry; the daemon drops it in both cases."""
    a, b = dd.mnt / "a" / "etc", dd.mnt / "b" / "etc"
    shared = listing(a)["hosts"]
    assert listing(b)["hosts"] == shared  # one shared inode in both VEEs
    fd = os.open(a, os.O_RDONLY)  # pins a's etc (and its cached listing)
    try:
        if dentry == "reclaimed":
            with open("/proc/sys/vm/drop_caches", "w") as f:
                f.write("2\n")
        with open(b / "hosts", "ab") as f:  # b's write unshares the template file everywhere
            f.write(b"10.0.0.2 b\n")
        wait_for(lambda: consistent(a), what="a's cached etc listing to follow the unshare")
        wait_for(lambda: consistent(b), what="b's cached etc listing to follow the unshare")
    finally:
        os.close(fd)
    assert listing(a)["hosts"] != shared and listing(b)["hosts"] != listing(a)["hosts"]
    assert (a / "hosts").read_bytes() == b"127.0.0.1 localhost\n"


def test_forgotten_nodes_keep_their_inode_numbers_in_cached_listings(dd):
    """A private file's node dies with the kernel's FORGET; its next lookup gets the same inode
    number (numbers come from identities), so a listing the kernel still caches stays right."""
    d = dd.mnt / "a" / "pd"
    d.mkdir()
    for i in range(20):
        (d / f"p{i}").write_bytes(b"x")
    before = listing(d)
    fd = os.open(d, os.O_RDONLY)  # pins the directory (and its cached listing) in the kernel
    try:
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("2\n")  # reclaims the files' dentries and inodes: FORGET
        wait_for(lambda: consistent(d), what="the listing to follow the forgotten nodes")
        after = listing(d)
    finally:
        os.close(fd)
    assert after == before


def test_upgrade_and_vee_set_show_through_cached_listings(dd, tmp_path: Path):
    a = dd.mnt / "a"
    etc = listing(a / "etc")
    assert "motd" not in etc
    src2 = tmp_path / "src2"
    subprocess.run(["cp", "-a", str(tmp_path / "src"), str(src2)], check=True)
    (src2 / "etc" / "motd").write_bytes(b"v2\n")
    (src2 / "data" / "f0").unlink()
    dd.publish(src2, "v2")
    data = listing(a / "data")
    dd.vee("upgrade", "a", "--template", "v2")
    assert "motd" in listing(a / "etc") and (a / "etc" / "motd").read_bytes() == b"v2\n"
    assert sorted(listing(a / "data")) == sorted(set(data) - {"f0"})
    assert sorted(listing(dd.mnt / "b" / "etc")) == sorted(etc)  # b keeps the old template
    # the mount root: VEEs added and removed behind the kernel's back
    assert sorted(os.listdir(dd.mnt)) == ["a", "b"]
    dd.vee("add", "c", "--template", "v2")
    assert sorted(os.listdir(dd.mnt)) == ["a", "b", "c"]
    assert "motd" in listing(dd.mnt / "c" / "etc")
    dd.vee("rm", "c")
    assert sorted(os.listdir(dd.mnt)) == ["a", "b"]


def test_rewinddir_and_a_listing_cached_after_opendir_see_new_names(dd, tmp_path: Path):
    """POSIX: rewinddir makes the stream show the directory as it is now. os.listdir(fd)
    rewinds the open stream; a listing the kernel caches from that read must have the name."""
    (tmp_path / "plain").mkdir()
    for d in (dd.mnt / "a" / "data", tmp_path / "plain"):
        fd = os.open(d, os.O_RDONLY | os.O_DIRECTORY)
        try:
            (d / "late").write_bytes(b"x")  # after opendir, before the first read
            assert "late" in os.listdir(fd), d
        finally:
            os.close(fd)
        assert "late" in listing(d), d
        fd = os.open(d, os.O_RDONLY | os.O_DIRECTORY)
        try:
            assert "late" in os.listdir(fd)
            (d / "later").write_bytes(b"x")
            assert "later" in os.listdir(fd), d  # rewound again: now
        finally:
            os.close(fd)
        assert {"late", "later"} <= set(listing(d)), d
