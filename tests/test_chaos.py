"""Chaos, bounded in time: many client processes doing random things to the real
daemon, killed with SIGKILL at random moments, then the daemon checked for leftovers.

Client processes (a dbus-fast script written to tmp_path, run with sys.executable,
each with one to three connections working at once; and stillctl) open status and
data sessions with and without wait_ms, take the device lock with timeouts, read
the status, transfer images into pipes they read fast, slowly or not at all, hand
the device over (``stillctl lock``), and make bad calls (wrong arguments, unknown
sessions and devices, unknown methods, unusable descriptors). They are killed at
random moments — after a random time, or just as they hold the lock, are
mid-transfer, wait in line or hold data mode. Every call's answer is checked by the
client itself: an error must be one the API documents for a client's mistakes or
for contention, never Error.Failed, never with a traceback.

The run is cut into phases. At the end of each one every client is killed and,
once the daemon has had a moment to clean up (waited for, with a deadline), the
invariants must hold: nothing held or waited for on behalf of a client that is gone
(DataModeHeld false, DataModeWaiters and LockWaiters 0, no session objects, State
ready), the device lock file free (``flock -n LOCKFILE true``), every driver item's
reference count back to what it was at the start (GetDriverItems), the daemon's open
descriptors (/proc/PID/fd) back to their number at the start, the daemon alive and a
fresh client served at once (data mode, lock, status, a transfer), and no
"Traceback" in its log. At the very end its memory (VmRSS) must not have grown by
more than RSS_BOUND_MIB.

STILLSVC_CHAOS_SECONDS sets the length (default 15, at most 60; over 20 the test is
marked slow). STILLSVC_CHAOS_SEED replays a run's random schedule — which clients,
what they do, when they are killed; the timing of the machine still varies — and
the seed is printed and named in every failure.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from dbus_fast import Variant
from helpers import (
    DEVICE,
    ITEM,
    MANAGER,
    REPO,
    ROOT,
    SESSION,
    SIM0,
    Daemon,
    assert_daemon_healthy,
    call,
    connect,
    create_session,
    get_all,
    get_property,
    open_fds,
    session_objects,
    vm_rss_kib,
    wait_until,
)

SECONDS = float(os.environ.get("STILLSVC_CHAOS_SECONDS", "15"))
MAX_SECONDS = 60.0
MAX_KILLS = 2000
#: Client processes at work at once.
SLOTS = 6
#: The run is cut into phases of about this length, each ending with every client killed and the checks.
PHASE_SECONDS = 5.0
#: Time kept for the checks after each phase (they take a fraction of it when all is well).
CHECK_SECONDS = 0.4
#: How much the daemon's resident memory may grow over the whole run.
RSS_BOUND_MIB = 30
#: How long the daemon may take to clean up after its clients were killed.
SETTLE = 10.0
FORMATS = ["raw", "pnm", "png", "tiff", "jpeg", "pdf"]
STILLCTL = [sys.executable, "-m", "stillsvc.ctl"]

CONFIG = """\
[service]
# Short waits and holds, so that contention resolves (and revocations happen) inside a phase.
io_wait_ms = 500
lock_max_hold_ms = 1500
max_sessions = 128
max_sessions_per_client = 8
"""

WORKER = r'''
"""One chaos client: LANES connections, each doing random things until the process is killed."""
import asyncio, contextlib, os, random, sys
from dbus_fast import DBusError, Message, MessageType, Variant
from dbus_fast.aio import MessageBus

BUS = "org.stillsvc.StillImage1"
ROOT = "/org/stillsvc/StillImage1"
MANAGER, SESSION, ITEM = BUS + ".Manager", BUS + ".Session", BUS + ".Item"
E = BUS + ".Error."
# Errors a client may get for its own mistakes or for contention. Never Failed here:
# nothing in this workload is a device failure (no jams, no feeder).
ALLOWED = {E + n for n in ("Busy", "Timeout", "NotFound", "InvalidArgument", "AccessDenied", "LimitExceeded",
                           "Cancelled", "NotSupported")}
ALLOWED |= {"org.freedesktop.DBus.Error." + n for n in ("InvalidArgs", "UnknownMethod", "UnknownObject",
                                                       "UnknownInterface", "UnknownProperty")}
FORMATS = ["raw", "pnm", "png", "tiff", "jpeg", "pdf"]

address, seed, lanes = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])


def say(*words):
    os.write(1, (" ".join(str(w) for w in words) + "\n").encode())


class Lane:
    def __init__(self, bus, rng, number):
        self.bus, self.rng, self.number = bus, rng, number
        self.sessions = {}  # path -> mode
        self.locked = set()

    async def call(self, path, iface, member, sig="", body=(), fds=(), timeout=70, expect_error=False,
                   destination=BUS):
        msg = Message(destination=destination, path=path, interface=iface, member=member, signature=sig,
                      body=list(body), unix_fds=list(fds))
        reply = await asyncio.wait_for(self.bus.call(msg), timeout)
        if reply.message_type is MessageType.ERROR:
            text = reply.body[0] if reply.body else ""
            if reply.error_name not in ALLOWED or "Traceback" in str(text):
                say("PROBLEM", f"{member} on {path} answered {reply.error_name}: {text!r}")
            raise DBusError(reply.error_name, text)
        if expect_error:
            say("PROBLEM", f"{member} on {path} with bad arguments {list(body)!r} succeeded")
        return reply.body

    def pick(self, data=False):
        paths = [p for p, m in self.sessions.items() if not data or m != "status"]
        return self.rng.choice(paths) if paths else None

    async def open(self):
        mode = self.rng.choice(["status", "status", "data", "both"])
        wait = self.rng.choice([0, 0, 100, 1000, 60000]) if mode != "status" else 0
        options = {"wait_ms": Variant("u", wait)} if wait or self.rng.random() < 0.3 else {}
        if wait:
            say("S", "waiting-data")
        (path,) = await self.call(ROOT, MANAGER, "CreateDevice", "ssa{sv}", ["sim0", mode, options])
        self.sessions[path] = mode
        if mode != "status":
            say("S", "data")

    async def lock(self):
        path = self.pick()
        if path is None or path in self.locked:
            return
        timeout = self.rng.choice([0, 50, 500, 60000])
        if timeout:
            say("S", "waiting-lock")
        await self.call(path, SESSION, "LockDevice", "u", [timeout])
        self.locked.add(path)
        say("S", "locked")

    async def unlock(self):
        if self.locked:
            path = self.rng.choice(sorted(self.locked))
            self.locked.discard(path)
            await self.call(path, SESSION, "UnlockDevice")  # may have been revoked: InvalidArgument

    async def status(self):
        path = self.pick()
        if path:
            await self.call(path, SESSION, "GetStatus")

    async def close(self):
        path = self.pick()
        if path:
            self.sessions.pop(path)
            self.locked.discard(path)
            await self.call(path, SESSION, "Close")

    async def transfer(self):
        path = self.pick(data=True) or self.pick()
        if path is None:
            return
        item = await self.flatbed(path)
        width, height = self.rng.choice([(64, 48), (320, 240), (600, 870)])
        await self.call(item, ITEM, "WriteProperties", "a{sv}", [{
            "resolution": Variant("u", 75), "width": Variant("u", width), "height": Variant("u", height),
            "mode": Variant("s", self.rng.choice(["color", "gray", "lineart"]))}])
        fmt = self.rng.choice(FORMATS)
        how = self.rng.choice(["all", "slow", "park"])
        r, w = os.pipe()
        os.set_blocking(r, False)
        loop = asyncio.get_running_loop()
        readable = asyncio.Event()
        loop.add_reader(r, readable.set)
        reading = True
        # Our copy of the write end stays open until the reply: the call must carry it.
        reply = asyncio.ensure_future(self.call(item, ITEM, "Transfer", "hsa{sv}", [0, fmt, {}], fds=[w]))
        try:
            first = True
            while not reply.done():
                waiter = asyncio.ensure_future(readable.wait())
                await asyncio.wait({waiter, reply}, return_when=asyncio.FIRST_COMPLETED)
                waiter.cancel()
                if not readable.is_set():
                    continue
                if first:
                    say("S", "transferring")
                    first = False
                if how == "park":  # read nothing more: parked until killed, or the service gives up
                    loop.remove_reader(r)
                    reading = False
                    break
                readable.clear()
                with contextlib.suppress(BlockingIOError):
                    os.read(r, 65536 if how == "all" else 4096)
                if how == "slow":
                    await asyncio.sleep(0.005)
            await reply
        finally:
            if reading:
                loop.remove_reader(r)
            os.close(w)
            os.close(r)

    async def flatbed(self, path):
        """The session's Flatbed item (its items appear once RootItem is read)."""
        (root,) = await self.call(path, "org.freedesktop.DBus.Properties", "Get", "ss", [SESSION, "RootItem"])
        return root.value + "/Flatbed"

    async def bad(self):
        rng = self.rng
        other = f"{ROOT}/sessions/{rng.randrange(1, 5000)}"
        r, w = os.pipe()
        try:
            choice = rng.randrange(11)
            if choice == 0:
                await self.call(ROOT, MANAGER, "CreateDevice", "s", ["sim0"], expect_error=True)
            elif choice == 1:
                await self.call(ROOT, MANAGER, "CreateDevice", "ssa{sv}", ["nope", "status", {}], expect_error=True)
            elif choice == 2:
                await self.call(ROOT, MANAGER, "CreateDevice", "ssa{sv}", ["sim0", "bogus", {}], expect_error=True)
            elif choice == 3:
                await self.call(ROOT, MANAGER, "CreateDevice", "ssa{sv}",
                                ["sim0", "data", {"wait_ms": Variant("s", "soon")}], expect_error=True)
            elif choice == 4:
                await self.call(ROOT, MANAGER, "CreateDevice", "ssa{sv}",
                                ["sim0", "data", {"bogus": Variant("u", 1)}], expect_error=True)
            elif choice == 5:
                await self.call(other, SESSION, rng.choice(["GetStatus", "Close", "UnlockDevice"]), expect_error=True)
            elif choice == 6:
                await self.call(other, SESSION, "LockDevice", "u", [rng.choice([0, 10**9])], expect_error=True)
            elif choice == 7:
                path = self.pick()
                if path:
                    await self.call(path, SESSION, "LockDevice", "u", [10**9], expect_error=True)
            elif choice == 8:
                path = self.pick()
                if path:  # the read end of a pipe: not open for writing; or a format nobody knows
                    bad_fd, fmt = rng.choice([(r, "raw"), (w, "bmp")])
                    await self.call(await self.flatbed(path), ITEM, "Transfer", "hsa{sv}", [0, fmt, {}],
                                    fds=[bad_fd], expect_error=True)
            elif choice == 9:
                path = self.pick() or other
                await self.call(path, SESSION, "NoSuchMethod", "s", ["x"], expect_error=True)
            else:
                await self.call(ROOT, MANAGER, "FindDevice", "s", ["x" * 10000], expect_error=True)
        finally:
            os.close(r)
            os.close(w)

    async def run(self):
        actions = [self.open] * 4 + [self.lock] * 3 + [self.unlock] * 2 + [self.status] * 2 + \
            [self.close] * 2 + [self.transfer] * 3 + [self.bad] * 2
        while True:
            # A lane that holds data mode mostly scans: that is what data mode is for.
            holds_data = any(mode != "status" for mode in self.sessions.values())
            action = self.transfer if holds_data and self.rng.random() < 0.5 else self.rng.choice(actions)
            try:
                await action()
            except DBusError:
                pass
            except (ConnectionError, EOFError) as e:
                say("PROBLEM", f"lane {self.number} lost its connection: {e!r}")
                return
            await asyncio.sleep(self.rng.choice([0, 0, 0.001, 0.01, 0.05]))


async def main():
    rng = random.Random(seed)
    buses = [await MessageBus(bus_address=address, negotiate_unix_fd=True).connect() for _ in range(lanes)]
    say("S", "connected", *[b.unique_name for b in buses])
    await asyncio.gather(*(Lane(b, random.Random(rng.random()), i).run() for i, b in enumerate(buses)))


asyncio.run(main())
'''


@dataclass
class Tally:
    kills: int = 0
    spawned: int = 0
    by_moment: dict[str, int] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)
    exited: list[str] = field(default_factory=list)


class Client:
    """One client process, its output read as it comes: state markers and problems."""

    def __init__(self, proc: asyncio.subprocess.Process, what: str, tally: Tally) -> None:
        self.proc, self.what, self.tally = proc, what, tally
        self.seen: dict[str, asyncio.Event] = {}
        self.killed = False
        self.errors = b""
        self.readers = [asyncio.ensure_future(self._read_stdout()), asyncio.ensure_future(self._read_stderr())]

    def marker(self, name: str) -> asyncio.Event:
        return self.seen.setdefault(name, asyncio.Event())

    async def _read_stdout(self) -> None:
        assert self.proc.stdout is not None
        async for line in self.proc.stdout:
            words = line.decode(errors="replace").rstrip("\n")
            if words.startswith("S "):
                self.marker(words.split()[1]).set()
            elif words.startswith("PROBLEM "):
                self.tally.problems.append(f"{self.what}: {words[8:]}")

    async def _read_stderr(self) -> None:
        assert self.proc.stderr is not None
        async for line in self.proc.stderr:
            self.errors += line
            if line.startswith(b"Holding"):  # stillctl events has data mode
                self.marker("data").set()
        if b"Traceback" in self.errors:
            self.tally.problems.append(f"{self.what}: {self.errors.decode(errors='replace')[-2000:]}")

    async def kill(self, moment: str) -> None:
        if self.proc.returncode is None:
            self.killed = True
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.proc.pid, signal.SIGKILL)
            self.tally.kills += 1
            self.tally.by_moment[moment] = self.tally.by_moment.get(moment, 0) + 1
        await self.proc.wait()
        await asyncio.gather(*self.readers)


class Chaos:
    def __init__(self, daemon: Daemon, worker: Path, seed: int) -> None:
        self.daemon, self.worker, self.seed = daemon, worker, seed
        self.tally = Tally()
        self.env = {k: v for k, v in os.environ.items() if k != "STILLSVC_BUS"}

    async def spawn(self, rng: random.Random) -> tuple[Client, list[str]]:
        """A random client, and the moments at which it may be killed (markers it prints)."""
        address = self.daemon.address
        kind = rng.choices(["worker", "events", "lock"], weights=[8, 1, 1])[0]
        if kind == "worker":
            args = [sys.executable, str(self.worker), address, str(rng.randrange(2**32)), str(rng.choice([1, 2, 3]))]
            moments = ["locked", "locked", "transferring", "transferring", "waiting-lock", "waiting-data", "data"]
        elif kind == "events":
            args = [*STILLCTL, "--bus", address, "events", "sim0", "--wait", str(rng.choice([0, 0.5, 5, 60]))]
            moments = ["data"]
        else:
            # Hands the device over to a short command; killed, stillctl leaves the command
            # running with the lock file until it ends by itself.
            args = [*STILLCTL, "--bus", address, "lock", "--timeout", str(rng.choice([0, 1, 5])), "sim0",
                    "--", "sleep", str(rng.choice([0.05, 0.2]))]
            moments = []
        proc = await asyncio.create_subprocess_exec(*args, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                                    stderr=subprocess.PIPE, cwd=str(REPO), env=self.env)
        self.tally.spawned += 1
        what = (f"worker pid {proc.pid} (seed {args[3]}, {args[4]} connections)" if kind == "worker"
                else f"stillctl pid {proc.pid} ({' '.join(args[5:])})")
        return Client(proc, what, self.tally), moments

    async def slot(self, rng: random.Random, deadline: float) -> None:
        """Keep one client at work until the deadline, killing each at a random moment."""
        loop = asyncio.get_running_loop()
        while loop.time() < deadline and self.tally.kills < MAX_KILLS:
            client, moments = await self.spawn(rng)
            try:
                moment = rng.choice(moments + ["any time"] * 2)
                patience = rng.uniform(0.05, 2.0)
                remaining = max(0.0, deadline - loop.time())
                exited = asyncio.ensure_future(client.proc.wait())
                if moment == "any time":
                    waits = {exited}
                    timeout = min(patience, remaining)
                else:
                    waits = {exited, asyncio.ensure_future(client.marker(moment).wait())}
                    timeout = min(patience + 1.0, remaining)
                done, pending = await asyncio.wait(waits, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
                for task in pending:
                    task.cancel()
                if exited in done and not client.killed:
                    await client.kill("exited")  # only collects its output
                    if client.what.startswith("worker"):  # workers never end by themselves
                        self.tally.exited.append(f"{client.what} exited with {client.proc.returncode}: "
                                                 f"{client.errors.decode(errors='replace')[-2000:]}")
                    continue
                if moment != "any time" and client.marker(moment).is_set():
                    # Just as it got there, or a moment later (the timing is part of the random schedule).
                    delay = rng.choice([0, 0, 0.001, 0.02])
                    if delay:
                        await asyncio.sleep(delay)
                    await client.kill(moment)
                else:
                    await client.kill("any time")
            finally:
                if client.proc.returncode is None:
                    await client.kill("end of phase")

    async def phase(self, number: int, seconds: float) -> None:
        deadline = asyncio.get_running_loop().time() + seconds
        rngs = [random.Random(f"{self.seed}/{number}/{slot}") for slot in range(SLOTS)]
        await asyncio.gather(*(self.slot(rng, deadline) for rng in rngs))


# -- what is checked -----------------------------------------------------------------------

async def driver_refcounts(bus) -> dict[str, int]:
    (entries,) = await call(bus, ROOT, MANAGER, "GetDriverItems", "s", ["sim0"])
    return {f"{e['path'].value} (generation {e['generation'].value})": e["refcount"].value for e in entries}


async def transfer_into_pipe(bus, item: str, fmt: str) -> int:
    """A whole transfer into a pipe; returns the bytes read."""
    r, w = os.pipe()
    loop = asyncio.get_running_loop()

    def read_all() -> int:
        total = 0
        with os.fdopen(r, "rb") as f:
            while chunk := f.read(1 << 16):
                total += len(chunk)
        return total

    reader = loop.run_in_executor(None, read_all)
    try:
        await call(bus, item, ITEM, "Transfer", "hsa{sv}", [0, fmt, {}], unix_fds=[w], timeout=30)
    finally:
        os.close(w)
    return await reader


async def served_at_once(address: str) -> None:
    """The daemon answers and a fresh client gets everything without waiting."""
    fresh = await connect(address)
    try:
        session = await create_session(fresh, mode="both", wait_ms=Variant("u", 0))
        await call(fresh, session, SESSION, "LockDevice", "u", [0])
        (status,) = await call(fresh, session, SESSION, "GetStatus")
        assert status["online"].value is True
        item = await get_property(fresh, session, SESSION, "RootItem") + "/Flatbed"
        await call(fresh, item, ITEM, "WriteProperties", "a{sv}", [{
            "resolution": Variant("u", 75), "width": Variant("u", 64), "height": Variant("u", 48)}])
        assert await transfer_into_pipe(fresh, item, "raw") > 0
        await call(fresh, session, SESSION, "Close")
    finally:
        fresh.disconnect()


@dataclass
class Baseline:
    fds: dict[int, str]
    rss_kib: int
    refcounts: dict[str, int]


async def warm_up(address: str) -> None:
    """Everything the chaos will make the daemon do once, so that what it loads and keeps
    for good (modules, encoders) is in the baseline, not counted as a leak."""
    bus = await connect(address)
    try:
        session = await create_session(bus, mode="both")
        await call(bus, session, SESSION, "LockDevice", "u", [0])
        item = await get_property(bus, session, SESSION, "RootItem") + "/Flatbed"
        for mode in ("color", "gray", "lineart"):
            await call(bus, item, ITEM, "WriteProperties", "a{sv}", [{
                "resolution": Variant("u", 75), "width": Variant("u", 64), "height": Variant("u", 48),
                "mode": Variant("s", mode)}])
            for fmt in FORMATS:
                await transfer_into_pipe(bus, item, fmt)
        await call(bus, session, SESSION, "Close")
    finally:
        bus.disconnect()


async def idle(observer) -> bool:
    props = await get_all(observer, SIM0, DEVICE)
    return (props["State"] == "ready" and not props["DataModeHeld"] and props["DataModeWaiters"] == 0
            and props["LockWaiters"] == 0 and await session_objects(observer) == [])


async def check_after_phase(daemon: Daemon, observer, baseline: Baseline, what: str) -> None:
    """Every client is gone: nothing may be held, waited for or kept on their behalf."""
    lock_file = await get_property(observer, SIM0, DEVICE, "LockFile")
    pid = daemon.proc.pid
    state: dict = {}

    async def clean() -> bool:
        props = await get_all(observer, SIM0, DEVICE)
        state.clear()
        state.update(
            device={k: props[k] for k in ("State", "DataModeHeld", "DataModeHolder", "DataModeWaiters",
                                           "LockWaiters")},
            sessions=await session_objects(observer),
            lock_file_free=subprocess.run(["flock", "-n", lock_file, "true"]).returncode == 0,
            refcounts=await driver_refcounts(observer),
            fds=open_fds(pid))
        return (state["device"] == {"State": "ready", "DataModeHeld": False, "DataModeHolder": "",
                                    "DataModeWaiters": 0, "LockWaiters": 0}
                and state["sessions"] == [] and state["lock_file_free"]
                and state["refcounts"] == baseline.refcounts and len(state["fds"]) == len(baseline.fds))

    try:
        await wait_until(clean, timeout=SETTLE, what="the daemon clean after every client was killed")
    except TimeoutError:
        extra = sorted(set(state["fds"].items()) - set(baseline.fds.items()))
        raise AssertionError(
            f"{what}: {SETTLE} s after every client was killed: device {state['device']}; session objects "
            f"{state['sessions']}; lock file free: {state['lock_file_free']}; driver item refcounts "
            f"{state['refcounts']} (at the start {baseline.refcounts}); {len(state['fds'])} descriptors open "
            f"(at the start {len(baseline.fds)}; new: {extra[:20]})") from None
    assert_daemon_healthy(daemon)
    await served_at_once(daemon.address)


def chaos_seconds() -> float:
    assert 0 < SECONDS <= MAX_SECONDS, f"STILLSVC_CHAOS_SECONDS must be in (0, {MAX_SECONDS}]"
    return SECONDS


# Over 20 s it is a slow test; the default run (about 17 s in all) is in the ordinary suite.
pytestmark = [pytest.mark.slow] if SECONDS > 20 else []


async def test_chaos_leaves_nothing_behind(bus_address, tmp_path, request):
    seconds = chaos_seconds()
    started = time.monotonic()
    seed = int(os.environ.get("STILLSVC_CHAOS_SEED", random.SystemRandom().randrange(2**32)))
    print(f"chaos seed {seed} ({seconds} s; replay with STILLSVC_CHAOS_SEED={seed})")
    config = tmp_path / "chaos.toml"
    config.write_text(CONFIG)
    worker = tmp_path / "chaos_client.py"
    worker.write_text(WORKER)
    daemon = Daemon(bus_address, "--config", str(config), workdir=str(tmp_path / "daemon"))
    request.node._stillsvc_daemon = daemon  # its log is shown if the test fails
    await daemon.ready()
    observer = await connect(bus_address)
    chaos = Chaos(daemon, worker, seed)
    try:
        await warm_up(bus_address)
        await served_at_once(bus_address)
        await wait_until(lambda: idle(observer), what="the daemon idle after the warm-up")
        baseline = Baseline(open_fds(daemon.proc.pid), vm_rss_kib(daemon.proc.pid), await driver_refcounts(observer))
        phases = max(1, round(seconds / PHASE_SECONDS))
        # The whole test keeps within ``seconds``: what is left after the start, less the
        # checks after each phase, is shared among the phases.
        chaos_time = seconds - (time.monotonic() - started) - CHECK_SECONDS * phases
        for number in range(phases):
            what = f"seed {seed}, phase {number + 1} of {phases}"
            await chaos.phase(number, max(1.0, chaos_time / phases))
            assert not chaos.tally.problems, f"{what}: clients saw problems:\n" + "\n".join(chaos.tally.problems[:30])
            assert not chaos.tally.exited, f"{what}: clients died by themselves:\n" + "\n".join(chaos.tally.exited)
            await check_after_phase(daemon, observer, baseline, what)
            if chaos.tally.kills >= MAX_KILLS:
                break
        grown = vm_rss_kib(daemon.proc.pid) - baseline.rss_kib
        assert grown <= RSS_BOUND_MIB * 1024, (
            f"seed {seed}: the daemon's VmRSS grew by {grown / 1024:.1f} MiB (bound {RSS_BOUND_MIB} MiB)")
        assert chaos.tally.kills > 0
        print(f"chaos seed {seed}: {chaos.tally.spawned} clients, {chaos.tally.kills} killed "
              f"({chaos.tally.by_moment}), memory grew {grown / 1024:.1f} MiB, "
              f"{time.monotonic() - started:.1f} s")
    finally:
        observer.disconnect()
        daemon.stop()
