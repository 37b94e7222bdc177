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


# -- ptpsim: the PTP driver against a simulated camera -------------------------------------------

import os  # noqa: E402
import sys  # noqa: E402
import threading  # noqa: E402
from pathlib import Path  # noqa: E402

from stillsvc.drivers.ptp import PtpCamera  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # tests/: ptp_camera
from ptp_camera import SimulatedBackend, SimulatedCamera, pattern_source  # noqa: E402


class SimulatedPtpCamera(PtpCamera):
    """``ptpsim``: the real ``ptp`` driver, its USB through pyusb's real core, the
    camera simulated behind pyusb's IBackend (tests/ptp_camera.py). A configured
    device (``[[device]] driver = "ptpsim"``, ``port = "usb:001:002"``) whose
    ``options`` steer the camera:

    ``folder``
        a folder on the host mirrored as the camera's storage, like QEMU's usb-mtp:
        files and subfolders present at start are its objects; a file created later
        (written to a temporary name starting with "." and renamed) becomes an
        object (ObjectAdded), a file deleted is removed (ObjectRemoved). Control
        files, each acted on once and deleted: ``.unplug`` (the camera goes),
        ``.busy-N`` (the next N operations answer DeviceBusy), ``.slow-BPS``
        (GetObject sends BPS bytes a second), ``.many-N`` (N pictures appear in
        ``MANY/`` at once, without events), ``.big-SIZE-NAME`` (a file NAME of SIZE
        pattern bytes, never in memory), ``.card-out`` / ``.card-in``.
    ``top_level_only``
        answer GetObjectHandles(parent 0) with the top level only (usb-mtp's way).
    """

    name = "ptpsim"
    matches = ()

    def usb_backend(self):  # type: ignore[no-untyped-def]
        if getattr(self, "_backend", None) is None:
            options = self.config.options
            bus, address = (int(part) for part in self.config.port.split(":")[1:])
            self.camera = SimulatedCamera(bus=bus, address=address,
                                          top_level_only=bool(options.get("top_level_only", False)))
            self._mirror = _Mirror(self.camera, Path(options["folder"])) if options.get("folder") else None
            self._backend = SimulatedBackend(self.camera)
        return self._backend

    def shutdown(self) -> None:
        mirror = getattr(self, "_mirror", None)
        if mirror is not None:
            mirror.stop()
        super().shutdown()


class _Mirror:
    """Keeps a simulated camera's storage in step with a folder (polled every 50 ms)."""

    def __init__(self, camera: SimulatedCamera, folder: Path) -> None:
        self.camera = camera
        self.folder = folder
        self.known: dict[str, int] = {}
        self.stopped = threading.Event()
        self.saved_storage = None
        self._sync(events=False)
        threading.Thread(target=self._run, name="ptpsim-mirror", daemon=True).start()

    def stop(self) -> None:
        self.stopped.set()

    def _run(self) -> None:
        while not self.stopped.wait(0.05):
            try:
                self._sync(events=True)
            except Exception as e:  # a test aid: say what went wrong, keep going
                print(f"ptpsim mirror: {type(e).__name__}: {e}", file=sys.stderr, flush=True)

    def _sync(self, events: bool) -> None:
        for control in sorted(self.folder.glob(".*")):
            if control.name.startswith(".tmp"):
                continue
            self._control(control.name)
            control.unlink(missing_ok=True)
        seen: set[str] = set()
        for path in sorted(self.folder.rglob("*")):
            relative = path.relative_to(self.folder)
            if any(part.startswith(".") for part in relative.parts):
                continue
            key = str(relative)
            seen.add(key)
            if key in self.known:
                continue
            parent = self.known.get(str(relative.parent), 0) if str(relative.parent) != "." else 0
            if path.is_dir():
                self.known[key] = self.camera.add_folder(None, parent, path.name, events=events)
            else:
                self.known[key] = self.camera.add_file(None, parent, path.name, path.read_bytes(),
                                                       format=_format_of(path.name), events=events)
        for key in sorted(set(self.known) - seen, key=len, reverse=True):
            handle = self.known.pop(key)
            if not key.startswith(("MANY", "BIG:")):
                try:
                    self.camera.remove_object(handle)
                except Exception:
                    pass

    def _control(self, name: str) -> None:
        camera = self.camera
        if name == ".unplug":
            camera.unplug()
        elif name.startswith(".busy-"):
            camera.busy_next(int(name.split("-")[1]))
        elif name.startswith(".slow-"):
            camera.slow_data(int(name.split("-")[1]))
        elif name.startswith(".many-"):
            folder = camera.add_folder(None, 0, "MANY", events=False)
            camera.add_many(int(name.split("-")[1]), None, folder)
            self.known["MANY"] = folder
        elif name.startswith(".big-"):
            _, size, filename = name.split("-", 2)
            self.known[f"BIG:{filename}"] = camera.add_file(None, 0, filename, pattern_source(1), size=int(size),
                                                            events=True)
        elif name == ".card-out":
            self.saved_storage = next(iter(camera.storages))
            camera.remove_storage(self.saved_storage)
        elif name == ".card-in":
            camera.add_storage()


def _format_of(name: str) -> int:
    suffix = os.path.splitext(name)[1].lower()
    return {".jpg": 0x3801, ".jpeg": 0x3801, ".png": 0x380B, ".tif": 0x380D, ".txt": 0x3004}.get(suffix, 0x3000)
