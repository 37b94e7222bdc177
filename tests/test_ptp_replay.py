"""The PTP driver against a recording of QEMU's usb-mtp, replayed under umockdev with
pyusb's real libusb1 backend (as fwupd and libfprint test their devices). No QEMU
needed: only umockdev (Debian package umockdev) and libusb-1.0-0.

tests/data/ptp/ holds one recording, made in a QEMU guest by
tests/ptp_replay_script.py:

* ``usb-mtp.umockdev``: the device's sysfs description and udev properties
  (``umockdev-record /dev/bus/usb/001/002`` in the guest, udevd running);
* ``usb-mtp.pcap``: the USB traffic of the driver's fixed sequence, captured by
  the guest kernel's usbmon (``/dev/usbmon1``, DLT_USB_LINUX_MMAPPED, only this
  device's URBs);
* ``expected.json``: what the sequence saw while it was recorded;
* ``usb-mtp.qemu.pcap``: usb-mtp's own capture of the same run (QEMU's
  ``pcap=`` option), kept to show why it is not the one replayed.

The sequence is the driver's own code, not the daemon: ``PtpCamera`` with a host
that records what it is told; ``initialize`` (OpenSession, GetDeviceInfo,
GetStorageIDs, GetStorageInfo; the event thread starts reading the interrupt
endpoint), the background listing (GetObjectHandles, GetObjectInfo, walking the
folder ``DCIM``), ``open_file(...).write_to`` of ``DCIM/IMG_0001.JPG``
(GetObject), ``shutdown`` (CloseSession). Its event thread runs: in the
recording a pause before GetObject lets its 500 ms interrupt reads end by
timeout and start again between the bulk transfers, and the replay takes them
in order (tests/ptp_replay_script.py's doc says why that works, and what
recording it refuses). Each replay is checked URB for URB: libusb's debug log
counts the transfers submitted, which must be the capture's submissions.

The recording pins the driver's traffic: when the driver changes what it sends
(another order of operations, other buffer sizes), the replay stops at the first
URB that differs (umockdev compares each submission's endpoint, length and, for
OUT, bytes) and the driver's USB timeout ends it; re-record then, if the change
is meant.

Replayed with::

    umockdev-run --device tests/data/ptp/usb-mtp.umockdev \\
        --pcap /sys/devices/pci0000:00/0000:00:05.0/usb1/1-1=tests/data/ptp/usb-mtp.pcap \\
        -- python3 tests/ptp_replay_script.py replay --port usb:001:002

(umockdev 0.17.16: ``--pcap SYSFS=FILE`` takes the device's sysfs path in the
testbed, the description's ``P:`` line under /sys, or its link
/sys/bus/usb/devices/1-1; without the /sys it aborts, "Cannot read attribute
file ... busnum". The bus and device numbers come from that device's sysfs
attributes: umockdev replays only the capture's records of bus 1, device 2.)

Re-record (a QEMU guest, ~20 s; needs qemu-system-x86, linux-image-amd64,
busybox-static), then review and commit the four files::

    python3 tests/ptp_replay_script.py record --out tests/data/ptp

Why not usb-mtp's own ``pcap=`` capture: QEMU's hw/usb/pcap.c writes usbmon
records that umockdev's replay (src/umockdev-pcap.vala) cannot match. It never
sets the bus number (0 in every record, and umockdev skips records not of the
device's bus, 1: the first bulk write then times out after 20 s); an IN
submission has length 0 where umockdev compares the URB's buffer length; an OUT
completion has length 0, which umockdev would hand libusb as the bytes written;
``len_cap`` counts the 64-byte header too, which umockdev takes as the data's
length; data is cut at 256 bytes; control records all have URB id 0, the value
umockdev uses for "not matched yet". :func:`test_qemu_own_capture_cannot_be_replayed`
pins these facts on the kept capture. The guest kernel's usbmon records URBs as
libusb submits them, which is what umockdev replays.
"""

from __future__ import annotations

import collections
import hashlib
import json
import os
import re
import shutil
import struct
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ptp_replay_script as rs
import pytest

DATA = Path(__file__).resolve().parent / "data" / "ptp"
SCRIPT = Path(__file__).resolve().parent / "ptp_replay_script.py"
REPO = Path(__file__).resolve().parent.parent
EXPECTED: dict[str, Any] = json.loads((DATA / "expected.json").read_text())
SYSFS = EXPECTED["sysfs"]
PORT = EXPECTED["port"]
STORAGE = "Root/store-00010001"


def _libusb_available() -> bool:
    try:
        import usb.backend.libusb1
    except ImportError:
        return False
    return usb.backend.libusb1.get_backend() is not None


REASON = ("no umockdev-run (Debian package umockdev)" if shutil.which("umockdev-run") is None else
          "pyusb has no libusb1 backend (Debian package libusb-1.0-0)" if not _libusb_available() else None)
pytestmark = pytest.mark.skipif(REASON is not None, reason=f"umockdev replay: {REASON or ''}")


RERECORD = ("if the driver's USB traffic changed on purpose, re-record: "
            "python3 tests/ptp_replay_script.py record --out tests/data/ptp")


@dataclass
class Replay:
    result: dict[str, Any] | None  # what the sequence saw (None: it failed)
    stderr: str  # umockdev's messages and libusb's debug log
    details: str  # for an assertion's message
    seconds: float


def replay(pcap: Path = DATA / "usb-mtp.pcap", timeout: float = 90) -> Replay:
    """The sequence under umockdev-run, fed from ``pcap``."""
    argv = ["umockdev-run", "--device", str(DATA / "usb-mtp.umockdev"), "--pcap", f"{SYSFS}={pcap}",
            "--", sys.executable, str(SCRIPT), "replay", "--port", PORT]
    t0 = time.monotonic()
    done = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, cwd=REPO, check=False,
                          env={**os.environ, "LIBUSB_DEBUG": "4"})
    seconds = time.monotonic() - t0
    line = next((line for line in done.stdout.splitlines() if line.startswith("RESULT ")), None)
    result = json.loads(line[len("RESULT "):]) if line and done.returncode == 0 else None
    messages = "\n".join(line for line in done.stderr.splitlines() if "libusb: debug" not in line)
    details = (f"the replay ended with status {done.returncode} after {seconds:.1f} s ({RERECORD})\n"
               f"--- stdout ---\n{done.stdout[-3000:]}\n--- stderr, libusb's debug lines left out ---\n"
               f"{messages[-10_000:]}")
    return Replay(result, done.stderr, details, seconds)


def submitted_lengths(log: str) -> collections.Counter[int]:
    """The buffer length of every bulk and interrupt transfer libusb submitted (its debug log)."""
    return collections.Counter(int(n) for n in re.findall(r"need \d+ urbs for new transfer with length (\d+)", log))


def capture_submissions(pcap: Path) -> collections.Counter[int]:
    return collections.Counter(f["length"] for f, _ in rs.read_pcap(pcap.read_bytes())
                               if f["type"] == "S" and f["xfer"] in (rs.XFER_BULK, rs.XFER_INTERRUPT))


@pytest.fixture(scope="module")
def replayed() -> Replay:
    return replay()


def test_the_recording_is_small_and_of_one_device() -> None:
    for name in ("usb-mtp.umockdev", "usb-mtp.pcap", "usb-mtp.qemu.pcap", "expected.json"):
        assert 0 < (DATA / name).stat().st_size < 64 * 1024, name
    description = (DATA / "usb-mtp.umockdev").read_text()
    assert f"P: {SYSFS.removeprefix('/sys')}\n" in description
    assert "E: ID_USB_INTERFACES=:060101:" in description and "A: idVendor=46f4" in description
    records = rs.read_pcap((DATA / "usb-mtp.pcap").read_bytes())
    bus, devnum = (int(n) for n in PORT.removeprefix("usb:").split(":"))
    assert records and all((f["busnum"], f["devnum"]) == (bus, devnum) for f, _ in records)
    assert rs.replay_hazard(records) is None


def test_the_capture_interleaves_interrupt_reads_with_bulk_transfers() -> None:
    """What the replay has to get right: the event thread's reads ending by timeout
    (cancelled: status -ENOENT) and submitted again between bulk transfers."""
    records = rs.read_pcap((DATA / "usb-mtp.pcap").read_bytes())
    kinds = [(f["type"], f["xfer"], f["status"]) for f, _ in records]
    interrupt = [i for i, k in enumerate(kinds) if k[1] == rs.XFER_INTERRUPT]
    bulk = [i for i, k in enumerate(kinds) if k[1] == rs.XFER_BULK]
    assert sum(kinds[i][0] == "S" for i in interrupt) >= 3
    assert sum(kinds[i] == ("C", rs.XFER_INTERRUPT, -2) for i in interrupt) >= 2  # -ENOENT: libusb's timeout
    assert any(bulk[0] < i < bulk[-1] and kinds[i][0] == "C" for i in interrupt)


def test_the_capture_is_the_documented_sequence() -> None:
    """The PTP commands in the capture, in order (the transaction ids follow them)."""
    from stillsvc.drivers.ptp.protocol import Op

    commands = []
    for f, data in rs.read_pcap((DATA / "usb-mtp.pcap").read_bytes()):
        if f["type"] == "S" and f["xfer"] == rs.XFER_BULK and not f["ep"] & 0x80:
            _, kind, code, tid = struct.unpack_from("<IHHI", data)
            if kind == 1:
                commands.append((code, tid))
    assert [Op(code).name for code, _ in commands] == [
        "OpenSession", "GetDeviceInfo", "GetStorageIDs", "GetStorageInfo",
        "GetObjectHandles", "GetObjectInfo", "GetObjectInfo",  # the top level: DCIM, hello.txt
        "GetObjectHandles", "GetObjectInfo",  # DCIM: IMG_0001.JPG
        "GetObject", "CloseSession"], RERECORD
    assert [tid for _, tid in commands] == list(range(len(commands)))  # OpenSession's is 0


def test_replay_gives_what_the_recording_saw(replayed: Replay) -> None:
    result = replayed.result
    assert result is not None, replayed.details
    recorded = {k: v for k, v in EXPECTED.items() if k not in (*rs.VOLATILE, "port", "sysfs")}
    assert {k: v for k, v in result.items() if k not in rs.VOLATILE} == recorded
    # A replay that lost its place waits for a URB that never completes: 20 s (the driver's USB timeout).
    assert replayed.seconds < 15, replayed.details
    assert "stuck" not in replayed.stderr.lower(), replayed.details


def test_replay_is_urb_for_urb(replayed: Replay) -> None:
    assert replayed.result is not None, replayed.details
    submitted = submitted_lengths(replayed.stderr)
    assert submitted, "no 'need N urbs for new transfer' lines in libusb's debug log (LIBUSB_DEBUG=4)"
    assert submitted == capture_submissions(DATA / "usb-mtp.pcap")


def test_replay_device_info_and_file(replayed: Replay) -> None:
    """The replayed values, against what the recording's folder held (not just expected.json)."""
    result = replayed.result
    assert result is not None, replayed.details
    assert result["device_info"] == {"name": "QEMU QEMU filesharing", "vendor": "QEMU", "model": "QEMU filesharing",
                                     "serial": "0123456789abcdef0123456789abcdef", "kind": "camera",
                                     "capabilities": ["storage", "events", "delete"]}
    assert (result["ptp"]["manufacturer"], result["ptp"]["model"], result["ptp"]["version"]) == \
        ("QEMU", "QEMU filesharing", "0.1")
    assert "0x100b" in result["ptp"]["operations"] and "0x100e" not in result["ptp"]["operations"]
    assert [s["item"] for s in result["storages"]] == [STORAGE]
    assert result["storages"][0]["storage_id"] == 0x00010001 and result["storages"][0]["access"] == "read-write"
    assert result["listed"] is True and result["objects"] == 3
    tree = {t["item"]: (t["kind"], t.get("size")) for t in result["tree"]}
    assert tree == {f"{STORAGE}/DCIM": ("folder", None),
                    **{f"{STORAGE}/{name}": ("picture" if name.endswith(".JPG") else "file", len(data))
                       for name, data in rs.FILES.items()}}  # format 0x3000 everywhere: a picture by its name
    target = rs.FILES[rs.TARGET]
    assert result["file"]["item"] == f"{STORAGE}/{rs.TARGET}"
    assert bytes.fromhex(result["file"]["bytes"]) == target
    assert result["file"]["sha256"] == hashlib.sha256(target).hexdigest()
    assert result["events"] == [] and result["unplugged"] is False


def test_replayed_bytes_come_from_the_capture(tmp_path: Path) -> None:
    """A negative control: change the file's bytes in a copy of the capture, and the
    driver copies out the changed bytes."""
    target = rs.FILES[rs.TARGET]
    data = bytearray((DATA / "usb-mtp.pcap").read_bytes())
    at = data.find(target)
    assert at > 0 and data.find(target, at + 1) < 0
    data[at + 20:at + 24] = b"\x00\x11\x22\x33"
    changed = tmp_path / "changed.pcap"
    changed.write_bytes(bytes(data))
    replayed = replay(changed)
    assert replayed.result is not None, replayed.details
    assert bytes.fromhex(replayed.result["file"]["bytes"]) == target[:20] + b"\x00\x11\x22\x33" + target[24:]


def test_qemu_own_capture_cannot_be_replayed() -> None:
    """The facts about usb-mtp's ``pcap=`` capture (QEMU 7.2 hw/usb/pcap.c) that keep
    umockdev from replaying it; see the module's doc."""
    records = rs.read_pcap((DATA / "usb-mtp.qemu.pcap").read_bytes())
    data_records = [(f, d) for f, d in records if f["xfer"] in (rs.XFER_BULK, rs.XFER_INTERRUPT)]
    assert data_records
    assert {f["busnum"] for f, _ in records} == {0}  # never set; the device is on bus 1
    assert all(f["len_cap"] == 64 + len(d) for f, d in records)  # the header counted in len_cap
    in_submits = [f for f, _ in data_records if f["type"] == "S" and f["ep"] & 0x80]
    out_completions = [f for f, _ in data_records if f["type"] == "C" and not f["ep"] & 0x80]
    assert in_submits and all(f["length"] == 0 for f in in_submits)  # libusb submitted 1 MiB / 64 bytes
    assert out_completions and all(f["length"] == 0 for f in out_completions)  # the bytes written: lost
    assert all(len(d) <= 256 for _, d in data_records)  # DATA_LEN: GetObject's 611 bytes, cut
    assert any(f["length"] > 256 and len(d) == 256 for f, d in data_records if f["type"] == "C")
    assert {f["id"] for f, _ in records if f["xfer"] == rs.XFER_CONTROL} == {0}
    # The same run as usbmon saw it, for contrast: the real lengths, the real bus.
    usbmon = rs.read_pcap((DATA / "usb-mtp.pcap").read_bytes())
    assert {f["length"] for f, _ in usbmon if f["type"] == "S" and f["ep"] == 0x81} == {1 << 20}
    assert struct.unpack_from("<H", (DATA / "usb-mtp.pcap").read_bytes(), 24 + 16 + 12)[0] == 1
