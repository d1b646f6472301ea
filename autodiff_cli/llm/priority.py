"""Which waiting model call goes next: the one of the earliest example.

An evaluation starts many examples at once; with a plain FIFO semaphore every example's first
node is called before any example's second node, so no example finishes until the end and an
early stop ("this proposal can no longer win") comes late. `PrioritySemaphore` hands a free slot
to the waiting call with the lowest `call_priority` (the evaluation sets it to the example's
position), FIFO among equals: examples finish roughly in order, the slots stay just as busy.
"""
from __future__ import annotations

import asyncio
import contextvars
import heapq
import itertools

# set by the evaluation for each example's task (its branches inherit it); other calls are 0
call_priority: contextvars.ContextVar[int] = contextvars.ContextVar("autodiff_call_priority", default=0)


class PrioritySemaphore:
    """An asyncio semaphore whose waiters are served by (call_priority, arrival)."""

    def __init__(self, value: int) -> None:
        if value < 1:
            raise ValueError("a semaphore needs at least one slot")
        self._free = value
        self._waiters: list[tuple[int, int, asyncio.Future]] = []
        self._arrival = itertools.count()

    async def acquire(self) -> None:
        if self._free > 0 and not self._live_waiters():
            self._free -= 1
            return
        waiter = asyncio.get_running_loop().create_future()
        heapq.heappush(self._waiters, (call_priority.get(), next(self._arrival), waiter))
        try:
            await waiter  # release() hands its slot over by resolving the future
        except asyncio.CancelledError:
            if waiter.done() and not waiter.cancelled():
                self.release()  # the slot was handed over as we were cancelled: pass it on
            raise

    def release(self) -> None:
        while self._waiters:
            _, _, waiter = heapq.heappop(self._waiters)
            if not waiter.done():
                waiter.set_result(None)
                return
        self._free += 1

    def _live_waiters(self) -> bool:
        while self._waiters and self._waiters[0][2].done():
            heapq.heappop(self._waiters)  # cancelled while waiting
        return bool(self._waiters)

    async def __aenter__(self) -> None:
        await self.acquire()

    async def __aexit__(self, *exc) -> None:
        self.release()
