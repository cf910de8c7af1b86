"""Crash story of publish: kill -9 mid-publish leaves the old ref, whole objects only, and a
repository the next publish completes (uploading only what is still missing)."""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import time

from vfs.redirect import FileRemote
from vfs.tree.manifest_check import check_template
from vfs.tree.template import Template, publish_template

SCRIPT = """
import sys
from vfs.redirect import FileRemote
from vfs.tree.template import publish_template
publish_template(sys.argv[1], FileRemote(sys.argv[2]), name="app")
print("done", flush=True)
"""


def test_kill_during_publish_keeps_old_ref_and_resumes(tmp_path):
    repo_dir = tmp_path / "repo"
    repo = FileRemote(repo_dir, create=True)
    old_src = tmp_path / "old"
    old_src.mkdir()
    (old_src / "v1").write_bytes(b"version 1")
    old = publish_template(old_src, repo, name="app")

    src = tmp_path / "src"
    src.mkdir()
    for i in range(2500):
        (src / f"f{i:04d}").write_bytes(i.to_bytes(4, "little") * 512)
    proc = subprocess.Popen(
        [sys.executable, "-c", SCRIPT, str(src), str(repo_dir)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        deadline = time.monotonic() + 60
        while sum(1 for _ in repo.iter_oids()) < 300:  # wait until it is well under way
            assert proc.poll() is None, proc.stderr.read().decode()
            assert time.monotonic() < deadline
            time.sleep(0.005)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert b"done" not in proc.stdout.read()

    # the name still names the old, complete template
    assert repo.get_ref("app") == old.digest
    t = Template.load(repo, old.digest)
    assert repo.get(t.resolve(b"v1").oid) == b"version 1"
    assert check_template(t, repo, verify=True).ok
    # every object present is whole: its bytes hash to its name
    present = list(repo.iter_oids())
    assert 300 <= len(present) < 2502
    for oid in present:
        assert hashlib.sha256(repo.get(oid)).hexdigest() == oid

    res = publish_template(src, repo, name="app")
    assert res.objects == 2501
    assert res.objects_uploaded == 2501 - (len(present) - 2)  # old tree had 2 objects
    assert repo.get_ref("app") == res.digest
    t2 = Template.load(repo, res.digest)
    assert len(t2.readdir(1)) == 2500
    rep = check_template(t2, repo)
    assert rep.ok and rep.objects == 2500
    assert repo.get(t2.resolve(b"f0042").oid) == (42).to_bytes(4, "little") * 512
