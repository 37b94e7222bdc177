"""The PTP driver against a responder nobody here wrote: QEMU's ``usb-mtp``, live.

One guest boot for the whole module (tests/qemu_guest.py: TCG, the host's root
read-only, no network) with usb-mtp serving a folder of this test's
(``readonly=off``, the harness's default, so DeleteObject reaches the host's
folder). Inside it tests/ptp_guest_script.py starts systemd-udevd (``udevadm
trigger --action=add; udevadm settle``: pyudev then sees the device with
``ID_USB_INTERFACES=:060101:`` and the rest, which is what the daemon's udev
discovery matches the ``ptp`` driver on), a private dbus-daemon and the real
daemon, ``python -m stillsvc.daemon --bus ADDRESS --udev --no-sane``, drives it
with ``stillctl`` and prints one ``CHECK <json>`` line per step, which the tests
below assert on:

* discovery: a device of driver ``ptp``, kind ``camera``, id
  ``ptp-46f4-0004-<udev's ID_SERIAL_SHORT>``, on the port udev gave it;
* the item tree: Root → ``store-00010001`` → the file placed in the folder
  before boot, and a subfolder with a file and a folder of a dozen files in it
  (usb-mtp lists one level per GetObjectHandles: the driver walks the
  associations);
* ``stillctl props`` of that file, ``stillctl get`` of it byte for byte (sha256);
* an event: while ``stillctl events DEVICE`` holds the device in data mode the
  guest prints READY, this test writes a new file beside the folder and renames
  it in (usb-mtp's inotify then sees one complete file appear: a file written
  in place is first announced with size 0, ObjectInfoChanged following ~2 s
  later), and the guest waits, bounded, for the event, whose item path must
  name the new file. usb-mtp reports every regular file as format 0x3000
  (Undefined object: hw/usb/dev-mtp.c has no other format for files), so the
  driver tells a picture by its name then: the ``.JPG`` raises ``new-picture``;
* the new file copied out byte-exact, then ``stillctl delete``: the item leaves
  the tree and the file leaves the host's folder;
* Root's ``listing`` turns false, and ``objects`` counts every object, once the
  background listing is done (the service's first tree is built while it goes
  on: the kept Root item must take the fresh values);
* the daemon ends on SIGTERM with status 0 and no traceback in its log.

The short stillctl commands run inside the guest script's process (stillctl's
own ``main()``), ``stillctl events`` as a process of its own: under TCG each
Python start costs seconds (the guest script's doc has the numbers).

About 45 s (one boot: 7 s to the command, the daemon ready ~25 s later) under
TCG with one vCPU (two are slower: MTTCG on a two-core host). Skipped, with the
reason, where QEMU, the kernel or busybox-static is missing
(``qemu_guest.unavailable_reason()``).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from qemu_guest import (
    MTP_PRODUCT_ID,
    MTP_VENDOR_ID,
    Guest,
    GuestError,
    GuestResult,
    unavailable_reason,
)


def _unavailable() -> str | None:
    reason = unavailable_reason()
    if reason is not None:
        return f"QEMU guest: {reason}"
    # The guest runs the host's own udev.
    if shutil.which("udevadm") is None or not any(
            os.path.exists(p) for p in ("/lib/systemd/systemd-udevd", "/usr/lib/systemd/systemd-udevd")):
        return "no systemd-udevd and udevadm for the guest (Debian package udev)"
    return None


REASON = _unavailable()
pytestmark = [pytest.mark.slow, pytest.mark.skipif(REASON is not None, reason=str(REASON))]

SCRIPT = Path(__file__).resolve().parent / "ptp_guest_script.py"
TOP_NAME = "IMG_0001.JPG"
TOP_BYTES = b"\xff\xd8\xff\xe0\x00\x10JFIF\x00" + bytes(range(256)) * 9 + b"\xff\xd9"
SUB_NAME = "DCIM"
SUB_FILE = "notes.txt"
SUB_BYTES = b"a file one folder down\n"
#: A folder two levels down with a dozen files: the listing takes a while, so the service's first
#: tree is built while it goes on (what test_root_says_the_listing_is_done needs), and the walk
#: goes deeper.
DEEP = f"{SUB_NAME}/100QEMU"
DEEP_FILES = {f"P{n:03d}.JPG": b"\xff\xd8" + bytes([n]) * n + b"\xff\xd9" for n in range(1, 13)}
OBJECTS = 3 + 1 + len(DEEP_FILES)  # the top file, DCIM, notes.txt; 100QEMU and its files
NEW_NAME = "IMG_0002.JPG"
NEW_BYTES = b"\xff\xd8\xff\xe1" + hashlib.sha256(b"new").digest() * 40 + b"\xff\xd9"
STORAGE = "store-00010001"  # usb-mtp's one storage (QEMU_STORAGE_ID 0x00010001)
UNDEFINED_OBJECT = 0x3000


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@dataclass
class Run:
    checks: dict[str, dict[str, Any]]
    result: GuestResult
    camera: Path
    seconds: float
    waiting: str  # why the host stopped waiting for the guest early ("" if it did not)

    def __getitem__(self, name: str) -> dict[str, Any]:
        assert name in self.checks, f"the guest printed no {name!r} check{self.details}"
        return self.checks[name]

    @property
    def details(self) -> str:
        return f"\n{self.waiting}\nchecks: {json.dumps(self.checks, indent=1)}\n{self.result.describe()}"


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Run:
    """One guest boot: the daemon, usb-mtp, and every step of tests/ptp_guest_script.py."""
    base = tmp_path_factory.mktemp("ptp-qemu")
    camera = base / "camera"
    (camera / SUB_NAME).mkdir(parents=True)
    (camera / TOP_NAME).write_bytes(TOP_BYTES)
    (camera / SUB_NAME / SUB_FILE).write_bytes(SUB_BYTES)
    (camera / DEEP).mkdir()
    for name, data in DEEP_FILES.items():
        (camera / DEEP / name).write_bytes(data)
    env = {"PTP_TOP_NAME": TOP_NAME, "PTP_TOP_SHA256": _sha(TOP_BYTES), "PTP_OBJECTS": str(OBJECTS),
           "PTP_NEW_NAME": NEW_NAME, "PTP_NEW_SHA256": _sha(NEW_BYTES), "PTP_EVENT_TIMEOUT": "25"}
    checks: dict[str, dict[str, Any]] = {}

    def on_line(line: str) -> None:
        if line.startswith("CHECK "):
            record = json.loads(line[len("CHECK "):])
            checks[record["check"]] = record

    t0 = time.monotonic()
    with Guest(camera, timeout=120) as guest:
        running = guest.start([sys.executable, str(SCRIPT)], env=env, on_line=on_line)
        try:
            running.wait_for(r"^(READY|DONE)$", timeout=100)
            if running.running and "event" not in checks:
                # The new file appears whole: written beside the folder, then renamed into it.
                incoming = base / f".{NEW_NAME}.part"
                incoming.write_bytes(NEW_BYTES)
                os.rename(incoming, camera / NEW_NAME)
                running.wait_for(r"^DONE$", timeout=80)
        except (TimeoutError, GuestError) as e:
            waiting = f"{type(e).__name__}: {e}"
        else:
            waiting = ""
        result = running.result()
    seconds = time.monotonic() - t0
    print(f"\nQEMU usb-mtp run: boot {result.boot_seconds} s, whole run {seconds:.1f} s; "
          f"steps at {[(k, v.get('t')) for k, v in checks.items()]}")
    return Run(checks, result, camera, seconds, waiting)


def test_the_guest_ran_every_step(run: Run) -> None:
    assert run.result.returncode == 0, run.details
    assert run.seconds < 100, f"the run took {run.seconds:.0f} s"


def test_udev_describes_usb_mtp_as_the_discovery_needs(run: Run) -> None:
    udev = run["udev"]["properties"]
    assert udev["ID_USB_INTERFACES"] == ":060101:", run.details
    assert (udev["ID_VENDOR_ID"], udev["ID_MODEL_ID"]) == (f"{MTP_VENDOR_ID:04x}", f"{MTP_PRODUCT_ID:04x}")
    assert udev["DEVTYPE"] == "usb_device"
    assert udev["GPHOTO2_DRIVER"] == "PTP"  # libgphoto2's hwdb knows it too
    assert udev["ID_SERIAL_SHORT"].startswith("34617-")  # usb-mtp's serial: "34617-<its path>"


def test_discovery_makes_a_ptp_camera(run: Run) -> None:
    udev = run["udev"]["properties"]
    device = run["list"]["device"]
    assert device["Driver"] == "ptp" and device["Kind"] == "camera" and device["State"] == "ready", run.details
    assert device["Id"] == f"ptp-46f4-0004-{udev['ID_SERIAL_SHORT']}", run.details
    assert device["Port"] == f"usb:{int(udev['BUSNUM']):03d}:{int(udev['DEVNUM']):03d}"
    # Vendor and model from the camera's DeviceInfo (usb-mtp: "QEMU", "QEMU filesharing").
    assert (device["Vendor"], device["Model"], device["Name"]) == ("QEMU", "QEMU filesharing", "QEMU QEMU filesharing")


def test_item_tree_walks_the_folders(run: Run) -> None:
    items = run["items"]
    assert items["ok"], run.details
    assert {i["path"]: i["kind"] for i in items["items"]} == {
        "Root": "device",
        f"Root/{STORAGE}": "storage",
        f"Root/{STORAGE}/{TOP_NAME}": "picture",  # format 0x3000: a picture by its name
        f"Root/{STORAGE}/{SUB_NAME}": "folder",
        f"Root/{STORAGE}/{SUB_NAME}/{SUB_FILE}": "file",
        f"Root/{STORAGE}/{DEEP}": "folder",
        **{f"Root/{STORAGE}/{DEEP}/{name}": "picture" for name in DEEP_FILES},
    }, run.details
    assert items["root"]["vendor"] == "QEMU" and items["root"]["model"] == "QEMU filesharing"


def test_file_properties(run: Run) -> None:
    props = run["props"]
    assert props["ok"], run.details
    values = props["values"]
    assert values["name"] == TOP_NAME and values["size"] == len(TOP_BYTES), run.details
    assert values["ptp_format"] == UNDEFINED_OBJECT and values["format"] == "image/jpeg"  # by its name
    assert values["protected"] is False and values["handle"] > 0


def test_get_copies_the_file_byte_for_byte(run: Run) -> None:
    get = run["get"]
    assert get["status"] == 0 and get["sha256"] == _sha(TOP_BYTES), run.details


def test_a_file_dropped_on_the_host_raises_an_event(run: Run) -> None:
    event = run["event"]
    assert event["ok"], run.details
    record = event["event"]
    assert record["event"] == "new-picture", run.details  # format 0x3000: a picture by its name
    assert record["device"] == run["list"]["device"]["Id"]
    assert record["data"]["item"] == f"Root/{STORAGE}/{NEW_NAME}", run.details
    assert record["data"]["name"] == NEW_NAME
    assert record["data"]["format"] == "image/jpeg"
    assert event["waited"] < 20, run.details


def test_the_new_file_copies_out(run: Run) -> None:
    new = run["get-new"]
    assert new["ok"], run.details
    assert new["values"]["name"] == NEW_NAME and new["values"]["size"] == len(NEW_BYTES), run.details


def test_delete_removes_the_file_from_the_host_folder(run: Run) -> None:
    deleted = run["delete"]
    assert deleted["ok"], run.details
    left = {i["path"] for i in deleted["items"]}
    assert f"Root/{STORAGE}/{NEW_NAME}" not in left and f"Root/{STORAGE}/{TOP_NAME}" in left, run.details
    assert not (run.camera / NEW_NAME).exists(), "DeleteObject did not remove the file from the host's folder"
    assert (run.camera / TOP_NAME).read_bytes() == TOP_BYTES
    assert (run.camera / SUB_NAME / SUB_FILE).read_bytes() == SUB_BYTES
    assert sorted(p.name for p in (run.camera / DEEP).iterdir()) == sorted(DEEP_FILES)


def test_daemon_stops_cleanly(run: Run) -> None:
    daemon = run["daemon"]
    assert daemon["traceback"] is None, daemon["traceback"]
    assert daemon["exit_status"] == 0, run.details


def test_root_says_the_listing_is_done(run: Run) -> None:
    """Root's ``listing`` and ``objects`` follow the background listing to its end: the
    service's first tree is built while the listing goes on (listing true, few objects),
    and a rebuilt tree's kept items take the driver's fresh read-only values."""
    root = run["items"]["root"]
    assert run["items"]["ok"], run.details
    daemon_log = run["daemon"]["log_head"]
    # The objects came after the first tree: kept Root, rebuilt tree (else this test proves little).
    assert re.search(r"event='item tree synchronized' .* added=[1-9]", daemon_log), daemon_log
    # The tree holds every object by now, and the driver has said so (tree_changed after its listing).
    assert root["listing"] is False and root["objects"] == OBJECTS, root
