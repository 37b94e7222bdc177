#!/usr/bin/env python3
"""stillsvc's eSCL (AirScan) server against the same page over D-Bus, with sane-airscan
and a small HTTP client of this script's own as eSCL clients.

    python3 bench/escl.py [--rounds N] [--warmup W] [--requests R] [--json]

All in one private network namespace (``unshare -n``, as root; loopback only) and one
run of the daemon (``stillsvc --simulate`` on a private bus, its ``[escl]`` server on
127.0.0.1:8090, mDNS off):

1. **Throughput.** The simulator's whole bed at 300 dpi colour (2550 x 3506 pixels,
   26,820,900 bytes of pixels), encoded as PNG and as JPEG, five ways that take turns
   (the order rotates from round to round, roundtrip.py's ``block_order``):

   * ``D-Bus png``, ``D-Bus jpeg``: ``Item.transfer`` through the client library into
     a pipe, exactly as bench/transfer.py does (its ``transfer_once``), on a ``data``
     session opened and set to 300 dpi colour before each (untimed) and closed after;
   * ``airscan png``: ``scanimage -d airscan:e0:Sim ... --format=pnm`` with a private
     ``SANE_CONFIG_DIR`` (dll.conf = airscan, the device named in airscan.conf,
     discovery off), from starting scanimage to its exit, its stdout a pipe that a
     thread empties. sane-airscan cannot be told the format: it takes PNG whenever the
     scanner offers it (``device_choose_format`` in airscan-device.c: PNG, else JPEG,
     else BMP; no option), so it is measured with PNG only, and the format it asked
     for is read back from the daemon's log. ``scanimage -n`` (start, open the device,
     exit: no page) is timed after each, to show what of its time is not the page;
   * ``eSCL png``, ``eSCL jpeg``: this script's own client (asyncio streams, a new
     connection per request as sane-airscan does): POST ScanJobs with
     DocumentFormatExt, GET NextDocument, then (at once) the NextDocument that must
     answer 404 and DELETE; timed from sending the POST to the page's last byte. An
     answer other than 404 / 200 there is reported (and fails the run), the page kept.

   The figure is MB/s of pixels (MB = 10^6 bytes, whatever the stream's size), the
   median of ``--rounds`` (5) after ``--warmup`` (1) untimed rounds; each eSCL row's
   ratio is to the D-Bus row of its format (also to D-Bus with its session opening
   and settings counted, as the POST does that work). Target: eSCL >= 0.8 x D-Bus.
   With each, the daemon's CPU time per job (all threads, ``/proc/PID/stat``), which
   other load on the machine does not change the way it changes the times. Every
   image is decoded and compared with the simulator's pattern: lossless ones exactly,
   JPEG with Pillow's own encoding of the pattern at quality 90 (byte for byte, or
   else by its error); the D-Bus ones from an extra transfer in the first round.
2. **Time to the first byte**: from sending ``POST /ScanJobs`` to the first byte of the
   page's body in ``NextDocument`` (own client; with the steps in between), against
   D-Bus's call to the first byte in the pipe.
3. **Small requests**: ``--requests`` (1000) GET ScannerCapabilities and ScannerStatus
   each (a new connection each) against raw ``Peer.Ping`` round trips to the service
   in the same run, interleaved in blocks (roundtrip.py's ``interleaved``): p50/p99
   and their ratios to Ping's.

Every wait has a deadline, the whole run a budget (``--budget``, 900 s) after which
its process group is stopped; every process started is stopped at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import os
import platform
import re
import shutil
import statistics
import sys
import tempfile
import threading
import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
for _p in (REPO, REPO / "tests", REPO / "bench"):
    if str(_p) not in sys.path:
        sys.path.insert(0, str(_p))

from events import cpu_and_switches  # noqa: E402
from helpers import Daemon, DBusDaemon, connect  # noqa: E402
from roundtrip import block_order, interleaved, ping, reexec_in_namespace, summarise, table, timed  # noqa: E402
from saned import wait_listening  # noqa: E402
from transfer import configure, open_flatbed, transfer_once  # noqa: E402

from stillsvc.client import Client, Item  # noqa: E402
from stillsvc.drivers.sim.pattern import pattern_page  # noqa: E402
from stillsvc.imaging import ImageInfo  # noqa: E402

IN_NAMESPACE = "STILLSVC_BENCH_ESCL_NETNS"
HOST, PORT = "127.0.0.1", 8090
BASE = "/eSCL"
AIRSCAN_NAME = "Sim"
AIRSCAN_DEVICE = f"airscan:e0:{AIRSCAN_NAME}"
DEVICE = "sim0"
RESOLUTION = 300
SCANIMAGE_PAGE = ["--mode", "Color", "--resolution", str(RESOLUTION), "-x", "216", "-y", "297", "--format=pnm"]
SCAN_NS = "http://schemas.hp.com/imaging/escl/2011/05/03"
PWG_NS = "http://www.pwg.org/schemas/2010/12/sm"
MIME = {"png": "image/png", "jpeg": "image/jpeg"}
KINDS = ["D-Bus png", "airscan png", "eSCL png", "D-Bus jpeg", "eSCL jpeg"]
BASELINE = {"airscan png": "D-Bus png", "eSCL png": "D-Bus png", "eSCL jpeg": "D-Bus jpeg"}
TARGET_RATIO = 0.8
JPEG_QUALITY = 90  # stillsvc's JpegEncoder (Pillow): the reference a JPEG page is compared with
JPEG_TOLERANCE = 0.5  # mean error per sample a JPEG page may have above the reference's
HTTP_TIMEOUT = 60.0
SCAN_TIMEOUT = 60.0
START_TIMEOUT = 15.0
MB = 1e6

clock = time.perf_counter


# -- the namespace ---------------------------------------------------------------------------------


# -- the configurations and the service ---------------------------------------------------------------

def write_configs(root: Path) -> tuple[Path, Path]:
    """stillsvc's config (the eSCL server on, mDNS off) and sane-airscan's folder."""
    toml = root / "stillsvc.toml"
    toml.write_text("[escl]\n"
                    f'listen = ["{HOST}"]\n'
                    f"port = {PORT}\n"
                    'allow = ["127.0.0.0/8"]\n'
                    "mdns = false\n")
    sane = root / "airscan"
    sane.mkdir()
    (sane / "dll.conf").write_text("airscan\n")
    (sane / "airscan.conf").write_text("[devices]\n"
                                       f'"{AIRSCAN_NAME}" = http://{HOST}:{PORT}{BASE}, eSCL\n'
                                       "[options]\n"
                                       "discovery = disable\n")
    return toml, sane


def sane_env(folder: Path) -> dict[str, str]:
    """The environment without SANE_ or proxy variables, and a private SANE_CONFIG_DIR
    (no trailing colon: libsane would read the system folder as well)."""
    drop = ("http_proxy", "https_proxy", "all_proxy", "no_proxy")
    env = {k: v for k, v in os.environ.items() if not k.startswith("SANE_") and k.lower() not in drop}
    env["SANE_CONFIG_DIR"] = str(folder)
    return env


class Service:
    """A private dbus-daemon and stillsvc on it with the eSCL server, started and stopped together."""

    def __init__(self, root: Path, config: Path) -> None:
        self.root = root
        self.config = config
        self.bus: DBusDaemon | None = None
        self.daemon: Daemon | None = None

    def start(self) -> str:
        self.bus = DBusDaemon()
        # The daemon at its default log level (the helper's default is debug), as roundtrip.py does.
        self.daemon = Daemon(self.bus.address, "--log-level", "info", "--config", str(self.config),
                             workdir=str(self.root / "stillsvc"))
        try:
            asyncio.run(asyncio.wait_for(self.daemon.ready(), START_TIMEOUT))
            wait_listening(HOST, PORT, self.daemon.proc, "stillsvc", self.daemon.log_path)
        except Exception:
            sys.stderr.write(self.daemon.log[-4000:])
            raise
        return self.bus.address

    def health(self, own_jobs: set[str], odd_jobs: list[str]) -> dict[str, Any]:
        """Whether the daemon still runs, what went wrong in its log, and which formats
        the jobs not of this script's own client (sane-airscan's) asked for."""
        log = self.daemon.log if self.daemon else ""
        lines = log.splitlines()
        bad = [line for line in lines if re.search(r"level='?(error|warning|critical)", line)
               or "Traceback" in line or "eSCL request refused" in line or "eSCL request failed" in line]
        airscan_formats: dict[str, int] = {}
        for line in lines:
            if "event='eSCL job created'" in line:
                job = re.search(r"job='([^']+)'", line)
                fmt = re.search(r"format='([^']+)'", line)
                if job and fmt and job.group(1) not in own_jobs:
                    airscan_formats[fmt.group(1)] = airscan_formats.get(fmt.group(1), 0) + 1
        ended = [line for line in lines if "event='eSCL job ended'" in line]
        # The log of the jobs whose answers were out of the ordinary.
        odd = [line for job in odd_jobs for line in lines if job in line or f"escl:127.0.0.1:{job[:8]}'" in line]
        return {
            "stillsvc_running": bool(self.daemon and self.daemon.proc and self.daemon.proc.poll() is None),
            "tracebacks": log.count("Traceback"),
            "log_problems": len(bad),
            "log_excerpt": bad[:12],
            "airscan_formats": airscan_formats,
            "jobs_ended": {state: sum(f"state='{state}'" in line for line in ended)
                           for state in ("Completed", "Canceled", "Aborted")},
            "log_lines": len(lines),
            "odd_jobs_log": odd[:40],
        }

    def stop(self) -> None:
        if self.daemon is not None:
            self.daemon.stop()
        if self.bus is not None:
            self.bus.stop()


# -- a small HTTP/1.1 client ------------------------------------------------------------------------

@dataclass
class Reply:
    status: int = 0
    headers: dict[str, str] = field(default_factory=dict)
    body: bytes = b""
    t_start: float = 0.0  # before connecting
    t_headers: float = 0.0  # the response's head read
    t_first_body: float | None = None  # the first byte of the body
    t_done: float = 0.0  # the whole response read


async def http(method: str, path: str, body: bytes = b"", content_type: str = "text/xml") -> Reply:
    """One request on a connection of its own (``Connection: close``, as sane-airscan
    does), with timestamps around it; the body is read whole (chunked or not)."""
    reply = Reply()
    async with asyncio.timeout(HTTP_TIMEOUT):
        reply.t_start = clock()
        reader, writer = await asyncio.open_connection(HOST, PORT, limit=1 << 20)
        try:
            head = f"{method} {path} HTTP/1.1\r\nHost: {HOST}:{PORT}\r\nConnection: close\r\n"
            if body or method == "POST":
                head += f"Content-Type: {content_type}\r\nContent-Length: {len(body)}\r\n"
            writer.write(head.encode() + b"\r\n" + body)
            raw = await reader.readuntil(b"\r\n\r\n")
            reply.t_headers = clock()
            status_line, *header_lines = raw.decode("latin-1").split("\r\n")
            reply.status = int(status_line.split()[1])
            for line in header_lines:
                if ":" in line:
                    name, value = line.split(":", 1)
                    reply.headers[name.strip().lower()] = value.strip()
            parts: list[bytes] = []
            if reply.headers.get("transfer-encoding", "").lower() == "chunked":
                while True:
                    size = int((await reader.readuntil(b"\r\n")).split(b";")[0], 16)
                    if size and reply.t_first_body is None:
                        reply.t_first_body = clock()
                    if size == 0:
                        await reader.readuntil(b"\r\n")  # no trailers are sent
                        break
                    parts.append(await reader.readexactly(size))
                    await reader.readexactly(2)
            elif "content-length" in reply.headers:
                length = int(reply.headers["content-length"])
                if length:
                    first = await reader.read(length)
                    reply.t_first_body = clock()
                    parts.append(first)
                    if len(first) < length:
                        parts.append(await reader.readexactly(length - len(first)))
            elif method != "HEAD" and reply.status not in (204, 304):
                while chunk := await reader.read(1 << 20):
                    if reply.t_first_body is None:
                        reply.t_first_body = clock()
                    parts.append(chunk)
            reply.body = b"".join(parts)
            reply.t_done = clock()
        finally:
            writer.close()
    return reply


def scan_settings(fmt: str, width: int, height: int) -> bytes:
    """The ScanSettings sane-airscan sends, for the whole platen at 300 dpi colour."""
    mime = MIME[fmt]
    return (f'<?xml version="1.0" encoding="UTF-8"?>'
            f'<scan:ScanSettings xmlns:scan="{SCAN_NS}" xmlns:pwg="{PWG_NS}">'
            "<pwg:Version>2.0</pwg:Version><pwg:ScanRegions><pwg:ScanRegion>"
            "<pwg:ContentRegionUnits>escl:ThreeHundredthsOfInches</pwg:ContentRegionUnits>"
            f"<pwg:XOffset>0</pwg:XOffset><pwg:YOffset>0</pwg:YOffset>"
            f"<pwg:Width>{width}</pwg:Width><pwg:Height>{height}</pwg:Height>"
            "</pwg:ScanRegion></pwg:ScanRegions><pwg:InputSource>Platen</pwg:InputSource>"
            f"<scan:ColorMode>RGB24</scan:ColorMode><pwg:DocumentFormat>{mime}</pwg:DocumentFormat>"
            f"<scan:DocumentFormatExt>{mime}</scan:DocumentFormatExt>"
            f"<scan:XResolution>{RESOLUTION}</scan:XResolution><scan:YResolution>{RESOLUTION}</scan:YResolution>"
            "</scan:ScanSettings>").encode()


def platen_size(capabilities: bytes) -> tuple[int, int, list[str]]:
    """The platen's MaxWidth and MaxHeight (300ths of an inch) and its document formats."""
    root = ET.fromstring(capabilities)
    ns = {"scan": SCAN_NS, "pwg": PWG_NS}
    caps = root.find("scan:Platen/scan:PlatenInputCaps", ns)
    if caps is None:
        raise RuntimeError("the capabilities have no PlatenInputCaps")
    width, height = int(caps.findtext("scan:MaxWidth", "0", ns)), int(caps.findtext("scan:MaxHeight", "0", ns))
    formats = [e.text or "" for e in caps.iter(f"{{{SCAN_NS}}}DocumentFormatExt")]
    return width, height, formats


# -- one page each way ----------------------------------------------------------------------------

@dataclass
class Page:
    kind: str
    seconds: float = 0.0  # what the throughput is of (see the module's docstring)
    first_byte: float | None = None  # seconds from the same start to the first byte
    stream_bytes: int = 0
    data: bytes = b""  # the image as received (scanimage: the PNM it wrote)
    steps: dict[str, float] = field(default_factory=dict)  # ms, the own client's and D-Bus's steps
    job: str | None = None
    error: str = ""
    anomalies: list[str] = field(default_factory=list)  # protocol answers out of the ordinary (page kept)
    daemon_cpu: float = 0.0  # seconds of CPU the daemon (all its threads) used meanwhile
    stderr: str = ""


async def escl_page(fmt: str, width: int, height: int) -> Page:
    """One job through the own client: POST, NextDocument (the page), NextDocument (404), DELETE."""
    page = Page(f"eSCL {fmt}")
    post = await http("POST", f"{BASE}/ScanJobs", scan_settings(fmt, width, height))
    if post.status != 201 or "location" not in post.headers:
        page.error = f"POST ScanJobs: {post.status} {post.body[:200]!r}"
        return page
    job_path = re.sub(r"^https?://[^/]+", "", post.headers["location"]).rstrip("/")
    page.job = job_path.rsplit("/", 1)[-1]
    doc = await http("GET", f"{job_path}/NextDocument")
    if doc.status != 200:
        page.error = f"NextDocument: {doc.status} {doc.body[:200]!r}"
        await http("DELETE", job_path)
        return page
    if doc.headers.get("content-type", "").split(";")[0] != MIME[fmt]:
        page.error = f"NextDocument's Content-Type is {doc.headers.get('content-type')!r}, not {MIME[fmt]}"
    # At once, as a client that has the page does: the 404 that says the job has no more.
    end = await http("GET", f"{job_path}/NextDocument")
    delete = await http("DELETE", job_path)
    if end.status != 404:
        sent = time.time() - (clock() - end.t_start)  # the wall clock of the daemon's log
        page.anomalies.append(f"job {page.job}: the second NextDocument, sent at "
                              f"{time.strftime('%H:%M:%S', time.gmtime(sent))}.{int(sent % 1 * 1e6):06d}Z, "
                              f"{(end.t_start - doc.t_done) * 1000:.2f} ms after the page's last byte, answered "
                              f"{end.status} {end.body.decode(errors='replace').strip()[:120]!r}, not 404")
    if delete.status != 200:
        page.anomalies.append(f"DELETE answered {delete.status} {delete.body.decode(errors='replace').strip()[:120]!r}")
    t0 = post.t_start
    assert doc.t_first_body is not None or page.error or not doc.body
    page.seconds = doc.t_done - t0
    page.first_byte = (doc.t_first_body or doc.t_done) - t0
    page.stream_bytes = len(doc.body)
    page.data = doc.body
    page.steps = {"post_ms": (post.t_done - t0) * 1000,
                  "next_document_sent_ms": (doc.t_start - t0) * 1000,
                  "headers_ms": (doc.t_headers - t0) * 1000,
                  "first_byte_ms": page.first_byte * 1000,
                  "last_byte_ms": page.seconds * 1000,
                  "job_over_ms": (delete.t_done - t0) * 1000}
    return page


async def airscan_page(sane: Path) -> Page:
    """One scanimage through sane-airscan, from starting it to its exit, its PNM kept.
    Its stdout is a plain pipe emptied by a thread (1 MiB reads, as transfer.py's reader),
    so that reading 26.8 MB of PNM costs little of the figure."""
    page = Page("airscan png")
    argv = ["scanimage", "-d", AIRSCAN_DEVICE, *SCANIMAGE_PAGE]
    if shutil.which("stdbuf"):
        argv = ["stdbuf", "-o0", *argv]
    r, w = os.pipe()
    keeper = Keeper(r)
    keeper.start()
    t0 = clock()
    try:
        proc = await asyncio.create_subprocess_exec(*argv, stdout=w, stderr=asyncio.subprocess.PIPE,
                                                    env=sane_env(sane))
    finally:
        os.close(w)
    assert proc.stderr is not None
    try:
        async with asyncio.timeout(SCAN_TIMEOUT):
            _, err = await proc.communicate()
            page.seconds = clock() - t0
            page.stderr = err.decode(errors="replace").strip()
        if proc.returncode != 0:
            page.error = f"scanimage exited with {proc.returncode}: {page.stderr[-500:]}"
    except TimeoutError:
        page.error = f"no whole page within {SCAN_TIMEOUT:g} s ({sum(map(len, keeper.parts))} bytes)"
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
        await asyncio.get_running_loop().run_in_executor(None, keeper.join, 10.0)
        if not keeper.is_alive():
            os.close(r)
    if keeper.t_first is not None:
        page.first_byte = keeper.t_first - t0
    page.data = b"".join(keeper.parts)
    page.stream_bytes = len(page.data)
    return page


async def airscan_open(sane: Path) -> float:
    """``scanimage -n`` (set the options, do not scan) on the same device: what starting
    scanimage, opening the device through sane-airscan and exiting cost without the page."""
    argv = ["scanimage", "-n", "-d", AIRSCAN_DEVICE, *SCANIMAGE_PAGE]
    t0 = clock()
    proc = await asyncio.create_subprocess_exec(*argv, stdout=asyncio.subprocess.DEVNULL,
                                                stderr=asyncio.subprocess.PIPE, env=sane_env(sane))
    try:
        async with asyncio.timeout(SCAN_TIMEOUT):
            _, err = await proc.communicate()
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    if proc.returncode != 0:
        raise RuntimeError(f"scanimage -n exited with {proc.returncode}: {err.decode(errors='replace')[-300:]}")
    return clock() - t0


class Keeper(threading.Thread):
    """Reads a pipe to end of file and keeps what it read (for checking the image)."""

    def __init__(self, fd: int) -> None:
        super().__init__(daemon=True, name="keeper")
        self.fd = fd
        self.parts: list[bytes] = []
        self.t_first: float | None = None

    def run(self) -> None:
        while data := os.read(self.fd, 1 << 20):
            if self.t_first is None:
                self.t_first = clock()
            self.parts.append(data)


async def dbus_capture(item: Item, fmt: str) -> bytes:
    """An untimed transfer whose image is kept, for checking it."""
    r, w = os.pipe()
    keeper = Keeper(r)
    keeper.start()
    try:
        await asyncio.wait_for(item.transfer(w, fmt), HTTP_TIMEOUT)
    finally:
        os.close(w)
        await asyncio.get_running_loop().run_in_executor(None, keeper.join, 60.0)
        if not keeper.is_alive():
            os.close(r)
    return b"".join(keeper.parts)


async def dbus_page(client: Client, fmt: str, capture: bool = False) -> Page:
    """One Item.transfer through the client library (transfer.py's ``transfer_once``), on a
    data session opened and set to 300 dpi colour before (untimed) and closed after."""
    page = Page(f"D-Bus {fmt}")
    t0 = clock()
    session, item = await open_flatbed(client, DEVICE)
    try:
        await configure(item, RESOLUTION, "color")
        t1 = clock()
        if capture:
            page.data = await dbus_capture(item, fmt)
        run = await transfer_once(item, fmt, None)
    finally:
        t2 = clock()
        async with session:  # closes it; gone already is fine
            pass
    page.seconds, page.first_byte, page.stream_bytes = run.seconds, run.first_byte, run.bytes
    page.steps = {"session_and_settings_ms": (t1 - t0) * 1000, "close_ms": (clock() - t2) * 1000,
                  "first_byte_ms": run.first_byte * 1000, "last_byte_ms": run.seconds * 1000}
    return page


# -- checking the images --------------------------------------------------------------------------

def check_image(data: bytes, fmt: str) -> dict[str, Any]:
    """Decode the image, find the page number in its stamp, compare it with the
    simulator's pattern for that page. Raises ValueError when it is wrong."""
    from PIL import Image, ImageChops, ImageStat

    image = Image.open(io.BytesIO(data))
    image.load()
    if image.mode != "RGB":
        raise ValueError(f"a {image.mode} image, not RGB")
    width, height = image.size
    pixels = image.tobytes()
    # The stamp (rows 0 .. H/16): 32 blocks, block k white if bit k of the page number is set.
    number = sum(1 << k for k in range(32) if pixels[3 * -(-k * width // 32)] > 127)
    expected = pattern_page(ImageInfo(width, height, "color", 8, RESOLUTION), number)
    out: dict[str, Any] = {"format": image.format, "width": width, "height": height, "page": number}
    if fmt == "jpeg":
        # Lossy: compared with Pillow's own encoding of the pattern at the encoder's quality
        # (the same bytes when nothing on the way changed them), else by its error.
        truth = Image.frombytes("RGB", (width, height), expected)
        buffer = io.BytesIO()
        truth.save(buffer, "JPEG", quality=JPEG_QUALITY, dpi=(RESOLUTION, RESOLUTION))
        out["same_as_reference"] = buffer.getvalue() == data
        if not out["same_as_reference"]:
            reference = Image.open(io.BytesIO(buffer.getvalue()))
            mean = max(ImageStat.Stat(ImageChops.difference(image, truth)).mean)
            ref_mean = max(ImageStat.Stat(ImageChops.difference(reference, truth)).mean)
            out["mean_error"], out["reference_mean_error"] = round(mean, 3), round(ref_mean, 3)
            if mean > ref_mean + JPEG_TOLERANCE:
                raise ValueError(f"page {number}: mean error {mean:.2f} per sample, the reference's {ref_mean:.2f}")
    elif pixels != expected:
        wrong = next(i for i in range(len(pixels)) if pixels[i] != expected[i])
        raise ValueError(f"page {number} differs from the pattern from byte {wrong} (row {wrong // (3 * width)})")
    return out


# -- the benchmark ----------------------------------------------------------------------------------

async def throughput(address: str, pid: int, sane: Path, rounds: int, warmup: int, width: int, height: int
                     ) -> dict[str, Any]:
    client = await Client(address, timeout=10.0).connect()
    pages: dict[str, list[Page]] = {kind: [] for kind in KINDS}
    checks: dict[str, list[dict[str, Any]]] = {kind: [] for kind in KINDS}
    failures: list[str] = []
    anomalies: list[str] = []
    odd_jobs: list[str] = []
    own_jobs: set[str] = set()
    opens: list[float] = []  # scanimage -n: start, open the device (GET ScannerCapabilities), exit
    stderr: dict[str, str] = {}
    try:
        for r in range(warmup + rounds):
            for kind in block_order(KINDS, r):
                way, fmt = kind.split()
                cpu0 = cpu_and_switches(pid)[0]
                try:
                    if way == "D-Bus":
                        # The D-Bus image is checked from one more, untimed transfer in the same session
                        # (transfer_once does not keep what it reads).
                        page = await dbus_page(client, fmt, capture=(r == 0))
                    elif way == "airscan":
                        page = await airscan_page(sane)
                        page.daemon_cpu = cpu_and_switches(pid)[0] - cpu0
                        stderr.setdefault(kind, page.stderr)
                        if not page.error:
                            seconds = await airscan_open(sane)
                            if r >= warmup:
                                opens.append(seconds)
                    else:
                        page = await escl_page(fmt, width, height)
                        if page.job:
                            own_jobs.add(page.job)
                    if way != "airscan":
                        page.daemon_cpu = cpu_and_switches(pid)[0] - cpu0
                except Exception as e:  # a timeout, a refused call: reported, the run goes on
                    page = Page(kind, error=f"{type(e).__name__}: {e}")
                if not page.error and page.data:
                    try:
                        checks[kind].append(check_image(page.data, fmt))
                    except Exception as e:
                        page.error = f"wrong image: {type(e).__name__}: {e}"
                page.data = b""
                anomalies += [f"round {r} {kind}: {a}" for a in page.anomalies]
                if page.anomalies and page.job:
                    odd_jobs.append(page.job)
                if page.error:
                    failures.append(f"round {r} {kind}: {page.error}")
                elif r >= warmup:
                    pages[kind].append(page)
    finally:
        client.disconnect()
    pixels = width * height * 3
    rows: dict[str, Any] = {}
    for kind, runs in pages.items():
        if not runs:
            continue
        rates = sorted(pixels / MB / p.seconds for p in runs)
        steps: dict[str, float] = {}
        for key in runs[0].steps:
            steps[key] = round(statistics.median(p.steps[key] for p in runs), 2)
        rows[kind] = {"n": len(runs), "stream_bytes": statistics.median(p.stream_bytes for p in runs),
                      "median_mb_s": round(statistics.median(rates), 1), "min_mb_s": round(rates[0], 1),
                      "max_mb_s": round(rates[-1], 1),
                      "median_s": round(statistics.median(p.seconds for p in runs), 4),
                      "median_first_byte_ms": round(statistics.median(p.first_byte or p.seconds for p in runs)
                                                    * 1000, 2),
                      "steps_median_ms": steps, "runs_s": [round(p.seconds, 4) for p in runs],
                      # /proc/PID/stat counts in clock ticks (10 ms): the mean over the runs is the figure
                      "daemon_cpu_ms_per_page": round(sum(p.daemon_cpu for p in runs) / len(runs) * 1000, 1)}
        if kind.startswith("D-Bus"):
            # The same transfer with what comes before it counted too (open_session, finding the
            # item, writing its settings), as the eSCL POST does all of that.
            with_session = [p.seconds + p.steps["session_and_settings_ms"] / 1000 for p in runs]
            rows[kind]["with_session_median_mb_s"] = round(statistics.median(pixels / MB / x for x in with_session), 1)
    for kind, base in BASELINE.items():
        if kind in rows and base in rows:
            rows[kind]["ratio"] = round(rows[kind]["median_mb_s"] / rows[base]["median_mb_s"], 3)
            rows[kind]["ratio_with_session"] = round(rows[kind]["median_mb_s"]
                                                     / rows[base]["with_session_median_mb_s"], 3)
    sizes = {(c["width"], c["height"]) for kind_checks in checks.values() for c in kind_checks}
    return {"rounds": rounds, "warmup": warmup, "pixel_bytes": pixels, "width": width, "height": height,
            "rows": rows, "failures": failures, "checks": {k: v[:2] for k, v in checks.items()},
            "checked": {k: len(v) for k, v in checks.items()}, "sizes": sorted(sizes),
            "jpeg_same_as_reference": [c.get("same_as_reference") for k in checks for c in checks[k]
                                       if "same_as_reference" in c],
            "own_jobs": sorted(own_jobs), "scanimage_stderr": stderr, "anomalies": anomalies, "odd_jobs": odd_jobs,
            "own_jobs_count": len(own_jobs),
            "airscan_open_only_ms": round(statistics.median(opens) * 1000, 1) if opens else None}


async def small_requests(address: str, count: int, block: int, warmup: int) -> dict[str, Any]:
    """ScannerCapabilities and ScannerStatus against Peer.Ping, interleaved in blocks."""
    raw = await connect(address)

    def get(path: str) -> Any:
        async def once() -> None:
            reply = await http("GET", path)
            if reply.status != 200 or not reply.body.startswith(b"<?xml"):
                raise RuntimeError(f"GET {path}: {reply.status} {reply.body[:200]!r}")
        return once

    try:
        kinds = {"Peer.Ping (D-Bus)": timed(ping(raw)),
                 "GET ScannerStatus": timed(get(f"{BASE}/ScannerStatus")),
                 "GET ScannerCapabilities": timed(get(f"{BASE}/ScannerCapabilities"))}
        samples, round_medians = await interleaved(kinds, count, block, warmup)
    finally:
        raw.disconnect()
    base = summarise(samples["Peer.Ping (D-Bus)"])
    rows = {}
    for name, values in samples.items():
        s = summarise(values)
        rows[name] = {**{k: round(v, 1) if isinstance(v, float) else v for k, v in s.items()},
                      "p50_ratio": round(s["median_us"] / base["median_us"], 2),
                      "p99_ratio": round(s["p99_us"] / base["p99_us"], 2)}
    per_round = {name: sorted(r[name] / r["Peer.Ping (D-Bus)"] for r in round_medians
                              if name in r and "Peer.Ping (D-Bus)" in r) for name in samples}
    return {"count": count, "block": block, "warmup": warmup, "rows": rows,
            "ratio_per_round": {name: {"min": round(v[0], 2), "median": round(statistics.median(v), 2),
                                       "max": round(v[-1], 2)} for name, v in per_round.items() if v}}


def run(args: argparse.Namespace) -> dict[str, Any]:
    for tool in ("scanimage", "dbus-daemon"):
        if shutil.which(tool) is None:
            sys.exit(f"escl bench: {tool} is required (sane-utils, dbus-daemon)")
    root = Path(tempfile.mkdtemp(prefix="stillsvc-bench-escl-"))
    toml, sane = write_configs(root)
    service = Service(root, toml)
    try:
        address = service.start()

        async def bench() -> dict[str, Any]:
            caps = await http("GET", f"{BASE}/ScannerCapabilities")
            if caps.status != 200:
                raise RuntimeError(f"GET ScannerCapabilities: {caps.status} {caps.body[:300]!r}")
            width, height, formats = platen_size(caps.body)
            result: dict[str, Any] = {"platen": {"max_width": width, "max_height": height, "formats": formats}}
            assert service.daemon is not None and service.daemon.proc is not None
            result["throughput"] = await throughput(address, service.daemon.proc.pid, sane, args.rounds, args.warmup,
                                                    width, height)
            result["small_requests"] = await small_requests(address, args.requests, args.block, args.warmup_requests)
            status = await http("GET", f"{BASE}/ScannerStatus")
            result["final_status"] = re.findall(rb"<pwg:State>(\w+)</pwg:State>", status.body)[0].decode() \
                if status.status == 200 else f"HTTP {status.status}"
            return result

        result = asyncio.run(bench())
        result.update({"python": platform.python_version(), "machine": platform.machine(), "cpus": os.cpu_count(),
                       "load_average": [round(x, 2) for x in os.getloadavg()],
                       "airscan_device": AIRSCAN_DEVICE, "scanimage_args": SCANIMAGE_PAGE,
                       "stdbuf": bool(shutil.which("stdbuf"))})
        t = result["throughput"]
        result["health"] = service.health(set(t["own_jobs"]), t["odd_jobs"])
        return result
    finally:
        service.stop()
        shutil.rmtree(root, ignore_errors=True)


# -- output ---------------------------------------------------------------------------------------------

LABELS = {
    "D-Bus png": "D-Bus Item.Transfer png",
    "airscan png": "eSCL png, sane-airscan (scanimage)",
    "eSCL png": "eSCL png, own client",
    "D-Bus jpeg": "D-Bus Item.Transfer jpeg",
    "eSCL jpeg": "eSCL jpeg, own client",
}


def report(result: dict[str, Any]) -> None:
    t = result["throughput"]
    print(f"{result['cpus']} CPUs, Python {result['python']}; load average {result['load_average']}")
    print(f"Page: sim0's whole bed at {RESOLUTION} dpi colour, {t['width']} x {t['height']} "
          f"({t['pixel_bytes']:,} bytes of pixels); MB/s of pixels (MB = 10^6 bytes), median of {t['rounds']} "
          f"after {t['warmup']} untimed, kinds in rotating order")
    rows = []
    for kind in KINDS:
        r = t["rows"].get(kind)
        if r:
            rows.append([LABELS[kind], f"{r['stream_bytes']:,.0f}", f"{r['median_mb_s']:.1f}", f"{r['min_mb_s']:.1f}",
                         f"{r['max_mb_s']:.1f}", f"{r['median_s'] * 1000:.1f}", f"{r['median_first_byte_ms']:.1f}",
                         f"{r['daemon_cpu_ms_per_page']:.0f}",
                         f"{r['ratio']:.2f}" if "ratio" in r else "1 (base)",
                         f"{r['ratio_with_session']:.2f}" if "ratio" in r else
                         f"({r['with_session_median_mb_s']:.1f} MB/s)"])
    table(["", "stream bytes", "MB/s", "min", "max", "page ms", "first byte ms", "daemon CPU ms", "×D-Bus",
           "×D-Bus+session"], rows)
    print("  D-Bus: from the Transfer call to end of file on the pipe (session opened and set before, untimed); "
          "airscan: from starting scanimage to its exit (PNM out); own client: from sending the POST to the page's "
          "last byte; ×D-Bus+session: against D-Bus with its session opened and set counted too; daemon CPU: "
          "the daemon's CPU time (all threads) per page, whole job (D-Bus: session, settings, transfer, close), mean")
    for kind, base in BASELINE.items():
        r = t["rows"].get(kind)
        if r and "ratio" in r:
            print(f"target {kind} >= {TARGET_RATIO} x {base}: {'met' if r['ratio'] >= TARGET_RATIO else 'NOT MET'} "
                  f"({r['ratio']:.2f})")
    formats = result["health"]["airscan_formats"]
    print(f"sane-airscan asked for: {', '.join(f'{k} x{v}' for k, v in formats.items()) or 'nothing?'} "
          "(it takes PNG whenever offered; JPEG is driven by the own client)")
    if t["airscan_open_only_ms"] is not None and "airscan png" in t["rows"]:
        a = t["rows"]["airscan png"]["median_s"] * 1000
        print(f"sane-airscan without the page (scanimage -n: start, open, exit): {t['airscan_open_only_ms']:.1f} ms "
              f"median; the scan's own part about {a - t['airscan_open_only_ms']:.1f} ms")
    jpeg = t["jpeg_same_as_reference"]
    print(f"images checked against the pattern: {sum(t['checked'].values())} "
          f"({', '.join(f'{k} {v}' for k, v in t['checked'].items())}); sizes {t['sizes']}; JPEG identical to "
          f"Pillow's quality-{JPEG_QUALITY} encoding of the pattern: {sum(map(bool, jpeg))} of {len(jpeg)}")
    for failure in t["failures"]:
        print(f"FAILED: {failure}")
    if t["anomalies"]:
        print(f"PROTOCOL: {len(t['anomalies'])} of {t['own_jobs_count']} own-client jobs (page kept):")
        for anomaly in t["anomalies"]:
            print(f"  {anomaly}")

    print("\nTime to the first byte (own client, ms from sending POST /ScanJobs; medians):")
    rows = []
    for kind in ("eSCL png", "eSCL jpeg"):
        r = t["rows"].get(kind)
        if r:
            s = r["steps_median_ms"]
            rows.append([kind, f"{s['post_ms']:.2f}", f"{s['headers_ms']:.2f}", f"{s['first_byte_ms']:.2f}",
                         f"{s['last_byte_ms']:.2f}", f"{s['job_over_ms']:.2f}"])
    for kind in ("D-Bus png", "D-Bus jpeg"):
        r = t["rows"].get(kind)
        if r:
            s = r["steps_median_ms"]
            rows.append([f"{kind} (from the Transfer call)", "", "", f"{s['first_byte_ms']:.2f}",
                         f"{s['last_byte_ms']:.2f}", ""])
    table(["", "201 Created", "document headers", "first byte", "last byte", "404 + DELETE done"], rows)
    for fmt in ("png", "jpeg"):
        e, d = t["rows"].get(f"eSCL {fmt}"), t["rows"].get(f"D-Bus {fmt}")
        if e and d:
            print(f"  {fmt}: POST to first byte {e['steps_median_ms']['first_byte_ms']:.2f} ms, "
                  f"x{e['steps_median_ms']['first_byte_ms'] / d['steps_median_ms']['first_byte_ms']:.2f} D-Bus's call "
                  f"to first byte; D-Bus session and settings before it (untimed above): "
                  f"{d['steps_median_ms']['session_and_settings_ms']:.2f} ms")

    s = result["small_requests"]
    print(f"\nSmall requests: {s['count']} of each (new connection each), interleaved in blocks of {s['block']} "
          f"after {s['warmup']} untimed; ratios to Peer.Ping's p50 / p99 of the same run")
    rows = [[name, str(r["n"]), f"{r['median_us']:.1f}", f"{r['p99_us']:.1f}", f"{r['p50_ratio']:.2f}",
             f"{r['p99_ratio']:.2f}"] for name, r in s["rows"].items()]
    table(["", "n", "p50 µs", "p99 µs", "p50 ×Ping", "p99 ×Ping"], rows)
    for name, pr in s["ratio_per_round"].items():
        if "Ping" not in name:
            print(f"  {name}/Ping median per round: min {pr['min']:.2f}, median {pr['median']:.2f}, "
                  f"max {pr['max']:.2f}")

    h = result["health"]
    print(f"\nstillsvc {'running' if h['stillsvc_running'] else 'NOT RUNNING'}, {h['tracebacks']} tracebacks, "
          f"{h['log_problems']} error/warning/refused lines in its log ({h['log_lines']} lines); eSCL jobs ended: "
          f"{h['jobs_ended']}; ScannerStatus at the end: {result['final_status']}")
    for line in h["log_excerpt"]:
        print(f"  log: {line[:300]}")
    if h["odd_jobs_log"]:
        print("the daemon's log of the jobs with a protocol anomaly:")
        for line in h["odd_jobs_log"]:
            print(f"  {line[:300]}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=5, help="timed pages of each kind (default 5)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed rounds first (default 1)")
    parser.add_argument("--requests", type=int, default=1000,
                        help="ScannerCapabilities, ScannerStatus and Ping each (default 1000)")
    parser.add_argument("--block", type=int, default=50, help="requests of one kind in a row (default 50)")
    parser.add_argument("--warmup-requests", type=int, default=50, help="untimed requests of each first (default 50)")
    parser.add_argument("--budget", type=float, default=900.0, help="seconds the whole run may take (default 900)")
    parser.add_argument("--json", action="store_true", help="one JSON document")
    args = parser.parse_args()
    if args.rounds < 1 or args.warmup < 0 or args.requests < 1 or args.block < 1 or args.warmup_requests < 0:
        parser.error("--rounds, --requests and --block must be positive, the warm-ups not negative")
    if os.environ.get(IN_NAMESPACE) != "1":
        sys.exit(reexec_in_namespace(__file__, IN_NAMESPACE, args.budget))
    result = run(args)
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        report(result)
    h = result["health"]
    failed = result["throughput"]["failures"] or result["throughput"]["anomalies"] or h["tracebacks"] \
        or not h["stillsvc_running"]
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
