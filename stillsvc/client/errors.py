"""What the client library raises, and the one place error replies become exceptions.

Two families, because a caller reacts to them differently:

* the **service's answers**: the :class:`~stillsvc.common.errors.StillError`
  subclasses of :mod:`stillsvc.common.errors`, looked up by error name in the same
  table the service raises them from (:func:`~stillsvc.common.errors.error_class`),
  so ``except Busy`` here catches exactly what the service meant by ``Busy``;
* **the bus's own failures** (:class:`ClientError` and its subclasses): the service
  is not on the bus, did not answer, or the connection went away. None of these
  says anything about the device, so none of them is a ``StillError``.

Every class stands for one condition; no code needs to read an error's text.
"""

from __future__ import annotations

from typing import Any

from stillsvc.common.errors import StillError, error_class
from stillsvc.common.names import ERROR_PREFIX

#: Error names with which the bus says nobody owns the destination name.
_NOT_RUNNING_NAMES = frozenset({
    "org.freedesktop.DBus.Error.ServiceUnknown",
    "org.freedesktop.DBus.Error.NameHasNoOwner",
})
_NO_REPLY = "org.freedesktop.DBus.Error.NoReply"
_BUS_ACCESS_DENIED = "org.freedesktop.DBus.Error.AccessDenied"


class ClientError(Exception):
    """A failure of the bus or the connection, not an answer of the service.

    ``error_name`` is the D-Bus error name when the failure came as an error reply
    (for example ``org.freedesktop.DBus.Error.AccessDenied`` when the bus policy
    refused the call, or ``org.freedesktop.DBus.Error.UnknownMethod``), else None.
    """

    def __init__(self, message: str, error_name: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.error_name = error_name


class ServiceNotRunning(ClientError):
    """Nobody owns ``org.stillsvc.StillImage1`` on this bus (``ServiceUnknown``,
    ``NameHasNoOwner``), or the service left the bus while handling a call."""


class BusUnavailable(ServiceNotRunning):
    """The bus itself could not be reached, so neither can the service. A subclass
    of :class:`ServiceNotRunning`: for a caller both mean "nothing to talk to";
    ``reason`` says what the connection attempt ran into."""

    def __init__(self, message: str, reason: str) -> None:
        super().__init__(message)
        self.reason = reason


class NoReply(ClientError):
    """The service is on the bus but did not answer in time (our own timeout, or the
    bus's ``NoReply``). The call may still have taken effect."""


class ConnectionLost(ClientError):
    """The connection to the bus ended (the bus daemon went away, or this side
    disconnected) before the answer came."""


def not_running_text(bus: str) -> str:
    return f"the stillsvc service is not running on the {bus} bus"


def error_from_reply(name: str, text: Any, *, bus: str) -> Exception:
    """The exception for an error reply named ``name``.

    A service error name becomes its :class:`StillError` subclass with the
    service's message. A service error name this library does not know (from a
    newer service) becomes a plain :class:`StillError` whose ``name`` is that
    name's last element, so ``except StillError`` still catches it. Everything
    else is the bus's: :class:`ServiceNotRunning`, :class:`NoReply` or a
    :class:`ClientError` carrying the name. (NoReply from a service that has left
    the bus meanwhile is decided by the caller, which can ask the bus.)
    """
    text = str(text or "").strip()
    prefix = ERROR_PREFIX + "."
    if name.startswith(prefix):
        suffix = name[len(prefix):]
        cls = error_class(name)
        if cls is not None:
            return cls(text or suffix)
        unknown = StillError(text or suffix)
        unknown.name = suffix
        return unknown
    if name in _NOT_RUNNING_NAMES:
        return ServiceNotRunning(not_running_text(bus), name)
    if name == _NO_REPLY:
        return NoReply("the service did not answer", name)
    if name == _BUS_ACCESS_DENIED:
        return ClientError(f"the bus refused the call: {text}" if text else "the bus refused the call", name)
    return ClientError(f"{text} ({name})" if text else name, name)
