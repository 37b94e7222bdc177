"""Typed snapshots of what the service reports.

Each record has the documented fields typed, and :meth:`as_dict` for everything
the service sent, as plain values: a property or key added to the service later
is not lost on the way through an older library, and tools that print "every
property" (``stillctl info --json``) print what the service has, not what this
file knew of.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from stillsvc.common.names import DEVICE_IFACE


class _Record:
    """A frozen dataclass that keeps the dictionary it was made from."""

    _source: dict[str, Any]

    def as_dict(self) -> dict[str, Any]:
        """Everything the service sent for this record, as plain values (a copy)."""
        return dict(self._source)


# -- devices --------------------------------------------------------------------------

@dataclass(frozen=True)
class DeviceInfo(_Record):
    """The ``Device`` properties of one device (and its other interfaces' properties)."""

    path: str
    id: str
    name: str
    vendor: str
    model: str
    serial: str
    kind: str
    driver: str
    port: str
    state: str
    #: why the device is in its state (for "failed", the driver's error)
    state_reason: str
    #: how many times a device with this id has appeared since the service started
    generation: int
    capabilities: tuple[str, ...]
    event_names: tuple[str, ...]
    data_mode_held: bool
    data_mode_holder: str
    data_mode_waiters: int
    lock_waiters: int
    lock_file: str
    simulated: bool
    undelivered_events: int
    #: every interface of the object (Device, Simulator, ...) -> its properties
    interfaces: dict[str, dict[str, Any]] = field(default_factory=dict, repr=False, compare=False)
    _source: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)

    @classmethod
    def from_interfaces(cls, path: str, interfaces: dict[str, dict[str, Any]]) -> DeviceInfo:
        p = interfaces.get(DEVICE_IFACE, {})
        return cls(
            path=path, id=p.get("Id", ""), name=p.get("Name", ""), vendor=p.get("Vendor", ""),
            model=p.get("Model", ""), serial=p.get("Serial", ""), kind=p.get("Kind", ""),
            driver=p.get("Driver", ""), port=p.get("Port", ""), state=p.get("State", ""),
            state_reason=p.get("StateReason", ""), generation=int(p.get("Generation", 0)),
            capabilities=tuple(p.get("Capabilities", ())), event_names=tuple(p.get("EventNames", ())),
            data_mode_held=bool(p.get("DataModeHeld", False)), data_mode_holder=p.get("DataModeHolder", ""),
            data_mode_waiters=int(p.get("DataModeWaiters", 0)), lock_waiters=int(p.get("LockWaiters", 0)),
            lock_file=p.get("LockFile", ""), simulated=bool(p.get("Simulated", False)),
            undelivered_events=int(p.get("UndeliveredEvents", 0)),
            interfaces={name: dict(props) for name, props in interfaces.items()}, _source=dict(p))


@dataclass(frozen=True)
class DriverItemInfo(_Record):
    """One driver item of ``Manager.GetDriverItems``: the reference-counting view."""

    path: str
    kind: str
    refcount: int
    removed: bool
    present: bool
    generation: int
    _source: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> DriverItemInfo:
        return cls(path=d.get("path", ""), kind=d.get("kind", ""), refcount=int(d.get("refcount", 0)),
                   removed=bool(d.get("removed", False)), present=bool(d.get("present", False)),
                   generation=int(d.get("generation", 0)), _source=dict(d))


@dataclass(frozen=True)
class CandidateInfo(_Record):
    """One entry of ``Manager.GetCandidates``: a device discovery reported, the
    driver it matched and what became of it."""

    id: str
    subsystem: str
    port: str
    name: str
    vendor_id: str
    product_id: str
    serial: str
    interfaces: tuple[str, ...]
    driver: str
    device_id: str
    #: "added", "failed" or "unmatched"
    status: str
    reason: str
    _source: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> CandidateInfo:
        return cls(id=d.get("id", ""), subsystem=d.get("subsystem", ""), port=d.get("port", ""),
                   name=d.get("name", ""), vendor_id=d.get("vendor_id", ""), product_id=d.get("product_id", ""),
                   serial=d.get("serial", ""), interfaces=tuple(d.get("interfaces", ())),
                   driver=d.get("driver", ""), device_id=d.get("device_id", ""), status=d.get("status", ""),
                   reason=d.get("reason", ""), _source=dict(d))


# -- sessions and events ------------------------------------------------------------------

@dataclass(frozen=True)
class SessionInfo(_Record):
    """The ``Session`` properties."""

    path: str
    device: str
    device_id: str
    mode: str
    holds_lock: bool
    subscribed: bool
    queued_events: int
    dropped_events: int
    root_item: str
    _source: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)

    @classmethod
    def from_properties(cls, path: str, p: dict[str, Any]) -> SessionInfo:
        return cls(path=path, device=p.get("Device", ""), device_id=p.get("DeviceId", ""), mode=p.get("Mode", ""),
                   holds_lock=bool(p.get("HoldsLock", False)), subscribed=bool(p.get("Subscribed", False)),
                   queued_events=int(p.get("QueuedEvents", 0)), dropped_events=int(p.get("DroppedEvents", 0)),
                   root_item=p.get("RootItem", "/"), _source=dict(p))


@dataclass(frozen=True)
class QueuedEvent(_Record):
    """One event taken off a data-mode session's queue (``GetLastNotificationData``)."""

    event: str
    device: str
    sequence: int
    timestamp_us: int
    data: dict[str, Any]
    #: how many events this session's queue has dropped so far (it was full)
    dropped: int
    #: how many are still queued after this one
    remaining: int
    _source: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)

    @property
    def time(self) -> float:
        """When it happened, in seconds since the Unix epoch."""
        return self.timestamp_us / 1_000_000

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> QueuedEvent:
        return cls(event=d.get("event", ""), device=d.get("device", ""), sequence=int(d.get("sequence", 0)),
                   timestamp_us=int(d.get("timestamp_us", 0)), data=dict(d.get("data", {})),
                   dropped=int(d.get("dropped", 0)), remaining=int(d.get("remaining", 0)), _source=dict(d))


# -- items ----------------------------------------------------------------------------------

@dataclass(frozen=True)
class ItemInfo(_Record):
    """The ``Item`` interface's own properties (not the item's scan properties:
    those are :meth:`Item.read`)."""

    path: str
    name: str
    kind: str
    item_path: str
    children: tuple[str, ...]
    connected: bool
    _source: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)

    @property
    def depth(self) -> int:
        """0 for the root, 1 for its children, ..."""
        return self.item_path.count("/")

    @classmethod
    def from_properties(cls, path: str, p: dict[str, Any]) -> ItemInfo:
        return cls(path=path, name=p.get("Name", ""), kind=p.get("Kind", ""), item_path=p.get("ItemPath", ""),
                   children=tuple(p.get("Children", ())), connected=bool(p.get("Connected", False)),
                   _source=dict(p))


@dataclass(frozen=True)
class PropertyAttributes(_Record):
    """What an item property is: its D-Bus ``type``, ``access`` (``r``/``rw``),
    ``description`` and ``valid`` values (``{"kind": "range", "min", "max",
    "step"}``, ``{"kind": "list"|"flags", "values"}`` or ``{"kind": "none"}``),
    and whether it has no effect now (``inactive``: a SANE option its backend
    marks inactive)."""

    type: str
    access: str
    description: str
    valid: dict[str, Any]
    inactive: bool = False
    _source: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)

    @property
    def writable(self) -> bool:
        return "w" in self.access

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> PropertyAttributes:
        return cls(type=d.get("type", ""), access=d.get("access", ""), description=d.get("description", ""),
                   valid=dict(d.get("valid", {})), inactive=bool(d.get("inactive", False)), _source=dict(d))


@dataclass(frozen=True)
class Progress:
    """One ``Item.Progress`` signal: ``percent`` of ``page`` done, ``bytes`` written so far."""

    page: int
    percent: int
    bytes: int


@dataclass(frozen=True)
class TransferSummary(_Record):
    """What a transfer wrote (the reply of ``Item.Transfer``); size and mode are the last page's."""

    format: str
    content_type: str
    bytes: int
    pages: int
    width: int
    height: int
    depth: int
    resolution: int
    mode: str
    #: A file's name (a camera's picture); empty for scanned pages.
    name: str = ""
    _source: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TransferSummary:
        return cls(format=d.get("format", ""), content_type=d.get("content_type", ""), bytes=int(d.get("bytes", 0)),
                   pages=int(d.get("pages", 0)), width=int(d.get("width", 0)), height=int(d.get("height", 0)),
                   depth=int(d.get("depth", 0)), resolution=int(d.get("resolution", 0)), mode=d.get("mode", ""),
                   name=d.get("name", ""), _source=dict(d))


# -- registrations and agents ---------------------------------------------------------------------

@dataclass(frozen=True)
class Application(_Record):
    """One registration, as ``Manager.ListLaunchApplications`` describes it."""

    id: str
    name: str
    scope: str
    uid: int
    command: tuple[str, ...]
    events: tuple[str, ...]
    devices: tuple[str, ...]
    created_us: int
    default_for: tuple[tuple[str, str], ...]
    _source: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Application:
        return cls(id=d.get("id", ""), name=d.get("name", ""), scope=d.get("scope", ""), uid=int(d.get("uid", 0)),
                   command=tuple(d.get("command", ())), events=tuple(d.get("events", ())),
                   devices=tuple(d.get("devices", ())), created_us=int(d.get("created_us", 0)),
                   default_for=tuple((str(a), str(b)) for a, b in d.get("default_for", ())), _source=dict(d))


@dataclass(frozen=True)
class LaunchRequest:
    """The service asks an agent to start ``argv`` (placeholders already replaced)
    with ``environment`` added, for one event."""

    application: str
    argv: tuple[str, ...]
    environment: dict[str, str]
    device_id: str
    event: str
    sequence: int


@dataclass(frozen=True)
class ChooseRequest:
    """The service asks an agent which of ``candidates`` to start for one event."""

    device_id: str
    event: str
    sequence: int
    candidates: tuple[Application, ...]


# -- changes (see Changes) ------------------------------------------------------------------------

@dataclass(frozen=True)
class ServiceStarted:
    """The service's name has a new owner (``owner``, its unique name)."""

    owner: str


@dataclass(frozen=True)
class ServiceStopped:
    """The service left the bus: every device, session and subscription of it is gone."""


@dataclass(frozen=True)
class InterfacesAdded:
    """An object appeared, or gained interfaces (a device being added)."""

    path: str
    interfaces: dict[str, dict[str, Any]]

    @property
    def device(self) -> DeviceInfo | None:
        """The device's properties when the ``Device`` interface is among those added."""
        return DeviceInfo.from_interfaces(self.path, self.interfaces) if DEVICE_IFACE in self.interfaces else None


@dataclass(frozen=True)
class InterfacesRemoved:
    """An object lost interfaces; a device that loses ``Device`` is gone."""

    path: str
    interfaces: tuple[str, ...]


@dataclass(frozen=True)
class PropertiesChanged:
    """Properties of ``interface`` on the object at ``path`` changed."""

    path: str
    interface: str
    changed: dict[str, Any]
    invalidated: tuple[str, ...]


@dataclass(frozen=True)
class EventRouted:
    """The service routed a device event to its one consumer (administrators' view)."""

    device: str  #: the device's object path
    event: str
    sequence: int
    timestamp_us: int
    consumer: str
    data: dict[str, Any]

    @property
    def time(self) -> float:
        return self.timestamp_us / 1_000_000


Change = ServiceStarted | ServiceStopped | InterfacesAdded | InterfacesRemoved | PropertiesChanged | EventRouted
