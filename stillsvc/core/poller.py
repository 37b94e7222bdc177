"""Polling drivers that cannot tell of their events: asked at
``service.poll_interval_ms``, under the device lock, and never while a data-mode
client or another program holds the device, nor when anyone waits for it."""

from __future__ import annotations

import asyncio

from stillsvc.common.errors import StillError
from stillsvc.core.devices import Device
from stillsvc.core.manager import DeviceManager
from stillsvc.core.sessions import Hold, Session
from stillsvc.driver import DeviceEvent, Minidriver, Mode


async def poll_events(manager: DeviceManager, device: Device, session: Session) -> None:
    """Ask a polling driver for events, under the device lock, when nobody else has the device."""
    interval = manager.limits.poll_interval_ms / 1000
    while not device.disconnected and not session.closed:
        await asyncio.sleep(interval)
        if not _may_poll(device):
            continue
        owner = Hold("event poll", session)
        try:
            # Never wait for the lock: a client that holds or waits for it goes first.
            await device.lock(owner, 0, driver_lock=False)
        except StillError as e:
            device.log.debug("event poll skipped", reason=e.message)
            continue
        try:
            # Checked again with the lock held: nothing can take data mode between
            # this check and the driver call starting.
            if not _may_poll(device, locked=True):
                continue
            events: list[DeviceEvent] = await device.run_driver(_poll_once, device.driver)
        except StillError as e:
            device.log.warning("event poll failed", error=e.message)
            continue
        finally:
            if device.device_lock.holder is owner:
                await device.unlock(owner)
        for event in events or ():
            if isinstance(event, DeviceEvent):
                manager.driver_event(device.id, event)
            else:
                device.log.error("driver returned something that is not an event from poll_events",
                                 value=repr(event)[:80])

def _poll_once(driver: Minidriver) -> list[DeviceEvent]:
    """lock(), poll_events(), unlock(): one trip to the worker thread a poll."""
    driver.lock(Mode.STATUS)
    try:
        return driver.poll_events()
    finally:
        driver.unlock()


def _may_poll(device: Device, locked: bool = False) -> bool:
    if device.disconnected or device.standing_back or device.held_outside or device.data_holder is not None:
        return False
    return locked or (device.device_lock.holder is None and not device.device_lock.waiting)


__all__ = ["poll_events"]
