#!/usr/bin/env python3
"""One large file off a real USB PTP responder, through stillsvc and through gphoto2, in
one QEMU guest boot; gphoto2 is the baseline.

    python3 bench/ptp_qemu.py [--size BYTES] [--repeat N] [--timeout S] [--json]

The responder is QEMU's ``usb-mtp`` device (hw/usb/dev-mtp.c, nobody here wrote it)
serving a host folder, in the TCG guest of tests/qemu_guest.py (one vCPU, the
host's root read-only with a tmpfs overlay, no network). Before boot the folder gets
one file, ``big.bin``: ``--size`` (64 MiB) random bytes, its sha256 taken on the
host. Inside the guest this script runs again (``--guest``): like
tests/ptp_guest_script.py it starts systemd-udevd, a private ``dbus-daemon`` and
``python -m stillsvc.daemon --udev --no-sane`` (log level ``info``), waits for the
``ptp`` device and its listing, then copies the file ``--repeat`` (3) rounds of three
ways, the order rotating from round to round, each copy into the guest's ``/run``
(tmpfs) and checked against the host's sha256, then removed:

- **stillsvc, Item.Transfer** (the client library in the guest script's own process,
  imports done): a ``data`` session, ``session.item(...)``, then
  ``Item.transfer(path, "native")`` into a fresh file, timed from the call to its
  reply (the service replies once it has written every byte and closed its copy of
  the descriptor); *with session* is from ``open_session`` to the session closed;
- **stillctl get**, the whole command: ``stillctl --bus ADDR get
  DEVICE/Root/store-00010001/big.bin -o FILE`` as a process of its own, from spawn
  to exit (Python's start and stillctl's imports included: seconds under TCG);
- **gphoto2** (the **baseline**) under ``stillctl lock DEVICE -- …``: the hand-over,
  so the daemon keeps running and lets go of the USB interface for the command. The
  command is this script (``--runner``), which says when it runs (the script then
  reads the device's State, which must be ``held-by-program``) and runs
  ``gphoto2 --list-files`` (timed on its own: it finds the file's number) and
  ``gphoto2 --get-file N --filename FILE --force-overwrite``, each a whole process,
  from spawn to exit. When it ends, ``stillctl lock`` closes the lock and waits for
  the service to take the camera back; the next stillsvc copy waits until the device
  is ``ready`` and Root's ``listing`` is false again.

Ratios are of times, stillsvc's over ``gphoto2 --get-file``'s in the same run (below
1: stillsvc is faster), of the medians and round by round; MB/s with MB = 10^6
bytes. A gphoto2 process detects the camera, opens a session and lists the store
before it copies, a ``stillctl get`` process starts Python and imports the client;
the *minus* lines take those out (estimates: differences of medians). The hand-over
is shown from the daemon's own log: "standing back for another program" → the
command running (the runner's Python start included), the command's exit → "device
is back from another program" → the camera's listing done again.

Needs QEMU, the kernel, busybox-static (``qemu_guest.unavailable_reason()``),
systemd-udevd and udevadm, dbus-daemon and gphoto2 on this host: the guest runs the
host's own programs, so ``apt-get install -y --no-install-recommends gphoto2`` here
is what puts gphoto2 in the guest (the script says so when it is missing). About two
minutes with the defaults, one boot; a round that would not fit in ``--timeout`` (240
s) is left out, with a NOTE. No untimed warm-up round (the budget): the rotating
order spreads whatever the first copy of each kind costs more.

Figures measured (three runs of the defaults, A – C; ``nproc`` = 2, Python 3.11.7,
QEMU 7.2 TCG with one vCPU, guest kernel 6.1, gphoto2 2.5.28 / libgphoto2 2.5.30,
libusb 1.0.26; the machine shared with other sessions' work, load average 1.5 –
3.1; times are medians of 3, in seconds):

======================================================  ==================  =====================
figure                                                  A / B / C           × gphoto2 --get-file
======================================================  ==================  =====================
gphoto2 --get-file N, whole process (baseline)          4.69 / 3.70 / 4.56  1.00
gphoto2 --list-files, whole process (no copy)           1.70 / 1.37 / 1.53  0.36 / 0.37 / 0.34
stillsvc: Item.Transfer call → reply                    0.63 / 0.52 / 0.67  **0.13 / 0.14 / 0.15**
stillsvc: open_session … close                          0.72 / 0.62 / 0.74  0.15 / 0.17 / 0.16
stillctl get, whole process                             6.15 / 4.99 / 6.53  **1.31 / 1.35 / 1.43**
MB/s: Item.Transfer / gphoto2 --get-file                107 / 128 / 101     14.3 / 18.1 / 14.7
MB/s: gphoto2's copy alone (get-file − list-files)      22.4 / 28.8 / 22.1  Transfer × 0.21 – 0.22
======================================================  ==================  =====================

Per round, Item.Transfer / gphoto2 --get-file was 0.10 – 0.16, stillctl get / gphoto2
0.97 – 1.64; all 27 copies were byte-exact. An earlier run of the same copies gave
Item.Transfer 0.44 s (151 MB/s), gphoto2 3.50 s (× 0.13), stillctl get × 1.25.

The copy itself goes about seven times faster through the daemon than a gphoto2
process takes, and four to five times faster than gphoto2's copy alone. Under TCG
usb-mtp and the xHCI controller run as QEMU's native code, while everything on the
guest's side is emulated, so the initiator's own work per byte and per request is
what counts: the driver asks for 1 MiB per bulk read and writes it straight into the
file; gphoto2 keeps the whole object in memory before it saves it, and an ``strace``
of one ``gphoto2 --get-file`` (outside this script) counted 413
``USBDEVFS_SUBMITURB`` for the 64 MiB, about 160 KiB a request. Which of the two
costs more was not measured. The whole ``stillctl get`` is slower than gphoto2 by
the 4.5 – 5.9 s of a Python start and the client's imports under TCG (the
*minus* line), which dwarf the transfer; on this host itself a ``stillctl`` that
fails to connect takes 0.25 – 0.35 s.

The hand-over (medians over the three runs): ``stillctl lock`` to the daemon's
"standing back" 4.9 – 5.3 s (stillctl's own start and imports, the session, the
lock, HandOver), then the command spawned 0.02 – 0.03 s later; after the command's
exit, the daemon's "device is back" 0.32 – 0.44 s (claiming the interface again,
OpenSession, storages) and its listing done 0.04 – 0.05 s after that, ``stillctl
lock`` exiting 0.67 – 0.84 s after the command. State was ``held-by-program`` while
gphoto2 ran and ``ready`` after every time, gphoto2 claimed the interface each time
with the daemon still running, and the daemon ended on SIGTERM with status 0, no
traceback and no warning in its log.
"""

from __future__ import annotations

# Only what the --runner needs at the top: under TCG every import costs (a Python start is
# about 1.5 s), and the runner is started inside the hand-over.
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
for _p in (REPO, REPO / "tests", REPO / "bench"):
    if str(_p) not in sys.path:
        sys.path.insert(0, str(_p))

MB = 1e6
DEFAULT_SIZE = 64 << 20
NAME = "big.bin"
STORAGE = "store-00010001"  # usb-mtp's one storage
ITEM_PATH = f"Root/{STORAGE}/{NAME}"
WORK = "/run/ptp-bench"  # in the guest: a tmpfs
GPHOTO2_INSTALL = "apt-get install -y --no-install-recommends gphoto2"
METHODS = ("transfer", "stillctl", "gphoto2")

clock = time.perf_counter


def sha256_file(path: str | os.PathLike[str]) -> str:
    import hashlib

    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


def out(kind: str, **data: Any) -> None:
    print(f"{kind} {json.dumps(data, sort_keys=True)}", flush=True)


# -- inside the lock: the gphoto2 runner (stdlib only: it starts under TCG) ---------------------

def runner(target: str, name: str) -> int:
    """``stillctl lock``'s command: say so, wait for "go" on stdin, time the two gphoto2 runs."""
    now = time.time()
    try:  # when this process was spawned: its start time in /proc (clock ticks after boot)
        with open("/proc/self/stat") as f:
            ticks = int(f.read().rsplit(")", 1)[1].split()[19])
        with open("/proc/uptime") as f:
            spawned = now - float(f.read().split()[0]) + ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        spawned = None
    out("LOCKED", wall=now, spawned_wall=spawned, lock_fd=os.environ.get("STILLSVC_LOCK_FD"),
        device=os.environ.get("STILLSVC_DEVICE"))
    if sys.stdin.readline().strip() != "go":
        return 3
    t0 = clock()
    listing = subprocess.run(["gphoto2", "--list-files"], capture_output=True, text=True, timeout=120,
                             check=False)
    t1 = clock()
    match = re.search(rf"^#(\d+)\s+{re.escape(name)}\s", listing.stdout, re.MULTILINE)
    result: dict[str, Any] = {"list_s": t1 - t0, "list_status": listing.returncode,
                              "list_output": (listing.stdout + listing.stderr)[-1500:],
                              "number": int(match.group(1)) if match else None}
    if match:
        t2 = clock()
        get = subprocess.run(["gphoto2", "--get-file", match.group(1), "--filename", target, "--force-overwrite"],
                             capture_output=True, text=True, timeout=300, check=False)
        t3 = clock()
        result.update(get_s=t3 - t2, get_status=get.returncode, get_output=(get.stdout + get.stderr)[-1500:])
    out("GPHOTO2", **result)
    out("EXITING", wall=time.time())
    return 0 if match and result.get("get_status") == 0 and listing.returncode == 0 else 1


# -- inside the guest: the daemon and the three copies ------------------------------------------

def log_times(log: str, event: str) -> list[float]:
    """Wall-clock times of the daemon's log lines of ``event`` (plain format, ISO time stamps)."""
    from datetime import datetime

    times = []
    for line in log.splitlines():
        if f"event={event!r}" in line or f'event="{event}"' in line:
            stamp = re.search(r"timestamp='([^']+)'", line)
            if stamp:
                times.append(datetime.fromisoformat(stamp.group(1)).timestamp())
    return times


async def guest_main() -> int:
    import asyncio
    import contextlib

    from ptp_guest_script import Process, Stack, poll

    size, sha, repeat = int(os.environ["BENCH_SIZE"]), os.environ["BENCH_SHA256"], int(os.environ["BENCH_REPEAT"])
    budget = float(os.environ["BENCH_BUDGET"])  # seconds this script may take in all
    t_start = time.monotonic()
    py = sys.executable
    stillctl_bin = os.path.join(os.path.dirname(py), "stillctl")
    stillctl = [stillctl_bin] if os.access(stillctl_bin, os.X_OK) else [py, "-m", "stillsvc.ctl"]
    os.makedirs(WORK, exist_ok=True)

    class BenchStack(Stack):
        def start_daemon(self) -> None:  # as the test's, at log level info
            with open(self.daemon_log, "wb") as log:
                self.daemon = subprocess.Popen(
                    [py, "-m", "stillsvc.daemon", "--bus", self.address, "--udev", "--no-sane",
                     "--runtime-dir", os.path.join(WORK, "run"), "--state-dir", os.path.join(WORK, "state"),
                     "--log-level", "info", "--log-format", "plain"],
                    stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"})

    stack = BenchStack()
    client = None
    try:
        udev = stack.start_udev()
        address = stack.start_bus()
        spawned = time.monotonic()
        stack.start_daemon()
        from stillsvc.client import Client, NotFound  # while the daemon imports

        if not poll("ready", lambda: "event='service ready'" in stack.log() or stack.daemon.poll() is not None,
                    90, pause=0.25) or stack.daemon.poll() is not None:
            out("FAIL", why="the daemon did not get ready", log=stack.log()[-3000:])
            return 1
        client = await Client(address).connect()
        device_id = ""
        deadline = time.monotonic() + 60
        while not device_id and time.monotonic() < deadline:
            device_id = next((d.id for d in await client.manager.devices() if d.driver == "ptp"), "")
            if not device_id:
                await asyncio.sleep(0.3)
        if not device_id:
            out("FAIL", why="no ptp device", devices=[d.as_dict() for d in await client.manager.devices()])
            return 1
        device = await client.manager.find_device(device_id)

        async def state() -> str:
            try:
                return (await device.info()).state
            except NotFound:
                return "gone"

        async def ready_for_copy(timeout: float = 60.0) -> float:
            """Until State is ready, Root's listing is done and the item is in the tree; seconds."""
            t0 = time.monotonic()
            limit = t0 + timeout
            while True:
                if await state() == "ready":
                    session = await client.manager.open_session(device_id, "status")
                    async with session:
                        values = await (await session.root()).read()
                        listing = values.get("listing")
                        listing = getattr(listing, "value", listing)
                        if listing is False and any(i.item_path == ITEM_PATH for i in await session.items()):
                            return time.monotonic() - t0
                if time.monotonic() > limit:
                    raise RuntimeError(f"{device_id} not ready with {ITEM_PATH} listed after {timeout} s "
                                       f"(state {await state()})")
                await asyncio.sleep(0.2)

        listed = await ready_for_copy(90)
        out("READY", device=device_id, daemon_start_s=round(time.monotonic() - spawned - listed, 2),
            listing_s=round(listed, 2), stillctl=stillctl, udev={k: udev.get(k, "") for k in (
                "ID_USB_INTERFACES", "ID_VENDOR_ID", "ID_MODEL_ID", "GPHOTO2_DRIVER", "BUSNUM", "DEVNUM")})

        def checked(path: str) -> str | None:
            try:
                return sha256_file(path)
            except OSError:
                return None
            finally:
                with contextlib.suppress(OSError):
                    os.unlink(path)

        async def by_transfer(k: int) -> dict[str, Any]:
            waited = await ready_for_copy()
            target = os.path.join(WORK, f"transfer-{k}.bin")
            t_open = clock()
            session = await client.manager.open_session(device_id, "data", wait=30)
            async with session:
                item = await session.item(ITEM_PATH)
                t0 = clock()
                summary = await item.transfer(target, "native")
                t1 = clock()
            t_closed = clock()
            got = checked(target)
            return {"s": t1 - t0, "session_s": t_closed - t_open, "bytes": summary.bytes,
                    "ok": got == sha and summary.bytes == size, "sha256": got, "waited_s": waited}

        async def by_stillctl(k: int) -> dict[str, Any]:
            waited = await ready_for_copy()
            target = os.path.join(WORK, f"stillctl-{k}.bin")
            argv = [*stillctl, "--bus", address, "get", f"{device_id}/{ITEM_PATH}", "-o", target]
            t0 = clock()
            proc = await asyncio.to_thread(subprocess.run, argv, capture_output=True, text=True, timeout=300)
            t1 = clock()
            got = checked(target)
            return {"s": t1 - t0, "status": proc.returncode, "ok": proc.returncode == 0 and got == sha,
                    "sha256": got, "stderr": proc.stderr[-1000:], "waited_s": waited}

        async def by_gphoto2(k: int) -> dict[str, Any]:
            target = os.path.join(WORK, f"gphoto2-{k}.bin")
            argv = [*stillctl, "--bus", address, "lock", "--timeout", "60", device_id, "--",
                    py, str(Path(__file__).resolve()), "--runner", target, NAME]
            t0, wall0 = clock(), time.time()
            lock = Process(argv)
            record: dict[str, Any] = {"ok": False}
            try:
                line = await asyncio.to_thread(lock.wait_line, "stdout", lambda s: s.startswith("LOCKED "), 90)
                if line is None:
                    record.update(why="the command under stillctl lock did not start",
                                  stderr=lock.lines["stderr"][-20:], stdout=lock.lines["stdout"][-20:])
                    return record
                t_locked = clock()
                locked = json.loads(line[7:])
                record.update(lock_started_wall=wall0, command_started_wall=locked["wall"],
                              command_spawned_wall=locked["spawned_wall"], lock=locked,
                              state_during=await state(), to_command_s=t_locked - t0)
                lock.send("go")
                line = await asyncio.to_thread(lock.wait_line, "stdout", lambda s: s.startswith("GPHOTO2 "), 400)
                if line is None:
                    record.update(why="no gphoto2 result", stderr=lock.lines["stderr"][-20:])
                    return record
                record.update(json.loads(line[8:]))
                line = await asyncio.to_thread(lock.wait_line, "stdout", lambda s: s.startswith("EXITING "), 30)
                record["command_exit_wall"] = json.loads(line[8:])["wall"] if line else None
                status = await asyncio.to_thread(lock.proc.wait, 90)
                t_end = clock()
                await asyncio.to_thread(lock.wait_line, "stderr", lambda s: False, 0.2)  # collect what is left
                got = checked(target)
                record.update(lock_status=status, lock_s=t_end - t0, after_lock_s=t_end - t_locked,
                              state_after=await state(), sha256=got, lock_stderr=lock.lines["stderr"][-10:],
                              ok=status == 0 and got == sha and record.get("get_status") == 0)
                return record
            finally:
                if lock.proc.poll() is None:
                    lock.stop()

        copies = {"transfer": by_transfer, "stillctl": by_stillctl, "gphoto2": by_gphoto2}
        for k in range(repeat):
            t_round = time.monotonic()
            order = METHODS[k % 3:] + METHODS[:k % 3]
            for method in order:
                record = await copies[method](k)
                out("RESULT", method=method, round=k, **record)
                if not record.get("ok"):
                    out("FAIL", why=f"{method} copy of round {k} failed")
                    return 1
            elapsed, took = time.monotonic() - t_start, time.monotonic() - t_round
            out("ROUND", round=k, seconds=round(took, 1), elapsed=round(elapsed, 1))
            if k + 1 < repeat and elapsed + 1.3 * took + 10 > budget:
                out("SHORT", why=f"stopping after {k + 1} of {repeat} rounds: the next would not fit in "
                                 f"{budget:.0f} s", rounds=k + 1)
                break
        return 0
    finally:
        if client is not None:
            client.disconnect()
        status = stack.stop_daemon()
        log = stack.log()
        stands, backs, listed = (log_times(log, e) for e in ("standing back for another program",
                                                             "device is back from another program",
                                                             "camera's pictures listed"))
        problems = [line for line in log.splitlines() if re.search(r"level='(warning|error|critical)'", line)]
        out("DAEMON", exit_status=status, tracebacks=log.count("Traceback"), problems=problems[-10:],
            standing_back=stands, back=backs, listed=listed, log_tail=log[-2500:])
        stack.stop()
        out("DONE")


# -- on the host ---------------------------------------------------------------------------------

def unavailable() -> str | None:
    import shutil

    from qemu_guest import unavailable_reason

    reason = unavailable_reason()
    if reason is not None:
        return f"the QEMU guest cannot run here: {reason}"
    if shutil.which("udevadm") is None or not any(
            os.path.exists(p) for p in ("/lib/systemd/systemd-udevd", "/usr/lib/systemd/systemd-udevd")):
        return "no systemd-udevd and udevadm for the guest (Debian package udev)"
    if shutil.which("dbus-daemon") is None:
        return "no dbus-daemon for the guest (Debian package dbus-daemon)"
    if shutil.which("gphoto2") is None:
        return (f"gphoto2 is not installed (the baseline; the guest runs this host's programs). "
                f"Install it with: {GPHOTO2_INSTALL}")
    return None


def gphoto2_version() -> str:
    try:
        text = subprocess.run(["gphoto2", "--version"], capture_output=True, text=True, timeout=30,
                              check=False).stdout
    except (OSError, subprocess.TimeoutExpired):
        return "?"
    gp = re.search(r"^gphoto2\s+(\S+)", text, re.MULTILINE)
    lib = re.search(r"^libgphoto2\s+(\S+)", text, re.MULTILINE)
    return f"gphoto2 {gp.group(1) if gp else '?'}, libgphoto2 {lib.group(1) if lib else '?'}"


def run_guest(size: int, repeat: int, timeout: float, verbose: bool) -> dict[str, Any]:
    import shutil
    import tempfile

    from qemu_guest import Guest, GuestError

    workdir = Path(tempfile.mkdtemp(prefix="stillsvc-bench-ptp-qemu-"))
    try:
        camera = workdir / "camera"
        camera.mkdir()
        with open(camera / NAME, "wb") as f:
            left = size
            while left:
                block = os.urandom(min(left, 1 << 20))
                f.write(block)
                left -= len(block)
        sha = sha256_file(camera / NAME)
        records: list[tuple[str, dict[str, Any]]] = []

        def on_line(line: str) -> None:
            kind, _, rest = line.partition(" ")
            if kind in ("READY", "RESULT", "ROUND", "SHORT", "FAIL", "DAEMON"):
                data = json.loads(rest)
                records.append((kind, data))
                if verbose and kind != "DAEMON":
                    brief = {k: v for k, v in data.items() if not k.endswith(("output", "stderr", "log_tail"))}
                    print(f"[guest] {kind} {json.dumps(brief)[:300]}", file=sys.stderr, flush=True)

        t0 = time.monotonic()
        env = {"BENCH_SIZE": str(size), "BENCH_SHA256": sha, "BENCH_REPEAT": str(repeat),
               "BENCH_BUDGET": str(timeout - 20)}
        with Guest(camera, timeout=timeout) as guest:
            running = guest.start([sys.executable, str(Path(__file__).resolve()), "--guest"], env=env,
                                  on_line=on_line)
            result = running.result()
        seconds = time.monotonic() - t0
        if (camera / NAME).stat().st_size != size or sha256_file(camera / NAME) != sha:
            raise RuntimeError("the host's file changed during the run")
        report: dict[str, Any] = {"size": size, "repeat": repeat, "sha256": sha, "run_s": seconds,
                                  "boot_s": result.boot_seconds, "gphoto2": gphoto2_version(),
                                  "results": [], "rounds": []}
        for kind, data in records:
            if kind == "RESULT":
                report["results"].append(data)
            elif kind == "ROUND":
                report["rounds"].append(data)
            else:
                report[kind.lower()] = data
        if result.returncode != 0 or "fail" in report or not report["results"]:
            raise GuestError(f"the guest's run failed: {report.get('fail')}\n{result.describe()}")
        return report
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def print_report(report: dict[str, Any]) -> None:
    import statistics

    from roundtrip import table

    size = report["size"]
    by: dict[str, list[dict[str, Any]]] = {m: [r for r in report["results"] if r["method"] == m] for m in METHODS}
    rounds = min(len(v) for v in by.values())
    ready = report.get("ready", {})
    print(f"QEMU usb-mtp in a TCG guest (1 vCPU): {NAME}, {size:,} random bytes ({size / MB:.1f} MB); "
          f"{rounds} rounds, the order rotating; MB = 10^6 bytes")
    print(f"boot {report['boot_s']:.1f} s to the command; daemon ready with the camera listed "
          f"{ready.get('daemon_start_s', 0) + ready.get('listing_s', 0):.1f} s after its start; whole run "
          f"{report['run_s']:.0f} s; {report['gphoto2']}; device {ready.get('device')}")
    if "short" in report:
        print(f"NOTE: {report['short']['why']}")
    series = {
        "gphoto2": [r["get_s"] for r in by["gphoto2"]],
        "transfer": [r["s"] for r in by["transfer"]],
        "session": [r["session_s"] for r in by["transfer"]],
        "stillctl": [r["s"] for r in by["stillctl"]],
        "list": [r["list_s"] for r in by["gphoto2"]],
    }
    base = statistics.median(series["gphoto2"])
    labels = [("gphoto2", "gphoto2 --get-file N, whole process (baseline)"),
              ("transfer", "stillsvc: Item.Transfer call -> reply"),
              ("session", "stillsvc: open_session ... close, around it"),
              ("stillctl", "stillctl get DEVICE/ITEM -o FILE, whole process"),
              ("list", "gphoto2 --list-files, whole process (no copy)")]
    rows = []
    for key, label in labels:
        values = sorted(series[key])
        med = statistics.median(values)
        rows.append([label, f"{med:.2f}", f"{values[0]:.2f}", f"{values[-1]:.2f}",
                     "-" if key == "list" else f"{size / MB / med:.1f}", f"{med / base:.2f}"])
    print()
    table(["", "median s", "min s", "max s", "MB/s", "time × gphoto2"], rows)
    for key, label in (("transfer", "Item.Transfer"), ("stillctl", "stillctl get")):
        ratios = sorted(a / b for a, b in zip(series[key], series["gphoto2"]))
        print(f"{label} / gphoto2 --get-file per round: min {ratios[0]:.2f}, median {statistics.median(ratios):.2f}, "
              f"max {ratios[-1]:.2f}")
    copy_alone = base - statistics.median(series["list"])
    print(f"gphoto2's copy alone (get-file minus list-files, medians): {copy_alone:.2f} s, "
          f"{size / MB / copy_alone:.1f} MB/s; Item.Transfer takes × {statistics.median(series['transfer']) / copy_alone:.2f} of it")
    print(f"stillctl get's process around the transfer (stillctl get minus Item.Transfer, medians): "
          f"{statistics.median(series['stillctl']) - statistics.median(series['transfer']):.2f} s")
    copies = [r for r in report["results"]]
    good = sum(1 for r in copies if r.get("ok"))
    print(f"byte-exact: {good} of {len(copies)} copies have the host file's sha256 ({report['sha256'][:16]}…)")

    g = by["gphoto2"]
    daemon = report.get("daemon", {})
    stands, backs, listed = daemon.get("standing_back", []), daemon.get("back", []), daemon.get("listed", [])
    steps: dict[str, list[float]] = {k: [] for k in ("stand", "spawn", "python", "back", "listed", "exit")}
    for r in g:
        start, spawned, running, end = (r.get(k) for k in ("lock_started_wall", "command_spawned_wall",
                                                           "command_started_wall", "command_exit_wall"))
        stand = next((x for x in stands if start <= x <= running), None)
        if stand is not None:
            steps["stand"].append(stand - start)
            if spawned is not None:
                steps["spawn"].append(max(0.0, spawned - stand))
        if spawned is not None:
            steps["python"].append(running - max(spawned, stand or spawned))
        back = next((x for x in backs if end and x >= end), None)
        if back is not None:
            steps["back"].append(back - end)
            again = next((x for x in listed if x >= back), None)
            if again is not None:
                steps["listed"].append(again - back)
        if end is not None:
            steps["exit"].append(r["after_lock_s"] - (end - running))
    print(f"\nHand-over: stillctl lock DEVICE -- RUNNER (gphoto2 --list-files; gphoto2 --get-file N), {len(g)} times; "
          "the daemon kept running")
    states = sorted({str(r.get("state_during")) for r in g})
    after_states = sorted({str(r.get("state_after")) for r in g})
    print(f"device State while the command ran: {', '.join(states)}; after stillctl lock returned: "
          f"{', '.join(after_states)}; gphoto2 claimed the interface and copied {sum(r.get('get_status') == 0 for r in g)}"
          f" of {len(g)} times; in the daemon's log {len(stands)} 'standing back for another program', "
          f"{len(backs)} 'device is back from another program'")

    def med(values: list[float]) -> str:
        return f"{statistics.median(values):.2f}" if values else "-"

    rows = [["stillctl lock spawned -> daemon logs 'standing back' (stillctl's start, session, lock, HandOver)",
             med(steps["stand"])],
            ["'standing back' -> the command spawned", med(steps["spawn"])],
            ["the command spawned -> running (the runner's Python start)", med(steps["python"])],
            ["the command's exit -> daemon logs 'device is back' (reclaim: interface, session, storages)",
             med(steps["back"])],
            ["'device is back' -> the camera's pictures listed again", med(steps["listed"])],
            ["the command's exit -> stillctl lock exited", med(steps["exit"])],
            ["stillctl lock, whole process (gphoto2 twice included)", med([r["lock_s"] for r in g])]]
    table(["", "median s"], rows)
    print(f"\ndaemon: exit status {daemon.get('exit_status')} on SIGTERM, {daemon.get('tracebacks', '?')} tracebacks, "
          f"{len(daemon.get('problems', []))} warning/error lines in its log")
    for line in daemon.get("problems", []):
        print(f"  {line[:200]}")


def main(argv: list[str] | None = None) -> int:
    args_in = sys.argv[1:] if argv is None else argv
    if args_in[:1] == ["--runner"]:
        return runner(args_in[1], args_in[2])
    import argparse
    import asyncio

    if args_in[:1] == ["--guest"]:
        return asyncio.run(guest_main())
    parser = argparse.ArgumentParser(description="A large file off QEMU's usb-mtp: stillsvc against gphoto2.")
    parser.add_argument("--size", type=int, default=DEFAULT_SIZE, metavar="BYTES",
                        help=f"the file's size (default {DEFAULT_SIZE:,}, 64 MiB)")
    parser.add_argument("--repeat", type=int, default=3, help="rounds of the three copies (default 3)")
    parser.add_argument("--timeout", type=float, default=240.0, metavar="S",
                        help="seconds for the whole guest run; rounds that would not fit are left out (default 240)")
    parser.add_argument("--quiet", action="store_true", help="no progress lines on stderr")
    parser.add_argument("--json", action="store_true", help="print one JSON document instead of tables")
    args = parser.parse_args(args_in)
    if args.size < 1 or args.repeat < 1:
        parser.error("--size and --repeat must be at least 1")
    reason = unavailable()
    if reason is not None:
        sys.exit(f"ptp_qemu: {reason}")
    from roundtrip import emit

    report = run_guest(args.size, args.repeat, args.timeout, not args.quiet)
    emit(report, True, args.json, print_report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
