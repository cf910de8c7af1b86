"""The one error hierarchy of vfs.

Every layer raises these (never a bare OSError or ValueError for a condition the user can cause),
and only the edges translate them: the FUSE/NBD adapters to an errno (``.errno``), the CLIs to a
one-line message and an exit code (``.exit_code``).

::

    VfsError                      exit 1, EIO
    ├── UsageError                exit 2, EINVAL   bad arguments, bad paths, wrong flags
    │   └── InvalidObjectId       exit 2, EINVAL   not a well-formed object id ('../x', 'zz')
    ├── NotFound                  exit 4, ENOENT
    │   └── ObjectNotFound        exit 4, ENOENT   neither the store nor the remote has it
    ├── AlreadyExists             exit 4, EEXIST
    ├── IntegrityError            exit 5, EIO      bytes do not match their digest/checksum
    │   ├── CorruptionError       exit 5, EIO      on-disk metadata is inconsistent
    │   ├── SizeMismatch          exit 5, EIO      an object's length is not the size its
    │   │                                          reference (manifest, image) claims
    │   ├── DecryptionError       exit 5, EIO      ciphertext does not authenticate under its
    │   │                                          key (tampered, swapped, truncated, wrong key)
    │   └── SignatureError        exit 5, EIO      a signed ref is unsigned, wrongly signed,
    │       │                                      or signed by a publisher not trusted
    │       └── ReplayError       exit 5, EIO      a signed ref older than the newest one seen
    ├── FormatError               exit 6, EIO      not our format, or a malformed structure
    │   └── UnsupportedFeature    exit 6, EIO      a newer writer set a feature we cannot read
    ├── RemoteError               exit 7, EIO      the repository misbehaved (HTTP 5xx, TLS)
    │   └── RemoteUnavailable     exit 7, EIO      unreachable after bounded retries
    │       └── RemoteTimeout     exit 7, EIO      a fetch missed its deadline (stalled or
    │                                              slower than the rate floor)
    ├── StoreFull                 exit 8, ENOSPC   disk full or quota cannot be met
    ├── NoKeyError                exit 12, EACCES  no key opens it: a ref sealed to others, an
    │                                              encrypted template and no --identity
    ├── BusyError                 exit 9, EBUSY    in use (pinned, locked, mounted)
    ├── ReadOnlyError             exit 10, EROFS
    ├── WriteFailed               exit 11, EIO     an earlier write/fsync failed: nothing since
    │                                              the last commit is durable (reopen)
    ├── FsError                   exit 1, any      a plain file-system errno (ENOTEMPTY, EISDIR)
    ├── StaleHandle               exit 1, ESTALE   a shared inode must be looked up again
    ├── DaemonNotRunning          exit 3           no daemon answers on the control socket
    ├── ControlError              (daemon's code)  an error the daemon reported to a CLI
    └── Outcome                                    not a failure: a result a script tests by
        │                                          the exit code; no "error:" line
        ├── Differs               exit 1           the inputs differ (template diff
        │                                          --exit-code, vimg compare: as diff, cmp)
        ├── CheckCorruption       exit 2           vimg check found corruption it left
        │                                          (qemu-img check's code, not a usage error)
        └── CheckLeaks            exit 3           vimg check found only leaked clusters
                                                   (qemu-img check's code)

Outside the hierarchy, at the CLI edge only: 130 after Ctrl-C (SIGINT), 141 when stdout was
closed under a command (``vfsd ... | head``: it ends quietly, with the status a shell shows for
coreutils killed by SIGPIPE, 128 + 13).
"""

from __future__ import annotations

import errno as _errno
import os as _os


class VfsError(Exception):
    """Base of every error vfs raises on purpose."""

    errno: int = _errno.EIO
    exit_code: int = 1

    def __init__(self, message: str, **context: object) -> None:
        super().__init__(message)
        self.message = message
        #: Structured facts (object id, offset, path...) for logs and ``--json`` output.
        self.context = context

    def __str__(self) -> str:
        return self.message


class UsageError(VfsError):
    errno = _errno.EINVAL
    exit_code = 2


class InvalidObjectId(UsageError):
    pass


class NotFound(VfsError):
    errno = _errno.ENOENT
    exit_code = 4


class ObjectNotFound(NotFound):
    pass


class AlreadyExists(VfsError):
    errno = _errno.EEXIST
    exit_code = 4


class IntegrityError(VfsError):
    exit_code = 5


class CorruptionError(IntegrityError):
    pass


class SizeMismatch(IntegrityError):
    """An object's real length differs from the size its reference claims. The object itself
    may be genuine (its digest matches): the reference lies, so it is neither served nor
    quarantined."""


class DecryptionError(IntegrityError):
    """Ciphertext that does not authenticate under the key its reference gives: tampered,
    swapped, truncated or damaged (docs/encryption.md). No byte of it is served."""


class SignatureError(IntegrityError):
    """A signed ref whose signature is missing or wrong, or whose signer is not trusted."""


class ReplayError(SignatureError):
    """A correctly signed ref older than the newest one this client has seen (a replay)."""


class NoKeyError(VfsError):
    """Nothing this process holds opens an encrypted object or ref (no identity given, or the
    ref is sealed to other recipients)."""

    errno = _errno.EACCES
    exit_code = 12


class FormatError(VfsError):
    exit_code = 6


class UnsupportedFeature(FormatError):
    pass


class RemoteError(VfsError):
    exit_code = 7


class RemoteUnavailable(RemoteError):
    pass


class RemoteTimeout(RemoteUnavailable):
    """A fetch ran out of its overall deadline: the server stalled, or sent slower than the
    bytes-per-second floor once the grace period was over."""


class StoreFull(VfsError):
    errno = _errno.ENOSPC
    exit_code = 8


class BusyError(VfsError):
    errno = _errno.EBUSY
    exit_code = 9


class ReadOnlyError(VfsError):
    errno = _errno.EROFS
    exit_code = 10


class WriteFailed(VfsError):
    """An earlier write or fsync of this open file failed: data written since the last durable
    point may be lost, so every later write and flush fails too until the file is reopened
    (errseq semantics, as Linux reports a writeback error to every later fsync)."""

    exit_code = 11


class FsError(VfsError):
    """A file-system condition a VEE sees as a plain errno (ENOTEMPTY, EISDIR...)."""

    def __init__(self, err: int, message: str = "", **context: object) -> None:
        super().__init__(message or _os.strerror(err), **context)
        self.errno = err


class StaleHandle(VfsError):
    """A shared inode was about to be modified: the caller must look the name up again."""

    errno = _errno.ESTALE


class DaemonNotRunning(VfsError):
    exit_code = 3


class ControlError(VfsError):
    """An error the daemon reported over the control socket (its message and exit code)."""

    def __init__(self, message: str, exit_code: int) -> None:
        super().__init__(message)
        self.exit_code = exit_code


class Outcome(VfsError):
    """A result, not a failure, that a command reports by its exit code (diff's 1, qemu-img
    check's 2 and 3). The CLI edge prints its message as is (nothing if it is empty), without
    "error:", and exits with the code."""

    def __init__(self, message: str = "", **context: object) -> None:
        super().__init__(message, **context)


class Differs(Outcome):
    exit_code = 1


class CheckCorruption(Outcome):
    exit_code = 2


class CheckLeaks(Outcome):
    exit_code = 3


_OS_ERRORS: dict[int, type[VfsError]] = {
    _errno.ENOSPC: StoreFull,
    _errno.EDQUOT: StoreFull,
    _errno.EROFS: ReadOnlyError,
    _errno.EBUSY: BusyError,
    _errno.ENOENT: NotFound,
    _errno.EEXIST: AlreadyExists,
}


def from_os_error(e: OSError) -> VfsError:
    """The error of the hierarchy an OSError stands for at an edge (a CLI, the control socket):
    the one line says what failed and where, the class gives the exit code (ENOSPC: 8)."""
    cls = _OS_ERRORS.get(e.errno or 0, VfsError)
    where = f": {e.filename}" if e.filename else ""
    err = cls(f"{e.strerror or e}{where}")
    if cls is VfsError and e.errno:
        err.errno = e.errno
    return err
