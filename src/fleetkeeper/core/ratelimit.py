"""Rate limits and budgets used by every destructive or bursty action."""

from __future__ import annotations

from collections import deque

from fleetkeeper.core.clock import Clock, RealClock


class TokenBucket:
    """``rate`` tokens per second, at most ``burst`` saved up."""

    def __init__(self, rate: float, burst: int, clock: Clock | None = None):
        if rate <= 0 or burst < 1:
            raise ValueError("rate must be > 0 and burst >= 1")
        self.rate = rate
        self.burst = burst
        self.clock = clock or RealClock()
        self._tokens = float(burst)
        self._last = self.clock.monotonic()

    def _refill(self) -> None:
        now = self.clock.monotonic()
        self._tokens = min(self.burst, self._tokens + (now - self._last) * self.rate)
        self._last = now

    def take(self, n: int = 1) -> bool:
        self._refill()
        if self._tokens >= n:
            self._tokens -= n
            return True
        return False

    def available(self) -> int:
        """Whole tokens that could be taken now."""
        self._refill()
        return int(self._tokens)

    def wait_time(self, n: int = 1) -> float:
        self._refill()
        return 0.0 if self._tokens >= n else (n - self._tokens) / self.rate

    async def acquire(self, n: int = 1) -> None:
        while not self.take(n):
            await self.clock.sleep(self.wait_time(n))


class SlidingWindow:
    """Counts actions in the last ``window`` seconds (for "at most N per hour" budgets)."""

    def __init__(self, window: float, clock: Clock | None = None):
        self.window = window
        self.clock = clock or RealClock()
        self._times: deque[float] = deque()

    def _trim(self) -> None:
        cutoff = self.clock.monotonic() - self.window
        while self._times and self._times[0] <= cutoff:
            self._times.popleft()

    def count(self) -> int:
        self._trim()
        return len(self._times)

    def record(self) -> None:
        self._times.append(self.clock.monotonic())
