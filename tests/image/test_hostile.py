"""Hostile images and bad luck, each attacked the way it was found (issue 9): backing names that
escape the allowed directories, FIFOs as images or backing files, nan/inf sizes, a damaged
snapshot table that must not hide the active disk."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from vfs.errors import UsageError
from vfs.image import layout as L
from vfs.image.check import check
from vfs.image.image import Image

from .helpers import current_header, write_header

VIMG = str(Path(sys.executable).parent / "vimg")
CS = 4096


def vimg(*args: str, env: dict | None = None, timeout: float = 30) -> subprocess.CompletedProcess:
    p = subprocess.run(
        [VIMG, *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, **(env or {})},
    )
    assert "Traceback" not in p.stderr, p.stderr
    return p


@pytest.fixture
def secret(tmp_path):
    """A host file outside the image's directory that no image may make us read."""
    d = tmp_path / "private"
    d.mkdir()
    f = d / "shadow"
    f.write_bytes(b"root:$6$secret-hash:19000:0:99999:7:::\n" * 100)
    return f


def _forge_backing(path: str, name: str, fmt: int = L.BACKING_RAW) -> None:
    """What a hostile file does: a valid header naming any backing file (no checks)."""
    h = current_header(path)
    h.backing_name, h.backing_format, h.sequence = name, fmt, h.sequence + 1
    write_header(path, h)


# ------------------------------------------------------------------------- backing confinement
def test_create_refuses_a_backing_name_outside_the_image_directory(tmp_path, secret):
    imgs = tmp_path / "images"
    imgs.mkdir()
    rel = os.path.relpath(secret, imgs)  # ../private/shadow
    r = vimg("create", "-F", "raw", "-b", rel, str(imgs / "evil.vimg"))
    assert r.returncode == 2 and "outside the allowed directories" in r.stderr
    assert not (imgs / "evil.vimg").exists()
    r = vimg("create", "-F", "raw", "-b", "../" * 12 + str(secret)[1:], str(imgs / "e.vimg"))
    assert r.returncode == 2 and "--backing-dir" in r.stderr


@pytest.mark.parametrize("how", ["relative", "absolute", "symlink", "chain"])
def test_a_hostile_backing_name_is_never_followed(tmp_path, secret, how):
    imgs = tmp_path / "images"
    (imgs / "sub").mkdir(parents=True)
    evil = str(imgs / "evil.vimg")
    Image.create(evil, 1 << 20, cluster_size=CS).close()
    if how == "relative":
        _forge_backing(evil, "../" * 12 + str(secret)[1:])
    elif how == "absolute":
        _forge_backing(evil, str(secret))
    elif how == "symlink":  # a name inside the directory that resolves outside it
        os.symlink(secret.parent, imgs / "sub" / "link")
        _forge_backing(evil, "sub/link/shadow")
    else:  # an honest overlay on a base in a subdirectory; the base escapes
        base = str(imgs / "sub" / "base.vimg")
        Image.create(base, 1 << 20, cluster_size=CS).close()
        os.unlink(evil)
        Image.create(evil, 1 << 20, cluster_size=CS, backing="sub/base.vimg").close()
        _forge_backing(base, "../../private/shadow")
    out = tmp_path / "out.raw"
    r = vimg("convert", "-O", "raw", evil, str(out))
    assert r.returncode == 2 and "outside the allowed directories" in r.stderr
    assert not out.exists() or b"secret-hash" not in out.read_bytes()
    for args in (
        ["info", "--backing-chain", evil],
        ["map", evil],
        ["compare", evil, evil],
        ["io", evil, "-c", "read 0 512"],
    ):
        r = vimg(*args)
        assert r.returncode == 2 and "secret-hash" not in r.stdout, args
    with pytest.raises(UsageError, match="outside the allowed"):
        Image.open(evil, readonly=True)


def test_backing_dirs_allow_what_the_user_names(tmp_path):
    tpl = tmp_path / "templates"
    vms = tmp_path / "vms"
    tpl.mkdir()
    vms.mkdir()
    base = str(tpl / "debian.vimg")
    with Image.create(base, 1 << 20, cluster_size=CS) as b:
        b.write(0, b"T" * CS)
    top = str(vms / "vm1.vimg")
    r = vimg("create", "-b", "../templates/debian.vimg", top)
    assert r.returncode == 2
    r = vimg("create", "--backing-dir", str(tpl), "-b", "../templates/debian.vimg", top)
    assert r.returncode == 0, r.stderr
    assert vimg("io", top, "-c", "read -P 0x54 0 4k").returncode == 2  # not allowed here
    r = vimg("io", "--backing-dir", str(tpl), top, "-c", "read -P 0x54 0 4k")
    assert r.returncode == 0, r.stderr
    r = vimg("io", top, "-c", "read -P 0x54 0 4k", env={"VIMG_BACKING_DIRS": str(tpl)})
    assert r.returncode == 0, r.stderr
    with Image.open(top, readonly=True, backing_dirs=[str(tpl)]) as img:
        assert img.read(0, CS) == b"T" * CS


@pytest.mark.skipif(shutil.which("qemu-img") is None, reason="qemu-img not installed")
def test_a_qcow2_input_with_a_hostile_backing_file_is_refused(tmp_path, secret):
    imgs = tmp_path / "images"
    imgs.mkdir()
    q = imgs / "evil.qcow2"
    subprocess.run(
        ["qemu-img", "create", "-q", "-f", "qcow2", "-F", "raw", "-b", str(secret), str(q)],
        check=True,
    )
    out = tmp_path / "out.raw"
    r = vimg("convert", "-O", "raw", str(q), str(out))
    assert r.returncode == 2 and "outside the allowed directories" in r.stderr
    assert not out.exists() or b"secret-hash" not in out.read_bytes()
    for args in (["info", "--backing-chain", str(q)], ["map", str(q)], ["compare", str(q), str(q)]):
        r = vimg(*args)
        assert r.returncode == 2 and "outside the allowed directories" in r.stderr, args


# ------------------------------------------------------------------------- FIFOs
def test_a_fifo_as_image_is_refused_without_blocking(tmp_path):
    fifo = str(tmp_path / "disk.vimg")
    os.mkfifo(fifo)
    good = str(tmp_path / "good.vimg")
    Image.create(good, 1 << 20, cluster_size=CS).close()
    for args in (
        ["info", fifo],
        ["check", fifo],
        ["verify", fifo],
        ["map", fifo],
        ["convert", "-O", "raw", fifo, str(tmp_path / "o.raw")],
        ["convert", "-O", "raw", good, fifo],
        ["compare", fifo, good],
        ["io", fifo, "-c", "read 0 512"],
        ["snapshot", "-l", fifo],
        ["resize", fifo, "2M"],
        ["measure", fifo],
        ["bench", "-c", "1", fifo],
    ):
        r = vimg(*args, timeout=20)
        assert r.returncode != 0 and "regular file" in r.stderr, (args, r.stderr)


def test_a_fifo_as_backing_file_is_refused_without_blocking(tmp_path):
    raw = tmp_path / "base.raw"
    raw.write_bytes(b"b" * (1 << 20))
    top = str(tmp_path / "top.vimg")
    Image.create(top, 1 << 20, cluster_size=CS, backing="base.raw", backing_format="raw").close()
    raw.unlink()
    os.mkfifo(raw)
    for args in (["convert", "-O", "raw", top, str(tmp_path / "o.raw")], ["map", top]):
        r = vimg(*args, timeout=20)
        assert r.returncode == 2 and "regular file" in r.stderr, (args, r.stderr)
    r = vimg("create", "-F", "raw", "-b", "base.raw", str(tmp_path / "t2.vimg"), timeout=20)
    assert r.returncode == 2 and "regular file" in r.stderr


# ------------------------------------------------------------------------- sizes
@pytest.mark.parametrize("size", ["nan", "inf", "-inf", "1e400", "NaNk", "infG", "0x10", ""])
def test_sizes_that_are_not_numbers(tmp_path, size):
    a = str(tmp_path / "a.vimg")
    r = vimg("create", a, size)
    assert r.returncode == 2 and r.stderr.startswith("vimg: error:") and not os.path.exists(a)
    r = vimg("create", "-s", size, a)
    assert r.returncode == 2
    Image.create(a, 1 << 20, cluster_size=CS).close()
    for args in (
        ["resize", a, size],
        ["resize", a, "+" + size],
        ["resize", "--shrink", a, "-" + size],
        ["io", a, "-c", f"write 0 {size or 'x'}"],
        ["bench", "-s", size, a],
    ):
        r = vimg(*args)
        assert r.returncode == 2 and r.stderr.count("\n") == 1, (args, r.stderr)
    with Image.open(a, readonly=True) as img:
        assert img.size == 1 << 20


# ------------------------------------------------------------------------- snapshot table
@pytest.mark.log_warnings
def test_a_damaged_snapshot_table_does_not_hide_the_active_disk(tmp_path):
    a = str(tmp_path / "a.vimg")
    data = os.urandom(3 * CS)
    with Image.create(a, 1 << 20, cluster_size=CS) as img:
        img.write(0, b"s" * 3 * CS)
        img.snapshot_create("before")
        img.write(0, data)
        table = img.header.snapshots_offset
    with open(a, "r+b") as f:
        f.seek(table + 70)
        f.write(b"\xff\xfe")
    raw = tmp_path / "a.raw"
    r = vimg("convert", "-O", "raw", a, str(raw))
    assert r.returncode == 0, r.stderr
    assert raw.read_bytes()[: 3 * CS] == data
    r = vimg("info", "--json", a)
    assert r.returncode == 0 and "snapshot table" in json.loads(r.stdout)["snapshots-error"]
    assert "WARNING: snapshot table" in vimg("info", a).stdout
    assert vimg("map", a).returncode == 0
    assert vimg("compare", a, str(raw)).returncode == 0
    assert vimg("io", a, "-c", "read 0 12k").returncode == 0
    r = vimg("verify", a)
    assert r.returncode == 5 and "snapshot table" in r.stdout
    assert vimg("io", a, "-c", "write -P 0x33 64k 4k").returncode == 0  # writers too
    assert vimg("snapshot", "-l", a).returncode == 5  # the table itself: a clear error
    assert check(a).exit_code == 2
    res = check(a, "all")
    assert res.exit_code == 0 and any("dropped" in m for m in res.messages)
    with Image.open(a, readonly=True) as img:
        assert img.snapshots == [] and img.read(0, 3 * CS) == data
