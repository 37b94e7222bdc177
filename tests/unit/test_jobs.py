"""Core jobs in this process with the simulated scanner, no bus: a job is created
by a data-mode session, holds the device from start to close, hands out pages
(parameters, then bands) to a consumer that pulls them at its own pace across
any number of calls, stops when told, and gives the device back."""

from __future__ import annotations

import asyncio

import pytest

from stillsvc.common.errors import AccessDenied, Busy, Cancelled, Failed
from stillsvc.core.config import Config, DeviceConfig
from stillsvc.core.jobs import Job, JobState
from stillsvc.core.manager import DeviceManager
from stillsvc.core.sessions import Client, Hold
from stillsvc.driver import Mode
from stillsvc.drivers.sim import SimulatedScanner
from stillsvc.drivers.sim.pattern import pattern_page
from stillsvc.imaging import ImageInfo

SMALL = {"resolution": 75, "mode": "gray"}


@pytest.fixture
async def manager(tmp_path):
    m = DeviceManager(Config(runtime_dir=str(tmp_path / "run")), drivers={"sim": SimulatedScanner})
    await m.add_device(DeviceConfig(id="sim0", driver="sim", options={"pages": 3}))
    yield m
    await m.stop()


async def item(manager: DeviceManager, mode: Mode, name: str, client: str = "c1"):
    device = manager.get("sim0")
    session = await manager.create_session("sim0", mode, Client(client))
    root = device.items_for(session)
    app = next(child for child in root.children if child.name == name)
    await device.write_item_properties(app, dict(SMALL))
    return device, session, app


async def pull_page(job: Job) -> bytes:
    data = bytearray()
    while (band := await job.read()) is not None:
        data += band
    return bytes(data)


async def test_a_status_session_cannot_create_a_job(manager):
    device, session, app = await item(manager, Mode.STATUS, "Flatbed")
    with pytest.raises(AccessDenied):
        Job(device, session, app)
    assert device.driver.last_settings == {}  # nothing reached the driver


async def test_pages_are_pulled_one_at_a_time_and_match_the_pattern(manager):
    device, session, app = await item(manager, Mode.DATA, "Feeder")
    async with Job(device, session, app) as job:
        assert job.state is JobState.RUNNING and job in session.jobs
        infos, pages = [], []
        while (info := await job.next_page()) is not None:
            infos.append(info)
            pages.append(await pull_page(job))
        assert job.state is JobState.DONE
    assert len(infos) == 3 and job.pages == 3
    for number, (info, data) in enumerate(zip(infos, pages)):
        assert data == pattern_page(ImageInfo(info.width, info.height, info.mode, info.depth, info.resolution),
                                    number)
    assert job not in session.jobs and job.finished.is_set()


async def test_a_job_holds_the_device_until_it_is_closed(manager):
    device, session, app = await item(manager, Mode.DATA, "Flatbed")
    job = Job(device, session, app)
    await job.start()
    try:
        holder = device.device_lock.holder
        assert isinstance(holder, Hold) and holder.session is session
        other = await manager.create_session("sim0", Mode.STATUS, Client("c2"))
        with pytest.raises(Busy):
            await device.lock(other, 0)
        # The job lives across calls: pull the page later, in pieces.
        assert (await job.next_page()) is not None
        first = await job.read()
        assert first
    finally:
        await job.close()
    assert device.device_lock.holder is None
    await device.lock(other, 0)
    await device.unlock(other)


async def test_max_pages_stops_after_that_many(manager):
    device, session, app = await item(manager, Mode.DATA, "Feeder")
    async with Job(device, session, app, max_pages=1) as job:
        assert await job.next_page() is not None
        await pull_page(job)
        assert await job.next_page() is None
    assert device.driver.pages_loaded == 2  # the next page is the next job's


async def test_stopping_a_job_fails_its_consumer_with_the_reason(manager):
    device, session, app = await item(manager, Mode.DATA, "Feeder")
    async with Job(device, session, app) as job:
        assert await job.next_page() is not None
        job.stop("the test stopped it")
        with pytest.raises(Cancelled, match="the test stopped it"):
            await job.read()
        with pytest.raises(Cancelled):
            await job.next_page()
    assert device.device_lock.holder is None


async def test_closing_the_session_stops_its_job(manager):
    device, session, app = await item(manager, Mode.DATA, "Feeder")
    job = Job(device, session, app)
    await job.start()
    assert await job.next_page() is not None
    closing = asyncio.ensure_future(manager.close_session(session))
    with pytest.raises(Cancelled, match="session was closed"):
        while True:
            await job.read()
    await job.close()
    await asyncio.wait_for(closing, 5)
    assert device.device_lock.holder is None and device.data_holder is None


async def test_a_driver_error_reaches_the_consumer(manager):
    device, session, app = await item(manager, Mode.DATA, "Feeder")
    device.driver.simulate("jam", at_row=0)
    async with Job(device, session, app) as job:
        assert await job.next_page() is not None
        with pytest.raises(Failed, match="paper jam"):
            await pull_page(job)
    assert device.device_lock.holder is None


async def test_progress_is_reported_on_the_loop(manager):
    device, session, app = await item(manager, Mode.DATA, "Flatbed")
    seen: list[tuple[int, int]] = []
    async with Job(device, session, app, progress=lambda page, percent: seen.append((page, percent))) as job:
        assert await job.next_page() is not None
        await pull_page(job)
        assert await job.next_page() is None
    # Posted to the loop by the worker before its call's result: already delivered.
    assert seen and seen[-1] == (1, 100)
