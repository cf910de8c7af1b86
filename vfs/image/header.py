"""Choosing the current header among the slots (spec section 3), blind to version and features."""

from __future__ import annotations

from dataclasses import dataclass, field

from vfs.errors import FormatError
from vfs.image import layout as L
from vfs.image.fileio import ImageFile


@dataclass
class HeaderChoice:
    """The current header and what was found on the way to it."""

    header: L.Header
    slot: int
    notes: list[str] = field(default_factory=list)
    #: Set when a newer commit may have been lost (the image rolled back): never silent.
    fallback: str | None = None


def choose_header(f: ImageFile) -> HeaderChoice:
    """The intact header slot with the higher sequence number (crash model, spec section 7).

    A slot that fails its checksum is a torn write (or damage) and is ignored; the chosen slot is
    then parsed fully, so an unknown incompatible feature in it is refused, never skipped."""
    buf = f.pread(L.HEADER_AREA, 0)
    best: tuple[int, int] | None = None
    for i, off in enumerate(L.HEADER_SLOT_OFFSETS):
        seq = L.slot_sequence(buf[off : off + L.HEADER_SLOT_SIZE])
        if seq is not None and (best is None or seq > best[0]):
            best = (seq, i)
    if best is None:
        if not any(buf[o : o + 8] == L.MAGIC for o in L.HEADER_SLOT_OFFSETS):
            raise FormatError(f"{f.path}: not a vimg image")
        raise FormatError(f"{f.path}: no valid vimg header (both slots fail their checksum)")
    off = L.HEADER_SLOT_OFFSETS[best[1]]
    return HeaderChoice(L.unpack_header(buf[off : off + L.HEADER_SLOT_SIZE]), best[1])


def read_current_header(f: ImageFile) -> L.Header:
    return choose_header(f).header
