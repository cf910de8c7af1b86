"""vfs.redirect — where bytes live.

A content-addressed :class:`LocalStore` shared by every tree and image on a host (first
redirection), remote repositories reached through :func:`open_remote` (``file://`` directories and
``http(s)://`` static servers, treated as possible liars: every fetch is bounded in size and
time), and the :class:`Resolver` that serves an object locally or fetches, verifies and stores it
first (second redirection). This package knows nothing of trees,
images or FUSE. The formats are specified in docs/redirect.md.
"""

from vfs.redirect import http_remote
from vfs.redirect.file_remote import FileRemote
from vfs.redirect.http_remote import HttpRemote
from vfs.redirect.objectid import check_object_id, object_id
from vfs.redirect.remote import Remote, check_ref_name, open_remote
from vfs.redirect.repoconfig import RepoConfig
from vfs.redirect.resolver import Resolver
from vfs.redirect.store import LocalStore

__all__ = [
    "FileRemote",
    "HttpRemote",
    "LocalStore",
    "Remote",
    "RepoConfig",
    "Resolver",
    "check_object_id",
    "check_ref_name",
    "http_remote",
    "object_id",
    "open_remote",
]
