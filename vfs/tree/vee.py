"""The VEE registry: which VEEs a ``vfsd`` state directory serves, on which template.

One small JSON file, ``<state>/vees.json``, written through :func:`vfs.durable.write_atomic`
(temp file, fsync, rename, fsync of the directory): after a crash it holds either the old or the
new set, never a torn one, so the daemon restarts with the same VEEs. Every change is
*save-then-apply*: the new set is written first and the in-memory set changes only once that
succeeded, so a full disk (or any failed write) leaves memory, file and mount agreeing on the old
set (a ghost VEE — listed, but in neither the file nor the mount — cannot arise). Format::

    {"format": "vfs-vees", "version": 1,
     "vees": {"<name>": {"template": "<64 hex digest>", "ref": "<name or digest given>",
                         "created_ns": 1700000000000000000}}}

A VEE's private layer lives in ``<state>/vees/<name>/`` (:mod:`vfs.tree.private`); removing a VEE
keeps that directory under ``<state>/removed/<name>.<time>/`` unless purged.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from vfs.durable import fsync_dir, write_atomic
from vfs.errors import AlreadyExists, FormatError, NotFound, UsageError
from vfs.tree.private import PrivateLayer
from vfs.tree.template import check_digest

log = logging.getLogger(__name__)

FORMAT = "vfs-vees"
VERSION = 1
_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")


def check_vee_name(name: str) -> str:
    """VEE names become directory names in the mount and the state dir: keep them plain."""
    if not isinstance(name, str) or not _NAME_RE.fullmatch(name):
        raise UsageError(
            f"invalid VEE name {name!r}: use 1-64 of A-Z a-z 0-9 . _ - (not starting with . _ -)"
        )
    return name


@dataclass
class VeeRecord:
    name: str
    template: str  # digest
    ref: str  # what the operator asked for (a name or the digest)
    created_ns: int

    def to_json(self) -> dict[str, object]:
        return {"template": self.template, "ref": self.ref, "created_ns": self.created_ns}


class VeeRegistry:
    """The set of VEEs of one state directory (not thread-safe: the daemon owns it)."""

    def __init__(self, state_dir: str | Path) -> None:
        self.state = Path(state_dir)
        self.state.mkdir(parents=True, exist_ok=True)
        (self.state / "vees").mkdir(exist_ok=True)
        self.file = self.state / "vees.json"
        self.vees: dict[str, VeeRecord] = {}
        if self.file.exists():
            self._load()

    def _load(self) -> None:
        try:
            doc = json.loads(self.file.read_bytes())
            if doc.get("format") != FORMAT:
                raise FormatError(f"{self.file}: not a VEE registry")
            if doc.get("version") != VERSION:
                raise FormatError(f"{self.file}: registry version {doc.get('version')} unknown")
            for name, rec in doc["vees"].items():
                check_vee_name(name)
                self.vees[name] = VeeRecord(
                    name, check_digest(rec["template"]), str(rec["ref"]), int(rec["created_ns"])
                )
        except (ValueError, KeyError, TypeError, AttributeError, UsageError) as e:
            raise FormatError(f"{self.file}: malformed VEE registry ({e})") from None

    def _save(self, vees: dict[str, VeeRecord]) -> None:
        """Write ``vees`` as the registry (durably); the caller applies it to memory after."""
        doc = {
            "format": FORMAT,
            "version": VERSION,
            "vees": {n: r.to_json() for n, r in sorted(vees.items())},
        }
        write_atomic(self.file, json.dumps(doc, indent=1).encode() + b"\n", mode=0o600)

    def layer_dir(self, name: str) -> Path:
        return self.state / "vees" / check_vee_name(name)

    def open_layer(self, name: str) -> PrivateLayer:
        return PrivateLayer(self.layer_dir(name))

    def get(self, name: str) -> VeeRecord:
        try:
            return self.vees[name]
        except KeyError:
            raise NotFound(f"no VEE named {name!r}") from None

    def add(self, name: str, digest: str, ref: str) -> VeeRecord:
        check_vee_name(name)
        if name in self.vees:
            raise AlreadyExists(f"VEE {name!r} exists")
        rec = VeeRecord(name, check_digest(digest), ref, time.time_ns())
        self._save({**self.vees, name: rec})
        self.vees[name] = rec
        return rec

    def set_template(self, name: str, digest: str, ref: str) -> VeeRecord:
        rec = dataclasses.replace(self.get(name), template=check_digest(digest), ref=ref)
        self._save({**self.vees, name: rec})
        self.vees[name] = rec
        return rec

    def remove(self, name: str, *, purge: bool = False) -> Path | None:
        """Forget a VEE, then retire its private layer (:meth:`forget` + :meth:`retire_layer`)."""
        self.forget(name)
        return self.retire_layer(name, purge=purge)

    def forget(self, name: str) -> None:
        """Remove a VEE from the registry (durably first; memory changes only after)."""
        self.get(name)
        self._save({n: r for n, r in self.vees.items() if n != name})
        del self.vees[name]

    def retire_layer(self, name: str, *, purge: bool = False) -> Path | None:
        """Move an unregistered VEE's private layer aside (or delete it with ``purge``).

        Called only after :meth:`forget` succeeded (and the VEE is unmounted): a crash in
        between leaves an unregistered layer, which a later ``add`` of the name adopts."""
        if name in self.vees:
            raise UsageError(f"VEE {name!r} is still registered")
        layer = self.layer_dir(name)
        if not layer.exists():
            return None
        # Durable before the caller reports success: a crash after an acknowledged rm must not
        # leave the layer at its old place, where a later `add` of the name would adopt it.
        if purge:
            shutil.rmtree(layer)
            fsync_dir(layer.parent)
            return None
        removed = self.state / "removed"
        if not removed.is_dir():
            removed.mkdir(exist_ok=True)
            fsync_dir(self.state)
        dest = removed / f"{name}.{time.strftime('%Y%m%dT%H%M%S')}.{time.time_ns() % 10**9}"
        os.rename(layer, dest)
        fsync_dir(removed)
        fsync_dir(layer.parent)
        log.info("VEE %s removed; private layer kept at %s", name, dest)
        return dest
