"""USB devices through udev (pyudev): what is plugged in at start, then every
``add``, ``remove``, ``change``, ``bind`` and ``unbind`` as it happens.

The monitor's netlink socket is watched by the event loop (``add_reader``): no
thread, no timer, so an idle service does not wake up. Each USB device (hubs
aside) becomes a :class:`~stillsvc.driver.Candidate` with what drivers match on
— vendor and product ids, serial number, interface triples
(``ID_USB_INTERFACES``) and every udev property, among them those the
distribution's hardware databases set: ``libsane_matched=yes`` (SANE),
``ID_GPHOTO2=1`` and ``GPHOTO2_DRIVER`` (libgphoto2), ``ID_STILLSVC=1`` (our
rules). ``ID_STILLSVC_DRIVER=<name>`` (set in a hwdb file or a rule) names the
driver outright. Serial ports are not watched: a serial line can carry
anything, so the service uses one only when the configuration names it.

Identity. A candidate's id is ``<vendor>-<product>-<serial>`` (4 hex digits
each, then udev's ``ID_SERIAL_SHORT``), so that it is the same after a replug,
on another port, and after a reboot. A device without a serial number is told
apart by where it is plugged in: ``<vendor>-<product>-at-<port>``, the port
being udev's ``ID_PATH_TAG`` (the physical path, stable across reboots) or,
without it, the sysfs name (``1-2.3``). When two present devices claim the
same serial number, the second one gets ``<vendor>-<product>-<serial>-at-<port>``.
The device manager puts the driver's name in front (``ptp-04a9-3218-…``).

Order. Events of one device are handled one at a time, in order; different
devices are handled side by side, so one slow driver does not hold up another
device. A device's events that are still waiting are folded: a removal makes
everything before it moot, and of several changes only the last counts.
"""

from __future__ import annotations

import asyncio
from collections import deque
from dataclasses import dataclass, field
from typing import Any, ClassVar

import structlog

from stillsvc.common.names import stable_id
from stillsvc.discovery import Sink
from stillsvc.driver import Candidate

log = structlog.get_logger(__name__)

#: USB device class of hubs: never a candidate.
HUB_CLASS = 0x09


def parse_interfaces(text: str) -> tuple[tuple[int, int, int], ...]:
    """udev's ID_USB_INTERFACES (``:060101:030102:``) as (class, subclass, protocol) triples."""
    triples = []
    for entry in text.split(":"):
        if len(entry) == 6:
            try:
                triples.append((int(entry[0:2], 16), int(entry[2:4], 16), int(entry[4:6], 16)))
            except ValueError:
                continue
    return tuple(triples)


def _hex(value: str | None) -> int | None:
    try:
        return int(value, 16) if value else None
    except ValueError:
        return None


def _int(value: str | None) -> int | None:
    try:
        return int(value, 10) if value else None
    except ValueError:
        return None


def _text(value: str | None) -> str:
    """A udev string property (``Canon_Inc.`` style: underscores for spaces)."""
    return (value or "").replace("_", " ").strip()


@dataclass
class Snapshot:
    """What a uevent said about a device: its properties and the sysfs attributes
    we use, copied at once (a pyudev Device reads sysfs lazily, and sysfs may be
    gone by the time the event is handled)."""

    ATTRIBUTES: ClassVar[tuple[str, ...]] = ("idVendor", "idProduct", "serial", "manufacturer", "product",
                                             "busnum", "devnum", "bDeviceClass")

    path: str
    sys_name: str
    action: str = "add"
    properties: dict[str, str] = field(default_factory=dict)
    attributes: dict[str, str] = field(default_factory=dict)

    @classmethod
    def of(cls, device: Any) -> Snapshot:
        """A pyudev Device's snapshot (a device enumerated at start is an ``add``)."""
        snap = cls(path=device.device_path, sys_name=device.sys_name, action=device.action or "add",
                   properties={str(k): str(v) for k, v in device.properties.items()})
        if snap.action != "remove":
            for name in cls.ATTRIBUTES:
                try:
                    snap.attributes[name] = device.attributes.asstring(name).strip()
                except (KeyError, OSError, UnicodeDecodeError):
                    pass
        return snap

    def get(self, prop: str, attribute: str | None = None) -> str:
        value = self.properties.get(prop, "")
        if not value and attribute:
            value = self.attributes.get(attribute, "")
        return value


def candidate_of(snap: Snapshot, taken: frozenset[str] = frozenset(), known: str | None = None) -> Candidate | None:
    """The candidate a USB device is, or None for a hub or a device that says too
    little (no vendor or product id). ``taken``: ids other present devices have;
    ``known``: the id the device has already (it keeps its port-based one)."""
    vendor_id = _hex(snap.get("ID_VENDOR_ID", "idVendor"))
    product_id = _hex(snap.get("ID_MODEL_ID", "idProduct"))
    if vendor_id is None or product_id is None:
        return None
    interfaces = parse_interfaces(snap.properties.get("ID_USB_INTERFACES", ""))
    device_class = _hex(snap.attributes.get("bDeviceClass"))
    if device_class == HUB_CLASS or (interfaces and all(i[0] == HUB_CLASS for i in interfaces)):
        return None
    ids = (f"{vendor_id:04x}", f"{product_id:04x}")
    serial = snap.get("ID_SERIAL_SHORT", "serial")
    where = snap.properties.get("ID_PATH_TAG") or snap.sys_name
    if serial:
        candidate_id = stable_id(*ids, serial)
        by_port = stable_id(*ids, serial, "at", where)
        if candidate_id in taken or known == by_port:
            candidate_id = by_port
    else:
        candidate_id = stable_id(*ids, "at", where)
    vendor = (snap.attributes.get("manufacturer") or _text(snap.properties.get("ID_VENDOR_FROM_DATABASE"))
              or _text(snap.properties.get("ID_VENDOR")))
    model = (snap.attributes.get("product") or _text(snap.properties.get("ID_MODEL_FROM_DATABASE"))
             or _text(snap.properties.get("ID_MODEL")))
    busnum = _int(snap.get("BUSNUM", "busnum"))
    devnum = _int(snap.get("DEVNUM", "devnum"))
    port = f"usb:{busnum:03d}:{devnum:03d}" if busnum is not None and devnum is not None else ""
    name = " ".join(part for part in (vendor, model) if part) or f"USB device {ids[0]}:{ids[1]}"
    return Candidate(id=candidate_id, subsystem="usb", port=port, name=name,
                     driver=snap.properties.get("ID_STILLSVC_DRIVER", ""), vendor=vendor, model=model,
                     vendor_id=vendor_id, product_id=product_id, serial=serial, interfaces=interfaces,
                     properties=snap.properties)


class UdevDiscovery:
    """The udev discovery backend (needs pyudev: ``pip install stillsvc[udev]``)."""

    name = "udev"

    def __init__(self) -> None:
        self.sink: Sink | None = None
        self.monitor: Any = None
        self.loop: asyncio.AbstractEventLoop | None = None
        #: Candidate id of each device that has one, by sysfs path.
        self.known: dict[str, str] = {}
        #: Events waiting, and the task handling them, by sysfs path.
        self.pending: dict[str, deque[Snapshot]] = {}
        self.workers: dict[str, asyncio.Task[None]] = {}

    async def start(self, sink: Sink) -> None:
        try:
            import pyudev
        except ImportError:
            raise RuntimeError("pyudev is not installed (pip install 'stillsvc[udev]'); "
                               "USB devices will not be discovered") from None
        self.sink = sink
        self.loop = asyncio.get_running_loop()
        context = pyudev.Context()
        # The monitor first, then the enumeration: a device plugged in between is
        # seen twice rather than never (handling a device twice is harmless).
        monitor = pyudev.Monitor.from_netlink(context)
        monitor.filter_by("usb", "usb_device")
        monitor.start()
        self.monitor = monitor
        self.loop.add_reader(monitor.fileno(), self._readable)
        for device in context.list_devices(subsystem="usb", DEVTYPE="usb_device"):
            self._queue(Snapshot.of(device))
        # Return once the devices present at start are added (or have failed).
        if self.workers:
            await asyncio.wait(list(self.workers.values()))
        log.info("udev discovery started", devices=len(self.known))

    async def stop(self) -> None:
        if self.monitor is not None and self.loop is not None:
            self.loop.remove_reader(self.monitor.fileno())
            self.monitor = None
        for task in list(self.workers.values()):
            task.cancel()
        self.workers.clear()
        self.pending.clear()

    def _readable(self) -> None:
        """The monitor's socket has events: take them all now (the socket must not fill up)."""
        monitor = self.monitor
        if monitor is None:
            return
        while True:
            try:
                device = monitor.poll(timeout=0)
            except Exception as e:  # a malformed message must not stop discovery
                log.warning("unreadable udev event", error=str(e))
                continue
            if device is None:
                return
            self._queue(Snapshot.of(device))

    def _queue(self, snap: Snapshot) -> None:
        queue = self.pending.setdefault(snap.path, deque())
        if snap.action == "remove":
            queue.clear()  # whatever was waiting before the device went is moot
        elif queue and queue[-1].action != "remove":
            queue.pop()  # the newer event says what the device is now
        queue.append(snap)
        if snap.path not in self.workers:
            assert self.loop is not None
            self.workers[snap.path] = self.loop.create_task(self._work(snap.path))

    async def _work(self, path: str) -> None:
        queue = self.pending[path]
        try:
            while queue:
                snap = queue.popleft()
                try:
                    await self._handle(snap)
                except Exception:
                    log.exception("udev event not handled", action=snap.action, path=path)
        finally:
            self.workers.pop(path, None)
            if not queue:
                self.pending.pop(path, None)

    async def _handle(self, snap: Snapshot) -> None:
        assert self.sink is not None
        known = self.known.get(snap.path)
        if snap.action == "remove":
            if known is not None:
                del self.known[snap.path]
                log.debug("usb device removed", candidate=known, path=snap.path)
                await self.sink.lost(known)
            return
        taken = frozenset(cid for p, cid in self.known.items() if p != snap.path)
        candidate = candidate_of(snap, taken, known)
        if known is not None and (candidate is None or candidate.id != known):
            del self.known[snap.path]  # it says something else about itself now
            await self.sink.lost(known)
        if candidate is None:
            return
        self.known[snap.path] = candidate.id
        log.debug("usb device", action=snap.action, candidate=candidate.id, path=snap.path, port=candidate.port)
        await self.sink.found(candidate)
