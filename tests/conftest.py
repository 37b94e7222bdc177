from __future__ import annotations

import shutil
from collections.abc import AsyncIterator, Iterator

import pytest
from helpers import Daemon, DBusDaemon, connect

if shutil.which("dbus-daemon") is None:  # pragma: no cover
    pytest.exit("dbus-daemon is required (Debian package 'dbus-daemon')", returncode=4)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo) -> Iterator[None]:
    outcome = yield
    report = outcome.get_result()
    daemon = getattr(item, "_stillsvc_daemon", None)
    if report.failed and daemon is not None:
        report.sections.append(("stillsvc daemon log", daemon.log[-20000:]))


@pytest.fixture
def bus_address() -> Iterator[str]:
    bus = DBusDaemon()
    yield bus.address
    bus.stop()


@pytest.fixture
async def daemon(request: pytest.FixtureRequest, bus_address: str, tmp_path) -> AsyncIterator[Daemon]:
    """The real daemon with the simulated scanner, on a private bus."""
    marker = request.node.get_closest_marker("daemon_args")
    extra = marker.args if marker else ()
    d = Daemon(bus_address, *extra, workdir=str(tmp_path))
    request.node._stillsvc_daemon = d
    yield await d.ready()
    d.stop()


@pytest.fixture
async def client(daemon: Daemon):
    bus = await connect(daemon.address)
    yield bus
    bus.disconnect()


@pytest.fixture
async def client2(daemon: Daemon):
    bus = await connect(daemon.address)
    yield bus
    bus.disconnect()
