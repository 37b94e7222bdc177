"""The connection: which bus, calls with their errors mapped, and who the service is.

:class:`Client` is the one object that touches the dbus-fast message bus; the
object wrappers (:mod:`stillsvc.client.objects`) only call :meth:`Client.call` and
friends, so error mapping, timeouts and the "is the service there" question are
decided in one place.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from dbus_fast import BusType, Message, MessageType
from dbus_fast.aio import MessageBus

from stillsvc.client._dbus import DBUS_NAME, DBUS_PATH, match_rule
from stillsvc.client.agent import Agent
from stillsvc.client.errors import (
    BusUnavailable,
    ClientError,
    ConnectionLost,
    NoReply,
    ServiceNotRunning,
    error_from_reply,
    not_running_text,
)
from stillsvc.client.objects import Manager
from stillsvc.client.records import ChooseRequest, LaunchRequest
from stillsvc.client.values import plain
from stillsvc.common.names import AGENTS_PATH, BUS_NAME

#: How long an ordinary call may take before the client gives up on the service (seconds).
DEFAULT_TIMEOUT = 30.0

_OWNER_RULE = match_rule(type="signal", sender=DBUS_NAME, interface=DBUS_NAME, member="NameOwnerChanged",
                         arg0=BUS_NAME)


def parse_bus(value: str) -> str:
    """Check a bus argument: ``system``, ``session`` or a D-Bus address
    (``transport:key=value,...``). Returns it unchanged; ValueError says what is
    wrong. One rule for every program, so ``--bus`` and ``STILLSVC_BUS`` mean the
    same everywhere."""
    if value in ("system", "session"):
        return value
    if ":" in value and "=" in value:
        return value
    raise ValueError(f"{value!r} is not 'system', 'session' or a D-Bus address such as "
                     "unix:path=/run/dbus/system_bus_socket")


class Client:
    """A connection to the stillsvc service on one bus.

    ``bus`` is ``system``, ``session`` or an address (see :func:`parse_bus`).
    Use it as ``async with Client(bus) as client:``, or :meth:`connect` and
    :meth:`disconnect`. Sessions belong to the connection that created them, so
    disconnecting closes them all at once, in the service too.

    ``timeout`` bounds every call that has no wait of its own; calls that wait on
    purpose (data mode with ``wait``, the device lock, a transfer) add their wait
    to it, or have none.
    """

    def __init__(self, bus: str = "system", *, timeout: float = DEFAULT_TIMEOUT) -> None:
        self.bus = parse_bus(bus)
        self.timeout = timeout
        self.manager = Manager(self)
        self._connection: MessageBus | None = None
        self._owner: str | None = None
        self._closed = asyncio.Event()
        self._watcher: asyncio.Task[None] | None = None

    # -- connecting -------------------------------------------------------------------
    async def connect(self, *, require_service: bool = True) -> Client:
        """Connect to the bus; with ``require_service``, fail with
        :class:`ServiceNotRunning` unless the service is on it.

        :class:`BusUnavailable` when the bus cannot be reached at all.
        """
        try:
            if self.bus in ("system", "session"):
                bus_type = BusType.SYSTEM if self.bus == "system" else BusType.SESSION
                connection = MessageBus(bus_type=bus_type, negotiate_unix_fd=True)
            else:
                connection = MessageBus(bus_address=self.bus, negotiate_unix_fd=True)
            self._connection = await asyncio.wait_for(connection.connect(), self.timeout)
        except Exception as e:
            reason = e.strerror if isinstance(e, OSError) and e.strerror else str(e) or type(e).__name__
            raise BusUnavailable(f"{not_running_text(self.bus)} (cannot connect to the bus: {reason})",
                                 reason) from None
        self._closed.clear()
        self._watcher = asyncio.ensure_future(self._watch_disconnect(self._connection))
        # Follow the service's name from here on: signal filters, the agent's guard
        # and "did the service stop?" all need its current unique name.
        self._connection.add_message_handler(self._name_owner_changed)
        await self._bus_call("AddMatch", "s", [_OWNER_RULE])
        self._owner = await self._get_owner()
        if require_service and self._owner is None:
            self.disconnect()
            raise ServiceNotRunning(not_running_text(self.bus))
        return self

    def disconnect(self) -> None:
        """Leave the bus. The service closes this connection's sessions at once."""
        if self._connection is not None and self._connection.connected:
            self._connection.disconnect()

    async def __aenter__(self) -> Client:
        return await self.connect()

    async def __aexit__(self, *exc: object) -> None:
        self.disconnect()

    @property
    def connected(self) -> bool:
        return self._connection is not None and self._connection.connected

    @property
    def unique_name(self) -> str | None:
        """This connection's unique name on the bus (what the service shows as a holder)."""
        return self._connection.unique_name if self._connection is not None else None

    @property
    def service_owner(self) -> str | None:
        """The unique name of the service's connection, or None while it is not on the bus."""
        return self._owner

    async def wait_closed(self) -> None:
        """Return once the connection has ended, however it ended (at once if it never began)."""
        if self._connection is None:
            return
        await self._closed.wait()

    async def _watch_disconnect(self, connection: MessageBus) -> None:
        try:
            await connection.wait_for_disconnect()
        except Exception:
            pass  # lost rather than closed: the same for our callers
        finally:
            self._owner = None
            self._closed.set()

    def _name_owner_changed(self, msg: Message) -> None:
        if (msg.message_type is MessageType.SIGNAL and msg.sender == DBUS_NAME and msg.member == "NameOwnerChanged"
                and msg.body and msg.body[0] == BUS_NAME):
            self._owner = msg.body[2] or None

    async def _get_owner(self) -> str | None:
        try:
            (owner,) = await self._bus_call("GetNameOwner", "s", [BUS_NAME])
        except ClientError:
            return None
        return owner or None

    # -- calls --------------------------------------------------------------------------
    async def call(self, path: str, interface: str, member: str, signature: str = "",
                   args: Sequence[Any] = (), *, destination: str = BUS_NAME,
                   timeout: float | None = None) -> list[Any]:
        """Any method call, for what the typed objects do not cover (the Simulator
        interface, Peer.Ping, ...). Returns the reply's values, plain; errors are
        raised as everywhere in this library. ``timeout`` defaults to the client's.
        Descriptors in the reply are closed: use the typed methods for those."""
        reply = await self._call_message(path, interface, member, signature, args, destination=destination,
                                        timeout=self.timeout if timeout is None else timeout)
        for fd in reply.unix_fds:
            os.close(fd)
        return plain(reply.body)

    async def _call_message(self, path: str, interface: str, member: str, signature: str = "",
                           args: Sequence[Any] = (), *, destination: str = BUS_NAME,
                           fds: Sequence[int] = (), timeout: float | None) -> Message:
        """A call and its whole reply (values as dbus-fast gives them, descriptors the
        caller's to close); an error reply is raised. ``timeout`` None: no limit."""
        if self._connection is None:
            raise ConnectionLost(f"not connected to the {self.bus} bus")
        msg = Message(destination=destination, path=path, interface=interface, member=member,
                      signature=signature, body=list(args), unix_fds=list(fds))
        try:
            # No task or shield of our own per call: dbus-fast ignores a reply that
            # comes after its waiter was cancelled (a timeout, or the caller's).
            async with asyncio.timeout(timeout):
                reply = await self._connection.call(msg)
        except TimeoutError:
            raise NoReply(f"the service did not answer {member} within {timeout:g} s") from None
        except (EOFError, ConnectionError, OSError) as e:
            raise ConnectionLost(f"lost the connection to the {self.bus} bus ({e or type(e).__name__})") from None
        if reply is None:
            raise ConnectionLost(f"lost the connection to the {self.bus} bus")
        if reply.message_type is MessageType.ERROR:
            for fd in reply.unix_fds:
                os.close(fd)
            name = reply.error_name or ""
            error = error_from_reply(name, reply.body[0] if reply.body else "", bus=self.bus)
            if isinstance(error, NoReply) and destination == BUS_NAME and await self._get_owner() is None:
                error = ServiceNotRunning(f"the stillsvc service stopped while handling {member}", name)
            raise error
        return reply

    async def _bus_call(self, member: str, signature: str = "", args: Sequence[Any] = ()) -> list[Any]:
        """A call to the bus daemon itself."""
        reply = await self._call_message(DBUS_PATH, DBUS_NAME, member, signature, args, destination=DBUS_NAME,
                                        timeout=self.timeout)
        return reply.body

    async def _add_match(self, rule: str) -> None:
        await self._bus_call("AddMatch", "s", [rule])

    async def _remove_match(self, rule: str) -> None:
        if self.connected:
            try:
                await self._bus_call("RemoveMatch", "s", [rule])
            except ClientError:
                pass

    def _add_handler(self, handler: Callable[[Message], None]) -> None:
        """Have ``handler`` see every incoming message (it must return None)."""
        assert self._connection is not None
        self._connection.add_message_handler(handler)

    def _remove_handler(self, handler: Callable[[Message], None]) -> None:
        if self._connection is not None:
            self._connection.remove_message_handler(handler)

    # -- agents --------------------------------------------------------------------------
    def export_agent(self, launch: Callable[[LaunchRequest], Awaitable[int]],
                     choose: Callable[[ChooseRequest], Awaitable[str]] | None = None, *,
                     path: str = f"{AGENTS_PATH}/client") -> Agent:
        """Export an ``org.stillsvc.StillImage1.Agent`` object at ``path`` on this
        connection, answering with ``launch`` and ``choose`` (see
        :class:`~stillsvc.client.agent.Agent`). Register it with
        :meth:`Agent.register`."""
        assert self._connection is not None, "connect first"
        return Agent(self, self._connection, path, launch, choose)
