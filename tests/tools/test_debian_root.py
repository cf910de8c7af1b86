"""tools/debian_root without a build: mirror discovery, the mirror error, dpkg batches."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

from tools.debian_root import DebianRoot, DebianRootError, check_mirror, host_mirrors


def test_host_mirrors_reads_deb822_and_one_line_sources(tmp_path: Path):
    etc = tmp_path / "apt"
    (etc / "sources.list.d").mkdir(parents=True)
    (etc / "sources.list").write_text(
        "# deb http://commented.example/debian bookworm main\n"
        "deb [arch=amd64 signed-by=/k.gpg] http://one.example/debian/ bookworm main contrib\n"
        "deb-src http://src.example/debian bookworm main\n"
        "deb http://one.example/debian bookworm-updates main\n"
    )
    (etc / "sources.list.d" / "debian.sources").write_text(
        "Types: deb\n"
        "# a comment inside the stanza\n"
        "URIs: http://a.example/debian https://b.example/debian\n"
        "Suites: bookworm bookworm-updates\n"
        "Components: main\n"
        "\n"
        "Types: deb\n"
        "URIs: http://security.example/debian-security\n"
        "Suites: bookworm-security\n"
        "Components: main\n"
        "\n"
        "Types: deb\n"
        "URIs: http://off.example/debian\n"
        "Suites: bookworm\n"
        "Components: main\n"
        "Enabled: no\n"
    )
    (etc / "sources.list.d" / "x.sources.disabled").write_text(
        "Types: deb\nURIs: http://disabled.example/d\nSuites: bookworm\nComponents: main\n"
    )
    assert host_mirrors(etc) == [
        "http://one.example/debian",
        "http://a.example/debian",
        "https://b.example/debian",
    ]


def test_unreachable_mirror_is_a_clear_error():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed once the block ends: nothing listens there
    with pytest.raises(DebianRootError, match=r"unreachable.*VFS_DEBIAN_MIRROR"):
        check_mirror(f"http://127.0.0.1:{port}/debian", timeout=5)


def test_dpkg_batches_put_pre_dependencies_first(tmp_path: Path):
    repo = tmp_path / "build" / "repo"
    repo.mkdir(parents=True)
    stanzas = [
        ("a", "Pre-Depends: b (>= 1), libc6 (>= 2.34)"),
        ("b", "Pre-Depends: c | d"),
        ("c", "Depends: a"),
        ("d", ""),
    ]
    (repo / "Packages").write_text(
        "\n".join(
            f"Package: {n}\nVersion: 1\nFilename: ./{n}_1_all.deb\n"
            + (f"{extra}\n" if extra else "")
            + "Description: x\n two lines\n"
            for n, extra in stanzas
        )
    )
    batches = DebianRoot(tmp_path / "build", {}).dpkg_batches()
    assert [[p.name for p in b] for b in batches] == [
        ["c_1_all.deb", "d_1_all.deb"],
        ["b_1_all.deb"],
        ["a_1_all.deb"],
    ]
