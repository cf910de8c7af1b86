"""Network namespaces as hosts: where a VM's processes run when its "host" is a namespace.

On one machine, two network namespaces joined by a veth pair stand in for two hosts with a
real network between them (``vmctl migrate --dest-netns``). Processes are started in one with
``ip netns exec NS PROG ...``, which enters the namespace and then ``exec``s PROG (no fork: the
pid vmctl records is PROG's). File-system paths are shared, so the QMP and NBD Unix sockets of
a state root stay reachable from any namespace; only TCP sees the namespace's own addresses.
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path

from vfs.errors import NotFound, UsageError

#: Where ``ip netns add`` makes a namespace's name (a bind mount of its /proc/PID/ns/net).
NETNS_DIR = Path("/run/netns")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


def check_netns(name: str) -> None:
    """Refuse a malformed or missing namespace name before anything starts in it."""
    if not _NAME.match(name) or name in (".", ".."):
        raise UsageError(f"{name!r} is not a network namespace name")
    if not (NETNS_DIR / name).exists():
        raise NotFound(f"no network namespace {name!r} (ip netns add {name})")
    if shutil.which("ip") is None:
        raise NotFound("the ip command (iproute2) is not installed: it enters namespaces")


def netns_prefix(name: str | None) -> list[str]:
    """The argv prefix that runs a program in namespace ``name`` (nothing for None)."""
    if name is None:
        return []
    check_netns(name)
    return [shutil.which("ip") or "ip", "netns", "exec", name]
