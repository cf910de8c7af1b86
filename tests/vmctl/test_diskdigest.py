"""The content digest that ties a bundle's memory to its disks (vmctl/diskdigest.py): equal for
the same guest-visible contents however they are stored (local, compressed, remote objects,
zero clusters, written zeros, a backing chain), different when one byte differs."""

from __future__ import annotations

from pathlib import Path

from hypothesis import given, settings
from hypothesis import strategies as st

from vfs.image import Image
from vfs.image.remote import push
from vfs.redirect.file_remote import FileRemote
from vmctl.diskdigest import disk_digest

CS = 64 << 10
SIZE = 1 << 20  # 16 clusters


def _digest(path: Path, **kw) -> str:
    with Image.open(str(path), readonly=True, **kw) as img:
        return disk_digest(img)["sha256"]


def _write(img: Image, writes: list[tuple[int, bytes]]) -> None:
    for off, data in writes:
        img.write(off, data)
    img.flush()


def test_same_contents_stored_differently_have_one_digest(tmp_path: Path):
    writes = [(0, b"boot" * 1000), (5 * CS + 17, b"\x01" * 3000), (SIZE - 10, b"end")]
    with Image.create(str(tmp_path / "plain.vimg"), SIZE) as img:
        _write(img, writes)
        img.write(9 * CS, bytes(CS))  # zeros written: the same as never written
        img.flush()
    with Image.create(str(tmp_path / "packed.vimg"), SIZE, compress=True) as img:
        _write(img, writes)
    # Pushed: every cluster a remote object (no fetch needed to digest it).
    with Image.create(str(tmp_path / "pushed.vimg"), SIZE) as img:
        _write(img, writes)
        push(img, FileRemote(tmp_path / "repo", create=True))
    # A chain: part of the data in the backing image, the rest (and an overwrite) on top.
    with Image.create(str(tmp_path / "base.vimg"), SIZE) as img:
        _write(img, [writes[0], (5 * CS, b"\xff" * CS)])
    with Image.create(str(tmp_path / "top.vimg"), SIZE, backing="base.vimg",
                      backing_format="vimg") as img:  # fmt: skip
        img.write(5 * CS, bytes(CS))
        _write(img, writes[1:])
    ref = _digest(tmp_path / "plain.vimg")
    for name in ("packed.vimg", "pushed.vimg", "top.vimg"):
        assert _digest(tmp_path / name) == ref, name
    # A snapshot does not change the active disk's contents.
    with Image.open(str(tmp_path / "plain.vimg")) as img:
        img.snapshot_create("s")
    assert _digest(tmp_path / "plain.vimg") == ref


@settings(max_examples=30, deadline=None)
@given(offset=st.integers(0, SIZE - 1), value=st.integers(1, 255))
def test_one_byte_of_difference_changes_the_digest(tmp_path_factory, offset: int, value: int):
    d = tmp_path_factory.mktemp("one")
    with Image.create(str(d / "a.vimg"), SIZE) as img:
        _write(img, [(0, b"x" * 5000)])
    with Image.create(str(d / "b.vimg"), SIZE) as img:
        _write(img, [(0, b"x" * 5000)])
        old = img.read(offset, 1)[0]
        img.write(offset, bytes([old ^ value]))
        img.flush()
    assert _digest(d / "a.vimg") != _digest(d / "b.vimg")
    # Size is part of the digest: the same bytes on a larger disk are another disk.
    with Image.create(str(d / "c.vimg"), 2 * SIZE) as img:
        _write(img, [(0, b"x" * 5000)])
    assert _digest(d / "a.vimg") != _digest(d / "c.vimg")
