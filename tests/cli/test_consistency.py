"""One CLI, consistent: every command of vfsd, vimg and vmctl, walked.

Each command's ``--help`` works and documents every option; the shared options (the
repository and how to reach it, ``--store``, ``--state``) come from the one definition in
:mod:`vfs.cli.options` wherever they appear; ``--json`` is the same flag everywhere and is
there on every command a script reads; a bad flag is one line and exit 2 on every command; a
closed stdout ends a command quietly; and the README's exit-code table lists exactly the codes
the error classes and the CLI edge produce.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import click
import pytest
from click.testing import CliRunner

import vfs.errors
import vmctl.cli
import vmctl.errors
from vfs.cli.edge import EXIT_BROKEN_PIPE, EXIT_INTERRUPTED
from vfs.cli.options import STORE_HELP, repo_options, state_option, store_option
from vfs.cli.vfsd import main as vfsd_main
from vfs.cli.vimg import main as vimg_main

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent

MAINS = {"vfsd": vfsd_main, "vimg": vimg_main, "vmctl": vmctl.cli.main}
REPO_SET = ("--repo", "--ca", "--cert", "--key", "--proxy", "--timeout", "--retries",
            "--min-rate", "--grace")  # fmt: skip

# Commands with a --repo that is not opened over the network (so without the TLS/deadline
# options), and why: the README says the same.
OWN_REPO = {
    "vfsd repo gc": "a repository directory only; its --grace is the gc's grace period",
    "vfsd store root add": "recorded in the root for information, never opened",
}
#: Commands whose own --timeout means something else (vmctl's: seconds for QMP and start-up):
#: the repository's per-operation timeout is --repo-timeout there, the same option otherwise.
REPO_TIMEOUT = "--repo-timeout"

# Commands without --json, and why (everything else that prints has it).
NO_JSON = {
    "vfsd fetch": "hidden test helper, prints nothing",
    "vfsd export flush": "prints nothing",
    "vfsd export run": "a foreground server: logs, no result",
    "vfsd export stop": "prints nothing",
    "vfsd repo init": "prints the path it created",
    "vfsd repo ref": "prints one object id",
    "vfsd serve": "a daemon: logs, no result",
    "vfsd store cat": "the object's bytes",
    "vfsd store init": "a one-line summary of the settings given",
    "vfsd template export": "a tar stream",
    "vimg bench": "qemu-img bench's report",
    "vimg commit": "qemu-img's one line",
    "vimg compare": "qemu-img's one line; the result is the exit code",
    "vimg convert": "qemu-img's progress only",
    "vimg create": "qemu-img's one line",
    "vimg hydrate": "a one-line summary; progress on stderr",
    "vimg io": "qemu-io's output",
    "vimg pull": "a one-line summary; progress on stderr",
    "vimg push": "a one-line summary; progress on stderr",
    "vimg rebase": "qemu-img's silence",
    "vimg resize": "qemu-img's one line",
    "vimg vmstate": "the state's bytes, or nothing",
    "vmctl console": "the guest's console",
    "vmctl stop": "prints nothing",
}


def _commands():
    out = []

    def walk(cmd: click.Command, path: list[str]) -> None:
        out.append((" ".join(path), cmd))
        if isinstance(cmd, click.Group):
            for name, sub in sorted(cmd.commands.items()):
                walk(sub, [*path, name])

    for prog, m in MAINS.items():
        walk(m, [prog])
    return out


COMMANDS = _commands()
LEAVES = [(p, c) for p, c in COMMANDS if not isinstance(c, click.Group)]


def _options(cmd: click.Command) -> dict[str, click.Option]:
    return {
        o: p
        for p in cmd.params
        if isinstance(p, click.Option) and not p.hidden
        for o in (*p.opts, *p.secondary_opts)
        if o.startswith("--")
    }


def _reference(decorator) -> dict[str, click.Option]:
    @click.command()
    @decorator
    def ref(**kw):  # pragma: no cover - only its parameters are looked at
        pass

    return _options(ref)


REF_REPO = _reference(repo_options(required=False))
REF_STORE = _reference(store_option())
REF_STATE = _reference(state_option)


def _same(
    a: click.Option, b: click.Option, *, help_too: bool = True, names_too: bool = True
) -> bool:
    """The same option as a program and a user see it: names, type, metavar, default, flag
    (and help)."""
    da, db = a.to_info_dict(), b.to_info_dict()
    keys = (set(da) | set(db)) - {"name"}  # the parameter a command receives may differ
    if not help_too:
        keys.discard("help")
    if not names_too:
        keys.discard("opts")
    return {k: da.get(k) for k in keys} == {k: db.get(k) for k in keys} and (a.metavar == b.metavar)


def invoke(path: str, *args: str):
    prog, *words = path.split()
    return CliRunner().invoke(MAINS[prog], [*words, *args], prog_name=prog)


def test_the_walk_finds_every_command():
    names = {p for p, _ in COMMANDS}
    assert {"vfsd template rm", "vfsd repo gc", "vfsd store root add", "vimg check",
            "vmctl run"} <= names  # fmt: skip
    assert len(LEAVES) > 50
    stale = (set(OWN_REPO) | set(NO_JSON)) - names
    assert not stale, f"exceptions for commands that are gone: {stale}"


@pytest.mark.parametrize("path,cmd", COMMANDS, ids=[p for p, _ in COMMANDS])
def test_help_documents_every_option(path: str, cmd: click.Command):
    for flag in ("--help", "-h"):
        r = invoke(path, flag)
        assert r.exit_code == 0, (path, r.output)
        assert r.stdout.startswith(f"Usage: {path}"), r.stdout[:200]
    assert (cmd.help or "").strip(), f"{path}: no description"
    for o in cmd.params:
        if isinstance(o, click.Option) and not o.hidden and o.name != "help":
            assert (o.help or "").strip(), f"{path} {o.opts}: option without help"


@pytest.mark.parametrize("path,cmd", LEAVES, ids=[p for p, _ in LEAVES])
def test_shared_options_come_from_the_one_definition(path: str, cmd: click.Command):
    opts = _options(cmd)
    assert "--remote" not in opts, f"{path}: --remote is called --repo"
    if "--repo" in opts and path not in OWN_REPO:
        renamed = {"--timeout": REPO_TIMEOUT} if REPO_TIMEOUT in opts else {}
        missing = [o for o in REPO_SET if renamed.get(o, o) not in opts]
        assert not missing, f"{path}: --repo without {missing}"
        for o in REPO_SET:  # --repo's own help may say what the repository is for
            assert _same(opts[renamed.get(o, o)], REF_REPO[o], help_too=o != "--repo",
                         names_too=o not in renamed), (path, o)  # fmt: skip
    elif path not in OWN_REPO:
        stray = [o for o in REPO_SET[1:] if o in opts and o not in ("--timeout", "--grace")]
        assert not stray, f"{path}: {stray} without --repo"
    if "--store" in opts:
        s = opts["--store"]
        assert _same(s, REF_STORE["--store"], help_too=False), path
        assert s.help == STORE_HELP or "store" in s.help, (path, s.help)
    if "--state" in opts:
        assert _same(opts["--state"], REF_STATE["--state"]), path
    if "--json" in opts:
        j = opts["--json"]
        assert j.is_flag and j.opts == ["--json"] and j.name == "as_json", path
    elif path not in NO_JSON:
        pytest.fail(f"{path}: no --json (or say why in NO_JSON)")


@pytest.mark.parametrize("path,cmd", LEAVES, ids=[p for p, _ in LEAVES])
def test_a_bad_flag_is_one_line_and_exit_2(path: str, cmd: click.Command):
    r = invoke(path, "--no-such-flag")
    prog = path.split()[0]
    assert r.exit_code == 2, (path, r.exit_code, r.output)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    assert lines[0].startswith(f"{prog}: error: "), lines[0]
    assert lines[0].endswith(f"(see '{path} --help')"), lines[0]
    if path != "vimg resize":  # takes '-1G' as SIZE: unknown options are arguments there
        assert "No such option" in lines[0] and "--no-such-flag" in lines[0], lines[0]
    assert r.stdout == ""


@pytest.mark.parametrize("prog", sorted(MAINS))
def test_a_group_without_a_command_shows_its_help_and_exits_2(prog: str):
    r = invoke(prog)
    assert r.exit_code == 2 and "Commands:" in r.stderr and r.stdout == ""


def _exit_codes() -> dict[int, list[str]]:
    codes: dict[int, list[str]] = {}
    todo = [vfs.errors.VfsError]
    assert vmctl.errors.VmError.__mro__[1] is vfs.errors.VfsError
    while todo:
        c = todo.pop()
        todo.extend(c.__subclasses__())
        if c is vfs.errors.ControlError:
            continue  # carries the daemon's code, one of the others
        codes.setdefault(c.exit_code, []).append(c.__name__)
    codes[EXIT_INTERRUPTED] = ["Ctrl-C"]
    codes[EXIT_BROKEN_PIPE] = ["closed stdout"]
    return codes


def test_the_readme_lists_every_exit_code():
    text = (ROOT / "README.md").read_text()
    section = text.split("## Command lines", 1)[1].split("\n## ", 1)[0]
    table = {int(m.group(1)) for m in re.finditer(r"^\| (\d+) \|", section, re.M)}
    codes = _exit_codes()
    assert table - {0} == set(codes), (
        f"README lists {sorted(table)}; the error classes and the edge give {sorted(codes)}"
    )


def test_a_closed_stdout_ends_the_command_quietly(tmp_path: Path):
    """`vfsd template show | head -1` on a template with thousands of entries: the reader goes
    away after one line; vfsd stops with 141 and says nothing (not "error: Broken pipe")."""
    src = tmp_path / "src"
    src.mkdir()
    for i in range(3000):
        (src / f"file-{i:05d}-with-a-long-name").write_bytes(b"")
    repo = tmp_path / "repo"
    vfsd = str(BIN / "vfsd")
    subprocess.run([vfsd, "repo", "init", str(repo)], check=True, capture_output=True)
    subprocess.run([vfsd, "template", "publish", str(src), "--repo", str(repo), "--name", "big"],
                   check=True, capture_output=True)  # fmt: skip
    for args in (["template", "show", "big"], ["template", "show", "big", "--json"]):
        p = subprocess.Popen([vfsd, *args, "--repo", str(repo)], stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE)  # fmt: skip
        assert p.stdout is not None and p.stderr is not None
        first = p.stdout.readline()
        p.stdout.close()  # as head does after its line
        err = p.stderr.read()
        rc = p.wait(timeout=60)
        assert first
        assert rc == EXIT_BROKEN_PIPE, (args, rc, err)
        assert err == b"", err


def test_vfsd_serve_remote_is_the_old_name_of_repo(tmp_path: Path):
    """--remote still works for scripts written against it, and says it is now --repo; the
    help shows --repo only. (The daemon itself is not started: the mount is missing.)"""
    r = invoke("vfsd serve", "--remote", str(tmp_path), "--mount", str(tmp_path / "nope"),
               "--state", str(tmp_path / "state"))  # fmt: skip
    assert "--remote is now called --repo" in r.stderr
    assert "--remote" not in invoke("vfsd serve", "--help").stdout
    r = invoke("vfsd serve", "--remote", "a", "--repo", "b", "--mount", str(tmp_path))
    assert r.exit_code == 2 and "give one" in r.stderr.splitlines()[-1]


def test_error_exit_codes_of_real_processes(tmp_path: Path):
    """Exit codes from the error classes, seen by a shell: not found 4, usage 2, no daemon 3,
    template diff --exit-code 1 (a result: no error line)."""
    vfsd = str(BIN / "vfsd")
    env = {**os.environ, "VFS_ROOT": str(tmp_path / "root")}

    def run(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([vfsd, *args], capture_output=True, text=True, env=env)

    repo = tmp_path / "repo"
    assert run("repo", "init", str(repo)).returncode == 0
    r = run("template", "show", "nope", "--repo", str(repo))
    assert r.returncode == 4 and r.stderr.startswith("vfsd: error: ") and r.stderr.count("\n") == 1
    r = run("repo", "get", "--repo", str(repo), "--ca", "x.pem", "nope")
    assert r.returncode == 2 and r.stderr.count("\n") == 1, r.stderr
    r = run("vee", "list", "--state", str(tmp_path / "state"))
    assert r.returncode == 3 and r.stderr.count("\n") == 1, r.stderr
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "f").write_bytes(b"f")
    for d in ("a", "b"):  # the roots differ only by f, not by when they were made
        os.utime(tmp_path / d, ns=(1_700_000_000 * 10**9, 1_700_000_000 * 10**9))
    da = run("template", "publish", str(tmp_path / "a"), "--repo", str(repo)).stdout.strip()
    db = run("template", "publish", str(tmp_path / "b"), "--repo", str(repo)).stdout.strip()
    r = run("template", "diff", da, db, "--repo", str(repo), "--exit-code")
    assert r.returncode == 1 and r.stdout == "+ f\n" and r.stderr == "", r
    assert run("template", "diff", da, da, "--repo", str(repo), "--exit-code").returncode == 0
