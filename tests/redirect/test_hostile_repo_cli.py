"""Every `vfsd repo ...` and `vfsd template ...` command, over file:// and over HTTP, against
every hostile repository document of issue 8 item 8 (and more): the exit code of the error
class, one line on stderr naming the file, never a traceback. The CLI is the real one, run as
real processes: forked from a zygote that imported it once (tests/redirect/cli_fork.py), and a
few cross-checked with fresh `vfsd` processes."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.redirect.cli_fork import Zygote
from tools.lying_http import LyingServer
from vfs.errors import FormatError, UnsupportedFeature, UsageError
from vfs.redirect.file_remote import FileRemote
from vfs.tree.template import publish_template

pytestmark = pytest.mark.network


def _meta(**fields) -> bytes:
    doc = {"format": "vfs-repo", "version": 1, "features": []}
    doc.update(fields)
    return json.dumps(doc).encode()


def _nested(n: int) -> bytes:
    head = b'{"format": "vfs-repo", "version": 1, "features": [], "x": '
    return head + b"[" * n + b"]" * n + b"}"


#: hostile vfs-repo.json -> (bytes, error class, words of the message)
META = {
    "features-object": (_meta(features=[{"a": 1}]), FormatError, "invalid feature name"),
    "features-abc": (_meta(features="abc"), FormatError, "features must be a list"),
    "version-negative": (_meta(version=-5), FormatError, "invalid version -5"),
    "version-true": (_meta(version=True), FormatError, "not True"),
    "nested-30000": (_nested(30_000), FormatError, "nested deeper"),
    "nested-100000": (_nested(100_000), FormatError, "larger than"),
    "not-json": (b"<html>oops</html>", FormatError, "not valid JSON"),
    "version-99": (_meta(version=99), UnsupportedFeature, "newer than this vfs"),
}
#: hostile refs.json (read over HTTP only: a directory lists refs/ itself)
REFS_JSON = {
    "array": b"[]",
    "value-number": b'{"t": 5}',
    "nested": b'{"t": ' + b"[" * 100_000 + b"]" * 100_000 + b"}",
    "bad-name": json.dumps({"../../etc": "ab" * 32}).encode(),
}
#: hostile refs/t
REF = {
    "path": b"../../etc/passwd\n",
    "huge": b"ab" * 32 * 10,
    "binary": b"\xff\xfe" * 32,
}


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A web root of repository copies, each with one hostile document, served over HTTP;
    a template ``t`` and a file object in each; the zygote that runs the CLI."""
    root = tmp_path_factory.mktemp("hostile")
    src = root / "src"
    (src / "etc").mkdir(parents=True)
    (src / "etc" / "hostname").write_text("vee\n")
    base = root / "base"
    r = FileRemote(base, create=True)
    digest = publish_template(src, r, name="t").digest
    blob = root / "blob"
    blob.write_bytes(b"a file object")
    oid = r.put_file(blob)
    www = root / "www"
    cases: dict[str, str] = {}

    def case(name: str, rel: str, data: bytes) -> None:
        d = www / name
        shutil.copytree(base, d)
        (d / rel).write_bytes(data)
        cases[name] = rel

    for name, (data, _, _) in META.items():
        case(f"meta-{name}", "vfs-repo.json", data)
    for name, data in REFS_JSON.items():
        case(f"refsjson-{name}", "refs.json", data)
    for name, data in REF.items():
        case(f"ref-{name}", "refs/t", data)
    zygote = Zygote(parallel=4)
    with LyingServer(www) as srv:
        yield {"root": root, "www": www, "url": srv.url, "digest": digest, "oid": oid,
               "blob": blob, "src": src, "zygote": zygote}  # fmt: skip
    zygote.close()


def commands(w, url: str, n: int) -> dict[str, list[str]]:
    """Every repo/template command, reading or writing repository ``url``."""
    store = str(w["root"] / "stores" / str(n))
    (w["root"] / "out").mkdir(exist_ok=True)
    out = str(w["root"] / "out" / f"{n}.tar")
    d = w["digest"]
    return {
        "repo put": ["repo", "put", "--repo", url, str(w["blob"])],
        "repo get ref": ["repo", "get", "--repo", url, "--store", store, "t"],
        "repo get id": ["repo", "get", "--repo", url, "--store", store, w["oid"]],
        "repo ls": ["repo", "ls", "--repo", url],
        "repo ref": ["repo", "ref", "--repo", url, "t"],
        "repo ref set": ["repo", "ref", "--repo", url, "t2", d],
        "fetch": ["fetch", "--repo", url, "--store", store, w["oid"]],
        "template publish": ["template", "publish", "--repo", url, str(w["src"])],
        "template ls": ["template", "ls", "--repo", url],
        "template ls -l": ["template", "ls", "-l", "--repo", url],
        "template show": ["template", "show", "--repo", url, "t"],
        "template show --store": ["template", "show", "--repo", url, "--store", store, d],
        "template diff": ["template", "diff", "--repo", url, "t", d],
        "template check": ["template", "check", "--repo", url, "--verify", "t"],
        "template tag": ["template", "tag", "--repo", url, "t3", "t"],
        "template export": ["template", "export", "--repo", url, "-o", out, "t"],
    }


WRITES = {"repo put", "repo ref set", "template publish"}
READS_REF = {"repo get ref", "repo ref", "template show", "template diff", "template check",
             "template tag", "template export"}  # fmt: skip
READS_REFS_INDEX = {"repo ls", "template ls", "template ls -l"}


def check_one_line(r: subprocess.CompletedProcess, code: int, *words: str) -> None:
    where = f"{' '.join(r.args)}: exit {r.returncode}, stderr {r.stderr[-400:]!r}"
    assert r.returncode == code, where
    assert "Traceback" not in r.stderr, where
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("vfsd: error: "), where
    for w in words:
        assert w in lines[0], where


def run_matrix(w, tmp_path, plan):
    """plan: [(argv, expected code, words...)] -> checked, all run in one zygote batch."""
    results = w["zygote"].run([argv for argv, *_ in plan], tmp_path / "cli")
    for r, (_, code, *words) in zip(results, plan, strict=True):
        if code == 0:
            assert r.returncode == 0, (r.args, r.stderr)
        else:
            check_one_line(r, code, *words)


@pytest.mark.parametrize("transport", ["file", "http"])
def test_hostile_repository_json_on_every_command(world, tmp_path, transport):
    plan = []
    n = 0
    for name, (_, cls, words) in META.items():
        case = f"meta-{name}"
        url = f"{world['url']}/{case}" if transport == "http" else str(world["www"] / case)
        if transport == "file":
            plan.append((["repo", "init", url], cls.exit_code, "vfs-repo.json", words))
        for label, argv in commands(world, url, n := n + 1).items():
            if transport == "http" and label in WRITES:
                # HTTP repositories are read-only: refused before anything is read
                plan.append((argv, UsageError.exit_code, "read-only"))
            else:
                plan.append((argv, cls.exit_code, f"{case}/vfs-repo.json: ", words))
    run_matrix(world, tmp_path, plan)


def test_hostile_refs_index_over_http(world, tmp_path):
    plan = []
    for i, name in enumerate(REFS_JSON):
        url = f"{world['url']}/refsjson-{name}"
        for label, argv in commands(world, url, 100 + i).items():
            if label in READS_REFS_INDEX:
                plan.append((argv, FormatError.exit_code, f"refsjson-{name}/refs.json: "))
    run_matrix(world, tmp_path, plan)


@pytest.mark.parametrize("transport", ["file", "http"])
def test_hostile_ref_file_on_every_command_that_reads_it(world, tmp_path, transport):
    plan = []
    for i, name in enumerate(REF):
        case = f"ref-{name}"
        url = f"{world['url']}/{case}" if transport == "http" else str(world["www"] / case)
        for label, argv in commands(world, url, 200 + i).items():
            if label in READS_REF or (transport == "file" and label in READS_REFS_INDEX):
                plan.append((argv, FormatError.exit_code, f"{case}/refs/t: "))
    run_matrix(world, tmp_path, plan)


def test_the_intact_repository_works_on_every_command(world, tmp_path):
    """The control: the same commands on an untouched copy succeed (so the errors above come
    from the hostile documents, not from the commands' arguments)."""
    www = world["www"]
    for t in ("file", "http"):
        shutil.copytree(world["root"] / "base", www / f"intact-{t}")
    plan = []
    for t in ("file", "http"):
        url = f"{world['url']}/intact-{t}" if t == "http" else str(www / f"intact-{t}")
        for label, argv in commands(world, url, 300 + len(plan)).items():
            writes = t == "http" and (label in WRITES or label == "template tag")
            plan.append((argv, 2 if writes else 0, "read-only"))
    run_matrix(world, tmp_path, plan)


@pytest.mark.parametrize(
    "case, transport, argv",
    [
        ("meta-features-object", "http", ["template", "show", "--repo", "URL", "t"]),
        ("meta-nested-30000", "file", ["repo", "ls", "--repo", "URL"]),
        ("meta-features-abc", "file", ["repo", "get", "--repo", "URL", "--store", "S", "t"]),
        ("meta-version-true", "http", ["template", "ls", "-l", "--repo", "URL"]),
    ],
)
def test_fresh_vfsd_processes_agree(world, tmp_path, case, transport, argv):
    """A few of the above through the installed console script, from nothing."""
    url = f"{world['url']}/{case}" if transport == "http" else str(world["www"] / case)
    subst = {"URL": url, "S": str(tmp_path / "s")}
    vfsd = str(Path(sys.executable).with_name("vfsd"))
    r = subprocess.run([vfsd, *(subst.get(a, a) for a in argv)], capture_output=True,
                       text=True, timeout=60)  # fmt: skip
    check_one_line(r, 6, f"{case}/vfs-repo.json: ")
