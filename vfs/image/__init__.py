"""vfs.image — the vimg disk-image format (spec: docs/vimg-format.md).

Modules, each with one job: ``layout`` (the bytes), ``alloc`` (refcounts and the copy-on-write
rules), ``image`` (the :class:`Image` core: read/write/flush/resize), ``snapshots``, ``chain``
(commit, rebase), ``check`` (check, repair, verify), ``ops`` (map, info, convert, compare,
measure), ``remote`` (push, pull, templates), ``fileio``, ``qemu`` (the qemu-img subprocess),
``bench``, ``qemuio`` and ``cli`` (the ``vimg`` command). Nothing here knows of FUSE, NBD or
QEMU's runtime; remote clusters go through a ``vfs.redirect.Resolver`` passed in.
"""

from vfs.image.check import CheckResult, check, verify
from vfs.image.image import Image

__all__ = ["CheckResult", "Image", "check", "verify"]
