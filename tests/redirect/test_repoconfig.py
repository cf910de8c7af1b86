"""RepoConfig: one object for the repository options, kept in registries and handed to children."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from vfs.errors import UsageError
from vfs.redirect import RepoConfig


def test_json_and_argv_round_trip() -> None:
    cfg = RepoConfig("https://h/r", ca="/ca.pem", cert="/c.pem", key="/c.key", proxy="http://p:1",
                     timeout=3.5, retries=2, min_rate=1024, grace=7)  # fmt: skip
    assert RepoConfig.from_json(cfg.to_json()) == cfg
    assert RepoConfig.from_json("file:///srv/repo") == RepoConfig("file:///srv/repo")
    assert RepoConfig("DIR").to_json() == {"url": "DIR"}  # defaults are not written
    argv = cfg.to_argv()
    assert argv[:2] == ["--repo", "https://h/r"] and "--min-rate" in argv and "--proxy" in argv


def test_argv_makes_the_same_config_through_the_cli_options() -> None:
    import click
    from click.testing import CliRunner

    from vfs.cli.options import repo_options

    seen = []

    @click.command()
    @repo_options
    def cmd(repo):
        seen.append(repo)

    cfg = RepoConfig("https://h/r", ca="/ca.pem", timeout=3.5, retries=0, min_rate=0, grace=1.5)
    r = CliRunner().invoke(cmd, cfg.to_argv())
    assert r.exit_code == 0, r.output
    assert seen == [cfg]


@pytest.mark.parametrize(
    "doc",
    [None, 7, [], {}, {"url": 1}, {"url": "x", "bogus": 1}, {"url": "x", "retries": 1.5},
     {"url": "x", "timeout": "9"}, {"url": "x", "ca": 5}, {"url": "x", "retries": True},
     {"url": "x", "timeout": float("nan")}, {"url": "x", "grace": float("inf")}],
)  # fmt: skip
def test_hostile_documents_are_usage_errors(doc) -> None:
    with pytest.raises(UsageError):
        RepoConfig.from_json(doc)


@given(st.dictionaries(st.sampled_from(["url", "ca", "timeout", "retries", "x"]),
                       st.one_of(st.none(), st.booleans(), st.integers(), st.floats(),
                                 st.text(max_size=8))))  # fmt: skip
def test_any_document_is_a_config_or_a_usage_error(doc) -> None:
    try:
        cfg = RepoConfig.from_json(doc)
    except UsageError:
        return
    assert RepoConfig.from_json(cfg.to_json()) == cfg
