"""Demo: the same ``{le!=""}`` series query, unguarded and guarded, side by side."""

from __future__ import annotations

import time
from typing import Awaitable, Callable

from .policy import GuardPolicy
from .proxy import Guard, ProxySettings
from .testbed import LoadedPrometheus, find_binary, timed_get

Report = Callable[[str], object] | Callable[[str], Awaitable[object]]

DEMO_NODES = 200  # 76,800 bucket series: slower than the 1 s deadline on 2 cores


async def demo(report) -> None:
    async def say(line: str) -> None:
        r = report(line)
        if hasattr(r, "__await__"):
            await r

    binary = find_binary("prometheus")
    if binary is None:
        await say("promguard: skipped: the prometheus binary is not installed (Debian package 'prometheus')")
        return
    t0 = time.monotonic()
    async with LoadedPrometheus(DEMO_NODES, binary=binary) as lp:
        await say(f"promguard: real Prometheus on {lp.url} holds {lp.series:,} synthetic GPU histogram series "
                  f"(loaded in {time.monotonic() - t0:.1f}s)")
        q = [("match[]", '{le!=""}')]
        dt, status, _, size = await timed_get(f"{lp.url}/api/v1/series", q)
        await say(f"promguard: unguarded  series {{le!=\"\"}}: HTTP {status} after {dt:.2f}s, {size / 1e6:.1f} MB")
        for reject in (False, True):
            pol = GuardPolicy(deadline=1.0, reject_unscoped=reject)
            guard = Guard(ProxySettings(upstream=lp.url, listen_port=0, policy=pol))
            await guard.start()
            try:
                dt, status, body, _ = await timed_get(f"{guard.url}/api/v1/series", q)
            finally:
                await guard.stop()
            kind = "reject-unscoped" if reject else "deadline 1s   "
            err = (body or {}).get("errorType", "?")
            await say(f"promguard: guarded ({kind}) series {{le!=\"\"}}: HTTP {status} {err} after {dt:.2f}s")
        pol = GuardPolicy(deadline=5.0, max_series=100)
        guard = Guard(ProxySettings(upstream=lp.url, listen_port=0, policy=pol))
        await guard.start()
        try:
            dt, status, body, _ = await timed_get(
                f"{guard.url}/api/v1/series", [("match[]", 'gpu_collective_latency_seconds_count{node="gpu-node-00007.research.cluster.internal"}')])
        finally:
            await guard.stop()
        n = len((body or {}).get("data") or [])
        await say(f"promguard: guarded scoped query for one node: HTTP {status}, {n} series in {dt:.2f}s")
