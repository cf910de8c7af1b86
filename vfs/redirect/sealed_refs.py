"""Signed refs and sealed indexes: how an encrypted template is named, found and opened.

An encrypted template (or image) is published as three kinds of encrypted objects — its
content, its root (the manifest, or the metadata-only vimg file) and its *index* — and one
*signed ref* object that ``refs/<name>`` points at (docs/encryption.md, sections 5-7):

- the **index** (encrypted under a key derived from the template's random *data key*) lists
  every object of the template: plaintext id, stored (encrypted) id, object key, plaintext
  size; the root's entry; the scope; the recipients' public keys;
- the **signed ref** carries, in the clear, what a client needs before it has any key: the ref
  name, a counter and a time (against replay), the index's stored id and size, and the *sealed
  key list* (the data key sealed to each recipient's X25519 key). A header MAC under the data
  key and an Ed25519 signature of the publisher cover all of it.

A client opens a signed ref with its identity (:class:`Keys`): checks the signature (and, with
trusted publisher keys, the signer), finds the stanza sealed to it, checks the header MAC,
refuses a counter lower than the newest one it pinned for that publisher and ref, then fetches
and decrypts the index. Parsers here take hostile bytes: each is bounded and strict, and every
failure is one FormatError / DecryptionError / SignatureError naming the ref or object.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import fcntl
import hashlib
import hmac
import json
import os
import struct
import threading
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from vfs.durable import write_atomic
from vfs.errors import (
    DecryptionError,
    FormatError,
    NoKeyError,
    ReplayError,
    SignatureError,
    UnsupportedFeature,
    VfsError,
)
from vfs.redirect import crypto
from vfs.redirect.keys import Identity, PublicKey
from vfs.redirect.objectid import check_object_id
from vfs.redirect.objfile import MAX_SIZE
from vfs.redirect.repometa import is_ref_name, load_json

# --------------------------------------------------------------------------- signed ref

REF_MAGIC = b"VFSSREF\n"
REF_VERSION = 1
REF_HEAD = struct.Struct(">8sHHI")  # magic, version, flags (0), body length
SUITE = "x25519-hkdf-sha256-aes256gcm-ed25519"
MAX_BODY = 1 << 20
MAX_STANZAS = 1024
MAX_REF_OBJECT = REF_HEAD.size + MAX_BODY + 32 + 64 + 64
_SIG_CONTEXT = b"vfs-signed-ref-v1\0"
_TAIL = 32 + 64 + 64  # header MAC, signer public key (X25519 | Ed25519), signature
KIND_NAMES = ("template", "image")
_BODY_KEYS = {"ref", "counter", "time", "kind", "suite", "scope", "index", "stanzas"}


def is_signed_ref(data: bytes) -> bool:
    """Does this object look like a signed ref (rather than a plain manifest or image)?"""
    return data[: len(REF_MAGIC)] == REF_MAGIC


@dataclass(frozen=True)
class Stanza:
    epk: bytes  # ephemeral X25519 public key
    wrapped: bytes  # the data key under the stanza's wrapping key (32 + 16 bytes)


@dataclass(frozen=True)
class SignedRef:
    """A parsed (not yet verified) signed ref."""

    ref: str
    counter: int
    time: int
    kind: str
    scope: bytes
    index_id: str
    index_size: int
    stanzas: tuple[Stanza, ...]
    signed: bytes  # header + body: what the MAC covers
    mac: bytes
    signer: PublicKey
    signature: bytes

    @property
    def signer_fp(self) -> str:
        return self.signer.fingerprint


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def _unb64(text: object, size: int, where: str) -> bytes:
    if not isinstance(text, str) or len(text) > 4 * size:
        raise FormatError(f"{where}: expected base64 of {size} bytes")
    try:
        raw = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise FormatError(f"{where}: invalid base64") from None
    if len(raw) != size or _b64(raw) != text:
        raise FormatError(f"{where}: expected base64 of {size} bytes")
    return raw


def encode_signed_ref(
    *,
    ref: str,
    counter: int,
    when: int,
    kind: str,
    scope: bytes,
    index_id: str,
    index_size: int,
    stanzas: Iterable[Stanza],
    data_key: bytes,
    signer: Identity,
) -> bytes:
    """The bytes of a signed ref (header, canonical JSON body, MAC, signer, signature)."""
    body = {
        "ref": ref,
        "counter": counter,
        "time": when,
        "kind": kind,
        "suite": SUITE,
        "scope": scope.hex(),
        "index": {"id": index_id, "size": index_size},
        "stanzas": [{"epk": _b64(s.epk), "key": _b64(s.wrapped)} for s in stanzas],
    }
    raw = json.dumps(body, sort_keys=True, separators=(",", ":")).encode()
    signed = REF_HEAD.pack(REF_MAGIC, REF_VERSION, 0, len(raw)) + raw
    mac = crypto.header_mac(data_key, signed)
    head = signed + mac + signer.public.raw
    return head + signer.sign(_SIG_CONTEXT + head)


def parse_signed_ref(data: bytes, where: str) -> SignedRef:
    """Strictly parse a signed ref (bounded, exact types, no trailing bytes); FormatError."""
    if len(data) > MAX_REF_OBJECT:
        raise FormatError(f"{where}: larger than {MAX_REF_OBJECT} bytes; not a signed ref")
    if len(data) < REF_HEAD.size + _TAIL or not is_signed_ref(data):
        raise FormatError(f"{where}: not a signed ref")
    _, version, flags, n = REF_HEAD.unpack_from(data)
    if version != REF_VERSION:
        raise UnsupportedFeature(f"{where}: signed ref version {version} unknown")
    if flags:
        raise UnsupportedFeature(f"{where}: unknown signed ref flags {flags:#x}")
    if n > MAX_BODY or len(data) != REF_HEAD.size + n + _TAIL:
        raise FormatError(f"{where}: signed ref length does not match its header")
    end = REF_HEAD.size + n
    doc = load_json(data[REF_HEAD.size : end], where, MAX_BODY)
    if not isinstance(doc, dict) or set(doc) != _BODY_KEYS:
        raise FormatError(f"{where}: signed ref body must have exactly {sorted(_BODY_KEYS)}")
    ref, counter, when, kind = doc["ref"], doc["counter"], doc["time"], doc["kind"]
    if not is_ref_name(ref):
        raise FormatError(f"{where}: invalid ref name in signed ref")
    for name, v in (("counter", counter), ("time", when)):
        if type(v) is not int or not 0 <= v < 1 << 63:
            raise FormatError(f"{where}: {name} must be an integer in [0, 2^63)")
    if kind not in KIND_NAMES:
        raise FormatError(f"{where}: unknown kind {str(kind)[:20]!r}")
    if doc["suite"] != SUITE:
        raise UnsupportedFeature(f"{where}: cipher suite {str(doc['suite'])[:60]!r} unknown")
    scope = doc["scope"]
    if not isinstance(scope, str) or len(scope) != 64:
        raise FormatError(f"{where}: scope must be 64 hex digits")
    try:
        scope_b = bytes.fromhex(scope)
    except ValueError:
        raise FormatError(f"{where}: scope must be 64 hex digits") from None
    if scope_b.hex() != scope:
        raise FormatError(f"{where}: scope must be 64 lowercase hex digits")
    index = doc["index"]
    if not isinstance(index, dict) or set(index) != {"id", "size"}:
        raise FormatError(f"{where}: index must be {{id, size}}")
    try:
        index_id = check_object_id(index["id"])
    except Exception:
        raise FormatError(f"{where}: index id is not an object id") from None
    isize = index["size"]
    if type(isize) is not int or not 0 < isize <= MAX_INDEX_CIPHER:
        raise FormatError(f"{where}: invalid index size")
    if crypto.plain_size(isize) is None:
        raise FormatError(f"{where}: index size is no encrypted object's size")
    stanzas_doc = doc["stanzas"]
    if not isinstance(stanzas_doc, list) or not 0 < len(stanzas_doc) <= MAX_STANZAS:
        raise FormatError(f"{where}: stanzas must be a list of 1..{MAX_STANZAS}")
    stanzas = []
    for i, s in enumerate(stanzas_doc):
        if not isinstance(s, dict) or set(s) != {"epk", "key"}:
            raise FormatError(f"{where}: stanza {i} must be {{epk, key}}")
        stanzas.append(
            Stanza(_unb64(s["epk"], 32, f"{where}: stanza {i}"), _unb64(s["key"], 48, where))
        )
    mac = data[end : end + 32]
    signer = PublicKey.from_raw(data[end + 32 : end + 96])
    return SignedRef(
        ref=ref,
        counter=counter,
        time=when,
        kind=kind,
        scope=scope_b,
        index_id=index_id,
        index_size=isize,
        stanzas=tuple(stanzas),
        signed=data[:end],
        mac=mac,
        signer=signer,
        signature=data[end + 96 :],
    )


def verify_signature(sr: SignedRef, data: bytes, where: str) -> None:
    if not sr.signer.verify(sr.signature, _SIG_CONTEXT + data[: -len(sr.signature)]):
        raise SignatureError(f"{where}: signature does not verify (forged or damaged); refused")


# --------------------------------------------------------------------------- index

INDEX_MAGIC = b"VFSIDX\n\0"
INDEX_VERSION = 1
MODE_CONVERGENT = 1
MODE_RANDOM = 2
_IHEAD = struct.Struct(">8sHHBB2x32s32sQ32s32sII")
_IREC = struct.Struct(">32s32s32sQ")
MAX_RECIPIENTS = MAX_STANZAS
MAX_OBJECTS = 1 << 24
MAX_INDEX_PLAIN = _IHEAD.size + 64 * MAX_RECIPIENTS + _IREC.size * MAX_OBJECTS
MAX_INDEX_CIPHER = crypto.cipher_size(MAX_INDEX_PLAIN)


@dataclass(frozen=True)
class IndexEntry:
    """One object of a sealed template: where it is stored and the key that opens it."""

    plain_oid: str
    cipher_oid: str
    key: bytes
    size: int  # plaintext bytes

    @property
    def cipher_size(self) -> int:
        return crypto.cipher_size(self.size)


@dataclass
class Index:
    """The decrypted index of a sealed template or image."""

    root_kind: int  # crypto.MANIFEST or crypto.IMAGE
    mode: int  # MODE_CONVERGENT or MODE_RANDOM
    scope: bytes
    root: IndexEntry
    recipients: list[PublicKey]
    objects: dict[str, IndexEntry] = field(default_factory=dict)

    def encode(self) -> bytes:
        recs = sorted(self.objects.values(), key=lambda e: e.plain_oid)
        head = _IHEAD.pack(
            INDEX_MAGIC,
            INDEX_VERSION,
            0,
            self.root_kind,
            self.mode,
            self.scope,
            bytes.fromhex(self.root.plain_oid),
            self.root.size,
            bytes.fromhex(self.root.cipher_oid),
            self.root.key,
            len(self.recipients),
            len(recs),
        )
        parts = [head, *(r.raw for r in self.recipients)]
        parts += [
            _IREC.pack(bytes.fromhex(e.plain_oid), bytes.fromhex(e.cipher_oid), e.key, e.size)
            for e in recs
        ]
        return b"".join(parts)

    def ctx(self, e: IndexEntry, where: str) -> crypto.ObjectContext:
        # The root is an object like the others (kind CONTENT): the index names it by its
        # plaintext id, which its associated data binds, so it cannot be confused with one.
        return crypto.ObjectContext(e.key, crypto.CONTENT, self.scope, e.plain_oid, e.size, where)

    def get(self, plain_oid: str) -> IndexEntry | None:
        if plain_oid == self.root.plain_oid:
            return self.root
        return self.objects.get(plain_oid)


def parse_index(data: bytes, where: str) -> Index:
    """Strictly parse a decrypted index: exact length, sorted unique entries, sane sizes."""
    if len(data) < _IHEAD.size or data[:8] != INDEX_MAGIC:
        raise FormatError(f"{where}: not a sealed index")
    (
        _,
        version,
        flags,
        root_kind,
        mode,
        scope,
        root_oid,
        root_size,
        root_cipher,
        root_key,
        n_rec,
        n_obj,
    ) = _IHEAD.unpack_from(data)
    if version != INDEX_VERSION:
        raise UnsupportedFeature(f"{where}: index version {version} unknown")
    if data[14:16] != b"\0\0":
        raise FormatError(f"{where}: reserved index header bytes are not zero")
    if flags:
        raise UnsupportedFeature(f"{where}: unknown index flags {flags:#x}")
    if root_kind not in (crypto.MANIFEST, crypto.IMAGE):
        raise FormatError(f"{where}: unknown root kind {root_kind}")
    if mode not in (MODE_CONVERGENT, MODE_RANDOM):
        raise FormatError(f"{where}: unknown key mode {mode}")
    if n_rec > MAX_RECIPIENTS or n_obj > MAX_OBJECTS:
        raise FormatError(f"{where}: too many recipients or objects")
    if len(data) != _IHEAD.size + 64 * n_rec + _IREC.size * n_obj:
        raise FormatError(f"{where}: index length does not match its counts")
    if root_size > MAX_SIZE:
        raise FormatError(f"{where}: root object too large")
    root = IndexEntry(root_oid.hex(), root_cipher.hex(), root_key, root_size)
    pos = _IHEAD.size
    recipients = []
    for _ in range(n_rec):
        recipients.append(PublicKey.from_raw(data[pos : pos + 64]))
        pos += 64
    objects: dict[str, IndexEntry] = {}
    prev = b""
    for plain, cipher, key, size in _IREC.iter_unpack(data[pos:]):
        if plain <= prev:
            raise FormatError(f"{where}: index entries not sorted and unique")
        if size > MAX_SIZE:
            raise FormatError(f"{where}: object {plain.hex()} too large")
        prev = plain
        e = IndexEntry(plain.hex(), cipher.hex(), key, size)
        objects[e.plain_oid] = e
    return Index(root_kind, mode, scope, root, recipients, objects)


def seal_index(index: Index, data_key: bytes) -> tuple[bytes, crypto.ObjectContext]:
    """The encrypted index (kind INDEX, key derived from the data key; one index per key)."""
    plain = index.encode()
    ctx = index_ctx(data_key, index.scope, len(plain), "index")
    return crypto.seal_object(ctx, plain), ctx


def index_ctx(data_key: bytes, scope: bytes, size: int, where: str) -> crypto.ObjectContext:
    return crypto.ObjectContext(
        crypto.derive(data_key, b"index"), crypto.INDEX, scope, None, size, where
    )


# --------------------------------------------------------------------------- pins


class PinStore:
    """The newest signed ref this client accepted, per publisher and ref name (a JSON file).

    A signed ref whose counter is below the pinned one is a replay of an older version (a
    mirror or repository rolling a client back): refused. One with the same counter but
    another object is a fork (two different refs signed with one counter): refused too."""

    FORMAT = "vfs-pins"

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self._lock = threading.Lock()

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(
            self.path.with_name(self.path.name + ".lock"),
            os.O_RDWR | os.O_CREAT | os.O_CLOEXEC,
            0o600,
        )
        try:
            with self._lock:
                fcntl.flock(fd, fcntl.LOCK_EX)
                yield
        finally:
            os.close(fd)

    def _load(self) -> dict[str, dict]:
        try:
            raw = self.path.read_bytes()
        except FileNotFoundError:
            return {}
        doc = load_json(raw, str(self.path), 64 << 20)
        if not isinstance(doc, dict) or doc.get("format") != self.FORMAT:
            raise FormatError(f"{self.path}: not a pin file")
        pins = doc.get("pins")
        if not isinstance(pins, dict):
            raise FormatError(f"{self.path}: malformed pin file")
        for k, v in pins.items():
            if (
                not isinstance(v, dict)
                or type(v.get("counter")) is not int
                or not isinstance(v.get("id"), str)
            ):
                raise FormatError(f"{self.path}: malformed pin {k!r}")
        return pins

    def get(self, signer_fp: str, ref: str) -> tuple[int, str] | None:
        with self._locked():
            v = self._load().get(f"{signer_fp}/{ref}")
        return None if v is None else (v["counter"], v["id"])

    def check_and_pin(self, sr: SignedRef, ref_id: str, where: str) -> None:
        """Refuse a replayed or forked signed ref; otherwise pin it (durably) if newer."""
        key = f"{sr.signer_fp}/{sr.ref}"
        with self._locked():
            pins = self._load()
            old = pins.get(key)
            if old is not None:
                if sr.counter < old["counter"]:
                    raise ReplayError(
                        f"{where}: signed ref {sr.ref!r} counter {sr.counter} is older than "
                        f"the pinned {old['counter']} (a replayed older version); refused"
                    )
                if sr.counter == old["counter"]:
                    if old["id"] != ref_id:
                        raise ReplayError(
                            f"{where}: signed ref {sr.ref!r} counter {sr.counter} names "
                            f"another object than the pinned one (a forked ref); refused"
                        )
                    return
            pins[key] = {"counter": sr.counter, "id": ref_id, "time": sr.time}
            doc = {"format": self.FORMAT, "version": 1, "pins": pins}
            write_atomic(self.path, json.dumps(doc, indent=1, sort_keys=True).encode(), mode=0o600)


# --------------------------------------------------------------------------- opening


@dataclass
class OpenedRef:
    """A signed ref opened with a client's identity: its verified facts and its index."""

    name: str
    ref_id: str  # object id of the signed ref
    signed: SignedRef
    data_key: bytes
    index: Index
    raw: bytes = b""  # the signed ref's bytes
    raw_index: bytes = b""  # the index's stored (encrypted) bytes

    @property
    def digest(self) -> str:
        """The template digest (manifest id) or the image template's object id."""
        return self.index.root.plain_oid


@dataclass
class Keys:
    """What a client (or publisher) holds to open and trust sealed refs."""

    identity: Identity | None = None
    trusted: tuple[PublicKey, ...] = ()
    pins: PinStore | None = None

    @classmethod
    def from_files(
        cls,
        identity: str | os.PathLike[str] | None,
        trust: Iterable[str] = (),
        pins: str | os.PathLike[str] | None = None,
        *,
        passphrase=None,
    ) -> Keys:
        """Keys loaded (and checked) from ``--identity FILE``, ``--trust PUB`` (keys or files)
        and ``--pins FILE``; ``passphrase()`` is called if the identity is protected."""
        from vfs.redirect.keys import load_identity, load_public

        return cls(
            identity=load_identity(identity, passphrase) if identity is not None else None,
            trusted=tuple(load_public(p) for p in trust),
            pins=PinStore(pins) if pins is not None else None,
        )

    def check_signer(self, sr: SignedRef, where: str) -> None:
        if self.trusted and not any(
            hmac.compare_digest(t.ed25519, sr.signer.ed25519) for t in self.trusted
        ):
            raise SignatureError(
                f"{where}: signed by {sr.signer_fp}, not by a trusted publisher "
                f"({', '.join(t.fingerprint for t in self.trusted)}); refused"
            )

    def open_stanzas(self, sr: SignedRef, where: str) -> bytes:
        if self.identity is None:
            raise NoKeyError(f"{where}: an encrypted ref: give --identity (a key it is sealed to)")
        own = self.identity.public.x25519
        for s in sr.stanzas:
            try:
                shared = self.identity.exchange(s.epk)
            except FormatError:
                continue
            key = crypto.open_key(shared, s.epk, own, s.wrapped)
            if key is not None:
                return key
        raise NoKeyError(
            f"{where}: not sealed to identity {self.identity.public.fingerprint} "
            f"({len(sr.stanzas)} recipients); ask the publisher to reseal it with --add "
            f"{self.identity.public}"
        )


def open_signed_ref(
    keys: Keys,
    data: bytes,
    ref_id: str,
    fetch_index,
    *,
    name: str | None,
    where: str,
    pin: bool = True,
) -> OpenedRef:
    """Verify and open the signed ref ``data`` (object ``ref_id``); ``fetch_index(id, size)``
    returns the index's stored bytes. ``name``: the ref name it was found under (it must be
    the one signed). ``pin``: check and advance the replay pin (False to reopen an object a
    VEE already uses)."""
    if hashlib.sha256(data).hexdigest() != ref_id:
        raise DecryptionError(f"{where}: signed ref does not match its id; refused")
    sr = parse_signed_ref(data, where)
    verify_signature(sr, data, where)
    keys.check_signer(sr, where)
    if name is not None and sr.ref != name:
        raise SignatureError(
            f"{where}: the object is the signed ref {sr.ref!r}, not {name!r} (a swapped ref); "
            "refused"
        )
    data_key = keys.open_stanzas(sr, where)
    if not hmac.compare_digest(sr.mac, crypto.header_mac(data_key, sr.signed)):
        raise SignatureError(f"{where}: header MAC does not verify (altered ref); refused")
    if pin and keys.pins is not None:
        keys.pins.check_and_pin(sr, ref_id, where)
    size = crypto.plain_size(sr.index_size)
    assert size is not None  # parse_signed_ref checked
    ctx = index_ctx(data_key, sr.scope, size, f"{where}: index {sr.index_id}")
    try:
        raw = fetch_index(sr.index_id, sr.index_size)
    except VfsError as e:  # the repository's error names the index; say which ref it is
        raise prefixed(e, f"{where}: index") from None
    plain = crypto.open_object(ctx, raw)
    index = parse_index(plain, f"{where}: index {sr.index_id}")
    if index.scope != sr.scope:
        raise DecryptionError(f"{where}: index scope differs from the signed ref's; refused")
    want = crypto.MANIFEST if sr.kind == "template" else crypto.IMAGE
    if index.root_kind != want:
        raise FormatError(f"{where}: signed ref of kind {sr.kind} holds another kind of index")
    return OpenedRef(sr.ref, ref_id, sr, data_key, index, data, raw)


def prefixed(e: VfsError, what: str) -> VfsError:
    """The same error (type and context) with ``what`` in front: a repository's error about a
    stored (encrypted) id also names the object the caller asked for."""
    err = type(e).__new__(type(e))
    VfsError.__init__(err, f"{what}: {e.message}", **e.context)
    return err


def new_counter(previous: int | None) -> int:
    """The counter of a new signed ref: above the previous one, and at least the time in
    milliseconds (so a publisher's counters grow across repositories too)."""
    now = int(time.time() * 1000)
    return max(now, (previous or 0) + 1)
