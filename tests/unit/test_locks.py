"""FairLock, on its own: one holder, first come first served, timeouts, Busy at
timeout 0, the maximum hold time (revocation, ``extend``, ``limited=False``),
owners that are gone passed over, and ``discard``.

Nothing here sleeps to let something happen: each test waits for the state it
needs (``Line.until``, fed by ``on_queue_changed``) or for a future, always with
a timeout. Where a test shows that something does *not* happen, it waits for it
with a timeout that must run out; times are measured with the loop's clock.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import pytest

from stillsvc.common.errors import Busy, Cancelled, Failed, NotFound, Timeout
from stillsvc.core.locks import FairLock

LONG = 5.0  # a wait that must never run out in a test


class Owner:
    def __init__(self, name: str) -> None:
        self.name = name
        self.alive = True

    def __repr__(self) -> str:
        return self.name


class Line:
    """A FairLock with its queue changes observable."""

    def __init__(self, **kwargs: Any) -> None:
        self.changed = asyncio.Event()
        self.lock: FairLock[Owner] = FairLock("the test lock", describe=lambda o: o.name,
                                             on_queue_changed=self.changed.set,
                                             alive=lambda o: o.alive, **kwargs)
        self.tasks: list[asyncio.Task[None]] = []

    def wait(self, owner: Owner, timeout: float = LONG, limited: bool = True) -> asyncio.Task[None]:
        task = asyncio.ensure_future(self.lock.acquire(owner, timeout, limited))
        self.tasks.append(task)
        return task

    async def until(self, predicate: Callable[[], bool], timeout: float = 1.0) -> None:
        async with asyncio.timeout(timeout):
            while not predicate():
                self.changed.clear()
                await self.changed.wait()

    async def queued(self, *owners: Owner) -> None:
        await self.until(lambda: self.lock.waiting == list(owners))

    async def close(self) -> None:
        for task in self.tasks:
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)


@pytest.fixture
async def line():
    made: list[Line] = []

    def make(**kwargs: Any) -> Line:
        made.append(Line(**kwargs))
        return made[-1]

    yield make
    for each in made:
        await each.close()


async def test_a_free_lock_is_granted_at_once_even_with_timeout_zero(line):
    fair = line().lock
    a = Owner("a")
    await fair.acquire(a, 0)
    assert fair.holder is a and fair.waiting == []
    fair.release(a)
    assert fair.holder is None


async def test_busy_at_once_for_timeout_zero_when_held(line):
    fair = line().lock
    a, b = Owner("a"), Owner("b")
    await fair.acquire(a)
    with pytest.raises(Busy) as caught:
        await fair.acquire(b, 0)
    assert "held by a" in caught.value.message
    assert fair.holder is a and fair.waiting == []


async def test_waiters_are_served_first_come_first_served_and_newcomers_queue_behind(line):
    waiting_line = line()
    fair = waiting_line.lock
    a, b, c, d = (Owner(n) for n in "abcd")
    await fair.acquire(a)
    tasks = {}
    for owner in (b, c, d):
        tasks[owner] = waiting_line.wait(owner)
        await waiting_line.queued(*tasks)  # arrival order is the order they joined
    fair.release(a)
    assert fair.holder is b  # handed over in the same step: nobody can slip in between
    with pytest.raises(Busy):
        await fair.acquire(Owner("newcomer"), 0)
    await asyncio.wait_for(tasks[b], 1)
    assert fair.waiting == [c, d]
    for current, following in ((b, c), (c, d)):
        fair.release(current)
        assert fair.holder is following
        await asyncio.wait_for(tasks[following], 1)
    fair.release(d)
    assert fair.holder is None and fair.waiting == []


async def test_a_wait_runs_out_with_timeout_after_the_timeout(line):
    waiting_line = line()
    fair = waiting_line.lock
    a, b = Owner("a"), Owner("b")
    await fair.acquire(a)
    loop = asyncio.get_running_loop()
    started = loop.time()
    with pytest.raises(Timeout) as caught:
        await asyncio.wait_for(fair.acquire(b, 0.05), 1)
    elapsed = loop.time() - started
    assert 0.045 <= elapsed < 0.5
    assert "held by a" in caught.value.message
    assert fair.waiting == [] and fair.holder is a
    fair.release(a)
    assert fair.holder is None  # the waiter that gave up is not granted later


async def test_one_waiter_timing_out_leaves_the_others_in_line(line):
    waiting_line = line()
    fair = waiting_line.lock
    a, b, c = Owner("a"), Owner("b"), Owner("c")
    await fair.acquire(a)
    impatient = waiting_line.wait(b, 0.02)
    patient = waiting_line.wait(c)
    await waiting_line.queued(b, c)
    with pytest.raises(Timeout):
        await asyncio.wait_for(impatient, 1)
    assert fair.waiting == [c]
    fair.release(a)
    await asyncio.wait_for(patient, 1)
    assert fair.holder is c


async def test_a_cancelled_wait_leaves_the_line(line):
    waiting_line = line()
    fair = waiting_line.lock
    a, b = Owner("a"), Owner("b")
    await fair.acquire(a)
    task = waiting_line.wait(b)
    await waiting_line.queued(b)
    task.cancel()
    await waiting_line.queued()
    fair.release(a)
    assert fair.holder is None


async def test_holding_or_waiting_twice_and_releasing_what_one_does_not_hold_fail(line):
    waiting_line = line()
    fair = waiting_line.lock
    a, b = Owner("a"), Owner("b")
    await fair.acquire(a)
    with pytest.raises(Failed):
        await fair.acquire(a, LONG)
    waiting_line.wait(b)
    await waiting_line.queued(b)
    with pytest.raises(Failed):
        await fair.acquire(b, LONG)
    with pytest.raises(Failed):
        fair.release(b)
    assert fair.holder is a and fair.waiting == [b]


# -- the maximum hold time ---------------------------------------------------------------------

async def test_without_on_expired_the_holder_is_released_at_max_hold_and_the_next_one_served(line):
    waiting_line = line(max_hold=0.05)
    fair = waiting_line.lock
    a, b = Owner("a"), Owner("b")
    loop = asyncio.get_running_loop()
    await fair.acquire(a)
    granted_at = loop.time()
    task = waiting_line.wait(b)
    await asyncio.wait_for(task, 1)
    assert fair.holder is b
    assert loop.time() - granted_at >= 0.045


async def test_on_expired_is_told_at_max_hold_and_decides(line):
    expired: asyncio.Future[Owner] = asyncio.get_running_loop().create_future()
    waiting_line = line(max_hold=0.03, on_expired=expired.set_result)
    fair = waiting_line.lock
    a = Owner("a")
    loop = asyncio.get_running_loop()
    await fair.acquire(a)
    granted_at = loop.time()
    assert await asyncio.wait_for(expired, 1) is a
    assert loop.time() - granted_at >= 0.025
    assert fair.holder is a  # on_expired did not release: the owner's code decides
    fair.release(a)
    assert fair.holder is None


async def test_extend_gives_the_holder_its_full_hold_time_again_from_now(line):
    loop = asyncio.get_running_loop()
    expired: asyncio.Future[float] = loop.create_future()
    waiting_line = line(max_hold=0.1, on_expired=lambda owner: expired.set_result(loop.time()))
    fair = waiting_line.lock
    a, b = Owner("a"), Owner("b")
    await fair.acquire(a)
    granted_at = loop.time()
    extended_at: list[float] = []

    def extend() -> None:
        fair.extend(b)  # not the holder: nothing changes for a
        fair.extend(a)
        extended_at.append(loop.time())

    loop.call_later(0.06, extend)
    when = await asyncio.wait_for(expired, 1)
    assert extended_at, "expired before it was extended"
    assert when - extended_at[0] >= 0.095  # a full max_hold after the extension
    assert when - granted_at >= 0.15


async def test_a_hold_extended_by_someone_else_still_expires_on_time(line):
    loop = asyncio.get_running_loop()
    expired: asyncio.Future[float] = loop.create_future()
    waiting_line = line(max_hold=0.05, on_expired=lambda owner: expired.set_result(loop.time()))
    fair = waiting_line.lock
    a = Owner("a")
    await fair.acquire(a)
    granted_at = loop.time()
    loop.call_later(0.03, fair.extend, Owner("b"))
    when = await asyncio.wait_for(expired, 1)
    assert 0.045 <= when - granted_at < 0.075


async def test_an_unlimited_hold_is_never_revoked(line):
    expired: asyncio.Future[Owner] = asyncio.get_running_loop().create_future()
    waiting_line = line(max_hold=0.02, on_expired=expired.set_result)
    fair = waiting_line.lock
    a = Owner("a")
    await fair.acquire(a, limited=False)
    done, _ = await asyncio.wait([expired], timeout=0.1)  # five hold times in which nothing may happen
    assert not done and fair.holder is a


async def test_a_released_hold_does_not_expire_later(line):
    expired: asyncio.Future[Owner] = asyncio.get_running_loop().create_future()
    waiting_line = line(max_hold=0.02, on_expired=expired.set_result)
    fair = waiting_line.lock
    a, b = Owner("a"), Owner("b")
    await fair.acquire(a)
    fair.release(a)
    await fair.acquire(b, limited=False)
    done, _ = await asyncio.wait([expired], timeout=0.06)  # a's hold time passes three times over
    assert not done and fair.holder is b


# -- owners that have gone ------------------------------------------------------------------------

async def test_an_owner_that_is_gone_is_refused_at_once(line):
    fair = line().lock
    ghost = Owner("ghost")
    ghost.alive = False
    with pytest.raises(Cancelled):
        await fair.acquire(ghost, LONG)
    assert fair.holder is None


async def test_a_waiter_gone_when_its_turn_comes_is_passed_over(line):
    waiting_line = line()
    fair = waiting_line.lock
    a, b, c = Owner("a"), Owner("b"), Owner("c")
    await fair.acquire(a)
    gone = waiting_line.wait(b)
    next_in_line = waiting_line.wait(c)
    await waiting_line.queued(b, c)
    b.alive = False  # nobody told the lock: it must look for itself
    fair.release(a)
    assert fair.holder is c
    with pytest.raises(Cancelled):
        await asyncio.wait_for(gone, 1)
    await asyncio.wait_for(next_in_line, 1)


async def test_when_every_waiter_is_gone_the_lock_is_left_free(line):
    waiting_line = line()
    fair = waiting_line.lock
    a, b, c = Owner("a"), Owner("b"), Owner("c")
    await fair.acquire(a)
    tasks = [waiting_line.wait(b), waiting_line.wait(c)]
    await waiting_line.queued(b, c)
    b.alive = c.alive = False
    fair.release(a)
    assert fair.holder is None
    for result in await asyncio.gather(*tasks, return_exceptions=True):
        assert isinstance(result, Cancelled)
    await fair.acquire(Owner("d"), 0)


# -- discard -----------------------------------------------------------------------------------------

async def test_discard_fails_a_wait_with_the_given_error_and_keeps_the_holder(line):
    waiting_line = line()
    fair = waiting_line.lock
    a, b = Owner("a"), Owner("b")
    await fair.acquire(a)
    task = waiting_line.wait(b)
    await waiting_line.queued(b)
    assert fair.discard(b, NotFound("closed")) is False
    with pytest.raises(NotFound):
        await asyncio.wait_for(task, 1)
    assert fair.holder is a and fair.waiting == []


async def test_discard_releases_the_holder_to_the_next_waiter(line):
    waiting_line = line()
    fair = waiting_line.lock
    a, b = Owner("a"), Owner("b")
    await fair.acquire(a)
    task = waiting_line.wait(b)
    await waiting_line.queued(b)
    assert fair.discard(a) is True
    assert fair.holder is b
    await asyncio.wait_for(task, 1)


async def test_discarding_a_stranger_changes_nothing(line):
    fair = line().lock
    a = Owner("a")
    await fair.acquire(a)
    assert fair.discard(Owner("stranger")) is False
    assert fair.holder is a


async def test_holder_released_and_waiter_discarded_in_the_same_step_leaves_nothing_held(line):
    """The waiter discarded first: its wait fails and nothing is granted."""
    waiting_line = line()
    fair = waiting_line.lock
    a, b = Owner("a"), Owner("b")
    await fair.acquire(a)
    task = waiting_line.wait(b)
    await waiting_line.queued(b)
    fair.discard(b, Cancelled("gone"))
    fair.release(a)
    assert fair.holder is None
    with pytest.raises(Cancelled):
        await asyncio.wait_for(task, 1)
    assert fair.holder is None


async def test_a_waiter_granted_and_discarded_in_the_same_step_does_not_return_as_holder(line):
    waiting_line = line()
    fair = waiting_line.lock
    a, b = Owner("a"), Owner("b")
    await fair.acquire(a)
    task = waiting_line.wait(b)
    await waiting_line.queued(b)
    fair.release(a)  # b is the holder now; its task has not resumed yet
    assert fair.discard(b, Cancelled("gone")) is True
    assert fair.holder is None
    result = (await asyncio.gather(asyncio.wait_for(task, 1), return_exceptions=True))[0]
    # Either the wait fails, or the waiter really holds the lock: never "granted" with nothing held.
    assert isinstance(result, Cancelled) or fair.holder is b, f"acquire returned {result!r}, holder {fair.holder}"
