"""Build pyfuse3 with the vfs patch series into the running venv (run it with the venv's python).

pyfuse3 3.5 lacks what vfsd needs from libfuse 3.14 (fallocate, readdir caching, an
invalidation that cannot deadlock a handler): ``tools/pyfuse3/README.md`` says what each patch
does and when it can go. This script takes the pinned PyPI sdist (``pip download``, checked
against its sha256), applies ``series`` in order with ``git apply``, removes the shipped
Cython output so the patched ``.pyx`` is compiled (Cython and setuptools from PyPI, pinned in
``build-constraints.txt``), builds a wheel and installs it.

The version installed is ``3.5.0+vfs.<digest>``, the digest taken over the sdist, the patches and
the constraints: when exactly that version is installed the script returns at once, so a
second ``make`` costs one metadata read. Any failure is one clear line on stderr (and the failing
tool's output) and exit status 1.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import subprocess
import sys
import tempfile
from importlib import metadata
from pathlib import Path

SDIST_VERSION = "3.5.0"
SDIST_NAME = f"pyfuse3-{SDIST_VERSION}.tar.gz"
SDIST_SHA256 = "88399a9494b88603230bba300f4ba9ad63fece5ed514ca3633d555a0c6a42b24"

HERE = Path(__file__).resolve().parent
SERIES = HERE / "series"
CONSTRAINTS = HERE / "build-constraints.txt"


class BuildError(Exception):
    pass


def patches() -> list[Path]:
    """The patch files named in ``series``, in order (blank lines and ``#`` comments skipped)."""
    out = []
    for line in SERIES.read_text().splitlines():
        name = line.split("#", 1)[0].strip()
        if not name:
            continue
        p = HERE / "patches" / name
        if not p.is_file():
            raise BuildError(f"series names {name}, but {p} does not exist")
        out.append(p)
    return out


def wanted_version(series: list[Path]) -> str:
    h = hashlib.sha256(SDIST_SHA256.encode())
    for p in series:
        h.update(p.name.encode() + b"\0" + p.read_bytes() + b"\0")
    h.update(CONSTRAINTS.read_bytes())
    return f"{SDIST_VERSION}+vfs.{h.hexdigest()[:10]}"


def installed_version() -> str | None:
    try:
        return metadata.version("pyfuse3")
    except metadata.PackageNotFoundError:
        return None


def run(cmd: list[str], what: str, **kw: object) -> None:
    p = subprocess.run(cmd, capture_output=True, text=True, check=False, **kw)  # type: ignore[call-overload]
    if p.returncode != 0:
        sys.stderr.write(p.stdout[-4000:] + p.stderr[-4000:])
        raise BuildError(f"{what} failed (exit {p.returncode}): {' '.join(cmd)}")


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def fetch_sdist(cache: Path) -> Path:
    """The sdist from PyPI (kept in the venv, so a rebuild after a patch change is offline)."""
    cache.mkdir(parents=True, exist_ok=True)
    path = cache / SDIST_NAME
    if not path.exists() or sha256(path) != SDIST_SHA256:
        path.unlink(missing_ok=True)
        run(
            [
                sys.executable,
                "-m",
                "pip",
                "download",
                "-q",
                "--no-deps",
                "--no-binary",
                ":all:",
                "--dest",
                str(cache),
                f"pyfuse3=={SDIST_VERSION}",
            ],
            "downloading the pyfuse3 sdist",
        )
    if not path.exists():
        raise BuildError(f"pip download did not produce {path}")
    got = sha256(path)
    if got != SDIST_SHA256:
        path.unlink()
        raise BuildError(f"{SDIST_NAME}: sha256 {got} is not the pinned {SDIST_SHA256}")
    return path


def build(version: str, series: list[Path]) -> None:
    sdist = fetch_sdist(Path(sys.prefix) / "pyfuse3-src")
    # Outside any git work tree: inside one, `git apply` would take paths relative to its top.
    with tempfile.TemporaryDirectory(prefix="vfs-pyfuse3-") as tmp:
        run(["tar", "--no-same-owner", "-xzf", str(sdist), "-C", tmp], "unpacking the sdist")
        src = Path(tmp) / f"pyfuse3-{SDIST_VERSION}"
        for p in series:
            run(["git", "apply", "--whitespace=nowarn", str(p)], f"applying {p.name}", cwd=src)
        # The shipped C file is Cython's output for the unpatched sources: compile ours.
        (src / "src" / "pyfuse3" / "__init__.c").unlink(missing_ok=True)
        env = dict(os.environ)
        env["SETUPTOOLS_SCM_PRETEND_VERSION_FOR_PYFUSE3"] = version
        env["PIP_CONSTRAINT"] = str(CONSTRAINTS)  # reaches pip's isolated build environment
        dist = Path(tmp) / "dist"
        run(
            [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(dist), str(src)],
            "building the pyfuse3 wheel (needs gcc, python3-dev, libfuse3-dev, pkg-config)",
            env=env,
        )
        wheels = sorted(dist.glob("pyfuse3-*.whl"))
        if len(wheels) != 1:
            raise BuildError(f"expected one pyfuse3 wheel in {dist}, found {wheels}")
        run(
            [
                sys.executable,
                "-m",
                "pip",
                "install",
                "-q",
                "--no-deps",
                "--force-reinstall",
                str(wheels[0]),
            ],
            "installing the pyfuse3 wheel",
        )
    # A new process reads the installed metadata (importing pyfuse3 needs trio, which a fresh
    # venv gets only with the project, next; the daemon checks the features at start-up).
    check = subprocess.run(
        [
            sys.executable,
            "-c",
            "from importlib import metadata; print(metadata.version('pyfuse3'))",
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    if check.returncode != 0 or check.stdout.strip() != version:
        sys.stderr.write(check.stderr[-4000:])
        raise BuildError(f"installed pyfuse3 reports {check.stdout.strip()!r}, not {version}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--force", action="store_true", help="rebuild even if up to date")
    args = ap.parse_args()
    try:
        series = patches()
        version = wanted_version(series)
        have = installed_version()
        if have == version and not args.force:
            return 0
        print(f"building pyfuse3 {version} (installed: {have or 'none'})", flush=True)
        build(version, series)
        print(f"pyfuse3 {version} installed in {sys.prefix}", flush=True)
        return 0
    except BuildError as e:
        print(f"tools/pyfuse3/build.py: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
