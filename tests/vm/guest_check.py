"""The system check that runs inside the test machine (see README.md here).

Started at boot by stillsvc-vm-check.service as root, on a Debian system where
stillsvc was installed with ``make install`` and ``make install-python`` and
nothing else was set up by hand except: a drop-in that adds ``--simulate`` to
the service's command line, two users (alice, who a polkit rule allows to use
devices, and bob, who gets no rule), and the stillsvc-vm-check units.

Each check appends one JSON line ``{"check", "directive", "ok", "detail"}`` to
the virtio port org.stillsvc.vmcheck, which the host script reads. The machine
powers off when the check ends.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time
import traceback
from pathlib import Path

HERE = Path(__file__).resolve().parent
PORT = "/dev/virtio-ports/org.stillsvc.vmcheck"
UNIT = "stillsvc.service"
BUS_NAME = "org.stillsvc.StillImage1"
ROOT_PATH = "/org/stillsvc/StillImage1"
MANAGER = f"{BUS_NAME}.Manager"
SIMULATOR = f"{BUS_NAME}.Simulator"
SIM_PATH = f"{ROOT_PATH}/devices/sim0"
INSTALLED_UNIT = Path("/usr/lib/systemd/system") / UNIT
RUNTIME_UNITS = Path("/run/systemd/system")

out = open(PORT, "w", buffering=1) if os.path.exists(PORT) else sys.stdout


def report(check: str, directive: str, ok: bool, detail: str = "") -> None:
    line = json.dumps({"check": check, "directive": directive, "ok": bool(ok), "detail": detail})
    out.write(line + "\n")
    if out is not sys.stdout:
        print(("ok   " if ok else "FAIL ") + check + (f": {detail}" if detail else ""), flush=True)


def check(name: str, directive: str = ""):
    """Decorator: run a check now; it returns (ok, detail) or raises (a failure)."""

    def wrap(fn):
        try:
            ok, detail = fn()
        except Exception as e:
            ok, detail = False, f"{type(e).__name__}: {e}\n{traceback.format_exc(limit=4)}"
        report(name, directive, ok, detail)
        return fn

    return wrap


def run(*cmd: str, user: str | None = None, check: bool = False, timeout: float = 120,
        env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    argv = list(cmd)
    if user is not None:
        argv = ["runuser", "-u", user, "--", *argv]
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})})
    if check and proc.returncode != 0:
        raise RuntimeError(f"{shlex.join(argv)} exited {proc.returncode}: {proc.stderr.strip() or proc.stdout.strip()}")
    return proc


def wait_for(what: str, predicate, timeout: float = 60.0, interval: float = 0.2):
    """Poll predicate until it returns something true; raise TimeoutError naming what."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what} (after {timeout:.0f} s)")
        time.sleep(interval)


def show(unit: str, *props: str) -> dict[str, str]:
    text = run("systemctl", "show", unit, *(f"--property={p}" for p in props), check=True).stdout
    return dict(line.split("=", 1) for line in text.splitlines() if "=" in line)


def main_pid() -> int:
    return int(show(UNIT, "MainPID")["MainPID"])


def status_of(pid: int) -> dict[str, str]:
    return dict(line.split(":\t", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines() if ":\t" in line)


def bus_owner_pid() -> int | None:
    proc = run("busctl", "--system", "call", "org.freedesktop.DBus", "/org/freedesktop/DBus", "org.freedesktop.DBus",
               "GetConnectionUnixProcessID", "s", BUS_NAME)
    return int(proc.stdout.split()[1]) if proc.returncode == 0 else None


def stillctl(*args: str, user: str = "alice", timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return run("stillctl", *args, user=user, timeout=timeout)


def journal(unit: str, since: str | None = None) -> str:
    return run("journalctl", "--no-pager", "-o", "cat", "-u", unit, *(["--since", since] if since else [])).stdout


def still_image_usb_device() -> Path | None:
    for dev in Path("/sys/bus/usb/devices").iterdir():
        if (dev / "bDeviceClass").exists():
            for intf in dev.glob(f"{dev.name}:*"):
                if (intf / "bInterfaceClass").read_text().strip() == "06":
                    return dev
    return None


# --- installation, boot and udev ---------------------------------------------------


@check("sysusers made the user stillsvc with the device groups", "stillsvc.sysusers")
def _():
    ident = run("id", "stillsvc", check=True).stdout.strip()
    return all(f"({g})" in ident for g in ("stillsvc", "scanner", "lp", "dialout")), ident


@check("udev marks the still-image USB device and gives it to the service", "70-stillsvc.rules")
def _():
    dev = wait_for("a USB device with a still-image interface", still_image_usb_device, 30)
    run("udevadm", "settle", "--timeout=30")
    props = dict(line.split("=", 1) for line in run("udevadm", "info", "--query=property", f"--path={dev}",
                                                    check=True).stdout.splitlines())
    node = Path(props["DEVNAME"])
    st = node.stat()
    import grp

    group = grp.getgrgid(st.st_gid).gr_name
    ok = (props.get("ID_STILLSVC") == "1" and "systemd" in props.get("TAGS", "")
          and "stillsvc.service" in props.get("SYSTEMD_WANTS", "") and group == "stillsvc"
          and oct(st.st_mode & 0o777) == "0o660")
    return ok, (f"{node}: ID_STILLSVC={props.get('ID_STILLSVC')}, SYSTEMD_WANTS={props.get('SYSTEMD_WANTS')}, "
                f"group {group}, mode {oct(st.st_mode & 0o777)}")


@check("the service was started at boot by the device (it is not enabled)", "udev TAG+=systemd, SYSTEMD_WANTS")
def _():
    enabled = run("systemctl", "is-enabled", UNIT).stdout.strip()
    wait_for("stillsvc.service active", lambda: show(UNIT, "ActiveState")["ActiveState"] == "active", 90)
    return enabled != "enabled", f"is-enabled: {enabled}, active"


@check("the daemon owns the bus name and is the unit's main process", "Type=dbus BusName=")
def _():
    pid = main_pid()
    owner = bus_owner_pid()
    return pid > 0 and owner == pid, f"MainPID {pid}, name owner pid {owner}"


@check("the running daemon: user stillsvc, no privileges, seccomp, own mount and UTS namespaces",
       "User= NoNewPrivileges= CapabilityBoundingSet= SystemCallFilter= ProtectSystem= ProtectHostname=")
def _():
    pid = main_pid()
    st = status_of(pid)
    import pwd

    user = pwd.getpwuid(int(st["Uid"].split()[0])).pw_name
    mnt = os.readlink(f"/proc/{pid}/ns/mnt") != os.readlink("/proc/1/ns/mnt")
    uts = os.readlink(f"/proc/{pid}/ns/uts") != os.readlink("/proc/1/ns/uts")
    cmd = Path(f"/proc/{pid}/cmdline").read_text().replace("\0", " ").strip()
    ok = (user == "stillsvc" and st["NoNewPrivs"] == "1" and st["Seccomp"] == "2"
          and int(st["CapEff"], 16) == 0 and int(st["CapBnd"], 16) == 0 and mnt and uts and "python3" in cmd)
    return ok, (f"{cmd!r}: user {user}, NoNewPrivs {st['NoNewPrivs']}, Seccomp {st['Seccomp']}, "
                f"CapEff {st['CapEff']}, CapBnd {st['CapBnd']}, own mount ns {mnt}, own UTS ns {uts}")


@check("systemd-analyze verify is silent on the installed units", "")
def _():
    proc = run("systemd-analyze", "verify", str(INSTALLED_UNIT))
    user = run("systemd-analyze", "--user", "verify", "/usr/lib/systemd/user/stillsvc-agent.service",
               env={"XDG_RUNTIME_DIR": "/run"})
    text = (proc.stdout + proc.stderr + user.stdout + user.stderr).strip()
    return proc.returncode == 0 and user.returncode == 0 and not text, text or "silent"


@check("systemd-analyze security rates the service", "")
def _():
    proc = run("systemd-analyze", "security", "--no-pager", UNIT)
    m = re.search(r"Overall exposure level for \S+: ([\d.]+) (\S+)", proc.stdout)
    return bool(m) and float(m.group(1)) < 3.0, m.group(0) if m else proc.stdout[-300:]


# --- every hardening directive, probed from inside the service's sandbox ------------

PROBE_UNIT = "stillsvc-probe.service"
PROBE_OUTPUT = "/run/stillsvc-probe.jsonl"
START_UP_KEYS = ("Type=", "BusName=", "ExecStart=", "Restart=", "WatchdogSec=", "NotifyAccess=")


def service_python() -> str:
    """The interpreter the service runs on: the #! line of its ExecStart= command."""
    text = INSTALLED_UNIT.read_text()
    command = re.search(r"^ExecStart=(\S+)", text, re.M).group(1)
    return Path(command).read_text().splitlines()[0].removeprefix("#!").strip()


def probe_unit_text() -> str:
    """stillsvc.service with only its start-up lines replaced: the sandbox is the same."""
    lines = []
    for line in INSTALLED_UNIT.read_text().splitlines():
        if line.startswith(START_UP_KEYS):
            continue
        if line.strip() == "[Install]":
            break
        lines.append(line)
        if line.strip() == "[Service]":
            lines += ["Type=oneshot", f"ExecStart={service_python()} {HERE / 'sandbox_probe.py'}",
                      f"StandardOutput=truncate:{PROBE_OUTPUT}"]
    return "\n".join(lines) + "\n"


@check("the emulated devices are there: still-image USB device, USB serial adapter, second serial port", "")
def _():
    def present():
        return all(os.path.exists(p) for p in ("/dev/ttyUSB0", "/dev/ttyS1")) and still_image_usb_device()
    try:
        wait_for("/dev/ttyUSB0, /dev/ttyS1 and the USB camera", present, 30)
    except TimeoutError as e:
        usb = {d.name: ((d / "idVendor").read_text().strip(), (d / "product").read_text().strip()
                        if (d / "product").exists() else "")
               for d in Path("/sys/bus/usb/devices").iterdir() if (d / "idVendor").exists()}
        return False, f"{e}; USB devices {usb}; ttyUSB: {sorted(str(p) for p in Path('/dev').glob('ttyUSB*'))}"
    return True, "/dev/ttyUSB0, /dev/ttyS1, " + still_image_usb_device().name


def probe_sandbox() -> None:
    run("systemctl", "stop", UNIT, check=True)  # they share RuntimeDirectory=
    RUNTIME_UNITS.mkdir(parents=True, exist_ok=True)
    (RUNTIME_UNITS / PROBE_UNIT).write_text(probe_unit_text())
    for tmp in ("/tmp", "/var/tmp"):
        Path(tmp, "stillsvc-vm-host-marker").write_text("outside the sandbox\n")
    run("systemctl", "daemon-reload", check=True)
    proc = run("systemctl", "start", PROBE_UNIT, timeout=300)
    results = [json.loads(line) for line in Path(PROBE_OUTPUT).read_text().splitlines() if line.startswith("{")]
    report("the probe ran as a copy of stillsvc.service", "all", proc.returncode == 0 and len(results) > 20,
           f"{len(results)} checks, systemctl start exited {proc.returncode}" + (f": {journal(PROBE_UNIT)[-800:]}"
                                                                                if proc.returncode else ""))
    for r in results:
        report("sandbox: " + r["check"], r["directive"], r["ok"], r["detail"])
    gone = not Path("/dev/shm/stillsvc-probe").exists()
    report("sandbox: the unit's POSIX shared memory is removed when it stops", "RemoveIPC=yes", gone,
           "/dev/shm/stillsvc-probe " + ("removed" if gone else "still there"))
    (RUNTIME_UNITS / PROBE_UNIT).unlink()
    run("systemctl", "daemon-reload", check=True)


try:
    probe_sandbox()
except Exception as e:
    report("the probe ran as a copy of stillsvc.service", "all", False, f"{e}\n{traceback.format_exc(limit=4)}")


# --- D-Bus activation, bus policy and polkit, as users ------------------------------


@check("a call to the stopped service starts it (D-Bus activation through systemd)", "SystemdService=")
def _():
    before = show(UNIT, "ActiveState")["ActiveState"]
    proc = run("busctl", "--system", "call", BUS_NAME, ROOT_PATH, MANAGER, "GetDevices", user="bob")
    after = show(UNIT, "ActiveState")["ActiveState"]
    return before != "active" and proc.returncode == 0 and after == "active", (
        f"{before} -> {after}; GetDevices: {proc.stdout.strip()[:80] or proc.stderr.strip()}")


@check("bob (no polkit rule) may list devices", "bus policy, PUBLIC")
def _():
    proc = stillctl("list", user="bob")
    return proc.returncode == 0 and "sim0" in proc.stdout, proc.stdout.strip() or proc.stderr.strip()


@check("bob may not open a device: AccessDenied names the polkit action", "polkit org.stillsvc.StillImage1.use")
def _():
    proc = stillctl("scan", "sim0", "-o", "/tmp/bob.png", user="bob")
    text = proc.stderr.strip()
    return (proc.returncode != 0 and "org.stillsvc.StillImage1.use" in text
            and not Path("/tmp/bob.png").exists()), text


@check("bob may not own the service's name", "bus policy: own")
def _():
    proc = run("busctl", "--system", "call", "org.freedesktop.DBus", "/org/freedesktop/DBus", "org.freedesktop.DBus",
               "RequestName", "su", BUS_NAME, "4", user="bob")
    return proc.returncode != 0 and "access denied" in (proc.stderr + proc.stdout).lower(), proc.stderr.strip()


@check("alice (polkit rule: use) scans to PNG through a passed file descriptor", "polkit, DeviceAllow, UMask")
def _():
    target = Path("/tmp/alice.png")
    proc = stillctl("scan", "sim0", "-o", str(target), "--resolution", "75", user="alice")
    data = target.read_bytes() if target.exists() else b""
    return proc.returncode == 0 and data.startswith(b"\x89PNG"), (
        f"{len(data)} bytes, owner uid {target.stat().st_uid if data else '-'}" if proc.returncode == 0
        else proc.stderr.strip())


@check("alice may not register a system-wide application (manage is for administrators)",
       "polkit org.stillsvc.StillImage1.manage")
def _():
    proc = stillctl("register", "--system", "nope", "--", "/bin/true", user="alice")
    return proc.returncode != 0 and "org.stillsvc.StillImage1.manage" in proc.stderr, proc.stderr.strip()


@check("stillctl lock hands the device over: the lock file is held while the command runs",
       "RuntimeDirectory= RuntimeDirectoryMode=0755")
def _():
    script = ("flock --nonblock /run/stillsvc/devices/sim0.lock true && echo free || echo held; "
              "stat -c %a /run/stillsvc")
    proc = stillctl("lock", "sim0", "--", "sh", "-c", script, user="alice")
    lines = proc.stdout.split()
    return proc.returncode == 0 and lines[:1] == ["held"] and lines[-1:] == ["755"], (
        proc.stdout.strip() or proc.stderr.strip())


LAUNCHED = "/run/stillsvc/vmcheck-launched"


@check("root registers a system-wide application; a button press starts it inside the sandbox",
       "NoNewPrivileges= RestrictSUIDSGID= SystemCallFilter= (fork and exec)")
def _():
    command = ["/bin/sh", "-c", f"echo %d %e $(id -un) > {LAUNCHED}"]
    run("stillctl", "register", "--system", "vmcheck", "--events", "scan-button", "--", *command, check=True)
    run("busctl", "--system", "call", BUS_NAME, SIM_PATH, SIMULATOR, "PressButton", "s", "scan", check=True)
    text = wait_for(LAUNCHED, lambda: Path(LAUNCHED).exists() and Path(LAUNCHED).read_text().strip(), 30)
    return text == "sim0 scan-button stillsvc", text


@check("a registration survives a restart of the service", "StateDirectory=")
def _():
    run("systemctl", "restart", UNIT, check=True)
    proc = run("stillctl", "apps", check=True)
    files = sorted(p.name for p in Path("/var/lib/stillsvc").iterdir())
    return "vmcheck" in proc.stdout, f"state folder {files}"


AGENT_LAUNCHED = "/tmp/stillsvc-vm-agent-launched"


@check("alice's agent (the stillsvc-agent user unit) starts her application on a button press",
       "systemd/stillsvc-agent.service")
def _():
    run("systemctl", "--global", "enable", "stillsvc-agent.service", check=True)
    run("loginctl", "enable-linger", "alice", check=True)  # starts her user manager without a login
    user_env = {"XDG_RUNTIME_DIR": "/run/user/1000"}

    def agent_state():
        return run("systemctl", "--user", "is-active", "stillsvc-agent.service", user="alice", env=user_env
                   ).stdout.strip()
    wait_for("alice's stillsvc-agent.service active", lambda: agent_state() == "active", 90)
    proc = stillctl("register", "photos", "--events", "copy-button", "--",
                    "/bin/sh", "-c", f"echo %d %e $(id -un) > {AGENT_LAUNCHED}", user="alice")
    if proc.returncode != 0:
        return False, proc.stderr.strip()
    # the agent registers with the service when it starts; it may still be on its way
    def pressed_and_launched():
        run("busctl", "--system", "call", BUS_NAME, SIM_PATH, SIMULATOR, "PressButton", "s", "copy", check=True)
        try:
            return wait_for(AGENT_LAUNCHED, lambda: Path(AGENT_LAUNCHED).exists()
                            and Path(AGENT_LAUNCHED).read_text().strip(), 5)
        except TimeoutError:
            return ""
    text = wait_for("the application started by alice's agent", pressed_and_launched, 60, interval=0)
    return text == "sim0 copy-button alice", f"agent {agent_state()}; the application wrote {text!r}"


# --- watchdog and restarts ------------------------------------------------------------

DROP_IN = RUNTIME_UNITS / f"{UNIT}.d" / "vmcheck-watchdog.conf"
WATCHDOG_SEC = 3


def restarts() -> int:
    return int(show(UNIT, "NRestarts")["NRestarts"])


def with_short_watchdog() -> None:
    DROP_IN.parent.mkdir(parents=True, exist_ok=True)
    DROP_IN.write_text(f"[Service]\nWatchdogSec={WATCHDOG_SEC}s\n")
    run("systemctl", "daemon-reload", check=True)
    run("systemctl", "restart", UNIT, check=True)


def replaced(old_pid: int, timeout: float) -> int:
    """Wait until the service runs again with a different main process; its pid."""
    def new_pid():
        state = show(UNIT, "ActiveState", "MainPID")
        pid = int(state["MainPID"])
        return pid if state["ActiveState"] == "active" and pid not in (0, old_pid) else 0
    return wait_for("the service running again with a new main process", new_pid, timeout)


try:
    with_short_watchdog()

    @check(f"a live event loop keeps the watchdog fed (WatchdogSec={WATCHDOG_SEC}s, 4 periods)",
           "WatchdogSec= NotifyAccess=main")
    def _():
        pid, before = main_pid(), restarts()
        start = time.monotonic()
        # the service must stay up with the same process for 4 periods; any restart fails this
        try:
            wait_for("a restart", lambda: main_pid() != pid or restarts() != before, 4 * WATCHDOG_SEC)
        except TimeoutError:
            return True, f"pid {pid} alive after {time.monotonic() - start:.1f} s, NRestarts {restarts()}"
        return False, f"restarted: pid {main_pid()}, NRestarts {restarts()}"

    @check("a hung event loop (SIGSTOP) is killed by the watchdog and restarted", "WatchdogSec= Restart=on-failure")
    def _():
        pid, before = main_pid(), restarts()
        since = time.strftime("%Y-%m-%d %H:%M:%S")
        os.kill(pid, signal.SIGSTOP)
        new = replaced(pid, 10 * WATCHDOG_SEC)
        timeout_logged = "Watchdog timeout" in journal(UNIT, since)
        return restarts() == before + 1 and timeout_logged, (
            f"pid {pid} -> {new}, NRestarts {before} -> {restarts()}, 'Watchdog timeout' logged: {timeout_logged}")

    @check("a crashed daemon (SIGKILL) is restarted", "Restart=on-failure")
    def _():
        pid, before = main_pid(), restarts()
        os.kill(pid, signal.SIGKILL)
        new = replaced(pid, 30)
        return restarts() == before + 1, f"pid {pid} -> {new}, NRestarts {before} -> {restarts()}"
finally:
    DROP_IN.unlink(missing_ok=True)
    run("systemctl", "daemon-reload")


@check("systemctl stop ends it cleanly and it stays stopped", "Restart=on-failure")
def _():
    run("systemctl", "restart", UNIT, check=True)
    run("systemctl", "stop", UNIT, check=True)
    state = show(UNIT, "ActiveState", "Result", "ExecMainStatus")
    ok = state["ActiveState"] == "inactive" and state["Result"] == "success" and state["ExecMainStatus"] == "0"
    return ok, str(state)


out.write(json.dumps({"done": True}) + "\n")
out.flush()
