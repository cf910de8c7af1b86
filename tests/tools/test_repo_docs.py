"""A repository that stands on its own: what its documents point at is in it.

Someone who clones the project finds every file the README, the docs and the code refer to:
relative links resolve, paths named in backticks exist (or are said to be made by a command),
nothing points outside the repository, and the README's list of apt packages is the Makefile's.
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

# Paths the documents name that a command makes (not kept in git).
GENERATED = {"bench-results/tree.json", ".venv"}
# Where a path in backticks starts, for it to be checked as a path of the repository.
TOP = ("docs/", "tools/", "tests/", "vfs/", "vmctl/", ".ci/")


def _tracked(pattern: str) -> list[Path]:
    out = subprocess.run(
        ["git", "-C", str(ROOT), "ls-files", "--cached", "--others", "--exclude-standard",
         pattern],
        capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    return [ROOT / p for p in out.split()]


def _anchors(md: str) -> set[str]:
    """GitHub's heading anchors: lower case, punctuation dropped, spaces to dashes."""
    out = set()
    for h in re.findall(r"^#+ (.+)$", md, re.M):
        a = re.sub(r"[^\w\- ]", "", h.strip().lower()).replace(" ", "-")
        out.add(a)
    return out


def test_markdown_links_resolve():
    bad = []
    for md in _tracked("*.md"):
        text = md.read_text()
        for target in re.findall(r"\]\(([^)\s]+)\)", text):
            if re.match(r"[a-z]+://|mailto:", target):
                continue
            path, _, anchor = target.partition("#")
            dest = (md.parent / path).resolve() if path else md
            if not dest.exists():
                bad.append(f"{md.relative_to(ROOT)}: {target}")
            elif not dest.is_relative_to(ROOT):
                bad.append(f"{md.relative_to(ROOT)}: {target} is outside the repository")
            elif anchor and dest.suffix == ".md" and anchor not in _anchors(dest.read_text()):
                bad.append(f"{md.relative_to(ROOT)}: {target}: no such heading")
    assert not bad, "\n".join(bad)


def test_paths_named_in_the_readme_and_docs_exist():
    bad = []
    for md in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        for name in re.findall(r"`([\w./-]+)`", md.read_text()):
            name = name.rstrip(".")
            if not name.startswith(TOP) or name in GENERATED or "*" in name:
                continue
            if not (ROOT / name).exists():
                bad.append(f"{md.relative_to(ROOT)}: {name}")
    assert not bad, "\n".join(bad)


def test_nothing_points_outside_the_repository():
    """No ../shared/DESIGN.md, no PERF-NOTES: the design and the measured facts are
    docs/design.md and docs/perf-notes.md."""
    bad = []
    for f in _tracked("*"):
        if f.suffix not in (".md", ".py", ".toml", ".txt", "") or not f.is_file():
            continue
        if f == Path(__file__).resolve():
            continue
        text = f.read_text(errors="replace")
        for needle in ("../shared/", "/work/shared", "PERF-NOTES", "DESIGN.md"):
            if needle in text:
                bad.append(f"{f.relative_to(ROOT)}: {needle}")
    assert not bad, "\n".join(bad)
    assert (ROOT / "docs/design.md").is_file() and (ROOT / "docs/perf-notes.md").is_file()


def test_the_readme_lists_the_packages_the_makefile_installs():
    make = (ROOT / "Makefile").read_text()
    packages = []
    for var in ("BASE_PACKAGES", "APT_PACKAGES"):
        m = re.search(rf"^{var} := ((?:.*\\\n)*.*)$", make, re.M)
        assert m, var
        packages += m.group(1).replace("\\\n", " ").split()
    readme = (ROOT / "README.md").read_text()
    m = re.search(r"`APT_PACKAGES` list\s+\(([^)]*)\)", readme)
    assert m, "README: the package list after `APT_PACKAGES` list (...)"
    listed = [p.strip() for p in m.group(1).replace("\n", " ").split(",")]
    assert listed == packages
    for needed in ("python3-venv", "gcc", "python3-dev"):  # a fresh Debian 12 lacks them
        assert needed in packages
