#!/usr/bin/env python3
"""Round-trip cost of stillsvc's cheap methods, relative to a bare D-Bus ping.

    python3 bench/roundtrip.py [--address ADDR] [--count N] [--block B] [--warmup W]
                               [--device ID] [--json]
    python3 bench/roundtrip.py --concurrency C [--duration S] [--phase S] [--address ADDR] [--json]

Latency mode (the default): one client, one call in flight at a time. The
service's methods are called through the client library (:mod:`stillsvc.client`);
the baseline, ``org.freedesktop.DBus.Peer.Ping`` on the service's root object, is
a raw dbus-fast message on a second connection of the same process (the
library's connection is its own), and so is a raw ``Manager.GetDevices`` next to
the library's: their ratio is what the library itself adds to a call.
Each method is called ``--count`` times; the methods take turns in blocks of
``--block`` calls, in an order that rotates every round and reverses every other
round, so slow drift (CPU frequency, other load) lands on all of them alike. Ping
takes the same path through the bus daemon and into the service's connection,
answered by the D-Bus library itself with no service code, so every ratio is
"what the service (and, for the library's calls, the client library) adds on top
of the bus".

Throughput mode (``--concurrency C``): C caller processes, each with one call in
flight (a library client and a raw connection each), alternate between Ping
(raw), GetDevices (library) and GetDevices (raw) in synchronised phases (order
A B C C B A ...); the figure is completed calls per second for each, and their
ratios.

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
import signal
import statistics
import subprocess
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
from helpers import Daemon, DBusDaemon, connect  # noqa: E402

from stillsvc.client import Client  # noqa: E402
from stillsvc.common.names import BUS_NAME, DEVICE_IFACE, MANAGER_IFACE, ROOT_PATH  # noqa: E402

PEER = "org.freedesktop.DBus.Peer"
PROPERTIES = "org.freedesktop.DBus.Properties"
TARGET_RATIO = 1.5
CALL_TIMEOUT = 10.0

RAW_GETDEVICES = "Manager.GetDevices (raw)"

# One call of a method under test (awaited once per sample).
Call = Callable[[], Awaitable[Any]]


def raw_call(bus: MessageBus, path: str, interface: str, member: str, signature: str = "",
             body: list[Any] | None = None) -> Call:
    """A call as a bare dbus-fast message: the baseline, and the reference that shows
    what the client library adds. Each send builds a fresh Message (each needs its
    own serial, so messages are not reused)."""
    body = body or []

    async def once() -> None:
        reply = await bus.call(Message(destination=BUS_NAME, path=path, interface=interface, member=member,
                                       signature=signature, body=body))
        if reply.message_type is MessageType.ERROR:
            raise DBusError(reply.error_name, reply.body[0] if reply.body else "")

    return once


def ping(bus: MessageBus) -> Call:
    """The baseline, raw: Peer.Ping on the service's root object."""
    return raw_call(bus, ROOT_PATH, PEER, "Ping")


def library_getdevices(client: Client) -> Call:
    """``Manager.GetDevices`` through the library. The library wraps no GetDevices
    (``Manager.devices()`` is one ``GetManagedObjects``), so this is its documented
    call for what the typed objects do not cover, :meth:`Client.call`."""
    return lambda: client.call(ROOT_PATH, MANAGER_IFACE, "GetDevices")


def raw_getdevices(bus: MessageBus) -> Call:
    return raw_call(bus, ROOT_PATH, MANAGER_IFACE, "GetDevices")


def method_table(client: Client, raw: MessageBus, device_path: str,
                 session: Any | None) -> list[tuple[str, bool, Call]]:
    """The methods under test: a name, whether it does device I/O, one call.
    ``raw``: the second connection, for the baseline and the raw reference."""
    table = [
        ("Ping", False, ping(raw)),
        ("Manager.GetDevices", False, library_getdevices(client)),
        (RAW_GETDEVICES, False, raw_getdevices(raw)),
        ("Get(Manager.Version)", False, client.manager.version),
        # The library reads a device's properties only all together (Device.info(),
        # GetManagedObjects); one property is Client.call, its escape hatch.
        ("Get(Device.State)", False,
         lambda: client.call(device_path, PROPERTIES, "Get", "ss", [DEVICE_IFACE, "State"])),
    ]
    if session is not None:
        table.append(("Session.GetStatus", True, session.status))
    return table


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


def reexec_in_namespace(script: str, marker: str, budget: float) -> int:
    """Run ``script`` again, with this run's arguments, in a private network namespace
    with ``lo`` up and ``marker`` set in its environment (so that it knows it is
    inside); the child has its own process group, so that everything it started can
    be stopped if it overruns ``budget`` seconds."""
    name = Path(script).stem
    for tool in ("unshare", "ip"):
        if shutil.which(tool) is None:
            sys.exit(f"{name}: {tool} is required (util-linux, iproute2)")
    argv = ["unshare", "-n", "--", "sh", "-c", 'ip link set lo up && exec "$@"', "sh",
            sys.executable, str(Path(script).resolve()), *sys.argv[1:]]
    proc = subprocess.Popen(argv, env={**os.environ, marker: "1"}, start_new_session=True)
    try:
        return proc.wait(budget)
    except subprocess.TimeoutExpired:
        sys.stderr.write(f"{name}: still running after {budget:g} s: stopped\n")
        return 124
    except KeyboardInterrupt:
        return 130
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(5)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()


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
    """ServiceNotRunning (from the library) unless stillsvc owns its name on ``address``."""
    client = Client(address, timeout=5.0)
    await client.connect()
    client.disconnect()


# -- latency mode -----------------------------------------------------------------

def block_order(names: list[str], round_number: int) -> list[str]:
    """The order of the blocks in a round: rotated every other round and reversed
    on odd rounds, so every kind spends as long at each place (for two kinds:
    ab, ba, ba, ab, ...)."""
    k = (round_number // 2) % len(names)
    order = names[k:] + names[:k]
    return order[::-1] if round_number % 2 else order


Timed = Callable[[], Awaitable[int]]

clock = time.perf_counter_ns


def timed(fn: Call) -> Timed:
    """One call of ``fn``, returning the nanoseconds it took."""
    async def once() -> int:
        t0 = clock()
        await fn()
        return clock() - t0
    return once


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


def library_figures(samples: dict[str, list[int]], round_medians: list[dict[str, float]],
                    library: str, raw: str) -> dict[str, Any]:
    """What the client library adds: a call through it against the same call raw,
    from one interleaved run."""
    lib_s, raw_s = summarise(samples[library]), summarise(samples[raw])
    per_round = [r[library] / r[raw] for r in round_medians if library in r and raw in r]
    return {
        "what": f"{library} through stillsvc.client / the same call raw",
        "library_median_us": lib_s["median_us"], "raw_median_us": raw_s["median_us"],
        "ratio_median": lib_s["median_us"] / raw_s["median_us"],
        "ratio_p99": lib_s["p99_us"] / raw_s["p99_us"],
        "added_median_us": lib_s["median_us"] - raw_s["median_us"],
        "ratio_per_round": {"min": min(per_round), "median": statistics.median(per_round), "max": max(per_round),
                            "rounds": len(per_round)},
    }


DBUS_NAME = "org.freedesktop.DBus"
DBUS_PATH = "/org/freedesktop/DBus"


async def service_pid(client: Client) -> int:
    """The pid of the connection that owns the service's name (the library knows its
    unique name; the bus daemon's GetConnectionUnixProcessID is Client.call's)."""
    owner = client.service_owner
    if owner is None:
        raise RuntimeError("the service is not on the bus")
    (pid,) = await client.call(DBUS_PATH, DBUS_NAME, "GetConnectionUnixProcessID", "s", [owner],
                               destination=DBUS_NAME)
    return int(pid)


async def library_cost(client: Client, raw: MessageBus, count: int = 1000, block: int = 100,
                       warmup: int = 100) -> dict[str, Any]:
    """The library's own cost in another benchmark's run: GetDevices through the
    library against GetDevices raw, interleaved as in the latency mode."""
    kinds = {"Manager.GetDevices": timed(library_getdevices(client)), RAW_GETDEVICES: timed(raw_getdevices(raw))}
    samples, round_medians = await interleaved(kinds, count, block, warmup)
    out = library_figures(samples, round_medians, "Manager.GetDevices", RAW_GETDEVICES)
    out["count"] = count
    return out


def print_library_cost(cost: dict[str, Any]) -> None:
    pr = cost["ratio_per_round"]
    print(f"Library cost, same run: GetDevices through stillsvc.client {cost['library_median_us']:.1f} µs, "
          f"raw {cost['raw_median_us']:.1f} µs (medians of {cost['count']}) → ×{cost['ratio_median']:.2f} "
          f"(+{cost['added_median_us']:.1f} µs per call; per round {pr['min']:.2f} – {pr['max']:.2f})")


async def latency(address: str, count: int, block: int, warmup: int, device: str,
                  with_status: bool) -> dict[str, Any]:
    client = await Client(address, timeout=CALL_TIMEOUT).connect()
    raw = await connect(address)  # the raw baseline's connection (the library's is its own)
    session = None
    try:
        dev = await client.manager.find_device(device)
        if with_status:
            session = await client.manager.open_session(device, "status")
        table = method_table(client, raw, dev.path, session)
        samples, round_medians = await interleaved({name: timed(fn) for name, _, fn in table},
                                                   count, block, warmup)
    finally:
        if session is not None:
            async with session:  # closes it; gone already is fine
                pass
        client.disconnect()
        raw.disconnect()

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
        "library": library_figures(samples, round_medians, "Manager.GetDevices", RAW_GETDEVICES),
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
    lib = report["library"]
    lr = lib["ratio_per_round"]
    print(f"Library cost: GetDevices through stillsvc.client / raw GetDevices: median ×{lib['ratio_median']:.2f} "
          f"(+{lib['added_median_us']:.1f} µs per call), p99 ×{lib['ratio_p99']:.2f}; "
          f"per round min {lr['min']:.2f}, median {lr['median']:.2f}, max {lr['max']:.2f}")
    t = report["target"]
    print(f"GetDevices/Ping median ratio ≤ {TARGET_RATIO}: {'met' if t['met'] else 'not met'} ({t['ratio']:.2f})")


# -- throughput mode --------------------------------------------------------------

THROUGHPUT_METHODS = ("Ping", "Manager.GetDevices", RAW_GETDEVICES)
_PHASE_ORDER = (0, 1, 2, 2, 1, 0)


def phase_method(k: int) -> int:
    """ABCCBA order: Ping, GetDevices (library), GetDevices (raw), GetDevices (raw),
    GetDevices (library), Ping, Ping, ... (a linear drift lands on all three alike)."""
    return _PHASE_ORDER[k % len(_PHASE_ORDER)]


def _worker(index: int, address: str, warmup: int, phases: int, phase: float,
            ready: Any, start: Any, t0: Any, results: Any) -> None:
    async def run() -> list[int]:
        client = await Client(address, timeout=CALL_TIMEOUT).connect()
        bus = await connect(address)  # the raw baseline's connection
        try:
            calls = {"Ping": ping(bus), "Manager.GetDevices": library_getdevices(client),
                     RAW_GETDEVICES: raw_getdevices(bus)}
            makers = [calls[name] for name in THROUGHPUT_METHODS]
            for fn in makers:
                for _ in range(warmup):
                    await fn()
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
                await makers[phase_method(k)]()
                if int((clock() - begin) / phase) == k:  # calls that straddle a boundary don't count
                    counts[k] += 1
            gc.enable()
            return counts
        finally:
            client.disconnect()
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
    phases = len(THROUGHPUT_METHODS) * per_method
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
    totals = [0] * len(THROUGHPUT_METHODS)
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
        "raw_ratio": rates[RAW_GETDEVICES] / rates["Ping"],
        "library_ratio": rates["Manager.GetDevices"] / rates[RAW_GETDEVICES],
    }


def print_throughput(report: dict[str, Any]) -> None:
    rates = report["calls_per_s"]
    width = max(len(n) for n in rates)
    print(f"{report['concurrency']} concurrent callers (a library client and a raw connection, one call in flight "
          f"each), "
          f"{report['seconds_per_method']:.1f} s per method in {report['phase_s']} s phases")
    print(f"{'method'.ljust(width)}  {'calls/s':>9}")
    for name, rate in rates.items():
        print(f"{name.ljust(width)}  {rate:9.0f}")
    print(f"GetDevices/Ping throughput ratio: {report['ratio']:.2f}")
    print(f"raw GetDevices/Ping throughput ratio: {report['raw_ratio']:.2f}; "
          f"library cost: GetDevices through stillsvc.client / raw: {report['library_ratio']:.2f}")


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
