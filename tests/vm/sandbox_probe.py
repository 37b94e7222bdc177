"""Runs inside the sandbox of stillsvc.service and reports what works there.

guest_check.py starts this as ``stillsvc-probe.service``, a copy of the
installed stillsvc.service with every setting kept (user, groups, directories,
device policy, hardening) and only the start-up lines changed: Type=oneshot and
this script as ExecStart=. Each check does one thing that a hardening directive
must allow (CPython, USB through pyusb, serial ports, the service's folders)
or must stop (writing to /usr, a denied device, a filtered system call), and
records what happened. The report is one JSON object per line on stdout,
``{"check", "directive", "ok", "detail"}``; guest_check.py reads it back.

Only the Python standard library, the service's dependencies and stillsvc
itself are used: what the service can import, this can import.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import json
import mmap
import os
import socket
import stat
import struct
import sys
import tempfile
import termios
import traceback

RESULTS: list[dict] = []

libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)


def record(check: str, directive: str, ok: bool, detail: str = "") -> None:
    RESULTS.append({"check": check, "directive": directive, "ok": bool(ok), "detail": detail})


def probe(check: str, directive: str):
    """Decorator: run the function, record its (ok, detail); an exception fails it."""

    def wrap(fn):
        try:
            ok, detail = fn()
        except Exception as e:  # a probe that crashes is a failed check, with its reason
            ok, detail = False, f"{type(e).__name__}: {e}\n{traceback.format_exc(limit=3)}"
        record(check, directive, ok, detail)
        return fn

    return wrap


def errno_of(fn, *args) -> int:
    """0 if fn(*args) succeeds, else the errno it raised."""
    try:
        fn(*args)
    except OSError as e:
        return e.errno or -1
    return 0


def libc_errno(result: int) -> int:
    return ctypes.get_errno() if result == -1 else 0


def status_field(name: str) -> str:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(name + ":"):
                return line.split(":", 1)[1].strip()
    return ""


def expect_denied(e: int, *allowed: int) -> tuple[bool, str]:
    allowed = allowed or (errno.EPERM,)
    return e in allowed, f"errno {errno.errorcode.get(e, e)}" if e else "succeeded"


# --- who we are -------------------------------------------------------------


@probe("runs as the system user stillsvc, with the device groups", "User= Group= (sysusers)")
def _():
    import grp
    import pwd

    user = pwd.getpwuid(os.getuid()).pw_name
    groups = sorted(grp.getgrgid(g).gr_name for g in os.getgroups())
    need = {"stillsvc", "scanner", "lp", "dialout"}
    return user == "stillsvc" and need <= set(groups) | {grp.getgrgid(os.getgid()).gr_name}, (
        f"user {user}, groups {groups}"
    )


@probe("CPython and the service's dependencies import", "all")
def _():
    from importlib.metadata import version

    import dbus_fast  # noqa: F401
    import PIL.Image  # noqa: F401
    import pyudev  # noqa: F401
    import structlog  # noqa: F401
    import usb.core  # noqa: F401

    import stillsvc.daemon  # noqa: F401

    return True, f"{sys.executable}: Python {sys.version.split()[0]}, dbus-fast {version('dbus-fast')}"


@probe("an image is encoded (Pillow, zlib)", "MemoryDenyWriteExecute=yes")
def _():
    import io

    import PIL.Image

    from stillsvc import imaging  # noqa: F401

    buf = io.BytesIO()
    PIL.Image.new("RGB", (64, 64), (10, 200, 30)).save(buf, "PNG")
    PIL.Image.new("RGB", (64, 64), (10, 200, 30)).save(io.BytesIO(), "JPEG")
    return buf.getvalue().startswith(b"\x89PNG"), f"PNG of {len(buf.getvalue())} bytes"


# --- privileges -------------------------------------------------------------


@probe("no new privileges", "NoNewPrivileges=yes")
def _():
    v = status_field("NoNewPrivs")
    return v == "1", f"NoNewPrivs: {v}"


@probe("no capabilities, bounding set empty", "CapabilityBoundingSet= AmbientCapabilities=")
def _():
    fields = {k: status_field(k) for k in ("CapEff", "CapPrm", "CapBnd", "CapAmb")}
    return all(int(v, 16) == 0 for v in fields.values()), ", ".join(f"{k} {v}" for k, v in fields.items())


@probe("a seccomp filter is in force", "SystemCallFilter= SystemCallArchitectures=native")
def _():
    mode, count = status_field("Seccomp"), status_field("Seccomp_filters")
    return mode == "2", f"Seccomp: {mode}, filters: {count}"


@probe("ptrace (not in @system-service) fails with EPERM", "SystemCallFilter=@system-service")
def _():
    PTRACE_TRACEME = 0
    return expect_denied(libc_errno(libc.ptrace(PTRACE_TRACEME, 0, None, None)))


@probe("setuid bit cannot be set", "RestrictSUIDSGID=yes")
def _():
    path = os.path.join(os.environ.get("STATE_DIRECTORY", "/var/lib/stillsvc"), "probe-suid")
    with open(path, "w"):
        pass
    try:
        return expect_denied(errno_of(os.chmod, path, 0o4755))
    finally:
        os.unlink(path)


@probe("realtime scheduling refused", "RestrictRealtime=yes")
def _():
    e = errno_of(os.sched_setscheduler, 0, os.SCHED_FIFO, os.sched_param(1))
    return expect_denied(e)


@probe("personality cannot be changed", "LockPersonality=yes")
def _():
    READ_IMPLIES_EXEC = 0x0400000
    current = libc.personality(0xFFFFFFFF)
    e = libc_errno(libc.personality(current | READ_IMPLIES_EXEC))
    return expect_denied(e)


@probe("writable+executable memory refused", "MemoryDenyWriteExecute=yes")
def _():
    prot = mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC
    return expect_denied(errno_of(lambda: mmap.mmap(-1, 4096, prot=prot)))


@probe("ctypes calls into libc work (pyusb's libusb backend uses ctypes)", "MemoryDenyWriteExecute=yes")
def _():
    return libc.getpid() == os.getpid(), "ctypes foreign call OK"


@probe("user namespaces cannot be made", "RestrictNamespaces=yes")
def _():
    CLONE_NEWUSER = 0x10000000
    return expect_denied(libc_errno(libc.unshare(CLONE_NEWUSER)))


@probe("hostname cannot be set", "ProtectHostname=yes")
def _():
    name = socket.gethostname().encode()
    return expect_denied(libc_errno(libc.sethostname(name, len(name))))


@probe("the clock cannot be set", "ProtectClock=yes")
def _():
    import time

    e = errno_of(time.clock_settime, time.CLOCK_REALTIME, time.clock_gettime(time.CLOCK_REALTIME))
    return expect_denied(e)


@probe("kernel log unreadable", "ProtectKernelLogs=yes")
def _():
    e_kmsg = errno_of(lambda: open("/dev/kmsg", "rb").close())
    SYSLOG_ACTION_READ_ALL = 3
    buf = ctypes.create_string_buffer(64)
    e_syslog = libc_errno(libc.klogctl(SYSLOG_ACTION_READ_ALL, buf, 64))
    ok = e_kmsg in (errno.EPERM, errno.EACCES, errno.ENOENT) and e_syslog == errno.EPERM
    return ok, f"/dev/kmsg: {errno.errorcode.get(e_kmsg, e_kmsg)}, syslog(2): {errno.errorcode.get(e_syslog, e_syslog)}"


@probe("kernel modules cannot be loaded, modules folder hidden", "ProtectKernelModules=yes")
def _():
    e = libc_errno(libc.syscall(175, None, 0, b""))  # init_module(2) on x86_64
    hidden = not os.path.isdir("/usr/lib/modules") or errno_of(os.listdir, "/usr/lib/modules") != 0
    return e == errno.EPERM and hidden, f"init_module: {errno.errorcode.get(e, e)}, /usr/lib/modules hidden: {hidden}"


# --- file system --------------------------------------------------------------


def _mount_options(path: str) -> set[str]:
    """Options of the mount that path is on (the last, most specific, match)."""
    best, opts = "", set()
    with open("/proc/self/mountinfo") as f:
        for line in f:
            fields = line.split()
            point = fields[4]
            if (path == point or path.startswith(point.rstrip("/") + "/")) and len(point) >= len(best):
                best, opts = point, set(fields[5].split(","))
    return opts


@probe("/usr, /etc and /var are read-only", "ProtectSystem=strict")
def _():
    out = {}
    for d in ("/usr", "/etc", "/var/cache", "/var/log"):
        out[d] = errno.errorcode.get(e := errno_of(lambda d=d: tempfile.TemporaryFile(dir=d).close()), e)
    return all(v in ("EROFS", "EACCES") for v in out.values()) and "ro" in _mount_options("/usr"), str(out)


@probe("state, runtime and lock folders are writable", "StateDirectory= RuntimeDirectory= ReadWritePaths=-/run/lock")
def _():
    out = {}
    for d in (os.environ.get("STATE_DIRECTORY"), os.environ.get("RUNTIME_DIRECTORY"), "/run/lock"):
        out[d] = errno_of(lambda d=d: tempfile.TemporaryFile(dir=d).close())
    runtime_mode = oct(stat.S_IMODE(os.stat(os.environ["RUNTIME_DIRECTORY"]).st_mode))
    return all(v == 0 for v in out.values()) and runtime_mode == "0o755", f"{out}, runtime folder mode {runtime_mode}"


@probe("new files are private to the service", "UMask=0077")
def _():
    path = os.path.join(os.environ["STATE_DIRECTORY"], "probe-umask")
    with open(path, "w"):
        pass
    mode = stat.S_IMODE(os.stat(path).st_mode)
    os.unlink(path)
    return mode == 0o600, f"new file mode {oct(mode)}"


@probe("home folders are hidden", "ProtectHome=yes")
def _():
    out = {}
    for d in ("/home", "/root"):
        e = errno_of(os.listdir, d)
        out[d] = errno.errorcode.get(e, e) if e else os.listdir(d)
    return all(v in ("EACCES", "EPERM", []) for v in out.values()) and not os.path.exists("/home/alice"), str(out)


@probe("/tmp and /var/tmp are private", "PrivateTmp=yes")
def _():
    out = {}
    for d in ("/tmp", "/var/tmp"):
        marker = os.path.exists(f"{d}/stillsvc-vm-host-marker")
        writable = errno_of(lambda d=d: tempfile.TemporaryFile(dir=d).close()) == 0
        out[d] = (marker, writable)
    ok = all(not marker and writable for marker, writable in out.values())
    return ok, ", ".join(f"{d}: host's marker visible {m}, writable {w}" for d, (m, w) in out.items())


@probe("/sys is read-only, /proc/sys hidden or read-only", "ProtectKernelTunables=yes ProcSubset=pid")
def _():
    # ProcSubset=pid mounts a /proc without /proc/sys; where it is there, it is read-only
    proc_sys = os.path.exists("/proc/sys/kernel")
    proc_sys_ro = "ro" in _mount_options("/proc/sys/kernel")
    sys_ro = "ro" in _mount_options("/sys")
    return sys_ro and (not proc_sys or proc_sys_ro), (
        f"/sys read-only: {sys_ro}, /proc/sys/kernel there: {proc_sys}, read-only: {proc_sys_ro}")


@probe("cgroup tree read-only", "ProtectControlGroups=yes")
def _():
    opts = _mount_options("/sys/fs/cgroup")
    return "ro" in opts, f"/sys/fs/cgroup {sorted(opts)}"


@probe("other users' processes invisible, no /proc/cpuinfo", "ProtectProc=invisible ProcSubset=pid")
def _():
    pid1 = os.path.exists("/proc/1")
    cpuinfo = os.path.exists("/proc/cpuinfo")
    cpus = os.cpu_count()
    return not pid1 and not cpuinfo and bool(cpus), f"/proc/1: {pid1}, /proc/cpuinfo: {cpuinfo}, os.cpu_count() {cpus}"


@probe("POSIX shared memory object made (removed when the unit stops)", "RemoveIPC=yes")
def _():
    fd = os.open("/dev/shm/stillsvc-probe", os.O_CREAT | os.O_RDWR, 0o600)
    os.close(fd)
    return True, "/dev/shm/stillsvc-probe"


# --- sockets ------------------------------------------------------------------


@probe("AF_UNIX, AF_NETLINK and AF_INET(6) sockets open; AF_PACKET, AF_ALG refused",
       "RestrictAddressFamilies=AF_UNIX AF_NETLINK AF_INET AF_INET6")
def _():
    def try_family(family, kind, proto=0):
        try:
            socket.socket(family, kind, proto).close()
            return 0
        except OSError as e:
            return e.errno

    allowed = {
        "AF_UNIX": try_family(socket.AF_UNIX, socket.SOCK_STREAM),
        "AF_NETLINK": try_family(socket.AF_NETLINK, socket.SOCK_RAW, 15),  # NETLINK_KOBJECT_UEVENT
        "AF_INET": try_family(socket.AF_INET, socket.SOCK_STREAM),
        "AF_INET6": try_family(socket.AF_INET6, socket.SOCK_STREAM),
    }
    refused = {"AF_ALG": try_family(socket.AF_ALG, socket.SOCK_SEQPACKET),
               "AF_PACKET": try_family(socket.AF_PACKET, socket.SOCK_RAW)}
    ok = all(v == 0 for v in allowed.values()) and all(v == errno.EAFNOSUPPORT for v in refused.values())
    return ok, f"allowed {allowed}, refused {refused}"


@probe("pyudev lists USB devices and opens a uevent monitor", "RestrictAddressFamilies= ProtectKernelTunables=yes")
def _():
    import pyudev

    context = pyudev.Context()
    devices = list(context.list_devices(subsystem="usb", DEVTYPE="usb_device"))
    monitor = pyudev.Monitor.from_netlink(context)
    monitor.filter_by("usb")
    monitor.start()
    return len(devices) > 0, f"{len(devices)} USB devices, monitor fd {monitor.fileno()}"


# --- devices ------------------------------------------------------------------


@probe("a still-image USB device: pyusb opens it and runs PTP GetDeviceInfo over bulk endpoints",
       "DevicePolicy=closed DeviceAllow=char-usb_device rw")
def _():
    import usb.core
    import usb.util

    def still_image(dev):
        return any(i.bInterfaceClass == 6 for cfg in dev for i in cfg)

    dev = usb.core.find(custom_match=still_image)
    if dev is None:
        return False, "no USB device with a still-image interface"
    node = f"/dev/bus/usb/{dev.bus:03d}/{dev.address:03d}"
    st = os.stat(node)
    cfg = dev.get_active_configuration()
    intf = next(i for i in cfg if i.bInterfaceClass == 6)
    usb.util.claim_interface(dev, intf)
    try:
        ep_out = usb.util.find_descriptor(
            intf, custom_match=lambda e: usb.util.endpoint_direction(e.bEndpointAddress) == usb.util.ENDPOINT_OUT
            and usb.util.endpoint_type(e.bmAttributes) == usb.util.ENDPOINT_TYPE_BULK)
        ep_in = usb.util.find_descriptor(
            intf, custom_match=lambda e: usb.util.endpoint_direction(e.bEndpointAddress) == usb.util.ENDPOINT_IN
            and usb.util.endpoint_type(e.bmAttributes) == usb.util.ENDPOINT_TYPE_BULK)
        GET_DEVICE_INFO, COMMAND, DATA, RESPONSE, OK = 0x1001, 1, 2, 3, 0x2001
        ep_out.write(struct.pack("<IHHI", 12, COMMAND, GET_DEVICE_INFO, 1), timeout=5000)
        data = bytes(ep_in.read(65536, timeout=5000))
        length, kind, code, _tid = struct.unpack_from("<IHHI", data)
        while len(data) < length:
            data += bytes(ep_in.read(65536, timeout=5000))
        response = bytes(ep_in.read(512, timeout=5000))
        _rlen, rkind, rcode, _rtid = struct.unpack_from("<IHHI", response)
    finally:
        usb.util.release_interface(dev, intf)
        usb.util.dispose_resources(dev)
    ok = kind == DATA and code == GET_DEVICE_INFO and rkind == RESPONSE and rcode == OK
    return ok, (f"{node} (group {st.st_gid}, mode {oct(stat.S_IMODE(st.st_mode))}) {dev.idVendor:04x}:{dev.idProduct:04x}: "
                f"DeviceInfo {length} bytes, response {rcode:#06x}")


def _serial_probe(device: str):
    from stillsvc.driver.serialport import SerialPort

    with SerialPort(device, baudrate=9600) as port:
        lock_file = port.lock_path
        held = os.path.exists(lock_file)
        written = os.write(port.fd, f"stillsvc probe {device}\r\n".encode())
        termios.tcdrain(port.fd)
        # TIOCEXCL: a second open by the same unprivileged user is refused
        second = errno_of(lambda: os.close(os.open(device, os.O_RDWR | os.O_NOCTTY | os.O_NONBLOCK)))
    gone = not os.path.exists(lock_file)
    ok = held and written > 0 and second == errno.EBUSY and gone
    return ok, f"{lock_file} held: {held}, wrote {written} bytes, second open: {errno.errorcode.get(second, second)}, lock removed: {gone}"


@probe("serial port /dev/ttyS1: lock file, TIOCEXCL, write", "DeviceAllow=char-ttyS rw ReadWritePaths=-/run/lock")
def _():
    return _serial_probe("/dev/ttyS1")


@probe("USB serial adapter /dev/ttyUSB0: lock file, TIOCEXCL, write", "DeviceAllow=char-ttyUSB rw")
def _():
    return _serial_probe("/dev/ttyUSB0")


@probe("a device outside DeviceAllow= is refused although its mode allows it (/dev/net/tun, 0666)",
       "DevicePolicy=closed")
def _():
    path = "/dev/net/tun"
    mode = oct(stat.S_IMODE(os.stat(path).st_mode))
    e = errno_of(lambda: os.close(os.open(path, os.O_RDWR)))
    return e == errno.EPERM and mode == "0o666", f"{path} mode {mode}: {errno.errorcode.get(e, e) if e else 'opened'}"


@probe("/dev/null and /dev/urandom stay usable", "DevicePolicy=closed")
def _():
    with open("/dev/null", "wb") as f:
        f.write(b"x")
    with open("/dev/urandom", "rb") as f:
        n = len(f.read(16))
    return n == 16, "ok"


def main() -> int:
    for r in RESULTS:
        print(json.dumps(r), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
