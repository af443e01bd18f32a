"""Demo: the same ``{le!=""}`` series query, unguarded and guarded, side by side."""

from __future__ import annotations

import time
from typing import Awaitable, Callable

from fleetkeeper.core.outcome import Outcome

from .policy import GuardPolicy
from .proxy import Guard, ProxySettings
from .testbed import LoadedPrometheus, find_binary, timed_get

Report = Callable[[str], object] | Callable[[str], Awaitable[object]]

DEMO_NODES = 200  # 76,800 bucket series


async def demo(report) -> Outcome:
    async def say(line: str) -> None:
        r = report(line)
        if hasattr(r, "__await__"):
            await r

    binary = find_binary("prometheus")
    if binary is None:
        await say("promguard: skipped: the prometheus binary is not installed (Debian package 'prometheus')")
        return Outcome.skip("the prometheus binary is not installed")
    outcome = Outcome()
    t0 = time.monotonic()
    async with LoadedPrometheus(DEMO_NODES, binary=binary) as lp:
        await say(f"promguard: real Prometheus on {lp.url} holds {lp.series:,} synthetic GPU histogram series "
                  f"(loaded in {time.monotonic() - t0:.1f}s)")
        q = [("match[]", '{le!=""}')]
        u_dt, status, body, size = await timed_get(f"{lp.url}/api/v1/series", q)
        await say(f"promguard: unguarded  series {{le!=\"\"}}: HTTP {status} after {u_dt:.2f}s, {size / 1e6:.1f} MB")
        outcome.expect(status == 200 and len((body or {}).get("data") or []) == DEMO_NODES * 8 * 4 * 12,
                       "the unguarded query answers every bucket series", f"HTTP {status}")
        # The deadline is sized from the unguarded query just measured (a quarter of it, at most
        # 1 s), so the guard trips however fast this machine answers.
        deadline = round(min(1.0, max(0.02, u_dt / 4)), 3)
        for reject in (False, True):
            pol = GuardPolicy(deadline=deadline, reject_unscoped=reject)
            guard = Guard(ProxySettings(upstream=lp.url, listen_port=0, policy=pol))
            await guard.start()
            try:
                dt, status, body, _ = await timed_get(f"{guard.url}/api/v1/series", q)
            finally:
                await guard.stop()
            err = (body or {}).get("errorType", "?")
            if reject:
                kind = "reject-unscoped"
                outcome.expect(status == 400 and err == "bad_data", "an unscoped query is refused before Prometheus",
                               f"HTTP {status} {err}")
            else:
                kind = f"deadline {deadline:g}s"
                outcome.expect(status == 503 and err == "timeout", "the guard answers a timeout error at its deadline",
                               f"HTTP {status} {err}")
            await say(f"promguard: guarded ({kind}) series {{le!=\"\"}}: HTTP {status} {err} after {dt:.2f}s")
        pol = GuardPolicy(deadline=60.0, max_series=100)
        guard = Guard(ProxySettings(upstream=lp.url, listen_port=0, policy=pol))
        await guard.start()
        try:
            dt, status, body, _ = await timed_get(
                f"{guard.url}/api/v1/series", [("match[]", 'gpu_collective_latency_seconds_count{node="gpu-node-00007.research.cluster.internal"}')])
        finally:
            await guard.stop()
        n = len((body or {}).get("data") or [])
        outcome.expect(status == 200 and n == 8 * 4, "a scoped query is answered through the guard", f"HTTP {status}, {n}")
        await say(f"promguard: guarded scoped query for one node: HTTP {status}, {n} series in {dt:.2f}s")
    return outcome
