"""Names of the bus's own interfaces, and match rules: what every module here needs
and stillsvc.common.names (the service's names) does not hold."""

from __future__ import annotations

DBUS_NAME = "org.freedesktop.DBus"
DBUS_PATH = "/org/freedesktop/DBus"
PROPERTIES_IFACE = "org.freedesktop.DBus.Properties"
OBJECT_MANAGER_IFACE = "org.freedesktop.DBus.ObjectManager"


def match_rule(**keys: str) -> str:
    """An AddMatch rule: ``match_rule(type="signal", path=...)``."""
    return ",".join(f"{k}='{v}'" for k, v in keys.items())
