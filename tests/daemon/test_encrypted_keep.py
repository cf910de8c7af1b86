"""`vfsd serve --keep-encrypted`: VEEs on encrypted templates whose objects stay ciphertext in
the local store and are decrypted on every read (issue 14, docs/encryption.md §9.1).

A real daemon over a real nginx with mutual TLS: the VEE reads the plain template's bytes; the
store holds no plaintext byte or name; the state directory's gc root names the stored
(ciphertext) ids, so `vfsd store gc` with the repository gone leaves everything the VEE reads;
a restart re-opens the refs from the state before any read; a byte changed in a stored
ciphertext (its checksum sidecar rewritten to match) reads as EIO with one log line naming the
object, never as wrong data; a restart with a key that does not open the template leaves the
VEE broken and its ciphertext rooted.
"""

from __future__ import annotations

import errno
import hashlib
import json
from pathlib import Path

import pytest

from tests.daemon.conftest import Daemon, fuse_available, vfsd
from tests.daemon.test_encrypted import (
    MARKER,
    SECRET_NAME,
    _grep,
    _keys,
    _publish,
    _rewrite,
    _tree,
    _tree_bytes,
    publish_plain_and_sealed,
)
from vfs.redirect import LocalStore
from vfs.redirect.crypto import cipher_size
from vfs.redirect.objfile import SumsBuilder

pytestmark = [pytest.mark.fuse, pytest.mark.network]


def _stored(store_dir: Path) -> set[str]:
    st = LocalStore(store_dir)
    try:
        return set(st.list())
    finally:
        st.close()


def _rooted(store_dir: Path) -> tuple[set[str], set[str]]:
    """(keep, cache) of every gc root of the store, read from its files."""
    keep: set[str] = set()
    cache: set[str] = set()
    for f in (store_dir / "roots").glob("*.json"):
        for s in json.loads(f.read_text())["sets"].values():
            keep |= set(s["keep"])
            cache |= set(s["cache"])
    return keep, cache


def _object_of_size(store_dir: Path, size: int) -> str:
    objects = (store_dir / "objects").rglob("*")
    hits = [p.name for p in objects if p.is_file() and p.stat().st_size == size]
    assert len(hits) == 1, hits
    return hits[0]


def _error_lines(d: Daemon) -> list[str]:
    return [ln for ln in d.log_text().splitlines() if "ERROR" in ln]


def test_keep_encrypted_vee(tmp_path, nginx, nginx_repo):
    reason = fuse_available()
    if reason:
        pytest.skip(reason)
    repo_dir, name = nginx_repo
    k = _keys(tmp_path)
    src, plain, _ = publish_plain_and_sealed(tmp_path, repo_dir, k)
    want = _tree_bytes(src)

    url = nginx.url(name, "mtls")
    tls = ["--ca", nginx.ca, "--cert", nginx.client_cert, "--key", nginx.client_key]
    d = Daemon(tmp_path, tmp_path / "state", tmp_path / "mnt", tmp_path / "store", repo_dir)
    d.remote_url = url
    d.engine = "auto"  # --keep-encrypted takes the FUSE engine, and says why
    keys = ["--identity", str(k["client"]), "--trust", str(k["publisher.pub"])]
    d.extra_args = [*tls, *keys, "--keep-encrypted"]
    d.mnt.mkdir()
    away = repo_dir.with_name(repo_dir.name + "-away")
    d.start()
    try:
        out = d.vee("add", "enc", "--template", f"{url}#web", "--json")
        assert json.loads(out.stdout)["template"] == plain["digest"]
        listing = d.vee("list").stdout
        assert listing.startswith("engine: fuse (--keep-encrypted: the kernel engine"), listing
        got = {p: (d.mnt / "enc" / p).read_bytes() for p in want}
        assert got == want

        # -- the store: the repository's ciphertext under its stored ids, nothing in the clear
        assert _grep(d.store, MARKER) == []
        assert _grep(d.store, SECRET_NAME.encode()) == []
        stored = _stored(d.store)
        in_repo = {p.name for p in (repo_dir / "objects").rglob("*") if p.is_file()}
        plain_ids = {hashlib.sha256(b).hexdigest() for b in want.values() if b}
        assert plain["digest"] not in stored and not plain_ids & stored
        assert stored and stored <= in_repo
        # the gc root names what the store holds: the manifest's ciphertext kept, the content's
        # cached (a repository can give it back), no plaintext id
        keep, cache = _rooted(d.store)
        assert stored <= keep | cache, stored - (keep | cache)
        assert not (keep | cache) & (plain_ids | {plain["digest"]})
        manifest_cipher = [o for o in keep if o in stored]
        assert len(manifest_cipher) == 1
    finally:
        d.stop()
    assert "Traceback" not in d.log_text(), d.log_text()

    # -- the repository goes away (nginx answers 404); store gc runs; a restart re-opens the
    # refs from the state and reads everything from the kept ciphertext
    junk = LocalStore(d.store)
    try:
        junk_id = junk.put(b"an object no root names\n")
    finally:
        junk.close()
    repo_dir.rename(away)
    try:
        d.start()
        try:
            r = vfsd("store", "gc", "--store", str(d.store), "--json")
            assert junk_id not in _stored(d.store), r.stdout  # the gc did evict
            assert stored <= _stored(d.store)
            got = {p: (d.mnt / "enc" / p).read_bytes() for p in want}
            assert got == want
        finally:
            d.stop()
        assert not _error_lines(d), d.log_text()

        # -- a byte changed in a stored ciphertext, its checksum sidecar rewritten to match
        # (what an attacker with the disk would do): the chunk's tag fails, EIO, one line
        big_plain = hashlib.sha256(want["big"]).hexdigest()
        big_cipher = _object_of_size(d.store, cipher_size(len(want["big"])))
        path = d.store / "objects" / big_cipher[:2] / big_cipher
        saved = path.read_bytes()
        bad = bytearray(saved)
        bad[len(bad) // 2] ^= 0x20
        _rewrite(path, bytes(bad))
        st = LocalStore(d.store)
        try:
            b = SumsBuilder(st.chunk_size)
            b.update(bytes(bad))
            st.write_sums(big_cipher, b.finish())
        finally:
            st.close()
        d.start()
        try:
            with pytest.raises(OSError) as ei:
                (d.mnt / "enc" / "big").read_bytes()
            assert ei.value.errno == errno.EIO
            # one line per failed request (the kernel retries a failed read-ahead once or
            # twice synchronously): the same line, naming the object and its stored copy
            errors = {ln.split(" ", 2)[2] for ln in _error_lines(d)}
            assert len(errors) == 1, d.log_text()
            (line,) = errors
            assert big_plain in line and big_cipher in line, line
            assert "chunk" in line and "does not authenticate" in line, line
            # the other files still read, from the store alone
            assert (d.mnt / "enc" / "cold").read_bytes() == want["cold"]
            assert (d.mnt / "enc" / "etc" / "motd").read_bytes() == want["etc/motd"]
        finally:
            d.stop()

        # -- a byte changed without the sidecar: the store's checksums drop the copy; with no
        # repository to fetch it again: EIO (never wrong data)
        _rewrite(path, saved)
        st = LocalStore(d.store)
        try:
            b = SumsBuilder(st.chunk_size)
            b.update(saved)
            st.write_sums(big_cipher, b.finish())
        finally:
            st.close()
        motd_cipher = _object_of_size(d.store, cipher_size(len(want["etc/motd"])))
        mpath = d.store / "objects" / motd_cipher[:2] / motd_cipher
        msaved = mpath.read_bytes()
        mbad = bytearray(msaved)
        mbad[3] ^= 0x01
        _rewrite(mpath, bytes(mbad))
        d.start()
        try:
            with pytest.raises(OSError) as ei:
                (d.mnt / "enc" / "etc" / "motd").read_bytes()
            assert ei.value.errno == errno.EIO
            assert (d.mnt / "enc" / "big").read_bytes() == want["big"]  # repaired above
        finally:
            d.stop()
        assert motd_cipher not in _stored(d.store)  # quarantined
    finally:
        away.rename(repo_dir)

    # -- the repository is back: the dropped copy is fetched again (ciphertext, decrypted on
    # read); a key that does not open the template leaves the VEE broken and its objects
    # rooted; the right key again serves it
    d.start()
    try:
        assert (d.mnt / "enc" / "etc" / "motd").read_bytes() == want["etc/motd"]
    finally:
        d.stop()
    assert motd_cipher in _stored(d.store)
    assert _grep(d.store, MARKER) == []
    d.extra_args = [*tls, "--identity", str(k["stranger"]), "--keep-encrypted"]
    d.start()
    try:
        v = json.loads(d.vee("list", "--json").stdout)
        assert [x["state"] for x in v] == ["broken"], v
        vfsd("store", "gc", "--store", str(d.store))
        assert stored <= _stored(d.store)
    finally:
        d.stop()
    d.extra_args = [*tls, *keys, "--keep-encrypted"]
    d.start()
    try:
        assert {p: (d.mnt / "enc" / p).read_bytes() for p in want} == want
    finally:
        d.stop()
    assert "Traceback" not in d.log_text(), d.log_text()


def test_keep_encrypted_flag_errors(tmp_path):
    """--keep-encrypted with the kernel engine, or without an identity: one line, exit 2."""
    k = _keys(tmp_path)
    (tmp_path / "mnt").mkdir()
    base = ["serve", "--state", str(tmp_path / "state"), "--mount", str(tmp_path / "mnt"),
            "--store", str(tmp_path / "store"), "--keep-encrypted"]  # fmt: skip
    r = vfsd(*base, "--engine", "kernel", "--identity", str(k["client"]), check=False)
    assert r.returncode == 2 and "needs the FUSE engine" in r.stderr, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
    r = vfsd(*base, "--engine", "fuse", check=False)
    assert r.returncode == 2 and "needs --identity" in r.stderr, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1


def test_keep_encrypted_without_repo_keeps_everything(tmp_path, nginx, nginx_repo):
    """No --repo (the template comes from its address alone): the ciphertext of every object
    is `keep` in the root, so even `vfsd store gc --target 0` with the repository gone leaves
    all of it, and a restarted daemon reads every file."""
    reason = fuse_available()
    if reason:
        pytest.skip(reason)
    repo_dir, name = nginx_repo
    k = _keys(tmp_path)
    src = tmp_path / "src"
    _tree(src)
    _publish(repo_dir, src, "web", k)
    want = _tree_bytes(src)
    url = nginx.url(name, "http")  # TLS options go with --repo only
    d = Daemon(tmp_path, tmp_path / "state", tmp_path / "mnt", tmp_path / "store", repo_dir)
    d.use_remote = False
    d.extra_args = ["--identity", str(k["client"]), "--keep-encrypted"]
    d.mnt.mkdir()
    d.start()
    try:
        d.vee("add", "enc", "--template", f"{url}#web")
        assert {p: (d.mnt / "enc" / p).read_bytes() for p in want} == want
        # a copy-up decrypts the template file into the VEE's private layer (its own data)
        with open(d.mnt / "enc" / "big", "r+b") as f:
            f.seek(10)
            f.write(b"CHANGED")
        assert (d.mnt / "enc" / "big").read_bytes() == want["big"][:10] + b"CHANGED" + want["big"][
            17:
        ]
        # an upgrade to a newer encrypted version: its new objects kept encrypted too
        (src / "etc" / "motd").write_bytes(b"version two, " + MARKER + b"\n")
        _publish(repo_dir, src, "web", k)
        d.vee("upgrade", "enc", "--template", f"{url}#web")
        assert (d.mnt / "enc" / "etc" / "motd").read_bytes() == b"version two, " + MARKER + b"\n"
        want["etc/motd"] = (src / "etc" / "motd").read_bytes()
        want["big"] = (d.mnt / "enc" / "big").read_bytes()
    finally:
        d.stop()
    stored = _stored(d.store)
    keep, cache = _rooted(d.store)
    assert not cache and keep and keep <= stored  # every object the VEE uses, local and kept
    assert len(stored - keep) == 2  # the first version's manifest and motd: garbage now
    away = repo_dir.with_name(repo_dir.name + "-away")
    repo_dir.rename(away)
    try:
        vfsd("store", "gc", "--store", str(d.store), "--target", "0")
        assert _stored(d.store) == keep
        d.start()
        try:
            assert {p: (d.mnt / "enc" / p).read_bytes() for p in want} == want
        finally:
            d.stop()
    finally:
        away.rename(repo_dir)
    assert "Traceback" not in d.log_text() and not _error_lines(d), d.log_text()
    assert _grep(d.store, MARKER) == []


def test_choose_engine_with_keep_encrypted(tmp_path):
    """The library's own check (serve() called without the CLI): auto takes fuse without
    probing the kernel, kernel is refused."""
    from vfs.daemon.serve import KEEP_ENCRYPTED_NEEDS_FUSE, choose_engine
    from vfs.errors import UsageError

    assert choose_engine("auto", tmp_path, keep_encrypted=True) == (
        "fuse",
        KEEP_ENCRYPTED_NEEDS_FUSE,
    )
    assert choose_engine("fuse", tmp_path, keep_encrypted=True)[0] == "fuse"
    with pytest.raises(UsageError, match="needs the FUSE engine"):
        choose_engine("kernel", tmp_path, keep_encrypted=True)
    assert not list(tmp_path.iterdir())  # no probe ran
