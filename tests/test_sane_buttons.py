"""The SANE bridge's sensor poller, against libsane's real ``test`` backend.

A SANE scanner cannot tell of a button press: the bridge reads its sensor
options every ``service.poll_interval_ms`` (200 ms here), and only while nobody
else could want the device. Three parts:

A. **When it polls** (device ``t`` = ``test:0``, configured with the real,
   read-only option ``bool-soft-detect`` as an extra sensor, so every poll is one
   ``sane_control_option`` in the worker process): while the device is idle; not
   while a session holds data mode, nor during a transfer, nor while another
   program holds the device's lock file or has it handed over with ``stillctl
   lock``; and the SANE handle is closed while another program has the device
   and opened again after.
B. **What it raises**, with the bridge's simulated sensors
   (``STILLSVC_SANE_FAKE_SENSORS``: a JSON file the worker reads at every poll):
   ``scan`` going false → true is one ``scan-button`` event and one launch of the
   registered application; held true it is nothing more, let go it is nothing;
   pressed again it is a second event. A device nobody registered for counts
   its events as undelivered.
C. **Other SANE programs**: ``stillctl lock DEVICE -- scanimage`` gets the whole
   image; a ``scanimage`` beside the idle bridge works too (the test backend lets
   two processes open ``test:0``).

How the polls are counted. The worker's own counters of its libsane calls come
through the session method ``Diagnostic`` (``calls:sane_control_option``, ...).
Diagnostic takes the device lock like any device I/O, so it never runs during a
poll; it makes no SANE call of its own while the handle is open (it reads the
worker's counters only), but opens the handle first when it is closed — then
its counters include the open (``sane_open`` and one ``sane_control_option``
per option). So counters are compared between two Diagnostic calls made while
the handle stays open; across a window in which the handle was closed, only
``sane_open`` and ``sane_close`` are compared. And while another program has the
device, Diagnostic cannot run at all (it waits for the device, or is refused
with Busy during a hand-over): there the polls are counted without touching the
service, by watching with inotify how often the worker opens the simulated
sensors file, which it reads at every poll. (Part A excludes ``test:1`` with
``[sane] exclude``, so the worker of ``t`` is the only reader of that file; the
test's own writes go through a temporary file and a rename.)

The windows in which nothing may happen last ``WINDOW`` = 1 s, five poll
intervals; everything else waits for the event itself.
"""

from __future__ import annotations

import asyncio
import ctypes
import fcntl
import json
import os
import pwd
import shutil
import struct
import sys
import tempfile
import textwrap
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Self

import pytest
from dbus_fast import Variant
from dbus_fast.aio import MessageBus
from helpers import (
    DEVICE,
    ITEM,
    MANAGER,
    ROOT,
    SESSION,
    Daemon,
    Signals,
    call,
    connect,
    create_session,
    expect_error,
    get_property,
    unwrap,
    wait_until,
)
from sane_backend import TestBackendConfig, test_backend_unavailable_reason
from test_ctl import finish, read_until, start, stillctl

from stillsvc.common.names import device_path

_UNAVAILABLE = test_backend_unavailable_reason()
if _UNAVAILABLE is not None:
    pytest.skip(_UNAVAILABLE, allow_module_level=True)

#: A bounded window in which nothing may happen: five poll intervals.
WINDOW = 1.0
POLL_INTERVAL_MS = 200

SCHEDULING_CONFIG = f"""\
[service]
poll_interval_ms = {POLL_INTERVAL_MS}

[sane]
exclude = ["test:1"]

[[device]]
id = "t"
driver = "sane"
port = "test:0"
options = {{ sensors = ["bool-soft-detect"], set = {{ "enable-test-options" = true }} }}
"""
BUTTONS_CONFIG = f"[service]\npoll_interval_ms = {POLL_INTERVAL_MS}\n"
#: ``t`` polls ``bool-soft-detect`` without the preset that makes the test options active.
INACTIVE_SENSOR_CONFIG = SCHEDULING_CONFIG.replace(', set = { "enable-test-options" = true }', "")

T = device_path("t")
SANE0 = device_path("sane-test:0")
SANE1 = device_path("sane-test:1")

HOLDER = textwrap.dedent("""
    import sys
    print("ready", flush=True)
    sys.exit(int(sys.stdin.readline() or 0))
""")


# -- watching a file being opened ----------------------------------------------------------

IN_CLOSE_WRITE, IN_CLOSE_NOWRITE, IN_OPEN = 0x08, 0x10, 0x20
_EVENT = struct.Struct("iIII")


class FileOpens:
    """How many times any process opens ``path``, from inotify on its folder (so that the
    file may be replaced by a rename). Events are read as they come, on the loop: two
    identical events in a row are merged by the kernel only while the first is unread,
    and a worker's open and close alternate."""

    def __init__(self, path: Path) -> None:
        self.name = os.fsencode(path.name)
        libc = ctypes.CDLL(None, use_errno=True)
        self.fd = libc.inotify_init1(os.O_NONBLOCK | os.O_CLOEXEC)
        if self.fd < 0:
            raise OSError(ctypes.get_errno(), "inotify_init1 failed")
        if libc.inotify_add_watch(self.fd, os.fsencode(path.parent), IN_OPEN | IN_CLOSE_WRITE | IN_CLOSE_NOWRITE) < 0:
            raise OSError(ctypes.get_errno(), f"inotify_add_watch {path.parent} failed")
        self.count = 0
        asyncio.get_running_loop().add_reader(self.fd, self._read)

    def _read(self) -> None:
        while True:
            try:
                data = os.read(self.fd, 1 << 16)
            except BlockingIOError:
                return
            offset = 0
            while offset < len(data):
                _wd, mask, _cookie, length = _EVENT.unpack_from(data, offset)
                name = data[offset + _EVENT.size:offset + _EVENT.size + length].rstrip(b"\0")
                offset += _EVENT.size + length
                if mask & IN_OPEN and name == self.name:
                    self.count += 1

    def take(self) -> int:
        """Opens since the last take."""
        self._read()
        count, self.count = self.count, 0
        return count

    def close(self) -> None:
        asyncio.get_running_loop().remove_reader(self.fd)
        os.close(self.fd)


# -- the daemon with the bridge -------------------------------------------------------------

@dataclass
class Bridge:
    daemon: Daemon
    bus: MessageBus
    sane: TestBackendConfig
    sensors: Path
    opens: FileOpens

    def set_sensors(self, **values: Any) -> None:
        """Replace the simulated sensors' values at once (never a half-written file)."""
        temporary = self.sensors.with_name("next.tmp")
        temporary.write_text(json.dumps(values))
        temporary.replace(self.sensors)


async def start_bridge(request: pytest.FixtureRequest, bus_address: str, tmp_path: Path,
                       config: str) -> AsyncIterator[Bridge]:
    cfg = tmp_path / "stillsvc.toml"
    cfg.write_text(config)
    (tmp_path / "sensors").mkdir()
    sensors = tmp_path / "sensors" / "sensors.json"
    sensors.write_text(json.dumps({"scan": False}))
    sane = TestBackendConfig(tmp_path / "sane")
    daemon = Daemon(bus_address, "--sane", "--config", str(cfg), env=sane.daemon_env(sensors), simulate=True,
                    workdir=str(tmp_path / "daemon"))
    request.node._stillsvc_daemon = daemon
    opens = FileOpens(sensors)
    bus: MessageBus | None = None
    try:
        await daemon.ready()
        bus = await connect(bus_address)
        yield Bridge(daemon, bus, sane, sensors, opens)
    finally:
        if bus is not None:
            bus.disconnect()
        daemon.stop()
        opens.close()


@pytest.fixture
async def scheduling(request, bus_address, tmp_path) -> AsyncIterator[Bridge]:
    """Device ``t``: test:0 with the real sensor ``bool-soft-detect`` (and the simulated ``scan``)."""
    async for bridge in start_bridge(request, bus_address, tmp_path, SCHEDULING_CONFIG):
        yield bridge


@pytest.fixture
async def buttons(request, bus_address, tmp_path) -> AsyncIterator[Bridge]:
    """Devices ``sane-test:0`` and ``sane-test:1`` as discovered, each with the simulated ``scan``."""
    async for bridge in start_bridge(request, bus_address, tmp_path, BUTTONS_CONFIG):
        yield bridge


@pytest.fixture
async def inactive_sensor(request, bus_address, tmp_path) -> AsyncIterator[Bridge]:
    """Device ``t`` polling a sensor the backend marks inactive, beside the simulated ``scan``."""
    async for bridge in start_bridge(request, bus_address, tmp_path, INACTIVE_SENSOR_CONFIG):
        yield bridge


@pytest.fixture
def shared_folder() -> Iterator[Path]:
    """A folder system-wide applications can write to: as root, the service runs them as nobody."""
    folder = Path(tempfile.mkdtemp(prefix="stillsvc-sane-buttons-"))
    folder.chmod(0o777)
    yield folder
    shutil.rmtree(folder)


# -- helpers ----------------------------------------------------------------------------------

def now() -> float:
    return asyncio.get_running_loop().time()


async def diagnostic(bus: MessageBus, session: str) -> dict[str, Any]:
    (results,) = await call(bus, session, SESSION, "Diagnostic")
    return unwrap(results)


async def polls_go_on(bridge: Bridge, session: str) -> None:
    """Two more polls come (two reads of the sensors file, two more option calls)."""
    start = await diagnostic(bridge.bus, session)  # after an open of the handle, if one was due
    bridge.opens.take()
    await wait_until(lambda: bridge.opens.count >= 2, what="two more polls")
    assert grew(start, await diagnostic(bridge.bus, session)) >= 2


def calls(results: dict[str, Any], name: str = "sane_control_option") -> int:
    return int(results.get(f"calls:{name}", 0))


def grew(before: dict[str, Any], after: dict[str, Any], name: str = "sane_control_option") -> int:
    return calls(after, name) - calls(before, name)


async def state(bus: MessageBus, path: str = T) -> str:
    return await get_property(bus, path, DEVICE, "State")


async def wait_for_state(bus: MessageBus, wanted: str, path: str = T) -> None:
    async def reached() -> bool:
        return await state(bus, path) == wanted

    await wait_until(reached, what=f"{path} {wanted}")


def try_flock(fd: int) -> bool:
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    return True


def read_calls(pid: int) -> int:
    """How many read(2) calls process ``pid`` has made (``syscr`` in /proc/PID/io)."""
    for line in Path(f"/proc/{pid}/io").read_text().splitlines():
        if line.startswith("syscr:"):
            return int(line.split()[1])
    raise RuntimeError(f"no syscr for pid {pid}")


async def wait_for_a_poll(bus: MessageBus, *device_ids: str) -> None:
    """Wait until the bridge has polled each device since now.

    A sensor's first reading is its baseline (no event), and the first poll comes a
    poll interval after the device appears — often after the service is ready. So a
    test that presses a button waits for a poll first. It watches the worker process
    itself: after Diagnostic has answered (the worker read that request), the next
    request the worker reads is a poll, which also reads the sensors file: two more
    read(2) calls in all. Nothing of the service is disturbed."""
    for device_id in device_ids:
        session = await create_session(bus, device_id, "status")
        pid = (await diagnostic(bus, session))["worker_pid"]
        start = read_calls(pid)
        await wait_until(lambda pid=pid, start=start: read_calls(pid) >= start + 2, what=f"a poll of {device_id}")
        await call(bus, session, SESSION, "Close")


def read_pnm(data: bytes) -> tuple[str, int, int, int, bytes]:
    """(magic, width, height, maxval, pixels) of a binary PNM, comments skipped."""
    fields: list[bytes] = []
    at = 0
    while len(fields) < 4:
        while data[at:at + 1].isspace():
            at += 1
        if data[at:at + 1] == b"#":
            at = data.index(b"\n", at) + 1
            continue
        end = at
        while not data[end:end + 1].isspace():
            end += 1
        fields.append(data[at:end])
        at = end
    magic, width, height, maxval = fields[0].decode(), int(fields[1]), int(fields[2]), int(fields[3])
    return magic, width, height, maxval, data[at + 1:]


def pnm_size(magic: str, width: int, height: int, maxval: int) -> int:
    channels = 3 if magic == "P6" else 1
    return width * height * channels * (2 if maxval > 255 else 1)


class Routed(Signals):
    """EventRouted, as an administrator watching the routing (Manager.WatchEvents) sees it."""

    def __init__(self, bus: MessageBus) -> None:
        super().__init__(bus, member="EventRouted", interface=MANAGER)

    async def __aenter__(self) -> Self:
        await super().__aenter__()
        await call(self.bus, ROOT, MANAGER, "WatchEvents")
        return self

    def of(self, path: str) -> list[tuple[str, int, str]]:
        """(event, sequence, consumer) of every event routed for the device at ``path``."""
        return [(m.body[1], m.body[2], m.body[4]) for m in self.received if m.body[0] == path]

    async def wait_for(self, path: str, count: int) -> list[tuple[str, int, str]]:
        await self.wait(until=lambda _: len(self.of(path)) >= count)
        return self.of(path)


# == A. when the bridge polls ====================================================================

async def test_it_polls_while_the_device_is_idle(scheduling: Bridge):
    bus = scheduling.bus
    assert await get_property(bus, T, DEVICE, "EventNames") == ["bool-soft-detect-button", "scan-button"]
    assert "buttons" in await get_property(bus, T, DEVICE, "Capabilities")
    status = await create_session(bus, "t", "status")
    before = await diagnostic(bus, status)
    assert before["handle_open"] is True and before["worker_pid"] > 0
    scheduling.opens.take()
    await asyncio.sleep(WINDOW)
    after = await diagnostic(bus, status)
    opens = scheduling.opens.take()
    polls = grew(before, after)
    # One sane_control_option a poll (bool-soft-detect; the simulated scan costs no SANE call):
    # about five in a second, on the handle kept open between them.
    assert 3 <= polls <= 8, polls
    assert grew(before, after, "sane_open") == 0 and grew(before, after, "sane_close") == 0
    assert after["worker_pid"] == before["worker_pid"]
    # The worker read the sensors file once a poll: the probe parts A's other tests rely on.
    assert abs(opens - polls) <= 2, (opens, polls)


async def test_no_polls_while_a_session_holds_data_mode(scheduling: Bridge):
    bus = scheduling.bus
    data = await create_session(bus, "t", "data")
    before = await diagnostic(bus, data)
    scheduling.opens.take()
    await asyncio.sleep(WINDOW)
    after = await diagnostic(bus, data)
    assert grew(before, after) == 0
    assert scheduling.opens.take() == 0
    assert after["handle_open"] is True and grew(before, after, "sane_close") == 0

    # Data mode let go: the polls start again.
    await call(bus, data, SESSION, "Close")
    await polls_go_on(scheduling, await create_session(bus, "t", "status"))


async def transfer(bus: MessageBus, item: str) -> tuple[dict[str, Any], int, float]:
    """One raw transfer into a pipe: (its summary, the bytes read, how long it took)."""
    r, w = os.pipe()
    loop = asyncio.get_running_loop()

    def read_all() -> int:
        total = 0
        while chunk := os.read(r, 1 << 20):
            total += len(chunk)
        return total

    reader = loop.run_in_executor(None, read_all)
    started = now()
    try:
        (summary,) = await call(bus, item, ITEM, "Transfer", "hsa{sv}", [0, "raw", {}], unix_fds=[w], timeout=30)
    finally:
        os.close(w)
        size = await reader
        os.close(r)
    return unwrap(summary), size, now() - started


async def test_no_polls_during_a_transfer(scheduling: Bridge):
    """A scan made slow by the test backend's read-delay (a pause after each 64 KiB it
    passes on) costs no more SANE option calls than the same scan made fast: no poll
    ran while it lasted. Both are measured once their settings are in place, when a
    scan sets again only its four edges (FIXED values the backend stores rounded)
    and, for the slow one, the new read-delay-duration. (A transfer needs data mode,
    which keeps the poller away by itself: this shows that no poll slips in while a
    scan runs, on the worker that is busy with it.)"""
    bus = scheduling.bus
    data = await create_session(bus, "t", "data")
    flatbed = await get_property(bus, data, SESSION, "RootItem") + "/Flatbed"
    await call(bus, flatbed, ITEM, "WriteProperties", "a{sv}", [{
        "resolution": Variant("u", 200), "read-delay": Variant("b", True),
        "read-delay-duration": Variant("i", 1000)}])
    _, size, _ = await transfer(bus, flatbed)  # the settings reach the backend
    assert size > 7 * 65536, size  # eight of the backend's 64 KiB buffers: eight pauses

    before = await diagnostic(bus, data)
    _, fast_size, fast = await transfer(bus, flatbed)
    middle = await diagnostic(bus, data)
    fast_calls = grew(before, middle)

    await call(bus, flatbed, ITEM, "WriteProperties", "a{sv}", [{"read-delay-duration": Variant("i", 150_000)}])
    scheduling.opens.take()
    _, slow_size, slow = await transfer(bus, flatbed)
    opens = scheduling.opens.take()
    after = await diagnostic(bus, data)
    slow_calls = grew(middle, after)

    assert slow_size == fast_size == size
    assert slow >= WINDOW > fast, (slow, fast)
    assert grew(middle, after, "sane_start") == 1 and grew(middle, after, "sane_read") > 0
    assert slow_calls == fast_calls + 1, (slow_calls, fast_calls)
    assert opens == 0


async def test_no_polls_while_another_program_holds_the_lock_file(scheduling: Bridge):
    bus = scheduling.bus
    status = await create_session(bus, "t", "status")
    before = await diagnostic(bus, status)
    lock_file = await get_property(bus, T, DEVICE, "LockFile")
    fd = os.open(lock_file, os.O_RDWR | os.O_CLOEXEC)
    try:
        # The service holds the lock file only during each poll: take it between two.
        await wait_until(lambda: try_flock(fd), what="the lock file free between polls")
        await wait_for_state(bus, "held-by-program")
        scheduling.opens.take()
        await asyncio.sleep(WINDOW)
        assert scheduling.opens.take() == 0
        assert await state(bus) == "held-by-program"
    finally:
        os.close(fd)
    await wait_for_state(bus, "ready")
    after = await diagnostic(bus, status)
    # The handle was closed for the other program and opened again after it (by the
    # next poll or by this Diagnostic), by the same worker.
    assert grew(before, after, "sane_close") == 1
    assert grew(before, after, "sane_open") == 1
    assert after["handle_open"] is True and after["worker_pid"] == before["worker_pid"]
    await polls_go_on(scheduling, status)


async def test_no_polls_during_a_hand_over_with_stillctl_lock(scheduling: Bridge):
    bus = scheduling.bus
    status = await create_session(bus, "t", "status")
    before = await diagnostic(bus, status)
    env = {k: v for k, v in os.environ.items() if k != "STILLSVC_BUS"}
    proc = await start(scheduling.daemon.address, "lock", "t", "--", sys.executable, "-c", HOLDER,
                       stdin=asyncio.subprocess.PIPE, env=env)
    try:
        assert proc.stdout is not None and proc.stdin is not None
        await read_until(proc.stdout, lambda line: line == "ready")
        assert await state(bus) == "held-by-program"
        scheduling.opens.take()
        await asyncio.sleep(WINDOW)
        assert scheduling.opens.take() == 0
        await expect_error("Busy", call(bus, status, SESSION, "Diagnostic"))
        proc.stdin.write(b"0\n")
        await proc.stdin.drain()
        result = await finish(proc)
        assert result.code == 0, result
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    await wait_for_state(bus, "ready")
    after = await diagnostic(bus, status)
    assert grew(before, after, "sane_close") == 1
    assert grew(before, after, "sane_open") == 1
    assert after["handle_open"] is True and after["worker_pid"] == before["worker_pid"]
    await polls_go_on(scheduling, status)


# == B. what a sensor raises ======================================================================

SCAN_TO_FILE = 'echo "$STILLSVC_EVENT $STILLSVC_DEVICE $1 $(id -u)" >> "$0"'


async def test_a_press_launches_the_registered_application_once(buttons: Bridge, shared_folder: Path):
    bus = buttons.bus
    assert await get_property(bus, SANE0, DEVICE, "EventNames") == ["scan-button"]
    assert "buttons" in await get_property(bus, SANE0, DEVICE, "Capabilities")
    out = shared_folder / "launches"
    r = await stillctl(buttons.daemon.address, "register", "--system", "--events", "scan-button",
                       "--devices", "id:sane-test:0", "scan-to-file", "--", "/bin/sh", "-c", SCAN_TO_FILE,
                       str(out), "%n")
    assert r.code == 0, r

    def launches() -> list[list[str]]:
        return [line.split() for line in out.read_text().splitlines()] if out.exists() else []

    user = pwd.getpwnam("nobody").pw_uid if os.getuid() == 0 else os.getuid()
    await wait_for_a_poll(bus, "sane-test:0", "sane-test:1")
    async with Routed(bus) as routed:
        # The first reading ({"scan": false}) is the baseline: nothing happened yet.
        assert routed.of(SANE0) == [] and launches() == []

        pressed = now()
        buttons.set_sensors(scan=True)
        await wait_until(launches, what="the application launched")
        latency = now() - pressed
        assert latency < 2.0, f"{latency:.2f} s from the button to the application"
        ((event, sequence, consumer),) = await routed.wait_for(SANE0, 1)
        assert event == "scan-button"
        assert consumer.startswith("launch: system:scan-to-file as "), consumer
        assert launches() == [["scan-button", "sane-test:0", str(sequence), str(user)]]

        # The other device saw the same press; nobody registered for it.
        ((other_event, _, other_consumer),) = await routed.wait_for(SANE1, 1)
        assert (other_event, other_consumer) == ("scan-button", "none: no application registered")

        # Held down: nothing more.
        await asyncio.sleep(WINDOW)
        assert len(routed.of(SANE0)) == 1 and len(launches()) == 1
        # Let go: nothing either (a button's falling edge is no event).
        buttons.set_sensors(scan=False)
        await asyncio.sleep(WINDOW)
        assert len(routed.of(SANE0)) == 1 and len(launches()) == 1
        assert len(routed.of(SANE1)) == 1
        await wait_for_a_poll(bus, "sane-test:0")  # (five intervals passed: this one has read false too)

        # Pressed again: a second event, a second launch.
        buttons.set_sensors(scan=True)
        await wait_until(lambda: len(launches()) == 2, what="the second launch")
        first, second = await routed.wait_for(SANE0, 2)
        assert second[0] == "scan-button" and second[1] > first[1]
        assert launches()[1] == ["scan-button", "sane-test:0", str(second[1]), str(user)]
        await routed.wait_for(SANE1, 2)
    assert await get_property(bus, SANE0, DEVICE, "UndeliveredEvents") == 0
    assert await get_property(bus, SANE1, DEVICE, "UndeliveredEvents") == 2


async def test_events_nobody_registered_for_are_counted_undelivered(buttons: Bridge):
    bus = buttons.bus
    await wait_for_a_poll(bus, "sane-test:0", "sane-test:1")
    async with Routed(bus) as routed:
        buttons.set_sensors(scan=True)
        for path in (SANE0, SANE1):
            ((event, _, consumer),) = await routed.wait_for(path, 1)
            assert (event, consumer) == ("scan-button", "none: no application registered")
    for path in (SANE0, SANE1):
        assert await get_property(bus, path, DEVICE, "UndeliveredEvents") == 1


async def test_an_inactive_sensor_does_not_silence_the_others(inactive_sensor: Bridge):
    bus = inactive_sensor.bus
    assert await get_property(bus, T, DEVICE, "EventNames") == ["bool-soft-detect-button", "scan-button"]
    await wait_for_a_poll(bus, "t")
    async with Routed(bus) as routed:
        inactive_sensor.set_sensors(scan=True)
        await asyncio.wait_for(routed.wait_for(T, 1), 2 * WINDOW)
    assert routed.of(T)[0][0] == "scan-button"


# == C. other SANE programs =========================================================================

async def test_stillctl_lock_hands_the_scanner_to_scanimage(buttons: Bridge):
    bus = buttons.bus
    status = await create_session(bus, "sane-test:0", "status")
    before = await diagnostic(bus, status)
    env = {k: v for k, v in buttons.sane.env.items() if k != "STILLSVC_BUS"}
    proc = await start(buttons.daemon.address, "lock", "sane-test:0", "--", "scanimage", "-d", "test:0",
                       "--format=pnm", env=env)
    out, err = await asyncio.wait_for(proc.communicate(), 30)
    assert proc.returncode == 0, err.decode()
    # stillctl's output is scanimage's: the whole default page, Gray 8 bits, 80 x 100 mm at 50 dpi.
    magic, width, height, maxval, pixels = read_pnm(out)
    assert (magic, width, height, maxval) == ("P5", 157, 196, 255)
    assert len(pixels) == pnm_size(magic, width, height, maxval)
    await wait_for_state(bus, "ready", SANE0)
    after = await diagnostic(bus, status)
    assert grew(before, after, "sane_close") == 1 and grew(before, after, "sane_open") == 1
    assert after["worker_pid"] == before["worker_pid"]


async def test_scanimage_beside_the_idle_bridge(buttons: Bridge):
    bus = buttons.bus
    status = await create_session(bus, "sane-test:0", "status")
    before = await diagnostic(bus, status)
    assert before["handle_open"] is True
    proc = await asyncio.create_subprocess_exec(
        "scanimage", "-d", "test:0", "--format=pnm", stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE, env=buttons.sane.env)
    out, err = await asyncio.wait_for(proc.communicate(), 30)
    assert proc.returncode == 0, err.decode()
    magic, width, height, maxval, pixels = read_pnm(out)
    assert (magic, width, height) == ("P5", 157, 196)
    assert len(pixels) == pnm_size(magic, width, height, maxval)
    after = await diagnostic(bus, status)
    # The bridge kept its handle open all along: two processes had test:0 open at once.
    assert grew(before, after, "sane_close") == 0 and grew(before, after, "sane_open") == 0
    assert after["handle_open"] is True and after["worker_pid"] == before["worker_pid"]
    assert await state(bus, SANE0) == "ready"
