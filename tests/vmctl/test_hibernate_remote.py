"""Restore onto an image pushed to a repository (nginx on 127.0.0.1) and pulled, metadata
only, on another "host": its clusters are fetched on demand by the disk's export. The bundle
ties the saved memory to the disk's contents, not to a path or the image's structure: the
pulled image (remote clusters, no snapshot) is accepted, a copy differing in one cluster is
refused before anything starts."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from tests.vmctl.helpers import processes_mentioning, synced_numbers
from tests.vmctl.vimg_helpers import make_vimg_disk, vimg, vmctl, wait_for_synced
from tools.guest import APPEND_LOG, Guest, read_disk_file


def _refused(r, text: str) -> None:
    assert r.returncode != 0, r.stdout
    assert text in r.stderr, r.stderr
    assert r.stderr.count("\n") == 1 and "Traceback" not in r.stderr, r.stderr


def _remote_lines(image: Path, repo: str, store: Path) -> list[str]:
    """The guest's log on ``image``, its remote clusters fetched from ``repo``."""
    raw = image.with_suffix(".readback.raw")
    try:
        vimg("convert", "--repo", repo, "--store", str(store), "-O", "raw", str(image), str(raw))
        return (read_disk_file(raw, APPEND_LOG, fmt="raw") or b"").decode().splitlines()
    finally:
        raw.unlink(missing_ok=True)


@pytest.mark.qemu
@pytest.mark.network
def test_restore_onto_a_pushed_image_fetched_on_demand(vm_root, tmp_path: Path, guest: Guest,
                                                       nginx, nginx_repo):  # fmt: skip
    repo_dir, repo_name = nginx_repo
    url = nginx.url(repo_name, "http")
    root_a, root_b = vm_root("host-a"), vm_root("host-b")
    (tmp_path / "a").mkdir()
    host_b = tmp_path / "b"
    host_b.mkdir()
    disk = make_vimg_disk(tmp_path / "a" / "disk.vimg")
    r = vmctl("run", "h", "--disk", str(disk), "--kernel", str(guest.kernel),
              "--initrd", str(guest.initrd), "--append", guest.append("append"),
              "--wait-for", "vfsguest: ready", root=root_a)  # fmt: skip
    assert r.returncode == 0, r.stderr
    wait_for_synced(root_a / "h" / "serial.log", 5)
    bundle = tmp_path / "bundle"
    r = vmctl("hibernate", "h", str(bundle), root=root_a)
    assert r.returncode == 0, r.stderr
    before = synced_numbers((root_a / "h" / "serial.log").read_text(errors="replace"))
    content = json.loads((bundle / "bundle.json").read_text())["disks"][0]["content"]
    assert content["algorithm"] == "vmctl-disk-sha256-v1" and len(content["sha256"]) == 64

    # Host A publishes the frozen disk; host B pulls its metadata only (no snapshot, every
    # cluster remote) over HTTP.
    vimg("push", "-q", str(disk), "--repo", f"file://{repo_dir}", "--ref", "vm-h-disk0")
    pulled = host_b / "disk.vimg"
    vimg("pull", "-q", "--ref", "vm-h-disk0", "--lazy", "--repo", url, str(pulled))
    assert pulled.stat().st_size < 2 << 20
    assert json.loads(vimg("snapshot", "-l", "--json", str(pulled)).stdout) == []
    store = host_b / "store"

    # The same metadata with one cluster of other content: not the frozen disk.
    changed = host_b / "changed.vimg"
    shutil.copy(pulled, changed)
    vimg("io", "--repo", url, "--store", str(host_b / "scratch"), str(changed),
         "-c", "write -P 0x77 60M 64k")  # fmt: skip
    r = vmctl("restore", str(bundle), "--disk", f"disk0={changed}", "--repo", url,
              "--store", str(store), root=root_b)  # fmt: skip
    _refused(r, "is not the disk frozen with this bundle")
    assert list(root_b.iterdir()) == [] and processes_mentioning(root_b) == []

    r = vmctl("restore", str(bundle), "--disk", f"disk0={pulled}", "--repo", url,
              "--store", str(store), "--json", root=root_b)  # fmt: skip
    assert r.returncode == 0, r.stderr
    serial = root_b / "h" / "serial.log"
    after = wait_for_synced(serial, max(before) + 5)
    assert "vfsguest: ready" not in serial.read_text(errors="replace")  # resumed, not rebooted
    assert after[0] in (max(before) + 1, max(before) + 2), (before[-3:], after[:3])
    assert after == list(range(after[0], after[0] + len(after)))
    from vfs.export.client import ExportControl

    st = ExportControl(root_b / "h" / "d0.nbd.ctl").status()
    pushed = sum(1 for _ in (repo_dir / "objects").rglob("*") if _.is_file())
    # On demand: what the guest touched came from the repository, not the whole disk.
    assert 0 < st["fetched_objects"] < pushed, (st, pushed)

    assert vmctl("stop", "h", root=root_b).returncode == 0
    acked = synced_numbers(serial.read_text(errors="replace"))
    lines = _remote_lines(pulled, url, store)
    assert lines == [f"line {n}" for n in range(1, len(lines) + 1)]
    assert len(lines) >= max(acked)  # every line the restored guest fsynced
    # Written since: the pulled image no longer matches the saved memory.
    r = vmctl("restore", str(bundle), "--disk", f"disk0={pulled}", "--name", "h2", "--repo", url,
              root=root_b)  # fmt: skip
    _refused(r, "is not the disk frozen with this bundle")

    # The same image boots cold with `vmctl run --repo` (a fresh store: fetched again).
    r = vmctl("run", "cold", "--disk", str(pulled), "--kernel", str(guest.kernel),
              "--initrd", str(guest.initrd), "--append", guest.append("idle"),
              "--repo", url, "--store", str(host_b / "store2"), "--wait-for", "vfsguest: ready",
              root=root_b)  # fmt: skip
    assert r.returncode == 0, r.stderr
    st = ExportControl(root_b / "cold" / "d0.nbd.ctl").status()
    assert st["fetched_objects"] > 0, st
    assert vmctl("stop", "cold", root=root_b).returncode == 0
