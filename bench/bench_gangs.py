"""A burst of training jobs of mixed sizes, with and without gangs and balloons.

    .venv/bin/python bench/bench_gangs.py [--nodes 32] [--jobs 53] [--seconds 20] [--modes ...]

One local control plane (KWOK nodes of 8 GPUs, the pinned kube-scheduler with
GangScheduling), fleetkeeper's capacity controllers in this process. The same
burst runs once per mode, one after the other, each in a fresh namespace:

* ``balloons+gangs``: fleetkeeper's default configuration;
* ``gangs``: balloons off (which also shows that turning balloons off removes
  their Deployments: the next mode starts on empty nodes);
* ``no-gangs``: the same jobs without the gang label (plain Jobs).

A mode may name kube-scheduler settings for its run: ``MODE@I:M`` sets
``podInitialBackoffSeconds: I`` and ``podMaxBackoffSeconds: M``, and a third
field ``sync`` turns ``SchedulerAsyncPreemption`` off (``gangs@1:2:sync``);
the scheduler is restarted with them before the mode (a mode without ``@``
runs on kube-scheduler's defaults, 1 s and 10 s). ``MODE/nogate`` holds
gangs without fleetkeeper's scheduling gate (``gangs.gate_held_members:
false``), ``MODE/noexpect`` counts a gang as waiting work only once all its
members exist (``gangs.expect_members_seconds: null``): the code before each,
side by side with the default.

The burst: the largest job first (one pod per node of the pool), then
``jobs - 1`` jobs of 1 to 8 pods (a fixed pseudo-random mix), every pod 8
GPUs, every pod running ``--seconds`` (a KWOK stage ends it). Figures per
mode, all read from the API server's own timestamps (whole seconds):

* makespan: first job created to last pod finished;
* GPU use: GPU-seconds of finished pods / (makespan x GPUs of the pool);
* GPU use while jobs wait (``--profile``): the same, over the seconds some job had
  not started yet: the burst's tail (its last jobs running on a partly empty
  pool) is the burst's shape, not the scheduling, and this leaves it out;
* partial placements: jobs whose pods were bound more than ``--partial`` s
  apart (with gangs a job is bound whole, within a second or two);
* largest job's wait: its creation to its last pod bound; its rank among the
  jobs by start;
* stalls: jobs not finished within ``--timeout`` s.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import random
import re
import secrets
import shutil
import signal
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
import common  # noqa: E402  (bench/common.py: this directory is the script's)

from prometheus_client import CollectorRegistry  # noqa: E402

from fleetkeeper.capacity.config import CapacityConfig  # noqa: E402
from fleetkeeper.capacity.controller import CapacityOptions, setup  # noqa: E402
from fleetkeeper.core import errors  # noqa: E402
from fleetkeeper.core.domain import Names  # noqa: E402
from fleetkeeper.core.kube import DEPLOYMENTS, EVENTS, JOBS, NAMESPACES, NODES, PODGROUPS, PODS, Kube, RetryPolicy  # noqa: E402
from fleetkeeper.core.manager import Manager  # noqa: E402
from fleetkeeper.core.settings import RuntimeSettings  # noqa: E402
from fleetkeeper.core.views import parse_time  # noqa: E402
from fleetkeeper.localcluster.cluster import LocalCluster, node_ready  # noqa: E402
from fleetkeeper.localcluster.fleet import FleetSpec, node_manifest  # noqa: E402

N = Names()
SYSTEM = "fleetkeeper-system"
POOL = "gpu"


def sizes(jobs: int, nodes: int, seed: int = 7) -> list[int]:
    rnd = random.Random(seed)
    return [nodes] + [rnd.choice([1, 1, 2, 2, 3, 3, 4, 4, 5, 6, 8]) for _ in range(jobs - 1)]


def waves(burst: list[int], nodes: int) -> int:
    """Waves a perfect whole-job schedule needs: every pod runs equally long, so with every job placed whole
    a schedule is a packing of the job sizes into waves of ``nodes`` (first fit decreasing; for the
    benchmark's bursts it meets the lower bound ceil(pods / nodes), so it is the optimum there)."""
    bins: list[int] = []
    for size in sorted(burst, reverse=True):
        for i, used in enumerate(bins):
            if used + size <= nodes:
                bins[i] += size
                break
        else:
            bins.append(size)
    return len(bins)


def job(name: str, size: int, seconds: int, gang: bool) -> dict:
    labels = {"bench": "1", "job": name}
    if gang:
        labels[N.gang] = name
    return {"apiVersion": "batch/v1", "kind": "Job", "metadata": {"name": name},
            "spec": {"parallelism": size, "completions": size, "backoffLimit": 0,
                     "template": {"metadata": {"labels": labels,
                                               "annotations": {"fleetkeeper.io/sim-result": "succeed",
                                                               "fleetkeeper.io/sim-delay": f"{seconds}s"}},
                                  "spec": {"restartPolicy": "Never", "terminationGracePeriodSeconds": 0,
                                           "nodeSelector": {N.pool: POOL},
                                           "containers": [{"name": "train", "image": "trainer",
                                                           "resources": {"limits": {"nvidia.com/gpu": "8"}}}]}}}}


async def start(kube: Kube, cfg: CapacityConfig, tmp: Path) -> tuple[asyncio.Task, Manager, CollectorRegistry]:
    reg = CollectorRegistry()
    mgr = Manager(kube, RuntimeSettings(namespace=SYSTEM, server={"port": 0}, leader_election={"enabled": False}),
                  registry=reg)
    await setup(mgr, CapacityOptions(config=cfg, webhook=cfg.gangs.enabled, webhook_cert_dir=tmp / "wh",
                                     webhook_config_name=f"bench-gangs-{secrets.token_hex(2)}",
                                     unregister_on_exit=True))
    task = asyncio.create_task(mgr.run())
    await mgr.wait_synced(300)
    await asyncio.sleep(2.0)
    return task, mgr, reg


async def stop(task: asyncio.Task) -> None:
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)


def sample(reg: CollectorRegistry, name: str, **labels) -> float:
    return reg.get_sample_value(name, labels) or 0.0


async def balloons_running(kube: Kube) -> int:
    items, _ = await kube.list(PODS, SYSTEM, label_selector=f"{N.balloon}={POOL}")
    return sum(1 for p in items if p["status"].get("phase") == "Running" and not p["metadata"].get("deletionTimestamp"))


async def scheduler_queues(lc: LocalCluster) -> str:
    """kube-scheduler's own view of its queues (scheduler_pending_pods by queue)."""
    got = await common.scheduler_queues(lc)
    return got if isinstance(got, str) else "; ".join(f"{q} {n}" for q, n in sorted(got.items()))


async def stuck_report(kube: Kube, ns: str) -> str:
    pods, _ = await kube.list(PODS, ns, label_selector="bench=1")
    lines = []
    for p in pods:
        if p["spec"].get("nodeName") or p["status"].get("phase") != "Pending":
            continue
        c = next((c for c in p["status"].get("conditions") or () if c["type"] == "PodScheduled"), {})
        lines.append(f"{p['metadata']['name']}: PodScheduled={c.get('status')} {c.get('reason', '')} "
                     f"{(c.get('message') or '')[:120]} nominated={p['status'].get('nominatedNodeName', '')}")
    return "\n    ".join(lines[:40])


def parse_mode(spec: str) -> tuple[str, dict]:
    """``MODE[/nogate][/noexpect][@I:M[:sync]]`` -> (mode, tune_scheduler arguments); ``/nogate``: gangs held
    without the gang gate (``gangs.gate_held_members: false``), ``/noexpect``: a gang counts as waiting work
    only once all its members exist (``gangs.expect_members_seconds: null``), to compare side by side."""
    mode, _, tune = spec.partition("@")
    mode = mode.split("/")[0]
    if mode not in ("balloons+gangs", "gangs", "no-gangs"):
        raise SystemExit(f"unknown mode {mode!r} in {spec!r}: balloons+gangs, gangs or no-gangs")
    if not tune:
        return mode, {}
    parts = tune.split(":")
    try:
        out = {"initial_backoff_seconds": int(parts[0]), "max_backoff_seconds": int(parts[1])}
    except (IndexError, ValueError):
        raise SystemExit(f"bad scheduler settings in {spec!r}: MODE@INITIAL:MAX[:sync]") from None
    if parts[2:] == ["sync"]:
        out["feature_gates"] = "SchedulerAsyncPreemption=false"
    elif parts[2:]:
        raise SystemExit(f"bad scheduler settings in {spec!r}: the third field can only be 'sync'")
    return mode, out


async def run_mode(kube: Kube, mode: str, burst: list[int], args, nodes: int, reg: CollectorRegistry | None,
                   lc: LocalCluster | None = None, node_cache=None) -> dict:
    ns = f"burst-{mode.replace('+', '-')}-{secrets.token_hex(2)}"
    await kube.create(NAMESPACES, {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": ns}})
    gang = mode != "no-gangs"
    t0 = time.time()
    print(f"  {mode}: burst in namespace {ns} from {time.strftime('%H:%M:%S', time.gmtime(t0))} UTC", flush=True)
    names = []
    for i, size in enumerate(burst):
        name = f"j{i:02d}-{size}"
        names.append(name)
        await kube.create(JOBS, job(name, size, args.seconds, gang), ns)
    total = sum(burst)
    deadline = time.monotonic() + args.timeout
    done = 0
    last_change, last_done = time.monotonic(), -1
    samples: list[tuple[float, set[str]]] = []  # reservation taints seen (profile)
    while time.monotonic() < deadline:
        if gang and args.profile:
            samples.append((time.time(), await reserved_now(kube, node_cache)))
        items, _ = await kube.list(JOBS, ns)
        done = sum(1 for j in items if (j.get("status") or {}).get("succeeded", 0) == j["spec"]["completions"])
        if done == len(burst):
            break
        if done != last_done:
            last_done, last_change = done, time.monotonic()
        elif time.monotonic() - last_change > args.stall:
            print(f"  STALL: no job finished for {args.stall:.0f}s ({done} of {len(burst)} done)", flush=True)
            break
        await asyncio.sleep(2.0)
    if done < len(burst):
        if lc is not None:
            print(f"  scheduler queues: {await scheduler_queues(lc)}", flush=True)
        print(f"  pending pods:\n    {await stuck_report(kube, ns)}", flush=True)
    pods, _ = await kube.list(PODS, ns, label_selector="bench=1")
    binds: dict[str, list[float]] = {}
    spans: list[tuple[float, float]] = []  # (bound, finished) per pod
    busy = 0.0
    last_finish = 0.0
    for p in pods:
        j = p["metadata"]["labels"]["job"]
        sched = next((c for c in p["status"].get("conditions") or () if c["type"] == "PodScheduled"
                      and c["status"] == "True"), None)
        if sched is None:
            continue
        bound_at = parse_time(sched["lastTransitionTime"])
        binds.setdefault(j, []).append(bound_at)
        for cs in p["status"].get("containerStatuses") or ():
            term = (cs.get("state") or {}).get("terminated")
            if term and term.get("finishedAt"):
                fin = parse_time(term["finishedAt"])
                busy += max(0.0, fin - bound_at) * 8
                spans.append((bound_at, fin, p["spec"].get("nodeName", "")))
                last_finish = max(last_finish, fin)
    created = min(parse_time(p["metadata"]["creationTimestamp"]) for p in pods) if pods else t0
    start_at = min(created, t0)
    print(f"  {sanity(spans, args.seconds)}", flush=True)
    makespan = (last_finish - start_at) if done == len(burst) else float("nan")
    partial = sum(1 for j, b in binds.items() if len(b) > 1 and max(b) - min(b) > args.partial)
    largest = names[0]
    lb = binds.get(largest, [])
    wait = (max(lb) - start_at) if len(lb) == burst[0] else float("nan")
    starts = sorted((min(b), j) for j, b in binds.items() if b)
    rank = next((i + 1 for i, (_, j) in enumerate(starts) if j == largest), None)
    # share of the pool's nodes busy, per 10 s of the run: where utilisation is lost
    timeline = []
    if makespan == makespan:
        for i in range(int(makespan // 10) + 1):
            a, b_ = start_at + 10 * i, min(start_at + 10 * (i + 1), start_at + makespan)
            if b_ <= a:
                break
            used = sum(max(0.0, min(f, b_) - max(s0, a)) for s0, f, _ in spans)
            timeline.append(round(100 * used / ((b_ - a) * nodes)))
    jobs_created = {j["metadata"]["name"]: parse_time(j["metadata"]["creationTimestamp"]) for j in items}
    reserved = intervals(samples)
    profile = where_time_goes(spans, binds, dict(zip(names, burst)), jobs_created, start_at, makespan, nodes,
                              reserved) if makespan == makespan else {}
    if args.profile and profile:
        evs, _ = await kube.list(EVENTS)
        when: dict[str, list[int]] = {}
        for e in evs:
            t = parse_time(e.get("eventTime") or e.get("lastTimestamp") or e.get("firstTimestamp")
                           or e["metadata"]["creationTimestamp"])
            if e.get("reason") in ("BalloonsReleased", "Preempted", "GangRetried", "GangRequeued") \
                    and start_at <= t:
                when.setdefault(e["reason"], []).append(round(t - start_at))
        print(f"  balloon and retry events (s after the burst): "
              f"{ {k: sorted(v)[:30] for k, v in when.items()} } ({ {k: len(v) for k, v in when.items()} })",
              flush=True)
        print(f"  busy nodes per second, first 40 s: {profile.pop('first_40s')}", flush=True)
        print(f"  phases per job (median / max s): {profile.pop('phases')}", flush=True)
        print(f"  first jobs (s after the burst: created, last pod bound): {profile.pop('first_jobs')}", flush=True)
        if gang:
            # the gang controller's lag: kube-scheduler's PreEnqueue keeps a gang out of the queue until its
            # PodGroup exists, so a PodGroup created after the gang's last member delays the gang by that much
            groups, _ = await kube.list(PODGROUPS, ns)
            last_member: dict[str, float] = {}
            for p in pods:
                j = p["metadata"]["labels"]["job"]
                last_member[j] = max(last_member.get(j, 0.0), parse_time(p["metadata"]["creationTimestamp"]))
            lags = sorted(parse_time(g["metadata"]["creationTimestamp"]) - last_member[g["metadata"]["name"]]
                          for g in groups if g["metadata"]["name"] in last_member and g["metadata"]["name"] != largest)
            if lags:
                print(f"  PodGroup created after the gang's last member (s, whole seconds; smaller jobs): median "
                      f"{lags[len(lags) // 2]:.0f}, 90th {lags[int(len(lags) * 0.9)]:.0f}, max {lags[-1]:.0f} "
                      f"({len(lags)} groups)", flush=True)
            print(f"  {largest_timeline(pods, groups, largest, start_at)}", flush=True)
            if lc is not None and args.scheduler_v >= 3:
                made = {g["metadata"]["name"]: parse_time(g["metadata"]["creationTimestamp"]) for g in groups}
                for line in scheduler_view(lc.dir / "logs" / "kube-scheduler.log", ns, t0, last_member, made,
                                           largest):
                    print(f"  {line}", flush=True)
    else:
        for k in ("first_40s", "phases", "first_jobs"):
            profile.pop(k, None)
    out = {"mode": mode, "jobs": len(burst), "pods": total, "done": done, "stalled": len(burst) - done,
           "busy_per_10s": timeline, "idle_node_seconds": profile,
           "makespan": makespan, "gpu_use": busy / (makespan * nodes * 8) if makespan == makespan else float("nan"),
           "partial": partial, "largest_wait": wait, "largest_rank": rank}
    if reg is not None:
        out["released"] = sample(reg, "fleetkeeper_balloon_releases_total", pool=POOL, result="ok")
        out["requeued"] = sample(reg, "fleetkeeper_gang_requeue_pods_total", op="create", result="ok")
        out["retried"] = sample(reg, "fleetkeeper_gang_requeue_pods_total", op="kick", result="ok")
        passes = sum(sample(reg, "fleetkeeper_reconcile_total", controller="capacity-gangs", result=r)
                     for r in ("success", "requeue", "error"))
        reads = sample(reg, "fleetkeeper_gang_owner_reads_total")
        print(f"  gang controller: {passes:.0f} passes, {reads:.0f} live owner reads", flush=True)
    await kube.delete(NAMESPACES, ns)
    return out


def largest_timeline(pods: list[dict], groups: list[dict], largest: str, start_at: float) -> str:
    """Where the largest gang's wait goes (s after the burst, API timestamps in whole seconds): its members'
    creation, its PodGroup (created once no member carries fleetkeeper's gate), its binds."""
    mine = [p for p in pods if p["metadata"]["labels"]["job"] == largest]

    def spread(ts: list[float]) -> str:
        ts = sorted(t - start_at for t in ts)
        return f"{ts[0]:.0f}/{ts[len(ts) // 2]:.0f}/{ts[-1]:.0f}" if ts else "-"
    created = [parse_time(p["metadata"]["creationTimestamp"]) for p in mine]
    bound_ = [parse_time(c["lastTransitionTime"]) for p in mine for c in p["status"].get("conditions") or ()
              if c["type"] == "PodScheduled" and c["status"] == "True"]
    group = next((parse_time(g["metadata"]["creationTimestamp"]) for g in groups
                  if g["metadata"]["name"] == largest), None)
    made = "-" if group is None else f"{group - start_at:.0f}"
    return (f"largest job ({len(mine)} pods), s after the burst, first/median/last: created {spread(created)}; "
            f"PodGroup {made}; bound {spread(bound_)}")


KLOG = re.compile(r'^[IWE]\d{4} (\d\d):(\d\d):(\d\d\.\d+)\s+\d+ [^\]]+\] "([^"]*)"(.*)$')


def scheduler_view(log: Path, ns: str, t0: float, last_member: dict[str, float], podgroup_made: dict[str, float],
                   largest: str) -> list[str]:
    """Where a small gang's time goes before kube-scheduler places it, from its log at -v=3 or more (one
    mode's namespace) and the API's timestamps (whole seconds): the watch delay (a member created -> the
    scheduler's informer sees it), the wait in its queue (last member seen and PodGroup there -> its first
    pod group cycle), failed cycles, and the scheduling thread's time in cycles vs between them."""
    day = t0 - t0 % 86400  # klog prints the time of day (UTC)
    seen: dict[str, float] = {}  # gang -> when the scheduler saw its last member
    watch: list[float] = []
    first: dict[str, float] = {}
    failed: dict[str, int] = {}
    cycles: list[tuple[float, float]] = []
    start: tuple[str, float] | None = None
    try:
        lines = open(log, errors="replace")
    except OSError as exc:
        return [f"scheduler log: {exc}"]
    with lines:
        for raw in lines:
            if f'"{ns}/' not in raw:
                continue
            m = KLOG.match(raw)
            if not m:
                continue
            t = day + int(m.group(1)) * 3600 + int(m.group(2)) * 60 + float(m.group(3))
            if t < t0 - 3600:
                t += 86400  # the mode crossed midnight
            msg, rest = m.group(4), m.group(5)
            if msg == "Add event for unscheduled pod":
                pod = rest.split(f'pod="{ns}/', 1)[1].split('"', 1)[0]
                gang = pod.rsplit("-", 1)[0]  # a Job's pod: <job>-<suffix>
                seen[gang] = max(seen.get(gang, 0.0), t)
            elif msg == "Attempting to schedule pod group":
                g = rest.split(f'podGroup="{ns}/', 1)[1].split('"', 1)[0]
                first.setdefault(g, t)
                start = (g, t)
            elif msg in ("Successfully scheduled a pod group", "Unable to schedule a pod group",
                         "Pod group is waiting for preemption"):
                g = rest.split(f'podGroup="{ns}/', 1)[1].split('"', 1)[0]
                if msg != "Successfully scheduled a pod group":
                    failed[g] = failed.get(g, 0) + 1
                if start is not None and start[0] == g:
                    cycles.append((start[1], t))
                    start = None
    for g, t in last_member.items():
        if g in seen:
            watch.append(seen[g] - t)
    queue = sorted(first[g] - max(seen[g], podgroup_made.get(g, 0.0)) for g in first
                   if g != largest and g in seen)

    def q(xs: list[float]) -> str:
        xs = sorted(xs)
        return (f"median {xs[len(xs) // 2]:.1f}, 90th {xs[int(len(xs) * 0.9)]:.1f}, max {xs[-1]:.1f} ({len(xs)})"
                if xs else "none")
    minute = [(a, b) for a, b in cycles if a < t0 + 60]
    busy = sum(min(b, t0 + 60) - a for a, b in minute)
    return [f"scheduler's log: last member created -> seen by kube-scheduler (s; API times are whole seconds): "
            f"{q(watch)}",
            f"scheduler's log: last member seen and PodGroup there -> first pod group cycle (s, smaller gangs): "
            f"{q(queue)}",
            f"scheduler's log: failed pod group cycles per gang: {q([float(failed.get(g, 0)) for g in first])}",
            f"scheduler's log: first 60 s: {len(minute)} pod group cycles, {busy:.1f} s in them, "
            f"{60 - busy:.1f} s between them"]


async def reserved_now(kube: Kube, node_cache=None) -> set[str]:
    """Nodes that carry a reservation taint now: from the manager's node cache when there is one (a LIST of
    every node every 2 s would load kube-apiserver in the gang modes only, and skew the comparison)."""
    key = f"{N.domain}/reserved"
    if node_cache is not None:
        return {n.name for n in node_cache.items() if any(t.key == key for t in n.taints)}
    items, _ = await kube.list(NODES)
    return {n["metadata"]["name"] for n in items if any(t.get("key") == key for t in n["spec"].get("taints") or ())}


def intervals(samples: list[tuple[float, set[str]]]) -> dict[str, list[tuple[float, float]]]:
    """Per node, the intervals it was seen reserved (polled; each sample stands until the next)."""
    out: dict[str, list[tuple[float, float]]] = {}
    for (t, nodes), (t2, _) in zip(samples, samples[1:] + [(samples[-1][0] + 2.0, set())] if samples else []):
        for n in nodes:
            out.setdefault(n, []).append((t, t2))
    return out


def sanity(spans: list[tuple[float, float, str]], seconds: int) -> str:
    """How long the pods ran (bound to finished) and the most pods a node ran at once: a pod that ran
    much shorter than ``seconds``, or two pods of 8 GPUs on one node at once, make the figures wrong."""
    if not spans:
        return "pods ran: none finished"
    runs = sorted(f - s0 for s0, f, _ in spans)
    per_node: dict[str, list[tuple[float, int]]] = {}
    for s0, f, n in spans:
        per_node.setdefault(n, []).extend([(s0, 1), (f, -1)])
    most = 0
    for evs in per_node.values():
        cur = 0
        for _, d in sorted(evs, key=lambda e: (e[0], e[1])):  # an end before a start at the same second
            cur += d
            most = max(most, cur)
    short = sum(1 for r in runs if r < seconds - 2)
    return (f"pods ran (bound to finished, s): min {runs[0]:.0f}, median {runs[len(runs) // 2]:.0f}, "
            f"max {runs[-1]:.0f}; {short} of {len(runs)} shorter than {seconds - 2} s; "
            f"most pods on one node at once: {most}")


def waiting_use(r: dict) -> str:
    w = (r.get("idle_node_seconds") or {}).get("busy_while_waiting")
    return f" ({100 * w:.1f}%)" if w is not None else ""


def where_time_goes(spans: list[tuple[float, float, str]], binds: dict[str, list[float]], size: dict[str, int],
                    created: dict[str, float], start_at: float, makespan: float, nodes: int,
                    reserved: dict[str, list[tuple[float, float]]] | None = None) -> dict:
    """Idle node-seconds of the run, second by second, by cause:

    * ``reserved``: idle nodes held by a reservation for a starving gang (draining for it);
    * ``latency``: a job that had not started would have fitted the idle nodes (the scheduler, or
      something before it, had not placed it yet);
    * ``drain``: jobs were waiting, each larger than the idle nodes (packing, or nodes kept free for a
      large job);
    * ``tail``: every job had started (nothing left to place).

    ``busy_while_waiting``: the share of the pool's node-seconds busy while some job had not started
    (the seconds of the tail left out: what the scheduling, not the burst's shape, decides).
    """
    started = {j: max(b) for j, b in binds.items() if len(b) == size.get(j)}
    secs = int(makespan) + 1
    out = {"reserved": 0, "latency": 0, "drain": 0, "tail": 0}
    per_second = []
    waited_busy = waited_secs = 0
    reserved = reserved or {}
    for i in range(secs):
        t = start_at + i + 0.5
        busy_nodes = {n for s0, f, n in spans if s0 <= t < f}
        busy = len(busy_nodes)
        per_second.append(busy)
        idle = max(0, nodes - busy)
        waiting = [size[j] for j in size if created.get(j, start_at) <= t and started.get(j, 1e18) > t]
        if waiting:
            waited_busy, waited_secs = waited_busy + busy, waited_secs + 1
        held = sum(1 for n, iv in reserved.items() if n not in busy_nodes and any(a <= t < b for a, b in iv))
        out["reserved"] += held
        idle -= held
        if idle <= 0:
            continue
        if not waiting:
            out["tail"] += idle
        elif min(waiting) <= idle:
            out["latency"] += idle
        else:
            out["drain"] += idle
    out["total"] = out["reserved"] + out["latency"] + out["drain"] + out["tail"]
    out["busy_while_waiting"] = round(waited_busy / (waited_secs * nodes), 3) if waited_secs else None
    out["first_40s"] = per_second[:40]
    gaps = sorted(started[j] - created.get(j, start_at) for j in started)
    out["phases"] = {"created->all bound": (round(gaps[len(gaps) // 2], 1), round(gaps[-1], 1))} if gaps else {}
    order = sorted(created, key=lambda j: created[j])[:12]
    out["first_jobs"] = [(j, round(created[j] - start_at), round(started[j] - start_at) if j in started else None)
                         for j in order]
    return out


async def main(args) -> None:
    logging.basicConfig(level=logging.WARNING)
    for m in args.modes:
        parse_mode(m)  # a bad mode fails before the cluster starts
    burst = sizes(args.jobs, args.nodes)
    print(f"burst: {len(burst)} jobs, {sum(burst)} pods x 8 GPUs, {args.seconds}s each; sizes {burst}", flush=True)
    # every pod takes a whole node (8 GPUs) and runs equally long: without gangs a schedule is still whole
    # waves of pods, ceil(pods / nodes) of them
    print(f"ideal makespan (perfect packing, no scheduling time): "
          f"{-(-sum(burst) // args.nodes) * args.seconds}s without gangs (pods split freely, one per node); "
          f"{waves(burst, args.nodes) * args.seconds}s with every job whole", flush=True)
    with tempfile.TemporaryDirectory(prefix="fk-bench-gangs-") as d:
        tmp = Path(d)
        lc = LocalCluster(tmp / "cluster")
        lc.state.scheduler_verbosity = args.scheduler_v
        lc.state.scheduler_feature_gates = args.scheduler_gates
        kube = None
        try:
            t = time.monotonic()
            await lc.up(0, 8, wait_ready=False)
            kube = await lc.connect(retry=RetryPolicy(attempts=8))
            spec = FleetSpec(nodes=args.nodes, cpu_fraction=0.0, prefix="g")
            for i in range(args.nodes):
                await kube.create(NODES, node_manifest(spec, i))
            while True:
                items, _ = await kube.list(NODES)
                if sum(1 for n in items if node_ready(n)) >= args.nodes:
                    break
                await asyncio.sleep(1.0)
            print(f"cluster: {args.nodes} nodes Ready in {time.monotonic() - t:.0f}s", flush=True)
            await kube.create(NAMESPACES, {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": SYSTEM}})
            results = []
            tuned: dict = {}
            for spec_ in args.modes:
                mode, tune = parse_mode(spec_)
                if tune != tuned:
                    rest = {k: v for k, v in tune.items() if k != "feature_gates"}
                    gates = ",".join(g for g in (args.scheduler_gates, tune.get("feature_gates", "")) if g)
                    await asyncio.to_thread(lc.tune_scheduler, **rest, feature_gates=gates,
                                            verbosity=args.scheduler_v)
                    tuned = tune
                    print(f"kube-scheduler restarted with {tune or 'its defaults'}", flush=True)
                cfg = CapacityConfig.model_validate({
                    "balloons": {"enabled": mode == "balloons+gangs",
                                 "pools": [{"name": POOL, "resource": "gpu", "max_nodes": args.nodes}],
                                 **({"yield_to_waiting": False} if args.no_yield or args.previous else {}),
                                 **({"priority": -5, "priority_class": "fleetkeeper-balloon"} if args.previous else {})},
                    "gangs": {"enabled": mode != "no-gangs", "webhook_port": 0,
                              "reserve_after_seconds": None if args.previous else args.reserve_after,
                              "requeue_stuck_after_seconds": None if args.previous or args.no_requeue else
                              args.requeue_after,
                              **({"gate_held_members": False} if "/nogate" in spec_ else {}),
                              **({"expect_members_seconds": None} if "/noexpect" in spec_ else {}),
                              **({"hold_until_room_members": args.hold_members or None}
                                 if args.hold_members is not None else {})}})
                task, mode_mgr, reg = await start(kube, cfg, tmp)
                if mode == "balloons+gangs":
                    t = time.monotonic()
                    while await balloons_running(kube) < args.nodes and time.monotonic() - t < 300:
                        await asyncio.sleep(1.0)
                    print(f"  balloons on all {args.nodes} nodes after {time.monotonic() - t:.0f}s", flush=True)
                else:
                    t = time.monotonic()
                    while await kube.get_or_none(DEPLOYMENTS, f"balloon-{POOL}", SYSTEM) is not None \
                            and time.monotonic() - t < 60:
                        await asyncio.sleep(1.0)
                    # the previous mode's balloons go with their Deployment (garbage collector): a mode without
                    # balloons starts once they are gone, or its gangs first wait for their preemption
                    while (left := await balloons_running(kube)) and time.monotonic() - t < 300:
                        await asyncio.sleep(2.0)
                    print(f"  balloon Deployment removed: {await kube.get_or_none(DEPLOYMENTS, f'balloon-{POOL}', SYSTEM) is None}"
                          f"; balloons still running {left} after {time.monotonic() - t:.0f}s", flush=True)
                before = await common.scheduler_metrics(lc)
                spy = None
                if args.pyspy:  # this process (controllers, webhook, the benchmark's own watch) during the mode
                    Path(args.pyspy).mkdir(parents=True, exist_ok=True)
                    spy = await asyncio.create_subprocess_exec(
                        str(Path(sys.executable).parent / "py-spy"), "record", "--pid", str(os.getpid()),
                        "--nonblocking", "-r", "100", "-f", "raw", "-o",
                        str(Path(args.pyspy) / f"{spec_.replace('/', '_')}.txt"),
                        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL)
                api0 = await common.scrape(lc)
                cpu0 = common.cpu_seconds(lc)
                r = await run_mode(kube, mode, burst, args, args.nodes, reg, lc,
                                   mode_mgr.node_informer() if mode != "no-gangs" else None)
                cpu1 = common.cpu_seconds(lc)
                print(f"  kube-apiserver during the mode: {common.api_requests(api0, await common.scrape(lc))}",
                      flush=True)
                if spy is not None:
                    spy.send_signal(signal.SIGINT)
                    await spy.wait()
                    from pyspy_summary import load, summarise
                    print(summarise(load(str(Path(args.pyspy) / f"{spec_.replace('/', '_')}.txt")), top=30),
                          flush=True)
                print(f"  kube-scheduler during the mode: "
                      f"{common.scheduler_delta(before, await common.scheduler_metrics(lc))}", flush=True)
                # per process, over the mode and its analysis ("fleetkeeper": this process, controllers and bench)
                r["cpu_s"] = {k: round(v - cpu0.get(k, 0.0), 1) for k, v in cpu1.items()}
                print(f"  CPU seconds during the mode: {r['cpu_s']}", flush=True)
                r["mode"] = spec_
                results.append(r)
                print(f"  {r}", flush=True)
                await stop(task)
            print("\n| mode | makespan | GPU use (while jobs wait) | partial placements | largest job's wait (start rank) | stalled "
                  "jobs | balloons released | requeue pods (stuck / room freed) |")
            print("|---|---|---|---|---|---|---|---|")
            for r in results:
                print(f"| {r['mode']} | {r['makespan']:.0f} s | {100 * r['gpu_use']:.1f}%{waiting_use(r)} | {r['partial']} of "
                      f"{r['jobs']} | {r['largest_wait']:.0f} s ({r['largest_rank']} of {r['jobs']}) | "
                      f"{r['stalled']} | {r.get('released', 0):.0f} | {r.get('requeued', 0):.0f} / {r.get('retried', 0):.0f} |")
            base = next((r for r in results if r["mode"].startswith("no-gangs")), None)
            if base:
                for r in results:
                    if r is not base:
                        print(f"{r['mode']}: makespan {r['makespan'] / base['makespan']:.2f}x no-gangs")
        finally:
            if kube is not None:
                await kube.close()
            if args.keep_log and (tmp / "cluster" / "logs" / "kube-scheduler.log").exists():
                shutil.copy(tmp / "cluster" / "logs" / "kube-scheduler.log", args.keep_log)
                print(f"kube-scheduler log (-v={args.scheduler_v}): {args.keep_log}", flush=True)
            lc.down(purge=True)


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--nodes", type=int, default=32)
    ap.add_argument("--jobs", type=int, default=53)
    ap.add_argument("--seconds", type=int, default=20, help="how long each pod runs")
    ap.add_argument("--timeout", type=float, default=900, help="per mode: jobs not done by then count as stalled")
    ap.add_argument("--stall", type=float, default=300, help="no job finishing for this long ends the mode (a stall)")
    ap.add_argument("--partial", type=float, default=5.0, help="bind spread (s) above which a job was placed partially")
    ap.add_argument("--modes", nargs="+", default=["balloons+gangs", "gangs", "no-gangs"])
    ap.add_argument("--no-yield", action="store_true", help="balloons do not yield (the scheduler preempts them)")
    ap.add_argument("--previous", action="store_true",
                    help="the previous defaults: balloons at -5 that do not yield, no reservations")
    ap.add_argument("--hold-members", type=int, default=None,
                    help="gangs.hold_until_room_members (0: never hold; default: the product's default)")
    ap.add_argument("--reserve-after", type=float, default=300.0, help="gangs.reserve_after_seconds")
    ap.add_argument("--requeue-after", type=float, default=20.0, help="gangs.requeue_stuck_after_seconds")
    ap.add_argument("--no-requeue", action="store_true", help="no requeue pods for stuck gangs")
    ap.add_argument("--profile", action="store_true",
                    help="print where the time goes: busy nodes per second, per-job latency, the first jobs")
    ap.add_argument("--scheduler-v", type=int, default=1, help="kube-scheduler log verbosity (5: why each pod and "
                    "pod group cycle failed)")
    ap.add_argument("--scheduler-gates", default="", help="extra kube-scheduler feature gates for every mode "
                    "(e.g. SchedulerAsyncAPICalls=true)")
    ap.add_argument("--pyspy", help="a py-spy raw profile of this process per mode into this directory, "
                    "summarised (py-spy beside the interpreter)")
    ap.add_argument("--keep-log", help="copy kube-scheduler's log here at the end")
    asyncio.run(main(ap.parse_args()))
