"""Test harness: a private dbus-daemon, the real stillsvc daemon as a subprocess, clients.

Nothing here is mocked: the daemon under test is the installed ``stillsvc`` code,
talking over a real ``dbus-daemon`` started for the test.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import tempfile
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from dbus_fast import DBusError, Message, MessageType, Variant
from dbus_fast.aio import MessageBus

from stillsvc.common.names import BUS_NAME
from stillsvc.common.names import DEVICE_IFACE as DEVICE
from stillsvc.common.names import ERROR_PREFIX as ERROR
from stillsvc.common.names import IFACE_PREFIX as IFACE
from stillsvc.common.names import ITEM_IFACE as ITEM
from stillsvc.common.names import MANAGER_IFACE as MANAGER
from stillsvc.common.names import ROOT_PATH as ROOT
from stillsvc.common.names import SESSION_IFACE as SESSION
from stillsvc.common.names import SIMULATOR_IFACE as SIMULATOR

SIM0 = f"{ROOT}/devices/sim0"
REPO = Path(__file__).resolve().parent.parent
TIMEOUT = 10.0


class DBusDaemon:
    """A private bus: ``dbus-daemon --session`` (or a given config) owned by the test."""

    def __init__(self, config_file: str | None = None) -> None:
        args = ["dbus-daemon", "--nofork", "--print-address=1"]
        args += [f"--config-file={config_file}"] if config_file else ["--session"]
        self.proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        assert self.proc.stdout is not None
        self.address = self.proc.stdout.readline().strip()
        if not self.address:
            raise RuntimeError("dbus-daemon did not start")

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(5)


class Daemon:
    """The stillsvc daemon under test, its log kept in a file and shown on failure."""

    def __init__(self, address: str, *extra: str, simulate: bool = True, workdir: str | None = None,
                 env: dict[str, str] | None = None) -> None:
        self.address = address
        self.workdir = Path(workdir or tempfile.mkdtemp(prefix="stillsvc-test-"))
        self.runtime_dir = self.workdir / "run"
        self.state_dir = self.workdir / "state"
        self.log_path = self.workdir / "daemon.log"
        self.args = [sys.executable, "-m", "stillsvc.daemon", "--bus", address,
                     "--runtime-dir", str(self.runtime_dir), "--state-dir", str(self.state_dir),
                     "--log-level", "debug", "--log-format", "plain", "--no-udev", "--no-sane", *extra]
        if simulate:
            self.args.append("--simulate")
        self.env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> subprocess.Popen[bytes]:
        self.workdir.mkdir(parents=True, exist_ok=True)
        self._log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(self.args, stdout=self._log, stderr=subprocess.STDOUT, env=self.env,
                                     cwd=str(REPO))
        return self.proc

    async def ready(self) -> Daemon:
        """Start the daemon and wait until it owns its name (or fail if it exits first)."""
        proc = self.start()
        probe = await connect(self.address)
        try:
            await wait_for_name(probe, proc=proc)
        finally:
            probe.disconnect()
        return self

    @property
    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def stop(self, sig: int = signal.SIGTERM, timeout: float = TIMEOUT) -> int:
        if self.proc is None:
            return 0
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            code = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            code = self.proc.wait()
        self._log.close()
        return code


async def connect(address: str) -> MessageBus:
    return await MessageBus(bus_address=address, negotiate_unix_fd=True).connect()


async def wait_for_name(bus: MessageBus, name: str = BUS_NAME, timeout: float = TIMEOUT,
                        proc: subprocess.Popen[bytes] | None = None) -> None:
    """Wait until ``name`` has an owner: on NameOwnerChanged, not by polling with sleeps."""
    appeared = asyncio.get_running_loop().create_future()

    def handler(msg: Message) -> None:
        if (msg.message_type is MessageType.SIGNAL and msg.member == "NameOwnerChanged"
                and msg.body[0] == name and msg.body[2] and not appeared.done()):
            appeared.set_result(None)

    bus.add_message_handler(handler)
    rule = f"type='signal',sender='org.freedesktop.DBus',member='NameOwnerChanged',arg0='{name}'"
    await dbus_call(bus, "AddMatch", "s", [rule])
    try:
        if (await dbus_call(bus, "NameHasOwner", "s", [name]))[0]:
            return
        waiter = asyncio.ensure_future(appeared)
        if proc is not None:
            exited = process_exit(proc)
            done, _ = await asyncio.wait({waiter, exited}, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
            if exited in done:
                raise RuntimeError(f"daemon exited with {proc.returncode} before owning {name}")
            exited.cancel()
        else:
            done, _ = await asyncio.wait({waiter}, timeout=timeout)
        if waiter not in done:
            raise TimeoutError(f"{name} did not appear within {timeout} s")
    finally:
        bus.remove_message_handler(handler)
        await dbus_call(bus, "RemoveMatch", "s", [rule])


def process_exit(proc: subprocess.Popen[bytes]) -> asyncio.Future[int]:
    """A future for a Popen's exit, from a daemon thread (so no executor is held up)."""
    loop = asyncio.get_running_loop()
    future: asyncio.Future[int] = loop.create_future()

    def wait() -> None:
        code = proc.wait()
        if not loop.is_closed():
            loop.call_soon_threadsafe(lambda: future.done() or future.set_result(code))

    threading.Thread(target=wait, daemon=True).start()
    return future


async def dbus_call(bus: MessageBus, member: str, signature: str = "", body: list[Any] | None = None) -> list[Any]:
    return await call(bus, "/org/freedesktop/DBus", "org.freedesktop.DBus", member, signature, body or [],
                      destination="org.freedesktop.DBus")


async def call(bus: MessageBus, path: str, interface: str, member: str, signature: str = "",
               body: list[Any] | None = None, destination: str = BUS_NAME, unix_fds: list[int] | None = None,
               timeout: float = TIMEOUT) -> list[Any]:
    """A method call; raises DBusError for an error reply."""
    msg = Message(destination=destination, path=path, interface=interface, member=member, signature=signature,
                  body=body or [], unix_fds=unix_fds or [])
    reply = await asyncio.wait_for(bus.call(msg), timeout)
    if reply.message_type is MessageType.ERROR:
        raise DBusError(reply.error_name, reply.body[0] if reply.body else "")
    return reply.body


async def get_property(bus: MessageBus, path: str, interface: str, name: str) -> Any:
    (variant,) = await call(bus, path, "org.freedesktop.DBus.Properties", "Get", "ss", [interface, name])
    return variant.value


async def get_all(bus: MessageBus, path: str, interface: str) -> dict[str, Any]:
    (values,) = await call(bus, path, "org.freedesktop.DBus.Properties", "GetAll", "s", [interface])
    return {k: v.value for k, v in values.items()}


async def expect_error(name: str, coro: Any) -> DBusError:
    """Await ``coro`` and check it fails with error ``name`` (short names get the service prefix)."""
    full = name if "." in name else f"{ERROR}.{name}"
    try:
        await coro
    except DBusError as e:
        assert e.type == full, f"expected {full}, got {e.type}: {e.text}"
        assert "Traceback" not in (e.text or ""), e.text
        return e
    raise AssertionError(f"expected {full}, but the call succeeded")


async def create_session(bus: MessageBus, device_id: str = "sim0", mode: str = "status",
                         **options: Variant) -> str:
    (path,) = await call(bus, ROOT, MANAGER, "CreateDevice", "ssa{sv}", [device_id, mode, options])
    return path


class Signals:
    """Records signals matching a rule on one connection; ``wait`` blocks until one arrives."""

    def __init__(self, bus: MessageBus, member: str | None = None, interface: str | None = None,
                 path: str | None = None, predicate: Callable[[Message], bool] | None = None) -> None:
        self.bus = bus
        self.member = member
        self.interface = interface
        self.path = path
        self.predicate = predicate
        self.received: list[Message] = []
        self._event = asyncio.Event()
        rule = ["type='signal'"]
        if member:
            rule.append(f"member='{member}'")
        if interface:
            rule.append(f"interface='{interface}'")
        if path:
            rule.append(f"path='{path}'")
        self.rule = ",".join(rule)

    async def __aenter__(self) -> Signals:
        self.bus.add_message_handler(self._handler)
        await dbus_call(self.bus, "AddMatch", "s", [self.rule])
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.bus.remove_message_handler(self._handler)
        if self.bus.connected:
            await dbus_call(self.bus, "RemoveMatch", "s", [self.rule])

    def _handler(self, msg: Message) -> None:
        if msg.message_type is not MessageType.SIGNAL:
            return
        if self.member and msg.member != self.member:
            return
        if self.interface and msg.interface != self.interface:
            return
        if self.path and msg.path != self.path:
            return
        if self.predicate and not self.predicate(msg):
            return
        self.received.append(msg)
        self._event.set()

    async def wait(self, count: int = 1, timeout: float = TIMEOUT,
                   until: Callable[[list[Message]], bool] | None = None) -> list[Message]:
        """Wait until ``count`` signals (or ``until(received)``) with a timeout."""
        deadline = asyncio.get_running_loop().time() + timeout
        done = until or (lambda received: len(received) >= count)
        while not done(self.received):
            self._event.clear()
            remaining = deadline - asyncio.get_running_loop().time()
            if remaining <= 0:
                raise TimeoutError(f"waited {timeout} s for {self.rule}; got {len(self.received)}")
            try:
                await asyncio.wait_for(self._event.wait(), remaining)
            except TimeoutError:
                pass
        return self.received


async def wait_until(predicate: Callable[[], Any], timeout: float = TIMEOUT, what: str = "condition") -> Any:
    """For state with no signal: check after each loop turn until true, with a deadline."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    delay = 0.001
    while True:
        result = predicate()
        if asyncio.iscoroutine(result):
            result = await result
        if result:
            return result
        if loop.time() > deadline:
            raise TimeoutError(f"{what} did not happen within {timeout} s")
        await asyncio.sleep(delay)
        delay = min(delay * 2, 0.05)


# -- clients that vanish, and what a daemon holds (tests/test_races.py, test_chaos.py) ----------

import fcntl  # noqa: E402  (kept with the helpers below that need it)
import xml.etree.ElementTree as ElementTree  # noqa: E402


def kill_connections(*buses: MessageBus) -> None:
    """Drop connections the way the kernel does when their process is killed with
    SIGKILL: every socket is closed outright, one after the other in a single
    synchronous step (no await in between, so the bus sees them go in the same
    instant), with no shutdown handshake and nothing more written. Calls still
    waiting for a reply on them fail with ConnectionResetError."""
    for bus in buses:
        bus._user_disconnect = True  # our own doing: the disconnect future ends without an error
        bus._finalize(ConnectionResetError("connection killed by the test"))


def send_now(bus: MessageBus, path: str, interface: str, member: str, signature: str = "",
             body: list[Any] | None = None, destination: str = BUS_NAME) -> None:
    """Send a method call without waiting for its reply. It is written to the socket
    before this returns, so a kill_connections() right after cannot keep it from the
    bus: the call is in flight, and its sender gone before any reply."""
    msg = Message(destination=destination, path=path, interface=interface, member=member, signature=signature,
                  body=body or [])
    written = bus.send(msg)
    if not written.done():
        raise RuntimeError(f"{member} was queued, not written at once (is the connection busy?)")
    if written.exception() is not None:
        raise written.exception()


def names_client(description: str, unique_name: str) -> bool:
    """Whether a holder description such as ':1.42 (pid 1234, simple-scan)' is that client's."""
    return description == unique_name or description.startswith(unique_name + " ")


async def session_objects(bus: MessageBus) -> list[str]:
    """The session objects the daemon exports now (from introspecting the sessions node)."""
    (xml,) = await call(bus, f"{ROOT}/sessions", "org.freedesktop.DBus.Introspectable", "Introspect")
    return sorted(node.attrib["name"] for node in ElementTree.fromstring(xml).findall("node"))


def lock_file_free(path: str) -> bool:
    """Whether nobody holds the device's lock file, as ``flock -n LOCKFILE true`` would
    find it: a non-blocking exclusive flock(2) on a descriptor of our own (its own open
    file, so it conflicts with every other holder), released at once."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    finally:
        os.close(fd)  # closing our only descriptor of the open file releases the lock
    return True


def open_fds(pid: int) -> dict[int, str]:
    """A process's open descriptors and what each refers to (from /proc/PID/fd)."""
    fds: dict[int, str] = {}
    for entry in os.listdir(f"/proc/{pid}/fd"):
        try:
            fds[int(entry)] = os.readlink(f"/proc/{pid}/fd/{entry}")
        except FileNotFoundError:  # closed while we looked
            pass
    return fds


def vm_rss_kib(pid: int) -> int:
    """A process's resident memory, VmRSS from /proc/PID/status, in KiB."""
    with open(f"/proc/{pid}/status", encoding="ascii") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for pid {pid}")


def assert_daemon_healthy(daemon: Daemon) -> None:
    """Still running, and nothing went wrong inside it: no Python traceback in its log."""
    assert daemon.proc is not None and daemon.proc.poll() is None, f"the daemon exited ({daemon.proc.returncode})"
    log = daemon.log
    assert "Traceback" not in log, log[max(0, log.find("Traceback") - 3000):log.find("Traceback") + 3000]


def unwrap(value: Any) -> Any:
    """A reply's variants, dicts and lists as plain Python values."""
    if isinstance(value, Variant):
        return unwrap(value.value)
    if isinstance(value, dict):
        return {k: unwrap(v) for k, v in value.items()}
    if isinstance(value, list):
        return [unwrap(v) for v in value]
    return value


async def readable(fd: int, timeout: float = 5.0) -> None:
    """Wait until ``fd`` has data (the service has started writing into it)."""
    loop = asyncio.get_running_loop()
    ready = loop.create_future()
    loop.add_reader(fd, lambda: ready.done() or ready.set_result(None))
    try:
        await asyncio.wait_for(ready, timeout)
    finally:
        loop.remove_reader(fd)
