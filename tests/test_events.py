"""The event monitor over D-Bus: every button press to exactly one consumer.

A data-mode holder gets the event in its queue; otherwise one registered
application is started, by a user's agent (here a test agent exported on a
client connection, or ``stillctl agent``) or, for system-wide registrations, by
the service itself. Each test waits for the service's own report of where an
event went (the unicast ``EventRouted`` signal), never for time to pass.
"""

from __future__ import annotations

import asyncio
import json
import os
import pwd
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path
from typing import Any

import pytest
from dbus_fast import DBusError, Variant
from dbus_fast.service import ServiceInterface, method
from helpers import (
    DEVICE,
    ERROR,
    MANAGER,
    REPO,
    ROOT,
    SESSION,
    SIM0,
    SIMULATOR,
    TIMEOUT,
    Daemon,
    DBusDaemon,
    Signals,
    call,
    connect,
    create_session,
    expect_error,
    get_property,
    wait_for_name,
    wait_until,
)
from test_ctl import finish, read_line, start, stillctl

from stillsvc.common.names import AGENT_IFACE

ME = os.getuid()


# -- a test agent ---------------------------------------------------------------------

class RecordingAgent(ServiceInterface):
    """An org.stillsvc.StillImage1.Agent that records what the service asks of it.

    ``fail``: Launch and Choose answer with this error text. ``choice``: what
    Choose answers (None: NotSupported, as an agent that cannot ask its user)."""

    def __init__(self, fail: str | None = None, choice: str | None = None,
                 gate: asyncio.Event | None = None) -> None:
        super().__init__(AGENT_IFACE)
        self.fail = fail
        self.choice = choice
        #: Choose answers only once this is set.
        self.gate = gate
        self.launches: list[dict[str, Any]] = []
        self.choices: list[dict[str, Any]] = []

    @method()
    def Launch(self, application: "s", argv: "as", environment: "a{ss}", device_id: "s", event: "s",
               sequence: "t") -> "u":
        self.launches.append({"application": application, "argv": argv, "env": environment,
                              "device": device_id, "event": event, "sequence": sequence})
        if self.fail:
            raise DBusError(f"{ERROR}.Failed", self.fail)
        return 4242

    @method()
    async def Choose(self, device_id: "s", event: "s", sequence: "t", candidates: "aa{sv}") -> "s":
        self.choices.append({"device": device_id, "event": event, "sequence": sequence,
                             "candidates": [{k: v.value for k, v in c.items()} for c in candidates]})
        if self.gate is not None:
            await self.gate.wait()
        if self.fail:
            raise DBusError(f"{ERROR}.Failed", self.fail)
        if self.choice is None:
            raise DBusError(f"{ERROR}.NotSupported", "cannot ask")
        return self.choice


async def add_agent(bus, path: str = "/test/agent", **behaviour: Any) -> RecordingAgent:
    agent = RecordingAgent(**behaviour)
    bus.export(path, agent)
    await call(bus, ROOT, MANAGER, "RegisterAgent", "o", [path])
    return agent


async def register(bus, name: str, command: list[str] | None = None, events: list[str] | tuple = (),
                   devices: list[str] | tuple = (), system: bool = False) -> None:
    options = {"system": Variant("b", True)} if system else {}
    await call(bus, ROOT, MANAGER, "RegisterLaunchApplication", "sasasasa{sv}",
               [name, command or [f"/usr/bin/{name}"], list(events), list(devices), options])


async def applications(bus) -> list[dict[str, Any]]:
    (apps,) = await call(bus, ROOT, MANAGER, "ListLaunchApplications")
    return [{k: v.value for k, v in app.items()} for app in apps]


async def press(bus, button: str = "scan") -> None:
    await call(bus, SIM0, SIMULATOR, "PressButton", "s", [button])


class Routed(Signals):
    """EventRouted, as an administrator watching the routing sees it."""

    def __init__(self, bus) -> None:
        super().__init__(bus, member="EventRouted", interface=MANAGER)

    async def __aenter__(self) -> Routed:
        await super().__aenter__()
        await call(self.bus, ROOT, MANAGER, "WatchEvents")
        return self

    async def next(self) -> tuple[str, int, str]:
        """The next event's (name, sequence, consumer)."""
        index = getattr(self, "_read", 0)
        await self.wait(index + 1)
        self._read = index + 1
        _path, event, sequence, _time, consumer, _data = self.received[index].body
        return event, sequence, consumer

    async def press(self, bus, button: str = "scan") -> tuple[str, int, str]:
        await press(bus, button)
        return await self.next()


async def close(bus, session: str) -> None:
    await call(bus, session, SESSION, "Close")


# -- launching ----------------------------------------------------------------------------

async def test_launch_when_nobody_holds_data_mode(client):
    command = ["scan-app", "--device=%d", "--event", "%e", "#%n", "%p", "100%%"]
    await register(client, "scan-app", command, events=["scan-button"])
    agent = await add_agent(client)
    async with Routed(client) as routed:
        event, sequence, consumer = await routed.press(client, "scan")
    assert event == "scan-button"
    assert consumer.startswith(f"launch: scan-app via agent {client.unique_name} ")
    assert consumer.endswith(", pid 4242 (only match)"), consumer
    (launch,) = agent.launches
    assert launch["application"] == "scan-app"
    assert launch["argv"] == ["scan-app", "--device=sim0", "--event", "scan-button", f"#{sequence}", SIM0, "100%"]
    assert (launch["device"], launch["event"], launch["sequence"]) == ("sim0", "scan-button", sequence)
    assert {k: v for k, v in launch["env"].items() if k != "STILLSVC_BUS"} == {
        "STILLSVC_DEVICE": "sim0", "STILLSVC_EVENT": "scan-button", "STILLSVC_EVENT_SEQUENCE": str(sequence),
        "STILLSVC_DEVICE_PATH": SIM0, "STILLSVC_APPLICATION": "scan-app"}
    assert launch["env"]["STILLSVC_BUS"].startswith("unix:")


async def test_events_a_registration_does_not_want_are_not_launched(client):
    await register(client, "copier", events=["copy-button"], devices=["model:simulated flatbed + adf"])
    await register(client, "elsewhere", devices=["id:other0", "vendor:nobody"])
    agent = await add_agent(client)
    async with Routed(client) as routed:
        assert (await routed.press(client, "scan"))[2] == "none: no application registered"
        assert (await routed.press(client, "copy"))[2].startswith("launch: copier via agent ")
    assert [launch["event"] for launch in agent.launches] == ["copy-button"]


async def test_no_agent_of_the_user_means_undelivered(daemon, client):
    await register(client, "scan-app")
    async with Routed(client) as routed:
        _, sequence, consumer = await routed.press(client)
    assert consumer == f"none: undelivered: no agent of user {ME} is registered to start 'scan-app'"
    assert re.search(rf"event undelivered'.*sequence={sequence} reason=", daemon.log)


async def test_no_launch_while_data_mode_is_held_and_again_after_close(client, client2):
    await register(client, "scan-app")
    agent = await add_agent(client)
    session = await create_session(client2, mode="data")
    number = session.rsplit("/", 1)[1]
    async with Routed(client) as routed:
        for button in ("scan", "copy", "email"):
            _, _, consumer = await routed.press(client, button)
            assert consumer == f"queue: session {number} ({client2.unique_name})"
        assert agent.launches == []
        # Never subscribed: the events were queued all the same, oldest first.
        names = [(await call(client2, session, SESSION, "GetLastNotificationData"))[0]["event"].value
                 for _ in range(3)]
        assert names == ["scan-button", "copy-button", "email-button"]
        e = await expect_error("Empty", call(client2, session, SESSION, "GetLastNotificationData"))
        assert "no event is queued" in e.text
        await close(client2, session)
        _, sequence, consumer = await routed.press(client, "pdf")
    assert consumer.startswith("launch: scan-app via agent ")
    assert [(launch["event"], launch["sequence"]) for launch in agent.launches] == [("pdf-button", sequence)]


HOLDER = textwrap.dedent("""
    import asyncio, sys
    from dbus_fast import Message, Variant
    from dbus_fast.aio import MessageBus

    async def main():
        bus = await MessageBus(bus_address=sys.argv[1]).connect()
        reply = await bus.call(Message(destination="org.stillsvc.StillImage1", path="/org/stillsvc/StillImage1",
                                       interface="org.stillsvc.StillImage1.Manager", member="CreateDevice",
                                       signature="ssa{sv}", body=["sim0", "data", {}]))
        print(reply.body[0], flush=True)
        await asyncio.Event().wait()

    asyncio.run(main())
""")


async def test_launch_again_after_the_data_mode_client_is_killed(daemon, client):
    await register(client, "scan-app")
    agent = await add_agent(client)
    holder = await asyncio.create_subprocess_exec(sys.executable, "-c", HOLDER, daemon.address,
                                                  stdout=asyncio.subprocess.PIPE, cwd=str(REPO))
    try:
        assert holder.stdout is not None
        session = await read_line(holder.stdout)
        assert session.startswith(f"{ROOT}/sessions/")
        async with Routed(client) as routed:
            _, _, consumer = await routed.press(client)
            assert consumer.startswith(f"queue: session {session.rsplit('/', 1)[1]} ")
            holder.send_signal(signal.SIGKILL)
            await holder.wait()

            async def released() -> bool:
                return await get_property(client, SIM0, DEVICE, "DataModeHeld") is False

            await wait_until(released, what="data mode released after kill -9")
            _, sequence, consumer = await routed.press(client)
        assert consumer.startswith("launch: scan-app via agent ")
        assert [launch["sequence"] for launch in agent.launches] == [sequence]
    finally:
        if holder.returncode is None:
            holder.kill()
            await holder.wait()


async def test_launching_works_after_unplug_and_replug(daemon, client):
    await register(client, "scan-app")
    agent = await add_agent(client)
    await call(client, SIM0, SIMULATOR, "Unplug")
    await call(client, SIM0, SIMULATOR, "Replug")
    await wait_until(lambda: "event monitor watching" in daemon.log.split("device added")[-1],
                     what="the monitor watching the replugged device")
    async with Routed(client) as routed:
        _, sequence, consumer = await routed.press(client)
    assert sequence == 1  # a new device: sequence numbers start again
    assert consumer.startswith("launch: scan-app via agent ")
    assert len(agent.launches) == 1


# -- the queue of a data-mode session ------------------------------------------------------

async def test_subscriber_alone_is_notified(client, client2):
    session = await create_session(client, mode="data")
    async with Signals(client, member="EventQueued") as mine, \
            Signals(client2, member="EventQueued") as theirs, Routed(client2) as routed:
        await call(client, session, SESSION, "Subscribe")
        _, sequence, consumer = await routed.press(client, "email")
        assert consumer.startswith("queue: ")
        (msg,) = await mine.wait(1)
        assert msg.destination == client.unique_name
        assert msg.path == session
        assert msg.body == ["email-button", sequence]
        # client2 got EventRouted after the service sent EventQueued: had EventQueued
        # been sent to client2 too, it would have arrived first.
        assert theirs.received == []
        (notification,) = await call(client, session, SESSION, "GetLastNotificationData")
        assert notification["event"].value == "email-button"
        assert notification["sequence"].value == sequence
        assert notification["device"].value == "sim0"
        assert notification["data"].value == {"button": Variant("s", "email")}
        assert notification["remaining"].value == 0

        await call(client, session, SESSION, "Unsubscribe")
        await routed.press(client, "copy")
        await routed.press(client, "scan")
        await call(client, session, SESSION, "Subscribe")
        _, last, _ = await routed.press(client, "pdf")
        await mine.wait(2)
        assert [m.body for m in mine.received] == [["email-button", sequence], ["pdf-button", last]]
        assert await get_property(client, session, SESSION, "QueuedEvents") == 3
    assert theirs.received == []


@pytest.mark.daemon_args("--config", "tests/data/short-event-queue.toml")
async def test_queue_is_fifo_and_counts_what_overflow_drops(daemon, client):
    session = await create_session(client, mode="both")
    async with Routed(client) as routed:
        sequences = [(await routed.press(client, button))[1] for button in ("scan", "copy", "email", "pdf", "scan")]
    assert sequences == sorted(sequences) and len(set(sequences)) == 5
    assert await get_property(client, session, SESSION, "DroppedEvents") == 2
    got = [(await call(client, session, SESSION, "GetLastNotificationData"))[0] for _ in range(3)]
    assert [(g["event"].value, g["sequence"].value) for g in got] == [
        ("email-button", sequences[2]), ("pdf-button", sequences[3]), ("scan-button", sequences[4])]
    assert [g["dropped"].value for g in got] == [2, 2, 2]
    assert [g["remaining"].value for g in got] == [2, 1, 0]
    await expect_error("Empty", call(client, session, SESSION, "GetLastNotificationData"))
    assert daemon.log.count("event queue full, dropped the oldest") == 2


# -- choosing ---------------------------------------------------------------------------------

async def test_a_default_wins(client):
    await register(client, "first")
    await register(client, "second")
    await call(client, ROOT, MANAGER, "SetDefaultApplication", "sss", ["sim0", "scan-button", "second"])
    agent = await add_agent(client, choice="first")
    async with Routed(client) as routed:
        assert (await routed.press(client, "scan"))[2].endswith("(default)")
        assert (await routed.press(client, "copy"))[2].endswith(f"(chosen by agent {client.unique_name} "
                                                                f"(pid {os.getpid()}, {proc_comm()}) of user {ME})")
    assert [launch["application"] for launch in agent.launches] == ["second", "first"]
    assert [c["event"] for c in agent.choices] == ["copy-button"]
    apps = {a["id"]: a for a in await applications(client)}
    assert apps["second"]["default_for"] == [("sim0", "scan-button")]
    assert apps["first"]["default_for"] == []
    # Clearing it: the agent is asked again.
    await call(client, ROOT, MANAGER, "SetDefaultApplication", "sss", ["sim0", "scan-button", ""])
    async with Routed(client) as routed:
        assert "(chosen by agent " in (await routed.press(client, "scan"))[2]
    await expect_error("NotFound", call(client, ROOT, MANAGER, "SetDefaultApplication", "sss",
                                        ["sim0", "scan-button", "nope"]))
    await expect_error("InvalidArgument", call(client, ROOT, MANAGER, "SetDefaultApplication", "sss",
                                               ["sim 0", "scan-button", "first"]))


def proc_comm() -> str:
    with open(f"/proc/{os.getpid()}/comm") as f:
        return f.read().strip()


async def test_several_matches_ask_the_agent(client):
    await register(client, "first", ["first-app", "%e"])
    await register(client, "second", events=["scan-button"])
    agent = await add_agent(client, choice="second")
    async with Routed(client) as routed:
        _, sequence, consumer = await routed.press(client, "scan")
    assert "(chosen by agent " in consumer
    (choice,) = agent.choices
    assert (choice["device"], choice["event"], choice["sequence"]) == ("sim0", "scan-button", sequence)
    assert [(c["id"], c["name"], c["scope"], c["command"]) for c in choice["candidates"]] == [
        ("first", "first", "user", ["first-app", "%e"]), ("second", "second", "user", ["/usr/bin/second"])]
    assert [launch["application"] for launch in agent.launches] == ["second"]


async def test_agent_that_cannot_choose_means_the_oldest(client):
    await register(client, "older")
    await register(client, "newer")
    agent = await add_agent(client)  # answers Choose with NotSupported
    async with Routed(client) as routed:
        consumer = (await routed.press(client))[2]
    assert consumer.startswith("launch: older via agent ") and consumer.endswith("(oldest registration)")
    assert len(agent.choices) == 1
    assert [launch["application"] for launch in agent.launches] == ["older"]
    # Registering a name again replaces it, as the newest.
    await register(client, "older", ["/usr/bin/older", "--again"])
    async with Routed(client) as routed:
        assert (await routed.press(client))[2].startswith("launch: newer via agent ")


async def test_an_agent_may_decline_and_must_choose_what_it_was_offered(client, client2):
    await register(client, "first")
    await register(client, "second")
    declining = await add_agent(client, choice="")
    async with Routed(client) as routed:
        consumer = (await routed.press(client))[2]
        assert consumer.startswith("none: undelivered: agent ") and consumer.endswith("declined to choose an application")
        assert declining.launches == []
        # The newest agent is asked first; one that answers nonsense is skipped.
        confused = await add_agent(client2, choice="system:first")
        consumer = (await routed.press(client))[2]
    assert len(confused.choices) == 1 and len(declining.choices) == 2
    assert consumer.endswith("declined to choose an application")


async def test_data_mode_taken_while_the_user_chooses_gets_the_event(client, client2):
    await register(client, "first")
    await register(client, "second")
    gate = asyncio.Event()
    agent = await add_agent(client, choice="second", gate=gate)
    async with Routed(client) as routed:
        await press(client)
        await wait_until(lambda: agent.choices, what="the agent being asked")
        session = await create_session(client2, mode="data")
        gate.set()
        _, sequence, consumer = await routed.next()
    assert consumer == f"queue: session {session.rsplit('/', 1)[1]} ({client2.unique_name})"
    assert agent.launches == []
    (queued,) = await call(client2, session, SESSION, "GetLastNotificationData")
    assert queued["sequence"].value == sequence


# -- agents failing ---------------------------------------------------------------------------

async def test_a_failing_agent_falls_back_to_the_next(daemon, client, client2):
    await register(client, "scan-app")
    older = await add_agent(client)
    newer = await add_agent(client2, fail="display not available")
    async with Routed(client) as routed:
        consumer = (await routed.press(client))[2]
        assert consumer.startswith(f"launch: scan-app via agent {client.unique_name} "), consumer
        assert len(newer.launches) == 1 and len(older.launches) == 1
        assert "display not available" in daemon.log
        older.fail = "no luck either"
        consumer = (await routed.press(client))[2]
    assert consumer.startswith(f"none: undelivered: no agent of user {ME} started 'scan-app' (")
    assert "display not available" in consumer and "no luck either" in consumer


async def test_an_agent_that_left_is_not_called(daemon, client):
    await register(client, "scan-app")
    older = await add_agent(client)
    leaving = await connect(daemon.address)
    gone = await add_agent(leaving)
    leaving.disconnect()
    await wait_until(lambda: "agent left" in daemon.log, what="the service noticing the agent left")
    async with Routed(client) as routed:
        assert (await routed.press(client))[2].startswith(f"launch: scan-app via agent {client.unique_name} ")
    assert gone.launches == [] and len(older.launches) == 1
    await call(client, ROOT, MANAGER, "UnregisterAgent", "o", ["/test/agent"])
    async with Routed(client) as routed:
        assert (await routed.press(client))[2].startswith("none: undelivered: no agent of user ")
    await expect_error("InvalidArgument", call(client, ROOT, MANAGER, "UnregisterAgent", "o", ["/test/agent"]))


async def test_agent_registration_errors(client):
    await add_agent(client)
    e = await expect_error("InvalidArgument", call(client, ROOT, MANAGER, "RegisterAgent", "o", ["/test/agent"]))
    assert "already registered" in e.text


# -- registrations --------------------------------------------------------------------------------

@pytest.mark.parametrize("name, command, events, devices, options, error", [
    ("bad name", ["x"], [], [], {}, "InvalidArgument"),
    ("", ["x"], [], [], {}, "InvalidArgument"),
    ("x" * 65, ["x"], [], [], {}, "InvalidArgument"),
    ("ok", [], [], [], {}, "InvalidArgument"),
    ("ok", [""], [], [], {}, "InvalidArgument"),
    ("ok", ["x", "%q"], [], [], {}, "InvalidArgument"),
    ("ok", ["x", "50%"], [], [], {}, "InvalidArgument"),
    ("ok", ["x" * 5000], [], [], {}, "InvalidArgument"),
    ("ok", ["x"], ["bad event"], [], {}, "InvalidArgument"),
    ("ok", ["x"], [], ["serial:1"], {}, "InvalidArgument"),
    ("ok", ["x"], [], ["id:"], {}, "InvalidArgument"),
    ("ok", ["x"], [], [], {"frobnicate": Variant("b", True)}, "InvalidArgument"),
    ("ok", ["x"], [], [], {"system": Variant("s", "yes")}, "InvalidArgument"),
])
async def test_bad_registrations_are_refused(client, name, command, events, devices, options, error):
    await expect_error(error, call(client, ROOT, MANAGER, "RegisterLaunchApplication", "sasasasa{sv}",
                                   [name, command, events, devices, options]))
    assert await applications(client) == []


@pytest.mark.daemon_args("--config", "tests/data/few-registrations.toml")
async def test_registrations_per_user_are_limited(client):
    await register(client, "one")
    await register(client, "two")
    e = await expect_error("LimitExceeded", register(client, "three"))
    assert "the limit is 2" in e.text
    await register(client, "two", ["/usr/bin/two", "again"])  # replacing is not one more
    await register(client, "three", system=True)  # system-wide ones are counted apart
    await call(client, ROOT, MANAGER, "UnregisterLaunchApplication", "sa{sv}", ["one", {}])
    await register(client, "three")
    assert [a["id"] for a in await applications(client)] == ["two", "system:three", "three"]
    await expect_error("NotFound", call(client, ROOT, MANAGER, "UnregisterLaunchApplication", "sa{sv}",
                                        ["one", {}]))


async def test_registrations_persist_across_a_restart(daemon, client):
    await register(client, "scan-app", ["scan-app", "%d"], events=["scan-button"], devices=["id:sim0"])
    await register(client, "to-folder", ["/bin/true"], system=True)
    await call(client, ROOT, MANAGER, "SetDefaultApplication", "sss", ["sim0", "copy-button", "system:to-folder"])
    before = await applications(client)
    saved = json.loads((daemon.state_dir / "registrations.json").read_text())
    assert [a["name"] for a in saved["applications"]] == ["scan-app", "to-folder"]
    assert oct((daemon.state_dir / "registrations.json").stat().st_mode & 0o777) == "0o600"
    assert [p.name for p in daemon.state_dir.iterdir()] == ["registrations.json"]  # no temporary left over
    assert daemon.stop() == 0
    again = Daemon(daemon.address, workdir=str(daemon.workdir))
    proc = again.start()
    try:
        await wait_for_name(client, proc=proc)
        assert await applications(client) == before
        agent = await add_agent(client)
        async with Routed(client) as routed:
            assert (await routed.press(client, "scan"))[2].startswith("launch: scan-app via agent ")
        assert agent.launches[0]["argv"] == ["scan-app", "sim0"]
    finally:
        again.stop()


async def test_a_corrupt_state_file_is_set_aside_and_reported(bus_address, tmp_path):
    state = tmp_path / "state"
    state.mkdir()
    (state / "registrations.json").write_text('{"version": 1, "applications": [')
    daemon = Daemon(bus_address, workdir=str(tmp_path))
    proc = daemon.start()
    bus = await connect(bus_address)
    try:
        await wait_for_name(bus, proc=proc)
        assert await applications(bus) == []
        (aside,) = state.glob("registrations.json.corrupt-*")
        assert aside.read_text() == '{"version": 1, "applications": ['
        assert not (state / "registrations.json").exists()
        assert "registrations file is corrupt; it was set aside" in daemon.log
        assert str(aside) in daemon.log
        await register(bus, "scan-app")
        assert json.loads((state / "registrations.json").read_text())["applications"][0]["name"] == "scan-app"
    finally:
        bus.disconnect()
        daemon.stop()


async def test_unreadable_entries_are_reported_and_the_rest_kept(bus_address, tmp_path):
    state = tmp_path / "state"
    state.mkdir()
    good = {"name": "good", "scope": "user", "uid": ME, "command": ["/bin/true"], "events": [], "devices": [],
            "created": 1.0, "serial": 1}
    bad = {**good, "name": "bad", "command": "not a list", "serial": 2}
    text = json.dumps({"version": 1, "serial": 2, "applications": [good, bad], "defaults": []})
    (state / "registrations.json").write_text(text)
    daemon = Daemon(bus_address, workdir=str(tmp_path))
    proc = daemon.start()
    bus = await connect(bus_address)
    try:
        await wait_for_name(bus, proc=proc)
        assert [a["name"] for a in await applications(bus)] == ["good"]
        (aside,) = state.glob("registrations.json.corrupt-*")
        assert aside.read_text() == text
        assert "application #2" in daemon.log
    finally:
        bus.disconnect()
        daemon.stop()


# -- system-wide applications ---------------------------------------------------------------

RECORDER = r'''out="$1"; shift; { id -u; printf '%%s\n' "$@"; env; } > "$out.tmp" && mv "$out.tmp" "$out"'''


async def test_a_system_wide_application_is_run_by_the_service(daemon, client):
    shared = Path(tempfile.mkdtemp(prefix="stillsvc-system-app-"))
    try:
        shared.chmod(0o777)  # as root, the service runs it as nobody
        out = shared / "ran"
        await register(client, "to-folder", ["/bin/sh", "-c", RECORDER, "sh", str(out), "%d", "%e", "#%n"],
                       devices=["vendor:STILLSVC"], system=True)
        (app,) = await applications(client)
        assert app["id"] == "system:to-folder" and app["scope"] == "system"
        async with Routed(client) as routed:
            _, sequence, consumer = await routed.press(client, "copy")
        user = "nobody" if ME == 0 else pwd.getpwuid(ME).pw_name
        assert re.fullmatch(rf"launch: system:to-folder as {user}, pid \d+ \(only match\)", consumer), consumer
        await wait_until(out.exists, what="the system-wide application writing its file")
        uid, *rest = out.read_text().splitlines()
        assert int(uid) == (pwd.getpwnam("nobody").pw_uid if ME == 0 else ME)
        assert rest[:3] == ["sim0", "copy-button", f"#{sequence}"]
        env = dict(line.split("=", 1) for line in rest[3:] if "=" in line)
        assert env["STILLSVC_DEVICE"] == "sim0" and env["STILLSVC_EVENT"] == "copy-button"
        assert env["STILLSVC_EVENT_SEQUENCE"] == str(sequence) and env["STILLSVC_DEVICE_PATH"] == SIM0
        assert env["STILLSVC_APPLICATION"] == "to-folder" and env["STILLSVC_BUS"] == daemon.address
        assert env["USER"] == user and env["PATH"].startswith("/usr/local/sbin:")
        assert "PYTHONUNBUFFERED" not in env  # the service's own environment is not passed on
        await wait_until(lambda: "system-wide application ended" in daemon.log, what="the application reaped")
    finally:
        shutil.rmtree(shared)


async def test_a_system_wide_application_that_cannot_start_is_undelivered(daemon, client):
    await register(client, "missing", ["/nonexistent/scan-to-folder"], system=True)
    async with Routed(client) as routed:
        consumer = (await routed.press(client))[2]
    assert consumer.startswith("none: undelivered: could not start 'missing' (system-wide): "), consumer
    assert daemon.proc is not None and daemon.proc.poll() is None


# -- other users ------------------------------------------------------------------------------

MULTI_USER_BUS = """<!DOCTYPE busconfig PUBLIC "-//freedesktop//DTD D-Bus Bus Configuration 1.0//EN"
 "http://www.freedesktop.org/standards/dbus/1.0/busconfig.dtd">
<busconfig>
  <type>session</type>
  <listen>unix:tmpdir=/tmp</listen>
  <auth>EXTERNAL</auth>
  <policy context="default">
    <allow user="*"/>
    <allow send_destination="*" eavesdrop="true"/>
    <allow eavesdrop="true"/>
    <allow own="*"/>
  </policy>
</busconfig>
"""


@pytest.mark.skipif(ME != 0 or not shutil.which("setpriv") or not shutil.which("busctl"),
                    reason="needs root, setpriv and busctl to act as a second user")
async def test_other_users_registrations_are_theirs(tmp_path):
    config = tmp_path / "bus.conf"
    config.write_text(MULTI_USER_BUS)
    bus_daemon = DBusDaemon(str(config))
    daemon = Daemon(bus_daemon.address, workdir=str(tmp_path / "daemon"))
    proc = daemon.start()
    try:
        bus = await asyncio.wait_for(connect(bus_daemon.address), TIMEOUT)
    except BaseException:
        daemon.stop()
        bus_daemon.stop()
        raise

    async def as_nobody(*args: str) -> subprocess.CompletedProcess[str]:
        return await asyncio.to_thread(
            subprocess.run, ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups",
                             "busctl", f"--address={bus_daemon.address}", "call", "org.stillsvc.StillImage1",
                             ROOT, MANAGER, *args], capture_output=True, text=True, timeout=TIMEOUT)

    try:
        await wait_for_name(bus, proc=proc)
        r = await as_nobody("RegisterLaunchApplication", "sasasasa{sv}", "theirs", "1", "/bin/true", "0", "0",
                            "0")
        assert r.returncode == 0, r.stderr
        r = await as_nobody("RegisterLaunchApplication", "sasasasa{sv}", "sneaky", "1", "/bin/true", "0", "0",
                            "1", "system", "b", "true")
        assert r.returncode != 0 and "administrators" in r.stderr
        r = await as_nobody("ListLaunchApplications")
        assert r.returncode == 0 and '"theirs"' in r.stdout
        r = await as_nobody("SetDefaultApplication", "sss", "sim0", "scan-button", "theirs")
        assert r.returncode == 0, r.stderr
        # Root's agent never starts another user's registration.
        agent = await add_agent(bus)
        async with Routed(bus) as routed:
            consumer = (await routed.press(bus))[2]
        assert consumer == "none: undelivered: no agent of user 65534 is registered to start 'theirs'"
        assert agent.launches == []
        # Root sees it (an administrator) by its full id, and may remove it.
        assert [a["id"] for a in await applications(bus)] == ["user:65534:theirs"]
        await register(bus, "mine")
        r = await as_nobody("SetDefaultApplication", "sss", "sim0", "scan-button", "")
        assert r.returncode == 0, r.stderr  # their own default: they may clear it
        await call(bus, ROOT, MANAGER, "SetDefaultApplication", "sss", ["sim0", "scan-button", "mine"])
        r = await as_nobody("SetDefaultApplication", "sss", "sim0", "scan-button", "theirs")
        assert r.returncode != 0 and "another user" in r.stderr
        r = await as_nobody("ListLaunchApplications")
        assert '"mine"' not in r.stdout  # other users' registrations stay private
        await call(bus, ROOT, MANAGER, "UnregisterLaunchApplication", "sa{sv}",
                   ["theirs", {"uid": Variant("u", 65534)}])
        assert [a["id"] for a in await applications(bus)] == ["mine"]
    finally:
        bus.disconnect()
        daemon.stop()
        bus_daemon.stop()


@pytest.fixture
async def polkit_service(request, bus_address: str, tmp_path):
    """The daemon asking a mocked polkit (python-dbusmock's polkitd template)."""
    pytest.importorskip("dbusmock", reason="python-dbusmock (test extra) is needed to mock polkit")
    polkitd = subprocess.Popen([sys.executable, "-m", "dbusmock", "--system", "--template", "polkitd"],
                               env={**os.environ, "DBUS_SYSTEM_BUS_ADDRESS": bus_address},
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    daemon = Daemon(bus_address, "--authorization", "polkit", workdir=str(tmp_path))
    request.node._stillsvc_daemon = daemon
    bus = await connect(bus_address)
    try:
        await wait_for_name(bus, "org.freedesktop.PolicyKit1", proc=polkitd)
        await wait_for_name(bus, proc=daemon.start())
        yield bus
    finally:
        bus.disconnect()
        daemon.stop()
        polkitd.terminate()
        polkitd.wait(5)


async def test_with_polkit_system_wide_registrations_need_the_manage_action(polkit_service):
    from stillsvc.frontends.dbus.authority import MANAGE, USE

    bus = polkit_service

    async def allow(*actions: str) -> None:
        await call(bus, "/org/freedesktop/PolicyKit1/Authority", "org.freedesktop.DBus.Mock", "SetAllowed", "as",
                   [list(actions)], destination="org.freedesktop.PolicyKit1")

    await allow(USE)
    await register(bus, "mine")
    e = await expect_error("AccessDenied", register(bus, "to-folder", system=True))
    assert MANAGE in e.text
    await allow(USE, MANAGE)
    await register(bus, "to-folder", system=True)
    await call(bus, ROOT, MANAGER, "SetDefaultApplication", "sss", ["sim0", "scan-button", "system:to-folder"])
    await allow(USE)
    e = await expect_error("AccessDenied", call(bus, ROOT, MANAGER, "UnregisterLaunchApplication", "sa{sv}",
                                                ["to-folder", {"system": Variant("b", True)}]))
    assert MANAGE in e.text
    assert [a["id"] for a in await applications(bus)] == ["mine", "system:to-folder"]


# -- polling and idleness ------------------------------------------------------------------------

def _wakeups(pid: int) -> tuple[int, int]:
    """(context switches of every thread, CPU ticks) of a process."""
    switches = 0
    for task in Path(f"/proc/{pid}/task").iterdir():
        for line in (task / "status").read_text().splitlines():
            if line.startswith(("voluntary_ctxt_switches", "nonvoluntary_ctxt_switches")):
                switches += int(line.split()[1])
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return switches, int(fields[11]) + int(fields[12])


async def test_an_idle_daemon_without_polling_drivers_sleeps(daemon, client):
    await register(client, "scan-app")
    await add_agent(client)
    async with Routed(client) as routed:
        await routed.press(client)
    assert daemon.proc is not None
    before = _wakeups(daemon.proc.pid)
    await asyncio.sleep(1.0)  # measuring an idle second, not waiting for something
    after = _wakeups(daemon.proc.pid)
    assert after[0] - before[0] <= 2, f"{after[0] - before[0]} wake-ups in an idle second"
    assert after[1] - before[1] <= 1, f"{after[1] - before[1]} CPU ticks in an idle second"


# -- stillctl ----------------------------------------------------------------------------------

async def test_stillctl_register_apps_default_unregister(daemon, client):
    r = await stillctl(daemon.address, "register", "scan-app", "--events", "scan-button,copy-button",
                       "--devices", "id:sim0", "--", "scan-app", "--device", "%d")
    assert (r.code, r.out, r.err) == (0, "", "")
    r = await stillctl(daemon.address, "register", "--system", "to-folder", "--", "/bin/true")
    assert r.code == 0, r.err
    r = await stillctl(daemon.address, "default", "sim0", "scan-button", "scan-app")
    assert r.code == 0, r.err
    r = await stillctl(daemon.address, "apps")
    assert r.code == 0, r.err
    header, *rows = r.out.splitlines()
    assert header.split() == ["ID", "EVENTS", "DEVICES", "DEFAULT", "FOR", "COMMAND"]
    assert re.split(r"\s{2,}", rows[0]) == ["scan-app", "scan-button, copy-button", "id:sim0", "sim0 scan-button",
                                            "scan-app --device %d"]
    assert re.split(r"\s{2,}", rows[1]) == ["system:to-folder", "all", "all", "-", "/bin/true"]
    r = await stillctl(daemon.address, "--json", "apps")
    apps = json.loads(r.out)
    assert apps == [{**a, "default_for": [list(p) for p in a["default_for"]]} for a in await applications(client)]
    assert apps[0]["command"] == ["scan-app", "--device", "%d"] and apps[0]["uid"] == ME
    r = await stillctl(daemon.address, "unregister", "scan-app")
    assert r.code == 0, r.err
    r = await stillctl(daemon.address, "unregister", "scan-app")
    assert (r.code, r.err) == (1, "stillctl: no application of yours is registered as 'scan-app'\n")
    r = await stillctl(daemon.address, "unregister", "--system", "to-folder")
    assert r.code == 0, r.err
    r = await stillctl(daemon.address, "apps")
    assert (r.out, r.err) == ("", "no applications registered\n")


@pytest.mark.parametrize("args", [["register", "x"], ["register", "x", "--"], ["register", "x", "--events", "a"],
                                  ["register", "--events", "all,scan-button", "x", "--", "y"],
                                  ["agent", "--chooser", "'"], ["events"], ["unregister"]])
async def test_stillctl_bad_usage(tmp_path, args):
    r = await stillctl(f"unix:path={tmp_path}/unused", *args)
    assert r.code == 2, r
    assert "usage:" in r.err


async def test_stillctl_events_prints_queued_events(daemon, client):
    proc = await start(daemon.address, "events", "sim0")
    assert proc.stdout is not None and proc.stderr is not None
    assert await read_line(proc.stderr) == "Holding sim0 in data mode; its events are queued here (Ctrl-C to stop)"
    assert await get_property(client, SIM0, DEVICE, "DataModeHeld") is True
    async with Routed(client) as routed:
        _, first, consumer = await routed.press(client, "scan")
        assert consumer.startswith("queue: ")
        _, second, _ = await routed.press(client, "email")
        line1, line2 = await read_line(proc.stdout), await read_line(proc.stdout)
        assert re.fullmatch(rf"\d\d:\d\d:\d\d\.\d\d\d sim0 scan-button #{first} button=scan", line1), line1
        assert line2.endswith(f" sim0 email-button #{second} button=email")
        proc.send_signal(signal.SIGINT)
        r = await finish(proc)
        assert r.code == 0, r
        assert "Traceback" not in r.err
        assert await get_property(client, SIM0, DEVICE, "DataModeHeld") is False
        assert (await routed.press(client))[2] == "none: no application registered"


async def test_stillctl_events_json(daemon, client):
    proc = await start(daemon.address, "--json", "events", "sim0")
    assert proc.stdout is not None and proc.stderr is not None
    await read_line(proc.stderr)
    await press(client, "pdf")
    event = json.loads(await read_line(proc.stdout))
    assert event["type"] == "event" and event["event"] == "pdf-button" and event["device"] == "sim0"
    assert event["data"] == {"button": "pdf"} and isinstance(event["sequence"], int)
    proc.send_signal(signal.SIGTERM)
    assert (await finish(proc)).code == 0


async def test_stillctl_events_on_a_busy_device(daemon, client):
    await create_session(client, mode="data")
    r = await stillctl(daemon.address, "events", "sim0")
    assert r.code == 1
    assert r.err.startswith("stillctl: device sim0 in data mode is held by ")


AGENT_APP = textwrap.dedent("""
    import json, os, sys
    keys = [k for k in os.environ if k.startswith("STILLSVC_")]
    with open(sys.argv[1] + ".tmp", "w") as f:
        json.dump({"argv": sys.argv[2:], "env": {k: os.environ[k] for k in keys}}, f)
    os.rename(sys.argv[1] + ".tmp", sys.argv[1])
""")


async def test_stillctl_agent_launches_and_answers_only_the_service(daemon, client, tmp_path):
    out = tmp_path / "launched.json"
    await register(client, "recorder", [sys.executable, "-c", AGENT_APP, str(out), "%d", "%e"])
    proc = await start(daemon.address, "agent")
    assert proc.stdout is not None and proc.stderr is not None
    try:
        line = await read_line(proc.stderr)
        assert line == f"Agent registered with org.stillsvc.StillImage1 on the {daemon.address} bus (Ctrl-C to stop)"
        async with Routed(client) as routed:
            _, sequence, consumer = await routed.press(client, "scan")
        assert re.fullmatch(r"launch: recorder via agent :\S+ \(pid \d+, python3?\S*\) of user \d+, pid \d+ "
                            r"\(only match\)", consumer), consumer
        launched = await read_line(proc.stdout)
        assert re.fullmatch(rf"\d\d:\d\d:\d\d\.\d\d\d launched recorder \(pid \d+\) for sim0 scan-button #{sequence}: "
                            r".*", launched), launched
        await wait_until(out.exists, what="the application started by the agent")
        got = json.loads(out.read_text())
        assert got["argv"] == ["sim0", "scan-button"]
        assert got["env"]["STILLSVC_EVENT_SEQUENCE"] == str(sequence)
        exited = await read_line(proc.stdout)
        assert re.search(r"recorder \(pid \d+\) exited with status 0$", exited), exited
        # Anyone else calling the agent is refused.
        (names,) = await call(client, "/org/freedesktop/DBus", "org.freedesktop.DBus", "ListNames",
                              destination="org.freedesktop.DBus")
        for name in names:
            if name.startswith(":") and name not in (client.unique_name,):
                try:
                    (pid,) = await call(client, "/org/freedesktop/DBus", "org.freedesktop.DBus",
                                        "GetConnectionUnixProcessID", "s", [name], destination="org.freedesktop.DBus")
                except DBusError:
                    continue
                if pid == proc.pid:
                    break
        else:
            raise AssertionError("the agent's connection was not found")
        e = await expect_error("AccessDenied", call(client, "/org/stillsvc/StillImage1/agents/stillctl", AGENT_IFACE,
                                                    "Launch", "sasa{ss}sst",
                                                    ["x", ["/bin/true"], {}, "sim0", "scan-button", 1],
                                                    destination=name))
        assert "only the service" in e.text
        proc.send_signal(signal.SIGINT)
        r = await finish(proc)
        assert r.code == 0, r
        async with Routed(client) as routed:
            assert (await routed.press(client))[2].startswith("none: undelivered: no agent of user ")
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


async def test_stillctl_agent_chooser_and_service_restart(daemon, client, tmp_path):
    await register(client, "first", ["/bin/true"])
    await register(client, "second", ["/bin/true"])
    chooser = tmp_path / "chooser"
    chooser.write_text("#!/bin/sh\ncat > \"$0.in\"; echo \"$STILLSVC_EVENT\" > \"$0.event\"; echo second\n")
    chooser.chmod(0o755)
    proc = await start(daemon.address, "agent", "--chooser", str(chooser))
    assert proc.stdout is not None and proc.stderr is not None
    try:
        await read_line(proc.stderr)
        async with Routed(client) as routed:
            consumer = (await routed.press(client, "copy"))[2]
        assert consumer.startswith("launch: second via agent ") and "(chosen by agent " in consumer
        lines = Path(f"{chooser}.in").read_text().splitlines()
        assert [line.split("\t")[:2] for line in lines] == [["first", "first"], ["second", "second"]]
        assert Path(f"{chooser}.event").read_text() == "copy-button\n"
        chosen = await read_line(proc.stdout)
        assert chosen.endswith(" chose second for sim0 copy-button #1")
        # The service restarts: the agent registers again.
        assert daemon.stop() == 0
        assert await read_line(proc.stderr) == "The service stopped; waiting for it to come back"
        again = Daemon(daemon.address, workdir=str(daemon.workdir))
        again_proc = again.start()
        try:
            assert (await read_line(proc.stderr)).startswith("Agent registered with ")
            await wait_for_name(client, proc=again_proc)
            async with Routed(client) as routed:
                consumer = (await routed.press(client, "copy"))[2]
            assert "(chosen by agent " in consumer
        finally:
            proc.send_signal(signal.SIGINT)
            await finish(proc)
            again.stop()
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


# -- the core without D-Bus: a polling driver -----------------------------------------------------

def _polling_driver():
    from stillsvc.driver import DeviceEvent, EventSource
    from stillsvc.drivers.sim import SimulatedScanner

    class PollingScanner(SimulatedScanner):
        """The simulated scanner, but its buttons are only seen when the service asks."""

        name = "pollsim"
        events = EventSource.POLL

        def __init__(self, config, host) -> None:  # type: ignore[no-untyped-def]
            super().__init__(config, host)
            self.pending: list[DeviceEvent] = []
            self.locked = False
            self.polls = 0
            self.polls_unlocked = 0

        def lock(self, mode) -> None:  # type: ignore[no-untyped-def]
            self.locked = True

        def unlock(self) -> None:
            self.locked = False

        def simulate(self, action: str, **arguments: Any) -> Any:
            if action == "press_button":
                self.pending.append(DeviceEvent(f"{arguments['button']}-button", {"button": arguments["button"]}))
                return None
            return super().simulate(action, **arguments)

        def poll_events(self) -> list[DeviceEvent]:
            self.polls += 1
            self.polls_unlocked += not self.locked
            events, self.pending = self.pending, []
            return events

    return PollingScanner


async def test_core_polls_a_polling_driver_under_the_lock_and_never_during_data_mode(tmp_path):
    from stillsvc.core.agents import Agent, Agents
    from stillsvc.core.config import Config, DeviceConfig, Limits
    from stillsvc.core.events import EventMonitor
    from stillsvc.core.listener import Listener
    from stillsvc.core.manager import DeviceManager
    from stillsvc.core.registry import Registry
    from stillsvc.core.sessions import Client
    from stillsvc.discovery.config import ConfigDiscovery
    from stillsvc.driver import Mode

    config = Config(limits=Limits(poll_interval_ms=10), runtime_dir=str(tmp_path / "run"),
                    state_dir=str(tmp_path / "state"),
                    devices=(DeviceConfig("poll0", "pollsim"), DeviceConfig("push0", "sim")))
    from stillsvc.drivers.sim import SimulatedScanner

    manager = DeviceManager(config, drivers={"pollsim": _polling_driver(), "sim": SimulatedScanner})
    registry = Registry(config.state_dir, config.limits)
    launched: list[tuple[str, int]] = []

    async def launch(request) -> int:  # type: ignore[no-untyped-def]
        launched.append((request.event, request.sequence))
        return 1

    async def choose(request) -> str:  # type: ignore[no-untyped-def]
        raise AssertionError("nothing to choose")

    agents = Agents()
    agents.add(Agent(owner=":test", path="/agent", uid=ME, description="test agent", launch=launch, choose=choose))
    monitor = EventMonitor(manager, registry, agents)
    routed: asyncio.Queue[tuple[str, str]] = asyncio.Queue()

    class Watcher(Listener):
        def event_routed(self, device, record, outcome) -> None:  # type: ignore[no-untyped-def]
            routed.put_nowait((record.name, str(outcome)))

    manager.listeners.append(Watcher())
    monitor.start()
    await manager.start([ConfigDiscovery(config.devices)])
    try:
        await registry.register(ME, "scan-app", ["scan-app"], [], ["id:poll0"])
        poll0 = manager.get("poll0")
        assert monitor._watches["push0"].poller is None  # a push driver is never polled
        await asyncio.to_thread(manager.driver_of("poll0").simulate, "press_button", button="scan")
        name, consumer = await asyncio.wait_for(routed.get(), TIMEOUT)
        assert (name, consumer) == ("scan-button", "launch: scan-app via agent test agent of user "
                                    f"{ME}, pid 1 (only match)")
        assert poll0.driver.polls_unlocked == 0  # every poll under the device lock

        session = await manager.create_session("poll0", Mode.DATA, Client(name=":holder"))
        await asyncio.to_thread(manager.driver_of("poll0").simulate, "press_button", button="copy")
        polls = poll0.driver.polls
        await asyncio.sleep(0.2)  # twenty poll intervals in which nothing may be polled
        assert poll0.driver.polls == polls and routed.empty()
        await manager.close_session(session)
        name, consumer = await asyncio.wait_for(routed.get(), TIMEOUT)
        assert name == "copy-button" and consumer.startswith("launch: scan-app ")
        assert [event for event, _ in launched] == ["scan-button", "copy-button"]
    finally:
        monitor.stop()
        await manager.stop()
