"""Sizes and durations as people write them (``64k``, ``10G``, ``90s``, ``7d``): parsed once, for
every command line and for the qemu-io command language of ``vimg io``.
"""

from __future__ import annotations

import math

from vfs.errors import UsageError


def parse_size(text: str) -> int:
    """'64k', '1M', '10G', '512' → bytes (binary units, as qemu-img): a clear UsageError for
    anything else, including 'nan', 'inf', a sign, and numbers too large to be a size."""
    t = text.strip()
    if not t or not (t[0].isdigit() or t[0] == "."):
        raise UsageError(f"invalid size {text!r}")
    units = {"": 1, "b": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40, "p": 1 << 50}
    num = t.rstrip("bBkKmMgGtTpPiI")
    suffix = t[len(num) :].lower().replace("ib", "").replace("i", "")
    if suffix not in units:
        raise UsageError(f"invalid size {text!r}")
    try:
        value = float(num)
    except ValueError:
        raise UsageError(f"invalid size {text!r}") from None
    if not math.isfinite(value):
        raise UsageError(f"invalid size {text!r}: not a finite number")
    if value < 0:
        raise UsageError(f"invalid size {text!r}: negative")
    try:
        n = int(value * units[suffix])
    except OverflowError:
        raise UsageError(f"invalid size {text!r}") from None
    if n > 1 << 63:
        raise UsageError(f"size {text!r} is too large")
    return n


_DURATION_UNITS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


def parse_duration(text: str) -> float:
    """'90', '90s', '10m', '2h', '7d', '1w' → seconds (a finite number >= 0)."""
    t = text.strip().lower()
    num = t.rstrip("smhdw")
    unit = t[len(num) :]
    if unit not in _DURATION_UNITS:
        raise UsageError(f"invalid duration {text!r} (e.g. 30s, 10m, 2h, 7d)")
    try:
        value = float(num)
    except ValueError:
        raise UsageError(f"invalid duration {text!r} (e.g. 30s, 10m, 2h, 7d)") from None
    if not math.isfinite(value) or value < 0:
        raise UsageError(f"invalid duration {text!r}: a finite number >= 0")
    return value * _DURATION_UNITS[unit]
