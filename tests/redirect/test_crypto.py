"""Encrypted objects, key files and sealed keys: round trips, every tampering, fuzzed parsers."""

from __future__ import annotations

import hashlib
import os
import stat

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vfs.errors import (
    AlreadyExists,
    DecryptionError,
    FormatError,
    IntegrityError,
    UnsupportedFeature,
    UsageError,
    VfsError,
)
from vfs.redirect import crypto
from vfs.redirect.keys import (
    Identity,
    Keyring,
    PublicKey,
    load_identity,
    load_keyring,
    load_public,
    write_secret,
)

SCOPE = bytes(range(32))


def _ctx(data: bytes, key: bytes | None = None, **kw) -> crypto.ObjectContext:
    args = {
        "key": key or hashlib.sha256(b"k" + data).digest(),
        "kind": crypto.CONTENT,
        "scope": SCOPE,
        "plain_oid": hashlib.sha256(data).hexdigest(),
        "size": len(data),
        "where": "object x",
    }
    args.update(kw)
    return crypto.ObjectContext(**args)


SIZES = [0, 1, 100, crypto.CHUNK - 1, crypto.CHUNK, crypto.CHUNK + 1, 3 * crypto.CHUNK + 7]


@pytest.mark.parametrize("n", SIZES)
def test_round_trip_in_memory_streaming_and_ranges(n):
    data = os.urandom(n)
    ctx = _ctx(data)
    sealed = crypto.seal_object(ctx, data)
    assert len(sealed) == crypto.cipher_size(n) == ctx.cipher_size
    assert crypto.plain_size(len(sealed)) == n
    assert crypto.open_object(ctx, sealed) == data
    # streaming in odd pieces
    d = crypto.Decryptor(ctx)
    out = b""
    for i in range(0, len(sealed), 7777):
        out += d.feed(sealed[i : i + 7777])
    assert out + d.finish() == data
    # the stream a publisher hands to the repository is the same bytes
    import io

    r = crypto.EncryptingReader(io.BytesIO(data), ctx)
    streamed = b""
    while b := r.read(10_000):
        streamed += b
    assert streamed == sealed

    # random access (keep-encrypted reads)
    def read(off: int, size: int) -> bytes:
        return sealed[off : off + size]

    for off, size in [(0, 10), (n // 2, 70_000), (max(0, n - 3), 10), (n, 5)]:
        assert crypto.read_range(ctx, read, off, size) == data[off : off + size]


def test_convergent_keys_are_per_keyring_and_deterministic():
    a, b = Keyring.generate(), Keyring.generate()
    oid = hashlib.sha256(b"same file").hexdigest()
    ka1 = crypto.convergent_key(a.secret, crypto.CONTENT, oid)
    assert ka1 == crypto.convergent_key(a.secret, crypto.CONTENT, oid)
    assert ka1 != crypto.convergent_key(b.secret, crypto.CONTENT, oid)
    data = b"same file"
    c1 = crypto.seal_object(_ctx(data, ka1, scope=a.id), data)
    c2 = crypto.seal_object(_ctx(data, ka1, scope=a.id), data)
    c3 = crypto.seal_object(
        _ctx(data, crypto.convergent_key(b.secret, crypto.CONTENT, oid), scope=b.id), data
    )
    assert c1 == c2 and c1 != c3  # stored once within a keyring, unlinked across keyrings


def _sealed(n: int = 3 * crypto.CHUNK + 5) -> tuple[bytes, crypto.ObjectContext, bytes]:
    data = os.urandom(n)
    ctx = _ctx(data)
    return data, ctx, crypto.seal_object(ctx, data)


@pytest.mark.parametrize(
    "attack",
    [
        "flip-body",
        "flip-tag",
        "flip-last",
        "truncate-boundary",
        "truncate-mid",
        "append",
        "swap-chunks",
        "drop-chunk",
    ],
)
def test_tampered_ciphertext_is_refused_before_a_byte(attack):
    data, ctx, sealed = _sealed()
    step = crypto.CHUNK + crypto.TAG
    b = bytearray(sealed)
    h = crypto.HEADER_SIZE
    if attack == "flip-body":
        b[h + 10] ^= 1
    elif attack == "flip-tag":
        b[h + step - 1] ^= 1
    elif attack == "flip-last":
        b[-1] ^= 1
    elif attack == "truncate-boundary":
        del b[h + 2 * step :]
    elif attack == "truncate-mid":
        del b[-5:]
    elif attack == "append":
        b += b"x"
    elif attack == "swap-chunks":
        c0, c1 = b[h : h + step], b[h + step : h + 2 * step]
        b[h : h + 2 * step] = c1 + c0
    elif attack == "drop-chunk":
        del b[h + step : h + 2 * step]
    with pytest.raises(DecryptionError) as ei:
        crypto.open_object(ctx, bytes(b))
    assert "object x" in str(ei.value)
    # streaming: the first chunk may pass only when it is untouched; never a tampered one
    d = crypto.Decryptor(ctx)
    out = b""
    with pytest.raises(DecryptionError):
        out += d.feed(bytes(b))
        out += d.finish()
    assert data.startswith(out)
    if attack in ("flip-body", "swap-chunks"):
        assert out == b""


@pytest.mark.parametrize("field", ["key", "scope", "plain_oid", "size", "kind"])
def test_wrong_key_or_associated_data_is_refused(field):
    data, ctx, sealed = _sealed(1000)
    other = {
        "key": os.urandom(32),
        "scope": os.urandom(32),
        "plain_oid": hashlib.sha256(b"another").hexdigest(),
        "size": 1000,
        "kind": crypto.INDEX,
    }[field]
    if field == "size":  # same length, other claim: a shorter object of the same ciphertext
        bad = crypto.ObjectContext(ctx.key, ctx.kind, ctx.scope, ctx.plain_oid, 999)
        with pytest.raises(DecryptionError):
            crypto.open_object(bad, sealed)
        return
    bad = crypto.ObjectContext(**{**ctx.__dict__, field: other})
    with pytest.raises(DecryptionError):
        crypto.open_object(bad, sealed)


def test_header_versions_and_flags():
    data, ctx, sealed = _sealed(10)
    for off, value, err in [
        (0, ord("X"), FormatError),
        (4, 2, UnsupportedFeature),
        (5, 9, UnsupportedFeature),
        (6, 40, FormatError),
        (7, 1, UnsupportedFeature),
    ]:
        b = bytearray(sealed)
        b[off] = value
        with pytest.raises(err):
            crypto.open_object(ctx, bytes(b))


def test_encrypting_reader_refuses_a_source_that_changed():
    import io

    data = os.urandom(100_000)
    ctx = _ctx(data)
    for src in (data[:-1] + b"x", data[:-1], data + b"y"):
        r = crypto.EncryptingReader(io.BytesIO(src), ctx)
        with pytest.raises(IntegrityError):
            while r.read(65536):
                pass


def test_sealed_keys_open_only_for_their_recipient():
    ident, other = Identity.generate(), Identity.generate()
    dk = os.urandom(32)
    epk, wrapped = crypto.seal_key(dk, ident.public.x25519)
    shared = ident.exchange(epk)
    assert crypto.open_key(shared, epk, ident.public.x25519, wrapped) == dk
    assert crypto.open_key(other.exchange(epk), epk, other.public.x25519, wrapped) is None
    bad = bytearray(wrapped)
    bad[0] ^= 1
    assert crypto.open_key(shared, epk, ident.public.x25519, bytes(bad)) is None
    with pytest.raises(FormatError):  # a low-order point: all-zero shared secret
        ident.exchange(bytes(32))


# --------------------------------------------------------------------------- key files


def test_key_files_round_trip_with_mode_0600(tmp_path):
    ident = Identity.generate()
    p = tmp_path / "id.key"
    write_secret(p, ident.to_text())
    assert stat.S_IMODE(p.stat().st_mode) == 0o600
    assert load_identity(p).public == ident.public
    assert load_public(str(p)) == ident.public
    assert load_public(str(ident.public)) == ident.public
    pub = tmp_path / "id.pub"
    pub.write_text(f"# a comment\n{ident.public}\n")
    assert load_public(str(pub)) == ident.public
    with pytest.raises(AlreadyExists):
        write_secret(p, Identity.generate().to_text())
    ring = Keyring.generate()
    write_secret(tmp_path / "ring", ring.to_text())
    assert load_keyring(tmp_path / "ring").id == ring.id
    assert "secret" not in repr(ident).lower() and str(ring.secret) not in repr(ring)


def test_unprotected_or_odd_key_files_are_refused(tmp_path):
    ident = Identity.generate()
    p = tmp_path / "id.key"
    write_secret(p, ident.to_text())
    os.chmod(p, 0o644)
    with pytest.raises(UsageError, match="0600"):
        load_identity(p)
    os.chmod(p, 0o600)
    os.symlink(p, tmp_path / "link")
    with pytest.raises(UsageError):
        load_identity(tmp_path / "link")
    big = tmp_path / "big"
    write_secret(big, "#" * 10_000)
    with pytest.raises(FormatError):
        load_identity(big)
    two = tmp_path / "two"
    write_secret(two, ident.to_text() + Identity.generate().to_text())
    with pytest.raises(FormatError, match="one key line"):
        load_identity(two)


def test_mistyped_public_keys_are_errors_not_other_keys():
    text = str(Identity.generate().public)
    i = len(text) // 2
    typo = text[:i] + ("A" if text[i] != "A" else "B") + text[i + 1 :]
    with pytest.raises(FormatError, match="checksum"):
        PublicKey.parse(typo)
    with pytest.raises(FormatError):
        PublicKey.parse(text[:-2])
    with pytest.raises(UnsupportedFeature):
        PublicKey.parse(text.replace("vfs-pub-1-", "vfs-pub-2-"))


# --------------------------------------------------------------------------- fuzzing

_fuzz = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@_fuzz
@given(st.text(max_size=300))
def test_fuzz_key_parsers(text):
    for parse in (PublicKey.parse, Identity.parse, Keyring.parse):
        try:
            parse(text)
        except VfsError:
            pass


@_fuzz
@given(st.binary(max_size=2000), st.integers(0, 3000))
def test_fuzz_encrypted_object_header_and_stream(raw, size):
    ctx = crypto.ObjectContext(bytes(32), crypto.CONTENT, SCOPE, None, size)
    try:
        crypto.parse_header(raw, "fuzz")
    except VfsError:
        pass
    d = crypto.Decryptor(ctx)
    with pytest.raises(VfsError):  # random bytes never authenticate
        d.feed(raw)
        d.finish()


@_fuzz
@given(st.data())
def test_fuzz_mutated_ciphertext_never_decrypts(data):
    plain, ctx, sealed = _sealed(data.draw(st.integers(0, 3 * crypto.CHUNK)))
    i = data.draw(st.integers(0, len(sealed) - 1))
    b = bytearray(sealed)
    b[i] ^= data.draw(st.integers(1, 255))
    with pytest.raises(VfsError):
        crypto.open_object(ctx, bytes(b))


@_fuzz
@given(st.data())
def test_fuzz_streaming_split_points(data):
    """Any split of the ciphertext into feeds (pieces shorter than the header, than a chunk,
    across chunk boundaries) gives back the plaintext, chunk by chunk."""
    plain, ctx, sealed = _sealed(data.draw(st.integers(0, 3 * crypto.CHUNK + 100)))
    cuts = sorted(data.draw(st.lists(st.integers(0, len(sealed)), max_size=12)))
    d = crypto.Decryptor(ctx)
    out = []
    prev = 0
    for c in [*cuts, len(sealed)]:
        piece = sealed[prev:c]
        out += d.feed_chunks(memoryview(piece) if data.draw(st.booleans()) else piece)
        prev = c
    assert all(len(c) == crypto.CHUNK for c in out)
    assert b"".join(out) + d.finish() == plain


@_fuzz
@given(st.data())
def test_fuzz_streaming_split_points_into_blocks(data):
    """``feed_block`` (decrypt_into one buffer per feed) gives back the same plaintext as
    ``feed_chunks`` for any split, and a tampered chunk stops it at that chunk."""
    plain, ctx, sealed = _sealed(data.draw(st.integers(0, 3 * crypto.CHUNK + 100)))
    cuts = sorted(data.draw(st.lists(st.integers(0, len(sealed)), max_size=12)))
    d = crypto.Decryptor(ctx)
    out = b""
    prev = 0
    for c in [*cuts, len(sealed)]:
        piece = sealed[prev:c]
        got = d.feed_block(memoryview(piece) if data.draw(st.booleans()) else piece)
        assert len(got) % crypto.CHUNK == 0
        out += got
        prev = c
    assert out + d.finish() == plain
    if len(sealed) > crypto.HEADER_SIZE + 2 * (crypto.CHUNK + crypto.TAG):
        bad = bytearray(sealed)
        bad[crypto.HEADER_SIZE + crypto.CHUNK + crypto.TAG + 5] ^= 1  # in chunk 1
        d = crypto.Decryptor(ctx)
        with pytest.raises(DecryptionError):
            d.feed_block(bytes(bad))
