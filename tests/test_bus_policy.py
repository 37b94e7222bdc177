"""The system bus policy (dbus/org.stillsvc.StillImage1.conf), enforced by a real dbus-daemon.

The bus is configured like the system bus: a copy of /usr/share/dbus-1/system.conf
(deny by default: no name may be owned, no method called, unless a policy file opens
it) without the parts that need a real system (the messagebus user, pid file, syslog,
activation), listening on a private socket and including only a folder that holds the
project's policy file. The daemon runs as root, which the policy lets own the name
(for running the service by hand), with ``--authorization none``, so what the table
shows is the bus's decision and the service's ownership checks, not polkit's (see
test_polkit.py). The client is a second, unprivileged uid (65534), as policies are
per user: each call is classified by who answered it, the bus
(``org.freedesktop.DBus``) or the service.

Run with ``pytest -s`` to see the table.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import stat
import subprocess
import sys
import tempfile
import xml.etree.ElementTree as ET
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import dbus_fast
import pytest
from helpers import (
    BUS_NAME,
    DEVICE,
    MANAGER,
    ROOT,
    SESSION,
    SIM0,
    Daemon,
    DBusDaemon,
    call,
    connect,
    create_session,
)

SYSTEM_CONF = Path("/usr/share/dbus-1/system.conf")
POLICY = Path(__file__).resolve().parent.parent / "dbus" / f"{BUS_NAME}.conf"
NOBODY = 65534
BUS_ERROR_ACCESS_DENIED = "org.freedesktop.DBus.Error.AccessDenied"

pytestmark = [
    pytest.mark.skipif(shutil.which("setpriv") is None, reason="setpriv (util-linux) is not installed"),
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root to run the client as uid 65534"),
    pytest.mark.skipif(not SYSTEM_CONF.exists(), reason=f"{SYSTEM_CONF} (Debian package dbus) is not installed"),
]

# Config elements of system.conf that need the real system, or that would pull in
# the host's policies and services.
DROPPED = {"user", "fork", "pidfile", "syslog", "servicehelper", "standard_system_servicedirs", "servicedir",
           "listen", "include", "includedir"}
DOCTYPE = ('<!DOCTYPE busconfig PUBLIC "-//freedesktop//DTD D-Bus Bus Configuration 1.0//EN"\n'
           ' "http://www.freedesktop.org/standards/dbus/1.0/busconfig.dtd">\n')


def system_like_config(socket: Path, policy_dir: Path) -> str:
    root = ET.parse(SYSTEM_CONF).getroot()
    for element in list(root):
        if element.tag in DROPPED:
            root.remove(element)
    ET.SubElement(root, "listen").text = f"unix:path={socket}"
    ET.SubElement(root, "includedir").text = str(policy_dir)
    return DOCTYPE + ET.tostring(root, encoding="unicode") + "\n"


@dataclass
class SystemBus:
    address: str
    base: Path  # readable by uid 65534: the socket, and the client's Python modules


@pytest.fixture
def system_bus() -> Iterator[SystemBus]:
    # Not below tmp_path: pytest makes its folders 0700, and uid 65534 must reach the socket.
    base = Path(tempfile.mkdtemp(prefix="stillsvc-policy-"))
    try:
        base.chmod(0o755)
        policy_dir = base / "system.d"
        policy_dir.mkdir(mode=0o755)
        shutil.copy(POLICY, policy_dir / POLICY.name)
        config = base / "system.conf"
        config.write_text(system_like_config(base / "bus", policy_dir))
        bus = DBusDaemon(config_file=str(config))
        try:
            socket = base / "bus"
            if stat.S_IMODE(socket.stat().st_mode) != 0o777:
                socket.chmod(0o777)
            yield SystemBus(bus.address, base)
        finally:
            bus.stop()
    finally:
        shutil.rmtree(base, ignore_errors=True)


@pytest.fixture
async def service(request: pytest.FixtureRequest, system_bus: SystemBus, tmp_path: Path) -> AsyncIterator[Daemon]:
    d = Daemon(system_bus.address, "--authorization", "none", workdir=str(tmp_path))
    request.node._stillsvc_daemon = d
    yield await d.ready()
    d.stop()


@pytest.fixture
def nobody_python(system_bus: SystemBus) -> list[str]:
    """The command that runs Python as uid 65534 with dbus-fast importable.

    The test's own environment (a virtual environment, or an interpreter below /root)
    may not be readable by that uid, so dbus-fast is copied next to the socket.
    """
    lib = system_bus.base / "pylib"
    shutil.copytree(Path(dbus_fast.__file__).parent, lib / "dbus_fast",
                    ignore=shutil.ignore_patterns("__pycache__"))
    for path in [lib, *lib.rglob("*")]:
        path.chmod(0o755 if path.is_dir() else 0o644)
    command = ["env", "-i", f"PATH={os.environ.get('PATH', '/usr/bin:/bin')}", f"PYTHONPATH={lib}",
               "PYTHONDONTWRITEBYTECODE=1", "LANG=C.UTF-8",
               "setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups", sys.executable]
    check = subprocess.run([*command, "-c", "import os, dbus_fast.aio; print(os.getuid(), os.getgid())"],
                           capture_output=True, text=True, timeout=30)
    if check.returncode != 0:
        pytest.skip(f"uid {NOBODY} cannot run {sys.executable} with dbus-fast: {check.stderr.strip()[-300:]}")
    assert check.stdout.split() == [str(NOBODY), str(NOBODY)]  # really unprivileged
    return command


# The client run as uid 65534: sends each probe and reports who answered and how.
# Placeholders in a probe: @own_session (the path its own CreateDevice returned),
# @root_session (a session of another client), @root_peer (another client's connection).
CLIENT = r"""
import asyncio, json, os, sys
from dbus_fast import Message, MessageType, Variant
from dbus_fast.aio import MessageBus

def value(v):
    if isinstance(v, dict) and set(v) == {"variant"}:
        return Variant(*v["variant"])
    if isinstance(v, list):
        return [value(x) for x in v]
    if isinstance(v, dict):
        return {k: value(x) for k, x in v.items()}
    return places.get(v, v) if isinstance(v, str) else v

async def main():
    bus = await MessageBus(bus_address=sys.argv[1]).connect()
    results = []
    for probe in json.loads(sys.argv[2]):
        msg = Message(destination=value(probe["destination"]), path=value(probe["path"]),
                      interface=probe["interface"], member=probe["member"],
                      signature=probe["signature"], body=value(probe["body"]))
        reply = await asyncio.wait_for(bus.call(msg), 10)
        error = reply.error_name if reply.message_type is MessageType.ERROR else None
        text = reply.body[0] if error and reply.body else ""
        if probe["name"].startswith("Manager.CreateDevice") and not error:
            places["@own_session"] = reply.body[0]
        results.append({"name": probe["name"], "from_bus": reply.sender == "org.freedesktop.DBus",
                        "error": error, "text": text})
    bus.disconnect()
    print(json.dumps({"uid": os.getuid(), "results": results}))

places = json.loads(sys.argv[3])
asyncio.run(main())
"""

ALLOWED, REFUSED, DENIED = "allowed", "refused by the service", "denied by the bus"
PROPS = "org.freedesktop.DBus.Properties"
DBUS = ("org.freedesktop.DBus", "/org/freedesktop/DBus", "org.freedesktop.DBus")
AGENT = f"{BUS_NAME}.Agent"
LAUNCH_BODY = ["scan-to-pdf", ["true"], {}, "sim0", "scan", 1]


@dataclass(frozen=True)
class Probe:
    name: str
    expected: str
    interface: str | None
    member: str
    signature: str = ""
    body: tuple[Any, ...] = ()
    path: str = ROOT
    destination: str = BUS_NAME
    error: str | None = None  # the error name expected, where it matters

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "destination": self.destination, "path": self.path,
                "interface": self.interface, "member": self.member, "signature": self.signature,
                "body": list(self.body)}


PROBES = [
    Probe("Manager.GetDevices", ALLOWED, MANAGER, "GetDevices"),
    Probe("Properties.Get Device.Id (sim0)", ALLOWED, PROPS, "Get", "ss", (DEVICE, "Id"), path=SIM0),
    Probe("Introspectable.Introspect", ALLOWED, "org.freedesktop.DBus.Introspectable", "Introspect"),
    Probe("Peer.Ping", ALLOWED, "org.freedesktop.DBus.Peer", "Ping"),
    Probe("ObjectManager.GetManagedObjects", ALLOWED, "org.freedesktop.DBus.ObjectManager", "GetManagedObjects"),
    Probe("Manager.CreateDevice sim0 status", ALLOWED, MANAGER, "CreateDevice", "ssa{sv}", ("sim0", "status", {})),
    Probe("Session.GetStatus (own session)", ALLOWED, SESSION, "GetStatus", path="@own_session"),
    Probe("Session.GetStatus (another client's session)", REFUSED, SESSION, "GetStatus", path="@root_session",
          error=f"{BUS_NAME}.Error.AccessDenied"),
    Probe("Properties.Set Device.Name (read-only)", REFUSED, PROPS, "Set", "ssv",
          (DEVICE, "Name", {"variant": ["s", "mine"]}), path=SIM0),
    Probe(f"RequestName {BUS_NAME}", DENIED, DBUS[2], "RequestName", "su", (BUS_NAME, 4),
          path=DBUS[1], destination=DBUS[0]),
    Probe(f"{BUS_NAME}.Secret.Get (not in the policy)", DENIED, f"{BUS_NAME}.Secret", "Get"),
    Probe("Agent.Launch on the service", DENIED, AGENT, "Launch", "sasa{ss}sst", tuple(LAUNCH_BODY)),
    Probe("Agent.Launch to another user's agent", DENIED, AGENT, "Launch", "sasa{ss}sst", tuple(LAUNCH_BODY),
          path=f"{ROOT}/agent", destination="@root_peer"),
    Probe("Manager.GetDevices without an interface field", DENIED, None, "GetDevices"),
]


async def test_unprivileged_uid_against_the_system_policy(service: Daemon, nobody_python: list[str]) -> None:
    other = await connect(service.address)  # root: holds a session, and stands in for an agent
    try:
        root_session = await create_session(other)
        places = {"@root_session": root_session, "@root_peer": other.unique_name}
        proc = await asyncio.create_subprocess_exec(
            *nobody_python, "-c", CLIENT, service.address, json.dumps([p.to_json() for p in PROBES]),
            json.dumps(places), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        out, err = await asyncio.wait_for(proc.communicate(), 60)
        assert proc.returncode == 0, err.decode()
        report = json.loads(out)
        # The session of the other client is untouched.
        assert await call(other, root_session, SESSION, "GetStatus") is not None
    finally:
        other.disconnect()

    assert report["uid"] == NOBODY
    rows = []
    failures = []
    for probe, result in zip(PROBES, report["results"], strict=True):
        if result["error"] is None:
            outcome = ALLOWED
        elif result["from_bus"]:
            outcome = DENIED
        else:
            outcome = REFUSED
        shown = "ok" if result["error"] is None else result["error"]
        rows.append((probe.name, outcome, shown))
        if outcome != probe.expected:
            failures.append(f"{probe.name}: expected {probe.expected}, got {outcome}: {shown} {result['text']}")
        elif outcome == DENIED and result["error"] != BUS_ERROR_ACCESS_DENIED:
            failures.append(f"{probe.name}: denied with {result['error']}: {result['text']}")
        elif probe.error and result["error"] != probe.error:
            failures.append(f"{probe.name}: expected {probe.error}, got {result['error']}")
        elif outcome != ALLOWED:
            assert "Traceback" not in result["text"], result["text"]

    width = max(len(r[0]) for r in rows)
    table = [f"uid {NOBODY} on a system-like bus with {POLICY.name} (service as root, authorization none):",
             f"  {'call':<{width}}  {'outcome':<22}  reply"]
    table += [f"  {name:<{width}}  {outcome:<22}  {shown}" for name, outcome, shown in rows]
    print("\n" + "\n".join(table))
    assert not failures, "\n".join(failures + table)
