"""How the core tells the outside what happened (the front-ends, the event monitor)."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from stillsvc.core.devices import Device
    from stillsvc.core.routing import Outcome
    from stillsvc.core.sessions import Client, EventRecord, Session


class Listener:
    """The core's one way of telling the outside what happened: the front-ends and
    the event monitor subclass it and override what they need (every method does
    nothing here). Called on the event loop; a listener that fails is logged and
    the others are still told."""

    def device_added(self, device: Device) -> None: ...
    def device_removed(self, device: Device) -> None: ...
    def device_changed(self, device: Device, names: list[str]) -> None: ...
    def session_closed(self, session: Session) -> None: ...
    def lock_revoked(self, session: Session) -> None: ...
    def event_queued(self, session: Session, record: EventRecord) -> None:
        """An event was queued for a session that subscribed (the holder of data mode)."""
    def event_routed(self, device: Device, record: EventRecord, outcome: Outcome) -> None: ...
    def items_changed(self, device: Device) -> None: ...
    def client_gone(self, client: Client) -> None: ...


__all__ = ["Listener"]
