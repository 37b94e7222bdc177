"""Discovery without udev: what a USB device's udev snapshot becomes as a candidate
(ids that survive replugging, hubs left out, a serial number claimed twice), and
what the device manager does with candidates — a failing driver gives a failed
device that a later report retries, a report of a working device leaves it
alone, a device that no driver matches is listed with the reason.

The end-to-end behaviour, with real pyudev under umockdev, is tests/test_hotplug.py.
"""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from stillsvc.common.errors import Failed
from stillsvc.common.names import valid_device_id
from stillsvc.core.config import Config
from stillsvc.core.listener import Listener
from stillsvc.core.manager import DeviceManager
from stillsvc.discovery.udev import Snapshot, candidate_of, parse_interfaces
from stillsvc.driver import Candidate, Match, Mode
from stillsvc.drivers.sim import SimulatedScanner


def snap(sys_name: str = "1-2", serial: str = "", action: str = "add", **properties: str) -> Snapshot:
    props = {"ID_VENDOR_ID": "04a9", "ID_MODEL_ID": "190a", "BUSNUM": "001", "DEVNUM": "007",
             "ID_USB_INTERFACES": ":060101:", **properties}
    if serial:
        props["ID_SERIAL_SHORT"] = serial
    return Snapshot(path=f"/devices/pci0000:00/0000:00:14.0/usb1/{sys_name}", sys_name=sys_name, action=action,
                    properties=props)


def test_interfaces_are_parsed_and_junk_is_skipped():
    assert parse_interfaces(":060101:030102:") == ((6, 1, 1), (3, 1, 2))
    assert parse_interfaces(":zz0101:0601:070102:") == ((7, 1, 2),)
    assert parse_interfaces("") == ()


def test_id_is_vendor_product_serial_and_survives_another_port():
    a = candidate_of(snap("1-2", serial="ABC123"))
    b = candidate_of(snap("3-1.4", serial="ABC123", DEVNUM="042"))
    assert a is not None and b is not None
    assert a.id == b.id == "04a9-190a-ABC123"
    assert (a.port, b.port) == ("usb:001:007", "usb:001:042")
    assert a.device_id("ptp") == "ptp-04a9-190a-ABC123"
    assert a.interfaces == ((6, 1, 1),) and a.vendor_id == 0x04A9 and a.product_id == 0x190A


def test_without_a_serial_the_port_tells_identical_devices_apart():
    a, b = candidate_of(snap("1-2")), candidate_of(snap("1-3"))
    assert a is not None and b is not None
    assert (a.id, b.id) == ("04a9-190a-at-1-2", "04a9-190a-at-1-3")
    tagged = candidate_of(snap("1-2", ID_PATH_TAG="pci-0000_00_14_0-usb-0_2"))
    assert tagged is not None and tagged.id == "04a9-190a-at-pci-0000_00_14_0-usb-0_2"


def test_a_serial_claimed_twice_gives_the_second_device_its_port():
    first = candidate_of(snap("1-2", serial="0000"))
    assert first is not None
    second = candidate_of(snap("1-3", serial="0000"), taken=frozenset({first.id}))
    assert second is not None and second.id == "04a9-190a-0000-at-1-3"
    # It keeps that id on a change, even once the first device has gone.
    again = candidate_of(snap("1-3", serial="0000"), known=second.id)
    assert again is not None and again.id == second.id


def test_hubs_and_devices_without_ids_are_not_candidates():
    assert candidate_of(snap(ID_USB_INTERFACES=":090000:")) is None
    hub = snap()
    hub.attributes["bDeviceClass"] = "09"
    assert candidate_of(hub) is None
    assert candidate_of(snap(ID_VENDOR_ID="", ID_MODEL_ID="")) is None
    # Without udev's properties the sysfs attributes do.
    bare = Snapshot(path="/devices/x/1-5", sys_name="1-5",
                    attributes={"idVendor": "046d", "idProduct": "c52b", "busnum": "2", "devnum": "3",
                                "manufacturer": "Logitech", "product": "USB Receiver"})
    c = candidate_of(bare)
    assert c is not None and c.id == "046d-c52b-at-1-5" and c.port == "usb:002:003"
    assert c.name == "Logitech USB Receiver"


def test_names_come_from_the_device_then_the_hardware_database():
    c = candidate_of(snap(ID_VENDOR_FROM_DATABASE="Canon, Inc.", ID_MODEL="CanoScan_LiDE_60",
                          ID_STILLSVC_DRIVER="sane"))
    assert c is not None
    assert (c.vendor, c.model, c.name, c.driver) == ("Canon, Inc.", "CanoScan LiDE 60",
                                                       "Canon, Inc. CanoScan LiDE 60", "sane")


@given(serial=st.text(min_size=1, max_size=200), port=st.text(min_size=1, max_size=80))
def test_every_id_is_a_valid_device_id(serial, port):
    c = candidate_of(snap(sys_name=port, serial=serial))
    assert c is not None
    assert valid_device_id(c.id) and valid_device_id(c.device_id("a-long-driver-name"))


# -- the manager as the backends' sink ----------------------------------------------

class FlakyScanner(SimulatedScanner):
    """The simulator on "USB", refusing to start while its candidate says so."""

    name = "flaky"
    matches = (Match(subsystem="usb", vendor_id=0x04A9, interface=(6, None, None)),)

    def initialize(self, port, mode: Mode):  # type: ignore[no-untyped-def]
        if self.config.properties.get("FAIL"):
            raise OSError("the scanner's lamp is broken")
        return super().initialize(port, mode)


class Recorder(Listener):
    def __init__(self) -> None:
        self.seen: list[tuple[str, str]] = []

    def device_added(self, device) -> None:  # type: ignore[no-untyped-def]
        self.seen.append(("added", device.state))

    def device_removed(self, device) -> None:  # type: ignore[no-untyped-def]
        self.seen.append(("removed", device.id))

    def device_changed(self, device, names) -> None:  # type: ignore[no-untyped-def]
        self.seen.append(("changed", ",".join(names)))


def usb(serial: str = "S1", **properties: str) -> Candidate:
    c = candidate_of(snap(serial=serial, **properties))
    assert c is not None
    return c


@pytest.fixture
async def manager(tmp_path):
    m = DeviceManager(Config(runtime_dir=str(tmp_path / "run")), drivers={"flaky": FlakyScanner})
    recorder = Recorder()
    m.listeners.append(recorder)
    m.recorder = recorder  # type: ignore[attr-defined]
    yield m
    await m.stop()


async def test_a_failing_driver_gives_a_failed_device_that_a_change_retries(manager):
    await manager.found(usb(FAIL="1"))
    device = manager.get("flaky-04a9-190a-S1")
    assert device.state == "failed" and "lamp is broken" in device.failure and device.tree is None
    with pytest.raises(Failed, match="lamp is broken"):
        device.check_usable()
    entry = manager.candidates["04a9-190a-S1"]
    assert (entry.status, entry.driver) == ("failed", "flaky") and "lamp" in entry.reason
    await manager.found(usb(FAIL="1"))  # fails again: the same object, its reason announced
    assert manager.get("flaky-04a9-190a-S1") is device
    assert manager.recorder.seen == [("added", "failed"), ("changed", "StateReason")]
    await manager.found(usb())  # the change that fixes it: replaced by a working device
    working = manager.get("flaky-04a9-190a-S1")
    assert working is not device and working.state == "ready" and working.tree is not None
    assert working.generation == device.generation + 1
    assert manager.recorder.seen[-2:] == [("removed", "flaky-04a9-190a-S1"), ("added", "ready")]
    assert manager.candidates["04a9-190a-S1"].status == "added"


async def test_a_report_of_a_working_device_leaves_it_alone(manager):
    await manager.found(usb())
    device = manager.get("flaky-04a9-190a-S1")
    await manager.found(usb(ID_MODEL_FROM_DATABASE="renamed"))
    assert manager.get("flaky-04a9-190a-S1") is device and device.generation == 1
    assert manager.recorder.seen == [("added", "ready")]


async def test_lost_removes_the_device_and_a_replug_is_a_new_generation(manager):
    await manager.found(usb())
    first = manager.get("flaky-04a9-190a-S1")
    await manager.lost("04a9-190a-S1")
    assert first.disconnected and "flaky-04a9-190a-S1" not in manager.devices
    assert manager.candidate_report() == []
    await manager.found(usb())
    assert manager.get("flaky-04a9-190a-S1").generation == 2


async def test_unmatched_devices_are_listed_with_the_reason_and_a_rematch_removes(manager):
    await manager.found(usb(ID_USB_INTERFACES=":030102:"))  # a mouse
    (entry,) = manager.candidate_report()
    assert (entry.status, entry.device_id) == ("unmatched", "") and "no installed driver" in entry.reason
    assert manager.devices == {}
    await manager.found(usb())
    assert "flaky-04a9-190a-S1" in manager.devices
    await manager.found(usb(ID_USB_INTERFACES=":030102:"))  # now it says it is something else
    assert manager.devices == {} and manager.candidate_report()[0].status == "unmatched"
    description = manager.candidate_report()[0].describe()
    assert description["vendor_id"] == "04a9" and description["interfaces"] == ["030102"]


async def test_a_named_driver_that_is_not_installed_is_explained(manager):
    await manager.found(usb(ID_STILLSVC_DRIVER="ptp"))
    (entry,) = manager.candidate_report()
    assert entry.status == "unmatched" and "no driver named 'ptp'" in entry.reason


# -- the matcher: the most specific declaration wins ------------------------------------------

def _driver(driver_name: str, *declared: Match) -> type:
    return type(driver_name, (SimulatedScanner,), {"name": driver_name, "matches": declared})


def test_the_most_specific_match_wins_over_a_class_driver_whatever_the_names():
    from stillsvc.driver import match

    ptp = _driver("ptp", Match("usb", interface=(6, 1, 1)))
    sane = _driver("sane", Match("usb", properties=(("libsane_matched", "yes"),)))
    vendor = _driver("zzz-vendor", Match("usb", vendor_id=0x04A9, product_id=0x190A))
    drivers = {"ptp": ptp, "sane": sane, "zzz-vendor": vendor}
    camera = Candidate("c", "usb", vendor_id=0x04A9, product_id=0x3218, interfaces=((6, 1, 1),))
    scanner = Candidate("s", "usb", vendor_id=0x04A9, product_id=0x1909, interfaces=((6, 1, 1),),
                        properties={"libsane_matched": "yes"})
    own = Candidate("o", "usb", vendor_id=0x04A9, product_id=0x190A, interfaces=((6, 1, 1),),
                    properties={"libsane_matched": "yes"})
    assert match(drivers, camera) is ptp  # only the class fits
    assert match(drivers, scanner) is sane  # SANE's hardware database beats the interface class
    assert match(drivers, own) is vendor  # the device's own ids beat both
    assert match(drivers, Candidate("x", "usb", interfaces=((3, 1, 2),))) is None
    assert match(drivers, Candidate("n", "usb", driver="ptp")) is ptp  # named outright
    # Among equals the first by name, so the choice is the same on every run.
    twin = _driver("aaa-ptp", Match("usb", interface=(6, 1, 1)))
    assert match({**drivers, "aaa-ptp": twin}, camera) is twin
