"""How to reach a repository: the one object every command's repository options make.

``--repo URL`` and its companions (``--ca``, ``--cert``, ``--key``, ``--proxy``, ``--timeout``,
``--retries``, ``--min-rate``, ``--grace``) are defined once (:mod:`vfs.cli.options`) and
parsed into a :class:`RepoConfig`; the daemon, ``vfsd repo|template`` and ``vimg`` all open
repositories from it, so a flag means the same everywhere and a new one is added in one place.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from vfs.redirect.http_remote import (
    DEFAULT_BACKOFF,
    DEFAULT_GRACE,
    DEFAULT_MIN_RATE,
    DEFAULT_RETRIES,
    DEFAULT_TIMEOUT,
)
from vfs.redirect.remote import Remote, open_remote

__all__ = [
    "DEFAULT_BACKOFF",
    "DEFAULT_GRACE",
    "DEFAULT_MIN_RATE",
    "DEFAULT_RETRIES",
    "DEFAULT_TIMEOUT",
    "RepoConfig",
]


@dataclass(frozen=True)
class RepoConfig:
    """A repository URL (``file:///DIR``, ``DIR``, ``http(s)://HOST/PATH``) and how to reach
    it. The TLS, proxy and deadline fields apply to HTTP(S) repositories only; giving them for
    a directory is a usage error when it is opened (:func:`vfs.redirect.remote.open_remote`)."""

    url: str
    ca: str | None = None
    cert: str | None = None
    key: str | None = None
    proxy: str | None = None
    timeout: float = DEFAULT_TIMEOUT
    retries: int = DEFAULT_RETRIES
    backoff: float = DEFAULT_BACKOFF
    min_rate: float = DEFAULT_MIN_RATE
    grace: float = DEFAULT_GRACE

    @property
    def is_http(self) -> bool:
        return self.url.startswith(("http://", "https://"))

    def open(self, *, create: bool = False) -> Remote:
        """The repository (``create``: make an empty directory repository if there is none)."""
        return open_remote(
            self.url,
            ca=self.ca,
            cert=self.cert,
            key=self.key,
            timeout=self.timeout,
            retries=self.retries,
            backoff=self.backoff,
            create=create,
            proxy=self.proxy,
            min_rate=self.min_rate,
            grace=self.grace,
        )

    def replace(self, **changes: object) -> RepoConfig:
        return dataclasses.replace(self, **changes)  # type: ignore[arg-type]
