"""Object ids: SHA-256 of the object's bytes, as 64 lowercase hex characters.

Why SHA-256 and not BLAKE2b-256 (docs/redirect.md has the long form): both are collision
resistant; SHA-256 runs on the SHA-NI instructions every current x86 and ARM server has
(hashlib's SHA-256 is faster than its BLAKE2b there), and it is what operators' other tools
(sha256sum, OCI registries, S3 checksums) already speak, so an object can be checked by hand.
Hex keeps ids safe in paths and URLs with no escaping.
"""

from __future__ import annotations

import hashlib
import re

from vfs.errors import InvalidObjectId

ALGORITHM = "sha256"
HEX_LEN = 64
_VALID = re.compile(r"[0-9a-f]{64}")


def object_id(data: bytes | bytearray | memoryview) -> str:
    """The id of ``data``."""
    return hashlib.sha256(data).hexdigest()


def new_hasher() -> hashlib._Hash:  # type: ignore[name-defined]
    """A streaming hasher whose ``hexdigest()`` is an object id."""
    return hashlib.sha256()


def check_object_id(text: object) -> str:
    """Return ``text`` if it is a well-formed id; refuse anything else (paths, '..', upper case).

    Every id that arrives from outside (manifests, image tables, command lines, URLs) passes
    through here before it is used to build a path, so ``../../etc/passwd`` never reaches the
    file system.
    """
    if not isinstance(text, str) or _VALID.fullmatch(text) is None:
        shown = repr(text)
        if len(shown) > 80:
            shown = shown[:77] + "..."
        raise InvalidObjectId(f"invalid object id {shown}: expected 64 lowercase hex digits")
    return text


def shard(oid: str) -> str:
    """Relative path of an object in a store or repository: ``ab/abcdef...``."""
    return f"{oid[:2]}/{oid}"
