"""Which processes hold a mount: what ``vfsd vee upgrade`` (kernel engine) and ``vee rm`` name
when they refuse to unmount a VEE that is in use (like ``fuser -m``, for one superblock).

An overlay cannot change its lower layer while mounted, so a VEE of the kernel engine moves to
another template by a new mount. Whoever still holds the old one keeps the old template's view
(and both mounts would then share one upper directory, which overlayfs does not support). So
before it remounts, the daemon looks for, per process:

- open files: ``/proc/PID/fdinfo/N`` says which mount each fd is on (``mnt_id``); every mount of
  the VEE's superblock counts, in every mount namespace (a container's bind mount of the VEE
  root is another mount of the same superblock);
- the current directory, root directory and executable (``stat`` shows the superblock's device);
- mapped files (``/proc/PID/maps`` names them by path: counted when the path is under the VEE
  root as the daemon sees it);
- and every mount of the superblock other than the daemon's own ``MNT/<name>``: a bind mount
  in a container's namespace holds the VEE even when no process of the container has a file
  open.

The scan reads ``/proc`` only; processes that come and go during it may be missed or named
after they left (a race no ``fuser`` avoids).
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass

from vfs.daemon.mounts import mountinfo


@dataclass(frozen=True)
class Holder:
    pid: int
    comm: str
    what: str  # "open file /path", "cwd", "root", "exe", "mapped /path", "mount at /path"

    def __str__(self) -> str:
        return f"pid {self.pid} ({self.comm}): {self.what}"

    def to_json(self) -> dict[str, object]:
        return {"pid": self.pid, "comm": self.comm, "what": self.what}


def _comm(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/comm") as f:
            return f.read().strip()
    except OSError:
        return "?"


def _pids() -> list[int]:
    return [int(p) for p in os.listdir("/proc") if p.isdigit()]


def mounts_of(dev: str) -> dict[int, tuple[int, str]]:
    """Every mount of the superblock ``dev`` ("major:minor") in every mount namespace, as
    ``mount id -> (a pid of that namespace, mount point there)``."""
    seen_ns: set[str] = set()
    out: dict[int, tuple[int, str]] = {}
    for pid in _pids():
        try:
            ns = os.readlink(f"/proc/{pid}/ns/mnt")
        except OSError:
            continue
        if ns in seen_ns:
            continue
        seen_ns.add(ns)
        try:
            for m in mountinfo(pid):
                if m.dev == dev:
                    out[m.mount_id] = (pid, m.mountpoint)
        except (OSError, ValueError):
            continue
    return out


def holders(dev: str, own_mount_id: int, root_path: str) -> list[Holder]:
    """The processes and mounts holding superblock ``dev`` besides the daemon's own mount
    ``own_mount_id`` at ``root_path`` (which the daemon itself does not hold open)."""
    major, minor = (int(x) for x in dev.split(":"))
    devno = os.makedev(major, minor)
    mounts = mounts_of(dev)
    ids = set(mounts) | {own_mount_id}
    found: list[Holder] = []
    for mid, (pid, where) in sorted(mounts.items()):
        if mid != own_mount_id:
            found.append(Holder(pid, _comm(pid), f"mount at {where} (another mount namespace)"))
    me = os.getpid()
    prefix = root_path.rstrip("/") + "/"
    for pid in _pids():
        if pid == me:
            continue
        what: list[str] = []
        for link in ("cwd", "root", "exe"):
            with contextlib.suppress(OSError):
                if os.stat(f"/proc/{pid}/{link}").st_dev == devno:
                    what.append(link)
        try:
            fds = os.listdir(f"/proc/{pid}/fd")
        except OSError:
            fds = []
        for fd in fds:
            try:
                with open(f"/proc/{pid}/fdinfo/{fd}") as f:
                    info = f.read()
            except OSError:
                continue
            for line in info.splitlines():
                if line.startswith("mnt_id:"):
                    if int(line.split()[1]) in ids:
                        try:
                            target = os.readlink(f"/proc/{pid}/fd/{fd}")
                        except OSError:
                            target = f"fd {fd}"
                        what.append(f"open file {target}")
                    break
        with contextlib.suppress(OSError), open(f"/proc/{pid}/maps") as f:
            mapped = set()
            for line in f:
                parts = line.split(None, 5)
                if len(parts) == 6 and parts[5].startswith(prefix):
                    mapped.add(parts[5].rstrip("\n"))
            what.extend(f"mapped {p}" for p in sorted(mapped))
        if what:
            comm = _comm(pid)
            found.extend(Holder(pid, comm, w) for w in what)
    return found
