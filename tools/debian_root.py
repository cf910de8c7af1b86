"""A real Debian 12 root file system and a local apt repository, built once and cached.

The VEE tests and benchmarks need what an operator runs first in a container: a distribution's
own root and its package manager. ``ensure()`` builds, once per machine:

- ``root/``: ``debootstrap --variant=minbase --include=python3 bookworm`` from the Debian mirror
  apt already uses on this host (``/etc/apt/sources.list``, ``sources.list.d/*.list|*.sources``),
  then made container-like: no apt lists or cached ``.deb`` files, and a ``policy-rc.d`` that
  keeps maintainer scripts from starting daemons (as Debian's container images do);
- ``repo/``: a flat apt repository (``deb [trusted=yes] URL ./``) of the packages in
  ``REPO_PACKAGES`` and every dependency the root lacks (``apt-get download``, indexed with
  ``apt-ftparchive``). They were chosen for their maintainer scripts: system users and groups
  (uuid-runtime, cron-daemon-common), ``dpkg-statoverride`` (cron), setuid files (sudo), file
  capabilities (iputils-ping's ``setcap``), ``update-alternatives`` (nano, vim-tiny, less,
  netcat-openbsd, csh, procps), ``add-shell`` (csh), conffile moves (bash-completion), debconf,
  and triggers (libc-bin's ``ldconfig``, man-db, ca-certificates). The same 25 ``.deb`` files
  are the ``dpkg -i`` workload of ``tools/bench/tree.py`` (``dpkg_batches``).

Cache: ``$VFS_DEBIAN_CACHE`` (default ``/var/cache/vfs/debian``) holds one directory per build
key (suite, package lists, layout version). A build runs in ``<key>.build`` under an exclusive
``flock`` and becomes ``<key>`` by one ``rename(2)`` after everything (``build.json`` last) is
written, so a killed build is never half-used: the next call removes the leftover and starts
again. A fresh build takes about a minute here. Needs root (debootstrap) and the mirror; an
unreachable mirror is a clear one-line error.

Usage: ``python -m tools.debian_root [--cache DIR] [--rebuild] [--json]``
"""

from __future__ import annotations

import argparse
import fcntl
import hashlib
import json
import os
import re
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

SUITE = "bookworm"
DEFAULT_MIRROR = "http://deb.debian.org/debian"
CACHE_ENV = "VFS_DEBIAN_CACHE"
MIRROR_ENV = "VFS_DEBIAN_MIRROR"
DEFAULT_CACHE = Path("/var/cache/vfs/debian")
LAYOUT = 1  # bump when the build steps change: a new key, a new build
# In the root: python3 for the start-up benchmark (json, email, http.client, sqlite3).
ROOT_PACKAGES = ("python3",)
# In the repository, with their dependencies (see the module docstring for why each).
REPO_PACKAGES = (
    "cron", "sudo", "uuid-runtime", "iputils-ping", "less", "nano", "vim-tiny", "procps",
    "ca-certificates", "man-db", "csh", "netcat-openbsd", "bash-completion",
)  # fmt: skip
# Environment for programs run inside the root (nothing of the caller's leaks in).
CHROOT_ENV = {
    "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
    "HOME": "/root",
    "LANG": "C.UTF-8",
    "DEBIAN_FRONTEND": "noninteractive",
    "DEBCONF_NONINTERACTIVE_SEEN": "true",
    "TERM": "dumb",
}
POLICY_RC_D = (
    "#!/bin/sh\n# no daemons started by maintainer scripts in a build or test root\nexit 101\n"
)


class DebianRootError(RuntimeError):
    """The root could not be built (mirror unreachable, debootstrap or apt failed, not root)."""


@dataclass(frozen=True)
class DebianRoot:
    """A complete cached build: never modify ``root`` or ``repo`` (copy or publish them)."""

    path: Path
    info: dict

    @property
    def root(self) -> Path:
        return self.path / "root"

    @property
    def repo(self) -> Path:
        return self.path / "repo"

    @property
    def repo_packages(self) -> dict[str, str]:
        """Package name -> version of every package in the repository."""
        return dict(self.info["repo"])

    def debs(self) -> list[Path]:
        return sorted(self.repo.glob("*.deb"))

    def dpkg_batches(self) -> list[list[Path]]:
        """The repository's ``.deb`` files grouped for successive ``dpkg -i`` calls: a package
        that pre-depends on another of them (cron on cron-daemon-common) may be unpacked only
        once that one is configured, so it goes in a later call; within a call, any order."""
        stanzas = _deb822_stanzas((self.repo / "Packages").read_text())
        files = {s["package"]: self.repo / s["filename"] for s in stanzas}
        pre: dict[str, set[str]] = {}
        for s in stanzas:
            alts = (
                a.split("|")[0].split()[0].split(":")[0]
                for a in s.get("pre-depends", "").split(",")
                if a.strip()
            )
            pre[s["package"]] = {a for a in alts if a in files}
        depth: dict[str, int] = {}

        def level(p: str, seen: tuple[str, ...] = ()) -> int:
            if p not in depth:
                if p in seen:
                    raise DebianRootError(f"pre-dependency loop through {p}")
                depth[p] = 1 + max((level(q, seen + (p,)) for q in pre[p]), default=-1)
            return depth[p]

        batches: dict[int, list[Path]] = {}
        for p in sorted(files):
            batches.setdefault(level(p), []).append(files[p])
        return [b for _, b in sorted(batches.items())]

    @staticmethod
    def sources_line(url: str) -> str:
        """The one-line apt source for the repository served at ``url`` (http:// or file:)."""
        return f"deb [trusted=yes] {url} ./\n"


# -- running programs inside -------------------------------------------------------------------

_CHROOT_SH = (
    'set -e; r=$1; shift; mount -t proc proc "$r/proc"; mount --rbind /dev "$r/dev"; '
    'exec chroot "$r" "$@"'
)


def chroot_argv(root: Path, argv: Sequence[str]) -> list[str]:
    """The command line that runs ``argv`` chrooted in ``root`` with /proc and /dev (with
    /dev/pts and /dev/shm) mounted, in new mount and PID namespaces: when the command ends, the
    kernel kills whatever it left running and drops the mounts, whatever happened to it or to
    the caller (``--kill-child``), so nothing is left mounted on, or pinning, a VEE root."""
    return [
        "unshare", "--mount", "--propagation", "private", "--pid", "--fork", "--kill-child",
        "--", "sh", "-c", _CHROOT_SH, "sh", str(root), *argv,
    ]  # fmt: skip


def chroot_run(
    root: Path,
    argv: Sequence[str],
    *,
    timeout: float = 600,
    input: str | None = None,
    env: dict[str, str] | None = None,
) -> subprocess.CompletedProcess:
    """Run ``argv`` inside ``root`` (see chroot_argv) with CHROOT_ENV (plus ``env``); never
    raises on a non-zero exit: callers compare return codes and output."""
    return subprocess.run(
        chroot_argv(root, argv), env=CHROOT_ENV | (env or {}), capture_output=True, text=True,
        timeout=timeout, input=input, check=False,
    )  # fmt: skip


# -- the mirror ---------------------------------------------------------------------------------


def _deb822_stanzas(text: str) -> list[dict[str, str]]:
    stanzas, cur, key = [], {}, None
    for line in text.splitlines():
        if line.startswith("#"):
            continue
        if not line.strip():
            if cur:
                stanzas.append(cur)
            cur, key = {}, None
        elif line[0] in " \t" and key:
            cur[key] += " " + line.strip()
        elif ":" in line:
            key, _, value = line.partition(":")
            key = key.strip().lower()
            cur[key] = value.strip()
    if cur:
        stanzas.append(cur)
    return stanzas


def host_mirrors(etc: Path = Path("/etc/apt")) -> list[str]:
    """URIs of the host's enabled ``deb`` sources that carry ``SUITE`` with ``main``."""
    found: list[str] = []
    files = [etc / "sources.list"] + sorted((etc / "sources.list.d").glob("*"))
    for f in files:
        try:
            text = f.read_text()
        except OSError:
            continue
        if f.suffix == ".sources":
            for s in _deb822_stanzas(text):
                if s.get("enabled", "yes").lower() == "no" or "deb" not in s.get("types", ""):
                    continue
                if SUITE in s.get("suites", "").split() and "main" in s.get("components", ""):
                    found += s.get("uris", "").split()
        elif f.name == "sources.list" or f.suffix == ".list":
            for line in text.splitlines():
                line = re.sub(r"\[[^]]*\]", " ", line.split("#", 1)[0]).split()
                if len(line) >= 4 and line[0] == "deb" and line[2] == SUITE and "main" in line[3:]:
                    found.append(line[1])
    return [u.rstrip("/") for u in found if u.startswith(("http://", "https://"))]


def pick_mirror() -> str:
    return os.environ.get(MIRROR_ENV) or next(iter(host_mirrors()), DEFAULT_MIRROR)


def check_mirror(mirror: str, timeout: float = 20) -> None:
    url = f"{mirror}/dists/{SUITE}/Release"
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            head = r.read(4096)
    except (urllib.error.URLError, OSError) as e:
        raise DebianRootError(
            f"Debian mirror {mirror} is unreachable ({getattr(e, 'reason', e)}): it is needed "
            f"once to build the cached root (set ${MIRROR_ENV} to another mirror)"
        ) from None
    if b"Suite:" not in head and b"Codename:" not in head:
        raise DebianRootError(f"{url} is not a Debian Release file")


# -- the build -----------------------------------------------------------------------------------


def cache_dir() -> Path:
    return Path(os.environ.get(CACHE_ENV) or DEFAULT_CACHE)


def build_key() -> str:
    h = hashlib.sha256(json.dumps([LAYOUT, SUITE, ROOT_PACKAGES, REPO_PACKAGES]).encode())
    return f"{SUITE}-minbase-{h.hexdigest()[:12]}"


def _run(cmd: Sequence[str], what: str, log: Path | None = None, **kw: object) -> str:
    p = subprocess.run(list(cmd), capture_output=True, text=True, check=False, **kw)  # type: ignore[call-overload]
    if log is not None:
        log.write_text(p.stdout + p.stderr)
    if p.returncode != 0:
        tail = "\n".join((p.stdout + p.stderr).strip().splitlines()[-15:])
        raise DebianRootError(f"{what} failed ({p.returncode}):\n{tail}")
    return p.stdout


def _apt(root: Path, tmp: Path) -> list[str]:
    """The host's apt-get, reading the new root's own lists and dpkg status (no second index
    download; the versions are the ones debootstrap installed against)."""
    (tmp / "archives" / "partial").mkdir(parents=True, exist_ok=True)
    return [
        "apt-get", "-q", "-o", f"Dir={root}", "-o", f"Dir::Cache={tmp}",
        "-o", "Dir::Etc::SourceParts=/nonexistent", "-o", "Debug::NoLocking=1",
        "-o", "APT::Sandbox::User=root", "-o", "APT::Install-Recommends=false",
    ]  # fmt: skip


def _closure(apt: list[str]) -> dict[str, str]:
    """Name -> version of REPO_PACKAGES and every dependency the root lacks."""
    out = _run([*apt, "-s", "install", *REPO_PACKAGES], "apt-get -s install (dependency closure)")
    pkgs = {}
    for m in re.finditer(r"^Inst (\S+) (?:\[[^]]*\] )?\((\S+)", out, re.M):
        pkgs[m.group(1)] = m.group(2)
    missing = [p for p in REPO_PACKAGES if p not in pkgs]
    if missing:
        raise DebianRootError(f"apt would not install {missing} into the root:\n{out}")
    return pkgs


def _index(repo: Path) -> None:
    packages = _run(["apt-ftparchive", "packages", "."], "apt-ftparchive packages", cwd=repo)
    (repo / "Packages").write_text(packages)
    _run(["gzip", "-9nkf", "Packages"], "gzip Packages", cwd=repo)
    release = _run(["apt-ftparchive", "release", "."], "apt-ftparchive release", cwd=repo)
    (repo / "Release").write_text(release)


def _make_container_like(root: Path) -> None:
    """What Debian's container images do: no package lists or cached debs (the tests bring their
    own repository), and no daemon started by a maintainer script."""
    for d in ("var/lib/apt/lists", "var/cache/apt/archives"):
        for p in (root / d).iterdir():
            if p.is_file() and p.name != "lock":
                p.unlink()
    prc = root / "usr/sbin/policy-rc.d"
    prc.write_text(POLICY_RC_D)
    prc.chmod(0o755)


def _build(tmp: Path, mirror: str, progress: Callable[[str], None]) -> dict:
    t0 = time.monotonic()
    tmp.mkdir(parents=True)
    root, repo = tmp / "root", tmp / "repo"
    progress(f"debootstrap --variant=minbase {SUITE} from {mirror} (about a minute)")
    # In a private mount namespace: the /proc (and /sys) debootstrap mounts in the target go
    # away with it, also when it is killed, and never pin or leak below the build directory.
    _run(
        ["unshare", "--mount", "--propagation", "private", "--",
         "debootstrap", "--variant=minbase", f"--include={','.join(ROOT_PACKAGES)}",
         SUITE, str(root), mirror],
        "debootstrap", log=tmp / "debootstrap.log",
    )  # fmt: skip
    t_boot = time.monotonic() - t0
    apt = _apt(root, tmp / "apt-cache")
    pkgs = _closure(apt)
    progress(f"apt-get download of {len(pkgs)} packages into the local repository")
    repo.mkdir()
    wanted = [f"{n}={v}" for n, v in sorted(pkgs.items())]
    _run([*apt, "download", *wanted], "apt-get download", cwd=repo)
    if len(list(repo.glob("*.deb"))) != len(pkgs):
        raise DebianRootError(f"apt-get download left {sorted(os.listdir(repo))}, not {pkgs}")
    _index(repo)
    _make_container_like(root)
    _remove(tmp / "apt-cache")
    return {
        "suite": SUITE,
        "mirror": mirror,
        "root_packages": list(ROOT_PACKAGES),
        "repo": dict(sorted(pkgs.items())),
        "debootstrap_seconds": round(t_boot, 1),
        "build_seconds": round(time.monotonic() - t0, 1),
    }


def _remove(path: Path) -> None:
    """``rm -rf`` that never crosses into another file system (defence in depth: a mount left
    below a build directory must stop the removal, not be emptied)."""
    if path.exists() or path.is_symlink():
        _run(["rm", "-rf", "--one-file-system", "--", str(path)], f"removing {path}")


def _load(path: Path) -> DebianRoot | None:
    try:
        info = json.loads((path / "build.json").read_text())
    except (OSError, ValueError):
        return None
    return DebianRoot(path, info)


def ensure(
    cache: Path | None = None, *, rebuild: bool = False, progress: Callable[[str], None] = print
) -> DebianRoot:
    """The cached build, made first if there is none (or ``rebuild``)."""
    if os.geteuid() != 0:
        raise DebianRootError("building the Debian root needs root (debootstrap)")
    cache = cache or cache_dir()
    final = cache / build_key()
    if not rebuild and (done := _load(final)) is not None:
        return done
    cache.mkdir(parents=True, exist_ok=True)
    with open(cache / "lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # one builder at a time; others wait, then reuse
        if not rebuild and (done := _load(final)) is not None:
            return done
        mirror = pick_mirror()
        check_mirror(mirror)
        tmp = cache / f"{final.name}.build"
        _remove(tmp)  # a killed build: start again
        info = _build(tmp, mirror, progress)
        (tmp / "build.json").write_text(json.dumps(info, indent=1))
        if final.exists():
            old = cache / f"{final.name}.old"
            _remove(old)
            final.rename(old)
            _remove(old)
        os.sync()  # the rename publishes the build: what it names must be on disk first
        tmp.rename(final)
        for other in cache.iterdir():  # builds of other keys (older package lists)
            if other.is_dir() and other != final:
                _remove(other)
        progress(f"built {final} in {info['build_seconds']} s")
        return DebianRoot(final, info)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    default = f"${CACHE_ENV} or {DEFAULT_CACHE}"
    ap.add_argument("--cache", type=Path, help=f"cache directory (default {default})")
    ap.add_argument("--rebuild", action="store_true", help="build again even if cached")
    ap.add_argument("--json", action="store_true", help="print the build's description as JSON")
    args = ap.parse_args(argv)
    try:
        d = ensure(args.cache, rebuild=args.rebuild, progress=lambda s: print(s, file=sys.stderr))
    except DebianRootError as e:
        print(f"debian_root: {e}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps({"path": str(d.path), **d.info}, indent=1))
    else:
        print(d.path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
