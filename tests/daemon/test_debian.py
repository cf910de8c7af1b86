"""A real Debian 12 in VEE roots: apt, dpkg and the shadow tools, exactly as on a local disk.

The cached minbase root (tools/debian_root.py) is published as a template and served by
``vfsd serve``; the same scenario (apt-get update from a local repository on nginx, installs with
maintainer scripts, dpkg --verify, useradd, ldconfig, dpkg-divert, update-alternatives, crontab,
a second install, remove, purge, autoremove, apt-get check) runs chrooted in several fresh VEEs
and in a plain ``cp -a`` copy of the root, in the same test. Every step must succeed in each VEE
as it does in the copy (same exit status; same output where the output is deterministic), and at
the end each VEE's tree must equal the copy's: names, types, modes, owners, link counts, hard-link
groups, sizes, contents, symlink targets, device numbers, xattrs, and the times of everything
the scenario did not touch (a VEE keeps the template's times as the copy keeps them).
"""

from __future__ import annotations

import difflib
import hashlib
import json
import os
import stat
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.daemon.conftest import ENGINES, Daemon, fuse_available, kernel_engine_available, vfsd
from tools.debian_root import DebianRoot, DebianRootError, chroot_run, ensure

pytestmark = [pytest.mark.fuse, pytest.mark.slow, pytest.mark.network]

VEES = 3
FIRST = (
    "cron sudo uuid-runtime iputils-ping less vim-tiny procps ca-certificates man-db csh "
    "netcat-openbsd bash-completion"
)
APT = "apt-get -y -q -o Dpkg::Use-Pty=0"
# The shadow tools date a password change (/etc/shadow's third field) from SOURCE_DATE_EPOCH when
# it is set: the copy and a VEE that run across midnight still write the same bytes.
ENV = {"SOURCE_DATE_EPOCH": "1700000000"}
# A fixed crypt(3) string: chpasswd -e stores it as given (a plain password gets a random salt).
HASH = "$6$vfstest$0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ./"


@dataclass(frozen=True)
class Step:
    cmd: str
    same_output: bool = False  # stdout must equal the plain copy's (deterministic output)


def scenario(source: str) -> list[Step]:
    return [
        Step(f"printf '%s' '{source}' > /etc/apt/sources.list"),
        Step(f"{APT} update"),
        # a template file diverted (renamed) before anything is installed, and one the install
        # below will put aside
        Step("dpkg-divert --local --rename --divert /usr/bin/md5sum.real --add /usr/bin/md5sum"),
        Step("dpkg-divert --local --rename --divert /usr/bin/hexdump.real --add /usr/bin/hexdump"),
        Step(f"{APT} install {FIRST}"),
        Step("dpkg --audit", same_output=True),  # (dpkg --verify runs once, at the end)
        Step("useradd -m -s /bin/bash -G sudo alice"),
        Step("groupadd -r svc && useradd -r -g svc -d /nonexistent -s /usr/sbin/nologin svc"),
        Step(f"echo 'alice:{HASH}' | chpasswd -e && usermod -aG crontab alice"),
        Step("id alice; id svc; getent passwd uuidd; getent group crontab", same_output=True),
        Step("echo '17 * * * * true' | crontab -u alice - && crontab -u alice -l", True),
        Step("ldconfig && ldconfig -p", same_output=True),
        Step("update-alternatives --set editor /usr/bin/vim.tiny"),
        Step(f"{APT} install nano"),  # a second install: editor stays manual on vim
        Step("update-alternatives --query editor; readlink -f /usr/bin/editor", True),
        Step("update-alternatives --display pager; readlink -f /usr/bin/pager", True),
        Step("getcap /usr/bin/ping; stat -c '%a %U:%G %n' /usr/bin/sudo /usr/bin/crontab", True),
        Step("dpkg-statoverride --list; dpkg-divert --list | sort", same_output=True),
        Step("cat /etc/shells; ls -l /etc/ssl/certs | wc -l", same_output=True),
        Step(
            'python3 -c \'import sqlite3; c = sqlite3.connect("/var/tmp/t.db"); '
            'c.execute("create table t (x)"); '
            'c.executemany("insert into t values (?)", [(i,) for i in range(1000)]); '
            'c.commit(); print(c.execute("select sum(x) from t").fetchone())\'',
            same_output=True,
        ),
        Step(f"{APT} remove procps"),
        Step(f"{APT} purge cron"),
        Step(f"{APT} install --reinstall less"),
        Step(f"{APT} autoremove --purge"),
        Step("dpkg-divert --local --rename --remove /usr/bin/md5sum && md5sum /etc/passwd", True),
        Step(f"{APT} check"),
        Step("dpkg --verify; dpkg --audit", same_output=True),
        Step("dpkg-query -W -f '${Package} ${Version} ${Status}\\n'", same_output=True),
        Step("tar -C / -cf /var/backups/etc.tar etc usr/share/doc"),
    ]


@dataclass
class Outcome:
    rc: int
    out: str
    err: str
    seconds: float


@dataclass
class Run:
    name: str
    outcomes: list[Outcome] = field(default_factory=list)
    tree: Snapshot | None = None

    @property
    def seconds(self) -> float:
        return sum(o.seconds for o in self.outcomes)


def run_scenario(name: str, root: Path, steps: list[Step]) -> Run:
    """Every step, even after a failure (so one run reports every difference, not the first),
    then the snapshot of the tree it left."""
    run = Run(name)
    for s in steps:
        t = time.monotonic()
        p = chroot_run(root, ["/bin/sh", "-ec", s.cmd], timeout=600, env=ENV)
        run.outcomes.append(Outcome(p.returncode, p.stdout, p.stderr, time.monotonic() - t))
    run.tree = snapshot(root)
    return run


# -- the trees ----------------------------------------------------------------------------------

# Paths whose bytes (not names, types, modes or owners) legitimately differ between two runs
# of the same scenario, even on one local disk (two plain copies differ in exactly these).
VOLATILE = (
    "var/log/",  # dpkg.log, apt/history.log, apt/term.log, alternatives.log: timestamps
    "var/cache/apt/pkgcache.bin",  # the binary caches record the index files' mtimes
    "var/cache/apt/srcpkgcache.bin",
    "var/cache/ldconfig/aux-cache",  # keyed by the libraries' inode numbers and ctimes
    "var/spool/cron/crontabs/",  # crontab writes "installed on <date>"
    "var/backups/etc.tar",  # the archive holds the files' mtimes
)


def _volatile(rel: str) -> bool:
    return rel.startswith(VOLATILE)


Snapshot = tuple[dict[str, tuple], dict[str, int]]


def _content(path: Path, st: os.stat_result) -> str:
    if stat.S_ISLNK(st.st_mode):
        return "-> " + os.readlink(path)
    if stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode):
        return f"dev {os.major(st.st_rdev)}:{os.minor(st.st_rdev)}"
    if not stat.S_ISREG(st.st_mode):
        return ""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while b := f.read(1 << 20):
            h.update(b)
    return h.hexdigest()


def snapshot(root: Path) -> Snapshot:
    """rel path -> (kind/mode, uid, gid, nlink, size, content, xattrs, hard-link group), and
    rel path -> mtime_ns. Walked without following symlinks; the tree has no mounts (the chroot's
    /proc and /dev live in the command's own mount namespace)."""
    entries: dict[str, tuple] = {}
    times: dict[str, int] = {}
    groups: dict[tuple[int, int], list[str]] = {}
    ino: dict[str, tuple[int, int]] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for name in sorted(dirnames + filenames):
            path = Path(dirpath) / name
            rel = os.fspath(path.relative_to(root))
            st = os.lstat(path)
            times[rel] = st.st_mtime_ns
            is_dir = stat.S_ISDIR(st.st_mode)
            vol = _volatile(rel) and stat.S_ISREG(st.st_mode)
            xattrs = tuple(
                sorted((x, os.getxattr(path, x, follow_symlinks=False)) for x in
                       os.listxattr(path, follow_symlinks=False))
            )  # fmt: skip
            entries[rel] = (
                stat.filemode(st.st_mode), st.st_uid, st.st_gid, st.st_nlink,
                None if is_dir or vol else st.st_size,
                None if vol else _content(path, st), xattrs,
            )  # fmt: skip
            if not is_dir and st.st_nlink > 1:
                ino[rel] = (st.st_dev, st.st_ino)
                groups.setdefault(ino[rel], []).append(rel)
    for rel, key in ino.items():
        entries[rel] += (tuple(groups[key]),)
    return entries, times


FIELDS = ("mode", "uid", "gid", "nlink", "size", "content", "xattrs", "hard links")


def mtimes(root: Path) -> dict[str, int]:
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            path = os.path.join(dirpath, name)
            out[os.path.relpath(path, root)] = os.lstat(path).st_mtime_ns
    return out


def tree_differences(
    plain: Snapshot,
    vee: Snapshot,
    template_mtimes: dict[str, int],
    examples: int = 8,
    *,
    dir_nlink_one: bool = False,
) -> list[str]:
    """The differences between the two trees, grouped by what differs (count and examples).
    ``dir_nlink_one``: a directory may count 1 link (kernel overlayfs says so of a directory
    merged from several layers, as btrfs does of every directory: "unknown" to find)."""
    (a, a_times), (b, b_times) = plain, vee
    groups: dict[str, list[str]] = {}
    for rel in sorted(a.keys() - b.keys()):
        groups.setdefault("only in the plain copy", []).append(rel)
    for rel in sorted(b.keys() - a.keys()):
        groups.setdefault("only in the VEE", []).append(rel)
    for rel in sorted(a.keys() & b.keys()):
        pa, pb = a[rel] + (None,), b[rel] + (None,)
        for f, x, y in zip(FIELDS, pa, pb, strict=False):
            if x != y and not (dir_nlink_one and f == "nlink" and y == 1 and pa[0][0] == "d"):
                groups.setdefault(f, []).append(f"{rel} (plain {x!r}, VEE {y!r})")
        t = template_mtimes.get(rel)
        if t is not None and a_times[rel] == t and b_times[rel] != t:
            groups.setdefault("mtime (the template's, kept in the copy)", []).append(
                f"{rel} ({t} -> {b_times[rel]})"
            )
    out = []
    for what, items in groups.items():
        out.append(f"{what}: {len(items)} paths, e.g.")
        out += [f"    {i}" for i in items[:examples]]
    return out


# -- the test -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def debian() -> DebianRoot:
    reason = fuse_available()  # root, /dev/fuse: without them there is nothing to build for
    if reason:
        pytest.skip(reason)
    try:
        return ensure(progress=lambda s: print(f"debian_root: {s}"))
    except DebianRootError as e:
        pytest.fail(f"cannot build the Debian root: {e}", pytrace=False)


@pytest.fixture(params=ENGINES)
def debian_daemon(tmp_path: Path, debian: DebianRoot, request: pytest.FixtureRequest):
    """vfsd serving the Debian root as template 'debian', with VEES fresh VEEs d0, d1, ...,
    on each engine."""
    engine = request.param
    reason = kernel_engine_available() if engine == "kernel" else None
    if reason:
        pytest.skip(reason)
    d = Daemon(
        tmp_path, tmp_path / "state", tmp_path / "mnt", tmp_path / "store", tmp_path / "repo",
        engine=engine,
    )  # fmt: skip
    d.mnt.mkdir()
    vfsd("repo", "init", str(d.repo))
    d.publish(debian.root, "debian")
    d.start()
    try:
        for i in range(VEES):
            d.vee("add", f"d{i}", "--template", "debian")
        yield d
    finally:
        d.stop()
        bad = [ln for ln in d.log_text().splitlines() if "Traceback" in ln or "ERROR" in ln]
        assert not bad, d.log_text()[-20000:]


def _report(step: Step, plain: Outcome, got: Outcome) -> str:
    """One differing step: exit status, the end of stderr, and the stdout diff if compared."""
    lines = [f"  $ {step.cmd}", f"    rc {got.rc} (plain copy: {plain.rc})"]
    lines += [f"    stderr| {ln}" for ln in got.err.strip().splitlines()[-6:]]
    if step.same_output and got.out != plain.out:
        diff = difflib.unified_diff(
            plain.out.splitlines(), got.out.splitlines(), "plain", "VEE", n=0, lineterm=""
        )
        lines += [f"    stdout| {ln}" for ln in list(diff)[2:14]]
    return "\n".join(lines)


def test_debian_package_manager_in_vees(debian_daemon: Daemon, debian: DebianRoot, nginx, tmp_path):
    link = nginx.webroot / "debian-apt"
    if not link.is_symlink():
        link.symlink_to(debian.repo)
    steps = scenario(DebianRoot.sources_line(nginx.url("debian-apt")))
    plain_root = tmp_path / "plain"
    subprocess.run(["cp", "-a", str(debian.root), str(plain_root)], check=True)
    template_mtimes = mtimes(debian.root)

    # The VEEs run one after another: ext4 hands a freed inode number to the next file at once,
    # and the failures of a node identity outliving its file show best in an unshared stream
    # of creates and unlinks. The plain copy runs meanwhile (its outcome is not timing-bound).
    with ThreadPoolExecutor(1) as pool:
        plain_future = pool.submit(run_scenario, "plain", plain_root, steps)
        runs = {
            f"d{i}": run_scenario(f"d{i}", debian_daemon.mnt / f"d{i}", steps) for i in range(VEES)
        }
        plain = plain_future.result()
    print("seconds per step: plain / " + " / ".join(runs))
    for k, s in enumerate(steps):
        cells = [f"{r.outcomes[k].seconds:6.1f}" for r in (plain, *runs.values())]
        print(" ".join(cells), s.cmd[:60])
    print("total: " + " / ".join(f"{r.seconds:.1f}" for r in (plain, *runs.values())))
    # the plain copy is the reference: if it fails, the scenario itself is wrong
    broken = [_report(s, o, o) for s, o in zip(steps, plain.outcomes, strict=True) if o.rc != 0]
    assert not broken, "the plain copy failed:\n" + "\n".join(broken)

    failures: list[str] = []
    for name, vee in runs.items():
        bad = [
            _report(s, p, v)
            for s, p, v in zip(steps, plain.outcomes, vee.outcomes, strict=True)
            if v.rc != p.rc or (s.same_output and v.out != p.out)
        ]
        if bad:
            failures.append(f"VEE {name}: {len(bad)} steps differ from the plain copy:")
            failures += bad
        assert plain.tree is not None and vee.tree is not None
        diffs = tree_differences(
            plain.tree, vee.tree, template_mtimes, dir_nlink_one=debian_daemon.engine == "kernel"
        )
        if diffs:
            failures.append(f"VEE {name}: the tree differs from the plain copy's:")
            failures += [f"  {d}" for d in diffs]
    assert not failures, "\n".join(failures)

    # vee upgrade to a new template version with the same packages installed (the plain copy):
    # the files the VEE installed itself are what the new version has, so they are no
    # conflict; what is left differs for real (logs and caches that record times)
    v2 = debian_daemon.publish(plain_root, "debian-v2")
    r = debian_daemon.vee("upgrade", "d0", "--template", v2, "--dry-run", "--json")
    report = json.loads(r.stdout)
    real = [c for c in report["conflicts"] if not _volatile(c["path"])]
    print(f"upgrade d0 -> v2: {len(report['conflicts'])} conflicts ({len(real)} outside "
          f"volatile paths), {report['identical_to_new']} private files equal v2's")  # fmt: skip
    assert not real, real[:20]
    assert report["identical_to_new"] > 100
