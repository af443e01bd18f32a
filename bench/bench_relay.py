"""Relay, paced joins and control-plane memory, measured on local control planes.

    .venv/bin/python bench/bench_relay.py              (all three parts, as `make bench` runs it)
    .venv/bin/python bench/bench_relay.py --part fanout --agents 500
    .venv/bin/python bench/bench_relay.py --part joins --join-nodes 1000
    .venv/bin/python bench/bench_relay.py --part memory --memory-steps 1000,3000

fanout  N agents each following its node's pods: N direct watches on the API
        server (LIST then WATCH with fieldSelector spec.nodeName=<node>, as a
        per-node agent would) versus N agents through one relay. Same pod
        workload in both runs (one pod per node created, seen Running, deleted).
        API-server side: open pod WATCH requests (apiserver_longrunning_requests),
        requests (apiserver_request_total), bytes sent for pods
        (apiserver_response_sizes_sum, LIST + WATCH, recorded when the watches
        end), CPU seconds and RSS of kube-apiserver (/proc). Then extrapolated
        to 7,500 nodes (method printed).
joins   1,000 nodes join at once; the join pacer labels, taints and creates a
        bootstrap pod per node, unpaced (workers=64, no rate) then paced
        (rate=50/s); API-server requests, 429s, 5xx, mutating-request latency
        (apiserver_request_duration_seconds) and the pacer's own write
        latency, for both control-plane layouts (Events in the main etcd, and
        in their own etcd).
memory  kube-apiserver RSS at 0 nodes and at each step (simulated KWOK nodes).

Prints figures and ratios against the baseline measured in the same run;
never passes or fails on time. Each part starts its own control plane in a
temporary directory and stops it afterwards.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import aiohttp
import orjson
from prometheus_client import CollectorRegistry

from fleetkeeper.core import errors
from fleetkeeper.core.kube import NAMESPACES, NODES, PODS, Kube
from fleetkeeper.core.manager import Manager
from fleetkeeper.core.settings import RuntimeSettings
from fleetkeeper.localcluster.cluster import LocalCluster, wait_nodes_ready
from fleetkeeper.localcluster.fleet import FleetSpec, node_manifest
from fleetkeeper.relay.client import RelayClient
from fleetkeeper.relay.controller import add_pacer, add_relay
from fleetkeeper.relay.settings import PacerSettings, RelaySettings

from common import _ctx, delta, quantile_from_buckets, scrape, total  # bench/ helper

NS = "relay-bench"


def say(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


# --- the API server's own view ----------------------------------------------------------
def proc_stat(pid: int) -> tuple[float, float]:
    """(CPU seconds, RSS MiB) of a process."""
    parts = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    ticks = os.sysconf("SC_CLK_TCK")
    cpu = (int(parts[11]) + int(parts[12])) / ticks
    rss = 0.0
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            rss = int(line.split()[1]) / 1024
    return cpu, rss


def self_cpu() -> float:
    t = os.times()
    return t.user + t.system


def pod_watches(m: dict) -> float:
    return total(m, "apiserver_longrunning_requests", 'resource="pods"', 'verb="WATCH"', 'subresource=""')


async def up(directory: Path, nodes: int, *, events_etcd: bool = False) -> LocalCluster:
    lc = LocalCluster(directory)
    res = await lc.up(nodes, 8, events_etcd=events_etcd, create_rate=300.0,
                      progress=lambda m: say(f"  cluster: {m}") if "nodes" in m else None)
    say(f"control plane up in {directory} ({res['ready']} nodes Ready, {res['seconds']}s)")
    return lc


# --- fanout ---------------------------------------------------------------------------------
class DirectAgent:
    """What a per-node agent does without the relay: LIST then WATCH its node's pods."""

    def __init__(self, server: str, token: str, node: str, session: aiohttp.ClientSession):
        self.server, self.node, self.session = server, node, session
        self.headers = {"Authorization": f"Bearer {token}", "Accept": "application/json"}
        self.pods: dict[str, dict] = {}
        self.bytes = 0
        self.watching = False
        self.requests = 0

    async def run(self) -> None:
        fs = f"spec.nodeName={self.node}"
        while True:
            async with self.session.get(f"{self.server}/api/v1/pods", params={"fieldSelector": fs},
                                        headers=self.headers) as r:
                raw = await r.read()
                self.requests += 1
                self.bytes += len(raw)
                doc = orjson.loads(raw)
            self.pods = {f"{p['metadata']['namespace']}/{p['metadata']['name']}": p for p in doc["items"]}
            rv = doc["metadata"]["resourceVersion"]
            while True:
                params = {"fieldSelector": fs, "watch": "true", "allowWatchBookmarks": "true",
                          "resourceVersion": rv, "timeoutSeconds": str(random.randint(300, 600))}
                async with self.session.get(f"{self.server}/api/v1/pods", params=params, headers=self.headers,
                                            timeout=aiohttp.ClientTimeout(total=None)) as r:
                    self.requests += 1
                    if r.status == 410:
                        break
                    self.watching = True
                    async for line in r.content:
                        self.bytes += len(line)
                        ev = orjson.loads(line)
                        obj = ev["object"]
                        if ev["type"] == "ERROR":
                            break
                        rv = obj["metadata"]["resourceVersion"]
                        if ev["type"] == "BOOKMARK":
                            continue
                        key = f"{obj['metadata']['namespace']}/{obj['metadata']['name']}"
                        if ev["type"] == "DELETED":
                            self.pods.pop(key, None)
                        else:
                            self.pods[key] = obj
                    self.watching = False

    def has_running(self, key: str) -> bool:
        p = self.pods.get(key)
        return bool(p and (p.get("status") or {}).get("podIP"))

    def has(self, key: str) -> bool:
        return key in self.pods


class RelayAgent:
    def __init__(self, url: str, node: str, session: aiohttp.ClientSession):
        self.client = RelayClient(url, node, session=session)
        self.pods: dict[str, dict] = {}

    async def run(self) -> None:
        async for st in self.client.sync():
            self.pods = st.pods

    def has_running(self, key: str) -> bool:
        p = self.pods.get(key)
        return bool(p and p.get("ip"))

    def has(self, key: str) -> bool:
        return key in self.pods


async def until(pred, timeout: float, what: str) -> float:
    t0 = time.monotonic()
    while not pred():
        if time.monotonic() - t0 > timeout:
            raise TimeoutError(f"timed out after {timeout:.0f}s: {what}")
        await asyncio.sleep(0.2)
    return time.monotonic() - t0


async def workload(kube: Kube, agents: list, nodes: list[str]) -> dict:
    """One pod per node: create, wait until every agent sees its pod Running, delete, wait until gone."""
    seen_at: dict[str, float] = {}
    created_at: dict[str, float] = {}
    sem = asyncio.Semaphore(32)

    async def create(i: int, node: str) -> None:
        body = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": f"w-{i:05d}", "labels": {"app": "bench"}},
                "spec": {"nodeName": node, "tolerations": [{"operator": "Exists"}],
                         "containers": [{"name": "c", "image": "busybox"}]}}
        async with sem:
            created_at[f"{NS}/w-{i:05d}"] = time.monotonic()
            await kube.create(PODS, body, NS)

    t0 = time.monotonic()
    watcher_done = asyncio.Event()

    async def watch_seen() -> None:
        while not watcher_done.is_set():
            now = time.monotonic()
            for i, a in enumerate(agents):
                key = f"{NS}/w-{i:05d}"
                if key not in seen_at and a.has_running(key):
                    seen_at[key] = now
            await asyncio.sleep(0.05)

    w = asyncio.create_task(watch_seen())
    await asyncio.gather(*(create(i, n) for i, n in enumerate(nodes)))
    await until(lambda: len(seen_at) == len(nodes), 300, "every agent sees its pod Running")
    watcher_done.set()
    await w
    up_s = time.monotonic() - t0

    async def delete(i: int) -> None:
        async with sem:
            try:
                await kube.delete(PODS, f"w-{i:05d}", NS, grace_period=0)
            except errors.NotFound:
                pass

    t1 = time.monotonic()
    await asyncio.gather(*(delete(i) for i in range(len(nodes))))
    await until(lambda: not any(a.has(f"{NS}/w-{i:05d}") for i, a in enumerate(agents)), 300,
                "every agent sees its pod gone")
    lat = sorted(seen_at[k] - created_at[k] for k in seen_at)
    foreign = sum(1 for i, a in enumerate(agents) for k in a.pods if k.startswith(NS + "/")
                  and k != f"{NS}/w-{i:05d}")
    return {"create_to_seen_p50": lat[len(lat) // 2], "create_to_seen_p99": lat[int(len(lat) * 0.99) - 1 if
                                                                                  len(lat) > 1 else 0],
            "all_seen_s": up_s, "all_gone_s": time.monotonic() - t1, "foreign": foreign}


async def phase(lc: LocalCluster, kube: Kube, nodes: list[str], mode: str) -> dict:
    pid = lc.state.pids["kube-apiserver"]
    m0 = await scrape(lc)
    cpu0, rss0 = proc_stat(pid)
    me0 = self_cpu()
    t0 = time.monotonic()
    conn = aiohttp.TCPConnector(limit=0, ssl=_ctx(lc) if mode == "direct" else None)
    session = aiohttp.ClientSession(connector=conn)
    mgr_task = None
    handle = None
    try:
        if mode == "direct":
            agents = [DirectAgent(lc.server, lc.state.token, n, session) for n in nodes]
        else:
            mgr = Manager(kube, RuntimeSettings(namespace=NS, server={"port": 0},
                                                leader_election={"enabled": False}), registry=CollectorRegistry())
            handle = add_relay(mgr, RelaySettings(port=0))
            mgr_task = asyncio.create_task(mgr.run())
            await until(lambda: handle.synced() and handle.server.port != 0, 120, "relay synced")
            url = f"http://127.0.0.1:{handle.server.port}"
            agents = [RelayAgent(url, n, session) for n in nodes]
        tasks = [asyncio.create_task(a.run()) for a in agents]
        base_watches = pod_watches(m0)
        if mode == "direct":
            await until(lambda: all(a.watching for a in agents), 600, "direct watches open")
        else:
            await until(lambda: handle.hub.subscribers == len(agents), 600, "agents subscribed")
        connect_s = time.monotonic() - t0
        await asyncio.sleep(2)
        m1 = await scrape(lc)
        cpu1, rss1 = proc_stat(pid)
        say(f"  {mode}: {len(agents)} agents connected in {connect_s:.1f}s; API-server pod watches "
            f"{base_watches:.0f} -> {pod_watches(m1):.0f}; apiserver RSS {rss0:.0f} -> {rss1:.0f} MiB")
        w = await workload(kube, agents, nodes)
        t_end = time.monotonic()
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        client_bytes = sum(getattr(a, "bytes", 0) for a in agents)
    finally:
        await session.close()
        if mgr_task:
            mgr_task.cancel()
            await asyncio.gather(mgr_task, return_exceptions=True)
    await asyncio.sleep(3)  # the API server records a watch's response size when it ends
    m2 = await scrape(lc)
    cpu2, rss2 = proc_stat(pid)
    dur = t_end - t0
    req = delta(m0, m2, "apiserver_request_total")
    req_pods = delta(m0, m2, "apiserver_request_total", 'resource="pods"')
    res = {
        "mode": mode, "agents": len(nodes), "seconds": dur, "connect_s": connect_s,
        "pod_watches_added": pod_watches(m1) - base_watches,
        "requests": req, "requests_pods": req_pods,
        "requests_pods_get": delta(m0, m2, "apiserver_request_total", 'resource="pods"', 'verb="LIST"')
        + delta(m0, m2, "apiserver_request_total", 'resource="pods"', 'verb="WATCH"'),
        "bytes_pods": delta(m0, m2, "apiserver_response_sizes_sum", 'resource="pods"', 'verb="LIST"')
        + delta(m0, m2, "apiserver_response_sizes_sum", 'resource="pods"', 'verb="WATCH"'),
        "client_bytes": client_bytes,
        "apiserver_cpu_s": cpu2 - cpu0, "apiserver_rss_watching_mib": rss1, "apiserver_rss_before_mib": rss0,
        "bench_cpu_s": self_cpu() - me0, **w,
    }
    if handle is not None:
        res["relay_bytes_sent"] = sum(v for k, v in (
            (s.name + str(s.labels), s.value) for mf in handle.metrics.registry.collect()
            for s in mf.samples if s.name == "fleetkeeper_relay_bytes_sent_total"))
        res["relay_fanned_out"] = handle.hub.stats.fanned_out
    return res


async def fanout(args) -> None:
    tmp = Path(tempfile.mkdtemp(prefix="fk-bench-relay-"))
    lc = await up(tmp, args.agents)
    kube = await lc.connect()
    try:
        await kube.create(NAMESPACES, {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": NS}})
        nodes_raw, _ = await kube.list(NODES, label_selector="type=kwok")
        nodes = sorted(n["metadata"]["name"] for n in nodes_raw)[: args.agents]
        results = []
        for mode in ("direct", "relay"):
            say(f"fanout: {mode} run with {len(nodes)} agents")
            results.append(await phase(lc, kube, nodes, mode))
        report_fanout(results)
    finally:
        await kube.close()
        lc.down(purge=True)


def report_fanout(results: list[dict]) -> None:
    d, r = results
    rows = [
        ("agents", "agents", "{:.0f}"),
        ("API-server pod WATCH requests added", "pod_watches_added", "{:.0f}"),
        ("API-server requests in the run (all)", "requests", "{:.0f}"),
        ("API-server requests on pods", "requests_pods", "{:.0f}"),
        ("  of which LIST+WATCH of pods", "requests_pods_get", "{:.0f}"),
        ("API-server bytes sent for pods (LIST+WATCH)", "bytes_pods", "{:,.0f}"),
        ("bytes received by agents from the API server", "client_bytes", "{:,.0f}"),
        ("kube-apiserver CPU seconds in the run", "apiserver_cpu_s", "{:.1f}"),
        ("kube-apiserver RSS while agents watch, MiB", "apiserver_rss_watching_mib", "{:.0f}"),
        ("agents connected after, s", "connect_s", "{:.1f}"),
        ("pod create -> agent sees it Running, p50 s", "create_to_seen_p50", "{:.2f}"),
        ("pod create -> agent sees it Running, p99 s", "create_to_seen_p99", "{:.2f}"),
        ("pods of other nodes seen by agents", "foreign", "{:.0f}"),
        ("run duration, s", "seconds", "{:.1f}"),
    ]
    print()
    print(f"{'':50s} {'direct':>14s} {'via relay':>14s} {'relay/direct':>12s}")
    for label, key, fmt in rows:
        a, b = d.get(key, 0), r.get(key, 0)
        ratio = f"{b / a:.3f}" if a else "-"
        print(f"{label:50s} {fmt.format(a):>14s} {fmt.format(b):>14s} {ratio:>12s}")
    print(f"{'relay: bytes sent to agents':50s} {'':>14s} {r.get('relay_bytes_sent', 0):>14,.0f}")
    n = d["agents"]
    per_watch_mib = (d["apiserver_rss_watching_mib"] - d["apiserver_rss_before_mib"]) / n
    print()
    print("Extrapolation to 7,500 nodes (method: direct costs scale with the number of agents, measured per agent\n"
          "here; the relay's upstream cost is per relay replica, independent of agents):")
    print(f"  API-server pod watches: direct {7500:,} (one per agent; plus one per agent per other resource "
          f"watched, e.g. its Node) vs relay 3 per relay replica (nodes, pods, team ConfigMap); with 3 replicas: 9")
    print(f"  kube-apiserver memory for the watches: {per_watch_mib * 1024:.0f} KiB per direct watch measured -> "
          f"{per_watch_mib * 7500 / 1024:.2f} GiB at 7,500 direct watches; ~0 with the relay")
    lists_per_agent = d["requests_pods_get"] / n
    print(f"  requests: each agent start or relist is a LIST + WATCH against the API server "
          f"({lists_per_agent:.1f} per agent measured); a fleet-wide agent restart = "
          f"{7500 * lists_per_agent:,.0f} API requests direct vs {r['requests_pods_get']:.0f} via the relay; "
          f"re-watches after the server's watch timeout (5-10 min) = 7,500/450 s = {7500 / 450:.1f} req/s direct, "
          f"~0.01 req/s via the relay")
    per_agent_bytes = d["bytes_pods"] / n
    print(f"  bytes: direct sends each agent its node's pod events in full objects ({per_agent_bytes:,.0f} B per agent "
          f"in this workload) -> {per_agent_bytes * 7500 / 2**20:,.0f} MiB for the same workload at 7,500; the relay "
          f"receives each pod event once ({r['bytes_pods']:,.0f} B here) and sends agents projections "
          f"({r.get('relay_bytes_sent', 0) / n:,.0f} B per agent)")


# --- joins ----------------------------------------------------------------------------------
async def join_wave(lc: LocalCluster, kube: Kube, n: int, mode: str, layout: str) -> dict:
    paced = mode == "paced"
    cfg = PacerSettings(enabled=True, rate=50.0 if paced else 0.0, burst=10, workers=8 if paced else 64,
                        node_selector=f"fleetkeeper.io/join-wave={mode}-{layout}",
                        labels={"fleetkeeper.io/joined": "true"},
                        taints=[{"key": "fleetkeeper.io/preflight", "value": "pending", "effect": "NoSchedule"}],
                        bootstrap_pod={"namespace": NS, "annotations": {"fleetkeeper.io/sim-result": "succeed"}})
    reg = CollectorRegistry()
    mgr = Manager(kube, RuntimeSettings(namespace=NS, server={"port": 0}, leader_election={"enabled": False}),
                  registry=reg)
    kube.metrics = mgr.metrics.api
    pacer = add_pacer(mgr, cfg)
    task = asyncio.create_task(mgr.run())
    await until(lambda: pacer.nodes.synced, 120, "pacer synced")
    spec = FleetSpec(nodes=n, prefix=f"{mode}-{layout}", cpu_fraction=0.0)
    manifests = []
    for i in range(n):
        m = node_manifest(spec, i)
        m["metadata"]["labels"]["fleetkeeper.io/join-wave"] = f"{mode}-{layout}"
        manifests.append(m)
    pid = lc.state.pids["kube-apiserver"]
    m0 = await scrape(lc)
    cpu0, _ = proc_stat(pid)
    inflight_max = 0.0
    stop = asyncio.Event()

    async def sample() -> None:
        nonlocal inflight_max
        while not stop.is_set():
            try:
                m = await scrape(lc)
                inflight_max = max(inflight_max, total(m, "apiserver_current_inflight_requests", "mutating"))
            except aiohttp.ClientError:
                pass
            await asyncio.sleep(1.0)

    sampler = asyncio.create_task(sample())
    t0 = time.monotonic()
    sem = asyncio.Semaphore(64)
    errors_seen = 0

    async def register(m: dict) -> None:
        nonlocal errors_seen
        async with sem:
            try:
                await kube.create(NODES, m)
            except errors.FleetkeeperError:
                errors_seen += 1

    await asyncio.gather(*(register(m) for m in manifests))
    registered_s = time.monotonic() - t0
    names = [m["metadata"]["name"] for m in manifests]
    await until(lambda: all(x in pacer.done for x in names), 900, f"join work of {n} nodes")
    done_s = time.monotonic() - t0
    stop.set()
    await sampler
    m1 = await scrape(lc)
    cpu1, rss1 = proc_stat(pid)
    samples = [s for mf in reg.collect() for s in mf.samples]

    def client_q(q: float) -> float:
        buckets = sorted(((float(s.labels["le"]), s.value) for s in samples
                          if s.name == "fleetkeeper_api_request_duration_seconds_bucket"
                          and s.labels.get("verb") in ("create", "patch")), key=lambda t: t[0])
        agg: dict[float, float] = defaultdict(float)
        for le, v in buckets:
            agg[le] += v
        les = sorted(agg)
        nobs = agg[les[-1]] if les else 0
        for le in les:
            if nobs and agg[le] >= q * nobs:
                return le
        return float("nan")

    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    res = {
        "layout": layout, "mode": mode, "nodes": n, "registered_s": registered_s, "done_s": done_s,
        "requests": delta(m0, m1, "apiserver_request_total"),
        "mutating": sum(delta(m0, m1, "apiserver_request_total", f'verb="{v}"') for v in ("POST", "PATCH", "PUT",
                                                                                             "DELETE")),
        "429": delta(m0, m1, "apiserver_request_total", 'code="429"'),
        "5xx": sum(delta(m0, m1, "apiserver_request_total", f'code="{c}"') for c in ("500", "502", "503", "504")),
        "p50_mut": quantile_from_buckets(m0, m1, "apiserver_request_duration_seconds", 0.5, 'verb="POST"'),
        "p99_mut": quantile_from_buckets(m0, m1, "apiserver_request_duration_seconds", 0.99, 'verb="POST"'),
        "p99_patch": quantile_from_buckets(m0, m1, "apiserver_request_duration_seconds", 0.99, 'verb="PATCH"'),
        "pacer_p99": client_q(0.99), "pacer_p50": client_q(0.5),
        "inflight_max": inflight_max, "apiserver_cpu_s": cpu1 - cpu0, "apiserver_rss_mib": rss1,
        "create_errors": errors_seen,
    }
    res["req_per_s"] = res["requests"] / done_s
    # clean up outside the measured window: the next wave starts from the same state
    say(f"  {layout}/{mode}: join work of {n} nodes done in {done_s:.1f}s; cleaning up")
    sem2 = asyncio.Semaphore(64)

    async def rm(name: str) -> None:
        async with sem2:
            for res_, ns, nm in ((PODS, NS, f"join-{name}"), (NODES, None, name)):
                try:
                    await kube.delete(res_, nm, ns, grace_period=0) if ns else await kube.delete(res_, nm)
                except errors.NotFound:
                    pass

    await asyncio.gather(*(rm(x) for x in names))
    return res


async def joins(args) -> None:
    results = []
    for layout, events_etcd in (("shared-etcd", False), ("events-etcd", True)):
        tmp = Path(tempfile.mkdtemp(prefix=f"fk-bench-joins-{layout}-"))
        lc = await up(tmp, 0, events_etcd=events_etcd)
        kube = await lc.connect()
        try:
            await kube.create(NAMESPACES, {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": NS}})
            for mode in ("unpaced", "paced"):
                say(f"joins: {layout}, {mode}: {args.join_nodes} nodes join at once")
                results.append(await join_wave(lc, kube, args.join_nodes, mode, layout))
                say("  " + ", ".join(f"{k}={v:.3f}" if isinstance(v, float) else f"{k}={v}"
                                     for k, v in results[-1].items()))  # kept if a later wave times out
        finally:
            await kube.close()
            lc.down(purge=True)
    rows = [
        ("nodes joining at once", "nodes", "{:.0f}"),
        ("node registrations done after, s", "registered_s", "{:.1f}"),
        ("all join work done after, s", "done_s", "{:.1f}"),
        ("API-server requests (all clients)", "requests", "{:.0f}"),
        ("  per second", "req_per_s", "{:.0f}"),
        ("  mutating", "mutating", "{:.0f}"),
        ("  answered 429", "429", "{:.0f}"),
        ("  answered 5xx", "5xx", "{:.0f}"),
        ("apiserver POST latency p50, s (bucket bound)", "p50_mut", "{:.3f}"),
        ("apiserver POST latency p99, s (bucket bound)", "p99_mut", "{:.3f}"),
        ("apiserver PATCH latency p99, s (bucket bound)", "p99_patch", "{:.3f}"),
        ("pacer write latency p50, s (client side)", "pacer_p50", "{:.3f}"),
        ("pacer write latency p99, s (client side)", "pacer_p99", "{:.3f}"),
        ("max mutating requests in flight (1 s samples)", "inflight_max", "{:.0f}"),
        ("kube-apiserver CPU seconds", "apiserver_cpu_s", "{:.1f}"),
        ("kube-apiserver RSS after, MiB", "apiserver_rss_mib", "{:.0f}"),
    ]
    print()
    heads = [f"{r['layout']}/{r['mode']}" for r in results]
    print(f"{'':48s} " + " ".join(f"{h:>22s}" for h in heads))
    for label, key, fmt in rows:
        print(f"{label:48s} " + " ".join(f"{fmt.format(r[key]):>22s}" for r in results))
    for layout in ("shared-etcd", "events-etcd"):
        u = next(r for r in results if r["layout"] == layout and r["mode"] == "unpaced")
        p = next(r for r in results if r["layout"] == layout and r["mode"] == "paced")
        print(f"{layout}: paced/unpaced  p99 POST {p['p99_mut'] / u['p99_mut']:.2f}x, pacer p99 "
              f"{p['pacer_p99'] / u['pacer_p99']:.2f}x, max in flight {p['inflight_max'] / max(u['inflight_max'], 1):.2f}x,"
              f" duration {p['done_s'] / u['done_s']:.2f}x")


# --- memory ---------------------------------------------------------------------------------
async def memory(args) -> None:
    steps = [int(x) for x in args.memory_steps.split(",")]
    tmp = Path(tempfile.mkdtemp(prefix="fk-bench-mem-"))
    lc = await up(tmp, 0)
    rows = []
    try:
        await asyncio.sleep(10)
        rows.append((0, proc_stat(lc.state.pids["kube-apiserver"])[1]))
        for n in steps:
            await lc.up(n, 8, create_rate=300.0, wait_ready=False)
            kube = await lc.connect()
            try:
                await wait_nodes_ready(kube, n, timeout=max(300.0, n / 5))
            finally:
                await kube.close()
            await asyncio.sleep(30)  # let heartbeats and caches settle
            rss = proc_stat(lc.state.pids["kube-apiserver"])[1]
            rows.append((n, rss))
            say(f"memory: {n} nodes: kube-apiserver RSS {rss:.0f} MiB")
    finally:
        lc.down(purge=True)
    print()
    print(f"{'nodes':>8s} {'apiserver RSS MiB':>18s} {'MiB per 1,000 nodes over 0':>28s}")
    base = rows[0][1]
    for n, rss in rows:
        per = (rss - base) / n * 1000 if n else 0
        print(f"{n:>8d} {rss:>18.0f} {per:>28.0f}")
    n, rss = rows[-1]
    per = (rss - base) / n * 1000
    print(f"linear extrapolation to 7,500 nodes (no pods, no other objects): {(base + per * 7.5) / 1024:.1f} GiB "
          f"vs the article's ~70 GB per API server (with the real fleet's pods, events and clients)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--part", choices=("all", "fanout", "joins", "memory"), default="all",
                    help="which measurement (default: all three, one after the other, as `make bench` runs it)")
    ap.add_argument("--agents", type=int, default=500)
    ap.add_argument("--join-nodes", type=int, default=1000)
    ap.add_argument("--memory-steps", default="1000,3000")
    ap.add_argument("--nodes", type=int, default=None, help="alias: --agents for fanout, --join-nodes for joins")
    args = ap.parse_args()
    if args.nodes:
        args.agents = args.join_nodes = args.nodes
    import logging

    logging.basicConfig(level=logging.WARNING)
    import signal

    # `timeout` sends SIGTERM: turn it into SIGINT, which asyncio.run turns into a
    # cancellation, so the control plane started here is stopped and removed
    signal.signal(signal.SIGTERM, lambda *_: os.kill(os.getpid(), signal.SIGINT))
    t0 = time.monotonic()
    parts = {"fanout": fanout, "joins": joins, "memory": memory}
    for name in parts if args.part == "all" else [args.part]:
        print(f"\n=== part {name}", flush=True)
        asyncio.run(parts[name](args))
    print(f"\n(total {time.monotonic() - t0:.0f}s; command: {' '.join(sys.argv)})")


if __name__ == "__main__":
    main()
