"""Users' agents: how the service starts a per-user application in that user's
session, and asks a user to choose. The front-end that registered an agent
supplies its ``launch`` and ``choose`` coroutines (D-Bus: an Agent object the
user's ``stillctl agent`` exports); the core knows nothing of how they are called."""

from __future__ import annotations

import itertools
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import structlog

from stillsvc.common.errors import InvalidArgument, LimitExceeded
from stillsvc.core.registry import Registration

log = structlog.get_logger(__name__)

#: Agents one user may have registered at once.
MAX_AGENTS_PER_USER = 16


class AgentError(Exception):
    """An agent could not do what it was asked; ``str()`` says why."""


@dataclass(frozen=True)
class LaunchRequest:
    registration: Registration
    argv: list[str]
    env: dict[str, str]
    device_id: str
    event: str
    sequence: int


@dataclass(frozen=True)
class ChoiceRequest:
    device_id: str
    event: str
    sequence: int
    #: What the agent may choose from, oldest first; it answers with a ``ref``.
    candidates: list[Registration]


@dataclass(eq=False)
class Agent:
    """A user's agent, as the D-Bus layer registered it."""

    owner: str
    path: str
    uid: int
    description: str
    launch: Callable[[LaunchRequest], Awaitable[int]]
    choose: Callable[[ChoiceRequest], Awaitable[str]]
    number: int = 0

    def describe(self) -> str:
        return f"agent {self.description} of user {self.uid}"


class Agents:
    """The registered agents, newest last."""

    def __init__(self) -> None:
        self._agents: list[Agent] = []
        self._numbers = itertools.count(1)

    def __iter__(self):  # type: ignore[no-untyped-def]
        return iter(list(self._agents))

    def __len__(self) -> int:
        return len(self._agents)

    def add(self, agent: Agent) -> Agent:
        if any(a.owner == agent.owner and a.path == agent.path for a in self._agents):
            raise InvalidArgument(f"an agent at {agent.path} is already registered for this connection")
        if len(self.of_uid(agent.uid)) >= MAX_AGENTS_PER_USER:
            raise LimitExceeded(f"user {agent.uid} already has {MAX_AGENTS_PER_USER} agents")
        agent.number = next(self._numbers)
        self._agents.append(agent)
        log.info("agent registered", agent=agent.description, uid=agent.uid, path=agent.path)
        return agent

    def remove(self, owner: str, path: str) -> Agent | None:
        for agent in self._agents:
            if agent.owner == owner and agent.path == path:
                self._agents.remove(agent)
                log.info("agent unregistered", agent=agent.description, uid=agent.uid, path=path)
                return agent
        return None

    def remove_owner(self, owner: str) -> list[Agent]:
        gone = [a for a in self._agents if a.owner == owner]
        for agent in gone:
            self._agents.remove(agent)
            log.info("agent left", agent=agent.description, uid=agent.uid, path=agent.path)
        return gone

    def discard(self, agent: Agent) -> None:
        if agent in self._agents:
            self._agents.remove(agent)

    def of_uid(self, uid: int | None) -> list[Agent]:
        """That user's agents, most recently registered first."""
        return [a for a in reversed(self._agents) if a.uid == uid]

    def newest_first(self) -> list[Agent]:
        return list(reversed(self._agents))


__all__ = ["Agent", "AgentError", "Agents", "ChoiceRequest", "LaunchRequest", "MAX_AGENTS_PER_USER"]
