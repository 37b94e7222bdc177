"""The event monitor's D-Bus side: user agents and application registrations.

An agent is an object a client exports (``stillctl agent`` does) implementing
``org.stillsvc.StillImage1.Agent`` and registers with ``Manager.RegisterAgent``,
in the manner of BlueZ and NetworkManager agents. The service calls it with a
timeout to start an application in its user's session (``Launch``) or to let its
user choose among several (``Choose``). An agent belongs to its connection: when
the connection leaves the bus, the agent is gone.

The registration methods of the Manager come here too, with the caller's uid
taken from the bus (``GetConnectionCredentials``).
"""

from __future__ import annotations

import asyncio
import re
from typing import TYPE_CHECKING, Any

import structlog
from dbus_fast import Message, MessageType, Variant

from stillsvc.common.errors import AccessDenied, InvalidArgument, quote
from stillsvc.common.names import AGENT_IFACE
from stillsvc.core.agents import Agent, AgentError, ChoiceRequest, LaunchRequest
from stillsvc.core.events import EventMonitor
from stillsvc.core.registry import SYSTEM, USER, ManageCheck, Registration
from stillsvc.frontends.dbus.authority import MANAGE
from stillsvc.frontends.dbus.variants import check_options, integer_option

if TYPE_CHECKING:
    from stillsvc.frontends.dbus.service import Service

log = structlog.get_logger(__name__)

_PATH_RE = re.compile(r"^/([A-Za-z0-9_]+(/[A-Za-z0-9_]+)*)?$")


_DESCRIPTION_TYPES = {"id": "s", "name": "s", "scope": "s", "uid": "u", "command": "as", "events": "as",
                      "devices": "as", "created_us": "x", "default_for": "a(ss)"}


def _bool_option(options: dict[str, Variant], key: str) -> bool:
    variant = options.get(key)
    if variant is None:
        return False
    if variant.signature != "b":
        raise InvalidArgument(f"option {key} must be a boolean, not type '{variant.signature}'")
    return bool(variant.value)


class AgentBridge:
    """Connects the core's :class:`~stillsvc.core.events.EventMonitor` to the bus."""

    def __init__(self, service: Service, monitor: EventMonitor) -> None:
        self.service = service
        self.monitor = monitor
        self.registry = monitor.registry
        self.agents = monitor.agents
        service.events = self

    # -- agents -------------------------------------------------------------------------
    async def register_agent(self, sender: str | None, path: str) -> None:
        if sender is None:
            raise AccessDenied("the service cannot tell who is calling")
        if not _PATH_RE.match(path) or len(path) > 255:
            raise InvalidArgument(f"{quote(path)} is not a valid object path")
        client = await self.service.client(sender)
        if client.uid is None:
            raise AccessDenied("the bus did not tell the service which user this agent runs as")
        if sender not in self.service.clients:
            raise AccessDenied("the agent's connection has left the bus")
        agent = Agent(owner=sender, path=path, uid=client.uid, description=client.describe(),
                      launch=lambda request: self._launch(agent, request),
                      choose=lambda request: self._choose(agent, request))
        self.agents.add(agent)

    def unregister_agent(self, sender: str | None, path: str) -> None:
        if sender is None or self.agents.remove(sender, path) is None:
            raise InvalidArgument(f"no agent at {quote(path)} is registered for this connection")

    async def _call(self, agent: Agent, member: str, signature: str, body: list[Any]) -> list[Any]:
        msg = Message(destination=agent.owner, path=agent.path, interface=AGENT_IFACE, member=member,
                      signature=signature, body=body)
        try:
            reply = await self.service.bus.call(msg)
        except asyncio.CancelledError:
            raise
        except Exception as e:
            raise AgentError(f"the call failed: {e}") from None
        if reply is None:
            raise AgentError("no reply")
        if reply.message_type is MessageType.ERROR:
            text = str(reply.body[0])[:200] if reply.body else ""
            if reply.error_name in ("org.freedesktop.DBus.Error.ServiceUnknown",
                                    "org.freedesktop.DBus.Error.NameHasNoOwner"):
                self.agents.discard(agent)
                raise AgentError("the agent has left the bus")
            raise AgentError(f"{reply.error_name}: {text}" if text else str(reply.error_name))
        return reply.body

    async def _launch(self, agent: Agent, request: LaunchRequest) -> int:
        body = await self._call(agent, "Launch", "sasa{ss}sst", [
            request.registration.name, request.argv, request.env, request.device_id, request.event,
            request.sequence])
        if len(body) != 1 or not isinstance(body[0], int):
            raise AgentError("Launch answered with something other than a process id")
        return body[0]

    async def _choose(self, agent: Agent, request: ChoiceRequest) -> str:
        candidates = [self.describe(r, agent.uid) for r in request.candidates]
        body = await self._call(agent, "Choose", "sstaa{sv}",
                                [request.device_id, request.event, request.sequence, candidates])
        if len(body) != 1 or not isinstance(body[0], str):
            raise AgentError("Choose answered with something other than an application id")
        return body[0]

    # -- registrations ------------------------------------------------------------------------
    async def _uid(self, sender: str | None) -> int:
        client = await self.service.client(sender)
        if client.uid is None:
            raise AccessDenied("the bus did not tell the service which user is calling")
        return client.uid

    def describe(self, registration: Registration, viewer: int | None) -> dict[str, Variant]:
        plain = self.registry.describe_for(registration, viewer)
        return {name: Variant(_DESCRIPTION_TYPES[name], value) for name, value in plain.items()}

    def _may_manage(self, sender: str | None, uid: int) -> ManageCheck:
        """Whether the caller may manage system-wide registrations and others' ones: polkit's
        manage action when the service asks polkit, otherwise root and the service's user."""

        async def check() -> bool:
            authority = getattr(self.service, "authority", None)
            if authority is not None and authority.mode == "polkit":
                await authority.require(sender, MANAGE)
                return True
            return self.registry.is_admin(uid)

        return check

    async def register_application(self, sender: str | None, name: str, command: list[str], events: list[str],
                                   devices: list[str], options: dict[str, Variant]) -> None:
        check_options(options, {"system"})
        scope = SYSTEM if _bool_option(options, "system") else USER
        uid = await self._uid(sender)
        await self.registry.register_as(uid, name, command, events, devices, scope, self._may_manage(sender, uid))

    async def unregister_application(self, sender: str | None, name: str, options: dict[str, Variant]) -> None:
        check_options(options, {"system", "uid"})
        uid = await self._uid(sender)
        scope = SYSTEM if _bool_option(options, "system") else USER
        owner = None
        if "uid" in options:
            if scope == SYSTEM:
                raise InvalidArgument("options system and uid cannot be combined")
            owner = integer_option(options, "uid", uid, 0, 2**32 - 1)
        await self.registry.unregister_as(uid, name, scope, owner, self._may_manage(sender, uid))

    async def list_applications(self, sender: str | None) -> list[dict[str, Variant]]:
        uid = await self._uid(sender)
        return [self.describe(r, uid) for r in self.registry.visible_to(uid)]

    async def set_default(self, sender: str | None, device_id: str, event: str, application: str) -> None:
        uid = await self._uid(sender)
        await self.registry.set_default_as(uid, device_id, event, application, self._may_manage(sender, uid))
