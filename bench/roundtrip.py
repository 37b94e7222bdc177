#!/usr/bin/env python3
"""Round-trip cost of stillsvc's cheap methods, relative to a bare D-Bus ping.

    python3 bench/roundtrip.py [--address ADDR] [--count N] [--block B] [--warmup W]
                               [--device ID] [--json]
    python3 bench/roundtrip.py --concurrency C [--duration S] [--phase S] [--address ADDR] [--json]

Latency mode (the default): one client connection, one call in flight at a time.
Each method is called ``--count`` times; the methods take turns in blocks of
``--block`` calls, in an order that rotates every round and reverses every other
round, so slow drift (CPU frequency, other load) lands on all of them alike. The
baseline is ``org.freedesktop.DBus.Peer.Ping`` on the service's root object: the
same path through the bus daemon and into the service's connection, answered by
the D-Bus library itself with no service code, so every ratio is "what the
service adds on top of the bus".

Throughput mode (``--concurrency C``): C caller processes, each with its own
connection and one call in flight, alternate between Ping and GetDevices in
synchronised phases (order Ping, GetDevices, GetDevices, Ping, ...); the figure is
completed calls per second for each, and their ratio.

Without ``--address`` a private ``dbus-daemon --session`` and ``stillsvc --simulate``
are started for the run and stopped afterwards.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import math
import multiprocessing
import os
import platform
import queue
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from contextlib import contextmanager
from importlib import metadata
from pathlib import Path
from typing import Any, Iterator

REPO = Path(__file__).resolve().parent.parent
for _p in (REPO, REPO / "tests"):
    if str(_p) not in sys.path:
        sys.path.insert(0, str(_p))

from dbus_fast import DBusError, Message, MessageType  # noqa: E402
from dbus_fast.aio import MessageBus  # noqa: E402
from helpers import Daemon, DBusDaemon, connect, create_session, wait_for_name  # noqa: E402

from stillsvc.common.names import (  # noqa: E402
    BUS_NAME,
    DEVICE_IFACE,
    MANAGER_IFACE,
    ROOT_PATH,
    SESSION_IFACE,
    device_path,
)

PEER = "org.freedesktop.DBus.Peer"
PROPERTIES = "org.freedesktop.DBus.Properties"
TARGET_RATIO = 1.5
CALL_TIMEOUT = 10.0

# A method under test: a name, whether it does device I/O, and a factory for a
# fresh Message (each send needs its own serial, so messages are not reused).
MessageFactory = Callable[[], Message]


def _factory(path: str, interface: str, member: str, signature: str = "",
             body: list[Any] | None = None) -> MessageFactory:
    body = body or []

    def make() -> Message:
        return Message(destination=BUS_NAME, path=path, interface=interface, member=member,
                       signature=signature, body=body)

    return make


def method_table(device: str, session_path: str | None) -> list[tuple[str, bool, MessageFactory]]:
    dev = device_path(device)
    table = [
        ("Ping", False, _factory(ROOT_PATH, PEER, "Ping")),
        ("Manager.GetDevices", False, _factory(ROOT_PATH, MANAGER_IFACE, "GetDevices")),
        ("Get(Manager.Version)", False, _factory(ROOT_PATH, PROPERTIES, "Get", "ss", [MANAGER_IFACE, "Version"])),
        ("Get(Device.State)", False, _factory(dev, PROPERTIES, "Get", "ss", [DEVICE_IFACE, "State"])),
    ]
    if session_path is not None:
        table.append(("Session.GetStatus", True, _factory(session_path, SESSION_IFACE, "GetStatus")))
    return table


async def roundtrip(bus: MessageBus, make: MessageFactory) -> None:
    reply = await bus.call(make())
    if reply.message_type is MessageType.ERROR:
        raise DBusError(reply.error_name, reply.body[0] if reply.body else "")


# -- statistics -------------------------------------------------------------------

def percentile(sorted_values: list[float], q: float) -> float:
    """Nearest-rank percentile of an already sorted list."""
    rank = max(1, math.ceil(q / 100 * len(sorted_values)))
    return sorted_values[rank - 1]


def summarise(samples_ns: list[int]) -> dict[str, float]:
    us = sorted(s / 1000 for s in samples_ns)
    return {
        "n": len(us),
        "median_us": statistics.median(us),
        "p99_us": percentile(us, 99),
        "min_us": us[0],
        "max_us": us[-1],
    }


# -- output -----------------------------------------------------------------------

def table(headers: list[str], rows: list[list[str]]) -> None:
    widths = [max(len(h), *(len(row[i]) for row in rows)) for i, h in enumerate(headers)]

    def line(cells: list[str]) -> str:
        return "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))

    print(line(headers))
    print("  ".join("-" * w for w in widths))
    for row in rows:
        print(line(row))


# -- the service under test -------------------------------------------------------

@contextmanager
def service(address: str | None, *extra: str, name: str = "roundtrip") -> Iterator[str]:
    """Yield a bus address on which stillsvc answers: the given one, or a private bus
    with stillsvc started on it (``extra``: more arguments for stillsvc)."""
    if address:
        try:
            asyncio.run(ensure_name(address))
        except Exception as e:
            sys.exit(f"{name}: no {BUS_NAME} on {address}: {type(e).__name__}: {e}")
        yield address
        return
    if shutil.which("dbus-daemon") is None:
        sys.exit(f"{name}: dbus-daemon is required to start a private bus (or give --address)")
    workdir = tempfile.mkdtemp(prefix="stillsvc-bench-")
    bus = DBusDaemon()
    # The daemon at its default log level (the helper's default is debug).
    daemon = Daemon(bus.address, "--log-level", "info", *extra, workdir=workdir)
    try:
        try:
            asyncio.run(daemon.ready())
        except Exception:
            sys.stderr.write(daemon.log[-4000:])
            raise
        yield bus.address
    finally:
        daemon.stop()
        bus.stop()
        shutil.rmtree(workdir, ignore_errors=True)


async def ensure_name(address: str) -> None:
    bus = await connect(address)
    try:
        await wait_for_name(bus, timeout=5.0)
    finally:
        bus.disconnect()


# -- latency mode -----------------------------------------------------------------

def block_order(names: list[str], round_number: int) -> list[str]:
    """The order of the blocks in a round: rotated every other round and reversed
    on odd rounds, so every kind spends as long at each place (for two kinds:
    ab, ba, ba, ab, ...)."""
    k = (round_number // 2) % len(names)
    order = names[k:] + names[:k]
    return order[::-1] if round_number % 2 else order


Timed = Callable[[], Awaitable[int]]


async def interleaved(kinds: dict[str, Timed], count: int, block: int,
                      warmup: int) -> tuple[dict[str, list[int]], list[dict[str, float]]]:
    """Time each kind ``count`` times, in blocks of ``block`` that take turns
    (:func:`block_order`), after ``warmup`` untimed runs of each (caches, code
    paths, the bus daemon's buffers). Each kind runs once and returns the
    nanoseconds it took. The garbage collector runs between rounds only.
    Returns the samples of each kind and, per round, the median of each
    kind's block: how steady a ratio is from round to round."""
    for fn in kinds.values():
        for _ in range(warmup):
            await fn()
    names = list(kinds)
    samples: dict[str, list[int]] = {name: [] for name in names}
    round_medians: list[dict[str, float]] = []
    gc.collect()
    gc.disable()
    try:
        r = 0
        while any(len(v) < count for v in samples.values()):
            this_round: dict[str, float] = {}
            for name in block_order(names, r):
                fn = kinds[name]
                got = [await fn() for _ in range(min(block, count - len(samples[name])))]
                if got:
                    samples[name].extend(got)
                    this_round[name] = statistics.median(got)
            round_medians.append(this_round)
            r += 1
            gc.collect()  # outside the timed blocks
    finally:
        gc.enable()
    return samples, round_medians


async def latency(address: str, count: int, block: int, warmup: int, device: str,
                  with_status: bool) -> dict[str, Any]:
    bus = await connect(address)
    session = None
    try:
        if with_status:
            session = await create_session(bus, device, "status")
        table = method_table(device, session)
        clock = time.perf_counter_ns

        def timed(make: MessageFactory) -> Timed:
            async def once() -> int:
                t0 = clock()
                reply = await bus.call(make())
                t1 = clock()
                if reply.message_type is MessageType.ERROR:
                    raise DBusError(reply.error_name, reply.body[0] if reply.body else "")
                return t1 - t0
            return once

        samples, round_medians = await interleaved({name: timed(make) for name, _, make in table},
                                                   count, block, warmup)
    finally:
        if session is not None and bus.connected:
            try:
                await roundtrip(bus, _factory(session, SESSION_IFACE, "Close"))
            except DBusError:
                pass
        bus.disconnect()

    results = []
    base = summarise(samples["Ping"])
    for name, io, _ in table:
        s = summarise(samples[name])
        s.update(method=name, device_io=io,
                 ratio_median=s["median_us"] / base["median_us"],
                 ratio_p99=s["p99_us"] / base["p99_us"])
        results.append(s)
    per_round = [r["Manager.GetDevices"] / r["Ping"] for r in round_medians]
    ratio = next(r for r in results if r["method"] == "Manager.GetDevices")["ratio_median"]
    return {
        "mode": "latency",
        "count": count,
        "block": block,
        "warmup": warmup,
        "results": results,
        "getdevices_ratio_per_round": {
            "min": min(per_round), "median": statistics.median(per_round), "max": max(per_round),
            "rounds": len(per_round),
        },
        "target": {"what": f"GetDevices/Ping median ratio <= {TARGET_RATIO}", "ratio": ratio,
                   "met": ratio <= TARGET_RATIO},
    }


def print_latency(report: dict[str, Any]) -> None:
    headers = ["method", "n", "median µs", "p99 µs", "median ×Ping", "p99 ×Ping"]
    rows = []
    for section in (False, True):
        part = [r for r in report["results"] if r["device_io"] is section]
        if not part:
            continue
        if section:
            rows.append(None)  # separator: device I/O below
        for r in part:
            rows.append([r["method"], str(r["n"]), f"{r['median_us']:.1f}", f"{r['p99_us']:.1f}",
                         f"{r['ratio_median']:.2f}", f"{r['ratio_p99']:.2f}"])
    widths = [max(len(h), *(len(row[i]) for row in rows if row)) for i, h in enumerate(headers)]

    def line(cells: list[str]) -> str:
        return "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))

    print(line(headers))
    print("  ".join("-" * w for w in widths))
    for row in rows:
        if row is None:
            print("-- device I/O (worker thread + device lock):")
        else:
            print(line(row))
    pr = report["getdevices_ratio_per_round"]
    print(f"\nGetDevices/Ping median ratio per round ({pr['rounds']} rounds of {report['block']}): "
          f"min {pr['min']:.2f}, median {pr['median']:.2f}, max {pr['max']:.2f}")
    t = report["target"]
    print(f"GetDevices/Ping median ratio ≤ {TARGET_RATIO}: {'met' if t['met'] else 'not met'} ({t['ratio']:.2f})")


# -- throughput mode --------------------------------------------------------------

THROUGHPUT_METHODS = ("Ping", "Manager.GetDevices")


def phase_method(k: int) -> int:
    """ABBA order: Ping, GetDevices, GetDevices, Ping, Ping, GetDevices, ..."""
    return (k + 1) // 2 % 2


def _worker(index: int, address: str, warmup: int, phases: int, phase: float,
            ready: Any, start: Any, t0: Any, results: Any) -> None:
    async def run() -> list[int]:
        bus = await connect(address)
        try:
            table = {name: make for name, _, make in method_table("sim0", None) if name in THROUGHPUT_METHODS}
            makers = [table[name] for name in THROUGHPUT_METHODS]
            for make in makers:
                for _ in range(warmup):
                    await roundtrip(bus, make)
            ready.put(index)
            start.wait()  # nothing else runs on this loop meanwhile
            begin = t0.value
            counts = [0] * phases
            clock = time.monotonic
            gc.collect()
            gc.disable()
            while True:
                now = clock()
                if now < begin:
                    await asyncio.sleep(begin - now)
                    continue
                k = int((now - begin) / phase)
                if k >= phases:
                    break
                reply = await bus.call(makers[phase_method(k)]())
                if reply.message_type is MessageType.ERROR:
                    raise DBusError(reply.error_name, reply.body[0] if reply.body else "")
                if int((clock() - begin) / phase) == k:  # calls that straddle a boundary don't count
                    counts[k] += 1
            gc.enable()
            return counts
        finally:
            bus.disconnect()

    try:
        results.put((index, asyncio.run(run()), None))
    except BaseException as e:  # report, don't hang the parent
        results.put((index, None, f"{type(e).__name__}: {e}"))


def throughput(address: str, concurrency: int, duration: float, phase: float, warmup: int) -> dict[str, Any]:
    ctx = multiprocessing.get_context("spawn")
    ready, results = ctx.Queue(), ctx.Queue()
    start = ctx.Event()
    t0 = ctx.Value("d", 0.0)
    per_method = max(1, round(duration / phase))
    phases = 2 * per_method
    procs = [ctx.Process(target=_worker, args=(i, address, warmup, phases, phase, ready, start, t0, results))
             for i in range(concurrency)]
    for p in procs:
        p.start()
    try:
        waiting, deadline = len(procs), time.monotonic() + 60
        while waiting:
            try:
                ready.get(timeout=0.2)
                waiting -= 1
            except queue.Empty:
                if not results.empty():  # a caller failed before it was ready
                    raise RuntimeError(f"a caller failed: {results.get()[2]}") from None
                if time.monotonic() > deadline:
                    raise RuntimeError("the callers did not get ready within 60 s") from None
        t0.value = time.monotonic() + 0.2  # CLOCK_MONOTONIC: one clock for every process
        start.set()
        per_phase = [0] * phases
        for _ in procs:
            _, counts, error = results.get(timeout=60 + phases * phase)
            if error:
                raise RuntimeError(f"a caller failed: {error}")
            per_phase = [a + b for a, b in zip(per_phase, counts)]
    finally:
        for p in procs:
            p.join(10)
            if p.is_alive():
                p.terminate()
    totals = [0, 0]
    for k, n in enumerate(per_phase):
        totals[phase_method(k)] += n
    seconds = per_method * phase
    rates = {name: totals[i] / seconds for i, name in enumerate(THROUGHPUT_METHODS)}
    return {
        "mode": "throughput",
        "concurrency": concurrency,
        "seconds_per_method": seconds,
        "phase_s": phase,
        "calls_per_s": rates,
        "ratio": rates["Manager.GetDevices"] / rates["Ping"],
    }


def print_throughput(report: dict[str, Any]) -> None:
    rates = report["calls_per_s"]
    width = max(len(n) for n in rates)
    print(f"{report['concurrency']} concurrent callers (one connection and one call in flight each), "
          f"{report['seconds_per_method']:.1f} s per method in {report['phase_s']} s phases")
    print(f"{'method'.ljust(width)}  {'calls/s':>9}")
    for name, rate in rates.items():
        print(f"{name.ljust(width)}  {rate:9.0f}")
    print(f"GetDevices/Ping throughput ratio: {report['ratio']:.2f}")


# -- main -------------------------------------------------------------------------

def machine() -> dict[str, Any]:
    return {"nproc": os.cpu_count(), "python": platform.python_version(), "platform": platform.platform(),
            "dbus_fast": metadata.version("dbus-fast")}


def emit(report: dict[str, Any], private_bus: bool, as_json: bool,
         print_tables: Callable[[dict[str, Any]], None]) -> None:
    """Add the machine's description to a benchmark's report and print it."""
    report["machine"] = machine()
    report["private_bus"] = private_bus
    if as_json:
        print(json.dumps(report, indent=2))
    else:
        print_tables(report)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Round-trip cost of stillsvc methods relative to Peer.Ping.")
    parser.add_argument("--address", help="D-Bus address of a bus where stillsvc runs (default: start a private one)")
    parser.add_argument("--count", type=int, default=3000, help="timed calls per method (default 3000)")
    parser.add_argument("--block", type=int, default=100, help="calls per method before switching (default 100)")
    parser.add_argument("--warmup", type=int, default=300, help="untimed calls per method first (default 300)")
    parser.add_argument("--device", default="sim0", help="device for Device.State and GetStatus (default sim0)")
    parser.add_argument("--no-status", action="store_true", help="leave out Session.GetStatus (device I/O)")
    parser.add_argument("--concurrency", type=int, metavar="C",
                        help="throughput mode: C concurrent callers on separate connections")
    parser.add_argument("--duration", type=float, default=3.0, help="throughput mode: seconds per method (default 3)")
    parser.add_argument("--phase", type=float, default=0.25, help="throughput mode: seconds per phase (default 0.25)")
    parser.add_argument("--json", action="store_true", help="print one JSON document instead of tables")
    args = parser.parse_args(argv)
    if args.count < 1 or args.block < 1 or args.warmup < 0:
        parser.error("--count and --block must be positive, --warmup not negative")
    if args.concurrency is not None and args.concurrency < 1:
        parser.error("--concurrency must be at least 1")

    with service(args.address) as address:
        if args.concurrency:
            report = throughput(address, args.concurrency, args.duration, args.phase, min(args.warmup, 200))
        else:
            report = asyncio.run(latency(address, args.count, args.block, args.warmup, args.device,
                                         not args.no_status))
    emit(report, args.address is None, args.json, print_throughput if args.concurrency else print_latency)
    return 0


if __name__ == "__main__":
    sys.exit(main())
