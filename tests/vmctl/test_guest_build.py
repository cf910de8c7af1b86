"""tools/guest: the newc writer, module ordering, and the cached build (no boot here)."""

from __future__ import annotations

import gzip
import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tools.guest import build as guest_build
from tools.guest import cpio, kmod
from tools.guest.build import Guest, build_guest

_name_part = st.text(
    alphabet=st.characters(min_codepoint=33, max_codepoint=0x2FF, exclude_characters="/\0"),
    min_size=1,
    max_size=20,
).filter(lambda s: s not in (".", ".."))


@settings(max_examples=200, deadline=None)
@given(
    st.dictionaries(
        # (the end marker's own name is refused as a member, tested below)
        st.lists(_name_part, min_size=1, max_size=3)
        .map("/".join)
        .filter(lambda n: n != cpio.TRAILER),
        st.binary(max_size=300),
        max_size=12,
    )
)
def test_newc_roundtrip(files: dict[str, bytes]):
    import io

    buf = io.BytesIO()
    with cpio.NewcWriter(buf) as w:
        for name, data in files.items():
            w.file(name, data)
    blob = buf.getvalue()
    assert len(blob) % 4 == 0
    back = {name: data for name, _mode, data, _rdev in cpio.read_newc(blob)}
    assert back == files


def test_newc_kinds_and_refusals():
    import io
    import stat

    buf = io.BytesIO()
    with cpio.NewcWriter(buf, mtime=1234) as w:
        w.directory("bin")
        w.symlink("bin/sh", "busybox")
        w.char_device("console", 5, 1)
        for bad in ("", "/abs", "a/../b", "bin", cpio.TRAILER):
            with pytest.raises(ValueError):
                w.file(bad, b"x")
    entries = {n: (m, d, r) for n, m, d, r in cpio.read_newc(buf.getvalue())}
    assert stat.S_ISDIR(entries["bin"][0])
    assert stat.S_ISLNK(entries["bin/sh"][0]) and entries["bin/sh"][1] == b"busybox"
    assert stat.S_ISCHR(entries["console"][0]) and entries["console"][2] == (5, 1)
    with pytest.raises(ValueError):
        cpio.read_newc(buf.getvalue()[:-200])  # cut before the trailer


def _initramfs(guest: Guest) -> dict[str, tuple[int, bytes, tuple[int, int]]]:
    blob = gzip.decompress(guest.initrd.read_bytes())
    return {n: (m, d, r) for n, m, d, r in cpio.read_newc(blob)}


def test_initramfs_holds_init_busybox_and_ordered_modules(guest: Guest):
    import stat

    files = _initramfs(guest)
    init_mode, init, _ = files["init"]
    assert init.startswith(b"#!/bin/busybox sh") and init_mode & 0o111
    assert files["bin/busybox"][1][:4] == b"\x7fELF"
    assert stat.S_ISCHR(files["dev/console"][0]) and files["dev/console"][2] == (5, 1)
    order = files["lib/modules/load-order"][1].decode().split()
    for wanted in guest_build.MODULES:
        assert wanted in order
    # Each module's dependencies (read from its own .modinfo) come before it.
    for i, name in enumerate(order):
        deps = kmod.modinfo(files[f"lib/modules/{name}.ko"][1]).get("depends", "")
        for dep in filter(None, deps.split(",")):
            assert order.index(dep) < i, (name, dep, order)


def test_kmod_reports_missing_modules_and_cycles(tmp_path: Path, guest: Guest):
    files = _initramfs(guest)
    (tmp_path / "virtio_blk.ko").write_bytes(files["lib/modules/virtio_blk.ko"][1])
    available = kmod.find_modules(tmp_path)
    with pytest.raises(ValueError, match="virtio.*needed by virtio_blk"):
        kmod.load_order(["virtio_blk"], available)
    with pytest.raises(ValueError, match="not an ELF64"):
        kmod.modinfo(b"garbage" * 20)


def _dead_pid() -> int:
    p = subprocess.Popen(["true"])
    p.wait()
    return p.pid


def test_build_is_cached_atomic_and_rebuilt_when_inputs_change(
    tmp_path: Path, guest: Guest, monkeypatch: pytest.MonkeyPatch
):
    cache = tmp_path / "cache"
    # Reuse the session's .debs (no second download); everything else is built from scratch.
    src_debs = guest.directory.parent / "debs"
    (cache / "debs").mkdir(parents=True)
    for deb in src_debs.glob("*.deb"):
        os.link(deb, cache / "debs" / deb.name)
    key = guest_build.build_key(guest.packages)
    stale = cache / f".build-{key}-{_dead_pid()}"  # what a killed build leaves
    stale.mkdir()
    (stale / "half-written").write_bytes(b"x")

    first = build_guest(cache)
    assert first.directory == cache / key
    assert first.initrd.read_bytes() == guest.initrd.read_bytes()  # reproducible bytes
    assert not list(cache.glob(".build-*"))
    built_at = (first.directory / "manifest.json").stat().st_mtime_ns

    t0 = time.monotonic()
    again = build_guest(cache)
    assert again.directory == first.directory
    assert (again.directory / "manifest.json").stat().st_mtime_ns == built_at
    assert time.monotonic() - t0 < 1.0

    monkeypatch.setattr(guest_build, "MODULES", [*guest_build.MODULES, "virtio_console"])
    changed = build_guest(cache)
    assert changed.directory != first.directory
    assert b"virtio_console" in _initramfs(changed)["lib/modules/load-order"][1]
    assert first.directory.exists()  # older builds are kept (a few), not deleted at once
    shutil.rmtree(cache)
