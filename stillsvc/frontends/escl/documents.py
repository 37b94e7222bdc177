"""eSCL's XML documents: what the server says (capabilities, status, image info)
and what clients send (scan settings), with the literal ``scan:`` and ``pwg:``
prefixes every client accepts (sane-airscan refuses a default namespace).

A client's body is parsed by defusedxml with DTDs and entities forbidden, after
its size was checked, so a document cannot make the parser expand or fetch
anything; elements are looked up by local name, whatever prefix the client used.
Scan settings become an item's properties in :func:`item_values` (the scan page
uses it too).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any
from xml.sax.saxutils import escape

import defusedxml.ElementTree as SafeET
from defusedxml import DefusedXmlException

from stillsvc.core.items import AppItem
from stillsvc.driver.items import Access

SCAN_NS = "http://schemas.hp.com/imaging/escl/2011/05/03"
PWG_NS = "http://www.pwg.org/schemas/2010/12/sm"
VERSION = "2.63"
#: eSCL's lengths are in 300ths of an inch.
UNITS_PER_INCH = 300

#: eSCL colour mode -> (the item's mode, depth).
COLOR_MODES = {"RGB24": ("color", 8), "RGB48": ("color", 16), "Grayscale8": ("gray", 8),
               "Grayscale16": ("gray", 16), "BlackAndWhite1": ("lineart", 1)}
FORMATS = {"image/jpeg": "jpeg", "image/png": "png", "application/pdf": "pdf"}


class BadRequest(Exception):
    """A request the server cannot accept: ``status`` is the HTTP status to answer."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason


@dataclass(frozen=True)
class Source:
    """What one input source can do, for the capabilities."""

    kind: str  # "Platen", "AdfSimplex", "AdfDuplex"
    max_width: int  # 300ths of an inch
    max_height: int
    color_modes: tuple[str, ...]
    resolutions: tuple[int, ...]
    formats: tuple[str, ...]


@dataclass(frozen=True)
class ScanSettings:
    input_source: str  # "Platen" or "Feeder"
    color_mode: str
    x_resolution: int
    y_resolution: int
    document_format: str
    duplex: bool
    #: (x, y, width, height) in 300ths of an inch, or None for the whole source.
    region: tuple[int, int, int, int] | None


def _e(tag: str, text: object) -> str:
    return f"<{tag}>{escape(str(text))}</{tag}>"


def _input_caps(source: Source) -> str:
    modes = "".join(_e("scan:ColorMode", m) for m in source.color_modes)
    formats = "".join(_e("pwg:DocumentFormat", f) for f in source.formats)
    formats += "".join(_e("scan:DocumentFormatExt", f) for f in source.formats)
    resolutions = "".join(
        f"<scan:DiscreteResolution>{_e('scan:XResolution', r)}{_e('scan:YResolution', r)}</scan:DiscreteResolution>"
        for r in source.resolutions)
    return (
        f"{_e('scan:MinWidth', 16)}{_e('scan:MaxWidth', source.max_width)}"
        f"{_e('scan:MinHeight', 16)}{_e('scan:MaxHeight', source.max_height)}"
        f"{_e('scan:MaxScanRegions', 1)}"
        "<scan:SettingProfiles><scan:SettingProfile>"
        f"<scan:ColorModes>{modes}</scan:ColorModes>"
        f"<scan:DocumentFormats>{formats}</scan:DocumentFormats>"
        f"<scan:SupportedResolutions><scan:DiscreteResolutions>{resolutions}</scan:DiscreteResolutions>"
        "</scan:SupportedResolutions>"
        "</scan:SettingProfile></scan:SettingProfiles>"
        "<scan:SupportedIntents><scan:Intent>Document</scan:Intent><scan:Intent>TextAndGraphic</scan:Intent>"
        "<scan:Intent>Photo</scan:Intent><scan:Intent>Preview</scan:Intent></scan:SupportedIntents>"
        f"{_e('scan:MaxOpticalXResolution', max(source.resolutions))}"
        f"{_e('scan:MaxOpticalYResolution', max(source.resolutions))}"
    )


def capabilities(make_and_model: str, serial: str, uuid: str, admin_uri: str, sources: list[Source],
                 feeder_capacity: int = 0) -> bytes:
    parts = [f'<?xml version="1.0" encoding="UTF-8"?>'
             f'<scan:ScannerCapabilities xmlns:scan="{SCAN_NS}" xmlns:pwg="{PWG_NS}">',
             _e("pwg:Version", VERSION), _e("pwg:MakeAndModel", make_and_model), _e("pwg:SerialNumber", serial),
             _e("scan:UUID", uuid), _e("scan:AdminURI", admin_uri)]
    by_kind = {s.kind: s for s in sources}
    if "Platen" in by_kind:
        parts.append(f"<scan:Platen><scan:PlatenInputCaps>{_input_caps(by_kind['Platen'])}"
                     "</scan:PlatenInputCaps></scan:Platen>")
    if "AdfSimplex" in by_kind:
        adf = f"<scan:AdfSimplexInputCaps>{_input_caps(by_kind['AdfSimplex'])}</scan:AdfSimplexInputCaps>"
        if "AdfDuplex" in by_kind:
            adf += f"<scan:AdfDuplexInputCaps>{_input_caps(by_kind['AdfDuplex'])}</scan:AdfDuplexInputCaps>"
        if feeder_capacity:
            adf += _e("scan:FeederCapacity", feeder_capacity)
        adf += "<scan:AdfOptions><scan:AdfOption>DetectPaperLoaded</scan:AdfOption></scan:AdfOptions>"
        parts.append(f"<scan:Adf>{adf}</scan:Adf>")
    parts.append("</scan:ScannerCapabilities>")
    return "".join(parts).encode()


@dataclass(frozen=True)
class JobStatus:
    uuid: str
    uri: str
    age: int
    images_completed: int
    state: str  # Processing, Completed, Canceled, Aborted
    reason: str


def status(state: str, jobs: list[JobStatus], adf_state: str | None = None) -> bytes:
    parts = [f'<?xml version="1.0" encoding="UTF-8"?>'
             f'<scan:ScannerStatus xmlns:scan="{SCAN_NS}" xmlns:pwg="{PWG_NS}">',
             _e("pwg:Version", VERSION), _e("pwg:State", state)]
    if adf_state:
        parts.append(_e("scan:AdfState", adf_state))
    if jobs:
        parts.append("<scan:Jobs>")
        for job in jobs:
            parts.append(
                "<scan:JobInfo>" + _e("pwg:JobUri", job.uri) + _e("pwg:JobUuid", job.uuid) + _e("scan:Age", job.age)
                + _e("pwg:ImagesCompleted", job.images_completed) + _e("pwg:ImagesToTransfer", 0 if job.state !=
                                                                          "Processing" else 1)
                + _e("pwg:JobState", job.state)
                + f"<pwg:JobStateReasons>{_e('pwg:JobStateReason', job.reason)}</pwg:JobStateReasons>"
                + "</scan:JobInfo>")
        parts.append("</scan:Jobs>")
    parts.append("</scan:ScannerStatus>")
    return "".join(parts).encode()


def image_info(job_uri: str, width: int, height: int, bytes_per_line: int) -> bytes:
    return (f'<?xml version="1.0" encoding="UTF-8"?>'
            f'<scan:ScanImageInfo xmlns:scan="{SCAN_NS}" xmlns:pwg="{PWG_NS}">'
            + _e("pwg:JobUri", job_uri) + _e("pwg:JobUuid", job_uri.rsplit("/", 1)[-1])
            + _e("scan:ActualWidth", width) + _e("scan:ActualHeight", height)
            + _e("scan:ActualBytesPerLine", bytes_per_line) + "</scan:ScanImageInfo>").encode()


def item_values(item: AppItem, settings: ScanSettings, source: str) -> dict[str, Any]:
    """The item's properties for ``settings``: mode, depth, resolution, source, area."""
    mode, depth = COLOR_MODES[settings.color_mode]
    dpi = settings.x_resolution
    values: dict[str, Any] = {"mode": mode, "resolution": dpi}
    if "depth" in item.specs:
        values["depth"] = depth
    if item.specs["source"].access is not Access.READ:
        values["source"] = source
    # The bed at the new resolution (rounded down, so the area always fits).
    max_w = item.values["max_width"] * dpi // item.values["resolution"]
    max_h = item.values["max_height"] * dpi // item.values["resolution"]
    if settings.region is None:
        x, y, w, h = 0, 0, max_w, max_h
    else:
        def px(units: int) -> int:
            return round(units * dpi / UNITS_PER_INCH)
        x, y = min(px(settings.region[0]), max_w - 1), min(px(settings.region[1]), max_h - 1)
        w = max(1, min(px(settings.region[2]), max_w - x))
        h = max(1, min(px(settings.region[3]), max_h - y))
    if "x_offset" in item.specs:
        values.update(x_offset=x, y_offset=y, width=w, height=h)
    return values


def _local(tag: str) -> str:
    return tag.rsplit("}", 1)[-1].rsplit(":", 1)[-1]


def parse_settings(body: bytes) -> ScanSettings:
    """A client's ScanSettings; BadRequest(400) when it is not one."""
    try:
        root = SafeET.fromstring(body, forbid_dtd=True, forbid_entities=True, forbid_external=True)
    except DefusedXmlException as e:
        raise BadRequest(400, f"the ScanSettings may not use DTDs or entities ({type(e).__name__})") from None
    except SafeET.ParseError as e:
        raise BadRequest(400, f"the ScanSettings are not well-formed XML: {e}") from None
    if _local(root.tag) != "ScanSettings":
        raise BadRequest(400, f"expected a ScanSettings document, not {_local(root.tag)}")
    found: dict[str, str] = {}
    region: dict[str, str] = {}
    for element in root.iter():
        name = _local(element.tag)
        text = (element.text or "").strip()
        if name in ("XOffset", "YOffset", "Width", "Height", "ContentRegionUnits"):
            region.setdefault(name, text)
        else:
            found.setdefault(name, text)

    def number(key: str, text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise BadRequest(400, f"{key} must be a whole number, not {text[:40]!r}") from None
        if not 0 <= value <= 1_000_000:
            raise BadRequest(409, f"{key} {value} is out of range")
        return value

    source = found.get("InputSource", "Platen")
    if source not in ("Platen", "Feeder"):
        raise BadRequest(409, f"unknown InputSource {source[:40]!r} (Platen or Feeder)")
    mode = found.get("ColorMode", "RGB24")
    if mode not in COLOR_MODES:
        raise BadRequest(409, f"unknown ColorMode {mode[:40]!r} (one of {', '.join(COLOR_MODES)})")
    fmt = found.get("DocumentFormatExt") or found.get("DocumentFormat") or "image/jpeg"
    fmt = fmt.split(";", 1)[0].strip().lower()
    if fmt not in FORMATS:
        raise BadRequest(409, f"unsupported DocumentFormat {fmt[:60]!r} (one of {', '.join(FORMATS)})")
    x_res = number("XResolution", found.get("XResolution", "300"))
    y_res = number("YResolution", found.get("YResolution", str(x_res)))
    if x_res != y_res:
        raise BadRequest(409, f"XResolution {x_res} and YResolution {y_res} must be the same")
    box = None
    if {"Width", "Height"} <= region.keys():
        units = region.get("ContentRegionUnits", "escl:ThreeHundredthsOfInches")
        if not units.endswith("ThreeHundredthsOfInches"):
            raise BadRequest(409, f"unsupported ContentRegionUnits {units[:60]!r}")
        box = (number("XOffset", region.get("XOffset", "0")), number("YOffset", region.get("YOffset", "0")),
               number("Width", region["Width"]), number("Height", region["Height"]))
        if box[2] == 0 or box[3] == 0:
            raise BadRequest(409, "the scan region is empty")
    duplex = found.get("Duplex", "false").lower() in ("true", "1")
    return ScanSettings(source, mode, x_res, y_res, fmt, duplex, box)


__all__ = ["BadRequest", "COLOR_MODES", "FORMATS", "JobStatus", "ScanSettings", "Source", "capabilities",
           "image_info", "item_values", "parse_settings", "status"]
