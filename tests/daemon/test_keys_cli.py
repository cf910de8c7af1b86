"""The key commands and the encrypted-publish flags through the real `vfsd` CLI: key files of
mode 0600, one-line errors with their exit codes, publish/show/reseal on a file repository."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest

from tests.daemon.conftest import vfsd

MARKER = b"CLI-PLAINTEXT-MARKER-90ab"


def _one_line(r, code: int, text: str) -> None:
    assert r.returncode == code, (r.returncode, r.stderr)
    assert text in r.stderr, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr, r.stderr


@pytest.fixture
def keys(tmp_path) -> dict[str, Path]:
    out = {}
    for who in ("publisher", "ve", "client", "stranger"):
        out[who] = tmp_path / f"{who}.key"
        out[who + ".pub"] = tmp_path / f"{who}.pub"
        out[who + ".pub"].write_text(vfsd("key", "gen", "-o", str(out[who])).stdout)
    return out


def test_key_gen_and_show(tmp_path, keys):
    k = keys["client"]
    assert stat.S_IMODE(k.stat().st_mode) == 0o600
    pub = keys["client.pub"].read_text().strip()
    assert pub.startswith("vfs-pub-1-")
    for spec in (str(k), str(keys["client.pub"]), pub):
        assert vfsd("key", "show", spec).stdout.strip() == pub
    info = json.loads(vfsd("key", "show", "--json", str(k)).stdout)
    assert info["public"] == pub and len(info["fingerprint"]) == 16
    assert "VFS-SECRET" not in vfsd("key", "show", str(k)).stdout
    before = k.read_bytes()
    _one_line(vfsd("key", "gen", "-o", str(k), check=False), 4, "refusing to overwrite")
    assert k.read_bytes() == before
    ring = json.loads(vfsd("key", "gen", "--keyring", "--json", "-o", str(tmp_path / "r")).stdout)
    assert len(ring["keyring"]) == 64
    assert stat.S_IMODE((tmp_path / "r").stat().st_mode) == 0o600
    i = len(pub) // 2
    typo = pub[:i] + ("A" if pub[i] != "A" else "B") + pub[i + 1 :]
    _one_line(vfsd("key", "show", typo, check=False), 6, "checksum")
    _one_line(vfsd("key", "show", str(tmp_path / "nope"), check=False), 4, "no such file")


def _src(tmp: Path) -> Path:
    src = tmp / "src"
    (src / "etc").mkdir(parents=True)
    (src / "etc" / "secret.conf").write_bytes(MARKER + b"\n")
    (src / "bin").write_bytes(os.urandom(300_000))
    return src


def _publish(repo: Path, src: Path, keys: dict[str, Path], *extra: str, check: bool = True):
    return vfsd(
        "template", "publish", str(src), "--repo", str(repo), "--json",
        "--identity", str(keys["publisher"]),
        "--encrypt-for", str(keys["ve.pub"]), "--encrypt-for", str(keys["client.pub"]),
        *extra, check=check,
    )  # fmt: skip


def _show(repo: Path, who: Path, ref: str, tmp: Path, *extra: str):
    return vfsd(
        "template", "show", "--repo", str(repo), "--identity", str(who),
        "--pins", str(tmp / f"pins-{who.stem}.json"), *extra, ref, check=False,
    )  # fmt: skip


def test_publish_flags_are_checked_before_any_work(tmp_path, keys):
    repo = tmp_path / "repo"
    vfsd("repo", "init", str(repo))
    src = _src(tmp_path)
    pub = str(keys["client.pub"])
    base = ["template", "publish", str(src), "--repo", str(repo), "--name", "x"]
    r = vfsd(*base, "--encrypt-for", pub, check=False)
    _one_line(r, 2, "needs --identity")
    r = vfsd(*base, "--keyring", str(tmp_path / "ring"), check=False)
    _one_line(r, 2, "only with --encrypt-for")
    r = _publish(repo, src, keys, check=False)  # no --name
    _one_line(r, 2, "needs --name")
    r = _publish(repo, src, keys, "--name", "x", "--no-dedup", "--keyring", "k", check=False)
    _one_line(r, 2, "exclude each other")
    os.chmod(keys["publisher"], 0o644)
    r = _publish(repo, src, keys, "--name", "x", check=False)
    _one_line(r, 2, "0600")
    os.chmod(keys["publisher"], 0o600)
    r = vfsd(*base, "--identity", str(keys["publisher"]), "--encrypt-for", "vfs-pub-1-AAAA",
             check=False)  # fmt: skip
    _one_line(r, 6, "public key")
    assert "x" not in json.loads((repo / "refs.json").read_text())


def test_publish_show_reseal(tmp_path, keys):
    repo = tmp_path / "repo"
    vfsd("repo", "init", str(repo))
    src = _src(tmp_path)
    first = json.loads(_publish(repo, src, keys, "--name", "web").stdout)
    assert not [p for p in repo.rglob("*") if p.is_file() and MARKER in p.read_bytes()]
    for who in ("ve", "client", "publisher"):
        r = _show(repo, keys[who], "web", tmp_path, "--trust", str(keys["publisher.pub"]))
        assert r.returncode == 0 and "secret.conf" in r.stdout, r.stderr
    _one_line(_show(repo, keys["stranger"], "web", tmp_path), 12, "not sealed to identity")
    r = _show(repo, keys["client"], "web", tmp_path, "--trust", str(keys["stranger.pub"]))
    _one_line(r, 5, "not by a trusted publisher")

    # an unchanged republish reuses every object: nothing encrypted or sent again
    again = json.loads(_publish(repo, src, keys, "--name", "web").stdout)
    assert again["digest"] == first["digest"]
    assert again["objects_uploaded"] == 0, again

    # reseal: the stranger in, the client out; no content re-sent
    n_before = sum(1 for p in (repo / "objects").rglob("*") if p.is_file())
    r = vfsd(
        "key", "reseal", "web", "--repo", str(repo), "--identity", str(keys["publisher"]),
        "--add", str(keys["stranger.pub"]), "--remove", str(keys["client.pub"]), "--json",
    )  # fmt: skip
    out = json.loads(r.stdout)
    assert len(out["recipients"]) == 3
    assert sum(1 for p in (repo / "objects").rglob("*") if p.is_file()) == n_before + 2
    assert _show(repo, keys["stranger"], "web", tmp_path).returncode == 0
    _one_line(_show(repo, keys["client"], "web", tmp_path), 12, "not sealed to identity")
    r = vfsd("key", "reseal", "web", "--repo", str(repo), "--identity", str(keys["publisher"]),
             check=False)  # fmt: skip
    _one_line(r, 2, "nothing to do")
    r = vfsd("key", "reseal", "web", "--repo", str(repo), "--identity", str(keys["client"]),
             "--add", str(keys["client.pub"]), check=False)  # fmt: skip
    _one_line(r, 12, "not sealed to identity")
    plain = tmp_path / "plain"
    plain.mkdir()
    (plain / "f").write_bytes(b"x")
    vfsd("template", "publish", str(plain), "--repo", str(repo), "--name", "p")
    r = vfsd("key", "reseal", "p", "--repo", str(repo), "--identity", str(keys["publisher"]),
             "--add", str(keys["client.pub"]), check=False)  # fmt: skip
    _one_line(r, 6, "not an encrypted")


def test_no_dedup_publish_opens_the_same(tmp_path, keys):
    repo = tmp_path / "repo"
    vfsd("repo", "init", str(repo))
    src = _src(tmp_path)
    a = json.loads(_publish(repo, src, keys, "--name", "a", "--no-dedup").stdout)
    b = json.loads(_publish(repo, src, keys, "--name", "b", "--no-dedup").stdout)
    assert a["digest"] == b["digest"]
    assert b["objects_uploaded"] == a["objects_uploaded"]  # nothing shared across refs
    for ref in ("a", "b"):
        r = _show(repo, keys["client"], ref, tmp_path)
        assert r.returncode == 0 and "secret.conf" in r.stdout, r.stderr


def _secret_file(path: Path, text: bytes) -> Path:
    path.write_bytes(text)
    os.chmod(path, 0o600)
    return path


def test_passphrase_protected_identity(tmp_path, keys):
    """An identity sealed under an scrypt key: no secret byte in the file; every command that
    loads it takes --passphrase-file; a missing or wrong passphrase is one line (exit 12)."""
    import base64
    import hashlib

    pw = _secret_file(tmp_path / "pw", b"correct horse battery\n")
    bad = _secret_file(tmp_path / "bad", b"correct horse battery staple\n")
    key = tmp_path / "protected.key"
    pub = vfsd("key", "gen", "-o", str(key), "--passphrase-file", str(pw),
               "--work-factor", "12").stdout.strip()  # fmt: skip
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    text = key.read_text()
    assert "VFS-ENCRYPTED-SECRET-KEY-1-" in text and "VFS-SECRET-KEY-1-" not in text
    assert vfsd("key", "show", str(key), "--passphrase-file", str(pw)).stdout.strip() == pub
    _one_line(vfsd("key", "show", str(key), check=False), 12, "passphrase-protected")
    r = vfsd("key", "show", str(key), "--passphrase-file", str(bad), check=False)
    _one_line(r, 12, "wrong passphrase")
    # it publishes and opens like any identity, given its passphrase
    repo, src = tmp_path / "repo", _src(tmp_path)
    vfsd("repo", "init", str(repo))
    base = ["template", "publish", str(src), "--repo", str(repo), "--name", "t",
            "--identity", str(key), "--encrypt-for", str(keys["client.pub"])]  # fmt: skip
    _one_line(vfsd(*base, check=False), 12, "give --passphrase-file")
    _one_line(vfsd(*base, "--passphrase-file", str(bad), check=False), 12, "wrong passphrase")
    assert vfsd(*base, "--passphrase-file", str(pw)).returncode == 0
    show = ["template", "show", "--repo", str(repo), "--identity", str(key),
            "--pins", str(tmp_path / "pins.json"), "t"]  # fmt: skip
    assert "etc/secret.conf" in vfsd(*show, "--passphrase-file", str(pw)).stdout
    _one_line(vfsd(*show, "--passphrase-file", str(bad), check=False), 12, "wrong passphrase")
    # a passphrase file readable by others is refused, as a key file is
    os.chmod(pw, 0o644)
    _one_line(vfsd(*show, "--passphrase-file", str(pw), check=False), 2, "chmod 600")
    # a changed byte fails the checksum; a hostile work factor is refused before scrypt runs
    line = next(ln for ln in text.splitlines() if ln.startswith("VFS-"))
    flipped = line[:40] + ("A" if line[40] != "A" else "B") + line[41:]
    bad_key = _secret_file(tmp_path / "flipped.key", (flipped + "\n").encode())
    r = vfsd("key", "show", str(bad_key), "--passphrase-file", str(bad), check=False)
    _one_line(r, 6, "checksum")
    prefix = "VFS-ENCRYPTED-SECRET-KEY-1-"
    raw = base64.urlsafe_b64decode(line[len(prefix) :] + "==")[:-4]
    raw = raw[:16] + bytes([30]) + raw[17:]  # 2^30: 1 TiB of scrypt memory
    check = hashlib.sha256(prefix.encode() + raw).digest()[:4]
    hostile = prefix + base64.urlsafe_b64encode(raw + check).decode().rstrip("=")
    hk = _secret_file(tmp_path / "hostile.key", (hostile + "\n").encode())
    r = vfsd("key", "show", str(hk), "--passphrase-file", str(bad), check=False)
    _one_line(r, 6, "work factor")
    # no passphrase for a keyring; an empty passphrase protects nothing
    r = vfsd("key", "gen", "--keyring", "-o", str(tmp_path / "r"), "--passphrase-file",
             str(bad), check=False)  # fmt: skip
    _one_line(r, 2, "keyring")
    empty = _secret_file(tmp_path / "empty", b"\n")
    r = vfsd("key", "gen", "-o", str(tmp_path / "e.key"), "--passphrase-file", str(empty),
             check=False)  # fmt: skip
    _one_line(r, 2, "empty")
    assert not (tmp_path / "e.key").exists()
