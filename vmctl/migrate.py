"""``vmctl migrate NAME --to ROOT``: move a running guest to another state root, in two stages.

Under TCG the RAM is by default copied with the guest paused (``--ram paused``): QEMU 7.2's
live pre-copy lost guest memory writes under TCG in about 1 of 10 migrations of a busy guest
here (the guest oopsed or hung on the destination; QEMU alone, without vmctl, does the same),
so only the disks move live there. ``--ram live`` (the default under KVM) is the full scheme.

Stage 1, the guest running::

    destination: a new image per disk, its export, QEMU ``-S -incoming defer`` on the same
    platform (the versioned machine type, the CPU model), ``migrate-incoming unix:``
    disks: full copy of every allocated range, then rounds of what the guest dirtied
    (the source export's bitmap) until a round is small or the rounds stop shrinking
    RAM: QEMU's pre-copy (``migrate`` with ``pause-before-switchover``), disk rounds go on
    meanwhile; a guest that dirties faster than the link carries is bounded: after
    ``--precopy-timeout`` the downtime limit is lifted, which makes QEMU stop the guest and
    copy the rest (stop-and-copy), or with ``--postcopy`` QEMU switches to post-copy (the
    destination runs at once and pulls the pages it misses; see "Post-copy recovery")

Stage 2, the guest paused (QEMU stopped it and flushed its disks into the source exports,
and waits in ``pre-switchover``)::

    copy the disks' last dirty ranges, flush the destination ─► ``migrate-continue``
    (the device state) ─► destination loaded ─► ``cont`` there: the switch
    ─► stop the source QEMU and its exports

Transport: by default the stream and the disk copy use Unix sockets in the destination's
directory (a destination on this host). With ``dest_address`` (another host) both go over TCP:
the destination QEMU listens for the stream on a port the kernel picks and runs an NBD server
on a port of ``NBD_PORTS`` exporting each disk's block node writable, which the copier writes
through (libvirt's scheme; QEMU activates the incoming node for it). The NBD server is stopped
once the last dirty ranges are copied and flushed, before the device state goes: the running
guest's disk is never served on the network. Neither has TLS: a private migration link.
``dest_netns`` starts the destination's processes in a network namespace (vmctl/netns.py).

Post-copy recovery: after a post-copy switch the guest's memory is split between the two
QEMUs, so a broken link must not fail the migration. QEMU 7.2 pauses both sides
(``postcopy-paused``: destination vCPUs touching a missing page wait) instead; vmctl then makes
the destination listen anew (``migrate-recover``, out of band, because the destination's main
loop may itself be blocked on a missing page), dials it with a bounded connect time, retried
every second until ``--recover-timeout``, hands the connected socket to the source QEMU
(``getfd``) and resumes it (``migrate fd: resume``): post-copy goes on where it stopped. If the
link stays down, vmctl gives up with one line and keeps both QEMUs (killing either loses the
guest); ``vmctl migrate NAME --to ROOT --recover`` finishes later, dialling the listener the
first attempt recorded (``migrate-recover.json``): a new QMP session to a blocked destination
cannot even be negotiated, so it is not needed. Lost for good only if a QEMU dies.

Anything failing before the switch: the source's migration is cancelled, the guest resumed
if QEMU left it paused, the destination (QEMU, exports, images, directory) removed. The
source images stay where they were after a migration (as virsh's ``--copy-storage-all``).

Crash story: if vmctl itself dies mid-migration, QEMU goes on and the source waits, paused,
in ``pre-switchover`` for a ``migrate-continue`` that never comes; ``vmctl migrate --abort``
cancels it, resumes the source and removes the destination. ``migrated-from.json`` is written
in the destination just before its guest is resumed; from then on the guest lives there and
``--abort`` refuses. Disks: the destination image is only written by the copier before the
switch, and the source image is never written by vmctl, so an abort loses nothing.
"""

from __future__ import annotations

import contextlib
import json
import logging
import shutil
import time
from pathlib import Path
from typing import Any

import trio

from vfs.durable import write_atomic
from vfs.errors import AlreadyExists, NotFound, UsageError
from vmctl.errors import QMPError, VmError
from vmctl.exports import VimgDisk
from vmctl.machine import MachineSpec, check_migration_capabilities
from vmctl.qemu import QemuVM, read_pidfile
from vmctl.qmp import QMPClient, open_qmp

log = logging.getLogger("vmctl.migrate")

#: A disk round this small ends the rounds (the rest goes in stage 2).
DISK_DONE_BYTES = 4 << 20
MAX_DISK_ROUNDS = 10
#: QEMU's downtime limit is at most 2000 s; this one means "stop and copy, however long".
STOP_AND_COPY_MS = 600_000
_POLL = 0.01


class MigrationError(VmError):
    """The migration failed before the switch; the source runs on."""


class PostcopyStuck(VmError):
    """Post-copy lost its link after the switch and did not recover in time: the guest's
    memory is split between two live QEMUs, which are both kept (``--recover`` goes on)."""


def _say(progress, text: str) -> None:
    log.info("%s", text)
    if progress is not None:
        progress(text)


async def _src_status(qmp: QMPClient) -> dict[str, Any]:
    return await qmp.execute("query-migrate", timeout=10)


async def migrate(
    root: Path,
    name: str,
    dest_root: Path,
    *,
    bandwidth: int = 1 << 30,
    downtime_ms: int = 100,
    precopy_timeout: float = 30.0,
    postcopy: bool = False,
    copy_storage_inc: bool = False,
    ram: str | None = None,
    dest_address: str | None = None,
    dest_netns: str | None = None,
    postcopy_bandwidth: int | None = None,
    recover_timeout: float = 60.0,
    timeout: float = 600.0,
    progress=None,
) -> dict[str, Any]:
    from vmctl.hibernate import _platform, _vm_record, wait_migration
    from vmctl.lifecycle import start_vm, stop_vm
    from vmctl.vms import vm_paths

    src = vm_paths(root, name)
    dst = vm_paths(dest_root, name)
    if not src.spec.exists():
        raise NotFound(f"no VM named {name!r} in {root}")
    if src.dir.resolve() == dst.dir.resolve():
        raise UsageError("the destination root is the source root")
    if read_pidfile(src.pidfile) is None:
        raise VmError(f"VM {name!r} is not running")
    if dst.dir.exists():
        raise AlreadyExists(f"{dst.dir} exists: the destination already has a VM {name!r}")
    if dest_netns is not None:
        from vmctl.netns import check_netns

        check_netns(dest_netns)
    if dest_address is not None:
        dest_address = _check_address(dest_address)
    if postcopy and not _userfaultfd_usable():
        raise UsageError("--postcopy needs userfaultfd (root, /dev/userfaultfd or "
                         "vm.unprivileged_userfaultfd=1)")  # fmt: skip
    rec = _vm_record(src)
    spec_rec = rec["spec"]
    for d in spec_rec.get("disks", []):
        if d.get("format") != "vimg":
            raise UsageError(
                f"disk {d.get('node')} is a {d.get('format')} file: migrate copies vimg disks "
                "only (convert it with `vimg convert -O vimg`)"
            )
        if copy_storage_inc:
            if not d.get("backing"):
                raise UsageError(
                    f"disk {d['node']} has no backing file: --copy-storage-inc copies the "
                    "layer of an image over a backing file (a template) the destination holds"
                )
            if not Path(d["backing"]).exists():
                raise NotFound(
                    f"disk {d['node']}: the destination lacks its backing file {d['backing']}"
                )
    ram = ram or ("paused" if rec["accel"] == "tcg" else "live")
    if ram not in ("live", "paused"):
        raise UsageError(f"--ram must be live or paused, not {ram!r}")
    if ram == "live" and rec["accel"] == "tcg":
        log.warning(
            "live RAM pre-copy under TCG: QEMU 7.2 lost guest memory writes in about 1 of 10 "
            "such migrations here (the guest oopses or hangs after the switch); --ram paused "
            "is safe"
        )
    if postcopy and ram == "paused":
        raise UsageError("--postcopy needs --ram live (a paused guest's RAM has nothing to defer)")
    caps = {"pause-before-switchover": True, "auto-converge": False, "postcopy-ram": postcopy}
    check_migration_capabilities(rec["accel"], caps)
    t0 = time.monotonic()
    report: dict[str, Any] = {
        "name": name,
        "from": str(src.dir),
        "to": str(dst.dir),
        "transport": f"tcp {dest_address}" if dest_address else "unix",
    }

    async with open_qmp(src.qmp_socket, name="migrate-src", connect_timeout=10) as sq:
        platform = await _platform(sq, rec)
        if (await sq.execute("query-status"))["status"] != "running":
            raise VmError(f"VM {name!r} is not running (paused?)")
        try:
            disks = [
                _dest_disk(dst.dir, i, d, copy_storage_inc)
                for i, d in enumerate(spec_rec.get("disks", []))
            ]  # fmt: skip
        except BaseException:
            shutil.rmtree(dst.dir, ignore_errors=True)
            raise
        spec = MachineSpec(
            name,
            memory_mib=platform["memory_mib"],
            cpus=platform["cpus"],
            machine=platform["machine"],
            cpu_model=platform["cpu_model"],
            kernel=Path(spec_rec["kernel"]) if spec_rec.get("kernel") else None,
            initrd=Path(spec_rec["initrd"]) if spec_rec.get("initrd") else None,
            append=spec_rec.get("append"),
            disks=disks,
            extra_args=list(spec_rec.get("extra_args", [])),
        )
        switched = False
        stuck: PostcopyStuck | None = None
        recovery = Recovery(dst.dir, dest_address, recover_timeout)

        async def body(dq_vm: QemuVM) -> None:
            nonlocal switched, stuck
            dq = dq_vm.qmp
            assert dq is not None
            if postcopy:  # both ends must have the capability before the stream starts
                await dq.execute("migrate-set-capabilities", {"capabilities": [
                    {"capability": "postcopy-ram", "state": True}]})  # fmt: skip
            if dest_address is None:
                uri = f"unix:{dst.dir / 'migrate.sock'}"
                await dq.execute("migrate-incoming", {"uri": uri})
                targets: list[Any] = [d.socket for d in disks]
            else:
                uri, targets = await _listen_tcp(dq, dest_address, disks)
            copiers = await trio.to_thread.run_sync(
                lambda: _copiers(spec_rec.get("disks", []), disks, targets)
            )
            try:
                switched = await _migrate(sq, dq, copiers, uri, dst.dir, report, progress,
                                          caps=caps, tcp=dest_address is not None,
                                          top_only=copy_storage_inc, postcopy=postcopy,
                                          paused=ram == "paused",
                                          bandwidth=bandwidth, downtime_ms=downtime_ms,
                                          precopy_timeout=precopy_timeout,
                                          postcopy_bandwidth=postcopy_bandwidth,
                                          recovery=recovery,
                                          timeout=timeout, wait=wait_migration)  # fmt: skip
            except Exception as e:
                if report.get("mode") != "postcopy" or not report.get("switched"):
                    if report.get("switched"):
                        raise
                    with trio.CancelScope(shield=True):
                        await _rollback(sq, name)
                    raise
                # Post-copy, after the switch: the destination holds the running guest's
                # devices and part of its memory, the source the rest. Keep both (the
                # destination QEMU is detached as usual) for --recover: killing either
                # loses the guest.
                stuck = e if isinstance(e, PostcopyStuck) else PostcopyStuck(str(e))
            except BaseException:
                if report.get("switched"):  # post-copy failed after the switch: no way back
                    raise
                with trio.CancelScope(shield=True):
                    await _rollback(sq, name)
                raise
            finally:
                for c in copiers:
                    with contextlib.suppress(Exception):
                        await trio.to_thread.run_sync(lambda c=c: c.close(drop_bitmap=True))

        try:
            info = await start_vm(spec, dst, timeout=min(timeout, 120), incoming="defer",
                                  on_up=body, netns=dest_netns)  # fmt: skip
        except BaseException as e:
            with trio.CancelScope(shield=True):
                if not switched and not report.get("switched"):
                    await stop_vm(dst, force=True)
                    shutil.rmtree(dst.dir, ignore_errors=True)
            if report.get("switched"):
                raise MigrationError(
                    f"post-copy of {name!r} failed after the switch ({e}): the guest's memory "
                    "was split between the hosts and is lost; its disks are intact"
                ) from e
            if isinstance(e, Exception) and not switched:
                raise MigrationError(
                    f"migration of {name!r} failed, the source runs on: {e}"
                ) from e
            raise
    if stuck is not None:
        raise PostcopyStuck(
            f"post-copy of {name!r} lost its link after the switch and did not recover "
            f"({stuck}): both QEMUs are kept, the guest runs at the destination on the memory "
            f"it has; once the link is back: vmctl migrate {name} --to {dest_root} --recover"
        )
    # Switched: the destination runs. The source is paused after the migration: stop it.
    await stop_vm(src)
    report.update({"pid": info["pid"], "accel": info["accel"],
                   "total_s": round(time.monotonic() - t0, 3)})  # fmt: skip
    _say(progress, f"done: downtime {report['downtime_ms']:.0f} ms, total {report['total_s']}s")
    return report


def _dest_disk(dest_dir: Path, index: int, d: dict[str, Any], inc: bool) -> VimgDisk:
    """A fresh image of the source disk's size in the destination directory (over the same
    backing file with ``inc``), as the destination guest's disk."""
    from vfs.export.client import ExportControl
    from vfs.image import Image

    size = ExportControl(d["control"]).status()["size"]
    dest_dir.mkdir(parents=True, exist_ok=True)
    path = dest_dir / f"{d['node']}.vimg"
    dirs: tuple[str, ...] = ()
    if inc:
        dirs = (str(Path(d["backing"]).parent),)
        Image.create(str(path), size, backing=d["backing"], backing_format=d["backing_format"],
                     backing_dirs=dirs).close()  # fmt: skip
    else:
        Image.create(str(path), size).close()
    return VimgDisk(
        path,
        dest_dir / f"d{index}.nbd",
        node_name=d["node"],
        backing=d["backing"] if inc else "",
        backing_format=d["backing_format"] if inc else "",
        backing_dirs=dirs,
    )


def _copiers(src_disks: list[dict[str, Any]], dst_disks: list[VimgDisk], targets: list[Any]):
    """One copier per disk, from the source export to ``targets`` (the destination exports'
    Unix sockets, or the destination QEMU's NBD server over TCP)."""
    from vmctl.diskcopy import DiskCopier

    out = []
    try:
        for s, d, t in zip(src_disks, dst_disks, targets, strict=True):
            out.append(DiskCopier(Path(s["socket"]), Path(s["control"]), s["node"],
                                  t, d.node_name))  # fmt: skip
    except BaseException:
        for c in out:
            c.close()
        raise
    return out


async def _disk_rounds(copiers, report, progress) -> None:
    """Dirty rounds until a round is small, the rounds stop shrinking, or MAX_DISK_ROUNDS."""
    last = None
    for n in range(1, MAX_DISK_ROUNDS + 1):
        sent = 0
        for c in copiers:
            sent += await trio.to_thread.run_sync(c.copy_dirty)
        report["disk_rounds"] = report.get("disk_rounds", 0) + 1
        _say(progress, f"stage 1: disk round {n}: {sent >> 10} KiB")
        if sent <= DISK_DONE_BYTES or (last is not None and sent >= last):
            return
        last = sent


async def _migrate(sq: QMPClient, dq: QMPClient, copiers, uri: str, dest_dir: Path, report,
                   progress, *, caps, bandwidth, downtime_ms, precopy_timeout, timeout, wait,
                   top_only: bool = False, postcopy: bool = False, paused: bool = False,
                   tcp: bool = False, postcopy_bandwidth: int | None = None,
                   recovery: Recovery | None = None) -> bool:  # fmt: skip
    """Stages 1 and 2; returns True once the destination runs."""
    t1 = time.monotonic()
    full = 0
    for c in copiers:
        full += await trio.to_thread.run_sync(c.full_copy, top_only)
    _say(progress, f"stage 1: disks copied ({full >> 10} KiB allocated)")
    await _disk_rounds(copiers, report, progress)

    await sq.execute("migrate-set-capabilities", {"capabilities": [
        {"capability": k, "state": v} for k, v in caps.items()]})  # fmt: skip
    await sq.execute("migrate-set-parameters",
                     {"max-bandwidth": bandwidth, "downtime-limit": downtime_ms})  # fmt: skip
    if postcopy and postcopy_bandwidth:
        await sq.execute("migrate-set-parameters", {"max-postcopy-bandwidth": postcopy_bandwidth})
    with sq.listen("STOP") as stops:
        if paused:  # RAM copied with the guest paused: no dirty tracking to trust
            await sq.execute("stop")
            await sq.execute("migrate-set-parameters", {"downtime-limit": STOP_AND_COPY_MS})
        await sq.execute("migrate", {"uri": uri})
        _say(progress, "stage 1: RAM " + ("copy (guest paused)" if paused else "pre-copy")
             + " started")  # fmt: skip
        mode = await _precopy(sq, copiers, progress, precopy_timeout, timeout, postcopy)
        if paused:
            mode = "paused"
        # Stage 2: the guest is paused (QEMU stopped it and flushed its disks).
        t_pause = time.monotonic()
        stage1 = t_pause - t1
        last = 0
        for c in copiers:
            last += await trio.to_thread.run_sync(c.finish)
        if tcp:  # the disks are copied and flushed: nothing may write them over TCP now
            await _unlisten_tcp(dq, copiers)
        await sq.execute("migrate-continue", {"state": "pre-switchover"})
        if mode == "postcopy":
            # The device state is loaded, the RAM follows on demand: run it as soon as QEMU
            # has it (paused, -S), then wait for the last pages.
            await _wait_status(dq, "paused", timeout)
        else:
            final = await wait(sq, timeout)
            await wait(dq, timeout)
        state = (await dq.execute("query-status"))["status"]
        if state != "paused":
            raise MigrationError(f"the destination is {state} after the migration, not paused")
        write_atomic(dest_dir / SWITCHED, json.dumps({
            "from": report["from"], "dest_address": recovery.address if recovery else None,
        }).encode())  # fmt: skip
        with dq.listen("RESUME") as resumes:
            await dq.execute("cont")
            t_resumed = time.monotonic()
            report["switched"] = True
            resumed = await resumes.wait_for("RESUME", timeout=30)
        if mode == "postcopy":
            report["mode"] = "postcopy"
            _say(progress, "switched: the guest runs at the destination, its RAM follows "
                           "(post-copy)")  # fmt: skip
            if recovery is None:
                final = await wait(sq, timeout)
            else:
                final = await finish_postcopy(sq, dq, recovery, report, progress, timeout)
            await wait(dq, timeout)
        paused = [ev for ev in stops.drain() if ev.name == "STOP"]
    # The guest-visible downtime: QEMU's own timestamps of the source's STOP and the
    # destination's RESUME (one host clock here; NTP-close between hosts).
    if paused:
        downtime = (resumed.timestamp - paused[-1].timestamp) * 1000
    else:  # no STOP seen (cannot happen with pause-before-switchover): our own clock
        downtime = (t_resumed - t_pause) * 1000
    ram = final.get("ram", {})
    report.update({
        "mode": mode,
        "stage1_s": round(stage1, 3),
        "stage2_s": round(t_resumed - t_pause, 3),
        "downtime_ms": round(downtime, 1),
        "qemu_downtime_ms": final.get("downtime"),
        "qemu_total_ms": final.get("total-time"),
        "ram_bytes": ram.get("transferred"),
        "ram_passes": ram.get("dirty-sync-count"),
        "disk_bytes": sum(c.stats.bytes_sent for c in copiers),
        "disk_last_bytes": last,
    })  # fmt: skip
    return True


async def _precopy(sq: QMPClient, copiers, progress, precopy_timeout: float,
                   timeout: float, postcopy: bool = False) -> str:  # fmt: skip
    """Wait for QEMU's pre-switchover pause while the disks' dirty rounds go on beside it;
    returns the mode it ended in (precopy, or stop-and-copy once the limit was lifted)."""
    mode = "precopy"
    started = time.monotonic()
    paused = trio.Event()
    errors: list[Exception] = []  # raised after the nursery: no exception groups for callers

    async def disks_follow() -> None:
        # Keep the disks close behind the guest while RAM converges (small rounds: the
        # pause waits for the one in progress).
        try:
            while not paused.is_set():
                for c in copiers:
                    await trio.to_thread.run_sync(c.copy_dirty)
                with trio.move_on_after(0.5):
                    await paused.wait()
        except Exception as e:  # noqa: BLE001 (re-raised below)
            errors.append(e)
            paused.set()

    async def poll() -> None:
        nonlocal mode
        last_report = 0.0
        while not paused.is_set():
            st = await _src_status(sq)
            status = st.get("status")
            if status == "pre-switchover":
                return
            if status in ("failed", "cancelled", "completed"):
                why = st.get("error-desc", "no reason")
                raise MigrationError(f"RAM migration {status}: {why}")
            now = time.monotonic()
            if mode == "precopy" and now - started > precopy_timeout:
                if postcopy:
                    mode = "postcopy"
                    _say(progress, f"stage 1: RAM did not converge in {precopy_timeout}s: "
                                   "post-copy")  # fmt: skip
                    await sq.execute("migrate-start-postcopy")
                else:
                    mode = "stop-and-copy"
                    _say(progress, f"stage 1: RAM did not converge in {precopy_timeout}s: "
                                   "stop and copy")  # fmt: skip
                    await sq.execute("migrate-set-parameters",
                                     {"downtime-limit": STOP_AND_COPY_MS})  # fmt: skip
            if now - started > timeout:
                raise MigrationError(f"RAM migration still {status} after {timeout}s")
            if now - last_report > 1.0:
                ram = st.get("ram", {})
                _say(progress, f"stage 1: RAM {status}, {ram.get('transferred', 0) >> 20} MiB "
                               f"sent, {ram.get('remaining', 0) >> 20} MiB remaining, "
                               f"{ram.get('dirty-sync-count', 0)} passes")  # fmt: skip
                last_report = now
            await trio.sleep(_POLL)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(disks_follow)
        try:
            await poll()
        except Exception as e:  # noqa: BLE001 (re-raised below)
            errors.append(e)
        paused.set()
    if errors:
        raise errors[0]
    return mode


#: Seconds one reconnection attempt of a broken post-copy may take to connect.
DIAL_TIMEOUT = 3.0
#: The name the recovery's connection is given in the source QEMU (``getfd``).
RECOVER_FD = "vmctl-recover"
#: In the destination's directory: where its QEMU listens for a recovery (a later
#: ``--recover`` dials it again: QEMU takes one ``migrate-recover`` per pause).
RECOVER_STATE = "migrate-recover.json"


class Recovery:
    """How a broken post-copy is reconnected: the destination listens anew
    (``migrate-recover``), vmctl dials it and hands the connected socket to the source QEMU
    (``getfd``, ``migrate fd: resume``). vmctl dials, not QEMU, so every attempt has a bounded
    connect time and a clear outcome: a failed one is retried until ``timeout``, and the
    source never has two connections under way (QEMU 7.2 does not guard against that)."""

    def __init__(self, dest_dir: Path, address: str | None, timeout: float) -> None:
        self.dest_dir, self.address, self.timeout = dest_dir, address, timeout

    def recorded(self) -> tuple[Any, str]:
        """Where the destination listens since an earlier ``listen`` (by another vmctl)."""
        try:
            st = json.loads((self.dest_dir / RECOVER_STATE).read_text())
            t = st["target"]
            return (tuple(t) if isinstance(t, list) else t), st["where"]
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise PostcopyStuck(f"no recorded recovery listener of the destination ({e})") from e

    async def listen(self, dq: QMPClient, progress=None) -> tuple[Any, str]:
        """Make the destination listen for the recovery; the dial target and its name.

        Out of band only (the destination's main loop may be blocked on a missing page, so
        no ``query-migrate`` there): ``migrate-recover`` is retried until the destination
        has noticed the break, then once more after ``migrate-pause`` cuts a half-open
        stream; a TCP port is taken from NBD_PORTS (no query to learn a kernel-picked one)."""
        deadline = trio.current_time() + 10
        paused = False
        ports = iter(NBD_PORTS)
        port = next(ports)
        while True:
            if self.address is None:
                path = self.dest_dir / "migrate-recover.sock"
                path.unlink(missing_ok=True)
                uri, target, where = f"unix:{path}", str(path), str(path)
            else:
                where = _hostport(self.address, port)
                uri, target = f"tcp:{where}", (self.address, port)
            try:
                await dq.execute("migrate-recover", {"uri": uri}, oob=True, timeout=10)
                write_atomic(
                    self.dest_dir / RECOVER_STATE,
                    json.dumps({"target": target, "where": where}).encode(),
                )
                return target, where
            except QMPError as e:
                text = str(e).lower()
                if "triggered already" in text:  # an earlier vmctl's listener, still open
                    return self.recorded()
                if "in use" in text and self.address is not None:
                    port = next(ports, None)
                    if port is None:
                        raise PostcopyStuck(f"no free port on {self.address} to recover") from e
                    continue
                if "paused" not in text:  # "can only be run when postcopy is paused"
                    raise PostcopyStuck(f"the destination refused to recover: {e}") from e
                if trio.current_time() > deadline:
                    if paused:
                        raise PostcopyStuck(f"the destination does not pause: {e}") from e
                    _say(progress, "post-copy: the destination did not see the break (a "
                                   "half-open stream): cutting it (migrate-pause)")  # fmt: skip
                    await dq.execute("migrate-pause", oob=True, timeout=10)
                    paused, deadline = True, trio.current_time() + 10
                await trio.sleep(0.1)


def _dial(target: Any, timeout: float):
    import socket

    if isinstance(target, tuple):
        sock = socket.create_connection(target, timeout=timeout)
    else:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.settimeout(timeout)
            sock.connect(target)
        except BaseException:
            sock.close()
            raise
    sock.settimeout(None)
    return sock


async def _mig_status(qmp: QMPClient) -> str:
    return (await qmp.execute("query-migrate", timeout=10)).get("status", "none")


async def finish_postcopy(sq: QMPClient, dq: QMPClient, recovery: Recovery, report, progress,
                          timeout: float) -> dict[str, Any]:  # fmt: skip
    """Wait for the source's post-copy to complete, reconnecting it whenever its link broke
    (QEMU then pauses both sides in ``postcopy-paused`` instead of failing)."""
    deadline = trio.current_time() + timeout
    while True:
        st = await _src_status(sq)
        status = st.get("status")
        if status == "completed":
            return st
        if status in ("failed", "cancelled"):
            raise MigrationError(f"post-copy {status}: {st.get('error-desc', 'no reason')}")
        if status == "postcopy-paused":
            await _recover(sq, dq, recovery, report, progress)
            continue
        if trio.current_time() > deadline:
            raise PostcopyStuck(f"post-copy still {status} after {timeout}s")
        await trio.sleep(_POLL)


async def _recover(sq: QMPClient, dq: QMPClient | None, recovery: Recovery, report,
                   progress) -> None:  # fmt: skip
    """Reconnect a paused post-copy: the destination listens (through ``dq``; with None,
    where an earlier vmctl made it listen), vmctl dials, the source resumes on that socket."""
    t0 = time.monotonic()
    n = report["recoveries"] = report.get("recoveries", 0) + 1
    _say(progress, f"post-copy: the migration link broke: recovering (recovery {n})")
    if dq is not None:
        target, where = await recovery.listen(dq, progress)
    else:
        target, where = recovery.recorded()
    attempt = 0
    while True:
        attempt += 1
        try:
            sock = await trio.to_thread.run_sync(_dial, target, DIAL_TIMEOUT)
        except OSError as e:
            waited = time.monotonic() - t0
            if waited > recovery.timeout:
                raise PostcopyStuck(f"no connection to {where} in {waited:.0f}s: {e}") from None
            _say(progress, f"post-copy: attempt {attempt} to reach {where}: {e}; again in 1s")
            await trio.sleep(1)
            continue
        with sock:  # QEMU holds its own copy once getfd returns
            await sq.execute("getfd", {"fdname": RECOVER_FD}, fds=(sock.fileno(),))
        await sq.execute("migrate", {"uri": f"fd:{RECOVER_FD}", "resume": True})
        break
    with trio.move_on_after(max(5.0, recovery.timeout)):
        while await _mig_status(sq) == "postcopy-paused":
            await trio.sleep(_POLL)
    (recovery.dest_dir / RECOVER_STATE).unlink(missing_ok=True)  # that listener is used up
    took = time.monotonic() - t0
    report["recovery_s"] = round(report.get("recovery_s", 0) + took, 3)
    _say(progress, f"post-copy: reconnected to {where} after {took:.2f}s ({attempt} attempts)")


#: The TCP ports tried, in order, for the destination QEMU's NBD server (libvirt's
#: migration range); the migration stream itself listens on a port the kernel picks.
NBD_PORTS = range(49152, 49216)


def _check_address(address: str) -> str:
    """An IP address (v4 or v6) the destination can listen on: no names (a name could resolve
    to another host than the one whose namespace the destination runs in)."""
    import ipaddress

    try:
        return str(ipaddress.ip_address(address.strip("[]")))
    except ValueError:
        raise UsageError(f"--dest-address wants an IP address, not {address!r}") from None


def _hostport(address: str, port: int | str) -> str:
    return f"[{address}]:{port}" if ":" in address else f"{address}:{port}"


async def _listen_tcp(dq: QMPClient, address: str, disks: list[VimgDisk]):
    """The destination QEMU listens on ``address``: for the migration stream (a port the
    kernel picks, read back from ``query-migrate``), and with an NBD server exporting each
    disk's block node writable, which the disk copy writes through (libvirt's scheme for
    ``--copy-storage-all``: QEMU's NBD export activates the node of an incoming guest).
    Returns the source's migrate URI and the copy targets."""
    await dq.execute("migrate-incoming", {"uri": f"tcp:{_hostport(address, 0)}"})
    st = await dq.execute("query-migrate")
    ports = [a.get("port") for a in st.get("socket-address", []) if a.get("type") == "inet"]
    if not ports:
        raise MigrationError(f"the destination did not say which port it listens on: {st}")
    uri = f"tcp:{_hostport(address, ports[0])}"
    for port in NBD_PORTS:
        try:
            await dq.execute("nbd-server-start", {"addr": {"type": "inet", "data": {
                "host": address, "port": str(port)}}})  # fmt: skip
            break
        except QMPError as e:
            if "in use" not in str(e).lower():
                raise
    else:
        raise MigrationError(f"no free port for the disks' NBD server on {address} "
                             f"({NBD_PORTS.start}-{NBD_PORTS.stop - 1})")  # fmt: skip
    for d in disks:
        await dq.execute("block-export-add", {"type": "nbd", "id": f"vmctl-{d.node_name}",
                                              "node-name": d.node_name, "name": d.node_name,
                                              "writable": True})  # fmt: skip
    log.info("destination listens on %s (stream) and %s (disks)", uri, _hostport(address, port))
    return uri, [(address, port)] * len(disks)


async def _unlisten_tcp(dq: QMPClient, copiers) -> None:
    """Close the copy's connections, then the destination's NBD exports and server: the
    guest's disks are no longer reachable over the network once it runs there."""
    for c in copiers:
        await trio.to_thread.run_sync(c.close_destination)
    for c in copiers:
        await dq.execute("block-export-del", {"id": f"vmctl-{c.dst_export}", "mode": "hard"})
    await dq.execute("nbd-server-stop")


async def _wait_status(qmp: QMPClient, want: str, timeout: float) -> None:
    deadline = trio.current_time() + timeout
    while (await qmp.execute("query-status"))["status"] != want:
        if trio.current_time() > deadline:
            raise MigrationError(f"the destination did not become {want} in {timeout}s")
        await trio.sleep(_POLL)


def _userfaultfd_usable() -> bool:
    """Post-copy needs userfaultfd in QEMU (which runs as we do)."""
    import os

    if (
        os.geteuid() == 0
        or Path("/dev/userfaultfd").exists()
        and os.access("/dev/userfaultfd", os.R_OK | os.W_OK)
    ):
        return True
    try:
        return Path("/proc/sys/vm/unprivileged_userfaultfd").read_text().strip() == "1"
    except OSError:
        return False


async def _rollback(sq: QMPClient, name: str) -> None:
    """Before the switch: cancel the source's migration and make sure its guest runs."""
    try:
        st = await _src_status(sq)
        if st.get("status") not in (None, "none", "completed", "failed", "cancelled"):
            await sq.execute("migrate-cancel")
            with trio.move_on_after(30):
                while (await _src_status(sq)).get("status") not in ("cancelled", "failed"):
                    await trio.sleep(0.05)
        if (await sq.execute("query-status"))["status"] != "running":
            await sq.execute("cont")
        log.warning("migration of %s failed; the source guest runs on", name)
    except QMPError as e:
        log.warning("migration of %s failed, and the source did not answer: %s", name, e)


async def recover(root: Path, name: str, dest_root: Path, *, recover_timeout: float = 60.0,
                  timeout: float = 600.0, progress=None) -> dict[str, Any]:  # fmt: skip
    """Finish a post-copy whose ``vmctl migrate`` gave up reconnecting after the switch (or
    died): reconnect the two QEMUs, wait for the last pages, stop the source."""
    from vmctl.hibernate import wait_migration
    from vmctl.lifecycle import stop_vm
    from vmctl.vms import vm_paths

    src, dst = vm_paths(root, name), vm_paths(dest_root, name)
    marker = dst.dir / SWITCHED
    if not marker.exists():
        raise VmError(f"no switched migration of {name!r} in {dst.dir}: nothing to recover "
                      "(before the switch, --abort undoes a migration)")  # fmt: skip
    try:
        address = json.loads(marker.read_text()).get("dest_address")
    except ValueError as e:
        raise VmError(f"{marker} is damaged: {e}") from None
    if read_pidfile(dst.pidfile) is None:
        raise VmError(f"the destination QEMU of {name!r} is not running: nothing to recover")
    report: dict[str, Any] = {"name": name, "from": str(src.dir), "to": str(dst.dir)}
    if read_pidfile(src.pidfile) is None:
        async with open_qmp(dst.qmp_socket, name="recover-dst", connect_timeout=10) as dq:
            if await _mig_status(dq) != "completed":
                raise VmError(
                    f"the source QEMU of {name!r} is gone before post-copy completed: the "
                    "memory it held is lost (stop the destination: vmctl stop --force)"
                )
        report["recoveries"] = 0
        return report
    # The destination's main loop may be blocked on a page the broken stream never brought:
    # a new QMP connection to it cannot even be negotiated then. The source is fine, and the
    # destination's recovery listener (if an earlier vmctl set it up) is recorded: dial it.
    recovery = Recovery(dst.dir, address, recover_timeout)
    report["recoveries"] = 0
    async with open_qmp(src.qmp_socket, name="recover-src", connect_timeout=10) as sq:
        first = True
        deadline = trio.current_time() + timeout
        while True:
            st = await _src_status(sq)
            status = st.get("status")
            if status == "completed":
                final = st
                break
            if status in ("failed", "cancelled", "none"):
                raise VmError(f"the source's migration is {status}: "
                              f"{st.get('error-desc', 'no reason')}")  # fmt: skip
            if status == "postcopy-paused":
                if first and (dst.dir / RECOVER_STATE).exists():
                    await _recover(sq, None, recovery, report, progress)
                else:
                    try:
                        async with open_qmp(dst.qmp_socket, name="recover-dst",
                                            connect_timeout=10, oob=True) as dq:  # fmt: skip
                            await _recover(sq, dq, recovery, report, progress)
                    except QMPError as e:
                        raise PostcopyStuck(
                            f"the destination QEMU does not answer QMP ({e}): its main loop "
                            "waits for a page of the broken post-copy, and no recovery "
                            "listener of it is recorded"
                        ) from e
                first = False
                continue
            if trio.current_time() > deadline:
                raise PostcopyStuck(f"post-copy still {status} after {timeout}s")
            await trio.sleep(_POLL)
    async with open_qmp(dst.qmp_socket, name="recover-dst", connect_timeout=30) as dq:
        await wait_migration(dq, timeout)
    await stop_vm(src)
    report["qemu_total_ms"] = final.get("total-time")
    return report


#: Written in the destination's directory just before its guest is resumed: from then on the
#: guest lives there, and ``abort`` refuses to resume the source.
SWITCHED = "migrated-from.json"


async def abort(root: Path, name: str, dest_root: Path) -> dict[str, Any]:
    """Undo a migration whose ``vmctl migrate`` died before the switch (killed, host lost):
    cancel the source's migration, resume its guest, stop and remove the destination.

    Refused once the switch began (the destination's SWITCHED marker exists): the guest lives
    there, and resuming the source would give one disk's history two guests."""
    from vmctl.lifecycle import stop_vm
    from vmctl.vms import vm_paths

    src, dst = vm_paths(root, name), vm_paths(dest_root, name)
    if src.dir.resolve() == dst.dir.resolve():
        raise UsageError("the destination root is the source root")
    if (dst.dir / SWITCHED).exists():
        raise VmError(
            f"the migration of {name!r} switched to {dst.dir}: the guest lives there; stop the "
            f"source instead (vmctl stop {name} --root {root})"
        )
    resumed = False
    if read_pidfile(src.pidfile) is not None:
        async with open_qmp(src.qmp_socket, name="abort-src", connect_timeout=10) as sq:
            await _rollback(sq, name)
            resumed = (await sq.execute("query-status"))["status"] == "running"
    elif not dst.dir.exists():
        raise NotFound(f"no migration of {name!r} to undo (no source QEMU, no destination)")
    removed = False
    if dst.dir.exists():
        await stop_vm(dst, force=True)
        shutil.rmtree(dst.dir, ignore_errors=True)
        removed = True
    return {"name": name, "source_running": resumed, "destination_removed": removed}
