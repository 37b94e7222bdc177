"""A device's item properties as SANE options, the way SANE frontends expect them.

The well-known options come first under their SANE names and units, so that
``scanimage --resolution 300 --mode Gray -x 100`` works on every stillsvc
device: ``mode`` (``Color``, ``Gray``, ``Lineart``), ``depth``, ``resolution``
(dpi), ``source`` (``Flatbed``, ``ADF``, ``ADF Duplex``: one value per source of
each scanning item) and the scan area ``tl-x``, ``tl-y``, ``br-x``, ``br-y`` in
millimetres (SANE_Fixed). The area is kept here in millimetres, as SANE has it,
and becomes the item's pixel offsets and extents (at the resolution of the
moment) when parameters are computed and when a scan starts. Every other
property of the item that a SANE option can carry follows under its own name.

Setting an option checks it against its constraint first (a word list takes
the nearest value, a range clamps; ``SANE_INFO_INEXACT`` says so), then writes
it to the session's application item through the core, which validates it with
the driver without touching the device. What changed beside it is reported
with ``SANE_INFO_RELOAD_OPTIONS`` / ``SANE_INFO_RELOAD_PARAMS``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from stillsvc.common.errors import InvalidArgument
from stillsvc.core.devices import Device
from stillsvc.core.items import AppItem, scan_sources
from stillsvc.driver.items import Access
from stillsvc.frontends.saned.protocol import (
    Cap,
    Descriptor,
    Frame,
    Info,
    Parameters,
    Type,
    Unit,
    fixed,
    unfixed,
)
from stillsvc.imaging import ImageInfo

MM_PER_INCH = 25.4
SOURCE_NAMES = {"flatbed": "Flatbed", "feeder": "ADF", "duplex": "ADF Duplex"}
MODE_NAMES = {"color": "Color", "gray": "Gray", "lineart": "Lineart"}
GEOMETRY = ("tl-x", "tl-y", "br-x", "br-y")
#: Item properties that the options above stand for, or that mean nothing to SANE.
NOT_OPTIONS = {"mode", "depth", "resolution", "source", "x_offset", "y_offset", "width", "height",
               "max_width", "max_height", "format", "pages"}
#: Options whose change changes the scan parameters.
PARAMETER_OPTIONS = {"mode", "depth", "resolution", "source", *GEOMETRY}
_SANE_TYPES = {"b": Type.BOOL, "y": Type.INT, "n": Type.INT, "q": Type.INT, "i": Type.INT, "u": Type.INT,
               "d": Type.FIXED, "s": Type.STRING}
_UNITS = {"resolution": Unit.DPI, "depth": Unit.BIT}


def _title(name: str) -> str:
    return name.replace("_", " ").replace("-", " ").capitalize()


@dataclass
class Option:
    descriptor: Descriptor
    #: The item property it carries ("" for the option count, groups and geometry).
    prop: str = ""


class Options:
    """The options of one opened device, over the application items of its session."""

    def __init__(self, device: Device, root: AppItem) -> None:
        self.device = device
        #: (item, its source value, the SANE name) for every source of every scanning item.
        self.sources: list[tuple[AppItem, str, str]] = [
            (item, value, SOURCE_NAMES.get(value, str(value).title())) for item, value in scan_sources(root)]
        if not self.sources:
            raise InvalidArgument(f"device {device.id} has no item that scans")
        self.item, _, self.source_name = self.sources[0]
        self.options: list[Option] = []
        self.area = self._full_area()

    # -- what the options are ---------------------------------------------------------
    async def refresh(self) -> None:
        """Rebuild the descriptors from the item's properties as they are now."""
        attrs = await self.device.property_attributes(self.item)
        values = self.item.values
        opts = [Option(Descriptor("", "Number of options", "Read-only option that holds the number of options.",
                                  Type.INT, cap=Cap.SOFT_DETECT))]
        opts.append(_group("Scan Mode"))
        if "mode" in attrs:
            names = [MODE_NAMES.get(v, str(v).title()) for v in _values(attrs["mode"]) or [values["mode"]]]
            opts.append(Option(Descriptor("mode", "Scan mode", "Selects the scan mode (e.g., lineart, monochrome, "
                                          "or color).", Type.STRING, size=_size(names),
                                          cap=_cap(attrs["mode"]), string_list=names), "mode"))
        for name in ("depth", "resolution"):
            if name in attrs:
                opts.append(self._numeric(name, attrs[name], values))
        names = [s[2] for s in self.sources]
        opts.append(Option(Descriptor("source", "Scan source", "Selects the scan source (such as a document-feeder).",
                                      Type.STRING, size=_size(names), string_list=names,
                                      cap=Cap.SOFT_SELECT | Cap.SOFT_DETECT | Cap.AUTOMATIC), "source"))
        if self.has_geometry:
            opts.append(_group("Geometry"))
            width_mm, height_mm = self.bed_mm()
            for name, title, limit in (("tl-x", "Top-left x", width_mm), ("tl-y", "Top-left y", height_mm),
                                       ("br-x", "Bottom-right x", width_mm), ("br-y", "Bottom-right y", height_mm)):
                opts.append(Option(Descriptor(name, title, f"{title} position of scan area.", Type.FIXED, Unit.MM,
                                              cap=Cap.SOFT_SELECT | Cap.SOFT_DETECT | Cap.AUTOMATIC,
                                              range=(0, fixed(limit), 0))))
        rest = [name for name in attrs if name not in NOT_OPTIONS and attrs[name]["type"] in _SANE_TYPES]
        if rest:
            opts.append(_group("Enhancement"))
            opts += [self._numeric(name, attrs[name], values) for name in rest]
        self.options = opts

    def _numeric(self, name: str, attr: dict[str, Any], values: dict[str, Any]) -> Option:
        kind = _SANE_TYPES[attr["type"]]
        valid = attr["valid"]
        desc = Descriptor(name, _title(name), attr.get("description") or _title(name), kind, _UNITS.get(name, Unit.NONE),
                          cap=_cap(attr))
        if kind is Type.STRING:
            names = [str(v) for v in _values(attr)] or [str(values.get(name, ""))]
            desc.size, desc.string_list = _size(names), names
        elif valid["kind"] == "range":
            scale = fixed if kind is Type.FIXED else int
            desc.range = (scale(valid["min"]), scale(valid["max"]), scale(valid.get("step") or 0))
        elif valid["kind"] == "list" and kind is not Type.BOOL:
            scale = fixed if kind is Type.FIXED else int
            desc.word_list = [scale(v) for v in valid["values"]]
        return Option(desc, name)

    @property
    def has_geometry(self) -> bool:
        return all(k in self.item.values for k in ("x_offset", "y_offset", "width", "height", "max_width",
                                                   "max_height", "resolution"))

    def bed_mm(self) -> tuple[float, float]:
        v = self.item.values
        return v["max_width"] * MM_PER_INCH / v["resolution"], v["max_height"] * MM_PER_INCH / v["resolution"]

    def _full_area(self) -> list[float]:
        if not self.has_geometry:
            return [0.0, 0.0, 0.0, 0.0]
        width, height = self.bed_mm()
        return [0.0, 0.0, width, height]

    # -- values ----------------------------------------------------------------------------
    def get(self, index: int) -> tuple[Type, int, Any]:
        """(type, size, value) of option ``index``: value is a list of words or a string."""
        option = self._option(index)
        d = option.descriptor
        if index == 0:
            return Type.INT, 4, [len(self.options)]
        if d.type in (Type.GROUP, Type.BUTTON):
            raise InvalidArgument(f"option {index} ({d.title}) has no value")
        if d.name in GEOMETRY:
            return Type.FIXED, 4, [fixed(self.area[GEOMETRY.index(d.name)])]
        if d.name == "source":
            return Type.STRING, d.size, self.source_name
        value = self.item.values.get(option.prop)
        if d.name == "mode":
            return Type.STRING, d.size, MODE_NAMES.get(value, str(value).title())
        if d.type is Type.STRING:
            return Type.STRING, d.size, str(value)
        if d.type is Type.FIXED:
            return Type.FIXED, 4, [fixed(float(value))]
        return d.type, 4, [int(value)]

    async def set(self, index: int, value: Any) -> Info:
        """Set option ``index`` to ``value`` (a word list or a string); the info flags."""
        option = self._option(index)
        d = option.descriptor
        if index == 0 or d.type in (Type.GROUP, Type.BUTTON) or not d.cap & Cap.SOFT_SELECT:
            raise InvalidArgument(f"option {d.name or index} cannot be set")
        if d.cap & Cap.INACTIVE:
            raise InvalidArgument(f"option {d.name} is inactive")
        info = Info(0)
        wanted, inexact = _constrain(d, value)
        if inexact:
            info |= Info.INEXACT
        before = self._snapshot()
        if d.name in GEOMETRY:
            self.area[GEOMETRY.index(d.name)] = unfixed(wanted)
        elif d.name == "source":
            item, source, name = next(s for s in self.sources if s[2] == wanted)
            if item is not self.item:
                self.item = item
                self.area = self._clip_area(self.area)
            if item.values.get("source") != source and item.specs["source"].access is not Access.READ:
                await self.device.write_item_properties(item, {"source": source})
            self.source_name = name
        elif d.name == "mode":
            code = next((k for k, v in MODE_NAMES.items() if v == wanted), wanted.lower())
            await self.device.write_item_properties(self.item, {"mode": code})
        else:
            spec = self.item.specs[option.prop]
            if d.type is Type.FIXED:
                plain: Any = unfixed(wanted)
            elif d.type is Type.BOOL:
                plain = bool(wanted)
            elif d.type is Type.STRING:
                plain = wanted
            else:
                plain = int(wanted)
            await self.device.write_item_properties(self.item, {option.prop: spec.check_type(plain)})
        await self.refresh()
        if self._snapshot(without=d.name) != _without(before, d.name):
            info |= Info.RELOAD_OPTIONS
        if d.name in PARAMETER_OPTIONS or info & Info.RELOAD_OPTIONS:
            info |= Info.RELOAD_PARAMS
        return info

    async def set_auto(self, index: int) -> Info:
        """Set option ``index`` to its default (the driver's, or the whole bed)."""
        option = self._option(index)
        d = option.descriptor
        if not d.cap & Cap.AUTOMATIC:
            raise InvalidArgument(f"option {d.name or index} has no automatic value")
        if d.name in GEOMETRY:
            full = self._full_area()
            return await self.set(index, [fixed(full[GEOMETRY.index(d.name)])])
        if d.name == "source":
            return await self.set(index, self.sources[0][2])
        default = self.item.specs[option.prop].default
        if d.name == "mode":
            return await self.set(index, MODE_NAMES.get(default, str(default).title()))
        if d.type is Type.STRING:
            return await self.set(index, str(default))
        return await self.set(index, [fixed(default) if d.type is Type.FIXED else int(default)])

    # -- the scan ------------------------------------------------------------------------------
    def _clip_area(self, area: list[float]) -> list[float]:
        if not self.has_geometry:
            return area
        width, height = self.bed_mm()
        limits = (width, height, width, height)
        return [min(max(0.0, v), limit) for v, limit in zip(area, limits)]

    def area_values(self) -> dict[str, int]:
        """The scan area as the item's pixel properties at its resolution (SANE's
        way: the corners in either order, clipped to the bed, at least a pixel)."""
        if not self.has_geometry:
            return {}
        v = self.item.values
        dpi = v["resolution"]

        def px(mm: float) -> int:
            return int(round(mm / MM_PER_INCH * dpi))

        left, top, right, bottom = self._clip_area(self.area)
        left, right = sorted((left, right))
        top, bottom = sorted((top, bottom))
        x = min(px(left), v["max_width"] - 1)
        y = min(px(top), v["max_height"] - 1)
        return {"x_offset": x, "y_offset": y,
                "width": max(1, min(px(right), v["max_width"]) - x),
                "height": max(1, min(px(bottom), v["max_height"]) - y)}

    async def apply_area(self) -> None:
        """Write the scan area to the item before a scan starts."""
        area = self.area_values()
        if area and any(self.item.values.get(k) != v for k, v in area.items()):
            await self.device.write_item_properties(self.item, area)

    def parameters(self) -> Parameters:
        """The parameters a scan with the options as they are would have."""
        v = {**self.item.values, **self.area_values()}
        mode = v.get("mode", "gray")
        return parameters_of(ImageInfo(v.get("width", 0), v.get("height", 0), mode, v.get("depth", 8),
                                       v.get("resolution", 0)))

    # -- helpers -----------------------------------------------------------------------------
    def _option(self, index: int) -> Option:
        if not 0 <= index < len(self.options):
            raise InvalidArgument(f"there is no option {index} (there are {len(self.options)})")
        return self.options[index]

    def _snapshot(self, without: str = "") -> dict[str, Any]:
        snap: dict[str, Any] = {}
        for i, o in enumerate(self.options):
            if o.descriptor.name == without or o.descriptor.type is Type.GROUP:
                continue
            d = o.descriptor
            snap[d.name or str(i)] = (d.cap, d.range, d.word_list, d.string_list,
                                      self.get(i)[2] if i else len(self.options))
        return snap


def parameters_of(info: ImageInfo) -> Parameters:
    frame = Frame.RGB if info.mode == "color" else Frame.GRAY
    return Parameters(frame, True, info.bytes_per_line, info.width, info.height, info.depth)


def _without(snap: dict[str, Any], name: str) -> dict[str, Any]:
    return {k: v for k, v in snap.items() if k != name}


def _group(title: str) -> Option:
    return Option(Descriptor("", title, "", Type.GROUP, size=0, cap=Cap(0)))


def _values(attr: dict[str, Any]) -> list[Any]:
    valid = attr.get("valid", {})
    return list(valid.get("values", ())) if valid.get("kind") == "list" else []


def _size(names: list[str]) -> int:
    return max((len(n.encode()) for n in names), default=0) + 1


def _cap(attr: dict[str, Any]) -> Cap:
    inactive = Cap.INACTIVE if attr.get("inactive") else Cap(0)
    if attr.get("access") == Access.READ.value:
        return Cap.SOFT_DETECT | inactive
    return Cap.SOFT_SELECT | Cap.SOFT_DETECT | Cap.AUTOMATIC | inactive


def _constrain(d: Descriptor, value: Any) -> tuple[Any, bool]:
    """The value the option takes for ``value`` (SANE's constrain rules), and
    whether that differs from what was asked."""
    if d.type is Type.STRING:
        if not isinstance(value, str):
            raise InvalidArgument(f"option {d.name} takes a string")
        if d.string_list is not None:
            for name in d.string_list:
                if name == value:
                    return name, False
            for name in d.string_list:
                if name.lower() == value.lower():
                    return name, True
            raise InvalidArgument(f"option {d.name}: {value!r} is not one of {', '.join(d.string_list)}")
        return value, False
    if not isinstance(value, list) or len(value) != 1:
        raise InvalidArgument(f"option {d.name} takes one word")
    word = value[0]
    if d.type is Type.BOOL:
        if word not in (0, 1):
            raise InvalidArgument(f"option {d.name} takes 0 or 1, not {word}")
        return word, False
    if d.range is not None:
        low, high, quant = d.range
        clamped = min(max(word, low), high)
        if quant:
            clamped = low + round((clamped - low) / quant) * quant
            if clamped > high:
                clamped -= quant
        return clamped, clamped != word
    if d.word_list:
        nearest = min(d.word_list, key=lambda w: (abs(w - word), w))
        return nearest, nearest != word
    return word, False


__all__ = ["Options", "parameters_of"]
