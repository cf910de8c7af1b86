"""Key files: identities (secret), public keys, keyrings (secret) — docs/encryption.md, section 3.

An *identity* is what a publisher, a VE or a client holds: an X25519 key for key agreement (data
keys are sealed to its public half, as age seals file keys) and an Ed25519 key for signatures
(a publisher signs its refs). Its *public key* is both public halves in one string that can be
pasted on a command line or kept in a file::

    vfs-pub-1-<base64url(x25519 public 32 | ed25519 public 32 | check 4)>

An identity file (mode 0600, refused when group or others can read it, as ssh refuses an
unprotected key) holds comment lines and one key line::

    # vfs identity, created 2026-12-01T22:00:00Z
    # public key: vfs-pub-1-...
    VFS-SECRET-KEY-1-<base64url(x25519 secret 32 | ed25519 seed 32 | check 4)>

A *keyring* file (0600) holds the secret that derives the convergent object keys of the
templates published with it (identical files are stored once within a keyring, never linked
across keyrings)::

    VFS-KEYRING-1-<base64url(secret 32 | check 4)>

``check`` is the first 4 bytes of SHA-256(prefix | payload): a mistyped or truncated key is an
error, not a different key. The version is in the prefix; a newer one is refused by name.

An identity may be protected by a passphrase (``vfsd key gen --passphrase-file F``); its key
line is then (docs/encryption.md §3.1, as age's scrypt stanza)::

    VFS-ENCRYPTED-SECRET-KEY-1-<base64url(salt 16 | log2 N 1 | nonce 12 | sealed 80 | check 4)>

with ``sealed`` = AES-256-GCM(scrypt(passphrase, salt, N, r=8, p=1), nonce, the 64 secret
bytes, AAD = prefix | salt | log2 N): a wrong passphrase or a changed byte fails the tag.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import os
import re
import stat
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.hashes import SHA256
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from cryptography.hazmat.primitives.kdf.scrypt import Scrypt

from vfs.durable import write_atomic
from vfs.errors import (
    AlreadyExists,
    FormatError,
    NoKeyError,
    NotFound,
    UnsupportedFeature,
    UsageError,
)

PUBLIC_PREFIX = "vfs-pub-1-"
SECRET_PREFIX = "VFS-SECRET-KEY-1-"
KEYRING_PREFIX = "VFS-KEYRING-1-"
ENCRYPTED_PREFIX = "VFS-ENCRYPTED-SECRET-KEY-1-"
#: scrypt work factor (log2 N) of new passphrase-protected identities: age's default (~1 s,
#: 256 MiB); readers accept 10..20 (a hostile file cannot ask for more than 1 GiB).
SCRYPT_LOG_N = 18
SCRYPT_LOG_N_RANGE = (10, 20)
_ENC_SIZE = 16 + 1 + 12 + 64 + 16
#: Key files are a few lines; anything larger is not one (read no further).
MAX_KEY_FILE = 4096
_CHECK = 4
_B64 = re.compile(r"[A-Za-z0-9_-]+")
_RAW = serialization.Encoding.Raw
_RAW_PUB = serialization.PublicFormat.Raw
_RAW_PRIV = serialization.PrivateFormat.Raw
_NOENC = serialization.NoEncryption()


def _check(prefix: str, payload: bytes) -> bytes:
    return hashlib.sha256(prefix.encode() + payload).digest()[:_CHECK]


def _encode(prefix: str, payload: bytes) -> str:
    text = base64.urlsafe_b64encode(payload + _check(prefix, payload)).decode().rstrip("=")
    return prefix + text


def _decode(text: str, prefix: str, size: int, what: str) -> bytes:
    """The payload of one encoded key; FormatError (never another exception) for anything else."""
    if not text.startswith(prefix):
        # Same family, another version: say so rather than "not a key".
        family = prefix.rsplit("-", 2)[0] + "-"
        if text.startswith(family):
            raise UnsupportedFeature(f"{what}: key version {text[len(family) :][:8]!r} unknown")
        raise FormatError(f"{what}: not a {prefix.rstrip('-')} key")
    body = text[len(prefix) :]
    if _B64.fullmatch(body) is None or len(body) > 200:
        raise FormatError(f"{what}: not a {prefix.rstrip('-')} key (bad characters)")
    try:
        raw = base64.urlsafe_b64decode(body + "=" * (-len(body) % 4))
    except (binascii.Error, ValueError):
        raise FormatError(f"{what}: not a {prefix.rstrip('-')} key (bad base64)") from None
    if len(raw) != size + _CHECK:
        raise FormatError(f"{what}: key has {len(raw)} bytes, not {size + _CHECK}")
    payload, check = raw[:size], raw[size:]
    if not hmac.compare_digest(check, _check(prefix, payload)):
        raise FormatError(f"{what}: key checksum does not match (mistyped or truncated key)")
    if _encode(prefix, payload) != text:  # one spelling per key: no trailing bits, no padding
        raise FormatError(f"{what}: key is not in canonical form")
    return payload


@dataclass(frozen=True)
class PublicKey:
    """A recipient (X25519) and a signer (Ed25519), the public half of an :class:`Identity`."""

    x25519: bytes
    ed25519: bytes

    @property
    def raw(self) -> bytes:
        return self.x25519 + self.ed25519

    @property
    def fingerprint(self) -> str:
        """Short, stable name of the key for messages and pins: 16 hex digits of SHA-256."""
        return hashlib.sha256(b"vfs-key-fingerprint\0" + self.raw).hexdigest()[:16]

    def __str__(self) -> str:
        return _encode(PUBLIC_PREFIX, self.raw)

    @classmethod
    def from_raw(cls, raw: bytes) -> PublicKey:
        if len(raw) != 64:
            raise FormatError(f"public key has {len(raw)} bytes, not 64")
        return cls(bytes(raw[:32]), bytes(raw[32:]))

    @classmethod
    def parse(cls, text: str, what: str = "public key") -> PublicKey:
        raw = _decode(text.strip(), PUBLIC_PREFIX, 64, what)
        key = cls.from_raw(raw)
        try:  # both halves must be points the libraries accept
            X25519PublicKey.from_public_bytes(key.x25519)
            Ed25519PublicKey.from_public_bytes(key.ed25519)
        except ValueError:
            raise FormatError(f"{what}: not a valid X25519/Ed25519 public key") from None
        return key

    def x25519_key(self) -> X25519PublicKey:
        return X25519PublicKey.from_public_bytes(self.x25519)

    def verify(self, signature: bytes, message: bytes) -> bool:
        from cryptography.exceptions import InvalidSignature

        try:
            Ed25519PublicKey.from_public_bytes(self.ed25519).verify(signature, message)
        except (InvalidSignature, ValueError):
            return False
        return True


class Identity:
    """A secret key pair: X25519 (opens data keys sealed to it) and Ed25519 (signs refs)."""

    __slots__ = ("_x", "_ed", "public")

    def __init__(self, x25519_secret: bytes, ed25519_seed: bytes) -> None:
        self._x = X25519PrivateKey.from_private_bytes(x25519_secret)
        self._ed = Ed25519PrivateKey.from_private_bytes(ed25519_seed)
        self.public = PublicKey(
            self._x.public_key().public_bytes(_RAW, _RAW_PUB),
            self._ed.public_key().public_bytes(_RAW, _RAW_PUB),
        )

    @classmethod
    def generate(cls) -> Identity:
        return cls(os.urandom(32), os.urandom(32))

    def exchange(self, peer_public: bytes) -> bytes:
        """X25519 with a peer's public key; refuses a low-order point (all-zero secret)."""
        try:
            shared = self._x.exchange(X25519PublicKey.from_public_bytes(peer_public))
        except ValueError:
            raise FormatError("sealed key: invalid ephemeral X25519 key") from None
        if not any(shared):
            raise FormatError("sealed key: ephemeral key is a low-order point")
        return shared

    def sign(self, message: bytes) -> bytes:
        return self._ed.sign(message)

    def default_keyring(self) -> Keyring:
        """The keyring of templates this identity publishes without ``--keyring``: derived
        from its secret (one keyring per publisher; never leaves the publisher's host)."""
        return Keyring(HKDF(SHA256(), 32, None, b"vfs default keyring v1").derive(self._secret()))

    def _secret(self) -> bytes:
        return self._x.private_bytes(_RAW, _RAW_PRIV, _NOENC) + self._ed.private_bytes(
            _RAW, _RAW_PRIV, _NOENC
        )

    def to_text(self, passphrase: bytes | None = None, log_n: int = SCRYPT_LOG_N) -> str:
        """The identity file; with ``passphrase``, its secret sealed under an scrypt key."""
        when = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        if passphrase is None:
            line = _encode(SECRET_PREFIX, self._secret())
        else:
            salt, nonce = os.urandom(16), os.urandom(12)
            head = salt + bytes([log_n])
            key = _passphrase_key(passphrase, salt, log_n)
            sealed = AESGCM(key).encrypt(nonce, self._secret(), ENCRYPTED_PREFIX.encode() + head)
            line = _encode(ENCRYPTED_PREFIX, head + nonce + sealed)
        kind = "vfs identity" if passphrase is None else "vfs identity (passphrase-protected)"
        return f"# {kind}, created {when}\n# public key: {self.public}\n{line}\n"

    @classmethod
    def parse(
        cls, text: str, what: str = "identity", passphrase: Callable[[], bytes | None] | None = None
    ) -> Identity:
        """``passphrase``: asked for (called) only when the file is passphrase-protected."""
        line = _key_line(text, what)
        if not line.startswith(ENCRYPTED_PREFIX):
            raw = _decode(line, SECRET_PREFIX, 64, what)
            return cls(raw[:32], raw[32:])
        raw = _decode(line, ENCRYPTED_PREFIX, _ENC_SIZE, what)
        salt, log_n, nonce, sealed = raw[:16], raw[16], raw[17:29], raw[29:]
        lo, hi = SCRYPT_LOG_N_RANGE
        if not lo <= log_n <= hi:
            raise FormatError(f"{what}: scrypt work factor 2^{log_n} outside 2^{lo}..2^{hi}")
        pw = passphrase() if passphrase is not None else None
        if pw is None:
            raise NoKeyError(
                f"{what}: passphrase-protected: give --passphrase-file FILE (or run on a "
                "terminal to be asked)"
            )
        key = _passphrase_key(pw, salt, log_n)
        try:
            secret = AESGCM(key).decrypt(nonce, sealed, ENCRYPTED_PREFIX.encode() + raw[:17])
        except InvalidTag:
            raise NoKeyError(f"{what}: wrong passphrase (or a damaged file)") from None
        return cls(secret[:32], secret[32:])

    @staticmethod
    def is_protected(text: str) -> bool:
        """Whether an identity file's key line is passphrase-protected."""
        try:
            return _key_line(text, "identity").startswith(ENCRYPTED_PREFIX)
        except FormatError:
            return False

    def __repr__(self) -> str:  # never the secret
        return f"Identity({self.public.fingerprint})"


class Keyring:
    """The secret that makes object keys convergent within a set of templates."""

    __slots__ = ("secret", "id")

    def __init__(self, secret: bytes) -> None:
        if len(secret) != 32:
            raise FormatError("keyring secret must be 32 bytes")
        self.secret = bytes(secret)
        #: Public name of the keyring (the AEAD scope of its objects), never the secret.
        self.id = HKDF(SHA256(), 32, None, b"vfs keyring id v1").derive(self.secret)

    @classmethod
    def generate(cls) -> Keyring:
        return cls(os.urandom(32))

    def to_text(self) -> str:
        when = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        return (
            f"# vfs keyring {self.id.hex()[:16]}, created {when}\n"
            f"{_encode(KEYRING_PREFIX, self.secret)}\n"
        )

    @classmethod
    def parse(cls, text: str, what: str = "keyring") -> Keyring:
        return cls(_decode(_key_line(text, what), KEYRING_PREFIX, 32, what))

    def __repr__(self) -> str:
        return f"Keyring({self.id.hex()[:16]})"


def _passphrase_key(passphrase: bytes, salt: bytes, log_n: int) -> bytes:
    if not passphrase:
        raise UsageError("an empty passphrase protects nothing; refused")
    return Scrypt(salt=salt, length=32, n=1 << log_n, r=8, p=1).derive(passphrase)


def _key_line(text: str, what: str) -> str:
    """The one non-comment line of a key file."""
    lines = [ln.strip() for ln in text.splitlines()]
    keys = [ln for ln in lines if ln and not ln.startswith("#")]
    if len(keys) != 1:
        raise FormatError(f"{what}: expected one key line, found {len(keys)}")
    return keys[0]


# --------------------------------------------------------------------------- files


def _read_key_file(path: str | os.PathLike[str], what: str, secret: bool) -> str:
    p = Path(path)
    try:
        fd = os.open(p, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK | os.O_NOFOLLOW)
    except FileNotFoundError:
        raise NotFound(f"{what} {p}: no such file") from None
    except OSError as e:
        raise UsageError(f"{what} {p}: cannot open: {e.strerror or e}") from None
    with os.fdopen(fd, "rb") as f:
        st = os.fstat(f.fileno())
        if not stat.S_ISREG(st.st_mode):
            raise UsageError(f"{what} {p}: not a regular file")
        if secret and st.st_mode & 0o077:
            raise UsageError(
                f"{what} {p}: readable by group or others (mode {stat.S_IMODE(st.st_mode):04o}); "
                "a secret key must be 0600 (chmod 600)"
            )
        raw = f.read(MAX_KEY_FILE + 1)
    if len(raw) > MAX_KEY_FILE:
        raise FormatError(f"{what} {p}: larger than {MAX_KEY_FILE} bytes; not a key file")
    try:
        return raw.decode("ascii")
    except UnicodeDecodeError:
        raise FormatError(f"{what} {p}: not a key file (not ASCII text)") from None


def load_identity(
    path: str | os.PathLike[str], passphrase: Callable[[], bytes | None] | None = None
) -> Identity:
    """The identity in ``path``; ``passphrase`` is called if the file is protected by one."""
    return Identity.parse(_read_key_file(path, "identity", True), f"identity {path}", passphrase)


def protected_file(path: str | os.PathLike[str]) -> bool:
    """Whether ``path`` is a passphrase-protected identity file (False for anything else,
    which its loader then names)."""
    try:
        text = _read_key_file(path, "identity", True)
    except Exception:
        return False
    return Identity.is_protected(text)


def read_passphrase_file(path: str | os.PathLike[str]) -> bytes:
    """A passphrase file: its bytes without one trailing newline (as ``echo pw > F`` writes);
    a secret like a key, so it must be 0600 too."""
    p = Path(path)
    try:
        fd = os.open(p, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
    except FileNotFoundError:
        raise NotFound(f"passphrase file {p}: no such file") from None
    except OSError as e:
        raise UsageError(f"passphrase file {p}: cannot open: {e.strerror or e}") from None
    with os.fdopen(fd, "rb") as f:
        st = os.fstat(f.fileno())
        if not stat.S_ISREG(st.st_mode) or st.st_mode & 0o077:
            raise UsageError(
                f"passphrase file {p}: must be a regular file of mode 0600 (chmod 600)"
            )
        raw = f.read(MAX_KEY_FILE + 1)
    if len(raw) > MAX_KEY_FILE:
        raise FormatError(f"passphrase file {p}: larger than {MAX_KEY_FILE} bytes")
    raw = raw[:-1] if raw.endswith(b"\n") else raw
    if not raw:
        raise UsageError(f"passphrase file {p}: empty")
    return raw


def load_keyring(path: str | os.PathLike[str]) -> Keyring:
    return Keyring.parse(_read_key_file(path, "keyring", True), f"keyring {path}")


def load_public(spec: str) -> PublicKey:
    """A public key given as the key itself (``vfs-pub-1-...``) or as a file holding one (a
    public key file, or an identity file, whose public half is taken)."""
    if spec.startswith(PUBLIC_PREFIX):
        return PublicKey.parse(spec, "public key")
    text = _read_key_file(spec, "public key", False)
    line = _key_line(text, f"public key {spec}")
    if line.startswith(ENCRYPTED_PREFIX):
        raise UsageError(
            f"{spec}: a passphrase-protected identity; give its public key (vfsd key show)"
        )
    if line.startswith(SECRET_PREFIX.rsplit("-", 2)[0]):
        return load_identity(spec).public
    return PublicKey.parse(line, f"public key {spec}")


def write_secret(path: str | os.PathLike[str], text: str, *, force: bool = False) -> None:
    """Write a secret key file durably with mode 0600; never over an existing file unless
    ``force`` (a key overwritten by mistake is every template sealed to it lost)."""
    p = Path(path)
    if p.exists() and not force:
        raise AlreadyExists(f"{p}: file exists (refusing to overwrite a key; remove it first)")
    write_atomic(p, text.encode(), mode=0o600)
