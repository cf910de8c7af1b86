"""The exports of ``vfsd serve``: one ``vfsd export`` process per image, started, watched and
restarted by the daemon, kept in a registry so they come back when the daemon does.

Why processes and not tasks of the daemon: an exported image is single-threaded and locked by
its writer, a FUSE raw file needs a mount of its own (pyfuse3: one per process, and the
daemon's is the VEE tree), and an export that crashes must not take the VEE mount with it.
What an operator of qemu-nbd/nbdkit under systemd gets, without systemd: ``vfsd export add``
starts it now and at every daemon start; a process that dies is restarted with back-off (not
after 5 quick deaths in a row: then it is ``failed`` until ``export rm``/``add``).

Registry: ``<state>/exports.json`` (written atomically, mode 0600); per export a control
socket and a log in ``<state>/exports/``. Crash story: the registry is written before an
export starts and after it stops for good, so a daemon killed at any point restarts exactly
the exports an operator asked for; the export processes themselves (their own crash story in
:mod:`vfs.export.service`) are restarted, never duplicated — the image's lock refuses a second
writer, and a daemon start first stops the processes a killed daemon left running (their
control sockets name them) and waits for them to go.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import signal
import sys
import time
from pathlib import Path
from typing import Any

import trio

from vfs.durable import write_atomic
from vfs.errors import AlreadyExists, FormatError, NotFound, UsageError
from vfs.export.client import ExportControl
from vfs.redirect.repoconfig import RepoConfig

log = logging.getLogger(__name__)

REGISTRY = "exports.json"
FORMAT = "vfs-exports"
VERSION = 1
_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
#: Fields of an export spec and their types (None allowed where the default is None).
SPEC_FIELDS: dict[str, tuple[type, Any]] = {
    "image": (str, None),
    "name": (str, None),
    "nbd": (list, []),
    "tcp": (list, []),
    "fuse": (str, None),
    "readonly": (bool, False),
    "bitmap": (str, "dirty"),
    "store": (str, None),
    "repo": (dict, None),  # RepoConfig.to_json (a bare URL string is read too)
    "backing_dirs": (list, []),
    "description": (str, ""),
    "identity": (str, None),
    "trust": (list, []),
    "pins": (str, None),
    "passphrase_file": (str, None),
    "keep_encrypted": (bool, False),
}
RESTART_DELAYS = (0.5, 1, 2, 5, 10, 30)
QUICK_DEATH = 5.0
MAX_QUICK_DEATHS = 5
READY_TIMEOUT = 60.0
STOP_TIMEOUT = 30.0


def check_spec(spec: Any) -> dict[str, Any]:
    """A spec from a client, checked field by field (exact types, absolute paths)."""
    if not isinstance(spec, dict):
        raise UsageError("an export spec must be a JSON object")
    out: dict[str, Any] = {}
    for key in spec:
        if key not in SPEC_FIELDS:
            raise UsageError(f"export spec has no field {key[:40]!r}")
    for key, (typ, default) in SPEC_FIELDS.items():
        v = spec.get(key, default)
        if key == "repo" and v is not None:
            v = RepoConfig.from_json(v).to_json()  # checked field by field
        if v is not None and type(v) is not typ:
            raise UsageError(f"export field {key!r} must be a {typ.__name__}")
        out[key] = v
    name = out["name"]
    if not isinstance(name, str) or not _NAME_RE.fullmatch(name):
        raise UsageError(f"invalid export name {name!r}: 1-64 of A-Z a-z 0-9 . _ -")
    for key in ("image", "fuse", "identity", "pins", "passphrase_file"):
        if out[key] is not None and not os.path.isabs(out[key]):
            raise UsageError(f"export {key} must be an absolute path")
    if out["image"] is None or not os.path.isfile(out["image"]):
        raise NotFound(f"image {out['image']} does not exist")
    for key in ("nbd", "tcp", "backing_dirs", "trust"):
        if not all(isinstance(x, str) for x in out[key]):
            raise UsageError(f"export field {key!r} must be a list of strings")
    if not all(os.path.isabs(p) for p in out["nbd"]):
        raise UsageError("NBD socket paths must be absolute")
    if not (out["nbd"] or out["tcp"] or out["fuse"]):
        raise UsageError("an export needs --nbd, --tcp or --fuse")
    return out


def export_argv(spec: dict[str, Any], control: Path) -> list[str]:
    """The ``vfsd export`` command line of a spec."""
    argv = [sys.executable, "-c", "from vfs.cli.vfsd import main; main()", "-v", "export"]
    argv += ["run", spec["image"], "--name", spec["name"], "--control", str(control)]
    for p in spec["nbd"]:
        argv += ["--nbd", p]
    for t in spec["tcp"]:
        argv += ["--tcp", t]
    if spec["fuse"]:
        argv += ["--fuse", spec["fuse"]]
    if spec["readonly"]:
        argv.append("--readonly")
    if spec["bitmap"]:
        argv += ["--bitmap", spec["bitmap"]]
    else:
        argv.append("--no-bitmap")
    for key in ("store", "description", "identity", "pins", "passphrase_file"):
        if spec[key]:
            argv += [f"--{key.replace('_', '-')}", spec[key]]
    if spec["repo"]:
        argv += RepoConfig.from_json(spec["repo"]).to_argv()
    for t in spec["trust"]:
        argv += ["--trust", t]
    if spec["keep_encrypted"]:
        argv.append("--keep-encrypted")
    for d in spec["backing_dirs"]:
        argv += ["--backing-dir", d]
    return argv


class Supervised:
    """One export of the daemon and its process."""

    def __init__(self, spec: dict[str, Any], root: Path) -> None:
        self.spec = spec
        self.name = spec["name"]
        self.control = root / f"{self.name}.ctl"
        self.logfile = root / f"{self.name}.log"
        self.proc: trio.Process | None = None
        self.state = "starting"
        self.error = ""
        self.restarts = 0
        self.scope = trio.CancelScope()
        self.stopped = trio.Event()

    def to_json(self) -> dict[str, Any]:
        return {
            **self.spec,
            "control": str(self.control),
            "log": str(self.logfile),
            "state": self.state,
            "pid": self.proc.pid if self.proc is not None and self.state == "running" else None,
            "restarts": self.restarts,
            "error": self.error,
        }


class ExportSupervisor:
    """The registry and the processes of the daemon's exports."""

    def __init__(self, state: Path) -> None:
        self.state = state
        self.root = state / "exports"
        self.file = state / REGISTRY
        self.exports: dict[str, Supervised] = {}
        self._nursery: trio.Nursery | None = None

    # ------------------------------------------------------------------ registry
    def _load(self) -> list[dict[str, Any]]:
        try:
            doc = json.loads(self.file.read_text())
        except FileNotFoundError:
            return []
        except ValueError as e:
            raise FormatError(f"{self.file}: malformed export registry ({e})") from None
        if not isinstance(doc, dict) or doc.get("format") != FORMAT:
            raise FormatError(f"{self.file}: not an export registry")
        specs = doc.get("exports")
        if not isinstance(specs, list):
            raise FormatError(f"{self.file}: malformed export registry")
        return specs

    def _save(self) -> None:
        doc = {
            "format": FORMAT,
            "version": VERSION,
            "exports": [s.spec for _n, s in sorted(self.exports.items())],
        }
        write_atomic(self.file, json.dumps(doc, indent=1).encode() + b"\n", mode=0o600)

    # ------------------------------------------------------------------ lifetime
    async def run(self, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        """Start every registered export and watch them until cancelled (then stop them)."""
        self.root.mkdir(parents=True, exist_ok=True, mode=0o700)
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            for spec in self._load():
                try:
                    s = Supervised(check_spec(spec), self.root)
                except Exception as e:
                    log.error("export %r not started: %s", spec.get("name"), e)
                    continue
                self.exports[s.name] = s
                nursery.start_soon(self._watch, s)
            task_status.started()
            await trio.sleep_forever()

    async def _watch(self, s: Supervised) -> None:
        quick = 0
        with s.scope:
            await _stop_orphan(s)
            while True:
                started = time.monotonic()
                await self._run_once(s)
                if time.monotonic() - started < QUICK_DEATH:
                    quick += 1
                else:
                    quick = 0
                if quick >= MAX_QUICK_DEATHS:
                    s.state = "failed"
                    log.error("export %s keeps dying: not restarted (%s)", s.name, s.error)
                    break
                delay = RESTART_DELAYS[min(s.restarts, len(RESTART_DELAYS) - 1)]
                s.state = "restarting"
                s.restarts += 1
                log.warning("export %s exited (%s): restarting in %.1f s", s.name, s.error, delay)
                await trio.sleep(delay)
        s.stopped.set()

    async def _run_once(self, s: Supervised) -> None:
        argv = export_argv(s.spec, s.control)
        s.state = "starting"
        with open(s.logfile, "ab") as logf:
            proc = await trio.lowlevel.open_process(argv, stdout=logf, stderr=logf)
        s.proc = proc
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._mark_ready, s, proc)
                rc = await proc.wait()
                nursery.cancel_scope.cancel()
            s.error = f"exit status {rc}" if rc >= 0 else f"killed by signal {-rc}"
        finally:
            if proc.returncode is None:  # cancelled: stop it the way an operator would
                with trio.CancelScope(shield=True):
                    await _stop_process(proc)

    async def _mark_ready(self, s: Supervised, proc: trio.Process) -> None:
        """``running`` once the process answers on its control socket that it is ready (its
        NBD listeners and its FUSE file are up)."""
        ctl = ExportControl(s.control)
        while True:
            if s.control.exists():
                try:
                    r = await trio.to_thread.run_sync(ctl.ping)
                    if r.get("pid") == proc.pid and r.get("ready"):
                        s.state = "running"
                        return
                except Exception:
                    pass
            await trio.sleep(0.05)

    async def _wait_ready(self, s: Supervised) -> None:
        with trio.move_on_after(READY_TIMEOUT):
            while s.state != "running":
                if s.state in ("restarting", "failed"):
                    raise UsageError(f"export {s.name} did not start ({s.error}); see {s.logfile}")
                await trio.sleep(0.05)
            return
        raise UsageError(f"export {s.name} did not answer within {READY_TIMEOUT:.0f} s")

    # ------------------------------------------------------------------ control ops
    async def add(self, spec_text: str) -> dict[str, Any]:
        try:
            raw = json.loads(spec_text)
        except ValueError as e:
            raise UsageError(f"malformed export spec: {str(e)[:80]}") from None
        spec = check_spec(raw)
        if spec["name"] in self.exports:
            raise AlreadyExists(f"export {spec['name']!r} exists")
        for other in self.exports.values():
            if other.spec["image"] == spec["image"]:
                raise AlreadyExists(f"{spec['image']} is already exported as {other.name!r}")
        assert self._nursery is not None
        s = Supervised(spec, self.root)
        s.control.unlink(missing_ok=True)
        self.exports[s.name] = s
        try:
            self._save()  # durable first: a daemon restart brings it back
        except BaseException:
            del self.exports[s.name]
            raise
        self._nursery.start_soon(self._watch, s)
        try:
            await self._wait_ready(s)
        except BaseException:
            await self.remove(s.name)
            raise
        return s.to_json()

    async def remove(self, name: str) -> dict[str, Any]:
        s = self.exports.get(name)
        if s is None:
            raise NotFound(f"no export named {name!r}")
        del self.exports[name]
        self._save()
        s.scope.cancel()
        await s.stopped.wait()
        return {"name": name, "stopped": True}

    def list(self) -> list[dict[str, Any]]:
        return [s.to_json() for _n, s in sorted(self.exports.items())]


def _pid_gone(pid: int) -> bool:
    """True once ``pid`` has exited (a zombie that nobody reaped yet counts as gone)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rpartition(")")[2].split()[0] == "Z"
    except (FileNotFoundError, ProcessLookupError):
        return True


async def _stop_orphan(s: Supervised) -> None:
    """Stop an export process a previous daemon left running (it was killed -9: its children
    live on). Its control socket names it; it is asked to stop (it commits and closes the
    image) and killed after STOP_TIMEOUT, so the new process is never a second writer."""
    if not s.control.exists():
        return
    ctl = ExportControl(s.control)
    try:
        pid = (await trio.to_thread.run_sync(lambda: ctl.call({"op": "ping"}, timeout=5)))["pid"]
    except Exception:
        return  # a stale socket: nobody answers
    log.warning("export %s: stopping pid %d left by a previous daemon", s.name, pid)
    try:
        await trio.to_thread.run_sync(ctl.stop)
    except Exception as e:
        log.warning("export %s: pid %d did not take stop (%s)", s.name, pid, e)
    with trio.move_on_after(STOP_TIMEOUT):
        while not _pid_gone(pid):
            await trio.sleep(0.05)
        return
    log.error("export %s: pid %d did not stop in %.0f s: killing it", s.name, pid, STOP_TIMEOUT)
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)
    while not _pid_gone(pid):
        await trio.sleep(0.05)


async def _stop_process(proc: trio.Process) -> None:
    """SIGTERM (the export commits and closes its image), SIGKILL after STOP_TIMEOUT."""
    try:
        proc.send_signal(signal.SIGTERM)
    except ProcessLookupError:
        return
    with trio.move_on_after(STOP_TIMEOUT):
        await proc.wait()
        return
    log.error("export pid %d did not stop in %.0f s: killing it", proc.pid, STOP_TIMEOUT)
    proc.kill()
    await proc.wait()
