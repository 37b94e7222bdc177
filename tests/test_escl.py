"""The eSCL (AirScan) server (``[escl]``) against real eSCL clients: sane-airscan and
sane-backends' ``escl`` backend through scanimage, a plain HTTP client, and a
python-zeroconf browser for its mDNS announcements.

The server listens on 127.0.0.1:8090 and mDNS works on the loopback, so each test runs
the daemon and every client inside one private network namespace (tests/netns.py); the
private D-Bus bus is a unix socket with a path, reachable from there. The namespace's
loopback is not reachable from this process: the HTTP client and the mDNS browser are
helper processes inside it (tests/escl_env.py). Every SANE client gets a private
SANE_CONFIG_DIR that enables only the backend under test:

* sane-airscan with one manual device (``"Sim" = http://127.0.0.1:8090/eSCL, eSCL``),
  discovery off, and its protocol trace kept in the test's folder: a failing assertion
  names the folder and shows the end of the trace;
* sane-backends' ``escl`` with an empty escl.conf, reached as ``escl:http://127.0.0.1:8090``
  (its listing needs avahi), its debug output on stderr.

Images are compared pixel for pixel with the simulator's test pattern and with a raw
transfer of the same settings over D-Bus (as tests/test_saned.py does): the pattern of
a page depends on ``PagesFed``, so the eSCL page (page n) and the D-Bus page (page n + 1)
are each compared with their own page's pattern. sane-airscan asks for PNG: exact. The
escl backend (sane-backends 1.2.1) prefers PDF for the platen when the server offers it
(this one does), renders it with poppler, always to RGB, and crops the image itself: its
pages are located in the device's page and compared near-exactly (the rendering is 1:1).
JPEG is compared approximately (luma, and colour over 8 x 8 blocks), and says so.

Clients that are slow by themselves: sane-airscan retries a 503 every second, 30 times,
so the busy cases use the plain HTTP client; nothing else here waits on a client's timer.

The scan area used is exact in eSCL's unit at 75 dpi (4/300 inch a pixel): 10.16 x 5.08 mm
from the corner (120 x 60 / 300 inch, 30 x 15 pixels), 50.8 x 40.64 mm (600 x 480,
150 x 120 pixels), so no rounding of the clients or the server can hide an error.

Nothing sleeps to synchronise: each wait is on an answer, an event or a condition
checked with a deadline.
"""

from __future__ import annotations

import asyncio
import io
import json
import re
import sys
import time
import uuid
import xml.etree.ElementTree as ElementTree
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from dbus_fast import Variant
from dbus_fast.aio import MessageBus
from escl_env import (
    HELPER,
    NS,
    PWG_NS,
    SCAN_NS,
    AirscanConfig,
    EsclBackendConfig,
    HttpClient,
    Response,
)
from helpers import (
    DEVICE,
    ITEM,
    SESSION,
    SIM0,
    SIMULATOR,
    Daemon,
    DBusDaemon,
    assert_daemon_healthy,
    call,
    connect,
    create_session,
    expect_error,
    get_property,
    unwrap,
    vm_rss_kib,
)
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from netns import NetNamespace, listening, serve_in_namespace, unavailable_reason
from sane_env import parse_pnm, sane_unavailable_reason

from stillsvc.drivers.sim.pattern import pattern_page
from stillsvc.imaging import ImageInfo, parse_raw

_why_not = unavailable_reason() or sane_unavailable_reason()
if _why_not:
    pytest.skip(f"eSCL tests need a private network namespace and the SANE clients: {_why_not}",
                allow_module_level=True)

PORT = 8090
HOST = f"127.0.0.1:{PORT}"
BASE = "/eSCL"
URL = f"http://{HOST}{BASE}"
DPI = 75
# The scan area, exact at 75 dpi: (x, y, width, height) in 300ths of an inch and in pixels.
AREA_300 = (120, 60, 600, 480)
AREA_PX = (30, 15, 150, 120)
AREA_ARGS = ["--resolution", str(DPI), "-l", "10.16", "-t", "5.08", "-x", "50.8", "-y", "40.64"]
BED_300 = (round(216.0 / 25.4 * 300), round(297.0 / 25.4 * 300))  # 2551 x 3508
JOB_RE = re.compile(r"^(?:http://[^/]+)?(/eSCL(?:/sim0)?/ScanJobs/[0-9A-Fa-f-]{36})/?$")
SCANNER_NAME = "Simulated Scanner"  # sim0's Device.Name


# -- the setting: a daemon with [escl] in a namespace, clients beside it --------------------------

@dataclass
class Run:
    returncode: int
    stdout: bytes
    stderr: str
    elapsed: float


def toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return str(value)
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    raise TypeError(f"no TOML for {value!r}")


def escl_config(extra: str = "", **escl: Any) -> str:
    return "[escl]\n" + "".join(f"{k} = {toml_value(v)}\n" for k, v in escl.items()) + extra


async def run_in(ns: NetNamespace, argv: list[str], env: dict[str, str] | None = None,
                 timeout: float = 30.0) -> Run:
    start = time.monotonic()
    proc = await asyncio.create_subprocess_exec(*ns.wrap(argv), stdin=asyncio.subprocess.DEVNULL,
                                                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
                                                env=env)
    try:
        out, err = await asyncio.wait_for(proc.communicate(), timeout)
    except TimeoutError:
        proc.kill()
        out, err = await proc.communicate()
        raise AssertionError(f"{argv[:4]} did not finish within {timeout} s; stderr:\n"
                             f"{err.decode(errors='replace')[-4000:]}") from None
    return Run(proc.returncode, out, err.decode(errors="replace"), time.monotonic() - start)


class Escl:
    """One daemon serving eSCL in a namespace, a D-Bus connection to it, clients beside it."""

    def __init__(self, ns: NetNamespace, daemon: Daemon, bus: MessageBus, http: HttpClient, folder: Path) -> None:
        self.ns, self.daemon, self.bus, self.http, self.folder = ns, daemon, bus, http, folder
        self._configs = 0

    # D-Bus side
    async def pages_fed(self) -> int:
        return await get_property(self.bus, SIM0, SIMULATOR, "PagesFed")

    async def last_settings(self, item: str) -> dict[str, Any]:
        return unwrap(await get_property(self.bus, SIM0, SIMULATOR, "LastSettings"))[item]

    async def device(self, name: str) -> Any:
        return await get_property(self.bus, SIM0, DEVICE, name)

    async def data_mode_free(self, wait_ms: int = 0) -> float:
        """Take data mode over D-Bus (waiting up to wait_ms) and give it back: the seconds it took."""
        start = time.monotonic()
        session = await create_session(self.bus, mode="data", wait_ms=Variant("u", wait_ms))
        took = time.monotonic() - start
        await call(self.bus, session, SESSION, "Close")
        return took

    # SANE clients
    def airscan(self) -> AirscanConfig:
        """A fresh sane-airscan configuration (and trace folder) for one scanimage run."""
        self._configs += 1
        return AirscanConfig(self.folder / f"airscan-{self._configs}", URL)

    def escl_backend(self) -> EsclBackendConfig:
        self._configs += 1
        return EsclBackendConfig(self.folder / f"escl-backend-{self._configs}")

    async def scanimage(self, env: dict[str, str], *args: str, timeout: float = 30.0) -> Run:
        return await run_in(self.ns, ["scanimage", *args], env=env, timeout=timeout)

    # HTTP side
    async def get(self, path: str, **kwargs: Any) -> Response:
        return await self.http.arequest("GET", path, **kwargs)

    async def post_job(self, body: str | bytes, base: str = BASE, content_type: str = "text/xml",
                       **kwargs: Any) -> Response:
        return await self.http.arequest("POST", f"{base}/ScanJobs", body=body,
                                        headers={"Content-Type": content_type}, **kwargs)

    async def new_job(self, base: str = BASE, **settings: Any) -> str:
        """POST ScanJobs that must succeed: the job's path."""
        r = await self.post_job(scan_settings(**settings), base=base)
        assert r.status == 201, r
        return job_path(r)


@pytest.fixture
async def start_escl(request: pytest.FixtureRequest, bus_address: str,
                     tmp_path: Path) -> AsyncIterator[Callable[..., Awaitable[Escl]]]:
    """``net = await start_escl(idle_ms=500)``: the daemon with ``[escl]`` holding the given
    keys (none: the defaults) and ``extra`` TOML after it, started inside a fresh network
    namespace; an HTTP client runs beside it."""
    cleanup: list[Callable[[], Any]] = []

    started = 0

    async def start(extra: str = "", **escl: Any) -> Escl:
        nonlocal started
        started += 1  # a test may start a second daemon: each has its own folder and log
        folder = tmp_path / (f"net-{started}" if started > 1 else "net")
        folder.mkdir()
        config = folder / "stillsvc.toml"
        config.write_text(escl_config(extra, **escl))
        ns, daemon, bus = await serve_in_namespace(request, bus_address, config, folder / "daemon", PORT, cleanup)
        http = HttpClient(ns.wrap)
        cleanup.append(http.close)
        return Escl(ns, daemon, bus, http, folder)

    yield start
    errors = []
    for step in reversed(cleanup):  # every step, even after one failed: no process is left behind
        try:
            step()
        except Exception as e:
            errors.append(e)
    if errors:
        raise errors[0]


# -- eSCL documents --------------------------------------------------------------------------------

def scan_settings(source: str = "Platen", mode: str = "RGB24", fmt: str = "image/png", resolution: int = DPI,
                  area: tuple[int, int, int, int] = AREA_300, version: str = "2.63", intent: str | None = None) -> str:
    """ScanSettings as sane-airscan writes them (literal prefixes, units in 300ths of an inch)."""
    x, y, w, h = area
    return (
        '<?xml version="1.0" encoding="UTF-8"?>'
        f'<scan:ScanSettings xmlns:pwg="{PWG_NS}" xmlns:scan="{SCAN_NS}">'
        f"<pwg:Version>{version}</pwg:Version>"
        + (f"<scan:Intent>{intent}</scan:Intent>" if intent else "")
        + "<pwg:ScanRegions><pwg:ScanRegion>"
        "<pwg:ContentRegionUnits>escl:ThreeHundredthsOfInches</pwg:ContentRegionUnits>"
        f"<pwg:XOffset>{x}</pwg:XOffset><pwg:YOffset>{y}</pwg:YOffset>"
        f"<pwg:Width>{w}</pwg:Width><pwg:Height>{h}</pwg:Height>"
        "</pwg:ScanRegion></pwg:ScanRegions>"
        f"<pwg:InputSource>{source}</pwg:InputSource>"
        f"<scan:ColorMode>{mode}</scan:ColorMode>"
        f"<pwg:DocumentFormat>{fmt}</pwg:DocumentFormat>"
        f"<scan:DocumentFormatExt>{fmt}</scan:DocumentFormatExt>"
        f"<scan:XResolution>{resolution}</scan:XResolution><scan:YResolution>{resolution}</scan:YResolution>"
        "</scan:ScanSettings>")


def job_path(r: Response) -> str:
    location = r.header("Location")
    assert location, f"201 without a Location: {r}"
    match = JOB_RE.match(location)
    assert match, f"Location {location!r} is not /eSCL[/sim0]/ScanJobs/<uuid> (on this host)"
    if location.startswith("http://"):
        assert location.startswith(f"http://{HOST}/"), f"Location {location!r} names another host"
    return match.group(1)


def xml_of(r: Response, root: str) -> ElementTree.Element:
    assert r.status == 200, r
    ctype = r.header("Content-Type") or ""
    assert "xml" in ctype, f"Content-Type {ctype!r}"
    doc = ElementTree.fromstring(r.body)
    assert doc.tag == root, f"root element {doc.tag}, expected {root}"
    return doc


def texts(doc: ElementTree.Element, path: str) -> list[str]:
    return [(e.text or "").strip() for e in doc.findall(path, NS)]


def state_of(r: Response) -> tuple[str, str | None]:
    doc = xml_of(r, f"{{{SCAN_NS}}}ScannerStatus")
    (state,) = texts(doc, "pwg:State")
    adf = texts(doc, "scan:AdfState")
    return state, adf[0] if adf else None


def local(doc: ElementTree.Element, name: str) -> str | None:
    """The text of the first element with this local name, whatever its namespace."""
    for e in doc.iter():
        if e.tag.rsplit("}", 1)[-1] == name:
            return (e.text or "").strip()
    return None


def assert_reason(r: Response, *statuses: int) -> None:
    """A refusal with one of ``statuses`` (any 4xx if none given) and a reason: some text in
    the body, and no traceback or source path in it."""
    if statuses:
        assert r.status in statuses, f"expected {statuses}, got {r}"
    else:
        assert r.status is not None and 400 <= r.status < 500, f"expected a 4xx, got {r}"
    assert r.text.strip(), f"{r.status} without a reason in the body: {r}"
    assert "Traceback" not in r.text and 'File "/' not in r.text and "stillsvc/" not in r.text, r


# -- images ------------------------------------------------------------------------------------

def pattern(width: int, height: int, mode: str, page: int, depth: int = 8, resolution: int = DPI) -> bytes:
    return pattern_page(ImageInfo(width, height, mode, depth, resolution), page)


def first_difference(a: bytes, b: bytes) -> str:
    if len(a) != len(b):
        return f"{len(a)} bytes vs {len(b)}"
    i = next(i for i in range(len(a)) if a[i] != b[i])
    return f"first difference at byte {i}: {a[i]:#04x} vs {b[i]:#04x}"


def mean_difference(a: bytes, b: bytes) -> float:
    assert len(a) == len(b), f"{len(a)} bytes vs {len(b)}"
    return sum(abs(x - y) for x, y in zip(a, b)) / max(1, len(a))


#: JPEG (quality 90, chroma subsampled 4:2:0) of the pattern's saturated 9-pixel checkerboard
#: loses most of its chroma detail: a JPEG page is compared on its luma, and on its colour
#: averaged over 8 x 8 blocks. A good JPEG of the right page is within ~1.5 of both; the
#: wrong page (the next one) is ~75 off.
JPEG_LUMA_ERROR = 4.0
JPEG_BLOCK_ERROR = 6.0
#: A PDF page comes back rendered by the client (poppler): 1:1 here, so near-exact.
PDF_ERROR = 1.0


def assert_same_image(actual: bytes, expected: bytes, fmt: str, what: str, size: tuple[int, int],
                      evidence: str = "") -> None:
    """``actual`` is ``expected`` (8-bit gray or RGB rows of ``size``): exactly for PNG,
    approximately for JPEG and for a PDF the client rendered (and the test says so)."""
    from PIL import Image
    assert len(actual) == len(expected), f"{what}: {len(actual)} bytes, expected {len(expected)}\n{evidence}"
    if fmt == "image/png":
        assert actual == expected, f"{what} is not the pattern: {first_difference(actual, expected)}\n{evidence}"
        return
    mode = "RGB" if len(actual) == size[0] * size[1] * 3 else "L"
    got, want = Image.frombytes(mode, size, actual), Image.frombytes(mode, size, expected)
    if fmt == "application/pdf":
        error = mean_difference(actual, expected)
        print(f"{what}: {fmt} rendered by the client, mean error {error:.3f} (compared approximately)")
        assert error <= PDF_ERROR, f"{what} ({fmt}): mean error {error:.2f} > {PDF_ERROR}\n{evidence}"
        return
    luma = mean_difference(got.convert("L").tobytes(), want.convert("L").tobytes())
    block_size = (max(1, size[0] // 8), max(1, size[1] // 8))
    blocks = mean_difference(got.resize(block_size, Image.BOX).tobytes(), want.resize(block_size, Image.BOX).tobytes())
    print(f"{what}: {fmt}, compared approximately: luma error {luma:.2f}, 8x8 block error {blocks:.2f}")
    assert luma <= JPEG_LUMA_ERROR and blocks <= JPEG_BLOCK_ERROR, (
        f"{what} ({fmt}, compared approximately): luma error {luma:.2f} (max {JPEG_LUMA_ERROR}), "
        f"8x8 block error {blocks:.2f} (max {JPEG_BLOCK_ERROR})\n{evidence}")


def bits(data: bytes, width: int, height: int, one_is_black: bool) -> list[bool]:
    """A 1-bit raster (rows padded to bytes) as one bool a pixel, True = black."""
    stride = (width + 7) // 8
    out = []
    for y in range(height):
        row = data[y * stride:(y + 1) * stride]
        for x in range(width):
            bit = bool(row[x // 8] & (0x80 >> (x % 8)))
            out.append(bit if one_is_black else not bit)
    return out


def decode(body: bytes) -> Any:
    from PIL import Image
    image = Image.open(io.BytesIO(body))
    image.load()
    return image


def posted_format(trace_log: str) -> str | None:
    """The DocumentFormat sane-airscan asked for, from the ScanSettings in its trace."""
    settings_xml = re.search(r"<scan:ScanSettings.*?</scan:ScanSettings>", trace_log, re.DOTALL)
    if not settings_xml:
        return None
    fmt = re.search(r"<(?:scan:DocumentFormatExt|pwg:DocumentFormat)>([^<]+)<", settings_xml.group(0))
    return fmt.group(1) if fmt else None


def airscan_format(cfg: AirscanConfig) -> str | None:
    logs = sorted(cfg.trace.glob("*.log")) if cfg.trace.exists() else []
    for log in logs:
        fmt = posted_format(log.read_text(errors="replace"))
        if fmt:
            return fmt
    return None


async def raw_transfer(bus: MessageBus, item: str) -> bytes:
    import os
    r, w = os.pipe()
    loop = asyncio.get_running_loop()

    def read_all() -> bytes:
        chunks = []
        with os.fdopen(r, "rb") as f:
            while chunk := f.read(1 << 20):
                chunks.append(chunk)
        return b"".join(chunks)

    reader = loop.run_in_executor(None, read_all)
    try:
        await call(bus, item, ITEM, "Transfer", "hsa{sv}", [0, "raw", {}], unix_fds=[w])
    finally:
        os.close(w)
    return await reader


async def dbus_page(net: Escl, settings: dict[str, Any], item: str = "Flatbed") -> tuple[ImageInfo, int, bytes]:
    """The same settings over D-Bus: one raw page (its info, page number and rows)."""
    session = await create_session(net.bus, mode="data", wait_ms=Variant("u", 5000))
    try:
        root = await get_property(net.bus, session, SESSION, "RootItem")
        types = {"resolution": "u", "mode": "s", "depth": "u", "x_offset": "u", "y_offset": "u", "width": "u",
                 "height": "u"}
        values = {k: Variant(t, settings[k]) for k, t in types.items()}
        await call(net.bus, f"{root}/{item}", ITEM, "WriteProperties", "a{sv}", [values])
        data = await raw_transfer(net.bus, f"{root}/{item}")
    finally:
        await call(net.bus, session, SESSION, "Close")
    ((info, number, rows),) = parse_raw(data)
    return info, number, rows


async def assert_device_got(net: Escl, item: str, mode: str, depth: int, area_px: tuple[int, int, int, int],
                            evidence: str = "") -> dict[str, Any]:
    settings = await net.last_settings(item)
    got = (settings["resolution"], settings["mode"], settings["depth"], settings["x_offset"], settings["y_offset"],
           settings["width"], settings["height"])
    assert got == (DPI, mode, depth, *area_px), (
        f"the device was set to (resolution, mode, depth, x, y, width, height) {got}, expected "
        f"{(DPI, mode, depth, *area_px)}\n{evidence}")
    return settings


async def assert_dbus_same(net: Escl, settings: dict[str, Any], page: int, mode: str, depth: int) -> None:
    """A D-Bus raw transfer with the settings the eSCL scan left gives the same geometry and
    the pattern of its own page (the next one)."""
    info, number, rows = await dbus_page(net, settings)
    assert number == 0 and (info.width, info.height, info.mode, info.depth, info.resolution) == (
        settings["width"], settings["height"], mode, depth, DPI), info
    want = pattern(info.width, info.height, mode, page + 1, depth)
    assert rows == want, f"the D-Bus page is not the pattern: {first_difference(rows, want)}"


# -- the mDNS browser --------------------------------------------------------------------------

class Browser:
    """python-zeroconf's ServiceBrowser for _uscan._tcp inside the namespace (escl_env.py browse)."""

    def __init__(self, ns: NetNamespace) -> None:
        self.ns = ns
        self.proc: asyncio.subprocess.Process | None = None
        self.events: list[dict[str, Any]] = []

    async def __aenter__(self) -> Browser:
        self.proc = await asyncio.create_subprocess_exec(
            *self.ns.wrap([sys.executable, HELPER, "browse", "_uscan._tcp.local.", "127.0.0.1"]),
            stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
        await self.wait(lambda e: e["event"] == "ready", timeout=10, what="the browser starting")
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self.proc is not None
        if self.proc.returncode is None:
            self.proc.kill()
        await asyncio.wait_for(self.proc.wait(), 10)

    async def wait(self, predicate: Callable[[dict[str, Any]], bool], timeout: float, what: str,
                   since: int = 0) -> dict[str, Any]:
        """The first event from index ``since`` on that matches, reading more until the deadline."""
        assert self.proc is not None and self.proc.stdout is not None
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        i = since
        while True:
            while i < len(self.events):
                if predicate(self.events[i]):
                    return self.events[i]
                i += 1
            remaining = deadline - loop.time()
            if remaining <= 0:
                raise AssertionError(f"{what}: not seen within {timeout} s; browser events: {self.events}")
            try:
                line = await asyncio.wait_for(self.proc.stdout.readline(), remaining)
            except TimeoutError:
                continue
            if not line:
                assert self.proc.stderr is not None
                err = (await self.proc.stderr.read()).decode(errors="replace")
                raise AssertionError(f"{what}: the browser exited: {err[-3000:]}; events: {self.events}")
            self.events.append(json.loads(line))


# -- capabilities and status ----------------------------------------------------------------------

async def test_capabilities_and_status_with_the_default_settings(start_escl):
    net = await start_escl()  # [escl] alone: every default
    r = await net.get(f"{BASE}/ScannerCapabilities")
    caps = xml_of(r, f"{{{SCAN_NS}}}ScannerCapabilities")
    # sane-airscan needs the literal prefixes, not a default namespace
    assert "<scan:ScannerCapabilities" in r.text and "<pwg:Version>" in r.text, r.text[:600]
    assert texts(caps, "pwg:Version") and texts(caps, "pwg:MakeAndModel"), r.text[:1000]
    (scanner_uuid,) = texts(caps, "scan:UUID")
    uuid.UUID(scanner_uuid.removeprefix("urn:uuid:"))
    sources = {"Platen": caps.find("scan:Platen/scan:PlatenInputCaps", NS),
               "Adf": caps.find("scan:Adf/scan:AdfSimplexInputCaps", NS)}
    for name, input_caps in sources.items():
        assert input_caps is not None, f"no {name} input caps in:\n{r.text}"
        (max_w,), (max_h,) = texts(input_caps, "scan:MaxWidth"), texts(input_caps, "scan:MaxHeight")
        assert abs(int(max_w) - BED_300[0]) <= 3 and abs(int(max_h) - BED_300[1]) <= 3, (name, max_w, max_h)
        assert int(texts(input_caps, "scan:MinWidth")[0]) > 0 and int(texts(input_caps, "scan:MinHeight")[0]) > 0
        profile = input_caps.find("scan:SettingProfiles/scan:SettingProfile", NS)
        assert profile is not None, name
        modes = set(texts(profile, "scan:ColorModes/scan:ColorMode"))
        assert {"RGB24", "Grayscale8", "BlackAndWhite1"} <= modes, (name, modes)
        formats = set(texts(profile, "scan:DocumentFormats/pwg:DocumentFormat"))
        assert {"image/jpeg", "image/png", "application/pdf"} <= formats, (name, formats)
        discrete = [int(x) for x in texts(profile, "scan:SupportedResolutions/scan:DiscreteResolutions/"
                                          "scan:DiscreteResolution/scan:XResolution")]
        ranged = texts(profile, "scan:SupportedResolutions/scan:ResolutionRange/scan:XResolutionRange/scan:Min")
        if discrete:
            assert min(discrete) == 75 and max(discrete) == 600 and 150 in discrete and 300 in discrete, discrete
        else:
            assert ranged, f"no resolutions for {name}:\n{r.text}"
            top = texts(profile, "scan:SupportedResolutions/scan:ResolutionRange/scan:XResolutionRange/scan:Max")
            assert (int(ranged[0]), int(top[0])) == (75, 600)
    assert caps.find("scan:Adf/scan:AdfDuplexInputCaps", NS) is None, "sim0 has no duplex unit"

    # the device's own base path serves the same device
    r0 = await net.get(f"{BASE}/sim0/ScannerCapabilities")
    assert texts(xml_of(r0, f"{{{SCAN_NS}}}ScannerCapabilities"), "scan:UUID") == [scanner_uuid]

    status = await net.get(f"{BASE}/ScannerStatus")
    assert "<scan:ScannerStatus" in status.text and "<pwg:State>" in status.text, status.text
    assert state_of(status) == ("Idle", "ScannerAdfEmpty"), status.text
    await call(net.bus, SIM0, SIMULATOR, "LoadPages", "u", [2])
    assert state_of(await net.get(f"{BASE}/sim0/ScannerStatus")) == ("Idle", "ScannerAdfLoaded")
    assert_daemon_healthy(net.daemon)


async def test_devices_are_served_under_their_ids_and_filtered_by_devices(start_escl):
    second = '\n[[device]]\nid = "sim1"\ndriver = "sim"\nport = ""\nname = "Second Scanner"\n'
    net = await start_escl(extra=second, mdns=False)
    uuids = {}
    for device in ("sim0", "sim1"):
        r = await net.get(f"{BASE}/{device}/ScannerCapabilities")
        (uuids[device],) = texts(xml_of(r, f"{{{SCAN_NS}}}ScannerCapabilities"), "scan:UUID")
    assert uuids["sim0"] != uuids["sim1"], uuids
    (first,) = texts(xml_of(await net.get(f"{BASE}/ScannerCapabilities"), f"{{{SCAN_NS}}}ScannerCapabilities"),
                     "scan:UUID")
    assert first == uuids["sim0"], "/eSCL serves the first exported device, sorted by id"
    assert_reason(await net.get(f"{BASE}/nosuch/ScannerCapabilities"), 404)
    net.daemon.stop()
    net.ns.stop()

    only = await start_escl(extra=second, mdns=False, devices=["sim1"])
    (uuid1,) = texts(xml_of(await only.get(f"{BASE}/ScannerCapabilities"), f"{{{SCAN_NS}}}ScannerCapabilities"),
                     "scan:UUID")
    assert uuid1 == uuids["sim1"], "with devices = [\"sim1\"], /eSCL serves sim1"
    assert_reason(await only.get(f"{BASE}/sim0/ScannerCapabilities"), 404)
    assert_reason(await only.post_job(scan_settings(), base=f"{BASE}/sim0"), 404)
    assert await only.data_mode_free() < 1.0  # nothing took sim0
    assert_daemon_healthy(only.daemon)


async def test_peer_outside_allow_is_refused(start_escl):
    net = await start_escl(allow=["10.0.0.0/8"], mdns=False)  # 127.0.0.1 is not in it
    for method, path in (("GET", f"{BASE}/ScannerCapabilities"), ("POST", f"{BASE}/ScanJobs")):
        r = await net.http.arequest(method, path, body=scan_settings() if method == "POST" else None)
        # refused with 403 and a reason, or the connection dropped unanswered (as [saned] does)
        if r.status is not None:
            assert_reason(r, 403)
        else:
            assert any(why in (r.error or "") for why in ("without response", "reset by peer")), r
    assert await net.data_mode_free() < 1.0  # the refused POST took nothing
    assert_daemon_healthy(net.daemon)


# -- sane-airscan ------------------------------------------------------------------------------

async def test_airscan_lists_and_opens_the_configured_device(start_escl):
    net = await start_escl(mdns=False)
    cfg = net.airscan()
    run = await net.scanimage(cfg.env, "-L", timeout=20)
    assert run.returncode == 0, f"{run.stderr[-3000:]}\n{cfg.evidence()}"
    assert f"device `{cfg.device}' is a" in run.stdout.decode(), f"{run.stdout!r}\n{cfg.evidence()}"
    # Opening it reads the capabilities: the options sane-airscan builds from them.
    cfg = net.airscan()
    run = await net.scanimage(cfg.env, "-A", "-d", cfg.device, timeout=20)
    assert run.returncode == 0, f"{run.stderr[-3000:]}\n{cfg.evidence()}"
    text = run.stdout.decode(errors="replace")
    for expected in (r"--source Flatbed\|ADF ", r"--mode Color\|Gray(\|Lineart)? ",
                     r"--resolution 75\|.*\|600dpi", r"-x 0\.\.21[56](\.\d+)?mm", r"-y 0\.\.29[67](\.\d+)?mm"):
        assert re.search(expected, text), f"{expected!r} not in scanimage -A:\n{text}\n{cfg.evidence()}"
    assert_daemon_healthy(net.daemon)


@pytest.mark.parametrize("sane_mode, mode, magic", [("Color", "color", "P6"), ("Gray", "gray", "P5")])
async def test_airscan_page_is_the_pattern_and_the_dbus_page(start_escl, sane_mode, mode, magic):
    net = await start_escl(mdns=False)
    cfg = net.airscan()
    page = await net.pages_fed()
    out = net.folder / "page.pnm"  # not stdout: with a trace, sane-airscan logs onto stdout
    run = await net.scanimage(cfg.env, "-d", cfg.device, "--format=pnm", "-o", str(out), "--source", "Flatbed",
                              "--mode", sane_mode, *AREA_ARGS)
    assert run.returncode == 0, f"scanimage failed ({run.returncode}): {run.stderr[-3000:]}\n{cfg.evidence()}"
    blob = out.read_bytes()
    image, end = parse_pnm(blob)
    assert end == len(blob) and (image.magic, image.maxval) == (magic, 255), image
    fmt = airscan_format(cfg)
    assert fmt in ("image/png", "image/jpeg"), f"sane-airscan asked for {fmt!r}\n{cfg.evidence()}"
    if fmt != "image/png":
        print(f"sane-airscan asked for {fmt}: compared approximately")
    settings = await assert_device_got(net, "Flatbed", mode, 8, AREA_PX, cfg.evidence())
    assert (image.width, image.height) == AREA_PX[2:], image
    assert_same_image(image.data, pattern(image.width, image.height, mode, page), fmt,
                      f"page {page} through sane-airscan", AREA_PX[2:], cfg.evidence())
    await assert_dbus_same(net, settings, page, mode, 8)
    # the job was deleted (sane-airscan does) or finished: the device is free at once
    assert await net.data_mode_free() < 1.0
    assert_daemon_healthy(net.daemon)


async def test_airscan_feeder_batch_scans_every_loaded_page(start_escl):
    net = await start_escl(mdns=False)
    await call(net.bus, SIM0, SIMULATOR, "LoadPages", "u", [3])
    first = await net.pages_fed()
    out = net.folder / "batch"
    out.mkdir()
    cfg = net.airscan()
    run = await net.scanimage(cfg.env, "-d", cfg.device, "--format=pnm", f"--batch={out}/p%d.pnm", "--source", "ADF",
                              "--mode", "Gray", *AREA_ARGS)
    files = sorted(out.iterdir())
    assert run.returncode == 0, f"scanimage failed ({run.returncode}): {run.stderr[-3000:]}\n{cfg.evidence()}"
    assert [f.name for f in files] == ["p1.pnm", "p2.pnm", "p3.pnm"], f"{files}\n{run.stderr[-3000:]}\n" \
                                                                      f"{cfg.evidence()}"
    fmt = airscan_format(cfg) or "image/png"
    for i, path in enumerate(files):
        image, _ = parse_pnm(path.read_bytes())
        assert image.magic == "P5" and (image.width, image.height) == AREA_PX[2:], (path.name, image)
        assert_same_image(image.data, pattern(image.width, image.height, "gray", first + i), fmt, path.name,
                          AREA_PX[2:], cfg.evidence())
    assert await get_property(net.bus, SIM0, SIMULATOR, "PagesLoaded") == 0
    assert await net.pages_fed() == first + 3
    await assert_device_got(net, "Feeder", "gray", 8, AREA_PX, cfg.evidence())
    assert await net.data_mode_free() < 1.0
    assert_daemon_healthy(net.daemon)


async def test_airscan_empty_feeder_says_out_of_documents(start_escl):
    # sane-airscan learns why a feeder job failed from ScannerStatus' scan:AdfState
    # (ScannerAdfEmpty -> SANE_STATUS_NO_DOCS); without it the scan is an I/O error.
    net = await start_escl(mdns=False)
    cfg = net.airscan()
    run = await net.scanimage(cfg.env, "-d", cfg.device, "--format=pnm", "--source", "ADF", "--mode", "Gray",
                              *AREA_ARGS, timeout=20)
    assert run.returncode != 0 and "Document feeder out of documents" in run.stderr, \
        f"{run.returncode}: {run.stderr[-3000:]}\n{cfg.evidence()}"
    assert run.elapsed < 10, f"{run.elapsed:.1f} s for an empty feeder\n{cfg.evidence()}"
    assert await net.data_mode_free() < 1.0
    assert_daemon_healthy(net.daemon)


# -- sane-backends' escl -------------------------------------------------------------------------

def escl_format(stderr: str) -> str | None:
    """The format the escl backend asked for, from its debug output."""
    found = re.findall(r"Create NewJob : (image/\w+|application/pdf)", stderr)
    return found[-1] if found else None


def locate(image: bytes, width: int, height: int, page: bytes, page_width: int, page_height: int, samples: int,
           near: tuple[int, int], radius: int = 6) -> tuple[tuple[int, int], float]:
    """Where ``image`` sits in ``page`` (both 8-bit, ``samples`` a pixel), searched around
    ``near``: the offset with the smallest mean error, and that error."""
    best: tuple[tuple[int, int], float] | None = None
    for oy in range(max(0, near[1] - radius), min(page_height - height, near[1] + radius) + 1):
        for ox in range(max(0, near[0] - radius), min(page_width - width, near[0] + radius) + 1):
            crop = b"".join(page[((oy + y) * page_width + ox) * samples:((oy + y) * page_width + ox + width) * samples]
                            for y in range(height))
            error = mean_difference(image, crop)
            if best is None or error < best[1]:
                best = ((ox, oy), error)
            if error == 0:
                return best
    assert best is not None, "the image is larger than the page"
    return best


@pytest.mark.parametrize("sane_mode, mode, samples", [("Color", "color", 3), ("Gray", "gray", 1)])
async def test_escl_backend_page_is_the_pattern_and_the_dbus_page(start_escl, sane_mode, mode, samples):
    # What sane-backends 1.2.1's escl does with this server: for the platen it prefers PDF
    # (then TIFF, PNG, JPEG) and renders it with poppler, always to RGB; it asks for the
    # region from the bed's corner to the area's far corner, (0, 0, x + w, y + h), and crops
    # the image itself.
    net = await start_escl(mdns=False)
    cfg = net.escl_backend()
    page = await net.pages_fed()
    run = await net.scanimage(cfg.env, "-d", cfg.device(), "--format=pnm", "--mode", sane_mode, *AREA_ARGS)
    evidence = f"escl backend stderr (SANE_DEBUG_ESCL={cfg.debug}):\n{run.stderr[-5000:]}"
    assert run.returncode == 0, f"scanimage failed ({run.returncode})\n{evidence}"
    image, end = parse_pnm(run.stdout)
    assert end == len(run.stdout) and image.maxval == 255, image
    fmt = escl_format(run.stderr)
    assert fmt in ("image/png", "image/jpeg", "application/pdf"), f"the escl backend asked for {fmt!r}\n{evidence}"
    print(f"the escl backend asked for {fmt}, got {image}")
    x, y, w, h = AREA_PX
    settings = await assert_device_got(net, "Flatbed", mode, 8, (0, 0, x + w, y + h), evidence)
    assert (image.width, image.height) == (w, h), f"{image}\n{evidence}"
    full = pattern(x + w, y + h, mode, page)
    crop = b"".join(full[((y + row) * (x + w) + x) * samples:((y + row) * (x + w) + x + w) * samples]
                    for row in range(h))
    got = image.data
    if image.magic == "P6" and samples == 1:  # a gray page as RGB frames (PDF is rendered to RGB)
        assert got[0::3] == got[1::3] == got[2::3], "a gray page came back with colour in it"
        got = got[0::3]
    else:
        assert image.magic == ("P6" if samples == 3 else "P5"), image
    (ox, oy), error = locate(got, w, h, full, x + w, y + h, samples, near=(x, y))
    assert (ox, oy) == (x, y), f"the image sits at {(ox, oy)} in the page (error {error:.2f}), expected {(x, y)}"
    assert_same_image(got, crop, fmt, f"page {page} through the escl backend", (w, h), evidence)
    await assert_dbus_same(net, settings, page, mode, 8)
    # The escl backend never sends DELETE: the job let the device go with its last page.
    assert await net.data_mode_free() < 1.0
    assert_daemon_healthy(net.daemon)


async def test_escl_backend_feeder_batch_scans_every_loaded_page(start_escl):
    net = await start_escl(mdns=False)
    await call(net.bus, SIM0, SIMULATOR, "LoadPages", "u", [3])
    first = await net.pages_fed()
    out = net.folder / "escl-batch"
    out.mkdir()
    cfg = net.escl_backend()
    run = await net.scanimage(cfg.env, "-d", cfg.device(), "--format=pnm", f"--batch={out}/p%d.pnm",
                              "--source", "ADF", "--mode", "Color", *AREA_ARGS)
    evidence = f"escl backend stderr (SANE_DEBUG_ESCL={cfg.debug}):\n{run.stderr[-5000:]}"
    files = sorted(out.iterdir())
    assert [f.name for f in files] == ["p1.pnm", "p2.pnm", "p3.pnm"], f"{files} ({run.returncode})\n{evidence}"
    # The batch is in colour: 1.2.1's escl asks for PNG from the feeder and cannot decode a
    # gray one. It also crops each later page of a batch again from the size it cropped the
    # first to (its "Real Size Image" shrinks page by page, while this server sends every page
    # of the job at the same size): so only the first page's size is checked, and that the
    # three pages are three different sheets (the pattern carries its page number).
    _, _, w, h = AREA_PX
    pages = [parse_pnm(path.read_bytes())[0] for path in files]
    assert all(image.magic == "P6" for image in pages), pages
    assert (pages[0].width, pages[0].height) == (w, h), pages[0]
    assert len({image.data for image in pages}) == 3, "the three pages are not three different sheets"
    assert await get_property(net.bus, SIM0, SIMULATOR, "PagesLoaded") == 0
    assert await net.pages_fed() == first + 3
    assert await net.data_mode_free() < 1.0
    assert_daemon_healthy(net.daemon)


# -- the protocol, with a plain HTTP client -------------------------------------------------------

@pytest.mark.parametrize("mode, fmt", [("RGB24", "image/png"), ("Grayscale8", "image/png"),
                                       ("BlackAndWhite1", "image/png"), ("RGB24", "image/jpeg"),
                                       ("Grayscale8", "image/jpeg"), ("RGB24", "application/pdf")])
async def test_a_platen_job_gives_one_page_then_404_and_lets_the_device_go(start_escl, mode, fmt):
    net = await start_escl(mdns=False)
    page = await net.pages_fed()
    job = await net.new_job(mode=mode, fmt=fmt)
    assert state_of(await net.get(f"{BASE}/ScannerStatus"))[0] == "Processing"
    await expect_error("Busy", create_session(net.bus, mode="data", wait_ms=Variant("u", 0)))
    r = await net.get(f"{job}/NextDocument")
    assert r.status == 200 and (r.header("Content-Type") or "").split(";")[0] == fmt, r
    # The last page is delivered: the device is free at once.
    assert await net.data_mode_free(wait_ms=2000) < 0.5
    w, h = AREA_PX[2:]
    sim_mode, depth = {"RGB24": ("color", 8), "Grayscale8": ("gray", 8), "BlackAndWhite1": ("lineart", 1)}[mode]
    await assert_device_got(net, "Flatbed", sim_mode, depth, AREA_PX)
    want = pattern(w, h, sim_mode, page, depth)
    if fmt == "application/pdf":
        import pypdf
        assert r.body.startswith(b"%PDF-"), r.body[:16]
        pdf = pypdf.PdfReader(io.BytesIO(r.body))
        assert len(pdf.pages) == 1
        width_pt = float(pdf.pages[0].mediabox.width)
        assert abs(width_pt - w / DPI * 72) < 1.0, f"page width {width_pt} pt for {w} pixels at {DPI} dpi"
    else:
        image = decode(r.body)
        assert image.size == (w, h), image
        if sim_mode == "lineart":
            assert image.mode in ("1", "L"), image.mode
            got = [p < 128 for p in image.convert("L").tobytes()]
            assert got == bits(want, w, h, one_is_black=True), "the 1-bit page is not the pattern"
        else:
            assert image.mode == ("RGB" if sim_mode == "color" else "L"), image.mode
            assert_same_image(image.tobytes(), want, fmt, f"page {page} ({mode}, {fmt})", (w, h))
    info = await net.get(f"{job}/ScanImageInfo")
    assert info.status == 200, info
    doc = ElementTree.fromstring(info.body)
    if fmt != "application/pdf":
        assert (local(doc, "ActualWidth"), local(doc, "ActualHeight")) == (str(w), str(h)), info.text
    assert_reason(await net.get(f"{job}/NextDocument"), 404)
    d = await net.http.arequest("DELETE", job)
    assert d.status in (200, 204, 404), d
    assert state_of(await net.get(f"{BASE}/ScannerStatus"))[0] == "Idle"
    assert_daemon_healthy(net.daemon)


async def test_jobs_under_the_device_base_path(start_escl):
    net = await start_escl(mdns=False)
    job = await net.new_job(base=f"{BASE}/sim0", mode="Grayscale8")
    r = await net.get(f"{job}/NextDocument")
    assert r.status == 200 and r.body.startswith(b"\x89PNG"), r
    assert (await net.http.arequest("DELETE", job)).status in (200, 204, 404)
    assert await net.data_mode_free() < 1.0
    assert_daemon_healthy(net.daemon)


@pytest.mark.parametrize("base", [BASE, f"{BASE}/sim0"])
async def test_next_document_right_after_the_last_page_is_404(start_escl, base):
    # A client may ask again as soon as it has the whole page (sane-airscan and the escl
    # backend both do): the answer is "no more pages", never "busy sending".
    net = await start_escl(mdns=False)
    for _ in range(10):
        job = await net.new_job(base=base, mode="Grayscale8")
        r = await net.get(f"{job}/NextDocument")
        assert r.status == 200, r
        assert_reason(await net.get(f"{job}/NextDocument"), 404)
        await net.http.arequest("DELETE", job)
    assert_daemon_healthy(net.daemon)


async def test_a_feeder_job_gives_each_loaded_page_then_404(start_escl):
    net = await start_escl(mdns=False)
    await call(net.bus, SIM0, SIMULATOR, "LoadPages", "u", [2])
    first = await net.pages_fed()
    job = await net.new_job(source="Feeder", mode="Grayscale8")
    w, h = AREA_PX[2:]
    for i in range(2):
        r = await net.get(f"{job}/NextDocument")
        assert r.status == 200, (i, r)
        assert_same_image(decode(r.body).tobytes(), pattern(w, h, "gray", first + i), "image/png", f"feeder page {i}",
                          (w, h))
    assert_reason(await net.get(f"{job}/NextDocument"), 404)
    assert (await net.http.arequest("DELETE", job)).status in (200, 204, 404)
    assert await net.data_mode_free(wait_ms=2000) < 0.5
    assert await get_property(net.bus, SIM0, SIMULATOR, "PagesLoaded") == 0
    assert_daemon_healthy(net.daemon)


BAD_SETTINGS = {
    "resolution not offered": scan_settings(resolution=123),
    "resolution zero": scan_settings(resolution=0),
    "unknown colour mode": scan_settings(mode="Sepia48"),
    "unknown format": scan_settings(fmt="image/gif"),
    "unknown source": scan_settings(source="Camera"),
    "region outside the bed": scan_settings(area=(0, 0, BED_300[0] + 600, 480)),
    "negative offset": scan_settings(area=(-30, 0, 300, 300)),
    "empty region": scan_settings(area=(0, 0, 0, 0)),
    "huge numbers": scan_settings(area=(0, 0, 10 ** 30, 10 ** 30), resolution=10 ** 30),
    "not numbers": scan_settings().replace("<pwg:Width>600</pwg:Width>", "<pwg:Width>wide</pwg:Width>"),
}


@pytest.mark.parametrize("case", list(BAD_SETTINGS))
async def test_bad_settings_are_refused_with_a_reason_and_take_nothing(start_escl, case):
    net = await start_escl(mdns=False)
    r = await net.post_job(BAD_SETTINGS[case])
    assert_reason(r, 400, 409)
    assert await net.data_mode_free() < 1.0
    assert state_of(await net.get(f"{BASE}/ScannerStatus"))[0] == "Idle"
    assert_daemon_healthy(net.daemon)


async def test_an_empty_feeder_is_refused_with_a_reason_and_takes_nothing(start_escl):
    # Refused at POST (409), or accepted and refused at the first NextDocument (409): both
    # are eSCL; either way the reason is given, the status says the feeder is empty, and
    # the device is free at once.
    net = await start_escl(mdns=False)
    r = await net.post_job(scan_settings(source="Feeder"))
    if r.status == 201:
        job = job_path(r)
        r = await net.get(f"{job}/NextDocument")
        await net.http.arequest("DELETE", job)
    assert_reason(r, 409)
    assert state_of(await net.get(f"{BASE}/ScannerStatus")) == ("Idle", "ScannerAdfEmpty")
    assert await net.data_mode_free() < 1.0
    assert_daemon_healthy(net.daemon)


# -- sharing the device with D-Bus clients ---------------------------------------------------------

async def test_dbus_data_holder_makes_post_scanjobs_busy_without_waiting(start_escl):
    net = await start_escl(mdns=False)
    holder = await create_session(net.bus, mode="data")
    r = await net.post_job(scan_settings())
    assert r.status == 503, r
    retry = r.header("Retry-After")
    assert retry is not None and retry.strip().isdigit() and int(retry) >= 1, f"Retry-After {retry!r}: {r}"
    assert r.t_done - r.t_sent < 1.0, f"the busy answer took {r.t_done - r.t_sent:.2f} s: POST must not wait"
    assert await net.device("DataModeHeld") is True  # the D-Bus holder kept it
    await call(net.bus, holder, SESSION, "Close")
    job = await net.new_job()
    assert (await net.get(f"{job}/NextDocument")).status == 200
    await net.http.arequest("DELETE", job)
    assert_daemon_healthy(net.daemon)


async def test_an_escl_job_makes_dbus_data_mode_busy_until_delete(start_escl):
    net = await start_escl(mdns=False)
    job = await net.new_job()
    assert await net.device("DataModeHeld") is True
    await expect_error("Busy", create_session(net.bus, mode="data", wait_ms=Variant("u", 0)))
    status = await create_session(net.bus, mode="status")  # status mode is never refused
    await call(net.bus, status, SESSION, "Close")
    # a second eSCL client is busy too
    second = await net.post_job(scan_settings(mode="Grayscale8"))
    assert second.status == 503 and second.header("Retry-After"), second
    d = await net.http.arequest("DELETE", job)
    assert d.status in (200, 204), d
    assert await net.data_mode_free(wait_ms=2000) < 0.5, "DELETE lets the device go at once"
    assert_reason(await net.get(f"{job}/NextDocument"), 404)
    assert state_of(await net.get(f"{BASE}/ScannerStatus"))[0] == "Idle"
    assert_daemon_healthy(net.daemon)


async def test_an_abandoned_job_lets_the_device_go_after_idle_ms(start_escl):
    idle = 0.6
    net = await start_escl(mdns=False, idle_ms=int(idle * 1000))
    r = await net.post_job(scan_settings())
    assert r.status == 201, r
    job = job_path(r)
    # the client never comes back; right after its POST the device is held
    await expect_error("Busy", create_session(net.bus, mode="data", wait_ms=Variant("u", 0)))
    session = await create_session(net.bus, mode="data", wait_ms=Variant("u", 10_000))
    freed = time.monotonic() - r.t_done
    try:
        assert idle * 0.9 <= freed <= idle + 1.0, f"data mode came free {freed:.2f} s after the POST (idle_ms {idle})"
        # the abandoned job is gone, and does not take the device back
        late = await net.get(f"{job}/NextDocument")
        assert_reason(late, 404, 410)
        assert await net.device("DataModeHeld") is True  # still ours
    finally:
        await call(net.bus, session, SESSION, "Close")
    # and the server serves the next client
    job = await net.new_job()
    assert (await net.get(f"{job}/NextDocument")).status == 200
    assert_daemon_healthy(net.daemon)


async def test_requests_for_a_job_keep_it_past_idle_ms(start_escl):
    # idle_ms counts from the job's last request: a client that keeps asking keeps the job.
    net = await start_escl(mdns=False, idle_ms=500)
    await call(net.bus, SIM0, SIMULATOR, "LoadPages", "u", [3])
    job = await net.new_job(source="Feeder", mode="Grayscale8")
    start = time.monotonic()
    for i in range(3):  # a page every ~0.3 s: past idle_ms in all, never idle that long
        r = await net.get(f"{job}/NextDocument")
        assert r.status == 200, r
        await asyncio.sleep(0.3)  # the client's pace (not synchronisation)
        if i < 2:  # pages are left: the job holds the device
            await expect_error("Busy", create_session(net.bus, mode="data", wait_ms=Variant("u", 0)))
    assert time.monotonic() - start > 0.5
    assert_reason(await net.get(f"{job}/NextDocument"), 404)
    await net.http.arequest("DELETE", job)
    assert await net.data_mode_free(wait_ms=2000) < 0.5
    assert_daemon_healthy(net.daemon)


# -- hostile requests ---------------------------------------------------------------------------

BILLION_LAUGHS = (
    '<?xml version="1.0"?>\n<!DOCTYPE lolz [\n <!ENTITY lol "lol">\n'
    + "".join(f' <!ENTITY lol{i} "{("&lol" + (str(i - 1) if i > 1 else "") + ";") * 10}">\n' for i in range(1, 10))
    + f']>\n<scan:ScanSettings xmlns:scan="{SCAN_NS}" xmlns:pwg="{PWG_NS}"><pwg:Version>&lol9;</pwg:Version>'
    "</scan:ScanSettings>")
QUADRATIC = (f'<?xml version="1.0"?><!DOCTYPE s [<!ENTITY a "{"x" * 20000}">]>'
             f'<scan:ScanSettings xmlns:scan="{SCAN_NS}" xmlns:pwg="{PWG_NS}"><pwg:Version>'
             + "&a;" * 10000 + "</pwg:Version></scan:ScanSettings>")
EXTERNAL = (f'<?xml version="1.0"?><!DOCTYPE s [<!ENTITY x SYSTEM "file:///etc/passwd">]>'
            f'<scan:ScanSettings xmlns:scan="{SCAN_NS}" xmlns:pwg="{PWG_NS}"><pwg:Version>&x;</pwg:Version>'
            "</scan:ScanSettings>")
PARAMETER_ENTITY = ('<?xml version="1.0"?><!DOCTYPE s [<!ENTITY % p SYSTEM "http://127.0.0.1:9/x.dtd"> %p;]>'
                    f'<scan:ScanSettings xmlns:scan="{SCAN_NS}"/>')
MALFORMED_BODIES = {
    "billion laughs": BILLION_LAUGHS,
    "quadratic blowup": QUADRATIC[:60000],
    "external entity": EXTERNAL,
    "parameter entity": PARAMETER_ENTITY,
    "not xml": "this is not xml",
    "empty": "",
    "truncated": scan_settings()[:200],
    "wrong root": f'<scan:ScannerStatus xmlns:scan="{SCAN_NS}"/>',
    "binary": bytes(range(256)) * 8,
    "utf-16 junk": "<\u00ff\ufffe>".encode("utf-16"),
    "deep nesting": "<a>" * 50000 + "</a>" * 50000,
}


@pytest.mark.parametrize("case", list(MALFORMED_BODIES))
async def test_malformed_scan_settings_get_400_with_a_reason(start_escl, case):
    net = await start_escl(mdns=False)
    rss = vm_rss_kib(net.daemon.proc.pid)
    body = MALFORMED_BODIES[case]
    r = await net.post_job(body if isinstance(body, bytes) else body.encode(), timeout=10)
    if len(body) > 65536:
        assert_reason(r, 413)
    else:
        assert_reason(r, 400, 415)
    assert r.t_done - r.t_sent < 2.0, f"{r.t_done - r.t_sent:.2f} s to refuse it"
    assert "root:" not in r.text, "an external entity was expanded"
    assert vm_rss_kib(net.daemon.proc.pid) - rss < 50_000, "the daemon's memory grew by more than 50 MB"
    assert await net.data_mode_free() < 1.0
    assert_daemon_healthy(net.daemon)


async def test_oversized_bodies_get_413(start_escl):
    net = await start_escl(mdns=False)
    big = b"<a>" + b"x" * (1 << 20) + b"</a>"
    r = await net.post_job(big, timeout=10)
    assert_reason(r, 413)
    r = await net.post_job(big, chunked=True, timeout=10)
    assert_reason(r, 413)
    # a Content-Length that claims too much is refused before any body is read
    r = await net.http.araw(b"POST /eSCL/ScanJobs HTTP/1.1\r\nHost: x\r\nContent-Type: text/xml\r\n"
                            b"Content-Length: 1073741824\r\n\r\n<a/>", timeout=5)
    assert_reason(r, 413)
    assert await net.data_mode_free() < 1.0
    net.daemon.stop()
    net.ns.stop()

    small = await start_escl(mdns=False, max_request_bytes=2048)
    body = scan_settings() + " " * 3000  # valid, but past the limit
    assert_reason(await small.post_job(body), 413)
    assert (await small.post_job(scan_settings())).status == 201  # under the limit: served
    assert_daemon_healthy(small.daemon)


UNKNOWN = [("GET", "/nope"), ("GET", "/static/../README.md"), ("GET", "/eSCL/Nope"), ("GET", "/eSCL/nosuchdevice/ScannerStatus"),
           ("GET", "/eSCL/ScanJobs/" + str(uuid.UUID(int=1)) + "/NextDocument"),
           ("GET", "/eSCL/ScanJobs/not-a-uuid/NextDocument"), ("GET", "/eSCL/ScanJobs/../../etc/passwd"),
           ("GET", "/eSCL/%2e%2e/%2e%2e/etc/passwd"), ("DELETE", "/eSCL/ScanJobs/" + str(uuid.UUID(int=2))),
           ("GET", "/eSCL/ScannerCapabilities/extra"), ("GET", "/eSCL/" + "a" * 5000)]
WRONG_METHOD = [("POST", "/eSCL/ScannerCapabilities"), ("PUT", "/eSCL/ScanJobs"), ("DELETE", "/eSCL/ScannerStatus"),
                ("PATCH", "/eSCL/ScannerStatus"), ("POST", "/eSCL/sim0/ScannerStatus")]
BAD_HTTP = {
    "garbage request line": b"BLAH\r\n\r\n",
    "bad version": b"GET /eSCL/ScannerStatus HTTP/7.3\r\nHost: x\r\n\r\n",
    "header without colon": b"GET /eSCL/ScannerStatus HTTP/1.1\r\nHost x\r\n\r\n",
    "bad content length": b"POST /eSCL/ScanJobs HTTP/1.1\r\nHost: x\r\nContent-Length: abc\r\n\r\n",
    "negative content length": b"POST /eSCL/ScanJobs HTTP/1.1\r\nHost: x\r\nContent-Length: -5\r\n\r\n",
    "two content lengths": (b"POST /eSCL/ScanJobs HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\n"
                            b"Content-Length: 4\r\n\r\nabcd"),
    "bad chunk": b"POST /eSCL/ScanJobs HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nabc\r\n0\r\n\r\n",
    "huge header": b"GET /eSCL/ScannerStatus HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 100_000 + b"\r\n\r\n",
    "many headers": (b"GET /eSCL/ScannerStatus HTTP/1.1\r\n" + b"".join(b"X-%d: y\r\n" % i for i in range(5000))
                     + b"\r\n"),
    "nul in path": b"GET /eSCL/Scanner\x00Status HTTP/1.1\r\nHost: x\r\n\r\n",
    "control chars": b"GET /eSCL/ScannerStatus HTTP/1.1\r\nHost: x\r\nX: a\x01b\r\n\r\n",
}


async def test_unknown_paths_wrong_methods_and_bad_http_get_4xx(start_escl):
    net = await start_escl(mdns=False)
    failures = []
    for method, path in UNKNOWN:
        r = await net.http.arequest(method, path)
        if not (r.status is not None and 400 <= r.status < 500 and r.text.strip()) or "root:" in r.text:
            failures.append(f"{method} {path[:60]}: {r}")
    for method, path in WRONG_METHOD:
        r = await net.http.arequest(method, path, body="<x/>" if method in ("POST", "PUT", "PATCH") else None)
        if r.status != 405 or not r.text.strip():
            failures.append(f"{method} {path}: expected 405 with a reason, got {r}")
    for case, data in BAD_HTTP.items():
        r = await net.http.araw(data, timeout=5)
        if not (r.status is not None and 400 <= r.status < 500 and r.text.strip()):
            failures.append(f"{case}: {r}")
        elif "Traceback" in r.text:
            failures.append(f"{case}: a traceback in the answer: {r}")
    assert not failures, "\n".join(failures)
    # a client that sends half a body and vanishes costs nothing
    await net.http.araw(b"POST /eSCL/ScanJobs HTTP/1.1\r\nHost: x\r\nContent-Length: 500\r\n\r\n<scan:",
                        close_after_send=True)
    assert state_of(await net.get(f"{BASE}/ScannerStatus"))[0] == "Idle"
    assert await net.data_mode_free() < 1.0
    assert_daemon_healthy(net.daemon)


# -- hypothesis: generated bodies and requests against one daemon ------------------------------------

@dataclass
class FuzzService:
    bus: DBusDaemon
    ns: NetNamespace
    daemon: Daemon
    http: HttpClient


@pytest.fixture(scope="module")
def fuzz_escl(tmp_path_factory: pytest.TempPathFactory) -> Any:
    folder = tmp_path_factory.mktemp("escl-fuzz")
    config = folder / "stillsvc.toml"
    config.write_text(escl_config(mdns=False))
    bus = DBusDaemon()
    ns = NetNamespace()
    ns.start()
    daemon = Daemon(bus.address, "--config", str(config), workdir=str(folder / "daemon"))
    daemon.args = ns.wrap(daemon.args)
    http = None
    try:
        asyncio.run(daemon.ready())
        deadline = time.monotonic() + 10
        while not listening(ns, PORT):
            assert daemon.proc.poll() is None and time.monotonic() < deadline, "the eSCL server did not start"
            time.sleep(0.01)  # polling a socket table with a deadline: there is no event for it
        http = HttpClient(ns.wrap, timeout=5)
        yield FuzzService(bus, ns, daemon, http)
    finally:
        if http is not None:
            http.close()
        daemon.stop()
        ns.stop()
        bus.stop()


_numbers = st.one_of(st.integers(-2 ** 70, 2 ** 70).map(str), st.sampled_from(
    ["0", "-1", "75", "600", "2551", "3508", "1e9", "NaN", "inf", "0x10", " 75 ", "", "7.5", "٣"]),
                     st.floats(allow_nan=True).map(str))
_names = st.sampled_from(
    ["pwg:Version", "scan:Intent", "pwg:ScanRegions", "pwg:ScanRegion", "pwg:ContentRegionUnits", "pwg:XOffset",
     "pwg:YOffset", "pwg:Width", "pwg:Height", "pwg:InputSource", "scan:ColorMode", "pwg:DocumentFormat",
     "scan:DocumentFormatExt", "scan:XResolution", "scan:YResolution", "scan:Duplex", "scan:Brightness",
     "scan:InputSource", "pwg:ColorMode", "scan:Foo", "x", "scan:ScanSettings"])
_values = st.one_of(_numbers, st.sampled_from(
    ["Platen", "Feeder", "Adf", "Camera", "RGB24", "Grayscale8", "BlackAndWhite1", "RGB48", "image/png",
     "image/jpeg", "application/pdf", "text/html", "escl:ThreeHundredthsOfInches", "true", "Document"]),
                    st.text(max_size=40))
_leaf = st.tuples(_names, _values).map(lambda nv: f"<{nv[0]}>{escape(nv[1])}</{nv[0]}>")
_children = st.recursive(_leaf, lambda inner: st.tuples(_names, st.lists(inner, max_size=6)).map(
    lambda nc: f"<{nc[0]}>{''.join(nc[1])}</{nc[0]}>"), max_leaves=30)


def escape(text: str) -> str:
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


@st.composite
def scan_bodies(draw: st.DrawFn) -> bytes:
    kind = draw(st.sampled_from(["tree", "mutated", "text", "bytes"]))
    if kind == "bytes":
        return draw(st.binary(max_size=3000))
    if kind == "text":
        return draw(st.text(max_size=3000)).encode("utf-8", "surrogatepass")
    if kind == "mutated":
        body = scan_settings(source=draw(st.sampled_from(["Platen", "Feeder", "Adf"])),
                             mode=draw(st.sampled_from(["RGB24", "Grayscale8", "BlackAndWhite1"])),
                             fmt=draw(st.sampled_from(["image/png", "image/jpeg", "application/pdf"])))
        for _ in range(draw(st.integers(1, 3))):
            op = draw(st.sampled_from(["value", "drop", "cut", "insert"]))
            tags = re.findall(r"<((?:pwg|scan):\w+)>([^<]*)</\1>", body)
            tag, old = draw(st.sampled_from(tags)) if tags else ("pwg:Version", "2.63")
            if op == "value":
                body = body.replace(f"<{tag}>{old}</{tag}>", f"<{tag}>{escape(draw(_values))}</{tag}>", 1)
            elif op == "drop":
                body = body.replace(f"<{tag}>{old}</{tag}>", "", 1)
            elif op == "cut":
                body = body[:draw(st.integers(0, len(body)))]
            else:
                at = body.find("</scan:ScanSettings>")
                body = body[:at] + draw(_children) + body[at:] if at >= 0 else body + draw(_children)
        return body.encode()
    declared = draw(st.booleans())
    ns = f' xmlns:scan="{SCAN_NS}" xmlns:pwg="{PWG_NS}"' if declared else ""
    inner = "".join(draw(st.lists(_children, max_size=8)))
    return f'<?xml version="1.0"?><scan:ScanSettings{ns}>{inner}</scan:ScanSettings>'.encode()


_content_types = st.sampled_from(["text/xml", "application/xml", "application/x-www-form-urlencoded",
                                  "text/xml; charset=utf-8", "image/png", "", "garbage/☃"])


@settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))
@given(body=scan_bodies(), content_type=_content_types, base=st.sampled_from([BASE, f"{BASE}/sim0"]))
def test_generated_scan_settings_get_an_answer_never_a_5xx(fuzz_escl: FuzzService, body: bytes, content_type: str,
                                                           base: str) -> None:
    headers = {"Content-Type": content_type} if content_type else {}
    try:
        headers = {k: v.encode("latin-1").decode("latin-1") for k, v in headers.items()}
    except UnicodeEncodeError:
        headers = {"Content-Type": "text/xml"}
    r = fuzz_escl.http.request("POST", f"{base}/ScanJobs", body=body, headers=headers)
    assert r.status is not None, f"no answer: {r.error} for {body[:300]!r}"
    if r.status == 201:  # the generator hit valid settings: give the device back
        job = job_path(r)
        d = fuzz_escl.http.request("DELETE", job)
        assert d.status in (200, 204), d
    else:
        assert_reason(r, 400, 409, 413, 415)
    assert r.t_done - r.t_sent < 3.0, f"{r.t_done - r.t_sent:.2f} s for {body[:200]!r}"
    status = fuzz_escl.http.request("GET", f"{BASE}/ScannerStatus")
    assert state_of(status)[0] == "Idle", f"the device is still held after {body[:300]!r}: {status}"
    assert fuzz_escl.daemon.proc.poll() is None, "the daemon exited"


_tokens = st.sampled_from(["GET", "POST", "DELETE", "PUT", "HEAD", "OPTIONS", "get", "G\x00T", "/eSCL/ScanJobs",
                           "/eSCL/ScannerStatus", "/eSCL/ScanJobs/x/NextDocument", "*", "//", "HTTP/1.1",
                           "HTTP/1.0", "HTTP/2", "HTTP/", " ", "\t", "%00", "?a=b", "#"])
_no_crlf = st.text(max_size=30).map(lambda t: t.replace("\r", "").replace("\n", ""))
_header_names = st.sampled_from(["Host", "Content-Type", "Connection", "Accept", "X", "Host ", " Host", "Hö",
                                 "Upgrade", "Range", "Cookie", ""])


_REQUEST_LINE_PARTS = (
    ["GET", "POST", "HEAD", "DELETE", "OPTIONS", "TRACE", "BREW"],
    ["/eSCL/ScannerStatus", "/eSCL/ScannerCapabilities", "/eSCL/ScanJobs", "/eSCL/sim0/ScannerStatus", "/", "*",
     "/eSCL/%zz", "/eSCL/\u00e9"],
    ["HTTP/1.1", "HTTP/1.0", "HTTP/1.2", "HTTP/0.9", "HTTP/11", "http/1.1"])


@st.composite
def raw_requests(draw: st.DrawFn) -> bytes:
    """A whole request head (line, headers, blank line) with no body and nothing that
    announces one: the server has all it will get and must answer."""
    if draw(st.booleans()):  # a request line of plausible parts, so the headers get parsed too
        line = " ".join(draw(st.sampled_from(parts)) for parts in _REQUEST_LINE_PARTS)
    else:
        line = "".join(draw(st.lists(st.one_of(_tokens, _no_crlf), min_size=1, max_size=6)))
    headers = draw(st.lists(st.tuples(_header_names, _no_crlf), max_size=6))
    text = line + "\r\n" + "".join(f"{k}: {v}\r\n" for k, v in headers) + "\r\n"
    return text.encode("utf-8", "surrogatepass")


@settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))
@given(data=raw_requests())
def test_generated_requests_get_an_answer_never_a_5xx(fuzz_escl: FuzzService, data: bytes) -> None:
    method = data.split(b" ", 1)[0].decode("latin-1")
    r = fuzz_escl.http.raw(data, timeout=5, method=method if method == "HEAD" else "GET")
    if r.status is None:
        # no answer is only fair when nothing came before the first CRLF (not a request at all)
        assert data.split(b"\r\n", 1)[0].strip() == b"", f"no answer ({r.error}) to {data[:300]!r}"
    else:
        assert r.status < 500, f"{r} for {data[:300]!r}"
        if r.status >= 400 and method != "HEAD":  # an answer to HEAD has no body
            assert_reason(r)
        if r.status == 201:  # a valid POST: not possible without a body, but give it back if so
            fuzz_escl.http.request("DELETE", job_path(r))
    assert fuzz_escl.daemon.proc.poll() is None, "the daemon exited"


def test_the_fuzzed_daemon_is_healthy(fuzz_escl: FuzzService) -> None:
    status = fuzz_escl.http.request("GET", f"{BASE}/ScannerStatus")
    assert state_of(status)[0] == "Idle", status
    assert_daemon_healthy(fuzz_escl.daemon)


# -- mDNS ----------------------------------------------------------------------------------------

async def test_mdns_announces_sim0_and_withdraws_it_on_unplug(start_escl):
    net = await start_escl()  # mdns defaults to true
    caps = xml_of(await net.get(f"{BASE}/sim0/ScannerCapabilities"), f"{{{SCAN_NS}}}ScannerCapabilities")
    (scanner_uuid,) = texts(caps, "scan:UUID")

    def is_sim0(e: dict[str, Any]) -> bool:
        return e["event"] in ("added", "updated") and e["name"].startswith(SCANNER_NAME) and "txt" in e

    async with Browser(net.ns) as browser:
        seen = await browser.wait(is_sim0, timeout=15, what=f"an _uscan._tcp service named {SCANNER_NAME!r}")
        name, txt = seen["name"], seen["txt"]
        assert name.endswith("._uscan._tcp.local."), name
        assert seen["port"] == PORT and "127.0.0.1" in seen["addresses"], seen
        missing = {"txtvers", "vers", "rs", "ty", "pdl", "cs", "is", "duplex", "UUID"} - set(txt)
        assert not missing, f"TXT lacks {missing}: {txt}"
        assert txt["txtvers"] == "1" and txt["vers"], txt
        assert txt["rs"] in ("eSCL/sim0", "eSCL"), txt["rs"]
        assert txt["ty"], txt
        assert {"image/jpeg", "image/png", "application/pdf"} <= set(txt["pdl"].split(",")), txt["pdl"]
        assert {"color", "grayscale", "binary"} <= set(txt["cs"].split(",")), txt["cs"]
        assert {"platen", "adf"} <= set(txt["is"].split(",")), txt["is"]
        assert txt["duplex"] == "F", txt
        assert txt["UUID"].lower().removeprefix("urn:uuid:") == scanner_uuid.lower().removeprefix("urn:uuid:"), txt
        # what the announcement points at is the device
        r = await net.get(f"/{txt['rs']}/ScannerCapabilities")
        assert texts(xml_of(r, f"{{{SCAN_NS}}}ScannerCapabilities"), "scan:UUID") == [scanner_uuid]

        mark = len(browser.events)
        await call(net.bus, SIM0, SIMULATOR, "Unplug")
        unplugged = time.monotonic()
        await browser.wait(lambda e: e["event"] == "removed" and e["name"] == name, timeout=10,
                           what=f"{name} withdrawn after Unplug", since=mark)
        print(f"withdrawn {time.monotonic() - unplugged:.2f} s after Unplug")
        gone = await net.get(f"{BASE}/sim0/ScannerCapabilities")
        assert gone.status in (404, 503), f"an unplugged device still answers: {gone}"

        mark = len(browser.events)
        await call(net.bus, SIM0, SIMULATOR, "Replug")
        back = await browser.wait(lambda e: is_sim0(e) and e["event"] == "added", timeout=15,
                                  what="sim0 announced again after Replug", since=mark)
        assert back["txt"]["UUID"] == txt["UUID"], "the device's UUID changed across a replug"
        assert back["txt"]["rs"] == txt["rs"]
    assert_daemon_healthy(net.daemon)


async def test_mdns_false_announces_nothing(start_escl):
    net = await start_escl(mdns=False)
    async with Browser(net.ns) as browser:
        # A registration is probed for ~1.7 s before it is announced: a server announcing would
        # be seen within 3 s (the positive test above measures it).
        try:
            await browser.wait(lambda e: e["event"] == "added", timeout=3, what="an announcement")
        except AssertionError as e:
            assert "not seen" in str(e), e
        else:
            raise AssertionError(f"mdns = false, yet something was announced: {browser.events}")
    assert_daemon_healthy(net.daemon)


# -- the daemon ---------------------------------------------------------------------------------

async def test_no_escl_table_no_server(bus_address, tmp_path):
    # Without [escl] nothing listens on 8090 (the server is off by default).
    ns = NetNamespace()
    ns.start()
    config = tmp_path / "no-escl.toml"
    config.write_text("[service]\nmax_sessions = 16\n")
    daemon = Daemon(bus_address, "--config", str(config), workdir=str(tmp_path / "plain"))
    daemon.args = ns.wrap(daemon.args)
    try:
        await daemon.ready()
        bus = await connect(bus_address)
        try:
            await call(bus, SIM0, SIMULATOR, "LoadPages", "u", [0])  # the daemon is up and serving
        finally:
            bus.disconnect()
        assert not listening(ns, PORT)
    finally:
        daemon.stop()
        ns.stop()
