"""vfs.export — vimg images served to guests and tools.

An adapter layer over :mod:`vfs.image` (which knows nothing of it): the NBD protocol core
(:mod:`~vfs.export.protocol`, sans I/O), the export core both adapters share
(:mod:`~vfs.export.backend`: gate, fetches off the loop, flush, block status, dirty maps,
hydration), the NBD server (:mod:`~vfs.export.nbd_server`), the FUSE raw file
(:mod:`~vfs.export.fuse_raw`), one export process's lifetime (:mod:`~vfs.export.service`),
the exports of ``vfsd serve`` (:mod:`~vfs.export.supervisor`) and the Python API of a running
export (:mod:`~vfs.export.client`). Design and commands: ``docs/export.md``.
"""

from vfs.export.client import ExportControl, NbdClient, NbdError, blockdev_spec

__all__ = ["ExportControl", "NbdClient", "NbdError", "blockdev_spec"]
