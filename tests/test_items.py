"""The WIA item model in the core, without D-Bus: reference counting rule by rule,
synchronize, and property validation; then the same rules through a DeviceManager
running in this process with the simulated scanner."""

from __future__ import annotations

import asyncio
import os

import pytest

from stillsvc.common.errors import Cancelled, Disconnected, Failed, InvalidArgument, NotFound
from stillsvc.core.config import Config, DeviceConfig
from stillsvc.core.items import (
    AppItem,
    attach_new_items,
    build_app_tree,
    check_dependent,
    check_writes,
    describe_property,
    synchronize_tree,
)
from stillsvc.core.manager import DeviceManager
from stillsvc.core.sessions import Client
from stillsvc.core.transfer import Transfer
from stillsvc.driver import Mode
from stillsvc.driver.items import Access, DriverItem, Flags, PropertySpec, Range, ValueList
from stillsvc.drivers.sim import SimulatedScanner

SPECS = [
    PropertySpec("resolution", "u", 150, valid=ValueList((75, 150, 300))),
    PropertySpec("mode", "s", "color", valid=ValueList(("color", "gray"))),
    PropertySpec("width", "u", 100, valid=Range(1, 100)),
    PropertySpec("brightness", "i", 0, valid=Range(-100, 100, 5)),
    PropertySpec("options", "u", 0, valid=Flags((0x1, 0x2, 0x8))),
    PropertySpec("gamma", "d", 1.0, valid=Range(0.5, 3.0, 0)),
    PropertySpec("label", "s", "x"),
    PropertySpec("max_width", "u", 100, access=Access.READ),
]


class Destroyed:
    """Records on_destroyed calls for every item of a tree."""

    def __init__(self, root: DriverItem) -> None:
        self.calls: list[str] = []
        self.watch(root)

    def watch(self, root: DriverItem) -> None:
        for item in root.walk():
            item.on_destroyed = lambda i: self.calls.append(i.path)


def make_tree(*children: str) -> DriverItem:
    """A tree as a minidriver builds it: the root counted into the tree, children added."""
    root = DriverItem("Root", "device")
    root.add_to_tree()
    for name in children:
        root.add_child(DriverItem(name, name.lower(), SPECS))
    return root


def counts(root: DriverItem) -> dict[str, int]:
    return {item.path: item.refcount for item in root.walk()}


# -- the reference-counting rules, one by one -----------------------------------------

def test_adding_an_item_to_the_tree_counts_one():
    root = DriverItem("Root", "device")
    assert root.refcount == 0
    root.add_to_tree()
    assert root.refcount == 1
    flatbed = root.add_child(DriverItem("Flatbed", "flatbed", SPECS))
    assert flatbed.refcount == 1
    assert flatbed.parent is root and root.children == [flatbed]
    assert flatbed.path == "Root/Flatbed"
    assert root.refcount == 1  # adding a child does not count on the parent
    assert not flatbed.removed and not flatbed.destroyed


def test_each_linked_application_item_counts_one():
    root = make_tree("Flatbed", "Feeder")
    first = build_app_tree(root)
    assert counts(root) == {"Root": 2, "Root/Flatbed": 2, "Root/Feeder": 2}
    second = build_app_tree(root)
    assert counts(root) == {"Root": 3, "Root/Flatbed": 3, "Root/Feeder": 3}
    single = AppItem(root.children[0])
    assert root.children[0].refcount == 4
    assert single.driver_item is root.children[0]
    assert [a.path for a in first.walk()] == ["Root", "Root/Flatbed", "Root/Feeder"]
    assert all(a.driver_item is d for a, d in zip(second.walk(), root.walk()))


def test_releasing_an_application_item_counts_minus_one_once():
    root = make_tree("Flatbed", "Feeder")
    first = build_app_tree(root)
    second = build_app_tree(root)
    first.release()
    assert counts(root) == {"Root": 2, "Root/Flatbed": 2, "Root/Feeder": 2}
    assert all(a.released and not a.connected for a in first.walk())
    first.release()  # releasing twice severs nothing more
    assert counts(root) == {"Root": 2, "Root/Flatbed": 2, "Root/Feeder": 2}
    assert all(a.connected for a in second.walk())


def test_releasing_one_child_item_affects_only_its_driver_item():
    root = make_tree("Flatbed", "Feeder")
    app = build_app_tree(root)
    app.children[1].release()
    assert counts(root) == {"Root": 2, "Root/Flatbed": 2, "Root/Feeder": 1}


def test_removal_counts_minus_one_and_marks_the_item():
    root = make_tree("Flatbed", "Feeder")
    feeder = root.children[1]
    app = build_app_tree(root)
    feeder.remove()
    assert feeder.removed
    assert feeder.refcount == 1  # the application item's link is all that is left
    assert not feeder.destroyed
    assert feeder not in root.children
    with pytest.raises(Disconnected):
        feeder.check_device_access()
    root.children[0].check_device_access()  # the rest of the tree is untouched
    assert counts(root) == {"Root": 2, "Root/Flatbed": 2}
    feeder.remove()  # removing twice does not count twice
    assert feeder.refcount == 1
    assert app.children[1].driver_item is feeder and not app.children[1].connected


def test_removing_the_root_removes_the_whole_subtree():
    root = make_tree("Flatbed", "Feeder")
    items = list(root.walk())
    app = build_app_tree(root)
    root.remove()
    assert all(item.removed and item.refcount == 1 and not item.destroyed for item in items)
    assert not any(a.connected for a in app.walk())


def test_a_removed_item_lives_on_for_its_application_items_which_still_read_properties():
    root = make_tree("Flatbed")
    flatbed = root.children[0]
    app = build_app_tree(root)
    item = app.children[0]
    item.values["resolution"] = 300  # the application item's own copy
    root.remove()
    assert not flatbed.destroyed
    assert item.values["resolution"] == 300
    assert item.specs["resolution"].default == 150
    assert item.name == "Flatbed" and item.path == "Root/Flatbed" and item.kind == "flatbed"
    assert not item.connected
    with pytest.raises(Disconnected, match="Root/Flatbed"):
        item.check_device_access()
    with pytest.raises(Disconnected):
        app.check_device_access()


def test_a_released_application_item_may_not_touch_the_device():
    root = make_tree("Flatbed")
    app = build_app_tree(root)
    app.children[0].check_device_access()
    app.release()
    with pytest.raises(Disconnected, match="released"):
        app.children[0].check_device_access()


def test_destroyed_at_zero_root_included_and_called_once():
    root = make_tree("Flatbed", "Feeder")
    destroyed = Destroyed(root)
    app = build_app_tree(root)
    root.remove()
    assert destroyed.calls == []  # still linked by the application items
    app.children[1].release()
    assert destroyed.calls == ["Root/Feeder"]
    app.release()
    assert sorted(destroyed.calls) == ["Root", "Root/Feeder", "Root/Flatbed"]
    assert all(item.destroyed and item.refcount == 0 for item in [root, *app.driver_item.children] + [
        a.driver_item for a in app.walk()])
    app.release()
    root.remove()
    assert sorted(destroyed.calls) == ["Root", "Root/Feeder", "Root/Flatbed"]  # once each


def test_root_without_application_items_is_destroyed_when_removed():
    root = make_tree("Flatbed")
    destroyed = Destroyed(root)
    root.remove()
    assert sorted(destroyed.calls) == ["Root", "Root/Flatbed"]
    assert root.destroyed and root.refcount == 0


def test_zero_only_when_no_application_items_and_out_of_the_tree():
    root = make_tree("Flatbed")
    destroyed = Destroyed(root)
    app = build_app_tree(root)
    app.release()  # no application items, but still in the tree
    assert destroyed.calls == []
    assert counts(root) == {"Root": 1, "Root/Flatbed": 1}
    other = build_app_tree(root)
    root.remove()  # out of the tree, but linked
    assert destroyed.calls == []
    other.release()
    assert sorted(destroyed.calls) == ["Root", "Root/Flatbed"]


def test_the_count_never_goes_below_zero():
    item = DriverItem("Loose", "flatbed")
    with pytest.raises(Failed, match="below zero"):
        item.unlink()
    assert item.refcount == 0 and not item.destroyed
    root = make_tree("Flatbed")
    flatbed = root.children[0]
    root.remove()
    assert flatbed.destroyed and flatbed.refcount == 0
    with pytest.raises(Failed, match="below zero"):
        flatbed.unlink()
    assert flatbed.refcount == 0


def test_a_destroyed_item_cannot_be_linked_or_added_again():
    root = make_tree("Flatbed")
    flatbed = root.children[0]
    root.remove()
    with pytest.raises(Disconnected):
        AppItem(flatbed)
    with pytest.raises(Disconnected):
        flatbed.add_to_tree()
    with pytest.raises(Disconnected):
        root.add_child(DriverItem("Feeder", "feeder"))
    assert flatbed.refcount == 0


def test_a_removed_item_cannot_rejoin_a_tree():
    root = make_tree("Flatbed")
    flatbed = root.children[0]
    AppItem(flatbed)
    flatbed.remove()
    other = make_tree()
    with pytest.raises(Failed):
        other.add_child(flatbed)
    with pytest.raises(Failed):
        other.add_child(make_tree("X").children[0])  # already has a parent
    assert flatbed.refcount == 1


def test_build_app_tree_skips_removed_items():
    root = make_tree("Flatbed", "Feeder")
    build_app_tree(root)
    root.children[1].remove()
    app = build_app_tree(root)
    assert [a.path for a in app.walk()] == ["Root", "Root/Flatbed"]


# -- synchronize --------------------------------------------------------------------------

def test_synchronize_keeps_present_items_with_their_links_and_removes_missing_ones():
    root = make_tree("Flatbed", "Feeder")
    flatbed, feeder = root.children
    destroyed = Destroyed(root)
    apps = [build_app_tree(root), build_app_tree(root)]
    added, removed = synchronize_tree(root, make_tree("Flatbed"))
    assert added == []
    assert removed == [feeder]
    assert root.children == [flatbed]  # the same object: links kept
    assert counts(root) == {"Root": 3, "Root/Flatbed": 3}
    assert feeder.removed and feeder.refcount == 2 and not feeder.destroyed
    assert all(app.children[0].driver_item is flatbed and app.children[0].connected for app in apps)
    assert all(not app.children[1].connected for app in apps)
    apps[0].release()
    apps[1].children[1].release()
    assert destroyed.calls == ["Root/Feeder"]
    assert counts(root) == {"Root": 2, "Root/Flatbed": 2}


def test_synchronize_removes_a_whole_subtree():
    root = make_tree("Feeder")
    root.children[0].add_child(DriverItem("Back", "side"))
    destroyed = Destroyed(root)
    added, removed = synchronize_tree(root, make_tree())
    assert [i.path for i in removed] == ["Root/Feeder", "Root/Feeder/Back"]
    assert sorted(destroyed.calls) == ["Root/Feeder", "Root/Feeder/Back"]
    assert added == [] and root.children == []


def test_synchronize_adds_new_items_counting_one_each():
    root = make_tree("Flatbed")
    app = build_app_tree(root)
    fresh = make_tree("Flatbed", "Feeder")
    fresh.children[1].add_child(DriverItem("Back", "side"))
    added, removed = synchronize_tree(root, fresh)
    assert removed == []
    assert [i.path for i in added] == ["Root/Feeder", "Root/Feeder/Back"]
    assert all(i.refcount == 1 and not i.removed for i in added)
    assert added[0].parent is root and root.children[1] is added[0]
    assert counts(root) == {"Root": 2, "Root/Flatbed": 2, "Root/Feeder": 1, "Root/Feeder/Back": 1}
    created = attach_new_items(app, added)
    assert [a.path for a in created] == ["Root/Feeder", "Root/Feeder/Back"]
    assert app.children[1] is created[0] and created[0].parent is app
    assert created[0].children == [created[1]] and created[1].parent is created[0]
    assert counts(root) == {"Root": 2, "Root/Flatbed": 2, "Root/Feeder": 2, "Root/Feeder/Back": 2}
    assert attach_new_items(app, added) == []  # never twice
    assert counts(root)["Root/Feeder"] == 2
    # The added items follow the rules like any other: removed and released, gone.
    destroyed = Destroyed(root)
    synchronize_tree(root, make_tree("Flatbed"))
    assert destroyed.calls == []
    app.release()
    assert sorted(destroyed.calls) == ["Root/Feeder", "Root/Feeder/Back"]


def test_attach_new_items_gives_a_session_that_never_had_the_item_a_new_one():
    root = make_tree("Flatbed", "Feeder")
    synchronize_tree(root, make_tree("Flatbed"))
    app = build_app_tree(root)  # opened while the feeder was away
    added, _ = synchronize_tree(root, make_tree("Flatbed", "Feeder"))
    (created,) = attach_new_items(app, added)
    assert created.connected and created.driver_item is added[0]
    assert [a.path for a in app.walk()] == ["Root", "Root/Flatbed", "Root/Feeder"]


def test_attach_new_items_replaces_a_disconnected_item_of_the_same_path():
    root = make_tree("Flatbed", "Feeder")
    app = build_app_tree(root)
    synchronize_tree(root, make_tree("Flatbed"))
    assert not app.children[1].connected
    added, _ = synchronize_tree(root, make_tree("Flatbed", "Feeder"))
    created = attach_new_items(app, added)
    assert [a.path for a in created] == ["Root/Feeder"]
    assert any(child.connected and child.path == "Root/Feeder" for child in app.children)
    assert added[0].refcount == 2


# -- properties: valid values and checking writes ---------------------------------------------

def test_range_checks_bounds_step_and_type():
    r = Range(-100, 100, 5)
    assert r.check(-100) and r.check(0) and r.check(95) and r.check(100)
    assert not r.check(101) and not r.check(-105) and not r.check(3)
    assert not r.check(True) and not r.check("5") and not r.check(None)
    assert r.describe() == "-100..100 step 5"
    assert r.as_dict() == {"kind": "range", "min": -100, "max": 100, "step": 5}
    assert Range(0.5, 3.0, 0).check(1.2345)
    assert Range(0, 1, 0.25).check(0.75) and not Range(0, 1, 0.25).check(0.3)
    assert Range(10, 20, 3).check(13) and not Range(10, 20, 3).check(12)  # steps count from the minimum


def test_value_list_checks_exact_values_and_types():
    v = ValueList((75, 150, 300))
    assert v.check(150) and not v.check(123)
    assert not v.check(150.0) and not v.check("150")
    assert not ValueList((1, 8)).check(True)  # a boolean is not the integer 1
    assert v.describe() == "one of 75, 150, 300"
    assert v.as_dict() == {"kind": "list", "values": [75, 150, 300]}


def test_flags_accept_any_combination_of_the_flags_only():
    f = Flags((0x1, 0x2, 0x8))
    for value in (0, 0x1, 0x2, 0x8, 0x3, 0xB):
        assert f.check(value), value
    for value in (0x4, 0x10, 0xF, -1, True, 1.0):
        assert not f.check(value), value
    assert f.describe() == "flags from 0x1, 0x2, 0x8"
    assert f.as_dict() == {"kind": "flags", "values": [1, 2, 8]}


def app_item() -> AppItem:
    return build_app_tree(make_tree("Flatbed")).children[0]


def test_check_writes_accepts_good_values():
    assert check_writes(app_item(), {"resolution": 300, "mode": "gray", "brightness": -5, "options": 0x9,
                                     "gamma": 2, "label": "anything"}, set()) == {
        "resolution": 300, "mode": "gray", "brightness": -5, "options": 9, "gamma": 2.0, "label": "anything"}


def test_check_writes_unknown_property_names_it_and_the_known_ones():
    with pytest.raises(InvalidArgument) as e:
        check_writes(app_item(), {"colour": "red"}, set())
    assert "'colour'" in e.value.message
    assert "resolution" in e.value.message and "brightness" in e.value.message


def test_check_writes_read_only_property():
    with pytest.raises(InvalidArgument, match="max_width .*read-only"):
        check_writes(app_item(), {"max_width": 10}, set())


@pytest.mark.parametrize(("name", "value", "needle"), [
    ("resolution", "300", "type 'u'"),
    ("resolution", 300.0, "type 'u'"),
    ("brightness", True, "boolean"),
    ("mode", 1, "type 's'"),
    ("gamma", "1", "type 'd'"),
])
def test_check_writes_wrong_type_names_the_property_and_type(name, value, needle):
    with pytest.raises(InvalidArgument) as e:
        check_writes(app_item(), {name: value}, set())
    assert name in e.value.message and needle in e.value.message


@pytest.mark.parametrize(("name", "value", "valid"), [
    ("resolution", 123, "one of 75, 150, 300"),
    ("mode", "lineart", "one of color, gray"),
    ("width", 101, "1..100 step 1"),
    ("width", 0, "1..100 step 1"),
    ("brightness", 7, "-100..100 step 5"),
    ("options", 0x4, "flags from 0x1, 0x2, 0x8"),
    ("gamma", 3.5, "0.5..3 step 0"),
])
def test_check_writes_out_of_range_names_the_property_and_valid_values(name, value, valid):
    with pytest.raises(InvalidArgument) as e:
        check_writes(app_item(), {name: value}, set())
    assert f"property {name}" in e.value.message
    assert valid in e.value.message


def test_check_writes_leaves_dependent_values_to_check_dependent_but_checks_their_type():
    app = app_item()
    assert check_writes(app, {"width": 500}, {"width"}) == {"width": 500}
    with pytest.raises(InvalidArgument, match="width"):
        check_writes(app, {"width": "500"}, {"width"})
    check_dependent({"width": 500}, {"width": Range(1, 600)})
    check_dependent({"width": 500}, {"width": None, "height": Range(1, 2)})  # height not given
    with pytest.raises(InvalidArgument) as e:
        check_dependent({"width": 500}, {"width": Range(1, 400)})
    assert "property width" in e.value.message and "1..400 step 1" in e.value.message


def test_check_writes_changes_nothing_on_the_item():
    app = app_item()
    before = dict(app.values)
    with pytest.raises(InvalidArgument):
        check_writes(app, {"resolution": 300, "width": 1000}, set())
    assert app.values == before


def test_integer_values_outside_the_dbus_type_are_refused():
    spec = PropertySpec("counter", "u", 0)
    with pytest.raises(InvalidArgument, match="counter"):
        spec.check(-1)
    with pytest.raises(InvalidArgument, match="level"):
        PropertySpec("level", "i", 0).check(2**40)


def test_describe_property_gives_type_access_and_valid_values():
    spec = SPECS[0]
    assert describe_property(spec, spec.valid) == {
        "type": "u", "access": "rw", "description": "", "valid": {"kind": "list", "values": [75, 150, 300]},
        "inactive": False}
    assert describe_property(spec, spec.valid, inactive=True)["inactive"] is True
    assert describe_property(SPECS[-1], None)["valid"] == {"kind": "none"}
    assert describe_property(SPECS[-1], None)["access"] == "r"
    assert describe_property(SPECS[2], Range(1, 50))["valid"]["max"] == 50  # dynamic values win


def test_application_items_own_their_property_copies():
    root = make_tree("Flatbed")
    first, second = build_app_tree(root).children[0], build_app_tree(root).children[0]
    first.values["resolution"] = 300
    assert second.values["resolution"] == 150
    assert root.children[0].values["resolution"] == 150


# -- the same rules in a DeviceManager with the simulated scanner ----------------------------------

@pytest.fixture
async def manager(tmp_path):
    m = DeviceManager(Config(runtime_dir=str(tmp_path / "run")), drivers={"sim": SimulatedScanner})
    await m.add_device(DeviceConfig(id="sim0", driver="sim"))
    yield m
    await m.stop()


async def open_with_items(manager: DeviceManager, mode: Mode, client: str):
    """A session whose application items exist (they are made on first use)."""
    session = await manager.create_session("sim0", mode, Client(client))
    manager.devices["sim0"].items_for(session)
    return session


def report(manager: DeviceManager, device_id: str = "sim0") -> dict[tuple[str, int], dict]:
    return {(e["path"], e["generation"]): e for e in manager.item_report(device_id)}


def refcounts(manager: DeviceManager) -> dict[str, int]:
    return {e["path"]: e["refcount"] for e in manager.item_report("sim0")}


async def test_application_items_are_made_on_first_use(manager):
    session = await manager.create_session("sim0", Mode.STATUS, Client("c1"))
    assert session.root_item is None
    assert refcounts(manager) == {"Root": 1, "Root/Flatbed": 1, "Root/Feeder": 1}
    root = manager.devices["sim0"].items_for(session)
    assert root is session.root_item is manager.devices["sim0"].items_for(session)
    assert refcounts(manager) == {"Root": 2, "Root/Flatbed": 2, "Root/Feeder": 2}


async def test_manager_sessions_link_and_release_their_items(manager):
    assert refcounts(manager) == {"Root": 1, "Root/Flatbed": 1, "Root/Feeder": 1}
    s1 = await open_with_items(manager, Mode.BOTH, "c1")
    s2 = await open_with_items(manager, Mode.STATUS, "c2")
    assert [a.path for a in s1.root_item.walk()] == ["Root", "Root/Flatbed", "Root/Feeder"]
    assert s1.root_item is not s2.root_item
    assert refcounts(manager) == {"Root": 3, "Root/Flatbed": 3, "Root/Feeder": 3}
    await manager.close_session(s1)
    assert all(a.released for a in s1.root_item.walk())
    assert refcounts(manager) == {"Root": 2, "Root/Flatbed": 2, "Root/Feeder": 2}
    await manager.close_session(s1)  # closing twice releases nothing more
    await manager.close_session(s2)
    assert refcounts(manager) == {"Root": 1, "Root/Flatbed": 1, "Root/Feeder": 1}
    assert all(not e["removed"] and e["present"] for e in manager.item_report("sim0"))


async def test_manager_write_properties_is_per_item_and_validated(manager):
    s1 = await open_with_items(manager, Mode.STATUS, "c1")
    s2 = await open_with_items(manager, Mode.STATUS, "c2")
    device = manager.get("sim0")
    flatbed1, flatbed2 = s1.root_item.children[0], s2.root_item.children[0]
    changed = await device.write_item_properties(flatbed1, {"resolution": 300})
    assert {"resolution", "width", "height", "max_width", "max_height"} <= set(changed)
    assert flatbed1.values["resolution"] == 300 and flatbed1.values["max_width"] == 2551
    assert flatbed2.values["resolution"] == 150 and flatbed2.values["max_width"] == 1275
    with pytest.raises(InvalidArgument, match="width"):
        await device.write_item_properties(flatbed1, {"width": 3000})
    assert flatbed1.values["width"] == 2550  # a refused write changes nothing
    assert await device.write_item_properties(flatbed1, {"resolution": 300}) == []


async def test_manager_unplug_keeps_linked_items_until_the_last_session_closes(manager):
    s1 = await open_with_items(manager, Mode.BOTH, "c1")
    s2 = await open_with_items(manager, Mode.STATUS, "c2")
    device = manager.get("sim0")
    device.driver.connected = False
    await manager.remove_device("sim0", keep_driver=True)
    entries = manager.item_report("sim0")
    assert [e["path"] for e in entries] == ["Root", "Root/Flatbed", "Root/Feeder"]
    assert all(e["refcount"] == 2 and e["removed"] and not e["present"] and e["generation"] == 1
               for e in entries)
    flatbed = s1.root_item.children[0]
    assert flatbed.values["resolution"] == 150 and not flatbed.connected
    with pytest.raises(Disconnected):
        flatbed.check_device_access()
    with pytest.raises(Disconnected):
        await device.write_item_properties(flatbed, {"resolution": 300})
    with pytest.raises(Disconnected):
        s1.check_open()
    await manager.close_session(s1)
    assert refcounts(manager) == {"Root": 1, "Root/Flatbed": 1, "Root/Feeder": 1}
    await manager.close_session(s2)
    assert device.live_items == []
    with pytest.raises(NotFound):
        manager.item_report("sim0")


async def test_manager_replug_shows_both_generations(manager):
    s1 = await open_with_items(manager, Mode.STATUS, "c1")
    driver = manager.get("sim0").driver
    driver.connected = False
    await manager.remove_device("sim0", keep_driver=True)
    driver.connected = True
    await manager.replug("sim0")
    entries = report(manager)
    assert entries[("Root/Flatbed", 1)]["present"] is False and entries[("Root/Flatbed", 1)]["removed"] is True
    assert entries[("Root/Flatbed", 1)]["refcount"] == 1
    assert entries[("Root/Flatbed", 2)]["present"] is True and entries[("Root/Flatbed", 2)]["removed"] is False
    assert entries[("Root/Flatbed", 2)]["refcount"] == 1
    await manager.close_session(s1)
    assert sorted(report(manager)) == [("Root", 2), ("Root/Feeder", 2), ("Root/Flatbed", 2)]
    assert all(e["present"] for e in manager.item_report("sim0"))


async def test_manager_synchronize_removes_and_adds_items(manager):
    device = manager.get("sim0")
    s1 = await open_with_items(manager, Mode.STATUS, "c1")
    old_feeder = device.tree.children[1]
    device.driver.feeder_attached = False
    added, removed = await device.synchronize(s1)
    assert added == [] and removed == [old_feeder]
    assert refcounts(manager) == {"Root": 2, "Root/Flatbed": 2, "Root/Feeder": 1}
    assert report(manager)[("Root/Feeder", 1)]["removed"] is True
    assert not s1.root_item.children[1].connected
    assert s1.root_item.children[0].connected
    s2 = await open_with_items(manager, Mode.STATUS, "c2")
    assert [a.path for a in s2.root_item.walk()] == ["Root", "Root/Flatbed"]
    device.driver.feeder_attached = True
    added, removed = await device.synchronize(s2)
    assert [i.path for i in added] == ["Root/Feeder"] and removed == []
    assert [a.path for a in s2.root_item.walk()] == ["Root", "Root/Flatbed", "Root/Feeder"]
    assert s2.root_item.children[1].driver_item is added[0] and s2.root_item.children[1].connected
    assert added[0] in device.live_items
    await manager.close_session(s1)  # the last link of the removed feeder
    assert old_feeder.destroyed and old_feeder not in device.live_items
    assert [e["path"] for e in manager.item_report("sim0")] == ["Root", "Root/Flatbed", "Root/Feeder"]


async def test_manager_synchronize_on_an_unplugged_device_is_disconnected(manager):
    device = manager.get("sim0")
    s1 = await open_with_items(manager, Mode.STATUS, "c1")
    device.driver.connected = False
    await manager.remove_device("sim0", keep_driver=True)
    with pytest.raises(Disconnected):
        await device.synchronize(s1)


async def test_manager_unplug_during_a_transfer_fails_it_with_disconnected(manager):
    device = manager.get("sim0")
    session = await open_with_items(manager, Mode.BOTH, "c1")
    flatbed = session.root_item.children[0]
    await device.write_item_properties(flatbed, {"resolution": 600})
    r, w = os.pipe()
    try:
        transfer = Transfer(device, session, flatbed, w, "raw")  # its job joins session.jobs when it starts
        running = asyncio.ensure_future(transfer.run())
        await asyncio.wait_for(_readable(r), 5)  # the transfer has started writing
        device.driver.connected = False
        await manager.remove_device("sim0", keep_driver=True)
        with pytest.raises(Disconnected):
            await asyncio.wait_for(running, 5)
    finally:
        os.close(r)


async def test_manager_cancel_ends_a_transfer_with_cancelled(manager):
    device = manager.get("sim0")
    session = await open_with_items(manager, Mode.BOTH, "c1")
    flatbed = session.root_item.children[0]
    await device.write_item_properties(flatbed, {"resolution": 600})
    r, w = os.pipe()
    try:
        transfer = Transfer(device, session, flatbed, w, "raw")
        running = asyncio.ensure_future(transfer.run())
        await asyncio.wait_for(_readable(r), 5)
        transfer.stop("cancelled by the test")
        with pytest.raises(Cancelled, match="cancelled by the test"):
            await asyncio.wait_for(running, 5)
        assert device.device_lock.holder is None
    finally:
        os.close(r)


async def _readable(fd: int) -> None:
    loop = asyncio.get_running_loop()
    ready = loop.create_future()
    loop.add_reader(fd, lambda: ready.done() or ready.set_result(None))
    try:
        await ready
    finally:
        loop.remove_reader(fd)
