"""The control protocol of a running ``vfsd serve``: JSON lines over a Unix socket.

The socket is ``<state>/control.sock`` (mode 0600: whoever can use it can change VEEs). One
request per connection::

    -> {"op": "add", "name": "web1", "template": "<digest or name>"}\\n
    <- {"ok": true, "result": {...}}\\n
    <- {"ok": false, "error": "no VEE named 'x'", "exit_code": 4}\\n

Ops: ``ping``, ``list``, ``add`` (name, template), ``rm`` (name, purge), ``upgrade`` (name,
template, dry_run, force), ``export_add`` (spec: a JSON export spec), ``export_rm`` (name),
``export_list`` (:mod:`vfs.export.supervisor`). Errors carry the exit code of the
:mod:`vfs.errors` class the daemon raised, so the CLI exits exactly as if it had done the work
itself.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import trio

from vfs.errors import (  # noqa: F401 - ControlError, DaemonNotRunning re-exported
    BusyError,
    ControlError,
    DaemonNotRunning,
    FormatError,
    UsageError,
    VfsError,
    from_os_error,
)

log = logging.getLogger(__name__)

SOCKET_NAME = "control.sock"
MAX_REQUEST = 1 << 20

Handler = Callable[[dict[str, Any]], Awaitable[Any]]


def socket_path(state_dir: str | Path) -> Path:
    p = Path(state_dir) / SOCKET_NAME
    if len(os.fsencode(p)) >= 108:
        raise UsageError(f"state directory path too long for a Unix socket: {p}")
    return p


async def serve_control(state_dir: Path, handler: Handler, *, task_status: Any = None) -> None:
    """Accept control connections until cancelled."""
    await serve_socket(socket_path(state_dir), handler, parse_request, task_status=task_status)


Parser = Callable[[bytes], dict[str, Any]]


async def serve_socket(
    path: Path, handler: Handler, parse: Parser, *, task_status: Any = None
) -> None:
    """Serve JSON-line requests on the Unix socket ``path`` (mode 0600) until cancelled:
    each line is checked by ``parse`` and answered by ``handler`` (the export processes use
    this with their own requests)."""
    sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)
    await sock.bind(os.fspath(path))
    os.chmod(path, 0o600)
    sock.listen(16)
    listener = trio.SocketListener(sock)
    try:
        if task_status is not None:
            task_status.started()
        await trio.serve_listeners(
            lambda stream: _serve_one(stream, handler, parse), [listener], handler_nursery=None
        )
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)


async def _serve_one(stream: trio.SocketStream, handler: Handler, parse: Parser) -> None:
    async with stream:
        buf = b""
        try:
            while b"\n" not in buf:
                data = await stream.receive_some(65536)
                if not data:
                    return
                buf += data
                if len(buf) > MAX_REQUEST:
                    raise UsageError("control request too long")
            req = parse(buf.split(b"\n", 1)[0])
            result = await handler(req)
            reply: dict[str, Any] = {"ok": True, "result": result}
        except VfsError as e:
            reply = {"ok": False, "error": str(e), "exit_code": e.exit_code}
        except OSError as e:
            err = from_os_error(e)
            reply = {"ok": False, "error": str(err), "exit_code": err.exit_code}
        except Exception as e:  # a bug must not kill the daemon: report it
            log.exception("control request failed")
            reply = {"ok": False, "error": f"internal error: {e}", "exit_code": 1}
        try:
            await stream.send_all(json.dumps(reply).encode() + b"\n")
        except trio.BrokenResourceError:
            pass


#: Every op and the fields it takes, with their types (bool is not int here: ``"purge": "no"``
#: or ``1`` is refused, never read as true). Unknown ops and unknown fields are refused.
REQUESTS: dict[str, dict[str, type]] = {
    "ping": {},
    "list": {},
    "add": {"name": str, "template": str},
    "rm": {"name": str, "purge": bool},
    "upgrade": {"name": str, "template": str, "dry_run": bool, "force": bool},
    "export_add": {"spec": str},
    "export_rm": {"name": str},
    "export_list": {},
}
#: Fields that may be left out, with their defaults.
DEFAULTS: dict[str, Any] = {"purge": False, "dry_run": False, "force": False}


def parse_request(
    line: bytes,
    requests: dict[str, dict[str, type]] | None = None,
    defaults: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Decode and validate one request line strictly: a flat JSON object whose ``op`` is known
    and whose fields all have their exact types (UsageError otherwise, never a traceback).
    ``requests``/``defaults``: another protocol's table (default: the daemon's)."""
    requests = REQUESTS if requests is None else requests
    defaults = DEFAULTS if defaults is None else defaults
    try:
        req = json.loads(line)
    except (ValueError, RecursionError) as e:
        raise UsageError(f"malformed control request: {str(e)[:100]}") from None
    if not isinstance(req, dict) or not isinstance(req.get("op"), str):
        raise UsageError("control request must be a JSON object with a string 'op'")
    op = req["op"]
    fields = requests.get(op)
    if fields is None:
        raise UsageError(f"unknown control op {op[:40]!r}")
    out: dict[str, Any] = {"op": op}
    for key, value in req.items():
        if key == "op":
            continue
        want = fields.get(key)
        if want is None:
            raise UsageError(f"control op {op!r} takes no field {key[:40]!r}")
        if type(value) is not want:
            raise UsageError(f"control field {key!r} must be a {want.__name__}")
        out[key] = value
    for key in fields:
        if key not in out:
            if key not in defaults:
                raise UsageError(f"control op {op!r} needs a {fields[key].__name__} {key!r}")
            out[key] = defaults[key]
    return out


def call(state_dir: str | Path, request: dict[str, Any], timeout: float = 600.0) -> Any:
    """Send one request to the daemon of ``state_dir``; its result, or ControlError."""
    return call_socket(socket_path(state_dir), request, timeout, f"state directory {state_dir}")


def call_socket(
    path: str | Path, request: dict[str, Any], timeout: float = 600.0, what: str = ""
) -> Any:
    """Send one request to the JSON-line server on ``path``; its result, or ControlError."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(timeout)
    try:
        try:
            s.connect(os.fspath(path))
        except (FileNotFoundError, ConnectionRefusedError):
            raise DaemonNotRunning(
                f"no vfsd serving {what or path} (no answer on {path})"
            ) from None
        s.sendall(json.dumps(request).encode() + b"\n")
        buf = b""
        while not buf.endswith(b"\n"):
            data = s.recv(65536)
            if not data:
                break
            buf += data
    except TimeoutError:
        raise BusyError(f"vfsd did not answer within {timeout:.0f} s") from None
    finally:
        s.close()
    try:
        reply = json.loads(buf)
    except ValueError:
        raise FormatError("vfsd sent a malformed reply") from None
    if not reply.get("ok"):
        raise ControlError(str(reply.get("error")), int(reply.get("exit_code", 1)))
    return reply.get("result")
