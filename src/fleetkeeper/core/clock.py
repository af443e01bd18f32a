"""Injected time. Production uses :class:`RealClock`; tests use :class:`FakeClock`
and advance it by hand, so no test sleeps for real."""

from __future__ import annotations

import asyncio
import heapq
import itertools
import time
from typing import Protocol


class Clock(Protocol):
    def now(self) -> float:
        """Wall-clock seconds since the epoch (for timestamps and deadlines)."""

    def monotonic(self) -> float:
        """Monotonic seconds (for durations and rate limits)."""

    async def sleep(self, seconds: float) -> None: ...


class RealClock:
    def now(self) -> float:
        return time.time()

    def monotonic(self) -> float:
        return time.monotonic()

    async def sleep(self, seconds: float) -> None:
        await asyncio.sleep(max(0.0, seconds))


class FakeClock:
    """A clock that only moves when :meth:`advance` is called."""

    def __init__(self, start: float = 1_800_000_000.0):
        self._now = start
        self._mono = 0.0
        self._sleepers: list[tuple[float, int, asyncio.Future]] = []
        self._seq = itertools.count()

    def now(self) -> float:
        return self._now

    def monotonic(self) -> float:
        return self._mono

    async def sleep(self, seconds: float) -> None:
        if seconds <= 0:
            await asyncio.sleep(0)
            return
        fut = asyncio.get_running_loop().create_future()
        heapq.heappush(self._sleepers, (self._mono + seconds, next(self._seq), fut))
        await fut

    async def advance(self, seconds: float) -> None:
        """Move time forward, waking every sleeper whose deadline passed."""
        for _ in range(5):  # let tasks that are about to sleep register first
            await asyncio.sleep(0)
        target = self._mono + seconds
        while self._sleepers and self._sleepers[0][0] <= target:
            when, _, fut = heapq.heappop(self._sleepers)
            self._now += when - self._mono
            self._mono = when
            if not fut.done():
                fut.set_result(None)
            await asyncio.sleep(0)
        self._now += target - self._mono
        self._mono = target
        await asyncio.sleep(0)
