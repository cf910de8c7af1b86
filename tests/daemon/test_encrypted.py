"""VEEs started from encrypted templates on a real nginx with mutual TLS (issue 14).

The publisher encrypts for a VE key and a client key; the client's daemon starts the VEE from
the VE's address (URL#REF) with its own key pair and the publisher's public key as trust. The
web root never holds a plaintext byte or name; every attack (tampered object, replayed ref,
unsigned or forged ref, wrong key) is one clear error and nothing is served or stored.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import subprocess
from pathlib import Path

import pytest

from tests.daemon.conftest import Daemon, fuse_available, vfsd
from vfs.redirect import LocalStore
from vfs.redirect.file_remote import FileRemote

pytestmark = [pytest.mark.fuse, pytest.mark.network]

MARKER = b"TOP-SECRET-MARKER-7f3c91"
SECRET_NAME = "quarterly-passwords-2026.txt"


def _keys(tmp: Path) -> dict[str, Path]:
    out = {}
    for who in ("publisher", "ve", "client", "stranger"):
        key = tmp / f"{who}.key"
        pub = tmp / f"{who}.pub"
        r = vfsd("key", "gen", "-o", str(key))
        pub.write_text(r.stdout)
        out[who], out[who + ".pub"] = key, pub
    return out


def _tree(src: Path) -> None:
    (src / "etc").mkdir(parents=True)
    (src / "etc" / SECRET_NAME).write_bytes(MARKER + b"\n")
    (src / "etc" / "motd").write_bytes(b"encrypted at rest, " + MARKER + b"\n")
    block = (MARKER + b" ") * 4096
    (src / "big").write_bytes(os.urandom(3 << 20) + block + os.urandom(100_000))
    (src / "cold").write_bytes(block * 9 + b"tail")  # fetched only late in the test
    (src / "empty").write_bytes(b"")


def _tree_bytes(root: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(root)): p.read_bytes()
        for p in sorted(root.rglob("*"))
        if p.is_file() and not p.is_symlink()
    }


def _publish(repo: Path, src: Path, name: str, k: dict[str, Path], *extra: str) -> dict:
    r = vfsd(
        "template", "publish", str(src), "--repo", str(repo), "--name", name, "--json",
        "--identity", str(k["publisher"]),
        "--encrypt-for", str(k["ve.pub"]), "--encrypt-for", str(k["client.pub"]), *extra,
    )  # fmt: skip
    return json.loads(r.stdout)


def publish_plain_and_sealed(tmp: Path, repo_dir: Path, k: dict) -> tuple[Path, dict, dict]:
    """The sample tree (``tmp/src``) published plain into a repository of its own and sealed
    as 'web' into ``repo_dir``: (the tree, the plain publish, the sealed one). The encrypted
    template is the same template: both have one digest."""
    src = tmp / "src"
    _tree(src)
    plain_repo = tmp / "plain-repo"
    vfsd("repo", "init", str(plain_repo))
    plain = json.loads(
        vfsd("template", "publish", str(src), "--repo", str(plain_repo), "--json").stdout
    )
    res = _publish(repo_dir, src, "web", k)
    assert res["digest"] == plain["digest"]
    return src, plain, res


def _grep(root: Path, needle: bytes) -> list[str]:
    return [str(p) for p in root.rglob("*") if p.is_file() and needle in p.read_bytes()]


def test_vee_from_an_encrypted_template_over_mutual_tls(tmp_path, nginx, nginx_repo):
    reason = fuse_available()
    if reason:
        pytest.skip(reason)
    repo_dir, name = nginx_repo
    k = _keys(tmp_path)
    src, plain, res = publish_plain_and_sealed(tmp_path, repo_dir, k)

    # The server's directory: no plaintext byte, no file name, no manifest in the clear.
    assert _grep(repo_dir, MARKER) == []
    assert _grep(repo_dir, SECRET_NAME.encode()) == []
    assert _grep(repo_dir, plain["digest"].encode()) == []

    url = nginx.url(name, "mtls")
    tls = ["--ca", nginx.ca, "--cert", nginx.client_cert, "--key", nginx.client_key]
    d = Daemon(tmp_path, tmp_path / "state", tmp_path / "mnt", tmp_path / "store", repo_dir)
    d.remote_url = url
    d.extra_args = [*tls, "--identity", str(k["client"]), "--trust", str(k["publisher.pub"])]
    d.mnt.mkdir()
    d.start()
    try:
        out = d.vee("add", "enc", "--template", f"{url}#web", "--json")
        assert json.loads(out.stdout)["template"] == plain["digest"]
        want = _tree_bytes(src)
        got = {p: (d.mnt / "enc" / p).read_bytes() for p in want if p != "cold"}
        assert got == {p: b for p, b in want.items() if p != "cold"}
        assert sorted(os.listdir(d.mnt / "enc" / "etc")) == ["motd", SECRET_NAME]

        # -- a tampered object: one flipped byte in the ciphertext of the cold file
        cold_id = hashlib.sha256(want["cold"]).hexdigest()
        store = LocalStore(d.store)
        try:
            assert not store.has(cold_id)
        finally:
            store.close()
        cold_cipher = _cipher_of(repo_dir, len(want["cold"]))
        saved = cold_cipher.read_bytes()
        bad = bytearray(saved)
        bad[len(bad) // 2] ^= 0x40
        _rewrite(cold_cipher, bytes(bad))
        with pytest.raises(OSError) as ei:
            (d.mnt / "enc" / "cold").read_bytes()
        assert ei.value.errno == errno.EIO
        assert "does not authenticate" in d.log_text()
        store = LocalStore(d.store)
        try:
            assert not store.has(cold_id), "a tampered object was stored"
        finally:
            store.close()
        _rewrite(cold_cipher, saved)

        # -- a replayed older signed ref where a newer one is pinned
        old_ref = FileRemote(repo_dir).get_ref("web")
        (src / "etc" / "motd").write_bytes(b"version two\n")
        _publish(repo_dir, src, "web", k)
        d.vee("add", "v2", "--template", f"{url}#web")  # pins the newer version
        assert (d.mnt / "v2" / "etc" / "motd").read_bytes() == b"version two\n"
        FileRemote(repo_dir).set_ref("web", old_ref)  # the repository rolls the ref back
        r = d.vee("add", "v3", "--template", f"{url}#web", check=False)
        assert r.returncode == 5 and "replayed older version" in r.stderr, r.stderr
        assert len(r.stderr.strip().splitlines()) == 1
        assert "v3" not in os.listdir(d.mnt)

        # -- an unsigned (plain) ref with --trust
        other = tmp_path / "other"
        other.mkdir()
        (other / "f").write_bytes(b"plain\n")
        vfsd("template", "publish", str(other), "--repo", str(repo_dir), "--name", "plain")
        r = d.vee("add", "p", "--template", f"{url}#plain", check=False)
        assert r.returncode == 5 and "not a signed ref" in r.stderr, r.stderr

        # -- a forged signature, and a ref signed by a key the client does not trust
        fr = FileRemote(repo_dir)
        good = fr.get(fr.get_ref("web"), max_size=1 << 20)
        forged = bytearray(good)
        forged[-1] ^= 1
        fr.set_ref("forged", fr.put(bytes(forged)))
        r = d.vee("add", "f", "--template", f"{url}#forged", check=False)
        assert r.returncode == 5, r.stderr
        assert "signature does not verify" in r.stderr or "not 'forged'" in r.stderr, r.stderr
        vfsd(
            "template", "publish", str(src), "--repo", str(repo_dir), "--name", "rogue",
            "--identity", str(k["stranger"]), "--encrypt-for", str(k["client.pub"]),
        )  # fmt: skip
        r = d.vee("add", "r", "--template", f"{url}#rogue", check=False)
        assert r.returncode == 5 and "not by a trusted publisher" in r.stderr, r.stderr
        assert sorted(os.listdir(d.mnt)) == ["enc", "v2"]
    finally:
        d.stop()
    assert "Traceback" not in d.log_text(), d.log_text()

    # -- a restart opens the signed refs from the state (no fresh resolve) and fetches the
    # object that was never fetched, decrypted, over mutual TLS
    d.start()
    try:
        assert (d.mnt / "enc" / "cold").read_bytes() == want["cold"]
        assert (d.mnt / "enc" / "etc" / "motd").read_bytes() == want["etc/motd"]
    finally:
        d.stop()
    assert "Traceback" not in d.log_text(), d.log_text()
    assert _grep(repo_dir, MARKER) == []


def test_wrong_or_missing_key_is_one_line(tmp_path, nginx, nginx_repo):
    repo_dir, name = nginx_repo
    k = _keys(tmp_path)
    src = tmp_path / "src"
    _tree(src)
    _publish(repo_dir, src, "web", k)
    tls = ["--ca", nginx.ca, "--cert", nginx.client_cert, "--key", nginx.client_key]
    url = nginx.url(name, "mtls")
    base = ["template", "show", "--repo", url, *tls, "--pins", str(tmp_path / "pins.json")]
    r = vfsd(*base, "web", check=False)
    assert r.returncode == 12 and "give --identity" in r.stderr, r.stderr
    r = vfsd(*base, "--identity", str(k["stranger"]), "web", check=False)
    assert r.returncode == 12 and "not sealed to identity" in r.stderr, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr
    for who in ("ve", "client", "publisher"):  # every recipient, the signer included
        r = vfsd(*base, "--identity", str(k[who]), "web")
        assert SECRET_NAME in r.stdout


def _cipher_of(repo: Path, plain_size: int) -> Path:
    from vfs.redirect.crypto import cipher_size

    want = cipher_size(plain_size)
    hits = [p for p in (repo / "objects").rglob("*") if p.is_file() and p.stat().st_size == want]
    assert len(hits) == 1, hits
    return hits[0]


def _rewrite(path: Path, data: bytes) -> None:
    os.chmod(path, 0o644)
    path.write_bytes(data)
    subprocess.run(["sync"], check=False)
