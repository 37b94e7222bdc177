"""The QEMU guest harness (tests/qemu_guest.py) itself: a real usb-mtp responder in a TCG guest.

Two boots, about 12 s each without KVM. Skipped, with the reason, where QEMU, the
kernel or busybox-static is missing.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import pytest
from qemu_guest import MTP_PRODUCT_ID, MTP_VENDOR_ID, Guest, unavailable_reason

REASON = unavailable_reason()
pytestmark = [pytest.mark.slow, pytest.mark.skipif(REASON is not None, reason=f"QEMU guest: {REASON}")]

# Runs in the guest with the host's python3: what sysfs, pyusb and a PTP GetDeviceInfo see.
PROBE = r"""
import glob, json, os, struct, sys
import usb.core, usb.util

V, P = int(sys.argv[1], 16), int(sys.argv[2], 16)
report = {"sysfs": [], "net": sorted(os.listdir("/sys/class/net"))}
for dev in glob.glob("/sys/bus/usb/devices/*"):
    read = lambda name, d=dev: open(os.path.join(d, name)).read().strip()
    if not os.path.exists(os.path.join(dev, "idVendor")) or int(read("idVendor"), 16) != V:
        continue
    for intf in sorted(glob.glob(dev + "/*:*")):
        report["sysfs"].append({"device": os.path.basename(dev), "idProduct": read("idProduct"),
                                "class": "/".join(read(n, intf) for n in
                                                  ("bInterfaceClass", "bInterfaceSubClass", "bInterfaceProtocol"))})

dev = usb.core.find(idVendor=V, idProduct=P)
report["pyusb"] = dev is not None
if dev is not None:
    # GET_DESCRIPTOR(DEVICE) on endpoint 0, decoded by hand.
    raw = bytes(dev.ctrl_transfer(0x80, 6, 0x0100, 0, 18, timeout=5000))
    fields = struct.unpack("<BBHBBBBHHHBBBB", raw)
    report["descriptor"] = {"bLength": fields[0], "bDescriptorType": fields[1], "bcdUSB": fields[2],
                            "idVendor": fields[7], "idProduct": fields[8]}
    report["product"] = usb.util.get_string(dev, dev.iProduct)
    # PTP GetDeviceInfo (0x1001), allowed before OpenSession: traffic for the pcap.
    usb.util.claim_interface(dev, 0)
    dev.write(0x02, struct.pack("<IHHI", 12, 1, 0x1001, 1), timeout=5000)
    data = bytes(dev.read(0x81, 65536, timeout=5000))
    length, kind, code = struct.unpack_from("<IHH", data)
    while len(data) < length:
        data += bytes(dev.read(0x81, 65536, timeout=5000))
    if length % 512 == 0:
        dev.read(0x81, 512, timeout=5000)  # the zero-length packet ending the data phase
    response = bytes(dev.read(0x81, 512, timeout=5000))
    report["ptp"] = {"data_type": kind, "data_len": length, "response": hex(struct.unpack_from("<H", response, 6)[0])}
# The host root is read-only below the guest's overlay: this write must not reach the host.
open(sys.argv[3], "w").write("written in the guest\n")
print(json.dumps(report))
"""

# Runs in the guest: opens a PTP session, lists the folder (so usb-mtp watches it),
# says READY, then waits (bounded) for an event on the interrupt endpoint.
WAIT_EVENT = r"""
import struct, sys, time
import usb.core, usb.util

dev = usb.core.find(idVendor=int(sys.argv[1], 16), idProduct=int(sys.argv[2], 16))
usb.util.claim_interface(dev, 0)

def transaction(code, tid, *params):
    dev.write(0x02, struct.pack("<IHHI%dI" % len(params), 12 + 4 * len(params), 1, code, tid, *params), timeout=5000)
    data = b""
    while True:
        chunk = bytes(dev.read(0x81, 65536, timeout=5000))
        if not chunk:
            continue  # zero-length packet after a data phase
        length, kind, rcode = struct.unpack_from("<IHH", chunk)
        if kind == 3:
            return rcode, data
        data = chunk
        while len(data) < length:
            data += bytes(dev.read(0x81, 65536, timeout=5000))

print("OpenSession", hex(transaction(0x1002, 0, 1)[0]))
rcode, data = transaction(0x1007, 1, 0xFFFFFFFF, 0, 0xFFFFFFFF)  # GetObjectHandles, top level
print("GetObjectHandles", hex(rcode), struct.unpack_from("<I", data, 12)[0], "objects")
print("READY", flush=True)
deadline = time.monotonic() + 20
while time.monotonic() < deadline:
    try:
        event = bytes(dev.read(0x83, 64, timeout=1000))
    except usb.core.USBTimeoutError:
        continue
    length, kind, code, tid = struct.unpack_from("<IHHI", event)
    if kind == 4:
        print("DONE event", hex(code), flush=True)
        break
else:
    print("DONE no event in 20 s", flush=True)
"""


def _ids() -> list[str]:
    return [f"{MTP_VENDOR_ID:04x}", f"{MTP_PRODUCT_ID:04x}"]


def test_usb_mtp_is_a_ptp_device_in_the_guest(tmp_path: Path, record_property) -> None:
    camera = tmp_path / "camera"
    camera.mkdir()
    (camera / "IMG_0001.JPG").write_bytes(b"\xff\xd8\xff\xe0 not really a JPEG")
    pcap = tmp_path / "mtp.pcap"
    probe_target = tmp_path / "guest-wrote-this"
    with Guest(camera, pcap=pcap, timeout=90) as guest:
        result = guest.run([sys.executable, "-c", PROBE, *_ids(), str(probe_target)])
    record_property("boot_seconds", result.boot_seconds)
    record_property("run_seconds", result.run_seconds)
    print(f"boot {result.boot_seconds:.1f} s, run {result.run_seconds:.1f} s, guest uptime {result.guest_uptime}")
    result.check()
    report = json.loads(result.output.strip().splitlines()[-1])

    assert report["sysfs"] == [{"device": "1-1", "idProduct": f"{MTP_PRODUCT_ID:04x}", "class": "06/01/01"}]
    assert report["pyusb"] is True
    assert report["descriptor"] == {"bLength": 18, "bDescriptorType": 1, "bcdUSB": 0x200,
                                    "idVendor": MTP_VENDOR_ID, "idProduct": MTP_PRODUCT_ID}
    assert report["product"] == "QEMU filesharing"
    assert report["ptp"]["data_type"] == 2 and report["ptp"]["data_len"] > 12
    assert report["ptp"]["response"] == "0x2001"
    assert report["net"] == ["lo"]  # -nic none
    assert not probe_target.exists()  # the host root is read-only to the guest
    assert pcap.stat().st_size > 0
    assert result.boot_seconds is not None and result.boot_seconds < 45


def test_output_streams_while_the_guest_runs(tmp_path: Path) -> None:
    camera = tmp_path / "camera"
    camera.mkdir()
    lines: list[tuple[float, str]] = []
    with Guest(camera, timeout=90) as guest:
        running = guest.start([sys.executable, "-c", WAIT_EVENT, *_ids()],
                              on_line=lambda line: lines.append((time.monotonic(), line)))
        running.wait_for(r"^READY$", timeout=60)
        assert running.running  # the host saw READY before the command ended
        dropped = time.monotonic()
        (camera / "IMG_0002.JPG").write_bytes(b"\xff\xd8\xff\xe0 another one")
        done = running.wait_for(r"^DONE (.*)", timeout=40)
        result = running.result()
    result.check()
    assert result.output.splitlines()[:2] == ["OpenSession 0x2001", "GetObjectHandles 0x2001 0 objects"]
    assert done.group(1) == "event 0x4002"  # ObjectAdded, for the file dropped after READY
    assert next(t for t, line in lines if line.startswith("DONE")) > dropped
