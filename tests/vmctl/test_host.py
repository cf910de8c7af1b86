"""`vmctl host` reports the accelerator from the real host, and QEMU agrees it can start."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from vmctl.cli import probe_host


@pytest.mark.qemu
def test_probe_matches_a_real_qemu_start():
    info = probe_host()
    assert info["qemu"], "make test installs qemu-system-x86"
    # The accelerator we pick must let QEMU start (and quit at once) on this host.
    r = subprocess.run(
        [info["qemu"], "-accel", info["accelerator"], "-M", "q35", "-display", "none",
         "-nodefaults", "-S", "-no-reboot", "-monitor", "none", "-serial", "none",
         "-device", "isa-debug-exit", "-qmp", "stdio"],
        input='{"execute":"qmp_capabilities"}\n{"execute":"quit"}\n',
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert '"return"' in r.stdout


def test_cli_json():
    r = subprocess.run(
        [sys.executable, "-c", "from vmctl.cli import main; main()", "host", "--json"],
        capture_output=True,
        text=True,
    )
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["accelerator"] in ("kvm", "tcg")
