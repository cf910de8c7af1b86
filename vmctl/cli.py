"""`vmctl`: a thin launcher of QEMU guests on vimg images.

``host`` says what a guest would get here (KVM or TCG, and why). ``run`` starts a guest on
vimg disks (each served by a ``vfsd export`` over NBD) or raw/qcow2 files and returns once it
is running (QEMU and the exports keep running after vmctl exits); ``list``, ``status``, ``stop``
and ``console`` find it again through its state directory (``--root``, ``$VMCTL_ROOT``, default
``$VFS_ROOT/vmctl``). ``hibernate`` saves a running guest into a bundle and ``restore`` brings
it back (:mod:`vmctl.hibernate`).
"""

from __future__ import annotations

import sys
from pathlib import Path

import click
import trio

from vfs.cli.edge import (
    OneLineErrorGroup,
    emit_json,
    handle_errors,
    json_option,
    setup_logging,
)
from vfs.cli.options import repo_options, store_option
from vfs.errors import NotFound
from vfs.redirect.repoconfig import RepoConfig
from vfs.units import parse_size
from vmctl.errors import VmError
from vmctl.host import probe_host

__all__ = ["main", "probe_host"]

root_option = click.option(
    "--root",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="State root holding one directory per VM (default $VMCTL_ROOT or $VFS_ROOT/vmctl).",
)


def _root(root: Path | None) -> Path:
    from vmctl.vms import default_root

    return root or default_root()


@click.group(cls=OneLineErrorGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("-v", "--verbose", count=True, help="More logging (-vv for debug).")
def main(verbose: int) -> None:
    """Launch QEMU guests on vimg disks and find them again (run, list, status, stop, console,
    host); save and bring them back (hibernate, restore); move them live (migrate)."""
    setup_logging(verbose)


@main.command()
@json_option
@handle_errors
def host(as_json: bool) -> None:
    """Show what this host offers guests: QEMU version and the accelerator (kvm or tcg)."""
    info = probe_host()
    if as_json:
        emit_json(info)
        return
    click.echo(f"qemu:        {info['qemu_version'] or 'not installed'}")
    click.echo(
        f"/dev/kvm:    {'present' if info['dev_kvm'] else 'absent'}"
        f" ({', '.join(info['kvm_modules']) or 'no kvm module'})"
    )
    click.echo(f"accelerator: {info['accelerator']} ({info['reason']})")


@main.command()
@click.argument("name")
@click.option(
    "--disk",
    "disks",
    multiple=True,
    type=click.Path(path_type=Path),
    help="A vimg (served by a vfsd export over NBD), raw or qcow2 image: the guest's next "
    "virtio disk (repeatable).",
)
@click.option(
    "--kernel",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="Boot this kernel directly (no firmware boot from disk).",
)
@click.option(
    "--initrd",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="Initial ram disk for --kernel.",
)
@click.option("--append", help="Kernel command line (with --kernel).")
@click.option("--memory", default="256M", show_default=True, help="Guest memory (e.g. 512M, 1G).")
@click.option("--cpus", default=1, show_default=True, type=int, help="Virtual CPUs.")
@click.option(
    "--machine",
    default="q35",
    show_default=True,
    type=click.Choice(["q35", "pc"]),
    help="QEMU machine type.",
)
@click.option(
    "--wait-for",
    metavar="REGEX",
    help="Return only once the guest printed a line matching REGEX on its console.",
)
@repo_options(
    required=False,
    help="Repository the vimg disks' remote clusters are fetched from on demand (an image "
    "pulled with `vimg pull --ref --lazy`).",
    timeout_flag="--repo-timeout",
)
@store_option("Local object store for the fetched clusters (the host's by default).", param="store")
@click.option(
    "--timeout",
    default=120.0,
    show_default=True,
    help="Seconds to wait for QMP and for --wait-for.",
)
@root_option
@json_option
@handle_errors
def run(name: str, disks: tuple[Path, ...], kernel: Path | None, initrd: Path | None,
        append: str | None, memory: str, cpus: int, machine: str, wait_for: str | None,
        repo: RepoConfig | None, store: Path | None, timeout: float, root: Path | None,
        as_json: bool) -> None:  # fmt: skip
    """Start guest NAME; return once it runs (QEMU stays up after vmctl exits)."""
    from vmctl.disks import open_disk
    from vmctl.lifecycle import start_vm
    from vmctl.machine import MachineSpec
    from vmctl.vms import vm_paths

    memory_mib = parse_size(memory) >> 20
    paths = vm_paths(_root(root), name)
    spec = MachineSpec(name, memory_mib=memory_mib, cpus=cpus, machine=machine, kernel=kernel,
                       initrd=initrd, append=append,
                       disks=[open_disk(d, i, paths.dir) for i, d in enumerate(disks)])  # fmt: skip
    from vmctl.exports import VimgDisk

    for d in spec.disks:
        if isinstance(d, VimgDisk):
            d.repo = repo.with_absolute_paths() if repo else None
            d.store = str(store.absolute()) if store else ""
    info = trio.run(lambda: start_vm(spec, paths, marker=wait_for, timeout=timeout))
    if as_json:
        emit_json(info)
    else:
        click.echo(f"{name}: running (pid {info['pid']}, {info['accel']}: {info['accel_reason']})")


@main.command(name="list")
@root_option
@json_option
@handle_errors
def list_(root: Path | None, as_json: bool) -> None:
    """List the VMs of the state root and whether they run."""
    from vmctl.vms import list_vms

    vms = list_vms(_root(root))
    if as_json:
        emit_json(vms)
        return
    for vm in vms:
        pid = f"pid {vm['pid']}" if vm["pid"] else ""
        click.echo(f"{vm['name']:24} {vm['state']:8} {pid}")


@main.command()
@click.argument("name")
@root_option
@json_option
@handle_errors
def status(name: str, root: Path | None, as_json: bool) -> None:
    """Show one VM: its run state (from QEMU), accelerator and why, disks, paths."""
    from vmctl.vms import vm_status

    info = trio.run(vm_status, _root(root), name)
    if as_json:
        emit_json(info)
        return
    for key in ("name", "state", "pid", "accel", "accel_reason", "memory_mib", "cpus",
                "machine", "state_dir", "serial_log"):  # fmt: skip
        click.echo(f"{key + ':':14} {info.get(key)}")
    if info.get("netns"):
        click.echo(f"{'netns:':14} {info['netns']}")
    for disk in info.get("disks") or []:
        click.echo(
            f"{'disk:':14} {disk.get('node')} {disk.get('format', '')} {disk.get('path', '')}"
        )


@main.command()
@click.argument("name")
@click.option("--force", is_flag=True, help="Do not ask the guest's QEMU to quit: kill it.")
@click.option("--timeout", default=20.0, show_default=True, help="Seconds to wait for quit.")
@root_option
@handle_errors
def stop(name: str, force: bool, timeout: float, root: Path | None) -> None:
    """Stop VM NAME: quit over QMP, then SIGTERM, then SIGKILL (--force: kill at once); then
    its disks' exports."""
    from vmctl.lifecycle import stop_vm
    from vmctl.vms import vm_paths

    paths = vm_paths(_root(root), name)
    if not paths.spec.exists():
        raise NotFound(f"no VM named {name!r} in {_root(root)}")
    if not trio.run(lambda: stop_vm(paths, force=force, timeout=timeout)):
        raise VmError(f"VM {name!r} is not running")
    click.echo(f"{name}: stopped")


@main.command()
@click.argument("name")
@click.option(
    "--follow/--no-follow",
    default=True,
    show_default=True,
    help="Keep printing what the guest prints until it stops.",
)
@root_option
@handle_errors
def console(name: str, follow: bool, root: Path | None) -> None:
    """Print VM NAME's serial console (and follow it)."""
    from vmctl.vms import follow_serial, vm_paths

    paths = vm_paths(_root(root), name)
    if not paths.spec.exists():
        raise NotFound(f"no VM named {name!r} in {_root(root)}")
    trio.run(lambda: follow_serial(paths, sys.stdout.buffer, follow=follow))


@main.command()
@click.argument("name")
@click.argument("bundle", type=click.Path(path_type=Path))
@click.option("--timeout", default=600.0, show_default=True, help="Seconds for the state save.")
@root_option
@json_option
@handle_errors
def hibernate(name: str, bundle: Path, timeout: float, root: Path | None, as_json: bool) -> None:
    """Save running VM NAME into BUNDLE (a new directory) and stop it.

    The guest is paused, its memory and device state written to BUNDLE, each disk (vimg only)
    frozen as a snapshot bound to that state, then QEMU stopped. `vmctl restore BUNDLE` brings
    it back, here or on another host.
    """
    from vmctl.hibernate import hibernate as do_hibernate

    info = trio.run(lambda: do_hibernate(_root(root), name, bundle, timeout=timeout))
    if as_json:
        emit_json(info)
    else:
        click.echo(
            f"{name}: hibernated into {info['bundle']} ({info['state_bytes'] >> 20} MiB of state, "
            f"saved in {info['save_s']:.2f}s)"
        )


def _moves(values: tuple[str, ...]) -> dict[str, Path]:
    from vfs.errors import UsageError

    out: dict[str, Path] = {}
    for v in values:
        node, sep, path = v.partition("=")
        if not sep or not node or not path:
            raise UsageError(f"--disk wants NODE=PATH (e.g. disk0=/images/web.vimg), not {v!r}")
        out[node] = Path(path).absolute()
    return out


@main.command()
@click.argument("bundle", type=click.Path(path_type=Path))
@click.option("--name", help="Name of the restored VM [default: the saved one's].")
@click.option(
    "--disk",
    "disks",
    multiple=True,
    metavar="NODE=PATH",
    help="The image of disk NODE is now at PATH (moved or copied; repeatable).",
)
@click.option("--kernel", type=click.Path(path_type=Path), help="The saved guest's kernel moved.")
@click.option("--initrd", type=click.Path(path_type=Path), help="Its initrd moved.")
@click.option("--memory", help="Must equal the saved guest's memory (checked, not changed).")
@click.option("--cpus", type=int, help="Must equal the saved guest's vCPU count.")
@click.option("--machine", help="Must equal the saved guest's machine type.")
@repo_options(
    required=False,
    help="Repository the disks' remote clusters are fetched from on demand (file:///dir, "
    "http://...): an image pushed there (vimg push) and pulled here with --lazy.",
    timeout_flag="--repo-timeout",
)
@store_option(
    "Local object store the fetched clusters are kept in (the host's by default).", param="store"
)
@click.option("--timeout", default=600.0, show_default=True, help="Seconds for start and load.")
@root_option
@json_option
@handle_errors
def restore(bundle: Path, name: str | None, disks: tuple[str, ...], kernel: Path | None,
            initrd: Path | None, memory: str | None, cpus: int | None, machine: str | None,
            repo: RepoConfig | None, store: Path | None, timeout: float, root: Path | None,
            as_json: bool) -> None:  # fmt: skip
    """Bring back the guest hibernated into BUNDLE; return once it runs.

    Refuses, before touching anything, what QEMU could not load (another QEMU that is older,
    machine type, memory, vCPUs, devices) and a disk that is not the one frozen with the
    state or was written since (so two guests never write one disk from one bundle).
    """
    from vmctl.hibernate import restore as do_restore

    overrides = {"kernel": kernel, "initrd": initrd, "cpus": cpus, "machine": machine,
                 "repo": repo, "store": store,
                 "memory_mib": parse_size(memory) >> 20 if memory else None}  # fmt: skip
    info = trio.run(lambda: do_restore(bundle, root=_root(root), name=name, moves=_moves(disks),
                                       timeout=timeout, **overrides))  # fmt: skip
    if as_json:
        emit_json(info)
    else:
        click.echo(
            f"{info['name']}: restored from {info['bundle']} in {info['restore_s']:.2f}s "
            f"(pid {info['pid']}, {info['accel']})"
        )


@main.command()
@click.argument("name")
@click.option(
    "--to",
    "dest",
    required=True,
    type=click.Path(file_okay=False, path_type=Path),
    help="The destination state root (another host's, or another root here).",
)
@click.option("--bandwidth", default="1G", show_default=True, help="RAM pre-copy bytes/second.")
@click.option(
    "--downtime-ms", default=100, show_default=True, help="Pause QEMU may aim for at the switch."
)
@click.option(
    "--precopy-timeout",
    default=30.0,
    show_default=True,
    help="Seconds of RAM pre-copy before a guest that does not converge is stopped and copied.",
)
@click.option(
    "--postcopy",
    is_flag=True,
    help="A guest that does not converge switches to post-copy instead of stop-and-copy.",
)
@click.option(
    "--ram",
    type=click.Choice(["live", "paused"]),
    default=None,
    help="RAM pre-copy while the guest runs, or copied with it paused [default: live under "
    "KVM, paused under TCG, where QEMU 7.2's live pre-copy loses guest writes].",
)
@click.option(
    "--copy-storage-inc",
    is_flag=True,
    help="Copy only each disk's own layer: the destination holds its backing file (a template).",
)
@click.option(
    "--dest-address",
    metavar="IP",
    help="The destination host's address: the RAM stream and the disk copy go over TCP to it "
    "(the destination QEMU listens there during the migration) [default: Unix sockets in --to, "
    "a destination on this host].",
)
@click.option(
    "--dest-netns",
    metavar="NS",
    help="Start the destination's QEMU and exports in network namespace NS (a destination host "
    "on this machine, reached at --dest-address).",
)
@click.option(
    "--postcopy-bandwidth",
    metavar="SIZE",
    help="Bytes/second of the pages post-copy pushes after the switch [default: unlimited].",
)
@click.option(
    "--recover-timeout",
    default=60.0,
    show_default=True,
    help="Seconds to reconnect a post-copy whose link broke after the switch before giving up "
    "(both QEMUs are then kept for --recover).",
)
@click.option(
    "--recover",
    "recover_",
    is_flag=True,
    help="Finish a post-copy that lost its link after the switch: reconnect, wait, stop the "
    "source.",
)
@click.option(
    "--abort",
    "abort_",
    is_flag=True,
    help="Undo a migration whose vmctl died before the switch: resume the source, remove --to.",
)
@click.option("--timeout", default=600.0, show_default=True, help="Seconds the migration may take.")
@root_option
@json_option
@handle_errors
def migrate(name: str, dest: Path, bandwidth: str, downtime_ms: int, precopy_timeout: float,
            postcopy: bool, ram: str | None, copy_storage_inc: bool, dest_address: str | None,
            dest_netns: str | None, postcopy_bandwidth: str | None, recover_timeout: float,
            recover_: bool, abort_: bool, timeout: float, root: Path | None,
            as_json: bool) -> None:  # fmt: skip
    """Move running VM NAME to the state root --to, in two stages (disks and RAM copied while
    it runs, then a short pause for the rest); reports stage times, bytes and the downtime.
    If anything fails before the switch, the source runs on and the destination is removed."""
    from vmctl.migrate import abort as do_abort
    from vmctl.migrate import migrate as do_migrate
    from vmctl.migrate import recover as do_recover

    def progress(text: str) -> None:
        click.echo(f"{name}: {text}", err=True)

    if recover_:
        out = trio.run(
            lambda: do_recover(
                _root(root),
                name,
                dest,
                timeout=timeout,
                recover_timeout=recover_timeout,
                progress=progress,
            )
        )
        if as_json:
            emit_json(out)
        else:
            click.echo(f"{name}: post-copy finished at {out['to']} "
                       f"({out['recoveries']} reconnections)")  # fmt: skip
        return
    if abort_:
        out = trio.run(lambda: do_abort(_root(root), name, dest))
        if as_json:
            emit_json(out)
        else:
            click.echo(f"{name}: migration undone (source running: {out['source_running']}, "
                       f"destination removed: {out['destination_removed']})")  # fmt: skip
        return

    pc_bw = parse_size(postcopy_bandwidth) if postcopy_bandwidth else None
    info = trio.run(lambda: do_migrate(
        _root(root), name, dest, bandwidth=parse_size(bandwidth), downtime_ms=downtime_ms,
        precopy_timeout=precopy_timeout, postcopy=postcopy, timeout=timeout,
        copy_storage_inc=copy_storage_inc, ram=ram, dest_address=dest_address,
        dest_netns=dest_netns, recover_timeout=recover_timeout, progress=progress,
        postcopy_bandwidth=pc_bw))  # fmt: skip
    if as_json:
        emit_json(info)
    else:
        click.echo(
            f"{name}: migrated to {info['to']} ({info['mode']}): downtime {info['downtime_ms']} ms"
            f", stage 1 {info['stage1_s']}s, {info['disk_bytes'] >> 20} MiB disk, "
            f"{(info['ram_bytes'] or 0) >> 20} MiB RAM"
        )
