"""The D-Bus front-end's one extension hook: driver-specific interfaces on a
device's object.

A driver that offers more than the Device interface can express (the simulated
scanner's controls: press a button, pull the plug) gets its own interface on its
devices' objects. The interface class is registered under the driver's name in
the entry-point group ``stillsvc.dbus_interfaces``, for example::

    [project.entry-points."stillsvc.dbus_interfaces"]
    sim = "stillsvc.frontends.dbus.simulator:SimulatorInterface"

When a device of that driver appears, the front-end builds ``cls(service,
device_id)`` and exports it at the device's path. The class is an ordinary
``ServiceInterface``: its methods are exported with
:func:`stillsvc.frontends.dbus.bus.method` (errors mapped, authorization
checked), it reaches its driver with ``service.manager.driver_of(device_id)``,
and it may have ``snapshot() -> dict[str, Variant]`` (its properties, for
``GetManagedObjects`` and ``InterfacesAdded``) and ``changed()`` (called when
the device changes). It stays exported for as long as the driver lives — also
while the device is unplugged, if the driver was kept to report it back.
"""

from __future__ import annotations

from typing import Any

from stillsvc.common import plugins

GROUP = "stillsvc.dbus_interfaces"


def discover() -> dict[str, list[type[Any]]]:
    """Interface classes by driver name. A broken plugin is logged and skipped."""
    found: dict[str, list[type[Any]]] = {}
    for driver_name, cls in plugins.load(GROUP):
        found.setdefault(driver_name, []).append(cls)
    if "sim" not in found:  # running from a source tree without installed metadata
        from stillsvc.frontends.dbus.simulator import SimulatorInterface

        found["sim"] = [SimulatorInterface]
    return found
