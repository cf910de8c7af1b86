"""``vimg bench``: the request loop of ``qemu-img bench`` over a vimg (or raw) image.

Same meaning of the parameters and the same offset walk (offset += step, modulo the image size),
so one command line can run against qemu-img and vimg and the numbers compare. Requests are
issued one at a time (this is a synchronous Python core; ``depth`` is accepted and reported),
from one preallocated buffer (reads use ``readinto``: no allocation per request).
"""

from __future__ import annotations

import ctypes
import mmap
import time
from typing import Any

_HUGE = 2 << 20


def request_buffer(size: int, fill: int = 0) -> memoryview:
    """The one buffer every request uses, allocated the way QEMU allocates guest RAM: anonymous
    memory, 2 MiB-aligned and advised for transparent huge pages (MADV_HUGEPAGE; plain pages
    where the kernel says no). A 1 MiB copy into or out of a buffer on 4 KiB pages is
    markedly slower than on a huge page: without this the benchmark measures the buffer's pages
    rather than the image."""
    m = mmap.mmap(-1, size + _HUGE)
    try:
        m.madvise(mmap.MADV_HUGEPAGE)
    except (AttributeError, OSError):
        pass
    addr = ctypes.addressof(ctypes.c_char.from_buffer(m))
    start = -addr % _HUGE
    buf = memoryview(m)[start : start + size]
    if fill:
        buf[:] = bytes([fill]) * size
    return buf


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
    # One preallocated buffer, as qemu-img bench's: reads fill it in place (``readinto``).
    buf = request_buffer(size, pattern if write else 0)
    off = offset % image_size
    op = img.write if write else img.readinto
    t0 = time.perf_counter()
    if write and flush_interval:
        for i in range(1, count + 1):
            if off + size > image_size:
                off = 0
            op(off, buf)
            if i % flush_interval == 0:
                img.flush()
            off = (off + step) % image_size
    else:
        for _ in range(count):
            if off + size > image_size:
                off = 0
            op(off, buf)
            off = (off + step) % image_size
    elapsed = time.perf_counter() - t0
    # As qemu-img bench: the clock stops before the image is closed (and flushed); only
    # --flush-interval flushes count.
    if write and not no_flush:
        img.flush()
    return elapsed
