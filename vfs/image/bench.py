"""``vimg bench``: the request loop of ``qemu-img bench`` over a vimg (or raw) image.

Same meaning of the parameters and the same offset walk (offset += step, modulo the image size),
so one command line can run against qemu-img and vimg and the numbers compare. Requests are
issued one at a time (this is a synchronous Python core; ``depth`` is accepted and reported).
"""

from __future__ import annotations

import time
from typing import Any


def run_bench(
    img: Any,
    *,
    count: int,
    size: int,
    step: int,
    offset: int = 0,
    write: bool = False,
    pattern: int = 0xA5,
    flush_interval: int = 0,
    no_flush: bool = False,
) -> float:
    """Issue ``count`` requests of ``size`` bytes; return the elapsed seconds."""
    image_size = img.size
    if size <= 0 or size > image_size:
        from vfs.errors import UsageError

        raise UsageError(f"buffer size {size} must be 1..{image_size} (the image size)")
    buf = bytes([pattern]) * size
    off = offset % image_size
    t0 = time.perf_counter()
    for i in range(1, count + 1):
        if off + size > image_size:
            off = 0
        if write:
            img.write(off, buf)
            if flush_interval and i % flush_interval == 0:
                img.flush()
        else:
            img.read(off, size)
        off = (off + step) % image_size
    elapsed = time.perf_counter() - t0
    # As qemu-img bench: the clock stops before the image is closed (and flushed); only
    # --flush-interval flushes count.
    if write and not no_flush:
        img.flush()
    return elapsed
