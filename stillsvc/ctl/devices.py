"""stillctl list, info, monitor and lock: the devices and who holds them."""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import sys
import threading
import time
from collections.abc import Awaitable, Callable
from typing import Any

from dbus_fast import Message, MessageType, Variant

from stillsvc.common.names import (
    BUS_NAME,
    DEVICE_IFACE,
    DEVICES_PATH,
    ERROR_PREFIX,
    MANAGER_IFACE,
    ROOT_PATH,
    SESSION_IFACE,
)
from stillsvc.ctl.base import (
    CALL_TIMEOUT,
    DBUS_NAME,
    MAX_WAIT,
    OBJECT_MANAGER_IFACE,
    PROPERTIES_IFACE,
    TAKE_BACK_WAIT,
    Ctl,
    CtlError,
    arg,
    clock,
    command,
    plain,
    print_fields,
    print_json,
    print_table,
    short_interface,
    show_assignment,
    silence_stdout,
    warn,
)


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
