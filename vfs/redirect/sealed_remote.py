"""Encryption as a layer between a repository and its users (docs/encryption.md, section 8).

- :class:`SealingRemote` wraps a writable repository for a publisher (``vfsd template publish
  --encrypt-for``, ``vimg push --encrypt-for``): it takes plaintext objects exactly as the
  repository would (``has``/``put``/``put_file``/``put_stream`` answer with plaintext ids), stores
  them encrypted under their SHA-256 of ciphertext, and ``set_ref`` writes the index, then the
  signed ref, then the ref. The publishers above it do not change.
- :class:`UnsealingRemote` wraps repositories for a client: a plaintext id of an opened sealed
  ref is fetched as its ciphertext, decrypted chunk by chunk as it streams in and handed to the
  resolver, which hashes the plaintext against the id before it stores a byte. So the local
  store, the view and the engines above see plaintext objects under their plaintext ids,
  exactly as for a plain template; ids no opened ref names go to the plain repository.

Crash story of a sealed publish: content objects, the root (manifest or image), the index and
the signed ref are objects written durably in that order; the ref moves last. A publish killed
anywhere leaves unreferenced objects and the previous ref.
"""

from __future__ import annotations

import hashlib
import logging
import os
import tempfile
import threading
import time
from collections.abc import Iterator
from typing import Any, BinaryIO

from vfs.errors import (
    DecryptionError,
    FormatError,
    IntegrityError,
    NotFound,
    ObjectNotFound,
    SignatureError,
    UsageError,
    VfsError,
)
from vfs.redirect import crypto
from vfs.redirect.bounds import fetch_bound, size_mismatch, too_large
from vfs.redirect.keys import Identity, Keyring, PublicKey
from vfs.redirect.objectid import check_object_id
from vfs.redirect.remote import BLOCK, Remote
from vfs.redirect.sealed_refs import (
    MAX_REF_OBJECT,
    MODE_CONVERGENT,
    MODE_RANDOM,
    Index,
    IndexEntry,
    Keys,
    OpenedRef,
    Stanza,
    encode_signed_ref,
    is_signed_ref,
    new_counter,
    open_signed_ref,
    parse_signed_ref,
    prefixed,
    seal_index,
)

log = logging.getLogger(__name__)


def split_address(text: str) -> tuple[str | None, str]:
    """``URL#REF`` (the VE's address: a repository and a ref in it) → (URL, REF); a bare ref
    or digest → (None, text)."""
    if "#" not in text:
        return None, text
    url, _, ref = text.rpartition("#")
    if not url or not ref:
        raise UsageError(f"invalid template address {text!r}: expected URL#REF")
    return url, ref


def fetch_signed_ref(remote: Remote, name: str) -> tuple[str, bytes]:
    """The object ref ``name`` names, and its bytes if it is a signed ref (b"" if it is
    anything else: a plain manifest or image, loaded by whoever loads it). Only the first
    block of a plain root is read; a signed ref is read up to its bound (~1 MiB)."""
    oid = remote.get_ref(name)
    blocks = remote.iter_object(oid)
    try:
        first = next(blocks, b"")
        if not is_signed_ref(first):
            return oid, b""
        parts, n = [first], len(first)
        for b in blocks:
            n += len(b)
            if n > MAX_REF_OBJECT:
                raise FormatError(f"ref {name!r} in {remote.url}: signed ref object too large")
            parts.append(b)
    finally:
        close = getattr(blocks, "close", None)
        if close is not None:
            close()
    return oid, b"".join(parts)


def previous_ref(remote: Remote, name: str, keys: Keys) -> tuple[OpenedRef | None, int | None]:
    """What a publisher finds under ``name`` before it publishes again: the previous version
    opened with its identity (to reuse the keys of unchanged objects) if it can, and the
    previous counter (the next one must be larger)."""
    try:
        oid, data = fetch_signed_ref(remote, name)
    except NotFound:
        return None, None
    if not is_signed_ref(data):
        return None, None
    where = f"ref {name!r} in {remote.url}"
    sr = parse_signed_ref(data, where)
    try:
        opened = open_signed_ref(
            keys,
            data,
            oid,
            lambda i, n: remote.get(i, expected_size=n),
            name=name,
            where=where,
            pin=False,
        )
    except (SignatureError, FormatError, IntegrityError) as e:
        log.info("%s: previous version not reused: %s", where, e)
        return None, sr.counter
    except Exception as e:  # NoKeyError: not sealed to this publisher
        log.info("%s: previous version not reused: %s", where, e)
        return None, sr.counter
    return opened, sr.counter


class SealingRemote:
    """A writable repository that encrypts every object put through it (publisher side).

    ``keyring``: convergent keys (identical plaintexts in the keyring stored once); None: a
    random key per object (``--no-dedup``). ``previous``: the opened previous version of the
    ref, whose unchanged objects are reused (not encrypted or sent again) when its key mode
    and scope are this publish's. The signer is always a recipient (so it can reseal and
    publish the next version incrementally).
    """

    def __init__(
        self,
        remote: Any,
        *,
        signer: Identity,
        recipients: list[PublicKey],
        keyring: Keyring | None,
        kind: str = "template",
        previous: OpenedRef | None = None,
        previous_counter: int | None = None,
        spool_dir: str | None = None,
    ) -> None:
        if kind not in ("template", "image"):
            raise UsageError(f"unknown sealed kind {kind!r}")
        self.remote = remote
        self.url = remote.url
        self.signer = signer
        self.recipients = _unique([signer.public, *recipients])
        self.keyring = keyring
        self.kind = kind
        self.mode = MODE_CONVERGENT if keyring is not None else MODE_RANDOM
        prev_index = previous.index if previous is not None else None
        if keyring is not None:
            self.scope = keyring.id
        elif prev_index is not None and prev_index.mode == MODE_RANDOM:
            self.scope = prev_index.scope  # a --no-dedup ref keeps its scope across versions
        else:
            self.scope = os.urandom(32)
        self._reuse: dict[str, IndexEntry] = {}
        if prev_index is not None and (prev_index.mode, prev_index.scope) == (
            self.mode,
            self.scope,
        ):
            self._reuse = dict(prev_index.objects)
            self._reuse.setdefault(prev_index.root.plain_oid, prev_index.root)
        self.previous_counter = previous_counter
        self.spool_dir = spool_dir
        self.entries: dict[str, IndexEntry] = {}
        self._lock = threading.Lock()
        self.reused = 0
        self.ref_id: str | None = None
        self.counter: int | None = None

    # -- the repository interface the publishers use (plaintext ids in and out) -----------

    def _key(self, oid: str) -> bytes:
        if self.keyring is not None:
            return crypto.convergent_key(self.keyring.secret, crypto.CONTENT, oid)
        return os.urandom(32)

    def _ctx(self, oid: str, key: bytes, size: int) -> crypto.ObjectContext:
        return crypto.ObjectContext(key, crypto.CONTENT, self.scope, oid, size, f"object {oid}")

    def _record(self, e: IndexEntry) -> None:
        with self._lock:
            self.entries.setdefault(e.plain_oid, e)

    def has(self, oid: str) -> bool:
        with self._lock:
            if oid in self.entries:
                return True
        e = self._reuse.get(oid)
        if e is not None and self.remote.has(e.cipher_oid):
            self._record(e)
            self.reused += 1
            return True
        return False

    def put(self, data: bytes | bytearray | memoryview) -> str:
        oid = hashlib.sha256(data).hexdigest()
        if self.has(oid):
            return oid
        key = self._key(oid)
        sealed = crypto.seal_object(self._ctx(oid, key, len(data)), data)
        coid = hashlib.sha256(sealed).hexdigest()
        if not self.remote.has(coid):
            got = self.remote.put(sealed)
            if got != coid:
                raise IntegrityError(f"repository stored object {got[:16]}… for {coid[:16]}…")
        self._record(IndexEntry(oid, coid, key, len(data)))
        return oid

    def put_file(self, path: str | os.PathLike[str]) -> str:
        with open(path, "rb") as f:
            return self.put_stream(f)

    def put_stream(self, src: BinaryIO) -> str:
        """Encrypt a stream: hashed first (the convergent key is a function of the plaintext
        id), then encrypted as it is copied to the repository. A stream that cannot seek is
        spooled to a temporary file first."""
        if not _seekable(src):
            with tempfile.TemporaryFile(prefix="vfs-seal-", dir=self.spool_dir) as spool:
                while chunk := src.read(BLOCK):
                    spool.write(chunk)
                spool.seek(0)
                return self.put_stream(spool)
        start = src.tell()
        h = hashlib.sha256()
        n = 0
        while chunk := src.read(BLOCK):
            h.update(chunk)
            n += len(chunk)
        oid = h.hexdigest()
        if self.has(oid):
            return oid
        src.seek(start)
        key = self._key(oid)
        ctx = self._ctx(oid, key, n)
        coid = self.remote.put_stream(crypto.EncryptingReader(src, ctx))
        self._record(IndexEntry(oid, coid, key, n))
        return oid

    def get_ref(self, name: str) -> str:
        return self.remote.get_ref(name)

    def list_refs(self) -> dict[str, str]:
        return self.remote.list_refs()

    # -- the last step: index, signed ref, ref ---------------------------------------------

    def set_ref(self, name: str, root_oid: str) -> None:
        """Seal the publish: the index of every object put or reused (the root included) under
        a fresh data key, the data key sealed to each recipient, the signed ref, then the ref."""
        with self._lock:
            root = self.entries.get(root_oid)
            objects = dict(self.entries)
        if root is None:
            raise UsageError(f"object {root_oid} was not published through the sealing layer")
        root_kind = crypto.MANIFEST if self.kind == "template" else crypto.IMAGE
        index = Index(root_kind, self.mode, self.scope, root, list(self.recipients), objects)
        self.ref_id, self.counter = write_sealed_ref(
            self.remote, name, index, self.signer, self.previous_counter, self.kind
        )


def write_sealed_ref(
    remote: Any, name: str, index: Index, signer: Identity, previous: int | None, kind: str
) -> tuple[str, int]:
    """Index object, then signed ref object, then the ref: returns (signed ref id, counter)."""
    data_key = os.urandom(32)
    sealed_index, _ = seal_index(index, data_key)
    index_id = remote.put(sealed_index)
    stanzas = [Stanza(*crypto.seal_key(data_key, r.x25519)) for r in index.recipients]
    counter = new_counter(previous)
    signed = encode_signed_ref(
        ref=name,
        counter=counter,
        when=int(time.time()),
        kind=kind,
        scope=index.scope,
        index_id=index_id,
        index_size=len(sealed_index),
        stanzas=stanzas,
        data_key=data_key,
        signer=signer,
    )
    ref_id = remote.put(signed)
    remote.set_ref(name, ref_id)  # last: only now does the name see the new version
    return ref_id, counter


def reseal(
    remote: Any,
    name: str,
    keys: Keys,
    *,
    add: list[PublicKey],
    remove: list[PublicKey],
) -> tuple[OpenedRef, str, list[PublicKey]]:
    """Rewrap ref ``name`` for a new recipient list without touching its content: a new data
    key for a new index (same object keys, new recipients), sealed to each recipient, a new
    signed ref (counter above the old one) signed by ``keys.identity``. A removed recipient
    can open neither this signed ref nor any version published after it without it."""
    if keys.identity is None:
        raise UsageError("reseal needs --identity (a key the ref is sealed to, which signs)")
    oid, data = fetch_signed_ref(remote, name)
    where = f"ref {name!r} in {remote.url}"
    if not is_signed_ref(data):
        raise FormatError(f"{where}: not an encrypted (signed) ref; nothing to reseal")
    opened = open_signed_ref(
        keys, data, oid, lambda i, n: remote.get(i, expected_size=n), name=name, where=where,
        pin=False,
    )  # fmt: skip
    drop = {r.raw for r in remove}
    missing = [r for r in remove if r.raw not in {p.raw for p in opened.index.recipients}]
    if missing:
        raise UsageError(f"{where}: {missing[0].fingerprint} is not a recipient; nothing removed")
    recipients = _unique([r for r in opened.index.recipients if r.raw not in drop] + add)
    if not recipients:
        raise UsageError(f"{where}: resealing to nobody would make it unreadable; refused")
    old = opened.index
    index = Index(old.root_kind, old.mode, old.scope, old.root, recipients, dict(old.objects))
    ref_id, _ = write_sealed_ref(
        remote, name, index, keys.identity, opened.signed.counter, opened.signed.kind
    )
    return opened, ref_id, recipients


def _unique(keys: list[PublicKey]) -> list[PublicKey]:
    seen: set[bytes] = set()
    out = []
    for k in keys:
        if k.raw not in seen:
            seen.add(k.raw)
            out.append(k)
    return out


def _seekable(f: BinaryIO) -> bool:
    try:
        return f.seekable()
    except (AttributeError, ValueError):
        return False


# --------------------------------------------------------------------------- client side


class UnsealingRemote(Remote):
    """The client's view of its repositories: plaintext objects of every opened sealed ref
    (fetched encrypted from the repository it came from, decrypted as they stream), and the
    plain repository ``default`` for every other id."""

    def __init__(self, default: Remote | None, keys: Keys) -> None:
        self.default = default
        self.keys = keys
        self.url = default.url if default is not None else "sealed:"
        self._lock = threading.Lock()
        self._objects: dict[str, tuple[Remote, Index, IndexEntry]] = {}
        self._by_cipher: dict[str, tuple[Index, IndexEntry]] = {}
        self.opened: dict[str, OpenedRef] = {}  # by signed ref id

    @classmethod
    def for_ref(cls, remote: Remote, name: str, keys: Keys) -> UnsealingRemote:
        """``remote`` with its ref ``name`` opened (an encrypted image or template read through
        its address ``URL#NAME``): the ref's objects decrypted, any other id read plain. A
        plain ref is refused only where publishers are trusted (:meth:`resolve`)."""
        u = cls(remote, keys)
        u.resolve(remote, name)
        return u

    # -- opening refs -----------------------------------------------------------------------

    def resolve(self, remote: Remote, name: str) -> str:
        """The root id (template digest, image template id) ref ``name`` of ``remote`` names:
        a sealed ref is verified, opened and registered; a plain ref is refused when trusted
        publishers are configured (it is not signed)."""
        oid, data = fetch_signed_ref(remote, name)
        where = f"ref {name!r} in {remote.url}"
        if not is_signed_ref(data):
            if self.keys.trusted:
                raise SignatureError(
                    f"{where}: not a signed ref (publishers are trusted with --trust: unsigned "
                    "refs are refused)"
                )
            return oid
        return self.add_signed(remote, oid, data, name=name, where=where).digest

    def resolve_name(self, name: str) -> str:
        """:meth:`resolve` in the plain repository (what ``resolve_ref`` calls)."""
        if self.default is None:
            raise NotFound(f"no repository to look ref {name!r} up in")
        return self.resolve(self.default, name)

    def add_signed(
        self,
        remote: Remote,
        oid: str,
        data: bytes | None = None,
        *,
        name: str | None = None,
        where: str | None = None,
        pin: bool = True,
        fetch_index=None,
    ) -> OpenedRef:
        """Open the signed ref object ``oid`` of ``remote`` and serve its objects.
        ``data``/``fetch_index(id, size)``: its bytes and its index's, when kept elsewhere
        (a daemon's state); by default both are fetched from ``remote``."""
        where = where or f"signed ref {oid} in {remote.url}"
        if data is None:
            data = remote.get(oid, max_size=MAX_REF_OBJECT)
        opened = open_signed_ref(
            self.keys,
            data,
            oid,
            fetch_index or (lambda i, n: remote.get(i, expected_size=n)),
            name=name,
            where=where,
            pin=pin,
        )
        self.add(remote, opened)
        return opened

    def add(self, remote: Remote, opened: OpenedRef) -> None:
        idx = opened.index
        with self._lock:
            self.opened[opened.ref_id] = opened
            self._objects[idx.root.plain_oid] = (remote, idx, idx.root)
            self._by_cipher[idx.root.cipher_oid] = (idx, idx.root)
            for e in idx.objects.values():
                self._objects.setdefault(e.plain_oid, (remote, idx, e))
                self._by_cipher.setdefault(e.cipher_oid, (idx, e))

    def entry(self, oid: str) -> tuple[Remote, Index, IndexEntry] | None:
        with self._lock:
            return self._objects.get(oid)

    def by_cipher(self, cipher_oid: str) -> tuple[Index, IndexEntry] | None:
        """The index entry whose stored (encrypted) object is ``cipher_oid``, if any."""
        with self._lock:
            hit = self._by_cipher.get(cipher_oid)
        return hit

    # -- the Remote interface ---------------------------------------------------------------

    def has(self, oid: str) -> bool:
        hit = self.entry(oid)
        if hit is not None:
            return hit[0].has(hit[2].cipher_oid)
        return self.default is not None and self.default.has(oid)

    def iter_object(
        self,
        oid: str,
        block: int = BLOCK,
        *,
        expected_size: int | None = None,
        limit: int | None = None,
    ) -> Iterator[bytes]:
        check_object_id(oid)
        hit = self.entry(oid)
        if hit is None:
            if self.default is None:
                raise ObjectNotFound(
                    f"object {oid}: in no opened sealed ref and no plain repository", oid=oid
                )
            return self.default.iter_object(oid, block, expected_size=expected_size, limit=limit)
        remote, index, e = hit
        bound = fetch_bound(oid, expected_size, limit)
        if expected_size is not None and e.size != expected_size:
            raise size_mismatch(oid, e.size, expected_size, "the sealed index")
        if e.size > bound:
            raise too_large(oid, bound, "the sealed index")
        return self._decrypting(remote, index, e, block)

    @staticmethod
    def _decrypting(remote: Remote, index: Index, entry: IndexEntry, block: int) -> Iterator[bytes]:
        where = f"object {entry.plain_oid} (stored as {entry.cipher_oid} in {remote.url})"
        d = crypto.Decryptor(index.ctx(entry, where))
        blocks = remote.iter_object(entry.cipher_oid, block, expected_size=entry.cipher_size)
        try:
            for b in blocks:
                out = d.feed_block(b)
                if out:
                    yield out
            tail = d.finish()
        except DecryptionError:
            raise
        except VfsError as e:  # the repository names the stored id; say which object it is
            raise prefixed(e, f"object {entry.plain_oid}") from None
        finally:
            close = getattr(blocks, "close", None)
            if close is not None:
                close()
        if tail:
            yield tail

    def get_ref(self, name: str) -> str:
        if self.default is None:
            raise NotFound(f"no repository to look ref {name!r} up in")
        return self.default.get_ref(name)

    def list_refs(self) -> dict[str, str]:
        return {} if self.default is None else self.default.list_refs()

    def close(self) -> None:
        if self.default is not None:
            self.default.close()
