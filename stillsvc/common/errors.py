"""The one error hierarchy of the core.

Every failure the service reports to a client is a :class:`StillError` subclass.
The D-Bus layer maps each class to ``org.stillsvc.StillImage1.Error.<name>`` in one
place; anything else that escapes a handler is logged with its traceback and
reported as ``Error.Failed`` with a short, fixed text.
"""

from __future__ import annotations


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
)
