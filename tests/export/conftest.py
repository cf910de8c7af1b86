"""Export processes for tests: ``vfsd export`` started for real, waited on until its control
socket answers, and always stopped (SIGTERM, then SIGKILL) — also when start-up fails."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from vfs.export.client import ExportControl

VFSD = [sys.executable, "-c", "from vfs.cli.vfsd import main; main()"]


def need(*tools: str) -> None:
    for t in tools:
        if shutil.which(t) is None:
            pytest.fail(f"{t} is not installed (make setup installs it)")


def run(*cmd: str, check: bool = True, env: dict | None = None, timeout: float = 120):
    r = subprocess.run(list(cmd), capture_output=True, text=True, timeout=timeout, env=env)
    if check and r.returncode:
        raise AssertionError(f"{cmd} failed ({r.returncode}): {r.stderr}{r.stdout}")
    return r


def nbdsh_env() -> dict:
    """nbdsh runs `python3 -m nbd`: Debian's python3, where python3-libnbd lives."""
    return {**os.environ, "PATH": "/usr/bin:/bin:" + os.environ.get("PATH", "")}


@dataclass
class Export:
    proc: subprocess.Popen
    sock: Path
    ctl: Path
    image: Path
    log: Path
    name: str

    @property
    def uri(self) -> str:
        return f"nbd+unix:///{self.name}?socket={self.sock}"

    @property
    def opts(self) -> str:
        """qemu --image-opts for this export."""
        return f"driver=nbd,server.type=unix,server.path={self.sock},export={self.name}"

    @property
    def control(self) -> ExportControl:
        return ExportControl(self.ctl)

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        return self.proc.returncode


class Exports:
    """Starts exports in ``tmp``; :meth:`close` stops every one still running."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.started: list[Export] = []

    def start(self, image: Path, *args: str, name: str = "disk", sock: Path | None = None,
              env: dict | None = None) -> Export:  # fmt: skip
        sock = sock or self.tmp / f"{name}.sock"
        log = self.tmp / f"{name}-{len(self.started)}.log"
        cmd = [*VFSD, "-v", "export", str(image), "--nbd", str(sock), "--name", name, *args]
        with open(log, "w") as f:
            proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=env)
        e = Export(proc, sock, Path(str(sock) + ".ctl"), image, log, name)
        self.started.append(e)
        deadline = time.monotonic() + 30
        while True:
            if proc.poll() is not None:
                raise AssertionError(f"vfsd export exited {proc.returncode}: {log.read_text()}")
            try:
                e.control.ping()
                return e
            except Exception:
                if time.monotonic() > deadline:
                    raise AssertionError(f"export not ready: {log.read_text()}") from None
                time.sleep(0.05)

    def close(self) -> None:
        for e in self.started:
            e.stop()


@pytest.fixture
def exports(tmp_path: Path):
    ex = Exports(tmp_path)
    try:
        yield ex
    finally:
        ex.close()


def make_image(path: Path, size: str = "64M", *commands: str) -> Path:
    run(sys.executable, "-c", "from vfs.cli.vimg import main; main()", "create", "-f", "vimg",
        str(path), size)  # fmt: skip
    if commands:
        io = [sys.executable, "-c", "from vfs.cli.vimg import main; main()", "io"]
        for c in commands:
            io += ["-c", c]
        run(*io, str(path))
    return path


def lazy_copy_over_mtls(nginx, src: Path, tmp: Path) -> tuple[Path, str, list[str]]:
    """``src`` pushed into a repository nginx serves with mutual TLS, and its metadata-only
    copy on "another host" (``vimg pull --lazy``): (the copy, the repository URL, the TLS
    options of a client that may read it)."""
    vimg = [sys.executable, "-c", "from vfs.cli.vimg import main; main()"]
    name = f"mtls-{os.getpid()}-{tmp.name}"[:60]
    run(*vimg, "push", "-q", "--repo", str(nginx.webroot / name), "--store",
        str(tmp / "store-a"), "--ref", "golden", str(src))  # fmt: skip
    tls = ["--ca", nginx.ca, "--cert", nginx.client_cert, "--key", nginx.client_key]
    url = nginx.url(name, "mtls")
    copy = tmp / "lazy.vimg"
    run(*vimg, "pull", "--ref", "golden", "--repo", url, *tls, "--lazy", str(copy))
    return copy, url, tls
