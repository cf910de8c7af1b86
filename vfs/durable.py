"""Every durable write goes through here (borg's SaveFile habit).

The rule: write to a temporary file in the destination's own directory (or one on the same file
system), fsync it, rename it over the destination, fsync the directory. After a crash at any
instant the destination holds either the old complete content or the new complete content,
never a mixture; the worst left behind is a temporary file (named ``.tmp.<pid>.<random>``) that
the owner's next start removes.

Two shapes of the same rule:

- :func:`atomic_writer` / :func:`write_atomic`: the destination is known before the bytes
  (a config file, a registry, a ref);
- :func:`new_file`: it is known only after them (a content-addressed object, named by the
  digest of what was written): the caller commits the file under its name at the end, or
  drops it.
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
_FULL = (errno.ENOSPC, errno.EDQUOT)


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


class PendingFile:
    """A temporary file being written; :meth:`commit` makes it durable under its final name.

    Use through :func:`new_file`, which removes the temporary file unless it was committed.
    """

    def __init__(self, tmp_dir: str | os.PathLike[str], mode: int, buffering: int) -> None:
        self.tmp = tmp_name(tmp_dir)
        fd = os.open(self.tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, mode)
        self.file: BinaryIO = os.fdopen(fd, "wb", buffering=buffering)
        self.committed: Path | None = None

    def write(self, data: bytes | bytearray | memoryview) -> int:
        return self.file.write(data)

    def commit(self, dest: str | os.PathLike[str]) -> Path:
        """fsync the bytes, rename the file to ``dest`` (replacing it), fsync ``dest``'s
        directory. After this returns, ``dest`` survives a crash."""
        dest = Path(dest)
        self.file.flush()
        os.fsync(self.file.fileno())
        self.file.close()
        os.replace(self.tmp, dest)
        self.committed = dest
        fsync_dir(dest.parent)
        return dest

    def discard(self) -> None:
        with contextlib.suppress(OSError):
            self.file.close()
        if self.committed is None:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.tmp)


@contextlib.contextmanager
def new_file(
    tmp_dir: str | os.PathLike[str],
    *,
    mode: int = 0o644,
    buffering: int = -1,
    full_message: str | None = None,
) -> Iterator[PendingFile]:
    """A new temporary file in ``tmp_dir`` (on the destination's file system): write it, then
    ``commit(dest)``; leaving the block without a commit (or by an exception) removes it.
    ENOSPC/EDQUOT become :class:`StoreFull` (``full_message``, or a default naming the
    directory), so callers see one clear error and no partial file."""
    try:
        pending = PendingFile(tmp_dir, mode, buffering)
    except OSError as e:
        if e.errno in _FULL:
            raise StoreFull(full_message or f"no space left in {tmp_dir}") from e
        raise
    try:
        yield pending
    except OSError as e:
        pending.discard()
        if e.errno in _FULL:
            raise StoreFull(full_message or f"no space left in {tmp_dir}") from e
        raise
    finally:
        pending.discard()


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
    with new_file(
        tmp_dir or dest.parent, mode=mode, full_message=f"no space left writing {dest}"
    ) as pending:
        yield pending.file
        pending.commit(dest)


def write_atomic(dest: str | os.PathLike[str], data: bytes, *, mode: int = 0o644) -> None:
    """Replace ``dest`` with ``data`` durably (see module docstring)."""
    with atomic_writer(dest, mode=mode) as f:
        f.write(data)
