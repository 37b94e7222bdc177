"""The interface files in ``dbus/`` against what the running daemon exports.

``dbus/<interface>.xml`` is the documented API. These tests introspect the live
daemon and require every exported ``org.stillsvc.StillImage1.*`` interface to have
a file whose methods, signals and properties are exactly the exported ones, and
every file to describe an interface the daemon still exports. They also check that
each file documents every member (ModemManager style: a comment before each
element, ``@arg:`` lines, known error names, ``Since:``) and that the bus policy
covers every documented interface.

To cover a new interface, add one line to :data:`REACH` saying how to get to an
object that exports it.
"""

from __future__ import annotations

import re
import xml.etree.ElementTree as ET
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest
from dbus_fast.aio import MessageBus
from dbus_fast.introspection import Interface, Node
from helpers import (
    BUS_NAME,
    DEVICE,
    ERROR,
    IFACE,
    ITEM,
    MANAGER,
    REPO,
    ROOT,
    SESSION,
    SIM0,
    SIMULATOR,
    call,
    create_session,
    expect_error,
    get_property,
)

from stillsvc.common.errors import ALL_ERRORS

DBUS_DIR = REPO / "dbus"
PREFIX = f"{IFACE}."
AGENT = f"{IFACE}.Agent"
OBJECT_MANAGER = "org.freedesktop.DBus.ObjectManager"
STANDARD = ("org.freedesktop.DBus.Introspectable", "org.freedesktop.DBus.Properties",
            "org.freedesktop.DBus.Peer", OBJECT_MANAGER)
DOCTYPE = ('<!DOCTYPE node PUBLIC "-//freedesktop//DTD D-BUS Object Introspection 1.0//EN"\n'
           '"http://www.freedesktop.org/standards/dbus/1.0/introspect.dtd">')

#: Finds the path of an object exporting an interface on a fresh daemon (or skips).
Locator = Callable[[MessageBus], Awaitable[str]]


def at(path: str) -> Locator:
    async def locate(bus: MessageBus) -> str:
        return path

    return locate


async def new_session(bus: MessageBus) -> str:
    return await create_session(bus, mode="both")


async def root_item(bus: MessageBus) -> str:
    path = await get_property(bus, await new_session(bus), SESSION, "RootItem")
    if path == "/":
        pytest.skip("Session.RootItem is '/': the daemon exports no Item objects yet")
    return path


#: Interface -> how to reach an object that exports it (a locator), or why no
#: object of the daemon can be introspected for it (the test is then skipped).
REACH: dict[str, Locator | str] = {
    MANAGER: at(ROOT),
    DEVICE: at(SIM0),
    SIMULATOR: at(SIM0),
    SESSION: new_session,
    ITEM: root_item,
    AGENT: "implemented by each user's agent (stillctl agent) and called by the daemon, not exported by it",
}


def xml_path(interface: str) -> Path:
    return DBUS_DIR / f"{interface}.xml"


def documented() -> list[str]:
    return sorted(p.name[: -len(".xml")] for p in DBUS_DIR.glob(f"{PREFIX}*.xml"))


def parse_file(interface: str) -> Interface:
    node = Node.parse(xml_path(interface).read_text(encoding="utf-8"))
    names = [i.name for i in node.interfaces]
    assert names == [interface], f"{xml_path(interface).name} must describe exactly {interface}, not {names}"
    return node.interfaces[0]


async def introspect(bus: MessageBus, path: str) -> Node:
    (data,) = await call(bus, path, "org.freedesktop.DBus.Introspectable", "Introspect")
    return Node.parse(data)


def shape(interface: Interface) -> dict[str, dict[str, tuple[str, ...]]]:
    """What must agree between a file and the daemon. Out-argument and signal
    argument names are not compared: the daemon does not export them."""
    return {
        "method": {m.name: (m.in_signature, m.out_signature, *(a.name or "" for a in m.in_args))
                   for m in interface.methods},
        "signal": {s.name: (s.signature,) for s in interface.signals},
        "property": {p.name: (p.signature, p.access.value) for p in interface.properties},
    }


def differences(documented_shape: dict, live_shape: dict) -> list[str]:
    def show(entry: tuple[str, ...]) -> str:
        return "(" + ", ".join(repr(part) for part in entry) + ")"

    found = []
    for kind in ("method", "signal", "property"):
        doc, live = documented_shape[kind], live_shape[kind]
        found += [f"{kind} {n} {show(doc[n])}: documented but not exported" for n in sorted(doc.keys() - live.keys())]
        found += [f"{kind} {n} {show(live[n])}: exported but not documented" for n in sorted(live.keys() - doc.keys())]
        found += [f"{kind} {n}: documented {show(doc[n])}, exported {show(live[n])}"
                  for n in sorted(doc.keys() & live.keys()) if doc[n] != live[n]]
    return found


def interface_params() -> list:
    params = []
    for interface in sorted(set(REACH) | set(documented())):
        how = REACH.get(interface)
        marks = [pytest.mark.skip(reason=f"{interface}: {how}")] if isinstance(how, str) else []
        params.append(pytest.param(interface, marks=marks, id=interface[len(PREFIX):]))
    return params


# -- the daemon against the files ---------------------------------------------------------


async def test_every_exported_interface_is_documented(client):
    session = await create_session(client, mode="both")
    missing = []
    for path in (ROOT, SIM0, session):
        for interface in (await introspect(client, path)).interfaces:
            if not interface.name.startswith(PREFIX):
                continue
            if not xml_path(interface.name).is_file():
                missing.append(f"{interface.name} (at {path}) has no file dbus/{interface.name}.xml")
            if interface.name not in REACH:
                missing.append(f"{interface.name} (at {path}) has no entry in REACH")
    assert not missing, "\n".join(missing)


@pytest.mark.parametrize("interface", interface_params())
async def test_interface_matches_its_file(client, interface):
    locate = REACH.get(interface)
    assert locate is not None, (
        f"dbus/{interface}.xml documents an interface the daemon exports at none of the known paths: "
        "delete the file, or add a line to REACH saying where the daemon exports it")
    path = await locate(client)  # type: ignore[operator]
    exported = {i.name: i for i in (await introspect(client, path)).interfaces}
    assert interface in exported, f"the daemon no longer exports {interface} at {path}"
    assert xml_path(interface).is_file(), f"{interface} (at {path}) has no file dbus/{interface}.xml"
    found = differences(shape(parse_file(interface)), shape(exported[interface]))
    assert not found, f"dbus/{interface}.xml differs from {interface} at {path}:\n" + "\n".join(found)


async def test_object_manager_is_only_at_the_root(client):
    root = {i.name for i in (await introspect(client, ROOT)).interfaces}
    assert OBJECT_MANAGER in root
    assert MANAGER in root
    session = await create_session(client, mode="both")
    for path in (SIM0, session):
        await expect_error("org.freedesktop.DBus.Error.UnknownMethod",
                           call(client, path, OBJECT_MANAGER, "GetManagedObjects"))
    (objects,) = await call(client, ROOT, OBJECT_MANAGER, "GetManagedObjects")
    assert SIM0 in objects


async def test_introspection_lists_each_interface_once(client):
    session = await create_session(client, mode="both")
    for path in (ROOT, SIM0, session):
        names = [i.name for i in (await introspect(client, path)).interfaces]
        assert len(names) == len(set(names)), f"{path} lists an interface twice: {sorted(names)}"


async def test_object_manager_is_not_advertised_where_it_is_refused(client):
    session = await create_session(client, mode="both")
    for path in (SIM0, session):
        names = {i.name for i in (await introspect(client, path)).interfaces}
        assert OBJECT_MANAGER not in names, f"{path} lists {OBJECT_MANAGER}, but GetManagedObjects fails there"


# -- the files themselves ---------------------------------------------------------------

ERROR_NAMES = {e.name for e in ALL_ERRORS}
ARG_NAME = re.compile(r"^[a-z][a-z0-9]*(_[a-z0-9]+)*$")


def parse_with_comments(path: Path) -> ET.Element:
    parser = ET.XMLParser(target=ET.TreeBuilder(insert_comments=True))
    return ET.fromstring(path.read_text(encoding="utf-8"), parser=parser)


def documented_elements(parent: ET.Element, tags: tuple[str, ...]) -> list[tuple[ET.Element, str | None]]:
    """Each child element with one of ``tags``, with the comment right before it (if any)."""
    result = []
    before: str | None = None
    for child in parent:
        if child.tag is ET.Comment:
            before = child.text or ""
            continue
        if child.tag in tags:
            result.append((child, before))
        before = None
    return result


@pytest.mark.parametrize("interface", documented())
def test_file_documents_every_member(interface):
    path = xml_path(interface)
    text = path.read_text(encoding="utf-8")
    assert text.startswith(DOCTYPE), f"{path.name} must start with the introspection DTD doctype"
    parse_file(interface)
    node = parse_with_comments(path)
    assert node.tag == "node"
    problems = []
    ((element, comment),) = documented_elements(node, ("interface",))
    if not comment or not comment.strip().startswith(f"{interface}:"):
        problems.append(f"no comment starting with '{interface}:' before the interface")
    members = documented_elements(element, ("method", "signal", "property"))
    for kind in ("method", "signal", "property"):
        names = [m.get("name") for m, _ in members if m.tag == kind]
        problems += [f"{kind} {n} is described twice" for n in sorted({n for n in names if names.count(n) > 1})]
    for member, doc in [(element, comment), *members]:
        name = member.get("name")
        what = f"{member.tag} {name}"
        if doc is None:
            problems.append(f"{what}: no comment before it")
            continue
        if member is not element and not doc.strip().startswith(f"{name}:"):
            problems.append(f"{what}: its comment must start with '{name}:'")
        if not re.search(r"^\s*Since: \d+\.\d+\s*$", doc, re.MULTILINE):
            problems.append(f"{what}: no 'Since: X.Y' line")
        for error in re.findall(rf"{re.escape(ERROR)}\.(\w+)", doc):
            if error not in ERROR_NAMES:
                problems.append(f"{what}: documents unknown error {ERROR}.{error}")
        for arg in member.findall("arg"):
            arg_name = arg.get("name")
            if not arg_name or not ARG_NAME.match(arg_name):
                problems.append(f"{what}: argument {arg_name!r} is not lowercase_with_underscores")
            elif f"@{arg_name}:" not in doc:
                problems.append(f"{what}: argument {arg_name} is not documented (no '@{arg_name}:')")
    assert not problems, f"{path.name}:\n" + "\n".join(problems)


def test_bus_policy_covers_every_documented_interface():
    policy = ET.parse(DBUS_DIR / f"{BUS_NAME}.conf").getroot()
    owners = set()
    default_allowed = set()
    agent_callers = set()
    for section in policy.iter("policy"):
        who = section.get("user") or section.get("context")
        for rule in section:
            if rule.tag is ET.Comment:
                continue
            if rule.tag == "allow" and rule.get("own") == BUS_NAME:
                owners.add(who)
            if rule.tag == "allow" and who == "default" and rule.get("send_destination") == BUS_NAME:
                default_allowed.add(rule.get("send_interface"))
            if (rule.tag == "allow" and rule.get("send_interface") == AGENT
                    and rule.get("send_type") == "method_call"):
                agent_callers.add(who)
    assert owners == {"stillsvc", "root"}
    expected = (set(documented()) - {AGENT}) | set(STANDARD)
    assert default_allowed == expected, (
        f"policy lacks {sorted(expected - default_allowed)}, has extra {sorted(default_allowed - expected)}")
    assert "stillsvc" in agent_callers and "default" not in agent_callers
