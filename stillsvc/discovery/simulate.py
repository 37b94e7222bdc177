"""``--simulate``: the built-in simulated scanner ``sim0``, for trying the service
out and for tests. A configured device with the id ``sim0`` takes its place."""

from __future__ import annotations

from stillsvc.discovery import Sink
from stillsvc.driver import Candidate

SIMULATED = Candidate(id="sim0", subsystem="config", driver="sim", name="Simulated Scanner")


class SimulatedDiscovery:
    name = "simulate"

    def __init__(self, taken: set[str] | None = None) -> None:
        #: Ids the configuration already uses: then the configured device is sim0.
        self.taken = taken or set()

    async def start(self, sink: Sink) -> None:
        if SIMULATED.id not in self.taken:
            await sink.found(SIMULATED)

    async def stop(self) -> None:
        return None
