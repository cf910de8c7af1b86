"""A path-based client of the plain-Python view core (what the kernel does, minus the kernel)."""

from __future__ import annotations

import errno
import os

from vfs.tree.nodes import ROOT_INO, FsError, SetAttr, StaleHandle
from vfs.tree.view import Views


class VeeClient:
    """Drives :class:`Views` by path inside one VEE, retrying ESTALE like the kernel's VFS."""

    def __init__(self, views: Views, name: str) -> None:
        self.views = views
        self.name = name

    def ino(self, path: str) -> int:
        ino = self.views.lookup(ROOT_INO, self.name.encode()).ino
        for comp in [c for c in path.split("/") if c]:
            ino = self.views.lookup(ino, comp.encode()).ino
        return ino

    def parent(self, path: str) -> tuple[int, bytes]:
        head, _, tail = path.rstrip("/").rpartition("/")
        return self.ino(head), tail.encode()

    async def _retry(self, fn):  # type: ignore[no-untyped-def]
        try:
            return await fn()
        except StaleHandle:
            return await fn()  # the kernel retries once after a fresh lookup

    async def read(self, path: str) -> bytes:
        fh = await self.views.open(self.ino(path), os.O_RDONLY)
        try:
            out = b""
            while True:
                chunk = await self.views.read(fh, len(out), 1 << 20)
                if not chunk:
                    return out
                out += chunk
        finally:
            self.views.release(fh)

    async def write(self, path: str, data: bytes, *, offset: int = 0, trunc: bool = False) -> None:
        async def go():  # type: ignore[no-untyped-def]
            flags = os.O_WRONLY | (os.O_TRUNC if trunc else 0)
            try:
                ino = self.ino(path)
            except FsError as e:
                if e.errno != errno.ENOENT:
                    raise
                p, n = self.parent(path)
                fh, _ = self.views.create(p, n, 0o100644, flags, 0, 0)
            else:
                fh = await self.views.open(ino, flags)
            try:
                if trunc:
                    await self.views.setattr(self.ino(path), SetAttr(size=0), fh)
                self.views.write(fh, offset, data)
                await self.views.fsync(fh, False)
            finally:
                self.views.release(fh)

        await self._retry(go)

    async def chmod(self, path: str, mode: int) -> None:
        async def go():  # type: ignore[no-untyped-def]
            await self.views.setattr(self.ino(path), SetAttr(mode=mode))

        await self._retry(go)

    def listdir(self, path: str) -> list[str]:
        fh = self.views.opendir(self.ino(path))
        try:
            entries = self.views.readdir(fh, 0)
            return [n.decode() for n, _, _ in entries if n not in (b".", b"..")]
        finally:
            self.views.releasedir(fh)

    def unlink(self, path: str) -> None:
        self.views.unlink(*self.parent(path))

    def rmdir(self, path: str) -> None:
        self.views.rmdir(*self.parent(path))

    def mkdir(self, path: str, mode: int = 0o755) -> None:
        p, n = self.parent(path)
        self.views.mkdir(p, n, mode, 0, 0)

    async def rename(self, a: str, b: str) -> None:
        async def go():  # type: ignore[no-untyped-def]
            pa, na = self.parent(a)
            pb, nb = self.parent(b)
            await self.views.rename(pa, na, pb, nb)

        await self._retry(go)

    def exists(self, path: str) -> bool:
        try:
            self.ino(path)
            return True
        except FsError as e:
            if e.errno == errno.ENOENT:
                return False
            raise
