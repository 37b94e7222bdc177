"""The scan page (``/`` and ``/api/…`` of the eSCL server) end to end, in headless
chromium driven by Playwright, against the real daemon (``--simulate``, ``[escl]`` with
``mdns = false``) in a private network namespace.

The browser runs inside the namespace (tests/web_env.py: Playwright's driver is
started there, and the browser is its child); the test drives it with Playwright's
async API from its own event loop, between D-Bus calls to the same daemon over the
private bus. Plain HTTP requests (the token and Origin checks) go through the helper
client of tests/escl_env.py, inside the namespace too.

What is checked is what a person sees: the DOM (with Playwright's auto-waiting
assertions, each with a deadline), the files the browser downloads (decoded with
Pillow and pypdf and compared with the simulator's pattern), and what the page
asked the server for (nothing from anywhere else, no polling: the device list is
fetched once and then follows the event stream). Nothing sleeps to synchronise.
"""

from __future__ import annotations

import asyncio
import io
import json
import os
import re
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from dbus_fast import Variant
from dbus_fast.aio import MessageBus
from escl_env import HttpClient, Response
from helpers import (
    REPO,
    SESSION,
    SIM0,
    SIMULATOR,
    Daemon,
    assert_daemon_healthy,
    call,
    connect,
    create_session,
    get_property,
    wait_until,
)
from netns import NetNamespace, serve_in_namespace
from netns import unavailable_reason as netns_unavailable_reason
from web_env import NamespacedBrowser
from web_env import unavailable_reason as browser_unavailable_reason

from stillsvc.drivers.sim.pattern import pattern_page
from stillsvc.imaging import ImageInfo

_why_not = browser_unavailable_reason() or netns_unavailable_reason()
if _why_not:
    pytest.skip(f"the scan page's tests need Playwright, chromium and a private network namespace: {_why_not}",
                allow_module_level=True)

from playwright.async_api import Locator, Page, expect  # noqa: E402

PORT = 8090
ORIGIN = f"http://127.0.0.1:{PORT}"
NAME = "Simulated Scanner"  # sim0's name
MODEL = "Simulated Flatbed + ADF"
#: Seconds for a DOM assertion: a state change comes through the event stream at once.
UI_TIMEOUT = 10.0
FILENAME = re.compile(r"^scan-\d{4}-\d{2}-\d{2}-\d{4}\.(pdf|png|jpg)$")
#: Where the test run keeps what a person may want to look at afterwards (STILLSVC_TEST_ARTEFACTS).
ARTEFACTS = Path(os.environ.get("STILLSVC_TEST_ARTEFACTS", str(REPO / "test-artefacts")))
#: An area exact at 75 dpi: 50.8 x 40.64 mm is 600 x 480 300ths of an inch, 150 x 120 pixels.
SMALL_MM = (50.8, 40.64)
SMALL_PX = (150, 120)

expect.set_options(timeout=UI_TIMEOUT * 1000)


# -- the setting --------------------------------------------------------------------------------

@dataclass
class Web:
    """The daemon serving the page in a namespace, the browser beside it, a D-Bus connection."""

    ns: NetNamespace
    daemon: Daemon
    bus: MessageBus
    http: HttpClient
    browser: Any
    folder: Path
    pages: list[Page] = field(default_factory=list)
    requests: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    failed: list[tuple[str, int]] = field(default_factory=list)

    async def open(self, **context: Any) -> Page:
        """A new browser context (its own viewport, downloads accepted) on the page at /."""
        ctx = await self.browser.new_context(accept_downloads=True, **context)
        ctx.set_default_timeout(UI_TIMEOUT * 1000)
        page = await ctx.new_page()
        page.on("request", lambda request: self.requests.append(request.url))
        page.on("response", lambda response: response.status >= 400 and self.failed.append(
            (response.url.removeprefix(ORIGIN), response.status)))
        # a refused request is logged as "Failed to load resource": those are in self.failed
        page.on("console", lambda msg: msg.type in ("error", "warning") and not msg.text.startswith(
            "Failed to load resource: the server responded with a status of") and self.problems.append(
            f"console {msg.type}: {msg.text}"))
        page.on("pageerror", lambda error: self.problems.append(f"page error: {error}"))
        self.pages.append(page)
        await page.goto(f"{ORIGIN}/")
        await expect(self.card(page)).to_be_visible()
        return page

    @staticmethod
    def card(page: Page, device: str = "sim0") -> Locator:
        return page.locator(f'article[data-device="{device}"]')

    def assert_clean(self, *refused: tuple[str, int]) -> None:
        """The page fetched nothing from elsewhere, logged no error (a CSP refusal, a
        script error) and had no request refused but the ``refused`` (path, status) ones."""
        foreign = [url for url in self.requests if not url.startswith(f"{ORIGIN}/")
                   and not url.startswith(("blob:", "data:"))]
        assert not foreign, f"the page fetched from elsewhere: {foreign}"
        assert not self.problems, "\n".join(self.problems)
        assert sorted(self.failed) == sorted(refused), f"requests refused: {self.failed}, expected {list(refused)}"

    def api_requests(self, path: str) -> list[str]:
        return [url for url in self.requests if url.split("?")[0] == f"{ORIGIN}{path}"]

    # D-Bus side
    async def pages_fed(self) -> int:
        return await get_property(self.bus, SIM0, SIMULATOR, "PagesFed")

    async def load_pages(self, count: int) -> None:
        await call(self.bus, SIM0, SIMULATOR, "LoadPages", "u", [count])

    async def assert_device_free(self) -> None:
        """Data mode can be had at once over D-Bus (and is given back)."""
        session = await create_session(self.bus, mode="data", wait_ms=Variant("u", 0))
        await call(self.bus, session, SESSION, "Close")

    # HTTP side
    async def get_json(self, path: str) -> Any:
        r = await self.http.arequest("GET", path)
        assert r.status == 200, r
        return json.loads(r.body)

    async def post(self, path: str, body: Any, headers: dict[str, str] | None = None) -> Response:
        return await self.http.arequest("POST", path, body=json.dumps(body),
                                        headers={"Content-Type": "application/json", **(headers or {})})


@pytest.fixture
async def web(request: pytest.FixtureRequest, bus_address: str, tmp_path: Path) -> AsyncIterator[Web]:
    cleanup: list[Any] = []

    async def unwind() -> None:
        errors = []
        for step in reversed(cleanup):  # every step, even after one failed: no process is left behind
            try:
                result = step()
                if asyncio.iscoroutine(result):
                    await result
            except Exception as e:  # noqa: BLE001 - raised below
                errors.append(e)
        if errors:
            raise errors[0]

    try:
        config = tmp_path / "stillsvc.toml"
        config.write_text("[escl]\nmdns = false\n")
        ns, daemon, bus = await serve_in_namespace(request, bus_address, config, tmp_path / "daemon", PORT, cleanup)
        http = HttpClient(ns.wrap)
        cleanup.append(http.close)
        browser = NamespacedBrowser(ns.path, tmp_path / "browser")
        cleanup.append(browser.stop)
        web = Web(ns, daemon, bus, http, await browser.start(), tmp_path)
    except BaseException:
        await unwind()
        raise
    try:
        yield web
        assert_daemon_healthy(daemon)
    finally:
        await unwind()


# -- the page's controls -------------------------------------------------------------------------

def control(card: Locator, label: str) -> Locator:
    return card.get_by_label(label, exact=True)


def state_of(card: Locator) -> Locator:
    return card.locator('[data-part="state"]')


def scan_button(card: Locator) -> Locator:
    return card.get_by_role("button", name="Scan", exact=True)


def status_of(card: Locator) -> Locator:
    return card.get_by_role("status")


async def choose(card: Locator, source: str = "flatbed", mode: str = "color", resolution: int = 75,
                 fmt: str = "png", area: str = "custom", size_mm: tuple[float, float] = SMALL_MM) -> None:
    """Settings chosen as a person would, with the form's own controls."""
    await control(card, "Source").select_option(source)
    await control(card, "Colour mode").select_option(mode)
    await control(card, "Resolution").select_option(str(resolution))
    await control(card, "Format").select_option(fmt)
    await control(card, "Area").select_option(area)
    if area == "custom":
        await control(card, "Width (mm)").fill(str(size_mm[0]))
        await control(card, "Height (mm)").fill(str(size_mm[1]))


async def options(select: Locator) -> list[str]:
    return await select.evaluate("s => Array.from(s.options, o => o.value)")


def holder_pattern(prefix: str, bus: MessageBus) -> re.Pattern[str]:
    """"<prefix> D-Bus client :1.N (pid …)" for this connection (and nothing after a
    different client's name)."""
    return re.compile(rf"^{re.escape(prefix)}D-Bus client {re.escape(bus.unique_name)}( \(.*\))?$")


async def saved(download: Any, folder: Path) -> bytes:
    path = folder / download.suggested_filename
    await download.save_as(path)
    return path.read_bytes()


def decode(body: bytes) -> Any:
    from PIL import Image
    image = Image.open(io.BytesIO(body))
    image.load()
    return image


# -- tests -----------------------------------------------------------------------------------------

async def test_the_page_lists_sim0_and_its_state_follows_dbus_data_mode_live(web: Web):
    page = await web.open()
    card = web.card(page)
    await expect(card.get_by_role("heading", name=NAME)).to_be_visible()
    await expect(card).to_contain_text(MODEL)
    await expect(state_of(card)).to_have_text("ready")
    await expect(page.locator("#connection")).to_have_text("Live")
    fetched = len(web.api_requests("/api/devices"))

    # a D-Bus client takes data mode: the page says so, from the event stream
    session = await create_session(web.bus, mode="data")
    await expect(state_of(card)).to_have_text(holder_pattern("scanning for ", web.bus))
    # a second one waits in line: the count of waiters shows
    other = await connect(web.daemon.address)
    try:
        waiting = asyncio.ensure_future(create_session(other, mode="data", wait_ms=Variant("u", 20000)))
        await expect(state_of(card)).to_have_text(re.compile(r"^scanning for D-Bus client .* · 1 waiting$"))
        await call(web.bus, session, SESSION, "Close")
        # the waiter has it now, and nobody waits
        second = await asyncio.wait_for(waiting, 10)
        await expect(state_of(card)).to_have_text(holder_pattern("scanning for ", other))
        await call(other, second, SESSION, "Close")
    finally:
        other.disconnect()
    await expect(state_of(card)).to_have_text("ready")

    # live, never polled: the list was fetched once, the events stream opened once
    assert len(web.api_requests("/api/devices")) == fetched, web.requests
    assert len(web.api_requests("/api/events")) == 1, web.requests
    web.assert_clean()


async def test_the_form_offers_only_the_devices_own_values(web: Web):
    devices = await web.get_json("/api/devices")
    (sim0,) = [d for d in devices["devices"] if d["id"] == "sim0"]
    page = await web.open()
    card = web.card(page)
    source_select = control(card, "Source")
    assert await options(source_select) == [s["value"] for s in sim0["sources"]]
    assert {"flatbed", "feeder"} <= {s["value"] for s in sim0["sources"]}, sim0["sources"]
    for source in sim0["sources"]:
        await source_select.select_option(source["value"])
        assert await options(control(card, "Colour mode")) == source["modes"]
        assert await options(control(card, "Resolution")) == [str(r) for r in source["resolutions"]]
        formats = await options(control(card, "Format"))
        assert formats == (["pdf"] if source["feeder"] else sim0["formats"]), (source, formats)
        areas = await options(control(card, "Area"))
        assert areas[0] == "bed" and areas[-1] == "custom", areas
        await control(card, "Area").select_option("custom")
        for label, limit in (("Width (mm)", source["max_width_mm"]), ("Height (mm)", source["max_height_mm"])):
            box = control(card, label)
            await expect(box).to_be_visible()
            assert float(await box.get_attribute("max")) == limit
            assert float(await box.input_value()) <= limit
        # a size beyond the bed is refused by the form itself, before any request
        await control(card, "Width (mm)").fill(str(source["max_width_mm"] + 10))
        posts = len(web.api_requests("/api/scan"))
        await scan_button(card).click()
        assert await control(card, "Width (mm)").evaluate("i => !i.validity.valid")
        assert len(web.api_requests("/api/scan")) == posts
        await control(card, "Width (mm)").fill(str(source["max_width_mm"]))
        await control(card, "Area").select_option("bed")
        await expect(control(card, "Width (mm)")).to_be_hidden()
    web.assert_clean()


async def test_a_flatbed_scan_to_png_is_downloaded_with_every_step_shown(web: Web):
    page = await web.open()
    card = web.card(page)
    await choose(card, "flatbed", "color", 75, "png", "custom", SMALL_MM)
    page_number = await web.pages_fed()
    async with page.expect_download() as info:
        await scan_button(card).click()
    download = await info.value
    assert FILENAME.match(download.suggested_filename) and download.suggested_filename.endswith(".png"), \
        download.suggested_filename
    image = decode(await saved(download, web.folder))
    assert image.format == "PNG" and image.mode == "RGB" and image.size == SMALL_PX, (image.format, image.mode,
                                                                                      image.size)
    expected = pattern_page(ImageInfo(*SMALL_PX, "color", 8, 75), page_number)
    assert image.tobytes() == expected, "the downloaded PNG is not the simulator's pattern of this page"

    # left visible: the link with the API's file name, the bar full, one preview, the words
    link = card.get_by_role("link", name=f"Download {download.suggested_filename}")
    await expect(link).to_be_visible()
    assert await link.get_attribute("download") == download.suggested_filename
    assert re.fullmatch(r"/api/jobs/[^/]+/result", await link.get_attribute("href") or "")
    await expect(card.locator("progress")).to_have_js_property("value", 100)
    await expect(status_of(card)).to_contain_text("Done: 1 page")
    preview = card.get_by_role("img", name="Preview of page 1")
    await expect(preview).to_be_visible()
    await expect(preview).to_have_js_property("complete", True)
    assert await preview.evaluate("i => i.naturalWidth") > 0
    await expect(scan_button(card)).to_be_enabled()
    await expect(card.get_by_role("button", name="Cancel")).to_be_hidden()
    await expect(state_of(card)).to_have_text("ready")
    # The page as a user sees it after a scan, kept as an artefact of the run.
    ARTEFACTS.mkdir(parents=True, exist_ok=True)
    shot = ARTEFACTS / "scan-page.png"
    await page.screenshot(path=str(shot), full_page=True)
    assert decode(shot.read_bytes()).size[0] > 0
    print(f"screenshot of the scan page: {shot}")
    await web.assert_device_free()
    web.assert_clean()


async def test_a_feeder_scan_to_pdf_has_every_loaded_page(web: Web):
    from pypdf import PdfReader

    await web.load_pages(3)
    fed = await web.pages_fed()
    page = await web.open()
    card = web.card(page)
    await control(card, "Source").select_option("feeder")
    assert await options(control(card, "Format")) == ["pdf"]
    await control(card, "Colour mode").select_option("gray")
    await control(card, "Resolution").select_option("75")
    await control(card, "Area").select_option("a5")
    async with page.expect_download() as info:
        await scan_button(card).click()
    download = await info.value
    assert FILENAME.match(download.suggested_filename) and download.suggested_filename.endswith(".pdf"), \
        download.suggested_filename
    body = await saved(download, web.folder)
    assert body.startswith(b"%PDF-"), body[:40]
    reader = PdfReader(io.BytesIO(body))
    assert len(reader.pages) == 3, f"{len(reader.pages)} pages in the PDF, 3 were loaded"
    for number, pdf_page in enumerate(reader.pages, 1):
        width_mm = float(pdf_page.mediabox.width) / 72 * 25.4
        height_mm = float(pdf_page.mediabox.height) / 72 * 25.4
        # A5 at 75 dpi, whole pixels: within a pixel (0.34 mm) of 148 x 210 mm
        assert abs(width_mm - 148) < 0.7 and abs(height_mm - 210) < 0.7, (number, width_mm, height_mm)
    assert await web.pages_fed() == fed + 3
    for n in (1, 2, 3):
        await expect(card.get_by_role("img", name=f"Preview of page {n}")).to_be_visible()
    await expect(status_of(card)).to_contain_text("Done: 3 pages")
    await expect(card.get_by_role("link", name=f"Download {download.suggested_filename}")).to_be_visible()
    await expect(state_of(card)).to_have_text("ready")
    web.assert_clean()


async def test_cancel_during_a_slow_scan_ends_cancelled_and_frees_the_device(web: Web):
    # A slow job: a batch of whole-bed colour pages at the highest resolution (5102 x 7015
    # pixels, 107 MB each before PDF). One such page alone takes about a second here (too
    # short to be sure the click lands while it runs); the batch takes half a minute.
    loaded = 30
    await web.load_pages(loaded)
    page = await web.open()
    card = web.card(page)
    downloads: list[Any] = []
    page.on("download", lambda download: downloads.append(download))
    await control(card, "Source").select_option("feeder")
    await control(card, "Colour mode").select_option("color")
    await control(card, "Resolution").select_option("600")
    await control(card, "Area").select_option("bed")
    await scan_button(card).click()
    cancel = card.get_by_role("button", name="Cancel")
    await expect(cancel).to_be_visible()
    await expect(card.locator('[data-part="progressText"]')).to_have_text(re.compile(r"^Page \d+ · \d+ %"))
    # the page's own job holds the device, and says so
    await expect(state_of(card)).to_have_text(re.compile(r"^scanning for web page .*127\.0\.0\.1"))
    await expect(scan_button(card)).to_be_disabled()
    await cancel.click()
    await expect(status_of(card)).to_have_text("The scan was cancelled.")
    await expect(card.locator('[data-part="progressText"]')).to_have_text(re.compile(r"^Cancelled"))
    await expect(cancel).to_be_hidden()
    await expect(scan_button(card)).to_be_enabled()
    await expect(state_of(card)).to_have_text("ready")
    await web.assert_device_free()
    left = await get_property(web.bus, SIM0, SIMULATOR, "PagesLoaded")
    assert 0 < left < loaded, f"{left} of {loaded} pages left in the feeder: the batch was not stopped midway"
    assert not downloads, "a cancelled scan downloaded a file"
    await expect(card.get_by_role("link", name=re.compile("^Download"))).to_be_hidden()
    # and the service says so too
    jobs = [url for url in web.requests if re.search(r"/api/jobs/[^/]+/cancel$", url)]
    assert len(jobs) == 1, jobs
    job = await web.get_json(jobs[0].removeprefix(ORIGIN).removesuffix("/cancel"))
    assert job["state"] == "cancelled", job
    web.assert_clean()


async def test_a_busy_scanner_names_its_holder_and_wait_in_line_scans_when_free(web: Web):
    page = await web.open()
    card = web.card(page)
    await choose(card, "flatbed", "gray", 75, "png", "custom", SMALL_MM)
    session = await create_session(web.bus, mode="data")
    await expect(state_of(card)).to_have_text(holder_pattern("scanning for ", web.bus))
    async with page.expect_response(f"{ORIGIN}/api/scan") as answer:
        await scan_button(card).click()
    refusal = await (await answer.value).json()
    assert (await answer.value).status == 503, refusal
    assert web.bus.unique_name in refusal["error"] and web.bus.unique_name in refusal.get("holder", ""), refusal
    # the API's message, in words, naming who has the device
    message = card.get_by_role("alert")
    await expect(message).to_have_text(refusal["error"])
    wait = card.get_by_role("button", name="Wait in line")
    await expect(wait).to_be_visible()
    await wait.click()
    await expect(status_of(card)).to_contain_text("Waiting in line")
    await expect(state_of(card)).to_have_text(re.compile(r"· 1 waiting$"))
    await expect(message).to_be_hidden()
    page_number = await web.pages_fed()
    async with page.expect_download() as info:
        await call(web.bus, session, SESSION, "Close")  # the device is free: the page's job goes next
    download = await info.value
    image = decode(await saved(download, web.folder))
    assert image.mode == "L" and image.size == SMALL_PX, (image.mode, image.size)
    assert image.tobytes() == pattern_page(ImageInfo(*SMALL_PX, "gray", 8, 75), page_number)
    await expect(state_of(card)).to_have_text("ready")
    web.assert_clean(("/api/scan", 503))


async def test_an_error_of_the_service_is_shown_in_words(web: Web):
    # the feeder is empty: the service refuses the job (or fails it), and says why
    assert await get_property(web.bus, SIM0, SIMULATOR, "PagesLoaded") == 0
    page = await web.open()
    card = web.card(page)
    downloads: list[Any] = []
    page.on("download", lambda download: downloads.append(download))
    await control(card, "Source").select_option("feeder")
    await control(card, "Resolution").select_option("75")
    await scan_button(card).click()
    await expect(card.get_by_role("alert")).to_have_text(re.compile(r"feeder is empty", re.IGNORECASE))
    await expect(scan_button(card)).to_be_enabled()
    await expect(card.get_by_role("button", name="Cancel")).to_be_hidden()
    await expect(state_of(card)).to_have_text("ready")
    await web.assert_device_free()
    assert not downloads
    # refused at once (409) or failed as a job: either way nothing else was refused
    web.assert_clean(*[(path, status) for path, status in web.failed if path == "/api/scan" and status == 409])


async def test_posts_without_the_token_or_from_another_site_are_refused(web: Web):
    devices = await web.get_json("/api/devices")
    token = devices["token"]
    assert isinstance(token, str) and len(token) >= 16, devices
    body = {"device": "sim0", "source": "flatbed", "mode": "gray", "resolution": 75, "format": "png",
            "area": {"x": 0, "y": 0, "width": SMALL_MM[0], "height": SMALL_MM[1]}, "wait": False}
    refused = {
        "no token": await web.post("/api/scan", body),
        "a wrong token": await web.post("/api/scan", body, {"X-Stillsvc-Token": token[::-1]}),
        "another site's Origin": await web.post("/api/scan", body, {"X-Stillsvc-Token": token,
                                                                     "Origin": "http://evil.example"}),
        "another port's Origin": await web.post("/api/scan", body, {"X-Stillsvc-Token": token,
                                                                     "Origin": "http://127.0.0.1:8091"}),
        "cancel without a token": await web.post("/api/jobs/0/cancel", {}),
    }
    for what, r in refused.items():
        assert r.status == 403, f"{what}: {r}"
        error = json.loads(r.body).get("error")
        assert isinstance(error, str) and error, f"{what}: {r}"
    await web.assert_device_free()  # nothing was taken

    # the same request with the token (and this server's Origin) is taken: 201, then cancelled
    r = await web.post("/api/scan", body, {"X-Stillsvc-Token": token, "Origin": ORIGIN})
    assert r.status == 201, r
    created = json.loads(r.body)
    job_id = created.get("id") or created.get("job")
    assert job_id, created
    cancel = await web.post(f"/api/jobs/{job_id}/cancel", {}, {"Origin": "http://evil.example",
                                                                "X-Stillsvc-Token": token})
    assert cancel.status == 403, cancel

    async def ended() -> dict[str, Any] | None:
        job = await web.get_json(f"/api/jobs/{job_id}")
        return job if job["state"] not in ("waiting", "scanning") else None

    job = await wait_until(ended, timeout=UI_TIMEOUT, what=f"the end of job {job_id}")
    assert job["state"] == "done", job
    # the API: 201 {"job": id, ...the job's fields}
    assert created.get("job") == job_id == created.get("id"), f"the 201 names its job as 'job' and 'id': {created}"


async def test_the_page_fits_a_phone_screen(web: Web):
    page = await web.open(viewport={"width": 390, "height": 844}, device_scale_factor=3, is_mobile=True,
                          has_touch=True)
    card = web.card(page)
    await control(card, "Area").select_option("custom")  # every field shown
    widths = await page.evaluate("() => [document.documentElement.scrollWidth, document.documentElement.clientWidth]")
    assert widths[0] <= widths[1] <= 390, f"the page scrolls sideways: {widths}"
    controls = [control(card, label) for label in ("Source", "Colour mode", "Resolution", "Format", "Area",
                                                   "Width (mm)", "Height (mm)")] + [scan_button(card)]
    lefts = []
    for box_of in controls:
        await box_of.scroll_into_view_if_needed()
        await expect(box_of).to_be_visible()
        box = await box_of.bounding_box()
        assert box is not None and box["x"] >= 0 and box["x"] + box["width"] <= 390, (await box_of.evaluate(
            "e => e.outerHTML.slice(0, 80)"), box)
        assert box["height"] >= 40, f"a control smaller than a finger: {box}"
        lefts.append(round(box["x"]))
    # one column: the selects one above the other
    selects = lefts[:5]
    assert len(set(selects)) == 1, f"the fields are not in one column on a phone: x = {selects}"
    # nothing sideways after a scan either (the long holder, the file name, the preview)
    await choose(card, "flatbed", "color", 75, "png", "custom", SMALL_MM)
    async with page.expect_download():
        await scan_button(card).tap()
    await expect(card.get_by_role("img", name="Preview of page 1")).to_be_visible()
    widths = await page.evaluate("() => [document.documentElement.scrollWidth, document.documentElement.clientWidth]")
    assert widths[0] <= widths[1], f"the page scrolls sideways after a scan: {widths}"
    web.assert_clean()


async def test_tab_reaches_the_scan_button_and_enter_starts_the_scan(web: Web):
    page = await web.open()
    card = web.card(page)
    # the first Tab from the top is the skip link
    await page.keyboard.press("Tab")
    assert await page.evaluate("() => document.activeElement.className") == "skip-link"
    await choose(card, "flatbed", "color", 75, "png", "custom", SMALL_MM)
    # from the heading on, with the keyboard only
    await page.get_by_role("heading", name="Scanners", exact=True).click()
    stops = []
    for _ in range(20):
        await page.keyboard.press("Tab")
        focused = await page.evaluate("""() => {
            const e = document.activeElement;
            const style = getComputedStyle(e);
            return {tag: e.tagName, text: e.textContent.trim(), id: e.id,
                    label: e.labels && e.labels.length ? e.labels[0].textContent.trim() : null,
                    outline: style.outlineStyle, outlineWidth: parseFloat(style.outlineWidth)};
        }""")
        stops.append(focused)
        assert focused["outline"] != "none" and focused["outlineWidth"] >= 2, f"focus not visible: {focused}"
        if focused["tag"] == "BUTTON" and focused["text"] == "Scan":
            break
        assert focused["label"], f"a control without a label: {focused}"
    else:
        raise AssertionError(f"Tab never reached the Scan button: {stops}")
    labels = [s["label"] for s in stops[:-1]]
    assert labels[:5] == ["Source", "Colour mode", "Resolution", "Format", "Area"], labels
    page_number = await web.pages_fed()
    async with page.expect_download() as info:
        await page.keyboard.press("Enter")
    image = decode(await saved(await info.value, web.folder))
    assert image.size == SMALL_PX and image.tobytes() == pattern_page(ImageInfo(*SMALL_PX, "color", 8, 75),
                                                                      page_number)
    web.assert_clean()
