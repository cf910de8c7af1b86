"""Fixtures for vmctl's tests: the test guest (built once per session, cached across sessions),
and no QEMU left behind (the rule on undeclared warnings is suite-wide: tests/conftest.py)."""

from __future__ import annotations

from pathlib import Path

import pytest
import trio

from tools.guest import Guest, build_guest


@pytest.fixture(scope="session")
def guest() -> Guest:
    """The tools/guest kernel + initramfs (built on first use, ~3 s plus a 27 MB download)."""
    return build_guest()


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


@pytest.fixture
def vm_root(tmp_path: Path):
    """A state root; whatever a failing test left running in it (QEMU, exports) is stopped."""
    from tests.vmctl.helpers import processes_mentioning
    from vmctl.lifecycle import stop_vm
    from vmctl.qemu import VmPaths

    roots: list[Path] = []

    def make(name: str = "vms") -> Path:
        r = tmp_path / name
        r.mkdir(exist_ok=True)
        roots.append(r)
        return r

    yield make
    for r in roots:
        for d in r.iterdir():
            if d.is_dir():
                trio.run(lambda d=d: stop_vm(VmPaths(d), force=True))
        assert processes_mentioning(r) == []
