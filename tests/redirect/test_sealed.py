"""Sealed templates in a real file repository: signed refs, sealed indexes, pins, reseal.

Every attack is made as a hostile repository would make it (rewriting files in the repository
directory, storing forged objects and moving refs), and each must end in one VfsError naming
the ref or object, with no plaintext byte handed out and nothing stored locally.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from vfs.errors import (
    DecryptionError,
    FormatError,
    IntegrityError,
    NoKeyError,
    ReplayError,
    SignatureError,
    UnsupportedFeature,
    UsageError,
    VfsError,
)
from vfs.redirect import FileRemote, LocalStore, Resolver, crypto
from vfs.redirect.keys import Identity, Keyring
from vfs.redirect.objectid import shard
from vfs.redirect.sealed_refs import (
    _IHEAD,
    REF_HEAD,
    REF_MAGIC,
    Index,
    IndexEntry,
    Keys,
    PinStore,
    Stanza,
    encode_signed_ref,
    open_signed_ref,
    parse_index,
    parse_signed_ref,
)
from vfs.redirect.sealed_remote import (
    SealingRemote,
    UnsealingRemote,
    fetch_signed_ref,
    previous_ref,
    reseal,
)

MARKER = b"PLAINTEXT-MARKER-5d1e"
PUBLISHER = Identity.generate()
CLIENT = Identity.generate()
VE = Identity.generate()
STRANGER = Identity.generate()


class Repo:
    """A file repository holding one sealed template, and what was put in it."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.remote = FileRemote(root, create=True)
        self.files: dict[str, bytes] = {}

    def publish(
        self, files: list[bytes], name: str = "app", *, keyring=None, dedup=True
    ) -> SealingRemote:
        prev, counter = previous_ref(self.remote, name, Keys(identity=PUBLISHER))
        s = SealingRemote(
            self.remote,
            signer=PUBLISHER,
            recipients=[VE.public, CLIENT.public],
            keyring=(keyring or PUBLISHER.default_keyring()) if dedup else None,
            previous=prev,
            previous_counter=counter,
        )
        oids = [s.put(f) for f in files]
        self.files.update(zip(oids, files, strict=True))
        root = json.dumps({"objects": oids}).encode() + MARKER
        self.root_oid = s.put(root)
        self.files[self.root_oid] = root
        s.set_ref(name, self.root_oid)
        return s

    def path(self, oid: str) -> Path:
        return self.root / "objects" / shard(oid)

    def rewrite(self, oid: str, data: bytes) -> None:
        p = self.path(oid)
        os.chmod(p, 0o644)
        p.write_bytes(data)

    def ref_bytes(self, name: str = "app") -> tuple[str, bytes]:
        return fetch_signed_ref(self.remote, name)


def client(tmp: Path, identity: Identity | None = CLIENT, trust=True) -> UnsealingRemote:
    keys = Keys(
        identity=identity,
        trusted=(PUBLISHER.public,) if trust else (),
        pins=PinStore(tmp / "pins.json"),
    )
    return UnsealingRemote(None, keys)


FILES = [MARKER * 10, os.urandom(200_000) + MARKER, b"", b"a" * 1000, b"b" * 1000]


@pytest.fixture
def repo(tmp_path) -> Repo:
    r = Repo(tmp_path / "repo")
    r.publish(FILES)
    return r


def test_round_trip_and_the_repository_holds_no_plaintext(repo, tmp_path):
    u = client(tmp_path)
    assert u.resolve(repo.remote, "app") == repo.root_oid
    for oid, data in repo.files.items():
        assert u.get(oid, expected_size=len(data)) == data
    for p in repo.root.rglob("*"):
        if p.is_file():
            raw = p.read_bytes()
            assert MARKER not in raw, p
            assert all(oid.encode() not in raw for oid in repo.files), p
    # every recipient opens it, the signer included
    for who in (VE, PUBLISHER):
        assert client(tmp_path / who.public.fingerprint, who).resolve(repo.remote, "app")


def test_identical_files_stored_once_within_a_keyring_and_unlinked_across(tmp_path):
    a, b = Repo(tmp_path / "a"), Repo(tmp_path / "b")
    same = os.urandom(5000)
    a.publish([same, same + b"x"], "one")
    a.publish([same], "two")  # another template of the same keyring
    b.publish([same], "one", keyring=Keyring.generate())
    plain = hashlib.sha256(same).hexdigest()
    ca = {e.cipher_oid for s in ("one", "two") for e in _index(a, s).objects.values()}
    cb = {e.cipher_oid for e in _index(b, "one").objects.values()}
    assert _index(a, "one").objects[plain].cipher_oid == _index(a, "two").objects[plain].cipher_oid
    assert not ca & cb
    # --no-dedup: the same file twice, under unrelated keys and ids
    c = Repo(tmp_path / "c")
    c.publish([same], "x", dedup=False)
    c.publish([same], "y", dedup=False)
    assert _index(c, "x").objects[plain].cipher_oid != _index(c, "y").objects[plain].cipher_oid


def _index(r: Repo, name: str) -> Index:
    oid, data = r.ref_bytes(name)
    fetch = lambda i, n: r.remote.get(i, expected_size=n)  # noqa: E731
    return open_signed_ref(Keys(identity=PUBLISHER), data, oid, fetch, name=name, where="t").index


# --------------------------------------------------------------------------- content objects


def _fetch_refused(repo: Repo, tmp: Path, oid: str, err: type[VfsError]) -> VfsError:
    """Fetching ``oid`` through a resolver fails with ``err`` and stores nothing."""
    u = client(tmp)
    u.resolve(repo.remote, "app")
    store = LocalStore(tmp / "store")
    try:
        res = Resolver(store, u)
        with pytest.raises(err) as ei:
            res.ensure(oid, expected_size=len(repo.files[oid]))
        assert not store.has(oid)
        assert [p for p in (tmp / "store" / "objects").rglob("*") if p.is_file()] == []
    finally:
        store.close()
    assert oid in str(ei.value)
    assert MARKER.decode() not in str(ei.value)
    return ei.value


def _entry(repo: Repo, oid: str) -> IndexEntry:
    e = _index(repo, "app").get(oid)
    assert e is not None
    return e


@pytest.mark.parametrize("where", ["header", "first", "last"])
def test_flipped_byte_in_a_stored_object_is_refused(repo, tmp_path, where):
    oid = hashlib.sha256(FILES[1]).hexdigest()
    e = _entry(repo, oid)
    raw = bytearray(repo.path(e.cipher_oid).read_bytes())
    i = {"header": 4, "first": crypto.HEADER_SIZE + 3, "last": len(raw) - 1}[where]
    raw[i] ^= 0x01
    repo.rewrite(e.cipher_oid, bytes(raw))
    err = _fetch_refused(repo, tmp_path, oid, VfsError)
    assert isinstance(err, (DecryptionError, UnsupportedFeature)), err


def test_truncated_object_is_refused(repo, tmp_path):
    oid = hashlib.sha256(FILES[1]).hexdigest()
    e = _entry(repo, oid)
    repo.rewrite(e.cipher_oid, repo.path(e.cipher_oid).read_bytes()[: -crypto.TAG - 1])
    _fetch_refused(repo, tmp_path, oid, IntegrityError)  # short of its size: refused unread


def test_swapped_object_is_refused(repo, tmp_path):
    # two objects of one size: the server hands one's ciphertext out as the other's
    a, b = (hashlib.sha256(f).hexdigest() for f in FILES[3:5])
    ea, eb = _entry(repo, a), _entry(repo, b)
    assert ea.cipher_size == eb.cipher_size
    repo.rewrite(ea.cipher_oid, repo.path(eb.cipher_oid).read_bytes())
    err = _fetch_refused(repo, tmp_path, a, DecryptionError)
    assert "does not authenticate" in str(err)


def test_object_sealed_in_another_scope_is_refused(tmp_path):
    # the same file in two keyrings: one's ciphertext never opens as the other's
    a, b = Repo(tmp_path / "a"), Repo(tmp_path / "b")
    a.publish(FILES)
    b.publish(FILES, keyring=Keyring.generate())
    oid = hashlib.sha256(FILES[0]).hexdigest()
    a.rewrite(_entry(a, oid).cipher_oid, b.path(_entry(b, oid).cipher_oid).read_bytes())
    _fetch_refused(a, tmp_path, oid, DecryptionError)


# --------------------------------------------------------------------------- signed refs


def _store_forged(repo: Repo, data: bytes, name: str = "app") -> None:
    repo.remote.set_ref(name, repo.remote.put(data))


def _refused(repo: Repo, tmp: Path, err: type[VfsError], name: str = "app", **kw) -> str:
    u = client(tmp, **kw)
    with pytest.raises(err) as ei:
        u.resolve(repo.remote, name)
    msg = str(ei.value)
    assert f"ref {name!r}" in msg and "\n" not in msg, msg
    assert not u.opened
    return msg


def test_flipped_byte_of_a_signed_ref_in_place(repo, tmp_path):
    oid, data = repo.ref_bytes()
    b = bytearray(data)
    b[len(b) // 2] ^= 1
    repo.rewrite(oid, bytes(b))
    assert "does not match its id" in _refused(repo, tmp_path, DecryptionError)


@pytest.mark.parametrize(
    "region", ["magic", "version", "flags", "length", "body", "mac", "signer", "sig"]
)
def test_every_field_of_a_signed_ref_is_covered(repo, tmp_path, region):
    """A hostile repository stores an altered signed ref under its new id and points the ref
    at it: no change of any byte gets through."""
    _, data = repo.ref_bytes()
    n = REF_HEAD.unpack_from(data)[3]
    end = REF_HEAD.size + n
    i = {
        "magic": 0,
        "version": 9,
        "flags": 11,
        "length": 15,
        "body": REF_HEAD.size + n // 2,
        "mac": end + 5,
        "signer": end + 32 + 40,
        "sig": len(data) - 7,
    }[region]
    b = bytearray(data)
    b[i] ^= 0x04
    _store_forged(repo, bytes(b))
    _refused(repo, tmp_path, VfsError)


def _body(data: bytes) -> dict:
    n = REF_HEAD.unpack_from(data)[3]
    return json.loads(data[REF_HEAD.size : REF_HEAD.size + n])


def _resign(data: bytes, body: dict, signer: Identity, mac: bytes | None = None) -> bytes:
    """A signed ref with ``body``, the original MAC (or ``mac``), signed by ``signer``."""
    n = REF_HEAD.unpack_from(data)[3]
    raw = json.dumps(body, sort_keys=True, separators=(",", ":")).encode()
    signed = REF_HEAD.pack(REF_MAGIC, 1, 0, len(raw)) + raw
    head = signed + (mac or data[REF_HEAD.size + n : REF_HEAD.size + n + 32]) + signer.public.raw
    from vfs.redirect.sealed_refs import _SIG_CONTEXT

    return head + signer.sign(_SIG_CONTEXT + head)


def test_ref_signed_by_another_key_is_refused_when_trust_is_set(repo, tmp_path):
    _, data = repo.ref_bytes()
    _store_forged(repo, _resign(data, _body(data), STRANGER))
    assert "not by a trusted publisher" in _refused(repo, tmp_path, SignatureError)


def test_header_mac_stops_a_resigned_ref_even_without_trust(repo, tmp_path):
    """Without --trust anyone may sign, but nobody without the data key can change what a
    sealed ref says: here a stranger points the ref at another index and re-signs it."""
    _, data = repo.ref_bytes()
    body = _body(data)
    other = repo.remote.put(crypto.seal_object(_ctx_any(), b"x" * 10))
    body["index"] = {"id": other, "size": crypto.cipher_size(10)}
    _store_forged(repo, _resign(data, body, STRANGER))
    assert "header MAC" in _refused(repo, tmp_path, SignatureError, trust=False)


def _ctx_any() -> crypto.ObjectContext:
    return crypto.ObjectContext(os.urandom(32), crypto.INDEX, bytes(32), None, 10)


def test_signed_ref_under_another_name_is_refused(repo, tmp_path):
    oid, _ = repo.ref_bytes()
    repo.remote.set_ref("admin", oid)
    assert "swapped ref" in _refused(repo, tmp_path, SignatureError, name="admin")


def test_unsigned_ref_is_refused_when_trust_is_set(repo, tmp_path):
    repo.remote.set_ref("plain", repo.remote.put(b'{"plain": "manifest"}'))
    assert "not a signed ref" in _refused(repo, tmp_path, SignatureError, name="plain")


def test_wrong_or_missing_key(repo, tmp_path):
    msg = _refused(repo, tmp_path, NoKeyError, identity=STRANGER)
    assert STRANGER.public.fingerprint in msg and "reseal" in msg
    assert "give --identity" in _refused(repo, tmp_path, NoKeyError, identity=None)


# --------------------------------------------------------------------------- sealed index


def test_flipped_byte_in_the_stored_index_is_refused(repo, tmp_path):
    oid, data = repo.ref_bytes()
    sr = parse_signed_ref(data, "t")
    raw = bytearray(repo.path(sr.index_id).read_bytes())
    raw[len(raw) // 2] ^= 1
    repo.rewrite(sr.index_id, bytes(raw))
    _refused(repo, tmp_path, IntegrityError)  # its id does not match
    # and where no hash is checked, the AEAD is: the index never opens
    with pytest.raises(DecryptionError, match="does not authenticate"):
        open_signed_ref(
            client(tmp_path).keys, data, oid, lambda i, n: bytes(raw), name="app", where="t"
        )


@pytest.mark.parametrize("cut", [1, crypto.TAG, 100])
def test_truncated_index_is_refused(repo, tmp_path, cut):
    oid, data = repo.ref_bytes()
    sr = parse_signed_ref(data, "t")
    raw = repo.path(sr.index_id).read_bytes()
    with pytest.raises(DecryptionError):
        open_signed_ref(
            client(tmp_path).keys, data, oid, lambda i, n: raw[:-cut], name="app", where="t"
        )


# --------------------------------------------------------------------------- replay pins


def test_replayed_older_ref_is_refused_where_a_newer_one_is_pinned(repo, tmp_path):
    old_oid, old_data = repo.ref_bytes()
    assert client(tmp_path).resolve(repo.remote, "app") == repo.root_oid
    repo.publish([*FILES, b"version two"])
    new_root = repo.root_oid
    assert client(tmp_path).resolve(repo.remote, "app") == new_root  # pins the new one
    repo.remote.set_ref("app", old_oid)
    msg = _refused(repo, tmp_path, ReplayError)
    assert "replayed older version" in msg
    # another client (no pin yet) takes the old one: pins are per client, as documented
    assert client(tmp_path / "fresh").resolve(repo.remote, "app") != new_root

    # a fork: another ref signed by the publisher with the pinned counter (two hosts
    # publishing in the same millisecond, or a publisher key used to equivocate)
    fetch = lambda i, n: repo.remote.get(i, expected_size=n)  # noqa: E731
    op = open_signed_ref(
        Keys(identity=PUBLISHER), old_data, old_oid, fetch, name="app", where="t", pin=False
    )
    sr = op.signed
    fork = encode_signed_ref(
        ref="app",
        counter=sr.counter,
        when=sr.time + 1,
        kind=sr.kind,
        scope=sr.scope,
        index_id=sr.index_id,
        index_size=sr.index_size,
        stanzas=sr.stanzas,
        data_key=op.data_key,
        signer=PUBLISHER,
    )
    _store_forged(repo, fork)
    assert "forked ref" in _refused(repo, tmp_path / "fresh", ReplayError)


def test_pins_are_durable_and_their_file_is_checked(tmp_path):
    p = tmp_path / "pins.json"
    p.write_bytes(b'{"format": "vfs-pins", "pins": {"x/y": {"counter": "1", "id": "z"}}}')
    with pytest.raises(FormatError, match="malformed pin"):
        PinStore(p).get("x", "y")
    p.write_bytes(b"\xff" * 10)
    with pytest.raises(FormatError):
        PinStore(p).get("x", "y")


# --------------------------------------------------------------------------- reseal


def test_reseal_rewraps_without_touching_content(repo, tmp_path):
    before = set(repo.remote.iter_oids())
    keys = Keys(identity=PUBLISHER)
    _, ref_id, recipients = reseal(
        repo.remote, "app", keys, add=[STRANGER.public], remove=[CLIENT.public]
    )
    after = set(repo.remote.iter_oids())
    assert len(after - before) == 2  # a new index and a new signed ref, no content
    assert {r.raw for r in recipients} == {k.public.raw for k in (PUBLISHER, VE, STRANGER)}
    assert client(tmp_path / "s", STRANGER).resolve(repo.remote, "app") == repo.root_oid
    _refused(repo, tmp_path / "c", NoKeyError)  # the removed client
    # removing a key that is no recipient is an error, not a silent no-op
    with pytest.raises(UsageError, match="not a recipient"):
        reseal(repo.remote, "app", keys, add=[], remove=[CLIENT.public])


# --------------------------------------------------------------------------- fuzzing

_fuzz = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
_REF = None


def _valid_ref() -> tuple[bytes, bytes]:
    """A valid signed ref and its data key (built once)."""
    global _REF
    if _REF is None:
        key = os.urandom(32)
        stanzas = [Stanza(*crypto.seal_key(key, CLIENT.public.x25519))]
        data = encode_signed_ref(
            ref="app",
            counter=5,
            when=1_700_000_000,
            kind="template",
            scope=bytes(32),
            index_id="ab" * 32,
            index_size=crypto.cipher_size(_IHEAD.size),
            stanzas=stanzas,
            data_key=key,
            signer=PUBLISHER,
        )
        _REF = (data, key)
    return _REF


@_fuzz
@given(st.binary(max_size=3000))
def test_fuzz_signed_ref_parser_random(raw):
    for data in (raw, REF_MAGIC + raw, REF_HEAD.pack(REF_MAGIC, 1, 0, len(raw)) + raw):
        try:
            parse_signed_ref(data, "fuzz")
        except VfsError:
            pass


_json = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=70) | st.floats(),
    lambda c: st.lists(c, max_size=4) | st.dictionaries(st.text(max_size=8), c, max_size=4),
    max_leaves=12,
)


@_fuzz
@given(
    st.sampled_from(
        ["ref", "counter", "time", "kind", "suite", "scope", "index", "stanzas", "extra"]
    ),
    _json,
)
def test_fuzz_signed_ref_fields(field, value):
    """Every field of the body replaced by any JSON value: the parser accepts only what is
    well typed, and whatever it accepts, the signature refuses."""
    data, _ = _valid_ref()
    body = _body(data)
    body[field] = value
    forged = _resign(data, body, STRANGER)
    try:
        sr = parse_signed_ref(forged, "fuzz")
    except VfsError:
        return
    keys = Keys(identity=CLIENT, trusted=(PUBLISHER.public,))
    with pytest.raises(VfsError):
        open_signed_ref(
            keys, forged, hashlib.sha256(forged).hexdigest(), None, name=sr.ref, where="f"
        )


@_fuzz
@given(st.data())
def test_fuzz_mutated_signed_ref_never_opens(data):
    raw, _ = _valid_ref()
    b = bytearray(raw)
    for _ in range(data.draw(st.integers(1, 3))):
        i = data.draw(st.integers(0, len(b) - 1))
        b[i] ^= data.draw(st.integers(1, 255))
    if data.draw(st.booleans()):
        b = b[: data.draw(st.integers(0, len(b)))]
    forged = bytes(b)
    assume(forged != raw)  # two flips of one byte may cancel out
    keys = Keys(identity=CLIENT)
    with pytest.raises(VfsError):
        open_signed_ref(
            keys,
            forged,
            hashlib.sha256(forged).hexdigest(),
            lambda i, n: pytest.fail("a forged ref reached its index"),
            name="app",
            where="f",
        )


def _valid_index(n: int) -> bytes:
    e = [
        IndexEntry(hashlib.sha256(bytes([i])).hexdigest(), "cd" * 32, bytes(32), i * 1000)
        for i in range(n)
    ]
    root = IndexEntry("ef" * 32, "01" * 32, bytes(32), 77)
    return Index(
        crypto.MANIFEST, 1, bytes(32), root, [CLIENT.public], {x.plain_oid: x for x in e}
    ).encode()


@pytest.mark.parametrize(
    "off,value,err",
    [
        (0, ord("X"), FormatError),  # magic
        (9, 2, UnsupportedFeature),  # version
        (11, 1, UnsupportedFeature),  # flags
        (12, 9, FormatError),  # root kind
        (13, 9, FormatError),  # key mode
        (14, 1, FormatError),  # reserved
        (155, 2, FormatError),  # recipients: length no longer matches
        (159, 9, FormatError),  # objects: length no longer matches
    ],
)
def test_index_header_fields_are_checked(off, value, err):
    raw = bytearray(_valid_index(3))
    assert parse_index(bytes(raw), "t").objects
    raw[off] = value
    with pytest.raises(err):
        parse_index(bytes(raw), "t")


def test_index_records_must_be_sorted_and_unique():
    raw = _valid_index(3)
    start = _IHEAD.size + 64
    recs = [raw[start + i * 104 : start + (i + 1) * 104] for i in range(3)]
    for bad in ([recs[1], recs[0], recs[2]], [recs[0], recs[0], recs[2]]):
        with pytest.raises(FormatError, match="sorted and unique"):
            parse_index(raw[:start] + b"".join(bad), "t")


@_fuzz
@given(st.data())
def test_fuzz_index_parser(data):
    n = data.draw(st.integers(0, 5))
    raw = bytearray(_valid_index(n))
    how = data.draw(st.sampled_from(["flip", "cut", "grow", "random"]))
    if how == "flip":
        i = data.draw(st.integers(0, len(raw) - 1))
        raw[i] ^= data.draw(st.integers(1, 255))
    elif how == "cut":
        del raw[data.draw(st.integers(0, len(raw) - 1)) :]
    elif how == "grow":
        raw += data.draw(st.binary(min_size=1, max_size=200))
    else:
        raw = bytearray(data.draw(st.binary(max_size=600)))
    try:
        idx = parse_index(bytes(raw), "fuzz")
    except VfsError:
        return
    # whatever parses round-trips and names only sane objects
    assert idx.encode() == bytes(raw)
    assert len(idx.objects) <= n + 1


@_fuzz
@given(st.binary(max_size=500) | _json.map(lambda v: json.dumps(v).encode()))
def test_fuzz_pin_file(raw):
    p = Path(os.environ.get("TMPDIR", "/tmp")) / f"vfs-fuzz-pins-{os.getpid()}.json"
    try:
        p.write_bytes(raw)
        PinStore(p).get("a", "b")
    except VfsError:
        pass
    finally:
        p.unlink(missing_ok=True)
        p.with_name(p.name + ".lock").unlink(missing_ok=True)
