"""push / pull (hydrate): move an image's clusters to and from a repository.

Crash story: ``push`` stores each cluster's object durably in the repository (the remote's
``put`` returns only after fsync+rename) *before* the image's entry points at it, and the entry
changes reach the disk only at a commit (every ``batch`` clusters and at the end). ``pull`` writes
the fetched bytes to fresh local clusters and commits the same way. A crash at any moment leaves
a consistent image whose entries are either the old or the new kind; running the command again
continues where the last commit left off (that is what makes them resumable).

Templates: a fully pushed image can be published under a ref name as a small metadata-only
image (an object itself); ``fetch_template`` brings it to another host, where its clusters are
fetched on demand (second redirection) or hydrated, and where overlays can use it as backing.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable
from typing import Any

from vfs.errors import FormatError, IntegrityError, UsageError
from vfs.image import layout as L
from vfs.image.image import Image

log = logging.getLogger(__name__)

Progress = Callable[[int, int], None]


def _stored(img: Image, kinds: tuple[int, ...]) -> list[int]:
    return [ci for ci, e in img.iter_entries() if e.kind in kinds]


def push(
    img: Image,
    remote: Any,
    *,
    store: Any = None,
    batch: int = 256,
    progress: Progress | None = None,
) -> int:
    """Turn every local (or compressed) cluster of the active image into a remote object.

    ``remote`` needs ``put(data) -> oid``; ``store`` (optional, a LocalStore) keeps a local copy
    so reads stay local. Returns the number of clusters pushed.
    """
    todo = _stored(img, (L.LOCAL, L.COMPRESSED))
    for done, ci in enumerate(todo, 1):
        e = img.entry(ci)
        data = img.cluster_data(ci, e)  # verified against the entry's xxh3
        oid = remote.put(data)
        if bytes.fromhex(oid) != hashlib.sha256(data).digest():
            raise IntegrityError(f"repository returned object id {oid} for other content")
        if store is not None:
            store.put(data)
        img.set_remote(ci, bytes.fromhex(oid), e.checksum)
        if done % batch == 0:
            img.flush()
        if progress:
            progress(done, len(todo))
    img.flush()
    return len(todo)


def pull(
    img: Image, *, batch: int = 64, progress: Progress | None = None, parallel: int = 8
) -> int:
    """Fetch every remote cluster (through ``img.resolver``) back into the image file.

    Fetches run ``parallel`` at a time ahead of the writer (the resolver's ``ensure`` is
    thread-safe and single-flight), so hydrating over HTTP is not one round trip per cluster;
    the image itself is only touched by the calling thread. Returns the number of clusters
    hydrated; 0 when there was nothing left to do.
    """
    from concurrent.futures import Future, ThreadPoolExecutor

    todo = _stored(img, (L.REMOTE,))
    ensure = getattr(img.resolver, "ensure", None)
    pool = ThreadPoolExecutor(parallel) if ensure is not None and parallel > 1 else None
    ahead: dict[int, Future] = {}
    cs = img.cluster_size
    try:
        for done, ci in enumerate(todo, 1):
            if pool is not None:
                for j in range(done - 1, min(done - 1 + 2 * parallel, len(todo))):
                    if j not in ahead:
                        oid = img.entry(todo[j]).oid.hex()
                        ahead[j] = pool.submit(ensure, oid, expected_size=cs)
                ahead.pop(done - 1).result()  # a failed fetch fails here, in order
            data = img.read_cluster(ci)  # from the store now: SHA-256 and xxh3 verified
            img.store_cluster(ci, data)
            if done % batch == 0:
                img.flush()
            if progress:
                progress(done, len(todo))
    finally:
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)
    img.flush()
    return len(todo)


def remote_objects(img: Image) -> list[str]:
    """Object ids the active image refers to (for pinning, prefetch, listing)."""
    return [e.oid.hex() for _ci, e in img.iter_entries() if e.kind == L.REMOTE]


def publish_template(img: Image, remote: Any, name: str) -> str:
    """Publish the (fully pushed) active image as a *template*: a compact metadata-only vimg
    file stored as an object, named by the ref ``name``. Returns the template's object id.

    The file is rebuilt rather than copied: the pushed image's file still holds the freed local
    clusters' bytes, which must not travel (and would make the template as big as the data).
    Snapshots are not part of a template; an image with a backing file cannot be one.
    """
    _check_template_source(img)
    left = _stored(img, (L.LOCAL, L.COMPRESSED))
    if left:
        raise UsageError(f"{len(left)} clusters are still local: push them first")
    oid = _put_template(img, remote, lambda ci, e: e.oid)
    remote.set_ref(name, oid)
    return oid


def publish_sealed(
    img: Image, sealing: Any, name: str, *, store: Any = None, progress: Progress | None = None
) -> tuple[str, int]:
    """Publish the active image encrypted as template ``name`` through ``sealing`` (a
    :class:`vfs.redirect.sealed_remote.SealingRemote`): every stored cluster (local, compressed
    or remote: a remote one is fetched and verified first unless the previous version of the
    ref already holds it) becomes an encrypted object, then the metadata-only template, then
    the index, the signed ref and the ref (``sealing.set_ref``). Returns (template id, clusters).

    Unlike :func:`push`, the image itself is not changed: its clusters stay where they are
    (an encrypted object cannot be named from the image without the ref's index, so turning
    entries into remote ones would tie the file to one ref). That also makes it idempotent:
    killed anywhere, run it again; with convergent keys the objects already sent are the
    same ciphertext under the same ids and are not sent again (docs/encryption.md §10).
    ``store``: also keep each cluster's plaintext in this local store.
    """
    _check_template_source(img)
    todo = [(ci, e) for ci, e in img.iter_entries() if e.kind in (L.LOCAL, L.COMPRESSED, L.REMOTE)]
    oids: dict[int, bytes] = {}
    for done, (ci, e) in enumerate(todo, 1):
        if e.kind == L.REMOTE and sealing.has(e.oid.hex()):
            oids[ci] = e.oid
        else:
            data = img.cluster_data(ci, e)  # verified (xxh3; a remote one also by SHA-256)
            oid = sealing.put(data)
            if bytes.fromhex(oid) != hashlib.sha256(data).digest():
                raise IntegrityError(f"sealing layer returned object id {oid} for other content")
            if store is not None:
                store.put(data)
            oids[ci] = bytes.fromhex(oid)
        if progress:
            progress(done, len(todo))
    oid = _put_template(img, sealing, lambda ci, e: oids[ci])
    sealing.set_ref(name, oid)
    return oid, len(todo)


def _check_template_source(img: Image) -> None:
    if img.backing_name:
        raise UsageError("an image with a backing file cannot be published as a template")


def _put_template(img: Image, remote: Any, oid_of: Callable[[int, L.Entry], bytes]) -> str:
    """Build the metadata-only template of ``img`` (every stored cluster a remote entry named
    ``oid_of(ci, entry)``, zeros kept) and put it into ``remote``; its object id."""
    import os
    import tempfile

    with tempfile.TemporaryDirectory(prefix="vimg-template-") as d:
        path = os.path.join(d, "template.vimg")
        with Image.create(path, img.size, cluster_size=img.cluster_size) as t:
            cs = img.cluster_size
            for ci, e in img.iter_entries():
                if e.kind in (L.REMOTE, L.LOCAL, L.COMPRESSED):
                    t.set_remote(ci, oid_of(ci, e), e.checksum)
                elif e.kind == L.ZERO:
                    t.write_zeroes(ci * cs, min(cs, img.size - ci * cs))
        return remote.put_file(path)


def fetch_template(remote: Any, name: str, dest: str) -> str:
    """Fetch template ``name`` into a new file ``dest`` (durably, all or nothing); its clusters
    stay remote until read or pulled. Returns the template's object id."""
    import os

    from vfs.durable import write_atomic
    from vfs.errors import AlreadyExists

    if os.path.exists(dest):
        raise AlreadyExists(f"{dest}: file exists")
    # an encrypted ref is opened (verified, decrypted) by a remote that can: its root id
    resolve = getattr(remote, "resolve_name", None)
    oid = resolve(name) if resolve is not None else remote.get_ref(name)
    data = remote.get(oid, max_size=1 << 30)  # verified against its SHA-256
    if not any(data[o : o + 8] == L.MAGIC for o in L.HEADER_COPY_OFFSETS):
        raise FormatError(f"ref {name!r} does not name a vimg image")
    write_atomic(dest, data)
    try:
        Image.open(dest, readonly=True).close()  # a damaged template is refused at once
    except BaseException:
        os.unlink(dest)
        raise
    return oid
