"""Shared fixtures: a real nginx on 127.0.0.1 serving repositories over HTTP, HTTPS and mutual TLS.

nginx is started once per session (tools/nginx.py) and stopped at the end, whatever happens.
Tests publish into ``nginx.webroot / NAME`` (a file:// repository) and fetch through
``nginx.url(NAME, kind)`` with kind in http, slow (2 MB/s), https, mtls.
"""

from __future__ import annotations

import logging
import shutil

import pytest

from tools.nginx import Nginx, start_nginx, stop_nginx


@pytest.fixture(scope="session")
def nginx(tmp_path_factory: pytest.TempPathFactory):
    """A real nginx on 127.0.0.1: plain HTTP, a rate-limited HTTP (2 MB/s), HTTPS, mutual TLS."""
    try:
        proc, server = start_nginx(tmp_path_factory.mktemp("nginx"))
    except RuntimeError as e:
        pytest.fail(str(e))
    try:
        yield server
    finally:
        stop_nginx(proc)


@pytest.fixture
def nginx_repo(nginx: Nginx, request: pytest.FixtureRequest):
    """A fresh empty repository directory published under nginx; returns (dir, name)."""
    from vfs.redirect.file_remote import FileRemote

    name = request.node.name.replace("[", "_").replace("]", "_")[:60]
    path = nginx.webroot / name
    if path.exists():
        shutil.rmtree(path)
    FileRemote.init(path)
    yield path, name
    shutil.rmtree(path, ignore_errors=True)


class _WarningCollector(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@pytest.fixture(autouse=True)
def fail_on_unexpected_log_warnings(request: pytest.FixtureRequest):
    """A test in which vfs logs a warning or error it did not declare fails (S3QL's checklogs):
    warnings are how the code says something went wrong quietly (the "vfs" and "vmctl" loggers).
    Declare expected ones with
    ``@pytest.mark.log_warnings``."""
    collector = _WarningCollector()
    loggers = [logging.getLogger(name) for name in ("vfs", "vmctl")]
    for logger in loggers:
        logger.addHandler(collector)
    try:
        yield
    finally:
        for logger in loggers:
            logger.removeHandler(collector)
    if collector.records and request.node.get_closest_marker("log_warnings") is None:
        lines = [f"{r.name} {r.levelname}: {r.getMessage()}" for r in collector.records[:5]]
        pytest.fail(
            "vfs logged unexpected warnings (mark the test @pytest.mark.log_warnings if they "
            "are expected):\n  " + "\n  ".join(lines),
            pytrace=False,
        )
