"""Images pushed encrypted (``vimg push --encrypt-for``) to a repository served by a real nginx
on 127.0.0.1 with mutual TLS, read back with the client's key pair (issue 14).

The web root never holds a plaintext byte of the disk; the image reads the same bytes through
``vimg`` (lazy reads through the address URL#REF, hydration) and through ``vfsd export``
(clusters fetched on demand, decrypted after fetch); a wrong key, a tampered cluster and a
truncated ciphertext are each one line, with no plaintext served or stored.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from vfs.redirect import LocalStore
from vfs.redirect.crypto import cipher_size

pytestmark = pytest.mark.network

VIMG = [sys.executable, "-c", "from vfs.cli.vimg import main; main()"]
VFSD = [sys.executable, "-c", "from vfs.cli.vfsd import main; main()"]
MiB = 1 << 20
CS = 64 << 10
MARKER = b"DISK-SECRET-MARKER-41c9e2 "


def run(*cmd: str, check: bool = True, env: dict | None = None) -> subprocess.CompletedProcess:
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=env)
    if check and r.returncode != 0:
        raise AssertionError(f"{cmd[3:]} exited {r.returncode}: {r.stderr}")
    return r


def one_line_error(r: subprocess.CompletedProcess, code: int, *words: str) -> None:
    assert r.returncode == code, (r.returncode, r.stderr)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in r.stderr, r.stderr
    for w in words:
        assert w in lines[0], lines[0]


@pytest.fixture
def sealed_image(tmp_path, nginx, nginx_repo, monkeypatch):
    """An image pushed encrypted for a client key into the nginx web root: a dict with the
    keys, the original bytes, the repository dir and its mutual-TLS URL and options."""
    monkeypatch.setenv("VFS_ROOT", str(tmp_path / "root"))  # pins of the CLIs
    repo_dir, name = nginx_repo
    k = {}
    for who in ("publisher", "client", "stranger"):
        k[who] = tmp_path / f"{who}.key"
        k[who + ".pub"] = tmp_path / f"{who}.pub"
        k[who + ".pub"].write_text(run(*VFSD, "key", "gen", "-o", str(k[who])).stdout)
    raw = tmp_path / "src.raw"
    with open(raw, "wb") as f:  # random clusters, a marker cluster, a hole, a tail
        f.truncate(16 * MiB)
        f.write(os.urandom(2 * MiB))
        f.write(MARKER * (CS // len(MARKER) + 1))
        f.seek(12 * MiB)
        f.write(os.urandom(MiB + 4096))
    src = tmp_path / "src.vimg"
    run(*VIMG, "convert", "-O", "vimg", str(raw), str(src))
    r = run(*VIMG, "push", "-q", "--repo", str(repo_dir), "--ref", "disk",
            "--identity", str(k["publisher"]), "--encrypt-for", str(k["client.pub"]),
            str(src))  # fmt: skip
    assert "published encrypted template disk" in r.stdout, r.stdout
    assert "for 2 recipients" in r.stdout
    url = nginx.url(name, "mtls")
    tls = ["--ca", nginx.ca, "--cert", nginx.client_cert, "--key", nginx.client_key]
    return {"k": k, "data": raw.read_bytes(), "dir": repo_dir, "url": url, "tls": tls,
            "src": src}  # fmt: skip


def _grep(root: Path, needles: list[bytes]) -> list[str]:
    return [
        str(p) for p in root.rglob("*") if p.is_file() and any(n in p.read_bytes() for n in needles)
    ]


def _known(data: bytes) -> list[bytes]:
    """Pieces of the plaintext the repository must not contain."""
    return [MARKER, data[:64], data[MiB : MiB + 64], data[12 * MiB + 100 : 12 * MiB + 164]]


def _cluster_objects(repo: Path) -> list[Path]:
    want = cipher_size(CS)
    return sorted(p for p in (repo / "objects").rglob("*") if p.stat().st_size == want)


def _rewrite(path: Path, data: bytes) -> None:
    os.chmod(path, 0o644)
    path.write_bytes(data)


def test_encrypted_image_over_mutual_tls(sealed_image, tmp_path):
    s = sealed_image
    k, data, url, tls = s["k"], s["data"], s["url"], s["tls"]
    assert _grep(s["dir"], _known(data)) == []
    # the pushed image is left as it was: it reads alone, with no repository
    run(*VIMG, "convert", "-O", "raw", str(s["src"]), str(tmp_path / "again.raw"))
    assert (tmp_path / "again.raw").read_bytes() == data

    # a lazy pull: the template (metadata only), then reads through the address URL#disk
    tmpl = tmp_path / "b" / "disk.vimg"
    tmpl.parent.mkdir()
    r = run(*VIMG, "pull", "--ref", "disk", "--repo", url, *tls,
            "--identity", str(k["client"]), "--lazy", str(tmpl))  # fmt: skip
    assert "fetched encrypted template disk" in r.stdout
    assert tmpl.stat().st_size < MiB
    run(*VIMG, "check", str(tmpl))  # metadata: no key needed
    addr = ["--repo", f"{url}#disk", *tls, "--identity", str(k["client"])]
    store = tmp_path / "b" / "store"
    out = tmp_path / "b" / "copy.raw"
    run(*VIMG, "convert", "-O", "raw", *addr, "--store", str(store), str(tmpl), str(out))
    assert out.read_bytes() == data
    r = run(*VIMG, "io", *addr, "--store", str(tmp_path / "b" / "s2"),
            "-c", f"read -P 0x00 {4 * MiB} {MiB}", str(tmpl))  # fmt: skip
    # the local store keeps plaintext under plaintext ids (docs/encryption.md §9)
    st = LocalStore(store)
    try:
        import hashlib

        assert st.has(hashlib.sha256(data[:CS]).hexdigest())
    finally:
        st.close()
    # a full pull (hydrate) makes the image independent of the repository and the key
    full = tmp_path / "b" / "full.vimg"
    run(*VIMG, "pull", "-q", "--ref", "disk", "--repo", url, *tls, "--identity",
        str(k["client"]), "--store", str(tmp_path / "b" / "s3"), str(full))  # fmt: skip
    out2 = tmp_path / "b" / "full.raw"
    run(*VIMG, "convert", "-O", "raw", str(full), str(out2))
    assert out2.read_bytes() == data

    # the publisher can read it too (always a recipient); a stranger and no key cannot
    run(*VIMG, "pull", "--ref", "disk", "--repo", url, *tls, "--identity",
        str(k["publisher"]), "--lazy", str(tmp_path / "b" / "pub.vimg"))  # fmt: skip
    r = run(*VIMG, "pull", "--ref", "disk", "--repo", url, *tls, "--lazy",
            str(tmp_path / "b" / "nokey.vimg"), check=False)  # fmt: skip
    one_line_error(r, 12, "give --identity")
    r = run(*VIMG, "pull", "--ref", "disk", "--repo", url, *tls, "--identity",
            str(k["stranger"]), "--lazy", str(tmp_path / "b" / "x.vimg"), check=False)  # fmt: skip
    one_line_error(r, 12, "not sealed to identity")
    assert not (tmp_path / "b" / "x.vimg").exists()
    r = run(*VIMG, "io", "--repo", f"{url}#disk", *tls, "--identity", str(k["stranger"]),
            "--store", str(tmp_path / "b" / "s4"), "-c", "read 0 4k", str(tmpl),
            check=False)  # fmt: skip
    one_line_error(r, 12, "not sealed to identity")
    # --trust: only the publisher's signature is accepted
    r = run(*VIMG, "io", *addr, "--trust", str(k["stranger.pub"]), "--store",
            str(tmp_path / "b" / "s5"), "-c", "read 0 4k", str(tmpl), check=False)  # fmt: skip
    one_line_error(r, 5, "not by a trusted publisher")
    run(*VIMG, "io", *addr, "--trust", str(k["publisher.pub"]), "--store",
        str(tmp_path / "b" / "s5"), "-c", "read 0 4k", str(tmpl))  # fmt: skip

    # pushing again (unchanged) sends nothing new but the template's index and signed ref
    before = {p.name for p in (s["dir"] / "objects").rglob("*") if p.is_file()}
    r = run(*VIMG, "push", "-q", "--repo", str(s["dir"]), "--ref", "disk", "--identity",
            str(k["publisher"]), "--encrypt-for", str(k["client.pub"]), str(s["src"]))  # fmt: skip
    after = {p.name for p in (s["dir"] / "objects").rglob("*") if p.is_file()}
    assert len(after - before) == 2, r.stdout  # the index and the signed ref
    assert _grep(s["dir"], _known(data)) == []


@pytest.mark.parametrize("damage", ["tampered", "truncated"])
def test_damaged_cluster_is_one_line_and_serves_nothing(sealed_image, tmp_path, damage):
    s = sealed_image
    k, url, tls = s["k"], s["url"], s["tls"]
    tmpl = tmp_path / "disk.vimg"
    run(*VIMG, "pull", "--ref", "disk", "--repo", url, *tls, "--identity", str(k["client"]),
        "--lazy", str(tmpl))  # fmt: skip
    objs = _cluster_objects(s["dir"])
    assert len(objs) > 40
    saved = {p: p.read_bytes() for p in objs}
    for p, b in saved.items():  # every cluster object: whichever is read first fails
        if damage == "tampered":
            bad = bytearray(b)
            bad[len(bad) // 2] ^= 0x10
            _rewrite(p, bytes(bad))
        else:
            _rewrite(p, b[: len(b) - 100])
    store = tmp_path / "store"
    out = tmp_path / "out.raw"
    addr = ["--repo", f"{url}#disk", *tls, "--identity", str(k["client"])]
    r = run(*VIMG, "convert", "-O", "raw", *addr, "--store", str(store), str(tmpl), str(out),
            check=False)  # fmt: skip
    word = "does not authenticate" if damage == "tampered" else "bytes where 65560 were expected"
    one_line_error(r, 5, word)
    assert not out.exists() or s["data"][:64] not in out.read_bytes()
    st = LocalStore(store)
    try:
        assert st.list() == [], "a damaged cluster was stored"
    finally:
        st.close()
    for p, b in saved.items():
        _rewrite(p, b)
    run(*VIMG, "io", *addr, "--store", str(store), "-c", "read 0 64k", str(tmpl))


def test_export_of_an_encrypted_image(sealed_image, tmp_path):
    """``vfsd export`` of a lazily pulled encrypted image: clusters are fetched over mutual
    TLS on demand and decrypted after fetch; a tampered cluster is an NBD error, never its bytes."""
    from tests.export.conftest import Exports
    from vfs.export import NbdClient, NbdError

    s = sealed_image
    k, data, url, tls = s["k"], s["data"], s["url"], s["tls"]
    tmpl = tmp_path / "disk.vimg"
    run(*VIMG, "pull", "--ref", "disk", "--repo", url, *tls, "--identity", str(k["client"]),
        "--lazy", str(tmpl))  # fmt: skip
    pins = ["--pins", str(tmp_path / "pins.json")]
    # a wrong key is refused at start, in one line; keys without an address are a usage error
    r = run(*VFSD, "export", str(tmpl), "--nbd", str(tmp_path / "x.sock"), "--repo",
            f"{url}#disk", *tls, "--identity", str(k["stranger"]), *pins,
            "--store", str(tmp_path / "sx"), "-r", check=False)  # fmt: skip
    one_line_error(r, 12, "not sealed to identity")
    r = run(*VFSD, "export", str(tmpl), "--nbd", str(tmp_path / "x.sock"), "--repo", url,
            *tls, "--identity", str(k["client"]), "-r", check=False)  # fmt: skip
    one_line_error(r, 2, "URL#REF")

    ex = Exports(tmp_path)
    try:
        e = ex.start(tmpl, "--repo", f"{url}#disk", *tls, "--identity", str(k["client"]), *pins,
                     "--store", str(tmp_path / "se"), "-r")  # fmt: skip
        with NbdClient(e.sock, "disk") as c:
            assert c.pread(2 * MiB, CS) == data[2 * MiB : 2 * MiB + CS]
            assert e.control.status()["fetched_bytes"] == CS  # on demand: one cluster
            assert c.pread(0, MiB) == data[:MiB]
            assert c.pread(12 * MiB, 2 * MiB) == data[12 * MiB : 14 * MiB]
            assert c.pread(4 * MiB, MiB) == bytes(MiB)  # a hole: nothing fetched
            # every cluster object tampered with; one never fetched is an error, not bytes
            for p in _cluster_objects(s["dir"]):
                b = bytearray(p.read_bytes())
                b[100] ^= 1
                _rewrite(p, bytes(b))
            with pytest.raises(NbdError) as err:
                c.pread(MiB + CS, CS)
            assert err.value.error == 5
            assert c.pread(0, MiB) == data[:MiB]  # what was verified before is still served
        deadline = time.monotonic() + 10
        while "does not authenticate" not in e.log.read_text():
            assert time.monotonic() < deadline, e.log.read_text()
            time.sleep(0.05)
        assert "Traceback" not in e.log.read_text()
    finally:
        ex.close()


@pytest.mark.log_warnings
def test_keep_encrypted_store_holds_only_ciphertext(sealed_image, tmp_path):
    """--keep-encrypted: the local store keeps the repository's encrypted objects (the same
    bytes, the same ids) and decrypts on read; a copy damaged on the local disk is fetched
    again, never served; without the key the store's copies are of no use."""
    s = sealed_image
    k, data, url, tls = s["k"], s["data"], s["url"], s["tls"]
    tmpl = tmp_path / "disk.vimg"
    run(*VIMG, "pull", "--ref", "disk", "--repo", url, *tls, "--identity", str(k["client"]),
        "--lazy", str(tmpl))  # fmt: skip
    store = tmp_path / "store"
    addr = ["--repo", f"{url}#disk", *tls, "--identity", str(k["client"]), "--store",
            str(store), "--keep-encrypted"]  # fmt: skip
    out = tmp_path / "copy.raw"
    run(*VIMG, "convert", "-O", "raw", *addr, str(tmpl), str(out))
    assert out.read_bytes() == data
    assert _grep(store, _known(data)) == []
    st = LocalStore(store)
    try:
        kept = set(st.list())
    finally:
        st.close()
    in_repo = {p.name for p in (s["dir"] / "objects").rglob("*") if p.is_file()}
    assert len(kept) > 40 and kept <= in_repo  # the ciphertext, under its stored ids
    # reads decrypt from the store: the repository is not asked again
    r = run(*VIMG, "io", *addr, "-c", f"read -P 0x00 {4 * MiB} {MiB}", "-c",
            f"read 0 {2 * MiB}", str(tmpl))  # fmt: skip
    assert "read 2097152/2097152" in r.stdout
    # a copy damaged on the local disk: dropped and fetched again, the right bytes served
    victim = next(iter(sorted(kept)))
    path = store / "objects" / victim[:2] / victim
    b = bytearray(path.read_bytes())
    b[len(b) // 2] ^= 0x55
    _rewrite(path, bytes(b))
    out2 = tmp_path / "copy2.raw"
    run(*VIMG, "convert", "-O", "raw", *addr, str(tmpl), str(out2))
    assert out2.read_bytes() == data
    # the flag needs an encrypted image's address
    r = run(*VIMG, "io", "--repo", url, *tls, "--store", str(store), "--keep-encrypted",
            "-c", "read 0 4k", str(tmpl), check=False)  # fmt: skip
    one_line_error(r, 2, "URL#REF")


@pytest.mark.fuse
def test_daemon_export_of_an_encrypted_image(sealed_image, nginx, tmp_path):
    """`vfsd export add` hands the address, the key files and --keep-encrypted to the export
    process it starts (and restarts): the guest reads the image's bytes; the store has none."""
    from tests.daemon.conftest import fuse_available
    from tests.export.test_daemon_exports import Serve
    from vfs.export import NbdClient

    reason = fuse_available()
    if reason:
        pytest.skip(reason)
    s = sealed_image
    k, data = s["k"], s["data"]
    url = nginx.url(s["dir"].name, "http")
    tmpl = tmp_path / "disk.vimg"
    run(*VIMG, "pull", "--ref", "disk", "--repo", url, "--identity", str(k["client"]),
        "--lazy", str(tmpl))  # fmt: skip
    pw = tmp_path / "pw"
    pw.write_bytes(b"s3cret\n")
    os.chmod(pw, 0o600)
    key = tmp_path / "client-protected.key"
    # the same client, its identity now behind a passphrase (read from the file by the export)
    from vfs.redirect.keys import load_identity, write_secret

    write_secret(key, load_identity(k["client"]).to_text(b"s3cret", 12))
    (tmp_path / "srv").mkdir()
    srv = Serve(tmp_path / "srv")
    try:
        srv.start()
        sock = tmp_path / "e.sock"
        store = tmp_path / "estore"
        srv.cli("export", "add", "enc", str(tmpl), "--nbd", str(sock), "--repo", f"{url}#disk",
                "--identity", str(key), "--passphrase-file", str(pw), "--keep-encrypted",
                "--store", str(store), "--pins", str(tmp_path / "pins.json"),
                "--readonly")  # fmt: skip
        deadline = time.monotonic() + 30
        while srv.list()["enc"]["state"] != "running":
            assert time.monotonic() < deadline, srv.list()
            time.sleep(0.1)
        with NbdClient(str(sock), "enc") as c:
            assert c.pread(0, 3 * MiB) == data[: 3 * MiB]
        assert _grep(store, _known(data)) == []
    finally:
        srv.stop()
        for pid in srv.pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, 9)
