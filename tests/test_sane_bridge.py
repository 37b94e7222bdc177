"""The SANE bridge (driver ``sane``) against libsane's real ``test`` backend.

The daemon runs with ``--sane`` and a private SANE_CONFIG_DIR that enables only the
``test`` backend (tests/sane_backend.py), so SANE discovery finds ``test:0`` and
``test:1`` (devices ``sane-test:0`` and ``sane-test:1``) next to the simulator
``sim0``. Every SANE call of the service happens in a worker process of its own
(stillsvc/driver/sane/); these tests reach it only through D-Bus, and check what
comes out pixel for pixel against ``scanimage`` run with the same settings and the
same private configuration.

One daemon serves the module (``bridge``); each test opens its own sessions, and every
transfer writes all of its item's properties to the device, so a test does not depend
on what the device was left with. The crash tests come last: they kill the worker of
``sane-test:0`` and check that the device comes back. The tests that can leave the
device stuck for good (READER_GONE_DEADLOCK, a bug) run on a second daemon
(``fragile``) that nothing else uses.

Facts about the test backend these tests rely on (measured): its geometry is in
mm with a quantisation of 1 mm, so scan areas are given at 254 dpi (10 pixels a mm), and scanimage is given the area the
service scanned, in the whole mm it must have been (``area_args``: the tests of the
frames hold whatever the service's rounding of the scan area, which is tested on its
own); its feeder gives ten pages, answers NO_DOCS at the eleventh ``sane_start`` and
is full again after that (and after every ``sane_open``); its read-delay sleeps after
every 64 KiB; ``scanimage`` writes a PNM that still holds the backend's line padding
(``ppl-loss``), and cannot do three-pass at 16 bits.
"""

from __future__ import annotations

import asyncio
import fcntl
import io
import os
import signal
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pypdf
import pytest
import sane_backend
from dbus_fast import Variant
from dbus_fast.aio import MessageBus
from helpers import (
    DEVICE,
    ITEM,
    MANAGER,
    ROOT,
    SESSION,
    Daemon,
    DBusDaemon,
    Signals,
    assert_daemon_healthy,
    call,
    connect,
    create_session,
    expect_error,
    get_all,
    get_property,
    readable,
    unwrap,
    wait_until,
)
from sane_backend import TestBackendConfig
from sane_env import Pnm, parse_pnm

_why_not = sane_backend.test_backend_unavailable_reason()  # not imported by name: pytest would collect it
if _why_not:
    pytest.skip(f"the SANE bridge tests need scanimage and libsane's test backend: {_why_not}",
                allow_module_level=True)

DEV0 = f"{ROOT}/devices/sane_test_0"
DEV1 = f"{ROOT}/devices/sane_test_1"
PROPERTIES = "org.freedesktop.DBus.Properties"
WORKER_MODULE = "stillsvc.driver.sane.worker"
#: Item properties of type "u"; every other value's D-Bus type follows its Python type.
UNSIGNED = frozenset({"resolution", "depth", "x_offset", "y_offset", "width", "height", "pages"})
MM_PER_INCH = 25.4
#: 50 x 40 mm at 254 dpi (10 pixels a mm), on the test backend's 1 mm steps.
AREA = {"resolution": 254, "x_offset": 0, "y_offset": 0, "width": 500, "height": 400}
PATTERN = {"test-picture": "Color pattern"}
PATTERN_ARGS = ["--test-picture", "Color pattern"]
#: The item's defaults as the test backend starts: Gray, 8 bits, 50 dpi, 80 x 100 mm.
DEFAULT_PAGE = (157, 196)
TRANSFER_TIMEOUT = 30.0
#: The daemon's [sane] timeout_ms: a backend call that takes longer kills its worker.
WORKER_TIMEOUT = 15.0
#: A slow page: 400,000 bytes, the test backend's 64 KiB buffers with 0.2 s after each (1.4 s).
SLOW = {"mode": "gray", "resolution": 254, "width": 500, "height": 800, "read-delay": True,
        "read-delay-duration": 200000}


# -- the daemon, shared by the module ------------------------------------------------------------

@dataclass
class Bridge:
    dbus: DBusDaemon
    daemon: Daemon
    sane: TestBackendConfig

    @property
    def address(self) -> str:
        return self.dbus.address


def _serve(folder: Path, stop_timeout: float = 10.0) -> Iterator[Bridge]:
    """The daemon with the simulator and SANE discovery, over the test backend only."""
    sane = TestBackendConfig(folder / "sane")
    config = folder / "stillsvc.toml"
    # A backend call that hangs fails as WorkerHung well before a test's own timeouts.
    config.write_text(f"[sane]\ntimeout_ms = {int(WORKER_TIMEOUT * 1000)}\n")
    dbus = DBusDaemon()
    daemon = Daemon(dbus.address, "--sane", "--config", str(config), env=sane.daemon_env(), simulate=True,
                    workdir=str(folder / "daemon"))
    try:
        asyncio.run(_ready(daemon))
        yield Bridge(dbus, daemon, sane)
    finally:
        daemon.stop(timeout=stop_timeout)
        dbus.stop()


@pytest.fixture(scope="module")
def bridge(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Bridge]:
    """The daemon most tests share."""
    yield from _serve(tmp_path_factory.mktemp("sane-bridge"))


@pytest.fixture(scope="module")
def fragile(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Bridge]:
    """A daemon of its own for the tests that can leave sane-test:0 stuck for good
    (READER_GONE_DEADLOCK), so that nothing else depends on it; a stuck daemon does not
    stop on SIGTERM either, so it is given 3 s before it is killed."""
    yield from _serve(tmp_path_factory.mktemp("sane-fragile"), stop_timeout=3.0)


async def _ready(daemon: Daemon) -> None:
    """Started, and SANE discovery done: both test devices there (once, for the module,
    so that a daemon without them fails every test at once rather than each slowly)."""
    await daemon.ready()
    bus = await connect(daemon.address)
    try:
        async def both() -> bool:
            (devices,) = await call(bus, ROOT, MANAGER, "GetDevices")
            return DEV0 in devices and DEV1 in devices

        try:
            # On a slow machine discovery may finish after the name is owned (START_WAIT).
            await wait_until(both, timeout=20, what="sane-test:0 and sane-test:1 appear")
        except TimeoutError as e:
            raise AssertionError(f"{e}; the daemon's log:\n{daemon.log[-5000:]}") from None
    finally:
        bus.disconnect()


@pytest.fixture
async def bus(bridge: Bridge, request: pytest.FixtureRequest) -> AsyncIterator[MessageBus]:
    """A client connection (and the shared daemon's log on the report of a failing test)."""
    request.node._stillsvc_daemon = bridge.daemon
    connection = await connect(bridge.address)
    yield connection
    connection.disconnect()


@pytest.fixture
async def fragile_bus(fragile: Bridge, request: pytest.FixtureRequest) -> AsyncIterator[MessageBus]:
    request.node._stillsvc_daemon = fragile.daemon
    connection = await connect(fragile.address)
    yield connection
    connection.disconnect()


# -- helpers ---------------------------------------------------------------------------------------

def variant(name: str, value: Any) -> Variant:
    if name in UNSIGNED:
        return Variant("u", value)
    signature = {bool: "b", int: "i", float: "d", str: "s"}[type(value)]
    return Variant(signature, value)


async def open_item(bus: MessageBus, device_id: str, item: str = "Flatbed", mode: str = "data") -> tuple[str, str]:
    """A session on the device and the path of one of its scanning items."""
    session = await create_session(bus, device_id, mode=mode)
    root = await get_property(bus, session, SESSION, "RootItem")
    return session, f"{root}/{item}"


async def write(bus: MessageBus, item: str, values: dict[str, Any]) -> None:
    await call(bus, item, ITEM, "WriteProperties", "a{sv}", [{k: variant(k, v) for k, v in values.items()}])


async def read(bus: MessageBus, item: str) -> dict[str, Any]:
    (values,) = await call(bus, item, ITEM, "ReadProperties")
    return unwrap(values)


async def attributes(bus: MessageBus, item: str) -> dict[str, dict[str, Any]]:
    (attrs,) = await call(bus, item, ITEM, "GetPropertyAttributes")
    return unwrap(attrs)


async def diagnostic(bus: MessageBus, session: str) -> dict[str, Any]:
    (results,) = await call(bus, session, SESSION, "Diagnostic")
    return unwrap(results)


def calls(diag: dict[str, Any], name: str) -> int:
    return int(diag.get(f"calls:sane_{name}", 0))


F_SETPIPE_SZ = 1031


def pipe() -> tuple[int, int]:
    """A pipe for a transfer, 1 MiB where the system allows (fewer wake-ups for the reader)."""
    r, w = os.pipe()
    try:
        fcntl.fcntl(w, F_SETPIPE_SZ, 1 << 20)
    except OSError:
        pass
    return r, w


async def read_to_end(fd: int, got: Callable[[int], None] | None = None) -> bytes:
    """Everything from ``fd`` until end of file, on the event loop (no thread to outlive
    the test), telling ``got`` the bytes so far; the descriptor is closed at the end, or
    when the task is cancelled."""
    os.set_blocking(fd, False)
    chunks = []
    total = 0
    try:
        while True:
            try:
                chunk = os.read(fd, 1 << 20)
            except BlockingIOError:
                await readable(fd, timeout=TRANSFER_TIMEOUT)
                continue
            if not chunk:
                return b"".join(chunks)
            chunks.append(chunk)
            total += len(chunk)
            if got is not None:
                got(total)
    finally:
        os.close(fd)


async def transfer(bus: MessageBus, item: str, fmt: str) -> tuple[dict[str, Any], bytes]:
    """One whole transfer into a pipe read concurrently: (the summary, the bytes)."""
    r, w = pipe()
    reader = asyncio.ensure_future(read_to_end(r))
    try:
        (summary,) = await call(bus, item, ITEM, "Transfer", "hsa{sv}", [0, fmt, {}], unix_fds=[w],
                                timeout=TRANSFER_TIMEOUT)
    except BaseException:
        reader.cancel()
        raise
    finally:
        os.close(w)
    return unwrap(summary), await reader


class Running:
    """A transfer started, whose page has begun (its first bytes are in the pipe)."""

    def __init__(self, bus: MessageBus, item: str, fmt: str = "raw", timeout: float = TRANSFER_TIMEOUT) -> None:
        self.bus, self.item, self.fmt, self.timeout = bus, item, fmt, timeout
        self.r, self.w = pipe()
        self.reply: asyncio.Future[Any] | None = None
        self.reader: asyncio.Future[bytes] | None = None

    async def start(self, read: bool = True, until: int = 0) -> Running:
        """Start it and wait for its first bytes; then (``read``) read the rest concurrently,
        having waited (``until``) for that many bytes."""
        self.reply = asyncio.ensure_future(call(self.bus, self.item, ITEM, "Transfer", "hsa{sv}",
                                                [0, self.fmt, {}], unix_fds=[self.w], timeout=self.timeout))
        await readable(self.r, timeout=20)
        if read:
            enough = asyncio.Event()
            reader_fd, self.r = self.r, -1
            self.reader = asyncio.ensure_future(read_to_end(reader_fd, lambda n: n >= until and enough.set()))
            waiting = asyncio.ensure_future(enough.wait())
            await asyncio.wait({waiting, self.reader}, timeout=20, return_when=asyncio.FIRST_COMPLETED)
            waiting.cancel()
            assert enough.is_set(), f"the transfer did not write {until} bytes"
        return self

    async def result(self) -> tuple[dict[str, Any], bytes]:
        assert self.reply is not None and self.reader is not None
        try:
            (summary,) = await self.reply
        finally:
            self._close_fds()
        return unwrap(summary), await self.reader

    def _close_fds(self) -> None:
        for name in ("r", "w"):
            fd = getattr(self, name)
            if fd >= 0:
                os.close(fd)
                setattr(self, name, -1)

    def close(self) -> None:
        """Our ends of the pipe closed, and whatever still waits (a failed test) stopped."""
        self._close_fds()
        for task in (self.reader, self.reply):
            if task is not None and not task.done():
                task.cancel()


def pnm_pages(blob: bytes) -> list[Pnm]:
    pages, at = [], 0
    while at < len(blob):
        page, at = parse_pnm(blob, at)
        pages.append(page)
    return pages


async def scanimage(bridge: Bridge, *args: str, device: str = "test:0") -> bytes:
    """scanimage's PNM of ``args`` on the test backend, with the daemon's private configuration."""
    proc = await asyncio.create_subprocess_exec("scanimage", "-d", device, "--format=pnm", *args,
                                                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
                                                env=bridge.sane.env)
    try:
        out, err = await asyncio.wait_for(proc.communicate(), 30)
    except TimeoutError:
        where = _process_state(proc.pid)
        proc.kill()
        await proc.wait()
        raise AssertionError(f"scanimage {' '.join(args)} did not finish within 30 s: {where}") from None
    assert proc.returncode == 0, f"scanimage {' '.join(args)} failed ({proc.returncode}): {err.decode()}"
    return out


def area_args(width: int, height: int, dpi: int, left_mm: int = 0, top_mm: int = 0) -> list[str]:
    """scanimage's options for the area the service scanned: ``width`` x ``height`` pixels
    at ``dpi`` from (left_mm, top_mm). The test backend's edges are whole mm and it
    gives floor(mm / 25.4 * dpi) pixels, so the mm are the pixels' rounded back."""
    mm = [round(px * MM_PER_INCH / dpi) for px in (width, height)]
    for px, size in zip((width, height), mm):
        assert int(size / MM_PER_INCH * dpi + 1e-9) == px, f"{px} px at {dpi} dpi is not a whole number of mm"
    return ["--resolution", str(dpi), "-l", str(left_mm), "-t", str(top_mm), "-x", str(mm[0]), "-y", str(mm[1])]


def _process_state(pid: int) -> str:
    """What a process that does not finish is doing: its state and where each thread waits."""
    try:
        with open(f"/proc/{pid}/status") as f:
            state = next((line.strip() for line in f if line.startswith("State:")), "?")
        waits = []
        for task in sorted(os.listdir(f"/proc/{pid}/task")):
            with open(f"/proc/{pid}/task/{task}/wchan") as f:
                waits.append(f"{task}:{f.read() or '-'}")
        return f"{state}, threads waiting in {', '.join(waits)}"
    except OSError as e:
        return f"no /proc entry ({e.strerror}): it exited, and something still holds its output open"


def first_difference(a: bytes, b: bytes) -> str:
    if len(a) != len(b):
        return f"{len(a)} bytes vs {len(b)}"
    i = next(i for i in range(len(a)) if a[i] != b[i])
    return f"first difference at byte {i} of {len(a)}: {a[i]:#04x} vs {b[i]:#04x}"


def assert_same_image(mine: Pnm, reference: Pnm, what: str) -> None:
    assert (mine.magic, mine.width, mine.height, mine.maxval) == \
        (reference.magic, reference.width, reference.height, reference.maxval), what
    same = mine.data == reference.data  # not in the assert: pytest would diff megabytes
    assert same, f"{what}: the service's pixels differ from scanimage's: {first_difference(mine.data, reference.data)}"


def worker_pids(daemon: Daemon, sane_name: str) -> list[int]:
    """The daemon's live SANE worker processes for ``sane_name``, from /proc."""
    assert daemon.proc is not None
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as f:
                fields = f.read().rsplit(b")", 1)[1].split()
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                argv = f.read().split(b"\0")
        except (FileNotFoundError, ProcessLookupError):
            continue
        state, ppid = fields[0], int(fields[1])
        if ppid == daemon.proc.pid and state != b"Z" and WORKER_MODULE.encode() in argv \
                and sane_name.encode() in argv:
            found.append(int(entry))
    return found


async def _state_is(bus: MessageBus, path: str, state: str) -> bool:
    return await get_property(bus, path, DEVICE, "State") == state


def zombie(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rsplit(b")", 1)[1].split()[0] == b"Z"
    except FileNotFoundError:
        return False


# -- 1. discovery --------------------------------------------------------------------------------------

async def test_discovery_lists_both_test_devices(bus):
    (devices,) = await call(bus, ROOT, MANAGER, "GetDevices")
    assert devices == sorted([DEV0, DEV1, f"{ROOT}/devices/sim0"])
    for path, name in ((DEV0, "test:0"), (DEV1, "test:1")):
        props = await get_all(bus, path, DEVICE)
        assert props["Id"] == f"sane-{name}"
        assert (props["Vendor"], props["Model"], props["Driver"], props["Port"]) == \
            ("Noname", "frontend-tester", "sane", name)
        assert props["Name"] == "Noname frontend-tester virtual device"
        assert (props["Kind"], props["Simulated"], props["State"], props["StateReason"]) == \
            ("scanner", False, "ready", "")
        assert {"flatbed", "feeder"} <= set(props["Capabilities"])
        assert (await call(bus, ROOT, MANAGER, "FindDevice", "s", [f"sane-{name}"]))[0] == path
    (candidates,) = await call(bus, ROOT, MANAGER, "GetCandidates")
    sane = {c["id"]: c for c in unwrap(candidates) if c["subsystem"] == "sane"}
    assert set(sane) == {"test:0", "test:1"}
    for name, entry in sane.items():
        assert (entry["driver"], entry["status"], entry["device_id"], entry["reason"]) == \
            ("sane", "added", f"sane-{name}", "")
        assert (entry["vendor"], entry["model"]) == ("Noname", "frontend-tester")


async def test_configured_device_and_exclude(tmp_path: Path, request: pytest.FixtureRequest):
    """A [[device]] for test:0 is bridged under its own id and discovery does not add
    test:0 again; [sane] exclude keeps test:1 out, and says why."""
    sane = TestBackendConfig(tmp_path / "sane")
    config = tmp_path / "stillsvc.toml"
    config.write_text('[sane]\nexclude = ["test:1"]\n\n'
                      '[[device]]\nid = "flatbed"\ndriver = "sane"\nport = "test:0"\n\n'
                      '[[device]]\nid = "excluded"\ndriver = "sane"\nport = "test:1"\n')
    dbus = DBusDaemon()
    daemon = Daemon(dbus.address, "--sane", "--config", str(config), env=sane.daemon_env(), simulate=True,
                    workdir=str(tmp_path / "daemon"))
    request.node._stillsvc_daemon = daemon
    try:
        await daemon.ready()
        bus = await connect(dbus.address)
        try:
            # Discovery is done before the name is owned, unless it took longer than the
            # daemon waits for it (it says so); then it is done once test:1 was turned down.
            if "libsane is still listing its devices" in daemon.log:
                await wait_until(lambda: "SANE device not bridged" in daemon.log, timeout=20, what="SANE discovery")
            (devices,) = await call(bus, ROOT, MANAGER, "GetDevices")
            assert devices == [f"{ROOT}/devices/excluded", f"{ROOT}/devices/flatbed", f"{ROOT}/devices/sim0"]
            flatbed = await get_all(bus, f"{ROOT}/devices/flatbed", DEVICE)
            assert (flatbed["Id"], flatbed["Driver"], flatbed["Port"], flatbed["State"]) == \
                ("flatbed", "sane", "test:0", "ready")
            assert (flatbed["Vendor"], flatbed["Model"]) == ("Noname", "frontend-tester")
            ports = [(await get_property(bus, path, DEVICE, "Port")) for path in devices]
            assert ports.count("test:0") == 1, ports

            (candidates,) = await call(bus, ROOT, MANAGER, "GetCandidates")
            candidates = unwrap(candidates)
            assert [c for c in candidates if c["subsystem"] == "sane"] == []
            excluded = next(c for c in candidates if c["id"] == "excluded")
            assert excluded["status"] == "failed"
            assert "test:1" in excluded["reason"] and "[sane] exclude" in excluded["reason"], excluded["reason"]
            state = await get_all(bus, f"{ROOT}/devices/excluded", DEVICE)
            assert state["State"] == "failed" and "[sane] exclude" in state["StateReason"]
            log = daemon.log
            assert "sane_name='test:1'" in log[log.index("SANE device not bridged"):].splitlines()[0]
            assert "matches 'test:1' in [sane] exclude" in log

            _, item = await open_item(bus, "flatbed")
            summary, data = await transfer(bus, item, "pnm")
            assert (summary["width"], summary["height"]) == DEFAULT_PAGE
            assert parse_pnm(data)[0].data == bytes(DEFAULT_PAGE[0] * DEFAULT_PAGE[1])  # Solid black, gray
        finally:
            bus.disconnect()
    finally:
        daemon.stop()
        dbus.stop()


# -- 2. options as properties -----------------------------------------------------------------------

async def test_options_are_properties_with_types_and_valid_values(bus):
    _, item = await open_item(bus, "sane-test:1", mode="status")
    attrs = await attributes(bus, item)

    def shape(name: str) -> tuple[str, str, dict[str, Any]]:
        a = attrs[name]
        return a["type"], a["access"], a["valid"]

    assert shape("resolution") == ("u", "rw", {"kind": "range", "min": 1, "max": 1200, "step": 1})
    assert shape("mode")[:2] == ("s", "rw") and sorted(shape("mode")[2]["values"]) == ["color", "gray", "lineart"]
    assert shape("depth") == ("u", "rw", {"kind": "list", "values": [1, 8, 16]})
    assert shape("source") == ("s", "r", {"kind": "list", "values": ["flatbed"]})
    assert shape("read-delay-duration") == ("i", "rw", {"kind": "range", "min": 1000, "max": 200000, "step": 1000})
    assert shape("read-limit-size") == ("i", "rw", {"kind": "range", "min": 1, "max": 65536, "step": 1})
    assert shape("int-constraint-range") == ("i", "rw", {"kind": "range", "min": 4, "max": 192, "step": 2})
    kind, access, valid = shape("fixed-constraint-range")
    assert (kind, access, valid["kind"], valid["step"]) == ("d", "rw", "range", 2.0)
    assert valid["min"] == pytest.approx(-42.17, abs=1e-3) and valid["max"] == pytest.approx(32768, abs=1e-3)
    assert shape("int-constraint-word-list") == (
        "i", "rw", {"kind": "list", "values": [-42, -8, 0, 17, 42, 256, 65536, 16777216, 1073741824]})
    assert shape("test-picture") == (
        "s", "rw", {"kind": "list", "values": ["Solid black", "Solid white", "Color pattern", "Grid"]})
    kind, access, valid = shape("read-return-value")
    assert (kind, access) == ("s", "rw")
    assert {"Default", "SANE_STATUS_JAMMED", "SANE_STATUS_COVER_OPEN", "SANE_STATUS_NO_DOCS"} <= set(valid["values"])
    for name in ("hand-scanner", "three-pass", "read-delay", "enable-test-options"):
        assert shape(name) == ("b", "rw", {"kind": "none"}), name
    for name in ("bool-soft-detect", "bool-hard-select", "bool-hard-select-soft-detect"):
        assert shape(name)[:2] == ("b", "r"), name
    assert "µs" in attrs["read-delay-duration"]["description"]
    # Buttons, arrays (gamma tables) and the geometry options under their SANE names are not properties.
    for name in ("button", "print-options", "gamma-table", "red-gamma-table", "int-constraint-array",
                 "tl-x", "tl-y", "br-x", "br-y"):
        assert name not in attrs, name
    feeder = await attributes(bus, item.replace("/Flatbed", "/Feeder"))
    assert feeder["source"]["valid"]["values"] == ["feeder"]
    assert feeder["pages"]["access"] == "rw" and feeder["pages"]["valid"] == \
        {"kind": "range", "min": 0, "max": 1000, "step": 1}


async def test_inactive_follows_the_device(bus):
    """An option's inactive mark is the device's: three-pass needs colour, its order
    needs three-pass, read-delay-duration needs read-delay."""
    _, item = await open_item(bus, "sane-test:1")

    async def inactive() -> set[str]:
        return {name for name, a in (await attributes(bus, item)).items() if a["inactive"]}

    # A scan with the defaults leaves the device in Gray, three-pass off.
    await transfer(bus, item, "raw")
    gray = await inactive()
    assert {"three-pass", "three-pass-order", "read-delay-duration", "read-limit-size", "bool-soft-detect",
            "int-constraint-range"} <= gray
    assert not gray & {"resolution", "mode", "depth", "hand-scanner", "read-delay", "test-picture",
                       "enable-test-options", "width"}

    await write(bus, item, {"mode": "color", "three-pass": True, "read-delay": True, "read-delay-duration": 1000,
                            "enable-test-options": True})
    assert await inactive() == gray, "writing the item's copy must not change what the device marks"
    await transfer(bus, item, "raw")
    colour = await inactive()
    assert not colour & {"three-pass", "three-pass-order", "read-delay-duration", "bool-soft-detect",
                         "int-constraint-range"}, colour

    await write(bus, item, {"mode": "gray", "three-pass": False, "read-delay": False, "enable-test-options": False})
    await transfer(bus, item, "raw")
    assert await inactive() == gray


async def test_writes_are_validated_without_touching_the_device(bus):
    session, item = await open_item(bus, "sane-test:1")
    # With the lock held the handle stays open, so nothing but the service's own use of
    # the device moves the worker's counters (Diagnostic itself makes no SANE call then).
    await call(bus, session, SESSION, "LockDevice", "u", [5000])
    try:
        before = await diagnostic(bus, session)
        assert before["handle_open"] is True and before["worker_pid"] > 0
        assert calls(await diagnostic(bus, session), "control_option") == calls(before, "control_option")

        refused = [
            ("read-delay-duration", 1500, "1000..200000 step 1000"),  # between two steps
            ("read-delay-duration", 300000, "1000..200000"),
            ("read-delay-duration", 0, "1000..200000"),
            ("int-constraint-range", 5, "4..192 step 2"),
            ("test-picture", "Nope", "Color pattern"),
            ("read-return-value", "SANE_STATUS_WHATEVER", "SANE_STATUS_JAMMED"),
            ("resolution", 1201, "1..1200"),
            ("mode", "halftone", "lineart"),
            ("bool-soft-detect", True, "read-only"),
            ("source", "feeder", "read-only"),
        ]
        for name, value, hint in refused:
            error = await expect_error("InvalidArgument", write(bus, item, {name: value}))
            assert name in error.text and hint in error.text, (name, error.text)
        error = await expect_error("InvalidArgument", call(bus, item, ITEM, "WriteProperties", "a{sv}",
                                                           [{"three-pass": Variant("s", "yes")}]))
        assert "three-pass" in error.text
        await expect_error("InvalidArgument", write(bus, item, {"no-such-option": True}))

        # Valid values are kept, inactive options included (they reach the device when active).
        await write(bus, item, {"read-delay-duration": 5000, "three-pass-order": "BGR", "int-constraint-range": 6,
                                "test-picture": "Grid"})
        values = await read(bus, item)
        assert (values["read-delay-duration"], values["three-pass-order"], values["int-constraint-range"],
                values["test-picture"]) == (5000, "BGR", 6, "Grid")

        after = await diagnostic(bus, session)
        for counter in ("control_option", "get_option_descriptor", "open", "start"):
            assert calls(after, counter) == calls(before, counter), (counter, before, after)
        assert after["worker_pid"] == before["worker_pid"]

        # The counter is live: a transfer writes the item to the device.
        await transfer(bus, item, "raw")
        assert calls(await diagnostic(bus, session), "control_option") > calls(after, "control_option")
    finally:
        await call(bus, session, SESSION, "UnlockDevice")


# -- 3. the reload rule ---------------------------------------------------------------------------

async def test_options_set_after_a_reload_in_one_transfer(bridge, bus):
    """mode answers RELOAD_OPTIONS; the options set after it in the same transfer would
    get INVAL from the test backend unless the descriptors were read again."""
    session, item = await open_item(bus, "sane-test:0")
    await call(bus, session, SESSION, "LockDevice", "u", [5000])
    try:
        await transfer(bus, item, "raw")  # the device in Gray, three-pass off, read-limit off
        settled = await diagnostic(bus, session)
        await transfer(bus, item, "raw")  # nothing changes: no descriptor is read again
        plain = await diagnostic(bus, session)
        assert calls(plain, "get_option_descriptor") == calls(settled, "get_option_descriptor")

        await write(bus, item, {**AREA, **PATTERN, "mode": "color", "three-pass": True, "three-pass-order": "BGR",
                                "read-limit": True, "read-limit-size": 4096})
        summary, data = await transfer(bus, item, "pnm")
        after = await diagnostic(bus, session)
    finally:
        await call(bus, session, SESSION, "UnlockDevice")
    mine = parse_pnm(data)[0]
    assert (summary["mode"], summary["width"], summary["height"]) == ("color", mine.width, mine.height)
    assert calls(after, "get_option_descriptor") > calls(plain, "get_option_descriptor"), "no reload happened"
    assert calls(after, "start") - calls(plain, "start") == 3, "three-pass order and all: three frames"
    reference = await scanimage(bridge, "--mode", "Color", "--three-pass=yes", "--three-pass-order", "BGR",
                                "--read-limit=yes", "--read-limit-size", "4096", *PATTERN_ARGS,
                                *area_args(mine.width, mine.height, 254))
    assert_same_image(mine, parse_pnm(reference)[0], "colour three-pass BGR after a reload")


# -- 4. an A4 page, and the scan area ---------------------------------------------------------------

A4_300 = {"mode": "color", "resolution": 300, "width": 2480, "height": 3507}


@pytest.mark.parametrize("picture", ["Solid black", "Color pattern"])
async def test_a4_colour_page_at_300_dpi(bridge, bus, picture):
    """2480 x 3507 at 300 dpi, pixel for pixel the same as scanimage's 210 x 297 mm."""
    _, item = await open_item(bus, "sane-test:0")
    await write(bus, item, {**A4_300, "test-picture": picture})
    summary, data = await transfer(bus, item, "pnm")
    assert (summary["format"], summary["pages"], summary["width"], summary["height"], summary["mode"],
            summary["depth"], summary["resolution"]) == ("pnm", 1, 2480, 3507, "color", 8, 300)
    mine, end = parse_pnm(data)
    assert end == len(data) == summary["bytes"]
    assert (mine.magic, mine.width, mine.height, mine.maxval) == ("P6", 2480, 3507, 255)
    assert len(mine.data) == 26_092_080
    if picture == "Solid black":
        assert mine.data.count(0) == len(mine.data)
    else:
        assert len(set(mine.data[:7440 * 64])) > 16, "the colour pattern is not uniform"
    reference = await scanimage(bridge, "--mode", "Color", "--resolution", "300", "-x", "210", "-y", "297",
                                "--test-picture", picture)
    assert_same_image(mine, parse_pnm(reference)[0], f"A4 300 dpi colour, {picture}")


@pytest.mark.parametrize("values, expected", [
    pytest.param(A4_300, (2480, 3507), id="A4-300dpi"),
    pytest.param(AREA, (500, 400), id="50x40mm-254dpi"),
    pytest.param({**AREA, "x_offset": 100, "y_offset": 50, "width": 200}, (200, 400), id="offset-254dpi"),
    pytest.param({"resolution": 254, "x_offset": 0, "y_offset": 0, "width": 490, "height": 390}, (490, 390),
                 id="49x39mm-254dpi"),
])
async def test_scan_area_on_the_backends_steps_is_scanned_exactly(bus, values, expected):
    """Edges the backend can place exactly (whole mm for the test backend) give exactly
    the pixels asked for. (At commit 43a5ece an edge on a step went one step too far:
    the far edge was moved 0.35 pixel out before it was rounded up to the step, so A4
    at 300 dpi came out 2492 pixels wide.)"""
    _, item = await open_item(bus, "sane-test:0")
    await write(bus, item, {"mode": "gray", **values})
    summary, _ = await transfer(bus, item, "raw")
    assert (summary["width"], summary["height"]) == expected


@pytest.mark.parametrize("values", [
    {"resolution": 254, "x_offset": 105, "y_offset": 55, "width": 195, "height": 395},
    {"resolution": 75, "x_offset": 0, "y_offset": 0, "width": 500, "height": 400},
    {"resolution": 300, "x_offset": 7, "y_offset": 0, "width": 1001, "height": 999},
], ids=["half-mm-254dpi", "75dpi", "300dpi"])
async def test_scan_area_off_the_steps_is_covered(bus, values):
    """Edges between the backend's steps go outwards: the page covers the area asked for,
    with less than a step (1 mm) more at either edge."""
    _, item = await open_item(bus, "sane-test:0")
    await write(bus, item, {"mode": "gray", **values})
    summary, _ = await transfer(bus, item, "raw")
    step = values["resolution"] / MM_PER_INCH  # pixels in one mm
    for got, asked in ((summary["width"], values["width"]), (summary["height"], values["height"])):
        assert asked <= got < asked + 2 * step, (got, asked, step)


# -- 5. frames -------------------------------------------------------------------------------------

HAND = ["--hand-scanner=yes", "--resolution", "254"]  # no geometry: it is inactive
#: case: (the item's values besides AREA, scanimage's mode options, (PNM magic, maxval,
#: sane_start calls for the page), the scan area's top left corner in mm or None for a hand scanner)
FRAMES = {
    "gray-8": ({"mode": "gray", "depth": 8}, ["--mode", "Gray", "--depth", "8"], ("P5", 255, 1), (0, 0)),
    "lineart": ({"mode": "lineart"}, ["--mode", "Gray", "--depth", "1"], ("P4", 1, 1), (0, 0)),
    "gray-16": ({"mode": "gray", "depth": 16}, ["--mode", "Gray", "--depth", "16"], ("P5", 65535, 1), (0, 0)),
    "color-16": ({"mode": "color", "depth": 16}, ["--mode", "Color", "--depth", "16"], ("P6", 65535, 1), (0, 0)),
    "color-8-offset": ({"mode": "color", "depth": 8, "x_offset": 100, "y_offset": 50, "width": 200},
                       ["--mode", "Color"], ("P6", 255, 1), (10, 5)),
    "three-pass": ({"mode": "color", "depth": 8, "three-pass": True},
                   ["--mode", "Color", "--depth", "8", "--three-pass=yes"], ("P6", 255, 3), (0, 0)),
    "hand-scanner": ({"mode": "color", "depth": 8, "hand-scanner": True},
                     ["--mode", "Color", "--depth", "8", *HAND], ("P6", 255, 1), None),
    "hand-scanner-lineart": ({"mode": "lineart", "hand-scanner": True},
                             ["--mode", "Gray", "--depth", "1", *HAND], ("P4", 1, 1), None),
}


@pytest.mark.parametrize("case", list(FRAMES))
async def test_frames_match_scanimage(bridge, bus, case):
    props, args, (magic, maxval, starts), corner = FRAMES[case]
    session, item = await open_item(bus, "sane-test:0")
    values = {**AREA, **PATTERN, **props}
    await write(bus, item, values)
    before = await diagnostic(bus, session)
    summary, data = await transfer(bus, item, "pnm")
    after = await diagnostic(bus, session)
    mine = parse_pnm(data)[0]
    assert (mine.magic, mine.maxval) == (magic, maxval)
    assert (summary["width"], summary["height"]) == (mine.width, mine.height)
    assert summary["depth"] == {1: 1, 255: 8, 65535: 16}[maxval]
    assert calls(after, "start") - calls(before, "start") == starts, "frames (sane_start calls) for one page"
    if corner is None:
        assert mine.width == 1100, "a hand scanner is 11 cm wide"  # and the height is known only at the end
        geometry: list[str] = []
    else:
        assert mine.width >= values["width"] and mine.height >= values["height"], "the area asked for is covered"
        geometry = area_args(mine.width, mine.height, 254, *corner)
    assert len(set(mine.data)) > 1, "the test pattern is not uniform"
    reference = parse_pnm(await scanimage(bridge, *args, *geometry, *PATTERN_ARGS))[0]
    assert_same_image(mine, reference, case)


@pytest.mark.parametrize("mode, depth, args, loss", [
    ("gray", 8, ["--mode", "Gray", "--depth", "8"], 7),
    ("lineart", 1, ["--mode", "Gray", "--depth", "1"], 7),
    ("color", 16, ["--mode", "Color", "--depth", "16"], 3),
], ids=["gray-8", "lineart", "color-16"])
async def test_line_padding_is_dropped(bridge, bus, mode, depth, args, loss):
    """ppl-loss: the backend's lines are longer than its pixels (bytes_per_line covers the
    whole area, pixels_per_line ``loss`` fewer). The service's rows hold the pixels only;
    scanimage writes the padding into its PNM, so it is cut off here to compare."""
    _, item = await open_item(bus, "sane-test:0")
    await write(bus, item, {**AREA, **PATTERN, "mode": mode, "depth": depth, "ppl-loss": loss})
    summary, data = await transfer(bus, item, "pnm")
    mine = parse_pnm(data)[0]
    area = mine.width + loss  # the pixels of the scan area, padding included
    assert summary["width"] == mine.width and area >= AREA["width"]

    def line_bytes(pixels: int) -> int:
        return (pixels + 7) // 8 if depth == 1 else pixels * (3 if mode == "color" else 1) * depth // 8

    padded, line = line_bytes(area), line_bytes(mine.width)
    assert padded > line
    out = await scanimage(bridge, *args, "--ppl-loss", str(loss), *area_args(area, mine.height, 254),
                          *PATTERN_ARGS)
    header = parse_pnm(out)[0]
    assert (header.width, header.height) == (mine.width, mine.height)
    rows = out[len(out) - padded * mine.height:]
    unpadded = b"".join(rows[y * padded:y * padded + line] for y in range(mine.height))
    assert_same_image(mine, Pnm(header.magic, header.width, header.height, header.maxval, unpadded),
                      f"{mode} with ppl-loss {loss}")


# -- 6. the feeder ------------------------------------------------------------------------------------

async def test_feeder_until_empty(bridge, bus):
    session, feeder = await open_item(bus, "sane-test:0", "Feeder")
    await write(bus, feeder, {**PATTERN, "pages": 0})
    summary, data = await transfer(bus, feeder, "pnm")
    pages = pnm_pages(data)
    assert summary["pages"] == len(pages) == 10, "the test backend's feeder holds ten pages"
    reference = parse_pnm(await scanimage(bridge, "--source", "Automatic Document Feeder", *PATTERN_ARGS))[0]
    for n, page in enumerate(pages):
        assert_same_image(page, reference, f"feeder page {n + 1}")

    # A second job right after: the device is opened afresh for it (the handle is
    # closed between uses), and the test backend's feeder is full again on sane_open.
    before = await diagnostic(bus, session)
    summary, data = await transfer(bus, feeder, "pdf")
    after = await diagnostic(bus, session)
    assert summary["pages"] == len(pypdf.PdfReader(io.BytesIO(data)).pages) == 10
    assert calls(after, "start") - calls(before, "start") == 11, "ten pages, and the start that found it empty"


async def test_feeder_empty_while_the_handle_stays_open(bus):
    """Under LockDevice the handle stays open: ten pages taken (without the start that
    would find the feeder empty) leave it empty, and the next job fails Empty."""
    session, feeder = await open_item(bus, "sane-test:0", "Feeder")
    await call(bus, session, SESSION, "LockDevice", "u", [5000])
    try:
        await write(bus, feeder, {"pages": 10})
        summary, _ = await transfer(bus, feeder, "tiff")
        assert summary["pages"] == 10
        error = await expect_error("Empty", transfer(bus, feeder, "tiff"))
        assert "feeder is empty" in error.text and "SANE_STATUS_NO_DOCS" in error.text, error.text
        # The backend refills its feeder once it has answered NO_DOCS.
        await write(bus, feeder, {"pages": 0})
        summary, _ = await transfer(bus, feeder, "raw")
        assert summary["pages"] == 10
    finally:
        await call(bus, session, SESSION, "UnlockDevice")
    assert await get_property(bus, DEV0, DEVICE, "State") == "ready"


# -- 7. errors from sane_read ------------------------------------------------------------------------

@pytest.mark.parametrize("status, error, phrase", [
    ("JAMMED", "Failed", "paper jam"),
    ("COVER_OPEN", "Failed", "cover is open"),
    ("NO_DOCS", "Empty", "feeder is empty"),
])
async def test_sane_read_errors(bus, status, error, phrase):
    _, item = await open_item(bus, "sane-test:0")
    await write(bus, item, {"read-return-value": f"SANE_STATUS_{status}"})
    failure = await expect_error(error, transfer(bus, item, "pnm"))
    assert f"SANE_STATUS_{status}" in failure.text and phrase in failure.text, failure.text
    assert "on the first page" in failure.text, failure.text
    # Still usable: no failed state, and the next scan works. (The worker is not
    # compared: once in about fifty runs the test backend's sane_cancel after such an
    # error stalled, and the worker was replaced after [sane] timeout_ms.)
    props = await get_all(bus, DEV0, DEVICE)
    assert (props["State"], props["StateReason"]) == ("ready", "")
    await write(bus, item, {"read-return-value": "Default"})
    summary, data = await transfer(bus, item, "pnm")
    page = parse_pnm(data)[0]
    assert (page.width, page.height, summary["height"]) == (*DEFAULT_PAGE, DEFAULT_PAGE[1])


# -- 7b. cancelling ----------------------------------------------------------------------------------

#: 3 MB in 1 MiB blocks (what the worker sends at a time), 0.05 s after each 64 KiB of the
#: backend: a block about every 0.8 s, 2.3 s in all.
LONG = {"mode": "gray", "resolution": 254, "width": 1000, "height": 3000, "read-delay": True,
        "read-delay-duration": 50000}


async def test_a_cancelled_scan_leaves_the_device_usable(bus):
    """Cancel() once pixel data flows (the first 1 MiB block is out): the transfer fails
    Cancelled, the worker lives on, the device is ready and scans again."""
    await wait_until(lambda: _state_is(bus, DEV0, "ready"), timeout=20, what="sane-test:0 ready")
    session, item = await open_item(bus, "sane-test:0")
    before = await diagnostic(bus, session)
    await write(bus, item, LONG)
    running = await Running(bus, item).start(until=36 + 1000)
    try:
        await call(bus, item, ITEM, "Cancel")
        error = await expect_error("Cancelled", running.reply)
    finally:
        running.close()
    assert "cancelled" in error.text
    after = await diagnostic(bus, session)
    assert calls(after, "cancel") > calls(before, "cancel") or after["workers_started"] > before["workers_started"]
    props = await get_all(bus, DEV0, DEVICE)
    assert (props["State"], props["StateReason"]) == ("ready", "")
    await write(bus, item, {**AREA, "read-delay": False})
    summary, data = await transfer(bus, item, "raw")
    assert (summary["pages"], len(data)) == (1, 36 + summary["width"] * summary["height"])


@pytest.mark.parametrize("how", ["cancel", "close-reader"])
async def test_cancelling_a_slow_scan_takes_effect_at_once(fragile_bus, how):
    bus = fragile_bus
    await wait_until(lambda: _state_is(bus, DEV0, "ready"), timeout=20, what="sane-test:0 ready")
    _, item = await open_item(bus, "sane-test:0")
    # 1 MB: one block of the worker, 16 buffers of the backend with 0.1 s after each.
    await write(bus, item, {**SLOW, "height": 2000, "read-delay-duration": 100000})
    loop = asyncio.get_running_loop()
    running = await Running(bus, item, timeout=8).start(read=how == "cancel")
    try:
        asked = loop.time()
        if how == "cancel":
            await call(bus, item, ITEM, "Cancel")
        else:
            os.close(running.r)
            running.r = -1
        error = await expect_error("Cancelled", running.reply)
        took = loop.time() - asked
    finally:
        running.close()
    assert took < 0.8, f"the scan stopped {took:.2f} s after it was cancelled ({error.text})"


async def test_a_transfer_whose_reader_is_gone_fails_and_the_device_lives_on(fragile_bus):
    """A descriptor whose reader is closed before the page's header is written. The
    simulator answers Cancelled at once (checked first); the SANE device must too."""
    bus = fragile_bus
    for device in ("sim0", "sane-test:0"):
        session, item = await open_item(bus, device)
        r, w = os.pipe()
        os.close(r)
        try:
            error = await expect_error("Cancelled", call(bus, item, ITEM, "Transfer", "hsa{sv}", [0, "raw", {}],
                                                         unix_fds=[w], timeout=5))
        finally:
            os.close(w)
        assert "closed its end" in error.text, (device, error.text)
        status = unwrap((await call(bus, session, SESSION, "GetStatus"))[0])
        assert status["online"] is True, (device, status)
        summary, _ = await transfer(bus, item, "raw")
        assert summary["pages"] == 1, device


# -- 8. a slow backend beside the others ----------------------------------------------------------------


async def test_slow_backend_does_not_hold_up_other_devices(bridge, bus):
    _, slow_item = await open_item(bus, "sane-test:0")
    await write(bus, slow_item, SLOW)
    other = await connect(bridge.address)
    try:
        _, sim_item = await open_item(other, "sim0")
        await write(other, sim_item, {"resolution": 75, "mode": "color", "width": 64, "height": 48})
        _, test1_item = await open_item(other, "sane-test:1")
        loop = asyncio.get_running_loop()
        started = loop.time()
        slow = await Running(bus, slow_item).start()
        try:
            sim_summary, sim_data = await transfer(other, sim_item, "raw")
            sim_done = loop.time()
            assert not slow.reply.done(), "the slow scan ended before sim0's transfer"
            test1_summary, _ = await transfer(other, test1_item, "raw")
            assert not slow.reply.done(), "the slow scan ended before sane-test:1's transfer"
            summary, data = await slow.result()
        finally:
            slow.close()
        slow_done = loop.time()
    finally:
        other.disconnect()
    assert (sim_summary["width"], sim_summary["height"], len(sim_data)) == (64, 48, 36 + 64 * 48 * 3)
    assert (test1_summary["width"], test1_summary["height"]) == DEFAULT_PAGE
    assert summary["width"] >= 500 and summary["height"] >= 800
    assert len(data) == 36 + summary["width"] * summary["height"]
    assert slow_done - started >= 1.0, "read-delay did not slow the backend down"
    assert sim_done < slow_done


# -- 9. a backend that crashes -------------------------------------------------------------------------

@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGSEGV], ids=lambda s: s.name)
async def test_worker_crash_mid_scan(bridge, bus, sig):
    # Ready to begin with (not still coming back from an earlier test's crash).
    await wait_until(lambda: _state_is(bus, DEV0, "ready"), timeout=20, what="sane-test:0 ready")
    session, item = await open_item(bus, "sane-test:0")
    before = await diagnostic(bus, session)
    pid = before["worker_pid"]
    assert worker_pids(bridge.daemon, "test:0") == [pid], "Diagnostic's worker_pid is the daemon's worker"
    await write(bus, item, {**SLOW, "height": 2000})  # about 3 s if it ran to its end

    async with Signals(bus, "PropertiesChanged", interface=PROPERTIES, path=DEV0) as changes:
        running = await Running(bus, item).start()
        try:
            os.kill(pid, sig)
            failure = await expect_error("Failed", running.result())
        finally:
            running.close()
        assert sig.name in failure.text and "worker process" in failure.text, failure.text

        def states(received: list[Any]) -> list[tuple[str, str]]:
            found = []
            for m in received:
                changed = unwrap(m.body[1])
                if m.body[0] == DEVICE and "State" in changed:
                    found.append((changed["State"], changed.get("StateReason", "")))
            return found

        def recovered(received: list[Any]) -> bool:
            seen = [s for s, _ in states(received)]
            return "failed" in seen and "ready" in seen[seen.index("failed"):]

        await changes.wait(until=recovered, timeout=20)
    failed = next(reason for state, reason in states(changes.received) if state == "failed")
    assert sig.name in failed, failed
    props = await get_all(bus, DEV0, DEVICE)
    assert (props["State"], props["StateReason"]) == ("ready", "")

    after = await diagnostic(bus, session)
    assert after["worker_pid"] not in (0, pid)
    assert after["workers_started"] == before["workers_started"] + 1
    assert sig.name in after["last_worker_end"]
    assert worker_pids(bridge.daemon, "test:0") == [after["worker_pid"]]
    assert not zombie(pid), "the killed worker was not reaped"

    # The device scans again, the same session and all.
    await write(bus, item, {**AREA, **PATTERN, "read-delay": False})
    _, data = await transfer(bus, item, "pnm")
    mine = parse_pnm(data)[0]
    reference = await scanimage(bridge, "--mode", "Gray", *area_args(mine.width, mine.height, 254), *PATTERN_ARGS)
    assert_same_image(mine, parse_pnm(reference)[0], "a scan after the crash")
    # And the rest of the service never noticed.
    _, sim_item = await open_item(bus, "sim0")
    await write(bus, sim_item, {"resolution": 75, "width": 64, "height": 48})
    sim_summary, _ = await transfer(bus, sim_item, "raw")
    assert (sim_summary["width"], sim_summary["height"]) == (64, 48)
    assert_daemon_healthy(bridge.daemon)
