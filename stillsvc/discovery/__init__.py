"""Discovery backends: where devices come from.

A backend finds devices and hands each on as a :class:`~stillsvc.driver.Candidate`
to a :class:`Sink` (the device manager): at start, what is there already; later,
what appears and goes. It never chooses a driver — the matcher does, from what
the drivers declare — and it never opens a device. The configuration file
(:mod:`.config`) and ``--simulate`` (:mod:`.simulate`) are backends; udev, SANE
and mDNS are next. Backends are wired to the manager in ``stillsvc.daemon``.
"""

from __future__ import annotations

from typing import Protocol

from stillsvc.driver import Candidate


class Sink(Protocol):
    """What a backend reports to. Both wait until the device is added or removed,
    so that a backend's start returns when the devices present at start are there."""

    async def found(self, candidate: Candidate) -> None: ...

    async def lost(self, candidate_id: str) -> None: ...


class Backend(Protocol):
    name: str

    async def start(self, sink: Sink) -> None:
        """Report every device present now; follow hotplug from here on (if the backend can)."""
        ...

    async def stop(self) -> None: ...


__all__ = ["Backend", "Candidate", "Sink"]
