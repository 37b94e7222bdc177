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

from stillsvc.client import (
    ChooseRequest,
    ClientError,
    Failed,
    LaunchRequest,
    NotSupported,
    ServiceStarted,
    ServiceStopped,
    Session,
    StillError,
)
from stillsvc.common.names import AGENTS_PATH, BUS_NAME
from stillsvc.ctl.base import (
    MAX_WAIT,
    Ctl,
    CtlError,
    arg,
    clock,
    command,
    print_json,
    print_table,
    show,
)

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
    await ctl.client.manager.register_application(args.name, args.command, events=_split(args.events),
                                                  devices=_split(args.devices), system=args.system)
    return 0


@command("unregister", "remove an application registration",
         arg("--system", action="store_true", help="remove the system-wide registration NAME"),
         arg("--uid", type=int, metavar="UID", help="remove user UID's registration NAME (administrators)"),
         arg("name", metavar="NAME", help="the registration's name"),
         description="Remove the registration NAME (yours, or with --system the system-wide one) and the "
                     "defaults that name it.")
async def cmd_unregister(ctl: Ctl, args: argparse.Namespace) -> int:
    await ctl.client.manager.unregister_application(args.name, system=args.system, uid=args.uid)
    return 0


@command("apps", "list the registered applications",
         description="One line per registration you can see (yours and the system-wide ones; administrators "
                     "see everyone's), oldest first: its id, the events and devices it wants, the "
                     "(device, event) pairs it is the default for, and its command.")
async def cmd_apps(ctl: Ctl, args: argparse.Namespace) -> int:
    apps = [a.as_dict() for a in await ctl.client.manager.applications()]
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
    await ctl.client.manager.set_default_application(args.device, args.event,
                                                     None if args.clear else args.application)
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
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    wait = max(0.0, min(MAX_WAIT, args.wait))
    session = await ctl.client.manager.open_session(args.device, "data", wait=wait)
    async with session:
        await session.subscribe()
        print(f"Holding {args.device} in data mode; its events are queued here (Ctrl-C to stop)",
              file=sys.stderr, flush=True)
        stopped = asyncio.ensure_future(stop.wait())
        printing = asyncio.ensure_future(print_events(ctl, session, args.device))
        await asyncio.wait({stopped, printing}, return_when=asyncio.FIRST_COMPLETED)
        for task in (stopped, printing):
            task.cancel()
        if printing.done() and not printing.cancelled() and printing.exception() is not None:
            raise printing.exception()  # ConnectionLost, or the session's end
    return 0


async def print_events(ctl: Ctl, session: Session, device_id: str) -> None:
    """One line per queued event (and one for each run of events the full queue dropped)."""
    dropped = 0
    async for event in session.events():
        if event.dropped > dropped:
            _out(ctl, "dropped", f"{device_id} ({event.dropped - dropped} events dropped: queue full)",
                 device=device_id, dropped=event.dropped - dropped)
            dropped = event.dropped
        details = "".join(f" {k}={show(v)}" for k, v in event.data.items())
        text = f"{event.device} {event.event} #{event.sequence}{details}"
        if ctl.json:
            print_json({"time": event.time, "type": "event", **event.as_dict()}, lines=True)
        else:
            print(f"{clock(event.time)} {text}", flush=True)


# -- agent ----------------------------------------------------------------------------------

class Launcher:
    """What ``stillctl agent`` does when the service calls it: start the application
    (Launch), or ask the --chooser command which one (Choose)."""

    def __init__(self, ctl: Ctl, chooser: list[str] | None) -> None:
        self.ctl = ctl
        self.chooser = chooser
        self.children: set[asyncio.Task[Any]] = set()

    async def launch(self, request: LaunchRequest) -> int:
        application, argv, device_id, event, sequence = (request.application, list(request.argv),
                                                          request.device_id, request.event, request.sequence)
        if not argv:
            raise Failed("empty command")
        env = {**os.environ, **request.environment}
        try:
            proc = await asyncio.create_subprocess_exec(
                *argv, env=env, stdin=asyncio.subprocess.DEVNULL, stdout=sys.stderr.fileno(),
                stderr=sys.stderr.fileno(), start_new_session=True, cwd=os.path.expanduser("~"))
        except OSError as e:
            _out(self.ctl, "failed", f"could not start {application} for {device_id} {event} #{sequence}: "
                 f"{e.strerror or e}", application=application, argv=argv, device=device_id, event=event,
                 sequence=sequence, error=e.strerror or str(e))
            raise Failed(f"cannot run {argv[0]!r}: {e.strerror or e}") from None
        _out(self.ctl, "launched", f"launched {application} (pid {proc.pid}) for {device_id} {event} #{sequence}: "
             f"{command_line(argv)}", application=application, pid=proc.pid, argv=argv, device=device_id,
             event=event, sequence=sequence, environment=dict(request.environment))
        task = asyncio.ensure_future(self._reap(application, proc))
        self.children.add(task)
        task.add_done_callback(self.children.discard)
        return proc.pid

    async def _reap(self, application: str, proc: asyncio.subprocess.Process) -> None:
        status = await proc.wait()
        _out(self.ctl, "exited", f"{application} (pid {proc.pid}) exited with status {status}",
             application=application, pid=proc.pid, status=status)

    async def choose(self, request: ChooseRequest) -> str:
        device_id, event, sequence = request.device_id, request.event, request.sequence
        if not self.chooser:
            raise NotSupported("this agent cannot ask its user (start it with --chooser COMMAND)")
        offered = request.candidates
        lines = "".join(f"{c.id}\t{c.name}\t{command_line(list(c.command))}\n" for c in offered)
        env = {**os.environ, "STILLSVC_DEVICE": device_id, "STILLSVC_EVENT": event,
               "STILLSVC_EVENT_SEQUENCE": str(sequence)}
        try:
            proc = await asyncio.create_subprocess_exec(
                *self.chooser, env=env, stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
                stderr=sys.stderr.fileno(), start_new_session=True)
        except OSError as e:
            raise Failed(f"cannot run the chooser {self.chooser[0]!r}: {e.strerror or e}") from None
        try:
            out, _ = await asyncio.wait_for(proc.communicate(lines.encode()), CHOOSER_TIMEOUT)
        except TimeoutError:
            proc.kill()
            await proc.wait()
            raise Failed("the chooser did not answer in time") from None
        answer = out.decode(errors="replace").strip().splitlines()[:1]
        choice = answer[0].split("\t")[0].strip() if answer and proc.returncode == 0 else ""
        ids = [c.id for c in offered]
        if choice and choice not in ids:
            raise Failed(f"the chooser answered {choice[:80]!r}, which is not one of {', '.join(ids)}")
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
    client = ctl.client
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    launcher = Launcher(ctl, args.chooser)
    agent = client.export_agent(launcher.launch, launcher.choose, path=AGENT_PATH)

    async def register() -> None:
        try:
            await agent.register()
        except (StillError, ClientError) as e:
            raise CtlError(f"could not register the agent: {e.message}") from None
        print(f"Agent registered with {BUS_NAME} on the {ctl.bus_spec} bus (Ctrl-C to stop)",
              file=sys.stderr, flush=True)

    async def follow() -> None:
        """Register again whenever the service comes back (it forgets its agents)."""
        async for change in changes:
            if isinstance(change, ServiceStopped):
                print("The service stopped; waiting for it to come back", file=sys.stderr, flush=True)
            elif isinstance(change, ServiceStarted):
                await register()

    async with client.manager.changes(devices=False) as changes:
        await register()
        stopped = asyncio.ensure_future(stop.wait())
        following = asyncio.ensure_future(follow())
        await asyncio.wait({stopped, following}, return_when=asyncio.FIRST_COMPLETED)
        for task in (stopped, following):
            task.cancel()
        error = following.exception() if following.done() and not following.cancelled() else None
        if error is not None and (isinstance(error, CtlError) or not stop.is_set()):
            raise error  # could not register, or ConnectionLost
    if client.service_owner is not None and client.connected:
        try:
            await agent.unregister(timeout=5)
        except (StillError, ClientError):
            pass
    return 0
