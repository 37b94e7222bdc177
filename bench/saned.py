#!/usr/bin/env python3
"""stillsvc's SANE network server against the real saned, with scanimage as the client.

    python3 bench/saned.py [--rounds N] [--warmup W] [--clients C] [--json]

One A4 300 dpi colour page (``scanimage --mode Color --resolution 300 -x 210 -y 297
--format=pnm``: 2480 x 3507 pixels, 26,092,080 bytes of image) is scanned, one scan at
a time, three ways that take turns (the order rotates from round to round):

* ``saned``: ``scanimage -d net:127.0.0.2:test:0`` through Debian's saned with the
  ``test`` backend (the baseline);
* ``stillsvc``: ``scanimage -d net:127.0.0.1:sim0`` through stillsvc's SANE server
  (``[saned]``) with the simulated scanner;
* ``direct``: ``scanimage -d test:0``, the test backend in scanimage's own process, no
  network: a second baseline, what the page costs with no server at all.

stillsvc serves the simulator while saned serves the test backend: the SANE bridge
(stillsvc serving a SANE backend) has not landed, so the two servers do not read the
same device. Both produce the page from memory at once; the figures compare the
servers and their protocol handling, not scanners.

For each scan: ``first byte`` is the time from starting scanimage to the first byte on
its stdout (scanimage runs under ``stdbuf -o0``, so that is the PNM header, written
once ``sane_start`` has returned and the parameters are known); ``first image byte``
the first byte after the header; ``page`` the time until scanimage has exited with the
whole page written. Medians over ``--rounds`` rounds (default 10), after ``--warmup``
untimed rounds (1); ratios are stillsvc / saned, from the same run. Target: stillsvc at
least as fast as saned (ratio <= 1).

Then ``--clients`` scanimage processes (default 8) on sim0 at once, through stillsvc:
a D-Bus session (the client library) holds sim0's data mode while they start, one
after the other, each started once the one before waits in line (the device's
``DataModeWaiters``); then it lets go. They must all succeed, be served in the order
they asked (first come, first served), and take data mode in turn: the intervals from
each one's first image byte to its last image byte must not overlap.

libsane's ``net`` backend only connects to port 6566, so the script re-executes
itself in a private network namespace (``unshare -n``, as root) with its own
loopback: saned listens on 127.0.0.2:6566 and stillsvc on 127.0.0.1:6566. Every SANE
program gets a private ``SANE_CONFIG_DIR``: saned's enables only ``test`` (with
``geometry_max 300.0``, for A4) and allows 127.0.0.0/8; the net clients' enable only
``net`` and name only their server. stillsvc runs on a private ``dbus-daemon``, started
with the test suite's helpers (``tests/helpers.py``). Every wait has a deadline and
every process started is stopped at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
for _p in (REPO, REPO / "tests", REPO / "bench"):
    if str(_p) not in sys.path:
        sys.path.insert(0, str(_p))

from helpers import Daemon, DBusDaemon  # noqa: E402
from roundtrip import block_order, reexec_in_namespace, table  # noqa: E402

from stillsvc.client import Client  # noqa: E402
from stillsvc.client.records import PropertiesChanged  # noqa: E402
from stillsvc.common.names import DEVICE_IFACE  # noqa: E402

IN_NAMESPACE = "STILLSVC_BENCH_SANED_NETNS"
PORT = 6566
STILLSVC_HOST, SANED_HOST = "127.0.0.1", "127.0.0.2"
PAGE = ["--mode", "Color", "--resolution", "300", "-x", "210", "-y", "297", "--format=pnm"]
WIDTH, HEIGHT = 2480, 3507
IMAGE_BYTES = WIDTH * HEIGHT * 3
KINDS = {  # label -> (device, which client configuration)
    "saned": (f"net:{SANED_HOST}:test:0", "net-saned"),
    "stillsvc": (f"net:{STILLSVC_HOST}:sim0", "net-stillsvc"),
    "direct": ("test:0", "direct"),
}
SCAN_TIMEOUT = 60.0
START_TIMEOUT = 15.0
PROPERTIES = "org.freedesktop.DBus.Properties"


# -- the namespace ---------------------------------------------------------------------------------


def listening(host: str, port: int) -> bool:
    """Whether a TCP socket of this namespace listens on host:port (/proc/net/tcp)."""
    want = "".join(f"{int(b):02X}" for b in reversed(host.split("."))) + f":{port:04X}"
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        if fields[1] == want and fields[3] == "0A":
            return True
    return False


def wait_listening(host: str, port: int, proc: subprocess.Popen[Any] | None, what: str, log: Path | None = None
                   ) -> None:
    deadline = time.monotonic() + START_TIMEOUT
    while not listening(host, port):
        if proc is not None and proc.poll() is not None:
            tail = log.read_text(errors="replace")[-2000:] if log and log.exists() else ""
            raise RuntimeError(f"{what} exited with {proc.returncode} before listening on {host}:{port}\n{tail}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"{what} is not listening on {host}:{port} after {START_TIMEOUT:g} s")
        time.sleep(0.01)


# -- the configurations ------------------------------------------------------------------------------

def test_backend_conf() -> str:
    """/etc/sane.d/test.conf with geometry_max raised for A4 (the stock 200 mm clamps it)."""
    stock = Path("/etc/sane.d/test.conf")
    lines = stock.read_text().splitlines() if stock.exists() else []
    lines = [line for line in lines if not line.strip().startswith("geometry_max")]
    return "\n".join([*lines, "geometry_max 300.0", ""])


def write_configs(root: Path) -> dict[str, Path]:
    dirs = {name: root / name for name in ("saned", "net-saned", "net-stillsvc", "direct")}
    for d in dirs.values():
        d.mkdir(parents=True)
    for name in ("saned", "direct"):
        (dirs[name] / "dll.conf").write_text("test\n")
        (dirs[name] / "test.conf").write_text(test_backend_conf())
    (dirs["saned"] / "saned.conf").write_text("127.0.0.0/8\n")
    for name, host in (("net-saned", SANED_HOST), ("net-stillsvc", STILLSVC_HOST)):
        (dirs[name] / "dll.conf").write_text("net\n")
        (dirs[name] / "net.conf").write_text(f"connect_timeout = 5\n{host}\n")
    (root / "stillsvc.toml").write_text(
        "[saned]\n"
        f'listen = ["{STILLSVC_HOST}"]\n'
        f"port = {PORT}\n"
        'allow = ["127.0.0.0/8"]\n'
        "start_wait_ms = 120000\n"  # the concurrent clients wait in line for each other
        "max_connections_per_peer = 64\n")
    return dirs


class Servers:
    """saned and stillsvc (on its private bus), started and stopped together."""

    def __init__(self, root: Path, configs: dict[str, Path]) -> None:
        self.root = root
        self.configs = configs
        self.saned: subprocess.Popen[bytes] | None = None
        self.saned_log = root / "saned.log"
        self.bus: DBusDaemon | None = None
        self.daemon: Daemon | None = None

    def start(self) -> None:
        with open(self.saned_log, "wb") as log:
            # -l: standalone, in the foreground; -e: its log to stderr; -d 1: errors only.
            self.saned = subprocess.Popen(["saned", "-l", "-e", "-d", "1", "-b", SANED_HOST, "-p", str(PORT)],
                                          stdout=log, stderr=subprocess.STDOUT,
                                          env={**os.environ, "SANE_CONFIG_DIR": str(self.configs["saned"])})
        wait_listening(SANED_HOST, PORT, self.saned, "saned", self.saned_log)
        self.bus = DBusDaemon()
        # The daemon at its default log level (the helper's default is debug), as roundtrip.py does.
        self.daemon = Daemon(self.bus.address, "--log-level", "info", "--config", str(self.root / "stillsvc.toml"),
                             workdir=str(self.root / "stillsvc"))
        try:
            asyncio.run(asyncio.wait_for(self.daemon.ready(), START_TIMEOUT))
            wait_listening(STILLSVC_HOST, PORT, self.daemon.proc, "stillsvc", self.daemon.log_path)
        except Exception:
            sys.stderr.write(self.daemon.log[-4000:])
            raise

    def health(self) -> dict[str, Any]:
        """Whether both servers are still running, and what went wrong in their logs."""
        log = self.daemon.log if self.daemon else ""
        saned_log = self.saned_log.read_text(errors="replace") if self.saned_log.exists() else ""
        return {
            "stillsvc_running": bool(self.daemon and self.daemon.proc and self.daemon.proc.poll() is None),
            "stillsvc_tracebacks": log.count("Traceback"),
            "stillsvc_errors": [line for line in log.splitlines() if "level='error'" in line
                                or "level=error" in line][:5],
            "saned_running": bool(self.saned and self.saned.poll() is None),
            "saned_log": [line for line in saned_log.splitlines() if "avahi" not in line][:5],
        }

    def stop(self) -> None:
        if self.daemon is not None:
            self.daemon.stop()
        if self.bus is not None:
            self.bus.stop()
        if self.saned is not None:
            stop_tree(self.saned)


def children(pid: int) -> list[int]:
    try:
        return [int(p) for p in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except (FileNotFoundError, ProcessLookupError):
        return []


def stop_tree(proc: subprocess.Popen[Any]) -> None:
    """Stop a process we started and the children it forked (saned forks one per client)."""
    kids = children(proc.pid)
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    for kid in kids:
        try:
            os.kill(kid, signal.SIGTERM)
        except ProcessLookupError:
            pass


# -- one scanimage --------------------------------------------------------------------------------

@dataclass
class Scan:
    kind: str
    pid: int | None = None
    started: float = 0.0  # perf_counter() just before the process was started
    first_byte: float | None = None
    first_image_byte: float | None = None
    last_image_byte: float | None = None
    exited: float | None = None
    returncode: int | None = None
    received: int = 0
    header: str = ""
    stderr: str = ""
    error: str = ""

    @property
    def ok(self) -> bool:
        return not self.error

    def times(self) -> dict[str, float]:
        """Seconds from the start: first byte, first image byte, page."""
        assert self.first_byte and self.first_image_byte and self.exited
        return {"first_byte": self.first_byte - self.started, "first_image_byte": self.first_image_byte - self.started,
                "page": self.exited - self.started}


def expected_header() -> str:
    return f"P6\n# SANE data follows\n{WIDTH} {HEIGHT}\n255\n"


async def scan(kind: str, configs: dict[str, Path], timeout: float = SCAN_TIMEOUT, result: Scan | None = None
               ) -> Scan:
    """Run one scanimage of the page and time its output as it arrives (into ``result``,
    which has the process's pid as soon as it runs)."""
    device, config = KINDS[kind]
    result = result or Scan(kind)
    argv = ["scanimage", "-d", device, *PAGE]
    if shutil.which("stdbuf"):
        argv = ["stdbuf", "-o0", *argv]
    env = {**os.environ, "SANE_CONFIG_DIR": str(configs[config])}
    result.started = time.perf_counter()
    proc = await asyncio.create_subprocess_exec(*argv, stdout=asyncio.subprocess.PIPE,
                                                stderr=asyncio.subprocess.PIPE, env=env, limit=1 << 20)
    result.pid = proc.pid  # stdbuf execs scanimage: the same process
    assert proc.stdout is not None and proc.stderr is not None
    errors = asyncio.ensure_future(proc.stderr.read())
    head = bytearray()
    header_len: int | None = None
    try:
        async with asyncio.timeout(timeout):
            while chunk := await proc.stdout.read(1 << 20):
                now = time.perf_counter()
                if result.first_byte is None:
                    result.first_byte = now
                result.received += len(chunk)
                if header_len is None:
                    head += chunk[:256]
                    if head.count(b"\n") >= 4:
                        header_len = _header_length(bytes(head))
                        result.header = head[:header_len].decode(errors="replace")
                if header_len is not None:
                    if result.first_image_byte is None and result.received > header_len:
                        result.first_image_byte = now
                    if result.received >= header_len + IMAGE_BYTES and result.last_image_byte is None:
                        result.last_image_byte = now
            result.returncode = await proc.wait()
            result.exited = time.perf_counter()
            result.stderr = (await errors).decode(errors="replace").strip()
    except TimeoutError:
        result.error = f"no whole page within {timeout:g} s ({result.received} bytes)"
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
        errors.cancel()
    if not result.error:
        if result.returncode != 0:
            result.error = f"scanimage exited with {result.returncode}: {result.stderr[-500:]}"
        elif result.header != expected_header():
            result.error = f"header {result.header!r}, expected {expected_header()!r}"
        elif result.received != len(expected_header()) + IMAGE_BYTES:
            result.error = f"{result.received} bytes, expected {len(expected_header()) + IMAGE_BYTES}"
    return result


def _header_length(head: bytes) -> int:
    end = 0
    for _ in range(4):
        end = head.index(b"\n", end) + 1
    return end


# -- the measurements ---------------------------------------------------------------------------------

def median_ms(values: list[float]) -> float:
    return round(statistics.median(values) * 1000, 2)


async def sequential(configs: dict[str, Path], rounds: int, warmup: int) -> dict[str, Any]:
    names = list(KINDS)
    samples: dict[str, list[dict[str, float]]] = {name: [] for name in names}
    failures: list[str] = []
    stderr: dict[str, str] = {}  # what scanimage said on its first scan of each kind
    for r in range(warmup + rounds):
        for kind in block_order(names, r):
            result = await scan(kind, configs)
            stderr.setdefault(kind, result.stderr)
            if not result.ok:
                failures.append(f"{kind}: {result.error}")
                continue
            if r >= warmup:
                samples[kind].append(result.times())
    summary: dict[str, Any] = {}
    for kind, runs in samples.items():
        if not runs:
            continue
        summary[kind] = {key: {"median_ms": median_ms([run[key] for run in runs]),
                               "min_ms": round(min(run[key] for run in runs) * 1000, 2),
                               "max_ms": round(max(run[key] for run in runs) * 1000, 2)}
                         for key in ("first_byte", "first_image_byte", "page")}
        summary[kind]["n"] = len(runs)
    ratios: dict[str, dict[str, float]] = {}
    for other in ("saned", "direct"):
        if "stillsvc" in summary and other in summary:
            ratios[f"stillsvc/{other}"] = {
                key: round(summary["stillsvc"][key]["median_ms"] / summary[other][key]["median_ms"], 3)
                for key in ("first_byte", "first_image_byte", "page")}
    return {"rounds": rounds, "warmup": warmup, "kinds": summary, "ratios": ratios, "failures": failures,
            "scanimage_stderr": stderr}


class DataModeWatch:
    """sim0's data mode as the service reports it (``PropertiesChanged`` of its
    ``DataModeWaiters`` and ``DataModeHolder``, through the client library's change
    stream), each change stamped with the time it arrived."""

    def __init__(self, waiters: int) -> None:
        self.waiters = waiters
        self.holders: list[tuple[float, str]] = []
        self.event = asyncio.Event()

    async def follow(self, changes: Any) -> None:
        async for change in changes:
            if isinstance(change, PropertiesChanged) and change.interface == DEVICE_IFACE:
                now = time.perf_counter()
                if "DataModeWaiters" in change.changed:
                    self.waiters = int(change.changed["DataModeWaiters"])
                if "DataModeHolder" in change.changed:
                    self.holders.append((now, str(change.changed["DataModeHolder"])))
                self.event.set()

    async def until_waiters(self, count: int, scans: list[asyncio.Task[Scan]]) -> None:
        """Until ``count`` sessions wait in line (a scanimage that ends meanwhile is an error)."""
        async with asyncio.timeout(START_TIMEOUT):
            while self.waiters < count:
                ended = [t for t in scans if t.done()]
                if ended:
                    raise RuntimeError(f"a scanimage ended while the others waited: {ended[0].result().error}")
                self.event.clear()
                await self.event.wait()

    async def until_free(self) -> None:
        """Until the last holder has let data mode go (its change may still be on its way)."""
        async with asyncio.timeout(START_TIMEOUT):
            while not self.holders or self.holders[-1][1]:
                self.event.clear()
                await self.event.wait()

    def intervals(self) -> dict[str, tuple[float, float | None]]:
        """Holder -> (granted, let go) as the service reported them."""
        out: dict[str, tuple[float, float | None]] = {}
        for (t, holder), nxt in zip(self.holders, [*self.holders[1:], None]):
            if holder:
                out[holder] = (t, nxt[0] if nxt else None)
        return out


def control_port(pid: int) -> int | None:
    """The local port of a process's TCP connection to stillsvc's SANE port: the
    server names its client ``saned:127.0.0.1:PORT`` after it."""
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = os.readlink(fd)
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    peer = "0100007F:" + f"{PORT:04X}"
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        if fields[2] == peer and fields[3] == "01" and fields[9] in inodes:
            return int(fields[1].split(":")[1], 16)
    return None


async def concurrent(address: str, configs: dict[str, Path], clients: int) -> dict[str, Any]:
    """``clients`` scanimage on sim0 at once, lined up behind a D-Bus data-mode holder."""
    client = await Client(address, timeout=10.0).connect()
    scans: list[asyncio.Task[Scan]] = []
    results = [Scan("stillsvc") for _ in range(clients)]
    names: list[str | None] = [None] * clients
    try:
        device = await client.manager.find_device("sim0")
        async with device.changes() as changes:
            # One property: Client.call, the library's call for what its typed objects
            # do not cover (Device.info() reads them all).
            (waiting,) = await client.call(device.path, PROPERTIES, "Get", "ss", [DEVICE_IFACE, "DataModeWaiters"])
            watch = DataModeWatch(int(waiting))
            follower = asyncio.ensure_future(watch.follow(changes))
            try:
                holder = await client.manager.open_session("sim0", "data")
                try:
                    for i in range(clients):
                        scans.append(asyncio.ensure_future(
                            scan("stillsvc", configs, SCAN_TIMEOUT + clients * 10, results[i])))
                        scans[-1].add_done_callback(lambda _: watch.event.set())  # a client that ends wakes the wait
                        await watch.until_waiters(i + 1, scans)
                        port = control_port(results[i].pid) if results[i].pid else None
                        names[i] = f"saned:{STILLSVC_HOST}:{port}" if port else None
                finally:
                    released = time.perf_counter()
                    await holder.close()
                await asyncio.gather(*scans)
                await watch.until_free()
            finally:
                follower.cancel()
    finally:
        for task in scans:
            task.cancel()
        client.disconnect()
    failures = [f"client {i}: {r.error}" for i, r in enumerate(results) if not r.ok]
    held = watch.intervals()
    grants = [held.get(name)[0] if name in held else None for name in names]
    granted_order = sorted(range(clients), key=lambda i: grants[i] if grants[i] is not None else float("inf"))
    early = [i for i in range(clients) if grants[i] is None or (results[i].first_image_byte or 0) < grants[i]]
    # What the clients saw: from each one's first image byte to its last.
    seen = sorted(range(clients), key=lambda i: results[i].first_image_byte or float("inf"))
    overlaps, gaps, drained = [], [], []
    for a, b in itertools.pairwise(seen):
        end, start = results[a].last_image_byte, results[b].first_image_byte
        if end is not None and start is not None:
            gaps.append(start - end)
            if start < end:
                overlaps.append(round((end - start) * 1000, 3))
    for i, name in enumerate(names):
        if name in held and held[name][1] is not None and results[i].last_image_byte is not None:
            drained.append(results[i].last_image_byte - held[name][1])
    ok = [r for r in results if r.ok and r.exited]
    last_exit = max((r.exited for r in ok), default=None)
    return {
        "clients": clients,
        "succeeded": len(ok),
        "failures": failures,
        "granted_order": granted_order,
        "in_order": granted_order == list(range(clients)) and None not in grants,
        "data_before_grant": early,
        "seen_order": seen,
        "client_overlaps_ms": overlaps,
        "handover_gap_ms": {"median": round(statistics.median(gaps) * 1000, 2), "min": round(min(gaps) * 1000, 2),
                            "max": round(max(gaps) * 1000, 2)} if gaps else {},
        "read_after_release_ms": {"median": round(statistics.median(drained) * 1000, 2),
                                  "max": round(max(drained) * 1000, 2)} if drained else {},
        "all_pages_s": round(last_exit - released, 3) if last_exit else None,
        "per_page_ms": round((last_exit - released) / len(ok) * 1000, 2) if last_exit else None,
        "timeline_ms": [{"client": i, "name": names[i], "started": _ms_after(results[i].started, released),
                         "granted": _ms_after(grants[i], released),
                         "let_go": _ms_after(held[names[i]][1] if names[i] in held else None, released),
                         "first_image_byte": _ms_after(results[i].first_image_byte, released),
                         "last_image_byte": _ms_after(results[i].last_image_byte, released),
                         "exited": _ms_after(results[i].exited, released)} for i in range(clients)],
    }


def _ms_after(t: float | None, origin: float) -> float | None:
    return None if t is None else round((t - origin) * 1000, 1)


# -- the run --------------------------------------------------------------------------------------

NOTE = ("stillsvc serves the simulator (sim0) while saned serves SANE's test backend (test:0): the SANE bridge "
        "has not landed, so the two servers do not read the same device")


def run(args: argparse.Namespace) -> dict[str, Any]:
    for tool in ("saned", "scanimage", "dbus-daemon"):
        if shutil.which(tool) is None:
            sys.exit(f"saned bench: {tool} is required (sane-utils, dbus-daemon)")
    root = Path(tempfile.mkdtemp(prefix="stillsvc-bench-saned-"))
    servers = Servers(root, write_configs(root))
    try:
        servers.start()
        result: dict[str, Any] = {
            "python": platform.python_version(), "machine": platform.machine(), "cpus": os.cpu_count(),
            "note": NOTE, "page": {"args": PAGE, "width": WIDTH, "height": HEIGHT, "image_bytes": IMAGE_BYTES},
            "stdbuf": bool(shutil.which("stdbuf")),
        }
        result["sequential"] = asyncio.run(sequential(servers.configs, args.rounds, args.warmup))
        if args.clients > 0:
            assert servers.bus is not None
            result["concurrent"] = asyncio.run(concurrent(servers.bus.address, servers.configs, args.clients))
        result["health"] = servers.health()
        return result
    finally:
        servers.stop()
        shutil.rmtree(root, ignore_errors=True)


def report(result: dict[str, Any]) -> None:
    seq = result["sequential"]
    print(f"Note: {result['note']}.")
    print(f"Page: scanimage {' '.join(result['page']['args'])} ({result['page']['width']} x "
          f"{result['page']['height']}, {result['page']['image_bytes']:,} bytes); median of {seq['rounds']} "
          f"(after {seq['warmup']} untimed), ms from starting scanimage")
    rows = []
    for kind, label in (("saned", "saned (test:0)"), ("stillsvc", "stillsvc (sim0)"), ("direct", "direct test:0")):
        s = seq["kinds"].get(kind)
        if s:
            rows.append([label, f"{s['first_byte']['median_ms']:.1f}", f"{s['first_image_byte']['median_ms']:.1f}",
                         f"{s['page']['median_ms']:.1f}", f"{s['page']['min_ms']:.1f}", f"{s['page']['max_ms']:.1f}"])
    table(["", "first byte", "first image byte", "page", "page min", "page max"], rows)
    for name, r in seq["ratios"].items():
        print(f"{name}: first byte x{r['first_byte']:.2f}, first image byte x{r['first_image_byte']:.2f}, "
              f"page x{r['page']:.2f}")
    if "stillsvc/saned" in seq["ratios"]:
        r = seq["ratios"]["stillsvc/saned"]
        met = r["first_byte"] <= 1 and r["page"] <= 1
        print(f"target stillsvc <= saned (first byte and page): {'met' if met else 'not met'}")
    for failure in seq["failures"]:
        print(f"FAILED: {failure}")
    if "concurrent" in result:
        c = result["concurrent"]
        order = "in the order they asked" if c["in_order"] else f"OUT OF ORDER {c['granted_order']}"
        print(f"{c['clients']} concurrent scanimage on sim0 through stillsvc: {c['succeeded']} succeeded; data mode "
              f"granted {order}, one at a time (DataModeHolder)"
              + (f"; DATA BEFORE THE GRANT for {c['data_before_grant']}" if c["data_before_grant"] else ""))
        if c["all_pages_s"] is not None:
            gap, drained = c["handover_gap_ms"], c["read_after_release_ms"]
            print(f"  all pages {c['all_pages_s']:.3f} s after the D-Bus holder let go ({c['per_page_ms']:.1f} ms "
                  f"a page); client side, last image byte to the next one's first: median {gap.get('median')} ms, "
                  f"min {gap.get('min')}, max {gap.get('max')}")
            print(f"  a client's last image byte, from the service letting data mode go (its DataModeHolder "
                  f"change arriving here): median {drained.get('median')} ms, max {drained.get('max')} ms "
                  f"(positive: the client still read the end of the page from the socket buffers)")
            if c["client_overlaps_ms"]:
                print(f"  client-side reading intervals overlapped (ms): {c['client_overlaps_ms']}")
            else:
                print("  client-side reading intervals did not overlap")
        for failure in c["failures"]:
            print(f"  FAILED: {failure}")
    h = result["health"]
    print(f"stillsvc {'running' if h['stillsvc_running'] else 'NOT RUNNING'}, {h['stillsvc_tracebacks']} tracebacks "
          f"in its log; saned {'running' if h['saned_running'] else 'NOT RUNNING'}")
    for line in h["stillsvc_errors"] + h["saned_log"]:
        print(f"  log: {line}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=10, help="timed scans of each kind (default 10)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed rounds first (default 1)")
    parser.add_argument("--clients", type=int, default=8, help="concurrent scanimage on sim0 (default 8; 0: skip)")
    parser.add_argument("--budget", type=float, default=900.0, help="seconds the whole run may take (default 900)")
    parser.add_argument("--json", action="store_true", help="one JSON document")
    args = parser.parse_args()
    if os.environ.get(IN_NAMESPACE) != "1":
        sys.exit(reexec_in_namespace(__file__, IN_NAMESPACE, args.budget))
    result = run(args)
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        report(result)
    c = result.get("concurrent", {})
    failed = result["sequential"]["failures"] or c.get("failures") or c.get("data_before_grant") or \
        (c and not c["in_order"]) or result["health"]["stillsvc_tracebacks"] or not result["health"]["stillsvc_running"]
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
