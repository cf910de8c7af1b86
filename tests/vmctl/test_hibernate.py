"""`vmctl hibernate` / `vmctl restore` on real guests (TCG): the guest continues where it was,
no fsynced line is lost, one bundle never gives two guests one disk, and what cannot be
restored is refused before anything is created."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from tests.vmctl.helpers import processes_mentioning, synced_numbers
from tests.vmctl.vimg_helpers import (
    check_clean,
    make_vimg_disk,
    read_vimg_file,
    snapshots,
    vmctl,
    wait_for_synced,
)
from tools.guest import APPEND_LOG, Guest


def _run(root: Path, name: str, disk: Path, guest: Guest, run: str) -> dict:
    r = vmctl(
        "run", name, "--disk", str(disk), "--kernel", str(guest.kernel),
        "--initrd", str(guest.initrd), "--append", guest.append(run),
        "--wait-for", "vfsguest: ready", "--json", root=root,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def _refused(r, text: str) -> None:
    assert r.returncode != 0, r.stdout
    assert text in r.stderr, r.stderr
    assert r.stderr.count("\n") == 1 and "Traceback" not in r.stderr, r.stderr


@pytest.mark.qemu
def test_hibernate_restore_in_another_root_continues(vm_root, tmp_path: Path, guest: Guest):
    root1, root2, root3 = vm_root("r1"), vm_root("r2"), vm_root("r3")
    disk = make_vimg_disk(tmp_path / "disk.vimg")
    _run(root1, "h1", disk, guest, "append,dirty")
    wait_for_synced(root1 / "h1" / "serial.log", 5)

    bundle = tmp_path / "bundle"
    r = vmctl("hibernate", "h1", str(bundle), "--json", root=root1)
    assert r.returncode == 0, r.stderr
    saved = json.loads(r.stdout)
    assert saved["state_bytes"] > 1 << 20
    assert processes_mentioning(root1) == []  # QEMU and the export are gone
    before = synced_numbers((root1 / "h1" / "serial.log").read_text(errors="replace"))
    manifest = json.loads((bundle / "bundle.json").read_text())
    assert manifest["platform"]["machine"].startswith("pc-q35-")
    assert manifest["platform"]["cpu_model"] == "qemu64"
    assert snapshots(disk) == [manifest["disks"][0]["snapshot"]]
    check_clean(disk)

    r = vmctl("restore", str(bundle), "--name", "h2", "--json", root=root2)
    assert r.returncode == 0, r.stderr
    serial2 = root2 / "h2" / "serial.log"
    after = wait_for_synced(serial2, max(before) + 5)
    text2 = serial2.read_text(errors="replace")
    assert "vfsguest: ready" not in text2  # resumed, not rebooted
    assert "CORRUPT" not in text2  # the dirtied memory came back intact
    # The counter goes on from where it was: no number repeats, none skipped (a line cut in
    # two by the pause may be lost from the console, never from the disk: checked below).
    assert after[0] in (max(before) + 1, max(before) + 2), (before[-3:], after[:3])
    assert after == list(range(after[0], after[0] + len(after)))

    # The same bundle again, while the restored guest runs: its disk is in use.
    r = vmctl("restore", str(bundle), "--name", "h3", root=root3)
    _refused(r, "is in use")
    assert not (root3 / "h3").exists() and processes_mentioning(root3) == []

    r = vmctl("stop", "h2", root=root2)
    assert r.returncode == 0, r.stderr
    acked = synced_numbers(serial2.read_text(errors="replace"))

    # ...and after it stopped: its disk has moved on, the saved memory no longer matches.
    r = vmctl("restore", str(bundle), "--name", "h3", root=root3)
    _refused(r, "was written after the hibernate")
    assert not (root3 / "h3").exists()

    check_clean(disk)
    lines = (read_vimg_file(disk, APPEND_LOG) or b"").decode().splitlines()
    assert lines == [f"line {n}" for n in range(1, len(lines) + 1)]
    assert len(lines) >= max(acked)  # every line either guest fsynced is on the disk


@pytest.fixture
def idle_bundle(vm_root, tmp_path: Path, guest: Guest) -> tuple[Path, Path]:
    """A bundle of an idle guest (its disk at tmp_path/idle.vimg)."""
    root = vm_root("src")
    disk = make_vimg_disk(tmp_path / "idle.vimg", size="16M")
    _run(root, "idle", disk, guest, "idle")
    bundle = tmp_path / "idle-bundle"
    r = vmctl("hibernate", "idle", str(bundle), root=root)
    assert r.returncode == 0, r.stderr
    assert "hibernated into" in r.stdout
    return bundle, disk


def _edited(bundle: Path, dest: Path, **platform) -> Path:
    """A copy of ``bundle`` (state file linked) with platform fields changed."""
    dest.mkdir()
    (dest / "state.bin").symlink_to(bundle / "state.bin")
    m = json.loads((bundle / "bundle.json").read_text())
    m["platform"].update(platform)
    (dest / "bundle.json").write_text(json.dumps(m))
    return dest


@pytest.mark.qemu
def test_restore_refuses_what_cannot_be_carried_over(
    vm_root, tmp_path: Path, idle_bundle, guest: Guest
):
    bundle, disk = idle_bundle
    root = vm_root("dst")
    cases = [
        (_edited(bundle, tmp_path / "newer", qemu_version="99.1.0"), [], "is older"),
        (_edited(bundle, tmp_path / "mach", machine="pc-q35-99.9"), [], "does not exist in QEMU"),
        (_edited(bundle, tmp_path / "kvm", accel="kvm", cpu_model="host"), [], "under KVM"),
        (bundle, ["--memory", "512M"], "memory size (MiB) 512 differs"),
        (bundle, ["--cpus", "2"], "vCPU count 2 differs"),
        (bundle, ["--machine", "pc"], "machine type pc differs"),
        (bundle, ["--disk", "disk7=/nowhere.vimg"], "has no disk 'disk7'"),
        (bundle, ["--disk", "disk0"], "wants NODE=PATH"),
        (bundle, ["--kernel", str(tmp_path / "gone")], "does not exist"),
        (tmp_path / "nothing", [], "no bundle at"),
    ]
    other = make_vimg_disk(tmp_path / "other.vimg", size="16M")
    cases.append((bundle, ["--disk", f"disk0={other}"], "is not the disk frozen with this"))
    # A manifest from before content digests: the snapshot checks decide.
    legacy = _edited(bundle, tmp_path / "legacy")
    m = json.loads((legacy / "bundle.json").read_text())
    del m["disks"][0]["content"]
    (legacy / "bundle.json").write_text(json.dumps(m))
    cases.append((legacy, ["--disk", f"disk0={other}"], "has no snapshot"))
    # The manifest names other contents than the disk's (the snapshot is the bundle's).
    wrong = _edited(bundle, tmp_path / "wrong-digest")
    m = json.loads((wrong / "bundle.json").read_text())
    m["disks"][0]["content"]["sha256"] = "0" * 64
    (wrong / "bundle.json").write_text(json.dumps(m))
    cases.append((wrong, [], "was written after the hibernate"))
    damaged = tmp_path / "damaged"
    damaged.mkdir()
    shutil.copy(bundle / "bundle.json", damaged)
    (damaged / "state.bin").write_bytes(b"QEVM" + bytes(100))
    cases.append((damaged, [], "state file damaged or replaced"))
    future = _edited(bundle, tmp_path / "future")
    m = json.loads((future / "bundle.json").read_text())
    m["version"] = 2
    (future / "bundle.json").write_text(json.dumps(m))
    cases.append((future, [], "bundle version 2"))
    for path, args, text in cases:
        r = vmctl("restore", str(path), *args, root=root)
        _refused(r, text)
        assert list(root.iterdir()) == [], (args, text)  # nothing created
    assert processes_mentioning(tmp_path) == []

    # What may change does: the image moved (as to another host), the kernel too.
    moved = tmp_path / "moved" / "disk.vimg"
    moved.parent.mkdir()
    shutil.move(disk, moved)
    kernel = tmp_path / "moved" / "vmlinuz"
    shutil.copy(guest.kernel, kernel)
    _refused(vmctl("restore", str(bundle), root=root), "does not exist")
    r = vmctl("restore", str(bundle), "--disk", f"disk0={moved}", "--kernel", str(kernel),
              "--json", root=root)  # fmt: skip
    assert r.returncode == 0, r.stderr
    status = json.loads(vmctl("status", "idle", "--json", root=root).stdout)
    assert status["state"] == "running", status
    assert status["disks"][0]["path"] == str(moved)
    # A bundle cannot be restored under a name that runs.
    _refused(vmctl("restore", str(bundle), "--disk", f"disk0={moved}", root=root), "already runs")
    assert vmctl("stop", "idle", root=root).returncode == 0


@pytest.mark.qemu
def test_hibernate_refusals_leave_the_guest_running(vm_root, tmp_path: Path, guest: Guest):
    from tools.guest import make_disk

    root = vm_root()
    qcow = make_disk(tmp_path / "d.qcow2", size="16M", fmt="qcow2")
    _run(root, "q", qcow, guest, "idle")
    _refused(vmctl("hibernate", "q", str(tmp_path / "b"), root=root), "vimg disks only")
    assert not (tmp_path / "b").exists()
    vdisk = make_vimg_disk(tmp_path / "v.vimg", size="16M")
    _run(root, "v", vdisk, guest, "idle")
    full = tmp_path / "full"
    full.mkdir()
    (full / "x").write_text("x")
    _refused(vmctl("hibernate", "v", str(full), root=root), "not an empty directory")
    _refused(vmctl("hibernate", "ghost", str(tmp_path / "b"), root=root), "no VM named")
    for name in ("q", "v"):
        status = json.loads(vmctl("status", name, "--json", root=root).stdout)
        assert status["state"] == "running", status
    assert vmctl("stop", "q", root=root).returncode == 0
    assert vmctl("stop", "v", root=root).returncode == 0
    assert snapshots(vdisk) == []
    _refused(vmctl("hibernate", "v", str(tmp_path / "b"), root=root), "is not running")
