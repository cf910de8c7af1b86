"""A real `vfsd serve` on a real FUSE mount, always unmounted and stopped at the end."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from tests.daemon.vee_helpers import make_sample_tree
from vfs.daemon import mounts

VFSD = [str(Path(sys.executable).with_name("vfsd"))]


def fuse_available() -> str | None:
    if not os.path.exists("/dev/fuse"):
        return "no /dev/fuse"
    if os.geteuid() != 0:
        return "needs root (device nodes, chown, trusted.* xattrs)"
    if shutil.which("fusermount3") is None:
        return "no fusermount3"
    return None


def vfsd(*args: str, check: bool = True, timeout: float = 120) -> subprocess.CompletedProcess:
    p = subprocess.run([*VFSD, *args], capture_output=True, text=True, timeout=timeout, check=False)
    if check and p.returncode != 0:
        raise AssertionError(f"vfsd {' '.join(args)} failed ({p.returncode}): {p.stderr}")
    return p


def wait_for(cond, timeout: float = 20.0, what: str = "condition", proc=None):  # type: ignore[no-untyped-def]
    """Poll ``cond`` until true; fail at once if the daemon died."""
    deadline = time.monotonic() + timeout
    delay = 0.005
    while True:
        v = cond()
        if v:
            return v
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"vfsd died (rc={proc.returncode}) waiting for {what}")
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(delay)
        delay = min(delay * 2, 0.1)


def is_mounted(path: Path) -> bool:
    target = os.fspath(path)
    with open("/proc/self/mountinfo") as f:
        return any(line.split()[4] == target for line in f)


def unmount(path: Path) -> None:
    if is_mounted(path):
        subprocess.run(["fusermount3", "-u", "-q", os.fspath(path)], check=False)
    if is_mounted(path):
        subprocess.run(["umount", "-l", os.fspath(path)], check=False)


@dataclass
class Daemon:
    root: Path
    state: Path
    mnt: Path
    store: Path
    repo: Path
    proc: subprocess.Popen | None = None
    log: Path = field(default=Path("/dev/null"))
    templates: dict[str, str] = field(default_factory=dict)
    remote_url: str | None = None  # default: the file:// repo
    extra_args: list[str] = field(default_factory=list)  # e.g. --ca/--cert/--key
    use_remote: bool = True  # False: serve from the local store alone (no --repo)
    engine: str = "fuse"  # "fuse" or "kernel" (vfsd serve --engine)
    wrapper: list[str] = field(default_factory=list)  # runs the daemon, e.g. prlimit ...

    @classmethod
    def in_dir(cls, root: Path, **kw: Any) -> Daemon:
        """A daemon whose state, mount, store and repository are the usual names below root."""
        return cls(root, root / "state", root / "mnt", root / "store", root / "repo", **kw)

    def start(self) -> None:
        self.start_process()
        wait_for(self._ready, what="control socket", proc=self.proc)

    def start_process(self) -> None:
        """Start ``vfsd serve`` without waiting for it (start() waits for its socket)."""
        self.log = self.root / f"vfsd-{time.monotonic_ns()}.log"
        with open(self.log, "wb") as logf:
            self.proc = subprocess.Popen(
                [
                    *self.wrapper,
                    *VFSD,
                    "-v",
                    "serve",
                    "--state",
                    str(self.state),
                    "--mount",
                    str(self.mnt),
                    *(["--repo", self.remote_url or str(self.repo)] if self.use_remote else []),
                    "--store",
                    str(self.store),
                    "--engine",
                    self.engine,
                    *self.extra_args,
                ],
                stdout=logf,
                stderr=subprocess.STDOUT,
            )

    def _ready(self) -> bool:
        from vfs.daemon import control

        try:
            control.call(self.state, {"op": "ping"}, timeout=5)
            return self.engine == "kernel" or is_mounted(self.mnt)
        except control.DaemonNotRunning:
            return False

    def stop(self) -> None:
        """SIGTERM, wait, then make sure: unmount, kill."""
        p = self.proc
        if p is None:
            self.unmount_all()
            return
        try:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
                try:
                    p.wait(timeout=15)
                except subprocess.TimeoutExpired:
                    pass
        finally:
            if p.poll() is None:
                p.kill()
                p.wait(timeout=10)
            self.proc = None
            self.unmount_all()

    def unmount_all(self) -> None:
        """Whatever a daemon of either engine left mounted: VEE overlays, image and data layer
        mounts (the kernel engine's outlive a killed daemon), the FUSE mount."""
        mounts.detach_all_under(self.mnt, self.state)

    def kill9(self) -> None:
        """kill -9, and leave the dead mount behind as a real crash does: the next start
        must detach it itself (stop() unmounts whatever is left at the end)."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=10)
        self.proc = None

    def publish(self, src: Path, name: str, *, to_store: bool = True) -> str:
        store = ["--store", str(self.store)] if to_store else []
        r = vfsd(
            "template", "publish", str(src), "--repo", str(self.repo),
            *store, "--name", name, "--json",
        )  # fmt: skip
        digest = json.loads(r.stdout)["digest"]
        self.templates[name] = digest
        return digest

    def vee(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        return vfsd("vee", *args, "--state", str(self.state), check=check)

    def log_text(self) -> str:
        try:
            return self.log.read_text(errors="replace")
        except OSError:
            return ""


def kernel_engine_available() -> str | None:
    """Why the kernel engine cannot run here (None: it can): the daemon's own probe."""
    global _KERNEL_PROBE
    if _KERNEL_PROBE is None:
        import tempfile

        from vfs.daemon.kernel_engine import probe

        with tempfile.TemporaryDirectory() as d:
            ok, why = probe(Path(d) / "probe")
        _KERNEL_PROBE = "" if ok else why
    return _KERNEL_PROBE or None


_KERNEL_PROBE: str | None = None
#: The engines a test runs on when it asks for both (``pytest.mark.parametrize`` over the
#: ``engine`` fixture, or a module's own ``engine`` fixture with these params).
ENGINES = ["fuse", pytest.param("kernel", marks=pytest.mark.kernel)]


@pytest.fixture
def engine() -> str:
    """The engine of the ``daemon`` fixture: the FUSE engine unless a module asks for both
    (a module-level ``engine`` fixture with ``params=ENGINES``)."""
    return "fuse"


@contextlib.contextmanager
def running_daemon(
    root: Path,
    *,
    vees: tuple[str, ...] = ("a", "b"),
    by_digest: bool = False,
    src: Callable[[Path], object] = make_sample_tree,
    clean_log: bool = False,
    **kw: Any,
) -> Iterator[Daemon]:
    """A started daemon below ``root`` (``Daemon.in_dir``, ``kw`` its fields) with the tree
    ``src`` makes published as 'base' and ``vees`` added on it (``by_digest``: named by its
    digest, for a daemon without a repository); stopped, unmounted and killed whatever happens.
    ``clean_log``: fail if the daemon logged a traceback or an ERROR."""
    engine = kw.get("engine", "fuse")
    reason = fuse_available() or (kernel_engine_available() if engine == "kernel" else None)
    if reason:
        pytest.skip(reason)
    d = Daemon.in_dir(root, **kw)
    d.mnt.mkdir()
    vfsd("repo", "init", str(d.repo))
    src(root / "src")
    digest = d.publish(root / "src", "base")
    d.start()
    try:
        for name in vees:
            d.vee("add", name, "--template", digest if by_digest else "base")
        yield d
    finally:
        d.stop()
    if clean_log:
        leftovers = [ln for ln in d.log_text().splitlines() if "Traceback" in ln or "ERROR" in ln]
        assert not leftovers, d.log_text()


@pytest.fixture
def daemon(tmp_path: Path, engine: str):
    """A running daemon with the sample template published as 'base' and VEEs a and b."""
    with running_daemon(tmp_path, engine=engine, clean_log=True) as d:
        yield d


# -- the POSIX suite's roots (tests/daemon/test_posix*.py; see posix_support.py) -----------


@pytest.fixture(scope="session")
def posix_tree(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from tests.daemon.posix_support import make_posix_tree

    if os.geteuid() != 0:
        pytest.skip("the POSIX suite needs root (owners, device nodes, mounts)")
    tree = tmp_path_factory.mktemp("posix") / "tree"
    make_posix_tree(tree)
    return tree


@pytest.fixture(scope="session")
def posix_daemon(tmp_path_factory: pytest.TempPathFactory):
    """One `vfsd serve` for the whole suite; each case gets VEEs of a template of its own."""
    reason = fuse_available()
    if reason:
        pytest.skip(reason)
    root = tmp_path_factory.mktemp("posix-vfsd")
    d = Daemon(root, root / "state", root / "mnt", root / "store", root / "repo")
    d.mnt.mkdir()
    vfsd("repo", "init", str(d.repo))
    d.start()
    try:
        yield d
    finally:
        d.stop()


def _publish_salted(d: Daemon, tree: Path, salt: bytes) -> str:
    """Publish ``tree`` with a fresh salt in this process: a salt file (a new digest) and a
    salt xattr on every entry, so no file is identical to one of an earlier case's template
    (the view shares one inode between template versions for identical files: a case would
    otherwise find files an earlier case unshared)."""
    from tests.daemon.posix_support import T_ATIME_NS, T_MTIME_NS
    from vfs.redirect import LocalStore
    from vfs.redirect.file_remote import FileRemote
    from vfs.tree.template import publish_template

    tag = hashlib.blake2b(salt, digest_size=8).digest()  # small: it must fit in the inode
    for dirpath, dirnames, filenames in os.walk(tree):
        for name in dirnames + filenames:
            os.setxattr(Path(dirpath) / name, "trusted.s", tag, follow_symlinks=False)
    (tree / "salt").write_bytes(salt)
    os.utime(tree / "salt", ns=(T_ATIME_NS, T_MTIME_NS))
    os.utime(tree, ns=(T_ATIME_NS, T_MTIME_NS))
    store = LocalStore(d.store)
    try:
        return publish_template(tree, FileRemote(d.repo), store=store).digest
    finally:
        store.close()


_posix_case = iter(range(1 << 62))
_BAD_LOG_WORDS = ("Traceback", " ERROR:", " WARNING:", " CRITICAL:")


@pytest.fixture(params=["plain", "overlay", pytest.param("vee", marks=pytest.mark.fuse)])
def posix_root(request: pytest.FixtureRequest, posix_tree: Path, tmp_path: Path):
    """The directory a POSIX case runs in (its working directory): see posix_support.py."""
    from tests.daemon.posix_support import PosixRoot, mount_overlay, umount

    kind = request.param
    old_cwd = os.getcwd()
    old_umask = os.umask(0o022)
    mounted: Path | None = None
    if kind == "plain":
        subprocess.run(["cp", "-a", str(posix_tree), str(tmp_path / "plain")], check=True)
        root = PosixRoot(kind, tmp_path / "plain")
    elif kind == "overlay":
        subprocess.run(["cp", "-a", str(posix_tree), str(tmp_path / "lower")], check=True)
        for sub in ("upper", "work", "mnt"):
            (tmp_path / sub).mkdir()
        mount_overlay(tmp_path / "lower", tmp_path / "upper", tmp_path / "work", tmp_path / "mnt")
        mounted = tmp_path / "mnt"
        root = PosixRoot(kind, mounted)
    else:
        d: Daemon = request.getfixturevalue("posix_daemon")
        if d.proc is None or d.proc.poll() is not None:
            d.stop()
            d.start()  # an earlier case killed it: that case failed; this one starts afresh
        n = next(_posix_case)
        salted = tmp_path / "salted"
        subprocess.run(["cp", "-a", str(posix_tree), str(salted)], check=True)
        digest = _publish_salted(d, salted, f"case {n} {request.node.name}\n".encode())
        from vfs.daemon import control

        for name in (f"p{n}", f"p{n}s"):
            control.call(d.state, {"op": "add", "name": name, "template": digest})
        root = PosixRoot(kind, d.mnt / f"p{n}", sibling=d.mnt / f"p{n}s", log=d.log)
        root.log_start = d.log.stat().st_size
    os.chdir(root.path)
    try:
        yield root
    finally:
        os.chdir(old_cwd)
        os.umask(old_umask)
        for fn in reversed(root.cleanup):
            fn()
        if mounted is not None:
            umount(mounted)
        if root.log is not None:
            with open(root.log, "rb") as f:
                f.seek(root.log_start)
                text = f.read().decode(errors="replace")
            bad = [ln for ln in text.splitlines() if any(w in ln for w in _BAD_LOG_WORDS)]
            assert not bad, f"vfsd logged problems during this case:\n{text[-4000:]}"
