"""SANE devices as candidates: what libsane lists (``sane_get_devices``) at start.

The listing runs in a SANE worker process (:mod:`stillsvc.driver.sane`), never in
the service: with the stock configuration some backends probe the network for
seconds. :meth:`SaneDiscovery.start` waits for it up to ``START_WAIT`` seconds
and lets it finish in the background after that. SANE itself has no hotplug;
USB scanners that come and go are udev's (candidates marked
``libsane_matched=yes``), so when udev discovery runs this backend leaves out
the SANE names that carry a USB bus address (``…libusb:BBB:DDD``).

Names that would loop back into the service are never reported
(:func:`own_server_rule`), nor names the ``[sane] exclude`` patterns match.
"""

from __future__ import annotations

import asyncio
import fnmatch
import re
import socket
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import structlog

from stillsvc.common.errors import StillError
from stillsvc.core.config import Config
from stillsvc.discovery import Sink
from stillsvc.driver import Candidate
from stillsvc.driver.sane import SaneProcess

log = structlog.get_logger(__name__)

#: How long the daemon's start waits for libsane's device list.
START_WAIT = 5.0
_USB_ADDRESS = re.compile(r"libusb:\d{3}:\d{3}")


def own_server_patterns(config: Config, hostname: str | None = None) -> tuple[str, ...]:
    """SANE names that lead back into this service: the ``net`` backend reaching its
    SANE server, the ``escl`` backend reaching its eSCL server."""
    host = hostname if hostname is not None else socket.gethostname()
    local = ("localhost", "127.*", "::1", "[[]::1]", host, f"{host}.local")
    patterns: list[str] = []

    def hosts(listen: tuple[str, ...]) -> list[str]:
        found: list[str] = []
        for address in listen:
            if address in ("0.0.0.0", "::") or address.startswith("127.") or address == "::1":
                found.extend(local)
            found.append(f"[[]{address}]" if ":" in address else address)
        return list(dict.fromkeys(found))

    if config.saned is not None:
        patterns += [f"net:{h}:*" for h in hosts(config.saned.listen)]
    if config.escl is not None:
        port = config.escl.port
        for h in hosts(config.escl.listen):
            patterns += [f"escl:http://{h}:{port}*", f"escl:https://{h}:{port}*"]
    return tuple(patterns)


def own_server_rule(config: Config, announced: Callable[[], set[str]] = set) -> Callable[[str], str]:
    """The rule the bridge applies to every SANE name: why it is not bridged, or "".

    ``announced`` gives the DNS-SD instance names the eSCL server announces now:
    ``airscan:<id>:<instance>`` reaches the service itself when it is one of them."""
    own = own_server_patterns(config)
    excluded = config.sane.exclude

    def rule(name: str) -> str:
        for pattern in own:
            if fnmatch.fnmatchcase(name, pattern):
                return "it leads back into this service's own SANE or eSCL server"
        if name.startswith("airscan:") and name.split(":", 2)[-1] in announced():
            return "it is this service's own eSCL server, found through mDNS"
        for pattern in excluded:
            if fnmatch.fnmatchcase(name, pattern):
                return f"it matches {pattern!r} in [sane] exclude"
        return ""

    return rule


def candidate_of(device: dict[str, str]) -> Candidate:
    name = device["name"]
    return Candidate(id=name, subsystem="sane", port=name, name=" ".join(
        p for p in (device.get("vendor"), device.get("model"), device.get("type")) if p),
        vendor=device.get("vendor", ""), model=device.get("model", ""),
        options={"vendor": device.get("vendor", ""), "model": device.get("model", ""), "type": device.get("type", "")})


class SaneDiscovery:
    name = "sane"

    def __init__(self, excluded: Callable[[str], str], *, udev: bool, timeout: float,
                 configured: frozenset[str] = frozenset()) -> None:
        self.excluded = excluded
        #: SANE names a [[device]] table bridges already (under its own id).
        self.configured = configured
        self.udev = udev
        self.timeout = timeout
        self._task: asyncio.Task[None] | None = None
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="sane-discovery")

    async def start(self, sink: Sink) -> None:
        self._task = asyncio.get_running_loop().create_task(self._discover(sink))
        done, _ = await asyncio.wait({self._task}, timeout=START_WAIT)
        if not done:
            log.info("libsane is still listing its devices; they are added when it is done", waited_s=START_WAIT)

    async def _discover(self, sink: Sink) -> None:
        loop = asyncio.get_running_loop()
        try:
            devices = await loop.run_in_executor(self._executor, self._list)
        except StillError as e:
            log.error("SANE discovery failed", error=e.message)
            return
        for device in devices:
            name = device.get("name", "")
            why = self.excluded(name)
            if why:
                log.info("SANE device not bridged", sane_name=name, reason=why)
                continue
            if name in self.configured:
                log.debug("SANE device configured already", sane_name=name)
                continue
            if self.udev and _USB_ADDRESS.search(name):
                log.debug("SANE device left to udev discovery", sane_name=name)
                continue
            await sink.found(candidate_of(device))

    def _list(self) -> list[dict[str, str]]:
        process = SaneProcess("", self.timeout)
        try:
            return process.devices(local_only=False)
        finally:
            process.stop()

    async def stop(self) -> None:
        if self._task is not None and not self._task.done():
            self._task.cancel()
        self._executor.shutdown(wait=False)


__all__ = ["SaneDiscovery", "candidate_of", "own_server_patterns", "own_server_rule"]
