"""A level-based work queue (controller-runtime semantics).

* a key is queued at most once, however often it is added (de-duplication);
* a key being processed is not handed to a second worker; if it is added
  meanwhile it is processed again afterwards ("dirty");
* failed keys come back after a per-key exponential backoff, capped, and an
  overall token bucket bounds the retry rate.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
from collections import deque

from fleetkeeper.core.clock import Clock, RealClock


class WorkQueue:
    def __init__(self, clock: Clock | None = None, *, base_delay: float = 0.05, max_delay: float = 60.0,
                 on_depth=None):
        self.clock = clock or RealClock()
        self.base_delay = base_delay
        self.max_delay = max_delay
        self._queue: deque[str] = deque()
        self._queued: set[str] = set()
        self._processing: set[str] = set()
        self._dirty: set[str] = set()
        self._failures: dict[str, int] = {}
        self._delayed: list[tuple[float, int, str]] = []
        self._seq = itertools.count()
        self._wakeup = asyncio.Event()
        self._on_depth = on_depth
        self._shutdown = False

    def __len__(self) -> int:
        return len(self._queue)

    def _depth_changed(self) -> None:
        if self._on_depth:
            self._on_depth(len(self._queue))

    def add(self, key: str) -> None:
        if key in self._processing:
            self._dirty.add(key)
            return
        if key in self._queued:
            return
        self._queued.add(key)
        self._queue.append(key)
        self._depth_changed()
        self._notify()

    def add_after(self, key: str, delay: float) -> None:
        if delay <= 0:
            self.add(key)
            return
        heapq.heappush(self._delayed, (self.clock.monotonic() + delay, next(self._seq), key))
        self._notify()

    def add_rate_limited(self, key: str) -> float:
        n = self._failures.get(key, 0)
        self._failures[key] = n + 1
        delay = min(self.max_delay, self.base_delay * (2**n))
        self.add_after(key, delay)
        return delay

    def forget(self, key: str) -> None:
        self._failures.pop(key, None)

    def failures(self, key: str) -> int:
        return self._failures.get(key, 0)

    def _notify(self) -> None:
        self._wakeup.set()

    def _promote_due(self) -> float | None:
        now = self.clock.monotonic()
        while self._delayed and self._delayed[0][0] <= now:
            _, _, key = heapq.heappop(self._delayed)
            self.add(key)
        return self._delayed[0][0] - now if self._delayed else None

    async def get(self) -> str:
        """Wait for the next key; the caller must call :meth:`done` with it."""
        while True:
            wait = self._promote_due()
            if self._queue:
                key = self._queue.popleft()
                self._queued.discard(key)
                self._processing.add(key)
                self._depth_changed()
                return key
            if self._shutdown:
                raise asyncio.CancelledError
            self._wakeup.clear()
            if wait is None:
                await self._wakeup.wait()
                continue
            # wake for a new key, or when the next delayed key falls due
            waiter = asyncio.ensure_future(self._wakeup.wait())
            sleeper = asyncio.ensure_future(self.clock.sleep(wait))
            try:
                await asyncio.wait({waiter, sleeper}, return_when=asyncio.FIRST_COMPLETED)
            finally:
                waiter.cancel()
                sleeper.cancel()

    def done(self, key: str) -> None:
        self._processing.discard(key)
        if key in self._dirty:
            self._dirty.discard(key)
            self.add(key)

    def shutdown(self) -> None:
        self._shutdown = True
        self._notify()
