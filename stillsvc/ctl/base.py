"""What every stillctl subcommand shares: the bus connection and its calls
(:class:`Ctl`), the subcommand registry (:func:`command`), and output as tables or
JSON."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from dbus_fast import BusType, Message, MessageType, Variant
from dbus_fast.aio import MessageBus

from stillsvc.common.names import (
    BUS_NAME,
    ERROR_PREFIX,
    IFACE_PREFIX,
    MANAGER_IFACE,
    ROOT_PATH,
)

PROG = "stillctl"
DBUS_NAME = "org.freedesktop.DBus"
DBUS_PATH = "/org/freedesktop/DBus"
PROPERTIES_IFACE = "org.freedesktop.DBus.Properties"
OBJECT_MANAGER_IFACE = "org.freedesktop.DBus.ObjectManager"

#: How long an ordinary call may take before stillctl gives up on the service.
CALL_TIMEOUT = 30.0
#: The longest wait the service accepts for data mode or the device lock (seconds).
MAX_WAIT = 600.0
#: After ``lock``'s command ends, how long to wait for the service to take the device back.
TAKE_BACK_WAIT = 3.0

#: D-Bus errors that mean nobody owns the service's name.
_NOT_RUNNING_ERRORS = {
    "org.freedesktop.DBus.Error.ServiceUnknown",
    "org.freedesktop.DBus.Error.NameHasNoOwner",
}


class CtlError(Exception):
    """An expected failure: printed as ``stillctl: <message>``, then exit ``code``."""

    def __init__(self, message: str, code: int = 1, error_name: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.code = code
        #: the D-Bus error name, when the failure is an error reply
        self.error_name = error_name


# -- values and output ------------------------------------------------------------

def plain(value: Any) -> Any:
    """D-Bus values (variants inside dicts and lists) as plain JSON-able Python values."""
    if isinstance(value, Variant):
        return plain(value.value)
    if isinstance(value, dict):
        return {str(k): plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    if isinstance(value, (bytes, bytearray)):
        return list(value)
    return value


def show(value: Any) -> str:
    """A value as a person reads it in a table or a monitor line."""
    value = plain(value)
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, list):
        return ", ".join(show(v) for v in value) if value else "-"
    if isinstance(value, dict):
        return " ".join(f"{k}={show(v)}" for k, v in value.items()) if value else "-"
    if value == "":
        return "-"
    return str(value)


def show_assignment(name: str, value: Any) -> str:
    """``Name=value`` for one-line output, quoting values with spaces."""
    text = show(value)
    if any(c.isspace() for c in text):
        text = json.dumps(text)
    return f"{name}={text}"


def print_json(data: Any, *, lines: bool = False) -> None:
    """JSON on stdout: indented, or one compact object per line (``lines``)."""
    if lines:
        print(json.dumps(plain(data), separators=(",", ":")), flush=True)
    else:
        print(json.dumps(plain(data), indent=2), flush=True)


def print_table(headers: list[str], rows: list[list[Any]]) -> None:
    """Aligned columns; the last column is not padded."""
    cells = [headers] + [[show(c) for c in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers) - 1)]
    for row in cells:
        padded = [c.ljust(w) for c, w in zip(row, widths)] + [row[-1]]
        print("  ".join(padded).rstrip())
    sys.stdout.flush()


def print_fields(title: str, values: dict[str, Any], indent: str = "  ") -> None:
    """A title line, then one ``Name  value`` line per entry."""
    print(title)
    width = max((len(k) for k in values), default=0)
    for key, value in values.items():
        print(f"{indent}{key.ljust(width)}  {show(value)}")
    sys.stdout.flush()


def short_interface(name: str) -> str:
    prefix = IFACE_PREFIX + "."
    return name[len(prefix):] if name.startswith(prefix) else name


def clock(timestamp: float | None = None) -> str:
    """``HH:MM:SS.mmm`` in local time."""
    t = time.time() if timestamp is None else timestamp
    return time.strftime("%H:%M:%S", time.localtime(t)) + f".{int(t * 1000) % 1000:03d}"


# -- the bus ------------------------------------------------------------------------

def bus_argument(value: str) -> str:
    """``--bus``: system, session or a D-Bus address (``transport:key=value,...``)."""
    if value in ("system", "session"):
        return value
    if ":" in value and "=" in value:
        return value
    raise argparse.ArgumentTypeError(
        f"{value!r} is not 'system', 'session' or a D-Bus address such as unix:path=/run/dbus/system_bus_socket")


@dataclass
class Ctl:
    """What every subcommand works with: the connection, calls, output."""

    bus_spec: str
    json: bool = False
    bus: MessageBus | None = None

    # -- connecting -------------------------------------------------------------
    @property
    def not_running(self) -> str:
        return f"the stillsvc service is not running on the {self.bus_spec} bus"

    async def connect(self, *, need_service: bool = True) -> MessageBus:
        try:
            if self.bus_spec in ("system", "session"):
                bus_type = BusType.SYSTEM if self.bus_spec == "system" else BusType.SESSION
                bus = MessageBus(bus_type=bus_type, negotiate_unix_fd=True)
            else:
                bus = MessageBus(bus_address=self.bus_spec, negotiate_unix_fd=True)
            self.bus = await asyncio.wait_for(bus.connect(), CALL_TIMEOUT)
        except Exception as e:
            reason = e.strerror if isinstance(e, OSError) and e.strerror else str(e) or type(e).__name__
            raise CtlError(f"{self.not_running} (cannot connect to the bus: {reason})") from None
        if need_service and not await self.service_owner():
            raise CtlError(self.not_running)
        return self.bus

    def disconnect(self) -> None:
        if self.bus is not None and self.bus.connected:
            self.bus.disconnect()

    async def service_owner(self) -> str | None:
        """The unique name of the service's connection, or None if it is not on the bus."""
        try:
            (owner,) = await self.dbus("GetNameOwner", "s", [BUS_NAME])
        except CtlError:
            return None
        return owner

    # -- calls ------------------------------------------------------------------------
    async def call_message(self, path: str, interface: str, member: str, signature: str = "",
                           body: list[Any] | None = None, *, destination: str = BUS_NAME,
                           timeout: float | None = CALL_TIMEOUT) -> Message:
        """A method call; an error reply becomes a :class:`CtlError` with a readable message."""
        assert self.bus is not None
        msg = Message(destination=destination, path=path, interface=interface, member=member,
                      signature=signature, body=body or [])
        try:
            reply = await asyncio.wait_for(self.bus.call(msg), timeout)
        except TimeoutError:
            raise CtlError(f"the service did not answer {member} within {timeout:g} s") from None
        except (EOFError, ConnectionError, OSError) as e:
            raise CtlError(f"lost the connection to the {self.bus_spec} bus ({e or type(e).__name__})") from None
        if reply is None:
            raise CtlError(f"lost the connection to the {self.bus_spec} bus")
        if reply.message_type is MessageType.ERROR:
            for fd in reply.unix_fds:
                os.close(fd)
            name = reply.error_name or ""
            text = self.error_text(name, reply.body[0] if reply.body else "")
            if name == "org.freedesktop.DBus.Error.NoReply" and destination == BUS_NAME \
                    and not await self.service_owner():
                text = f"the stillsvc service stopped while handling {member}"
            raise CtlError(text, error_name=name)
        return reply

    async def call(self, path: str, interface: str, member: str, signature: str = "",
                   body: list[Any] | None = None, **kwargs: Any) -> list[Any]:
        return (await self.call_message(path, interface, member, signature, body, **kwargs)).body

    async def dbus(self, member: str, signature: str = "", body: list[Any] | None = None) -> list[Any]:
        """A call to the bus itself (org.freedesktop.DBus)."""
        return await self.call(DBUS_PATH, DBUS_NAME, member, signature, body, destination=DBUS_NAME)

    def error_text(self, name: str, text: Any) -> str:
        text = str(text or "").strip()
        if name in _NOT_RUNNING_ERRORS:
            return self.not_running
        if name.startswith(ERROR_PREFIX + "."):
            return text or name[len(ERROR_PREFIX) + 1:]
        if name == "org.freedesktop.DBus.Error.AccessDenied":
            return f"the bus refused the call: {text}" if text else "the bus refused the call"
        if name == "org.freedesktop.DBus.Error.NoReply":
            return "the service did not answer"
        return f"{text} ({name})" if text else name

    async def add_match(self, **rule: str) -> None:
        await self.dbus("AddMatch", "s", [",".join(f"{k}='{v}'" for k, v in rule.items())])

    # -- the service's objects -------------------------------------------------------------
    async def managed_objects(self) -> dict[str, dict[str, dict[str, Any]]]:
        """Every device object: path -> interface -> property -> plain value."""
        (objects,) = await self.call(ROOT_PATH, OBJECT_MANAGER_IFACE, "GetManagedObjects")
        return {path: {iface: plain(props) for iface, props in ifaces.items()} for path, ifaces in objects.items()}

    async def find_device(self, device_id: str) -> str:
        (path,) = await self.call(ROOT_PATH, MANAGER_IFACE, "FindDevice", "s", [device_id])
        return path

    async def get_property(self, path: str, interface: str, name: str) -> Any:
        (value,) = await self.call(path, PROPERTIES_IFACE, "Get", "ss", [interface, name])
        return plain(value)


# -- subcommands -----------------------------------------------------------------------

Run = Callable[[Ctl, argparse.Namespace], Awaitable[int]]


@dataclass
class Command:
    name: str
    run: Run
    help: str
    description: str | None
    arguments: list[tuple[tuple[Any, ...], dict[str, Any]]]
    epilog: str | None = None
    usage: str | None = None
    #: Checks the parsed arguments before anything is sent; returns an error or None.
    check: Callable[[argparse.Namespace], str | None] | None = None


COMMANDS: dict[str, Command] = {}


def arg(*names: Any, **options: Any) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """One ``add_argument`` call for :func:`command`."""
    return names, options


def command(name: str, help: str, *arguments: tuple[tuple[Any, ...], dict[str, Any]],
            description: str | None = None, epilog: str | None = None,
            usage: str | None = None,
            check: Callable[[argparse.Namespace], str | None] | None = None) -> Callable[[Run], Run]:
    """Register a subcommand: ``fn(ctl, args) -> exit status``."""

    def register(fn: Run) -> Run:
        COMMANDS[name] = Command(name, fn, help, description, list(arguments), epilog, usage, check)
        return fn

    return register


def silence_stdout() -> None:
    """Send what is left for stdout to /dev/null (its reader is gone)."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    os.close(devnull)


def warn(message: str) -> None:
    print(f"{PROG}: {message}", file=sys.stderr, flush=True)
