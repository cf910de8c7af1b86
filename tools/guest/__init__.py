"""A small bootable Linux guest for tests, built here from Debian packages and nothing else.

The kernel comes from a ``linux-image-*-cloud-amd64`` .deb and busybox from ``busybox-static``,
both fetched with ``apt-get download`` and unpacked with ``dpkg-deb -x`` (nothing is installed).
An initramfs is packed by our own newc writer (:mod:`tools.guest.cpio`): busybox, an init script
(``init.sh``) and the virtio modules in insmod order (:mod:`tools.guest.kmod`). The init mounts
``/dev/vda`` (ext4) when there is one, prints ``vfsguest: ready ...`` on the serial console and
runs the workloads named on the kernel command line (``vfsguest.run=dirty,append,poweroff``).

``build_guest()`` returns the cached build for the current inputs (building it the first time,
~3 s plus the download); ``make_disk()`` makes an ext4 disk image (``mkfs.ext4 -d``) and
``read_disk_file()`` reads a file back from one after the guest is gone. ``python -m tools.guest``
builds and prints where the guest is.
"""

from tools.guest.build import Guest, GuestBuildError, build_guest, cache_root, manifest
from tools.guest.disk import APPEND_LOG, make_disk, read_disk_file

__all__ = [
    "APPEND_LOG",
    "Guest",
    "GuestBuildError",
    "build_guest",
    "cache_root",
    "make_disk",
    "manifest",
    "read_disk_file",
]
