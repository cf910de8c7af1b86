"""A VEE holding more live files than the daemon may hold fds.

The view pins each private file it knows with an ``O_PATH`` fd (its identity, docs/vee-layer.md
§3). The kernel forgets inodes only under memory pressure, so an untar of more files than the
open-file limit kept every pin and failed with EMFILE ("Too many open files") at 20k files on
this machine. The daemon now sheds pins of named, closed files and takes them again by name.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.daemon.conftest import running_daemon

pytestmark = pytest.mark.fuse

LIMIT = 1024  # the daemon's open-file limit: at most 512 pins
FILES = 3000


@pytest.fixture
def small_daemon(tmp_path: Path):
    if shutil.which("setpriv") is None or shutil.which("prlimit") is None:
        pytest.skip("needs setpriv and prlimit (util-linux)")
    # without CAP_SYS_RESOURCE the daemon cannot raise its hard limit back to fs.nr_open
    wrapper = ["prlimit", f"--nofile={LIMIT}:{LIMIT}", "--"]
    wrapper += ["setpriv", "--bounding-set", "-sys_resource", "--"]

    def src(path: Path) -> None:
        (path / "etc").mkdir(parents=True)
        (path / "etc" / "hostname").write_text("vee\n")

    with running_daemon(tmp_path, vees=("a",), src=src, wrapper=wrapper) as d:
        yield d


def test_untar_of_more_files_than_the_daemon_may_open(small_daemon, tmp_path):
    d = small_daemon
    assert d.proc is not None
    limits = Path(f"/proc/{d.proc.pid}/limits").read_text()
    soft = next(ln.split()[3] for ln in limits.splitlines() if ln.startswith("Max open files"))
    assert int(soft) == LIMIT  # the test exercises what it says
    src = tmp_path / "tree"
    for i in range(FILES):
        p = src / f"d{i // 100:02d}" / f"f{i:04d}"
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(b"%d\n" % i * (i % 7 + 1))
        if i % 10 == 0:
            os.symlink(f"f{i:04d}", p.with_name(f"l{i:04d}"))
    subprocess.run(["tar", "-cf", tmp_path / "t.tar", "-C", src, "."], check=True)
    root = d.mnt / "a"
    (root / "x").mkdir()
    subprocess.run(["tar", "-xf", tmp_path / "t.tar", "-C", root / "x"], check=True)
    # every file is itself: tar compares content, mode, times and link targets
    subprocess.run(["tar", "-df", tmp_path / "t.tar", "-C", root / "x"], check=True)
    # changes through shed pins: chmod, append, rename, unlink while open
    for i in range(0, FILES, 97):
        p = root / "x" / f"d{i // 100:02d}" / f"f{i:04d}"
        os.chmod(p, 0o600)
        with open(p, "ab") as f:
            f.write(b"more\n")
    p = root / "x" / "d00" / "f0001"
    with open(p, "rb+") as f:
        os.rename(root / "x" / "d00" / "f0002", p)
        f.write(b"unlinked but open\n")
        f.flush()
        os.fsync(f.fileno())
        assert os.fstat(f.fileno()).st_nlink == 0
    assert p.read_bytes() == b"2\n" * 3
    subprocess.run(["rm", "-rf", root / "x"], check=True)
    assert not (root / "x").exists()
    log = d.log_text()
    assert "Too many open files" not in log and "Traceback" not in log
