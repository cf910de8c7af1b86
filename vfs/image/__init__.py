"""vfs.image — the vimg disk-image format (spec: docs/vimg-format.md).

:class:`Image` is the public face (open/create, read/write/zeroes/discard/flush, block status,
snapshots, dirty bitmaps, VM state); it is a façade over modules with one job each:
``layout`` and ``header`` (the bytes), ``core`` (shared state, the active tables), ``reader``
(verified reads, codecs), ``writer`` (copy-on-write writes), ``commit`` (flush), ``alloc``
(refcounts, the copy-on-write rules), ``snapshots``, ``extents`` (block status), ``backing``
(chains). Around it: ``chain`` (commit, rebase), ``check`` (check, repair, verify), ``ops``
(map, info, convert, compare, measure), ``remote`` (push, pull, templates), ``fileio``,
``qemu`` (the qemu-img subprocess), ``bench``, ``qemuio`` and ``cli`` (the ``vimg`` command).
Nothing here knows of FUSE, NBD or QEMU's runtime; remote clusters go through a
``vfs.redirect.Resolver`` passed in.
"""

from vfs.image.check import CheckResult, check, verify
from vfs.image.extents import Extent
from vfs.image.image import Image

__all__ = ["CheckResult", "Extent", "Image", "check", "verify"]
