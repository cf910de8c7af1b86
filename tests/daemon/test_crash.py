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


OPS = textwrap.dedent(
    """
    import random, sys
    from vfs.daemon import control
    state, base, base2, seed = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
    rng = random.Random(seed)
    names = [f"v{i}" for i in range(6)]
    while True:
        name = rng.choice(names)
        op = rng.choice(["add", "add", "rm", "upgrade"])
        req = {"op": op, "name": name}
        if op != "rm":
            req["template"] = rng.choice([base, base2])
        try:
            control.call(state, req, timeout=30)
            print(op, name, flush=True)
        except Exception as e:  # exists, no such VEE, daemon killed
            print("error", op, name, type(e).__name__, flush=True)
    """
)


@pytest.mark.slow
def test_kill9_during_vee_add_rm_upgrade_never_ghosts_the_registry(daemon, tmp_path):
    """kill -9 at random points of a stream of add/rm/upgrade: after each restart the registry,
    the list and the mount agree, every VEE mounts, and fsynced data of a VEE is there."""
    import json
    import random
    import time

    seed = int(os.environ.get("VFS_KILL_SEED", random.randrange(1 << 32)))
    print(f"kill seed {seed} (replay: VFS_KILL_SEED={seed})")
    rng = random.Random(seed)
    src2 = tmp_path / "src2"
    subprocess.run(["cp", "-a", str(daemon.root / "src"), str(src2)], check=True)
    (src2 / "etc" / "hosts").write_bytes(b"127.0.0.2 v2\n")
    base2 = daemon.publish(src2, "base2")
    with open(daemon.mnt / "a" / "acked", "wb") as f:
        f.write(b"fsynced before the storm\n")
        os.fsync(f.fileno())
    for r in range(int(os.environ.get("VFS_KILL_ROUNDS", 6))):
        ops = subprocess.Popen(
            [sys.executable, "-c", OPS, str(daemon.state), daemon.templates["base"], base2,
             str(rng.randrange(1 << 30))],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )  # fmt: skip
        try:
            wait_for(
                lambda p=ops: p.poll() is not None or _has_line(p), what="first op", timeout=30
            )
            time.sleep(rng.uniform(0, 0.5))  # a random point of the stream
            daemon.kill9()
        finally:
            ops.kill()
            ops.wait()
        daemon.start()
        listed = {v["name"]: v for v in json.loads(daemon.vee("list", "--json").stdout)}
        registry = set(json.loads((daemon.state / "vees.json").read_text())["vees"])
        mounted = set(os.listdir(daemon.mnt))
        assert set(listed) == registry == mounted, (r, seed, listed, registry, mounted)
        assert all(v["state"] == "mounted" for v in listed.values()), (r, seed, listed)
        for name in listed:
            hosts = (daemon.mnt / name / "etc" / "hosts").read_bytes()
            assert hosts in (b"127.0.0.1 localhost\n", b"127.0.0.2 v2\n"), (r, name)
        assert (daemon.mnt / "a" / "acked").read_bytes() == b"fsynced before the storm\n"


def _has_line(p: subprocess.Popen) -> bool:
    import select

    assert p.stdout is not None
    ready, _, _ = select.select([p.stdout], [], [], 0)
    if ready:
        p.stdout.readline()
        return True
    return False
