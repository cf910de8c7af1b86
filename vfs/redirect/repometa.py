"""Strict parsing of what a repository says about itself: vfs-repo.json, refs.json, refs/<name>.

Every one of these documents comes from a server or a directory we do not control (a lying
mirror, a damaged NFS export, a tenant's upload), so each is bounded in size before it is parsed,
refused past a small nesting depth, and checked for exact types and ranges after: a hostile
document is one :class:`FormatError` naming the file (or :class:`UnsupportedFeature` for a newer
repository), never a TypeError, a RecursionError or a quietly wrong value (``"features": "abc"``
is not ``['a', 'b', 'c']``, ``"version": true`` is not 1). The rules are in docs/redirect.md,
section 2.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass

from vfs.errors import FormatError, UnsupportedFeature, UsageError

REPO_FORMAT = "vfs-repo"
REPO_VERSION = 1
KNOWN_FEATURES: frozenset[str] = frozenset()

#: Size bounds, checked before a byte is parsed. vfs-repo.json is ~60 bytes; refs.json holds
#: ~100 bytes per ref (160,000 refs in 16 MiB); a ref file is one id and a newline.
MAX_META_BYTES = 64 << 10
MAX_REFS_BYTES = 16 << 20
MAX_REF_BYTES = 256
#: Deepest nesting of arrays/objects accepted in any repository JSON (valid ones have 2).
MAX_DEPTH = 16
MAX_FEATURES = 64

_REF_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:@+-]{0,127}")
_FEATURE = re.compile(r"[a-z0-9][a-z0-9_.-]{0,63}")
_OID = re.compile(r"[0-9a-f]{64}")


@dataclass(frozen=True)
class RepoMeta:
    """A validated vfs-repo.json."""

    version: int
    features: tuple[str, ...]


def is_ref_name(name: object) -> bool:
    """Ref names are single path components of safe characters: no '/', no '..', no NUL."""
    return isinstance(name, str) and _REF_NAME.fullmatch(name) is not None and ".." not in name


def check_ref_name(name: object) -> str:
    """``name`` if it is a valid ref name given by a user; UsageError otherwise."""
    if not is_ref_name(name):
        raise UsageError(
            f"invalid ref name {_shown(name)}: use letters, digits and . _ : @ + - (max 128)"
        )
    assert isinstance(name, str)
    return name


def _clip(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _shown(value: object, limit: int = 40) -> str:
    return _clip(repr(value), limit)


def _pairs(where: str):
    def hook(pairs: list[tuple[str, object]]) -> dict[str, object]:
        d = dict(pairs)
        if len(d) != len(pairs):
            seen: set[str] = set()
            for k, _ in pairs:
                if k in seen:
                    raise FormatError(f"{where}: duplicate key {_shown(k)}")
                seen.add(k)
        return d

    return hook


def _no_constant(where: str):
    def hook(name: str) -> object:
        raise FormatError(f"{where}: {name} is not a JSON value")

    return hook


def _depth(value: object) -> int:
    """Nesting depth of arrays/objects (iterative: no recursion on what the decoder built)."""
    deepest = 0
    stack = [(value, 1)]
    while stack:
        v, d = stack.pop()
        if isinstance(v, dict):
            items = v.values()
        elif isinstance(v, list):
            items = v
        else:
            continue
        deepest = max(deepest, d)
        if deepest > MAX_DEPTH:
            return deepest
        stack.extend((x, d + 1) for x in items)
    return deepest


def load_json(raw: bytes, where: str, limit: int) -> object:
    """Parse one repository JSON document: at most ``limit`` bytes, UTF-8, no duplicate keys,
    no NaN/Infinity, nested at most :data:`MAX_DEPTH` deep. FormatError naming ``where``."""
    if len(raw) > limit:
        raise FormatError(f"{where}: larger than {limit} bytes; refused before parsing")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise FormatError(f"{where}: not UTF-8 text (byte {e.start})") from None
    try:
        doc = json.loads(text, object_pairs_hook=_pairs(where), parse_constant=_no_constant(where))
    except RecursionError:
        # The C decoder stops at the interpreter's recursion limit (~1000 levels).
        raise FormatError(f"{where}: nested deeper than {MAX_DEPTH} levels") from None
    except ValueError as e:  # JSONDecodeError, and int() of a 5,000-digit number
        raise FormatError(f"{where}: not valid JSON ({_clip(str(e), 80)})") from None
    if _depth(doc) > MAX_DEPTH:
        raise FormatError(f"{where}: nested deeper than {MAX_DEPTH} levels")
    return doc


def parse_repo_meta(raw: bytes, where: str) -> RepoMeta:
    """Validate vfs-repo.json: ``{"format": "vfs-repo", "version": 1, "features": [...]}``.

    ``version`` is an integer >= 1 (not a bool, not a float); a version above
    :data:`REPO_VERSION` or an unknown feature is :class:`UnsupportedFeature`. ``features`` is a
    list of at most 64 distinct names ``[a-z0-9][a-z0-9_.-]{0,63}``. Other keys are ignored
    (room to grow), within the size and depth bounds.
    """
    doc = load_json(raw, where, MAX_META_BYTES)
    if not isinstance(doc, dict):
        raise FormatError(f"{where}: not a vfs repository (expected a JSON object)")
    fmt = doc.get("format")
    if fmt != REPO_FORMAT:
        raise FormatError(f"{where}: not a vfs repository (format {_shown(fmt)})")
    version = doc.get("version")
    if type(version) is not int:
        raise FormatError(f"{where}: version must be an integer, not {_shown(version)}")
    if version < 1:
        raise FormatError(f"{where}: invalid version {version} (versions start at 1)")
    if version > REPO_VERSION:
        raise UnsupportedFeature(
            f"{where}: repository version {version} is newer than this vfs ({REPO_VERSION})"
        )
    if "features" not in doc:
        raise FormatError(f"{where}: no features list")
    features = doc["features"]
    if not isinstance(features, list):
        raise FormatError(f"{where}: features must be a list, not {_shown(features)}")
    if len(features) > MAX_FEATURES:
        raise FormatError(f"{where}: more than {MAX_FEATURES} features")
    for f in features:
        if not isinstance(f, str) or _FEATURE.fullmatch(f) is None:
            raise FormatError(f"{where}: invalid feature name {_shown(f)}")
    if len(set(features)) != len(features):
        raise FormatError(f"{where}: a feature is listed twice")
    unknown = sorted(set(features) - KNOWN_FEATURES)
    if unknown:
        raise UnsupportedFeature(f"{where}: repository uses unknown features {unknown}")
    return RepoMeta(version, tuple(features))


def parse_refs_index(raw: bytes, where: str) -> dict[str, str]:
    """Validate refs.json: a JSON object mapping ref names to object ids, nothing else."""
    doc = load_json(raw, where, MAX_REFS_BYTES)
    if not isinstance(doc, dict):
        raise FormatError(f"{where}: expected a JSON object of ref names to object ids")
    for name, oid in doc.items():
        if not is_ref_name(name):
            raise FormatError(f"{where}: invalid ref name {_shown(name)}")
        if not isinstance(oid, str) or _OID.fullmatch(oid) is None:
            raise FormatError(f"{where}: ref {name!r} names no object id: {_shown(oid)}")
    return doc  # type: ignore[return-value]


def parse_ref(raw: bytes, where: str) -> str:
    """Validate a ref file: one object id (64 lowercase hex digits), optionally a newline."""
    if len(raw) > MAX_REF_BYTES:
        raise FormatError(f"{where}: larger than {MAX_REF_BYTES} bytes; not a ref")
    text = raw.decode("ascii", "replace").strip()
    if _OID.fullmatch(text) is None:
        raise FormatError(f"{where}: not an object id: {_shown(text)}")
    return text
