"""Run the real `vfsd` CLI hundreds of times without paying its import hundreds of times.

A zygote process imports :mod:`vfs.cli.vfsd` once; for each command it forks a child that sets
``sys.argv``, points fds 0/1/2 at /dev/null and two files, and calls ``main()`` exactly as the
``vfsd`` console script does, then exits with the code ``main()`` exits with (a traceback, if any
escapes, goes to the child's stderr as it would from the script). The zygote itself starts no
thread and never runs a command, so every child starts from a fresh, single-threaded CLI.

Protocol: one JSON list of ``{"argv": [...], "out": path, "err": path}`` per line on stdin; one
JSON list of exit codes per line on stdout.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import traceback
from pathlib import Path


def _child(argv: list[str], out: str, err: str) -> None:
    code = 1
    try:
        flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC
        for fd, target in ((0, os.open(os.devnull, os.O_RDONLY)), (1, os.open(out, flags)),
                           (2, os.open(err, flags))):  # fmt: skip
            os.dup2(target, fd)
            os.close(target)
        sys.argv = ["vfsd", *argv]
        # click names the program after __main__'s package when there is one ("python -m
        # tests.redirect..."); the console script has none, so it is named after argv[0].
        sys.modules["__main__"].__package__ = None
        from vfs.cli.vfsd import main

        try:
            main()
            code = 0
        except SystemExit as e:
            if e.code is None:
                code = 0
            elif isinstance(e.code, int):
                code = e.code
            else:
                print(e.code, file=sys.stderr)
        except BaseException:
            traceback.print_exc()
    finally:
        try:
            sys.stdout.flush()
            sys.stderr.flush()
        finally:
            os._exit(code)


def serve(parallel: int) -> None:
    import vfs.cli.vfsd  # noqa: F401 - the one import every child shares

    for line in sys.stdin:
        jobs = json.loads(line)
        codes: list[int | None] = [None] * len(jobs)
        running: dict[int, int] = {}
        nxt = 0
        while nxt < len(jobs) or running:
            while nxt < len(jobs) and len(running) < parallel:
                pid = os.fork()
                if pid == 0:
                    _child(**jobs[nxt])
                running[pid] = nxt
                nxt += 1
            pid, status = os.wait()
            codes[running.pop(pid)] = os.waitstatus_to_exitcode(status)
        print(json.dumps(codes), flush=True)


class Zygote:
    """The test side: ``run([argv, ...], tmp_dir)`` -> CompletedProcess per command."""

    def __init__(self, parallel: int = 4) -> None:
        self._p = subprocess.Popen(
            [sys.executable, "-m", "tests.redirect.cli_fork", str(parallel)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            cwd=Path(__file__).resolve().parents[2],
        )

    def run(self, commands: list[list[str]], tmp: Path) -> list[subprocess.CompletedProcess]:
        tmp.mkdir(parents=True, exist_ok=True)
        jobs = [
            {"argv": argv, "out": str(tmp / f"{i}.out"), "err": str(tmp / f"{i}.err")}
            for i, argv in enumerate(commands)
        ]
        assert self._p.stdin is not None and self._p.stdout is not None
        self._p.stdin.write(json.dumps(jobs) + "\n")
        self._p.stdin.flush()
        line = self._p.stdout.readline()
        if not line:
            raise RuntimeError(f"the CLI zygote died (exit {self._p.wait()})")
        return [
            subprocess.CompletedProcess(
                job["argv"], code, Path(job["out"]).read_text(), Path(job["err"]).read_text()
            )
            for job, code in zip(jobs, json.loads(line), strict=True)
        ]

    def close(self) -> None:
        assert self._p.stdin is not None
        self._p.stdin.close()
        try:
            self._p.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self._p.kill()
            self._p.wait()


if __name__ == "__main__":
    serve(int(sys.argv[1]))
