"""The capacity scenario of ``make demo``: balloons hold the GPU pool warm; two
experiments each ask for a whole rack; one runs whole in the balloons' place
(fleetkeeper releases them for it as a unit), the other waits whole; when the first ends the second runs whole;
when both end the balloons come back."""

from __future__ import annotations

import asyncio
import time

from fleetkeeper.core import errors
from fleetkeeper.core.kube import NAMESPACES, NODES, PODS, STATEFULSETS, build_request
from fleetkeeper.core.outcome import Outcome
from fleetkeeper.core.views import default_projector

from fleetkeeper.capacity import balloons as bl
from fleetkeeper.capacity.explain import explain_pod

NS = "capacity-demo"


async def _wait(fn, timeout: float):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        got = await fn()
        if got:
            return got
        await asyncio.sleep(0.5)
    return None


def _experiment(name: str, names, rack: str, replicas: int) -> dict:
    return {"apiVersion": "apps/v1", "kind": "StatefulSet", "metadata": {"name": name, "namespace": NS},
            "spec": {"replicas": replicas, "podManagementPolicy": "Parallel", "serviceName": name,
                     "selector": {"matchLabels": {"experiment": name}},
                     "template": {"metadata": {"labels": {"experiment": name, names.gang: name}},
                                  "spec": {"nodeSelector": {names.rack: rack}, "terminationGracePeriodSeconds": 0,
                                           "containers": [{"name": "train", "image": "trainer",
                                                           "resources": {"limits": {"nvidia.com/gpu": "8"}}}]}}}}


async def demo(ctx) -> Outcome:
    kube, names = ctx.kube, ctx.names
    outcome = Outcome()
    proj = default_projector(names.domain)
    views = [proj.node(n) for n in (await kube.list(NODES, label_selector="type=kwok"))[0]]
    racks: dict[str, list] = {}
    for v in views:
        if v.gpus and not v.taints and v.labels.get(names.pool) == "gpu":
            racks.setdefault(v.labels.get(names.rack, ""), []).append(v)
    if not racks:
        ctx.report("no untainted GPU nodes; capacity scenario skipped")
        return Outcome.skip("no untainted GPU nodes")
    rack, rack_nodes = max(racks.items(), key=lambda kv: len(kv[1]))
    r = min(len(rack_nodes), 16)
    gpu_nodes = sum(1 for v in views if v.gpus)
    label = bl.balloon_label(names)

    async def balloons_running() -> int:
        items, _ = await kube.list(PODS, label_selector=f"{label}=gpu")
        return sum(1 for p in items if (p.get("status") or {}).get("phase") == "Running"
                   and not p["metadata"].get("deletionTimestamp"))

    async def rack_covered():
        items, _ = await kube.list(PODS, label_selector=f"{label}=gpu")
        on = {p["spec"].get("nodeName") for p in items if (p.get("status") or {}).get("phase") == "Running"}
        return sum(1 for v in rack_nodes if v.name in on) >= r

    # the pool fills one scheduling cycle per balloon: the wait scales with the balloons the pool asks for
    # (one per GPU node; kube-scheduler places ~15-20 per second on this 2-core machine at 7,500 nodes), and
    # the rack is covered only once the scheduler has reached its nodes
    fill_window = 45 + gpu_nodes / 10
    t0 = time.monotonic()
    outcome.expect(await _wait(rack_covered, fill_window), f"balloons hold every node of {rack} warm")
    n = await balloons_running()
    ctx.report(f"balloons: {n} low-priority pods hold {n} of {gpu_nodes} GPU nodes warm ({n * 8} GPUs idle "
               f"capacity, {time.monotonic() - t0:.0f}s)")
    try:
        await kube.create(NAMESPACES, {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": NS}})
    except errors.Conflict:
        pass
    try:
        t0 = time.monotonic()
        for name in ("exp-a", "exp-b"):
            await kube.create(STATEFULSETS, _experiment(name, names, rack, r), NS)
        ctx.report(f"two experiments (gangs) each ask for all {r} nodes of {rack}, all full of balloons")

        async def placed():
            counts = {}
            for name in ("exp-a", "exp-b"):
                items, _ = await kube.list(PODS, NS, label_selector=f"experiment={name}")
                counts[name] = (sum(1 for p in items if p["spec"].get("nodeName")), items)
            whole = [k for k, (c, _) in counts.items() if c == r]
            return (whole[0], counts) if whole else None
        got = await _wait(placed, 45)
        if not outcome.expect(got, "one experiment placed whole in the balloons' place"):
            ctx.report("[red]neither experiment was placed whole in 45s[/red]")
            return outcome
        winner, counts = got
        loser = "exp-b" if winner == "exp-a" else "exp-a"
        ctx.report(f"{winner} placed whole in {time.monotonic() - t0:.1f}s in place of {r} balloons; "
                   f"{loser}: {counts[loser][0]} of {r} placed (waits whole, no deadlock)")
        pods = counts[loser][1]
        if pods:
            lines = await explain_pod(kube, names, NS, pods[0]["metadata"]["name"])
            pick = [line for line in lines if line.startswith("scheduler on PodGroup")] or \
                [line for line in lines if line.startswith("gang state")]
            if pick:
                ctx.report(f"explain pod {NS}/{pods[0]['metadata']['name']}: {pick[0][:160]}")
        t1 = time.monotonic()
        await kube.request(build_request("delete", STATEFULSETS, namespace=NS, name=winner,
                                         body={"propagationPolicy": "Background"}))

        async def loser_whole():
            items, _ = await kube.list(PODS, NS, label_selector=f"experiment={loser}")
            return sum(1 for p in items if p["spec"].get("nodeName")) == r
        if outcome.expect(await _wait(loser_whole, 45), "the other experiment placed whole when the first ends"):
            ctx.report(f"{winner} ended: {loser} placed whole {time.monotonic() - t1:.1f}s later")
        else:
            ctx.report(f"[red]{loser} was not placed whole within 45s of {winner} ending[/red]")
        await kube.request(build_request("delete", STATEFULSETS, namespace=NS, name=loser,
                                         body={"propagationPolicy": "Background"}))
        t2 = time.monotonic()
        # re-created balloons queue behind any of the pool's balloons still unplaced: the same scaled window
        if outcome.expect(await _wait(rack_covered, fill_window), "balloons back on the rack after both end"):
            ctx.report(f"both ended: balloons back on all {r} nodes of {rack} in {time.monotonic() - t2:.1f}s; "
                       f"{await balloons_running()} balloons running")
        else:
            ctx.report(f"balloons did not cover the rack again within {fill_window:.0f}s")
    finally:
        try:
            await kube.delete(NAMESPACES, NS)
        except errors.NotFound:
            pass
    return outcome
