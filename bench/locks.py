#!/usr/bin/env python3
"""Device lock and data-mode handover costs, and what 1,000 status sessions cost the service.

    python3 bench/locks.py [--address ADDR] [--count N] [--sessions 1000] [--clients 10]
                           [--handovers 50] [--kills 20] [--device ID] [--json]

Four measurements, in one run:

1. **Lock/unlock round trip**: ``Session.LockDevice(timeout)`` followed by
   ``Session.UnlockDevice()`` on a ``status`` session (one pair = one sample,
   timed from sending LockDevice to UnlockDevice's reply), against
   ``Peer.Ping`` on the same connection, in interleaved blocks.
2. **Handover on Close**: client A holds data mode; client B has a pending
   ``CreateDevice(device, "data", {"wait_ms": 10000})``, seen queued through the
   device's ``DataModeWaiters`` property (== 1). Timed from just before A's
   ``Session.Close()`` is sent to the arrival of B's reply (the grant), taken in
   the connection's message handler as the reply is parsed.
3. **Handover on kill -9**: the holder is a separate process that opens a data
   session and prints "ready"; B waits as above; timed from just before
   ``os.kill(pid, SIGKILL)`` to B's reply.
4. **1,000 status sessions on one device**: the service's resident memory
   (``VmRSS`` of the process that owns the bus name) before and after opening
   ``--sessions`` status sessions over ``--clients`` connections, and
   ``Session.GetStatus`` latency on one session without them and then with them
   (same connection; Ping interleaved in both phases, to show drift).

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
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
for _p in (REPO, REPO / "tests", REPO / "bench"):
    if str(_p) not in sys.path:
        sys.path.insert(0, str(_p))

from dbus_fast import DBusError, Message, MessageType, Variant  # noqa: E402
from dbus_fast.aio import MessageBus  # noqa: E402
from helpers import connect, create_session, dbus_call, get_property  # noqa: E402
from roundtrip import PEER, Timed, emit, interleaved, percentile, service, table  # noqa: E402

from stillsvc.common.names import (
    BUS_NAME,
    DEVICE_IFACE,
    MANAGER_IFACE,
    ROOT_PATH,
    SESSION_IFACE,
    device_path,  # noqa: E402
)

CONFIG = Path(__file__).resolve().parent / "locks.toml"
TARGET_HANDOVER_MS = 20.0
TARGET_RSS_MB = 20.0
TARGET_STATUS_RATIO = 1.5
WAIT_MS = 10_000
CALL_TIMEOUT = 15.0
MB = 1e6

clock = time.perf_counter_ns

# The holder for the kill -9 measurement: its own process and connection.
HOLDER_SCRIPT = r"""
import asyncio, sys
from dbus_fast import Message, MessageType
from dbus_fast.aio import MessageBus

async def main(address, device):
    bus = await MessageBus(bus_address=address).connect()
    reply = await bus.call(Message(destination=%(name)r, path=%(root)r, interface=%(manager)r,
                                   member="CreateDevice", signature="ssa{sv}", body=[device, "data", {}]))
    if reply.message_type is MessageType.ERROR:
        print("error", reply.error_name, reply.body, flush=True)
        return
    print("ready", reply.body[0], flush=True)
    await asyncio.Future()

asyncio.run(main(sys.argv[1], sys.argv[2]))
""" % {"name": BUS_NAME, "root": ROOT_PATH, "manager": MANAGER_IFACE}


# -- small helpers ----------------------------------------------------------------

def summary_ms(samples_ns: list[int]) -> dict[str, float]:
    ms = sorted(s / 1e6 for s in samples_ns)
    return {"n": len(ms), "median_ms": statistics.median(ms), "p99_ms": percentile(ms, 99),
            "min_ms": ms[0], "max_ms": ms[-1]}


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


async def wait_waiters(observer: MessageBus, device: str, n: int, timeout: float = 10.0) -> None:
    """Poll the device's DataModeWaiters until it reads ``n``."""
    deadline = time.monotonic() + timeout
    path = device_path(device)
    while await get_property(observer, path, DEVICE_IFACE, "DataModeWaiters") != n:
        if time.monotonic() > deadline:
            raise TimeoutError(f"DataModeWaiters did not reach {n} within {timeout} s")
        await asyncio.sleep(0.001)


class ReplyClock:
    """Notes the moment a given reply is parsed on a connection (before any task wakes)."""

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
    bus = await connect(address)
    session = await create_session(bus, device, "status")
    try:
        async def ping() -> int:
            t0 = clock()
            await rt(bus, msg(ROOT_PATH, PEER, "Ping"))
            return clock() - t0

        async def pair() -> int:
            t0 = clock()
            await rt(bus, msg(session, SESSION_IFACE, "LockDevice", "u", [WAIT_MS]))
            await rt(bus, msg(session, SESSION_IFACE, "UnlockDevice"))
            return clock() - t0

        samples, _ = await interleaved({"Ping": ping, "LockDevice+UnlockDevice": pair}, count, block, warmup)
    finally:
        await close_session(bus, session)
        bus.disconnect()
    ping_s = summary_ms(samples["Ping"])
    pair_s = summary_ms(samples["LockDevice+UnlockDevice"])
    return {"ping": ping_s, "lock_unlock": pair_s, "block": block,
            "ratio_median": pair_s["median_ms"] / ping_s["median_ms"],
            "ratio_p99": pair_s["p99_ms"] / ping_s["p99_ms"]}


# -- 2. handover on Close -------------------------------------------------------------

async def handover_close(address: str, device: str, repeat: int) -> dict[str, Any]:
    a, b, observer = await connect(address), await connect(address), await connect(address)
    clocks = {id(a): ReplyClock(a), id(b): ReplyClock(b)}
    samples: list[int] = []
    holder_bus, waiter_bus = a, b
    holder = (await rt(holder_bus, create_data(device))).body[0]
    try:
        for i in range(repeat + 2):  # the first two are warm-up
            rc = clocks[id(waiter_bus)]
            pending = asyncio.ensure_future(waiter_bus.call(rc.expect(create_data(device))))
            await wait_waiters(observer, device, 1)
            close = msg(holder, SESSION_IFACE, "Close")
            t0 = clock()
            await rt(holder_bus, close)
            reply = await asyncio.wait_for(pending, CALL_TIMEOUT)
            if reply.message_type is MessageType.ERROR:
                raise DBusError(reply.error_name, reply.body[0] if reply.body else "")
            assert rc.at is not None
            if i >= 2:
                samples.append(rc.at - t0)
            holder, holder_bus, waiter_bus = reply.body[0], waiter_bus, holder_bus
    finally:
        await close_session(holder_bus, holder)
        for rc in clocks.values():
            rc.close()
        for bus in (a, b, observer):
            bus.disconnect()
    return summary_ms(samples)


# -- 3. handover on kill -9 ----------------------------------------------------------

async def handover_kill(address: str, device: str, repeat: int) -> dict[str, Any]:
    b, observer = await connect(address), await connect(address)
    rc = ReplyClock(b)
    samples: list[int] = []
    loop = asyncio.get_running_loop()
    try:
        for i in range(repeat + 1):  # the first is warm-up
            proc = subprocess.Popen([sys.executable, "-c", HOLDER_SCRIPT, address, device],
                                    stdout=subprocess.PIPE, text=True)
            try:
                assert proc.stdout is not None
                line = await asyncio.wait_for(loop.run_in_executor(None, proc.stdout.readline), CALL_TIMEOUT)
                if not line.startswith("ready"):
                    raise RuntimeError(f"the holder process did not get data mode: {line.strip()!r}")
                pending = asyncio.ensure_future(b.call(rc.expect(create_data(device))))
                await wait_waiters(observer, device, 1)
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


async def status_latency(bus: MessageBus, session: str, count: int, block: int, warmup: int) -> dict[str, Any]:
    def timed(make: Callable[[], Message]) -> Timed:
        async def once() -> int:
            t0 = clock()
            await rt(bus, make())
            return clock() - t0
        return once

    samples, _ = await interleaved({"GetStatus": timed(lambda: msg(session, SESSION_IFACE, "GetStatus")),
                                    "Ping": timed(lambda: msg(ROOT_PATH, PEER, "Ping"))}, count, block, warmup)
    return {k: summary_ms(v) for k, v in samples.items()}


async def many_sessions(address: str, device: str, sessions: int, clients: int, count: int, block: int,
                        warmup: int) -> dict[str, Any]:
    bus = await connect(address)
    (pid,) = await dbus_call(bus, "GetConnectionUnixProcessID", "s", [BUS_NAME])
    session = await create_session(bus, device, "status")
    others: list[MessageBus] = []
    opened = 0
    refused: str | None = None
    try:
        without = await status_latency(bus, session, count, block, warmup)
        gc.collect()
        await asyncio.sleep(0.5)
        rss_before = vm_rss_kb(pid)

        others = [await connect(address) for _ in range(clients)]
        per_client = [sessions // clients + (1 if i < sessions % clients else 0) for i in range(clients)]
        t_open = time.perf_counter()

        async def open_on(conn: MessageBus, n: int) -> int:
            nonlocal refused
            got = 0
            for _ in range(n):  # one at a time per connection, all connections at once
                try:
                    await create_session(conn, device, "status")
                    got += 1
                except DBusError as e:
                    refused = f"{e.type}: {e.text}"
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
        await close_session(bus, session)
        bus.disconnect()
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
           row("LockDevice+UnlockDevice", lk["lock_unlock"], f"{lk['ratio_median']:.2f}")])
    print(f"   p99 ×Ping: {lk['ratio_p99']:.2f}\n")

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
