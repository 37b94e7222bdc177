"""DeviceLockFile against other holders of the same file: another open file
description in this process (``flock(2)`` locks belong to open file descriptions,
so a second ``open`` here conflicts like another process would), and the real
``flock(1)`` in a subprocess. Then ``held_elsewhere``, ``hand_over`` (the lock
travels with the descriptor), and ``watch_until_free``."""

from __future__ import annotations

import asyncio
import fcntl
import os
import shutil
import stat
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path

import pytest

from stillsvc.core.lockfile import DeviceLockFile

FLOCK = shutil.which("flock")
needs_flock = pytest.mark.skipif(FLOCK is None, reason="flock(1) is not installed (util-linux)")
TIMEOUT = 5.0


@pytest.fixture
def lockfile(tmp_path: Path) -> Iterator[DeviceLockFile]:
    lf = DeviceLockFile(str(tmp_path / "run"), "office-1")
    lf.create()
    yield lf
    lf.close()


def other_description(path: Path) -> int:
    return os.open(path, os.O_RDWR | os.O_CLOEXEC)


def can_lock(path: Path) -> bool:
    """Whether someone else (a new open file description) could take the lock now."""
    fd = other_description(path)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    finally:
        os.close(fd)  # closing the description drops its lock, if it got one
    return True


@contextmanager
def held_here(path: Path) -> Iterator[int]:
    fd = other_description(path)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        yield fd
    finally:
        os.close(fd)


async def flock_try(path: Path | str) -> int:
    """``flock -n PATH true``: 0 if flock(1) could take the lock, 1 if it is held."""
    proc = await asyncio.create_subprocess_exec(FLOCK, "-n", str(path), "true")
    return await asyncio.wait_for(proc.wait(), TIMEOUT)


@asynccontextmanager
async def held_by_flock(path: Path) -> AsyncIterator[asyncio.subprocess.Process]:
    """``flock PATH sh -c 'echo taken; exec cat'``: holds the lock until its stdin closes."""
    proc = await asyncio.create_subprocess_exec(
        FLOCK, str(path), "sh", "-c", "echo taken; exec cat", stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE)
    try:
        assert proc.stdout is not None
        line = await asyncio.wait_for(proc.stdout.readline(), TIMEOUT)
        assert line == b"taken\n"
        yield proc
    finally:
        if proc.returncode is None:
            assert proc.stdin is not None
            proc.stdin.close()
            try:
                await asyncio.wait_for(proc.wait(), TIMEOUT)
            except TimeoutError:
                proc.kill()
                await proc.wait()


def test_create_makes_a_world_readable_file_under_devices_with_a_sanitised_name(tmp_path):
    lf = DeviceLockFile(str(tmp_path / "run"), "office-1")
    old = os.umask(0o077)
    try:
        lf.create()
    finally:
        os.umask(old)
    assert lf.path == tmp_path / "run" / "devices" / "office_1.lock"
    assert stat.S_IMODE(lf.path.stat().st_mode) == 0o644
    assert stat.S_IMODE(lf.path.parent.stat().st_mode) == 0o755
    assert not lf.held


def test_try_take_and_release_against_another_open_file_description(lockfile):
    assert lockfile.try_take() and lockfile.held
    assert lockfile.try_take()  # taking it again is a no-op
    assert not can_lock(lockfile.path)
    lockfile.release()
    assert not lockfile.held and can_lock(lockfile.path)
    lockfile.release()  # releasing twice is harmless


def test_try_take_fails_while_another_description_holds_it(lockfile):
    with held_here(lockfile.path):
        assert lockfile.try_take() is False
        assert not lockfile.held
    assert lockfile.try_take()


def test_two_lock_file_objects_of_one_device_exclude_each_other(lockfile, tmp_path):
    second = DeviceLockFile(str(tmp_path / "run"), "office-1")
    try:
        assert lockfile.try_take()
        assert second.try_take() is False
        assert second.held_elsewhere() and not lockfile.held_elsewhere()
        lockfile.release()
        assert second.try_take() and lockfile.held_elsewhere()
    finally:
        second.close()


def test_held_elsewhere_looks_without_keeping_the_lock(lockfile):
    assert lockfile.held_elsewhere() is False
    assert not lockfile.held and can_lock(lockfile.path)
    with held_here(lockfile.path):
        assert lockfile.held_elsewhere() is True
    assert lockfile.held_elsewhere() is False
    assert lockfile.try_take()
    assert lockfile.held_elsewhere() is False  # held, by us


@needs_flock
async def test_flock_1_cannot_take_it_while_held_and_can_after_release(lockfile):
    assert lockfile.try_take()
    assert await flock_try(lockfile.path) == 1
    lockfile.release()
    assert await flock_try(lockfile.path) == 0


@needs_flock
async def test_a_flock_1_holder_is_seen_and_waited_for(lockfile):
    async with held_by_flock(lockfile.path):
        assert lockfile.held_elsewhere()
        assert lockfile.try_take() is False
    assert not lockfile.held_elsewhere()
    assert lockfile.try_take()


def test_hand_over_gives_away_the_locked_descriptor(lockfile):
    assert lockfile.try_take()
    fd = lockfile.hand_over()
    try:
        assert not lockfile.held
        assert not can_lock(lockfile.path)  # the lock went with the descriptor
        assert lockfile.held_elsewhere()  # as far as the object knows, someone else has it
        copy = os.dup(fd)
        os.close(fd)
        fd = -1
        assert not can_lock(lockfile.path)  # it lasts until every copy is closed
        os.close(copy)
        assert can_lock(lockfile.path)
    finally:
        if fd >= 0:
            os.close(fd)


def test_hand_over_without_holding_it_is_an_error(lockfile):
    with pytest.raises(RuntimeError):
        lockfile.hand_over()


@needs_flock
async def test_a_handed_over_descriptor_holds_the_lock_in_a_child_until_it_exits(lockfile, tmp_path):
    """What ``stillctl lock DEVICE -- COMMAND`` relies on: the command inherits the
    locked descriptor; it holds the device after everybody else closed theirs."""
    assert lockfile.try_take()
    fd = lockfile.hand_over()
    # flock(1) on the inherited descriptor (its "flock FD" form) succeeds: it is the same
    # open file description. Then the child waits for its stdin to close.
    script = f'{FLOCK} -n {fd} || exit 3; echo ready; exec cat'
    proc = await asyncio.create_subprocess_exec("sh", "-c", script, pass_fds=(fd,), cwd=tmp_path,
                                                stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE)
    try:
        assert proc.stdout is not None and proc.stdin is not None
        assert await asyncio.wait_for(proc.stdout.readline(), TIMEOUT) == b"ready\n"
        os.close(fd)
        fd = -1
        assert not can_lock(lockfile.path)  # the child's copy keeps it
        assert await flock_try(lockfile.path) == 1
        proc.stdin.close()
        assert await asyncio.wait_for(proc.wait(), TIMEOUT) == 0
        assert can_lock(lockfile.path)
    finally:
        if fd >= 0:
            os.close(fd)
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


async def test_watch_until_free_calls_back_once_the_other_holder_lets_go(lockfile):
    loop = asyncio.get_running_loop()
    freed: asyncio.Future[None] = loop.create_future()
    with held_here(lockfile.path):
        thread = lockfile.watch_until_free(lambda: loop.call_soon_threadsafe(freed.set_result, None))
        done, _ = await asyncio.wait([freed], timeout=0.05)  # measuring: not while it is held
        assert not done
    await asyncio.wait_for(freed, TIMEOUT)
    await asyncio.wait_for(asyncio.to_thread(thread.join), TIMEOUT)
    assert can_lock(lockfile.path) and not lockfile.held  # the watcher did not keep it
