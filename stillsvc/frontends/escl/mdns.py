"""mDNS (DNS-SD) announcements of the eSCL server: one ``_uscan._tcp`` service
(``_uscans._tcp`` over HTTPS) per exported scanner, registered when the device
appears and withdrawn when it goes, on the server's listen addresses only
(python-zeroconf).

The TXT record holds what clients read (Mopria's eSCL specification, as
sane-airscan, macOS and Windows use it): ``txtvers``, ``vers``, ``rs`` (the
device's base path without the leading slash), ``ty`` (its name), ``note``,
``pdl`` (formats), ``cs`` (colour spaces), ``is`` (input sources), ``duplex``
and ``UUID`` (stable for the device on this machine).
"""

from __future__ import annotations

import asyncio
import socket
from typing import Any

import structlog
from zeroconf import IPVersion, ServiceInfo
from zeroconf.asyncio import AsyncZeroconf

from stillsvc.core.devices import Device
from stillsvc.core.listener import Listener
from stillsvc.frontends.escl import documents
from stillsvc.frontends.escl.server import EsclServer, device_uuid

log = structlog.get_logger(__name__)

SERVICE_TYPE = "_uscan._tcp.local."
#: eSCL over HTTPS.
SECURE_SERVICE_TYPE = "_uscans._tcp.local."
#: A DNS-SD instance name is at most 63 bytes.
MAX_NAME = 63


class Announcer(Listener):
    """Keeps one ``_uscan._tcp`` service registered per exported device."""

    def __init__(self, server: EsclServer) -> None:
        self.server = server
        self.zeroconf: AsyncZeroconf | None = None
        self.services: dict[str, ServiceInfo] = {}
        self._tasks: set[asyncio.Task[Any]] = set()
        self._lock = asyncio.Lock()

    def instance_names(self) -> set[str]:
        """The DNS-SD instance names announced now."""
        return {info.name[:-len(info.type) - 1] for info in self.services.values()}

    async def start(self) -> None:
        listen = list(self.server.config.listen)
        version = IPVersion.All if any(":" in a for a in listen) else IPVersion.V4Only
        interfaces: Any = "All" if any(a in ("0.0.0.0", "::") for a in listen) else listen
        self.zeroconf = AsyncZeroconf(interfaces=interfaces, ip_version=version)
        self.server.manager.listeners.append(self)
        for device in self.server.exported():
            self._spawn(self._register(device))

    async def stop(self) -> None:
        if self in self.server.manager.listeners:
            self.server.manager.listeners.remove(self)
        for task in list(self._tasks):
            task.cancel()
        if self.zeroconf is not None:
            try:
                await asyncio.wait_for(self.zeroconf.async_unregister_all_services(), 3)
            except Exception as e:
                log.debug("mDNS withdrawal at stop incomplete", error=str(e) or type(e).__name__)
            await self.zeroconf.async_close()
            self.zeroconf = None

    # -- the core's notifications -----------------------------------------------------------
    def device_added(self, device: Device) -> None:
        if device in self.server.exported():
            self._spawn(self._register(device))

    def device_removed(self, device: Device) -> None:
        self._spawn(self._unregister(device.id))

    # -- registration -----------------------------------------------------------------------------
    def _spawn(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def info_for(self, device: Device) -> ServiceInfo:
        exported = self.server.exported()
        base = "eSCL" if exported and exported[0] is device else f"eSCL/{device.id}"
        caps = device.info.capabilities
        sources = ["platen"] if "flatbed" in caps or not caps else []
        if "feeder" in caps:
            sources.append("adf")
        name = (device.info.name or device.id)[:MAX_NAME].replace(".", " ")
        properties = {
            "txtvers": "1", "vers": documents.VERSION, "rs": base, "ty": name,
            "note": f"stillsvc device {device.id}", "pdl": ",".join(documents.FORMATS),
            "cs": "color,grayscale,binary", "is": ",".join(sources),
            "duplex": "T" if "duplex" in caps else "F",
            "UUID": device_uuid(device.id, self.server.machine),
        }
        addresses = [socket.inet_pton(socket.AF_INET6 if ":" in a else socket.AF_INET, a)
                     for a in self.server.config.listen if a not in ("0.0.0.0", "::")]
        kind = SECURE_SERVICE_TYPE if self.server.secure else SERVICE_TYPE
        return ServiceInfo(kind, f"{name}.{kind}", port=self.server.config.port,
                           properties=properties, addresses=addresses or None,
                           server=f"stillsvc-{device_uuid(device.id, self.server.machine)[:8]}.local.")

    async def _register(self, device: Device) -> None:
        async with self._lock:
            if self.zeroconf is None or device.id in self.services or device.disconnected:
                return
            info = self.info_for(device)
            try:
                await self.zeroconf.async_register_service(info, allow_name_change=True)
            except Exception as e:
                log.warning("mDNS announcement failed", device=device.id, error=str(e) or type(e).__name__)
                return
            self.services[device.id] = info
            log.info("eSCL scanner announced", device=device.id, service=info.name)

    async def _unregister(self, device_id: str) -> None:
        async with self._lock:
            info = self.services.pop(device_id, None)
            if info is None or self.zeroconf is None:
                return
            try:
                await self.zeroconf.async_unregister_service(info)
            except Exception as e:
                log.warning("mDNS withdrawal failed", device=device_id, error=str(e) or type(e).__name__)
                return
            log.info("eSCL scanner withdrawn", device=device_id, service=info.name)


__all__ = ["Announcer", "SECURE_SERVICE_TYPE", "SERVICE_TYPE"]
