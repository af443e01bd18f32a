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
import time

from prometheus_client import CollectorRegistry

from fleetkeeper.core.kube import NODES, PODS, Kube
from fleetkeeper.core.manager import Manager
from fleetkeeper.core.settings import RuntimeSettings
from fleetkeeper.core.informer import Informer
from fleetkeeper.localcluster.fleet import FleetSpec, node_manifest
from fleetkeeper.preflight.config import PreflightConfig
from fleetkeeper.preflight.controller import Preflight

import common  # bench/ helper
from common import local_cluster, own_writes, scrape


async def burst(kube: Kube, prefix: str, n: int, gate: bool, concurrency: int = 64) -> list[str]:
    spec = FleetSpec(nodes=n, cpu_fraction=0.0, prefix=prefix, join_gate=gate)
    sem = asyncio.Semaphore(concurrency)

    async def one(i: int) -> str:
        m = node_manifest(spec, i)
        async with sem:
            await kube.create(NODES, m)
        return m["metadata"]["name"]

    return await asyncio.gather(*(one(i) for i in range(n)))


NOT_SCHEDULABLE = ("node.kubernetes.io/not-ready", "node.kubernetes.io/unreachable", "fleetkeeper.io/preflight")


def ready(node) -> bool:
    return node.ready


def schedulable(node) -> bool:
    """What the scheduler needs: Ready, and none of the taints that keep ordinary pods off a joining node
    (the API server's not-ready taint, which the node lifecycle controller lifts after Ready, and the gate's)."""
    return node.ready and not node.unschedulable and not any(t.key in NOT_SCHEDULABLE for t in node.taints)


def pod_stage(p) -> str:
    if p.phase in ("Succeeded", "Failed"):
        return "finished"
    if p.phase == "Running":
        return "running"
    return "bound" if p.node else "unscheduled"


async def wait(nodes: Informer, pods: Informer | None, prefix: str, n: int, pred, timeout: float,
               t0: float, every: float = 15.0) -> float:
    """Until ``n`` nodes named ``prefix-*`` satisfy ``pred``, read from watch caches (polling the API
    server with full lists would load it more than the thing measured). With ``pods``, print every
    ``every`` seconds where the burst stands: nodes Ready / not-ready-tainted / released, and the
    test pods by stage, so a slow stage shows itself. Times count from ``t0`` (the burst's start)."""
    last = -every
    while time.monotonic() - t0 < timeout:
        mine = [x for x in nodes.items() if x.name.startswith(prefix + "-")]
        done = sum(1 for x in mine if pred(x))
        now = time.monotonic() - t0
        if pods is not None and (now - last >= every or done >= n):
            last = now
            st = {"unscheduled": 0, "bound": 0, "running": 0, "finished": 0}
            for p in pods.items():
                st[pod_stage(p)] += 1
            print(f"  t={now:6.1f}s nodes ready={sum(1 for x in mine if x.ready):5d} "
                  f"not-ready-taint={sum(1 for x in mine if x.taint(NOT_SCHEDULABLE[0])):5d} released={done:5d} | "
                  "test pods " + " ".join(f"{k}={v}" for k, v in st.items()), flush=True)
        if done >= n:
            return now
        await asyncio.sleep(0.5)
    raise TimeoutError(f"{prefix}: not all {n} nodes done in {timeout}s")


async def main(total: int, n: int, modes: list[str], every: float) -> None:
    async with local_cluster(total, "fk-bench-pf-") as lc:
        kube = await lc.connect()
        reg = CollectorRegistry()
        mgr = Manager(kube, RuntimeSettings(namespace="default", server={"port": 0},
                                            leader_election={"enabled": False}), registry=reg)
        # the benchmark's own watch caches (not the manager's, which the controller runs)
        nodes = Informer(kube, NODES, mgr.projector.node)
        pods = Informer(kube, PODS, mgr.projector.pod, namespace="default",
                        label_selector="fleetkeeper.io/preflight-kind")
        watchers = [asyncio.create_task(nodes.run()), asyncio.create_task(pods.run())]
        await nodes.wait_synced(300)
        await pods.wait_synced(300)
        # both bursts start from a settled cluster: kube-controller-manager lifts the not-ready taint of
        # every node of the initial fleet at a few nodes per second, and a burst into that backlog
        # would wait behind it (the run that goes first would be penalised)
        t0 = time.monotonic()
        while any(n.taint(NOT_SCHEDULABLE[0]) for n in nodes.items()):
            await asyncio.sleep(2.0)
        print(f"settled: not-ready taints lifted from all {len(nodes)} nodes {time.monotonic() - t0:.0f}s "
              "after the cluster was up", flush=True)

        # baseline: the same burst with no gate, until schedulable (Ready, not-ready taint lifted)
        m0 = await scrape(lc)
        c0 = common.cpu_seconds(lc)
        t0 = time.monotonic()
        await burst(kube, "base", n, gate=False)
        base_total = await wait(nodes, None, "base", n, schedulable, 1800, t0)
        print("  " + cpu_text(c0, common.cpu_seconds(lc), base_total), flush=True)
        base_writes = common.writes(m0, await scrape(lc))
        print(f"baseline (no gate): {n} nodes schedulable {base_total:.1f}s after the burst started; "
              f"API writes {base_writes:.0f} ({base_writes / base_total:.1f}/s)", flush=True)
        await nodes_settled(nodes)
        for i, mode in enumerate(modes):
            await gated_run(lc, kube, nodes, pods, n, mode, f"join{i}", base_total, base_writes, every)
        await kube.close()
        for x in watchers:
            x.cancel()
        await asyncio.gather(*watchers, return_exceptions=True)


def cpu_text(c0: dict[str, float], c1: dict[str, float], wall: float) -> str:
    d = {k: c1[k] - c0.get(k, 0.0) for k in c1}
    return (f"CPU over the burst {sum(d.values()):.1f} s in {wall:.1f} s wall ({sum(d.values()) / wall:.2f} cores): "
            + ", ".join(f"{k} {v:.1f}" for k, v in sorted(d.items(), key=lambda kv: -kv[1]) if v >= 0.05))


async def nodes_settled(nodes: Informer) -> None:
    while any(n.taint(NOT_SCHEDULABLE[0]) for n in nodes.items()):
        await asyncio.sleep(2.0)
    await asyncio.sleep(5)


async def gated_run(lc, kube: Kube, nodes: Informer, pods: Informer, n: int, mode: str, prefix: str,
                    base_total: float, base_writes: float, every: float) -> None:
    """One gated burst, its own manager and preflight controller. ``mode``: ``ready`` (the default
    configuration: the test starts once the node reports Ready, its pod tolerating the not-ready taint),
    ``lifted`` (``gate.start_when_ready: false``: the test waits until that taint is lifted) or
    ``unbudgeted`` (as ``ready``, with the gate's write budgets, ``gate.pod_create_rate`` 50/s and
    ``gate.node_write_rate`` 100/s by default, raised to 1,000/s: what the budgets cost)."""
    reg = CollectorRegistry()
    pkube = await lc.connect()  # preflight's own client, instrumented on this run's registry (its writes)
    mgr = Manager(pkube, RuntimeSettings(namespace="default", server={"port": 0},
                                         leader_election={"enabled": False}), registry=reg)
    cfg = PreflightConfig.model_validate({"namespace": "default", "fault_file": str(lc.dir / "faults.json"),
                                          "periodic": {"enabled": False},
                                          "gate": {"max_concurrent": 1000, "workers": 16,
                                                   "start_when_ready": mode != "lifted",
                                                   **({"pod_create_rate": 1000.0, "node_write_rate": 1000.0}
                                                      if mode == "unbudgeted" else {})}})
    Preflight(mgr, cfg).register()
    task = asyncio.create_task(mgr.run())
    await mgr.wait_synced(300)
    await asyncio.sleep(2)
    w0 = own_writes(reg)
    m0 = await scrape(lc)
    c0 = common.cpu_seconds(lc)
    t0 = time.monotonic()
    joiner = await lc.connect()  # the nodes register through a client of their own (not preflight's writes)
    await burst(joiner, prefix, n, gate=True)
    gated_total = await wait(nodes, pods, prefix, n, schedulable, 3600, t0, every)
    cpu = cpu_text(c0, common.cpu_seconds(lc), gated_total)
    if hasattr(mgr, "flush_events"):  # Events are written off the write path: count them all here
        await mgr.flush_events(120)
    all_writes = common.writes(m0, await scrape(lc))
    w1 = own_writes(reg)
    by_res = {k: w1.get(k, 0) - w0.get(k, 0) for k in w1 if w1.get(k, 0) - w0.get(k, 0)}
    w = sum(by_res.values())
    m1 = await scrape(lc)
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    print(f"gated ({mode}): {n} nodes schedulable {gated_total:.1f}s after the burst started "
          f"(x{gated_total / base_total:.2f} the no-gate baseline)")
    print("  " + cpu)
    print(f"API writes over the gated burst, every client: {all_writes:.0f} = "
          f"{all_writes / gated_total:.1f}/s (baseline {base_writes / base_total:.1f}/s)")
    print(f"  of which preflight: {w:.0f} = {w / gated_total:.1f}/s "
          f"({w / n:.1f} per node: " + ", ".join(f"{k} {v / n:.2f}" for k, v in sorted(by_res.items())) + ")")
    nw = {f"{x.labels['action']}/{x.labels['result']}": x.value for m in reg.collect() for x in m.samples
          if x.name == "fleetkeeper_node_writes_total" and x.labels.get("component") == "preflight" and x.value}
    print("  preflight's node writes by action/result (whole run): "
          + ", ".join(f"{k} {v:.0f}" for k, v in sorted(nw.items())))
    pn, un = ('verb="PATCH"', 'resource="nodes"'), ('verb="PUT"', 'resource="nodes"')
    p99 = common.quantile_from_buckets(m0, m1, "apiserver_request_duration_seconds", .99, *pn)
    print(f"  kube-apiserver over the gated burst, node writes by every client: PATCH "
          f"{common.delta(m0, m1, 'apiserver_request_total', *pn):.0f} (p99 <= {p99 * 1e3:.0f} ms), PUT "
          f"{common.delta(m0, m1, 'apiserver_request_total', *un):.0f}")
    await joiner.close()
    await pkube.close()
    await nodes_settled(nodes)


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--nodes", type=int, default=7500, help="cluster size before the burst")
    ap.add_argument("--burst", type=int, default=1000)
    ap.add_argument("--modes", nargs="+", choices=("ready", "lifted", "unbudgeted"), default=["ready"],
                    help="gated runs, in order: ready (the default config: test once the node reports Ready) "
                         "lifted (gate.start_when_ready: false: test once the not-ready taint is lifted), unbudgeted "
                         "(ready, with the gate's pod-create and node-write budgets raised to 1,000/s)")
    ap.add_argument("--every", type=float, default=15.0, help="seconds between timeline lines")
    a = ap.parse_args()
    asyncio.run(main(a.nodes, a.burst, a.modes, a.every))
