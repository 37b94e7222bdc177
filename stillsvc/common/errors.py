"""The one error hierarchy, shared by the service and its clients.

Every failure the service reports to a client is a :class:`StillError` subclass.
Each class has its D-Bus error name, ``org.stillsvc.StillImage1.Error.<name>``:
the D-Bus front-end maps a raised error to its name (:func:`dbus_error_name`), the
client library maps a name back to its class (:func:`error_class`), both from
:data:`ALL_ERRORS`. Anything else that escapes a handler is logged with its
traceback and reported as ``Error.Failed`` with a short, fixed text. Each class
stands for one condition, so that a client never needs to read an error's text.
"""

from __future__ import annotations

from stillsvc.common.names import ERROR_PREFIX


class StillError(Exception):
    """Base of every error a client may see. ``name`` is the D-Bus error suffix."""

    name = "Failed"

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class Failed(StillError):
    name = "Failed"


class Busy(StillError):
    name = "Busy"


class Timeout(StillError):
    name = "Timeout"


class NotFound(StillError):
    name = "NotFound"


class InvalidArgument(StillError):
    name = "InvalidArgument"


class Disconnected(StillError):
    name = "Disconnected"


class AccessDenied(StillError):
    name = "AccessDenied"


class NotSupported(StillError):
    name = "NotSupported"


class LimitExceeded(StillError):
    name = "LimitExceeded"


class Cancelled(StillError):
    name = "Cancelled"


class Empty(StillError):
    """Nothing to take: no event is queued, the feeder has no pages (the session
    itself is fine)."""

    name = "Empty"


def quote(value: object, limit: int = 64) -> str:
    """A client's value for an error message: repr'd and cut short, so a huge
    argument never comes back as a huge error."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 5] + "…" + text[-4:]


ALL_ERRORS: tuple[type[StillError], ...] = (
    Failed,
    Busy,
    Timeout,
    NotFound,
    InvalidArgument,
    Disconnected,
    AccessDenied,
    NotSupported,
    LimitExceeded,
    Cancelled,
    Empty,
)

_BY_NAME: dict[str, type[StillError]] = {cls.name: cls for cls in ALL_ERRORS}


def dbus_error_name(error: StillError | type[StillError]) -> str:
    """``org.stillsvc.StillImage1.Error.<name>`` of an error or error class."""
    return f"{ERROR_PREFIX}.{error.name}"


def error_class(dbus_name: str) -> type[StillError] | None:
    """The class of a service error name; None for names that are not the service's."""
    prefix, _, name = dbus_name.rpartition(".")
    return _BY_NAME.get(name) if prefix == ERROR_PREFIX else None
