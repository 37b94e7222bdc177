"""stillctl subcommands for device events: ``agent``, ``register``, ``unregister``,
``apps``, ``default`` and ``events``.

Registered with :func:`stillsvc.ctl.command` when :mod:`stillsvc.ctl` loads.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shlex
import signal
import sys
import time
from typing import Any

from dbus_fast import DBusError, Message, MessageType, Variant
from dbus_fast.service import ServiceInterface, method

from stillsvc.common.names import (
    AGENT_IFACE,
    AGENTS_PATH,
    BUS_NAME,
    ERROR_PREFIX,
    MANAGER_IFACE,
    ROOT_PATH,
    SESSION_IFACE,
)
from stillsvc.ctl.base import Ctl, CtlError, arg, clock, command, plain, print_json, print_table, show

DBUS_NAME = "org.freedesktop.DBus"
#: Where ``stillctl agent`` exports its agent object on its own connection.
AGENT_PATH = f"{AGENTS_PATH}/stillctl"
#: How long a --chooser command may take to answer (the service waits 120 s for Choose).
CHOOSER_TIMEOUT = 110.0


def _out(ctl: Ctl, kind: str, text: str, **data: Any) -> None:
    """One line on stdout: text, or a JSON object with ``--json``."""
    try:
        if ctl.json:
            print_json({"time": round(time.time(), 6), "type": kind, **data}, lines=True)
        else:
            print(f"{clock()} {text}", flush=True)
    except BrokenPipeError:
        pass


# -- register, unregister, apps, default --------------------------------------------------

def command_line(argv: list[str]) -> str:
    """A command on one line: shell quoting, and JSON escapes for arguments with newlines or other
    control characters."""
    return " ".join(shlex.quote(a) if a.isprintable() else json.dumps(a) for a in argv)


def _split(values: list[str] | None) -> list[str]:
    """``--events a,b --events c`` as ``[a, b, c]``; "all" (or nothing) as ``[]``."""
    items = [item.strip() for value in values or [] for item in value.split(",") if item.strip()]
    return [] if items in ([], ["all"]) else items


def _check_register(args: argparse.Namespace) -> str | None:
    rest = args.command
    before, after = (rest[:rest.index("--")], rest[rest.index("--") + 1:]) if "--" in rest else ([], rest)
    if before:
        # Options after NAME: stillctl register NAME --events scan-button -- COMMAND
        late = argparse.ArgumentParser(prog="stillctl register", add_help=False)
        late.add_argument("--events", action="append")
        late.add_argument("--devices", action="append")
        late.add_argument("--system", action="store_true")
        try:
            found, unknown = late.parse_known_args(before)
        except SystemExit:
            return "bad options before '--'"
        if unknown:
            return f"unexpected {unknown[0]!r} before '--'"
        args.events = (args.events or []) + (found.events or [])
        args.devices = (args.devices or []) + (found.devices or [])
        args.system = args.system or found.system
    elif rest[:1] and rest[0] in ("--events", "--devices", "--system"):
        return "put '--' before the command"
    args.command = after
    if not args.command:
        return "no command given"
    if "all" in _split(args.events) or "all" in _split(args.devices):
        return "'all' cannot be combined with other values"
    return None


@command("register", "register an application to start for device events",
         arg("--events", action="append", metavar="EVENT[,EVENT...]",
             help="the events it wants, e.g. scan-button,copy-button (default: all)"),
         arg("--devices", action="append", metavar="SPEC[,SPEC...]",
             help="the devices it wants: all (default), or any of id:DEVICE_ID, vendor:VENDOR, model:MODEL"),
         arg("--system", action="store_true",
             help="a system-wide registration, run by the service as an unprivileged user (administrators only)"),
         arg("name", metavar="NAME", help="the registration's name (letters, digits, _.+-)"),
         arg("command", nargs=argparse.REMAINDER, metavar="-- COMMAND [ARGS...]", help="what to run"),
         usage="%(prog)s [--events EVENTS] [--devices DEVICES] [--system] NAME -- COMMAND [ARGS...]",
         check=_check_register,
         description="Register COMMAND to be started when a device event it wants happens and no program "
                     "holds the device in data mode. Per-user registrations (the default) are started in your "
                     "session by your agent ('stillctl agent', the systemd user service stillsvc-agent); "
                     "--system ones by the service itself. In COMMAND, %d is replaced by the device id, %e "
                     "by the event name, %n by the event's sequence number, %p by the device's object path "
                     "and %% by %; the application also gets STILLSVC_DEVICE, STILLSVC_EVENT, "
                     "STILLSVC_EVENT_SEQUENCE, STILLSVC_DEVICE_PATH, STILLSVC_APPLICATION and STILLSVC_BUS in "
                     "its environment. Registering NAME again replaces it.",
         epilog="Example: stillctl register scan-to-pdf --events scan-button --devices id:sim0 -- "
                "/usr/local/bin/scan-to-pdf --device %d --event %e")
async def cmd_register(ctl: Ctl, args: argparse.Namespace) -> int:
    options = {"system": Variant("b", True)} if args.system else {}
    await ctl.call(ROOT_PATH, MANAGER_IFACE, "RegisterLaunchApplication", "sasasasa{sv}",
                   [args.name, args.command, _split(args.events), _split(args.devices), options])
    return 0


@command("unregister", "remove an application registration",
         arg("--system", action="store_true", help="remove the system-wide registration NAME"),
         arg("--uid", type=int, metavar="UID", help="remove user UID's registration NAME (administrators)"),
         arg("name", metavar="NAME", help="the registration's name"),
         description="Remove the registration NAME (yours, or with --system the system-wide one) and the "
                     "defaults that name it.")
async def cmd_unregister(ctl: Ctl, args: argparse.Namespace) -> int:
    options: dict[str, Variant] = {}
    if args.system:
        options["system"] = Variant("b", True)
    if args.uid is not None:
        options["uid"] = Variant("u", args.uid)
    await ctl.call(ROOT_PATH, MANAGER_IFACE, "UnregisterLaunchApplication", "sa{sv}", [args.name, options])
    return 0


@command("apps", "list the registered applications",
         description="One line per registration you can see (yours and the system-wide ones; administrators "
                     "see everyone's), oldest first: its id, the events and devices it wants, the "
                     "(device, event) pairs it is the default for, and its command.")
async def cmd_apps(ctl: Ctl, args: argparse.Namespace) -> int:
    (apps,) = await ctl.call(ROOT_PATH, MANAGER_IFACE, "ListLaunchApplications")
    apps = [plain(a) for a in apps]
    if ctl.json:
        print_json(apps)
    elif not apps:
        print("no applications registered", file=sys.stderr)
    else:
        print_table(["ID", "EVENTS", "DEVICES", "DEFAULT FOR", "COMMAND"],
                    [[a["id"], a["events"] or "all", a["devices"] or "all",
                      [f"{device} {event}" for device, event in a["default_for"]],
                      command_line(a["command"])] for a in apps])
    return 0


@command("default", "set or clear the default application for a device's event",
         arg("--clear", action="store_true", help="clear the default instead"),
         arg("device", metavar="DEVICE", help="device id (e.g. sim0)"),
         arg("event", metavar="EVENT", help="event name (e.g. scan-button)"),
         arg("application", metavar="APPLICATION", nargs="?", default="",
             help="NAME (yours) or system:NAME, as 'stillctl apps' shows it"),
         description="When several registered applications want EVENT from DEVICE, start APPLICATION "
                     "without asking.")
async def cmd_default(ctl: Ctl, args: argparse.Namespace) -> int:
    if bool(args.application) == bool(args.clear):
        raise CtlError("give either APPLICATION or --clear", code=2)
    await ctl.call(ROOT_PATH, MANAGER_IFACE, "SetDefaultApplication", "sss",
                   [args.device, args.event, "" if args.clear else args.application])
    return 0


# -- events -------------------------------------------------------------------------------

@command("events", "hold a device in data mode and print the events queued for it",
         arg("--wait", type=float, default=0.0, metavar="SECONDS",
             help="how long to wait in line if another program holds the device in data mode (default 0)"),
         arg("device", metavar="DEVICE", help="device id (e.g. sim0)"),
         description="Open DEVICE in data mode, subscribe to its events and print each one as it is queued, "
                     "until interrupted (Ctrl-C). While this runs the device's events come here and no "
                     "registered application is started for them.")
async def cmd_events(ctl: Ctl, args: argparse.Namespace) -> int:
    assert ctl.bus is not None
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    wait_ms = max(0, min(600_000, round(args.wait * 1000)))
    (session,) = await ctl.call(ROOT_PATH, MANAGER_IFACE, "CreateDevice", "ssa{sv}",
                                [args.device, "data", {"wait_ms": Variant("u", wait_ms)}],
                                timeout=wait_ms / 1000 + 30)
    queued = asyncio.Event()
    owner = await ctl.service_owner()

    def handle(msg: Message) -> None:
        if (msg.message_type is MessageType.SIGNAL and msg.sender == owner and msg.path == session
                and msg.interface == SESSION_IFACE and msg.member == "EventQueued"):
            queued.set()

    ctl.bus.add_message_handler(handle)
    await ctl.add_match(type="signal", sender=BUS_NAME, path=session, interface=SESSION_IFACE,
                        member="EventQueued")
    await ctl.call(session, SESSION_IFACE, "Subscribe")
    print(f"Holding {args.device} in data mode; its events are queued here (Ctrl-C to stop)",
          file=sys.stderr, flush=True)
    dropped = 0
    stopped = asyncio.ensure_future(stop.wait())
    lost = asyncio.ensure_future(ctl.bus.wait_for_disconnect())
    try:
        queued.set()  # read anything queued before the subscription
        while not stop.is_set():
            got = asyncio.ensure_future(queued.wait())
            await asyncio.wait({got, stopped, lost}, return_when=asyncio.FIRST_COMPLETED)
            got.cancel()
            if lost.done():
                raise CtlError(f"lost the connection to the {ctl.bus_spec} bus")
            if stop.is_set():
                break
            queued.clear()
            while True:
                try:
                    (event,) = await ctl.call(session, SESSION_IFACE, "GetLastNotificationData")
                except CtlError as e:
                    if e.error_name == f"{ERROR_PREFIX}.Empty":
                        break
                    raise
                event = plain(event)
                if event["dropped"] > dropped:
                    _out(ctl, "dropped", f"{args.device} ({event['dropped'] - dropped} events dropped: queue full)",
                         device=args.device, dropped=event["dropped"] - dropped)
                    dropped = event["dropped"]
                details = "".join(f" {k}={show(v)}" for k, v in event["data"].items())
                text = f"{event['device']} {event['event']} #{event['sequence']}{details}"
                if ctl.json:
                    print_json({"time": event["timestamp_us"] / 1_000_000, "type": "event", **event}, lines=True)
                else:
                    print(f"{clock(event['timestamp_us'] / 1_000_000)} {text}", flush=True)
    finally:
        for task in (stopped, lost):
            task.cancel()
        if ctl.bus.connected:
            try:
                await ctl.call(session, SESSION_IFACE, "Close")
            except CtlError:
                pass
    return 0


# -- agent ----------------------------------------------------------------------------------

def _failed(text: str) -> DBusError:
    return DBusError(f"{ERROR_PREFIX}.Failed", text)


class AgentObject(ServiceInterface):
    """The org.stillsvc.StillImage1.Agent object of ``stillctl agent``."""

    def __init__(self, ctl: Ctl, chooser: list[str] | None) -> None:
        super().__init__(AGENT_IFACE)
        self.ctl = ctl
        self.chooser = chooser
        self.children: set[asyncio.Task[Any]] = set()

    @method()
    async def Launch(self, application: "s", argv: "as", environment: "a{ss}", device_id: "s",
                     event: "s", sequence: "t") -> "u":
        if not argv:
            raise _failed("empty command")
        env = {**os.environ, **environment}
        try:
            proc = await asyncio.create_subprocess_exec(
                *argv, env=env, stdin=asyncio.subprocess.DEVNULL, stdout=sys.stderr.fileno(),
                stderr=sys.stderr.fileno(), start_new_session=True, cwd=os.path.expanduser("~"))
        except OSError as e:
            _out(self.ctl, "failed", f"could not start {application} for {device_id} {event} #{sequence}: "
                 f"{e.strerror or e}", application=application, argv=argv, device=device_id, event=event,
                 sequence=sequence, error=e.strerror or str(e))
            raise _failed(f"cannot run {argv[0]!r}: {e.strerror or e}") from None
        _out(self.ctl, "launched", f"launched {application} (pid {proc.pid}) for {device_id} {event} #{sequence}: "
             f"{command_line(argv)}", application=application, pid=proc.pid, argv=argv, device=device_id,
             event=event, sequence=sequence,
             environment={k: v for k, v in environment.items()})
        task = asyncio.ensure_future(self._reap(application, proc))
        self.children.add(task)
        task.add_done_callback(self.children.discard)
        return proc.pid

    async def _reap(self, application: str, proc: asyncio.subprocess.Process) -> None:
        status = await proc.wait()
        _out(self.ctl, "exited", f"{application} (pid {proc.pid}) exited with status {status}",
             application=application, pid=proc.pid, status=status)

    @method()
    async def Choose(self, device_id: "s", event: "s", sequence: "t",
                     candidates: "aa{sv}") -> "s":
        if not self.chooser:
            raise DBusError(f"{ERROR_PREFIX}.NotSupported",
                            "this agent cannot ask its user (start it with --chooser COMMAND)")
        offered = [plain(c) for c in candidates]
        lines = "".join(f"{c['id']}\t{c['name']}\t{command_line(c['command'])}\n" for c in offered)
        env = {**os.environ, "STILLSVC_DEVICE": device_id, "STILLSVC_EVENT": event,
               "STILLSVC_EVENT_SEQUENCE": str(sequence)}
        try:
            proc = await asyncio.create_subprocess_exec(
                *self.chooser, env=env, stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
                stderr=sys.stderr.fileno(), start_new_session=True)
        except OSError as e:
            raise _failed(f"cannot run the chooser {self.chooser[0]!r}: {e.strerror or e}") from None
        try:
            out, _ = await asyncio.wait_for(proc.communicate(lines.encode()), CHOOSER_TIMEOUT)
        except TimeoutError:
            proc.kill()
            await proc.wait()
            raise _failed("the chooser did not answer in time") from None
        answer = out.decode(errors="replace").strip().splitlines()[:1]
        choice = answer[0].split("\t")[0].strip() if answer and proc.returncode == 0 else ""
        ids = [c["id"] for c in offered]
        if choice and choice not in ids:
            raise _failed(f"the chooser answered {choice[:80]!r}, which is not one of {', '.join(ids)}")
        _out(self.ctl, "chosen", f"chose {choice or 'nothing'} for {device_id} {event} #{sequence}",
             device=device_id, event=event, sequence=sequence, choice=choice, candidates=ids)
        return choice


def _check_agent(args: argparse.Namespace) -> str | None:
    if args.chooser is not None:
        try:
            args.chooser = shlex.split(args.chooser)
        except ValueError as e:
            return f"--chooser: {e}"
        if not args.chooser:
            return "--chooser: empty command"
    return None


@command("agent", "start registered applications in this session when device events happen",
         arg("--chooser", metavar="COMMAND",
             help="a command that chooses when several applications want one event: it reads one line per "
                  "candidate (ID<TAB>NAME<TAB>COMMAND) and prints the chosen ID (nothing, or a non-zero "
                  "exit: start none)"),
         check=_check_agent,
         description="Register with the service as this user's agent and start this user's registered "
                     "applications when their events happen, until interrupted (Ctrl-C). Prints one line per "
                     "application started and per application that ended. Run it as the systemd user "
                     "service stillsvc-agent. Only calls from the service are answered. When the service "
                     "restarts, the agent registers again.")
async def cmd_agent(ctl: Ctl, args: argparse.Namespace) -> int:
    bus = ctl.bus
    assert bus is not None
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    agent = AgentObject(ctl, args.chooser)
    state: dict[str, Any] = {"owner": None}
    registering: set[asyncio.Task[Any]] = set()

    def only_the_service(msg: Message) -> Message | None:
        if msg.message_type is MessageType.METHOD_CALL and msg.path == AGENT_PATH \
                and msg.interface == AGENT_IFACE and msg.sender != state["owner"]:
            return Message.new_error(msg, f"{ERROR_PREFIX}.AccessDenied", "this agent answers only the service")
        return None

    async def register(owner: str) -> None:
        state["owner"] = owner
        try:
            await ctl.call(ROOT_PATH, MANAGER_IFACE, "RegisterAgent", "o", [AGENT_PATH])
        except CtlError as e:
            state["error"] = f"could not register the agent: {e.message}"
            stop.set()
            return
        print(f"Agent registered with {BUS_NAME} on the {ctl.bus_spec} bus (Ctrl-C to stop)",
              file=sys.stderr, flush=True)

    def owner_changed(msg: Message) -> None:
        if (msg.message_type is MessageType.SIGNAL and msg.sender == DBUS_NAME
                and msg.member == "NameOwnerChanged" and msg.body[0] == BUS_NAME):
            new = msg.body[2]
            if state["owner"] and new != state["owner"]:
                state["owner"] = None
                print("The service stopped; waiting for it to come back", file=sys.stderr, flush=True)
            if new:
                task = asyncio.ensure_future(register(new))
                registering.add(task)
                task.add_done_callback(registering.discard)

    bus.add_message_handler(only_the_service)
    bus.add_message_handler(owner_changed)
    bus.export(AGENT_PATH, agent)
    await ctl.add_match(type="signal", sender=DBUS_NAME, interface=DBUS_NAME, member="NameOwnerChanged",
                        arg0=BUS_NAME)
    owner = await ctl.service_owner()
    if owner is None:
        raise CtlError(ctl.not_running)
    await register(owner)
    stopped = asyncio.ensure_future(stop.wait())
    lost = asyncio.ensure_future(bus.wait_for_disconnect())
    await asyncio.wait({stopped, lost}, return_when=asyncio.FIRST_COMPLETED)
    for task in (stopped, lost, *registering):
        task.cancel()
    if lost.done() and not stop.is_set():
        raise CtlError(f"lost the connection to the {ctl.bus_spec} bus")
    if state.get("error"):
        raise CtlError(state["error"])
    if state["owner"] is not None and bus.connected:
        try:
            await ctl.call(ROOT_PATH, MANAGER_IFACE, "UnregisterAgent", "o", [AGENT_PATH], timeout=5)
        except CtlError:
            pass
    return 0
