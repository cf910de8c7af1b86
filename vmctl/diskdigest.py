"""A disk's content digest: what ties a hibernated guest's memory to the disk it knew.

QEMU does not tie saved state to disk contents, and neither a path nor an mtime nor the image's
structure does either: the same disk may come back as another file (copied, moved, pushed to a
repository and fetched on demand on another host: then its clusters are remote objects and it
has no snapshots), and another disk may sit at the same path. So the bundle records, for each
disk, a SHA-256 over its *contents* (docs/vmctl-bundle.md 2.2), and a restore recomputes it:

    digest = SHA-256("vmctl-disk-sha256-v1\\0" || u64 virtual_size || u32 cluster_size
                     || h(0) || h(1) || ... || h(n-1))        (big-endian integers)

with ``h(i)`` the SHA-256 of the guest's cluster ``i`` (``cluster_size`` bytes, zeros past the
end of the disk). It is computed from the image's entries without fetching anything remote: a
REMOTE cluster's object id *is* that SHA-256 (vimg format 4.2), a ZERO or unallocated cluster
with nothing below is the hash of zeros, a LOCAL or COMPRESSED cluster is read (verified) and
hashed; unallocated clusters come from the backing image's entries in the same way (or, from a
raw backing file or a backing image of another cluster size, by reading it). The cost is one
local read of the disk's local data (about 1 s per GiB here), none for remote data.
"""

from __future__ import annotations

import hashlib
import struct
from typing import Any

from vfs.image import layout as L

ALGORITHM = "vmctl-disk-sha256-v1"


def _layer_hashes(img: Any, cs: int, n: int) -> dict[int, bytes]:
    """SHA-256 of each cluster this layer itself holds (guest cluster -> digest)."""
    out: dict[int, bytes] = {}
    zero = hashlib.sha256(bytes(cs)).digest()
    for ci, e in img.iter_entries():
        if ci >= n:
            break
        if e.kind == L.ZERO:
            out[ci] = zero
        elif e.kind == L.REMOTE:
            out[ci] = bytes(e.oid)
        else:  # LOCAL, COMPRESSED: the verified bytes
            out[ci] = hashlib.sha256(img.cluster_data(ci, e)).digest()
    return out


def _below(img: Any, cs: int, n: int) -> dict[int, bytes]:
    """Digests of the clusters the backing chain of ``img`` provides (all of 0..n-1)."""
    from vfs.image import Image

    zero = hashlib.sha256(bytes(cs)).digest()
    backing = img.backing
    if backing is None:
        return dict.fromkeys(range(n), zero)
    if isinstance(backing, Image) and backing.cluster_size == cs:
        own = _layer_hashes(backing, cs, n)
        rest = _below(backing, cs, n)
        # Past the backing image's end the guest reads zeros, whatever lies below it.
        limit = -(-backing.size // cs)
        return {ci: own.get(ci, rest[ci]) if ci < limit else zero for ci in range(n)}
    out = {}
    for ci in range(n):  # a raw file, or another cluster size: read what the guest would see
        off = ci * cs
        data = backing.read(off, max(0, min(cs, backing.size - off))) if off < backing.size else b""
        out[ci] = hashlib.sha256(bytes(data) + bytes(cs - len(data))).digest()
    return out


def disk_digest(img: Any) -> dict[str, Any]:
    """The content digest of the active disk of an open vimg image (blocking)."""
    cs = img.cluster_size
    n = -(-img.size // cs)
    own = _layer_hashes(img, cs, n)
    missing = [ci for ci in range(n) if ci not in own]
    below = _below(img, cs, n) if missing else {}
    h = hashlib.sha256(ALGORITHM.encode() + b"\0" + struct.pack(">QI", img.size, cs))
    for ci in range(n):
        h.update(own.get(ci) or below[ci])
    return {"algorithm": ALGORITHM, "cluster_size": cs, "sha256": h.hexdigest()}
