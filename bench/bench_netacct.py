"""netacct benchmark: scrape time / exporter CPU at 200 pods and 10,000 rules
(in Python on saved text, and whole against real iptables in a namespace when
root), and rule sync time for 200 pods.

    .venv/bin/python bench/bench_netacct.py

Prints figures and ratios against a baseline measured in the same run; never
passes or fails on time.
"""

from __future__ import annotations

import asyncio
import ipaddress
import statistics
import time

from prometheus_client import CollectorRegistry, generate_latest

from fleetkeeper.netacct import rules as R
from fleetkeeper.netacct.iptables import parse_save
from fleetkeeper.netacct.metrics import TrafficCollector
from fleetkeeper.netacct.pods import PodInfo

NET8 = (ipaddress.IPv4Network("10.0.0.0/8"),)


def make_pods(n: int) -> list[PodInfo]:
    return [PodInfo(f"team-{i % 20}", f"job-{i}-worker", f"10.{(i >> 16) & 255}.{(i >> 8) & 255}.{i & 255 or 1}",
                    f"team{i % 7}", {}) for i in range(1, n + 1)]


def save_text(pods: list[PodInfo], step: int = 0) -> str:
    d = R.desired_rules(pods, NET8)
    lines = ["*mangle"] + [f":{c} - [0:0]" for c in R.ALL_CHAINS]
    for chain, rules in d.chains.items():
        for i, r in enumerate(rules):
            lines.append(f"[{i + step}:{(i + step) * 1500}] -A {chain} {r.render()}")
    return "\n".join(lines + ["COMMIT", ""])


def timed(fn, repeat: int) -> tuple[float, float]:
    wall, cpu = [], []
    for _ in range(repeat):
        w, c = time.perf_counter(), time.process_time()
        fn()
        wall.append(time.perf_counter() - w)
        cpu.append(time.process_time() - c)
    return statistics.median(wall), statistics.median(cpu)


def scrape_bench(pods_n: int, label: str) -> None:
    pods = make_pods(pods_n)
    texts = [save_text(pods, s) for s in range(3)]
    nrules = sum(1 for line in texts[0].splitlines() if line.startswith("["))
    reg = CollectorRegistry()
    tc = TrafficCollector(reg, max_pod_series=100_000)
    parse_w, parse_c = timed(lambda: parse_save(texts[1]), 5)
    k = [0]

    def scrape():  # what a scrape costs in Python: fold the saved text, render the series
        k[0] += 1
        tc.observe_text(texts[k[0] % 3])
        return tc.render()

    def old_scrape():  # the previous path: full parse + fold, prometheus_client's exposition
        k[0] += 1
        tc.observe(parse_save(texts[k[0] % 3]))
        return generate_latest(reg)

    scrape()
    scrape_w, scrape_c = timed(scrape, 5)
    old_w, old_c = timed(old_scrape, 5)
    size = len(scrape())
    print(f"{label}: {pods_n} pods, {nrules} rules")
    print(f"  baseline parse of iptables-save -c text:  {parse_w * 1e3:.1f} ms wall, {parse_c * 1e3:.1f} ms CPU")
    print(f"  previous scrape (parse, fold, generate_latest): {old_w * 1e3:.1f} ms wall, {old_c * 1e3:.1f} ms CPU")
    print(f"  scrape (regex fold + cached render):      {scrape_w * 1e3:.1f} ms wall, {scrape_c * 1e3:.1f} ms CPU"
          f"  ({scrape_w / old_w:.2f}x previous), {size / 1024:.0f} KiB")


async def real_scrape_bench(pods_n: int) -> None:
    """The whole scrape against real iptables in a network namespace: one
    ``iptables-save -c`` of every rule, fold, render (Agent.scrape)."""
    from fleetkeeper.netacct import netns as N
    from fleetkeeper.netacct.agent import Agent
    from fleetkeeper.netacct.iptables import SubprocessRunner
    from fleetkeeper.netacct.pods import StaticPodSource
    from fleetkeeper.netacct.settings import make_settings

    why = N.unavailable_reason()
    if why:
        print(f"scrape against real iptables: skipped: {why}")
        return
    pods = make_pods(pods_n)
    for backend in N.available_backends():
        topo = N.Topology.create()
        try:
            runner = SubprocessRunner(topo.host)
            st = make_settings("bench", {"node": "bench", "backend": backend, "max_pod_series": 100_000,
                                         "internal_ranges": ["10.0.0.0/8"]})
            agent = Agent(st, StaticPodSource(pods), runner, registry=CollectorRegistry())
            await agent.sync_once()
            nrules = sum(1 for line in (await runner.run([f"iptables-{backend}-save", "-c", "-t", "mangle"])).stdout
                         .splitlines() if line.startswith("["))
            await agent.scrape()
            save, whole, cpu = [], [], []
            for _ in range(5):
                t = time.perf_counter()
                await runner.run([f"iptables-{backend}-save", "-c", "-t", "mangle"])
                save.append(time.perf_counter() - t)
                t, c = time.perf_counter(), time.process_time()
                body = await agent.scrape()
                whole.append(time.perf_counter() - t)
                cpu.append(time.process_time() - c)
            s, w = statistics.median(save), statistics.median(whole)
            print(f"scrape against real iptables ({backend}), {pods_n} pods, {nrules} rules: "
                  f"{w * 1e3:.1f} ms wall (fleetkeeper's own CPU {statistics.median(cpu) * 1e3:.1f} ms), "
                  f"of which iptables-{backend}-save -c alone {s * 1e3:.1f} ms; {len(body) / 1024:.0f} KiB")
        finally:
            topo.destroy()


async def sync_bench() -> None:
    from fleetkeeper.netacct import netns as N
    from fleetkeeper.netacct.agent import Agent
    from fleetkeeper.netacct.iptables import SubprocessRunner
    from fleetkeeper.netacct.pods import StaticPodSource
    from fleetkeeper.netacct.settings import make_settings

    why = N.unavailable_reason()
    pods = make_pods(200)
    if why:
        print(f"rule sync (real iptables): skipped: {why}")
    for backend in ([] if why else N.available_backends()):
        topo = N.Topology.create()
        try:
            runner = SubprocessRunner(topo.host)
            st = make_settings("bench", {"node": "bench", "backend": backend})
            src = StaticPodSource(pods)
            agent = Agent(st, src, runner, registry=CollectorRegistry())
            t = time.perf_counter()
            await runner.run([f"iptables-{backend}-save", "-c", "-t", "mangle"])
            base = time.perf_counter() - t
            t = time.perf_counter()
            await agent.sync_once()
            first = time.perf_counter() - t
            t = time.perf_counter()
            rep = await agent.sync_once()
            noop = time.perf_counter() - t
            src.pods = pods[1:] + make_pods(201)[-1:]
            t = time.perf_counter()
            churn = await agent.sync_once()
            churn_t = time.perf_counter() - t
            print(f"rule sync, 200 pods, {backend}: first {first * 1e3:.0f} ms, no-op {noop * 1e3:.0f} ms "
                  f"({len(rep.rule_plan.summary())} changes), 1 pod replaced {churn_t * 1e3:.0f} ms "
                  f"({len(churn.rule_plan.summary())} changes); baseline iptables-save "
                  f"{base * 1e3:.0f} ms (first/baseline {first / base:.1f}x)")
        finally:
            topo.destroy()
    t = time.perf_counter()
    empty = parse_save("*mangle\nCOMMIT\n")
    for _ in range(5):
        R.plan(R.desired_rules(pods, NET8), empty)
    print(f"pure planning, 200 pods from scratch: {(time.perf_counter() - t) / 5 * 1e3:.1f} ms")


def main() -> None:
    scrape_bench(200, "scrape, 200 pods")
    scrape_bench(2497, "scrape, 10,000 rules")
    asyncio.run(real_scrape_bench(2497))
    asyncio.run(sync_bench())


if __name__ == "__main__":
    main()
