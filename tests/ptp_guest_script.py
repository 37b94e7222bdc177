"""Runs inside the QEMU guest of tests/test_ptp_qemu.py: the real stillsvc daemon
against QEMU's usb-mtp responder, driven with stillctl.

It starts systemd-udevd (``udevadm trigger --action=add``, ``udevadm settle``:
then pyudev sees usb-mtp with its udev properties), a private dbus-daemon and
``python -m stillsvc.daemon --udev --no-sane``, and prints one line
``CHECK <json>`` per step:

* ``udev``: what udev says of the usb-mtp device (ID_USB_INTERFACES, ...);
* ``list``: ``stillctl --json list``, the device the daemon made of it;
* ``items``: ``stillctl --json items DEVICE`` once the tree holds every object
  placed before boot, with Root's properties (``stillctl props DEVICE/Root``);
* ``props``: ``stillctl --json props DEVICE/ITEM`` of the file at the top;
* ``get``: ``stillctl get DEVICE/ITEM -o FILE``, the copy's sha256;
* ``event``: ``stillctl --json events DEVICE`` (its own process) holds the device in
  data mode; once it says so this script prints ``READY``, the host drops a
  file into the mtp folder, and the first event line that comes (bounded wait);
* ``get-new``: the new file's item copied out, its sha256 and properties;
* ``delete``: ``stillctl delete DEVICE/ITEM`` of the new file, and the items left;
* ``daemon``: the daemon's exit status on SIGTERM, and any traceback in its log.

Then ``DONE``. What it is told comes in the environment (``PTP_*``, set by the
host test). A failed step prints its check with ``"ok": false`` and details.

Speed matters under TCG (no KVM): a Python start costs ~1.5 s and importing
stillctl ~3 s, the daemon's imports ~12 s. So the short stillctl commands run
in this process (``stillsvc.ctl.main.main(argv)``, stdout and stderr captured:
the same code as the ``stillctl`` program), and ``events``, which must be a
process of its own (it holds data mode until SIGTERM), is started early with
its imports done and waits on stdin for its argv.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import selectors
import signal
import subprocess
import sys
import time
from typing import Any

WORK = "/run/ptp-test"
PY = sys.executable
#: A stillctl process that imports everything first, then waits for its argv (a JSON line on stdin).
WARM_STILLCTL = ("import json, sys\nfrom stillsvc.ctl.main import main\nprint('warm', file=sys.stderr, flush=True)\n"
                 "sys.exit(main(json.loads(sys.stdin.readline())))\n")
T0 = time.monotonic()


def out(line: str) -> None:
    print(line, flush=True)


def check(name: str, **data: Any) -> None:
    out("CHECK " + json.dumps({"check": name, "t": round(time.monotonic() - T0, 2), **data}, sort_keys=True))


class Stillctl:
    """stillctl's own main(), in this process, against one bus."""

    def __init__(self, address: str) -> None:
        from stillsvc.ctl.main import main

        self.main = main
        self.address = address

    def __call__(self, *args: str, json_output: bool = True) -> tuple[int, Any, str]:
        stdout, stderr = io.StringIO(), io.StringIO()
        with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
            try:
                code = self.main(["--bus", self.address, *(["--json"] if json_output else []), *args])
            except SystemExit as e:  # argparse
                code = e.code if isinstance(e.code, int) else 2
        text = stdout.getvalue()
        value: Any = text
        if json_output and code == 0 and text.strip():
            value = json.loads(text)
        return code, value, stderr.getvalue()


class Process:
    """A child whose stdout and stderr are read line by line, with bounded waits."""

    def __init__(self, argv: list[str]) -> None:
        self.proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        assert self.proc.stdout is not None and self.proc.stderr is not None
        self.selector = selectors.DefaultSelector()
        self.selector.register(self.proc.stdout, selectors.EVENT_READ, "stdout")
        self.selector.register(self.proc.stderr, selectors.EVENT_READ, "stderr")
        self.pending = {"stdout": b"", "stderr": b""}
        self.lines: dict[str, list[str]] = {"stdout": [], "stderr": []}
        self.seen = {"stdout": 0, "stderr": 0}

    def send(self, line: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(line.encode() + b"\n")
        self.proc.stdin.flush()

    def _pump(self, timeout: float) -> bool:
        if not self.selector.get_map():
            return False
        for key, _ in self.selector.select(timeout):
            chunk = os.read(key.fileobj.fileno(), 65536)  # type: ignore[union-attr]
            if not chunk:
                self.selector.unregister(key.fileobj)
                continue
            *complete, self.pending[key.data] = (self.pending[key.data] + chunk).split(b"\n")
            self.lines[key.data] += [line.decode("utf-8", "replace") for line in complete]
        return True

    def wait_line(self, stream: str, predicate: Any, timeout: float) -> str | None:
        """The next line of ``stream`` (not returned before) for which ``predicate`` is true."""
        deadline = time.monotonic() + timeout
        while True:
            lines = self.lines[stream]
            while self.seen[stream] < len(lines):
                line = lines[self.seen[stream]]
                self.seen[stream] += 1
                if predicate(line):
                    return line
            left = deadline - time.monotonic()
            if left <= 0 or not self._pump(min(left, 0.5)):
                return None

    def stop(self, sig: int = signal.SIGTERM) -> int | None:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            code = self.proc.wait(15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            code = None
        while self._pump(0.1):
            pass
        return code


def is_event(line: str) -> bool:
    try:
        return json.loads(line).get("type") == "event"
    except ValueError:
        return False


class Stack:
    """udevd, dbus-daemon and the daemon."""

    def __init__(self) -> None:
        os.makedirs(WORK, exist_ok=True)
        self.address = ""
        self.bus: subprocess.Popen[str] | None = None
        self.daemon: subprocess.Popen[bytes] | None = None
        self.daemon_log = os.path.join(WORK, "daemon.log")

    def start_udev(self) -> dict[str, str]:
        os.makedirs("/run/udev", exist_ok=True)
        udevd = next((p for p in ("/lib/systemd/systemd-udevd", "/usr/lib/systemd/systemd-udevd")
                      if os.path.exists(p)), "systemd-udevd")
        subprocess.run([udevd, "--daemon"], check=True, timeout=30)
        subprocess.run(["udevadm", "trigger", "--action=add"], check=True, timeout=30)
        subprocess.run(["udevadm", "settle", "--timeout=30"], check=True, timeout=40)
        info = subprocess.run(["udevadm", "info", "--query=property", "/sys/bus/usb/devices/1-1"],
                              check=True, timeout=30, capture_output=True, text=True).stdout
        return dict(line.split("=", 1) for line in info.splitlines() if "=" in line)

    def start_bus(self) -> str:
        self.bus = subprocess.Popen(["dbus-daemon", "--session", "--nofork", "--print-address=1"],
                                    stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        assert self.bus.stdout is not None
        self.address = self.bus.stdout.readline().strip()
        if not self.address:
            raise RuntimeError("dbus-daemon did not start")
        return self.address

    def start_daemon(self) -> None:
        with open(self.daemon_log, "wb") as log:
            self.daemon = subprocess.Popen(
                [PY, "-m", "stillsvc.daemon", "--bus", self.address, "--udev", "--no-sane",
                 "--runtime-dir", os.path.join(WORK, "run"), "--state-dir", os.path.join(WORK, "state"),
                 "--log-level", "debug", "--log-format", "plain"],
                stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"})

    def stop_daemon(self) -> int | None:
        if self.daemon is None:
            return None
        if self.daemon.poll() is None:
            self.daemon.send_signal(signal.SIGTERM)
        try:
            return self.daemon.wait(20)
        except subprocess.TimeoutExpired:
            self.daemon.kill()
            self.daemon.wait()
            return None

    def log(self) -> str:
        try:
            with open(self.daemon_log, encoding="utf-8", errors="replace") as f:
                return f.read()
        except OSError:
            return ""

    def stop(self) -> None:
        self.stop_daemon()
        if self.bus is not None and self.bus.poll() is None:
            self.bus.terminate()
            self.bus.wait(5)


def sha256_of(path: str) -> str | None:
    try:
        with open(path, "rb") as f:
            return hashlib.sha256(f.read()).hexdigest()
    except OSError:
        return None


def tree_of(items: Any) -> Any:
    if not isinstance(items, list):
        return items
    return [{"path": i.get("ItemPath"), "kind": i.get("Kind"), "name": i.get("Name")} for i in items]


def values_of(props: Any) -> Any:
    return {name: p["value"] for name, p in props.items()} if isinstance(props, dict) else props


def poll(what: str, attempt: Any, timeout: float, pause: float = 0.3) -> Any:
    """``attempt()`` until it returns something true, at most ``timeout`` seconds; the last result."""
    deadline = time.monotonic() + timeout
    result = attempt()
    while not result and time.monotonic() < deadline:
        time.sleep(pause)
        result = attempt()
    return result


def main() -> int:
    env = os.environ
    top_name, top_sha = env["PTP_TOP_NAME"], env["PTP_TOP_SHA256"]
    new_name, new_sha = env["PTP_NEW_NAME"], env["PTP_NEW_SHA256"]
    objects = int(env["PTP_OBJECTS"])  # how many objects were placed before boot (folders included)
    event_timeout = float(env.get("PTP_EVENT_TIMEOUT", "25"))
    stack = Stack()
    events: Process | None = None
    try:
        props = stack.start_udev()
        check("udev", ok=props.get("ID_USB_INTERFACES") == ":060101:", properties={k: props.get(k, "") for k in (
            "ID_USB_INTERFACES", "ID_VENDOR_ID", "ID_MODEL_ID", "ID_SERIAL_SHORT", "BUSNUM", "DEVNUM",
            "ID_PATH_TAG", "DEVTYPE", "ID_STILLSVC", "GPHOTO2_DRIVER")})
        address = stack.start_bus()
        spawned = time.time()
        stack.start_daemon()
        # While the daemon imports: stillctl's imports here, and a warm process for `events`.
        events = Process([PY, "-c", WARM_STILLCTL])
        stillctl = Stillctl(address)
        imported = time.time()
        # Asking the bus over and over would slow the daemon's start: its log says when it is ready.
        poll("service ready", lambda: "event='service ready'" in stack.log() or stack.daemon.poll() is not None,
             90, pause=0.25)
        serving = time.time()

        def ready_device() -> dict[str, Any] | None:
            code, devices, _ = stillctl("list")
            return next((d for d in devices if d.get("Driver") == "ptp" and d.get("State") == "ready"), None) \
                if code == 0 else None

        found = poll("device", ready_device, 60)
        if not found:
            check("list", ok=False, last=stillctl("list", "--all"))
            return 1
        device = found["Id"]
        check("list", ok=True, daemon_start_seconds=round(serving - spawned, 2),
              stillctl_import_seconds=round(imported - spawned, 2), device={k: found.get(k) for k in (
            "Id", "Driver", "Kind", "State", "Name", "Port", "Vendor", "Model", "Serial")})

        # The objects are listed in the background: wait until the tree has them all.
        def full_tree() -> Any:
            code, items, _ = stillctl("items", device)
            if code != 0:
                return None
            tree = tree_of(items)
            return tree if sum(i["kind"] in ("file", "picture", "folder") for i in tree) >= objects else None

        tree = poll("tree", full_tree, 30)

        def root_values() -> Any:
            code, root, err = stillctl("props", f"{device}/Root")
            return values_of(root) if code == 0 else {"error": err}

        def listing_done() -> Any:
            values = root_values()
            return values if values.get("listing") is False else None

        # The driver's last word on its listing follows soon after the last object (bounded wait).
        root = poll("listing done", listing_done, 3)
        check("items", ok=bool(tree), items=tree or tree_of(stillctl("items", device)[1]),
              root=root or root_values())
        if not tree:
            return 1

        storage = next(i["path"] for i in tree if i["kind"] == "storage")
        top_item = f"{device}/{storage}/{top_name}"
        code, top_props, err = stillctl("props", top_item)
        check("props", ok=code == 0, item=top_item, values=values_of(top_props) if code == 0 else err)

        target = os.path.join(WORK, "copy-" + top_name)
        code, _, err = stillctl("get", top_item, "-o", target, json_output=False)
        got = sha256_of(target)
        check("get", ok=code == 0 and got == top_sha, status=code, sha256=got, stderr=err.strip())

        # Events: `stillctl events` holds the device in data mode; the host drops a file after READY.
        if events.wait_line("stderr", lambda line: line == "warm", 30) is None:
            check("event", ok=False, why="the stillctl process did not start", stderr=events.lines["stderr"])
            return 1
        events.send(json.dumps(["--bus", address, "--json", "events", device]))
        if events.wait_line("stderr", lambda line: line.startswith("Holding"), 30) is None:
            check("event", ok=False, why="stillctl events did not hold the device", stderr=events.lines["stderr"])
            return 1
        out("READY")
        ready_at = time.monotonic()
        line = events.wait_line("stdout", is_event, event_timeout)
        waited = round(time.monotonic() - ready_at, 2)
        status = events.stop()
        event = json.loads(line) if line else None
        check("event", ok=event is not None and status == 0, waited=waited, event=event, exit_status=status,
              stdout=events.lines["stdout"][-10:], stderr=events.lines["stderr"][-10:])
        events = None
        if event is None:
            return 1

        new_item = f"{device}/{event['data'].get('item', '')}"
        code, new_props, _ = stillctl("props", new_item)
        target = os.path.join(WORK, "copy-" + new_name)
        code, _, err = stillctl("get", new_item, "-o", target, json_output=False)
        got = sha256_of(target)
        check("get-new", ok=code == 0 and got == new_sha, item=new_item, status=code, sha256=got,
              stderr=err.strip(), values=values_of(new_props))

        code, _, err = stillctl("delete", new_item, json_output=False)
        c2, left, err2 = stillctl("items", device)
        check("delete", ok=code == 0, status=code, stderr=err.strip(), items=tree_of(left) if c2 == 0 else err2)
        return 0
    finally:
        if events is not None:
            events.stop(signal.SIGKILL)
        status = stack.stop_daemon()
        log = stack.log()
        at = log.find("Traceback")
        check("daemon", exit_status=status, traceback=log[max(0, at - 2000):at + 4000] if at >= 0 else None,
              log_head=log[:3000], log_tail=log[-4000:])
        stack.stop()
        out("DONE")


if __name__ == "__main__":
    sys.exit(main())
