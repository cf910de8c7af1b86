"""Host-cluster allocation and refcounts for one open image (in memory; persisted at commit).

Why a separate class: the copy-on-write rules of the crash model (docs/vimg-format.md, 5.2 and 9)
live here and only here — which clusters may be overwritten in place (*fresh*: allocated since
the last commit, refcount 1) and which freed clusters must wait for the next commit (*pending*:
still referenced by the committed header).
"""

from __future__ import annotations

import heapq
from array import array

from vfs.errors import CorruptionError, StoreFull
from vfs.image.layout import MAX_REFCOUNT


class Allocator:
    def __init__(self, counts: array, per_block: int) -> None:
        self.counts = counts
        self.per_block = per_block
        #: Clusters allocated since the last commit (no committed header references them).
        self.fresh: set[int] = set()
        #: Freed clusters the committed header still references: reusable after the commit.
        self.pending: set[int] = set()
        #: Refcount blocks changed since the last commit.
        self.dirty_blocks: set[int] = set()
        self._free = [i for i, c in enumerate(counts) if c == 0] if any(counts) else []
        heapq.heapify(self._free)

    @classmethod
    def empty(cls, per_block: int, host_clusters: int = 0) -> Allocator:
        """All counts zero (a reader's stand-in: readers never allocate)."""
        return cls(array("H", bytes(2 * host_clusters)), per_block)

    def __len__(self) -> int:
        return len(self.counts)

    def can_overwrite(self, c: int) -> bool:
        return c in self.fresh and self.counts[c] == 1

    def incref(self, c: int) -> None:
        n = self.counts[c]
        if n >= MAX_REFCOUNT:
            raise StoreFull(f"refcount of host cluster {c} would overflow (too many snapshots)")
        self.counts[c] = n + 1
        self.dirty_blocks.add(c // self.per_block)

    def decref(self, c: int) -> None:
        n = self.counts[c]
        if n == 0:
            raise CorruptionError(f"refcount of host cluster {c} would drop below zero")
        self.counts[c] = n - 1
        self.dirty_blocks.add(c // self.per_block)
        if n == 1:
            if c in self.fresh:
                self.fresh.discard(c)
                heapq.heappush(self._free, c)
            else:
                self.pending.add(c)

    def alloc(self) -> int:
        """One cluster, refcount 1, fresh. Lowest free index first (keeps the file compact)."""
        free, counts = self._free, self.counts
        while free:
            c = heapq.heappop(free)
            if c < len(counts) and counts[c] == 0 and c not in self.pending:
                return self._take(c)
        return self.alloc_run(1)

    def alloc_run(self, n: int) -> int:
        """``n`` contiguous clusters at the end of the file."""
        first = len(self.counts)
        self.counts.extend([0] * n)
        for c in range(first, first + n):
            self._take(c)
        return first

    def _take(self, c: int) -> int:
        self.counts[c] = 1
        self.fresh.add(c)
        self.dirty_blocks.add(c // self.per_block)
        return c

    def commit(self) -> list[int]:
        """The new header is durable: nothing is fresh, pending clusters become free.

        Returns the clusters freed by this commit (for the caller to punch out of the file)."""
        self.fresh.clear()
        freed = sorted(c for c in self.pending if self.counts[c] == 0)
        for c in freed:
            heapq.heappush(self._free, c)
        self.pending.clear()
        self.dirty_blocks.clear()
        return freed
