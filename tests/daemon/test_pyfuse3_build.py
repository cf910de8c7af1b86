"""The pyfuse3 in the venv is the build `make` makes (tools/pyfuse3), and vfsd refuses another."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pyfuse3
import pytest

from vfs.daemon import fuse_ops
from vfs.errors import VfsError

BUILD = Path(__file__).resolve().parents[2] / "tools" / "pyfuse3" / "build.py"


def _wanted_version() -> str:
    spec = importlib.util.spec_from_file_location("pyfuse3_build", BUILD)
    assert spec is not None and spec.loader is not None
    build = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(build)
    return build.wanted_version(build.patches())


def test_installed_build_is_the_current_series():
    assert pyfuse3.__version__ == _wanted_version()
    fuse_ops.check_pyfuse3()
    # a second build is a no-op: nothing printed, nothing rebuilt
    r = subprocess.run([sys.executable, str(BUILD)], capture_output=True, text=True, timeout=60)
    assert (r.returncode, r.stdout, r.stderr) == (0, "", "")


@pytest.mark.parametrize(
    "missing",
    [
        "invalidate_inode_async",
        "FileInfo.cache_readdir",
        "Operations.fallocate",
        "Operations.lseek",
    ],
)
def test_vfsd_refuses_an_unpatched_pyfuse3(monkeypatch, missing):
    if missing == "invalidate_inode_async":
        monkeypatch.delattr(pyfuse3, "invalidate_inode_async")
    elif missing == "Operations.fallocate":
        monkeypatch.setattr(pyfuse3.Operations, "fallocate", None)
    elif missing == "Operations.lseek":
        monkeypatch.setattr(pyfuse3.Operations, "lseek", None)
    else:

        class OldFileInfo:  # pyfuse3 3.5's FileInfo has no cache_readdir
            pass

        monkeypatch.setattr(pyfuse3, "FileInfo", OldFileInfo)
    with pytest.raises(VfsError, match=f"not the vfs-patched build.*{missing}.*make setup"):
        fuse_ops.VeeOperations(None)  # type: ignore[arg-type]
