"""kill -9 of the export in the middle of writes: after a restart every write a FLUSH (or its
FUA) was answered for reads back, the image checks clean, and the dirty bitmap is stale (all
dirty: a copier never copies too little)."""

from __future__ import annotations

import random
import signal
import subprocess
import sys
import threading
import time

import pytest

from tests.export.conftest import make_image, need, run
from vfs.errors import VfsError
from vfs.export import NbdClient

VIMG = [sys.executable, "-c", "from vfs.cli.vimg import main; main()"]


@pytest.mark.slow
@pytest.mark.parametrize("seed", [1, 2, 3])
def test_kill_9_mid_write_loses_no_flushed_write(exports, tmp_path, seed):
    print(f"seed {seed}")
    rnd = random.Random(seed)
    img = make_image(tmp_path / "d.vimg", "32M")
    e = exports.start(img)
    e.control.mark("dirty")
    durable: dict[int, int] = {}  # block -> pattern of the last write a flush covered
    pending: dict[int, int] = {}
    blocks = list(range(32 << 20 >> 16))
    rnd.shuffle(blocks)
    kill_at = rnd.uniform(0.3, 1.2)
    killer = threading.Timer(kill_at, lambda: e.proc.send_signal(signal.SIGKILL))
    killer.start()
    try:
        with NbdClient(e.sock, "disk", timeout=10) as c:
            deadline = time.monotonic() + 20
            for i in range(10**6):
                if time.monotonic() > deadline:
                    break
                b = blocks[i % len(blocks)]
                pat = (i * 7 + seed) % 251 + 1
                c.pwrite(bytes([pat]) * (64 << 10) if i % 3 else bytes([pat]) * 4096, b << 16)
                pending[b] = pat
                if i % 5 == 4:
                    c.flush()
                    durable.update(pending)
                    pending.clear()
    except (OSError, VfsError):
        pass  # the server died under us
    finally:
        killer.cancel()
    assert e.proc.wait(10) == -signal.SIGKILL, "the export was not killed mid-write"
    assert durable, "nothing was flushed before the kill: raise the delay"
    r = run(*VIMG, "check", str(img), check=False)
    assert r.returncode == 0, r.stdout + r.stderr
    e2 = exports.start(img, name="disk")
    with NbdClient(e2.sock, "disk") as c:
        for b, pat in durable.items():
            got = c.pread(b << 16, 4096)
            # a later, unflushed write may have landed too: but never anything older
            ok = {pat} | ({pending[b]} if b in pending else set())
            assert got[0] in ok and got == bytes([got[0]]) * 4096, (b, got[:4], ok)
    bm = {b["name"]: b for b in e2.control.bitmaps()}
    assert bm["dirty"]["stale"] and e2.control.dirty("dirty") == [(0, 32 << 20)]


@pytest.mark.slow
@pytest.mark.qemu
def test_kill_9_under_qemu_io_fua_writes(exports, tmp_path):
    need("qemu-io")
    img = make_image(tmp_path / "q.vimg", "16M")
    e = exports.start(img, name="q")
    cmds = []
    for i in range(200):
        cmds += ["-c", f"write -f -P {i % 250 + 1} {(i % 64) * 256 * 1024} 64k"]
    p = subprocess.Popen(["qemu-io", "-f", "raw", *cmds, e.uri], stdout=subprocess.PIPE,
                         stderr=subprocess.STDOUT, text=True)  # fmt: skip
    acked = []
    assert p.stdout is not None
    # qemu-io's output is block-buffered: it may be ahead of what we read; after the kill it
    # fails the remaining commands and exits, and we read everything it printed
    for line in p.stdout:
        if line.startswith("wrote "):
            acked.append(int(line.split()[-1]))
            if len(acked) == 40:
                e.proc.send_signal(signal.SIGKILL)
    p.wait(60)
    assert e.proc.wait(10) == -signal.SIGKILL
    assert 40 <= len(acked) < 200, "the kill did not land mid-write"
    last: dict[int, int] = {}
    for i, off in enumerate(acked):
        last[off] = i % 250 + 1  # qemu-io ran the commands in order: i-th ack is command i
    reads = []
    for off, pat in last.items():
        reads += ["-c", f"read -P {pat} {off} 64k"]
    run(*VIMG, "io", *reads, str(img))


@pytest.mark.qemu
def test_qemu_reconnects_after_the_export_restarts(exports, tmp_path):
    """QEMU's NBD client with reconnect-delay (what vmctl gives guests) rides over a kill -9 and
    restart of the export: the flushed write reads back and writing goes on, in one session."""
    need("qemu-io")
    img = make_image(tmp_path / "d.vimg", "16M")
    e = exports.start(img)
    opts = f"{e.opts},reconnect-delay=30"
    # the test sees qemu-io's progress in the export's counters: its flush, then the kill
    cmds = ["write -P 0x11 0 64k", "flush", "sleep 4000", "read -P 0x11 0 64k",
            "write -P 0x22 64k 64k", "flush"]  # fmt: skip
    argv = ["qemu-io", "--image-opts", opts]
    for c in cmds:
        argv += ["-c", c]
    q = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 30
        while e.control.status()["flushes"] < 1:
            assert time.monotonic() < deadline, "qemu-io never flushed"
            time.sleep(0.02)
        assert e.stop(sig=signal.SIGKILL) == -signal.SIGKILL
        e2 = exports.start(img, sock=e.sock, name=e.name)
        out, _ = q.communicate(timeout=60)
    finally:
        if q.poll() is None:
            q.kill()
            q.wait(10)
    assert q.returncode == 0 and "Pattern verification failed" not in out, out
    assert e2.stop() == 0
    r = run(*VIMG, "io", str(img), "-c", "read -P 0x11 0 64k", "-c", "read -P 0x22 64k 64k")
    assert r.returncode == 0
