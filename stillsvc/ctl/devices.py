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

from stillsvc.client import (
    Busy,
    Change,
    Changes,
    ClientError,
    Device,
    EventRouted,
    InterfacesAdded,
    InterfacesRemoved,
    Manager,
    PropertiesChanged,
    ServiceStarted,
    ServiceStopped,
    Session,
    StillError,
)
from stillsvc.common.names import BUS_NAME, DEVICE_IFACE
from stillsvc.ctl.base import (
    MAX_WAIT,
    TAKE_BACK_WAIT,
    Ctl,
    CtlError,
    arg,
    clock,
    command,
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


async def device_objects(manager: Manager) -> dict[str, dict[str, dict[str, Any]]]:
    """Every device object: path -> interface -> property -> value."""
    return {device.path: device.interfaces for device in await manager.devices()}


@command("list", "list the devices",
         arg("--all", "-a", action="store_true",
             help="also every device discovery found: the driver it matched, or why none did"),
         description="One line per device: its id, state, the client holding it in data mode, and its name. "
                     "A failed device shows why. With --all, one line per device that discovery found "
                     "(configured, USB, ...) with the driver it matched and what became of it: the place "
                     "to look when a device does not show up.")
async def cmd_list(ctl: Ctl, args: argparse.Namespace) -> int:
    if args.all:
        return await list_candidates(ctl)
    devices = device_rows(await device_objects(ctl.client.manager))
    if ctl.json:
        print_json(devices)
    elif not devices:
        print("no devices", file=sys.stderr)
    else:
        print_table(["ID", "STATE", "DATA MODE", "NAME"],
                    [[d.get("Id"), _state(d), d.get("DataModeHolder") or "-", d.get("Name")] for d in devices])
    return 0


def _state(device: dict[str, Any]) -> str:
    reason = device.get("StateReason")
    return f"{device.get('State')}: {reason}" if reason else str(device.get("State"))


async def list_candidates(ctl: Ctl) -> int:
    candidates = await ctl.client.manager.candidates()
    if ctl.json:
        print_json([c.as_dict() for c in candidates])
        return 0
    if not candidates:
        print("discovery found nothing", file=sys.stderr)
        return 0
    rows = []
    for c in candidates:
        what = f"{c.vendor_id}:{c.product_id}" if c.vendor_id else c.port or "-"
        if c.status == "added":
            outcome = f"device {c.device_id}"
        else:
            outcome = f"{c.status}: {c.reason}" if c.reason else c.status
        rows.append([c.subsystem, c.id, what, c.name or "-", c.driver or "-", outcome])
    print_table(["FROM", "CANDIDATE", "ID/PORT", "NAME", "DRIVER", "RESULT"], rows)
    return 0


@command("info", "show every property of one device",
         arg("device", metavar="DEVICE", help="device id, as shown by 'stillctl list' (e.g. sim0)"),
         description="Show the Device properties of DEVICE, and its Simulator properties if it is simulated.")
async def cmd_info(ctl: Ctl, args: argparse.Namespace) -> int:
    info = await (await ctl.client.manager.find_device(args.device)).info()
    device = info.as_dict()
    others = {short_interface(name): props for name, props in info.interfaces.items() if name != DEVICE_IFACE}
    if ctl.json:
        print_json({**device, "path": info.path, **others})
        return 0
    print_fields(f"{device.get('Id', args.device)}  {info.path}", device)
    for name, props in others.items():
        print()
        print_fields(name, props)
    return 0


# -- monitor ------------------------------------------------------------------------

class Monitor:
    """Turns the service's changes into one line each (text or JSON)."""

    def __init__(self, ctl: Ctl) -> None:
        self.ctl = ctl
        #: path -> interface -> properties, as last seen
        self.objects: dict[str, dict[str, dict[str, Any]]] = {}
        self.tasks: set[asyncio.Task[Any]] = set()
        self.stop = asyncio.Event()
        #: counts the service's starts and stops: a snapshot taken across one is stale
        self.generation = 0

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
        if not task.cancelled() and isinstance(task.exception(), (StillError, ClientError)):
            warn(task.exception().message)  # type: ignore[union-attr]

    # -- what the service has -------------------------------------------------------------
    async def attach(self, announce: bool) -> None:
        """The service (re)appeared: report what it has that we had not seen."""
        generation = self.generation
        objects = await device_objects(self.ctl.client.manager)
        if generation != self.generation:
            return  # it stopped or restarted meanwhile: the next attach reports
        if announce:
            for path, ifaces in objects.items():
                if DEVICE_IFACE in ifaces and DEVICE_IFACE not in self.objects.get(path, {}):
                    self.objects.setdefault(path, {})[DEVICE_IFACE] = ifaces[DEVICE_IFACE]
                    self.added(path, ifaces[DEVICE_IFACE])
        self.objects = objects

    def detach(self) -> None:
        self.emit("service-stopped", None, "service stopped")
        for path, ifaces in list(self.objects.items()):
            if DEVICE_IFACE in ifaces:
                self.emit("removed", path, "removed")
        self.objects = {}

    async def follow(self, changes: Changes) -> None:
        """Print every change until the connection ends (ConnectionLost)."""
        async for change in changes:
            self.show(change)

    def show(self, change: Change) -> None:
        if isinstance(change, (ServiceStopped, ServiceStarted)):
            self.generation += 1
        if isinstance(change, ServiceStopped):
            self.detach()
        elif isinstance(change, ServiceStarted):
            self.emit("service-started", None, "service started")
            self.spawn(self.attach(announce=True))
        elif isinstance(change, EventRouted):
            self.event_routed(change)
        elif isinstance(change, InterfacesAdded):
            self.interfaces_added(change.path, change.interfaces)
        elif isinstance(change, InterfacesRemoved):
            self.interfaces_removed(change.path, change.interfaces)
        elif isinstance(change, PropertiesChanged):
            self.properties_changed(change.path, change.interface, change.changed)

    def event_routed(self, e: EventRouted) -> None:
        details = "".join(f" {show_assignment(k, v)}" for k, v in e.data.items())
        self.emit("event", e.device, f"event {e.event} #{e.sequence}{details} -> {e.consumer}", e.time,
                  event=e.event, sequence=e.sequence, consumer=e.consumer, data=e.data)

    def added(self, path: str, properties: dict[str, Any]) -> None:
        name = properties.get("Name") or "-"
        text = f"added: {name} ({_state(properties) if properties.get('State') else '-'})"
        if properties.get("Port"):
            text += f" on {properties['Port']}"
        if int(properties.get("Generation") or 1) > 1:
            text += f", generation {properties['Generation']}"
        self.emit("added", path, text, properties=properties)

    def interfaces_added(self, path: str, interfaces: dict[str, dict[str, Any]]) -> None:
        known = self.objects.setdefault(path, {})
        for iface, props in interfaces.items():
            known[iface] = dict(props)
        if DEVICE_IFACE in interfaces:
            self.added(path, known[DEVICE_IFACE])

    def interfaces_removed(self, path: str, interfaces: tuple[str, ...]) -> None:
        if DEVICE_IFACE in interfaces:
            self.emit("removed", path, "removed")
        known = self.objects.get(path, {})
        for iface in interfaces:
            known.pop(iface, None)
        if not known:
            self.objects.pop(path, None)

    def properties_changed(self, path: str, interface: str, changed: dict[str, Any]) -> None:
        known = self.objects.setdefault(path, {}).setdefault(interface, {})
        new = {k: v for k, v in changed.items() if k not in known or known[k] != v}
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
    loop = asyncio.get_running_loop()
    monitor = Monitor(ctl)
    stop = monitor.stop
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    async with ctl.client.manager.changes(events=True) as changes:
        await monitor.attach(announce=False)
        print(f"Monitoring {BUS_NAME} on the {ctl.bus_spec} bus (Ctrl-C to stop)", file=sys.stderr, flush=True)
        stopped = asyncio.ensure_future(stop.wait())
        following = asyncio.ensure_future(monitor.follow(changes))
        await asyncio.wait({stopped, following}, return_when=asyncio.FIRST_COMPLETED)
        for task in (stopped, following, *monitor.tasks):
            task.cancel()
        if following.done() and not following.cancelled():
            error = following.exception()
            if error is not None and not stop.is_set():
                raise error  # ConnectionLost: "lost the connection to the ... bus"
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


async def open_both(ctl: Ctl, device: Device, timeout: float, deadline: float) -> Session:
    """A session in mode ``both``, waiting in line for data mode until ``deadline``.

    While another program has the device (another ``stillctl lock``, say) the service
    answers Busy at once rather than queueing; wait for it to take the device back,
    then get in line again.
    """
    loop = asyncio.get_running_loop()
    watch: Changes | None = None
    try:
        while True:
            remaining = max(0.0, deadline - loop.time())
            try:
                return await ctl.client.manager.open_session(device.id, "both", wait=remaining)
            except Busy:
                if remaining <= 0:
                    raise
            if watch is None:
                watch = device.changes()
                await watch.start()
            if (await device.info()).state != "held-by-program":
                continue
            warn(f"{device.id} is held by another program; waiting up to {round(remaining, 1):g} s")
            if not await taken_back(watch, remaining):
                raise CtlError(f"gave up waiting for {device.id} after {timeout:g} s: "
                               "it is still held by another program") from None
    finally:
        if watch is not None:
            await watch.close()


async def taken_back(changes: Changes, timeout: float) -> bool:
    """Wait for the device's State to leave ``held-by-program`` (or the device or the
    service to go, which ends the wait as well); False if ``timeout`` runs out first."""
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        try:
            change = await changes.next(max(0.0, deadline - asyncio.get_running_loop().time()))
        except TimeoutError:
            return False
        if isinstance(change, PropertiesChanged) and change.interface == DEVICE_IFACE:
            state = change.changed.get("State")
            if state is not None and state != "held-by-program":
                return True
        elif isinstance(change, (InterfacesRemoved, ServiceStopped)):
            return True


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

    device = await ctl.client.manager.find_device(args.device)
    session = await open_both(ctl, device, args.timeout, deadline)
    fd = -1
    try:
        await session.lock(max(0.0, deadline - loop.time()))
        fd = await session.hand_over()
        os.set_inheritable(fd, True)
        env = {**os.environ, "STILLSVC_LOCK_FD": str(fd), "STILLSVC_DEVICE": device.id}
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
        changes = device.changes()
        if fd >= 0:
            try:
                await changes.start()  # before the lock goes, so that its return is not missed
            except (StillError, ClientError):
                changes = None  # the service is gone: nothing to wait for
            os.close(fd)
        try:
            await session.close()
        except (StillError, ClientError):
            pass  # the session goes with the connection anyway
    if fd >= 0 and changes is not None:
        try:
            if not await device_back(device, changes):
                warn(f"note: the lock of {device.id} is still open in another process; "
                     "the service takes the device back when it is closed")
        finally:
            await changes.close()
    return status


async def device_back(device: Device, changes: Changes) -> bool:
    """Whether the service has the device back, waiting up to TAKE_BACK_WAIT for it."""
    try:
        state = (await device.info()).state
    except (StillError, ClientError):
        return True  # the device is gone: nothing to wait for
    if state != "held-by-program":
        return True
    return await taken_back(changes, TAKE_BACK_WAIT)
