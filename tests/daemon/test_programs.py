"""Real programs as clients inside a VEE root, on both engines."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest

from tests.daemon.conftest import ENGINES

pytestmark = pytest.mark.fuse


@pytest.fixture(params=ENGINES)
def engine(request: pytest.FixtureRequest) -> str:
    return request.param


def run(*cmd: str, cwd=None) -> subprocess.CompletedProcess:  # type: ignore[no-untyped-def]
    p = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, f"{cmd}: {p.stdout}\n{p.stderr}"
    return p


def test_tar_round_trip(daemon, tmp_path):
    a = daemon.mnt / "a"
    tarball = tmp_path / "vee.tar"
    run("tar", "--xattrs", "--xattrs-include=*", "-cpf", str(tarball), "-C", str(a), ".")
    os.mkdir(a / "restore")
    run("tar", "--xattrs", "--xattrs-include=*", "-xpf", str(tarball), "-C", str(a / "restore"))
    run("diff", "-r", "--no-dereference", "-x", "fifo", str(tmp_path / "src"), str(a / "restore"))
    assert os.getxattr(a / "restore/etc/hosts", "user.origin") == b"template"
    assert os.stat(a / "restore/bin/tool").st_ino == os.stat(a / "restore/bin/tool-link").st_ino


@pytest.mark.skipif(shutil.which("git") is None, reason="no git")
def test_git_init_commit(daemon):
    repo = daemon.mnt / "a" / "work"
    os.mkdir(repo)
    env = {**os.environ, "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@e", "HOME": str(repo)}
    env |= {"GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@e"}
    for cmd in (["git", "init", "-q"], ["git", "add", "."], ["git", "commit", "-qm", "one"]):
        (repo / "file.txt").write_text(" ".join(cmd))
        p = subprocess.run(cmd, cwd=repo, env=env, capture_output=True, text=True)
        assert p.returncode == 0, p.stderr
    p = subprocess.run(["git", "fsck"], cwd=repo, env=env, capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    log = subprocess.run(["git", "log", "--oneline"], cwd=repo, env=env, capture_output=True)
    assert b"one" in log.stdout


def test_python_venv(daemon):
    venv = daemon.mnt / "a" / "venv"
    run(sys.executable, "-m", "venv", "--without-pip", str(venv))
    p = run(str(venv / "bin" / "python"), "-c", "import sys; print(sys.prefix)")
    assert p.stdout.strip() == str(venv)


def test_cp_a_and_rsync_ahax(daemon, tmp_path):
    a = daemon.mnt / "a"
    src = tmp_path / "src"
    run("cp", "-a", str(src), str(a / "copied"))
    run("diff", "-r", "--no-dereference", "-x", "fifo", str(src), str(a / "copied"))
    assert os.stat(a / "copied/suid").st_mode & 0o7777 == 0o4755
    run("rsync", "-aHAX", f"{src}/", f"{a}/rsynced/")
    run("diff", "-r", "--no-dereference", "-x", "fifo", str(src), str(a / "rsynced"))
    assert os.stat(a / "rsynced/bin/tool").st_ino == os.stat(a / "rsynced/bin/tool-link").st_ino
    # and back out of the VEE (reading template + private entries)
    out = tmp_path / "out"
    run("rsync", "-aHAX", f"{a}/", f"{out}/")
    run("diff", "-r", "--no-dereference", "-x", "fifo", str(src), str(out / "copied"))
    assert os.getxattr(out / "etc/hosts", "user.origin") == b"template"
