"""Authorization: one gate, deny by default.

Every exported method is listed in :data:`RULES` with what it needs:

* ``PUBLIC`` — anyone the bus policy lets through (read-only, or only about the
  caller itself);
* ``OWNER`` — the caller must own the session or item it calls (checked by the
  object itself: sessions belong to the connection that created them, and that
  connection was authorized when it created the session);
* a polkit action — :data:`USE` (open devices, register for one's own events;
  allowed for active local sessions) or :data:`MANAGE` (watching every event,
  system-wide registrations, simulator control on a real system; administrators).

A method missing from the table is refused with ``Error.AccessDenied``, so a new
method cannot slip out unguarded; a test checks the table against what is
exported. The check asks polkit about the caller's bus name
(``system-bus-name`` subject), allowing interactive authentication.

On a bus other than the system bus (a private or session bus, used for tests and
demos) the service runs with ``--authorization none``: whoever can connect to
such a bus is trusted, and only the ownership checks apply.
"""

from __future__ import annotations

import structlog
from dbus_fast import Message, MessageType, Variant

from stillsvc.common.errors import AccessDenied
from stillsvc.common.names import DEVICE_IFACE, IFACE_PREFIX, ITEM_IFACE, MANAGER_IFACE, SESSION_IFACE, SIMULATOR_IFACE

log = structlog.get_logger(__name__)

USE = f"{IFACE_PREFIX}.use"
MANAGE = f"{IFACE_PREFIX}.manage"
PUBLIC = "public"
OWNER = "owner"

POLKIT_NAME = "org.freedesktop.PolicyKit1"
POLKIT_PATH = "/org/freedesktop/PolicyKit1/Authority"
POLKIT_IFACE = "org.freedesktop.PolicyKit1.Authority"
ALLOW_USER_INTERACTION = 1

RULES: dict[tuple[str, str], str] = {
    # Manager
    (MANAGER_IFACE, "GetDevices"): PUBLIC,
    (MANAGER_IFACE, "FindDevice"): PUBLIC,
    (MANAGER_IFACE, "GetDriverItems"): PUBLIC,
    # what lsusb shows any user: ids, names, serial numbers
    (MANAGER_IFACE, "GetCandidates"): PUBLIC,
    (MANAGER_IFACE, "CreateDevice"): USE,
    (MANAGER_IFACE, "WatchEvents"): MANAGE,
    (MANAGER_IFACE, "UnwatchEvents"): PUBLIC,
    (MANAGER_IFACE, "RegisterAgent"): USE,
    (MANAGER_IFACE, "UnregisterAgent"): PUBLIC,
    # per-user registrations need USE; system-wide ones MANAGE (checked in the method)
    (MANAGER_IFACE, "RegisterLaunchApplication"): USE,
    (MANAGER_IFACE, "UnregisterLaunchApplication"): USE,
    (MANAGER_IFACE, "ListLaunchApplications"): PUBLIC,
    (MANAGER_IFACE, "SetDefaultApplication"): USE,
    # Session: the owner only
    **{(SESSION_IFACE, name): OWNER for name in (
        "LockDevice", "UnlockDevice", "GetStatus", "DeviceReset", "Diagnostic", "Escape", "RawReadData",
        "RawWriteData", "RawReadCommand", "RawWriteCommand", "Subscribe", "Unsubscribe",
        "GetLastNotificationData", "HandOver", "Close")},
    # Item: the owner of its session only
    **{(ITEM_IFACE, name): OWNER for name in (
        "ReadProperties", "GetPropertyAttributes", "WriteProperties", "Transfer", "Cancel", "Synchronize",
        "Delete", "Capture")},
    # Simulator: only simulated devices have it; driving one is a device use
    **{(SIMULATOR_IFACE, name): USE for name in (
        "PressButton", "LoadPages", "Jam", "Unplug", "Replug", "AttachFeeder")},
}

#: Interfaces whose properties anyone may read (all are read-only).
READABLE = frozenset({MANAGER_IFACE, DEVICE_IFACE, SIMULATOR_IFACE})


def rule_for(interface: str, member: str) -> str:
    rule = RULES.get((interface, member))
    if rule is None:
        raise AccessDenied(f"{interface}.{member} has no authorization rule")
    return rule


class Authority:
    """Answers "may this caller do that?" — through polkit, or trusting everyone (``none``)."""

    def __init__(self, bus: object, mode: str) -> None:
        if mode not in ("polkit", "none"):
            raise ValueError(f"authorization mode must be 'polkit' or 'none', not {mode!r}")
        self.bus = bus
        self.mode = mode

    async def check(self, sender: str | None, interface: str, member: str) -> None:
        """Raise AccessDenied unless ``sender`` may call ``interface.member``."""
        rule = rule_for(interface, member)
        if rule in (PUBLIC, OWNER):
            return
        await self.require(sender, rule)

    async def require(self, sender: str | None, action: str) -> None:
        if self.mode == "none":
            return
        if sender is None:
            raise AccessDenied(f"not authorized for {action}: unknown caller")
        subject = ("system-bus-name", {"name": Variant("s", sender)})
        msg = Message(destination=POLKIT_NAME, path=POLKIT_PATH, interface=POLKIT_IFACE,
                      member="CheckAuthorization", signature="(sa{sv})sa{ss}us",
                      body=[subject, action, {}, ALLOW_USER_INTERACTION, ""])
        try:
            reply = await self.bus.call(msg)  # type: ignore[attr-defined]
        except Exception as e:
            log.error("polkit check failed", client=sender, action=action, error=str(e))
            raise AccessDenied(f"not authorized for {action}: the authorization service failed") from None
        if reply.message_type is MessageType.ERROR:
            # e.g. ServiceUnknown (no polkitd), or polkit's "Only trusted callers ..."
            # when the action does not name the service's user as its owner
            text = reply.body[0] if reply.body and isinstance(reply.body[0], str) else ""
            log.warning("polkit refused to answer", client=sender, action=action, error=reply.error_name,
                        text=text)
            raise AccessDenied(f"not authorized for {action}: the authorization service did not answer")
        authorized, challenge, _details = reply.body[0]
        if not authorized:
            log.info("not authorized", client=sender, action=action, challenge=challenge)
            raise AccessDenied(f"not authorized for {action}")
