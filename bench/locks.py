#!/usr/bin/env python3
"""Device lock and data-mode handover costs, and what 1,000 status sessions cost the service.

    python3 bench/locks.py [--address ADDR] [--count N] [--sessions 1000] [--clients 10]
                           [--handovers 50] [--kills 20] [--device ID] [--json]

Four measurements, in one run:

1. **Lock/unlock round trip**: ``Session.lock(timeout)`` followed by
   ``Session.unlock()`` of the client library (``LockDevice``, ``UnlockDevice``)
   on a ``status`` session (one pair = one sample, timed from calling lock to
   unlock's return), against raw ``Peer.Ping``, in interleaved blocks; with them,
   the same pair as raw messages on a raw session: what the library adds.
2. **Handover on Close**: client A (the library) holds data mode; client B has a
   pending ``CreateDevice(device, "data", {"wait_ms": 10000})``, seen queued
   through the device's ``DataModeWaiters`` property (== 1, watched with
   ``Device.changes()``). Timed from just before A's ``Session.close()`` to the
   arrival of B's reply (the grant), taken in the connection's message handler as
   the reply is parsed, so B's call is a raw message (see ``ReplyClock``).
3. **Handover on kill -9**: the holder is a separate process that opens a data
   session with the library and prints "ready"; B waits as above; timed from just
   before ``os.kill(pid, SIGKILL)`` to B's reply.
4. **1,000 status sessions on one device**: the service's resident memory
   (``VmRSS`` of the process that owns the bus name) before and after opening
   ``--sessions`` status sessions over ``--clients`` library clients, and
   ``Session.status()`` (``GetStatus``) latency on one session without them and
   then with them (same client; raw Ping interleaved in both phases, to show drift).

Everything goes through :mod:`stillsvc.client` but the baseline (Peer.Ping as a
raw message, on a raw connection: the library's connection is its own), the raw
reference pair of 1., and B's CreateDevice and Close in 2. and 3.

Without ``--address`` a private ``dbus-daemon --session`` and ``stillsvc --simulate``
are started with ``--config bench/locks.toml`` (which raises ``max_sessions`` and
``max_sessions_per_client``), and stopped afterwards. Against a running service
(``--address``) its own limits apply and the memory figure needs the service's
``/proc`` entry to be readable.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import os
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
for _p in (REPO, REPO / "tests", REPO / "bench"):
    if str(_p) not in sys.path:
        sys.path.insert(0, str(_p))

from dbus_fast import DBusError, Message, MessageType, Variant  # noqa: E402
from dbus_fast.aio import MessageBus  # noqa: E402
from helpers import connect, create_session  # noqa: E402
from roundtrip import PEER, Timed, emit, interleaved, percentile, service, service_pid, table  # noqa: E402

from stillsvc.client import (  # noqa: E402
    Changes,
    Client,
    ClientError,
    Device,
    PropertiesChanged,
    Session,
    StillError,
)
from stillsvc.common.names import BUS_NAME, MANAGER_IFACE, ROOT_PATH, SESSION_IFACE  # noqa: E402

CONFIG = Path(__file__).resolve().parent / "locks.toml"
TARGET_HANDOVER_MS = 20.0
TARGET_RSS_MB = 20.0
TARGET_STATUS_RATIO = 1.5
WAIT_MS = 10_000
CALL_TIMEOUT = 15.0
MB = 1e6

clock = time.perf_counter_ns


# The holder for the kill -9 measurement: its own process and connection (a
# library client; argv[3] is this repository, for stillsvc.client).
HOLDER_SCRIPT = r"""
import asyncio, sys
sys.path.insert(0, sys.argv[3])
from stillsvc.client import Client, ClientError, StillError

async def main(address, device):
    client = await Client(address).connect()
    try:
        session = await client.manager.open_session(device, "data")
    except (StillError, ClientError) as e:
        print("error", type(e).__name__, e, flush=True)
        return
    print("ready", session.path, flush=True)
    await asyncio.Future()

asyncio.run(main(sys.argv[1], sys.argv[2]))
"""


# -- small helpers ----------------------------------------------------------------

def summary_ms(samples_ns: list[int]) -> dict[str, float]:
    ms = sorted(s / 1e6 for s in samples_ns)
    return {"n": len(ms), "median_ms": statistics.median(ms), "p99_ms": percentile(ms, 99),
            "min_ms": ms[0], "max_ms": ms[-1]}


# Raw messages: the baseline (Ping), the raw reference pair, and the waiter's calls.
def msg(path: str, interface: str, member: str, signature: str = "", body: list[Any] | None = None) -> Message:
    return Message(destination=BUS_NAME, path=path, interface=interface, member=member,
                   signature=signature, body=body or [])


async def rt(bus: MessageBus, m: Message) -> Message:
    reply = await asyncio.wait_for(bus.call(m), CALL_TIMEOUT)
    if reply.message_type is MessageType.ERROR:
        raise DBusError(reply.error_name, reply.body[0] if reply.body else "")
    return reply


async def close_session(bus: MessageBus, path: str) -> None:
    try:
        await rt(bus, msg(path, SESSION_IFACE, "Close"))
    except DBusError:
        pass


async def library_client(address: str) -> Client:
    return await Client(address, timeout=CALL_TIMEOUT).connect()


async def wait_waiters(device: Device, changes: Changes, n: int, timeout: float = 10.0) -> None:
    """Wait until the device's DataModeWaiters reads ``n``: on its PropertiesChanged
    (``changes`` is ``device.changes()``, started before the waiter queued), each
    candidate confirmed by a fresh read, so a change left over from an earlier
    round cannot pass for this one."""
    deadline = time.monotonic() + timeout
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError(f"DataModeWaiters did not reach {n} within {timeout} s")
        change = await changes.next(timeout=remaining)
        if (isinstance(change, PropertiesChanged) and change.changed.get("DataModeWaiters") == n
                and (await device.info()).data_mode_waiters == n):
            return


class ReplyClock:
    """Notes the moment a given reply is parsed on a connection (before any task wakes).

    This is why the waiter's CreateDevice stays a raw message on a raw connection:
    the library parses replies on a connection of its own and offers no hook on
    it, so with it the figure would end when the awaiting task wakes instead."""

    def __init__(self, bus: MessageBus) -> None:
        self.bus = bus
        self.serial: int | None = None
        self.at: int | None = None
        bus.add_message_handler(self._handler)

    def expect(self, m: Message) -> Message:
        m.serial = self.bus.next_serial()
        self.serial, self.at = m.serial, None
        return m

    def _handler(self, m: Message) -> None:
        if m.reply_serial == self.serial and m.message_type in (MessageType.METHOD_RETURN, MessageType.ERROR):
            self.at = clock()

    def close(self) -> None:
        self.bus.remove_message_handler(self._handler)


def create_data(device: str) -> Message:
    return msg(ROOT_PATH, MANAGER_IFACE, "CreateDevice", "ssa{sv}",
               [device, "data", {"wait_ms": Variant("u", WAIT_MS)}])


# -- 1. lock + unlock against Ping --------------------------------------------------

async def lock_roundtrip(address: str, device: str, count: int, block: int, warmup: int) -> dict[str, Any]:
    client = await library_client(address)
    bus = await connect(address)  # raw: the baseline, and the reference pair's own session
    session: Session | None = None
    raw_session: str | None = None
    try:
        session = await client.manager.open_session(device, "status")
        raw_session = await create_session(bus, device, "status")

        async def ping() -> int:
            t0 = clock()
            await rt(bus, msg(ROOT_PATH, PEER, "Ping"))
            return clock() - t0

        async def pair() -> int:
            t0 = clock()
            await session.lock(WAIT_MS / 1000)
            await session.unlock()
            return clock() - t0

        async def raw_pair() -> int:
            t0 = clock()
            await rt(bus, msg(raw_session, SESSION_IFACE, "LockDevice", "u", [WAIT_MS]))
            await rt(bus, msg(raw_session, SESSION_IFACE, "UnlockDevice"))
            return clock() - t0

        samples, _ = await interleaved({"Ping": ping, "LockDevice+UnlockDevice": pair,
                                        "LockDevice+UnlockDevice (raw)": raw_pair}, count, block, warmup)
    finally:
        if raw_session is not None:
            await close_session(bus, raw_session)
        if session is not None:
            async with session:
                pass
        bus.disconnect()
        client.disconnect()
    ping_s = summary_ms(samples["Ping"])
    pair_s = summary_ms(samples["LockDevice+UnlockDevice"])
    raw_s = summary_ms(samples["LockDevice+UnlockDevice (raw)"])
    return {"ping": ping_s, "lock_unlock": pair_s, "lock_unlock_raw": raw_s, "block": block,
            "ratio_median": pair_s["median_ms"] / ping_s["median_ms"],
            "ratio_p99": pair_s["p99_ms"] / ping_s["p99_ms"],
            "raw_ratio_median": raw_s["median_ms"] / ping_s["median_ms"],
            "library_ratio_median": pair_s["median_ms"] / raw_s["median_ms"],
            "library_added_ms": pair_s["median_ms"] - raw_s["median_ms"]}


# -- 2. handover on Close -------------------------------------------------------------

async def handover_close(address: str, device: str, repeat: int) -> dict[str, Any]:
    # A, the holder, and the observer are library clients; B, the waiter, is raw
    # (ReplyClock). So the roles no longer swap: B gives data mode back after each
    # grant (untimed) and A takes it again.
    a, observer = await library_client(address), await library_client(address)
    b = await connect(address)
    rc = ReplyClock(b)
    samples: list[int] = []
    watched = await observer.manager.find_device(device)
    holder: Session | None = None
    granted: str | None = None
    try:
        async with watched.changes() as changes:
            holder = await a.manager.open_session(device, "data", wait=WAIT_MS / 1000)
            for i in range(repeat + 2):  # the first two are warm-up
                pending = asyncio.ensure_future(b.call(rc.expect(create_data(device))))
                await wait_waiters(watched, changes, 1)
                t0 = clock()
                await holder.close()
                holder = None
                reply = await asyncio.wait_for(pending, CALL_TIMEOUT)
                if reply.message_type is MessageType.ERROR:
                    raise DBusError(reply.error_name, reply.body[0] if reply.body else "")
                assert rc.at is not None
                if i >= 2:
                    samples.append(rc.at - t0)
                granted = reply.body[0]
                await close_session(b, granted)  # raw: the session is B's connection's
                granted = None
                holder = await a.manager.open_session(device, "data", wait=WAIT_MS / 1000)
    finally:
        if granted is not None:
            await close_session(b, granted)
        if holder is not None:
            async with holder:
                pass
        rc.close()
        b.disconnect()
        a.disconnect()
        observer.disconnect()
    return summary_ms(samples)


# -- 3. handover on kill -9 ----------------------------------------------------------

async def handover_kill(address: str, device: str, repeat: int) -> dict[str, Any]:
    b, observer = await connect(address), await library_client(address)  # B raw, as in handover_close
    rc = ReplyClock(b)
    samples: list[int] = []
    loop = asyncio.get_running_loop()
    watched = await observer.manager.find_device(device)
    changes = watched.changes()
    await changes.start()
    try:
        for i in range(repeat + 1):  # the first is warm-up
            proc = subprocess.Popen([sys.executable, "-c", HOLDER_SCRIPT, address, device, str(REPO)],
                                    stdout=subprocess.PIPE, text=True)
            try:
                assert proc.stdout is not None
                line = await asyncio.wait_for(loop.run_in_executor(None, proc.stdout.readline), CALL_TIMEOUT)
                if not line.startswith("ready"):
                    raise RuntimeError(f"the holder process did not get data mode: {line.strip()!r}")
                pending = asyncio.ensure_future(b.call(rc.expect(create_data(device))))
                await wait_waiters(watched, changes, 1)
                t0 = clock()
                os.kill(proc.pid, signal.SIGKILL)
                reply = await asyncio.wait_for(pending, CALL_TIMEOUT)
                if reply.message_type is MessageType.ERROR:
                    raise DBusError(reply.error_name, reply.body[0] if reply.body else "")
                assert rc.at is not None
                if i >= 1:
                    samples.append(rc.at - t0)
                await close_session(b, reply.body[0])
            finally:
                if proc.poll() is None:
                    proc.kill()
                proc.wait()
                if proc.stdout:
                    proc.stdout.close()
    finally:
        await changes.close()
        rc.close()
        b.disconnect()
        observer.disconnect()
    return summary_ms(samples)


# -- 4. many status sessions ----------------------------------------------------------

def vm_rss_kb(pid: int) -> int | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


async def status_latency(bus: MessageBus, session: Session, count: int, block: int, warmup: int) -> dict[str, Any]:
    def timed(fn: Callable[[], Awaitable[Any]]) -> Timed:
        async def once() -> int:
            t0 = clock()
            await fn()
            return clock() - t0
        return once

    samples, _ = await interleaved({"GetStatus": timed(session.status),
                                    "Ping": timed(lambda: rt(bus, msg(ROOT_PATH, PEER, "Ping")))},
                                   count, block, warmup)
    return {k: summary_ms(v) for k, v in samples.items()}


async def many_sessions(address: str, device: str, sessions: int, clients: int, count: int, block: int,
                        warmup: int) -> dict[str, Any]:
    client = await library_client(address)
    bus = await connect(address)  # raw: the Ping that shows drift
    pid = await service_pid(client)
    session = await client.manager.open_session(device, "status")
    others: list[Client] = []
    opened = 0
    refused: str | None = None
    try:
        without = await status_latency(bus, session, count, block, warmup)
        gc.collect()
        await asyncio.sleep(0.5)
        rss_before = vm_rss_kb(pid)

        others = [await library_client(address) for _ in range(clients)]
        per_client = [sessions // clients + (1 if i < sessions % clients else 0) for i in range(clients)]
        t_open = time.perf_counter()

        async def open_on(conn: Client, n: int) -> int:
            nonlocal refused
            got = 0
            for _ in range(n):  # one at a time per connection, all connections at once
                try:
                    await conn.manager.open_session(device, "status")
                    got += 1
                except (StillError, ClientError) as e:
                    refused = f"{type(e).__name__}: {e}"
                    break
            return got

        opened = sum(await asyncio.gather(*(open_on(c, n) for c, n in zip(others, per_client))))
        open_s = time.perf_counter() - t_open
        await asyncio.sleep(0.5)
        rss_after = vm_rss_kb(pid)
        with_ = await status_latency(bus, session, count, block, warmup)
        rss_end = vm_rss_kb(pid)
    finally:
        for conn in others:
            conn.disconnect()
        async with session:
            pass
        bus.disconnect()
        client.disconnect()
    growth_mb = (rss_after - rss_before) * 1024 / MB if rss_before is not None and rss_after is not None else None
    return {
        "service_pid": pid,
        "sessions_requested": sessions,
        "sessions_opened": opened,
        "clients": clients,
        "refused": refused,
        "open_seconds": open_s,
        "rss_before_kb": rss_before,
        "rss_after_kb": rss_after,
        "rss_after_latency_kb": rss_end,
        "growth_mb": growth_mb,
        "per_session_kb": (rss_after - rss_before) / opened if growth_mb is not None and opened else None,
        "without": without,
        "with": with_,
        "status_ratio_median": with_["GetStatus"]["median_ms"] / without["GetStatus"]["median_ms"],
        "status_ratio_p99": with_["GetStatus"]["p99_ms"] / without["GetStatus"]["p99_ms"],
        "ping_ratio_median": with_["Ping"]["median_ms"] / without["Ping"]["median_ms"],
    }


# -- report ------------------------------------------------------------------------

def targets(report: dict[str, Any]) -> list[dict[str, Any]]:
    out = []
    for key, what in (("handover_close", "Close → grant median"), ("handover_kill", "kill -9 → grant median")):
        v = report[key]["median_ms"]
        out.append({"what": f"{what} ≤ {TARGET_HANDOVER_MS:g} ms", "value": f"{v:.2f} ms",
                    "met": v <= TARGET_HANDOVER_MS})
    m = report["sessions"]
    n = m["sessions_requested"]
    if m["growth_mb"] is None:
        out.append({"what": f"RSS growth for {n} sessions ≤ {TARGET_RSS_MB:g} MB", "value": "unreadable",
                    "met": False})
    else:
        all_open = m["sessions_opened"] == n
        out.append({"what": f"RSS growth for {n} sessions ≤ {TARGET_RSS_MB:g} MB",
                    "value": f"{m['growth_mb']:.2f} MB" + ("" if all_open else f" ({m['sessions_opened']} opened)"),
                    "met": all_open and m["growth_mb"] <= TARGET_RSS_MB})
    r = m["status_ratio_median"]
    out.append({"what": f"GetStatus median with/without {n} sessions ≤ {TARGET_STATUS_RATIO}",
                "value": f"{r:.2f}", "met": m["sessions_opened"] == n and r <= TARGET_STATUS_RATIO})
    return out


def print_report(report: dict[str, Any]) -> None:
    lk, hc, hk, m = report["lock"], report["handover_close"], report["handover_kill"], report["sessions"]
    n = m["sessions_opened"]

    def row(name: str, s: dict[str, float], ratio: str = "") -> list[str]:
        return [name, str(s["n"]), f"{s['median_ms'] * 1000:.1f}", f"{s['p99_ms'] * 1000:.1f}", ratio]

    print(f"1. Lock/unlock round trip (blocks of {lk['block']}, interleaved with Ping)")
    table(["call", "n", "median µs", "p99 µs", "median ×Ping"],
          [row("Ping", lk["ping"], "1.00"),
           row("LockDevice+UnlockDevice", lk["lock_unlock"], f"{lk['ratio_median']:.2f}"),
           row("LockDevice+UnlockDevice (raw)", lk["lock_unlock_raw"], f"{lk['raw_ratio_median']:.2f}")])
    print(f"   p99 ×Ping: {lk['ratio_p99']:.2f}")
    print(f"   library cost: the pair through stillsvc.client / raw: median ×{lk['library_ratio_median']:.2f} "
          f"(+{lk['library_added_ms'] * 1000:.1f} µs per pair, two calls)\n")

    print("2./3. Data-mode handover to a queued CreateDevice(data, wait_ms)")
    table(["from", "n", "median ms", "p99 ms", "min ms", "max ms"],
          [[name, str(s["n"]), f"{s['median_ms']:.2f}", f"{s['p99_ms']:.2f}", f"{s['min_ms']:.2f}",
            f"{s['max_ms']:.2f}"] for name, s in (("holder's Close()", hc), ("kill -9 of the holder", hk))])
    print()

    print(f"4. {n} status sessions over {m['clients']} connections (opened in {m['open_seconds']:.2f} s)"
          + (f"; refused: {m['refused']}" if m["refused"] else ""))
    if m["growth_mb"] is not None:
        print(f"   service VmRSS: {m['rss_before_kb'] / 1024:.1f} MiB before, {m['rss_after_kb'] / 1024:.1f} MiB after"
              f" → +{m['growth_mb']:.2f} MB ({m['per_session_kb']:.1f} KiB per session)")
    else:
        print(f"   service VmRSS: not readable (/proc/{m['service_pid']}/status)")
    rows = []
    for call_name in ("GetStatus", "Ping"):
        w, wo = m["with"][call_name], m["without"][call_name]
        rows.append([call_name, f"{wo['median_ms'] * 1000:.1f}", f"{w['median_ms'] * 1000:.1f}",
                     f"{w['median_ms'] / wo['median_ms']:.2f}", f"{wo['p99_ms'] * 1000:.1f}",
                     f"{w['p99_ms'] * 1000:.1f}", f"{w['p99_ms'] / wo['p99_ms']:.2f}"])
    table(["call", "median µs without", "with", "×", "p99 µs without", "with", "×"], rows)
    print()
    for t in report["targets"]:
        print(f"{t['what']}: {'met' if t['met'] else 'not met'} ({t['value']})")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Device lock and data-mode handover costs of stillsvc.")
    parser.add_argument("--address", help="D-Bus address of a bus where stillsvc runs (default: start a private one)")
    parser.add_argument("--count", type=int, default=2000,
                        help="timed samples per call for the lock and GetStatus figures (default 2000)")
    parser.add_argument("--block", type=int, default=100, help="samples per call before switching (default 100)")
    parser.add_argument("--warmup", type=int, default=200, help="untimed calls of each kind first (default 200)")
    parser.add_argument("--handovers", type=int, default=50, help="Close handovers timed (default 50)")
    parser.add_argument("--kills", type=int, default=20, help="kill -9 handovers timed (default 20)")
    parser.add_argument("--sessions", type=int, default=1000, help="status sessions to open (default 1000)")
    parser.add_argument("--clients", type=int, default=10, help="connections to spread them over (default 10)")
    parser.add_argument("--device", default="sim0", help="the device (default sim0)")
    parser.add_argument("--json", action="store_true", help="print one JSON document instead of tables")
    args = parser.parse_args(argv)
    if min(args.count, args.block, args.handovers, args.kills, args.sessions, args.clients) < 1 or args.warmup < 0:
        parser.error("counts must be positive, --warmup not negative")

    report: dict[str, Any] = {}
    with service(args.address, "--config", str(CONFIG), name="locks") as address:
        report["lock"] = asyncio.run(lock_roundtrip(address, args.device, args.count, args.block, args.warmup))
        report["handover_close"] = asyncio.run(handover_close(address, args.device, args.handovers))
        report["handover_kill"] = asyncio.run(handover_kill(address, args.device, args.kills))
        report["sessions"] = asyncio.run(many_sessions(address, args.device, args.sessions, args.clients,
                                                       args.count, args.block, args.warmup))
    report["targets"] = targets(report)
    emit(report, args.address is None, args.json, print_report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
