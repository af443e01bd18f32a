"""Preflight benchmark: N nodes join in one burst (already carrying the preflight
taint, as kubelet --register-with-taints does) into a cluster of TOTAL nodes;
the preflight controller (simulated test pods, completed by KWOK) validates
and releases them. Prints the time until all are schedulable and the API
write rate over that time, against a baseline measured in the same run: the
same burst with no gate (time until all are Ready).

  .venv/bin/python bench/bench_preflight.py [--nodes 7500] [--burst 1000]
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
import time
from pathlib import Path

from prometheus_client import CollectorRegistry

from fleetkeeper.core.kube import NODES, Kube
from fleetkeeper.core.manager import Manager
from fleetkeeper.core.settings import RuntimeSettings
from fleetkeeper.localcluster.cluster import LocalCluster, node_ready
from fleetkeeper.localcluster.fleet import FleetSpec, node_manifest
from fleetkeeper.preflight.config import PreflightConfig
from fleetkeeper.preflight.controller import Preflight


async def burst(kube: Kube, prefix: str, n: int, gate: bool, concurrency: int = 64) -> list[str]:
    spec = FleetSpec(nodes=n, cpu_fraction=0.0, prefix=prefix, join_gate=gate)
    sem = asyncio.Semaphore(concurrency)

    async def one(i: int) -> str:
        m = node_manifest(spec, i)
        async with sem:
            await kube.create(NODES, m)
        return m["metadata"]["name"]

    return await asyncio.gather(*(one(i) for i in range(n)))


async def wait(kube: Kube, prefix: str, n: int, pred, timeout: float) -> float:
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        nodes, _ = await kube.list(NODES)
        done = sum(1 for x in nodes if x["metadata"]["name"].startswith(prefix + "-") and pred(x))
        if done >= n:
            return time.monotonic() - t0
        await asyncio.sleep(1.0)
    raise TimeoutError(f"{prefix}: not all {n} nodes done in {timeout}s")


def schedulable(node: dict) -> bool:
    return node_ready(node) and not any(t["key"] == "fleetkeeper.io/preflight"
                                        for t in (node.get("spec") or {}).get("taints") or [])


def writes(reg: CollectorRegistry) -> float:
    total = 0.0
    for m in reg.collect():
        if m.name == "fleetkeeper_api_requests":
            for s in m.samples:
                if s.name.endswith("_total") and s.labels.get("verb") in ("create", "patch", "update", "delete"):
                    total += s.value
    return total


async def main(total: int, n: int) -> None:
    with tempfile.TemporaryDirectory(prefix="fk-bench-pf-") as tmp:
        lc = LocalCluster(Path(tmp))
        try:
            t = time.monotonic()
            await lc.up(total, 8, progress=lambda m: None)
            print(f"cluster: {total} nodes up in {time.monotonic() - t:.0f}s")
            kube = await lc.connect()
            # baseline: the same burst without a gate (time until Ready)
            t0 = time.monotonic()
            await burst(kube, "base", n, gate=False)
            base = await wait(kube, "base", n, node_ready, 900) + 0.0
            base_total = time.monotonic() - t0
            print(f"baseline (no gate): {n} nodes Ready {base_total:.1f}s after the burst started")
            reg = CollectorRegistry()
            mgr = Manager(kube, RuntimeSettings(namespace="default", server={"port": 0},
                                                leader_election={"enabled": False}), registry=reg)
            cfg = PreflightConfig.model_validate({"namespace": "default", "fault_file": str(Path(tmp) / "faults.json"),
                                                  "periodic": {"enabled": False},
                                                  "gate": {"max_concurrent": 1000, "workers": 16}})
            Preflight(mgr, cfg).register()
            task = asyncio.create_task(mgr.run())
            await mgr.wait_synced(300)
            await asyncio.sleep(2)
            w0 = writes(reg)
            t0 = time.monotonic()
            await burst(kube, "join", n, gate=True)
            await wait(kube, "join", n, schedulable, 1800)
            gated_total = time.monotonic() - t0
            w = writes(reg) - w0
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            print(f"gated: {n} nodes schedulable {gated_total:.1f}s after the burst started "
                  f"(x{gated_total / base_total:.2f} the no-gate baseline)")
            print(f"preflight API writes: {w:.0f} in {gated_total:.1f}s = {w / gated_total:.1f}/s "
                  f"({w / n:.1f} per node; pods create+delete, node patch, GPU history shards, events)")
            await kube.close()
        finally:
            lc.down(purge=True)


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--nodes", type=int, default=7500, help="cluster size before the burst")
    ap.add_argument("--burst", type=int, default=1000)
    a = ap.parse_args()
    asyncio.run(main(a.nodes, a.burst))
