"""Build the test guest (kernel + initramfs) from two Debian packages, cached by its inputs.

Inputs: the kernel package (``linux-image-<version>-cloud-amd64``, the one the meta-package
``linux-image-cloud-amd64`` points at, or ``$VFS_GUEST_KERNEL_PKG``), ``busybox-static``, and this
directory's own sources (the init script, the cpio writer, the module orderer, this file). The
cache key is a digest of all of them, so a new kernel in the archive or an edited init script gives
a new build and an unchanged tree reuses the old one.

Cache layout (``$VFS_GUEST_CACHE``, else ``$XDG_CACHE_HOME/vfs/guest``, else
``~/.cache/vfs/guest``)::

    debs/<package>_<version>_amd64.deb   downloaded with apt-get download (no install)
    <key>/vmlinuz                        the kernel, as shipped
    <key>/initrd.img                     gzip'd newc cpio: busybox, /init, the virtio modules
    <key>/manifest.json                  inputs, sizes, how long the build took

Crash story: a build is assembled in ``.build-<key>-<pid>`` beside its final place, every file is
fsynced, and the directory is renamed to ``<key>`` in one step, so ``<key>/`` exists only when it
is complete; a killed build leaves a ``.build-*`` directory that the next build removes once its
owner process is gone. Two concurrent builders both finish; the second rename loses and its copy
is discarded. Downloaded .debs are likewise renamed into ``debs/`` only once complete.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import logging
import os
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from tools.guest import cpio, kmod
from vfs.durable import fsync_dir, write_atomic

log = logging.getLogger("tools.guest")

KERNEL_META = "linux-image-cloud-amd64"
BUSYBOX = "busybox-static"
#: What the init needs, in the order given; their dependencies are added by kmod.load_order.
MODULES = ["virtio", "virtio_pci", "virtio_blk", "virtio_net"]
#: The kernel command line every boot gets; workloads add ``vfsguest.*`` words (see init.sh).
BASE_APPEND = "console=ttyS0 quiet panic=-1"
#: Bump when the layout of a build changes in a way the sources' digest would not show.
BUILD_FORMAT = 1

_HERE = Path(__file__).resolve().parent
_SOURCES = ("build.py", "cpio.py", "kmod.py", "init.sh")


class GuestBuildError(RuntimeError):
    """The guest could not be built (apt could not resolve or fetch a package, a bad .deb)."""


@dataclass(frozen=True)
class Guest:
    """A built guest: boot it with ``-kernel kernel -initrd initrd -append guest.append(...)``."""

    directory: Path
    kernel: Path
    initrd: Path
    kernel_release: str
    packages: dict[str, str]

    def append(
        self, run: str = "idle", *, count: int = 0, extra: str = "", **params: object
    ) -> str:
        """The kernel command line for a workload (``run="dirty,append"``; see init.sh)."""
        words = [BASE_APPEND, f"vfsguest.run={run}"]
        if count:
            words.append(f"vfsguest.count={count}")
        words += [f"vfsguest.{k}={v}" for k, v in params.items()]
        if extra:
            words.append(extra)
        return " ".join(words)


def cache_root() -> Path:
    env = os.environ.get("VFS_GUEST_CACHE")
    if env:
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "vfs" / "guest"


# -- apt: resolve and download, never install ---------------------------------------------------


def _apt(args: list[str]) -> str:
    r = subprocess.run(args, capture_output=True, text=True)
    if r.returncode != 0:
        raise GuestBuildError(f"{' '.join(args)}: {r.stderr.strip() or r.stdout.strip()}")
    return r.stdout


def _candidates(packages: list[str]) -> dict[str, str]:
    """The version apt would install now of each package (one ``apt-cache policy`` call)."""
    out = _apt(["apt-cache", "policy", *packages])
    found: dict[str, str] = {}
    current = None
    for line in out.splitlines():
        if not line.startswith(" ") and line.endswith(":"):
            current = line[:-1]
        elif current and line.strip().startswith("Candidate:"):
            version = line.split(":", 1)[1].strip()
            if version != "(none)":
                found[current] = version
    missing = [p for p in packages if p not in found]
    if missing:
        raise GuestBuildError(f"apt knows no installable version of {', '.join(missing)}")
    return found


def _kernel_package() -> str:
    env = os.environ.get("VFS_GUEST_KERNEL_PKG")
    if env:
        return env
    out = _apt(["apt-cache", "depends", KERNEL_META])
    for line in out.splitlines():
        dep = line.strip().removeprefix("Depends:").strip()
        if line.strip().startswith("Depends:") and dep.startswith("linux-image-"):
            return dep
    raise GuestBuildError(f"{KERNEL_META} does not depend on a linux-image package")


def _lists_signature() -> str:
    """What apt's answers depend on: its package lists and sources (names, sizes, mtimes)."""
    h = hashlib.sha256(os.environ.get("VFS_GUEST_KERNEL_PKG", "").encode())
    for d in (Path("/var/lib/apt/lists"), Path("/etc/apt/sources.list.d")):
        for p in sorted(d.glob("*")) if d.is_dir() else []:
            if p.is_file():
                st = p.stat()
                h.update(f"{p}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()


def _resolve() -> dict[str, str]:
    kernel = _kernel_package()
    found = _candidates([kernel, BUSYBOX])
    return {kernel: found[kernel], BUSYBOX: found[BUSYBOX]}


def resolve_packages(root: Path | None = None) -> dict[str, str]:
    """{package: version} of the kernel and busybox, refreshing apt's lists once if it must.

    apt-cache takes ~0.8 s a call here (its binary cache is disabled), so the answer is kept in
    ``<root>/resolved.json`` under a signature of apt's lists: the next run reuses it until an
    ``apt-get update`` changes them.
    """
    memo = root / "resolved.json" if root else None
    signature = _lists_signature()
    if memo is not None:
        try:
            saved = json.loads(memo.read_text())
            if saved.get("signature") == signature:
                return saved["packages"]
        except (OSError, ValueError, KeyError):
            pass
    try:
        packages = _resolve()
    except GuestBuildError as first:
        if os.geteuid() != 0:
            raise
        log.info("apt could not resolve the guest packages (%s); running apt-get update", first)
        subprocess.run(["apt-get", "update", "-qq"], capture_output=True)
        signature = _lists_signature()
        packages = _resolve()
    if memo is not None:
        memo.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(memo, json.dumps({"signature": signature, "packages": packages}).encode())
    return packages


def _deb_path(debs: Path, package: str, version: str) -> Path:
    return debs / f"{package}_{version.replace(':', '%3a')}_amd64.deb"


def download(debs: Path, package: str, version: str) -> Path:
    """The .deb of package=version in ``debs``, fetched with ``apt-get download`` if missing."""
    dest = _deb_path(debs, package, version)
    if dest.exists():
        return dest
    debs.mkdir(parents=True, exist_ok=True)
    args = ["apt-get", "download", "-q"]
    if os.geteuid() == 0:
        # The _apt sandbox user cannot write into a root-owned cache directory.
        args += ["-o", "APT::Sandbox::User=root"]
    with tempfile.TemporaryDirectory(dir=debs, prefix=".dl-") as tmp:
        r = subprocess.run([*args, f"{package}={version}"], cwd=tmp, capture_output=True, text=True)
        if r.returncode != 0:
            raise GuestBuildError(f"apt-get download {package}={version}: {r.stderr.strip()}")
        got = list(Path(tmp).glob("*.deb"))
        if len(got) != 1:
            raise GuestBuildError(f"apt-get download {package}={version} gave {len(got)} files")
        write_atomic(dest, got[0].read_bytes())
    return dest


# -- the build --------------------------------------------------------------------------------


def build_key(packages: dict[str, str]) -> str:
    h = hashlib.sha256()
    h.update(json.dumps({"format": BUILD_FORMAT, "packages": packages, "modules": MODULES,
                         "append": BASE_APPEND}, sort_keys=True).encode())  # fmt: skip
    for name in _SOURCES:
        h.update(name.encode() + b"\0" + (_HERE / name).read_bytes())
    return h.hexdigest()[:16]


def build_guest(cache: Path | None = None) -> Guest:
    """The guest for the current inputs: from the cache, or built now (a few seconds)."""
    root = cache or cache_root()
    try:
        packages = resolve_packages(root)
    except GuestBuildError:
        fallback = _newest_build(root)
        if fallback is None:
            raise
        log.warning("apt cannot resolve the guest packages; using the cached %s", fallback.name)
        return _load(fallback)
    key = build_key(packages)
    final = root / key
    if (final / "manifest.json").exists():
        return _load(final)
    root.mkdir(parents=True, exist_ok=True)
    _remove_stale_builds(root)
    t0 = time.monotonic()
    debs = {p: download(root / "debs", p, v) for p, v in packages.items()}
    t_download = time.monotonic() - t0
    work = root / f".build-{key}-{os.getpid()}"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir()
    try:
        manifest = _assemble(work, packages, debs)
        manifest["download_seconds"] = round(t_download, 3)
        manifest["build_seconds"] = round(time.monotonic() - t0 - t_download, 3)
        write_atomic(work / "manifest.json", json.dumps(manifest, indent=2).encode())
        fsync_dir(work)
        try:
            os.rename(work, final)
        except OSError:
            if not (final / "manifest.json").exists():
                raise
            log.info("another builder finished %s first; discarding ours", key)
        fsync_dir(root)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    _prune(root, keep=final)
    return _load(final)


def _assemble(work: Path, packages: dict[str, str], debs: dict[str, Path]) -> dict:
    unpacked = work / "unpacked"
    for deb in debs.values():
        r = subprocess.run(["dpkg-deb", "-x", str(deb), str(unpacked)], capture_output=True)
        if r.returncode != 0:
            raise GuestBuildError(f"dpkg-deb -x {deb.name}: {r.stderr.decode().strip()}")
    kernels = sorted((unpacked / "boot").glob("vmlinuz-*"))
    if len(kernels) != 1:
        raise GuestBuildError(f"expected one vmlinuz in the kernel package, found {len(kernels)}")
    release = kernels[0].name.removeprefix("vmlinuz-")
    moddir = next(
        (d for d in (unpacked / "lib/modules" / release, unpacked / "usr/lib/modules" / release)
         if d.is_dir()),
        None,
    )  # fmt: skip
    if moddir is None:
        raise GuestBuildError(f"no modules directory for {release} in the kernel package")
    busybox = next(
        (p for p in (unpacked / "bin/busybox", unpacked / "usr/bin/busybox") if p.is_file()), None
    )
    if busybox is None:
        raise GuestBuildError("no busybox binary in busybox-static")
    try:
        modules = kmod.load_order(MODULES, kmod.find_modules(moddir))
    except ValueError as e:
        raise GuestBuildError(f"{release}: {e}") from None

    buf = io.BytesIO()
    with cpio.NewcWriter(buf) as w:
        for d in ("bin", "dev", "lib", "lib/modules", "mnt", "proc", "run", "sys", "tmp"):
            w.directory(d)
        # The kernel opens /dev/console for init before anything is mounted: it must exist.
        w.char_device("dev/console", 5, 1)
        w.char_device("dev/null", 1, 3, mode=0o666)
        w.file("bin/busybox", busybox.read_bytes(), mode=0o755)
        w.symlink("bin/sh", "busybox")
        w.file("init", (_HERE / "init.sh").read_bytes(), mode=0o755)
        for name, elf in modules:
            w.file(f"lib/modules/{name}.ko", elf)
        w.file("lib/modules/load-order", "".join(f"{n}\n" for n, _ in modules).encode())
    cpio_bytes = buf.getvalue()
    initrd = gzip.compress(cpio_bytes, compresslevel=6, mtime=0)
    write_atomic(work / "initrd.img", initrd)
    write_atomic(work / "vmlinuz", kernels[0].read_bytes())
    shutil.rmtree(unpacked)
    return {
        "kernel_release": release,
        "packages": packages,
        "modules": [n for n, _ in modules],
        "initrd_bytes": len(initrd),
        "initrd_cpio_bytes": len(cpio_bytes),
        "kernel_bytes": (work / "vmlinuz").stat().st_size,
        "deb_bytes": sum(d.stat().st_size for d in debs.values()),
    }


def _load(directory: Path) -> Guest:
    m = json.loads((directory / "manifest.json").read_text())
    return Guest(
        directory=directory,
        kernel=directory / "vmlinuz",
        initrd=directory / "initrd.img",
        kernel_release=m["kernel_release"],
        packages=m["packages"],
    )


def manifest(guest: Guest) -> dict:
    return json.loads((guest.directory / "manifest.json").read_text())


def _newest_build(root: Path) -> Path | None:
    builds = [p.parent for p in root.glob("*/manifest.json") if not p.parent.name.startswith(".")]
    return max(builds, key=lambda p: p.stat().st_mtime, default=None)


def _prune(root: Path, keep: Path, builds: int = 3) -> None:
    """Keep the newest few builds (another checkout may still boot an older one) and the .debs
    they were made from; drop the rest."""
    done = sorted(
        (p.parent for p in root.glob("*/manifest.json") if p.parent.name != "debs"),
        key=lambda p: p.stat().st_mtime,
        reverse=True,
    )
    kept = [keep] + [p for p in done if p != keep][: builds - 1]
    for p in done:
        if p not in kept:
            shutil.rmtree(p, ignore_errors=True)
    wanted = set()
    for p in kept:
        for pkg, ver in json.loads((p / "manifest.json").read_text())["packages"].items():
            wanted.add(_deb_path(root / "debs", pkg, ver).name)
    for deb in (root / "debs").glob("*.deb"):
        # An hour's grace: another builder may have just fetched it for a build not done yet.
        if deb.name not in wanted and time.time() - deb.stat().st_mtime > 3600:
            deb.unlink(missing_ok=True)


def _remove_stale_builds(root: Path) -> None:
    for p in root.glob(".build-*"):
        try:
            pid = int(p.name.rsplit("-", 1)[1])
        except ValueError:
            continue
        if pid == os.getpid() or not Path(f"/proc/{pid}").exists():
            shutil.rmtree(p, ignore_errors=True)
