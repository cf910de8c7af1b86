"""`vfsd template publish|ls|show|diff`: output, --json, exit codes, one-line errors."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
import tarfile

import pytest
from click.testing import CliRunner

from vfs.cli.vfsd import main
from vfs.redirect import FileRemote
from vfs.tree import manifest_layout as L


@pytest.fixture
def env(tmp_path):
    repo = tmp_path / "repo"
    FileRemote.init(repo)
    src = tmp_path / "src"
    (src / "etc").mkdir(parents=True)
    (src / "etc" / "passwd").write_bytes(b"root:x:0:0::/root:/bin/sh\n")
    (src / "bin").mkdir()
    (src / "bin" / "sh").write_bytes(b"\x7fELF...")
    os.chmod(src / "bin" / "sh", 0o4755)
    os.symlink("bin/sh", src / "sh")
    return tmp_path, str(repo), src


def _manifest_with_name(name: bytes) -> bytes:
    """A hand-made manifest: a root directory holding one empty file called ``name``."""
    d = L.INODE.pack(2, 0, 0, stat.S_IFDIR | 0o755, 0, 0, 2, 0, 0, 0, 0, bytes(32))
    f = L.INODE.pack(1, 0, 0, stat.S_IFREG | 0o644, 0, 0, 1, 0, 0, 0, 0, bytes(32))
    body = d + f + L.DIRENT.pack(1, 2, len(name), 0) + name
    head = L.HEADER.pack(L.MAGIC, L.VERSION, 0, 0, 2, 1, 0, 0, len(name), bytes(24))
    return head + body


def run(*args: str):
    r = CliRunner().invoke(main, list(args), prog_name="vfsd", catch_exceptions=False)
    return r


def one_line_error(r, code: int) -> str:
    assert r.exit_code == code, (r.exit_code, r.output)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("vfsd: error: "), r.stderr
    assert "Traceback" not in r.output
    return lines[0]


def test_publish_ls_show_diff(env):
    tmp, repo, src = env
    r = run("template", "publish", str(src), "--repo", repo, "--name", "base")
    assert r.exit_code == 0, r.output
    digest = r.stdout.strip()
    assert len(digest) == 64
    assert "uploaded" in r.stderr

    r = run("template", "publish", str(src), "--repo", f"file://{repo}", "--json")
    info = json.loads(r.stdout)
    assert info["digest"] == digest and info["objects_uploaded"] == 0
    assert info["entries"] == 6 and info["objects_skipped"] == 3

    r = run("template", "ls", "--repo", repo)
    assert r.stdout == f"{digest}  base\n"
    assert json.loads(run("template", "ls", "--repo", repo, "--json").stdout) == {"base": digest}
    (row,) = json.loads(run("template", "ls", "-l", "--repo", repo, "--json").stdout)
    assert row["entries"] == 6 and row["objects"] == 2 and row["content_bytes"] == 26 + 7
    assert run("template", "ls", "-l", "--repo", repo).stdout.split()[-1] == "base"

    out = run("template", "show", "base", "--repo", repo).stdout.splitlines()
    assert [line.split()[7] for line in out] == [".", "bin", "bin/sh", "etc", "etc/passwd", "sh"]
    assert out[-1].startswith("lrwxrwxrwx") and out[-1].endswith(" sh -> bin/sh")
    assert out[2].startswith("-rwsr-xr-x")
    os.setxattr(src / "etc", "user.note", b"hi")
    os.setxattr(src / "etc", "user.bin", b"\x00\x01")
    dx = run("template", "publish", str(src), "--repo", repo).stdout.strip()
    shown = run("template", "show", dx, "etc", "-x", "--repo", repo).stdout.splitlines()
    assert shown[1:3] == ["    user.bin=0x0001", "    user.note=hi"]
    sub = json.loads(run("template", "show", digest, "etc", "--repo", repo, "--json").stdout)
    assert [e["path"] for e in sub["entries"]] == ["etc", "etc/passwd"]
    assert sub["entries"][1]["size"] == 26 and len(sub["entries"][1]["oid"]) == 64

    (src / "etc" / "passwd").write_bytes(b"changed\n")
    (src / "new").write_bytes(b"")
    (src / "sh").unlink()
    r = run("template", "publish", str(src), "--repo", repo, "--name", "v2")
    assert r.exit_code == 0
    r = run("template", "diff", "base", "v2", "--repo", repo)
    assert r.exit_code == 0
    lines = r.stdout.splitlines()
    assert "+ new" in lines and "- sh" in lines
    assert any(x.startswith("M etc/passwd  (size, content, mtime") for x in lines)
    d = json.loads(run("template", "diff", "base", "v2", "--repo", repo, "--json").stdout)
    assert {c["path"]: c["status"] for c in d["changes"]}["new"] == "added"
    assert run("template", "diff", "base", "v2", "--repo", repo, "--exit-code").exit_code == 1
    assert run("template", "diff", "v2", "v2", "--repo", repo, "--exit-code").exit_code == 0


def test_show_through_a_local_store(env):
    tmp, repo, src = env
    digest = run("template", "publish", str(src), "--repo", repo).stdout.strip()
    store = tmp / "store"
    r = run("template", "show", digest, "--repo", repo, "--store", str(store))
    assert r.exit_code == 0 and len(r.stdout.splitlines()) == 6
    assert (store / "objects").exists() or any(store.rglob(digest))


def test_errors_are_one_line_with_exit_codes(env, tmp_path):
    tmp, repo, src = env
    digest = run("template", "publish", str(src), "--repo", repo, "--name", "ok").stdout.strip()
    one_line_error(run("template", "publish", str(tmp / "nope"), "--repo", repo), 4)
    one_line_error(run("template", "publish", str(src), "--repo", str(tmp / "norepo")), 4)
    e = one_line_error(run("template", "publish", str(src), "--repo", repo, "--name", "../x"), 2)
    assert "x" in e
    junk = tmp / "junk.tar"
    junk.write_bytes(b"no tar here" * 100)
    one_line_error(run("template", "publish", str(junk), "--repo", repo), 6)
    evil = tmp / "evil.tar"
    with tarfile.open(evil, "w") as tf:
        tf.addfile(tarfile.TarInfo("../../etc/cron.d/x"))
    assert "'..'" in one_line_error(
        run("template", "publish", str(evil), "--repo", repo, "--name", "ok"), 6
    )
    assert run("template", "ls", "--repo", repo, "--json").stdout.count(digest) == 1  # intact

    one_line_error(run("template", "show", "missing", "--repo", repo), 4)
    one_line_error(run("template", "show", "ok", "nope/path", "--repo", repo), 4)
    one_line_error(run("template", "show", "0" * 64, "--repo", repo), 4)
    # a content object is not a manifest
    content = json.loads(run("template", "show", "ok", "etc/passwd", "--repo", repo, "--json")
                         .stdout)["entries"][0]["oid"]  # fmt: skip
    assert "bad magic" in one_line_error(run("template", "show", content, "--repo", repo), 6)
    # a hostile manifest (an entry named "..") is refused at load, in one line
    hostile = FileRemote(repo).put(_manifest_with_name(b".."))
    assert "illegal name" in one_line_error(run("template", "show", hostile, "--repo", repo), 6)
    # a manifest corrupted in the repository is refused, not shown
    obj = FileRemote(repo).object_path(digest)
    data = bytearray(obj.read_bytes())
    data[70] ^= 1
    obj.write_bytes(bytes(data))
    one_line_error(run("template", "show", "ok", "--repo", repo), 5)
    one_line_error(run("template", "diff", "ok", "ok", "--repo", repo), 5)
    one_line_error(run("template", "ls", "--repo", "ftp://x/y"), 2)


def test_real_process_exit_code_and_no_traceback(env):
    tmp, repo, src = env
    vfsd = os.path.join(os.path.dirname(sys.executable), "vfsd")
    p = subprocess.run(
        [vfsd, "template", "show", "nope", "--repo", repo], capture_output=True, text=True
    )
    assert p.returncode == 4
    assert p.stderr.count("\n") == 1 and p.stderr.startswith("vfsd: error: no ref 'nope'")


@pytest.mark.network
def test_read_commands_over_http_https_and_mutual_tls(env, nginx, nginx_repo):
    tmp, _, src = env
    path, name = nginx_repo
    digest = run("template", "publish", str(src), "--repo", str(path), "--name", "t").stdout.strip()
    http = nginx.url(name)
    assert run("template", "ls", "--repo", http).stdout == f"{digest}  t\n"
    r = run("template", "show", "t", "etc/passwd", "--repo", nginx.url(name, "https"),
            "--ca", str(nginx.ca), "--json")  # fmt: skip
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["entries"][0]["size"] == 26
    mtls = ["--repo", nginx.url(name, "mtls"), "--ca", str(nginx.ca)]
    keys = ["--cert", str(nginx.client_cert), "--key", str(nginx.client_key)]
    assert run("template", "diff", "t", digest, *mtls, *keys, "--exit-code").exit_code == 0
    assert run("template", "show", "t", *mtls, *keys, "--store", str(tmp / "st")).exit_code == 0
    # publishing goes to the directory; an http repository refuses uploads in one line
    (src / "more").write_bytes(b"more")
    assert "read-only" in one_line_error(run("template", "publish", str(src), "--repo", http), 2)
    assert "read-only" in one_line_error(run("template", "rm", "t", "--repo", http), 2)
    assert run("template", "ls", "--repo", http, "--json").stdout.count(digest) == 1


def test_check_reports_missing_and_corrupt_objects(env):
    tmp, repo, src = env
    digest = run("template", "publish", str(src), "--repo", repo, "--name", "c").stdout.strip()
    r = run("template", "check", "c", "--repo", repo)
    assert r.exit_code == 0 and "2 objects (33 bytes) present: 0 missing, 0 corrupt" in r.stdout
    assert run("template", "check", digest, "--repo", repo, "--verify").exit_code == 0
    entries = json.loads(run("template", "show", "c", "--repo", repo, "--json").stdout)["entries"]
    oid = {e["path"]: e.get("oid") for e in entries}
    fr = FileRemote(repo)
    p = fr.object_path(oid["etc/passwd"])
    p.write_bytes(b"root:x:0:0::/root:/bin/bash")  # same object name, other bytes
    assert run("template", "check", "c", "--repo", repo).exit_code == 0  # present...
    r = run("template", "check", "c", "--repo", repo, "--verify", "--json")
    assert r.exit_code == 5  # ...but not right
    rep = json.loads(r.stdout)
    assert rep["ok"] is False and rep["corrupt"] == [
        {"oid": oid["etc/passwd"], "path": "etc/passwd"}
    ]
    assert "1 corrupt" in r.stderr and r.stderr.count("\n") == 1
    fr.object_path(oid["bin/sh"]).unlink()
    r = run("template", "check", "c", "--repo", repo)
    assert r.exit_code == 5 and f"missing {oid['bin/sh']}  bin/sh" in r.stdout


def test_publish_exclude_and_stdin(env):
    tmp, repo, src = env
    r = run("template", "publish", str(src), "--repo", repo, "--exclude", "/etc", "--json")
    assert json.loads(r.stdout)["entries"] == 4  # root, bin, bin/sh, sh
    tar = tmp / "t.tar"
    with tarfile.open(tar, "w") as tf:
        tf.add(src, arcname=".")
    r = CliRunner().invoke(
        main, ["template", "publish", "-", "--repo", repo, "--json"], input=tar.read_bytes()
    )
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["entries"] == 6


def test_tag_points_a_name_at_a_valid_template_only(env):
    tmp, repo, src = env
    d1 = run("template", "publish", str(src), "--repo", repo, "--name", "app").stdout.strip()
    (src / "x").write_bytes(b"x")
    d2 = run("template", "publish", str(src), "--repo", repo, "--name", "app").stdout.strip()
    r = run("template", "tag", "app", d1, "--repo", repo)  # roll back
    assert r.exit_code == 0 and r.stdout == f"{d1}  app\n"
    assert run("template", "tag", "stable", "app", "--repo", repo).stdout.startswith(d1)
    assert json.loads(run("template", "ls", "--repo", repo, "--json").stdout) == {
        "app": d1,
        "stable": d1,
    }
    content = FileRemote(repo).put(b"not a manifest")
    one_line_error(run("template", "tag", "app", content, "--repo", repo), 6)
    one_line_error(run("template", "tag", "bad/name", d2, "--repo", repo), 2)
    assert FileRemote(repo).get_ref("app") == d1


def test_export_to_stdout(env):
    tmp, repo, src = env
    run("template", "publish", str(src), "--repo", repo, "--name", "e")
    r = CliRunner().invoke(main, ["template", "export", "e", "--repo", repo])
    assert r.exit_code == 0
    import io

    with tarfile.open(fileobj=io.BytesIO(r.stdout_bytes)) as tf:
        members = {m.name: m for m in tf.getmembers()}
        assert tf.extractfile(members["etc/passwd"]).read() == b"root:x:0:0::/root:/bin/sh\n"
    assert set(members) == {".", "bin", "bin/sh", "etc", "etc/passwd", "sh"}
    assert members["bin/sh"].mode == 0o4755 and members["sh"].linkname == "bin/sh"
    assert "6 members, 33 bytes" in r.stderr


def test_rm_retires_names_and_repo_gc_takes_what_no_name_reaches(env):
    """The lifecycle of a template: publish, a second version, retire the first name, gc.
    The retired template stays loadable by digest until the gc; a digest given to the gc keeps
    it (a VEE still uses it); without one, its objects go, and the second version is whole."""
    tmp, repo, src = env
    d1 = run("template", "publish", str(src), "--repo", repo, "--name", "v1").stdout.strip()
    (src / "etc" / "passwd").write_bytes(b"root:x:0:0::/root:/bin/bash\n")  # v2: one change
    d2 = run("template", "publish", str(src), "--repo", repo, "--name", "v2").stdout.strip()
    run("template", "tag", "old", "v1", "--repo", repo)
    # a name that is no ref: nothing is removed, also not the names before it
    assert "'nope'" in one_line_error(run("template", "rm", "v1", "nope", "--repo", repo), 4)
    one_line_error(run("template", "rm", "../x", "--repo", repo), 2)
    assert set(json.loads(run("template", "ls", "--repo", repo, "--json").stdout)) == {
        "v1", "v2", "old"
    }  # fmt: skip
    r = run("template", "rm", "v1", "old", "--repo", repo, "--json")
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout) == [{"name": "v1", "digest": d1}, {"name": "old", "digest": d1}]
    assert json.loads(run("template", "ls", "--repo", repo, "--json").stdout) == {"v2": d2}
    assert FileRemote(repo).list_refs() == {"v2": d2}  # refs.json too: what HTTP readers list
    assert json.loads((tmp / "repo" / "refs.json").read_text()) == {"v2": d2}
    one_line_error(run("template", "show", "v1", "--repo", repo), 4)
    assert run("template", "show", d1, "--repo", repo).exit_code == 0  # by digest: still there

    # a gc told that a VEE uses d1 keeps it whole
    r = run("repo", "gc", "--repo", repo, "--grace", "0", d1, "--json")
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["swept_objects"] == 0
    assert run("template", "check", d1, "--repo", repo, "--verify").exit_code == 0
    # not told: v1's manifest and its old passwd go; v2 loses nothing
    r = run("repo", "gc", "--repo", repo, "--grace", "0", "--json")
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["swept_objects"] == 2
    one_line_error(run("template", "show", d1, "--repo", repo), 4)
    assert run("template", "check", "v2", "--repo", repo, "--verify").exit_code == 0


def test_repo_ref_delete(env):
    tmp, repo, _ = env
    oid = FileRemote(repo).put(b"an object")
    assert run("repo", "ref", "img", oid, "--repo", repo).stdout == f"{oid}\n"
    one_line_error(run("repo", "ref", "-d", "img", oid, "--repo", repo), 2)
    r = run("repo", "ref", "--delete", "img", "--repo", repo)
    assert r.exit_code == 0 and r.stdout == f"{oid}\n"
    one_line_error(run("repo", "ref", "img", "--repo", repo), 4)
    one_line_error(run("repo", "ref", "-d", "img", "--repo", repo), 4)
    assert FileRemote(repo).has(oid)  # the object stays until a gc
