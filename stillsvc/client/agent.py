"""Being an agent: the ``org.stillsvc.StillImage1.Agent`` object a user's session
exports so that the service can start that user's applications there.

The one place where the library *serves* rather than calls, and the one place
that needs dbus-fast's ServiceInterface: callers give two coroutines and never
see D-Bus types.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

from dbus_fast import DBusError, Message, MessageType
from dbus_fast.aio import MessageBus
from dbus_fast.service import ServiceInterface, method

from stillsvc.client.records import Application, ChooseRequest, LaunchRequest
from stillsvc.client.values import plain
from stillsvc.common.errors import (
    AccessDenied,
    Failed,
    NotSupported,
    StillError,
    dbus_error_name,
)
from stillsvc.common.names import AGENT_IFACE, MANAGER_IFACE, ROOT_PATH

if TYPE_CHECKING:
    from stillsvc.client.connection import Client

_log = logging.getLogger(__name__)

Launch = Callable[[LaunchRequest], Awaitable[int]]
Choose = Callable[[ChooseRequest], Awaitable[str]]


async def _cannot_choose(request: ChooseRequest) -> str:
    raise NotSupported("this agent cannot ask its user")


async def _answer(what: str, coro: Awaitable[Any]) -> Any:
    """Run a callback; a StillError it raises goes back as that error's D-Bus name.
    Anything else is a bug in the callback: logged here, answered ``Error.Failed``
    with a fixed text (no traceback crosses the bus)."""
    try:
        return await coro
    except StillError as e:
        raise DBusError(dbus_error_name(e), e.message) from None
    except Exception:
        _log.exception("the agent's %s callback failed", what)
        raise DBusError(dbus_error_name(Failed), f"the agent failed to {what}") from None


class _AgentInterface(ServiceInterface):
    """The exported object. Its annotations are D-Bus signatures, which is how
    dbus-fast declares a method's types (hence the noqa for the linters)."""

    def __init__(self, launch: Launch, choose: Choose) -> None:
        super().__init__(AGENT_IFACE)
        self._launch = launch
        self._choose = choose

    @method()
    async def Launch(self, application: "s", argv: "as", environment: "a{ss}", device_id: "s",  # noqa: F821, F722
                     event: "s", sequence: "t") -> "u":  # noqa: F821, F722
        request = LaunchRequest(application, tuple(argv), dict(environment), device_id, event, sequence)
        return int(await _answer("launch", self._launch(request)))

    @method()
    async def Choose(self, device_id: "s", event: "s", sequence: "t",  # noqa: F821, F722
                     candidates: "aa{sv}") -> "s":  # noqa: F821, F722
        offered = tuple(Application.from_dict(plain(c)) for c in candidates)
        return str(await _answer("choose", self._choose(ChooseRequest(device_id, event, sequence, offered))))


class Agent:
    """An exported agent object (see :meth:`Client.export_agent`).

    It answers only calls from the connection that owns the service's name now:
    ``Launch()`` runs a command as this user, so nobody else on the bus may ask for
    one (others get ``Error.AccessDenied``). The bus policy says the same; this
    does not rely on it.

    A registration lasts as long as the service's connection: after the service
    restarts (:class:`ServiceStarted` from :meth:`Manager.changes`), call
    :meth:`register` again.
    """

    def __init__(self, client: Client, connection: MessageBus, path: str, launch: Launch,
                 choose: Choose | None) -> None:
        self._client = client
        self._connection = connection
        self.path = path
        self._interface = _AgentInterface(launch, choose or _cannot_choose)
        self._connection.add_message_handler(self._only_the_service)
        self._connection.export(path, self._interface)

    def _only_the_service(self, msg: Message) -> Message | None:
        if (msg.message_type is MessageType.METHOD_CALL and msg.path == self.path and msg.interface == AGENT_IFACE
                and (self._client.service_owner is None or msg.sender != self._client.service_owner)):
            return Message.new_error(msg, dbus_error_name(AccessDenied), "this agent answers only the service")
        return None

    async def register(self) -> None:
        """``Manager.RegisterAgent``: from now on the service may call this agent."""
        await self._client.call(ROOT_PATH, MANAGER_IFACE, "RegisterAgent", "o", [self.path])

    async def unregister(self, timeout: float | None = None) -> None:
        await self._client.call(ROOT_PATH, MANAGER_IFACE, "UnregisterAgent", "o", [self.path], timeout=timeout)

    def unexport(self) -> None:
        """Take the object off the bus (unregister first, or the service finds it gone)."""
        self._connection.unexport(self.path, self._interface)
        self._connection.remove_message_handler(self._only_the_service)
