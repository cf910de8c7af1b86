"""``--keep-encrypted``: a local store that keeps the ciphertext of encrypted objects and
decrypts on read (docs/encryption.md §9.1).

:class:`SealedStoreResolver` is a :class:`vfs.redirect.Resolver` whose callers still name
objects by their plaintext ids (image clusters, template content); an id that an opened sealed
ref lists is kept in the store as its *encrypted* object, under the stored (ciphertext) id:

- a fetch streams the ciphertext into the store and, in the same pass, decrypts it chunk by
  chunk and hashes the plaintext: the object is installed only if every chunk authenticated,
  the plaintext hashes to its id and the ciphertext to its stored id (verified once, as a
  plain fetch is; nothing else differs, including single-flight and the process lock);
- a read decrypts only the 64 KiB chunks that cover it (:func:`vfs.redirect.crypto.read_range`),
  each authenticated under the object's key before a byte is returned, so a byte changed on
  the local disk is an error, not data;
- an id no opened ref lists is a plain object, stored and read as by :class:`Resolver`.

The keys live only in memory (the opened index); the store holds no key and no plaintext.
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import logging

from vfs.errors import DecryptionError, IntegrityError, ObjectNotFound, SizeMismatch, VfsError
from vfs.redirect import crypto
from vfs.redirect.bounds import size_mismatch, too_large
from vfs.redirect.resolver import Resolver
from vfs.redirect.sealed_refs import Index, IndexEntry, prefixed
from vfs.redirect.store import LocalStore

log = logging.getLogger(__name__)


class SealedStoreResolver(Resolver):
    """Plaintext ids in, ciphertext in the store. ``sealed`` is the
    :class:`vfs.redirect.sealed_remote.UnsealingRemote` whose opened refs say which ids are
    encrypted (and their keys); it is also the remote (stored ids and plain ids are passed
    through to the repository as they are)."""

    def __init__(self, store: LocalStore, sealed) -> None:
        super().__init__(store, sealed)
        self.sealed = sealed

    def _sealed(self, oid: str) -> tuple[Index, IndexEntry] | None:
        hit = self.sealed.entry(oid)
        return None if hit is None else (hit[1], hit[2])

    def _ctx(self, index: Index, e: IndexEntry) -> crypto.ObjectContext:
        where = f"object {e.plain_oid} (kept encrypted as {e.cipher_oid} in {self.store.root})"
        return index.ctx(e, where)

    # -- presence and fetch ----------------------------------------------------------------

    def has_local(self, oid: str) -> bool:
        hit = self._sealed(oid)
        return self.store.has(oid if hit is None else hit[1].cipher_oid)

    def ensure(self, oid: str, *, expected_size=None, max_size=None, size_hint=None) -> None:
        hit = self._sealed(oid)
        if hit is None:
            return super().ensure(
                oid, expected_size=expected_size, max_size=max_size, size_hint=size_hint
            )
        e = hit[1]
        expected_size = size_hint if expected_size is None else expected_size
        if expected_size is not None and expected_size != e.size:
            raise size_mismatch(oid, e.size, expected_size, "the sealed index")
        if max_size is not None and e.size > max_size:
            raise too_large(oid, max_size, "the sealed index")
        super().ensure(e.cipher_oid, expected_size=e.cipher_size)

    def _fetch(self, oid: str, expected_size: int | None, bound: int) -> None:
        hit = self.sealed.by_cipher(oid)
        if hit is None:
            return super()._fetch(oid, expected_size, bound)
        index, e = hit
        assert self.remote is not None
        url = self.remote.url
        log.info("fetching %s (encrypted %s) from %s", e.plain_oid, oid, url)
        d = crypto.Decryptor(self._ctx(index, e))
        h = hashlib.sha256()
        blocks = self.remote.iter_object(oid, expected_size=e.cipher_size)
        try:
            with contextlib.closing(blocks):
                first = next(blocks, b"")  # headers first: a lying length stops here
                with self.store.new_object(expected_size=e.cipher_size) as pending:
                    for block in itertools.chain((first,), blocks):
                        pending.write(block)
                        h.update(d.feed_block(block))
                    h.update(d.finish())
                    if pending.received != e.cipher_size:
                        raise size_mismatch(oid, pending.received, e.cipher_size, url)
                    if h.hexdigest() != e.plain_oid:
                        raise IntegrityError(
                            f"decrypted bytes from {url} do not match the id; refused, "
                            "nothing stored",
                            oid=e.plain_oid,
                        )
                    pending.commit(expected=oid)
        except DecryptionError:
            raise  # names the object already
        except VfsError as err:  # the repository names the stored id; say which object it is
            raise prefixed(err, f"object {e.plain_oid}") from None
        self.fetches += 1
        self.fetched_bytes += pending.received

    # -- reads: decrypt the chunks that cover the range -------------------------------------

    def _decrypt_range(self, index, e, offset: int, size: int, *, local_only: bool):
        cipher = e.cipher_oid

        def read(off: int, n: int) -> bytes:
            return self.store.read(cipher, off, n, expected_size=e.cipher_size)

        if local_only and not self.store.has(cipher):
            return None
        return crypto.read_range(self._ctx(index, e), read, offset, size)

    def read_local(self, oid, offset, size, *, drop_cache=False, expected_size=None):
        hit = self._sealed(oid)
        if hit is None:
            return super().read_local(
                oid, offset, size, drop_cache=drop_cache, expected_size=expected_size
            )
        index, e = hit
        if expected_size is not None and expected_size != e.size:
            raise size_mismatch(oid, e.size, expected_size, "the sealed index")
        try:
            return self._decrypt_range(index, e, offset, size, local_only=True)
        except (DecryptionError, SizeMismatch):
            raise
        except ObjectNotFound:
            return None
        except IntegrityError:
            return None  # damaged on disk: the store dropped it; fetched again

    def read(self, oid, offset, size, *, drop_cache=False, expected_size=None) -> bytes:
        hit = self._sealed(oid)
        if hit is None:
            return super().read(
                oid, offset, size, drop_cache=drop_cache, expected_size=expected_size
            )
        index, e = hit
        for attempt in (0, 1):
            self.ensure(oid, expected_size=expected_size)
            try:
                return self._decrypt_range(index, e, offset, size, local_only=False)
            except (DecryptionError, SizeMismatch):
                raise
            except (ObjectNotFound, IntegrityError):
                # evicted meanwhile, or damaged on disk (the store dropped it): once more
                if attempt:
                    raise
                log.warning("object %s (kept encrypted) damaged or gone: fetching it again", oid)
        raise AssertionError("unreachable")

    def get(self, oid, *, expected_size=None, max_size=None) -> bytes:
        hit = self._sealed(oid)
        if hit is None:
            return super().get(oid, expected_size=expected_size, max_size=max_size)
        if max_size is not None and hit[1].size > max_size:
            raise too_large(oid, max_size, "the sealed index")
        return self.read(oid, 0, hit[1].size, expected_size=expected_size)

    def size(self, oid: str) -> int:
        hit = self._sealed(oid)
        return super().size(oid) if hit is None else hit[1].size
