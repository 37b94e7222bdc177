#!/usr/bin/env python3
"""The SANE bridge: a page of libsane's ``test`` backend through stillsvc against
scanimage, the daemon's event loop during it, the idle cost of button polling, and
the time from a button press to the launched application.

    python3 bench/sane.py [--repeat N] [--warmup W] [--lag-repeat L] [--idle S] [--presses P]
                          [--pipe-size BYTES] [--json]

Every SANE program (the daemon and its SANE worker processes, scanimage, the
ctypes baseline) gets ``tests/sane_backend.py``'s ``TestBackendConfig``: a private
``SANE_CONFIG_DIR`` with only the ``test`` backend and ``geometry_max 300``. The
daemon runs on a private ``dbus-daemon`` (``tests/helpers.py``) as
``stillsvc --sane --log-level info --config X`` with ``[service] poll_interval_ms
= 200``, so it bridges ``sane-test:0`` and ``sane-test:1`` (and serves ``sim0``,
idle). Its environment names a simulated sensor file
(``STILLSVC_SANE_FAKE_SENSORS``, ``{"scan": false}``): each device then has a
``scan`` sensor, so the bridge polls it every 200 ms while nobody uses it.

1. **Throughput.** One A4 300 dpi colour page of ``test:0`` (2480 x 3507,
   26,092,080 bytes of image), in rounds whose order rotates (roundtrip.py's
   ``block_order``), ``--repeat`` timed rounds (10) after ``--warmup`` (1):

   * ``stillsvc raw`` / ``stillsvc pnm``: through the client library, a ``data``
     session on sane-test:0, its ``Root/Flatbed`` item written (mode color,
     resolution 300, width 2480, height 3507, x_offset 0, y_offset 0) and
     ``Item.Transfer(fd, FORMAT)`` into a fresh pipe that a thread here reads to
     end of file (``os.read`` of 1 MiB). Timed from the Transfer call to the last
     byte read (*transfer*), and from ``open_session`` to the session closed
     (*with session*: open, find the item, write its properties, transfer, close);
   * ``scanimage > /dev/null`` (**the baseline**): ``scanimage -d test:0 --mode
     Color --resolution 300 -x 210 -y 297 --format=pnm``, the whole process timed,
     its output to ``/dev/null``;
   * ``scanimage | reader``: the same, its output into a pipe read here to end of
     file, like stillsvc's (the same sink for both);
   * ``ctypes libsane``: a small Python ctypes program (``python3 -I -S -c``) that
     does what scanimage does (init, open, set the four options, start, read in
     1 MiB reads to EOF, close, exit), no output. Timed as a whole process, and
     inside it (sane_init to sane_exit; sane_start to EOF), which separates the
     process start-up from libsane's own work;
   * ``bridge worker alone``: the bridge's own worker process
     (``stillsvc.driver.sane.SaneProcess``, the class the daemon uses) driven from
     this process, its blocks dropped as they come: libsane plus the worker and
     its pipe, without the daemon's core, encoder and the client's pipe.

   The ratio is throughput stillsvc / scanimage, in bytes of image a second (the
   bridge places the scan area's edges on the backend's steps, outwards, so its
   page may be a little larger than asked: with the test backend's whole-mm steps
   width 2480 gives 2492; the script says so when it happens): 1 means as fast,
   more is faster. Target >= 0.9.

2. **The event loop during the transfer.** The daemon has no loop-lag probe, so
   a second process (this script with ``--probe``) with its own bus connection
   sends, one at a time, a cheap call every 1 ms, alternating
   ``org.freedesktop.DBus.Peer.Ping`` (answered by dbus-fast on the daemon's event
   loop, no service code) and ``Properties.Get(Manager.Version)`` (a service
   handler), and records each round trip. A reply can only go out when the
   daemon's loop runs, so a round trip well above the idle one is the loop (or
   the process) held up. Windows, in rotating order, ``--lag-repeat`` rounds (15):
   *idle* (300 ms, the daemon polling its sensors: **the baseline**), *idle, no
   sensors* (300 ms, the same probe on the second daemon of part 3, which does not
   poll: what polling itself does to the loop), *raw* and *pnm* (from the
   Transfer call to the last byte; these rounds are separate from the throughput
   rounds, so the probe does not slow those), and *scanimage* (the daemon idle
   while scanimage runs: CPU contention with no work in the daemon, a control)
   and *worker* (the daemon idle while this process drives the bridge's worker
   alone, as in part 1: the worker's and libsane's share of the contention, a
   second control). Figures: p50, p99 and max of each window kind, and each as a ratio
   to the idle Ping's; the *worst loop delay* is a window's max round trip minus
   the idle Ping's p50. Target <= 5 ms. Caveats: on a small machine the round
   trip also grows with CPU contention (the worker, the daemon's device thread,
   this reader, the bus daemon and the probe share the CPUs), which is what the
   scanimage control shows; and a single max is at the mercy of the machine's
   other load, so read it next to the idle windows' max.

3. **Idle CPU of button polling.** Two daemons side by side, each on its own bus,
   over the same ``--idle`` seconds (10) with no client: the one with the sensor
   file (polling both SANE devices every 200 ms) and the same daemon without it
   (no sensors, no polling: the baseline). CPU time is utime + stime from
   ``/proc/PID/stat`` of the daemon and of its SANE worker processes (its
   children whose command line holds ``stillsvc.driver.sane.worker``), as % of
   one core; the per-second spread from ``/proc/PID/task/*/schedstat`` (ns of
   run time, finer than stat's 10 ms ticks). Target < 1 %. This runs first; the
   daemon without sensors then idles on (without polling it costs nothing) until
   part 2 has probed it, and is stopped.

4. **Button to launch.** A system-wide application for ``scan-button`` on
   ``id:sane-test:0`` (``Manager.RegisterLaunchApplication``, ``system``: run as
   ``nobody``) whose command is ``sh -c 'date +%s.%N > "$0"' DIR/%n``, DIR a
   0o777 temporary folder. Each of ``--presses`` (20) presses flips the sensor
   file to ``{"scan": true}`` (an atomic rename) at a random point of the poll
   cycle and waits for the command's time stamp; then flips it back and waits
   2.5 poll intervals. Figures from the flip: to the daemon's ``application
   started`` log line (its own time stamp, taken once the spawn has returned to
   the event loop, so it may come after the command's own ``date``) and to the
   command's ``date`` (all wall clock); expected about half an interval plus the
   launch.

Every wait has a deadline, and everything started is stopped at the end.
"""

from __future__ import annotations

import argparse
import array
import asyncio
import bisect
import json
import os
import random
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from datetime import datetime
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
for _p in (REPO, REPO / "tests", REPO / "bench"):
    if str(_p) not in sys.path:
        sys.path.insert(0, str(_p))

from dbus_fast import Message, MessageType  # noqa: E402
from helpers import Daemon, DBusDaemon, connect  # noqa: E402
from roundtrip import block_order, machine, percentile, table  # noqa: E402
from sane_backend import TestBackendConfig, test_backend_unavailable_reason  # noqa: E402
from transfer import Reader, make_pipe  # noqa: E402

from stillsvc.client import Client, Item, Session  # noqa: E402
from stillsvc.common.names import BUS_NAME, MANAGER_IFACE, ROOT_PATH  # noqa: E402
from stillsvc.driver.sane import SaneProcess  # noqa: E402

DEVICE = "sane-test:0"
DEVICES = ("sane-test:0", "sane-test:1")
POLL_MS = 200
PAGE_SETTINGS = {"mode": "color", "resolution": 300, "width": 2480, "height": 3507, "x_offset": 0, "y_offset": 0}
WIDTH, HEIGHT = 2480, 3507
IMAGE_BYTES = WIDTH * HEIGHT * 3  # 26,092,080
SCANIMAGE = ["scanimage", "-d", "test:0", "--mode", "Color", "--resolution", "300", "-x", "210", "-y", "297",
             "--format=pnm"]
FORMATS = ("raw", "pnm")
READ_SIZE = 1 << 20
TARGET_RATIO = 0.9
TARGET_LAG_MS = 5.0
TARGET_IDLE_PCT = 1.0
IDLE_WINDOW_S = 0.3  # one idle window of the loop probe
START_TIMEOUT = 30.0
SCAN_TIMEOUT = 60.0
SCANIMAGE_TIMEOUT = 20.0  # scanimage takes 10 - 30 ms; one that hangs is killed and reported
LAUNCH_TIMEOUT = 5.0
APP_NAME = "bench-sane-launch"
PROPERTIES = "org.freedesktop.DBus.Properties"
PROBE_PING, PROBE_GET = 0, 1
MB = 1e6

clock = time.monotonic  # CLOCK_MONOTONIC: the same clock in the probe process


# -- reading a pipe to its end --------------------------------------------------------------------

# -- stillsvc's page ----------------------------------------------------------------------------------

async def flatbed(session: Session) -> Item:
    root = await session.root()
    for child in await root.children():
        if child.path.endswith("/Flatbed"):
            return child
    raise RuntimeError(f"{session.device_id} has no Root/Flatbed item")


async def stillsvc_page(client: Client, fmt: str, pipe_size: int | None) -> dict[str, float]:
    """One page through a fresh data session; times in seconds."""
    t_open = clock()
    session = await client.manager.open_session(DEVICE, "data")
    try:
        item = await flatbed(session)
        await item.write(PAGE_SETTINGS)
        r, w = make_pipe(pipe_size)
        reader = Reader(r)
        reader.start()
        t_call = clock()
        try:
            summary = await asyncio.wait_for(item.transfer(w, fmt), SCAN_TIMEOUT)
            t_reply = clock()
        finally:
            os.close(w)  # the service has closed its copy by the time it replies
            await asyncio.get_running_loop().run_in_executor(None, reader.join, SCAN_TIMEOUT)
            if not reader.is_alive():
                os.close(r)
    finally:
        await session.close()
    t_closed = clock()
    if reader.error is not None:
        raise reader.error
    if reader.t_eof is None:
        raise RuntimeError("the pipe did not reach end of file")
    if reader.bytes != summary.bytes:
        raise RuntimeError(f"read {reader.bytes} bytes, the service reports {summary.bytes}")
    # The page the bridge scans for the properties asked (it may cover a little more
    # than asked: it places the scan area's edges on the backend's steps, outwards).
    image = summary.width * summary.height * 3
    near = abs(summary.width - WIDTH) <= WIDTH // 50 and abs(summary.height - HEIGHT) <= HEIGHT // 50
    if summary.mode != "color" or not near:
        raise RuntimeError(f"the page is {summary.width}x{summary.height} {summary.mode}, "
                           f"not about {WIDTH}x{HEIGHT} color")
    magic = b"STIL" if fmt == "raw" else b"P6"
    if not reader.head.startswith(magic) or not image <= reader.bytes < image + 4096:
        raise RuntimeError(f"{fmt}: {reader.bytes} bytes starting {reader.head[:8]!r} for {image} bytes of image")
    return {"width": summary.width, "height": summary.height, "image_bytes": image,
            "transfer": reader.t_eof - t_call, "first_byte": (reader.t_first or reader.t_eof) - t_call,
            "reply": t_reply - t_call, "setup": t_call - t_open, "session": t_closed - t_open,
            "bytes": reader.bytes, "t_call": t_call, "t_eof": reader.t_eof}


# -- the baselines ------------------------------------------------------------------------------------

def children(pid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1]) == pid:
                found.append(int(entry.name))
        except (OSError, ValueError, IndexError):
            continue
    return found


def where_stuck(pid: int) -> str:
    """What a process and its children wait in (``/proc``: each thread's wchan), for a report."""
    parts = []
    try:
        for task in sorted(Path(f"/proc/{pid}/task").iterdir()):
            parts.append(f"thread {task.name}: {(task / 'wchan').read_text() or '-'}")
        for child in children(pid):
            entry = Path(f"/proc/{child}")
            cmd = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
            parts.append(f"child {child} ({cmd[:60]}): {(entry / 'wchan').read_text() or '-'}")
    except (OSError, ValueError, IndexError):
        pass
    return "; ".join(parts) or "gone"


def scanimage_page(env: dict[str, str], into_pipe: bool) -> dict[str, float]:
    """scanimage's whole process (blocking: nothing else runs here meanwhile). One
    that has not ended after SCANIMAGE_TIMEOUT is killed, and where it waited is told."""
    t0 = clock()
    p = subprocess.Popen(SCANIMAGE, stdout=subprocess.PIPE if into_pipe else subprocess.DEVNULL,
                         stderr=subprocess.PIPE, env=env)
    stuck: list[str] = []

    def kill() -> None:
        stuck.append(where_stuck(p.pid))
        for child in children(p.pid):  # a backend's reader process would keep the pipes open
            try:
                os.kill(child, signal.SIGKILL)
            except OSError:
                pass
        p.kill()

    watchdog = threading.Timer(SCANIMAGE_TIMEOUT, kill)
    watchdog.daemon = True
    watchdog.start()
    head, n = b"", 0
    try:
        if into_pipe:
            assert p.stdout is not None
            fd = p.stdout.fileno()
            head = os.read(fd, READ_SIZE)
            n = len(head)
            while data := os.read(fd, READ_SIZE):
                n += len(data)
        assert p.stderr is not None
        err = p.stderr.read()
        code = p.wait()
        t1 = clock()
    finally:
        watchdog.cancel()
        for pipe in (p.stdout, p.stderr):
            if pipe is not None:
                pipe.close()
    if stuck:
        raise RuntimeError(f"scanimage had not ended after {SCANIMAGE_TIMEOUT:g} s and was killed; it waited in: "
                           f"{stuck[0]}")
    if code != 0:
        raise RuntimeError(f"scanimage exited with {code}: {err.decode(errors='replace').strip()}")
    if into_pipe and (not head.startswith(b"P6") or n < IMAGE_BYTES):
        raise RuntimeError(f"scanimage wrote {n} bytes starting {head[:8]!r}")
    return {"page": t1 - t0, "bytes": n, "t_start": t0, "t_end": t1}


#: libsane through ctypes in a fresh interpreter, doing what scanimage does, no output.
CTYPES_SCAN = r'''
import ctypes, json, sys, time
t0 = time.monotonic()
lib = ctypes.CDLL("libsane.so.1")
W = ctypes.c_int
class D(ctypes.Structure):
    _fields_ = [("name", ctypes.c_char_p), ("title", ctypes.c_char_p), ("desc", ctypes.c_char_p),
                ("type", ctypes.c_int), ("unit", ctypes.c_int), ("size", W), ("cap", W),
                ("constraint_type", ctypes.c_int), ("constraint", ctypes.c_void_p)]
class P(ctypes.Structure):
    _fields_ = [("format", ctypes.c_int), ("last_frame", W), ("bytes_per_line", W),
                ("pixels_per_line", W), ("lines", W), ("depth", W)]
lib.sane_init.argtypes = [ctypes.POINTER(W), ctypes.c_void_p]
lib.sane_open.argtypes = [ctypes.c_char_p, ctypes.POINTER(ctypes.c_void_p)]
lib.sane_get_option_descriptor.argtypes = [ctypes.c_void_p, W]
lib.sane_get_option_descriptor.restype = ctypes.POINTER(D)
lib.sane_control_option.argtypes = [ctypes.c_void_p, W, ctypes.c_int, ctypes.c_void_p, ctypes.POINTER(W)]
lib.sane_get_parameters.argtypes = [ctypes.c_void_p, ctypes.POINTER(P)]
lib.sane_start.argtypes = [ctypes.c_void_p]
lib.sane_read.argtypes = [ctypes.c_void_p, ctypes.c_void_p, W, ctypes.POINTER(W)]
for f in ("sane_cancel", "sane_close"):
    getattr(lib, f).argtypes = [ctypes.c_void_p]
    getattr(lib, f).restype = None
lib.sane_exit.restype = None
def check(call, status):
    if status:
        sys.exit(f"{call}: SANE status {status}")
t_loaded = time.monotonic()
check("sane_init", lib.sane_init(ctypes.byref(W()), None))
h = ctypes.c_void_p()
check("sane_open", lib.sane_open(b"test:0", ctypes.byref(h)))
t_open = time.monotonic()
def describe():
    lib.sane_get_option_descriptor(h, 0)
    count = W()
    check("get count", lib.sane_control_option(h, 0, 0, ctypes.byref(count), None))
    found = {}
    for i in range(1, count.value):
        d = lib.sane_get_option_descriptor(h, i)
        if d and d.contents.name:
            found[d.contents.name.decode()] = (i, d.contents.type, d.contents.size)
    return found
options = describe()
for name, value in (("mode", "Color"), ("resolution", 300), ("br-x", 210.0), ("br-y", 297.0)):
    index, kind, size = options[name]
    if kind == 3:
        buf = ctypes.create_string_buffer(value.encode(), max(size, len(value) + 1))
    else:
        buf = W(int(round(value * 65536)) if kind == 2 else int(value))
    info = W()
    check("set " + name, lib.sane_control_option(h, index, 1, ctypes.byref(buf), ctypes.byref(info)))
    if info.value & 2:
        options = describe()
t_set = time.monotonic()
check("sane_start", lib.sane_start(h))
p = P()
check("sane_get_parameters", lib.sane_get_parameters(h, ctypes.byref(p)))
size = 1 << 20
buf = ctypes.create_string_buffer(size)
n = W()
total = 0
while True:
    status = lib.sane_read(h, buf, size, ctypes.byref(n))
    if status:
        break
    total += n.value
t_eof = time.monotonic()
lib.sane_cancel(h)
lib.sane_close(h)
lib.sane_exit()
t_end = time.monotonic()
print(json.dumps({"status": status, "bytes": total, "width": p.pixels_per_line, "lines": p.lines,
                  "load": t_loaded - t0, "open": t_open - t_loaded, "options": t_set - t_open,
                  "start_to_eof": t_eof - t_set, "in_process": t_end - t0}))
'''


def ctypes_page(env: dict[str, str]) -> dict[str, float]:
    t0 = clock()
    try:
        proc = subprocess.run([sys.executable, "-I", "-S", "-c", CTYPES_SCAN], capture_output=True, env=env,
                              check=False, timeout=SCANIMAGE_TIMEOUT)
    except subprocess.TimeoutExpired:
        raise RuntimeError(f"the ctypes scan had not ended after {SCANIMAGE_TIMEOUT:g} s") from None
    t1 = clock()
    if proc.returncode != 0:
        raise RuntimeError(f"the ctypes scan exited with {proc.returncode}: {proc.stderr.decode(errors='replace')}")
    out = json.loads(proc.stdout)
    if out["status"] != 5 or out["bytes"] != IMAGE_BYTES:  # SANE_STATUS_EOF
        raise RuntimeError(f"the ctypes scan read {out['bytes']} bytes, ended with status {out['status']}")
    return {"page": t1 - t0, "in_process": out["in_process"], "start_to_eof": out["start_to_eof"],
            "startup": t1 - t0 - out["in_process"], "t_start": t0, "t_end": t1}


class BridgeWorker:
    """The bridge's own worker process (:class:`SaneProcess`) driven from this process
    the way the daemon's device thread drives it, with no daemon: what libsane, the
    worker and its pipe cost before stillsvc's core, encoder and the client's pipe."""

    def __init__(self, env: dict[str, str]) -> None:
        self.process = SaneProcess("test:0", env=env)
        self.index = self._indices(self.process.open())
        for name, value in (("mode", "Color"), ("resolution", 300), ("br-x", 210.0), ("br-y", 297.0)):
            reply = self.process.set(self.index[name], value)
            if "options" in reply:  # setting mode reloads the options
                self.index = self._indices(reply["options"])

    @staticmethod
    def _indices(options: list[dict[str, Any]]) -> dict[str, int]:
        return {o["name"]: o["index"] for o in options if o.get("name")}

    def page(self) -> dict[str, float]:
        """One page, its blocks dropped as they come (blocking)."""
        t0 = clock()
        n = 0
        for block in self.process.scan(threading.Event()):
            if isinstance(block, (bytes, bytearray)):
                n += len(block)
        t1 = clock()
        self.process.finish()
        if n != IMAGE_BYTES:
            raise RuntimeError(f"the bridge's worker sent {n} bytes")
        return {"page": t1 - t0}

    def stop(self) -> None:
        self.process.stop()


# -- the loop probe (a process of its own) -------------------------------------------------------------

async def probe_main(address: str, out: str) -> None:
    """Ping and Get(Manager.Version), alternating, one every 1 ms while switched on
    (stdin: ``on``, ``off``; end of input or ``quit`` ends it). Writes (kind, send
    time ns, round trip ns) triples into ``out``."""
    bus = await connect(address)
    loop = asyncio.get_running_loop()
    state = {"on": False, "quit": False}
    wake = asyncio.Event()

    def apply(command: str) -> None:
        if command == "on":
            state["on"] = True
        elif command == "off":
            state["on"] = False
        elif command == "quit":
            state["quit"] = True
        wake.set()

    def commands() -> None:
        for line in sys.stdin:
            loop.call_soon_threadsafe(apply, line.strip())
        loop.call_soon_threadsafe(apply, "quit")

    threading.Thread(target=commands, daemon=True).start()
    samples = array.array("q")
    sent = 0
    next_at = 0
    print("ready", flush=True)
    while not state["quit"]:
        if not state["on"]:
            wake.clear()
            await wake.wait()
            continue
        now = time.monotonic_ns()
        if now < next_at:
            await asyncio.sleep((next_at - now) / 1e9)
            continue
        kind = sent % 2
        if kind == PROBE_PING:
            msg = Message(destination=BUS_NAME, path=ROOT_PATH, interface="org.freedesktop.DBus.Peer", member="Ping")
        else:
            msg = Message(destination=BUS_NAME, path=ROOT_PATH, interface=PROPERTIES, member="Get",
                          signature="ss", body=[MANAGER_IFACE, "Version"])
        t0 = time.monotonic_ns()
        reply = await asyncio.wait_for(bus.call(msg), 10.0)
        t1 = time.monotonic_ns()
        if reply is None or reply.message_type is not MessageType.METHOD_RETURN:
            raise RuntimeError(f"probe call failed: {reply.body if reply else None}")
        samples.extend((kind, t0, t1 - t0))
        sent += 1
        next_at = t0 + 1_000_000
    with open(out, "wb") as f:
        samples.tofile(f)
    bus.disconnect()
    print(f"done {sent}", flush=True)


class Probe:
    """The probe process, switched on and off around the windows it measures."""

    def __init__(self, address: str, out: Path) -> None:
        self.out = out
        self.proc = subprocess.Popen([sys.executable, str(Path(__file__).resolve()), "--probe", address, str(out)],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline().strip()
        if line != "ready":
            raise RuntimeError(f"the probe did not start ({line!r})")
        self.windows: list[tuple[str, float, float]] = []

    def _send(self, command: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(command + "\n")
        self.proc.stdin.flush()

    async def on(self) -> None:
        self._send("on")
        await asyncio.sleep(0.03)  # its first calls are out before the window starts

    def off(self) -> None:
        self._send("off")

    def samples(self) -> list[tuple[int, float, float]]:
        """Stop the probe; (kind, send time s, round trip ms) of every call."""
        self._send("quit")
        self.proc.wait(30)
        data = array.array("q")
        with open(self.out, "rb") as f:
            data.frombytes(f.read())
        return [(data[i], data[i + 1] / 1e9, data[i + 2] / 1e6) for i in range(0, len(data), 3)]

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


def lag_figures(samples: list[tuple[int, float, float]],
                windows: list[tuple[str, float, float]]) -> dict[str, dict[str, Any]]:
    """Round trips of calls sent inside each kind of window, per probe call kind."""
    found: dict[str, dict[int, list[float]]] = {}
    spans: dict[str, float] = {}
    samples = sorted(samples, key=lambda s: s[1])
    starts = [s[1] for s in samples]
    for name, t0, t1 in windows:
        spans[name] = spans.get(name, 0.0) + (t1 - t0)
        bucket = found.setdefault(name, {PROBE_PING: [], PROBE_GET: []})
        for kind, _, rtt in samples[bisect.bisect_left(starts, t0):bisect.bisect_right(starts, t1)]:
            bucket[kind].append(rtt)
    out: dict[str, dict[str, Any]] = {}
    for name, bucket in found.items():
        out[name] = {"window_s": round(spans[name], 3)}
        for kind, label in ((PROBE_PING, "ping"), (PROBE_GET, "get")):
            values = sorted(bucket[kind])
            if values:
                out[name][label] = {"n": len(values), "p50_ms": percentile(values, 50),
                                    "p99_ms": percentile(values, 99), "max_ms": values[-1]}
    return out


# -- CPU time ------------------------------------------------------------------------------------------

TICK = os.sysconf("SC_CLK_TCK")


def stat_cpu(pid: int) -> float:
    """utime + stime of a process (seconds), from /proc/PID/stat."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICK


def run_ns(pid: int) -> int:
    """Run time of a process's live threads (ns), from /proc/PID/task/*/schedstat."""
    total = 0
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            total += int((task / "schedstat").read_text().split()[0])
        except (OSError, ValueError, IndexError):
            pass
    return total


def sane_workers(pid: int) -> list[int]:
    """The daemon's children that are SANE worker processes."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            if ppid == pid and b"stillsvc.driver.sane.worker" in (entry / "cmdline").read_bytes():
                found.append(int(entry.name))
        except (OSError, ValueError, IndexError):
            continue
    return sorted(found)


async def idle_cpu(daemons: dict[str, Daemon], seconds: float) -> dict[str, Any]:
    """Each daemon's and its workers' CPU over the same ``seconds``, nobody using them."""
    pids: dict[str, dict[str, list[int]]] = {}
    for name, daemon in daemons.items():
        assert daemon.proc is not None
        pids[name] = {"daemon": [daemon.proc.pid], "workers": sane_workers(daemon.proc.pid)}

    def snapshot() -> dict[str, dict[str, tuple[float, int]]]:
        return {name: {part: (sum(stat_cpu(p) for p in group), sum(run_ns(p) for p in group))
                       for part, group in parts.items()} for name, parts in pids.items()}

    first = snapshot()
    t0 = clock()
    seconds_left = max(1, round(seconds))
    windows: dict[str, list[float]] = {name: [] for name in daemons}
    before = first
    for _ in range(seconds_left):
        await asyncio.sleep(1.0)
        now = snapshot()
        for name in daemons:
            ns = sum(now[name][part][1] - before[name][part][1] for part in now[name])
            windows[name].append(ns / 1e9 * 100)  # % of one core over ~1 s
        before = now
    last = before
    elapsed = clock() - t0
    out: dict[str, Any] = {"seconds": round(elapsed, 3)}
    for name, parts in pids.items():
        entry: dict[str, Any] = {"pids": parts, "workers_changed": sane_workers(parts["daemon"][0]) != parts["workers"]}
        total_stat = 0.0
        for part in parts:
            cpu = last[name][part][0] - first[name][part][0]
            run = (last[name][part][1] - first[name][part][1]) / 1e9
            total_stat += cpu
            entry[part] = {"stat_cpu_s": round(cpu, 3), "stat_pct": round(cpu / elapsed * 100, 3),
                           "schedstat_cpu_s": round(run, 4), "schedstat_pct": round(run / elapsed * 100, 3)}
        per_s = sorted(windows[name])
        entry["total_stat_pct"] = round(total_stat / elapsed * 100, 3)
        entry["total_schedstat_pct"] = round(sum(entry[p]["schedstat_cpu_s"] for p in parts) / elapsed * 100, 3)
        entry["per_second_pct"] = {"median": round(statistics.median(per_s), 3), "min": round(per_s[0], 3),
                                   "max": round(per_s[-1], 3), "n": len(per_s)}
        out[name] = entry
    return out


# -- button to launch -------------------------------------------------------------------------------

def write_sensors(path: Path, pressed: bool) -> float:
    """Replace the sensor file atomically; the wall-clock time it changed."""
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({"scan": pressed}))
    os.replace(tmp, path)
    return time.time()


def started_lines(log: str) -> dict[int, float]:
    """sequence -> wall-clock time of the daemon's ``application started`` lines for DEVICE."""
    found = {}
    for line in log.splitlines():
        if "event='application started'" in line and f"device='{DEVICE}'" in line:
            stamp = re.search(r"timestamp='([^']+)'", line)
            seq = re.search(r"\bsequence=(\d+)", line)
            if stamp and seq:
                found[int(seq.group(1))] = datetime.fromisoformat(stamp.group(1)).timestamp()
    return found


async def button_to_launch(client: Client, daemon: Daemon, sensors: Path, presses: int) -> dict[str, Any]:
    folder = Path(tempfile.mkdtemp(prefix="stillsvc-bench-sane-launch-"))
    folder.chmod(0o777)  # the application runs as nobody
    interval = POLL_MS / 1000
    try:
        # "%%" is a literal "%" (any other "%" sequence is refused); "%n": the event's sequence number.
        await client.manager.register_application(
            APP_NAME, ["sh", "-c", 'date +%%s.%%N > "$0"', f"{folder}/%n"], events=["scan-button"],
            devices=[f"id:{DEVICE}"], system=True)
        write_sensors(sensors, False)
        await asyncio.sleep(2.5 * interval)  # the next polls read "not pressed"
        runs: list[dict[str, float]] = []
        failures: list[str] = []
        for _ in range(presses):
            await asyncio.sleep(random.uniform(0, interval))  # anywhere in the poll cycle
            seen = set(os.listdir(folder))
            flipped = write_sensors(sensors, True)
            deadline = clock() + LAUNCH_TIMEOUT
            stamp: tuple[int, float] | None = None
            while stamp is None and clock() < deadline:
                for name in set(os.listdir(folder)) - seen:
                    text = (folder / name).read_text()
                    if text.endswith("\n"):
                        stamp = (int(name), float(text))
                if stamp is None:
                    await asyncio.sleep(0.002)
            write_sensors(sensors, False)
            if stamp is None:
                failures.append(f"no launch within {LAUNCH_TIMEOUT:g} s of the press")
            else:
                runs.append({"sequence": stamp[0], "flip": flipped, "date": stamp[1]})
            await asyncio.sleep(2.5 * interval)
        await asyncio.sleep(0.2)  # the last "application started" line is written
        started = started_lines(daemon.log)
        for run in runs:
            run["to_date_ms"] = (run["date"] - run["flip"]) * 1000
            if run["sequence"] in started:
                run["to_started_ms"] = (started[run["sequence"]] - run["flip"]) * 1000
                run["started_to_date_ms"] = (run["date"] - started[run["sequence"]]) * 1000
        await client.manager.unregister_application(APP_NAME, system=True)

        def stats(key: str) -> dict[str, float] | None:
            values = sorted(r[key] for r in runs if key in r)
            if not values:
                return None
            return {"p50_ms": round(statistics.median(values), 2), "min_ms": round(values[0], 2),
                    "max_ms": round(values[-1], 2), "n": len(values)}

        return {"presses": presses, "launched": len(runs), "failures": failures, "poll_interval_ms": POLL_MS,
                "flip_to_date": stats("to_date_ms"), "flip_to_started": stats("to_started_ms"),
                "started_to_date": stats("started_to_date_ms"),
                "runs_ms": [round(r["to_date_ms"], 2) for r in runs]}
    finally:
        shutil.rmtree(folder, ignore_errors=True)


# -- the run -------------------------------------------------------------------------------------------

def describe_ms(values: list[float]) -> dict[str, float]:
    ms = sorted(v * 1000 for v in values)
    return {"median_ms": round(statistics.median(ms), 2), "min_ms": round(ms[0], 2), "max_ms": round(ms[-1], 2),
            "n": len(ms)}


async def throughput(client: Client, env: dict[str, str], repeat: int, warmup: int,
                     pipe_size: int | None, worker: BridgeWorker) -> dict[str, Any]:
    kinds = ["stillsvc raw", "stillsvc pnm", "scanimage", "scanimage pipe", "ctypes", "worker"]
    runs: dict[str, list[dict[str, float]]] = {k: [] for k in kinds}
    failures: list[str] = []
    for r in range(warmup + repeat):
        for kind in block_order(kinds, r):
            try:
                if kind.startswith("stillsvc"):
                    result = await stillsvc_page(client, kind.split()[1], pipe_size)
                elif kind == "ctypes":
                    result = ctypes_page(env)
                elif kind == "worker":
                    result = worker.page()  # blocking, like the scanimage runs
                else:
                    result = scanimage_page(env, into_pipe=kind == "scanimage pipe")
            except Exception as e:  # told at the end (and the exit status is 1), the other runs go on
                failures.append(f"round {r}, {kind}: {type(e).__name__}: {e}")
                continue
            if r >= warmup:
                runs[kind].append(result)
    for kind, got in runs.items():
        if not got:
            raise RuntimeError(f"no run of {kind} succeeded: {failures}")
    out: dict[str, Any] = {"repeat": repeat, "warmup": warmup, "failures": failures}
    for fmt in FORMATS:
        rs = runs[f"stillsvc {fmt}"]
        out[f"stillsvc {fmt}"] = {key: describe_ms([x[key] for x in rs])
                                  for key in ("transfer", "session", "setup", "first_byte", "reply")}
        out[f"stillsvc {fmt}"]["bytes"] = rs[0]["bytes"]
        out[f"stillsvc {fmt}"]["page"] = {key: rs[0][key] for key in ("width", "height", "image_bytes")}
    out["scanimage"] = {"page": describe_ms([x["page"] for x in runs["scanimage"]])}
    out["scanimage pipe"] = {"page": describe_ms([x["page"] for x in runs["scanimage pipe"]]),
                             "bytes": runs["scanimage pipe"][0]["bytes"]}
    out["ctypes"] = {key: describe_ms([x[key] for x in runs["ctypes"]])
                     for key in ("page", "in_process", "start_to_eof", "startup")}
    out["worker"] = {"page": describe_ms([x["page"] for x in runs["worker"]])}
    base = out["scanimage"]["page"]["median_ms"]
    piped = out["scanimage pipe"]["page"]["median_ms"]
    ratios: dict[str, Any] = {}
    for fmt in FORMATS:
        rs = runs[f"stillsvc {fmt}"]
        # Throughput in bytes of image a second, in case the bridge's page is not scanimage's.
        scale = rs[0]["image_bytes"] / IMAGE_BYTES
        per_round = sorted(scale * b["page"] / a["transfer"] for a, b in zip(rs, runs["scanimage"]))
        s = out[f"stillsvc {fmt}"]
        ratios[fmt] = {"transfer": round(scale * base / s["transfer"]["median_ms"], 3),
                       "transfer_vs_scanimage_pipe": round(scale * piped / s["transfer"]["median_ms"], 3),
                       "session": round(scale * base / s["session"]["median_ms"], 3),
                       "page_time": round(s["transfer"]["median_ms"] / base, 3),
                       "transfer_per_round": {"min": round(per_round[0], 3),
                                              "median": round(statistics.median(per_round), 3),
                                              "max": round(per_round[-1], 3)}}
    out["ratios"] = ratios
    return out


async def loop_lag(client: Client, env: dict[str, str], probe: Probe, quiet: Probe, worker: BridgeWorker,
                   rounds: int, pipe_size: int | None) -> dict[str, Any]:
    """The probe's windows, in rotating order; ``quiet`` probes the daemon without sensors."""
    kinds = ["idle", "idle, no sensors", "raw", "pnm", "scanimage", "worker"]
    windows: dict[Probe, list[tuple[str, float, float]]] = {probe: [], quiet: []}
    failures: list[str] = []
    for r in range(rounds):
        for kind in block_order(kinds, r):
            which = quiet if kind == "idle, no sensors" else probe
            await which.on()
            try:
                if kind.startswith("idle"):
                    t0 = clock()
                    await asyncio.sleep(IDLE_WINDOW_S)
                    windows[which].append((kind, t0, clock()))
                elif kind in ("scanimage", "worker"):
                    # Blocks this process: the probe is a process of its own.
                    t0 = clock()
                    if kind == "scanimage":
                        scanimage_page(env, into_pipe=False)
                    else:
                        worker.page()
                    windows[which].append((kind, t0, clock()))
                else:
                    result = await stillsvc_page(client, kind, pipe_size)
                    windows[which].append((kind, result["t_call"], result["t_eof"]))
            except Exception as e:  # told at the end; the window is left out
                failures.append(f"round {r}, {kind}: {type(e).__name__}: {e}")
            which.off()
            await asyncio.sleep(0.02)
    figures = {**lag_figures(probe.samples(), windows[probe]), **lag_figures(quiet.samples(), windows[quiet])}
    idle = figures["idle"]["ping"]
    for entry in figures.values():
        for label in ("ping", "get"):
            if label in entry:
                e = entry[label]
                e["p50_x_idle_ping"] = round(e["p50_ms"] / idle["p50_ms"], 2)
                e["p99_x_idle_ping"] = round(e["p99_ms"] / idle["p99_ms"], 2)
                e["max_x_idle_ping"] = round(e["max_ms"] / idle["max_ms"], 2)
        entry["worst_delay_ms"] = round(max(entry[label]["max_ms"] for label in ("ping", "get") if label in entry)
                                        - idle["p50_ms"], 3)
    worst = max(figures[k]["worst_delay_ms"] for k in ("raw", "pnm"))
    return {"rounds": rounds, "windows": figures, "failures": failures,
            "target": {"worst_delay_ms": worst, "met": worst <= TARGET_LAG_MS}}


def health(daemon: Daemon) -> dict[str, Any]:
    log = daemon.log
    return {"running": bool(daemon.proc and daemon.proc.poll() is None), "tracebacks": log.count("Traceback"),
            "problems": [line for line in log.splitlines()
                         if "level='error'" in line or "level='warning'" in line][:5]}


async def wait_devices(address: str) -> None:
    client = await Client(address).connect()
    try:
        async with asyncio.timeout(START_TIMEOUT):
            while True:
                found = {d.id: d.state for d in await client.manager.devices()}
                if all(found.get(d) == "ready" for d in DEVICES):
                    return
                await asyncio.sleep(0.1)
    finally:
        client.disconnect()


async def bench(args: argparse.Namespace, root: Path) -> dict[str, Any]:
    sane = TestBackendConfig(root / "sane")
    sensors = root / "sensors.json"
    write_sensors(sensors, False)
    config = root / "stillsvc.toml"
    config.write_text(f"[service]\npoll_interval_ms = {POLL_MS}\n")
    buses: dict[str, DBusDaemon] = {}
    daemons: dict[str, Daemon] = {}
    probes: dict[str, Probe] = {}
    report: dict[str, Any] = {}
    try:
        for name, env in (("polling", sane.daemon_env(sensors)), ("no sensors", sane.daemon_env())):
            buses[name] = DBusDaemon()
            daemons[name] = Daemon(buses[name].address, "--sane", "--log-level", "info", "--config", str(config),
                                   env=env, workdir=str(root / name.replace(" ", "-")))
        for name, daemon in daemons.items():
            try:
                await asyncio.wait_for(daemon.ready(), START_TIMEOUT)
                await wait_devices(buses[name].address)
            except Exception:
                sys.stderr.write(daemon.log[-4000:])
                raise
        await asyncio.sleep(2.0)  # the first polls, the workers settled

        # 3. Idle CPU: both daemons over the same seconds.
        report["idle"] = await idle_cpu(daemons, args.idle)

        address = buses["polling"].address
        client = await Client(address, timeout=30.0).connect()
        try:
            # 1. Throughput (the daemon without sensors idles meanwhile: no polling, no CPU).
            worker = BridgeWorker(sane.env)
            try:
                report["throughput"] = await throughput(client, sane.env, args.repeat, args.warmup, args.pipe_size,
                                                        worker)
                # 2. The event loop during the transfer (and, for comparison, of the daemon without sensors).
                for name in daemons:
                    probes[name] = Probe(buses[name].address, root / f"probe-{name.replace(' ', '-')}.bin")
                report["loop"] = await loop_lag(client, sane.env, probes["polling"], probes["no sensors"], worker,
                                                args.lag_repeat, args.pipe_size)
                probes.clear()
            finally:
                worker.stop()
            report["health_no_sensors"] = health(daemons["no sensors"])
            daemons.pop("no sensors").stop()
            buses.pop("no sensors").stop()
            # 4. Button to launch.
            report["launch"] = await button_to_launch(client, daemons["polling"], sensors, args.presses)
        finally:
            client.disconnect()
        report["health"] = health(daemons["polling"])
        return report
    finally:
        for probe in probes.values():
            probe.stop()
        for daemon in daemons.values():
            daemon.stop()
        for bus in buses.values():
            bus.stop()


# -- output --------------------------------------------------------------------------------------------

def print_report(report: dict[str, Any]) -> None:
    m = report["machine"]
    load = report["load_average"]
    print(f"load average (1 min) {load['start']:.2f} at the start, {load['end']:.2f} at the end")
    print(f"nproc {m['nproc']}, Python {m['python']}, dbus-fast {m['dbus_fast']}; "
          f"stillsvc --sane with [service] poll_interval_ms = {POLL_MS}; pipe buffer "
          f"{report['pipe_size'] or 'default'}")
    t = report["throughput"]
    print(f"\n1. Throughput: test:0, A4 300 dpi colour, scanimage's page {WIDTH} x {HEIGHT}, {IMAGE_BYTES:,} bytes "
          f"of image; {t['repeat']} timed rounds after {t['warmup']}, order rotating; MB = 10^6 bytes of image")
    base_rate = IMAGE_BYTES / t["scanimage"]["page"]["median_ms"]
    rows = []

    def row(label: str, d: dict[str, float], image: int = IMAGE_BYTES) -> None:
        rate = image / d["median_ms"]
        rows.append([label, f"{d['median_ms']:.1f}", f"{d['min_ms']:.1f}", f"{d['max_ms']:.1f}",
                     f"{rate / MB * 1000:.0f}", f"{rate / base_rate:.2f}"])

    for fmt in FORMATS:
        s = t[f"stillsvc {fmt}"]
        row(f"stillsvc {fmt}: Transfer call -> last byte", s["transfer"], s["page"]["image_bytes"])
        row(f"stillsvc {fmt}: with session (open ... close)", s["session"], s["page"]["image_bytes"])
    row("scanimage > /dev/null (baseline), process", t["scanimage"]["page"])
    row("scanimage | reader, process", t["scanimage pipe"]["page"])
    row("ctypes libsane, process", t["ctypes"]["page"])
    row("ctypes libsane, in process (init..exit)", t["ctypes"]["in_process"])
    row("ctypes libsane, sane_start -> EOF", t["ctypes"]["start_to_eof"])
    row("bridge worker alone (SaneProcess.scan here)", t["worker"]["page"])
    table(["", "median ms", "min ms", "max ms", "MB/s", "x scanimage"], rows)
    page = t["stillsvc raw"]["page"]
    if (page["width"], page["height"]) != (WIDTH, HEIGHT):
        print(f"NOTE: for width {WIDTH} and height {HEIGHT} the bridge scanned {page['width']} x {page['height']} "
              f"({page['image_bytes']:,} bytes of image); MB/s and 'x scanimage' count each page's own bytes")
    c = t["ctypes"]["startup"]
    print(f"ctypes process start-up (process minus in-process): median {c['median_ms']:.1f} ms")
    for fmt in FORMATS:
        s = t[f"stillsvc {fmt}"]
        r = t["ratios"][fmt]
        pr = r["transfer_per_round"]
        print(f"stillsvc {fmt}: first byte {s['first_byte']['median_ms']:.2f} ms after the call; session open + "
              f"item + properties {s['setup']['median_ms']:.1f} ms; throughput / scanimage: transfer "
              f"x{r['transfer']:.2f} (per round min {pr['min']:.2f}, median {pr['median']:.2f}, max {pr['max']:.2f}),"
              f" with session x{r['session']:.2f}")
    print("against scanimage | reader (the same kind of sink as stillsvc's): " + ", ".join(
        f"{f} x{t['ratios'][f]['transfer_vs_scanimage_pipe']:.2f}" for f in FORMATS))
    worst = min(t["ratios"][f]["transfer"] for f in FORMATS)
    for f in t["failures"]:
        print(f"FAILED: {f}")
    print(f"Target throughput >= {TARGET_RATIO}x scanimage (Transfer call to last byte, both formats): "
          f"{'met' if worst >= TARGET_RATIO else 'not met'} ({worst:.2f})")

    lag = report["loop"]
    w = lag["windows"]
    print(f"\n2. Daemon event loop: a probe process's round trips, one call every 1 ms alternating Ping and "
          f"Get(Manager.Version); {lag['rounds']} rounds of each window; ratios to the idle Ping")
    rows = []
    for name, label in (("idle", "idle (polling)"), ("idle, no sensors", "idle, other daemon, no sensors"),
                        ("raw", "during raw transfer"), ("pnm", "during pnm transfer"),
                        ("scanimage", "during scanimage (control)"),
                        ("worker", "during bridge worker alone (control)")):
        for kind in ("ping", "get"):
            e = w[name].get(kind)
            if e:
                rows.append([f"{label}: {'Ping' if kind == 'ping' else 'Get(Version)'}", str(e["n"]),
                             f"{e['p50_ms']:.3f}", f"{e['p99_ms']:.3f}", f"{e['max_ms']:.3f}",
                             f"{e['p50_x_idle_ping']:.2f}", f"{e['p99_x_idle_ping']:.2f}",
                             f"{e['max_x_idle_ping']:.2f}"])
    table(["", "n", "p50 ms", "p99 ms", "max ms", "p50 x", "p99 x", "max x"], rows)
    names = ("idle", "idle, no sensors", "raw", "pnm", "scanimage", "worker")
    print("worst delay (max round trip - idle Ping p50): " + ", ".join(
        f"{n} {w[n]['worst_delay_ms']:.2f} ms" for n in names))
    for f in lag["failures"]:
        print(f"FAILED: {f}")
    print(f"Target worst loop delay during the transfer <= {TARGET_LAG_MS:g} ms: "
          f"{'met' if lag['target']['met'] else 'not met'} ({lag['target']['worst_delay_ms']:.2f} ms)")

    idle = report["idle"]
    print(f"\n3. Idle CPU over {idle['seconds']:.1f} s, the two daemons side by side, % of one core "
          f"(utime+stime from /proc/PID/stat; per-second spread from schedstat)")
    rows = []
    for name, label in (("polling", f"sensors polled every {POLL_MS} ms"), ("no sensors", "no sensors (baseline)")):
        e = idle[name]
        ps = e["per_second_pct"]
        workers = f"{e['workers']['stat_pct']:.2f} ({len(e['pids']['workers'])})"
        rows.append([label, f"{e['daemon']['stat_pct']:.2f}", workers, f"{e['total_stat_pct']:.2f}",
                     f"{e['total_schedstat_pct']:.2f}", f"{ps['median']:.2f} / {ps['min']:.2f} / {ps['max']:.2f}"])
    table(["", "daemon %", "workers %", "total %", "schedstat %", "per s median/min/max %"], rows)
    polled, quiet = idle["polling"], idle["no sensors"]
    polls = idle["seconds"] / (POLL_MS / 1000) * len(DEVICES)
    extra = polled["total_schedstat_pct"] - quiet["total_schedstat_pct"]
    print(f"polling costs {extra:+.2f} % of a core over the baseline (schedstat), about "
          f"{extra / 100 * idle['seconds'] / polls * 1000:.2f} ms CPU per poll (~{polls:.0f} polls of "
          f"{len(DEVICES)} devices)" + ("; WORKER SET CHANGED during the window"
                                         if polled["workers_changed"] or quiet["workers_changed"] else ""))
    print(f"Target idle CPU with polling < {TARGET_IDLE_PCT:g} % of one core: "
          f"{'met' if polled['total_stat_pct'] < TARGET_IDLE_PCT else 'not met'} ({polled['total_stat_pct']:.2f} %)")

    la = report["launch"]
    print(f"\n4. Button to launch: {la['launched']} of {la['presses']} presses launched (sensor file flipped at a "
          f"random point of the {POLL_MS} ms poll cycle)")
    rows = []
    for key, label in (("flip_to_started", "flip -> 'application started' (logged after the spawn)"),
                       ("started_to_date", "that log line -> command's date"),
                       ("flip_to_date", "flip -> command's date (total)")):
        s = la.get(key)
        if s:
            rows.append([label, f"{s['p50_ms']:.1f}", f"{s['min_ms']:.1f}", f"{s['max_ms']:.1f}",
                         f"{s['p50_ms'] / POLL_MS:.2f}", f"{s['max_ms'] / POLL_MS:.2f}"])
    table(["", "p50 ms", "min ms", "max ms", "p50 x interval", "max x interval"], rows)
    for f in la["failures"]:
        print(f"FAILED: {f}")

    print()
    for key, label in (("health", "stillsvc (polling)"), ("health_no_sensors", "stillsvc (no sensors)")):
        h = report[key]
        print(f"{label}: {'running' if h['running'] else 'NOT RUNNING'} at the end of its part, "
              f"{h['tracebacks']} tracebacks, {len(h['problems'])} error/warning lines in its log")
        for line in h["problems"]:
            print(f"  log: {line}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeat", type=int, default=10, help="timed throughput rounds (default 10)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed throughput rounds first (default 1)")
    parser.add_argument("--lag-repeat", type=int, default=15, help="rounds of the loop probe's windows (default 15)")
    parser.add_argument("--idle", type=float, default=10.0, help="seconds of idle CPU measurement (default 10)")
    parser.add_argument("--presses", type=int, default=20, help="button presses (default 20)")
    parser.add_argument("--pipe-size", type=int, default=None,
                        help="F_SETPIPE_SZ for stillsvc's pipe (default: the system's, 64 KiB)")
    parser.add_argument("--json", action="store_true", help="one JSON document")
    parser.add_argument("--probe", nargs=2, metavar=("ADDRESS", "OUT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.probe:
        asyncio.run(probe_main(*args.probe))
        return
    why = test_backend_unavailable_reason()
    if why or shutil.which("dbus-daemon") is None:
        sys.exit(f"sane bench: {why or 'dbus-daemon is required'}")
    root = Path(tempfile.mkdtemp(prefix="stillsvc-bench-sane-"))
    load = os.getloadavg()[0]
    try:
        report = asyncio.run(bench(args, root))
    finally:
        shutil.rmtree(root, ignore_errors=True)
    report["load_average"] = {"start": load, "end": os.getloadavg()[0]}
    report["machine"] = machine()
    report["pipe_size"] = args.pipe_size
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print_report(report)
    failed = (report["launch"]["failures"] or report["throughput"]["failures"] or report["loop"]["failures"]
              or report["health"]["tracebacks"] or not report["health"]["running"])
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
