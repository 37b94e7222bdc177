#!/usr/bin/env python3
"""The scan page at ``/`` of the eSCL server, in headless chromium: what its first load
weighs, and how long pressing Scan takes to show the first page, against the same
page over D-Bus in the same run.

    sudo python3 bench/web.py [--rounds N] [--warmup W] [--json]

Needs root (a private network namespace), Playwright for Python and the distribution's
chromium, as tests/test_web.py does, whose helpers it reuses: ``NetNamespace``
(tests/netns.py) holds a namespace with ``lo`` up, the daemon (``stillsvc --simulate``
on a private bus, ``[escl]`` with mDNS off, log level info) runs inside it, and
``NamespacedBrowser`` (tests/web_env.py) starts Playwright's driver, and so chromium,
there. The D-Bus side goes through the client library on the same private bus.

1. **Page weight.** A fresh browser context opens ``/``; every response (but the
   ``/api/events`` stream, which never ends) is awaited to its end and its transferred
   bytes summed: ``request.sizes()``'s response headers + body. A ``blob:`` response
   (the icon app.js makes itself) is listed with 0 bytes: nothing crosses the network. Target < 100 KB
   (100,000 bytes). The list of resources is printed.
2. **Scan to first preview.** sim0's flatbed, colour, 150 dpi, whole bed, PNG, chosen
   with the form's controls. Timed from the click on Scan to the ``img`` "Preview of
   page 1" visible and loaded (``complete`` and a natural width): the Python side's
   wall clock around Playwright's ``click`` and auto-waiting assertion, and the page's
   own clock (``performance.now()`` in a capturing click listener on the button and
   in a capturing ``load`` listener for the preview). Each run waits for the job's end
   (the download) and the device free before the next.
   Against, interleaved web, D-Bus, web, D-Bus, …: ``Item.transfer(fd, "png")``
   through the client library into a pipe (bench/transfer.py's ``transfer_once``), on a
   ``data`` session opened and set to 150 dpi colour (whole bed, the default area)
   before: from the transfer call to the first byte and to end of file; also from
   ``open_session`` to end of file, as the page's POST does that work too.
   Medians of ``--rounds`` (5) after ``--warmup`` (1) untimed of each; ratios of the
   medians.

Every wait has a deadline, the whole run a budget (``--budget``, 300 s); everything
started is stopped at the end, in reverse order.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import re
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
for _p in (REPO, REPO / "tests", REPO / "bench"):
    if str(_p) not in sys.path:
        sys.path.insert(0, str(_p))

from helpers import Daemon, DBusDaemon, wait_until  # noqa: E402
from netns import NetNamespace, listening  # noqa: E402
from netns import unavailable_reason as netns_unavailable_reason  # noqa: E402
from transfer import configure, open_flatbed, transfer_once  # noqa: E402
from web_env import NamespacedBrowser  # noqa: E402
from web_env import unavailable_reason as browser_unavailable_reason  # noqa: E402

from stillsvc.client import Client  # noqa: E402

PORT = 8090
ORIGIN = f"http://127.0.0.1:{PORT}"
DEVICE = "sim0"
RESOLUTION = 150
MODE = "color"
WEIGHT_TARGET = 100_000
UI_TIMEOUT = 30.0  # seconds for one browser step
START_TIMEOUT = 15.0

clock = time.perf_counter

#: Installed before each click: the page's own clock at the click and at the preview's load.
MARKS = """card => {
    const marks = window.__benchMarks = {};
    const button = card.querySelector('button[data-part="scan"]') ||
        Array.from(card.querySelectorAll("button")).find(b => b.textContent.trim() === "Scan");
    button.addEventListener("click", () => { marks.click = performance.now(); }, {capture: true, once: true});
    const onLoad = event => {
        const t = event.target;
        if (t.tagName === "IMG" && t.alt === "Preview of page 1" && marks.click !== undefined) {
            marks.loaded = performance.now();
            document.removeEventListener("load", onLoad, true);
        }
    };
    document.addEventListener("load", onLoad, true);
}"""


# -- the page's weight ------------------------------------------------------------------------------

async def page_weight(browser: Any) -> dict[str, Any]:
    from playwright.async_api import expect

    context = await browser.new_context()
    try:
        page = await context.new_page()
        responses: list[Any] = []
        page.on("response", lambda response: responses.append(response))
        await page.goto(f"{ORIGIN}/", timeout=UI_TIMEOUT * 1000)
        await expect(page.locator(f'article[data-device="{DEVICE}"]')).to_be_visible(timeout=UI_TIMEOUT * 1000)
        await expect(page.locator("#connection")).to_have_text("Live", timeout=UI_TIMEOUT * 1000)
        resources = []
        for response in responses:
            path = response.url.removeprefix(ORIGIN)
            if path.split("?")[0] == "/api/events":
                continue
            if not response.url.startswith(("http:", "https:")):
                # blob: and data: (the page's icon, made by app.js): nothing crosses the network
                resources.append({"path": path[:40], "status": response.status, "type": "local",
                                  "headers_bytes": 0, "body_bytes": 0, "bytes": 0})
                continue
            await asyncio.wait_for(response.finished(), UI_TIMEOUT)
            sizes = await response.request.sizes()
            resources.append({"path": path, "status": response.status,
                              "type": response.request.resource_type,
                              "headers_bytes": sizes["responseHeadersSize"], "body_bytes": sizes["responseBodySize"],
                              "bytes": sizes["responseHeadersSize"] + sizes["responseBodySize"]})
        total = sum(r["bytes"] for r in resources)
        return {"resources": resources, "total_bytes": total, "target_bytes": WEIGHT_TARGET,
                "met": total < WEIGHT_TARGET,
                "events_stream_opened": any(r.url.removeprefix(ORIGIN).startswith("/api/events") for r in responses)}
    finally:
        await context.close()


# -- one scan from the page, one over D-Bus ---------------------------------------------------------

async def open_scan_page(browser: Any) -> tuple[Any, Any, list[Any]]:
    from playwright.async_api import expect

    context = await browser.new_context(accept_downloads=True)
    context.set_default_timeout(UI_TIMEOUT * 1000)
    page = await context.new_page()
    downloads: list[Any] = []
    page.on("download", lambda download: downloads.append(download))
    await page.goto(f"{ORIGIN}/")
    card = page.locator(f'article[data-device="{DEVICE}"]')
    await expect(card).to_be_visible()
    await expect(page.locator("#connection")).to_have_text("Live")
    for label, value in (("Source", "flatbed"), ("Colour mode", MODE), ("Resolution", str(RESOLUTION)),
                         ("Format", "png"), ("Area", "bed")):
        await card.get_by_label(label, exact=True).select_option(value)
    return context, card, downloads


async def web_scan(card: Any, downloads: list[Any]) -> dict[str, Any]:
    from playwright.async_api import expect

    before = len(downloads)
    await expect(card.locator('[data-part="state"]')).to_have_text("ready")
    await card.evaluate(MARKS)
    preview = card.get_by_role("img", name="Preview of page 1")
    t0 = clock()
    await card.get_by_role("button", name="Scan", exact=True).click()
    await expect(preview).to_be_visible()
    await expect(preview).to_have_js_property("complete", True)
    seen = clock() - t0
    width = await preview.evaluate("i => i.naturalWidth")
    if not width:
        raise RuntimeError("the preview of page 1 has no pixels")
    marks = await card.evaluate("() => window.__benchMarks")
    # the job's end: its download, and the device free again
    await wait_until(lambda: len(downloads) > before, timeout=UI_TIMEOUT, what="the scan's download")
    await expect(card.locator('[data-part="state"]')).to_have_text("ready")
    in_page = (marks["loaded"] - marks["click"]) / 1000 if "loaded" in marks and "click" in marks else None
    return {"seconds": seen, "in_page_seconds": in_page, "preview_width": width,
            "preview_height": await preview.evaluate("i => i.naturalHeight"),
            "file": downloads[-1].suggested_filename}


async def dbus_scan(client: Client) -> dict[str, Any]:
    t0 = clock()
    session, item = await open_flatbed(client, DEVICE)
    try:
        await configure(item, RESOLUTION, MODE)
        t1 = clock()
        run = await transfer_once(item, "png", None)
    finally:
        async with session:  # closes it
            pass
    return {"first_byte": run.first_byte, "seconds": run.seconds, "with_session": t1 - t0 + run.seconds,
            "bytes": run.bytes, "width": run.summary.width if run.summary else None,
            "height": run.summary.height if run.summary else None}


async def scan_times(browser: Any, address: str, rounds: int, warmup: int) -> dict[str, Any]:
    client = await Client(address, timeout=30.0).connect()
    context = None
    try:
        context, card, downloads = await open_scan_page(browser)
        web: list[dict[str, Any]] = []
        dbus: list[dict[str, Any]] = []
        for r in range(warmup + rounds):
            # alternate which goes first, so that neither always follows the other
            order = ("web", "dbus") if r % 2 == 0 else ("dbus", "web")
            for kind in order:
                if kind == "web":
                    w = await asyncio.wait_for(web_scan(card, downloads), 2 * UI_TIMEOUT)
                    if r >= warmup:
                        web.append(w)
                else:
                    d = await asyncio.wait_for(dbus_scan(client), 2 * UI_TIMEOUT)
                    if r >= warmup:
                        dbus.append(d)
    finally:
        if context is not None:
            await context.close()
        client.disconnect()

    def med(rows: list[dict[str, Any]], key: str) -> float | None:
        values = [row[key] for row in rows if row[key] is not None]
        return statistics.median(values) if values else None

    web_s, web_page_s = med(web, "seconds"), med(web, "in_page_seconds")
    first, end, with_session = med(dbus, "first_byte"), med(dbus, "seconds"), med(dbus, "with_session")
    assert web_s is not None and first and end and with_session

    def ratios(x: float | None) -> dict[str, float] | None:
        if x is None:
            return None
        return {"to_dbus_first_byte": round(x / first, 2), "to_dbus_end": round(x / end, 2),
                "to_dbus_with_session": round(x / with_session, 2)}

    return {"rounds": rounds, "warmup": warmup,
            "web": {"median_ms": round(web_s * 1000, 1),
                    "in_page_median_ms": round(web_page_s * 1000, 1) if web_page_s is not None else None,
                    "runs_ms": [round(w["seconds"] * 1000, 1) for w in web],
                    "preview_size": [web[0]["preview_width"], web[0]["preview_height"]], "file": web[0]["file"]},
            "dbus": {"first_byte_median_ms": round(first * 1000, 1), "end_median_ms": round(end * 1000, 1),
                     "with_session_median_ms": round(with_session * 1000, 1),
                     "runs_end_ms": [round(d["seconds"] * 1000, 1) for d in dbus],
                     "png_bytes": dbus[0]["bytes"], "size": [dbus[0]["width"], dbus[0]["height"]]},
            "ratio": ratios(web_s), "ratio_in_page": ratios(web_page_s)}


# -- the run ----------------------------------------------------------------------------------------

async def bench(args: argparse.Namespace, root: Path) -> dict[str, Any]:
    cleanup: list[Any] = []
    try:
        config = root / "stillsvc.toml"
        config.write_text("[escl]\nmdns = false\n")
        bus = DBusDaemon()
        cleanup.append(bus.stop)
        ns = NetNamespace()
        ns.start()
        cleanup.append(ns.stop)
        daemon = Daemon(bus.address, "--log-level", "info", "--config", str(config),
                        workdir=str(root / "daemon"))
        daemon.args = ns.wrap(daemon.args)
        cleanup.append(daemon.stop)
        try:
            await asyncio.wait_for(daemon.ready(), START_TIMEOUT)
            await wait_until(lambda: listening(ns, PORT) or daemon.proc.poll() is not None, timeout=START_TIMEOUT,
                             what=f"the server listening on 127.0.0.1:{PORT}")
            if daemon.proc.poll() is not None:
                raise RuntimeError(f"the daemon exited ({daemon.proc.returncode})")
        except Exception:
            sys.stderr.write(daemon.log[-4000:])
            raise
        browser_holder = NamespacedBrowser(ns.path, root / "browser")
        cleanup.append(browser_holder.stop)
        browser = await asyncio.wait_for(browser_holder.start(), START_TIMEOUT * 2)
        result: dict[str, Any] = {"weight": await page_weight(browser)}
        result["scan"] = await scan_times(browser, bus.address, args.rounds, args.warmup)
        log = daemon.log
        result["health"] = {"stillsvc_running": daemon.proc.poll() is None, "tracebacks": log.count("Traceback"),
                            "log_problems": [line[:300] for line in log.splitlines()
                                             if re.search(r"level='?(error|critical)", line)][:10]}
        result["chromium"] = browser.version
        return result
    finally:
        for step in reversed(cleanup):  # every step, even after one failed
            try:
                outcome = step()
                if asyncio.iscoroutine(outcome):
                    await outcome
            except Exception as e:  # noqa: BLE001 - reported, the others still run
                sys.stderr.write(f"web bench: cleanup: {type(e).__name__}: {e}\n")


def report(result: dict[str, Any]) -> None:
    print(f"{result['cpus']} CPUs, Python {result['python']}, chromium {result['chromium']}; "
          f"load average {result['load_average']}")
    w = result["weight"]
    print("\nPage weight, first load in a fresh context (transferred: response headers + body; "
          "/api/events left out):")
    for r in w["resources"]:
        print(f"  {r['path']:<24} {r['status']}  {r['type']:<10} {r['bytes']:>8,} bytes "
              f"({r['headers_bytes']:,} headers + {r['body_bytes']:,} body)")
    print(f"  total {w['total_bytes']:,} bytes; target < {w['target_bytes']:,}: {'met' if w['met'] else 'NOT MET'}")
    s = result["scan"]
    web, dbus = s["web"], s["dbus"]
    print(f"\nScan to first preview: {DEVICE} flatbed, {MODE}, {RESOLUTION} dpi, whole bed, PNG "
          f"({dbus['size'][0]} x {dbus['size'][1]}, {dbus['png_bytes']:,} bytes of PNG); medians of {s['rounds']} "
          f"after {s['warmup']} untimed, web and D-Bus alternating")
    print(f"  page: click on Scan to preview of page 1 visible and loaded: {web['median_ms']:.1f} ms "
          f"(Playwright's side; runs {web['runs_ms']}); the page's own clock, click to the img's load: "
          f"{web['in_page_median_ms']} ms")
    print(f"  D-Bus: Item.transfer to first byte {dbus['first_byte_median_ms']:.1f} ms, to end of file "
          f"{dbus['end_median_ms']:.1f} ms; open_session + settings + transfer to end "
          f"{dbus['with_session_median_ms']:.1f} ms")
    for name, key in (("Playwright's side", "ratio"), ("page's own clock", "ratio_in_page")):
        r = s[key]
        if r:
            print(f"  ratio ({name}): x{r['to_dbus_first_byte']:.2f} D-Bus first byte, x{r['to_dbus_end']:.2f} "
                  f"D-Bus end, x{r['to_dbus_with_session']:.2f} D-Bus with session")
    h = result["health"]
    print(f"\nstillsvc {'running' if h['stillsvc_running'] else 'NOT RUNNING'}, {h['tracebacks']} tracebacks")
    for line in h["log_problems"]:
        print(f"  log: {line}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=5, help="timed scans of each kind (default 5)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed scans of each first (default 1)")
    parser.add_argument("--budget", type=float, default=300.0, help="seconds the whole run may take (default 300)")
    parser.add_argument("--json", action="store_true", help="one JSON document")
    args = parser.parse_args()
    if args.rounds < 1 or args.warmup < 0:
        parser.error("--rounds must be positive, --warmup not negative")
    why_not = browser_unavailable_reason() or netns_unavailable_reason()
    if why_not:
        sys.exit(f"web bench: {why_not}")
    root = Path(tempfile.mkdtemp(prefix="stillsvc-bench-web-"))
    try:
        result = asyncio.run(asyncio.wait_for(bench(args, root), args.budget))
    finally:
        shutil.rmtree(root, ignore_errors=True)
    result.update({"python": platform.python_version(), "machine": platform.machine(), "cpus": os.cpu_count(),
                   "load_average": [round(x, 2) for x in os.getloadavg()]})
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        report(result)
    h = result["health"]
    sys.exit(0 if h["stillsvc_running"] and not h["tracebacks"] else 1)


if __name__ == "__main__":
    main()
