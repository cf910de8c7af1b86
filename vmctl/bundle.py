"""The hibernate bundle (``docs/vmctl-bundle.md`` is the spec): what it records, and every
check ``vmctl restore`` makes before it touches anything.

Pure data and file reads: no QEMU, no processes. :mod:`vmctl.hibernate` writes bundles and
runs restores; this module says whether a restore may run here, and why not.

The checks are of three kinds:

- the bundle itself: its format and version, its state file's size and sha256;
- the platform: what QEMU cannot load a saved state into (another machine type, memory size,
  vCPU count, CPU model, device set; an older QEMU; another accelerator) is refused here with
  one line, because QEMU itself only finds out half-way through loading the stream;
- the disks: QEMU does not tie the state to the disks' contents, so vmctl does. Each disk was
  frozen as a vimg snapshot whose VM state is this bundle's *binding* (bundle id and state
  digest), and the manifest records the frozen disk's *content digest* (vmctl/diskdigest.py).
  At restore the image's active disk must have that digest, wherever it lies and however its
  clusters are stored (local, or remote objects fetched on demand after a push: such an image
  has no snapshots, and needs none); a snapshot of the bundle's name must hold this bundle's
  binding. A disk written since (a restored guest ran on it) has another digest and is
  refused, else the guest's memory would not match its disk. The image lock (held by the
  export of a running guest) refuses a disk in use; together these stop two guests from ever
  writing one disk from one bundle. (Bundles from before content digests: the snapshot must
  be there and still be the active root, the same L1 table.)
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vfs.errors import FormatError, IntegrityError, NotFound, UsageError
from vmctl.errors import VmError

BUNDLE_FORMAT = "vmctl-bundle"
BUNDLE_VERSION = 1
BINDING_FORMAT = "vmctl-bundle-binding"
MANIFEST = "bundle.json"
STATE = "state.bin"


class RestoreRefused(VmError):
    """The bundle cannot be restored here (said before anything was touched)."""


def snapshot_name(bundle_id: str) -> str:
    return f"vmctl-hibernate-{bundle_id[:16]}"


def binding(bundle_id: str, state_sha256: str, node: str) -> bytes:
    """The VM state stored with each disk's snapshot: which bundle's state belongs to it."""
    return json.dumps({"format": BINDING_FORMAT, "version": 1, "bundle": bundle_id,
                       "state_sha256": state_sha256, "node": node},
                      sort_keys=True).encode()  # fmt: skip


def sha256_file(path: Path, chunk: int = 1 << 20) -> tuple[int, str]:
    h = hashlib.sha256()
    size = 0
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
            size += len(block)
    return size, h.hexdigest()


def parse_version(text: str) -> tuple[int, ...]:
    m = re.match(r"^(\d+)\.(\d+)(?:\.(\d+))?", text or "")
    if not m:
        raise FormatError(f"bad QEMU version {text!r} in the bundle")
    return tuple(int(x or 0) for x in m.groups())


@dataclass
class Bundle:
    path: Path
    manifest: dict[str, Any]

    @property
    def id(self) -> str:
        return self.manifest["id"]

    @property
    def platform(self) -> dict[str, Any]:
        return self.manifest["platform"]

    @property
    def disks(self) -> list[dict[str, Any]]:
        return self.manifest["disks"]

    @property
    def state_file(self) -> Path:
        return self.path / self.manifest["state"]["file"]


def load_bundle(path: Path) -> Bundle:
    """Read and check a bundle's manifest (not yet its state file: :func:`check_state`)."""
    path = Path(path)
    mf = path / MANIFEST
    if not path.is_dir():
        raise NotFound(f"no bundle at {path}")
    if not mf.exists():
        raise NotFound(f"{path} holds no {MANIFEST}: not a bundle, or an unfinished hibernate")
    try:
        m = json.loads(mf.read_text())
    except (OSError, ValueError) as e:
        raise FormatError(f"{mf}: not a bundle manifest ({e})") from None
    if not isinstance(m, dict) or m.get("format") != BUNDLE_FORMAT:
        raise FormatError(f"{mf}: not a {BUNDLE_FORMAT} manifest")
    if m.get("version") != BUNDLE_VERSION:
        raise FormatError(
            f"{mf}: bundle version {m.get('version')!r}; this vmctl reads version {BUNDLE_VERSION}"
        )
    try:
        for key in ("id", "name", "platform", "boot", "disks", "state"):
            m[key]  # noqa: B018 (presence)
        for key in ("qemu_version", "machine", "accel", "memory_mib", "cpus", "devices"):
            m["platform"][key]  # noqa: B018
        for d in m["disks"]:
            d["node"], d["path"], d["format"], d["snapshot"], d["virtual_size"]  # noqa: B018
        name = Path(m["state"]["file"]).name
    except (KeyError, TypeError) as e:
        raise FormatError(f"{mf}: incomplete manifest (missing {e})") from None
    if name != m["state"]["file"] or name in ("", ".", ".."):
        raise FormatError(f"{mf}: bad state file name {m['state']['file']!r}")
    return Bundle(path, m)


def check_state(bundle: Bundle) -> None:
    """The saved memory and device state is there and is what was saved."""
    f = bundle.state_file
    if not f.exists():
        raise NotFound(f"the bundle's state file {f} is missing")
    size, digest = sha256_file(f)
    want = bundle.manifest["state"]
    if size != want["size"] or digest != want["sha256"]:
        raise IntegrityError(
            f"{f}: state file damaged or replaced ({size} bytes, sha256 {digest[:12]}..., "
            f"recorded {want['size']} bytes, {want['sha256'][:12]}...)"
        )


def check_platform(
    bundle: Bundle,
    *,
    qemu_version: str,
    machines: set[str],
    accel: str,
    requested: dict[str, Any],
) -> None:
    """Refuse what QEMU cannot load this state into. ``requested``: what the restore command
    asked for (memory_mib, cpus, machine; None = as saved)."""
    p = bundle.platform
    saved, here = parse_version(p["qemu_version"]), parse_version(qemu_version)
    if here < saved:
        raise RestoreRefused(
            f"the bundle was saved by QEMU {p['qemu_version']}; this host's QEMU {qemu_version} "
            "is older and cannot load its state"
        )
    if p["machine"] not in machines:
        raise RestoreRefused(
            f"machine type {p['machine']} of the saved guest does not exist in QEMU {qemu_version}"
        )
    if p["accel"] != accel and (p["accel"] == "kvm" or p.get("cpu_model") == "host"):
        raise RestoreRefused(
            f"the guest was saved under {p['accel'].upper()} with the host's CPU model; "
            f"this host runs guests under {accel.upper()}"
        )
    for key, what in (("memory_mib", "memory size (MiB)"), ("cpus", "vCPU count")):
        want = requested.get(key)
        if want is not None and want != p[key]:
            raise RestoreRefused(
                f"{what} {want} differs from the saved guest's {p[key]}: QEMU cannot load a "
                "saved state into another one"
            )
    want = requested.get("machine")
    if want is not None and want not in (p["machine"], p.get("machine_alias")):
        raise RestoreRefused(
            f"machine type {want} differs from the saved guest's {p['machine']}: QEMU cannot "
            "load a saved state into another machine"
        )


def check_devices(bundle: Bundle, devices: list[str]) -> None:
    """The restored guest has the saved guest's devices (QEMU refuses a stream for others)."""
    saved = sorted(bundle.platform["devices"])
    if sorted(devices) != saved:
        raise RestoreRefused(f"devices {sorted(devices)} differ from the saved guest's {saved}")


def check_content(node: str, path: Path, img: Any, content: dict[str, Any], *,
                  has_snapshot: bool) -> None:  # fmt: skip
    """The active disk of ``img`` holds what the bundle's disk held when it was frozen (its
    content digest, vmctl/diskdigest.py), wherever and however it is stored now."""
    from vmctl.diskdigest import ALGORITHM, disk_digest

    if content.get("algorithm") != ALGORITHM:
        raise RestoreRefused(
            f"disk {node}: the bundle's content digest is {content.get('algorithm')!r}, which "
            f"this vmctl does not know ({ALGORITHM})"
        )
    if img.cluster_size != content.get("cluster_size"):
        raise RestoreRefused(
            f"disk {node}: {path} has {img.cluster_size}-byte clusters, the frozen disk "
            f"{content.get('cluster_size')}: their contents cannot be compared"
        )
    if disk_digest(img)["sha256"] == content.get("sha256"):
        return
    if has_snapshot:
        raise RestoreRefused(
            f"disk {node}: {path} was written after the hibernate (a restored guest ran on "
            "it?): its contents are no longer the frozen disk's, which the saved memory knows"
        )
    raise RestoreRefused(
        f"disk {node}: {path} is not the disk frozen with this bundle: it has no snapshot "
        "of the bundle and its contents differ"
    )


def disk_paths(bundle: Bundle, moves: dict[str, Path]) -> list[Path]:
    """Each disk's image path at restore: as saved, or moved (``--disk NODE=PATH``)."""
    nodes = {d["node"] for d in bundle.disks}
    unknown = set(moves) - nodes
    if unknown:
        raise UsageError(
            f"the bundle has no disk {sorted(unknown)[0]!r} (its disks: {', '.join(sorted(nodes))})"
        )
    return [Path(moves.get(d["node"], d["path"])) for d in bundle.disks]


def check_disk(bundle: Bundle, disk: dict[str, Any], path: Path) -> None:
    """The image at ``path`` is the disk frozen with this bundle's state, unchanged since."""
    from vfs.errors import BusyError
    from vfs.image import Image
    from vfs.image.fileio import probe_format

    node = disk["node"]
    if not path.exists():
        raise NotFound(f"disk {node}: image {path} does not exist (--disk {node}=PATH)")
    if probe_format(str(path)) != "vimg":
        raise RestoreRefused(f"disk {node}: {path} is not a vimg image")
    try:
        img = Image.open(str(path), readonly=True, backing_dirs=disk.get("backing_dirs", []))
    except BusyError:
        raise BusyError(
            f"disk {node}: {path} is in use (a guest restored from this bundle, or another, "
            "runs on it)"
        ) from None
    try:
        snaps = {s.name: s.l1_offset for s in img.snapshots}
        snap = disk["snapshot"]
        if snap in snaps:
            bound = b"".join(img.load_vmstate(snap))
            if bound != binding(bundle.id, bundle.manifest["state"]["sha256"], node):
                raise RestoreRefused(
                    f"disk {node}: snapshot {snap} of {path} belongs to another bundle"
                )
        if img.size != disk["virtual_size"]:
            raise RestoreRefused(
                f"disk {node}: {path} is {img.size} bytes, the frozen disk {disk['virtual_size']}"
            )
        content = disk.get("content")
        if content is None:  # a bundle from before content digests: the structure decides
            if snap not in snaps:
                raise RestoreRefused(f"disk {node}: {path} has no snapshot {snap} (not this disk?)")
            if next(iter(img.roots()))[1] != snaps[snap]:
                raise RestoreRefused(
                    f"disk {node}: {path} was written after the hibernate (a restored guest ran "
                    "on it?): the saved memory no longer matches the disk"
                )
            return
        check_content(node, path, img, content, has_snapshot=snap in snaps)
    finally:
        img.close()
