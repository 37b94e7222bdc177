"""stillctl: the command-line client of stillsvc.

Each subcommand is one ``async`` function registered with :func:`command`; it gets
a :class:`Ctl` (the bus connection, D-Bus calls with errors turned into messages,
output as tables or JSON) and the parsed arguments, and returns the exit status.

Exit status: 0 on success; 1 when the service is not running or answers with an
error; 2 for bad usage; ``stillctl lock`` exits with its command's status.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import sys
import threading
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from dbus_fast import BusType, Message, MessageType, Variant
from dbus_fast.aio import MessageBus

from . import __version__
from .names import (
    BUS_NAME,
    DEVICE_IFACE,
    DEVICES_PATH,
    ERROR_PREFIX,
    IFACE_PREFIX,
    MANAGER_IFACE,
    ROOT_PATH,
    SESSION_IFACE,
)

PROG = "stillctl"
DBUS_NAME = "org.freedesktop.DBus"
DBUS_PATH = "/org/freedesktop/DBus"
PROPERTIES_IFACE = "org.freedesktop.DBus.Properties"
OBJECT_MANAGER_IFACE = "org.freedesktop.DBus.ObjectManager"

#: How long an ordinary call may take before stillctl gives up on the service.
CALL_TIMEOUT = 30.0
#: The longest wait the service accepts for data mode or the device lock (seconds).
MAX_WAIT = 600.0
#: After ``lock``'s command ends, how long to wait for the service to take the device back.
TAKE_BACK_WAIT = 3.0

#: D-Bus errors that mean nobody owns the service's name.
_NOT_RUNNING_ERRORS = {
    "org.freedesktop.DBus.Error.ServiceUnknown",
    "org.freedesktop.DBus.Error.NameHasNoOwner",
}


class CtlError(Exception):
    """An expected failure: printed as ``stillctl: <message>``, then exit ``code``."""

    def __init__(self, message: str, code: int = 1, error_name: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.code = code
        #: the D-Bus error name, when the failure is an error reply
        self.error_name = error_name


# -- values and output ------------------------------------------------------------

def plain(value: Any) -> Any:
    """D-Bus values (variants inside dicts and lists) as plain JSON-able Python values."""
    if isinstance(value, Variant):
        return plain(value.value)
    if isinstance(value, dict):
        return {str(k): plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    if isinstance(value, (bytes, bytearray)):
        return list(value)
    return value


def show(value: Any) -> str:
    """A value as a person reads it in a table or a monitor line."""
    value = plain(value)
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, list):
        return ", ".join(show(v) for v in value) if value else "-"
    if isinstance(value, dict):
        return " ".join(f"{k}={show(v)}" for k, v in value.items()) if value else "-"
    if value == "":
        return "-"
    return str(value)


def show_assignment(name: str, value: Any) -> str:
    """``Name=value`` for one-line output, quoting values with spaces."""
    text = show(value)
    if any(c.isspace() for c in text):
        text = json.dumps(text)
    return f"{name}={text}"


def print_json(data: Any, *, lines: bool = False) -> None:
    """JSON on stdout: indented, or one compact object per line (``lines``)."""
    if lines:
        print(json.dumps(plain(data), separators=(",", ":")), flush=True)
    else:
        print(json.dumps(plain(data), indent=2), flush=True)


def print_table(headers: list[str], rows: list[list[Any]]) -> None:
    """Aligned columns; the last column is not padded."""
    cells = [headers] + [[show(c) for c in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers) - 1)]
    for row in cells:
        padded = [c.ljust(w) for c, w in zip(row, widths)] + [row[-1]]
        print("  ".join(padded).rstrip())
    sys.stdout.flush()


def print_fields(title: str, values: dict[str, Any], indent: str = "  ") -> None:
    """A title line, then one ``Name  value`` line per entry."""
    print(title)
    width = max((len(k) for k in values), default=0)
    for key, value in values.items():
        print(f"{indent}{key.ljust(width)}  {show(value)}")
    sys.stdout.flush()


def short_interface(name: str) -> str:
    prefix = IFACE_PREFIX + "."
    return name[len(prefix):] if name.startswith(prefix) else name


def clock(timestamp: float | None = None) -> str:
    """``HH:MM:SS.mmm`` in local time."""
    t = time.time() if timestamp is None else timestamp
    return time.strftime("%H:%M:%S", time.localtime(t)) + f".{int(t * 1000) % 1000:03d}"


# -- the bus ------------------------------------------------------------------------

def bus_argument(value: str) -> str:
    """``--bus``: system, session or a D-Bus address (``transport:key=value,...``)."""
    if value in ("system", "session"):
        return value
    if ":" in value and "=" in value:
        return value
    raise argparse.ArgumentTypeError(
        f"{value!r} is not 'system', 'session' or a D-Bus address such as unix:path=/run/dbus/system_bus_socket")


@dataclass
class Ctl:
    """What every subcommand works with: the connection, calls, output."""

    bus_spec: str
    json: bool = False
    bus: MessageBus | None = None

    # -- connecting -------------------------------------------------------------
    @property
    def not_running(self) -> str:
        return f"the stillsvc service is not running on the {self.bus_spec} bus"

    async def connect(self, *, need_service: bool = True) -> MessageBus:
        try:
            if self.bus_spec in ("system", "session"):
                bus_type = BusType.SYSTEM if self.bus_spec == "system" else BusType.SESSION
                bus = MessageBus(bus_type=bus_type, negotiate_unix_fd=True)
            else:
                bus = MessageBus(bus_address=self.bus_spec, negotiate_unix_fd=True)
            self.bus = await asyncio.wait_for(bus.connect(), CALL_TIMEOUT)
        except Exception as e:
            reason = e.strerror if isinstance(e, OSError) and e.strerror else str(e) or type(e).__name__
            raise CtlError(f"{self.not_running} (cannot connect to the bus: {reason})") from None
        if need_service and not await self.service_owner():
            raise CtlError(self.not_running)
        return self.bus

    def disconnect(self) -> None:
        if self.bus is not None and self.bus.connected:
            self.bus.disconnect()

    async def service_owner(self) -> str | None:
        """The unique name of the service's connection, or None if it is not on the bus."""
        try:
            (owner,) = await self.dbus("GetNameOwner", "s", [BUS_NAME])
        except CtlError:
            return None
        return owner

    # -- calls ------------------------------------------------------------------------
    async def call_message(self, path: str, interface: str, member: str, signature: str = "",
                           body: list[Any] | None = None, *, destination: str = BUS_NAME,
                           timeout: float | None = CALL_TIMEOUT) -> Message:
        """A method call; an error reply becomes a :class:`CtlError` with a readable message."""
        assert self.bus is not None
        msg = Message(destination=destination, path=path, interface=interface, member=member,
                      signature=signature, body=body or [])
        try:
            reply = await asyncio.wait_for(self.bus.call(msg), timeout)
        except TimeoutError:
            raise CtlError(f"the service did not answer {member} within {timeout:g} s") from None
        except (EOFError, ConnectionError, OSError) as e:
            raise CtlError(f"lost the connection to the {self.bus_spec} bus ({e or type(e).__name__})") from None
        if reply is None:
            raise CtlError(f"lost the connection to the {self.bus_spec} bus")
        if reply.message_type is MessageType.ERROR:
            for fd in reply.unix_fds:
                os.close(fd)
            name = reply.error_name or ""
            text = self.error_text(name, reply.body[0] if reply.body else "")
            if name == "org.freedesktop.DBus.Error.NoReply" and destination == BUS_NAME \
                    and not await self.service_owner():
                text = f"the stillsvc service stopped while handling {member}"
            raise CtlError(text, error_name=name)
        return reply

    async def call(self, path: str, interface: str, member: str, signature: str = "",
                   body: list[Any] | None = None, **kwargs: Any) -> list[Any]:
        return (await self.call_message(path, interface, member, signature, body, **kwargs)).body

    async def dbus(self, member: str, signature: str = "", body: list[Any] | None = None) -> list[Any]:
        """A call to the bus itself (org.freedesktop.DBus)."""
        return await self.call(DBUS_PATH, DBUS_NAME, member, signature, body, destination=DBUS_NAME)

    def error_text(self, name: str, text: Any) -> str:
        text = str(text or "").strip()
        if name in _NOT_RUNNING_ERRORS:
            return self.not_running
        if name.startswith(ERROR_PREFIX + "."):
            return text or name[len(ERROR_PREFIX) + 1:]
        if name == "org.freedesktop.DBus.Error.AccessDenied":
            return f"the bus refused the call: {text}" if text else "the bus refused the call"
        if name == "org.freedesktop.DBus.Error.NoReply":
            return "the service did not answer"
        return f"{text} ({name})" if text else name

    async def add_match(self, **rule: str) -> None:
        await self.dbus("AddMatch", "s", [",".join(f"{k}='{v}'" for k, v in rule.items())])

    # -- the service's objects -------------------------------------------------------------
    async def managed_objects(self) -> dict[str, dict[str, dict[str, Any]]]:
        """Every device object: path -> interface -> property -> plain value."""
        (objects,) = await self.call(ROOT_PATH, OBJECT_MANAGER_IFACE, "GetManagedObjects")
        return {path: {iface: plain(props) for iface, props in ifaces.items()} for path, ifaces in objects.items()}

    async def find_device(self, device_id: str) -> str:
        (path,) = await self.call(ROOT_PATH, MANAGER_IFACE, "FindDevice", "s", [device_id])
        return path

    async def get_property(self, path: str, interface: str, name: str) -> Any:
        (value,) = await self.call(path, PROPERTIES_IFACE, "Get", "ss", [interface, name])
        return plain(value)


# -- subcommands -----------------------------------------------------------------------

Run = Callable[[Ctl, argparse.Namespace], Awaitable[int]]


@dataclass
class Command:
    name: str
    run: Run
    help: str
    description: str | None
    arguments: list[tuple[tuple[Any, ...], dict[str, Any]]]
    epilog: str | None = None
    usage: str | None = None
    #: Checks the parsed arguments before anything is sent; returns an error or None.
    check: Callable[[argparse.Namespace], str | None] | None = None


COMMANDS: dict[str, Command] = {}


def arg(*names: Any, **options: Any) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """One ``add_argument`` call for :func:`command`."""
    return names, options


def command(name: str, help: str, *arguments: tuple[tuple[Any, ...], dict[str, Any]],
            description: str | None = None, epilog: str | None = None,
            usage: str | None = None,
            check: Callable[[argparse.Namespace], str | None] | None = None) -> Callable[[Run], Run]:
    """Register a subcommand: ``fn(ctl, args) -> exit status``."""

    def register(fn: Run) -> Run:
        COMMANDS[name] = Command(name, fn, help, description, list(arguments), epilog, usage, check)
        return fn

    return register


def device_rows(objects: dict[str, dict[str, dict[str, Any]]]) -> list[dict[str, Any]]:
    """The Device properties of every device, plus its path, sorted by id."""
    rows = [{**ifaces[DEVICE_IFACE], "path": path} for path, ifaces in objects.items() if DEVICE_IFACE in ifaces]
    return sorted(rows, key=lambda d: str(d.get("Id", d["path"])))


@command("list", "list the devices",
         description="One line per device: its id, state, the client holding it in data mode, and its name.")
async def cmd_list(ctl: Ctl, args: argparse.Namespace) -> int:
    devices = device_rows(await ctl.managed_objects())
    if ctl.json:
        print_json(devices)
    elif not devices:
        print("no devices", file=sys.stderr)
    else:
        print_table(["ID", "STATE", "DATA MODE", "NAME"],
                    [[d.get("Id"), d.get("State"), d.get("DataModeHolder") or "-", d.get("Name")] for d in devices])
    return 0


@command("info", "show every property of one device",
         arg("device", metavar="DEVICE", help="device id, as shown by 'stillctl list' (e.g. sim0)"),
         description="Show the Device properties of DEVICE, and its Simulator properties if it is simulated.")
async def cmd_info(ctl: Ctl, args: argparse.Namespace) -> int:
    path = await ctl.find_device(args.device)
    interfaces = (await ctl.managed_objects()).get(path, {})
    if DEVICE_IFACE not in interfaces:
        raise CtlError(f"no device {args.device!r}")
    device = interfaces[DEVICE_IFACE]
    others = {short_interface(name): props for name, props in interfaces.items() if name != DEVICE_IFACE}
    if ctl.json:
        print_json({**device, "path": path, **others})
        return 0
    print_fields(f"{device.get('Id', args.device)}  {path}", device)
    for name, props in others.items():
        print()
        print_fields(name, props)
    return 0


# -- monitor ------------------------------------------------------------------------

class Monitor:
    """Turns the service's signals into one line each (text or JSON)."""

    def __init__(self, ctl: Ctl) -> None:
        self.ctl = ctl
        self.owner: str | None = None
        #: path -> interface -> properties, as last seen
        self.objects: dict[str, dict[str, dict[str, Any]]] = {}
        self.tasks: set[asyncio.Task[Any]] = set()
        self.stop = asyncio.Event()

    def device_id(self, path: str) -> str:
        device = self.objects.get(path, {}).get(DEVICE_IFACE, {})
        return str(device.get("Id") or path.rsplit("/", 1)[-1])

    def emit(self, kind: str, path: str | None, text: str, when: float | None = None, **data: Any) -> None:
        when = time.time() if when is None else when
        device = self.device_id(path) if path else None
        try:
            if self.ctl.json:
                print_json({"time": round(when, 6), "type": kind, "device": device, "path": path, **data},
                           lines=True)
            else:
                print(f"{clock(when)} {device or '-'} {text}", flush=True)
        except BrokenPipeError:
            # The reader went away (stillctl monitor | head): stop quietly.
            silence_stdout()
            self.stop.set()

    def spawn(self, coro: Awaitable[Any]) -> None:
        task = asyncio.ensure_future(coro)
        self.tasks.add(task)
        task.add_done_callback(self._task_done)

    def _task_done(self, task: asyncio.Task[Any]) -> None:
        self.tasks.discard(task)
        if not task.cancelled() and isinstance(task.exception(), CtlError):
            warn(task.exception().message)  # type: ignore[union-attr]

    # -- what the service is and has -------------------------------------------------
    async def start(self) -> None:
        """Subscribe to everything, then take the first snapshot."""
        ctl = self.ctl
        assert ctl.bus is not None
        ctl.bus.add_message_handler(self.handle)
        await ctl.add_match(type="signal", sender=DBUS_NAME, interface=DBUS_NAME, member="NameOwnerChanged",
                            arg0=BUS_NAME)
        await ctl.add_match(type="signal", sender=BUS_NAME, path=ROOT_PATH, interface=OBJECT_MANAGER_IFACE)
        await ctl.add_match(type="signal", sender=BUS_NAME, interface=PROPERTIES_IFACE,
                            member="PropertiesChanged", path_namespace=DEVICES_PATH)
        owner = await ctl.service_owner()
        if owner is None:
            raise CtlError(ctl.not_running)
        await self.attach(owner, announce=False)

    async def attach(self, owner: str, announce: bool) -> None:
        """The service (re)appeared: ask for events and report what changed meanwhile."""
        self.owner = owner
        await self.ctl.call(ROOT_PATH, MANAGER_IFACE, "WatchEvents")
        objects = await self.ctl.managed_objects()
        if self.owner != owner:
            return
        if announce:
            for path, ifaces in objects.items():
                if DEVICE_IFACE in ifaces and DEVICE_IFACE not in self.objects.get(path, {}):
                    self.objects.setdefault(path, {})[DEVICE_IFACE] = ifaces[DEVICE_IFACE]
                    self.added(path, ifaces[DEVICE_IFACE])
        self.objects = objects

    def detach(self) -> None:
        self.owner = None
        self.emit("service-stopped", None, "service stopped")
        for path, ifaces in list(self.objects.items()):
            if DEVICE_IFACE in ifaces:
                self.emit("removed", path, "removed")
        self.objects = {}

    # -- signals ----------------------------------------------------------------------
    def handle(self, msg: Message) -> None:
        if msg.message_type is not MessageType.SIGNAL:
            return
        try:
            if msg.sender == DBUS_NAME:
                if msg.member == "NameOwnerChanged" and msg.body[0] == BUS_NAME:
                    self.owner_changed(msg.body[2])
                return
            if self.owner is None or msg.sender != self.owner:
                return
            if msg.interface == MANAGER_IFACE and msg.member == "EventRouted":
                self.event_routed(*msg.body)
            elif msg.interface == OBJECT_MANAGER_IFACE and msg.member == "InterfacesAdded":
                self.interfaces_added(*msg.body)
            elif msg.interface == OBJECT_MANAGER_IFACE and msg.member == "InterfacesRemoved":
                self.interfaces_removed(*msg.body)
            elif (msg.interface == PROPERTIES_IFACE and msg.member == "PropertiesChanged"
                  and (msg.path or "").startswith(DEVICES_PATH + "/")):
                self.properties_changed(msg.path, *msg.body)
        except (TypeError, ValueError, IndexError):
            return  # not the shape the service sends: not ours

    def owner_changed(self, new_owner: str) -> None:
        if self.owner is not None and new_owner != self.owner:
            self.detach()
        if new_owner and new_owner != self.owner:
            self.emit("service-started", None, "service started")
            self.spawn(self.attach(new_owner, announce=True))

    def event_routed(self, path: str, event: str, sequence: int, timestamp_us: int, consumer: str,
                     data: dict[str, Variant]) -> None:
        values = plain(data)
        details = "".join(f" {show_assignment(k, v)}" for k, v in values.items())
        self.emit("event", path, f"event {event} #{sequence}{details} -> {consumer}", timestamp_us / 1_000_000,
                  event=event, sequence=sequence, consumer=consumer, data=values)

    def added(self, path: str, properties: dict[str, Any]) -> None:
        name = properties.get("Name") or "-"
        state = properties.get("State") or "-"
        self.emit("added", path, f"added: {name} ({state})", properties=properties)

    def interfaces_added(self, path: str, interfaces: dict[str, dict[str, Variant]]) -> None:
        known = self.objects.setdefault(path, {})
        for iface, props in interfaces.items():
            known[iface] = plain(props)
        if DEVICE_IFACE in interfaces:
            self.added(path, known[DEVICE_IFACE])

    def interfaces_removed(self, path: str, interfaces: list[str]) -> None:
        if DEVICE_IFACE in interfaces:
            self.emit("removed", path, "removed")
        known = self.objects.get(path, {})
        for iface in interfaces:
            known.pop(iface, None)
        if not known:
            self.objects.pop(path, None)

    def properties_changed(self, path: str, interface: str, changed: dict[str, Variant],
                           invalidated: list[str]) -> None:
        known = self.objects.setdefault(path, {}).setdefault(interface, {})
        new = {k: plain(v) for k, v in changed.items() if k not in known or known[k] != plain(v)}
        known.update(new)
        if not new:
            return
        prefix = "" if interface == DEVICE_IFACE else f"{short_interface(interface)}."
        text = " ".join(show_assignment(prefix + k, v) for k, v in new.items())
        self.emit("changed", path, f"changed {text}", interface=short_interface(interface), properties=new)


@command("monitor", "print device, property and event changes as they happen",
         description="Print devices being added and removed, property changes, and every event with the "
                     "consumer it was routed to, until interrupted (Ctrl-C).")
async def cmd_monitor(ctl: Ctl, args: argparse.Namespace) -> int:
    assert ctl.bus is not None
    loop = asyncio.get_running_loop()
    monitor = Monitor(ctl)
    stop = monitor.stop
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    await monitor.start()
    print(f"Monitoring {BUS_NAME} on the {ctl.bus_spec} bus (Ctrl-C to stop)", file=sys.stderr, flush=True)
    stopped = asyncio.ensure_future(stop.wait())
    lost = asyncio.ensure_future(ctl.bus.wait_for_disconnect())
    await asyncio.wait({stopped, lost}, return_when=asyncio.FIRST_COMPLETED)
    for task in (stopped, lost, *monitor.tasks):
        task.cancel()
    if lost.done() and not stopped.done():
        raise CtlError(f"lost the connection to the {ctl.bus_spec} bus")
    return 0


# -- lock ----------------------------------------------------------------------------

#: Signals passed on to lock's command, unless it got them already (see _forward).
FORWARDED = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
_SI_KERNEL = 0x80


class Supervisor:
    """Runs lock's command and passes signals on to it, the way sudo does.

    stillctl blocks the forwarded signals and SIGCHLD and a thread takes them with
    ``sigwaitinfo``, which tells who sent them: a signal the terminal generated
    (Ctrl-C, hang-up; ``si_code`` SI_KERNEL) already went to the whole foreground
    process group, the command included, and one the command sent itself is its
    own business, so those are not sent again — a second Ctrl-C means "abort now"
    to tools such as scanimage. Everything else (kill from another process) is passed
    on. SIGCHLD tells the thread the command has ended.
    """

    def __init__(self, argv: list[str], env: dict[str, str]) -> None:
        self.argv = argv
        self.env = env
        self.pid = 0
        self.running = False

    def start(self, loop: asyncio.AbstractEventLoop) -> asyncio.Future[int]:
        """Start the command; the future gets its wait status. OSError if it cannot be run."""
        if signal.getsignal(signal.SIGCHLD) == signal.SIG_IGN:
            signal.signal(signal.SIGCHLD, signal.SIG_DFL)  # or the command would be reaped for us
        old_mask = signal.pthread_sigmask(signal.SIG_BLOCK, {*FORWARDED, signal.SIGCHLD})
        try:
            # The command starts with the mask stillctl was started with, and with the
            # dispositions Python changed for itself put back.
            self.pid = os.posix_spawnp(self.argv[0], self.argv, self.env, setsigmask=old_mask,
                                       setsigdef=(signal.SIGPIPE, signal.SIGXFSZ))
        except BaseException:
            signal.pthread_sigmask(signal.SIG_SETMASK, old_mask)
            raise
        self.running = True
        result: asyncio.Future[int] = loop.create_future()

        def finish(status: int) -> None:
            signal.pthread_sigmask(signal.SIG_SETMASK, old_mask)
            if not result.done():
                result.set_result(status)

        threading.Thread(target=self._supervise, args=(loop, finish), name="stillctl-lock", daemon=True).start()
        return result

    def _supervise(self, loop: asyncio.AbstractEventLoop, finish: Callable[[int], None]) -> None:
        watched = {*FORWARDED, signal.SIGCHLD}
        while True:
            pid, status = os.waitpid(self.pid, os.WNOHANG)
            if pid == self.pid:
                self.running = False
                loop.call_soon_threadsafe(finish, status)
                return
            info = signal.sigwaitinfo(watched)
            if info.si_signo != signal.SIGCHLD:
                self._forward(info)

    def _forward(self, info: Any) -> None:
        if info.si_code == _SI_KERNEL or info.si_pid == self.pid:
            return
        try:
            os.kill(self.pid, info.si_signo)
        except ProcessLookupError:
            pass

    def forward(self, signum: int) -> None:
        """For a signal that reached stillctl by another way than the thread."""
        if self.running:
            try:
                os.kill(self.pid, signum)
            except ProcessLookupError:
                pass


def exit_status(wait_status: int) -> int:
    """The exit status a shell would report: the code, or 128+N when killed by signal N."""
    if os.WIFSIGNALED(wait_status):
        return 128 + os.WTERMSIG(wait_status)
    return os.waitstatus_to_exitcode(wait_status)


def _check_lock(args: argparse.Namespace) -> str | None:
    if args.command[:1] == ["--"]:
        args.command = args.command[1:]
    return None if args.command else "no command given"


def timeout_argument(value: str) -> float:
    try:
        seconds = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is not a number of seconds") from None
    if not 0 <= seconds <= MAX_WAIT:
        raise argparse.ArgumentTypeError(f"the timeout must be between 0 and {MAX_WAIT:g} seconds")
    return seconds


async def open_both(ctl: Ctl, device_id: str, path: str, timeout: float, deadline: float) -> str:
    """A session in mode ``both``, waiting in line for data mode until ``deadline``.

    While another program has the device (another ``stillctl lock``, say) the service
    answers Busy at once rather than queueing; wait for it to take the device back,
    then get in line again.
    """
    loop = asyncio.get_running_loop()
    watch: StateWatch | None = None
    while True:
        remaining = max(0.0, deadline - loop.time())
        try:
            (session,) = await ctl.call(ROOT_PATH, MANAGER_IFACE, "CreateDevice", "ssa{sv}",
                                        [device_id, "both", {"wait_ms": Variant("u", round(remaining * 1000))}],
                                        timeout=remaining + CALL_TIMEOUT)
            return session
        except CtlError as e:
            if e.error_name != f"{ERROR_PREFIX}.Busy" or remaining <= 0:
                raise
            if watch is None:
                watch = StateWatch(ctl, path)
                await watch.start()
            watch.back.clear()
            if await ctl.get_property(path, DEVICE_IFACE, "State") != "held-by-program":
                continue
            warn(f"{device_id} is held by another program; waiting up to {round(remaining, 1):g} s")
            if not await watch.wait(remaining):
                raise CtlError(f"gave up waiting for {device_id} after {timeout:g} s: "
                               "it is still held by another program") from None


@command("lock", "run a command with a device to itself, in the manner of flock(1)",
         arg("--timeout", type=timeout_argument, default=30.0, metavar="SECONDS",
             help="how long to wait for the device (default 30; 0: fail at once if it is busy)"),
         arg("device", metavar="DEVICE", help="device id (e.g. sim0)"),
         arg("command", nargs=argparse.REMAINDER, metavar="-- COMMAND [ARGS...]", help="the command to run"),
         description="Wait (first come, first served) until DEVICE is free, make the service stand back "
                     "(it releases the device's port and pauses event monitoring), and run COMMAND with the "
                     "device's lock file held. COMMAND inherits the locked file descriptor, named in "
                     "STILLSVC_LOCK_FD (the device id is in STILLSVC_DEVICE); the service takes the device "
                     "back when every copy of that descriptor is closed.",
         usage="%(prog)s [--timeout SECONDS] DEVICE -- COMMAND [ARGS...]",
         check=_check_lock,
         epilog="Exit status: COMMAND's; 128+N if it was killed by signal N; 127 if it could not be run; "
                "1 if the device could not be had.")
async def cmd_lock(ctl: Ctl, args: argparse.Namespace) -> int:
    argv = args.command
    loop = asyncio.get_running_loop()
    deadline = loop.time() + args.timeout
    # Waiting in line can take as long as --timeout; the service answers Timeout then.
    patience = args.timeout + CALL_TIMEOUT

    device_id = args.device
    path = await ctl.find_device(device_id)
    session = await open_both(ctl, device_id, path, args.timeout, deadline)
    fd = -1
    try:
        remaining_ms = max(0, round((deadline - loop.time()) * 1000))
        await ctl.call(session, SESSION_IFACE, "LockDevice", "u", [remaining_ms], timeout=patience)
        reply = await ctl.call_message(session, SESSION_IFACE, "HandOver")
        if not reply.unix_fds or not reply.body or reply.body[0] >= len(reply.unix_fds):
            for extra in reply.unix_fds:
                os.close(extra)
            raise CtlError(f"the service did not pass the lock of {device_id} "
                           "(the bus may not support passing file descriptors)")
        fd = reply.unix_fds[reply.body[0]]
        for extra in reply.unix_fds:
            if extra != fd:
                os.close(extra)
        os.set_inheritable(fd, True)
        env = {**os.environ, "STILLSVC_LOCK_FD": str(fd), "STILLSVC_DEVICE": device_id}
        supervisor = Supervisor(argv, env)
        try:
            finished = supervisor.start(loop)
        except OSError as e:
            warn(f"cannot run {argv[0]!r}: {e.strerror or e}")
            return 127
        for signum in FORWARDED:
            loop.add_signal_handler(signum, supervisor.forward, signum)
        try:
            status = exit_status(await finished)
        finally:
            for signum in FORWARDED:
                loop.remove_signal_handler(signum)
    finally:
        changes = StateWatch(ctl, path)
        if fd >= 0:
            await changes.start()
            os.close(fd)
        try:
            await ctl.call(session, SESSION_IFACE, "Close")
        except CtlError:
            pass  # the session goes with the connection anyway
    if fd >= 0 and not await changes.wait_back(TAKE_BACK_WAIT):
        warn(f"note: the lock of {device_id} is still open in another process; "
             "the service takes the device back when it is closed")
    return status


class StateWatch:
    """Waits for a device's State to leave ``held-by-program`` (the service took it back)."""

    def __init__(self, ctl: Ctl, path: str) -> None:
        self.ctl = ctl
        self.path = path
        self.back = asyncio.Event()

    def _handle(self, msg: Message) -> None:
        if (msg.message_type is MessageType.SIGNAL and msg.path == self.path and msg.member == "PropertiesChanged"
                and msg.body and msg.body[0] == DEVICE_IFACE):
            state = msg.body[1].get("State")
            if state is not None and state.value != "held-by-program":
                self.back.set()

    async def start(self) -> None:
        assert self.ctl.bus is not None
        self.ctl.bus.add_message_handler(self._handle)
        try:
            await self.ctl.add_match(type="signal", sender=BUS_NAME, path=self.path, interface=PROPERTIES_IFACE,
                                     member="PropertiesChanged")
        except CtlError:
            pass

    async def wait_back(self, timeout: float) -> bool:
        try:
            state = await self.ctl.get_property(self.path, DEVICE_IFACE, "State")
        except CtlError:
            return True  # the device is gone: nothing to wait for
        if state != "held-by-program":
            return True
        return await self.wait(timeout)

    async def wait(self, timeout: float) -> bool:
        try:
            await asyncio.wait_for(self.back.wait(), timeout)
        except TimeoutError:
            return False
        return True


# -- the program -------------------------------------------------------------------------

def silence_stdout() -> None:
    """Send what is left for stdout to /dev/null (its reader is gone)."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    os.close(devnull)


def warn(message: str) -> None:
    print(f"{PROG}: {message}", file=sys.stderr, flush=True)


def add_global_options(parser: argparse.ArgumentParser, default: Any) -> None:
    parser.add_argument("--bus", default=default, metavar="BUS",
                        help="'system', 'session' or a D-Bus address (default: $STILLSVC_BUS, else system)")
    parser.add_argument("--json", action="store_true", default=default,
                        help="machine-readable output (JSON; JSON lines for monitor)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG, description="Control and inspect stillsvc, the still-image service: devices, events, locks.")
    add_global_options(parser, None)
    parser.add_argument("--version", action="version", version=f"{PROG} {__version__}")
    sub = parser.add_subparsers(dest="subcommand", metavar="COMMAND", required=True)
    parser.subcommand_parsers = {}  # type: ignore[attr-defined]
    for cmd in COMMANDS.values():
        p = sub.add_parser(cmd.name, help=cmd.help, description=cmd.description or cmd.help, epilog=cmd.epilog,
                           usage=cmd.usage)
        # The global options are accepted after the subcommand too.
        parser.subcommand_parsers[cmd.name] = p  # type: ignore[attr-defined]
        add_global_options(p, argparse.SUPPRESS)
        for names, options in cmd.arguments:
            p.add_argument(*names, **options)
    return parser


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = build_parser()
    args = parser.parse_args(argv)
    args.json = bool(args.json)
    check = COMMANDS[args.subcommand].check
    problem = check(args) if check else None
    if problem:
        parser.subcommand_parsers[args.subcommand].error(problem)  # type: ignore[attr-defined]
    if args.bus is None:
        args.bus = os.environ.get("STILLSVC_BUS") or "system"
        source = "STILLSVC_BUS"
    else:
        source = "--bus"
    try:
        args.bus = bus_argument(args.bus)
    except argparse.ArgumentTypeError as e:
        parser.error(f"{source}: {e}")
    return args


async def run(args: argparse.Namespace) -> int:
    ctl = Ctl(bus_spec=args.bus, json=args.json)
    try:
        await ctl.connect()
        return await COMMANDS[args.subcommand].run(ctl, args)
    finally:
        ctl.disconnect()


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        return asyncio.run(run(args))
    except CtlError as e:
        warn(e.message)
        return e.code
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        # The reader went away (stillctl ... | head): no complaint, like other tools.
        silence_stdout()
        return 0


# The item-tree subcommands (scan, items, props) register themselves on import.
from . import ctl_scan  # noqa: E402,F401
# The event subcommands (agent, register, unregister, apps, default, events) too.
from . import ctl_events  # noqa: E402,F401


if __name__ == "__main__":
    # Run the package's module, where every subcommand has registered itself.
    from stillsvc import ctl as _ctl

    sys.exit(_ctl.main())
