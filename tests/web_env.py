"""Playwright's browser inside a private network namespace, for the tests of the scan page.

The daemon's HTTP server listens on the namespace's loopback, which the test process
cannot reach. Playwright for Python drives the browser through its Node.js driver, a
child process it talks to over pipes, and the driver starts the browser as its own
child: so the driver itself is started inside the namespace, through a two-line
wrapper named by ``PLAYWRIGHT_NODEJS_PATH`` (Playwright's own variable for the
Node.js it runs) that execs ``nsenter --net=... -- node``. The browser inherits the
namespace, and the test drives it with Playwright's ordinary async API from its own
event loop: D-Bus calls and browser steps interleave in one test.

The browser is the distribution's chromium (nothing is downloaded: ``playwright
install`` is never run), headless, with ``--no-sandbox`` when running as root (the
sandbox refuses to start as root).
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import stat
from pathlib import Path
from typing import Any

CHROMIUM_CANDIDATES = ("/usr/bin/chromium", "/usr/bin/chromium-browser")


def chromium_path() -> str | None:
    for path in CHROMIUM_CANDIDATES:
        if os.access(path, os.X_OK):
            return path
    return shutil.which("chromium") or shutil.which("chromium-browser")


def real_node() -> str | None:
    """The Node.js that Playwright would run: PLAYWRIGHT_NODEJS_PATH, or the bundled one."""
    try:
        import playwright
    except ImportError:
        return None
    given = os.environ.get("PLAYWRIGHT_NODEJS_PATH")
    if given:
        return given
    bundled = Path(playwright.__file__).resolve().parent / "driver" / "node"
    return str(bundled) if bundled.is_file() else None


def unavailable_reason() -> str | None:
    """Why the page's tests cannot drive a browser here, or None."""
    try:
        found = importlib.util.find_spec("playwright.async_api") is not None
    except ImportError:
        found = False
    if not found:
        return "Playwright for Python is not installed (pip install playwright)"
    if chromium_path() is None:
        return "chromium is not installed (Debian package 'chromium'; /usr/bin/chromium)"
    if real_node() is None:
        return "this Playwright has no Node.js driver (set PLAYWRIGHT_NODEJS_PATH)"
    if shutil.which("nsenter") is None:
        return "nsenter is not installed (util-linux)"
    return None


def node_wrapper(netns_path: str, folder: Path) -> Path:
    """A script that runs Playwright's Node.js driver inside the network namespace."""
    node = real_node()
    assert node is not None
    folder.mkdir(parents=True, exist_ok=True)
    script = folder / "node-in-netns"
    script.write_text("#!/bin/sh\n"
                      f"exec nsenter --net={netns_path} -- {_quote(node)} \"$@\"\n")
    script.chmod(script.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    return script


def _quote(text: str) -> str:
    return "'" + text.replace("'", "'\\''") + "'"


class NamespacedBrowser:
    """``async with NamespacedBrowser(ns.path, folder) as browser:`` Playwright's
    headless chromium, running inside the namespace."""

    def __init__(self, netns_path: str, folder: Path) -> None:
        self.netns_path = netns_path
        self.folder = Path(folder)
        self.playwright: Any = None
        self.browser: Any = None

    async def start(self) -> Any:
        from playwright.async_api import async_playwright

        wrapper = node_wrapper(self.netns_path, self.folder)
        saved = os.environ.get("PLAYWRIGHT_NODEJS_PATH")
        # read by Playwright when it starts its driver, that is during start() only
        os.environ["PLAYWRIGHT_NODEJS_PATH"] = str(wrapper)
        try:
            self.playwright = await async_playwright().start()
        finally:
            if saved is None:
                os.environ.pop("PLAYWRIGHT_NODEJS_PATH", None)
            else:
                os.environ["PLAYWRIGHT_NODEJS_PATH"] = saved
        args = ["--no-sandbox"] if os.geteuid() == 0 else []
        self.browser = await self.playwright.chromium.launch(executable_path=chromium_path(), headless=True,
                                                              args=args)
        return self.browser

    async def stop(self) -> None:
        if self.browser is not None:
            try:
                await self.browser.close()
            finally:
                self.browser = None
        if self.playwright is not None:
            await self.playwright.stop()
            self.playwright = None

    async def __aenter__(self) -> Any:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()
