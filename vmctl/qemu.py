"""Run one QEMU process: start it, wait until its guest is up, stop it, never leave it behind.

The lifetime in one place (:func:`run_qemu`, an async context manager)::

    prepare the state directory ─► listen on qmp.sock ─► spawn QEMU (inherits the socket)
       ─► QMP greeting + negotiation ─► marker in the serial log ─► yield the VM
       ─► on a clean exit: stop (quit over QMP → SIGTERM → SIGKILL), unless the caller
          detached it (``vm.detach()``: ``vmctl run`` leaves QEMU running for ``vmctl stop``)
       ─► on any error or cancellation, at any step after the spawn: SIGKILL and reap

Waiting is on conditions, each raced against QEMU exiting: a QEMU that dies while we wait for its
greeting or its guest's marker is reported at once, with the tail of its stderr, as
:class:`QemuStartError` / :class:`QemuExited`, not found later by a timeout. Cleanup runs
shielded from cancellation, so a cancelled or failed start still kills and reaps QEMU.

State directory of a VM (one per VM; the CLI puts them under ``<root>/<name>/``)::

    vm.json      {"format": "vmctl-vm", "version": 1, "spec", "argv", "accel", "accel_reason"}:
                 the spec, the command line, the accelerator and why (written before the spawn)
    qmp.sock     the QMP socket (QEMU holds the listening end; removed at stop)
    serial.log   the guest's serial console
    qemu.log     QEMU's stdout and stderr
    qemu.pid     "PID STARTTIME" (STARTTIME from /proc/PID/stat, so a reused pid is not taken
                 for our QEMU); removed at stop

One limit: if the Python process running this is itself killed with SIGKILL, its QEMU keeps
running (Linux's parent-death signal is tied to the thread that forked, and trio forks from a
worker thread that may exit at any time, so it cannot be used). ``qemu.pid`` is how a later
``vmctl stop`` finds it.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import math
import os
import re
import signal
import socket
import subprocess
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import trio

from vfs.durable import write_atomic
from vfs.errors import BusyError, NotFound, UsageError
from vmctl.errors import (
    GuestTimeout,
    QemuError,
    QemuExited,
    QemuStartError,
    QMPConnectError,
    QMPConnectionLost,
    QMPError,
)
from vmctl.host import Accelerator, choose_accelerator, qemu_binary
from vmctl.machine import MachineSpec, build_argv
from vmctl.qmp import QMPClient, Runstate, open_qmp

log = logging.getLogger("vmctl.qemu")

#: vm.json names itself and has a version, so later vmctl releases (hibernate bundles record
#: the platform from it) can tell what they read and refuse what they do not know.
VM_RECORD_FORMAT = "vmctl-vm"
VM_RECORD_VERSION = 1
#: Serial log polling interval while waiting for a pattern (the file has no change events).
_POLL = 0.02
#: Longest unix socket path (sun_path is 108 bytes with the NUL).
_SUN_PATH_MAX = 107


@dataclass(frozen=True)
class VmPaths:
    dir: Path

    @property
    def spec(self) -> Path:
        return self.dir / "vm.json"

    @property
    def qmp_socket(self) -> Path:
        return self.dir / "qmp.sock"

    @property
    def serial_log(self) -> Path:
        return self.dir / "serial.log"

    @property
    def qemu_log(self) -> Path:
        return self.dir / "qemu.log"

    @property
    def pidfile(self) -> Path:
        return self.dir / "qemu.pid"


def process_start_time(pid: int) -> int | None:
    """Field 22 of /proc/PID/stat (clock ticks since boot); None if there is no such process or
    it is a zombie (it has exited; only its exit status is left to collect)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # The command name (field 2) is in parentheses and may hold spaces: split after the last ')'.
    fields = stat.rsplit(")", 1)[1].split()
    if fields[0] in ("Z", "X"):
        return None
    return int(fields[19])


def read_pidfile(path: Path) -> int | None:
    """The pid recorded in ``path`` if that very process still runs (not a reused pid)."""
    try:
        pid_s, start_s = path.read_text().split()
        pid, start = int(pid_s), int(start_s)
    except (OSError, ValueError):
        return None
    return pid if process_start_time(pid) == start else None


def _tail(path: Path, lines: int = 20, limit: int = 64 << 10) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            size = f.tell()
            f.seek(max(0, size - limit))
            data = f.read()
    except OSError:
        return ""
    return "\n".join(data.decode(errors="replace").splitlines()[-lines:])


class QemuVM:
    """A QEMU we started (made by :func:`run_qemu`)."""

    def __init__(
        self,
        spec: MachineSpec,
        paths: VmPaths,
        accel: Accelerator,
        argv: list[str],
        process: trio.Process,
    ) -> None:
        self.spec = spec
        self.paths = paths
        self.accel = accel
        self.argv = argv
        self.process = process
        self.qmp: QMPClient | None = None
        self.started_at = time.monotonic()
        self._serial = b""
        self._serial_read = 0
        self._cursor = 0
        self.detached = False
        self._keep_running = False
        self.logger = log.getChild(spec.name.replace(".", "_"))

    @property
    def pid(self) -> int:
        return self.process.pid

    @property
    def returncode(self) -> int | None:
        return self.process.poll()

    def stderr_tail(self, lines: int = 20) -> str:
        return _tail(self.paths.qemu_log, lines)

    # -- the serial console ----------------------------------------------------------------------

    def _read_serial(self) -> None:
        try:
            with open(self.paths.serial_log, "rb") as f:
                f.seek(self._serial_read)
                data = f.read()
        except FileNotFoundError:
            return
        self._serial_read += len(data)
        # The guest's tty writes CRLF; matching works on plain lines.
        self._serial += data.replace(b"\r", b"")

    def serial_text(self) -> str:
        """Everything the guest printed so far."""
        self._read_serial()
        return self._serial.decode(errors="replace")

    async def wait_serial(self, pattern: str | re.Pattern[bytes], timeout: float = 60.0):
        """Wait for a complete serial line matching ``pattern`` (a regex; str or bytes) after
        the previous match, and return the match (on bytes). Raises :class:`QemuExited` the
        moment QEMU exits and :class:`GuestTimeout` after ``timeout`` seconds."""
        rx = re.compile(pattern.encode() if isinstance(pattern, str) else pattern)
        deadline = trio.current_time() + timeout
        while True:
            self._read_serial()
            complete = self._serial.rfind(b"\n") + 1
            m = rx.search(self._serial, self._cursor, complete)
            if m is not None:
                self._cursor = m.end()
                return m
            rc = self.returncode
            if rc is not None:
                raise QemuExited(
                    f"QEMU exited ({_describe_rc(rc)}) before the guest printed "
                    f"{rx.pattern.decode(errors='replace')!r}",
                    returncode=rc,
                    stderr_tail=self.stderr_tail(),
                )
            if trio.current_time() >= deadline:
                raise GuestTimeout(
                    f"the guest did not print {rx.pattern.decode(errors='replace')!r} "
                    f"within {timeout}s",
                    serial_tail=_tail(self.paths.serial_log),
                )
            await trio.sleep(_POLL)

    # -- ending it -------------------------------------------------------------------------------

    def detach(self) -> None:
        """Leave QEMU running when run_qemu's block ends cleanly (an error still kills it)."""
        self.detached = True

    async def wait_exit(self, timeout: float | None = None) -> int | None:
        """QEMU's exit status, or None if it is still running after ``timeout`` seconds."""
        with trio.move_on_after(math.inf if timeout is None else timeout):
            return await self.process.wait()
        return None

    async def stop(self, timeout: float = 20.0, term_timeout: float = 5.0) -> int:
        """Quit over QMP and wait; then SIGTERM, then SIGKILL. Returns QEMU's exit status."""
        rc = self.returncode
        if rc is None and self.qmp is not None and self.qmp.runstate is Runstate.RUNNING:
            try:
                await self.qmp.execute("quit", timeout=min(5.0, timeout))
            except QMPError as e:  # lost: it may die before answering; any error: go on
                self.logger.debug("quit over QMP: %s", e)
            rc = await self.wait_exit(timeout)
        if rc is None:
            self.logger.info("QEMU did not quit over QMP; sending SIGTERM")
            self._signal(signal.SIGTERM)
            rc = await self.wait_exit(term_timeout)
        if rc is None:
            rc = await self.kill()
        self._remove_runtime_files()
        return rc

    async def kill(self) -> int:
        """SIGKILL and reap."""
        self._signal(signal.SIGKILL)
        rc = await self.process.wait()
        self._remove_runtime_files()
        return rc

    def _signal(self, sig: int) -> None:
        with contextlib.suppress(ProcessLookupError):
            self.process.send_signal(sig)

    def _remove_runtime_files(self) -> None:
        _remove_files(self.paths)

    async def _reap(self) -> None:
        """The last step of every path out of run_qemu: make sure QEMU is gone."""
        with trio.CancelScope(shield=True):
            if self._keep_running and self.returncode is None:
                return
            if self.returncode is None:
                self.logger.info("killing QEMU (pid %d)", self.pid)
                await self.kill()
            else:
                await self.process.wait()
                self._remove_runtime_files()

    async def _start_error(self, what: str, cause: BaseException) -> QemuStartError:
        # QEMU that fails at start-up exits within moments of closing the socket: give it that
        # long to say why, so the error carries its message rather than "connection refused".
        rc = await self.wait_exit(2.0)
        detail = f"exited {_describe_rc(rc)}" if rc is not None else "still running; killed"
        return QemuStartError(
            f"{what} ({detail})",
            argv=self.argv,
            returncode=rc,
            stderr_tail=self.stderr_tail() or str(cause),
        )


def _describe_rc(rc: int | None) -> str:
    if rc is None:
        return "running"
    if rc < 0:
        try:
            return f"killed by {signal.Signals(-rc).name}"
        except ValueError:
            return f"killed by signal {-rc}"
    return f"status {rc}"


def _listen_unix(path: Path) -> socket.socket:
    if len(os.fsencode(path)) > _SUN_PATH_MAX:
        raise UsageError(f"state directory path too long for a unix socket: {path}")
    with contextlib.suppress(FileNotFoundError):
        path.unlink()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.bind(os.fspath(path))
        sock.listen(4)
    except BaseException:
        sock.close()
        raise
    return sock


def prepare_state_dir(state_dir: Path) -> tuple[VmPaths, BinaryIO]:
    """Make the directory ready for a new start; returns it and the start lock (an flock on
    ``.lock``, held until the new QEMU's pidfile is written, so two starts cannot race)."""
    paths = VmPaths(Path(state_dir))
    paths.dir.mkdir(parents=True, exist_ok=True)
    lock = open(paths.dir / ".lock", "ab")  # noqa: SIM115 (held past this function)
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        lock.close()
        raise BusyError(f"another vmctl is starting a VM in {paths.dir}") from None
    running = read_pidfile(paths.pidfile)
    if running is not None:
        lock.close()
        raise BusyError(f"a QEMU (pid {running}) already runs in {paths.dir}")
    for p in (paths.serial_log, paths.qemu_log, paths.pidfile):
        with contextlib.suppress(FileNotFoundError):
            p.unlink()
    return paths, lock


async def _wait_pidfd(pidfd: int, timeout: float) -> bool:
    """True once the process behind ``pidfd`` has exited (its pidfd turns readable)."""
    with trio.move_on_after(timeout):
        await trio.lowlevel.wait_readable(pidfd)
        return True
    return False


async def stop_detached(
    paths: VmPaths, *, force: bool = False, timeout: float = 20.0, term_timeout: float = 5.0
) -> bool:
    """Stop a QEMU that is not our child (``vmctl run`` left it running): quit over QMP unless
    ``force``, then SIGTERM, then SIGKILL, each sent through a pidfd so a pid reused meanwhile
    is never signalled. Returns False if no QEMU was running there."""
    pid = read_pidfile(paths.pidfile)
    if pid is None:
        _remove_files(paths)
        return False
    try:
        pidfd = os.pidfd_open(pid)
    except ProcessLookupError:
        _remove_files(paths)
        return False
    try:
        gone = False
        if not force:
            try:
                async with open_qmp(paths.qmp_socket, name="stop", connect_timeout=5) as qmp:
                    await qmp.execute("quit", timeout=5)
            except QMPError as e:
                log.info("quit over QMP (pid %d): %s", pid, e)
            gone = await _wait_pidfd(pidfd, timeout)
        for sig, wait in ((signal.SIGTERM, term_timeout), (signal.SIGKILL, 10.0)):
            if gone:
                break
            log.info("sending %s to QEMU (pid %d)", sig.name, pid)
            with contextlib.suppress(ProcessLookupError):
                signal.pidfd_send_signal(pidfd, sig)
            gone = await _wait_pidfd(pidfd, wait)
        if not gone:
            raise QemuError(f"QEMU (pid {pid}) survived SIGKILL (stuck in the kernel?)")
    finally:
        os.close(pidfd)
    _remove_files(paths)
    return True


def _remove_files(paths: VmPaths) -> None:
    for p in (paths.qmp_socket, paths.pidfile):
        with contextlib.suppress(FileNotFoundError):
            p.unlink()


@contextlib.asynccontextmanager
async def run_qemu(
    spec: MachineSpec,
    state_dir: Path,
    *,
    accel: Accelerator | None = None,
    marker: str | None = None,
    boot_timeout: float = 120.0,
    connect_timeout: float = 30.0,
    binary: str | None = None,
    incoming: str | None = None,
    netns: str | None = None,
) -> AsyncIterator[QemuVM]:
    """Start QEMU for ``spec`` with its state in ``state_dir``; yield once QMP is up (and, with
    ``marker``, once the guest printed a line matching it); stop it on the way out.
    ``incoming`` (e.g. ``defer``): QEMU waits for a migration stream instead of booting.
    ``netns``: QEMU runs in that network namespace (its TCP listeners and peers are there)."""
    from vmctl.netns import netns_prefix

    prefix = netns_prefix(netns)  # a missing namespace is refused before anything is made
    binary = binary or qemu_binary()
    if binary is None:
        raise NotFound("qemu-system-x86_64 is not installed")
    accel = accel or choose_accelerator()
    paths, lock = prepare_state_dir(state_dir)
    try:
        listener = _listen_unix(paths.qmp_socket)
    except BaseException:
        lock.close()
        raise
    try:
        argv = build_argv(spec, binary=binary, accel=accel.name, qmp_fd=listener.fileno(),
                          serial_log=paths.serial_log, incoming=incoming)  # fmt: skip
        record = {"format": VM_RECORD_FORMAT, "version": VM_RECORD_VERSION,
                  "spec": spec.describe(), "argv": argv, "accel": accel.name,
                  "accel_reason": accel.reason, "netns": netns}  # fmt: skip
        write_atomic(paths.spec, json.dumps(record, indent=2).encode())
        log.info("starting %s under %s (%s)", spec.name, accel.name.upper(), accel.reason)
        with open(paths.qemu_log, "wb") as qemu_log:
            process = await trio.lowlevel.open_process(
                prefix + argv,
                stdin=subprocess.DEVNULL,
                stdout=qemu_log,
                stderr=subprocess.STDOUT,
                pass_fds=(listener.fileno(),),
                start_new_session=True,
            )
    except BaseException:
        lock.close()
        raise
    finally:
        # Only QEMU may hold the listening end: if it dies, our connection must see EOF at once.
        listener.close()
    vm = QemuVM(spec, paths, accel, argv, process)
    async with contextlib.AsyncExitStack() as stack:
        stack.callback(lock.close)
        stack.push_async_callback(vm._reap)
        start = process_start_time(process.pid)
        if start is not None:
            write_atomic(paths.pidfile, f"{process.pid} {start}\n".encode())
        try:
            vm.qmp = await stack.enter_async_context(
                # An incoming guest may become a post-copy destination, whose main loop can
                # block on a missing page: its recovery commands then go out of band.
                open_qmp(
                    paths.qmp_socket,
                    name=spec.name,
                    connect_timeout=connect_timeout,
                    oob=incoming is not None,
                )
            )
        except QMPConnectError as e:
            raise await vm._start_error("QEMU did not start", e) from e
        if marker is not None:
            try:
                await vm.wait_serial(marker, timeout=boot_timeout)
            except QemuExited as e:
                raise QemuStartError(e.message, argv=argv, returncode=e.returncode,
                                     stderr_tail=e.stderr_tail) from e  # fmt: skip
            except GuestTimeout as e:
                e.message += " (QEMU killed)"
                raise
        log.info("%s is up (pid %d) after %.2fs", spec.name, vm.pid,
                 time.monotonic() - vm.started_at)  # fmt: skip
        clean = False
        lock.close()  # started: from now on the pidfile says the directory is busy
        try:
            yield vm
            clean = True
        finally:
            if clean and vm.detached:
                vm._keep_running = True
            elif clean and vm.returncode is None:
                with trio.CancelScope(shield=True):
                    try:
                        await vm.stop()
                    except QMPConnectionLost:
                        pass
