"""Remote repositories: where objects live when they are not on this host (second redirection).

One layout, served two ways (docs/redirect.md, "Repository")::

    REPO/vfs-repo.json      {"format": "vfs-repo", "version": 1, "features": []}
    REPO/objects/ab/<id>    the object's plain bytes (so any static server can do Range on it)
    REPO/refs/<name>        a named reference: "<id>\\n"
    REPO/refs.json          every ref, {"name": "<id>"} (the listing a static server cannot make)

Backends, one module each: :class:`vfs.redirect.file_remote.FileRemote` (a directory, e.g. an NFS
share; the only one that can ``put``) and :class:`vfs.redirect.http_remote.HttpRemote` (any
static web server, CDN or bucket). A repository is published over HTTP by copying the
directory to the web root (``rsync -a REPO/ host:/var/www/repo/``): objects first, refs last.

Remotes never decide what is trusted: callers verify every byte against its id (the resolver
does it before anything is stored; :meth:`Remote.get` does it for small objects). What a remote
does enforce is every bound a lying repository could break: an object fetch stops at the size
the caller expects (``expected_size``) or may accept (``limit``), and repository metadata is
parsed strictly (:mod:`vfs.redirect.repometa`).
"""

from __future__ import annotations

import logging
import os
import urllib.parse
from abc import ABC, abstractmethod
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any, BinaryIO

from vfs.errors import IntegrityError, UsageError
from vfs.redirect.objectid import check_object_id, object_id
from vfs.redirect.repometa import check_ref_name

if TYPE_CHECKING:
    from vfs.redirect.file_remote import FileRemote  # noqa: F401 (the lazy name below)

log = logging.getLogger(__name__)

__all__ = ["BLOCK", "Remote", "check_ref_name", "open_remote"]

BLOCK = 1 << 20
#: What :meth:`Remote.get` accepts when the caller knows no better (whole objects in memory).
GET_LIMIT = 1 << 30


class Remote(ABC):
    """A repository of objects. Subclasses are thread-safe."""

    url: str

    @abstractmethod
    def has(self, oid: str) -> bool: ...

    @abstractmethod
    def iter_object(
        self,
        oid: str,
        block: int = BLOCK,
        *,
        expected_size: int | None = None,
        limit: int | None = None,
    ) -> Iterator[bytes]:
        """The object's bytes in blocks, as the repository has them (unverified).

        ``expected_size``: the object's exact length as its reference says (a manifest entry, a
        cluster size): a repository that announces or sends another length is refused with
        :class:`SizeMismatch` (nothing past the size is ever read). Without it, ``limit``
        bounds what is read (:class:`IntegrityError` past it); without either, the format's
        16 TiB object limit does.
        """

    def get(
        self, oid: str, max_size: int = GET_LIMIT, *, expected_size: int | None = None
    ) -> bytes:
        """The whole object, verified against its id. For small objects (manifests, clusters):
        at most ``max_size`` bytes, or exactly ``expected_size``."""
        check_object_id(oid)
        parts = []
        for block in self.iter_object(oid, expected_size=expected_size, limit=max_size):
            parts.append(block)
        data = b"".join(parts)
        if object_id(data) != oid:
            raise IntegrityError(
                f"object {oid}: bytes from {self.url} do not match the id (lying or damaged "
                "repository); refused",
                oid=oid,
            )
        return data

    def put(self, data: bytes) -> str:
        raise UsageError(f"{self.url}: read-only repository (publish by copying the directory)")

    def put_file(self, path: str | os.PathLike[str]) -> str:
        raise UsageError(f"{self.url}: read-only repository (publish by copying the directory)")

    def put_stream(self, src: BinaryIO) -> str:
        raise UsageError(f"{self.url}: read-only repository (publish by copying the directory)")

    def set_ref(self, name: str, oid: str) -> None:
        raise UsageError(f"{self.url}: read-only repository (publish by copying the directory)")

    def delete_ref(self, name: str) -> str:
        """Remove ref ``name``; return the object id it named (NotFound if there is none)."""
        raise UsageError(f"{self.url}: read-only repository (publish by copying the directory)")

    @abstractmethod
    def get_ref(self, name: str) -> str: ...

    @abstractmethod
    def list_refs(self) -> dict[str, str]: ...

    def close(self) -> None:  # noqa: B027 - optional hook, most backends hold nothing
        """Release connections."""

    def __enter__(self) -> Remote:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def open_remote(
    url: str,
    *,
    ca: str | None = None,
    cert: str | None = None,
    key: str | None = None,
    timeout: float | None = None,
    retries: int | None = None,
    backoff: float | None = None,
    create: bool = False,
    proxy: str | None = None,
    min_rate: float | None = None,
    grace: float | None = None,
) -> Remote:
    """A repository from its URL: ``file:///dir``, a plain path, or ``http(s)://host/path``
    (optionally through an HTTP forward ``proxy``). ``timeout``, ``retries``, ``backoff``,
    ``min_rate`` and ``grace`` bound HTTP fetches (:class:`vfs.redirect.http_remote.HttpRemote`);
    None takes the documented default. Commands build these from one
    :class:`vfs.redirect.repoconfig.RepoConfig` (its ``open``)."""
    if url.startswith(("http://", "https://")):
        from vfs.redirect import http_remote

        return http_remote.HttpRemote(
            url,
            ca=ca,
            cert=cert,
            key=key,
            timeout=http_remote.DEFAULT_TIMEOUT if timeout is None else timeout,
            retries=http_remote.DEFAULT_RETRIES if retries is None else retries,
            backoff=http_remote.DEFAULT_BACKOFF if backoff is None else backoff,
            proxy=proxy,
            min_rate=http_remote.DEFAULT_MIN_RATE if min_rate is None else min_rate,
            grace=http_remote.DEFAULT_GRACE if grace is None else grace,
        )
    if proxy:
        raise UsageError("--proxy applies only to http(s):// repositories")
    if cert or key or ca:
        raise UsageError("--ca/--cert/--key apply only to https:// repositories")
    if url.startswith("file://"):
        path = urllib.parse.unquote(urllib.parse.urlsplit(url).path)
    elif "://" in url:
        raise UsageError(f"unsupported repository URL scheme in {url!r} (file, http, https)")
    else:
        path = url
    if not path:
        raise UsageError(f"invalid repository URL {url!r}")
    from vfs.redirect.file_remote import FileRemote

    return FileRemote(path, create=create)


def __getattr__(name: str) -> Any:
    # ``vfs.redirect.remote.FileRemote``: the backend moved to its own module; the old name
    # keeps working (lazily: file_remote imports this module).
    if name == "FileRemote":
        from vfs.redirect.file_remote import FileRemote

        return FileRemote
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
