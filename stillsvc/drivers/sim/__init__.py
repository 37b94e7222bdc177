"""``sim``: a simulated flatbed scanner with an automatic document feeder.

It has four buttons (scan, copy, email, pdf), a paper sensor on the feeder and a
deterministic test pattern for every page (:func:`stillsvc.drivers.sim.pattern.pattern_rows`),
so a transfer can be checked byte for byte. Its ``simulate`` actions back the
``Simulator`` D-Bus interface: press a button, load pages, jam, unplug, replug,
attach or detach the feeder.

The test pattern is drawn relative to the scan area; the page number (0-based,
counting every page this device has fed) selects the pattern's variant.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from stillsvc.common.errors import Disconnected, Empty, Failed, InvalidArgument
from stillsvc.driver import (
    DeviceEvent,
    DeviceInfo,
    EventSource,
    Match,
    Minidriver,
    Mode,
    PageInfo,
    PortPolicy,
)
from stillsvc.driver.items import Access, DriverItem, PropertySpec, Range, ValueList
from stillsvc.drivers.sim.pattern import pattern_rows
from stillsvc.imaging import ImageInfo

BUTTONS = ("scan", "copy", "email", "pdf")
EVENTS = tuple(f"{b}-button" for b in BUTTONS) + ("paper-loaded", "paper-empty", "paper-jam")
RESOLUTIONS = (75, 100, 150, 200, 300, 600)
MODES = ("color", "gray", "lineart")
FORMATS = ("raw", "pnm", "png", "tiff", "jpeg", "pdf")
BED_MM = (216.0, 297.0)
FEEDER_CAPACITY = 50
BAND_BYTES = 256 * 1024


def _pixels(mm: float, dpi: int) -> int:
    return int(mm / 25.4 * dpi)


def scan_specs(source: tuple[str, ...], max_pages: int) -> list[PropertySpec]:
    """Properties of a scanning item (Flatbed or Feeder), defaults at 150 dpi."""
    dpi = 150
    width, height = _pixels(BED_MM[0], dpi), _pixels(BED_MM[1], dpi)
    return [
        PropertySpec("resolution", "u", dpi, valid=ValueList(RESOLUTIONS), description="dots per inch"),
        PropertySpec("mode", "s", "color", valid=ValueList(MODES), description="colour mode"),
        PropertySpec("depth", "u", 8, valid=ValueList((1, 8, 16)), description="bits per sample (1 for lineart)"),
        PropertySpec("x_offset", "u", 0, valid=Range(0, width - 1), description="left edge, pixels"),
        PropertySpec("y_offset", "u", 0, valid=Range(0, height - 1), description="top edge, pixels"),
        PropertySpec("width", "u", width, valid=Range(1, width), description="scan area width, pixels"),
        PropertySpec("height", "u", height, valid=Range(1, height), description="scan area height, pixels"),
        PropertySpec("max_width", "u", width, access=Access.READ, description="bed width at this resolution"),
        PropertySpec("max_height", "u", height, access=Access.READ, description="bed height at this resolution"),
        PropertySpec("brightness", "i", 0, valid=Range(-100, 100)),
        PropertySpec("contrast", "i", 0, valid=Range(-100, 100)),
        PropertySpec(
            "source", "s", source[0], valid=ValueList(source),
            access=Access.READ_WRITE if len(source) > 1 else Access.READ,
            description="document source",
        ),
        PropertySpec(
            "pages", "u", 1 if max_pages == 1 else 0, valid=Range(0 if max_pages > 1 else 1, max_pages),
            access=Access.READ_WRITE if max_pages > 1 else Access.READ,
            description="pages to scan (0: until the feeder is empty)",
        ),
        PropertySpec("format", "s", "png", valid=ValueList(FORMATS), description="preferred transfer format"),
    ]


@dataclass
class _SimPage:
    info: PageInfo
    number: int
    driver: SimulatedScanner
    cancel: threading.Event

    def bands(self) -> Iterator[bytes]:

        image = ImageInfo(self.info.width, self.info.height, self.info.mode, self.info.depth, self.info.resolution)
        rows = max(1, BAND_BYTES // max(1, image.bytes_per_line))
        for y0 in range(0, image.height, rows):
            if self.cancel.is_set():
                return
            self.driver._check_connected()
            if self.driver.jam_at_row is not None and y0 >= self.driver.jam_at_row:
                self.driver.jam_at_row = None
                self.driver.jammed = True
                self.driver.host.emit_event(DeviceEvent("paper-jam", {"page": self.number}))
                raise Failed("paper jam in the document feeder")
            yield pattern_rows(image, self.number, y0, min(rows, image.height - y0))


class SimulatedScanner(Minidriver):
    name = "sim"
    matches = (Match(subsystem="config"),)
    port_policy = PortPolicy.DEDICATED
    events = EventSource.PUSH

    def __init__(self, config, host) -> None:  # type: ignore[no-untyped-def]
        super().__init__(config, host)
        self._state = threading.Lock()
        self.connected = True
        self.port_open = False
        self.feeder_attached = bool(config.options.get("feeder", True))
        self.duplex = bool(config.options.get("duplex", False))
        self.pages_loaded = int(config.options.get("pages", 0))
        self.jammed = False
        self.jam_at_row: int | None = None
        self.pages_fed = 0
        #: What write_properties() last received, by item name: tests check it.
        self.last_settings: dict[str, dict[str, Any]] = {}
        self.resets = 0

    # -- device half --------------------------------------------------------
    def initialize(self, port: str, mode: Mode) -> DeviceInfo:
        self.port = port
        self.mode = mode
        self.port_open = True
        return DeviceInfo(
            name=self.config.name or "Simulated Scanner",
            vendor="stillsvc",
            model="Simulated Flatbed + ADF",
            serial=f"SIM-{self.config.id}",
            capabilities=("flatbed", "feeder", "buttons", "paper-sensor") + (("duplex",) if self.duplex else ()),
            event_names=EVENTS,
        )

    def shutdown(self) -> None:
        self.port_open = False

    def release_port(self) -> None:
        self.port_open = False

    def reclaim_port(self) -> None:
        self.port_open = True

    def _check_connected(self) -> None:
        if not self.connected:
            raise Disconnected(f"device {self.config.id} is unplugged")

    def get_status(self, mode: Mode) -> dict[str, Any]:
        self._check_connected()
        return {
            "online": True,
            "paper_loaded": self.pages_loaded > 0,
            "pages_loaded": self.pages_loaded,
            "jammed": self.jammed,
            "feeder_attached": self.feeder_attached,
            "pages_fed": self.pages_fed,
            "resets": self.resets,
        }

    def reset(self) -> None:
        self._check_connected()
        self.jammed = False
        self.resets += 1

    def diagnostic(self) -> dict[str, Any]:
        self._check_connected()
        return {"result": "pass", "lamp_hours": 42, "pages_fed": self.pages_fed}

    def escape(self, code: int, data: bytes, mode: Mode) -> bytes:
        """Code 1 echoes ``data``; code 2 returns the firmware version."""
        self._check_connected()
        if code == 1:
            return bytes(data)
        if code == 2:
            return b"SIM 1.0"
        return super().escape(code, data, mode)

    def read_data(self, size: int, mode: Mode) -> bytes:
        self.require_data(mode, "raw data read")
        self._check_connected()
        return bytes(range(256)) * (size // 256) + bytes(range(size % 256))

    def write_data(self, data: bytes, mode: Mode) -> None:
        self.require_data(mode, "raw data write")
        self._check_connected()

    def read_command(self, size: int, mode: Mode) -> bytes:
        self._check_connected()
        return b"OK\n"[:size]

    def write_command(self, data: bytes, mode: Mode) -> None:
        self._check_connected()

    # -- item half ----------------------------------------------------------
    def build_item_tree(self) -> DriverItem:
        self._check_connected()
        root = DriverItem("Root", "device", [
            PropertySpec("vendor", "s", "stillsvc", access=Access.READ),
            PropertySpec("model", "s", "Simulated Flatbed + ADF", access=Access.READ),
            PropertySpec("optical_resolution", "u", max(RESOLUTIONS), access=Access.READ),
        ])
        root.add_to_tree()
        root.add_child(DriverItem("Flatbed", "flatbed", scan_specs(("flatbed",), 1)))
        if self.feeder_attached:
            sources = ("feeder", "duplex") if self.duplex else ("feeder",)
            root.add_child(DriverItem("Feeder", "feeder", scan_specs(sources, FEEDER_CAPACITY)))
        return root

    def valid_values(self, item: DriverItem, values: dict[str, Any]) -> dict[str, Any]:
        if item.kind not in ("flatbed", "feeder"):
            return {}
        width, height = values["max_width"], values["max_height"]
        return {
            "x_offset": Range(0, width - 1),
            "y_offset": Range(0, height - 1),
            "width": Range(1, width),
            "height": Range(1, height),
        }

    def validate_properties(
        self, item: DriverItem, values: dict[str, Any], changed: set[str], previous: dict[str, Any]
    ) -> dict[str, Any]:
        if item.kind not in ("flatbed", "feeder"):
            return values
        values = dict(values)
        if values["resolution"] != previous["resolution"]:
            # Keep the scan area where it was on the bed: scale everything not set together.
            scale = values["resolution"] / previous["resolution"]
            width, height = _pixels(BED_MM[0], values["resolution"]), _pixels(BED_MM[1], values["resolution"])
            values["max_width"], values["max_height"] = width, height
            for key, limit in (("x_offset", width - 1), ("y_offset", height - 1)):
                if key not in changed:
                    values[key] = min(limit, int(previous[key] * scale))
            for key, limit in (("width", width), ("height", height)):
                if key not in changed:
                    values[key] = max(1, min(limit, round(previous[key] * scale)))
        if values["mode"] == "lineart":
            values["depth"] = 1
        elif values["depth"] == 1:
            if "depth" in changed:
                raise InvalidArgument("invalid value 1 for property depth: 1 is only valid with mode lineart "
                                      "(valid: 8, 16)")
            values["depth"] = 8
        if values["x_offset"] + values["width"] > values["max_width"]:
            raise InvalidArgument(
                f"x_offset + width must not exceed max_width ({values['max_width']} at {values['resolution']} dpi)")
        if values["y_offset"] + values["height"] > values["max_height"]:
            raise InvalidArgument(
                f"y_offset + height must not exceed max_height ({values['max_height']} at {values['resolution']} dpi)")
        return values

    def write_properties(self, item: DriverItem, values: dict[str, Any], mode: Mode) -> None:
        self.require_data(mode, "writing properties to the device")
        self._check_connected()
        self.last_settings[item.name] = dict(values)

    def acquire(self, item: DriverItem, values: dict[str, Any], mode: Mode, cancel: threading.Event) -> Iterator[_SimPage]:
        self.require_data(mode)
        self._check_connected()
        if item.kind not in ("flatbed", "feeder"):
            return super().acquire(item, values, mode, cancel)
        info = PageInfo(values["width"], values["height"], values["mode"], values["depth"], values["resolution"])
        return self._pages(item, values, info, cancel)

    def _pages(self, item: DriverItem, values: dict[str, Any], info: PageInfo, cancel: threading.Event) -> Iterator[_SimPage]:
        if item.kind == "flatbed":
            yield self._feed(info, cancel)
            return
        if self.jammed:
            raise Failed("paper jam in the document feeder: clear it and reset the device")
        if self.pages_loaded == 0:
            raise Empty("the document feeder is empty")
        wanted = values["pages"] or FEEDER_CAPACITY
        sides = 2 if values["source"] == "duplex" else 1
        count = 0
        while count < wanted and self.pages_loaded > 0 and not cancel.is_set():
            with self._state:
                self.pages_loaded -= 1
            for _side in range(sides):
                yield self._feed(info, cancel)
            count += 1
        if self.pages_loaded == 0:
            self.host.emit_event(DeviceEvent("paper-empty"))

    def _feed(self, info: PageInfo, cancel: threading.Event) -> _SimPage:
        page = _SimPage(info, self.pages_fed, self, cancel)
        self.pages_fed += 1
        return page

    def command(self, item: DriverItem, command: str, mode: Mode) -> None:
        self._check_connected()
        if command == "synchronize":
            return
        super().command(item, command, mode)

    # -- simulator ----------------------------------------------------------
    def simulate(self, action: str, **arguments: Any) -> Any:
        if action == "press_button":
            button = arguments["button"]
            if button not in BUTTONS:
                raise InvalidArgument(f"no button {button!r} (buttons: {', '.join(BUTTONS)})")
            self._check_connected()
            self.host.emit_event(DeviceEvent(f"{button}-button", {"button": button}, time=time.time()))
        elif action == "load_pages":
            count = arguments["count"]
            self._check_connected()
            if not self.feeder_attached:
                raise Failed("no document feeder is attached")
            with self._state:
                if not 0 <= self.pages_loaded + count <= FEEDER_CAPACITY:
                    raise InvalidArgument(f"the feeder holds 0 to {FEEDER_CAPACITY} pages")
                was_empty = self.pages_loaded == 0
                self.pages_loaded += count
            if was_empty and count > 0:
                self.host.emit_event(DeviceEvent("paper-loaded", {"pages": self.pages_loaded}))
        elif action == "jam":
            self._check_connected()
            self.jam_at_row = int(arguments.get("at_row", 0))
        elif action == "unplug":
            if not self.connected:
                raise Failed("the device is already unplugged")
            self.connected = False
            self.port_open = False
            self.host.device_unplugged()
        elif action == "replug":
            if self.connected:
                raise Failed("the device is already plugged in")
            self.connected = True
            self.host.device_replugged()
        elif action == "attach_feeder":
            self.feeder_attached = bool(arguments["attached"])
        else:
            raise InvalidArgument(f"unknown simulator action {action!r}")
        return None

    def simulator_state(self) -> dict[str, Any]:
        return {
            "connected": self.connected,
            "port_open": self.port_open,
            "pages_loaded": self.pages_loaded,
            "jammed": self.jammed,
            "feeder_attached": self.feeder_attached,
            "pages_fed": self.pages_fed,
        }
