"""Health benchmarks that need no cluster (run: .venv/bin/python bench/bench_health.py [--nodes N]).

* one agent check cycle (disk on a temp mount table, GPU through the fake backend with 8 GPUs,
  a 5,000-line kernel log): CPU time and RSS, against a baseline of reading the kernel log alone;
* the agent write rate in steady state for N nodes (change + jittered heartbeat), simulated on a
  FakeClock over one hour, against the naive "write every cycle" rate;
* the controller's decision cost: fleet_stats over N NodeViews with 100 faulty nodes, and
  decide_node for the 100, against the cost of projecting nothing (a bare loop over the views).
"""

from __future__ import annotations

import argparse
import asyncio
import resource
import tempfile
import time
from pathlib import Path

from fleetkeeper.core.clock import FakeClock
from fleetkeeper.core.domain import Names
from fleetkeeper.core.faults import parse_fault
from fleetkeeper.core.views import Condition, NodeView
from fleetkeeper.health.agent import AgentCore, Checks, simulated_findings
from fleetkeeper.health.checks import DiskCheck, GpuCheck, KernelEvents
from fleetkeeper.health.decide import decide_node, fleet_stats
from fleetkeeper.health.gpu import FakeGpuBackend
from fleetkeeper.health.kernlog import KernelLog
from fleetkeeper.health.policy import Policy


def cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


async def bench_agent_cycle(rounds: int = 200) -> None:
    with tempfile.TemporaryDirectory() as d:
        root = Path(d)
        (root / "var/lib/kubelet").mkdir(parents=True)
        (root / "mounts").write_text("/dev/a / ext4 rw 0 0\n/dev/b /var/lib/kubelet xfs rw 0 0\n")
        klog = root / "kmsg"
        klog.write_text("".join(f"[{i}.0] eth0: link up, some kernel chatter line {i}\n" for i in range(5000)))
        t0 = cpu()
        for _ in range(rounds):
            KernelEvents(KernelLog(klog)).poll()
        base = (cpu() - t0) / rounds
        ke = KernelEvents(KernelLog(klog))
        checks = Checks(disk=DiskCheck(("/", "/var/lib/kubelet"), 95, root, root / "mounts", kernel=ke),
                        gpu=GpuCheck(FakeGpuBackend.healthy(8), 8, kernel=ke))
        await checks.run()  # first cycle reads the whole kernel log
        t0 = cpu()
        for _ in range(rounds):
            await checks.run()
        steady = (cpu() - t0) / rounds
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        print(f"agent cycle (steady state, disk+gpu+kernel log): {steady * 1e3:.3f} ms CPU; "
              f"baseline full read of a 5,000-line kernel log {base * 1e3:.3f} ms "
              f"(ratio {steady / base:.2f}); process max RSS {rss:.0f} MiB")


class CountingWriter:
    def __init__(self) -> None:
        self.n = 0

    async def write(self, node: str, patch: dict) -> None:
        self.n += 1


async def bench_write_rate(nodes: int, interval: float = 30.0, hours: float = 1.0) -> None:
    clock = FakeClock()
    w = CountingWriter()
    core = AgentCore(w, clock, heartbeat=300, jitter=0.2, startup_spread=300, seed=7)
    healthy = simulated_findings("x", [], 8)
    faulty = simulated_findings("x", [parse_fault("ecc")], 8)
    names = [f"n{i}" for i in range(nodes)]
    steps = int(3600 * hours / interval)
    warm = int(600 / interval)
    counted_from = 0
    for s in range(steps + warm):
        if s == warm:
            counted_from = w.n
        for i, n in enumerate(names):
            # 10 nodes change state once an hour each
            f = faulty if (i < 10 and (s // 40) % 2 == 1) else healthy
            await core.observe(n, f)
        await clock.advance(interval)
    writes = w.n - counted_from
    secs = steps * interval
    naive = nodes / interval
    print(f"agent writes at {nodes} nodes, steady state over {hours:g}h: {writes / secs:.2f} writes/s "
          f"(naive write-every-{interval:.0f}s-cycle baseline {naive:.1f}/s; ratio {writes / secs / naive:.4f})")


def view(i: int, faulty: bool, now: float) -> NodeView:
    conds = [Condition("Ready", "True", "KubeletReady", "", 0.0)]
    conds.append(Condition("GPUUnhealthy", "True" if faulty else "False",
                           "UncorrectableECC" if faulty else "GPUsHealthy", "", now - 5))
    return NodeView(f"n{i}", "u", "1", {"topology.kubernetes.io/zone": f"z{i % 3}",
                                        "fleetkeeper.io/rack": f"r{i // 16}"}, {}, (), False, tuple(conds), 8, 0,
                    0.0, False)


def bench_decide(nodes: int, faults: int = 100) -> None:
    now = time.time()
    views = [view(i, i % (nodes // faults) == 0, now) for i in range(nodes)]
    pol, names = Policy(), Names()
    t0 = time.perf_counter()
    for _ in range(10):
        sum(1 for v in views if v.taints)
    base = (time.perf_counter() - t0) / 10
    t0 = time.perf_counter()
    for _ in range(10):
        st = fleet_stats(views, {}, pol, names, now, [])
    stats = (time.perf_counter() - t0) / 10
    bad = [v for v in views if any(c.status == "True" and c.type != "Ready" for c in v.conditions)]
    t0 = time.perf_counter()
    for v in bad:
        decide_node(v, [], pol, names, now)
    per = (time.perf_counter() - t0) / max(1, len(bad))
    print(f"controller at {nodes} nodes with {len(bad)} faulty: fleet_stats {stats * 1e3:.2f} ms "
          f"(bare loop {base * 1e3:.2f} ms, ratio {stats / base:.1f}); decide_node {per * 1e6:.0f} us per faulty node; "
          f"wanting={st.wanting.get('cluster', 0)}")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--nodes", type=int, default=7500)
    a = ap.parse_args()
    asyncio.run(bench_agent_cycle())
    asyncio.run(bench_write_rate(a.nodes))
    bench_decide(a.nodes)


if __name__ == "__main__":
    main()
