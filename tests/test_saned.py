"""The SANE network server (``[saned]``) against real SANE clients: scanimage and libsane's
``net`` backend (through ctypes), from Debian's sane-utils and libsane1.

libsane's ``net`` backend only connects to port 6566, so each test runs the daemon and
every SANE client inside one private network namespace (tests/netns.py) with its own
loopback; the private D-Bus bus is a unix socket with a path, reachable from there. Every
SANE client gets a private SANE_CONFIG_DIR (tests/sane_env.py) that enables only ``net``
and names only 127.0.0.1: no SANE program here ever reads the system configuration.

Images are checked pixel for pixel against the simulator's test pattern, and against a
raw transfer of the same settings over D-Bus. The pattern of a page depends on how many
pages the device has fed before (``PagesFed``), so the SANE page (page n) and the D-Bus
page (page n + 1) are each compared with the pattern of their own page number, and their
geometry with each other.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from dbus_fast import Variant
from dbus_fast.aio import MessageBus
from helpers import (
    DEVICE,
    ITEM,
    SESSION,
    SIM0,
    SIMULATOR,
    Daemon,
    assert_daemon_healthy,
    call,
    create_session,
    expect_error,
    get_property,
    readable,
    unwrap,
    wait_until,
)
from netns import NetNamespace, listening, serve_in_namespace, unavailable_reason
from sane_env import SaneClientConfig, parse_pnm, sane_unavailable_reason

from stillsvc.drivers.sim.pattern import pattern_page
from stillsvc.imaging import ImageInfo, parse_raw

_why_not = unavailable_reason() or sane_unavailable_reason()
if _why_not:
    pytest.skip(f"SANE network tests need a private network namespace and the SANE clients: {_why_not}",
                allow_module_level=True)

PORT = 6566  # the only port libsane's net backend connects to
DEVICE_NAME = "net:127.0.0.1:sim0"
SANE_CLIENT = str(Path(__file__).resolve().parent / "sane_env.py")
RESOLUTIONS = [75, 100, 150, 200, 300, 600]
BED_MM = (216.0, 297.0)
MM_PER_INCH = 25.4
# A small page: 75 dpi, 50 x 40 mm at (10, 5) mm, about 148 x 118 pixels.
SMALL = ["--resolution", "75", "-l", "10", "-t", "5", "-x", "50", "-y", "40"]
SMALL_MM = {"resolution": 75, "left": 10.0, "top": 5.0, "width": 50.0, "height": 40.0}


# -- the setting: a daemon with [saned] in a namespace, and SANE clients beside it ---------------

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


class SaneClients:
    """SANE clients run inside a namespace with the private client configuration."""

    def __init__(self, ns: NetNamespace, sane: SaneClientConfig) -> None:
        self.ns, self.sane = ns, sane

    async def spawn(self, argv: list[str], stdin: int | None = asyncio.subprocess.DEVNULL,
                    stdout: int = asyncio.subprocess.PIPE) -> asyncio.subprocess.Process:
        return await asyncio.create_subprocess_exec(*self.ns.wrap(argv), stdin=stdin, stdout=stdout,
                                                    stderr=asyncio.subprocess.PIPE, env=self.sane.env)

    async def run(self, argv: list[str], input: bytes | None = None, timeout: float = 20.0) -> Run:
        start = time.monotonic()
        proc = await self.spawn(argv, stdin=asyncio.subprocess.PIPE if input is not None else
                                asyncio.subprocess.DEVNULL)
        try:
            out, err = await asyncio.wait_for(proc.communicate(input), timeout)
        except TimeoutError:
            proc.kill()
            await proc.wait()
            raise AssertionError(f"{argv[:3]} did not finish within {timeout} s") from None
        return Run(proc.returncode, out, err.decode(errors="replace"), time.monotonic() - start)

    async def scanimage(self, *args: str, timeout: float = 20.0) -> Run:
        return await self.run(["scanimage", *args], timeout=timeout)

    async def scan(self, *args: str, timeout: float = 20.0) -> Run:
        """One page from sim0 as PNM on stdout; fails the test unless scanimage succeeded."""
        run = await self.scanimage("-d", DEVICE_NAME, "--format=pnm", *args, timeout=timeout)
        assert run.returncode == 0, f"scanimage {' '.join(args)} failed ({run.returncode}): {run.stderr}"
        return run

    async def sane_ops(self, ops: list[list[Any]], timeout: float = 20.0) -> list[dict[str, Any]]:
        """Run the ctypes libsane client (tests/sane_env.py) on ``ops``: one result per operation."""
        run = await self.run([sys.executable, SANE_CLIENT], input=json.dumps(ops).encode(), timeout=timeout)
        assert run.returncode == 0, f"the ctypes SANE client failed ({run.returncode}): {run.stderr}"
        results = [json.loads(line) for line in run.stdout.decode().splitlines()]
        assert len(results) == len(ops), f"{len(results)} results for {len(ops)} operations: {run.stderr}"
        return results


class Net(SaneClients):
    """One daemon serving SANE in a namespace, a D-Bus connection to it, SANE clients beside it."""

    def __init__(self, ns: NetNamespace, daemon: Daemon, sane: SaneClientConfig, bus: MessageBus) -> None:
        super().__init__(ns, sane)
        self.daemon, self.bus = daemon, bus

    async def pages_fed(self) -> int:
        return await get_property(self.bus, SIM0, SIMULATOR, "PagesFed")

    async def last_settings(self, item: str) -> dict[str, Any]:
        return unwrap(await get_property(self.bus, SIM0, SIMULATOR, "LastSettings"))[item]

    async def device(self, name: str) -> Any:
        return await get_property(self.bus, SIM0, DEVICE, name)


@pytest.fixture
async def start_net(request: pytest.FixtureRequest, bus_address: str,
                    tmp_path: Path) -> AsyncIterator[Callable[..., Awaitable[Net]]]:
    """``net = await start_net(start_wait_ms=500)``: the daemon with ``[saned]`` holding the
    given keys (none: the defaults), started inside a fresh network namespace."""
    cleanup: list[Callable[[], Any]] = []

    async def start(**saned: Any) -> Net:
        config = tmp_path / "stillsvc.toml"
        config.write_text("[saned]\n" + "".join(f"{k} = {toml_value(v)}\n" for k, v in saned.items()))
        ns, daemon, bus = await serve_in_namespace(request, bus_address, config, tmp_path / "daemon", PORT, cleanup)
        return Net(ns, daemon, SaneClientConfig(tmp_path / "sane-client"), bus)

    yield start
    errors = []
    for step in reversed(cleanup):  # every step, even after one failed: no process is left behind
        try:
            step()
        except Exception as e:
            errors.append(e)
    if errors:
        raise errors[0]


# -- helpers ---------------------------------------------------------------------------------------

def pixels(mm: float, dpi: int) -> float:
    return mm / MM_PER_INCH * dpi


def assert_near(actual: float, expected: float, tolerance: float, what: str) -> None:
    assert abs(actual - expected) <= tolerance, f"{what}: {actual}, expected {expected} ± {tolerance}"


def pattern(width: int, height: int, mode: str, page: int, resolution: int, depth: int) -> bytes:
    return pattern_page(ImageInfo(width, height, mode, depth, resolution), page)


def first_difference(a: bytes, b: bytes) -> str:
    if len(a) != len(b):
        return f"{len(a)} bytes vs {len(b)}"
    i = next(i for i in range(len(a)) if a[i] != b[i])
    return f"first difference at byte {i}: {a[i]:#04x} vs {b[i]:#04x}"


async def raw_transfer(bus: MessageBus, item: str) -> tuple[dict[str, Any], bytes]:
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
        (summary,) = await call(bus, item, ITEM, "Transfer", "hsa{sv}", [0, "raw", {}], unix_fds=[w])
    finally:
        os.close(w)
    return unwrap(summary), await reader


async def dbus_page(net: Net, settings: dict[str, Any], item: str = "Flatbed") -> tuple[ImageInfo, int, bytes]:
    """The same settings over D-Bus: one raw page (its info, page number and rows)."""
    session = await create_session(net.bus, mode="data")
    try:
        root = await get_property(net.bus, session, SESSION, "RootItem")
        types = {"resolution": "u", "mode": "s", "depth": "u", "x_offset": "u", "y_offset": "u", "width": "u",
                 "height": "u"}
        values = {k: Variant(t, settings[k]) for k, t in types.items()}
        await call(net.bus, f"{root}/{item}", ITEM, "WriteProperties", "a{sv}", [values])
        _, data = await raw_transfer(net.bus, f"{root}/{item}")
    finally:
        await call(net.bus, session, SESSION, "Close")
    ((info, number, rows),) = parse_raw(data)
    return info, number, rows


async def assert_matches_dbus(net: Net, page: int, image: Any, mode: str, depth: int,
                              area_mm: dict[str, float]) -> None:
    """``image`` (from scanimage, page ``page``) has the asked geometry, reached the device with
    the right settings, is the test pattern pixel for pixel, and a D-Bus raw transfer of the
    same settings gives the same geometry and the pattern of its own page."""
    dpi = int(area_mm["resolution"])
    assert_near(image.width, pixels(area_mm["width"], dpi), 1, "width (pixels)")
    assert_near(image.height, pixels(area_mm["height"], dpi), 1, "height (pixels)")
    settings = await net.last_settings("Flatbed")
    assert (settings["resolution"], settings["mode"], settings["depth"]) == (dpi, mode, depth)
    assert (settings["width"], settings["height"]) == (image.width, image.height)
    assert_near(settings["x_offset"], pixels(area_mm["left"], dpi), 1, "x_offset (pixels)")
    assert_near(settings["y_offset"], pixels(area_mm["top"], dpi), 1, "y_offset (pixels)")
    want = pattern(image.width, image.height, mode, page, dpi, depth)
    assert image.data == want, f"page {page} through SANE is not the pattern: {first_difference(image.data, want)}"

    info, number, rows = await dbus_page(net, settings)
    assert number == 0 and (info.width, info.height, info.mode, info.depth, info.resolution) == (
        image.width, image.height, mode, depth, dpi)
    assert rows == pattern(image.width, image.height, mode, page + 1, dpi, depth)
    assert len(rows) == len(image.data)  # same layout: PNM rows are the raw rows


def other_value(d: dict[str, Any]) -> Any:
    """A valid value of option ``d`` that is not its default here: the last of a list (the
    defaults are Color, Flatbed, 150 dpi, 8 bits), the middle of a range or its maximum."""
    constraint = d["constraint"]
    if d["constraint_type"] in ("STRING_LIST", "WORD_LIST"):
        return constraint[-1]
    if d["constraint_type"] == "RANGE":
        middle = (constraint["min"] + constraint["max"]) / 2
        middle = middle if d["type"] == "FIXED" else int(middle)
        return middle if middle != 0 else constraint["max"]
    if d["type"] == "BOOL":
        return True
    raise AssertionError(f"no other value for {d}")


async def hold_data_mode(net: Net, bus: MessageBus | None = None) -> str:
    return await create_session(bus or net.bus, mode="data")


class BigScan:
    """scanimage taking a whole 600 dpi colour bed (about 107 MB) into a pipe nobody reads: it
    stops with the page partly read, and the server with it, holding the device."""

    def __init__(self, net: Net) -> None:
        self.net = net
        self.proc: asyncio.subprocess.Process | None = None
        self.r = -1

    async def __aenter__(self) -> asyncio.subprocess.Process:
        self.r, w = os.pipe()
        try:
            self.proc = await self.net.spawn(["scanimage", "-d", DEVICE_NAME, "--format=pnm", "--mode", "Color",
                                              "--resolution", "600"], stdout=w)
        finally:
            os.close(w)
        try:
            await readable(self.r, timeout=10)  # the page is flowing
            await wait_until(lambda: self.net.device("DataModeHeld"), timeout=5,
                             what="the network scan holding data mode")
            assert self.proc.returncode is None
        except BaseException:
            await self.__aexit__()
            raise
        return self.proc

    async def __aexit__(self, *exc: object) -> None:
        if self.proc is not None:
            await reap(self.proc)
        os.close(self.r)


async def reap(proc: asyncio.subprocess.Process, timeout: float = 10.0) -> int:
    if proc.returncode is None:
        proc.kill()
    return await asyncio.wait_for(proc.wait(), timeout)


# -- the harness itself, against the real saned ----------------------------------------------------

@pytest.mark.skipif(shutil.which("saned") is None, reason="saned is not installed (Debian package sane-utils)")
async def test_harness_reaches_real_saned_in_the_namespace(tmp_path):
    # The namespace and the client configuration, checked with Debian's own saned serving the
    # test backend: when this passes and a test below fails, the fault is not in the harness.
    server = tmp_path / "saned-config"
    server.mkdir()
    (server / "dll.conf").write_text("test\n")
    (server / "saned.conf").write_text("127.0.0.1\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith("SANE_")}
    env["SANE_CONFIG_DIR"] = str(server)
    with NetNamespace() as ns:
        saned = ns.popen(["saned", "-l", "-b", "127.0.0.1", "-p", str(PORT)], env=env,
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            await wait_until(lambda: listening(ns, PORT) or saned.poll() is not None, timeout=10,
                             what="saned listening")
            assert saned.poll() is None, f"saned exited with {saned.returncode}"
            net = SaneClients(ns, SaneClientConfig(tmp_path / "sane-client"))
            run = await net.scanimage("-L")
            assert "device `net:127.0.0.1:test:0' is a Noname frontend-tester virtual device" in run.stdout.decode()
            run = await net.scanimage("-d", "net:127.0.0.1:test:0", "--format=pnm", "--mode", "Gray", *SMALL)
            assert run.returncode == 0, run.stderr
            image, _ = parse_pnm(run.stdout)
            assert image.magic == "P5" and abs(image.width - pixels(50, 75)) <= 1
            (_, _, resolution) = await net.sane_ops([["init"], ["open", "net:127.0.0.1:test:0"], ["get", "resolution"]])
            assert resolution["status"] == "GOOD"
        finally:
            saned.kill()
            saned.wait(10)


# -- devices and options ---------------------------------------------------------------------------

async def test_scanimage_lists_the_simulated_scanner(start_net):
    net = await start_net()
    vendor, model = await net.device("Vendor"), await net.device("Model")
    assert (vendor, model) == ("stillsvc", "Simulated Flatbed + ADF")
    run = await net.scanimage("-L")
    assert run.returncode == 0, run.stderr
    lines = run.stdout.decode().splitlines()
    assert f"device `{DEVICE_NAME}' is a {vendor} {model} flatbed scanner" in lines, lines

    (_, devices) = await net.sane_ops([["init"], ["devices"]])
    assert devices["status"] == "GOOD"
    assert {"name": DEVICE_NAME, "vendor": vendor, "model": model, "type": "flatbed scanner"} in devices["devices"]
    assert_daemon_healthy(net.daemon)


async def test_scanimage_shows_the_options_with_their_constraints(start_net):
    net = await start_net()
    run = await net.scanimage("-A", "-d", DEVICE_NAME)
    assert run.returncode == 0, run.stderr
    text = run.stdout.decode()
    # scanimage shows "auto|" before the values of an option that can set itself (and, for a
    # word list, one "|" more: its own quirk).
    auto = r"(auto\|\|?)?"
    for expected in (rf"--mode {auto}Color\|Gray\|Lineart \[",
                     rf"--resolution {auto}75\|100\|150\|200\|300\|600dpi \[",
                     rf"--source {auto}Flatbed\|ADF \[", rf"--depth {auto}(1\|)?8\|16bit \[",
                     rf"--brightness {auto}-100\.\.100", rf"--contrast {auto}-100\.\.100",
                     rf"    -l {auto}0\.\.", rf"    -t {auto}0\.\.", rf"    -x {auto}0\.\.", rf"    -y {auto}0\.\."):
        assert re.search(expected, text), f"{expected!r} not in scanimage -A:\n{text}"

    (_, opened, listing, count) = await net.sane_ops([["init"], ["open", DEVICE_NAME], ["descriptors"], ["get", 0]])
    assert opened["status"] == "GOOD"
    descriptors = listing["descriptors"]
    assert count["status"] == "GOOD" and count["value"] == len(descriptors)  # option 0: the number of options
    by_name = {d["name"]: d for d in descriptors if d["name"]}
    settable = {"SOFT_SELECT", "SOFT_DETECT"}

    mode = by_name["mode"]
    assert (mode["type"], mode["constraint_type"], mode["constraint"]) == (
        "STRING", "STRING_LIST", ["Color", "Gray", "Lineart"])
    assert mode["size"] >= len("Lineart") + 1 and settable <= set(mode["caps"])
    resolution = by_name["resolution"]
    assert resolution["type"] in ("INT", "FIXED") and resolution["unit"] == "DPI"
    assert resolution["constraint_type"] == "WORD_LIST" and resolution["constraint"] == RESOLUTIONS
    depth = by_name["depth"]
    assert depth["type"] == "INT" and depth["unit"] == "BIT" and depth["constraint_type"] == "WORD_LIST"
    assert {8, 16} <= set(depth["constraint"]), depth
    source = by_name["source"]
    assert (source["type"], source["constraint_type"], source["constraint"]) == (
        "STRING", "STRING_LIST", ["Flatbed", "ADF"])
    for name, extent in (("tl-x", BED_MM[0]), ("br-x", BED_MM[0]), ("tl-y", BED_MM[1]), ("br-y", BED_MM[1])):
        d = by_name[name]
        assert (d["type"], d["unit"], d["constraint_type"]) == ("FIXED", "MM", "RANGE"), d
        assert d["constraint"]["min"] == 0 and settable <= set(d["caps"]), d
        assert_near(d["constraint"]["max"], extent, 0.5, f"{name} maximum (mm)")
    for name in ("brightness", "contrast"):
        d = by_name[name]
        assert d["type"] == "INT" and d["constraint_type"] == "RANGE", d
        assert (d["constraint"]["min"], d["constraint"]["max"]) == (-100, 100), d
    assert_daemon_healthy(net.daemon)


async def test_options_get_set_and_auto_through_libsane(start_net):
    net = await start_net()
    ops: list[list[Any]] = [
        ["init"], ["open", DEVICE_NAME],                                       # 0, 1
        ["get", "resolution"], ["set", "resolution", 300], ["get", "resolution"],  # 2, 3, 4
        ["set", "resolution", 123],                                            # 5: not in the list
        ["set", "mode", "Gray"], ["get", "mode"], ["set", "mode", "Sepia"],    # 6, 7, 8
        ["get", "mode"],                                                       # 9
        ["set", "resolution", 75], ["set", "tl-x", 10.0], ["set", "br-x", 60.0],  # 10, 11, 12
        ["set", "tl-y", 0.0], ["set", "br-y", 20.0], ["parameters"],           # 13, 14, 15
        ["get", "brightness"], ["set", "brightness", 101],                      # 16, 17: out of range
        ["set", "brightness", 40], ["get", "brightness"],                      # 18, 19
        ["descriptors"],                                                       # 20
        ["get", 999],                                                          # 21: no such option
        ["get", "contrast"],                                                   # 22: the connection still works
        ["scan"],                                                              # 23
        ["close"], ["exit"],
    ]
    r = await net.sane_ops(ops)
    assert r[1]["status"] == "GOOD"
    assert r[2]["status"] == "GOOD" and r[2]["value"] in RESOLUTIONS
    assert r[3]["status"] == "GOOD" and r[3]["value"] == 300
    assert r[3]["info"] & 4, "a new resolution changes the parameters (SANE_INFO_RELOAD_PARAMS)"
    assert (r[4]["status"], r[4]["value"]) == ("GOOD", 300)
    # A value outside a word list is refused, or replaced by a valid one and said so (INEXACT).
    assert r[5]["status"] == "INVAL" or (r[5]["status"] == "GOOD" and r[5]["info"] & 1
                                         and r[5]["value"] in RESOLUTIONS), r[5]
    assert r[6]["status"] == "GOOD" and r[6]["info"] & 4, r[6]
    assert r[7]["value"] == "Gray"
    assert r[8]["status"] == "INVAL", r[8]
    assert r[9]["value"] == "Gray"
    for i in (10, 11, 12, 13, 14):
        assert r[i]["status"] == "GOOD", (ops[i], r[i])
    assert_near(r[12]["value"], 60.0, 0.5, "br-x as set (mm)")
    params = r[15]["params"]
    assert r[15]["status"] == "GOOD" and params["format"] == "GRAY" and params["depth"] == 8, params
    assert_near(params["pixels_per_line"], pixels(50.0, 75), 1, "pixels per line")
    assert_near(params["lines"], pixels(20.0, 75), 1, "lines")
    assert params["bytes_per_line"] == params["pixels_per_line"]
    assert r[16]["status"] == "GOOD" and r[16]["value"] == 0
    # Out of range: refused, or brought into range and said so (INEXACT).
    assert r[17]["status"] == "INVAL" or (r[17]["status"] == "GOOD" and r[17]["info"] & 1
                                          and r[17]["value"] == 100), r[17]
    assert (r[18]["status"], r[19]["value"]) == ("GOOD", 40)
    assert r[21]["status"] == "INVAL", r[21]
    assert r[22]["status"] == "GOOD" and r[22]["value"] == 0
    scan = r[23]
    assert scan["status"] == "EOF", scan
    (frame,) = scan["frames"]
    assert (frame["format"], frame["pixels_per_line"], frame["lines"]) == (
        "GRAY", params["pixels_per_line"], params["lines"])
    assert frame["bytes"] == frame["bytes_per_line"] * frame["lines"]
    settings = await net.last_settings("Flatbed")
    assert (settings["resolution"], settings["mode"], settings["brightness"]) == (75, "gray", 40)
    assert_near(settings["x_offset"], pixels(10.0, 75), 1, "x_offset")

    # SET_AUTO (protocol 3 sends no value with it): an option that can set itself goes back
    # from another value to its automatic one; any other refuses and keeps its value. The
    # connection stays in step either way.
    descriptors = {d["name"]: d for d in r[20]["descriptors"] if d["name"]}
    settable = {"SOFT_SELECT", "SOFT_DETECT"}
    auto_ops: list[list[Any]] = [["init"], ["open", DEVICE_NAME]]
    checks = []
    for name, d in descriptors.items():
        if d["type"] in ("GROUP", "BUTTON") or "INACTIVE" in d["caps"] or not settable <= set(d["caps"]):
            continue
        checks.append((name, "AUTOMATIC" in d["caps"], len(auto_ops)))
        auto_ops += [["get", name], ["set", name, other_value(d)], ["auto", name], ["get", name]]
    assert any(name == "brightness" for name, _, _ in checks)
    results = await net.sane_ops(auto_ops + [["get", "mode"], ["close"], ["exit"]])
    for name, automatic, i in checks:
        before, changed, auto, after = results[i:i + 4]
        assert before["status"] == changed["status"] == after["status"] == "GOOD", (name, results[i:i + 4])
        assert changed["value"] != before["value"], (name, changed)
        if automatic:
            assert auto["status"] == "GOOD", (name, auto)
            assert after["value"] == pytest.approx(before["value"], abs=0.01), (name, results[i:i + 4])
        else:
            assert auto["status"] in ("INVAL", "UNSUPPORTED"), (name, auto)
            assert after["value"] == changed["value"], (name, results[i:i + 4])
    assert results[len(auto_ops)]["status"] == "GOOD"  # the stream is still in step after every auto
    assert_daemon_healthy(net.daemon)


# -- frames ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("sane_mode, mode, magic", [("Color", "color", "P6"), ("Gray", "gray", "P5")])
async def test_eight_bit_page_is_the_pattern_and_the_dbus_page(start_net, sane_mode, mode, magic):
    net = await start_net()
    page = await net.pages_fed()
    run = await net.scan("--mode", sane_mode, "--depth", "8", *SMALL)
    image, end = parse_pnm(run.stdout)
    assert end == len(run.stdout) and (image.magic, image.maxval) == (magic, 255), image
    await assert_matches_dbus(net, page, image, mode, 8, SMALL_MM)
    assert_daemon_healthy(net.daemon)


async def test_lineart_page_is_one_bit_with_one_for_black(start_net):
    net = await start_net()
    page = await net.pages_fed()
    run = await net.scan("--mode", "Lineart", *SMALL)
    image, _ = parse_pnm(run.stdout)
    assert image.magic == "P4", image  # scanimage writes a 1-bit frame as PBM: bit 1 = black, as SANE
    await assert_matches_dbus(net, page, image, "lineart", 1, SMALL_MM)
    assert_daemon_healthy(net.daemon)


@pytest.mark.parametrize("sane_mode, mode, magic", [("Gray", "gray", "P5"), ("Color", "color", "P6")])
async def test_sixteen_bit_page_keeps_every_sample(start_net, sane_mode, mode, magic):
    # scanimage writes 16-bit PNM samples big-endian whatever order the frame came in.
    net = await start_net()
    page = await net.pages_fed()
    run = await net.scan("--mode", sane_mode, "--depth", "16", *SMALL)
    image, _ = parse_pnm(run.stdout)
    assert (image.magic, image.maxval) == (magic, 65535), image
    await assert_matches_dbus(net, page, image, mode, 16, SMALL_MM)
    assert_daemon_healthy(net.daemon)


async def test_feeder_batch_scans_every_loaded_page(start_net, tmp_path):
    net = await start_net()
    await call(net.bus, SIM0, SIMULATOR, "LoadPages", "u", [3])
    first = await net.pages_fed()
    out = tmp_path / "batch"
    out.mkdir()
    run = await net.scanimage("-d", DEVICE_NAME, "--format=pnm", f"--batch={out}/p%d.pnm", "--source", "ADF",
                              "--mode", "Gray", "--resolution", "75", "-x", "30", "-y", "20")
    assert run.returncode == 0, run.stderr
    files = sorted(out.iterdir())
    assert [f.name for f in files] == ["p1.pnm", "p2.pnm", "p3.pnm"], (files, run.stderr)
    for i, path in enumerate(files):
        image, _ = parse_pnm(path.read_bytes())
        assert image.magic == "P5"
        assert image.data == pattern(image.width, image.height, "gray", first + i, 75, 8), path.name
    assert await get_property(net.bus, SIM0, SIMULATOR, "PagesLoaded") == 0
    assert await net.pages_fed() == first + 3
    settings = await net.last_settings("Feeder")
    assert (settings["resolution"], settings["mode"]) == (75, "gray")
    # An empty feeder: scanimage reports no documents, and nothing is written.
    run = await net.scanimage("-d", DEVICE_NAME, "--format=pnm", "--source", "ADF", "--resolution", "75",
                              "-x", "10", "-y", "10")
    assert run.returncode != 0 and "Document feeder out of documents" in run.stderr, run.stderr
    assert_daemon_healthy(net.daemon)


# -- sharing the device with D-Bus clients -----------------------------------------------------

async def test_dbus_holder_makes_a_network_scan_busy_after_the_wait(start_net):
    net = await start_net(start_wait_ms=500)
    holder = await hold_data_mode(net)
    run = await net.scanimage("-d", DEVICE_NAME, "--format=pnm", *SMALL, timeout=10)
    assert run.returncode != 0 and "Device busy" in run.stderr, run.stderr
    assert 0.45 <= run.elapsed < 5.0, f"busy after {run.elapsed:.2f} s, start_wait_ms is 500"
    assert await net.device("DataModeHeld") is True  # the D-Bus holder kept it
    await call(net.bus, holder, SESSION, "Close")
    await net.scan(*SMALL)
    assert_daemon_healthy(net.daemon)


async def test_network_scan_waits_for_the_dbus_holder_to_close(start_net):
    net = await start_net(start_wait_ms=5000)
    holder = await hold_data_mode(net)
    page = await net.pages_fed()
    proc = await net.spawn(["scanimage", "-d", DEVICE_NAME, "--format=pnm", "--mode", "Gray", *SMALL])
    try:
        await wait_until(lambda: net.device("DataModeWaiters"), timeout=5,
                         what="the network scan waiting in line for data mode")
        assert proc.returncode is None
        closed = time.monotonic()
        await call(net.bus, holder, SESSION, "Close")
        out, err = await asyncio.wait_for(proc.communicate(), 10)
    finally:
        await reap(proc)
    assert proc.returncode == 0, err.decode(errors="replace")
    assert time.monotonic() - closed < 3.0
    image, _ = parse_pnm(out)
    assert image.data == pattern(image.width, image.height, "gray", page, 75, 8)
    assert_daemon_healthy(net.daemon)


async def test_dbus_client_is_busy_while_a_network_scan_runs(start_net):
    net = await start_net()
    async with BigScan(net):
        await expect_error("Busy", create_session(net.bus, mode="data", wait_ms=Variant("u", 0)))
        status = await create_session(net.bus, mode="status")  # status mode is never refused
        await call(net.bus, status, SESSION, "Close")
    session = await create_session(net.bus, mode="data", wait_ms=Variant("u", 5000))
    await call(net.bus, session, SESSION, "Close")
    assert_daemon_healthy(net.daemon)


async def test_killing_scanimage_mid_page_frees_the_device(start_net):
    net = await start_net()
    async with BigScan(net) as proc:
        proc.send_signal(signal.SIGKILL)  # nsenter exec'd scanimage: this is scanimage itself
        killed = time.monotonic()
        session = await create_session(net.bus, mode="data", wait_ms=Variant("u", 5000))
        freed = time.monotonic() - killed
    assert freed < 1.0, f"data mode came free {freed:.2f} s after scanimage was killed"
    await call(net.bus, session, SESSION, "Close")
    # and the server serves the next client
    page = await net.pages_fed()
    image, _ = parse_pnm((await net.scan("--mode", "Gray", *SMALL)).stdout)
    assert image.data == pattern(image.width, image.height, "gray", page, 75, 8)
    assert_daemon_healthy(net.daemon)


# -- who may connect -------------------------------------------------------------------------------

async def test_peer_outside_allow_is_refused(start_net):
    net = await start_net(allow=["10.0.0.0/8"])  # 127.0.0.1 is not in it
    run = await net.scanimage("-L")
    assert DEVICE_NAME not in run.stdout.decode(), run.stdout
    (_, devices, opened, _) = await net.sane_ops([["init"], ["devices"], ["open", DEVICE_NAME], ["exit"]])
    assert devices["devices"] == [], devices
    assert opened["status"] != "GOOD", opened
    # Nothing was taken: D-Bus clients get data mode at once, and the server still listens.
    session = await create_session(net.bus, mode="data", wait_ms=Variant("u", 0))
    await call(net.bus, session, SESSION, "Close")
    assert listening(net.ns, PORT)
    assert_daemon_healthy(net.daemon)


async def test_authorize_with_a_users_file(start_net, tmp_path):
    users = tmp_path / "saned.users"
    users.write_text("# user:password:device\nalice:secret:sim0\nbob:hunter2:other\n")
    net = await start_net(users_file=str(users))

    async def open_as(user: str, password: str, how: str = "md5") -> tuple[str, list[str]]:
        (_, _, opened, asked, _) = await net.sane_ops([["auth", user, password, how], ["init"],
                                                       ["open", DEVICE_NAME], ["asked"], ["exit"]])
        return opened["status"], asked["resources"]

    status, asked = await open_as("alice", "secret")
    assert status == "GOOD"
    (resource,) = asked  # the challenge: the device and a fresh salt
    assert resource.startswith(f"{DEVICE_NAME}$MD5$") and len(resource.split("$MD5$")[1]) == 32
    assert (await open_as("alice", "secret", "plain"))[0] == "GOOD"  # as saned, a plain password too
    assert (await open_as("alice", "wrong"))[0] == "ACCESS_DENIED"
    assert (await open_as("bob", "hunter2"))[0] == "ACCESS_DENIED"  # bob may use "other" only
    assert (await open_as("mallory", "secret"))[0] == "ACCESS_DENIED"
    # A refused open took nothing: D-Bus gets data mode at once.
    session = await create_session(net.bus, mode="data", wait_ms=Variant("u", 0))
    await call(net.bus, session, SESSION, "Close")
    assert "Traceback" not in net.daemon.log
    assert_daemon_healthy(net.daemon)
