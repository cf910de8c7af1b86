"""vimg disks of a guest: one ``vfsd export`` process per image, QEMU on its NBD socket.

Why a process of its own per disk (not a thread of vmctl): QEMU outlives ``vmctl run``, so its
disks' server must too; and one export process per image is how ``vfsd export`` is built (the
image is open and locked by it alone, as qemu-nbd does). The export keeps the image's dirty
bitmap (``dirty``), which migration and incremental backup read through its control socket.

Files in the VM's state directory, per vimg disk N::

    dN.nbd        the NBD socket QEMU connects to (export name = the disk's node name)
    dN.nbd.ctl    the export's control socket (vfs.export.client.ExportControl)
    dN.pid        "PID STARTTIME" of the export process (as qemu.pid)
    dN.log        the export's log

Order, and why: exports start before QEMU (QEMU opens its NBD node at start-up) and stop after
it (QEMU flushes its disks when it quits; the export's last commit then writes the image and
its bitmaps). Crash story: an export killed with SIGKILL loses nothing a guest flush was
answered for (the export commits before it answers a FLUSH or FUA write); the guest then sees
I/O errors, and the image opens as of its last commit.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import trio

from vfs.durable import write_atomic
from vfs.errors import NotFound, UsageError, VfsError
from vfs.redirect.repoconfig import RepoConfig
from vmctl.disks import Disk, check_node_name
from vmctl.errors import QemuError, VmError

log = logging.getLogger("vmctl.exports")

#: How long an export may take to open its image and answer on its control socket.
START_TIMEOUT = 30.0


class ExportStartError(VmError):
    """The export of a disk did not come up (its log's tail is in the message)."""


@dataclass
class VimgDisk(Disk):
    """A vimg image, served to QEMU by a ``vfsd export`` process over NBD."""

    path: Path
    socket: Path
    node_name: str = "disk0"
    read_only: bool = False
    #: The image's backing file (absolute, '' without one) and its format: recorded so a
    #: migration can give the destination's image the same backing (copy only this layer).
    backing: str = ""
    backing_format: str = ""
    #: Directories besides the image's own where its backing file may lie (vimg spec 8).
    backing_dirs: tuple[str, ...] = ()
    #: Where the export fetches the image's remote clusters on demand ('' none: only what the
    #: local store holds), and that local store ('' the default one).
    repo: RepoConfig | None = None
    store: str = ""

    def __post_init__(self) -> None:
        self.path = Path(self.path).absolute()  # vm.json and bundles outlive the cwd
        self.socket = Path(self.socket).absolute()
        check_node_name(self.node_name)
        if not self.path.exists():
            raise NotFound(f"disk image {self.path} does not exist")

    @property
    def control(self) -> Path:
        return Path(f"{self.socket}.ctl")

    @property
    def pidfile(self) -> Path:
        return self.socket.with_suffix(".pid")

    @property
    def logfile(self) -> Path:
        return self.socket.with_suffix(".log")

    def blockdevs(self) -> list[dict[str, Any]]:
        from vfs.export.client import blockdev_spec

        return [
            blockdev_spec(self.socket, self.node_name, self.node_name, read_only=self.read_only)
        ]

    def describe(self) -> dict[str, Any]:
        return {"node": self.node_name, "path": str(self.path), "format": "vimg",
                "read_only": self.read_only, "socket": str(self.socket),
                "control": str(self.control), "backing": self.backing,
                "backing_format": self.backing_format,
                "backing_dirs": list(self.backing_dirs),
                "repo": self.repo.to_json() if self.repo else None,
                "store": self.store}  # fmt: skip


def vimg_disk(path: Path, index: int, state_dir: Path) -> VimgDisk:
    """The ``index``-th disk of a VM whose state directory is ``state_dir``.

    The image is opened read-only once here, so a damaged or busy image is refused with the
    image layer's own error before any process starts."""
    from vfs.image import Image

    img = Image.open(str(path), readonly=True)
    try:
        backing = img.backing_path() if img.backing_name else ""
        fmt = img.backing_format if backing else ""
    finally:
        img.close()
    return VimgDisk(Path(path), Path(state_dir) / f"d{index}.nbd", node_name=f"disk{index}",
                    backing=backing, backing_format=fmt)  # fmt: skip


def _export_argv(disk: VimgDisk) -> list[str]:
    # The vfsd CLI of the same installation, run by this interpreter (no PATH lookup).
    return [sys.executable, "-c", "from vfs.cli.vfsd import main; main()", "export", "run",
            str(disk.path.resolve()), "--nbd", str(disk.socket), "--name", disk.node_name,
            *(["--readonly"] if disk.read_only else []),
            *[a for d in disk.backing_dirs for a in ("--backing-dir", d)],
            *(disk.repo.to_argv() if disk.repo else []),
            *(["--store", disk.store] if disk.store else [])]  # fmt: skip


def _tail(path: Path, limit: int = 4000) -> str:
    try:
        data = path.read_bytes()[-limit:]
    except OSError:
        return ""
    lines = data.decode(errors="replace").strip().splitlines()
    # The CLI's one-line error is "PROG: error: MESSAGE"; PROG is "-c" when run as we do.
    return lines[-1].split("error: ", 1)[-1] if lines else ""


async def start_export(disk: VimgDisk, netns: str | None = None) -> int:
    """Start the export of ``disk`` (detached: it outlives vmctl, as its QEMU does) and return
    its pid once its control socket answers (in network namespace ``netns`` if given). On any
    failure the process is killed."""
    from vmctl.netns import netns_prefix
    from vmctl.qemu import process_start_time

    disk.socket.parent.mkdir(parents=True, exist_ok=True)
    with open(disk.logfile, "wb") as out:
        proc = await trio.lowlevel.open_process(
            netns_prefix(netns) + _export_argv(disk),
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    ok = False
    try:
        start = process_start_time(proc.pid)
        write_atomic(disk.pidfile, f"{proc.pid} {start}\n".encode())
        await _wait_ready(disk, proc)
        ok = True
        return proc.pid
    finally:
        if not ok:
            with trio.CancelScope(shield=True):
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
                await proc.wait()
                _remove(disk)


async def _wait_ready(disk: VimgDisk, proc: trio.Process) -> None:
    from vfs.export.client import ExportControl

    ctl = ExportControl(disk.control)
    with trio.move_on_after(START_TIMEOUT) as scope:
        while True:
            if proc.poll() is not None:
                why = _tail(disk.logfile) or f"exit status {proc.returncode}"
                raise ExportStartError(f"the export of {disk.path} did not start: {why}")
            if disk.control.exists():
                try:
                    await trio.to_thread.run_sync(ctl.ping)
                    return
                except (VfsError, OSError):
                    pass
            await trio.sleep(0.05)
    if scope.cancelled_caught:
        raise ExportStartError(f"the export of {disk.path} did not answer in {START_TIMEOUT}s")


def _remove(disk: VimgDisk) -> None:
    for p in (disk.pidfile, disk.socket, disk.control):
        with contextlib.suppress(FileNotFoundError):
            p.unlink()


async def start_exports(disks: list[Disk], netns: str | None = None) -> list[VimgDisk]:
    """Start the export of every vimg disk in ``disks``; if one fails, stop those started."""
    started: list[VimgDisk] = []
    try:
        for d in disks:
            if isinstance(d, VimgDisk):
                await start_export(d, netns)
                started.append(d)
    except BaseException:
        with trio.CancelScope(shield=True):
            for d in started:
                await stop_export_files(d.pidfile, d.control)
        raise
    return started


async def stop_export_files(pidfile: Path, control: Path, timeout: float = 30.0) -> bool:
    """Stop the export whose pid is in ``pidfile``: the ``stop`` control op (its last commit
    writes the image), then SIGTERM, then SIGKILL, through a pidfd (a reused pid is never
    signalled). Returns False if none was running."""
    from vfs.export.client import ExportControl
    from vmctl.qemu import read_pidfile

    pid = read_pidfile(pidfile)
    gone = True
    if pid is not None:
        try:
            pidfd = os.pidfd_open(pid)
        except ProcessLookupError:
            pidfd = None
        if pidfd is not None:
            try:
                gone = False
                try:
                    await trio.to_thread.run_sync(ExportControl(control).stop)
                except (VfsError, OSError) as e:
                    log.info("export (pid %d) stop over its control socket: %s", pid, e)
                gone = await _wait_fd(pidfd, timeout)
                for sig, wait in ((signal.SIGTERM, 10.0), (signal.SIGKILL, 10.0)):
                    if gone:
                        break
                    log.warning("sending %s to the export (pid %d)", sig.name, pid)
                    with contextlib.suppress(ProcessLookupError):
                        signal.pidfd_send_signal(pidfd, sig)
                    gone = await _wait_fd(pidfd, wait)
            finally:
                os.close(pidfd)
    if not gone:
        raise QemuError(f"the export (pid {pid}) survived SIGKILL")
    for p in (pidfile, control, Path(str(control).removesuffix(".ctl"))):
        with contextlib.suppress(FileNotFoundError):
            p.unlink()
    return pid is not None


async def _wait_fd(pidfd: int, timeout: float) -> bool:
    with trio.move_on_after(timeout):
        await trio.lowlevel.wait_readable(pidfd)
        return True
    return False


async def stop_vm_exports(state_dir: Path) -> int:
    """Stop every export a VM's state directory records (``d*.pid``); returns how many ran."""
    n = 0
    for pidfile in sorted(Path(state_dir).glob("d*.pid")):
        control = pidfile.with_suffix(".nbd.ctl")
        n += await stop_export_files(pidfile, control)
    return n


def running_exports(state_dir: Path) -> list[int]:
    from vmctl.qemu import read_pidfile

    pids = [read_pidfile(p) for p in sorted(Path(state_dir).glob("d*.pid"))]
    return [p for p in pids if p is not None]


def check_not_shared(disks: list[Disk]) -> None:
    """Two disks of one guest on one image would be two writers of it."""
    seen: dict[Path, int] = {}
    for i, d in enumerate(disks):
        p = getattr(d, "path", None)
        if p is None:
            continue
        real = Path(p).resolve()
        if real in seen:
            raise UsageError(f"disks {seen[real]} and {i} are the same image {p}")
        seen[real] = i
