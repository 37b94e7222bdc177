"""The event monitor: every device event to exactly one consumer.

The monitor is an internal client. For as long as a device is present it holds a
status-mode session on it (opened through the same machinery as any client's, so
it shows as one more status session and never blocks data mode), takes the
device's events — pushed by the driver, or, for drivers that can only ask, polled
at ``service.poll_interval_ms`` under the device lock — and routes each one:

1. a session holds the device in data mode: the event is queued for it (done by
   :meth:`stillsvc.core.manager.DeviceManager.route`);
2. otherwise the monitor starts one registered application (this module): it is
   the manager's ``launcher``;
3. while the device is handed over to another program, events are not routed.

Choosing the application, for an event nobody holds data mode for:

* The candidates are the registrations that match the device and the event and
  can be started now: system-wide ones, and per-user ones whose user has an agent
  registered.
* A per-device, per-event default that names a candidate wins.
* Otherwise a single candidate is started.
* Otherwise an agent is asked to choose: agents of users owning a candidate, most
  recently registered first (with only system-wide candidates: every agent, most
  recent first). Each agent is offered its own user's candidates and the
  system-wide ones, and only asked when that is at least two. An agent that fails,
  times out or answers with something it was not offered is skipped; one that
  answers with an empty string declines, and the event is not delivered.
* If no agent chose, the oldest registration among the candidates is started.

Starting it: a system-wide registration is run by the service itself, as user
``nobody`` when the service runs as root and as the service's own user otherwise;
a per-user one is handed to an agent of its user (most recent first; on failure
the next one). Exactly one application is started per event: when that fails, the
event is logged as undelivered with the reason, and no other application is tried.

A launched application gets its command with ``%d`` (device id), ``%e`` (event
name), ``%n`` (sequence number), ``%p`` (device object path) and ``%%`` replaced,
and the environment variables ``STILLSVC_DEVICE``, ``STILLSVC_EVENT``,
``STILLSVC_EVENT_SEQUENCE``, ``STILLSVC_DEVICE_PATH``, ``STILLSVC_APPLICATION``
and ``STILLSVC_BUS``.

The module knows nothing of D-Bus: agents (:mod:`stillsvc.core.agents`) are
objects whose ``launch`` and ``choose`` coroutines the D-Bus layer supplies;
system-wide applications are run by :mod:`stillsvc.core.launcher`, polling
drivers asked by :mod:`stillsvc.core.poller`.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from dataclasses import dataclass
from typing import Any

import structlog

from stillsvc.common.errors import StillError
from stillsvc.common.names import device_path
from stillsvc.core.agents import AgentError, Agents, ChoiceRequest, LaunchRequest
from stillsvc.core.devices import Device
from stillsvc.core.launcher import SystemLauncher
from stillsvc.core.listener import Listener
from stillsvc.core.manager import DeviceManager
from stillsvc.core.poller import poll_events
from stillsvc.core.registry import SYSTEM, USER, Registration, Registry, expand
from stillsvc.core.routing import Outcome
from stillsvc.core.sessions import Client, EventRecord, Session
from stillsvc.driver import EventSource, Mode

log = structlog.get_logger(__name__)

#: How long an agent may take to start an application, and to let its user choose (seconds).
LAUNCH_TIMEOUT = 10.0
CHOOSE_TIMEOUT = 120.0

MONITOR_CLIENT = Client(name="event-monitor", command="event monitor", internal=True)


@dataclass
class _Watch:
    session: Session | None = None
    poller: asyncio.Task[Any] | None = None
    opening: asyncio.Task[Any] | None = None


class EventMonitor(Listener):
    def __init__(self, manager: DeviceManager, registry: Registry, agents: Agents | None = None, *,
                 bus: str = "", system_launcher: SystemLauncher | None = None) -> None:
        self.manager = manager
        self.registry = registry
        self.agents = agents if agents is not None else Agents()
        self.bus = bus
        self.system = system_launcher
        self.client = MONITOR_CLIENT
        self.launch_timeout = LAUNCH_TIMEOUT
        self.choose_timeout = CHOOSE_TIMEOUT
        self._watches: dict[str, _Watch] = {}

    # -- lifetime -------------------------------------------------------------------
    def start(self) -> None:
        if self.system is None:
            try:
                self.system = SystemLauncher()
            except KeyError:
                log.error("no user 'nobody' to run system-wide applications as; they will not be started")
        self.manager.listeners.append(self)
        self.manager.launcher = self.launch
        for device in list(self.manager.devices.values()):
            self.device_added(device)

    def stop(self) -> None:
        if self in self.manager.listeners:
            self.manager.listeners.remove(self)
        if self.manager.launcher == self.launch:
            self.manager.launcher = None
        for watch in self._watches.values():
            for task in (watch.poller, watch.opening):
                if task is not None:
                    task.cancel()
        self._watches.clear()

    # -- devices ------------------------------------------------------------------------
    def device_added(self, device: Device) -> None:
        if device.failure:
            return  # nothing to watch until its driver starts
        watch = self._watches.setdefault(device.id, _Watch())
        if watch.opening is not None:
            watch.opening.cancel()
        watch.opening = self.manager.spawn(self._open(device, watch))

    async def _open(self, device: Device, watch: _Watch) -> None:
        try:
            session = await self.manager.create_session(device.id, Mode.STATUS, self.client)
        except StillError as e:
            device.log.error("event monitor could not open the device", error=e.message)
            return
        if device.disconnected or self._watches.get(device.id) is not watch:
            await self.manager.close_session(session, why="device went away")
            return
        watch.session = session
        watch.opening = None
        if device.driver.events is EventSource.POLL:
            watch.poller = self.manager.spawn(poll_events(self.manager, device, session))
        device.log.debug("event monitor watching", session=session.number, events=device.driver.events.value)

    def device_removed(self, device: Device) -> None:
        watch = self._watches.pop(device.id, None)
        if watch is None:
            return
        for task in (watch.poller, watch.opening):
            if task is not None:
                task.cancel()
        if watch.session is not None:
            self.manager.spawn(self.manager.close_session(watch.session, why="device went away"))

    def client_gone(self, client: Client) -> None:
        """An agent belongs to its connection: when the client goes, so do its agents."""
        self.agents.remove_owner(client.name)

    def session_of(self, device_id: str) -> Session | None:
        watch = self._watches.get(device_id)
        return watch.session if watch else None

    # -- routing: the manager's launcher -------------------------------------------------
    def launch(self, device: Device, record: EventRecord) -> Outcome | Awaitable[Outcome]:
        """Route ``record``, which no data-mode session takes, to one application."""
        matching = self.registry.matching(device.id, device.info.vendor, device.info.model, record.name)
        if not matching:
            device.undelivered(1, "no application registered", level="info", event_name=record.name,
                               sequence=record.sequence)
            return Outcome.nobody("no application registered")
        return self._deliver(device, record, matching)

    def _undelivered(self, device: Device, record: EventRecord, reason: str) -> Outcome:
        device.undelivered(1, reason, event_name=record.name, sequence=record.sequence)
        return Outcome.nobody(f"undelivered: {reason}")

    def _deliverable(self, registration: Registration) -> bool:
        if registration.scope == SYSTEM:
            return self.system is not None
        return bool(self.agents.of_uid(registration.uid))

    async def _deliver(self, device: Device, record: EventRecord, matching: list[Registration]) -> Outcome:
        candidates = [r for r in matching if self._deliverable(r)]
        if not candidates:
            first = matching[0]
            if first.scope == SYSTEM:
                why = f"system-wide applications cannot be started (no user to run {first.describe()} as)"
            else:
                why = f"no agent of user {first.uid} is registered to start '{first.name}'"
            if len(matching) > 1:
                why += f" (nor any of the {len(matching) - 1} other matching registrations)"
            return self._undelivered(device, record, why)
        chosen, how = await self._choose(device, record, candidates)
        if chosen is None:
            return self._undelivered(device, record, how)
        if device.data_holder is not None and not device.standing_back:
            # Data mode was taken while an agent was choosing: the event is that session's now.
            device.log.info("data mode taken while choosing; queueing the event instead", event_name=record.name,
                            sequence=record.sequence)
            result = self.manager.route(device, record)
            return result if isinstance(result, Outcome) else await result
        if device.held_by_program():
            # Another program took the device while an agent was choosing: launch nothing.
            device.undelivered(1, "the device is held by another program", level="info", event_name=record.name,
                               sequence=record.sequence)
            return Outcome.nobody("held by another program")
        return await self._launch(device, record, chosen, how)

    async def _choose(self, device: Device, record: EventRecord,
                      candidates: list[Registration]) -> tuple[Registration | None, str]:
        default = self.registry.default_for(device.id, record.name)
        if default is not None:
            for registration in candidates:
                if registration.key == default.target:
                    return registration, "default"
            device.log.info("the default application cannot be started now; choosing another",
                            event_name=record.name, application=default.name, scope=default.scope)
        if len(candidates) == 1:
            return candidates[0], "only match"
        owners = {r.uid for r in candidates if r.scope == USER}
        choosers = [a for a in self.agents.newest_first() if a.uid in owners] if owners \
            else self.agents.newest_first()
        for agent in choosers:
            offered = [r for r in candidates if r.scope == SYSTEM or r.uid == agent.uid]
            if len(offered) < 2:
                continue
            request = ChoiceRequest(device.id, record.name, record.sequence, offered)
            try:
                answer = await asyncio.wait_for(agent.choose(request), self.choose_timeout)
            except TimeoutError:
                device.log.warning("agent did not choose in time", agent=agent.description,
                                   timeout_s=self.choose_timeout)
                continue
            except AgentError as e:
                device.log.warning("agent could not choose", agent=agent.description, error=str(e))
                continue
            if answer == "":
                return None, f"{agent.describe()} declined to choose an application"
            for registration in offered:
                if registration.ref == answer:
                    return registration, f"chosen by {agent.describe()}"
            device.log.warning("agent chose an application it was not offered", agent=agent.description,
                               answer=answer[:80])
        oldest = min(candidates, key=lambda r: r.serial)
        return oldest, "oldest registration"

    def request(self, device: Device, record: EventRecord, registration: Registration) -> LaunchRequest:
        """The command and environment for starting ``registration`` for ``record``."""
        values = {"d": device.id, "e": record.name, "n": str(record.sequence), "p": device_path(device.id)}
        env = {
            "STILLSVC_DEVICE": device.id,
            "STILLSVC_EVENT": record.name,
            "STILLSVC_EVENT_SEQUENCE": str(record.sequence),
            "STILLSVC_DEVICE_PATH": device_path(device.id),
            "STILLSVC_APPLICATION": registration.name,
        }
        if self.bus:
            env["STILLSVC_BUS"] = self.bus
        return LaunchRequest(registration, expand(registration.command, values), env, device.id, record.name,
                             record.sequence)

    async def _launch(self, device: Device, record: EventRecord, registration: Registration,
                      how: str) -> Outcome:
        request = self.request(device, record, registration)
        if registration.scope == SYSTEM:
            assert self.system is not None
            try:
                pid = await self.system.spawn(registration.name, request.argv, request.env)
            except (OSError, StillError) as e:
                reason = getattr(e, "message", None) or e.strerror or str(e)  # type: ignore[union-attr]
                return self._undelivered(device, record, f"could not start {registration.describe()}: {reason}")
            device.log.info("application started", event_name=record.name, sequence=record.sequence,
                            application=registration.name, scope=SYSTEM, pid=pid, user=self.system.user, why=how)
            return Outcome.launched(registration.ref,
                                    f"system:{registration.name} as {self.system.user}, pid {pid} ({how})", pid)
        failures = []
        for agent in self.agents.of_uid(registration.uid):
            try:
                pid = await asyncio.wait_for(agent.launch(request), self.launch_timeout)
            except TimeoutError:
                failures.append(f"{agent.description}: no answer within {self.launch_timeout:g} s")
            except AgentError as e:
                failures.append(f"{agent.description}: {e}")
            else:
                device.log.info("application started", event_name=record.name, sequence=record.sequence,
                                application=registration.name, scope=USER, uid=registration.uid, pid=pid,
                                agent=agent.description, why=how)
                return Outcome.launched(registration.ref, f"{registration.name} via {agent.describe()}"
                                        + (f", pid {pid}" if pid else "") + f" ({how})", pid or 0)
            device.log.warning("agent failed to start an application", agent=agent.description,
                               application=registration.name, error=failures[-1])
        if not failures:
            return self._undelivered(device, record, f"the agents of user {registration.uid} have gone")
        return self._undelivered(device, record, f"no agent of user {registration.uid} started "
                                 f"'{registration.name}' ({'; '.join(failures)})")


__all__ = ["EventMonitor", "MONITOR_CLIENT"]
