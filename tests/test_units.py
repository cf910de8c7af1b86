"""Sizes and durations as people write them: one parser for every command line and ``vimg io``."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from vfs.errors import UsageError
from vfs.units import parse_duration, parse_size


@pytest.mark.parametrize(
    ("text", "value"),
    [("512", 512), ("64k", 64 << 10), ("1M", 1 << 20), ("1MiB", 1 << 20), ("10G", 10 << 30),
     ("1.5k", 1536), (" 2m ", 2 << 20), ("0", 0)],
)  # fmt: skip
def test_sizes(text: str, value: int) -> None:
    assert parse_size(text) == value


@pytest.mark.parametrize("text", ["", "k", "-1", "+1", "nan", "inf", "1x", "1e400", "99999999P"])
def test_bad_sizes_are_usage_errors(text: str) -> None:
    with pytest.raises(UsageError):
        parse_size(text)


@pytest.mark.parametrize(("text", "value"), [("90", 90), ("90s", 90), ("10m", 600), ("7d", 604800)])
def test_durations(text: str, value: float) -> None:
    assert parse_duration(text) == value


@given(st.text(max_size=12))
def test_any_text_is_a_size_or_a_usage_error(text: str) -> None:
    try:
        n = parse_size(text)
    except UsageError:
        return
    assert 0 <= n <= 1 << 63


@given(st.text(max_size=12))
def test_any_text_is_a_duration_or_a_usage_error(text: str) -> None:
    try:
        d = parse_duration(text)
    except UsageError:
        return
    assert d >= 0
