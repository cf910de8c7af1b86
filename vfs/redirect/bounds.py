"""How many bytes a fetch may take, and the errors when an object breaks that bound.

Every fetch knows what it is fetching: a template file's size is in its manifest, a vimg remote
cluster is one cluster long. Callers pass it as ``expected_size`` (the object's exact length);
a fetch whose size nobody knows (a manifest, ``vfsd repo get ID``) passes a ``limit``. The
remote stops reading at the bound, so a server that sends more fills nothing (docs/redirect.md,
section 7).
"""

from __future__ import annotations

from vfs.errors import IntegrityError, SizeMismatch, UsageError
from vfs.redirect.objfile import MAX_SIZE


def fetch_bound(oid: str, expected_size: int | None, limit: int | None) -> int:
    """The most bytes a fetch of ``oid`` may take: the exact ``expected_size`` when the caller
    knows it, else ``limit``, else the format's object limit (16 TiB). Refuses nonsense."""
    for name, v in (("expected_size", expected_size), ("limit", limit)):
        if v is not None and (type(v) is not int or not 0 <= v <= MAX_SIZE):
            raise UsageError(f"object {oid}: invalid {name} {v!r}")
    if expected_size is not None:
        return expected_size
    return limit if limit is not None else MAX_SIZE


def size_mismatch(oid: str, actual: int, expected: int, where: str) -> SizeMismatch:
    """The object (or what ``where`` announces of it) is not as long as its reference says."""
    return SizeMismatch(
        f"object {oid}: {where} has {actual} bytes where {expected} were expected (the "
        "reference that names it, or the repository, lies); refused",
        oid=oid,
        actual=actual,
        expected=expected,
    )


def too_large(oid: str, bound: int, where: str) -> IntegrityError:
    """``where`` sent, or announced, more than a fetch may take."""
    return IntegrityError(
        f"object {oid}: {where} sent more than the expected {bound} bytes; cut off, refused",
        oid=oid,
        bound=bound,
    )
