"""Fixtures for vmctl's tests: the test guest (built once per session, cached across sessions),
and the rule that vmctl, like vfs, must not log warnings a test did not declare."""

from __future__ import annotations

import logging

import pytest

from tools.guest import Guest, build_guest


@pytest.fixture(scope="session")
def guest() -> Guest:
    """The tools/guest kernel + initramfs (built on first use, ~3 s plus a 27 MB download)."""
    return build_guest()


class _Collector(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@pytest.fixture(autouse=True)
def fail_on_unexpected_vmctl_warnings(request: pytest.FixtureRequest):
    # The suite-wide check (tests/conftest.py) watches the "vfs" logger; vmctl logs as "vmctl".
    collector = _Collector()
    logger = logging.getLogger("vmctl")
    logger.addHandler(collector)
    try:
        yield
    finally:
        logger.removeHandler(collector)
    if collector.records and request.node.get_closest_marker("log_warnings") is None:
        lines = [f"{r.name} {r.levelname}: {r.getMessage()}" for r in collector.records[:5]]
        pytest.fail("vmctl logged unexpected warnings:\n  " + "\n  ".join(lines), pytrace=False)


@pytest.fixture(autouse=True)
def no_qemu_left_behind(request: pytest.FixtureRequest):
    """After every qemu test: no process (QEMU, qemu-nbd) still mentions its tmp_path — every
    one the test started was stopped and reaped, whatever the test did."""
    if request.node.get_closest_marker("qemu") is None:
        yield
        return
    from tests.vmctl.helpers import processes_mentioning

    tmp = request.getfixturevalue("tmp_path")
    yield
    left = processes_mentioning(tmp)
    assert not left, f"processes left running: {left}"
