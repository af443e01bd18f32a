"""Health on a real control plane: N simulated nodes, F faults injected at once,
the remediation controller turning conditions into quarantine taints.

  .venv/bin/python bench/bench_health_cluster.py [--nodes 7500] [--faults 100]

* agents: every node's agent (the same AgentCore and ConditionWriter the DaemonSet
  runs, through its own client) writes its jittered heartbeat, so the API server
  carries the steady agent load while the faults arrive; then F nodes, spread over
  racks, report an uncorrectable ECC error at the same moment (one status PATCH each);
* condition -> taint: from the agent's PATCH being acknowledged to the quarantine
  taint being visible in a watch, per node; p50/p90/p99/max;
* baseline, same run and same path: F plain node PATCHes at once, from the
  acknowledgement to the change being visible in the same watch (the floor the
  control plane itself sets);
* API writes per action: every write the controller sent during the run (node
  patch, Event, ...) over the number of quarantines, by resource.

The budget and the storm threshold are raised to let all F faults through (the
default cluster budget is 50 nodes, 4 per rack; a storm is 10 % of the nodes); the
faults are spread over the racks round robin.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import subprocess
import sys
import time

from prometheus_client import CollectorRegistry

from fleetkeeper.core.clock import RealClock
from fleetkeeper.core.faults import parse_fault
from fleetkeeper.core.kube import NODES
from fleetkeeper.core.manager import Manager
from fleetkeeper.core.settings import RuntimeSettings
from fleetkeeper.health.agent import AgentCore, ConditionWriter, simulated_findings
from fleetkeeper.health.controller import HealthOptions, setup
from fleetkeeper.health.policy import Policy

from common import local_cluster, own_writes, quantile_from_buckets, scrape, delta  # bench/ helper


def pct(xs: list[float], q: float) -> float:
    s = sorted(xs)
    return s[min(len(s) - 1, max(0, int(round(q * len(s) + 0.5)) - 1))]


def summary(xs: list[float]) -> str:
    return (f"p50 {pct(xs, .5) * 1e3:.0f} ms, p90 {pct(xs, .9) * 1e3:.0f} ms, p99 {pct(xs, .99) * 1e3:.0f} ms, "
            f"max {max(xs) * 1e3:.0f} ms (n={len(xs)})")


async def heartbeats(core: AgentCore, names: list[str], stop: asyncio.Event, interval: float = 10.0) -> None:
    healthy = simulated_findings("x", [], 8)
    while not stop.is_set():
        for n in names:
            if stop.is_set():
                return
            await core.observe(n, healthy)
        try:
            await asyncio.wait_for(stop.wait(), interval)
        except asyncio.TimeoutError:
            pass


def events_counted(reg: CollectorRegistry) -> tuple[float, float]:
    """Events the components asked for, and those the recorder dropped (never written)."""
    emitted = dropped = 0.0
    for m in reg.collect():
        for s in m.samples:
            if s.name == "fleetkeeper_events_total":
                emitted += s.value
            elif s.name == "fleetkeeper_events_dropped_total":
                dropped += s.value
    return emitted, dropped


def apiserver_breakdown(a: dict, b: dict) -> str:
    """kube-apiserver's side of the fault phase: requests and their server-side latency by verb/resource."""
    out = []
    for verb, res in (("PATCH", "nodes"), ("POST", "events"), ("PATCH", "events")):
        must = (f'verb="{verb}"', f'resource="{res}"')
        n = delta(a, b, "apiserver_request_total", *must)
        if n:
            q = [quantile_from_buckets(a, b, "apiserver_request_duration_seconds", x, *must) for x in (.5, .99)]
            out.append(f"{verb} {res} {n:.0f} (p50 <= {q[0] * 1e3:.0f} ms, p99 <= {q[1] * 1e3:.0f} ms)")
    return "; ".join(out)


def client_stats(reg: CollectorRegistry) -> dict[str, tuple[float, float]]:
    """The controller's own requests by verb: (count, seconds)."""
    out: dict[str, list[float]] = {}
    for m in reg.collect():
        for s in m.samples:
            if s.name == "fleetkeeper_api_request_duration_seconds_count":
                out.setdefault(s.labels["verb"], [0.0, 0.0])[0] = s.value
            elif s.name == "fleetkeeper_api_request_duration_seconds_sum":
                out.setdefault(s.labels["verb"], [0.0, 0.0])[1] = s.value
    return {k: (v[0], v[1]) for k, v in out.items()}


def client_breakdown(a: dict, b: dict) -> str:
    """The controller's requests between two :func:`client_stats`: count and mean round trip by verb."""
    out = []
    for v in sorted(b):
        n = b[v][0] - a.get(v, (0, 0))[0]
        t = b[v][1] - a.get(v, (0, 0))[1]
        if n:
            out.append(f"{v} {n:.0f} (mean {t / n * 1e3:.0f} ms)")
    return ", ".join(out)


async def main(total: int, faults: int, workers: int, profile: str | None = None) -> None:
    async with local_cluster(total, "fk-bench-health-") as lc:
        kube = await lc.connect()
        agents_kube = await lc.connect()  # the agents are other processes: their writes are not the controller's
        reg = CollectorRegistry()
        mgr = Manager(kube, RuntimeSettings(namespace="default", server={"port": 0},
                                            leader_election={"enabled": False}), registry=reg)
        policy = Policy.model_validate({"budget": {"cluster": {"max_nodes": 2 * faults}, "zone": {"max_percent": 100},
                                                   "rack": {"max_nodes": 2 * faults},
                                                   "max_new_per_window": 2 * faults},
                                        "storm": {"min_nodes": 2 * faults, "max_percent": 100}})
        await setup(mgr, HealthOptions(policy=policy, simulate=False, workers=workers))
        names = mgr.names
        nodes = mgr.node_informer()
        seen: dict[str, float] = {}
        probe_key = f"{names.domain}/bench-probe"
        watching: dict[str, str] = {}  # node -> "taint" or the probe value awaited

        def on_node(typ: str, key: str, old, new) -> None:
            if new is None or key not in watching or key in seen:
                return
            want = watching[key]
            if (want == "taint" and new.taint(names.quarantine) is not None) or \
                    (want != "taint" and new.annotations.get(probe_key) == want):
                seen[key] = time.monotonic()
        nodes.add_handler(on_node)
        task = asyncio.create_task(mgr.run())
        await mgr.wait_synced(600)

        gpu = [n for n in nodes.items() if n.gpus and not n.taints and n.labels.get("type") == "kwok"]
        by_rack: dict[str, list] = {}
        for n in gpu:
            by_rack.setdefault(n.labels.get(names.rack, ""), []).append(n.name)
        # spread over the racks, round robin (the rack budget is raised as well)
        victims = [v for i in range(max(map(len, by_rack.values()))) for v in
                   (r[i] for r in by_rack.values() if i < len(r))][:faults]
        probes = [n.name for n in gpu if n.name not in set(victims)][:faults]
        if len(victims) < faults:
            raise SystemExit(f"only {len(victims)} GPU nodes; need {faults}")

        core = AgentCore(ConditionWriter(agents_kube), RealClock(), heartbeat=300, jitter=0.2,
                         startup_spread=300)
        healthy_names = [n.name for n in nodes.items() if n.name not in set(victims)]
        stop = asyncio.Event()
        hb = asyncio.create_task(heartbeats(core, healthy_names, stop))
        await asyncio.sleep(20)  # heartbeats under way

        # baseline: F plain patches at once, ack -> visible in the watch
        acked: dict[str, float] = {}
        sent: dict[str, float] = {}

        async def probe(n: str) -> None:
            watching[n] = "1"
            sent[n] = time.monotonic()
            await agents_kube.patch(NODES, n, {"metadata": {"annotations": {probe_key: "1"}}})
            acked[n] = time.monotonic()
        await asyncio.gather(*(probe(n) for n in probes))
        await wait_all(seen, probes, 120)
        # the watch may deliver a change before the writer has read its response: that counts as 0
        floor = [max(0.0, seen[n] - acked[n]) for n in probes]
        whole = [seen[n] - sent[n] for n in probes]
        print(f"baseline (plain node PATCH -> visible in the watch, {len(probes)} at once): {summary(floor)}",
              flush=True)
        print(f"baseline, from sending the PATCH (its round trip included): {summary(whole)}", flush=True)

        # the faults: one agent status PATCH each, all at once
        w0 = own_writes(reg)
        fault_core = AgentCore(ConditionWriter(agents_kube), RealClock(), heartbeat=300)
        bad = simulated_findings("x", [parse_fault("ecc")], 8)
        ok = simulated_findings("x", [], 8)
        for v in victims:  # each agent has reported healthy before (what it would have done at start)
            await fault_core.observe(v, ok)
        await asyncio.sleep(5)
        acked.clear()
        m0 = await scrape(lc)
        c0 = client_stats(reg)
        spy = None
        if profile:  # py-spy on this process (controller, agents and watch) for the fault phase only
            spy = subprocess.Popen([os.path.join(os.path.dirname(sys.executable), "py-spy"), "record", "--pid", str(os.getpid()), "--rate", "250", "--format",
                                    "raw", "--output", profile, "--nonblocking"], stdout=subprocess.DEVNULL)
            await asyncio.sleep(2)

        async def fault(n: str) -> None:
            watching[n] = "taint"
            await fault_core.observe(n, bad)
            acked[n] = time.monotonic()
        t0 = time.monotonic()
        await asyncio.gather(*(fault(n) for n in victims))
        await wait_all(seen, victims, 600)
        span = time.monotonic() - t0
        lat = [max(0.0, seen[n] - acked[n]) for n in victims]
        if spy is not None:
            spy.send_signal(signal.SIGINT)
            await asyncio.to_thread(spy.wait)
        await asyncio.sleep(5)  # the Events and annotations that follow the taint
        if hasattr(mgr, "flush_events"):
            await mgr.flush_events(60)
        w1 = own_writes(reg)
        m1 = await scrape(lc)
        c1 = client_stats(reg)
        actions = (reg.get_sample_value("fleetkeeper_remediation_actions_total",
                                        {"action": "quarantine", "result": "success"}) or 0)
        stop.set()
        await hb
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        print(f"condition -> quarantine taint, {faults} faults at once on {total} nodes, {workers} workers: "
              f"{summary(lat)} "
              + (f"(p50 x{pct(lat, .5) / pct(floor, .5):.1f} the plain-patch floor)" if pct(floor, .5) > 0
                 else "(plain-patch floor p50 0 ms)") + f"; all {faults} tainted "
              f"{span:.1f}s after the first fault")
        delta = {k: w1.get(k, 0) - w0.get(k, 0) for k in w1 if w1.get(k, 0) - w0.get(k, 0)}
        tot = sum(delta.values())
        print(f"p99 ratios: condition -> taint p99 / plain PATCH p99 = {pct(lat, .99) / max(1e-3, pct(floor, .99)):.1f}x "
              f"(ack -> visible), {pct(lat, .99) / max(1e-3, pct(whole, .99)):.1f}x (send -> visible)")
        print(f"controller API writes: {tot:.0f} for {actions:.0f} quarantines = {tot / max(1, actions):.2f} "
              f"per action (" + ", ".join(f"{k} {v:.0f}" for k, v in sorted(delta.items())) + ")")
        emitted, dropped = events_counted(reg)
        print(f"Events: {emitted:.0f} asked for over the run, {dropped:.0f} dropped")
        print(f"kube-apiserver, fault phase (every client): {apiserver_breakdown(m0, m1)}")
        print(f"controller's requests, fault phase (its client's round trips): {client_breakdown(c0, c1)}")
        print(f"agent writes: {core.writer.writes} heartbeats from {len(healthy_names)} healthy agents "
              f"over the run, {faults} fault reports (one each)")
        await kube.close()
        await agents_kube.close()


async def wait_all(seen: dict[str, float], names: list[str], timeout: float) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        missing = [n for n in names if n not in seen]
        if not missing:
            return
        await asyncio.sleep(0.05)
    raise TimeoutError(f"{len(missing)} of {len(names)} not seen in {timeout:.0f}s, e.g. {missing[:3]}")


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--nodes", type=int, default=7500)
    ap.add_argument("--faults", type=int, default=100)
    ap.add_argument("--workers", type=int, default=HealthOptions.workers, help="remediation controller workers")
    ap.add_argument("--profile", help="py-spy raw profile of the fault phase to this file (py-spy beside the interpreter)")
    a = ap.parse_args()
    asyncio.run(main(a.nodes, a.faults, a.workers, a.profile))
