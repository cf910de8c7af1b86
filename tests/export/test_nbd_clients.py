"""The NBD export against the clients users run: qemu-img, qemu-io, nbdinfo, nbdcopy, nbdsh —
with qemu-nbd 7.2 serving the same data as the reference of what they expect."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.export.conftest import make_image, nbdsh_env, need, run
from vfs.export import NbdClient, NbdError
from vfs.export import protocol as P

pytestmark = pytest.mark.qemu

WRITES = ("write -P 0xab 0 1M", "write -P 0xcd 10M 64k", "write -z 20M 1M", "write -P 1 33M 4k")


@pytest.fixture
def disk(tmp_path):
    return make_image(tmp_path / "d.vimg", "64M", *WRITES)


def nbdinfo_json(uri: str) -> dict:
    return json.loads(run("nbdinfo", "--json", uri).stdout)


def test_qemu_img_reads_and_converts(exports, disk, tmp_path):
    need("qemu-img")
    e = exports.start(disk)
    info = json.loads(run("qemu-img", "info", "--output=json", e.uri).stdout)
    assert info["virtual-size"] == 64 << 20
    out = tmp_path / "out.qcow2"
    run("qemu-img", "convert", "-f", "raw", "-O", "qcow2", e.uri, str(out))
    run("qemu-img", "compare", "-f", "raw", "-F", "qcow2", e.uri, str(out))
    # holes travel: only what was written is allocated in the copy
    m = json.loads(run("qemu-img", "map", "--output=json", str(out)).stdout)
    data = sum(x["length"] for x in m if x["data"])
    assert data == (1 << 20) + (64 << 10) + (64 << 10)  # the 4k write fills its 64k cluster
    # and the export's own map says the same (zero range as a hole, no data)
    m = json.loads(run("qemu-img", "map", "--output=json", e.uri).stdout)
    assert [(x["start"], x["length"]) for x in m if x["data"]][:2] == [
        (0, 1 << 20),
        (10 << 20, 64 << 10),
    ]


def test_qemu_io_writes_are_durable_after_flush(exports, disk):
    need("qemu-io")
    e = exports.start(disk)
    run("qemu-io", "-f", "raw", "-c", "write -P 0x11 2M 1M", "-c", "write -f -P 0x22 3M 4k",
        "-c", "write -z 0 64k", "-c", "discard 10M 64k", "-c", "aio_write -P 0x33 5M 8k",
        "-c", "aio_flush", "-c", "read -P 0x11 2M 1M", "-c", "read -P 0 0 64k",
        "-c", "read -P 0 10M 64k", e.uri)  # fmt: skip
    assert e.stop() == 0
    io = [sys.executable, "-c", "from vfs.cli.vimg import main; main()", "io"]
    run(*io, "-c", "read -P 0x11 2M 1M", "-c", "read -P 0x22 3M 4k", "-c", "read -P 0x33 5M 8k",
        "-c", "read -P 0 10M 64k", "-c", "read -P 0 0 64k", str(disk))  # fmt: skip


def test_nbdinfo_flags_and_contexts_match_qemu_nbd(exports, disk, tmp_path):
    need("nbdinfo", "qemu-nbd")
    ref_img = tmp_path / "d.qcow2"
    io = [sys.executable, "-c", "from vfs.cli.vimg import main; main()"]
    run(*io, "convert", "-O", "qcow2", str(disk), str(ref_img))
    qsock = tmp_path / "q.sock"
    q = subprocess.Popen(["qemu-nbd", "-f", "qcow2", "-k", str(qsock), "-t", "-e", "4",
                          "-x", "disk", "--allocation-depth", str(ref_img)])  # fmt: skip
    try:
        e = exports.start(disk)
        for _ in range(100):
            if qsock.exists():
                break
            __import__("time").sleep(0.05)
        ours = nbdinfo_json(e.uri)["exports"][0]
        ref = nbdinfo_json(f"nbd+unix:///disk?socket={qsock}")["exports"][0]
        for key in ("export-size", "is_read_only", "can_flush", "can_fua", "can_trim",
                    "can_zero", "can_fast_zero", "can_cache", "can_multi_conn", "can_df",
                    "block_size_minimum", "block_size_maximum"):  # fmt: skip
            assert ours[key] == ref[key], key
        assert {"base:allocation", "qemu:allocation-depth"} <= set(ref["contexts"])
        assert set(ref["contexts"]) - {"qemu:dirty-bitmap:dirty"} <= set(ours["contexts"])
        assert "qemu:dirty-bitmap:dirty" in ours["contexts"]

        # the same data and holes: --map of both (qemu-nbd on the raw copy) agree on data
        def data_map(uri):
            out = run("nbdinfo", "--map", "--json", uri).stdout
            return [(x["offset"], x["length"]) for x in json.loads(out) if not x["type"] & 1]

        assert data_map(e.uri) == data_map(f"nbd+unix:///disk?socket={qsock}")
        listing = run("nbdinfo", "--list", "--json", e.uri).stdout
        assert [x["export-name"] for x in json.loads(listing)["exports"]] == ["disk"]
    finally:
        q.terminate()
        q.wait(10)


def test_allocation_depth_over_a_backing_chain(exports, tmp_path):
    need("nbdinfo")
    make_image(tmp_path / "base.vimg", "8M", "write -P 1 0 1M")
    top = tmp_path / "top.vimg"
    vimg = [sys.executable, "-c", "from vfs.cli.vimg import main; main()"]
    run(*vimg, "create", "-f", "vimg", "-b", "base.vimg", "-F", "vimg", str(top))
    run(*vimg, "io", "-c", "write -P 2 512k 64k", str(top))
    e = exports.start(top)
    out = run("nbdinfo", "--map=qemu:allocation-depth", "--json", e.uri).stdout
    depths = [(x["offset"], x["length"], x["type"]) for x in json.loads(out)]
    assert depths[:3] == [(0, 512 << 10, 2), (512 << 10, 64 << 10, 1), (576 << 10, 448 << 10, 2)]
    assert depths[-1][2] == 0


def test_nbdcopy_multi_conn_keeps_holes(exports, disk, tmp_path):
    need("nbdcopy")
    src = tmp_path / "src.raw"
    vimg = [sys.executable, "-c", "from vfs.cli.vimg import main; main()"]
    run(*vimg, "convert", "-O", "raw", str(disk), str(src))
    e = exports.start(disk)
    dst = tmp_path / "copy.raw"
    dst.write_bytes(b"")
    os.truncate(dst, 64 << 20)
    run("nbdcopy", "--connections=4", "--requests=16", e.uri, str(dst))
    assert os.stat(dst).st_blocks * 512 < 4 << 20  # sparse: holes were not written
    assert src.read_bytes() == dst.read_bytes()
    # and into the export: a new image receives a copy over 4 connections
    blank = make_image(tmp_path / "blank.vimg", "64M")
    e2 = exports.start(blank, name="blank")
    run("nbdcopy", "--connections=4", str(src), e2.uri)
    e2.control.flush()
    with NbdClient(e2.sock, "blank") as c:
        assert c.pread(10 << 20, 64 << 10) == b"\xcd" * (64 << 10)
        assert c.pread(33 << 20, 4096) == b"\x01" * 4096


NBDSH_EDGES = r"""
import errno, os
h.add_meta_context("base:allocation")
h.add_meta_context("qemu:dirty-bitmap:dirty")
h.connect_uri(os.environ["URI"])
h.set_strict_mode(0)
size = h.get_size()
def fails(fn, *a, want=None):
    try:
        fn(*a)
    except nbd.Error as e:
        assert want is None or e.errnum == want, (e.errnum, want, str(e))
        return
    raise AssertionError(f"{fn.__name__}{a} did not fail")
fails(h.pread, 4096, size - 1, want=errno.EINVAL)
fails(h.pwrite, b"x" * 4096, size - 100, want=errno.ENOSPC)
fails(h.zero, 4096, size, want=errno.ENOSPC)
fails(h.pread, 33 << 20, 0)
h.pwrite(b"\x42" * 4096, 8 << 20, nbd.CMD_FLAG_FUA)
assert h.pread(4096, 8 << 20) == b"\x42" * 4096
h.zero(1 << 20, 16 << 20, nbd.CMD_FLAG_FAST_ZERO)
fails(h.zero, 4096, 0, nbd.CMD_FLAG_FAST_ZERO | nbd.CMD_FLAG_NO_HOLE, want=errno.ENOTSUP)
h.trim(65536, 30 << 20)
h.cache(1 << 20, 0)
h.flush()
got = []
h.block_status(size, 0, lambda ctx, off, ents, err: got.append((ctx, ents)), nbd.CMD_FLAG_REQ_ONE)
assert sorted(c for c, e in got) == ["base:allocation", "qemu:dirty-bitmap:dirty"], got
assert all(len(ents) == 2 for ctx, ents in got), got
assert h.pread(4096, 16 << 20) == bytes(4096)
print("ok")
"""


def test_nbdsh_edge_cases(exports, disk):
    need("nbdsh")
    e = exports.start(disk)
    r = subprocess.run(["nbdsh", "-c", NBDSH_EDGES], capture_output=True, text=True,
                       env={**nbdsh_env(), "URI": e.uri}, timeout=60)  # fmt: skip
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr
    assert e.control.ping()  # still serving


def test_readonly_export(exports, disk):
    e = exports.start(disk, "--readonly")
    with NbdClient(e.sock, "disk") as c:
        assert c.flags & P.FLAG_READ_ONLY
        assert c.pread(0, 4) == b"\xab" * 4
        with pytest.raises(NbdError) as err:
            c.pwrite(b"x", 0)
        assert err.value.error == P.EPERM


def test_dirty_bitmap_over_nbd_and_cli(exports, disk, tmp_path):
    need("nbdinfo", "qemu-img")
    e = exports.start(disk)
    e.control.mark("dirty")
    with NbdClient(e.sock, "disk", contexts=("qemu:dirty-bitmap:dirty",)) as c:
        c.pwrite(b"y" * 100, (5 << 20) + 10)
        c.pwrite(b"z" * 4096, 40 << 20)
        ext = c.extents("qemu:dirty-bitmap:dirty")
    dirty = [(o, n) for o, n, f in ext if f & P.STATE_DIRTY]
    assert dirty == [(5 << 20, 64 << 10), (40 << 20, 64 << 10)]
    out = run("nbdinfo", "--map=qemu:dirty-bitmap:dirty", "--json", e.uri).stdout
    assert [(x["offset"], x["length"]) for x in json.loads(out) if x["type"] & 1] == dirty
    # QEMU's own NBD client reads it too (the x-dirty-bitmap trick of qemu-img map)
    opts = e.opts + ",x-dirty-bitmap=qemu:dirty-bitmap:dirty"
    m = json.loads(run("qemu-img", "map", "--output=json", "--image-opts", opts).stdout)
    assert [(x["start"], x["length"]) for x in m if not x["data"]] == dirty  # inverted sense
    vfsd = [sys.executable, "-c", "from vfs.cli.vfsd import main; main()"]
    js = json.loads(run(*vfsd, "export", "dirty", str(e.ctl), "--json").stdout)
    assert [(d["offset"], d["length"]) for d in js["dirty"]] == dirty
    taken = json.loads(run(*vfsd, "export", "take", str(e.ctl), "--json").stdout)
    assert taken["dirty_bytes"] == 128 << 10
    assert e.control.dirty("dirty") == []
    # the bitmap persists in the image across a clean restart
    e.control.mark("dirty")
    with NbdClient(e.sock, "disk") as c:
        c.pwrite(b"q", 63 << 20)
    assert e.stop() == 0
    e2 = exports.start(disk, name="disk")
    assert e2.control.dirty("dirty") == [(63 << 20, 64 << 10)]


def test_nbdkit_as_a_second_peer(exports, disk, tmp_path):
    """nbdkit 1.32 (file plugin) serving a raw copy of the same disk: nbdinfo sees the same
    data map from both servers (nbdkit's from the file's SEEK_DATA), and nbdcopy from our
    export into an nbdkit export gives a disk qemu-img compares identical."""
    need("nbdkit", "nbdinfo", "nbdcopy")
    e = exports.start(disk)
    raw = tmp_path / "d.raw"  # through the export; -S: zero runs of a whole cluster are holes
    run("qemu-img", "convert", "-S", "64k", "-f", "raw", "-O", "raw", e.uri, str(raw))
    dst = tmp_path / "dst.raw"
    dst.write_bytes(b"")
    os.truncate(dst, raw.stat().st_size)
    procs = []
    try:
        for name, path in (("ref", raw), ("dst", dst)):
            sock = tmp_path / f"{name}.sock"
            procs.append(subprocess.Popen(["nbdkit", "-f", "-U", str(sock), "file", str(path)]))
            for _ in range(200):
                if sock.exists():
                    break
                __import__("time").sleep(0.05)

        def data_map(uri):
            out = run("nbdinfo", "--map", "--json", uri).stdout
            # data that is not known zeros (a ZERO entry of ours is a hole of the raw file)
            return [(x["offset"], x["length"]) for x in json.loads(out) if x["type"] == 0]

        ref_uri = f"nbd+unix:///?socket={tmp_path / 'ref.sock'}"
        assert data_map(e.uri) == data_map(ref_uri)
        dst_uri = f"nbd+unix:///?socket={tmp_path / 'dst.sock'}"
        run("nbdcopy", "--connections=4", e.uri, dst_uri)
        run("qemu-img", "compare", "-f", "raw", "-F", "raw", ref_uri, dst_uri)
        run("qemu-img", "compare", "-f", "raw", "-F", "raw", e.uri, str(dst))
    finally:
        for p in procs:
            p.terminate()
            p.wait(10)


def test_loopback_tcp_and_refused_addresses(exports, disk, tmp_path):
    """--tcp serves NBD on a loopback address (qemu-img over nbd://); any other address is
    refused in one line (there is no TLS), as is a malformed one."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    exports.start(disk, "--tcp", f"127.0.0.1:{port}")
    out = run("qemu-io", "-f", "raw", "-c", "read -P 0xab 0 64k", f"nbd://127.0.0.1:{port}/disk")
    assert "read 65536/65536" in out.stdout
    vfsd = [sys.executable, "-c", "from vfs.cli.vfsd import main; main()"]
    for addr, msg in (("0.0.0.0:10809", "loopback addresses only"), ("localhost", "HOST:PORT")):
        r = run(*vfsd, "export", str(disk), "--tcp", addr, check=False)
        assert r.returncode == 2 and msg in r.stderr and "Traceback" not in r.stderr, r.stderr
