"""Record QEMU usb-mtp's PTP traffic in a guest, and replay it under umockdev.

One fixed sequence of the PTP driver's own code (:func:`sequence`) runs twice:

* ``record`` (on the host): boots a QEMU guest (tests/qemu_guest.py) whose
  usb-mtp serves a tiny folder made here (:data:`FILES`) and runs this script
  there as ``guest-record``, which captures the USB traffic of the sequence with
  the guest kernel's usbmon and records the device's sysfs description with
  ``umockdev-record``; the files come back over the guest's output (base64) and
  are written to ``--out`` (tests/data/ptp/): ``usb-mtp.umockdev``,
  ``usb-mtp.pcap`` and ``expected.json`` (what the sequence saw). It also
  keeps usb-mtp's own capture of the same run (QEMU's ``pcap=`` option) as
  ``usb-mtp.qemu.pcap``, for tests/test_ptp_replay.py to show why that one
  cannot be replayed;
* ``replay`` (on the host, under ``umockdev-run --device ... --pcap ...``): the
  same sequence against pyusb's real libusb1 backend, which umockdev's
  usbdevfs emulation feeds from the capture; prints ``RESULT <json>``.

Re-record (about 30 s; needs qemu-system-x86, linux-image-amd64, busybox-static)::

    python3 tests/ptp_replay_script.py record --out tests/data/ptp

The sequence is the driver itself, not the daemon: ``PtpCamera`` with a host
that only records what it is told, ``initialize`` (OpenSession, GetDeviceInfo,
GetStorageIDs, GetStorageInfo; the event thread starts), waiting for the
background listing (GetObjectHandles and GetObjectInfo, walking the folder),
in the recording a pause (:func:`aligned_pause`), ``open_file(...).write_to``
of one file (GetObject), ``shutdown`` (CloseSession). Bulk transfers are one at
a time (the session's lock; the main thread waits for the listing before
GetObject), so their order is fixed. The event thread's interrupt reads (500 ms
each, cancelled by libusb at their timeout; the pause makes at least two of them
end and start again between bulk transfers) interleave with them by the clock, yet
replay in order: umockdev holds the replay at a recorded interrupt submission
until the thread submits its next read, and delivers a recorded cancellation as
a zero-length completion at once (libusb reaps every URB that is ready), which
the driver reads as "no event" and reads again.

What cannot replay URB for URB is an interrupt record between the main
thread's last wait (GetObject's response) and CloseSession: a submission there
may have no counterpart in the replay (the thread has stopped), and a recorded
cancellation there completes the thread's read in the replay before
``shutdown`` has told it to stop, so it reads once more than recorded. So the
recording's pause ends just after the event thread has submitted a read (seen
live in usbmon): GetObject and CloseSession then come well before that read's
timeout. ``guest-record`` checks the capture all the same
(:func:`replay_hazard`) and says ``RECORD_RETRY`` (``record`` boots again, up
to 3 times).
"""

from __future__ import annotations

import argparse
import base64
import ctypes
import fcntl
import hashlib
import json
import os
import select
import struct
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parent

#: The folder usb-mtp serves during the recording: tiny files of known content.
FILES: dict[str, bytes] = {
    "hello.txt": b"Hello from QEMU's usb-mtp, replayed by umockdev.\n",
    # 599 bytes: more than the 256 that usb-mtp's own capture keeps of a transfer.
    "DCIM/IMG_0001.JPG": b"\xff\xd8\xff\xe0\x00\x10JFIF\x00" + bytes(range(256)) * 2 + bytes(range(0, 222, 3))
    + b"\xff\xd9",
}
#: The file the sequence copies out (its item path below the storage).
TARGET = "DCIM/IMG_0001.JPG"
LISTING_TIMEOUT = 30.0
#: How long the recording waits before GetObject, at least: two of the event thread's 500 ms reads end.
RECORD_PAUSE = 1.1

# usbmon's binary interface (linux/Documentation/usb/usbmon.rst; drivers/usb/mon/mon_bin.c)
MON_IOC_MAGIC = 0x92
MON_IOCT_RING_SIZE = (MON_IOC_MAGIC << 8) | 4  # _IO(0x92, 4)
MON_IOCX_GETX = (1 << 30) | (24 << 16) | (MON_IOC_MAGIC << 8) | 10  # _IOW(0x92, 10, struct mon_bin_get)
USBMON_HEADER = struct.Struct("<QBBBBHbbqiiII8siiII")  # struct mon_bin_hdr: the 64 bytes of DLT 220
LINKTYPE_USB_LINUX_MMAPPED = 220
XFER_INTERRUPT, XFER_CONTROL, XFER_BULK = 1, 2, 3


# -- the sequence ----------------------------------------------------------------------------

class RecordingHost:
    """A DriverHost that only notes what the driver tells it."""

    def __init__(self) -> None:
        self.events: list[dict[str, Any]] = []
        self.unplugged = False
        self.failed: str | None = None

    def emit_event(self, event: Any) -> None:
        self.events.append({"event": event.name, "data": dict(event.data)})

    def tree_changed(self, event: Any = None) -> None:
        if event is not None:
            self.emit_event(event)

    def device_unplugged(self) -> None:
        self.unplugged = True

    def device_replugged(self) -> None:
        pass

    def device_failed(self, reason: str) -> None:
        self.failed = reason


def sequence(port: str, pause: Callable[[], None] | None = None) -> dict[str, Any]:
    """The fixed sequence against the device at ``port`` (``usb:BBB:DDD``); what it saw.

    ``pause``: called after the listing, before GetObject; no USB traffic meanwhile
    but the event thread's (the recording's :func:`aligned_pause`; a replay need
    not wait)."""
    from stillsvc.driver import DeviceConfig, Mode
    from stillsvc.drivers.ptp import PtpCamera

    t0 = time.monotonic()
    host = RecordingHost()
    camera = PtpCamera(DeviceConfig(id="usb-mtp", driver="ptp", port=port), host)
    info = camera.initialize(port, Mode.BOTH)
    try:
        deadline = time.monotonic() + LISTING_TIMEOUT
        while camera.listing and time.monotonic() < deadline:
            time.sleep(0.01)
        listed = not camera.listing
        if pause is not None:
            pause()
        root = camera.build_item_tree()
        items = {item.path: item for item in root.walk()}
        storage = next(item for item in root.children if item.kind == "storage")
        target = items[f"{storage.path}/{TARGET}"]
        chunks: list[bytes] = []
        camera.open_file(target, "native", Mode.DATA, threading.Event()).write_to(
            lambda data: chunks.append(bytes(data)))
        content = b"".join(chunks)
        ptp = camera.info
        assert ptp is not None
        result = {
            "device_info": {"name": info.name, "vendor": info.vendor, "model": info.model, "serial": info.serial,
                            "kind": info.kind, "capabilities": list(info.capabilities)},
            "ptp": {"manufacturer": ptp.manufacturer, "model": ptp.model, "version": ptp.version,
                    "serial": ptp.serial, "standard_version": ptp.standard_version,
                    "vendor_extension_id": ptp.vendor_extension_id, "vendor_extension": ptp.vendor_extension,
                    "operations": sorted(f"0x{op:04x}" for op in ptp.operations)},
            "storages": [{"item": item.path, **{k: item.values[k] for k in (
                "storage_id", "description", "label", "storage_type", "access")}} for item in root.children],
            "listed": listed,
            "objects": camera.listed,
            "tree": [{"item": item.path, "kind": item.kind,
                      **{k: item.values[k] for k in ("name", "size", "ptp_format", "modified", "handle")
                         if k in item.values}}
                     for item in root.walk() if item.kind in ("file", "picture", "folder")],
            "file": {"item": target.path, "size": len(content), "sha256": hashlib.sha256(content).hexdigest(),
                     "bytes": content.hex()},
        }
    finally:
        camera.shutdown()
    result["events"] = host.events
    result["unplugged"] = host.unplugged
    result["seconds"] = round(time.monotonic() - t0, 2)
    return result


#: What differs between two runs of the same sequence and is not compared.
VOLATILE = ("seconds",)


# -- usbmon capture (in the guest) -------------------------------------------------------------

class Usbmon:
    """Captures one USB bus with the kernel's usbmon (``/dev/usbmonN``, the binary
    interface), the 64-byte headers that pcap's DLT_USB_LINUX_MMAPPED stores."""

    def __init__(self, bus: int, data_size: int = 1 << 20) -> None:
        subprocess.run(["modprobe", "usbmon"], check=True, timeout=30)
        path = f"/dev/usbmon{bus}"
        for _ in range(100):
            if os.path.exists(path):
                break
            time.sleep(0.05)
        self.fd = os.open(path, os.O_RDONLY)
        fcntl.ioctl(self.fd, MON_IOCT_RING_SIZE, 1200 * 1024)
        self.header = ctypes.create_string_buffer(USBMON_HEADER.size)
        self.data = ctypes.create_string_buffer(data_size)
        self.request = bytearray(struct.pack("<QQQ", ctypes.addressof(self.header), ctypes.addressof(self.data),
                                             data_size))
        self.records: list[tuple[bytes, bytes]] = []
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self._run, name="usbmon", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        poller = select.poll()
        poller.register(self.fd, select.POLLIN)
        idle_after_stop = 0
        while True:
            if not poller.poll(100):
                if self.stopping.is_set():
                    idle_after_stop += 1
                    if idle_after_stop >= 3:
                        return
                continue
            fcntl.ioctl(self.fd, MON_IOCX_GETX, self.request, True)
            header = bytes(self.header.raw)
            len_cap = USBMON_HEADER.unpack(header)[12]
            self.records.append((header, bytes(self.data.raw[:len_cap])))

    def last(self, devnum: int, xfer: int) -> dict[str, Any] | None:
        """The newest record so far of device ``devnum`` and transfer type ``xfer``."""
        for header, _ in reversed(self.records):
            f = fields(header)
            if f["devnum"] == devnum and f["xfer"] == xfer:
                return f
        return None

    def stop(self) -> list[tuple[bytes, bytes]]:
        self.stopping.set()
        self.thread.join(10)
        os.close(self.fd)
        return self.records


def fields(header: bytes) -> dict[str, Any]:
    (urb_id, kind, xfer, epnum, devnum, busnum, flag_setup, flag_data, ts_sec, ts_usec, status, length, len_cap,
     *_rest) = USBMON_HEADER.unpack(header)
    return {"id": urb_id, "type": chr(kind), "xfer": xfer, "ep": epnum, "devnum": devnum, "busnum": busnum,
            "flag_setup": flag_setup, "flag_data": flag_data, "ts": ts_sec + ts_usec / 1e6, "status": status,
            "length": length, "len_cap": len_cap}


def pcap_bytes(records: list[tuple[bytes, bytes]]) -> bytes:
    """A classic pcap file (DLT_USB_LINUX_MMAPPED) of usbmon records."""
    out = [struct.pack("<IHHiIII", 0xA1B2C3D4, 2, 4, 0, 0, 1 << 20, LINKTYPE_USB_LINUX_MMAPPED)]
    for header, data in records:
        f = fields(header)
        ts_sec, ts_usec = int(f["ts"]), round((f["ts"] - int(f["ts"])) * 1e6)
        full = len(header) + (f["length"] if f["flag_data"] == 0 else len(data))
        out.append(struct.pack("<IIII", ts_sec, ts_usec, len(header) + len(data), max(full, len(header) + len(data))))
        out += [header, data]
    return b"".join(out)


def read_pcap(data: bytes) -> list[tuple[dict[str, Any], bytes]]:
    """The records of a classic little-endian pcap file of DLT 220: (header fields, data)."""
    magic, _, _, _, _, _, linktype = struct.unpack_from("<IHHiIII", data, 0)
    if magic != 0xA1B2C3D4 or linktype != LINKTYPE_USB_LINUX_MMAPPED:
        raise ValueError(f"not a little-endian usbmon pcap (magic {magic:#x}, linktype {linktype})")
    offset, records = 24, []
    while offset < len(data):
        _, _, incl, _ = struct.unpack_from("<IIII", data, offset)
        packet = data[offset + 16:offset + 16 + incl]
        offset += 16 + incl
        records.append((fields(packet[:64]), packet[64:]))
    return records


def replay_hazard(records: list[tuple[dict[str, Any], bytes]]) -> str | None:
    """Why this capture would not replay in order (see the module's doc), or None.

    The last bulk-in completion before CloseSession's command is GetObject's
    response, the last the main thread waits for before it stops the event thread:
    no interrupt record (submission or completion) may come between the two."""
    close_at = next((i for i, (f, data) in enumerate(records)
                     if f["type"] == "S" and f["xfer"] == XFER_BULK and not f["ep"] & 0x80
                     and data[4:8] == struct.pack("<HH", 1, 0x1003)), None)
    if close_at is None:
        return "no CloseSession in the capture"
    last_in = max((i for i, (f, _) in enumerate(records[:close_at])
                   if f["type"] == "C" and f["xfer"] == XFER_BULK and f["ep"] & 0x80), default=None)
    if last_in is None:
        return "no bulk-in completion before CloseSession"
    late = [i for i, (f, _) in enumerate(records[:close_at]) if i > last_in and f["xfer"] == XFER_INTERRUPT]
    if late:
        return (f"an interrupt read {'ended' if records[late[0]][0]['type'] == 'C' else 'began'} between GetObject's "
                f"response and CloseSession (record {late[0]})")
    return None


# -- record --------------------------------------------------------------------------------------

def aligned_pause(monitor: Usbmon, devnum: int, at_least: float = RECORD_PAUSE, timeout: float = 5.0) -> None:
    """Wait ``at_least`` seconds, then until the event thread has just submitted an
    interrupt read (its newest record is a submission at most 50 ms old): its
    timeout, and the next interrupt record, are then ~450 ms away."""
    time.sleep(at_least)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        last = monitor.last(devnum, XFER_INTERRUPT)
        if last is not None and last["type"] == "S" and 0 <= time.time() - last["ts"] < 0.05:
            return
        time.sleep(0.002)
    raise RuntimeError("no fresh interrupt submission seen in usbmon")


def _emit(name: str, data: bytes) -> None:
    print(f"FILE {name} {base64.b64encode(data).decode()}", flush=True)


def guest_record(args: argparse.Namespace) -> int:
    """In the guest: udev (for the description's properties), usbmon, the sequence, umockdev-record."""
    os.makedirs("/run/udev", exist_ok=True)
    udevd = next((p for p in ("/lib/systemd/systemd-udevd", "/usr/lib/systemd/systemd-udevd")
                  if os.path.exists(p)), "systemd-udevd")
    subprocess.run([udevd, "--daemon"], check=True, timeout=30)
    subprocess.run(["udevadm", "trigger", "--action=add"], check=True, timeout=30)
    subprocess.run(["udevadm", "settle", "--timeout=30"], check=True, timeout=40)
    sysfs = "/sys/bus/usb/devices/1-1"
    bus = int(Path(sysfs, "busnum").read_text())
    devnum = int(Path(sysfs, "devnum").read_text())
    port = f"usb:{bus:03d}:{devnum:03d}"
    # udevd is done with the device (settled): from here on only the sequence talks to it.
    monitor = Usbmon(bus)
    time.sleep(0.2)
    result = sequence(port, lambda: aligned_pause(monitor, devnum))
    time.sleep(0.2)
    records = [(h, d) for h, d in monitor.stop()
               if fields(h)["devnum"] == devnum and fields(h)["busnum"] == bus]
    capture = pcap_bytes(records)
    hazard = replay_hazard(read_pcap(capture))
    if hazard is not None:
        print(f"RECORD_RETRY {hazard}", flush=True)
        return 3
    description = subprocess.run(["umockdev-record", f"/dev/bus/usb/{bus:03d}/{devnum:03d}"], check=True,
                                 capture_output=True, timeout=60).stdout
    result["port"] = port
    result["sysfs"] = os.path.realpath(sysfs)
    _emit("usb-mtp.pcap", capture)
    _emit("usb-mtp.umockdev", description)
    print("RESULT " + json.dumps(result, sort_keys=True), flush=True)
    return 0


def host_record(args: argparse.Namespace) -> int:
    """On the host: boot a guest over a folder of :data:`FILES` and keep what it recorded."""
    sys.path.insert(0, str(HERE))
    from qemu_guest import Guest, unavailable_reason

    reason = unavailable_reason()
    if reason is not None:
        print(f"cannot record: {reason}", file=sys.stderr)
        return 2
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="ptp-record-") as tmp:
        camera = Path(tmp, "camera")
        for name, data in FILES.items():
            (camera / name).parent.mkdir(parents=True, exist_ok=True)
            (camera / name).write_bytes(data)
            os.utime(camera / name, (1700000000, 1700000000))  # 2023-11-14T22:13:20Z: fixed dates
        os.utime(camera / "DCIM", (1700000000, 1700000000))
        for attempt in range(1, 4):
            qemu_pcap = Path(tmp, "qemu.pcap")
            with Guest(camera, pcap=qemu_pcap, timeout=120) as guest:
                result = guest.run([sys.executable, str(Path(__file__).resolve()), "guest-record"])
            lines = result.output.splitlines()
            retry = next((line for line in lines if line.startswith("RECORD_RETRY")), None)
            if retry is not None and attempt < 3:
                print(f"attempt {attempt}: {retry}; recording again", file=sys.stderr)
                continue
            result.check()
            break
        files = {}
        for line in lines:
            if line.startswith("FILE "):
                _, name, data = line.split(" ", 2)
                files[name] = base64.b64decode(data)
        recorded = json.loads(next(line for line in lines if line.startswith("RESULT "))[len("RESULT "):])
        files["usb-mtp.qemu.pcap"] = qemu_pcap.read_bytes()
    for name, data in files.items():
        (out / name).write_bytes(data)
    (out / "expected.json").write_text(json.dumps(recorded, indent=1, sort_keys=True) + "\n")
    print(f"recorded into {out}: " + ", ".join(f"{n} ({len(d)} bytes)" for n, d in sorted(files.items())))
    return 0


# -- replay --------------------------------------------------------------------------------------

def replay(args: argparse.Namespace) -> int:
    """Under umockdev-run: the sequence against real libusb, fed from the capture."""
    import usb.backend.libusb1

    if usb.backend.libusb1.get_backend() is None:
        print("pyusb finds no libusb1 backend (Debian package libusb-1.0-0)", file=sys.stderr)
        return 2
    print("RESULT " + json.dumps(sequence(args.port), sort_keys=True), flush=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    rec = sub.add_parser("record", help="boot a QEMU guest and record into --out")
    rec.add_argument("--out", default=str(HERE / "data" / "ptp"))
    sub.add_parser("guest-record", help="(in the guest) run the sequence under usbmon")
    rep = sub.add_parser("replay", help="(under umockdev-run) run the sequence against the capture")
    rep.add_argument("--port", required=True, help="usb:BBB:DDD, as recorded (expected.json)")
    args = parser.parse_args(argv)
    sys.path.insert(0, str(REPO))
    return {"record": host_record, "guest-record": guest_record, "replay": replay}[args.command](args)


if __name__ == "__main__":
    sys.exit(main())
