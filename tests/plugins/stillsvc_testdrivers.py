"""Drivers for the tests, found the way every third-party driver is: through the
``stillsvc.drivers`` entry-point group of an installed distribution. Putting this
directory on ``PYTHONPATH`` installs it (``stillsvc_testdrivers-0.dist-info``)::

    PYTHONPATH=tests/plugins python3 -c "from stillsvc import drivers; print(drivers.discover())"

``usbsim`` is the simulated scanner on a (fake, umockdev) USB device. It takes the
devices whose udev property ``STILLSVC_TEST_DRIVER`` is ``usbsim``; other udev
properties of the device steer it:

``STILLSVC_TEST_FAIL``
    while set to anything but "" or "0", :meth:`~UsbSimulatedScanner.initialize`
    refuses to start ("the test device refused to start").
``STILLSVC_TEST_INIT_DELAY_MS``
    initialize takes that long first (a slow driver).

It reports what udev knows of the device: vendor (``ID_VENDOR``), model
(``ID_MODEL``) and serial (``ID_SERIAL_SHORT``).
"""

from __future__ import annotations

import time

from stillsvc.driver import DeviceInfo, Match, Mode
from stillsvc.drivers.sim import SimulatedScanner

REFUSAL = "the test device refused to start"


def _set(value: str | None) -> bool:
    return bool(value) and value != "0"


class UsbSimulatedScanner(SimulatedScanner):
    name = "usbsim"
    matches = (Match(subsystem="usb", properties=(("STILLSVC_TEST_DRIVER", "usbsim"),)),)

    def initialize(self, port: str, mode: Mode) -> DeviceInfo:
        properties = self.config.properties
        delay_ms = int(properties.get("STILLSVC_TEST_INIT_DELAY_MS") or 0)
        if delay_ms > 0:
            time.sleep(delay_ms / 1000)
        if _set(properties.get("STILLSVC_TEST_FAIL")):
            raise RuntimeError(REFUSAL)
        info = super().initialize(port, mode)
        vendor = properties.get("ID_VENDOR") or info.vendor
        model = properties.get("ID_MODEL") or info.model
        return DeviceInfo(
            name=self.config.name or f"{vendor} {model}",
            vendor=vendor,
            model=model,
            serial=properties.get("ID_SERIAL_SHORT", ""),
            kind=info.kind,
            capabilities=info.capabilities,
            event_names=info.event_names,
        )
