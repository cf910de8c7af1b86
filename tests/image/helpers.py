"""Shared helpers of the image tests: a write-stream recorder for power-failure replay."""

from __future__ import annotations

from vfs.image.fileio import ImageFile


class Recorder:
    """Wraps every ImageFile the image opens; logs pwrite/truncate/fsync in order."""

    def __init__(self) -> None:
        self.ops: list[tuple] = []

    def opener(self, path: str, writable: bool, create: bool) -> ImageFile:
        rec = self

        class RecordingFile(ImageFile):
            def pwrite(self, data: bytes, offset: int) -> None:
                rec.ops.append(("w", offset, bytes(data)))
                super().pwrite(data, offset)

            def truncate(self, size: int) -> None:
                rec.ops.append(("t", size))
                super().truncate(size)

            def punch(self, offset: int, length: int) -> None:
                rec.ops.append(("p", offset, length))
                super().punch(offset, length)

            def fsync(self) -> None:
                rec.ops.append(("sync",))
                super().fsync()

        return RecordingFile(path, writable=writable, create=create)


def apply_ops(path: str, ops: list[tuple]) -> None:
    """Replay recorded operations onto a fresh file at ``path``."""
    import os

    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        for op in ops:
            if op[0] == "w":
                os.pwrite(fd, op[2], op[1])
            elif op[0] == "t":
                os.ftruncate(fd, op[1])
            elif op[0] == "p":  # a punched hole reads as zeros
                os.pwrite(fd, bytes(op[2]), op[1])
    finally:
        os.close(fd)


def current_header(path: str):
    """The current header of the image at ``path`` (parsed by the reader's own rules)."""
    from vfs.image.fileio import ImageFile
    from vfs.image.header import read_current_header

    f = ImageFile(path, writable=False)
    try:
        return read_current_header(f)
    finally:
        f.close()


def write_header(path: str, h, *, mirror: bool = True) -> None:
    """Write header ``h`` into both copies (or only the primary) of slot ``h.sequence % 2``,
    as a commit would (tests that forge headers: features, lengths, hostile values)."""
    from vfs.image import layout as L

    slot = L.pack_header(h).ljust(L.HEADER_SLOT_SIZE, b"\0")
    with open(path, "r+b") as f:
        f.seek(L.HEADER_SLOT_OFFSETS[h.sequence % 2])
        f.write(slot)
        if mirror:
            f.seek(L.HEADER_MIRROR_OFFSETS[h.sequence % 2])
            f.write(slot)


def reseal(buf: bytearray) -> bytes:
    """Recompute the checksum of a (mutated) header copy at the position its slot_length says."""
    import struct

    import xxhash

    (length,) = struct.unpack_from("<I", buf, 12)
    if 32 <= length <= len(buf) and length % 8 == 0:
        struct.pack_into("<Q", buf, length - 8, xxhash.xxh3_64_intdigest(bytes(buf[: length - 8])))
    return bytes(buf)
