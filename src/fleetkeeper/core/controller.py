"""Controllers: informers feed a work queue of keys; a reconcile function
re-reads the current state from the caches and acts (level-based, as in
controller-runtime's ``pkg/reconcile``).

A reconcile receives a key, never an event. Each call gets a reconcile id that
every log line of that call carries (``rid=...``). Errors of type
:class:`errors.Temporary` requeue after their delay; other errors requeue with
the queue's backoff; :class:`errors.Terminal` is logged and dropped.
"""

from __future__ import annotations

import asyncio
import contextvars
import itertools
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from fleetkeeper.core import errors
from fleetkeeper.core.clock import Clock, RealClock
from fleetkeeper.core.metrics import RuntimeMetrics
from fleetkeeper.core.workqueue import WorkQueue

log = logging.getLogger("fleetkeeper.controller")

reconcile_id: contextvars.ContextVar[str] = contextvars.ContextVar("reconcile_id", default="-")
_ids = itertools.count(1)


@dataclass
class Result:
    """What a reconcile asks for: ``requeue_after`` seconds, or nothing."""

    requeue_after: float | None = None


Reconcile = Callable[[str], Awaitable[Result | None]]


class Controller:
    def __init__(self, name: str, reconcile: Reconcile, *, metrics: RuntimeMetrics | None = None,
                 clock: Clock | None = None, workers: int = 1, max_retries: int = 15):
        self.name = name
        self.reconcile = reconcile
        self.metrics = metrics
        self.clock = clock or RealClock()
        self.workers = workers
        self.max_retries = max_retries
        depth = metrics.queue_depth.labels(name).set if metrics else None
        self.queue = WorkQueue(self.clock, on_depth=depth)
        self.reconciles = 0
        if metrics:
            metrics.init_controller(name)

    def enqueue(self, key: str) -> None:
        self.queue.add(key)

    def handler(self, key_of: Callable[[str, object, object], list[str] | str | None] | None = None):
        """An informer handler that enqueues ``key_of(key, old, new)`` (default: the key)."""

        def _h(typ: str, key: str, old: object, new: object) -> None:
            keys = key_of(key, old, new) if key_of else key
            if keys is None:
                return
            for k in [keys] if isinstance(keys, str) else keys:
                self.queue.add(k)

        return _h

    async def _process(self, key: str) -> None:
        rid = f"{self.name}-{next(_ids)}"
        token = reconcile_id.set(rid)
        t0 = time.perf_counter()
        result = "success"
        try:
            res = await self.reconcile(key)
            self.queue.forget(key)
            if res and res.requeue_after is not None:
                self.queue.add_after(key, res.requeue_after)
                result = "requeue"
        except asyncio.CancelledError:
            raise
        except errors.Terminal as exc:
            result = "error"
            log.error("reconcile %s failed for good: %s", key, exc, extra={"key": key})
            self.queue.forget(key)
        except errors.Temporary as exc:
            result = "requeue"
            log.info("reconcile %s: %s; again in %.1fs", key, exc, exc.delay, extra={"key": key})
            self.queue.add_after(key, exc.delay)
        except Exception as exc:
            result = "error"
            if self.queue.failures(key) >= self.max_retries:
                log.error("reconcile %s gave up after %d retries: %s", key, self.max_retries, exc, extra={"key": key})
                self.queue.forget(key)
            else:
                delay = self.queue.add_rate_limited(key)
                log.warning("reconcile %s failed: %s; retry in %.2fs", key, exc, delay,
                            extra={"key": key}, exc_info=not isinstance(exc, errors.FleetkeeperError))
                if self.metrics:
                    self.metrics.queue_retries.labels(self.name).inc()
        finally:
            self.reconciles += 1
            self.queue.done(key)
            if self.metrics:
                self.metrics.reconciles.labels(self.name, result).inc()
                self.metrics.reconcile_seconds.labels(self.name).observe(time.perf_counter() - t0)
            reconcile_id.reset(token)

    async def _worker(self) -> None:
        while True:
            key = await self.queue.get()
            await self._process(key)

    async def run(self) -> None:
        await asyncio.gather(*(self._worker() for _ in range(self.workers)))
