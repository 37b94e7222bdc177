"""stillctl, run as a user runs it: a subprocess talking to the real daemon."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import sys
import textwrap
from collections.abc import Callable
from dataclasses import dataclass

import pytest
from dbus_fast import Message
from helpers import (
    BUS_NAME,
    DEVICE,
    ERROR,
    REPO,
    SESSION,
    SIM0,
    SIMULATOR,
    TIMEOUT,
    call,
    create_session,
    expect_error,
    get_all,
    get_property,
    wait_until,
)

STILLCTL = [sys.executable, "-m", "stillsvc.ctl"]
NOT_RUNNING = "stillctl: the stillsvc service is not running on the {} bus"

# The service closes the descriptor HandOver returns before dbus-fast has sent the
# reply that carries it: sendmsg() fails with EBADF, the library drops the service's
# bus connection and the daemon exits ("lost the bus connection").
# See test_hand_over_returns_the_lock_file_descriptor.


@dataclass
class Result:
    code: int
    out: str
    err: str


def env_without_bus() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k != "STILLSVC_BUS"}


async def start(address: str | None, *args: str, stdin: int | None = asyncio.subprocess.DEVNULL,
                env: dict[str, str] | None = None) -> asyncio.subprocess.Process:
    bus = ["--bus", address] if address else []
    return await asyncio.create_subprocess_exec(
        *STILLCTL, *bus, *args, stdin=stdin, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        cwd=str(REPO), env=env or env_without_bus())


async def stillctl(address: str | None, *args: str, env: dict[str, str] | None = None,
                   timeout: float = TIMEOUT) -> Result:
    proc = await start(address, *args, env=env)
    out, err = await asyncio.wait_for(proc.communicate(), timeout)
    assert "Traceback" not in err.decode(), err.decode()
    return Result(proc.returncode, out.decode(), err.decode())


async def read_line(stream: asyncio.StreamReader, timeout: float = TIMEOUT) -> str:
    line = await asyncio.wait_for(stream.readline(), timeout)
    if not line:
        raise EOFError("stillctl closed its output")
    return line.decode().rstrip("\n")


async def read_until(stream: asyncio.StreamReader, predicate: Callable[[str], bool],
                     timeout: float = TIMEOUT) -> list[str]:
    """Lines up to and including the first one ``predicate`` accepts."""
    lines: list[str] = []
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        remaining = deadline - asyncio.get_running_loop().time()
        lines.append(await read_line(stream, max(remaining, 0.001)))
        if predicate(lines[-1]):
            return lines


async def finish(proc: asyncio.subprocess.Process, timeout: float = TIMEOUT) -> Result:
    out, err = await asyncio.wait_for(proc.communicate(), timeout)
    return Result(proc.returncode, out.decode(), err.decode())


async def device_is_back(bus) -> None:
    async def back() -> bool:
        return (await get_property(bus, SIM0, DEVICE, "State") == "ready"
                and await get_property(bus, SIM0, SIMULATOR, "PortOpen") is True)

    await wait_until(back, what="sim0 back to ready with its port open")


# -- list and info -----------------------------------------------------------------

async def test_list_shows_one_line_per_device(daemon):
    r = await stillctl(daemon.address, "list")
    assert r.code == 0, r.err
    header, *rows = r.out.splitlines()
    assert header.split() == ["ID", "STATE", "DATA", "MODE", "NAME"]
    assert len(rows) == 1
    assert rows[0].split(None, 3) == ["sim0", "ready", "-", "Simulated Scanner"]


async def test_list_shows_the_data_mode_holder(daemon, client):
    await create_session(client, mode="data")
    r = await stillctl(daemon.address, "list")
    assert r.code == 0, r.err
    (row,) = r.out.splitlines()[1:]
    assert row.split()[:3] == ["sim0", "ready", client.unique_name]


async def test_list_json_has_every_device_property_and_the_path(daemon, client):
    r = await stillctl(daemon.address, "--json", "list")
    assert r.code == 0, r.err
    devices = json.loads(r.out)
    assert devices == [{**await get_all(client, SIM0, DEVICE), "path": SIM0}]
    # --json is also accepted after the subcommand
    again = await stillctl(daemon.address, "list", "--json")
    assert json.loads(again.out)[0]["Id"] == "sim0"


async def test_info_shows_device_and_simulator_properties(daemon, client):
    r = await stillctl(daemon.address, "info", "sim0")
    assert r.code == 0, r.err
    lines = r.out.splitlines()
    assert lines[0].split() == ["sim0", SIM0]
    fields = {line.split(None, 1)[0]: line.split(None, 1)[1] for line in lines[1:] if line.startswith("  ")}
    assert fields["Name"] == "Simulated Scanner"
    assert fields["State"] == "ready"
    assert fields["Simulated"] == "yes"
    assert fields["PortOpen"] == "yes"
    assert "Simulator" in lines
    assert fields["EventNames"].startswith("scan-button, ")


async def test_info_json(daemon, client):
    r = await stillctl(daemon.address, "--json", "info", "sim0")
    assert r.code == 0, r.err
    info = json.loads(r.out)
    assert info == {**await get_all(client, SIM0, DEVICE), "path": SIM0,
                    "Simulator": await get_all(client, SIM0, SIMULATOR)}


async def test_info_of_a_device_that_does_not_exist(daemon):
    r = await stillctl(daemon.address, "info", "nope")
    assert r.code == 1
    assert r.err == "stillctl: no device 'nope'\n"
    assert r.out == ""


async def test_bus_comes_from_the_environment(daemon):
    r = await stillctl(None, "list", env={**os.environ, "STILLSVC_BUS": daemon.address})
    assert r.code == 0, r.err
    assert "sim0" in r.out


# -- errors ---------------------------------------------------------------------------

@pytest.mark.parametrize("args", [["list"], ["--json", "list"], ["info", "sim0"], ["monitor"],
                                  ["lock", "sim0", "--", "true"]])
async def test_service_not_running(bus_address, args):
    r = await stillctl(bus_address, *args)
    assert r.code == 1
    assert r.err == NOT_RUNNING.format(bus_address) + "\n"
    assert r.out == ""


async def test_bus_that_cannot_be_reached(tmp_path):
    address = f"unix:path={tmp_path}/no-bus-here"
    r = await stillctl(address, "list")
    assert r.code == 1
    assert r.err.startswith(NOT_RUNNING.format(address) + " (cannot connect to the bus: ")
    assert len(r.err.splitlines()) == 1


@pytest.mark.parametrize("args", [[], ["frobnicate"], ["info"], ["lock", "sim0"], ["lock", "sim0", "--"],
                                  ["lock", "--timeout", "soon", "sim0", "--", "true"],
                                  ["lock", "--timeout", "-1", "sim0", "--", "true"],
                                  ["--bus", "nonsense", "list"]])
async def test_bad_usage_exits_2(tmp_path, args):
    r = await stillctl(f"unix:path={tmp_path}/unused", *args)
    assert r.code == 2, r
    assert "usage:" in r.err


# -- monitor ----------------------------------------------------------------------------

async def start_monitor(address: str, *args: str) -> asyncio.subprocess.Process:
    proc = await start(address, *args, "monitor")
    assert proc.stderr is not None
    first = await read_line(proc.stderr)
    assert first == f"Monitoring org.stillsvc.StillImage1 on the {address} bus (Ctrl-C to stop)"
    return proc


async def stop_monitor(proc: asyncio.subprocess.Process, sig: int = signal.SIGINT) -> Result:
    proc.send_signal(sig)
    r = await finish(proc)
    assert r.code == 0, r
    assert "Traceback" not in r.err
    return r


async def test_monitor_shows_events_with_their_consumer_and_hotplug(daemon, client):
    proc = await start_monitor(daemon.address)
    assert proc.stdout is not None
    line_re = re.compile(r"^\d\d:\d\d:\d\d\.\d\d\d sim0 ")

    await call(client, SIM0, SIMULATOR, "PressButton", "s", ["scan"])
    lines = await read_until(proc.stdout, lambda s: " event " in s)
    line = lines[-1]
    assert line_re.match(line), line
    assert re.search(r"event scan-button #\d+ .*-> none: no application registered$", line), line
    assert any("changed UndeliveredEvents=1" in s for s in lines), lines  # counted, never silently lost

    session = await create_session(client, mode="data")
    (number,) = re.findall(r"\d+$", session)
    await call(client, SIM0, SIMULATOR, "PressButton", "s", ["copy"])
    lines = await read_until(proc.stdout, lambda s: "event" in s)
    assert any("changed DataModeHeld=yes" in s for s in lines), lines
    assert re.search(rf"event copy-button #\d+ .*-> queue: session {number} ", lines[-1]), lines
    await call(client, session, SESSION, "Close")

    await call(client, SIM0, SIMULATOR, "Unplug")
    lines = await read_until(proc.stdout, lambda s: s.endswith("sim0 removed"))
    assert line_re.match(lines[-1])
    await call(client, SIM0, SIMULATOR, "Replug")
    lines = await read_until(proc.stdout, lambda s: " added" in s)
    assert lines[-1].endswith("sim0 added: Simulated Scanner (ready), generation 2"), lines

    r = await stop_monitor(proc)
    assert r.err == ""


async def test_monitor_json_lines_and_sigterm(daemon, client):
    proc = await start_monitor(daemon.address, "--json")
    assert proc.stdout is not None
    await call(client, SIM0, SIMULATOR, "PressButton", "s", ["email"])
    before = [json.loads(s) for s in await read_until(proc.stdout, lambda s: json.loads(s)["type"] == "event")]
    event = before.pop()
    assert {"interface": "Device", "properties": {"UndeliveredEvents": 1}}.items() <= before[0].items(), before
    assert event["type"] == "event"
    assert event["device"] == "sim0"
    assert event["path"] == SIM0
    assert event["event"] == "email-button"
    assert event["consumer"] == "none: no application registered"
    assert event["data"] == {"button": "email"}
    assert isinstance(event["sequence"], int) and isinstance(event["time"], float)

    await call(client, SIM0, SIMULATOR, "Unplug")
    lines = [json.loads(s) for s in await read_until(proc.stdout, lambda s: json.loads(s)["type"] == "removed")]
    changed = [e for e in lines if e["type"] == "changed"]
    assert {"interface": "Simulator", "properties": {"Connected": False, "PortOpen": False}}.items() \
        <= changed[0].items()
    await stop_monitor(proc, signal.SIGTERM)


async def test_monitor_reports_the_service_going_away(daemon):
    proc = await start_monitor(daemon.address)
    assert proc.stdout is not None
    daemon.stop()
    lines = await read_until(proc.stdout, lambda s: s.endswith("sim0 removed"))
    assert any(s.endswith(" - service stopped") for s in lines), lines
    await stop_monitor(proc)


# -- HandOver, directly -------------------------------------------------------------------

async def test_hand_over_returns_the_lock_file_descriptor(daemon, client):
    """HandOver gives the client the service's locked lock file; the device comes back
    once the client's copy and the session (which keeps the service's copy) are closed."""
    session = await create_session(client, mode="both")
    await call(client, session, SESSION, "LockDevice", "u", [1000])
    reply = await asyncio.wait_for(client.call(
        Message(destination=BUS_NAME, path=session, interface=SESSION, member="HandOver")), TIMEOUT)
    assert reply.error_name is None, (reply.error_name, reply.body, daemon.log[-3000:])
    (fd,) = reply.unix_fds
    lock_file = await get_property(client, SIM0, DEVICE, "LockFile")
    assert os.readlink(f"/proc/self/fd/{fd}") == lock_file
    assert await get_property(client, SIM0, DEVICE, "State") == "held-by-program"
    os.close(fd)
    await call(client, session, SESSION, "Close")
    await device_is_back(client)
    assert daemon.proc is not None and daemon.proc.poll() is None


# -- lock ---------------------------------------------------------------------------------

HOLDER = textwrap.dedent("""
    import os, sys
    fd = int(os.environ["STILLSVC_LOCK_FD"])
    print("pid", os.getpid(), flush=True)
    print("device", os.environ["STILLSVC_DEVICE"], flush=True)
    print("lockfile", os.readlink(f"/proc/self/fd/{fd}"), flush=True)
    print("ready", flush=True)
    line = sys.stdin.readline()
    sys.exit(int(line or 0))
""")


async def start_holder(address: str, *args: str) -> tuple[asyncio.subprocess.Process, dict[str, str]]:
    """stillctl lock running HOLDER: returns once the command runs, with what it printed."""
    proc = await start(address, "lock", *args, "sim0", "--", sys.executable, "-c", HOLDER,
                       stdin=asyncio.subprocess.PIPE)
    assert proc.stdout is not None
    lines = await read_until(proc.stdout, lambda s: s == "ready")
    return proc, dict(line.split(" ", 1) for line in lines[:-1])


async def end_holder(proc: asyncio.subprocess.Process, code: int) -> Result:
    assert proc.stdin is not None
    proc.stdin.write(f"{code}\n".encode())
    await proc.stdin.drain()
    return await finish(proc)


async def test_lock_gives_the_command_the_device_alone(daemon, client, client2):
    lock_file = await get_property(client, SIM0, DEVICE, "LockFile")
    status = await create_session(client2, mode="status")
    proc, told = await start_holder(daemon.address)
    assert told["device"] == "sim0"
    assert told["lockfile"] == lock_file

    assert await get_property(client, SIM0, DEVICE, "State") == "held-by-program"
    assert await get_property(client, SIM0, SIMULATOR, "PortOpen") is False
    await expect_error("Busy", call(client2, status, SESSION, "GetStatus"))
    await expect_error("Busy", create_session(client2, mode="status"))
    flock = await asyncio.create_subprocess_exec("flock", "-n", lock_file, "true")
    assert await asyncio.wait_for(flock.wait(), TIMEOUT) == 1

    r = await end_holder(proc, 0)
    assert r.code == 0, r
    assert r.err == ""
    await device_is_back(client)
    await call(client2, status, SESSION, "GetStatus")
    assert await get_property(client, SIM0, DEVICE, "DataModeHeld") is False


async def test_lock_exits_with_the_command_status(daemon, client):
    proc, _ = await start_holder(daemon.address)
    r = await end_holder(proc, 3)
    assert r.code == 3, r
    assert "Traceback" not in r.err
    await device_is_back(client)


async def test_lock_command_killed(daemon, client):
    proc, told = await start_holder(daemon.address)
    os.kill(int(told["pid"]), signal.SIGKILL)
    r = await finish(proc)
    assert r.code == 128 + signal.SIGKILL, r
    assert "Traceback" not in r.err
    await device_is_back(client)


async def test_lock_forwards_sigterm_to_the_command(daemon, client):
    script = textwrap.dedent("""
        import signal, sys
        signal.signal(signal.SIGTERM, lambda *_: sys.exit(7))
        print("ready", flush=True)
        while True:
            signal.pause()
    """)
    proc = await start(daemon.address, "lock", "sim0", "--", sys.executable, "-c", script)
    assert proc.stdout is not None
    await read_until(proc.stdout, lambda s: s == "ready")
    proc.send_signal(signal.SIGTERM)
    r = await finish(proc)
    assert r.code == 7, r
    await device_is_back(client)


async def test_lock_command_that_cannot_be_run(daemon, client):
    r = await stillctl(daemon.address, "lock", "sim0", "--", "/nonexistent/vendor-tool", "--scan")
    assert r.code == 127
    assert r.err == "stillctl: cannot run '/nonexistent/vendor-tool': No such file or directory\n"
    await device_is_back(client)


async def test_lock_waits_in_line_for_data_mode(daemon, client):
    session = await create_session(client, mode="data")
    proc = await start(daemon.address, "lock", "--timeout", "20", "sim0", "--", "echo", "got it")
    assert proc.stdout is not None

    async def waiting() -> bool:
        return await get_property(client, SIM0, DEVICE, "DataModeWaiters") == 1

    await wait_until(waiting, what="stillctl waiting for data mode")
    await call(client, session, SESSION, "Close")
    r = await finish(proc)
    assert (r.code, r.out) == (0, "got it\n"), r
    await device_is_back(client)


async def test_second_lock_waits_for_the_first(daemon, client):
    first, _ = await start_holder(daemon.address)
    second = await start(daemon.address, "lock", "--timeout", "20", "sim0", "--", "echo", "second")
    assert second.stderr is not None
    assert await read_line(second.stderr) == "stillctl: sim0 is held by another program; waiting up to 20 s"
    r = await end_holder(first, 0)
    assert r.code == 0, r
    r = await finish(second)
    assert (r.code, r.out, r.err) == (0, "second\n", ""), r
    await device_is_back(client)


async def test_second_lock_gives_up_after_its_timeout(daemon, client):
    first, _ = await start_holder(daemon.address)
    r = await stillctl(daemon.address, "lock", "--timeout", "0.3", "sim0", "--", "true")
    assert r.code == 1
    assert r.err.splitlines()[-1] == \
        "stillctl: gave up waiting for sim0 after 0.3 s: it is still held by another program"
    r = await end_holder(first, 0)
    assert r.code == 0, r
    await device_is_back(client)


async def test_lock_times_out_while_another_client_holds_data_mode(daemon, client):
    await create_session(client, mode="data")
    r = await stillctl(daemon.address, "lock", "--timeout", "0.5", "sim0", "--", "true")
    assert r.code == 1
    assert re.fullmatch(r"stillctl: .*(gave up waiting|timed out).*\n", r.err, re.I), r.err
    assert "sim0" in r.err
    # it waited in line and then left it
    assert await get_property(client, SIM0, DEVICE, "State") == "ready"


async def test_lock_busy_at_once_with_timeout_0(daemon, client):
    await create_session(client, mode="data")
    r = await stillctl(daemon.address, "lock", "--timeout", "0", "sim0", "--", "true")
    assert r.code == 1
    assert re.fullmatch(r"stillctl: .*held by .*\n", r.err), r.err


async def test_lock_interrupted_while_waiting(daemon, client):
    await create_session(client, mode="data")
    proc = await start(daemon.address, "lock", "sim0", "--", "true")

    async def waiters(n: int) -> bool:
        return await get_property(client, SIM0, DEVICE, "DataModeWaiters") == n

    await wait_until(lambda: waiters(1), what="stillctl waiting for data mode")
    proc.send_signal(signal.SIGINT)
    r = await finish(proc)
    assert r.code == 130, r
    assert "Traceback" not in r.err
    await wait_until(lambda: waiters(0), what="stillctl out of the line")


async def test_lock_of_a_device_that_does_not_exist(daemon):
    r = await stillctl(daemon.address, "lock", "nope", "--", "true")
    assert (r.code, r.err) == (1, "stillctl: no device 'nope'\n")


async def test_error_names_from_the_service_are_not_shown(daemon, client):
    # a service error comes out as its message alone
    r = await stillctl(daemon.address, "info", "x" * 5000)
    assert r.code == 1
    assert r.err.startswith("stillctl: ") and ERROR not in r.err and len(r.err.splitlines()) == 1
