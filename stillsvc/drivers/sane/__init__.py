"""``sane``: the SANE bridge — every scanner SANE supports as a stillsvc device.

The bridge owns the scanner for the service: its SANE calls run in a worker
process of its own (:mod:`stillsvc.driver.sane`), its options are item
properties (:mod:`.options`), its sensors ("buttons") are polled only while
nobody uses the device, and its frames become the service's pages.

The SANE handle. It is opened when the device lock is taken (the first call
that needs the device) and closed when the lock is let go — unless the device
has sensors to poll, in which case it stays open between polls while nobody
else could want it. When another program takes the device (its lock file, or a
hand-over with ``stillctl lock``), the service calls :meth:`release_port` and
the handle is closed, so that program can open the scanner itself.

A crash. When the worker dies (a backend segfault, a kill), the call in
progress fails with the reason, the device is reported failed
(``host.device_failed``) and the service brings it back through
:meth:`recover`: a new worker, the device opened again.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, ClassVar

import structlog

from stillsvc.common.errors import Empty, Failed, InvalidArgument, StillError
from stillsvc.common.sane import Type
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
from stillsvc.driver.items import Access, DriverItem, PropertySpec, Range
from stillsvc.driver.sane import DEFAULT_TIMEOUT, PageGeometry, SaneProcess, WorkerDied, WorkerHung
from stillsvc.drivers.sane.options import STATE_SENSORS, Option, OptionSet, Source, parse_options, pixels, slug

log = structlog.get_logger(__name__)


@dataclass
class _SanePage:
    info: PageInfo
    frames: Iterator[PageGeometry | bytes]
    driver: SaneScanner
    #: The scan itself (already started: it gave the page's geometry), which ``frames``
    #: wraps; closed too, since closing a wrapper that never ran does not reach it.
    scan: Iterator[PageGeometry | bytes] | None = None

    def bands(self) -> Iterator[bytes]:
        # Not ``yield from``: a consumer that drops this iterator (on the event loop)
        # must not close the frames there; close() does, on the worker thread.
        frames = self.frames
        while True:
            try:
                block = next(frames)
            except StopIteration:
                return
            if not isinstance(block, PageGeometry):
                yield block  # type: ignore[misc]

    def close(self) -> None:
        for it in (self.frames, self.scan):
            close = getattr(it, "close", None)
            if close is not None:
                close()


class SaneScanner(Minidriver):
    name = "sane"
    matches = (Match(subsystem="sane"), Match(subsystem="usb", properties=(("libsane_matched", "yes"),)))
    port_policy = PortPolicy.DEDICATED
    events = EventSource.POLL

    #: Set by the service from ``[sane]`` (:meth:`configure`).
    timeout: ClassVar[float] = DEFAULT_TIMEOUT
    excluded: ClassVar[Callable[[str], str]] = staticmethod(lambda name: "")

    @classmethod
    def configure(cls, timeout: float, excluded: Callable[[str], str]) -> None:
        """The bridge's settings: the backend call timeout (seconds), and a rule that
        says why a SANE name is never bridged ("" when it may be)."""
        cls.timeout = timeout
        cls.excluded = staticmethod(excluded)

    def __init__(self, config, host) -> None:  # type: ignore[no-untyped-def]
        super().__init__(config, host)
        self.sane_name = ""
        self.process: SaneProcess | None = None
        self.options: OptionSet | None = None
        self.sensor_values: dict[str, Any] = {}
        self.is_open = False
        self.scanning = False
        self.known = {"vendor": "", "model": "", "type": ""}
        extra = config.options.get("sensors", ())
        self.extra_sensors = tuple(str(s) for s in extra) if isinstance(extra, (list, tuple)) else ()
        preset = config.options.get("set", {})
        #: SANE option values set every time the device is opened (device option ``set``).
        self.preset: dict[str, Any] = dict(preset) if isinstance(preset, dict) else {}
        self.events = EventSource.POLL

    # -- the worker -------------------------------------------------------------------------
    def _guard(self, fn: Callable[[], Any]) -> Any:
        """Run ``fn``; a dead or hung worker makes the device failed (and is re-raised)."""
        try:
            result = fn()
            if isinstance(result, Iterator):
                return self._guard_iter(result)
            return result
        except (WorkerDied, WorkerHung) as e:
            self._lost(e)
            raise

    def _guard_iter(self, it: Iterator[Any]) -> Iterator[Any]:
        try:
            yield from it
        except (WorkerDied, WorkerHung) as e:
            self._lost(e)
            raise

    def _lost(self, error: StillError) -> None:
        self.is_open = False
        self.scanning = False
        self.sensor_values = {}
        self.host.device_failed(error.message)

    def _process(self) -> SaneProcess:
        if self.process is None:
            raise Failed("the SANE bridge has not been initialised")
        return self.process

    def _open(self) -> OptionSet:
        process = self._process()
        if not self.is_open or self.options is None:
            raw = self._guard(process.open)
            self.is_open = True
            self.options = OptionSet(parse_options(raw), self.extra_sensors)
            for name, value in self.preset.items():
                self._set(name, value)
        return self.options

    def _close(self) -> None:
        if self.is_open and self.process is not None and not self.scanning:
            self._guard(self.process.close)
            self.is_open = False
            self.sensor_values = {}

    def _set(self, name: str, value: Any) -> None:
        """Set one SANE option now (it must be active), re-reading the options when the backend asks."""
        assert self.options is not None
        option = self.options.by_name.get(name)
        if option is None:
            raise InvalidArgument(f"the scanner has no option {name!r}")
        if not option.active or not option.settable:
            return
        if option.value == value:
            return
        try:
            reply = self._guard(lambda: self._process().set(option.index, value))
        except InvalidArgument as e:
            raise InvalidArgument(f"the scanner refused {name} = {value!r}: {e.message}") from None
        if "options" in reply:
            self.options = OptionSet(parse_options(reply["options"]), self.extra_sensors)
        else:
            option.value = reply.get("value")

    # -- device half ------------------------------------------------------------------------
    def initialize(self, port: str, mode: Mode) -> DeviceInfo:
        self.mode = mode
        known = dict(self.config.options)
        if self.config.properties.get("SUBSYSTEM") == "usb" or port.startswith("usb:"):
            self.sane_name, known = self._resolve_usb(port)
        else:
            self.sane_name = port
        if not self.sane_name:
            raise Failed("no SANE device name given (set port = \"backend:device\", e.g. \"test:0\")")
        why = self.excluded(self.sane_name)
        if why:
            raise Failed(f"SANE device {self.sane_name} is not bridged: {why}")
        self.process = SaneProcess(self.sane_name, self.timeout, env=_worker_env())
        if not known.get("vendor"):
            for found in self._guard(self.process.devices):
                if found.get("name") == self.sane_name:
                    known = {**found, **{k: v for k, v in known.items() if v}}
        options = self._open()
        sensors = options.sensors()
        self.events = EventSource.POLL if sensors else EventSource.NONE
        if not sensors:
            self._close()
        vendor, model, kind = str(known.get("vendor", "")), str(known.get("model", "")), str(known.get("type", ""))
        self.known = {"vendor": vendor, "model": model, "type": kind}
        sources = options.sources()
        capabilities = tuple(dict.fromkeys(
            [s.kind for s in sources if s.kind in ("flatbed", "feeder", "duplex")]
            + (["feeder"] if any(s.kind == "duplex" for s in sources) else [])
            + (["buttons"] if sensors else [])))
        return DeviceInfo(
            name=self.config.name or " ".join(p for p in (vendor, model, kind) if p) or self.sane_name,
            vendor=vendor, model=model, serial=self.config.properties.get("ID_SERIAL_SHORT", ""),
            capabilities=capabilities, event_names=tuple(dict.fromkeys(
                name for option in sensors for name in _event_names(option))))

    def _resolve_usb(self, port: str) -> tuple[str, dict[str, Any]]:
        """The SANE device of a USB device udev reported (libsane_matched): the one
        whose SANE name carries its bus address (``libusb:BBB:DDD``) or its ids."""
        lister = SaneProcess("", self.timeout, env=_worker_env())
        try:
            listed = self._guard(lister.devices)
        finally:
            lister.stop()
        address = port.removeprefix("usb:")
        vid = self.config.properties.get("ID_VENDOR_ID", "").lower()
        pid = self.config.properties.get("ID_MODEL_ID", "").lower()
        for found in listed:
            if address and f"libusb:{address}" in found["name"]:
                return found["name"], found
        for found in listed:
            name = found["name"].lower()
            if vid and pid and (f"{vid}{pid}" in name or f"0x{vid}" in name and f"0x{pid}" in name):
                return found["name"], found
        raise Failed(f"no SANE backend lists the USB device at {port} "
                     f"({', '.join(d['name'] for d in listed) or 'SANE lists no devices'})")

    def shutdown(self) -> None:
        if self.process is not None:
            self.process.stop()
        self.is_open = False

    def recover(self) -> None:
        process = self._process()
        process.kill("restarting after a failure")
        self.is_open = False
        self.options = None
        options = self._open()
        if not options.sensors():
            self._close()

    def lock(self, mode: Mode) -> None:
        self._open()

    def unlock(self) -> None:
        if self.events is EventSource.NONE:
            self._close()

    def release_port(self) -> None:
        self._close()

    def reclaim_port(self) -> None:
        """The handle is opened again on the next use."""

    def get_status(self, mode: Mode) -> dict[str, Any]:
        options = self._open()
        status: dict[str, Any] = {"online": True, "sane_name": self.sane_name}
        sensors = options.active_sensors()
        if sensors:
            for option, value in zip(sensors, self._read(sensors)):
                status[f"sensor:{option.name}"] = value
        return status

    def diagnostic(self) -> dict[str, Any]:
        """The worker and the SANE calls it has made (by name), for the curious."""
        process = self._process()
        stats = self._guard(process.stats) if process.running else {"calls": {}, "open": False}
        return {"result": "pass", "sane_name": self.sane_name, "worker_pid": process.pid or 0,
                "workers_started": process.spawned, "handle_open": bool(stats.get("open")),
                "last_worker_end": process.last_death,
                **{f"calls:{name}": count for name, count in sorted(stats.get("calls", {}).items())}}

    def poll_events(self) -> list[DeviceEvent]:
        options = self._open()
        sensors = options.active_sensors()
        if not sensors:
            return []
        events: list[DeviceEvent] = []
        for option, value in zip(sensors, self._read(sensors)):
            before = self.sensor_values.get(option.name, _UNSEEN)
            self.sensor_values[option.name] = value
            if before is _UNSEEN or before == value:
                continue  # the first reading is the baseline
            event = _edge(option, before, value)
            if event is not None:
                events.append(event)
        return events

    def _read(self, sensors: list[Option]) -> list[Any]:
        return list(self._guard(lambda: self._process().get([o.index for o in sensors])))

    # -- item half ----------------------------------------------------------------------------
    def build_item_tree(self) -> DriverItem:
        options = self.options
        if options is None:
            raise Failed("the SANE device's options are not known yet")
        root = DriverItem("Root", "device", [
            PropertySpec("vendor", "s", self.known["vendor"], access=Access.READ),
            PropertySpec("model", "s", self.known["model"], access=Access.READ),
            PropertySpec("type", "s", self.known["type"], access=Access.READ,
                         description="the kind of device, as SANE says (flatbed scanner, ...)"),
            PropertySpec("sane_name", "s", self.sane_name, access=Access.READ, description="the SANE device name"),
        ])
        root.add_to_tree()
        for source in options.sources():
            kind = source.kind if source.kind in ("flatbed", "feeder", "duplex") else "flatbed"
            item = DriverItem(source.item, "feeder" if kind == "duplex" else kind, options.specs(source))
            item.sane_source = source  # type: ignore[attr-defined]
            root.add_child(item)
        return root

    def _source(self, item: DriverItem) -> Source:
        source = getattr(item, "sane_source", None)
        if source is None:
            raise InvalidArgument(f"item {item.name} does not scan")
        return source

    def valid_values(self, item: DriverItem, values: dict[str, Any]) -> dict[str, Any]:
        if "max_width" not in values:
            return {}
        width, height = values["max_width"], values["max_height"]
        return {"x_offset": Range(0, width - 1), "y_offset": Range(0, height - 1), "width": Range(1, width),
                "height": Range(1, height)}

    def validate_properties(self, item: DriverItem, values: dict[str, Any], changed: set[str],
                            previous: dict[str, Any]) -> dict[str, Any]:
        if "resolution" not in values or self.options is None:
            return values
        values = dict(values)
        if "max_width" in values and values["resolution"] != previous["resolution"]:
            # Keep the scan area where it was on the bed: scale everything not set together.
            scale = values["resolution"] / previous["resolution"]
            width_mm, height_mm = self.options.bed_mm()
            width, height = pixels(width_mm, values["resolution"]), pixels(height_mm, values["resolution"])
            values["max_width"], values["max_height"] = width, height
            for key, limit in (("x_offset", width - 1), ("y_offset", height - 1)):
                if key not in changed:
                    values[key] = min(limit, int(previous[key] * scale))
            for key, limit in (("width", width), ("height", height)):
                if key not in changed:
                    values[key] = max(1, min(limit, round(previous[key] * scale)))
        depths = self.options.depths()
        if values["mode"] == "lineart":
            values["depth"] = 1
        elif values["depth"] == 1:
            others = [d for d in depths if d != 1]
            if "depth" in changed:
                raise InvalidArgument("invalid value 1 for property depth: 1 is only valid with mode lineart "
                                      f"(valid: {', '.join(map(str, others))})")
            values["depth"] = 8 if 8 in others else others[0] if others else 8
        self.options.check_area(values)
        return values

    def inactive(self, item: DriverItem, values: dict[str, Any]) -> set[str]:
        return self.options.inactive() if self.options is not None else set()

    def write_properties(self, item: DriverItem, values: dict[str, Any], mode: Mode) -> None:
        self.require_data(mode, "writing properties to the device")
        self._apply(item, values)

    def _apply(self, item: DriverItem, values: dict[str, Any]) -> None:
        """Set the item's values on the device, in a valid order, each only while it is active."""
        self._open()
        assert self.options is not None
        source = self._source(item)
        skipped: list[tuple[str, Any]] = []
        for name, value in self.options.settings(values, source):
            option = self.options.by_name.get(name)
            if option is None:
                continue
            if not option.active:
                skipped.append((name, value))
                continue
            self._set(name, value)
        # What an earlier setting made active (read-delay-duration after read-delay) gets its value now.
        for name, value in skipped:
            option = self.options.by_name.get(name)
            if option is not None and option.active:
                self._set(name, value)

    def acquire(self, item: DriverItem, values: dict[str, Any], mode: Mode,
                cancel: threading.Event) -> Iterator[_SanePage]:
        self.require_data(mode)
        source = self._source(item)
        self._apply(item, values)
        return self._pages(source, values, cancel)

    def _pages(self, source: Source, values: dict[str, Any], cancel: threading.Event) -> Iterator[_SanePage]:
        process = self._process()
        wanted = int(values.get("pages", 1)) if source.feeds else 1
        count = 0
        page: _SanePage | None = None
        self.scanning = True
        try:
            while (wanted == 0 or count < wanted) and not cancel.is_set():
                if page is not None:
                    page.close()
                frames = self._guard(lambda: process.scan(cancel))
                try:
                    geometry = next(frames)
                except StopIteration:
                    raise Failed("the SANE backend ended the scan without a page") from None
                except Empty:
                    if count == 0:
                        raise Empty(f"the document feeder is empty (SANE_STATUS_NO_DOCS from {self.sane_name})") \
                            from None
                    return  # the feeder ran out: the batch is done
                except StillError as e:
                    raise _after_pages(e, count) from None
                assert isinstance(geometry, PageGeometry)
                page = _SanePage(PageInfo(geometry.width, geometry.height, geometry.mode, geometry.depth,
                                          int(values.get("resolution", 0))), _counted(frames, count), self, frames)
                count += 1
                yield page
        finally:
            if page is not None:
                page.close()
            self.scanning = False
            if process.running:
                try:
                    process.finish()
                except StillError as e:
                    log.warning("ending the scan failed", device=self.config.id, error=e.message)

    def command(self, item: DriverItem, command: str, mode: Mode) -> None:
        if command == "synchronize":
            self.options = None
            self.is_open = False
            self._process().close()
            self._open()
            return
        super().command(item, command, mode)


_UNSEEN = object()


def _counted(frames: Iterator[Any], done: int) -> Iterator[Any]:
    """A page's frames, a SANE error within the page saying how many pages came before."""
    try:
        yield from frames
    except (WorkerDied, WorkerHung):
        raise
    except StillError as e:
        raise _after_pages(e, done) from None


def _after_pages(error: StillError, done: int) -> StillError:
    what = f"after {done} page{'s' if done != 1 else ''}" if done else "on the first page"
    copy = type(error)(f"{error.message} — {what}")
    copy.pages = done  # type: ignore[attr-defined]
    return copy


def _event_names(option: Option) -> tuple[str, ...]:
    if option.name in STATE_SENSORS:
        return STATE_SENSORS[option.name]
    if option.type == Type.STRING:
        values = option.constraint.get("values") or []
        return tuple(f"{slug(str(v))}-button" for v in values if slug(str(v)) not in ("none", ""))
    return (_button_event(option.name),)


def _button_event(name: str) -> str:
    return name if name.startswith("button") else f"{name}-button"


def _edge(option: Option, before: Any, value: Any) -> DeviceEvent | None:
    """The event for a sensor's change, or None (a button let go)."""
    data = {"sensor": option.name, "value": value}
    if option.name in STATE_SENSORS:
        on, off = STATE_SENSORS[option.name]
        return DeviceEvent(on if value else off, data)
    if option.type == Type.STRING:
        text = slug(str(value or ""))
        return None if text in ("none", "") else DeviceEvent(f"{text}-button", data)
    if value and not (before and option.type == Type.BOOL):
        return DeviceEvent(_button_event(option.name), data)
    return None


def _worker_env() -> dict[str, str]:
    """The worker's environment: the service's own (SANE_CONFIG_DIR and all)."""
    return dict(os.environ)


__all__ = ["SaneScanner"]
