"""``vimg io``: a small qemu-io — pattern writes and checked reads for tests and scripts.

Commands (one per ``-c``): ``write [-P PATTERN] [-z] OFFSET LENGTH``, ``read [-P PATTERN]
OFFSET LENGTH``, ``discard OFFSET LENGTH``, ``flush``. Sizes take k/M/G suffixes. A read whose
bytes differ from the pattern is an error (IntegrityError → non-zero exit), unlike qemu-io.
"""

from __future__ import annotations

import shlex
import time
from collections.abc import Callable
from typing import Any

from vfs.errors import IntegrityError, UsageError
from vfs.units import parse_size


def _parse(cmd: str) -> tuple[str, dict[str, Any], list[int]]:
    try:
        words = shlex.split(cmd)
    except ValueError as e:
        raise UsageError(f"bad command {cmd!r}: {e}") from None
    if not words:
        raise UsageError("empty command")
    verb, args = words[0], words[1:]
    opts: dict[str, Any] = {}
    pos: list[int] = []
    it = iter(args)
    for a in it:
        if a == "-P":
            v = next(it, None)
            if v is None:
                raise UsageError(f"{verb}: -P needs a pattern")
            try:
                opts["pattern"] = int(v, 0)
            except ValueError:
                raise UsageError(f"{verb}: bad pattern {v!r}") from None
            if not 0 <= opts["pattern"] <= 255:
                raise UsageError(f"{verb}: pattern must be a byte (0..0xff)")
        elif a == "-z":
            opts["zero"] = True
        elif a.startswith("-") and not a[1:2].isdigit():
            raise UsageError(f"{verb}: unknown option {a}")
        else:
            pos.append(parse_size(a))
    return verb, opts, pos


def run_command(img: Any, cmd: str, echo: Callable[[str], None]) -> None:
    verb, opts, pos = _parse(cmd)
    t0 = time.perf_counter()
    if verb == "flush":
        img.flush()
        return
    if verb not in ("write", "read", "discard"):
        raise UsageError(f"unknown io command {verb!r} (write, read, discard, flush)")
    if len(pos) != 2:
        raise UsageError(f"{verb} needs OFFSET LENGTH")
    off, n = pos
    if verb == "write":
        if opts.get("zero"):
            img.write_zeroes(off, n)
        else:
            img.write(off, bytes([opts.get("pattern", 0xCD)]) * n)
        done = "wrote"
    elif verb == "discard":
        img.discard(off, n)
        done = "discard"
    else:
        data = img.read(off, n)
        if "pattern" in opts:
            p = opts["pattern"]
            if data.count(p) != n:
                bad = next(i for i in range(n) if data[i] != p)
                raise IntegrityError(
                    f"Pattern verification failed at offset {off + bad}, {n - bad} bytes"
                )
        done = "read"
    dt = time.perf_counter() - t0
    echo(f"{done} {n}/{n} bytes at offset {off}")
    rate = n / dt / (1 << 20) if dt > 0 else 0.0
    echo(
        f"{n} bytes, 1 ops; {dt:.4f} sec ({rate:.3f} MiB/sec and {1 / dt if dt else 0:.4f} ops/sec)"
    )
