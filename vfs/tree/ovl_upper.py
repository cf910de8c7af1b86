"""What kernel overlayfs adds to a private layer, made plain for the FUSE engine and upgrades.

The private layer is overlayfs's upper format in both engines (``docs/vee-layer.md`` §2), but
a kernel overlay mounted with ``metacopy=on,redirect_dir=on`` (the kernel engine) writes two
things the FUSE engine's view does not read:

- **metadata-only copies**: a chmod, chown, xattr change, utimes or rename of an unmodified
  template file copies up only its metadata: the upper file is a sparse file of the right size
  with ``trusted.overlay.metacopy``, whose bytes are still the lower file's, found by the
  file's own ``trusted.overlay.redirect`` (a renamed file) or else by its path under its
  directory's lower path;
- **relative directory redirects**: a directory renamed within its parent gets
  ``trusted.overlay.redirect = <old name>`` (no leading ``/``), relative to the parent's
  lower directory.

:func:`normalize_upper` turns both into the forms every reader understands: a metacopy file
becomes a full copy (the template's bytes, the upper file's owner, mode, times and xattrs), a
relative redirect becomes the absolute one. A VEE reads exactly the same through either engine
before and after. It runs when a layer the kernel engine used is opened by the FUSE engine, and
before a kernel-engine VEE moves to another template (a metacopy file would otherwise take its
bytes from the *new* template's file at that path; a private file must win, as it does in the
FUSE engine).

The marker that a layer needs it: the kernel engine's overlay work directory
``vees/<name>/ovl-work`` exists (:data:`KERNEL_WORK`), and it is removed only once the whole
layer is normalized. Crash story: each metacopy file is completed in ``work/`` (content, owner,
mode, xattrs, times, fsync) and renamed over the stub, then the directory is fsynced; each
relative redirect is rewritten in place (one xattr write). A crash leaves every file either a
stub or a full copy and the marker in place, so the next open runs it again and finishes (it is
idempotent); a temp file left in ``work/`` is cleaned by the next :class:`PrivateLayer`.
"""

from __future__ import annotations

import contextlib
import logging
import os
import secrets
import shutil
import stat
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from vfs.durable import fsync_dir
from vfs.errors import FormatError
from vfs.tree.entry import Entry
from vfs.tree.nodes import TemplateLike

log = logging.getLogger(__name__)

#: The kernel engine's overlay work directory inside ``vees/<name>/``: its presence marks a
#: layer that may hold metacopy files and relative redirects.
KERNEL_WORK = "ovl-work"
METACOPY = b"trusted.overlay.metacopy"
REDIRECT = b"trusted.overlay.redirect"
OPAQUE = b"trusted.overlay.opaque"
_COPY = 1 << 20

#: reads ``size`` bytes of object ``oid`` at ``offset`` (a resolver's ``read``, which fetches
#: what is not local and verifies it)
ReadFn = Callable[..., bytes]


@dataclass
class NormalizeReport:
    completed: int = 0  #: metacopy files made full copies
    redirects: int = 0  #: relative directory redirects made absolute
    orphans: int = 0  #: metacopy files whose template file was not found (left as they are)


def needs_normalizing(layer_root: str | os.PathLike[str]) -> bool:
    return (Path(layer_root) / KERNEL_WORK).exists()


def _xattrs(path: str) -> dict[bytes, bytes]:
    out = {}
    for k in os.listxattr(path, follow_symlinks=False):
        with contextlib.suppress(OSError):
            out[k.encode()] = os.getxattr(path, k, follow_symlinks=False)
    return out


def _join(parent: bytes | None, name: bytes) -> bytes | None:
    if parent is None:
        return None
    return (parent + b"/" + name).lstrip(b"/")


def normalize_upper(
    layer_root: str | os.PathLike[str],
    template: TemplateLike,
    read: ReadFn,
    *,
    clear_marker: bool = True,
) -> NormalizeReport:
    """Make the private layer at ``layer_root`` (``vees/<name>``) free of metacopy files and
    relative redirects, against the template it was used with; then (``clear_marker``) remove
    the kernel engine's work directory. The VEE must not be mounted by either engine."""
    root = Path(layer_root)
    upper = os.fsencode(root / "upper")
    work = root / "work"
    work.mkdir(mode=0o700, exist_ok=True)
    rep = NormalizeReport()
    if os.path.isdir(upper):
        # (upper directory, its template path or None when it hides the template)
        stack: list[tuple[bytes, bytes | None]] = [(upper, b"")]
        if _getx(upper, OPAQUE) == b"y":
            stack = [(upper, None)]
        while stack:
            d, tpath = stack.pop()
            for entry in os.scandir(d):
                name = os.fsencode(entry.name)
                p = os.path.join(d, name)
                st = entry.stat(follow_symlinks=False)
                if stat.S_ISDIR(st.st_mode):
                    red = _getx(p, REDIRECT)
                    if _getx(p, OPAQUE) == b"y":
                        sub = None
                    elif red is not None and red.startswith(b"/"):
                        sub = red.lstrip(b"/")
                    elif red is not None:
                        sub = _join(tpath, red)
                        if sub is not None:
                            os.setxattr(p, REDIRECT, b"/" + sub, follow_symlinks=False)
                            rep.redirects += 1
                    else:
                        sub = _join(tpath, name)
                    stack.append((p, sub))
                elif stat.S_ISREG(st.st_mode) and _getx(p, METACOPY) is not None:
                    red = _getx(p, REDIRECT)
                    if red is not None and red.startswith(b"/"):
                        lpath: bytes | None = red.lstrip(b"/")
                    elif red is not None:
                        lpath = _join(tpath, red)
                    else:
                        lpath = _join(tpath, name)
                    e = template.resolve(lpath) if lpath is not None else None
                    if e is None or e.kind != "reg":
                        log.error(
                            "private file %s: metadata-only copy of %r, which template %s lacks:"
                            " left as it is",
                            os.fsdecode(p),
                            lpath,
                            template.digest[:16],
                        )
                        rep.orphans += 1
                        continue
                    _complete(os.fsdecode(p), st, e, read, work)
                    rep.completed += 1
    if clear_marker:
        kw = root / KERNEL_WORK
        if kw.exists():
            shutil.rmtree(kw)
            fsync_dir(root)
    if rep.completed or rep.redirects or rep.orphans:
        log.info("private layer %s normalized: %s", root, rep)
    return rep


def _getx(path: bytes, name: bytes) -> bytes | None:
    try:
        return os.getxattr(path, name, follow_symlinks=False)
    except OSError:
        return None


def _complete(path: str, st: os.stat_result, e: Entry, read: ReadFn, work: Path) -> None:
    """Replace metacopy stub ``path`` by a full copy: template ``e``'s bytes (holes kept),
    the stub's owner, mode, xattrs (markers dropped) and times."""
    if st.st_size != e.size:
        raise FormatError(
            f"{path}: metadata-only copy of {st.st_size} bytes, template has {e.size}"
        )
    xattrs = {k: v for k, v in _xattrs(path).items() if k not in (METACOPY, REDIRECT)}
    tmp = work / f"norm-{secrets.token_hex(6)}"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    try:
        if e.oid is not None:
            for off, n in e.data_extents:
                pos = off
                while pos < off + n:
                    k = min(_COPY, off + n - pos)
                    data = read(e.oid, pos, k, expected_size=e.size)
                    if len(data) != k:
                        raise FormatError(f"{path}: object {e.oid} ended early at {pos}")
                    view = memoryview(data)
                    while view:
                        view = view[os.pwrite(fd, view, pos + len(data) - len(view)) :]
                    pos += k
        os.ftruncate(fd, st.st_size)
        os.fchown(fd, st.st_uid, st.st_gid)
        os.fchmod(fd, stat.S_IMODE(st.st_mode))  # after chown, which clears set-id bits
        for k, v in xattrs.items():
            os.setxattr(fd, k, v)
        os.utime(fd, ns=(st.st_atime_ns, st.st_mtime_ns))
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    os.close(fd)
    os.rename(tmp, path)
    fsync_dir(os.path.dirname(path))
