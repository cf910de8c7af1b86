"""Power-failure replay: record the image's write stream, cut it at every fsync, and check.

The crash model (docs/vimg-format.md, section 9) promises: after a crash at any instant the image
opens without repair, every byte acknowledged by a completed flush reads back exactly, and
``check`` finds no corruption. Writes between two fsyncs may reach the disk in any order and
partially, so besides every prefix ending at an fsync we also replay random subsets of the next
segment with one write torn at a 512-byte boundary.
"""

from __future__ import annotations

import random

import pytest

from vfs.image import layout as L
from vfs.image.check import check
from vfs.image.image import Image

from .helpers import Recorder, apply_ops


def _workload(path: str, rec: Recorder, seed: int, compress: bool, bitmaps: bool = False):
    """Random writes/discards/snapshots/resizes (and bitmap takes, VM state) with flushes;
    returns {sequence: content}."""
    r = random.Random(seed)
    size = 1 << 20
    img = Image.create(path, size, cluster_size=4096, compress=compress, opener=rec.opener)
    if bitmaps:
        img.bitmap_add("b", granularity=512)
        img.bitmap_add("frozen", enabled=False)
    model = bytearray(size)
    states = {img.sequence: bytes(model)}
    snaps: dict[str, bytes] = {}
    for i in range(120):
        op = r.choices(
            ["write", "discard", "flush", "snap", "apply", "resize", "take"],
            [50, 8, 12, 2, 1, 2, 4 if bitmaps else 0],
        )[0]
        off = r.randrange(0, len(model))
        n = min(r.choice([512, 4096, 9000, 20000]), len(model) - off)
        if op == "write":
            d = r.randbytes(n) if r.random() < 0.7 else bytes([r.randrange(256)]) * n
            img.write(off, d)
            model[off : off + n] = d
        elif op == "discard":
            img.discard(off, n)
            model[off : off + n] = bytes(n)
        elif op == "flush":
            img.flush()
        elif op == "snap":
            img.flush()
            states[img.sequence] = bytes(model)
            vm = r.randbytes(r.choice([0, 5000, 20000])) if bitmaps else None
            img.snapshot_create(f"s{i}", vm_state=vm)
            snaps[f"s{i}"] = bytes(model)
        elif op == "take":
            img.bitmap_take("b")
        elif op == "apply" and img.snapshots:
            img.flush()
            states[img.sequence] = bytes(model)
            name = r.choice(img.snapshots).name
            img.snapshot_apply(name)
            model = bytearray(snaps[name])
        elif op == "resize":
            new = r.randrange(1, 2 << 20) // 512 * 512 or 512
            img.resize(new)
            if new < len(model):
                del model[new:]
            else:
                model += bytes(new - len(model))
        states.setdefault(img.sequence, bytes(model))
    img.close()
    states[img.sequence] = bytes(model)
    return states


def _committed_sequence(ops: list[tuple], upto: int) -> int:
    """Highest sequence whose primary header write is followed by an fsync in ops[:upto]."""
    best, pending = -1, None
    for op in ops[:upto]:
        if op[0] == "w" and op[1] in L.HEADER_SLOT_OFFSETS and len(op[2]) == L.HEADER_SLOT_SIZE:
            pending = L.unpack_header(op[2]).sequence
        elif op[0] == "sync" and pending is not None:
            best, pending = max(best, pending), None
    return best


def _verify(path: str, states: dict[int, bytes], at_least: int) -> int:
    with Image.open(path, readonly=True) as img:
        seq = img.sequence
        assert seq >= at_least, f"opened sequence {seq}, but {at_least} was committed"
        assert seq in states, f"sequence {seq} was never a flushed state"
        want = states[seq]
        assert img.size == len(want)
        assert img.read(0, img.size) == want, f"content of sequence {seq} differs"
    res = check(path)
    # The spec promises more than "leaks at most": shadow paging leaves no leak either.
    assert res.corruptions == 0 and res.leaks == 0, res.messages[:5]
    return seq


@pytest.mark.parametrize(
    "seed,compress,bitmaps", [(1, False, False), (2, True, False), (3, False, True)]
)
def test_power_failure_replay(tmp_path, seed, compress, bitmaps):
    rec = Recorder()
    states = _workload(str(tmp_path / "img.vimg"), rec, seed, compress, bitmaps)
    ops = rec.ops
    syncs = [i for i, op in enumerate(ops) if op[0] == "sync"]
    first_commit = next(i for i in syncs if _committed_sequence(ops, i + 1) >= 0)
    crash = str(tmp_path / "crash.vimg")
    r = random.Random(seed)
    checked = 0
    for k, cut in enumerate(syncs):
        if cut < first_commit:
            continue
        prefix = ops[: cut + 1]
        committed = _committed_sequence(ops, cut + 1)
        apply_ops(crash, prefix)
        assert _verify(crash, states, committed) == committed
        checked += 1
        # Torn: a random subset of the next segment, one write cut at a sector boundary.
        nxt = syncs[k + 1] if k + 1 < len(syncs) else len(ops)
        segment = [op for op in ops[cut + 1 : nxt] if op[0] != "sync"]
        if not segment:
            continue
        for _ in range(2):
            chosen = [op for op in segment if r.random() < 0.5]
            if chosen:
                j = r.randrange(len(chosen))
                op = chosen[j]
                if op[0] == "p":
                    chosen[j] = ("p", op[1], min(op[2], 4096))  # a punch cut short
                elif op[0] == "w" and len(op[2]) > 512:
                    keep = r.randrange(1, -(-len(op[2]) // 512)) * 512
                    chosen[j] = ("w", op[1], op[2][:keep])
            apply_ops(crash, prefix + chosen)
            _verify(crash, states, committed)
            checked += 1
    assert checked > 30


CHILD = r"""
import sys
from vfs.image.image import Image
img = Image.open(sys.argv[1])
g = 0
while True:
    g += 1
    b = bytes([g % 255 + 1])
    for off in range(0, 256 * 1024, 12 * 1024):
        img.write(off, b * min(12 * 1024, 256 * 1024 - off))
    img.flush()
    print(g, flush=True)
"""


def test_sigkill_mid_work(tmp_path):
    """A real process killed (SIGKILL) while writing: the last acknowledged flush survives."""
    import subprocess
    import sys

    path = str(tmp_path / "k.vimg")
    Image.create(path, 1 << 20, cluster_size=4096).close()
    child = subprocess.Popen([sys.executable, "-c", CHILD, path], stdout=subprocess.PIPE, text=True)
    try:
        acked = 0
        while acked < 7:
            line = child.stdout.readline()
            assert line, "child died"
            acked = int(line)
    finally:
        child.kill()
        child.wait()
    with Image.open(path, readonly=True) as img:
        data = img.read(0, 256 * 1024)
    gens = [g for g in (acked, acked + 1) if data == bytes([g % 255 + 1]) * len(data)]
    assert gens, "content is not a complete flushed generation"
    assert check(path).exit_code == 0


class _Failing:
    """An opener whose files fail (pwrite ENOSPC, or fsync EIO) once armed, at the n-th call."""

    def __init__(self, what: str, at: int) -> None:
        self.what, self.at, self.armed, self.n = what, at, False, 0

    def opener(self, path, writable, create):
        import errno

        from vfs.image.fileio import ImageFile

        inj = self

        class Failing(ImageFile):
            def pwrite(self, data, offset):
                if inj.armed and inj.what == "pwrite":
                    inj.n += 1
                    if inj.n == inj.at:
                        raise OSError(errno.ENOSPC, "No space left on device")
                super().pwrite(data, offset)

            def fsync(self):
                if inj.armed and inj.what == "fsync":
                    inj.n += 1
                    if inj.n == inj.at:
                        raise OSError(errno.EIO, "Input/output error")
                super().fsync()

        return Failing(path, writable=writable, create=create)


@pytest.mark.parametrize("fail_at", [1, 3, 6, 10])
def test_write_error_during_commit(tmp_path, fail_at):
    """ENOSPC in the middle of writes or a commit: the error surfaces, and from then on every
    write and every flush fails (errseq: a later flush must not report durability it does not
    have) until the image is reopened; the file still holds the previous commit, whole."""
    from vfs.errors import WriteFailed

    inj = _Failing("pwrite", fail_at)
    path = str(tmp_path / "f.vimg")
    img = Image.create(path, 1 << 20, cluster_size=4096, opener=inj.opener)
    img.write(0, b"A" * 50000)
    img.flush()
    img.write(20000, b"B" * 70000)
    inj.armed = True
    with pytest.raises(OSError):
        for i in range(20):  # each write allocates or rewrites; the commit writes metadata
            img.write(100000 + i * 4096, b"C" * 4096)
        img.flush()
    with pytest.raises(WriteFailed, match="earlier write failed"):
        img.write(0, b"x")
    for _ in range(3):  # every later flush, not only the first
        with pytest.raises(WriteFailed, match="reopen"):
            img.flush()
    with pytest.raises(WriteFailed):
        img.close()  # reports it too, and must not try to commit
    img.close()  # closed: nothing left to report
    with Image.open(path, readonly=True) as again:
        assert again.read(0, 50000) == b"A" * 50000
    assert check(path).exit_code == 0
    with Image.open(path) as again:  # reopened: writes and flushes work again
        again.write(0, b"D" * 4096)
        again.flush()
    with Image.open(path, readonly=True) as again:
        assert again.read(0, 4096) == b"D" * 4096


@pytest.mark.parametrize("fail_at", [1, 2])
def test_failed_fsync_fails_every_later_flush(tmp_path, fail_at):
    """EIO from fsync (the page cache may have dropped the dirty pages): the flush that hit it
    raises, and so does every later one, even with nothing new written; the previous commit
    stays readable."""
    from vfs.errors import WriteFailed

    inj = _Failing("fsync", fail_at)
    path = str(tmp_path / "f.vimg")
    img = Image.create(path, 1 << 20, cluster_size=4096, opener=inj.opener)
    img.write(0, b"A" * 8192)
    img.flush()
    committed = img.sequence
    img.write(0, b"B" * 8192)
    inj.armed = True
    with pytest.raises(OSError, match="Input/output"):
        img.flush()
    inj.armed = False  # the disk "recovers": the flushes must still not claim durability
    for _ in range(3):
        with pytest.raises(WriteFailed):
            img.flush()
    with pytest.raises(WriteFailed):
        img.write(8192, b"C")
    with pytest.raises(WriteFailed):
        img.close()
    with Image.open(path, readonly=True) as again:
        assert again.sequence in (committed, committed + 1)
        assert again.read(0, 8192) in (b"A" * 8192, b"B" * 8192)
    assert check(path).exit_code == 0


def test_a_with_block_keeps_the_first_error(tmp_path):
    """Leaving a with block on an error closes the image without replacing that error by the
    WriteFailed of the implicit close."""
    inj = _Failing("pwrite", 1)
    path = str(tmp_path / "f.vimg")
    Image.create(path, 1 << 20, cluster_size=4096).close()
    with pytest.raises(OSError, match="No space"), Image.open(path, opener=inj.opener) as img:
        inj.armed = True
        img.write(0, b"x" * 4096)
