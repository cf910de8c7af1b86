"""A small QMP client of our own, on trio (see :mod:`vmctl.qmp.client` for the design).

Layers: :mod:`vmctl.qmp.framing` turns bytes into checked messages with no I/O (fuzzed with
hostile input); :mod:`vmctl.qmp.client` is the connection, its states, commands and events.
Errors are in :mod:`vmctl.errors`.
"""

from vmctl.qmp.client import EventListener, QMPClient, Runstate, open_qmp
from vmctl.qmp.framing import Event

__all__ = ["Event", "EventListener", "QMPClient", "Runstate", "open_qmp"]
