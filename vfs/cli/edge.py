"""What every CLI edge shares: errors → one line on stderr + the exit code of their class, JSON
output, logging, sizes and durations, and the one click group class every CLI uses.

Library code raises :mod:`vfs.errors`; only this module turns them into process exit codes, so a
user never sees a traceback for a condition they caused (bad input, corrupt data, dead server),
and an exit code always comes from an error class (README, "Exit codes"). Two statuses come from
the edge itself: 130 after Ctrl-C, and 141 when stdout is closed under a command (``vfsd ... |
head``): the command stops writing and ends quietly, with the status a shell reports for
coreutils killed by SIGPIPE (128 + 13), so ``set -o pipefail`` sees what it sees for ``cat``.
"""

from __future__ import annotations

import errno
import functools
import json
import logging
import os
import sys
from collections.abc import Callable
from typing import Any, NoReturn, TypeVar

import click

from vfs.errors import Outcome, VfsError, from_os_error

F = TypeVar("F", bound=Callable[..., Any])

log = logging.getLogger("vfs")

#: Exit status after stdout was closed under the command (128 + SIGPIPE, as a shell shows it).
EXIT_BROKEN_PIPE = 141
#: Exit status after Ctrl-C (128 + SIGINT).
EXIT_INTERRUPTED = 130


def setup_logging(verbose: int) -> None:
    # Errors reach the user as the one-line message; logs are for -v (info) and -vv (debug).
    level = logging.ERROR if verbose == 0 else (logging.INFO if verbose == 1 else logging.DEBUG)
    logging.basicConfig(
        level=level, format="%(asctime)s %(name)s %(levelname)s: %(message)s", stream=sys.stderr
    )


def _is_broken_pipe(e: BaseException) -> bool:
    return isinstance(e, BrokenPipeError) or (isinstance(e, OSError) and e.errno == errno.EPIPE)


def broken_pipe_exit() -> NoReturn:
    """The reader of stdout went away: stop quietly. stdout is pointed at /dev/null first, so
    the interpreter's final flush of what is still buffered cannot fail a second time."""
    try:
        fd = os.open(os.devnull, os.O_WRONLY)
        os.dup2(fd, sys.stdout.fileno())
        os.close(fd)
    except (OSError, ValueError):
        pass
    sys.exit(EXIT_BROKEN_PIPE)


def report_error(e: BaseException) -> NoReturn:
    """One line on stderr for ``e`` and the exit code of its class (or of the edge)."""
    if _is_broken_pipe(e):
        broken_pipe_exit()
    if isinstance(e, KeyboardInterrupt):
        click.echo(f"{_prog()}: interrupted", err=True)
        sys.exit(EXIT_INTERRUPTED)
    if isinstance(e, OSError):
        e = from_os_error(e)
    assert isinstance(e, VfsError)
    if isinstance(e, Outcome):
        if e.message:
            click.echo(f"{_prog()}: {e.message}", err=True)
    else:
        click.echo(f"{_prog()}: error: {e}", err=True)
    sys.exit(e.exit_code)


def handle_errors(fn: F) -> F:
    """Wrap a click command: VfsError/OSError become one line on stderr and an exit code."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except (VfsError, OSError, KeyboardInterrupt) as e:
            log.debug("command failed", exc_info=True)
            report_error(e)

    return wrapper  # type: ignore[return-value]


def _prog() -> str:
    ctx = click.get_current_context(silent=True)
    if ctx is None:
        return os.path.basename(sys.argv[0]) if sys.argv and sys.argv[0] else "vfs"
    root = ctx.find_root()
    return root.info_name or "vfs"


#: The ``--json`` flag every command with machine-readable output takes (parameter ``as_json``).
json_option = click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")


def emit_json(obj: Any) -> None:
    write_stdout(json.dumps(obj, indent=2, sort_keys=False) + "\n")


def write_stdout(text: str) -> None:
    """Write ``text`` to stdout whole, or raise. One big write into a pipe whose reader goes
    away part-way returns a short count from Python's buffered writer, and the text layer drops
    the rest without an error (the command would end with 0 and a truncated output): the
    remainder is written again here, which raises EPIPE (see :func:`report_error`)."""
    out = sys.stdout
    out.flush()
    buf = getattr(out, "buffer", None)
    if buf is None:  # a stream without a byte layer (a test's capture): write the text
        out.write(text)
        out.flush()
        return
    view = memoryview(text.encode(out.encoding or "utf-8", "surrogateescape"))
    while view:
        n = buf.write(view)
        view = view[n if n is not None else len(view) :]
    buf.flush()


class OneLineErrorGroup(click.Group):
    """The click group of every vfs CLI (vfsd, vimg, vmctl). Usage errors (bad flags, missing
    arguments) are one line on stderr with exit code 2, like every other error, instead of
    click's usage block: ``PROG: error: MESSAGE (see 'PROG CMD --help')``. A closed stdout and
    Ctrl-C end the command as :func:`report_error` says; the exit status is the command's."""

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):
        try:
            rv = super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        except click.exceptions.NoArgsIsHelpError as e:
            e.show()  # the group's help, on stderr: a command is required
            sys.exit(2)
        except click.ClickException as e:
            ctx = getattr(e, "ctx", None)
            root = (ctx.find_root().info_name if ctx is not None else None) or prog_name
            root = root or self.name or "vfs"
            path = (ctx.command_path if ctx is not None else None) or root
            hint = f" (see '{path} --help')" if isinstance(e, click.UsageError) else ""
            click.echo(f"{root}: error: {e.format_message()}{hint}", err=True)
            sys.exit(e.exit_code)
        except click.exceptions.Abort:  # Ctrl-C in a prompt
            click.echo(f"{prog_name or self.name}: interrupted", err=True)
            sys.exit(EXIT_INTERRUPTED)
        except (OSError, KeyboardInterrupt) as e:
            # outside a command's own handler (--help into a closed pipe, a result echoed
            # after it returned)
            if not _is_broken_pipe(e) and not isinstance(e, KeyboardInterrupt):
                raise
            report_error(e)
        if isinstance(rv, int) and not isinstance(rv, bool):
            sys.exit(rv)
        # flush here, inside the handler: a reader gone after the last write is seen now
        try:
            sys.stdout.flush()
        except OSError as e:
            if _is_broken_pipe(e):
                broken_pipe_exit()
            raise
        sys.exit(0)
