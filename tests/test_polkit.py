"""Authorization through polkit, deny by default.

polkit itself cannot run here, so it is the one thing mocked: python-dbusmock's
``polkitd`` template on the test's private bus, its allowed actions set per test.
The daemon runs with ``--authorization polkit`` against it.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import AsyncIterator

import pytest
from dbus_fast.introspection import Node
from helpers import (
    ITEM,
    MANAGER,
    ROOT,
    SESSION,
    SIM0,
    SIMULATOR,
    Daemon,
    call,
    connect,
    create_session,
    expect_error,
    get_property,
    wait_for_name,
)

from stillsvc.frontends.dbus.authority import MANAGE, OWNER, PUBLIC, RULES, USE

pytest.importorskip("dbusmock", reason="python-dbusmock (test extra) is needed to mock polkit")
pytestmark = pytest.mark.daemon_args("--authorization", "polkit")

POLKIT = "org.freedesktop.PolicyKit1"
POLKIT_PATH = "/org/freedesktop/PolicyKit1/Authority"


@pytest.fixture
async def polkitd(bus_address: str) -> AsyncIterator[subprocess.Popen[bytes]]:
    proc = subprocess.Popen([sys.executable, "-m", "dbusmock", "--system", "--template", "polkitd"],
                            env={**os.environ, "DBUS_SYSTEM_BUS_ADDRESS": bus_address},
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    probe = await connect(bus_address)
    try:
        await wait_for_name(probe, POLKIT, proc=proc)
    finally:
        probe.disconnect()
    yield proc
    proc.terminate()
    proc.wait(5)


@pytest.fixture
def service(polkitd, daemon: Daemon) -> Daemon:
    """conftest's daemon, asking polkitd (started first) for every check."""
    return daemon


@pytest.fixture
def user(service: Daemon, client):
    return client


async def allow(bus, *actions: str) -> None:
    await call(bus, POLKIT_PATH, "org.freedesktop.DBus.Mock", "SetAllowed", "as", [list(actions)],
               destination=POLKIT)


async def test_nothing_allowed_denies_all_but_public_calls(user):
    await allow(user)
    e = await expect_error("AccessDenied", create_session(user))
    assert USE in e.text
    e = await expect_error("AccessDenied", call(user, SIM0, SIMULATOR, "PressButton", "s", ["scan"]))
    assert USE in e.text
    e = await expect_error("AccessDenied", call(user, ROOT, MANAGER, "WatchEvents"))
    assert MANAGE in e.text
    # Public: reading what is there.
    assert (await call(user, ROOT, MANAGER, "GetDevices"))[0] == [SIM0]
    assert await get_property(user, SIM0, "org.stillsvc.StillImage1.Device", "State") == "ready"


async def test_use_allows_devices_and_the_session_needs_no_more(user):
    await allow(user, USE)
    session = await create_session(user, mode="both")
    await allow(user)  # withdrawn: the session, authorized when opened, stays usable by its owner
    await call(user, session, SESSION, "LockDevice", "u", [0])
    (status,) = await call(user, session, SESSION, "GetStatus")
    assert status["online"].value is True
    root = await get_property(user, session, SESSION, "RootItem")
    await call(user, root, ITEM, "ReadProperties")
    await call(user, session, SESSION, "Close")
    await expect_error("AccessDenied", create_session(user))


async def test_manage_is_separate_from_use(user):
    await allow(user, USE)
    await expect_error("AccessDenied", call(user, ROOT, MANAGER, "WatchEvents"))
    await allow(user, USE, MANAGE)
    await call(user, ROOT, MANAGER, "WatchEvents")


async def test_polkit_gone_means_denied(user, polkitd):
    polkitd.terminate()
    polkitd.wait(5)
    e = await expect_error("AccessDenied", create_session(user))
    assert "authorization service" in e.text
    assert (await call(user, ROOT, MANAGER, "GetDevices"))[0] == [SIM0]


async def test_every_exported_method_has_exactly_one_rule(user):
    await allow(user, USE)
    session = await create_session(user, mode="both")
    root = await get_property(user, session, SESSION, "RootItem")
    exported: set[tuple[str, str]] = set()
    for path in (ROOT, SIM0, session, root):
        (xml,) = await call(user, path, "org.freedesktop.DBus.Introspectable", "Introspect")
        for interface in Node.parse(xml).interfaces:
            if interface.name.startswith("org.stillsvc.StillImage1."):
                exported |= {(interface.name, m.name) for m in interface.methods}
    missing = exported - set(RULES)
    assert not missing, f"methods without an authorization rule: {sorted(missing)}"
    stale = {key for key in RULES if key[0] != "org.stillsvc.StillImage1.Agent"} - exported
    assert not stale, f"rules for methods that are not exported: {sorted(stale)}"
    assert set(RULES.values()) <= {PUBLIC, OWNER, USE, MANAGE}


async def test_other_clients_still_cannot_touch_an_authorized_session(user, service):
    await allow(user, USE)
    session = await create_session(user, mode="both")
    other = await connect(service.address)
    try:
        await expect_error("AccessDenied", call(other, session, SESSION, "GetStatus"))
    finally:
        other.disconnect()


def test_unknown_method_has_no_rule():
    from stillsvc.common.errors import AccessDenied
    from stillsvc.frontends.dbus.authority import rule_for

    with pytest.raises(AccessDenied):
        rule_for("org.stillsvc.StillImage1.Manager", "Explode")
