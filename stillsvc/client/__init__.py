"""stillsvc.client: the Python client library of the stillsvc service.

One connection (:class:`Client`), the service's objects as Python objects
(:class:`Manager`, :class:`Device`, :class:`Session`, :class:`Item`), typed
snapshots of what they report (dataclasses such as :class:`DeviceInfo`,
:class:`QueuedEvent`, :class:`TransferSummary`) and typed exceptions. Values go
in and come out as plain Python values; no caller handles a D-Bus type.

Errors: an answer of the service is raised as the :class:`StillError` subclass
its D-Bus error name stands for (:class:`Busy`, :class:`Timeout`,
:class:`NotFound`, ..., from the table in :mod:`stillsvc.common.errors` that the
service raises them from); a failure of the bus or the connection is a
:class:`ClientError` (:class:`ServiceNotRunning`, :class:`NoReply`,
:class:`ConnectionLost`). One class, one condition: an empty event queue is
:class:`Empty`, a closed session :class:`NotFound`.

    async with Client("session") as client:
        session = await client.manager.open_session("sim0", "data")
        async with session:
            flatbed = await session.item("Flatbed")
            await flatbed.write(resolution=300)
            await flatbed.transfer("page.png", "png")

This package imports nothing of stillsvc but :mod:`stillsvc.common`.
"""

from stillsvc.client.agent import Agent
from stillsvc.client.changes import Changes
from stillsvc.client.connection import DEFAULT_TIMEOUT, Client, parse_bus
from stillsvc.client.errors import BusUnavailable, ClientError, ConnectionLost, NoReply, ServiceNotRunning
from stillsvc.client.objects import MODES, Device, Item, Manager, Session
from stillsvc.client.records import (
    Application,
    CandidateInfo,
    Change,
    ChooseRequest,
    DeviceInfo,
    DriverItemInfo,
    EventRouted,
    InterfacesAdded,
    InterfacesRemoved,
    ItemInfo,
    LaunchRequest,
    Progress,
    PropertiesChanged,
    PropertyAttributes,
    QueuedEvent,
    ServiceStarted,
    ServiceStopped,
    SessionInfo,
    TransferSummary,
)
from stillsvc.common.errors import (
    AccessDenied,
    Busy,
    Cancelled,
    Disconnected,
    Empty,
    Failed,
    InvalidArgument,
    LimitExceeded,
    NotFound,
    NotSupported,
    StillError,
    Timeout,
)

__all__ = [
    # connecting
    "Client", "parse_bus", "DEFAULT_TIMEOUT",
    # the service's objects
    "Manager", "Device", "Session", "Item", "Agent", "Changes", "MODES",
    # records
    "CandidateInfo", "DeviceInfo", "DriverItemInfo", "SessionInfo", "QueuedEvent", "ItemInfo", "PropertyAttributes",
    "Progress", "TransferSummary", "Application", "LaunchRequest", "ChooseRequest",
    "Change", "ServiceStarted", "ServiceStopped", "InterfacesAdded", "InterfacesRemoved", "PropertiesChanged",
    "EventRouted",
    # the service's errors
    "StillError", "Failed", "Busy", "Timeout", "NotFound", "InvalidArgument", "Disconnected", "AccessDenied",
    "NotSupported", "LimitExceeded", "Cancelled", "Empty",
    # the bus's errors
    "ClientError", "ServiceNotRunning", "BusUnavailable", "NoReply", "ConnectionLost",
]
