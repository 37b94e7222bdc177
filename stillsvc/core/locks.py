"""Fair exclusive ownership with wait timeouts: the basis of data mode and the device lock.

Both the data-mode claim (one session per device) and the short-term device lock
are the same thing underneath: one holder at a time, waiters served first come
first served, a waiter whose time runs out gets ``Timeout``, and a holder that
goes away releases at once. The device lock adds a maximum hold time: when it
runs out, ``on_expired`` is called so the lock's owner can undo what the holder
set up and release it (without ``on_expired`` it is released at once).

Owners that have gone (``alive`` says so: the session closed, its client left)
are never granted anything: a waiter that is gone when its turn comes is passed
over, so a holder and its waiter dying in the same instant cannot leave the
lock to a ghost.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable
from typing import Generic, TypeVar

from stillsvc.common.errors import Busy, Cancelled, Failed, Timeout

Owner = TypeVar("Owner")


class FairLock(Generic[Owner]):
    def __init__(
        self,
        what: str,
        *,
        max_hold: float | None = None,
        on_expired: Callable[[Owner], None] | None = None,
        describe: Callable[[Owner], str] = str,
        on_queue_changed: Callable[[], None] | None = None,
        alive: Callable[[Owner], bool] = lambda owner: True,
    ) -> None:
        self.what = what
        self.max_hold = max_hold
        self.on_expired = on_expired
        self.describe = describe
        self.on_queue_changed = on_queue_changed
        self.alive = alive
        self.holder: Owner | None = None
        self._waiters: deque[tuple[Owner, asyncio.Future[None], bool]] = deque()
        self._revoke_timer: asyncio.TimerHandle | None = None

    @property
    def waiting(self) -> list[Owner]:
        return [owner for owner, fut, _ in self._waiters if not fut.done()]

    def busy_error(self, owner: Owner | None = None) -> Busy:
        return Busy(f"{self.what} is held by {self.describe(self.holder)}")  # type: ignore[arg-type]

    async def acquire(self, owner: Owner, timeout: float = 0.0, limited: bool = True) -> None:
        """Become the holder. ``timeout`` 0 fails at once with Busy when held;
        otherwise wait in line up to ``timeout`` seconds, then Timeout.
        ``limited=False``: no maximum hold time (for work the service itself
        watches, such as a running transfer, which can be cancelled instead)."""
        if self.holder is owner:
            raise Failed(f"{self.what} is already held by this session")
        if any(o is owner for o, _, _ in self._waiters):
            raise Failed(f"this session is already waiting for {self.what}")
        if not self.alive(owner):
            raise self._gone_error()
        if self.holder is None and not self.waiting:
            self._grant(owner, limited)
            return
        if timeout <= 0:
            raise self.busy_error(owner)
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[None] = loop.create_future()
        entry = (owner, fut, limited)
        self._waiters.append(entry)
        self._queue_changed()
        holder = self.holder

        def expire() -> None:
            if not fut.done():
                fut.set_exception(Timeout(
                    f"gave up waiting for {self.what} after {timeout * 1000:.0f} ms "
                    f"(held by {self.describe(holder) if holder is not None else 'another waiter'})"))

        timer = loop.call_later(timeout, expire)
        try:
            await fut
            if self.holder is not owner:
                # Granted, then discarded before this wait resumed: nothing is held.
                raise self._gone_error()
        except BaseException:
            # Timed out, cancelled or the waiter vanished: leave the line. If we were
            # granted the lock in the same instant, give it on.
            if self.holder is owner:
                self.release(owner)
            raise
        finally:
            timer.cancel()
            try:
                self._waiters.remove(entry)
            except ValueError:
                pass
            self._queue_changed()

    def release(self, owner: Owner) -> None:
        if self.holder is not owner:
            raise Failed(f"{self.what} is not held by this session")
        self._cancel_timer()
        self.holder = None
        while self._waiters:
            next_owner, fut, limited = self._waiters.popleft()
            if fut.done():
                continue
            if not self.alive(next_owner):
                fut.set_exception(self._gone_error())
                continue
            self._grant(next_owner, limited)
            fut.set_result(None)
            return

    def extend(self, owner: Owner) -> None:
        """Give the holder its maximum hold time again, from now (it is still
        making progress with work the service watches)."""
        if self.holder is owner and self.max_hold is not None:
            self._cancel_timer()
            self._revoke_timer = asyncio.get_running_loop().call_later(self.max_hold, self._revoke, owner)

    def _gone_error(self) -> Cancelled:
        return Cancelled(f"stopped waiting for {self.what}: the requester has gone")

    def discard(self, owner: Owner, error: Exception | None = None) -> bool:
        """Forget ``owner`` entirely: release if it holds, fail its wait if it waits.
        Returns whether it held the lock."""
        for o, fut, _ in list(self._waiters):
            if o is owner and not fut.done():
                fut.set_exception(error or Failed(f"stopped waiting for {self.what}"))
        if self.holder is owner:
            self.release(owner)
            return True
        return False

    def _queue_changed(self) -> None:
        if self.on_queue_changed is not None:
            self.on_queue_changed()

    def _grant(self, owner: Owner, limited: bool = True) -> None:
        self.holder = owner
        if self.max_hold is not None and limited:
            loop = asyncio.get_running_loop()
            self._revoke_timer = loop.call_later(self.max_hold, self._revoke, owner)

    def _revoke(self, owner: Owner) -> None:
        self._revoke_timer = None
        if self.holder is owner:
            if self.on_expired is not None:
                self.on_expired(owner)
            else:
                self.release(owner)

    def _cancel_timer(self) -> None:
        if self._revoke_timer is not None:
            self._revoke_timer.cancel()
            self._revoke_timer = None
