"""How to reach a repository: the one object every command's repository options make.

``--repo URL`` and its companions (``--ca``, ``--cert``, ``--key``, ``--proxy``, ``--timeout``,
``--retries``, ``--min-rate``, ``--grace``) are defined once (:mod:`vfs.cli.options`) and
parsed into a :class:`RepoConfig`; the daemon, ``vfsd repo|template`` and ``vimg`` all open
repositories from it, so a flag means the same everywhere and a new one is added in one place.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

from vfs.errors import UsageError
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


_NUMBER = (int, float)
_JSON_TYPES: dict[str, tuple[type, ...]] = {
    "url": (str,), "ca": (str,), "cert": (str,), "key": (str,), "proxy": (str,),
    "timeout": _NUMBER, "retries": (int,), "backoff": _NUMBER, "min_rate": _NUMBER,
    "grace": _NUMBER,
}  # fmt: skip
_NULLABLE = {"ca", "cert", "key", "proxy"}


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

    def with_absolute_paths(self) -> RepoConfig:
        """The same config with its files (CA, certificate, key, a directory URL) made
        absolute: for a config another process keeps or uses from another directory."""
        import os.path

        changes: dict[str, object] = {
            k: os.path.abspath(v) for k in ("ca", "cert", "key") if (v := getattr(self, k))
        }
        if "://" not in self.url:
            changes["url"] = os.path.abspath(self.url)
        return self.replace(**changes)

    def to_json(self) -> dict[str, object]:
        """The fields that differ from the defaults (what a daemon keeps in its registry)."""
        out: dict[str, object] = {"url": self.url}
        for f in dataclasses.fields(self)[1:]:
            v = getattr(self, f.name)
            if v != f.default:
                out[f.name] = v
        return out

    @classmethod
    def from_json(cls, doc: object) -> RepoConfig:
        """The inverse of :meth:`to_json`; a bare string is a URL (registries written before
        the TLS and deadline fields were kept). Field types are checked exactly: this reads
        files and control requests, not only our own output."""
        if isinstance(doc, str):
            doc = {"url": doc}
        if not isinstance(doc, dict) or not isinstance(doc.get("url"), str):
            raise UsageError("a repository must be a URL or an object with a 'url' string")
        kw: dict[str, object] = {}
        for k, v in doc.items():
            want = _JSON_TYPES.get(k)
            if want is None:
                raise UsageError(f"a repository has no field {str(k)[:40]!r}")
            if type(v) not in want and not (v is None and k in _NULLABLE):
                raise UsageError(f"repository field {k!r}: wrong type")
            if want is _NUMBER and not math.isfinite(v):  # type: ignore[arg-type]
                raise UsageError(f"repository field {k!r}: not a finite number")
            kw[k] = v
        return cls(**kw)  # type: ignore[arg-type]

    def to_argv(self) -> list[str]:
        """The command-line options (:func:`vfs.cli.options.repo_options`) that make this
        config again: how a daemon hands its repository to a child process it starts."""
        argv = ["--repo", self.url]
        for name in ("ca", "cert", "key", "proxy"):
            v = getattr(self, name)
            if v:
                argv += [f"--{name}", v]
        argv += ["--timeout", repr(float(self.timeout)), "--retries", str(self.retries)]
        argv += ["--min-rate", str(int(self.min_rate)), "--grace", repr(float(self.grace))]
        return argv
