"""Choosing the current header among the four copies (spec 3.1), blind to version and features,
and telling a torn commit (a crash: nothing acknowledged lost) from damage (a possible
roll-back, never silent).

Each slot is written as a primary copy, made durable, then a mirror copy (spec 9), so a single
crash damages at most one copy of one slot: a slot left with no intact copy is damage.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from vfs.errors import CorruptionError, FormatError
from vfs.image import layout as L
from vfs.image.fileio import ImageFile

log = logging.getLogger(__name__)

INTACT, BLANK, DAMAGED = "intact", "blank", "damaged"


@dataclass
class Copy:
    """One of the four header copies as found on disk."""

    slot: int
    mirror: bool
    offset: int
    state: str
    sequence: int | None
    raw: bytes

    @property
    def where(self) -> str:
        return f"slot {self.slot} {'mirror' if self.mirror else 'primary'} at {self.offset:#x}"


@dataclass
class HeaderChoice:
    """The current header and what the other copies say about it."""

    header: L.Header
    #: The copy it was parsed from.
    source: Copy
    copies: list[Copy]
    #: Torn writes and other findings a crash explains (informational).
    notes: list[str] = field(default_factory=list)
    #: Damaged copies of the current slot whose twin is intact (corruption, repairable).
    damaged: list[str] = field(default_factory=list)
    #: Set when a newer commit may have been lost (the image may have rolled back).
    fallback: str | None = None

    @property
    def slot(self) -> int:
        return self.source.slot

    @property
    def bytes(self) -> bytes:
        """The exact header bytes of the current copy (what a heal writes)."""
        length = int.from_bytes(self.source.raw[12:16], "little")
        return self.source.raw[:length]


def _classify(buf: bytes, slot: int, mirror: bool, offset: int) -> Copy:
    seq = L.copy_sequence(buf)
    if seq is not None:
        state = INTACT
    elif L.is_blank(buf):
        state = BLANK
    else:
        state = DAMAGED
    return Copy(slot, mirror, offset, state, seq, bytes(buf))


def read_copies(f: ImageFile) -> list[Copy]:
    buf = f.pread(L.HEADER_AREA, 0)
    buf = buf + bytes(L.HEADER_AREA - len(buf))
    out = []
    for slot in (0, 1):
        for mirror, offsets in ((False, L.HEADER_SLOT_OFFSETS), (True, L.HEADER_MIRROR_OFFSETS)):
            o = offsets[slot]
            out.append(_classify(buf[o : o + L.HEADER_SLOT_SIZE], slot, mirror, o))
    return out


def choose_header(f: ImageFile) -> HeaderChoice:
    """The current header (spec 3.1): the intact copy with the highest sequence, parsed fully
    (an unknown version or incompatible feature in it is refused, never skipped)."""
    copies = read_copies(f)
    intact = [c for c in copies if c.state == INTACT]
    if not intact:
        if not any(c.raw[:8] == L.MAGIC for c in copies):
            raise FormatError(f"{f.path}: not a vimg image")
        raise FormatError(f"{f.path}: no valid vimg header (every copy fails its checksum)")
    # highest sequence; between equal ones the primary
    best = max(intact, key=lambda c: (c.sequence, not c.mirror))
    choice = HeaderChoice(L.unpack_header(best.raw), best, copies)
    seq = best.sequence
    for slot in (0, 1):
        primary, mirror = copies[2 * slot], copies[2 * slot + 1]
        if slot == best.slot:
            for c in (primary, mirror):
                if c.state == INTACT and c.sequence == seq:
                    continue
                if c.mirror and primary.state == INTACT and primary.sequence == seq:
                    # the mirror is written after the primary is durable: a crash between
                    # the two leaves it old, blank or torn
                    choice.notes.append(f"{c.where} is {c.state} (a commit's mirror not written)")
                else:
                    choice.damaged.append(
                        f"{c.where} is {c.state} while its twin holds the current header"
                    )
            continue
        states = (primary.state, mirror.state)
        if INTACT in states or states == (BLANK, BLANK):
            if primary.state == DAMAGED:
                choice.notes.append(f"{primary.where}: torn header write (an interrupted commit)")
            continue
        if states == (DAMAGED, BLANK):
            choice.notes.append(f"{primary.where}: torn header write (an interrupted commit)")
            continue
        choice.fallback = (
            f"header slot {slot} has no intact copy ({primary.state} primary, {mirror.state} "
            f"mirror): a commit newer than sequence {seq} may have been lost, and the image "
            f"may have rolled back to it"
        )
    return choice


def read_current_header(f: ImageFile) -> L.Header:
    return choose_header(f).header


def refuse_fallback(path: str, choice: HeaderChoice) -> None:
    """A writer must not continue from a possibly rolled-back header without a repair."""
    if choice.fallback:
        raise CorruptionError(
            f"{path}: {choice.fallback}; refusing to write. Run 'vimg check -r all' to accept "
            f"sequence {choice.header.sequence} (and 'vimg verify' to check the data)"
        )


def heal(f: ImageFile, choice: HeaderChoice) -> bool:
    """Before a writer's first commit (spec 9): rewrite every copy of the current slot that is
    not an exact copy of the current header, and a damaged mirror of the other slot (with that
    slot's intact primary, or zeros), so that no later single crash can leave a slot with no
    intact copy. Returns whether anything was written (and fsynced)."""
    good = choice.bytes.ljust(L.HEADER_SLOT_SIZE, b"\0")
    writes: list[tuple[int, bytes]] = []
    for c in choice.copies:
        if c.slot == choice.slot:
            if c.raw != good:
                writes.append((c.offset, good))
        elif c.mirror and c.state == DAMAGED:
            primary = choice.copies[2 * c.slot]
            fill = primary.raw if primary.state == INTACT else bytes(L.HEADER_SLOT_SIZE)
            writes.append((c.offset, fill))
    for off, data in writes:
        f.pwrite(data, off)
    if writes:
        f.fsync()
        for msg in choice.damaged:
            log.warning("%s: %s: rewritten from the intact copy", f.path, msg)
    return bool(writes)
