"""A umockdev testbed that tests drive: fake USB devices, their sysfs entries, their
/dev nodes and their uevents, seen by a daemon through its ordinary libudev/pyudev.

Nothing here needs PyGObject: libumockdev is driven through ctypes. The testbed
lives in a *controller process* of its own, which runs under ``umockdev-wrapper``
(umockdev wants the process that owns a testbed to be preloaded too); the pytest
process is not. The controller is this file run as a program::

    umockdev-wrapper python3 tests/testbed.py

It prints the testbed's root directory, then reads one request a line on stdin
(a JSON list of operations) and answers each with one line on stdout (JSON:
``{"ok": true}`` or ``{"ok": false, "error": "..."}``) once every operation of
the request is done. A process that observes the testbed (the daemon under test)
runs as ``umockdev-wrapper ARGV...`` with ``UMOCKDEV_DIR`` set to the root:
:meth:`Testbed.wrap` does both.

In the tests, :class:`Testbed` is the synchronous API: each call returns once the
controller has done it (a few milliseconds). :meth:`Testbed.batch` sends many
operations in one request, back to back, as fast as the controller can go.

The sysfs tree is laid out like a PC's: a PCI xHCI controller
(``/sys/devices/pci0000:00/0000:00:14.0``) with one root hub per bus
(``usb1``, ``usb2``; hub class 09, devnum 1) and the devices below them
(``usb1/1-2``, ``usb1/1-2/1-2.4`` behind a hub on ``1-2``). A device gets a device
node ``/dev/bus/usb/BBB/DDD`` and the properties the kernel and udev's
``usb_id`` builtin give a real one (``BUSNUM``, ``DEVNUM``, ``DEVNAME``,
``PRODUCT``, ``ID_VENDOR_ID``, ``ID_MODEL_ID``, ``ID_SERIAL_SHORT``,
``ID_USB_INTERFACES``, ...), and the sysfs attributes (``idVendor``,
``busnum``, ``devnum``, ``serial``, ...).
"""

from __future__ import annotations

import contextlib
import ctypes
import glob
import importlib.util
import json
import os
import select
import shutil
import socket
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

WRAPPER = "umockdev-wrapper"
LIBRARY = "libumockdev.so.0"
#: The xHCI controller every fake bus hangs off.
CONTROLLER = "/sys/devices/pci0000:00/0000:00:14.0"
#: How long the controller may take to start, or to answer one request (seconds).
TIMEOUT = 10.0


def unavailable() -> str | None:
    """Why the testbed cannot run here (what to install), or None when it can."""
    if shutil.which(WRAPPER) is None:
        return f"{WRAPPER} is not installed (Debian package 'umockdev')"
    try:
        ctypes.CDLL(LIBRARY)
    except OSError:
        return f"{LIBRARY} is not installed (Debian package 'libumockdev0')"
    if importlib.util.find_spec("pyudev") is None:  # the daemon's udev discovery needs it
        return "pyudev is not installed (pip install -e '.[udev]')"
    return None


class TestbedError(RuntimeError):
    """The controller refused an operation or went away."""

    __test__ = False


def root_hub(busnum: int) -> str:
    return f"{CONTROLLER}/usb{busnum}"


def sysfs_path(port: str) -> str:
    """The sysfs path of the device on ``port`` ("1-2", "1-2.4"): below its hub."""
    bus, _, chain = port.partition("-")
    if not bus.isdigit() or not chain or not all(part.isdigit() for part in chain.split(".")):
        raise ValueError(f"a USB port is BUS-PORT[.PORT...], such as 1-2 or 1-2.4, not {port!r}")
    path = root_hub(int(bus))
    parts = chain.split(".")
    for depth in range(1, len(parts) + 1):
        path += f"/{bus}-{'.'.join(parts[:depth])}"
    return path


def parent_port(port: str) -> str | None:
    """The port of the hub ``port`` is plugged into, None for a root hub's port."""
    bus, _, chain = port.partition("-")
    head, dot, _ = chain.rpartition(".")
    return f"{bus}-{head}" if dot else None


def record(path: str, devnode: str | None, properties: dict[str, str], attributes: dict[str, str]) -> str:
    """One device in umockdev's text format (as ``umockdev-record`` writes it)."""
    assert path.startswith("/sys/")
    lines = [f"P: {path[len('/sys'):]}"] + ([f"N: {devnode}"] if devnode else [])
    lines += [f"E: {name}={value}" for name, value in properties.items()]
    lines += [f"A: {name}={value}" for name, value in attributes.items()]
    return "\n".join(lines) + "\n"


def interface_triples(interfaces: str) -> list[tuple[int, int, int]]:
    """``ID_USB_INTERFACES`` (":060101:030102:") as (class, subclass, protocol) triples."""
    triples = []
    for part in interfaces.strip(":").split(":"):
        if part:
            if len(part) != 6:
                raise ValueError(f"a USB interface is six hex digits (ccsspp), not {part!r}")
            triples.append((int(part[0:2], 16), int(part[2:4], 16), int(part[4:6], 16)))
    return triples


def interface_record(device: str, number: int, triple: tuple[int, int, int], properties: dict[str, str]) -> str:
    """A USB interface below ``device`` (``1-2:1.0``): subsystem usb, devtype usb_interface,
    no device node."""
    name = f"{device.rsplit('/', 1)[1]}:1.{number}"
    cls, sub, proto = triple
    vid, pid = properties.get("ID_VENDOR_ID", "0000"), properties.get("ID_MODEL_ID", "0000")
    return record(f"{device}/{name}", None, {
        "SUBSYSTEM": "usb",
        "DEVTYPE": "usb_interface",
        "PRODUCT": properties.get("PRODUCT", ""),
        "TYPE": properties.get("TYPE", ""),
        "INTERFACE": f"{cls}/{sub}/{proto}",
        "MODALIAS": f"usb:v{vid.upper()}p{pid.upper()}d0100dc00dsc00dp00ic{cls:02X}isc{sub:02X}ip{proto:02X}in{number:02X}",
    }, {
        "bInterfaceNumber": f"{number:02x}",
        "bInterfaceClass": f"{cls:02x}",
        "bInterfaceSubClass": f"{sub:02x}",
        "bInterfaceProtocol": f"{proto:02x}",
        "bAlternateSetting": " 0",
        "bNumEndpoints": "03",
    })


@dataclass(frozen=True)
class Plugged:
    """A device in the testbed."""

    port: str  # "1-2", "usb1" for a root hub
    busnum: int
    devnum: int
    hub: bool
    interfaces: int


class Testbed:
    """A umockdev testbed in a controller process, driven synchronously from a test.

    ``close()`` (or leaving the ``with`` block) ends the controller, which frees the
    testbed (umockdev removes its root directory); nothing else is touched, so stop
    the processes that observe the testbed first.
    """

    __test__ = False  # not a pytest test class, whatever its name

    def __init__(self) -> None:
        reason = unavailable()
        if reason is not None:
            raise TestbedError(reason)
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        self.proc = subprocess.Popen([WRAPPER, sys.executable, os.path.abspath(__file__)], env=env,
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, bufsize=0)
        #: Present devices (hubs included) by sysfs path.
        self.devices: dict[str, Plugged] = {}
        self._next_devnum: dict[int, int] = {}
        self._batch: list[dict[str, Any]] | None = None
        try:
            self.root = self._read_line()
            if not self.root.startswith("/"):
                raise TestbedError(f"the testbed controller did not start: {self.root}")
            self._ensure_root_hub(1)  # there from the start, as on a real machine
        except BaseException:
            self.close()
            raise

    # -- the controller -------------------------------------------------------------
    def _read_line(self, timeout: float = TIMEOUT) -> str:
        assert self.proc.stdout is not None
        ready, _, _ = select.select([self.proc.stdout], [], [], timeout)
        if not ready:
            raise TestbedError(f"the testbed controller did not answer within {timeout:g} s")
        line = self.proc.stdout.readline()
        if not line:
            raise TestbedError(f"the testbed controller exited ({self.proc.poll()})")
        return line.decode().rstrip("\n")

    def _request(self, ops: list[dict[str, Any]]) -> None:
        if self._batch is not None:
            self._batch += ops
            return
        if self.proc.poll() is not None or self.proc.stdin is None:
            raise TestbedError(f"the testbed controller has exited ({self.proc.returncode})")
        self.proc.stdin.write(json.dumps(ops).encode() + b"\n")
        line = self._read_line(TIMEOUT + 0.1 * len(ops))  # a uevent may wait for its observer to read
        try:
            answer = json.loads(line)
        except ValueError:  # GLib printed an assertion and aborted the controller
            raise TestbedError(f"the testbed controller failed: {line}") from None
        if not answer.get("ok"):
            raise TestbedError(answer.get("error", "the testbed controller failed"))

    @contextlib.contextmanager
    def batch(self) -> Iterator[Testbed]:
        """Collect the operations of the calls in the block and send them at its end in
        one request: the controller makes them back to back, with no round trip between."""
        if self._batch is not None:
            yield self
            return
        self._batch = []
        try:
            yield self
            ops = self._batch
        finally:
            self._batch = None
        self._request(ops)

    def close(self) -> None:
        if self.proc.stdin is not None and not self.proc.stdin.closed:
            try:
                self.proc.stdin.close()  # the controller frees the testbed and exits
            except BrokenPipeError:
                pass
        try:
            self.proc.wait(5)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        if self.proc.stdout is not None:
            self.proc.stdout.close()

    def __enter__(self) -> Testbed:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- for the observing process --------------------------------------------------
    def wrap(self, argv: list[str], env: dict[str, str]) -> tuple[list[str], dict[str, str]]:
        """``argv`` and ``env`` for a process that sees this testbed instead of the host's
        sysfs, /dev and uevents."""
        return [WRAPPER, *argv], {**env, "UMOCKDEV_DIR": self.root}

    # -- devices ----------------------------------------------------------------------
    def _devnum(self, busnum: int) -> int:
        devnum = self._next_devnum.get(busnum, 2)  # 1 is the root hub
        self._next_devnum[busnum] = devnum + 1
        return devnum

    def _ensure_root_hub(self, busnum: int) -> None:
        path = root_hub(busnum)
        if path in self.devices:
            return
        self._add(path, f"usb{busnum}", busnum, 1, hub=True, vendor_id=0x1d6b, product_id=0x0002, serial="",
                  interfaces=":090000:", extra={}, event=False,
                  names=("Linux Foundation", "2.0 root hub"))

    def _add(self, path: str, port: str, busnum: int, devnum: int, *, hub: bool, vendor_id: int, product_id: int,
             serial: str, interfaces: str, extra: dict[str, str | None], event: bool,
             names: tuple[str, str] = ("Canon", "CanoScan")) -> None:
        vendor, model = names
        devnode = f"bus/usb/{busnum:03d}/{devnum:03d}"
        properties = {
            "SUBSYSTEM": "usb",
            "DEVTYPE": "usb_device",
            "DRIVER": "usb",
            "DEVNAME": devnode,
            "MAJOR": "189",
            "MINOR": str((busnum - 1) * 128 + devnum - 1),
            "PRODUCT": f"{vendor_id:x}/{product_id:x}/100",
            "TYPE": "9/0/1" if hub else "0/0/0",
            "BUSNUM": f"{busnum:03d}",
            "DEVNUM": f"{devnum:03d}",
            "ID_BUS": "usb",
            "ID_VENDOR": vendor,
            "ID_VENDOR_ID": f"{vendor_id:04x}",
            "ID_MODEL": model,
            "ID_MODEL_ID": f"{product_id:04x}",
            "ID_REVISION": "0100",
            "ID_SERIAL": "_".join(part for part in (vendor, model, serial) if part),
            "ID_USB_INTERFACES": interfaces,
        }
        if serial:
            properties["ID_SERIAL_SHORT"] = serial
        for name, value in extra.items():
            if value is None:
                properties.pop(name, None)
            else:
                properties[name] = value
        attributes = {
            "idVendor": f"{vendor_id:04x}",
            "idProduct": f"{product_id:04x}",
            "bcdDevice": "0100",
            "bDeviceClass": "09" if hub else "00",
            "busnum": str(busnum),
            "devnum": str(devnum),
            "devpath": port.partition("-")[2] or "0",
            "speed": "480",
            "manufacturer": vendor,
            "product": model,
        }
        if serial:
            attributes["serial"] = serial
        # umockdev's add sends the "add" uevent itself; one device an add, so that the
        # controller can wait for room before each uevent (see _Controller.wait_for_room).
        # Then the interfaces, and the kernel binds its "usb" driver to the device.
        ops: list[dict[str, Any]] = [{"op": "add", "text": record(path, devnode, properties, attributes)}]
        ops += [{"op": "add", "text": interface_record(path, number, triple, properties)}
                for number, triple in enumerate(interface_triples(interfaces))]
        if event:
            ops.append({"op": "uevent", "path": path, "action": "bind"})
        self._request(ops)
        self.devices[path] = Plugged(port, busnum, devnum, hub, len(interface_triples(interfaces)))

    def add_usb(self, port: str = "1-2", *, vendor_id: int = 0x04a9, product_id: int = 0x190a, serial: str = "",
                interfaces: str = ":060101:", properties: dict[str, str | None] | None = None,
                busnum: int | None = None, devnum: int | None = None, event: bool = True) -> str:
        """Plug a USB device into ``port`` and return its sysfs path. ``properties``
        add to (or, with None, drop) the udev properties it gets by default;
        ``busnum`` is the port's bus unless given; ``devnum`` counts up on its bus
        like the kernel's (a replugged device gets a new one). A hub that ``port``
        needs ("1-2" for "1-2.4") is plugged in first. ``event=False`` sends no
        "add" uevent: the device was there before the observer started (coldplug)."""
        path = sysfs_path(port)
        bus = int(port.partition("-")[0])
        if busnum is not None and busnum != bus:
            raise ValueError(f"port {port} is on bus {bus}, not {busnum}")
        if path in self.devices:
            raise TestbedError(f"a device is already plugged into {port}")
        self._ensure_root_hub(bus)
        hub_port = parent_port(port)
        if hub_port is not None and sysfs_path(hub_port) not in self.devices:
            self.add_hub(hub_port, event=event)
        self._add(path, port, bus, devnum if devnum is not None else self._devnum(bus), hub=False,
                  vendor_id=vendor_id, product_id=product_id, serial=serial, interfaces=interfaces,
                  extra=dict(properties or {}), event=event)
        return path

    def add_hub(self, port: str, *, event: bool = True) -> str:
        """Plug an external USB 2.0 hub into ``port`` (devices go behind it as PORT.N)."""
        path = sysfs_path(port)
        bus = int(port.partition("-")[0])
        self._ensure_root_hub(bus)
        hub_port = parent_port(port)
        if hub_port is not None and sysfs_path(hub_port) not in self.devices:
            self.add_hub(hub_port, event=event)
        self._add(path, port, bus, self._devnum(bus), hub=True, vendor_id=0x05e3, product_id=0x0608, serial="",
                  interfaces=":090000:", extra={}, event=event, names=("GenesysLogic", "USB2.0_Hub"))
        return path

    def remove(self, path: str) -> None:
        """Unplug: a "remove" uevent, then the device leaves sysfs. Devices behind a
        hub go first, as the kernel does it."""
        if path not in self.devices:
            raise TestbedError(f"no device at {path}")
        below = sorted((p for p in self.devices if p.startswith(path + "/")), key=len, reverse=True)
        ops: list[dict[str, Any]] = []
        for p in [*below, path]:
            # The kernel's order: each interface goes, the driver is unbound, the device goes.
            device = self.devices[p]
            for interface in range(device.interfaces):
                below_p = f"{p}/{p.rsplit('/', 1)[1]}:1.{interface}"
                ops += [{"op": "uevent", "path": below_p, "action": "remove"}, {"op": "remove", "path": below_p}]
            ops += [{"op": "uevent", "path": p, "action": "unbind"}, {"op": "uevent", "path": p, "action": "remove"},
                    {"op": "remove", "path": p, "devnode": f"bus/usb/{device.busnum:03d}/{device.devnum:03d}"}]
        self._request(ops)
        for p in [*below, path]:
            del self.devices[p]

    def change(self, path: str, **properties: str) -> None:
        """Set udev properties (the value "" removes one), then a "change" uevent."""
        ops: list[dict[str, Any]] = [{"op": "set_property", "path": path, "name": name, "value": value or None}
                                     for name, value in properties.items()]
        ops.append({"op": "uevent", "path": path, "action": "change"})
        self._request(ops)

    def uevent(self, path: str, action: str) -> None:
        """Send a uevent ("add", "remove", "change", "bind", "unbind") and change nothing."""
        self._request([{"op": "uevent", "path": path, "action": action}])

    def set_attribute(self, path: str, name: str, value: str) -> None:
        self._request([{"op": "set_attribute", "path": path, "name": name, "value": value}])

    def usb_port(self, path: str) -> str:
        """The ``usb:BBB:DDD`` port name the service gives the device at ``path``."""
        device = self.devices[path]
        return f"usb:{device.busnum:03d}:{device.devnum:03d}"


# -- the controller process -----------------------------------------------------------------


class _GError(ctypes.Structure):
    _fields_ = [("domain", ctypes.c_uint32), ("code", ctypes.c_int), ("message", ctypes.c_char_p)]


class _Controller:
    """The testbed itself, through libumockdev's C API."""

    def __init__(self) -> None:
        lib = ctypes.CDLL(LIBRARY)
        vp, cp = ctypes.c_void_p, ctypes.c_char_p
        lib.umockdev_testbed_new.restype = vp
        lib.umockdev_testbed_new.argtypes = []
        lib.umockdev_testbed_get_root_dir.restype = cp
        lib.umockdev_testbed_get_root_dir.argtypes = [vp]
        lib.umockdev_testbed_add_from_string.restype = ctypes.c_int
        lib.umockdev_testbed_add_from_string.argtypes = [vp, cp, ctypes.POINTER(ctypes.POINTER(_GError))]
        lib.umockdev_testbed_uevent.restype = None
        lib.umockdev_testbed_uevent.argtypes = [vp, cp, cp]
        lib.umockdev_testbed_remove_device.restype = None
        lib.umockdev_testbed_remove_device.argtypes = [vp, cp]
        lib.umockdev_testbed_set_property.restype = None
        lib.umockdev_testbed_set_property.argtypes = [vp, cp, cp, cp]
        lib.umockdev_testbed_set_attribute.restype = None
        lib.umockdev_testbed_set_attribute.argtypes = [vp, cp, cp, cp]
        self.glib = ctypes.CDLL("libglib-2.0.so.0")
        self.glib.g_error_free.argtypes = [ctypes.POINTER(_GError)]
        self.gobject = ctypes.CDLL("libgobject-2.0.so.0")
        self.gobject.g_object_unref.argtypes = [vp]
        self.lib = lib
        self.testbed = lib.umockdev_testbed_new()
        if not self.testbed:
            raise RuntimeError("umockdev_testbed_new failed")
        self.root = lib.umockdev_testbed_get_root_dir(self.testbed).decode()

    def free(self) -> None:
        self.gobject.g_object_unref(self.testbed)

    def wait_for_room(self) -> None:
        """Wait until every observer can take one more uevent.

        umockdev hands a uevent to each observing process through a datagram
        socket of that process (``ROOT/eventN``), without blocking, and aborts
        when the socket's queue is full: and it holds only
        ``net.unix.max_dgram_qlen`` (10) datagrams. The kernel's netlink buffer
        holds far more, so a burst that a real daemon takes in its stride would
        kill the testbed. So before each uevent, wait (for as long as the
        observer takes to read) until its queue has room: a socket connected to
        it is writable exactly when the next datagram fits. Every uevent of the
        testbed comes from this process, one at a time, so the room is still
        there when umockdev sends.
        """
        for path in glob.glob(f"{glob.escape(self.root)}/event[0-9]*"):
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as probe:
                try:
                    probe.connect(path)
                except OSError:  # its process has gone; umockdev skips it too
                    continue
                poller = select.poll()
                poller.register(probe, select.POLLOUT)
                if not poller.poll(TIMEOUT * 1000):
                    raise TimeoutError(f"the observer at {path} has taken no uevent for {TIMEOUT} s")

    def _exists(self, path: str) -> None:
        if not os.path.isdir(self.root + path):
            raise ValueError(f"no device {path} in the testbed")

    def run(self, op: dict[str, Any]) -> None:
        kind = op["op"]
        if kind in ("add", "uevent"):
            self.wait_for_room()
        if kind == "add":
            error = ctypes.POINTER(_GError)()
            if not self.lib.umockdev_testbed_add_from_string(self.testbed, op["text"].encode(), ctypes.byref(error)):
                message = error.contents.message.decode() if error else "unknown error"
                if error:
                    self.glib.g_error_free(error)
                raise ValueError(f"umockdev refused the device: {message}")
        elif kind == "uevent":
            self._exists(op["path"])
            self.lib.umockdev_testbed_uevent(self.testbed, op["path"].encode(), op["action"].encode())
        elif kind == "remove":
            self._exists(op["path"])
            self.lib.umockdev_testbed_remove_device(self.testbed, op["path"].encode())
            # umockdev 0.17 leaves the device node behind (the kernel's devtmpfs does not).
            if op.get("devnode"):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(f"{self.root}/dev/{op['devnode']}")
        elif kind == "set_property":
            self._exists(op["path"])
            if op["value"] is None:
                self._unset_property(op["path"], op["name"])
            else:
                self.lib.umockdev_testbed_set_property(self.testbed, op["path"].encode(), op["name"].encode(),
                                                       op["value"].encode())
        elif kind == "set_attribute":
            self._exists(op["path"])
            self.lib.umockdev_testbed_set_attribute(self.testbed, op["path"].encode(), op["name"].encode(),
                                                    op["value"].encode())
        else:
            raise ValueError(f"unknown operation {kind!r}")

    def _unset_property(self, path: str, name: str) -> None:
        """umockdev keeps a device's properties in its uevent file (which its libudev
        reads, and uevents carry): drop the line."""
        uevent = f"{self.root}{path}/uevent"
        with open(uevent, encoding="utf-8") as f:
            lines = [line for line in f.read().splitlines() if line.partition("=")[0] != name]
        with open(uevent, "w", encoding="utf-8") as f:
            f.write("".join(line + "\n" for line in lines))


def serve() -> None:
    try:
        controller = _Controller()
    except Exception as e:
        print(f"error: {e}", flush=True)
        sys.exit(1)
    print(controller.root, flush=True)
    for line in sys.stdin:
        try:
            for op in json.loads(line):
                controller.run(op)
            answer: dict[str, Any] = {"ok": True}
        except Exception as e:
            answer = {"ok": False, "error": f"{type(e).__name__}: {e}"}
        print(json.dumps(answer), flush=True)
    controller.free()


if __name__ == "__main__":
    serve()
