"""Default locations of state, all under one configurable root.

``VFS_ROOT`` (default ``/var/lib/vfs``) holds ``store/`` (the host's object store) and per-daemon
state; every command also takes explicit paths, so tests and several instances run side by side.
Read at call time, never at import time.
"""

from __future__ import annotations

import os
from pathlib import Path


def vfs_root() -> Path:
    return Path(os.environ.get("VFS_ROOT", "/var/lib/vfs"))


def default_store() -> Path:
    return Path(os.environ.get("VFS_STORE", str(vfs_root() / "store")))
