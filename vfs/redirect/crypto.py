"""Encrypted objects: one AEAD stream per object, and the keys that open them.

Everything here composes primitives of the ``cryptography`` package (AES-256-GCM, X25519,
HKDF-SHA256, HMAC-SHA256); the format and every choice are in docs/encryption.md. In short:

- An encrypted object is an 8-byte header, then the plaintext in 64 KiB chunks, each sealed by
  AES-256-GCM with its own 16-byte tag (age's STREAM construction): chunk ``i``'s nonce is
  ``i`` as 11 big-endian bytes and one byte that is 1 for the last chunk, 0 otherwise. Every
  object has its own key, so a nonce never repeats under a key; the last-chunk flag makes a
  truncation at a chunk boundary fail like any other damage.
- The associated data of every chunk is the header, the object's *kind* (content or index),
  the *scope* (the keyring or template the object belongs to), its plaintext id
  (SHA-256 of the plaintext, the id manifests and images name it by) and its plaintext length:
  an object served in place of another, or cut short, does not authenticate.
- The object id in the repository stays SHA-256 of the stored (encrypted) bytes, so proxies,
  ``repo`` checks and garbage collection need no key.

:class:`ObjectContext` names one object; :func:`seal_object` / :class:`EncryptingReader` write
one, :class:`Decryptor` (streaming) and :func:`read_range` (random access) read one.
"""

from __future__ import annotations

import hashlib
import hmac
import struct
from collections.abc import Callable
from dataclasses import dataclass
from typing import BinaryIO

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.hashes import SHA256
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from vfs.errors import DecryptionError, FormatError, IntegrityError, UnsupportedFeature

MAGIC = b"VFSE"
VERSION = 1
ALG_AES256GCM = 1
#: log2 of the plaintext chunk size: 64 KiB (age's choice; 0.02% of tags, one FUSE read or two).
CHUNK_SHIFT = 16
CHUNK = 1 << CHUNK_SHIFT
#: Chunk sizes a reader accepts (4 KiB .. 16 MiB): room for a writer that picks another.
MIN_SHIFT, MAX_SHIFT = 12, 24
TAG = 16
HEADER = struct.Struct(">4sBBBB")  # magic, version, algorithm, chunk shift, flags (0)
HEADER_SIZE = HEADER.size
_MAX_CHUNKS = 1 << 88  # 11-byte counter

# Kinds of encrypted objects, in the associated data only (the repository cannot tell them
# apart): content (files, clusters, and a template's root, which its index names by id) and
# the index. MANIFEST and IMAGE type an index's root; they never key or bind an object.
CONTENT = 1
MANIFEST = 2
INDEX = 3
IMAGE = 4

_AAD_LABEL = b"vfs-object-v1\0"
_ZERO_ID = bytes(32)


def header(shift: int = CHUNK_SHIFT) -> bytes:
    return HEADER.pack(MAGIC, VERSION, ALG_AES256GCM, shift, 0)


def parse_header(raw: bytes, where: str) -> int:
    """Validate an encrypted object's header; return its chunk shift."""
    if len(raw) < HEADER_SIZE:
        raise DecryptionError(f"{where}: truncated ciphertext (no header)")
    magic, version, alg, shift, flags = HEADER.unpack_from(raw)
    if magic != MAGIC:
        raise FormatError(f"{where}: not an encrypted vfs object (magic {magic!r})")
    if version != VERSION:
        raise UnsupportedFeature(f"{where}: encrypted object version {version} unknown")
    if alg != ALG_AES256GCM:
        raise UnsupportedFeature(f"{where}: encryption algorithm {alg} unknown")
    if not MIN_SHIFT <= shift <= MAX_SHIFT:
        raise FormatError(f"{where}: invalid chunk size 2^{shift}")
    if flags:
        raise UnsupportedFeature(f"{where}: unknown encrypted object flags {flags:#x}")
    return shift


def chunks_of(size: int, shift: int = CHUNK_SHIFT) -> int:
    """Number of chunks of a ``size``-byte plaintext (an empty one still has its final chunk)."""
    return max(1, -(-size // (1 << shift)))


def cipher_size(size: int, shift: int = CHUNK_SHIFT) -> int:
    """Bytes of the encrypted object of a ``size``-byte plaintext."""
    return HEADER_SIZE + size + TAG * chunks_of(size, shift)


def plain_size(csize: int, shift: int = CHUNK_SHIFT) -> int | None:
    """The plaintext length of a ``csize``-byte encrypted object, or None if none has it."""
    body = csize - HEADER_SIZE
    step = (1 << shift) + TAG
    if body < TAG:
        return None
    full, rest = divmod(body, step)
    if rest == 0:
        n = full * (1 << shift)
    elif rest >= TAG:
        n = full * (1 << shift) + rest - TAG
    else:
        return None
    return n if cipher_size(n, shift) == csize else None


def derive(key: bytes, label: bytes, length: int = 32) -> bytes:
    """HKDF-SHA256 of ``key`` for one purpose (every key has exactly one use)."""
    return HKDF(SHA256(), length, None, b"vfs v1 " + label).derive(key)


def convergent_key(keyring_secret: bytes, kind: int, plain_oid: str) -> bytes:
    """The key of an object within a keyring: a function of the keyring's secret and the
    plaintext's id, so identical plaintexts in one keyring encrypt identically (stored once)
    and nothing links them across keyrings; without the secret, no key can be guessed from a
    file (borg keys its chunk ids the same way, with a secret MAC key)."""
    msg = b"vfs convergent key v1\0" + bytes([kind]) + bytes.fromhex(plain_oid)
    return hmac.new(keyring_secret, msg, hashlib.sha256).digest()


@dataclass(frozen=True)
class ObjectContext:
    """What an encrypted object is bound to: its key and its associated data."""

    key: bytes
    kind: int
    scope: bytes  # 32 bytes: the keyring id (dedup) or the template's scope (--no-dedup)
    plain_oid: str | None  # SHA-256 hex of the plaintext; None for an index (ids nothing)
    size: int  # plaintext bytes
    where: str = "object"

    def aad(self, shift: int) -> bytes:
        oid = _ZERO_ID if self.plain_oid is None else bytes.fromhex(self.plain_oid)
        return (
            header(shift)
            + _AAD_LABEL
            + bytes([self.kind])
            + self.scope
            + oid
            + self.size.to_bytes(8, "big")
        )

    @property
    def cipher_size(self) -> int:
        return cipher_size(self.size)


def _nonce(i: int, last: bool) -> bytes:
    return i.to_bytes(11, "big") + (b"\x01" if last else b"\x00")


def seal_object(ctx: ObjectContext, data: bytes | memoryview) -> bytes:
    """The encrypted object of ``data`` (held in memory)."""
    if len(data) != ctx.size:
        raise IntegrityError(f"{ctx.where}: {len(data)} bytes where {ctx.size} were announced")
    aead = AESGCM(ctx.key)
    aad = ctx.aad(CHUNK_SHIFT)
    n = chunks_of(ctx.size)
    mv = memoryview(data)
    parts = [header()]
    for i in range(n):
        parts.append(aead.encrypt(_nonce(i, i == n - 1), mv[i * CHUNK : (i + 1) * CHUNK], aad))
    return b"".join(parts)


class EncryptingReader:
    """A read-once file whose bytes are the encrypted object of ``src`` (for ``put_stream``).

    The plaintext is hashed as it passes: a source that is not ``ctx.size`` bytes long or does
    not hash to ``ctx.plain_oid`` raises IntegrityError before the last byte is handed out, so
    the repository never installs the object (it renames only after reading to EOF)."""

    def __init__(self, src: BinaryIO, ctx: ObjectContext) -> None:
        self._src = src
        self._ctx = ctx
        self._aead = AESGCM(ctx.key)
        self._aad = ctx.aad(CHUNK_SHIFT)
        self._n = chunks_of(ctx.size)
        self._i = 0
        self._hash = hashlib.sha256()
        self._buf = bytearray(header())
        self._done = False

    def _next_chunk(self) -> None:
        want = CHUNK if self._i < self._n - 1 else self._ctx.size - CHUNK * (self._n - 1)
        data = _read_exactly(self._src, want)
        if len(data) != want:
            raise IntegrityError(f"{self._ctx.where}: source ended early (changed while read)")
        self._hash.update(data)
        last = self._i == self._n - 1
        if last:
            if self._src.read(1):
                raise IntegrityError(f"{self._ctx.where}: source grew while it was read")
            if self._ctx.plain_oid is not None and self._hash.hexdigest() != self._ctx.plain_oid:
                raise IntegrityError("a source file changed while it was being published")
            self._done = True
        self._buf += self._aead.encrypt(_nonce(self._i, last), data, self._aad)
        self._i += 1

    def read(self, n: int = -1) -> bytes:
        while not self._done and (n < 0 or len(self._buf) < n):
            self._next_chunk()
        if n < 0 or n >= len(self._buf):
            out = bytes(self._buf)
            self._buf.clear()
            return out
        out = bytes(self._buf[:n])
        del self._buf[:n]
        return out


def _read_exactly(f: BinaryIO, n: int) -> bytes:
    parts = []
    while n > 0:
        b = f.read(n)
        if not b:
            break
        parts.append(b)
        n -= len(b)
    return b"".join(parts)


#: ``decrypt_into`` (cryptography >= 45): decrypt into a caller's buffer.
_HAS_INTO = hasattr(AESGCM, "decrypt_into")


class Decryptor:
    """Streaming decryption of one encrypted object: :meth:`feed` ciphertext in any pieces,
    get back the plaintext of every chunk that authenticated; :meth:`finish` checks the end.

    A chunk is handed out only after its tag verified, so a tampered byte stops the stream at
    its chunk; the caller (the resolver) stores nothing until the object is complete and its
    plaintext hashes to its id."""

    def __init__(self, ctx: ObjectContext) -> None:
        self.ctx = ctx
        self._aead = AESGCM(ctx.key)
        self._buf = bytearray()
        self._shift: int | None = None
        self._aad = b""
        self._i = 0
        self._n = 0
        self._step = 0
        self.received = 0

    def _fail(self, why: str) -> DecryptionError:
        return DecryptionError(f"{self.ctx.where}: {why}; refused, nothing served")

    def _open(self, i: int, chunk: bytes | bytearray | memoryview) -> bytes:
        try:
            return self._aead.decrypt(_nonce(i, i == self._n - 1), chunk, self._aad)
        except InvalidTag:
            raise self._fail(
                f"chunk {i} does not authenticate (wrong key, or tampered, swapped or "
                "damaged ciphertext)"
            ) from None

    def feed(self, data: bytes | memoryview) -> bytes:
        """The plaintext of every chunk ``data`` completes, in one string."""
        out = self.feed_chunks(data)
        return out[0] if len(out) == 1 else b"".join(out)

    def _past_header(self, data: bytes | memoryview) -> memoryview | None:
        """Count ``data`` in and start on the stream header once it is whole: the bytes after
        it (None while the header is still incomplete, buffered)."""
        self.received += len(data)
        if self.received > self.ctx.cipher_size:
            raise self._fail("more ciphertext than the object has")
        mv = memoryview(data)
        if self._shift is not None:
            return mv
        if not self._buf and len(mv) >= HEADER_SIZE:
            self._start(bytes(mv[:HEADER_SIZE]))
            return mv[HEADER_SIZE:]
        self._buf += mv
        if len(self._buf) < HEADER_SIZE:
            return None
        self._start(bytes(self._buf[:HEADER_SIZE]))
        rest = memoryview(bytes(self._buf[HEADER_SIZE:]))
        self._buf = bytearray()
        return rest

    def feed_chunks(self, data: bytes | memoryview) -> list[bytes]:
        """:meth:`feed`, each chunk's plaintext apart: no joined copy (on this project's
        paravirtual machines a fresh large buffer costs a page fault per 4 KiB)."""
        mv = self._past_header(data)
        if mv is None:
            return []
        # Every chunk but the last is full: open each as soon as it is complete, straight from
        # the caller's buffer (only a chunk split across two feeds is copied).
        out = []
        if self._buf and self._i < self._n - 1:
            need = self._step - len(self._buf)
            if len(mv) < need:
                self._buf += mv
                return []
            self._buf += mv[:need]
            mv = mv[need:]
            out.append(self._open(self._i, self._buf))
            self._i += 1
            self._buf = bytearray()
        while self._i < self._n - 1 and len(mv) >= self._step:
            out.append(self._open(self._i, mv[: self._step]))
            mv = mv[self._step :]
            self._i += 1
        if mv:
            self._buf += mv
        return out

    def feed_block(self, data: bytes | memoryview) -> bytearray | bytes:
        """:meth:`feed`, the plaintext of every chunk ``data`` completes decrypted straight
        into one fresh buffer (``decrypt_into``: no per-chunk string, no joined copy, one
        write and one hash update downstream per block instead of one per 64 KiB chunk)."""
        if not _HAS_INTO:
            return self.feed(data)
        mv = self._past_header(data)
        if mv is None:
            return b""
        step, plain = self._step, self._step - TAG
        full = self._n - 1 - self._i  # chunks before the last one still to open
        have = len(self._buf) + len(mv)
        count = min(full, have // step)
        if count <= 0:
            self._buf += mv
            return b""
        out = bytearray(count * plain)
        view = memoryview(out)
        pos = 0
        if self._buf:
            need = step - len(self._buf)
            self._buf += mv[:need]
            mv = mv[need:]
            self._open_into(self._i, self._buf, view[:plain])
            self._i += 1
            self._buf = bytearray()
            pos = 1
        for k in range(pos, count):
            self._open_into(self._i, mv[:step], view[k * plain : (k + 1) * plain])
            mv = mv[step:]
            self._i += 1
        if mv:
            self._buf += mv
        return out

    def _open_into(self, i: int, chunk, dest: memoryview) -> None:
        try:
            self._aead.decrypt_into(_nonce(i, i == self._n - 1), chunk, self._aad, dest)
        except InvalidTag:
            raise self._fail(
                f"chunk {i} does not authenticate (wrong key, or tampered, swapped or "
                "damaged ciphertext)"
            ) from None

    def _start(self, head: bytes) -> None:
        self._shift = parse_header(head, self.ctx.where)
        if self._shift != CHUNK_SHIFT and cipher_size(self.ctx.size, self._shift) != (
            self.ctx.cipher_size
        ):
            raise self._fail("chunk size disagrees with the object's length")
        self._aad = self.ctx.aad(self._shift)
        self._n = chunks_of(self.ctx.size, self._shift)
        self._step = (1 << self._shift) + TAG

    def finish(self) -> bytes:
        """The last chunk's plaintext; DecryptionError if the ciphertext ended early."""
        if self._shift is None or self._i != self._n - 1:
            raise self._fail("truncated ciphertext")
        last = self.ctx.size - (self._n - 1) * (1 << self._shift)
        if len(self._buf) != last + TAG:
            raise self._fail("truncated ciphertext" if len(self._buf) < last + TAG else "trailer")
        out = self._open(self._i, self._buf)
        self._i += 1
        self._buf.clear()
        return out


def open_object(ctx: ObjectContext, data: bytes) -> bytes:
    """The plaintext of an encrypted object held in memory (verified against its id)."""
    if len(data) != ctx.cipher_size:
        raise DecryptionError(
            f"{ctx.where}: {len(data)} bytes of ciphertext where {ctx.cipher_size} were "
            "expected (truncated or padded); refused"
        )
    d = Decryptor(ctx)
    out = d.feed(data) + d.finish()
    check_plain(ctx, out)
    return out


def check_plain(ctx: ObjectContext, data: bytes) -> None:
    if ctx.plain_oid is not None and hashlib.sha256(data).hexdigest() != ctx.plain_oid:
        raise DecryptionError(f"{ctx.where}: decrypted bytes do not match the id; refused")


def read_range(
    ctx: ObjectContext, read: Callable[[int, int], bytes], offset: int, size: int
) -> bytes:
    """``size`` plaintext bytes at ``offset`` of an encrypted object whose ciphertext is read
    with ``read(cipher_offset, length)``: only the chunks that cover the range are read and
    authenticated (random access for ``--keep-encrypted`` stores)."""
    if offset >= ctx.size or size <= 0:
        return b""
    shift = parse_header(read(0, HEADER_SIZE), ctx.where)
    chunk = 1 << shift
    n = chunks_of(ctx.size, shift)
    end = min(ctx.size, offset + size)
    first, last_i = offset // chunk, (end - 1) // chunk
    step = chunk + TAG
    raw = read(HEADER_SIZE + first * step, (last_i - first + 1) * step)
    aead = AESGCM(ctx.key)
    aad = ctx.aad(shift)
    out = []
    pos = 0
    for i in range(first, last_i + 1):
        clen = (chunk if i < n - 1 else ctx.size - (n - 1) * chunk) + TAG
        piece = raw[pos : pos + clen]
        if len(piece) != clen:
            raise DecryptionError(f"{ctx.where}: truncated ciphertext; refused")
        try:
            out.append(aead.decrypt(_nonce(i, i == n - 1), piece, aad))
        except InvalidTag:
            raise DecryptionError(
                f"{ctx.where}: chunk {i} does not authenticate (tampered or damaged); refused"
            ) from None
        pos += clen
    data = b"".join(out)
    lo = offset - first * chunk
    return data[lo : lo + (end - offset)]


# --------------------------------------------------------------------------- sealing keys

_STANZA_AAD = b"vfs-sealed-key-v1"
_ZERO_NONCE = bytes(12)


def seal_key(data_key: bytes, recipient_x25519: bytes) -> tuple[bytes, bytes]:
    """Seal a 32-byte data key to one recipient, as age's X25519 recipient stanza does: a fresh
    ephemeral X25519 key, HKDF-SHA256 of the shared secret (salt: both public keys), AES-256-GCM
    with a zero nonce (the wrapping key is used once). Returns (ephemeral public, wrapped)."""
    from cryptography.hazmat.primitives.asymmetric.x25519 import (
        X25519PrivateKey,
        X25519PublicKey,
    )
    from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

    esk = X25519PrivateKey.generate()
    epk = esk.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
    shared = esk.exchange(X25519PublicKey.from_public_bytes(recipient_x25519))
    wrap = HKDF(SHA256(), 32, epk + recipient_x25519, b"vfs sealed data key v1").derive(shared)
    return epk, AESGCM(wrap).encrypt(_ZERO_NONCE, data_key, _STANZA_AAD)


def open_key(shared: bytes, epk: bytes, own_x25519: bytes, wrapped: bytes) -> bytes | None:
    """The data key of one stanza given the X25519 shared secret, or None if it is not ours."""
    wrap = HKDF(SHA256(), 32, epk + own_x25519, b"vfs sealed data key v1").derive(shared)
    try:
        key = AESGCM(wrap).decrypt(_ZERO_NONCE, wrapped, _STANZA_AAD)
    except InvalidTag:
        return None
    return key if len(key) == 32 else None


def header_mac(data_key: bytes, body: bytes) -> bytes:
    """age's header MAC: binds a signed ref's body to its data key, so nobody without the key
    can alter it (even where signatures are not checked)."""
    return hmac.new(derive(data_key, b"header mac"), body, hashlib.sha256).digest()
