"""``vmctl hibernate NAME BUNDLE`` and ``vmctl restore BUNDLE``: a guest saved whole (memory,
devices, a frozen snapshot of each disk) and brought back, here or on another host.

Hibernate, in order (the bundle's layout and crash story: ``docs/vmctl-bundle.md``)::

    refuse what cannot be frozen (a disk that is not vimg), before touching the guest
    pause ─► QEMU writes its migration stream to BUNDLE/state.bin.partial (``migrate exec:``;
             QEMU 7.2 has no ``file:``) ─► on failure: remove it, resume the guest, report
    quit QEMU (it flushes its disks) ─► stop the exports (their last commit)
    snapshot each disk (vmctl-hibernate-ID) with the binding as its VM state
    state.bin.partial ─► state.bin, then bundle.json (atomic): now the bundle exists

Restore: every check of :mod:`vmctl.bundle` first (nothing is created before they pass), then
the exports, QEMU with ``-S -incoming defer``, ``migrate-incoming exec:cat state.bin``, wait
for the load, check QEMU's state, ``cont``. The QEMU command line is rebuilt from the bundle
with what may change changed: the VM's name and state root, the disks' image paths
(``--disk NODE=PATH``: a copy, the same image moved, or fetched from a repository by its
export), the kernel and initrd paths.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shlex
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import trio

from vfs.durable import fsync_dir, write_atomic
from vfs.errors import AlreadyExists, NotFound, UsageError
from vfs.redirect.repoconfig import RepoConfig
from vmctl import bundle as B
from vmctl.errors import QemuError, VmError
from vmctl.host import Accelerator, choose_accelerator, qemu_binary
from vmctl.machine import MachineSpec
from vmctl.qemu import QemuVM, VmPaths, read_pidfile
from vmctl.qmp import QMPClient, open_qmp

log = logging.getLogger("vmctl.hibernate")

#: Saving a paused guest has no downtime to protect: let QEMU write as fast as it can
#: (its default max-bandwidth is 32 MiB/s).
SAVE_BANDWIDTH = 8 << 30
_POLL = 0.05


class MigrationFailed(VmError):
    """QEMU reported the migration (save or load) as failed."""


def devices_of(spec: dict[str, Any]) -> list[str]:
    """The guest-visible devices of a recorded spec (what a restore may not change)."""
    return [f"virtio-blk-pci:{d['node']}" for d in spec.get("disks", [])] + ["isa-serial:serial0"]


async def wait_migration(qmp: QMPClient, timeout: float) -> dict[str, Any]:
    """Poll ``query-migrate`` until the migration completed; raise on failure or timeout."""
    deadline = trio.current_time() + timeout
    while True:
        info = await qmp.execute("query-migrate", timeout=10)
        status = info.get("status")
        if status == "completed":
            return info
        if status in ("failed", "cancelled"):
            why = info.get("error-desc", "no reason given")
            raise MigrationFailed(f"migration {status}: {why}")
        if trio.current_time() > deadline:
            raise MigrationFailed(f"migration still {status} after {timeout}s")
        await trio.sleep(_POLL)


def _vm_record(paths: VmPaths) -> dict[str, Any]:
    try:
        return json.loads(paths.spec.read_text())
    except (OSError, ValueError) as e:
        raise NotFound(f"no readable VM record in {paths.dir} ({e})") from None


async def _platform(qmp: QMPClient, rec: dict[str, Any]) -> dict[str, Any]:
    spec = rec["spec"]
    machines = await qmp.execute("query-machines")
    resolved = spec["machine"]
    for m in machines:
        if m.get("alias") == spec["machine"]:
            resolved = m["name"]
    cpus = await qmp.execute("query-cpus-fast")
    cpu_type = ""
    if cpus:  # QEMU 7.2's query-cpus-fast has no qom-type; the QOM object says it
        cpu_type = await qmp.execute("qom-get", {"path": cpus[0]["qom-path"], "property": "type"})
    return {
        "qemu_version": ".".join(map(str, qmp.qemu_version or ())),
        "machine": resolved,
        "machine_alias": spec["machine"],
        "accel": rec["accel"],
        "cpu_model": spec.get("cpu_model") or cpu_type.removesuffix("-x86_64-cpu") or None,
        "cpu_type": cpu_type,
        "memory_mib": spec["memory_mib"],
        "cpus": spec["cpus"],
        "devices": devices_of(spec),
    }


def _prepare_bundle_dir(path: Path) -> None:
    if path.exists():
        if not path.is_dir() or any(path.iterdir()):
            raise AlreadyExists(f"{path} exists and is not an empty directory")
    else:
        path.mkdir(parents=True)


async def hibernate(root: Path, name: str, bundle_dir: Path, *, timeout: float = 600.0) -> dict:
    """Save running VM ``name`` of ``root`` into ``bundle_dir`` and stop it."""
    from vmctl.lifecycle import stop_vm
    from vmctl.vms import vm_paths

    paths = vm_paths(root, name)
    if not paths.spec.exists():
        raise NotFound(f"no VM named {name!r} in {root}")
    if read_pidfile(paths.pidfile) is None:
        raise VmError(f"VM {name!r} is not running")
    rec = _vm_record(paths)
    disks = rec["spec"].get("disks", [])
    for d in disks:
        if d.get("format") != "vimg":
            raise UsageError(
                f"disk {d.get('node')} is a {d.get('format')} file: hibernate freezes vimg disks "
                "only (convert it with `vimg convert -O vimg`)"
            )
    bundle_dir = Path(bundle_dir).absolute()
    _prepare_bundle_dir(bundle_dir)
    partial = bundle_dir / (B.STATE + ".partial")
    bundle_id = uuid.uuid4().hex
    t0 = time.monotonic()
    async with open_qmp(paths.qmp_socket, name="hibernate", connect_timeout=10) as qmp:
        platform = await _platform(qmp, rec)
        was_running = (await qmp.execute("query-status"))["status"] == "running"
        await qmp.execute("stop")
        t_paused = time.monotonic()
        try:
            await qmp.execute("migrate-set-parameters", {"max-bandwidth": SAVE_BANDWIDTH})
            uri = "exec:cat > " + shlex.quote(str(partial))
            await qmp.execute("migrate", {"uri": uri})
            info = await wait_migration(qmp, timeout)
        except BaseException:
            with trio.CancelScope(shield=True):
                partial.unlink(missing_ok=True)
                with contextlib.suppress(VmError, OSError):
                    if was_running:
                        await qmp.execute("cont", timeout=10)
                        log.warning("hibernate of %s failed; the guest runs on", name)
            raise
    t_saved = time.monotonic()
    # From here the guest is not resumed: its state is in the file, its disks are next.
    await trio.to_thread.run_sync(_fsync_file, partial)
    size, digest = await trio.to_thread.run_sync(B.sha256_file, partial)
    await stop_vm(paths)
    snap = B.snapshot_name(bundle_id)
    out_disks = []
    for d in disks:
        vsize, content = await trio.to_thread.run_sync(
            _freeze_disk,
            Path(d["path"]),
            snap,
            B.binding(bundle_id, digest, d["node"]),
            tuple(d.get("backing_dirs", [])),
        )
        out_disks.append({"node": d["node"], "path": str(Path(d["path"]).resolve()),
                          "format": "vimg", "snapshot": snap, "virtual_size": vsize,
                          "content": content,
                          "read_only": bool(d.get("read_only")),
                          "backing_dirs": list(d.get("backing_dirs", []))})  # fmt: skip
    os.replace(partial, bundle_dir / B.STATE)
    fsync_dir(bundle_dir)
    spec = rec["spec"]
    manifest = {
        "format": B.BUNDLE_FORMAT,
        "version": B.BUNDLE_VERSION,
        "id": bundle_id,
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "name": name,
        "platform": platform,
        "boot": {k: spec.get(k) for k in ("kernel", "initrd", "append")},
        "extra_args": spec.get("extra_args", []),
        "disks": out_disks,
        "state": {"file": B.STATE, "size": size, "sha256": digest},
        "times": {
            "save_s": round(t_saved - t_paused, 3),
            "total_s": 0.0,
            "qemu_total_ms": info.get("total-time"),
        },  # fmt: skip
    }
    manifest["times"]["total_s"] = round(time.monotonic() - t0, 3)
    write_atomic(bundle_dir / B.MANIFEST, json.dumps(manifest, indent=2).encode())
    return {"name": name, "bundle": str(bundle_dir), "state_bytes": size, **manifest["times"]}


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _freeze_disk(path: Path, snapshot: str, bound: bytes,
                 backing_dirs: tuple[str, ...] = ()) -> tuple[int, dict[str, Any]]:  # fmt: skip
    """Snapshot the disk with the binding as its VM state; its size and content digest (of the
    active disk, which is the snapshot's right after it is taken)."""
    from vfs.image import Image
    from vmctl.diskdigest import disk_digest

    img = Image.open(str(path), backing_dirs=backing_dirs)
    try:
        img.snapshot_create(snapshot, vm_state=bound)
        return img.size, disk_digest(img)
    finally:
        img.close()


def _machines(binary: str) -> set[str]:
    import subprocess

    out = subprocess.run([binary, "-machine", "help"], capture_output=True, text=True).stdout
    return {line.split()[0] for line in out.splitlines()[1:] if line.strip()}


def _qemu_version(binary: str) -> str:
    from vmctl.host import qemu_version

    text = qemu_version(binary) or ""
    parts = text.split("version", 1)
    return parts[1].split()[0] if len(parts) == 2 else ""


def plan_restore(
    bundle_path: Path,
    *,
    name: str | None,
    root: Path,
    moves: dict[str, Path],
    kernel: Path | None = None,
    initrd: Path | None = None,
    memory_mib: int | None = None,
    cpus: int | None = None,
    machine: str | None = None,
    repo: RepoConfig | None = None,
    store: Path | None = None,
) -> tuple[B.Bundle, MachineSpec, VmPaths, Accelerator]:
    """Every check, and the machine to start; touches nothing (raises on the first refusal)."""
    from vmctl.exports import VimgDisk
    from vmctl.vms import vm_paths

    bundle = B.load_bundle(bundle_path)
    binary = qemu_binary()
    if binary is None:
        raise NotFound("qemu-system-x86_64 is not installed")
    accel = choose_accelerator()
    p = bundle.platform
    if p["accel"] == "tcg" and accel.name != "tcg":
        accel = Accelerator("tcg", "the guest was saved under TCG")
    B.check_platform(bundle, qemu_version=_qemu_version(binary), machines=_machines(binary),
                     accel=accel.name, requested={"memory_mib": memory_mib, "cpus": cpus,
                                                  "machine": machine})  # fmt: skip
    name = name or bundle.manifest["name"]
    paths = vm_paths(root, name)
    running = read_pidfile(paths.pidfile)
    if running is not None:
        raise VmError(f"VM {name!r} already runs (QEMU pid {running}) in {paths.dir}")
    boot = dict(bundle.manifest["boot"])
    for key, given in (("kernel", kernel), ("initrd", initrd)):
        if given is not None:
            boot[key] = str(given)
        if boot.get(key) and not Path(boot[key]).exists():
            raise NotFound(f"the saved guest's {key} {boot[key]} does not exist (--{key} PATH)")
    images = B.disk_paths(bundle, moves)
    for d, path in zip(bundle.disks, images, strict=True):
        B.check_disk(bundle, d, path)
    B.check_state(bundle)
    disks = [VimgDisk(path, paths.dir / f"d{i}.nbd", node_name=d["node"],
                      read_only=bool(d.get("read_only")),
                      backing_dirs=tuple(d.get("backing_dirs", [])),
                      repo=repo.with_absolute_paths() if repo else None,
                      store=str(Path(store).absolute()) if store else "")
             for i, (d, path) in enumerate(zip(bundle.disks, images, strict=True))]  # fmt: skip
    spec = MachineSpec(
        name,
        memory_mib=p["memory_mib"],
        cpus=p["cpus"],
        machine=p["machine"],
        cpu_model=p.get("cpu_model"),
        kernel=Path(boot["kernel"]) if boot.get("kernel") else None,
        initrd=Path(boot["initrd"]) if boot.get("initrd") else None,
        append=boot.get("append"),
        disks=disks,
        extra_args=list(bundle.manifest.get("extra_args", [])),
    )
    B.check_devices(bundle, devices_of(spec.describe()))
    return bundle, spec, paths, accel


async def restore(bundle_path: Path, *, root: Path, name: str | None = None,
                  moves: dict[str, Path] | None = None, timeout: float = 600.0,
                  **overrides: Any) -> dict:  # fmt: skip
    """Bring a hibernated guest back as VM ``name`` of ``root``; returns once it runs."""

    with _restore_lock(Path(bundle_path)):
        return await _restore(bundle_path, root=root, name=name, moves=moves, timeout=timeout,
                              overrides=overrides)  # fmt: skip


@contextlib.contextmanager
def _restore_lock(bundle_path: Path):
    """Two restores of one bundle at once are serialised (flock on its manifest, which may be
    read-only): the second then finds the disks locked by the first's exports."""
    import fcntl

    from vfs.errors import BusyError

    try:
        fd = os.open(bundle_path / B.MANIFEST, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        yield  # load_bundle says what is wrong with it
        return
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise BusyError(f"another vmctl is restoring {bundle_path}") from None
        yield
    finally:
        os.close(fd)


async def _restore(bundle_path: Path, *, root: Path, name: str | None,
                   moves: dict[str, Path] | None, timeout: float,
                   overrides: dict[str, Any]) -> dict:  # fmt: skip
    from vmctl.lifecycle import start_vm

    bundle, spec, paths, accel = await trio.to_thread.run_sync(
        lambda: plan_restore(bundle_path, name=name, root=root, moves=moves or {}, **overrides)
    )
    t0 = time.monotonic()
    timing: dict[str, float] = {}

    async def load(vm: QemuVM) -> None:
        assert vm.qmp is not None
        uri = "exec:cat " + shlex.quote(str(bundle.state_file))
        await vm.qmp.execute("migrate-incoming", {"uri": uri})
        await wait_migration(vm.qmp, timeout)
        state = (await vm.qmp.execute("query-status"))["status"]
        if state != "paused":
            raise QemuError(f"QEMU is {state} after loading the saved state, not paused")
        await vm.qmp.execute("cont")
        timing["load_s"] = round(time.monotonic() - t0, 3)

    info = await start_vm(spec, paths, timeout=timeout, incoming="defer", on_up=load, accel=accel)
    return {**info, "bundle": str(bundle.path), "restore_s": round(time.monotonic() - t0, 3),
            **timing}  # fmt: skip
