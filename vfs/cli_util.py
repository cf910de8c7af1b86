"""What every CLI edge shares: VfsError → one line on stderr + exit code, JSON output, logging.

Library code raises :mod:`vfs.errors`; only this module turns them into process exit codes, so a
user never sees a traceback for a condition they caused (bad input, corrupt data, dead server).
"""

from __future__ import annotations

import functools
import json
import logging
import math
import sys
from collections.abc import Callable
from typing import Any, TypeVar

import click

from vfs.errors import UsageError, VfsError, from_os_error

F = TypeVar("F", bound=Callable[..., Any])

log = logging.getLogger("vfs")


def setup_logging(verbose: int) -> None:
    # Errors reach the user as the one-line message; logs are for -v (info) and -vv (debug).
    level = logging.ERROR if verbose == 0 else (logging.INFO if verbose == 1 else logging.DEBUG)
    logging.basicConfig(
        level=level, format="%(asctime)s %(name)s %(levelname)s: %(message)s", stream=sys.stderr
    )


def fail(message: str, exit_code: int = 1) -> None:
    """Print one line to stderr and exit (for conditions found in the CLI itself)."""
    click.echo(f"{click.get_current_context().info_name or 'vfs'}: error: {message}", err=True)
    sys.exit(exit_code)


def handle_errors(fn: F) -> F:
    """Wrap a click command: VfsError/OSError become one line on stderr and an exit code."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except VfsError as e:
            log.debug("command failed", exc_info=True)
            prog = _prog()
            click.echo(f"{prog}: error: {e}", err=True)
            sys.exit(e.exit_code)
        except OSError as e:
            log.debug("command failed", exc_info=True)
            err = from_os_error(e)
            click.echo(f"{_prog()}: error: {err}", err=True)
            sys.exit(err.exit_code)
        except KeyboardInterrupt:
            click.echo(f"{_prog()}: interrupted", err=True)
            sys.exit(130)

    return wrapper  # type: ignore[return-value]


def _prog() -> str:
    ctx = click.get_current_context(silent=True)
    if ctx is None:
        return "vfs"
    root = ctx.find_root()
    return root.info_name or "vfs"


#: The ``--json`` flag every command with machine-readable output takes (parameter ``as_json``).
json_option = click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")


def emit_json(obj: Any) -> None:
    click.echo(json.dumps(obj, indent=2, sort_keys=False))


def parse_size(text: str) -> int:
    """'64k', '1M', '10G', '512' → bytes (binary units, as qemu-img)."""
    t = text.strip()
    units = {"": 1, "b": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40, "p": 1 << 50}
    num = t.rstrip("bBkKmMgGtTpPiI")
    suffix = t[len(num) :].lower().replace("ib", "").replace("i", "")
    if suffix not in units:
        raise UsageError(f"invalid size {text!r}")
    try:
        value = float(num)
    except ValueError:
        raise UsageError(f"invalid size {text!r}") from None
    if not math.isfinite(value):
        raise UsageError(f"invalid size {text!r}: not a finite number")
    if value < 0:
        raise UsageError(f"invalid size {text!r}: negative")
    return int(value * units[suffix])


_DURATION_UNITS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


def parse_duration(text: str) -> float:
    """'90', '90s', '10m', '2h', '7d', '1w' → seconds (a finite number >= 0)."""
    t = text.strip().lower()
    num = t.rstrip("smhdw")
    unit = t[len(num) :]
    if unit not in _DURATION_UNITS:
        raise UsageError(f"invalid duration {text!r} (e.g. 30s, 10m, 2h, 7d)")
    try:
        value = float(num)
    except ValueError:
        raise UsageError(f"invalid duration {text!r} (e.g. 30s, 10m, 2h, 7d)") from None
    if not math.isfinite(value) or value < 0:
        raise UsageError(f"invalid duration {text!r}: a finite number >= 0")
    return value * _DURATION_UNITS[unit]


class OneLineErrorGroup(click.Group):
    """A click group whose usage errors (bad flags, missing arguments) are one line on stderr
    with exit code 2, like every other vfs error, instead of click's usage block."""

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):
        try:
            rv = super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        except click.exceptions.NoArgsIsHelpError as e:
            e.show()
            sys.exit(e.exit_code)
        except click.ClickException as e:
            ctx = getattr(e, "ctx", None)
            prog = (ctx.command_path if ctx is not None else None) or prog_name or self.name
            hint = f" (see '{prog} --help')" if isinstance(e, click.UsageError) else ""
            click.echo(f"{prog}: error: {e.format_message()}{hint}", err=True)
            sys.exit(e.exit_code)
        except click.exceptions.Abort:
            click.echo("aborted", err=True)
            sys.exit(1)
        sys.exit(rv if isinstance(rv, int) else 0)
