"""The configuration file's ``[[device]]`` tables as candidates: devices that are
not discovered (a serial scanner, a fixed SANE name), each naming its driver."""

from __future__ import annotations

from stillsvc.discovery import Sink
from stillsvc.driver import Candidate, DeviceConfig


def candidate_of(device: DeviceConfig) -> Candidate:
    return Candidate(id=device.id, subsystem="config", port=device.port, name=device.name, driver=device.driver,
                     options=dict(device.options))


class ConfigDiscovery:
    name = "config"

    def __init__(self, devices: tuple[DeviceConfig, ...] | list[DeviceConfig]) -> None:
        self.devices = list(devices)

    async def start(self, sink: Sink) -> None:
        for device in self.devices:
            await sink.found(candidate_of(device))

    async def stop(self) -> None:
        return None
