"""The minidriver API: what a driver for a scanner or camera implements.

A minidriver is a Python class, found through the ``stillsvc.drivers`` entry-point
group and matched to devices declaratively (:class:`Match`, in the manner of an
``.inf`` file). It covers both halves of the still-image model:

*Device half* — open the port for a mode, lock/unlock hooks, status, reset,
diagnostic, escape, raw data/command I/O and a source of device events.

*Item half* — build the driver item tree, validate and write item properties,
acquire image data in bands, and device commands such as ``synchronize``.

Every method here is **blocking** and is called by the service in a worker
thread, never on its event loop, one at a time. Apart from :meth:`initialize`,
:meth:`shutdown` and the property checks that touch no device
(:meth:`valid_values`, :meth:`validate_properties`), every call happens while
the device lock is held, between :meth:`lock` and :meth:`unlock`.

Modes. A device is opened in *status* mode (many clients, long-lived) or *data*
mode (one client, short) or both. Calls that belong to a session carry that
session's :class:`Mode` (:meth:`lock` the mode of whoever takes the lock; the
service's own holds are status mode), so a driver always knows how it is being
used — a driver on a shared serial line, say, may open the port in :meth:`lock`
for status reads only. The service itself refuses transfers and raw data I/O to
sessions without data mode before anything reaches the driver;
:meth:`require_data` lets a driver check again.

Ports. A driver on a *dedicated* port (USB) opens it in :meth:`initialize`; a
driver on a *shared* port (a serial line other devices may use) opens it only in
:meth:`lock` and closes it in :meth:`unlock` (see :mod:`stillsvc.driver.serialport`).
When another program takes the device (``stillctl lock``), the service calls
:meth:`release_port` and, when it gets the device back, :meth:`reclaim_port`.

Events. A driver that is told of events by its device (interrupt endpoint, a
simulator) sets ``events = EventSource.PUSH`` and calls ``host.emit_event`` from
any thread; one that must ask sets ``EventSource.POLL`` and implements
:meth:`poll_events`, which the service calls at a configured interval under the
device lock, and never while a data-mode client or another program holds it.
"""

from __future__ import annotations

import enum
import fnmatch
import threading
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar, Protocol

from stillsvc.common.errors import AccessDenied, NotSupported
from stillsvc.common.names import stable_id
from stillsvc.driver.items import DriverItem, Valid


class Mode(enum.Flag):
    STATUS = 1
    DATA = 2
    BOTH = STATUS | DATA

    @classmethod
    def parse(cls, text: str) -> Mode:
        try:
            return {"status": cls.STATUS, "data": cls.DATA, "both": cls.BOTH}[text]
        except KeyError:
            from stillsvc.common.errors import InvalidArgument, quote

            raise InvalidArgument(f"mode must be 'status', 'data' or 'both', not {quote(text)}") from None

    @property
    def label(self) -> str:
        return {Mode.STATUS: "status", Mode.DATA: "data", Mode.BOTH: "both"}[self]


class EventSource(enum.Enum):
    NONE = "none"
    PUSH = "push"
    POLL = "poll"


class PortPolicy(enum.Enum):
    DEDICATED = "dedicated"  # opened in initialize(), e.g. USB
    SHARED = "shared"  # opened in lock(), closed in unlock(), e.g. a serial line


@dataclass(frozen=True)
class DeviceConfig:
    """What a driver instance is made for: the device's id, the driver's name, the
    port to reach it on, a display name, driver-specific options, and what
    discovery knows of the device (``properties``: for a USB device its udev
    properties, such as ``ID_VENDOR_ID``, ``ID_SERIAL_SHORT``, ``DEVNAME``)."""

    id: str
    driver: str
    port: str = ""
    name: str = ""
    options: dict[str, Any] = field(default_factory=dict)
    properties: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Candidate:
    """A device a discovery backend found, described by what drivers match on.

    ``id`` is the backend's stable id for it, unique among the backend's
    candidates (it survives replugging, see :meth:`device_id`); ``driver`` names a driver outright (a configured device)
    and is empty when the matcher is to choose from the drivers' :class:`Match`
    declarations.
    """

    id: str
    subsystem: str  # "config", "usb", "tty", "sane", "mdns"
    port: str = ""
    name: str = ""
    driver: str = ""
    vendor: str = ""
    model: str = ""
    vendor_id: int | None = None
    product_id: int | None = None
    serial: str = ""
    #: USB interface (class, subclass, protocol) triples, as in udev's ID_USB_INTERFACES.
    interfaces: tuple[tuple[int, int, int], ...] = ()
    #: Properties the distribution's hardware databases set (udev), e.g. libsane_matched=yes.
    properties: Mapping[str, str] = field(default_factory=dict)
    options: Mapping[str, Any] = field(default_factory=dict)

    def device_id(self, driver: str) -> str:
        """The id of the device this candidate becomes with ``driver``: a configured
        device keeps its own; a discovered one is ``<driver>-<id>`` (README,
        "Device ids")."""
        return self.id if self.subsystem == "config" else stable_id(driver, self.id)

    def config(self, driver: str) -> DeviceConfig:
        return DeviceConfig(id=self.device_id(driver), driver=driver, port=self.port, name=self.name,
                            options=dict(self.options), properties=dict(self.properties))


@dataclass(frozen=True)
class Match:
    """What a driver handles, declared (in the manner of an ``.inf`` file): a
    candidate fits when it is of ``subsystem`` and every other given field fits.

    ``interface``: a USB interface the device must have, as (class, subclass,
    protocol) with None for "any" (``(6, 1, 1)``: still image, PTP).
    ``properties``: udev properties that must have these values
    (``(("libsane_matched", "yes"),)``). ``port``: an ``fnmatch`` pattern for the
    candidate's port: a SANE device name (``"test:*"``), an mDNS service type.
    """

    subsystem: str
    vendor_id: int | None = None
    product_id: int | None = None
    interface: tuple[int | None, int | None, int | None] | None = None
    properties: tuple[tuple[str, str], ...] = ()
    port: str | None = None

    def matches(self, candidate: Candidate) -> bool:
        if candidate.subsystem != self.subsystem:
            return False
        if self.vendor_id is not None and candidate.vendor_id != self.vendor_id:
            return False
        if self.product_id is not None and candidate.product_id != self.product_id:
            return False
        if self.interface is not None and not any(
                all(want is None or want == have for want, have in zip(self.interface, triple))
                for triple in candidate.interfaces):
            return False
        if any(candidate.properties.get(key) != value for key, value in self.properties):
            return False
        return self.port is None or fnmatch.fnmatchcase(candidate.port, self.port)

    @property
    def rank(self) -> int:
        """How specific the declaration is, as an ``.inf`` file ranks its matches: the
        device's own ids first, then what a hardware database says of it (udev
        properties) or a name pattern, then a class of interface, then the subsystem
        alone. The most specific match wins."""
        return ((8 if self.vendor_id is not None or self.product_id is not None else 0)
                + (4 if self.properties or self.port is not None else 0)
                + (2 if self.interface is not None else 0))


@dataclass(frozen=True)
class DeviceInfo:
    """What initialize() learnt about the device."""

    name: str
    vendor: str
    model: str
    serial: str = ""
    kind: str = "scanner"  # or "camera"
    capabilities: tuple[str, ...] = ()
    event_names: tuple[str, ...] = ()


@dataclass(frozen=True)
class DeviceEvent:
    """An event as a driver reports it; the service adds the sequence number, and
    the time when the driver gives none (``time``: seconds since the epoch, when
    the driver saw it happen)."""

    name: str
    data: dict[str, Any] = field(default_factory=dict)
    time: float | None = None


@dataclass(frozen=True)
class PageInfo:
    """The geometry of one acquired page (see :class:`stillsvc.imaging.ImageInfo`)."""

    width: int
    height: int
    mode: str
    depth: int
    resolution: int


class Page(Protocol):
    info: PageInfo

    def bands(self) -> Iterator[bytes]:
        """Whole rows, top to bottom, in the raw layout of ``info``."""
        ...


@dataclass(frozen=True)
class FileInfo:
    """A file an item is (a camera's picture), as :meth:`Minidriver.open_file` gives it."""

    name: str
    size: int
    content_type: str


class FileData(Protocol):
    info: FileInfo

    def write_to(self, write: Callable[[bytes | memoryview], None]) -> None:
        """Hand the file's bytes, unchanged, to ``write`` piece by piece (a piece may be
        a view of a buffer that is reused once ``write`` returns)."""
        ...


#: The transfer formats of items that are files: the bytes as the device has them, or its thumbnail.
FILE_VARIANTS = ("native", "thumbnail")


class DriverHost(Protocol):
    """What the service offers a driver. Every method is safe to call from any thread."""

    def emit_event(self, event: DeviceEvent) -> None: ...

    def device_unplugged(self) -> None: ...

    def device_replugged(self) -> None: ...

    def tree_changed(self, event: DeviceEvent | None = None) -> None:
        """The device's items changed by themselves (a picture taken, a card pulled):
        the service rebuilds the tree from :meth:`Minidriver.build_item_tree` (new
        items +1, gone ones -1 and marked dead), then routes ``event``, if any, so
        that whoever gets it finds the item it names."""
        ...

    def device_failed(self, reason: str) -> None:
        """The device stopped working (a backend crashed): shown failed with ``reason``
        until :meth:`Minidriver.recover` succeeds, which the service tries with
        growing waits."""
        ...


class Minidriver:
    """Base class of every minidriver. Subclasses override what their device can do."""

    #: Name used in configuration files and shown to clients.
    name: ClassVar[str] = ""
    #: Devices this driver handles.
    matches: ClassVar[tuple[Match, ...]] = ()
    port_policy: ClassVar[PortPolicy] = PortPolicy.DEDICATED
    events: ClassVar[EventSource] = EventSource.NONE

    def __init__(self, config: DeviceConfig, host: DriverHost) -> None:
        self.config = config
        self.host = host
        self.mode = Mode.STATUS
        self.port = config.port

    # -- device half --------------------------------------------------------
    def initialize(self, port: str, mode: Mode) -> DeviceInfo:
        """Prepare the device on ``port``; called once, in the mode the service opens it in."""
        raise NotImplementedError

    def shutdown(self) -> None:
        """Close everything; the device is going away or the service is stopping."""

    def lock(self, mode: Mode) -> None:
        """The device lock was taken, by a holder working in ``mode``: open shared ports here."""

    def unlock(self) -> None:
        """The device lock is being released: close what lock() opened."""

    def release_port(self) -> None:
        """Another program takes the device: let go of every port held since initialize()."""

    def reclaim_port(self) -> None:
        """The device is ours again after release_port()."""

    def recover(self) -> None:
        """Bring the device back after ``host.device_failed()``; raise while it cannot be.
        Called by the service on the worker thread, without the device lock (a
        failed device has no users). The default cannot: the device stays failed
        until discovery reports it again."""
        raise NotSupported(f"{self.name}: the driver cannot recover a failed device")

    def get_status(self, mode: Mode) -> dict[str, Any]:
        return {}

    def reset(self) -> None:
        raise NotSupported(f"{self.name}: reset is not supported")

    def diagnostic(self) -> dict[str, Any]:
        raise NotSupported(f"{self.name}: diagnostic is not supported")

    def escape(self, code: int, data: bytes, mode: Mode) -> bytes:
        raise NotSupported(f"{self.name}: escape code {code} is not supported")

    def read_data(self, size: int, mode: Mode) -> bytes:
        raise NotSupported(f"{self.name}: raw data I/O is not supported")

    def write_data(self, data: bytes, mode: Mode) -> None:
        raise NotSupported(f"{self.name}: raw data I/O is not supported")

    def read_command(self, size: int, mode: Mode) -> bytes:
        raise NotSupported(f"{self.name}: raw command I/O is not supported")

    def write_command(self, data: bytes, mode: Mode) -> None:
        raise NotSupported(f"{self.name}: raw command I/O is not supported")

    def poll_events(self) -> list[DeviceEvent]:
        """For ``EventSource.POLL`` drivers: events since the last call."""
        return []

    @staticmethod
    def require_data(mode: Mode, what: str = "data transfer") -> None:
        """Refuse ``what`` to a session opened in status mode only."""
        if not mode & Mode.DATA:
            raise AccessDenied(f"{what} needs a session opened in data mode; this one is status only")

    # -- item half ----------------------------------------------------------
    def build_item_tree(self) -> DriverItem:
        """Build and return the driver item tree; its root represents the device."""
        raise NotImplementedError

    def valid_values(self, item: DriverItem, values: dict[str, Any]) -> dict[str, Valid]:
        """Valid values that depend on other properties (for example the largest
        extent at the current resolution), overriding the specs' static ones."""
        return {}

    def inactive(self, item: DriverItem, values: dict[str, Any]) -> set[str]:
        """Properties of ``item`` that have no effect now (a SANE option its backend
        marks inactive): shown as such in the attributes. Like
        :meth:`valid_values`, it must not touch the device."""
        return set()

    def validate_properties(
        self, item: DriverItem, values: dict[str, Any], changed: set[str], previous: dict[str, Any]
    ) -> dict[str, Any]:
        """Check a client's new values for ``item`` (``values``: the full set with the
        writes applied; types and valid values are already checked) and return the
        full set with dependent properties updated (for example extents when the
        resolution changed). Like every driver call it runs on the device's worker
        thread, but without the device lock: it must not touch the device."""
        return values

    def write_properties(self, item: DriverItem, values: dict[str, Any], mode: Mode) -> None:
        """Set ``values`` on the device before a transfer from ``item`` (always in data mode)."""

    def acquire(
        self, item: DriverItem, values: dict[str, Any], mode: Mode, cancel: threading.Event
    ) -> Iterator[Page]:
        """Yield the pages of one acquisition from ``item``; stop when ``cancel`` is set."""
        raise NotSupported(f"{self.name}: item {item.name} cannot transfer images")

    def open_file(self, item: DriverItem, variant: str, mode: Mode, cancel: threading.Event,
                  span: tuple[int, int | None] | None = None) -> FileData:
        """For items that are files (a camera's pictures): the bytes of ``item`` as
        the device has them (``variant`` "native") or its thumbnail ("thumbnail"),
        streamed; stop when ``cancel`` is set. ``span``: only ``length`` bytes
        (None: the rest) from ``offset`` of the native bytes (NotSupported where the
        device cannot)."""
        raise NotSupported(f"{self.name}: item {item.name} is not a file")

    def command(self, item: DriverItem, command: str, mode: Mode) -> None:
        """A device command on ``item``: ``synchronize``, or ``delete`` (a camera's
        picture). Item tree changes are made by the service from
        :meth:`build_item_tree` after either."""
        raise NotSupported(f"{self.name}: command {command!r} is not supported")


def match(drivers: Mapping[str, type[Minidriver]], candidate: Candidate) -> type[Minidriver] | None:
    """The matcher: the driver for ``candidate`` — the one it names (a configured
    device), else the driver whose fitting :class:`Match` is the most specific
    (:attr:`Match.rank`: a vendor's own driver before a class driver such as
    ``ptp``), by name among equals for a stable choice. None when no driver handles it."""
    if candidate.driver:
        return drivers.get(candidate.driver)
    best: tuple[int, str] | None = None
    for name in sorted(drivers):
        ranks = [m.rank for m in drivers[name].matches if m.matches(candidate)]
        if ranks and (best is None or max(ranks) > best[0]):
            best = (max(ranks), name)
    return drivers[best[1]] if best is not None else None
