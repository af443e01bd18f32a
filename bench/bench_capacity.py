"""Benchmark of the capacity component on a real local control plane.

    .venv/bin/python bench/bench_capacity.py [--nodes N] [--gang G] [--pair P] [--job J] [--sections 1 3]

Starts its own LocalCluster (KWOK nodes, the pinned kube-scheduler with
GangScheduling) in a temporary directory and runs fleetkeeper's capacity
controllers in this process. Every figure is printed next to a baseline
measured in the same run:

1. a G-pod gang (G defaults to min(1000, GPU nodes)): time from the first pod
   create to all G bound, and scheduler throughput in pods/s, with the gang
   (webhook + PodGroup + GangScheduling) against the same G pods without it;
2. the pair: two experiments each asking for all P nodes of a subset: with
   gangs, who is placed and how long it takes; without gangs, the partial
   placement that deadlocks both;
3. balloons: time from a J-pod GPU job's creation to all its pods bound on a
   pool full of balloons, against the same job on an empty pool; with
   ``--job-gang`` the job is one gang under fleetkeeper's default
   configuration (held until its room is free, balloons released for it in
   one step), and the empty pool's run has the gang controller too.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import logging
import os
import secrets
import shutil
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
from fleetkeeper.core.kube import EVENTS, NAMESPACES, NODES, PODGROUPS, PODS, WORKLOADS, Kube, RetryPolicy  # noqa: E402
from fleetkeeper.core.views import parse_time  # noqa: E402
from fleetkeeper.core.manager import Manager  # noqa: E402
from fleetkeeper.core.settings import RuntimeSettings  # noqa: E402
from fleetkeeper.localcluster.cluster import LocalCluster, wait_nodes_ready  # noqa: E402

N = Names()


def pod(name: str, *, gang: str | None = None, min_: int | None = None, selector: dict | None = None) -> dict:
    labels = {"bench": "1"}
    ann = {}
    if gang:
        labels[N.gang] = gang
        labels["gang-of"] = gang
    if min_:
        ann[N.gang_min] = str(min_)
    return {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name, "labels": labels, "annotations": ann},
            "spec": {"nodeSelector": {N.pool: "gpu", **(selector or {})}, "terminationGracePeriodSeconds": 0,
                     "containers": [{"name": "c", "image": "trainer",
                                     "resources": {"limits": {"nvidia.com/gpu": "8"}}}]}}


async def create_all(kube: Kube, ns: str, pods: list[dict], concurrency: int = 32) -> None:
    sem = asyncio.Semaphore(concurrency)

    async def one(p):
        async with sem:
            await kube.create(PODS, p, ns)
    await asyncio.gather(*(one(p) for p in pods))


async def count_bound(kube: Kube, ns: str, selector: str) -> tuple[int, int]:
    items, _ = await kube.list(PODS, ns, label_selector=selector)
    items = [p for p in items if not p["metadata"].get("deletionTimestamp")]
    return sum(1 for p in items if p["spec"].get("nodeName")), len(items)


TIMELINE: list[tuple[float, int]] = []  # (seconds, bound) of the last wait_bound


async def wait_bound(kube: Kube, ns: str, selector: str, want: int, timeout: float) -> float | None:
    t0 = time.monotonic()
    TIMELINE.clear()
    while time.monotonic() - t0 < timeout:
        b, _ = await count_bound(kube, ns, selector)
        TIMELINE.append((time.monotonic() - t0, b))
        if b >= want:
            return time.monotonic() - t0
        await asyncio.sleep(0.25)
    return None


def quarters(want: int) -> str:
    """When a quarter, half, three quarters and all of ``want`` were bound (the last wait_bound)."""
    out = []
    for q in (0.25, 0.5, 0.75, 1.0):
        t = next((t for t, b in TIMELINE if b >= q * want), None)
        out.append(f"{int(q * 100)}% {t:.1f}s" if t is not None else f"{int(q * 100)}% -")
    return ", ".join(out)


async def scheduler_queues(lc: LocalCluster) -> str:
    """kube-scheduler's pending pods per queue: active/backoff/unschedulable/gated."""
    got = await common.scheduler_queues(lc)
    if isinstance(got, str):
        return got
    return "/".join(str(got.get(q, "?")) for q in ("active", "backoff", "unschedulable", "gated"))


def quarters_from(timeline: list[tuple[float, int]], want: int) -> str:
    """First bind, a quarter, half, three quarters and all of ``want`` bound."""
    out = []
    for label, q in (("first", 1 / max(want, 1)), ("25%", 0.25), ("50%", 0.5), ("75%", 0.75), ("all", 1.0)):
        t = next((t for t, b in timeline if b >= max(1, q * want)), None)
        out.append(f"{label} {t:.1f}s" if t is not None else f"{label} -")
    return ", ".join(out)


GROUPS_SEEN: dict[str, float] = {}
QUEUES: list[str] = []


async def watch_groups(kube: Kube, ns: str, gang: str, t0: float) -> None:
    """When the gang's Workload and PodGroup first exist (polled every 0.25 s, from the first create)."""
    GROUPS_SEEN.clear()
    while len(GROUPS_SEEN) < 2:
        for res, label in ((WORKLOADS, "Workload"), (PODGROUPS, "PodGroup")):
            if label not in GROUPS_SEEN and await kube.get_or_none(res, gang, ns) is not None:
                GROUPS_SEEN[label] = round(time.monotonic() - t0, 2)
        await asyncio.sleep(0.25)


async def watch_scheduler(lc: LocalCluster, t0: float) -> None:
    """kube-scheduler's queues every 2 s (QUEUES)."""
    QUEUES.clear()
    while True:
        QUEUES.append(f"{time.monotonic() - t0:.0f}:{await scheduler_queues(lc)}")
        await asyncio.sleep(2.0)


async def api_timeline(kube: Kube, ns: str, wall0: float) -> str:
    """From the API server's own timestamps (whole seconds, relative to the bench's first create): pods
    created first/last, PodScheduled=True first/last, the group objects' creation."""
    pods, _ = await kube.list(PODS, ns, label_selector="bench=1")
    made = sorted(parse_time(p["metadata"]["creationTimestamp"]) - wall0 for p in pods)
    bound = sorted(parse_time(c["lastTransitionTime"]) - wall0 for p in pods
                   for c in p["status"].get("conditions") or ()
                   if c["type"] == "PodScheduled" and c["status"] == "True")
    out = [f"pods created {made[0]:.0f}..{made[-1]:.0f}s" if made else "no pods",
           f"bound {bound[0]:.0f}..{bound[-1]:.0f}s ({len(bound)})" if bound else "none bound"]
    for res, label in ((WORKLOADS, "Workload"), (PODGROUPS, "PodGroup")):
        items, _ = await kube.list(res, ns)
        for o in items:
            out.append(f"{label} created {parse_time(o['metadata']['creationTimestamp']) - wall0:.0f}s")
    return "; ".join(out)


async def fresh_ns(kube: Kube, prefix: str) -> str:
    ns = f"{prefix}-{secrets.token_hex(3)}"
    await kube.create(NAMESPACES, {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": ns}})
    return ns


async def drop_ns(kube: Kube, ns: str, timeout: float = 180) -> None:
    try:
        await kube.delete(NAMESPACES, ns)
    except errors.NotFound:
        return
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout and await kube.get_or_none(NAMESPACES, ns) is not None:
        await asyncio.sleep(0.5)


async def start(kube: Kube, cfg: CapacityConfig, tmp: Path, webhook: bool) -> tuple[asyncio.Task, Manager]:
    mgr = Manager(kube, RuntimeSettings(namespace="fleetkeeper-system", server={"port": 0},
                                        leader_election={"enabled": False}), registry=CollectorRegistry())
    await setup(mgr, CapacityOptions(config=cfg, webhook=webhook, webhook_cert_dir=tmp / "wh",
                                     webhook_config_name=f"bench-capacity-{secrets.token_hex(2)}",
                                     unregister_on_exit=True))
    task = asyncio.create_task(mgr.run())
    await mgr.wait_synced(300)
    await asyncio.sleep(2.0)
    return task, mgr


async def stop(task: asyncio.Task) -> None:
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)


async def main(args) -> None:
    logging.basicConfig(level=logging.WARNING)
    with tempfile.TemporaryDirectory(prefix="fk-bench-capacity-") as d:
        tmp = Path(d)
        lc = LocalCluster(tmp / "cluster")
        t0 = time.monotonic()
        kube = None
        try:
            await lc.up(args.nodes, 8, wait_ready=False)
            kube = await lc.connect(retry=RetryPolicy(attempts=8))
            await wait_nodes_ready(kube, args.nodes, timeout=max(600.0, args.nodes / 5))
            print(f"cluster: {args.nodes} nodes Ready in {time.monotonic() - t0:.0f}s")
            await kube.create(NAMESPACES, {"apiVersion": "v1", "kind": "Namespace",
                                           "metadata": {"name": "fleetkeeper-system"}})
            nodes, _ = await kube.list(NODES, label_selector=f"{N.pool}=gpu")
            gpu_nodes = [n["metadata"]["name"] for n in nodes]
            print(f"GPU nodes: {len(gpu_nodes)}; load average {os.getloadavg()[0]:.1f}")
            g = min(args.gang or 1000, len(gpu_nodes))
            gangs_cfg = CapacityConfig.model_validate({"balloons": {"enabled": False},
                                                       "gangs": {"webhook_port": 0, "cleanup_grace_seconds": 0}})
            task, _ = await start(kube, gangs_cfg, tmp, webhook=True)

            # 1. one big gang vs the same pods without it
            if 1 in args.sections:
                print(f"\n[1] {g}-pod job, each pod one whole node (8 GPUs)")
            res = {}
            for mode in (("plain", "gang") if 1 in args.sections else ()):
                ns = await fresh_ns(kube, f"b1-{mode}")
                pods = [pod(f"w-{i}", gang="big" if mode == "gang" else None, min_=g if mode == "gang" else None)
                        for i in range(g)]
                before = await common.scheduler_metrics(lc)
                t = time.monotonic()
                wall0 = time.time()
                probe = asyncio.create_task(watch_groups(kube, ns, "big", t)) if mode == "gang" else None
                queues = asyncio.create_task(watch_scheduler(lc, t))
                # polled from the first create on: plain pods are bound while the rest are still created
                waiter = asyncio.create_task(wait_bound(kube, ns, "bench=1", g, args.bound_timeout))
                await create_all(kube, ns, pods)
                created = time.monotonic() - t
                total = await waiter
                res[mode] = total
                print(f"  {mode:5}: created in {created:.1f}s; all {g} bound {total:.1f}s after the first create "
                      f"({g / total:.0f} pods/s)" if total else f"  {mode}: not all bound within "
                      f"{args.bound_timeout:.0f}s")
                print(f"         bound (bench's 0.25 s polls, from the first create): "
                      f"{quarters_from(TIMELINE, g)}")
                for task_ in (probe, queues):
                    if task_ is not None:
                        task_.cancel()
                if probe is not None:
                    seen = await asyncio.gather(probe, return_exceptions=True)
                    print(f"         group objects first seen by the bench: {GROUPS_SEEN}")
                print(f"         kube-scheduler queues (s: active/backoff/unschedulable/gated): "
                      f"{' '.join(QUEUES)}")
                await asyncio.gather(queues, return_exceptions=True)
                print(f"         API server timestamps: {await api_timeline(kube, ns, wall0)}")
                after = await common.scheduler_metrics(lc)
                print(f"         kube-scheduler during the run: {common.scheduler_delta(before, after)}")
                print(f"         load average {os.getloadavg()[0]:.1f}")
                await drop_ns(kube, ns)
            if res.get("plain") and res.get("gang"):
                print(f"  gang/plain time ratio: {res['gang'] / res['plain']:.2f} (load average "
                      f"{os.getloadavg()[0]:.1f})")

            # 2. the pair: two experiments each asking for all P nodes
            p = min(args.pair, len(gpu_nodes))
            subset = gpu_nodes[:p]
            for n in subset:
                await kube.patch(NODES, n, {"metadata": {"labels": {"bench-pair": "yes"}}})
            if 2 in args.sections:
                print(f"\n[2] two experiments, each asking for all {p} nodes of a subset")
            for mode in (("gang", "plain") if 2 in args.sections else ()):
                ns = await fresh_ns(kube, f"b2-{mode}")
                pods = []
                for i in range(p):  # interleaved, as two controllers create them
                    for e in ("a", "b"):
                        pods.append(pod(f"{e}-{i}", gang=f"exp-{e}" if mode == "gang" else None,
                                        min_=p if mode == "gang" else None, selector={"bench-pair": "yes"}))
                        if mode == "plain":
                            pods[-1]["metadata"]["labels"]["gang-of"] = f"exp-{e}"
                t = time.monotonic()
                await create_all(kube, ns, pods)
                took = await wait_bound(kube, ns, "bench=1", p, 300)
                await asyncio.sleep(3.0)  # let anything still moving settle
                a, _ = await count_bound(kube, ns, "gang-of=exp-a")
                b, _ = await count_bound(kube, ns, "gang-of=exp-b")
                whole = "one whole, the other waiting whole" if sorted([a, b]) == [0, p] else \
                    "PARTIAL: both stuck (deadlock)" if a and b else "other"
                print(f"  {mode:5}: {p} nodes filled in {took:.1f}s; exp-a {a}/{p}, exp-b {b}/{p} placed: {whole}"
                      if took is not None else f"  {mode}: nodes not filled")
                await drop_ns(kube, ns)
            await stop(task)

            # 3. balloons: a job on an empty pool vs on a pool full of balloons
            if 3 not in args.sections:
                return
            j = min(args.job, len(gpu_nodes))
            if args.scheduler_gates or args.scheduler_v:
                await asyncio.to_thread(lc.tune_scheduler, feature_gates=args.scheduler_gates,
                                        verbosity=args.scheduler_v or 1)
                print(f"kube-scheduler restarted with --feature-gates=...,{args.scheduler_gates} "
                      f"--v={args.scheduler_v or 1}")
            print(f"\n[3] a {j}-pod GPU job (8 GPUs a pod)" + (", one gang (fleetkeeper's default configuration)"
                                                               if args.job_gang else ""))

            def job_pods() -> list[dict]:
                return [pod(f"j-{i}", gang="job" if args.job_gang else None, min_=j if args.job_gang else None)
                        for i in range(j)]
            ns = await fresh_ns(kube, "b3-empty")
            # a gang needs fleetkeeper's gang controller on the empty pool too (its PodGroup)
            gtask = (await start(kube, gangs_cfg, tmp, webhook=True))[0] if args.job_gang else None
            t = time.monotonic()
            m0 = await common.scheduler_metrics(lc)
            await create_all(kube, ns, job_pods())
            base = await wait_bound(kube, ns, "bench=1", j, 300)
            base = None if base is None else time.monotonic() - t
            if gtask is not None:
                await stop(gtask)
            print(f"  empty pool, kube-scheduler: {common.scheduler_work(m0, await common.scheduler_metrics(lc))}")
            print(f"  empty pool, bound: {quarters(j)}")
            print(f"  empty pool        : all {j} bound {base:.1f}s after creation" if base else
                  "  empty pool: not all bound within 300s")
            await drop_ns(kube, ns)
            bcfg = CapacityConfig.model_validate({"balloons": {"pools": [{"name": "gpu", "max_nodes": len(gpu_nodes)}]},
                                                  "gangs": {"enabled": args.job_gang, "webhook_port": 0}})
            task, mgr = await start(kube, bcfg, tmp, webhook=args.job_gang)
            t = time.monotonic()
            full = await wait_bound(kube, "fleetkeeper-system", f"{N.domain}/balloon=gpu", len(gpu_nodes), 900)
            print(f"  balloons          : {len(gpu_nodes)} placed in {time.monotonic() - t:.1f}s"
                  if full is not None else "  balloons: pool not full within 900s")
            ns = await fresh_ns(kube, "b3-full")
            t = time.monotonic()
            queues: list[str] = []

            async def watch_queues():
                while True:
                    queues.append(f"{time.monotonic() - t:.0f}s {await scheduler_queues(lc)}")
                    await asyncio.sleep(2.0)
            watcher = asyncio.create_task(watch_queues())
            marked: list[float] = []  # balloons marked released, deleting, gone (seconds after t)
            deleting: list[float] = []
            gone: list[float] = []

            async def watch_balloons(rv: str):
                seen: set[str] = set()
                async for kind, obj in kube.watch(PODS, rv, "fleetkeeper-system",
                                                  label_selector=f"{N.domain}/balloon=gpu"):
                    name, now = obj["metadata"]["name"], time.monotonic() - t
                    if (f"{N.domain}/balloon-released-for" in (obj["metadata"].get("annotations") or {})
                            and name + "/m" not in seen):
                        seen.add(name + "/m")
                        marked.append(now)
                    if obj["metadata"].get("deletionTimestamp") and name + "/d" not in seen:
                        seen.add(name + "/d")
                        deleting.append(now)
                    if kind == "DELETED":
                        gone.append(now)
            _, brv = await kube.list(PODS, "fleetkeeper-system", label_selector=f"{N.domain}/balloon=gpu")
            balloons_watch = asyncio.create_task(watch_balloons(brv))
            m0 = await common.scheduler_metrics(lc)
            await create_all(kube, ns, job_pods())
            took = await wait_bound(kube, ns, "bench=1", j, 300)
            watcher.cancel()
            print(f"  pool of balloons, kube-scheduler: {common.scheduler_work(m0, await common.scheduler_metrics(lc))}")
            balloons_watch.cancel()

            def spread(ts: list[float]) -> str:
                ts = sorted(ts)
                return (f"{len(ts)}, {ts[0]:.1f}s / {ts[len(ts) // 2]:.1f}s / {ts[-1]:.1f}s (first / median / last)"
                        if ts else "0")
            print(f"  balloons marked released: {spread(marked)}\n  balloons deleting: {spread(deleting)}\n"
                  f"  balloons gone: {spread(gone)}")
            print("  kube-scheduler's queues meanwhile (active/backoff/unschedulable/gated):\n    "
                  + "\n    ".join(queues))
            evs, _ = await kube.list(EVENTS, "fleetkeeper-system")
            wall0 = time.time() - (time.monotonic() - t)
            for reason in ("BalloonsReleased", "Preempted"):
                ts = sorted(parse_time(e.get("eventTime") or e["metadata"]["creationTimestamp"]) - wall0
                            for e in evs if e.get("reason") == reason)
                if ts:
                    print(f"  {reason}: {len(ts)} Events, {ts[0]:.1f}s to {ts[-1]:.1f}s after the first create")
                else:
                    print(f"  {reason}: none")
            took = None if took is None else time.monotonic() - t
            print(f"  pool of balloons, bound: {quarters(j)}")
            print(f"  pool of balloons  : all {j} bound {took:.1f}s after creation (in place of {j} balloons); "
                  f"ratio to empty pool {took / base:.2f} (load average {os.getloadavg()[0]:.1f})" if took and base else "  pool of balloons: not all bound")
            if args.keep_log:
                shutil.copy(lc.dir / "logs" / "kube-scheduler.log", args.keep_log)
                print(f"  kube-scheduler's log copied to {args.keep_log}; the first create at "
                      f"{datetime.datetime.fromtimestamp(wall0, datetime.timezone.utc):%H:%M:%S.%f}")
            await drop_ns(kube, ns)
            t = time.monotonic()
            back = await wait_bound(kube, "fleetkeeper-system", f"{N.domain}/balloon=gpu", len(gpu_nodes), 300)
            print(f"  balloons back on every node {time.monotonic() - t:.1f}s after the job's namespace was gone"
                  if back is not None else "  balloons not back within 300s")
            await stop(task)
        finally:
            if kube is not None:
                await kube.close()
            lc.down(purge=True)


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--nodes", type=int, default=1000, help="simulated nodes (the article: 7500)")
    ap.add_argument("--gang", type=int, default=1000, help="pods in the big gang (capped at the GPU nodes)")
    ap.add_argument("--pair", type=int, default=50, help="nodes both experiments ask for")
    ap.add_argument("--job", type=int, default=100, help="pods of the job arriving on a pool of balloons")
    ap.add_argument("--job-gang", action="store_true",
                    help="section 3's job is one gang (gangs on, fleetkeeper's defaults: held until its room is "
                         "free, balloons released for it in one step); the empty pool's run has the gang controller")
    ap.add_argument("--bound-timeout", type=float, default=600.0,
                    help="section 1: how long to wait for every pod of a mode to be bound")
    ap.add_argument("--scheduler-gates", default="",
                    help="extra kube-scheduler feature gates for section 3 (e.g. SchedulerAsyncPreemption=false)")
    ap.add_argument("--scheduler-v", type=int, default=0,
                    help="kube-scheduler log verbosity for section 3; the log is copied to --keep-log")
    ap.add_argument("--keep-log", default="", help="copy kube-scheduler's log here at the end of section 3")
    ap.add_argument("--sections", type=int, nargs="+", default=[1, 2, 3], choices=[1, 2, 3],
                    help="which of the three measurements to run")
    asyncio.run(main(ap.parse_args()))
