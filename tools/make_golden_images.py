"""Write the golden vimg v1 images of ``tests/image/golden/`` (docs/vimg-format.md, 13.8).

    python tools/make_golden_images.py            # into tests/image/golden/
    python tools/make_golden_images.py --out DIR  # anywhere else (the tests do this too)

Each image exercises part of the v1 layout with contents that ``tests/image/test_golden_v1.py``
checks exactly (and independently: it does not import this file). The output is
deterministic (fixed snapshot dates, seeded data), so regenerating with an unchanged writer
gives the same bytes. Regenerate only when version 1 itself was wrong: later versions of vfs
must keep reading the checked-in files unchanged.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import random
import subprocess
import sys
from pathlib import Path
from unittest import mock

import xxhash

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from vfs.image import layout as L  # noqa: E402
from vfs.image.image import Image  # noqa: E402

CS = 4096
SIZE = 256 << 10
#: Snapshot dates of the golden images (2024-01-01 00:00:00 UTC, then a second later).
DATES = iter(range(1_704_067_200 * 10**9, 1_704_067_300 * 10**9, 10**9))


def fill(b: int) -> bytes:
    return bytes([b]) * CS


def plain(d: Path) -> None:
    with Image.create(str(d / "plain.vimg"), SIZE, cluster_size=CS) as img:
        for ci in (0, 1, 2, 5, 9, 63):
            img.write(ci * CS, fill(0x10 + ci))
        img.write_zeroes(7 * CS, CS)
        img.write(10 * CS + 50, b"\xab" * 100)


def compressed(d: Path) -> None:
    with Image.create(str(d / "compressed.vimg"), SIZE, cluster_size=CS, compress=True) as img:
        for ci in range(8):
            img.write(ci * CS, (b"golden-%d " % ci * CS)[:CS])
        img.write(8 * CS, random.Random(8).randbytes(CS))


def remote(d: Path) -> None:
    with Image.create(str(d / "remote.vimg"), SIZE, cluster_size=CS) as img:
        for ci in range(4):
            data = fill(0x40 + ci)
            img.set_remote(ci, hashlib.sha256(data).digest(), xxhash.xxh3_64_intdigest(data))
        img.write(4 * CS, fill(0x55))


def vm_state() -> bytes:
    return random.Random(7).randbytes(CS) + bytes(CS) + (b"vmstate!" * CS)[: CS + 123]


def snapshots(d: Path) -> None:
    with Image.create(str(d / "snapshots.vimg"), SIZE, cluster_size=CS) as img:
        for ci in range(4):
            img.write(ci * CS, fill(0x61 + ci))
        img.snapshot_create("one")
        for ci in range(2):
            img.write(ci * CS, fill(0x71 + ci))
        img.snapshot_create("two", vm_state=vm_state(), vm_clock_nsec=7 * 10**9)
        img.write(2 * CS, fill(0x81))


def bitmaps(d: Path) -> None:
    with Image.create(str(d / "bitmaps.vimg"), SIZE, cluster_size=CS) as img:
        img.bitmap_add("inc", granularity=512)
        img.bitmap_add("full", granularity=65536)
        img.write(3000, b"\x01" * 1000)
        img.bitmap_enable("full", False)
        img.write(40960, fill(0x02))


def stale_bitmap(d: Path) -> None:
    """A bitmap left in use by a writer that died (the child exits without closing)."""
    p = d / "stale-bitmap.vimg"
    with Image.create(str(p), SIZE, cluster_size=CS) as img:
        img.bitmap_add("b")
        img.write(0, fill(0x03))
    child = (
        "import os, sys\n"
        f"sys.path.insert(0, {str(ROOT)!r})\n"
        "from vfs.image.image import Image\n"
        "img = Image.open(sys.argv[1])\n"
        f"img.write(3 * {CS}, bytes([4]) * {CS})\n"
        "img.flush()\n"
        "os._exit(0)\n"
    )
    subprocess.run([sys.executable, "-c", child, str(p)], check=True)
    # what the next writer would do: give back the preallocated tail past the image end
    # (bytes there are not part of the image, spec 2); keeps the file small
    with Image.open(str(p), readonly=True) as img:
        end = img.header.host_clusters * CS
    os.truncate(p, end)


def overlay(d: Path) -> None:
    with Image.create(str(d / "base.vimg"), SIZE, cluster_size=CS) as b:
        b.write(0, b"b" * 8 * CS)
    with Image.create(str(d / "overlay.vimg"), SIZE, cluster_size=CS, backing="base.vimg") as o:
        o.write(CS, fill(0x6F))
        o.write_zeroes(2 * CS, CS)
        o.discard(3 * CS, CS)


def _rewrite_current(path: Path, edit) -> None:  # type: ignore[no-untyped-def]
    """Apply ``edit(header)`` to the current header and write it into both copies."""
    from vfs.image.fileio import ImageFile
    from vfs.image.header import read_current_header

    f = ImageFile(str(path), writable=True)
    try:
        h = read_current_header(f)
        edit(h)
        slot = L.pack_header(h).ljust(L.HEADER_SLOT_SIZE, b"\0")
        f.pwrite(slot, L.HEADER_SLOT_OFFSETS[h.sequence % 2])
        f.pwrite(slot, L.HEADER_MIRROR_OFFSETS[h.sequence % 2])
        f.fsync()
    finally:
        f.close()


def grown_header(d: Path) -> None:
    """What a later revision of v1 might write: a longer header, an unknown extension, and
    feature bits (with names) this version does not know but may ignore."""
    p = d / "grown-header.vimg"
    with Image.create(str(p), SIZE, cluster_size=CS) as img:
        img.write(0, fill(0x99))

    def edit(h: L.Header) -> None:
        h.unknown_fields = bytes(range(1, 9))
        h.unknown_extensions = [(b"ZZZZ", b"future")]
        h.compatible |= 1 << 5
        h.autoclear |= 1 << 7
        h.feature_names[(L.FEATURE_COMPAT, 5)] = "future compat"
        h.feature_names[(L.FEATURE_AUTOCLEAR, 7)] = "future autoclear"

    _rewrite_current(p, edit)


def torn(d: Path) -> None:
    """Two commits, then a third whose header write was torn (half of it on disk)."""
    p = d / "torn.vimg"
    with Image.create(str(p), SIZE, cluster_size=CS) as img:
        img.write(0, fill(0x31))
        img.flush()
        img.write(0, fill(0x32))
    from vfs.image.fileio import ImageFile
    from vfs.image.header import read_current_header

    f = ImageFile(str(p), writable=True)
    try:
        h = read_current_header(f)
        h.sequence += 1
        half = L.pack_header(h)[:96] + bytes(range(64))
        f.pwrite(half, L.HEADER_SLOT_OFFSETS[h.sequence % 2])
        f.fsync()
    finally:
        f.close()


MAKERS = [plain, compressed, remote, snapshots, bitmaps, stale_bitmap, overlay, grown_header, torn]


def make(out: Path) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    for f in out.glob("*.vimg"):
        f.unlink()
    clock = mock.patch("vfs.image.snapshots.time.time_ns", side_effect=lambda: next(DATES))
    with clock:
        for maker in MAKERS:
            maker(out)
    return sorted(out.glob("*.vimg"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--out", default=str(ROOT / "tests" / "image" / "golden"))
    args = ap.parse_args()
    for p in make(Path(args.out)):
        digest = hashlib.sha256(p.read_bytes()).hexdigest()
        print(f"{digest}  {p.name} ({os.path.getsize(p)} bytes)")


if __name__ == "__main__":
    main()
