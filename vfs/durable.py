"""Every durable write goes through here (borg's SaveFile habit).

The rule: write to a temporary file in the destination's own directory, fsync it, rename it over
the destination, fsync the directory. After a crash at any instant the destination holds either
the old complete content or the new complete content, never a mixture; the worst left behind is
a temporary file (named ``.tmp.<pid>.<random>``) that the owner's next start removes.
"""

from __future__ import annotations

import contextlib
import errno
import os
import secrets
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

from vfs.errors import StoreFull

TMP_PREFIX = ".tmp."


def fsync_dir(where: str | os.PathLike[str] | int) -> None:
    """Make a directory's entries durable: ``where`` is its path, or an fd of it (also an
    ``O_PATH`` fd, which fsync refuses: the directory is reopened through /proc)."""
    path = f"/proc/self/fd/{where}" if isinstance(where, int) else where
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def tmp_name(directory: str | os.PathLike[str]) -> Path:
    return Path(directory) / f"{TMP_PREFIX}{os.getpid()}.{secrets.token_hex(6)}"


def tmp_owner_pid(name: str) -> int | None:
    """The pid encoded in a temporary file name, or None if it is not one of ours."""
    if not name.startswith(TMP_PREFIX):
        return None
    try:
        return int(name[len(TMP_PREFIX) :].split(".", 1)[0])
    except ValueError:
        return None


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@contextlib.contextmanager
def atomic_writer(
    dest: str | os.PathLike[str],
    *,
    tmp_dir: str | os.PathLike[str] | None = None,
    mode: int = 0o644,
) -> Iterator[BinaryIO]:
    """Yield a file; on clean exit it is fsynced and atomically renamed to ``dest``.

    ``tmp_dir`` must be on the same file system as ``dest`` (default: dest's directory). On any
    exception the temporary file is removed and ``dest`` is untouched. ENOSPC/EDQUOT become
    :class:`StoreFull` so callers see one clear error and no partial file.
    """
    dest = Path(dest)
    tmp = tmp_name(tmp_dir or dest.parent)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, mode)
    f = os.fdopen(fd, "wb")
    try:
        yield f  # type: ignore[misc]
        f.flush()
        os.fsync(f.fileno())
        f.close()
        os.replace(tmp, dest)
        fsync_dir(dest.parent)
    except BaseException as e:
        with contextlib.suppress(OSError):
            f.close()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
            raise StoreFull(f"no space left writing {dest}") from e
        raise


def write_atomic(dest: str | os.PathLike[str], data: bytes, *, mode: int = 0o644) -> None:
    """Replace ``dest`` with ``data`` durably (see module docstring)."""
    with atomic_writer(dest, mode=mode) as f:
        f.write(data)
