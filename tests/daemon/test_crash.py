"""kill -9 of the daemon: nothing fsynced is lost, no half copy-up is ever visible."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import textwrap

import pytest

from tests.daemon.conftest import wait_for

pytestmark = pytest.mark.fuse

WRITER = textwrap.dedent(
    """
    import os, sys
    path = sys.argv[1]
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    i = 0
    while True:
        os.write(fd, b"record %08d\\n" % i)
        os.fsync(fd)
        print(i, flush=True)  # acknowledged only after fsync returned
        i += 1
    """
)


def test_kill9_during_copy_up_and_fsync(daemon, tmp_path):
    big_src = tmp_path / "bigsrc"
    big_src.mkdir()
    payload = os.urandom(1 << 20) * 96  # 96 MiB, incompressible per MiB, long enough to copy
    (big_src / "huge").write_bytes(payload)
    digest = daemon.publish(big_src, "big")
    daemon.vee("add", "c", "--template", digest)
    c = daemon.mnt / "c"
    # 1. acknowledged (fsynced) appends into a template-less new file and into the a VEE
    writer = subprocess.Popen(
        [sys.executable, "-c", WRITER, str(daemon.mnt / "a" / "etc" / "passwd")],
        stdout=subprocess.PIPE,
        text=True,
    )
    acked = -1
    try:
        for _ in range(30):
            line = writer.stdout.readline()  # type: ignore[union-attr]
            acked = int(line)
        # 2. start a copy-up of the 96 MiB file (open for append) and kill while it runs
        work = daemon.state / "vees" / "c" / "work"
        opener = subprocess.Popen(
            [sys.executable, "-c", f"open({str(c / 'huge')!r}, 'ab').write(b'END')"],
            stderr=subprocess.DEVNULL,
        )
        try:
            wait_for(
                lambda: any(p.name.startswith("copy-") for p in work.iterdir()),
                what="copy-up temp file",
                timeout=30,
            )
            daemon.kill9()
        finally:
            opener.kill()
            opener.wait()
    finally:
        writer.kill()
        writer.wait()
        # read what was acknowledged before the daemon died (buffered lines)
        rest = writer.stdout.read() if writer.stdout else ""  # type: ignore[union-attr]
        for line in rest.split():
            acked = max(acked, int(line))
    assert acked >= 29
    # 3. restart: same VEEs, fsynced records all there, the big file whole (template copy)
    daemon.start()
    out = daemon.vee("list").stdout
    assert "a\t" in out and "c\t" in out
    data = (daemon.mnt / "a" / "etc" / "passwd").read_bytes()
    assert data.startswith(b"root:x:0:0::/root:/bin/sh\n")
    records = data.split(b"\n")[1:]
    for i in range(acked + 1):
        assert records[i] == b"record %08d" % i
    huge = (c / "huge").read_bytes()
    assert huge in (payload, payload + b"END")
    assert hashlib.sha256(huge[: len(payload)]).digest() == hashlib.sha256(payload).digest()
    assert list((daemon.state / "vees" / "c" / "work").iterdir()) == []
    # 4. and the VEE works as before
    with open(c / "huge", "ab") as f:
        f.write(b"!")
    assert os.stat(c / "huge").st_size in (len(payload) + 1, len(payload) + 4)
