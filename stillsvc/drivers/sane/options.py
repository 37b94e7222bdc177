"""SANE options as item properties, and item properties back as SANE options.

The well-known options map to the properties every scanner item of the service
has (the simulator's), so a client written for one scanner works with all:

=================  ==========================================================
property           SANE option
=================  ==========================================================
``resolution``     ``resolution`` (dpi; INT or FIXED, range or word list)
``mode``           ``mode``: Color → color, Gray → gray, Lineart/Binary →
                   lineart; a backend without a lineart mode but with depth 1
                   (the ``test`` backend) gets lineart as Gray at depth 1
``depth``          ``depth`` (bits per sample; 1 only with lineart)
``x_offset`` …     ``tl-x``, ``tl-y``, ``br-x``, ``br-y`` (mm or pixels), as
``width`` …        pixels at the item's resolution, like the simulator
``source``         ``source``: one item per value (Flatbed → ``flatbed``,
                   ADF … → ``feeder``, … Duplex → ``duplex``), read-only
=================  ==========================================================

Every other option (but buttons, groups, arrays such as gamma tables, and the
sensors, which become events) is a property under its SANE name: BOOL ``b``,
INT ``i``, FIXED ``d``, STRING ``s``; ranges (with their quantisation) and word
and string lists as valid values; read-only where the option is not settable.
An option the backend marks inactive is listed in :meth:`OptionSet.inactive`.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Any

from stillsvc.common.errors import InvalidArgument
from stillsvc.common.sane import Cap, Type, Unit
from stillsvc.driver.items import Access, PropertySpec, Range, Valid, ValueList

MM_PER_INCH = 25.4
WELL_KNOWN = frozenset({"resolution", "mode", "depth", "source", "tl-x", "tl-y", "br-x", "br-y"})
GEOMETRY = ("tl-x", "tl-y", "br-x", "br-y")
#: Properties of every scanning item that are not SANE options.
OWN_PROPERTIES = frozenset({"resolution", "mode", "depth", "x_offset", "y_offset", "width", "height", "max_width",
                            "max_height", "source", "pages", "format"})
FORMATS = ("raw", "pnm", "png", "tiff", "jpeg", "pdf")
#: Pages a feeder item may be asked for (0: until the feeder is empty).
MAX_FEEDER_PAGES = 1000
#: Sensor ("button") option names real backends use (fujitsu, epjitsu, genesys, hp5400, gt68xx, pixma, hp5590).
SENSOR_NAMES = frozenset({"scan", "email", "copy", "pdf", "file", "fax", "ocr", "cancel", "page-loaded",
                          "cover-open", "power", "function", "button-pressed"})
#: Sensors that tell of a state, not of a button: (event when it becomes true, event when it becomes false).
STATE_SENSORS = {"page-loaded": ("paper-loaded", "paper-empty"), "cover-open": ("cover-open", "cover-closed")}
_UNITS: dict[int, str] = {Unit.PIXEL: "pixels", Unit.BIT: "bits", Unit.MM: "mm", Unit.DPI: "dpi", Unit.PERCENT: "%",
          Unit.MICROSECOND: "µs"}
_SLUG = re.compile(r"[^a-z0-9]+")


def slug(text: str) -> str:
    return _SLUG.sub("-", text.lower()).strip("-") or "none"


@dataclass
class Option:
    """One option descriptor as the worker reports it, with its value then."""

    index: int
    name: str
    title: str
    desc: str
    type: int
    unit: int
    size: int
    cap: int
    constraint: dict[str, Any]
    value: Any = None
    group: str = ""

    @property
    def active(self) -> bool:
        return not self.cap & Cap.INACTIVE

    @property
    def settable(self) -> bool:
        return bool(self.cap & Cap.SOFT_SELECT)

    @property
    def readable(self) -> bool:
        return bool(self.cap & Cap.SOFT_DETECT)

    @property
    def scalar(self) -> bool:
        return self.type == Type.STRING or self.size <= 4

    def valid(self) -> Valid:
        c = self.constraint
        if c.get("kind") == "range":
            step = c.get("quant") or (1 if self.type == Type.INT else 0)
            return Range(c["min"], c["max"], step)
        if c.get("kind") in ("words", "strings"):
            return ValueList(tuple(c["values"]))
        return None


def parse_options(raw: list[dict[str, Any]]) -> list[Option]:
    """The worker's option list as :class:`Option` objects, each with its group's title."""
    options: list[Option] = []
    group = ""
    for entry in raw:
        if entry.get("type") == Type.GROUP:
            group = str(entry.get("title") or "")
            continue
        if int(entry.get("index", 0)) == 0:
            continue
        options.append(Option(int(entry["index"]), str(entry.get("name") or ""), str(entry.get("title") or ""),
                              str(entry.get("desc") or ""), int(entry["type"]), int(entry.get("unit", 0)),
                              int(entry.get("size", 4)), int(entry.get("cap", 0)), dict(entry.get("constraint") or {}),
                              entry.get("value"), str(entry.get("group") or group)))
    return options


def source_kind(value: str) -> str:
    """A SANE source name as the service's source value."""
    text = value.lower()
    if "duplex" in text:
        return "duplex"
    if "adf" in text or "feeder" in text or "document" in text:
        return "feeder"
    if "flatbed" in text or text in ("normal", "platen", "auto"):
        return "flatbed"
    return slug(value)


_ITEM_NAMES = {"flatbed": "Flatbed", "feeder": "Feeder", "duplex": "Duplex"}


@dataclass(frozen=True)
class Source:
    sane: str  # the SANE source value ("" when the device has no source option)
    kind: str  # flatbed, feeder, duplex or a slug
    item: str  # the item's name

    @property
    def feeds(self) -> bool:
        return self.kind in ("feeder", "duplex")


@dataclass(frozen=True)
class ModeChoice:
    name: str  # color, gray, lineart, or a slug (halftone)
    sane: str  # the SANE mode value ("" when there is no mode option)
    depth: int | None  # the depth it needs (lineart as gray at depth 1), or None


@dataclass
class OptionSet:
    """A device's options, and how its items' properties map onto them."""

    options: list[Option]
    #: Options polled as sensors beyond the recognised ones (device option ``sensors``).
    extra_sensors: tuple[str, ...] = ()
    by_name: dict[str, Option] = field(init=False)

    def __post_init__(self) -> None:
        self.by_name = {}
        for option in self.options:
            self.by_name.setdefault(option.name, option)

    # -- what the device has ------------------------------------------------------------
    def sources(self) -> list[Source]:
        option = self.by_name.get("source")
        values = option.valid().values if option is not None and isinstance(option.valid(), ValueList) else ()
        if not values:
            return [Source("", "flatbed", "Flatbed")]
        found: list[Source] = []
        used: set[str] = set()
        for value in values:
            kind = source_kind(str(value))
            name = _ITEM_NAMES.get(kind) or _title_item(str(value))
            while name in used:
                name += "-2"
            used.add(name)
            found.append(Source(str(value), kind if kind not in {s.kind for s in found} else slug(str(value)), name))
        return found

    def modes(self) -> list[ModeChoice]:
        option = self.by_name.get("mode")
        depths = self.depths()
        choices: list[ModeChoice] = []
        values = option.valid().values if option is not None and isinstance(option.valid(), ValueList) else ()
        for value in values:
            text = str(value).lower()
            if text.startswith("color") or text.startswith("colour") or text == "rgb":
                name = "color"
            elif text.startswith("gray") or text.startswith("grey"):
                name = "gray"
            elif text in ("lineart", "binary", "black & white", "black and white", "bw", "line art"):
                name = "lineart"
            else:
                name = slug(str(value))
            if name not in {c.name for c in choices}:
                choices.append(ModeChoice(name, str(value), 1 if name in ("lineart",) or name == "halftone" else None))
        if "lineart" not in {c.name for c in choices} and 1 in depths:
            gray = next((c for c in choices if c.name == "gray"), None)
            if gray is not None:
                choices.append(ModeChoice("lineart", gray.sane, 1))
        if not choices:
            choices.append(ModeChoice("gray", "", None))
        return choices

    def depths(self) -> tuple[int, ...]:
        option = self.by_name.get("depth")
        valid = option.valid() if option is not None else None
        if isinstance(valid, ValueList):
            return tuple(int(v) for v in valid.values)
        if isinstance(valid, Range):
            return tuple(d for d in (1, 8, 16) if valid.check(d))
        return (8,)

    def current_mode(self) -> str:
        option = self.by_name.get("mode")
        depth = self.by_name.get("depth")
        current = option.value if option is not None else ""
        for choice in self.modes():
            if choice.sane == current and (choice.depth is None or (depth is not None and depth.value == choice.depth)):
                if choice.depth == 1 or depth is None or depth.value != 1:
                    return choice.name
        return self.modes()[0].name

    def has_geometry(self) -> bool:
        return all(name in self.by_name for name in GEOMETRY)

    def resolution_valid(self) -> Valid:
        option = self.by_name.get("resolution")
        if option is None:
            return None
        valid = option.valid()
        if isinstance(valid, ValueList):
            return ValueList(tuple(sorted({int(round(v)) for v in valid.values if v >= 1})))
        if isinstance(valid, Range):
            return Range(max(1, int(round(valid.minimum))), int(round(valid.maximum)),
                         max(1, int(round(valid.step or 1))))
        return None

    def resolution(self) -> int:
        option = self.by_name.get("resolution")
        if option is None or option.value is None:
            return 300
        return max(1, int(round(option.value)))

    def bed_mm(self) -> tuple[float, float]:
        """The bed's width and height in mm (from br-x and br-y's ranges)."""
        sizes = []
        for name in ("br-x", "br-y"):
            option = self.by_name[name]
            valid = option.valid()
            top = valid.maximum if isinstance(valid, Range) else max(valid.values) if isinstance(valid, ValueList) \
                else (option.value or 0)
            if option.unit == Unit.PIXEL:
                top = top * MM_PER_INCH / self.resolution()
            sizes.append(float(top))
        return sizes[0], sizes[1]

    def active_sensors(self) -> list[Option]:
        """The sensors that can be read now (a backend refuses to read an inactive option)."""
        return [o for o in self.sensors() if o.active]

    def sensors(self) -> list[Option]:
        found = []
        for option in self.options:
            if option.type not in (Type.BOOL, Type.INT, Type.STRING) or not option.scalar:
                continue
            named = option.name in SENSOR_NAMES or option.name.startswith("button") \
                or option.name in self.extra_sensors
            if option.name in self.extra_sensors or (
                    option.readable and not option.settable and (named or option.group.lower() == "sensors")):
                found.append(option)
        return found

    def extras(self) -> list[Option]:
        """Options shown under their own names."""
        sensors = {o.index for o in self.sensors()}
        return [o for o in self.options
                if o.name and o.name not in WELL_KNOWN and o.index not in sensors and o.scalar
                and o.type in (Type.BOOL, Type.INT, Type.FIXED, Type.STRING)]

    @staticmethod
    def property_name(option: Option) -> str:
        return f"sane-{option.name}" if option.name in OWN_PROPERTIES else option.name

    # -- properties ---------------------------------------------------------------------
    def specs(self, source: Source) -> list[PropertySpec]:
        modes = self.modes()
        depths = self.depths()
        dpi = self.resolution()
        specs = [
            PropertySpec("resolution", "u", dpi, valid=self.resolution_valid(),
                         access=Access.READ_WRITE if "resolution" in self.by_name else Access.READ,
                         description="dots per inch"),
            PropertySpec("mode", "s", self.current_mode(), valid=ValueList(tuple(c.name for c in modes)),
                         description="colour mode (SANE: " + ", ".join(c.sane or c.name for c in modes) + ")"),
            PropertySpec("depth", "u", 1 if self.current_mode() == "lineart" else _depth_default(self, depths),
                         valid=ValueList(depths), access=Access.READ_WRITE if "depth" in self.by_name else Access.READ,
                         description="bits per sample (1 for lineart)"),
        ]
        if self.has_geometry():
            width_mm, height_mm = self.bed_mm()
            width, height = pixels(width_mm, dpi), pixels(height_mm, dpi)
            x0, y0, x1, y1 = (self._mm(name) for name in GEOMETRY)
            area = (pixels(x0, dpi), pixels(y0, dpi), max(1, pixels(x1 - x0, dpi)), max(1, pixels(y1 - y0, dpi)))
            specs += [
                PropertySpec("x_offset", "u", min(area[0], width - 1), valid=Range(0, width - 1),
                             description="left edge, pixels"),
                PropertySpec("y_offset", "u", min(area[1], height - 1), valid=Range(0, height - 1),
                             description="top edge, pixels"),
                PropertySpec("width", "u", min(area[2], width), valid=Range(1, width),
                             description="scan area width, pixels"),
                PropertySpec("height", "u", min(area[3], height), valid=Range(1, height),
                             description="scan area height, pixels"),
                PropertySpec("max_width", "u", width, access=Access.READ, description="bed width at this resolution"),
                PropertySpec("max_height", "u", height, access=Access.READ,
                             description="bed height at this resolution"),
            ]
        specs += [
            PropertySpec("source", "s", source.kind, valid=ValueList((source.kind,)), access=Access.READ,
                         description=f"document source (SANE: {source.sane or 'none'})"),
            PropertySpec("pages", "u", 0 if source.feeds else 1,
                         valid=Range(0, MAX_FEEDER_PAGES) if source.feeds else Range(1, 1),
                         access=Access.READ_WRITE if source.feeds else Access.READ,
                         description="pages to scan (0: until the feeder is empty)"),
            PropertySpec("format", "s", "png", valid=ValueList(FORMATS), description="preferred transfer format"),
        ]
        for option in self.extras():
            specs.append(self.extra_spec(option))
        return specs

    def extra_spec(self, option: Option) -> PropertySpec:
        signature = {Type.BOOL: "b", Type.INT: "i", Type.FIXED: "d", Type.STRING: "s"}[Type(option.type)]
        valid = option.valid()
        default = option.value
        if default is None or isinstance(default, list):
            default = _type_default(signature, valid)
        if signature == "d":
            default = float(default)
        unit = _UNITS.get(option.unit)
        text = option.title or option.name
        if option.desc and option.desc != option.title:
            text += f": {option.desc}"
        if unit:
            text += f" ({unit})"
        if option.group:
            text = f"[{option.group}] {text}"
        return PropertySpec(self.property_name(option), signature, default, valid=valid,
                            access=Access.READ_WRITE if option.settable else Access.READ, description=text)

    def inactive(self) -> set[str]:
        """Properties whose options the backend marks inactive now."""
        return {self.property_name(o) for o in self.extras() if not o.active}

    def _mm(self, name: str) -> float:
        option = self.by_name[name]
        value = float(option.value or 0)
        return value * MM_PER_INCH / self.resolution() if option.unit == Unit.PIXEL else value

    # -- from properties back to options ----------------------------------------------------
    def settings(self, values: dict[str, Any], source: Source) -> list[tuple[str, Any]]:
        """The SANE option values for an item's ``values``, in the order they are set:
        source, mode, depth, resolution, the scan area, then the rest by index."""
        wanted: list[tuple[str, Any]] = []
        if source.sane and "source" in self.by_name:
            wanted.append(("source", source.sane))
        choice = next((c for c in self.modes() if c.name == values.get("mode")), None)
        if choice is not None and choice.sane and "mode" in self.by_name:
            wanted.append(("mode", choice.sane))
        if "depth" in self.by_name:
            depth = choice.depth if choice is not None and choice.depth is not None else values.get("depth")
            if depth is not None:
                wanted.append(("depth", int(depth)))
        if "resolution" in self.by_name:
            option = self.by_name["resolution"]
            dpi = int(values["resolution"])
            wanted.append(("resolution", float(dpi) if option.type == Type.FIXED else dpi))
        if self.has_geometry() and "width" in values:
            dpi = int(values["resolution"])
            # Each edge a little inside its pixel (the left and top edges 0.1 of a pixel
            # on, the right and bottom 0.35), so that a backend that rounds down and one
            # that rounds to nearest, each edge or the width, all get the pixels asked
            # for. An edge the backend quantises (the test backend: whole mm) goes from
            # its exact place outwards to the step, so the area scanned covers the one
            # asked for (and is exactly it when the edges fall on steps: A4 at 300 dpi).
            x0, y0 = values["x_offset"], values["y_offset"]
            edges = {"tl-x": x0, "tl-y": y0, "br-x": x0 + values["width"], "br-y": y0 + values["height"]}
            for name in GEOMETRY:
                option = self.by_name[name]
                far = name.startswith("br")
                pixels = edges[name]
                if option.unit == Unit.PIXEL:
                    value: Any = int(pixels)
                elif _stepped(option):
                    value = _quantise(option, pixels * MM_PER_INCH / dpi, far)
                else:
                    value = _quantise(option, (pixels + (0.35 if far else 0.1)) * MM_PER_INCH / dpi, far)
                wanted.append((name, float(value) if option.type == Type.FIXED else int(round(value))))
        for option in sorted(self.extras(), key=lambda o: o.index):
            name = self.property_name(option)
            if option.settable and name in values:
                wanted.append((option.name, values[name]))
        return wanted

    def check_area(self, values: dict[str, Any]) -> None:
        if "width" not in values:
            return
        if values["x_offset"] + values["width"] > values["max_width"]:
            raise InvalidArgument(f"x_offset + width must not exceed max_width ({values['max_width']} at "
                                  f"{values['resolution']} dpi)")
        if values["y_offset"] + values["height"] > values["max_height"]:
            raise InvalidArgument(f"y_offset + height must not exceed max_height ({values['max_height']} at "
                                  f"{values['resolution']} dpi)")


def _stepped(option: Option) -> bool:
    valid = option.valid()
    return isinstance(valid, Range) and bool(valid.step)


def _quantise(option: Option, value: float, up: bool) -> float:
    """``value`` on the option's range: to its step (outwards: up for a far edge, down
    for a near one), within its limits."""
    valid = option.valid()
    if not isinstance(valid, Range):
        return value
    if valid.step:
        steps = (value - valid.minimum) / valid.step
        steps = math.ceil(steps - 1e-6) if up else math.floor(steps + 1e-6)
        value = valid.minimum + steps * valid.step
    return min(max(value, valid.minimum), valid.maximum)


def pixels(mm: float, dpi: int) -> int:
    """The whole pixels in ``mm`` at ``dpi``."""
    return int(mm / MM_PER_INCH * dpi + 1e-6)


def _depth_default(options: OptionSet, depths: tuple[int, ...]) -> int:
    option = options.by_name.get("depth")
    if option is not None and isinstance(option.value, int) and option.value in depths and option.value != 1:
        return option.value
    return 8 if 8 in depths else next((d for d in depths if d != 1), depths[0])


def _type_default(signature: str, valid: Valid) -> Any:
    if isinstance(valid, ValueList) and valid.values:
        return valid.values[0]
    if isinstance(valid, Range):
        return valid.minimum if signature != "i" else int(valid.minimum)
    return {"b": False, "i": 0, "d": 0.0, "s": ""}[signature]


def _title_item(value: str) -> str:
    words = re.sub(r"[^A-Za-z0-9]+", " ", value).split()
    return "".join(w[:1].upper() + w[1:] for w in words) or "Source"


__all__ = ["FORMATS", "ModeChoice", "Option", "OptionSet", "Source", "parse_options", "pixels", "slug",
           "source_kind"]
