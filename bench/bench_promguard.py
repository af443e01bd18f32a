"""Unguarded vs guarded {le!=""} series queries against a real Prometheus.

    .venv/bin/python bench/bench_promguard.py --nodes 250 --deadline 1 --runs 3

Prints one line per measurement and a summary (medians).
"""

from __future__ import annotations

import argparse
import asyncio
import statistics

from fleetkeeper.promguard.policy import GuardPolicy
from fleetkeeper.promguard.proxy import Guard, ProxySettings
from fleetkeeper.promguard.testbed import LoadedPrometheus, find_binary, timed_get


async def main(nodes: int, deadline: float, runs: int) -> None:
    if find_binary("prometheus") is None:
        raise SystemExit("needs the prometheus binary (Debian package 'prometheus')")
    q = [("match[]", '{le!=""}')]
    async with LoadedPrometheus(nodes) as lp:
        print(f"series in head: {lp.series:,} ({nodes} nodes x 8 GPUs x 4 ops x 14)")
        guard = Guard(ProxySettings(upstream=lp.url, listen_port=0,
                                    policy=GuardPolicy(deadline=deadline, reject_unscoped=False)))
        strict = Guard(ProxySettings(upstream=lp.url, listen_port=0, policy=GuardPolicy(deadline=deadline)))
        await guard.start()
        await strict.start()
        un, gd, st = [], [], []
        try:
            for i in range(runs):
                dt, status, _, size = await timed_get(f"{lp.url}/api/v1/series", q)
                un.append(dt)
                print(f"run {i}: unguarded      HTTP {status} {dt:6.2f}s {size / 1e6:.1f} MB")
                dt, status, body, _ = await timed_get(f"{guard.url}/api/v1/series", q)
                gd.append(dt)
                print(f"run {i}: guarded (deadline) HTTP {status} {body.get('errorType')} {dt:6.2f}s")
                dt, status, body, _ = await timed_get(f"{strict.url}/api/v1/series", q)
                st.append(dt)
                print(f"run {i}: guarded (default)  HTTP {status} {body.get('errorType')} {dt:6.3f}s")
        finally:
            await guard.stop()
            await strict.stop()
    print(f"median unguarded {statistics.median(un):.2f}s; guarded with {deadline:g}s deadline "
          f"{statistics.median(gd):.2f}s; default policy (unscoped refused) {statistics.median(st) * 1000:.0f} ms")


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--nodes", type=int, default=250)
    ap.add_argument("--deadline", type=float, default=1.0)
    ap.add_argument("--runs", type=int, default=3)
    a = ap.parse_args()
    asyncio.run(main(a.nodes, a.deadline, a.runs))
