"""Scale of the local control plane: 1,000 / 3,000 / 7,500 simulated nodes.

For each step (nodes are added to the same cluster): time to create the
nodes, time until all are Ready, kube-apiserver / etcd / KWOK RSS, the
control plane's steady-state CPU (all processes, over a quiet window), and
fleetkeeper's own side: time and memory for an informer to list and cache
every node as a NodeView (compared with caching whole Node objects, the
baseline, in the same run).

    .venv/bin/python bench/bench_controlplane.py [--steps 1000,3000,7500] [--window 30]
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import os
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from fleetkeeper.core.informer import Informer, identity  # noqa: E402
from fleetkeeper.core.kube import NODES  # noqa: E402
from fleetkeeper.core.views import default_projector  # noqa: E402
from fleetkeeper.localcluster.cluster import LocalCluster, create_nodes, wait_nodes_ready  # noqa: E402
from fleetkeeper.localcluster.fleet import FleetSpec  # noqa: E402

TICK = os.sysconf("SC_CLK_TCK")


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def cpu_seconds(pid: int) -> float:
    f = Path(f"/proc/{pid}/stat").read_text()
    parts = f[f.rindex(")") + 2:].split()
    return (int(parts[11]) + int(parts[12])) / TICK


async def informer_cost(lc: LocalCluster, project, label: str) -> tuple[float, float]:
    gc.collect()
    tracemalloc.start()
    async with await lc.connect() as kube:
        inf = Informer(kube, NODES, project)
        t0 = time.perf_counter()
        task = asyncio.create_task(inf.run())
        await inf.wait_synced(600)
        took = time.perf_counter() - t0
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        cur, _ = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        del inf
    return took, cur / 2**20


async def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", default="1000,3000,7500")
    ap.add_argument("--window", type=float, default=30.0, help="seconds of steady state to measure CPU over")
    ap.add_argument("--dir", default=None)
    args = ap.parse_args()
    steps = [int(s) for s in args.steps.split(",")]
    directory = Path(args.dir or tempfile.mkdtemp(prefix="fk-bench-cp-"))
    lc = LocalCluster(directory)
    rows = []
    try:
        await lc.up(0, 8)
        async with await lc.connect() as kube:
            for n in steps:
                spec = FleetSpec(nodes=n, gpus_per_node=8)
                t0 = time.perf_counter()
                created = await create_nodes(kube, spec, concurrency=64)
                t_create = time.perf_counter() - t0
                await wait_nodes_ready(kube, n, timeout=1800)
                t_ready = time.perf_counter() - t0
                await asyncio.sleep(5)
                pids = {c: p for c, p in lc.state.pids.items()}
                c0 = {c: cpu_seconds(p) for c, p in pids.items()}
                await asyncio.sleep(args.window)
                cpu = {c: (cpu_seconds(p) - c0[c]) / args.window for c, p in pids.items()}
                rss = {c: rss_mb(p) for c, p in pids.items()}
                view_t, view_mb = await informer_cost(lc, default_projector("fleetkeeper.io").node, "view")
                raw_t, raw_mb = await informer_cost(lc, identity, "raw")
                row = dict(nodes=n, created=created, create_s=t_create, ready_s=t_ready,
                           apiserver_mb=rss["kube-apiserver"], etcd_mb=rss["etcd"], kwok_mb=rss["kwok"],
                           kcm_mb=rss["kube-controller-manager"], sched_mb=rss["kube-scheduler"],
                           cpu_total=sum(cpu.values()), cpu=cpu, view_s=view_t, view_mb=view_mb,
                           raw_s=raw_t, raw_mb=raw_mb)
                rows.append(row)
                print(f"[{n} nodes] created {created} in {t_create:.1f}s, all Ready after {t_ready:.1f}s; "
                      f"RSS apiserver {row['apiserver_mb']:.0f} MB, etcd {row['etcd_mb']:.0f} MB, "
                      f"kwok {row['kwok_mb']:.0f} MB, kcm {row['kcm_mb']:.0f} MB, scheduler {row['sched_mb']:.0f} MB; "
                      f"steady CPU {row['cpu_total']:.2f} cores "
                      f"({', '.join(f'{k} {v:.2f}' for k, v in cpu.items())}); "
                      f"informer NodeView {view_t:.1f}s {view_mb:.1f} MB vs whole objects {raw_t:.1f}s "
                      f"{raw_mb:.1f} MB ({raw_mb / max(view_mb, 0.01):.1f}x)", flush=True)
    finally:
        lc.down(purge=args.dir is None)
    print("\n| nodes | create s | Ready s | apiserver MB | etcd MB | KWOK MB | CPU cores (steady) | "
          "NodeView cache MB | whole-object cache MB |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['nodes']} | {r['create_s']:.1f} | {r['ready_s']:.1f} | {r['apiserver_mb']:.0f} | {r['etcd_mb']:.0f} | "
              f"{r['kwok_mb']:.0f} | {r['cpu_total']:.2f} | {r['view_mb']:.1f} | {r['raw_mb']:.1f} |")
    if len(rows) >= 2:
        a, b = rows[0], rows[-1]
        per_k = (b["apiserver_mb"] - a["apiserver_mb"]) / ((b["nodes"] - a["nodes"]) / 1000)
        print(f"\nkube-apiserver memory per 1,000 nodes (slope {a['nodes']}->{b['nodes']}): {per_k:.0f} MB")


if __name__ == "__main__":
    asyncio.run(main())
