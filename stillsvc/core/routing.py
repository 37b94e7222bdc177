"""What became of an event: the one consumer that took it, or why none did.

Routing itself is the manager's (:meth:`stillsvc.core.manager.DeviceManager.route`)
and the event monitor's (:class:`stillsvc.core.events.EventMonitor`); this is the
value they give the listeners. Front-ends render it at their edge — D-Bus as the
``consumer`` string of ``Manager.EventRouted``, ``str(outcome)``.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass


class Consumer(enum.Enum):
    QUEUE = "queue"  # queued for the session holding data mode
    LAUNCH = "launch"  # a registered application was started
    NONE = "none"  # nobody took it (counted in the device's undelivered events)


@dataclass(frozen=True)
class Outcome:
    consumer: Consumer
    #: Who took it (the session, the application and how it was chosen), or why nobody did.
    detail: str
    #: The session it was queued for (QUEUE only).
    session: int | None = None
    #: The application's registration reference and process id (LAUNCH only; pid 0 when unknown).
    application: str | None = None
    pid: int = 0

    @classmethod
    def queued(cls, session: int, client: str) -> Outcome:
        return cls(Consumer.QUEUE, f"session {session} ({client})", session=session)

    @classmethod
    def launched(cls, application: str, detail: str, pid: int = 0) -> Outcome:
        return cls(Consumer.LAUNCH, detail, application=application, pid=pid)

    @classmethod
    def nobody(cls, why: str) -> Outcome:
        return cls(Consumer.NONE, why)

    @property
    def delivered(self) -> bool:
        return self.consumer is not Consumer.NONE

    def __str__(self) -> str:
        return f"{self.consumer.value}: {self.detail}"


__all__ = ["Consumer", "Outcome"]
