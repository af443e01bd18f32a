"""Minimal reproduction of a kube-scheduler v1.36 gang stall (no fleetkeeper involved).

    .venv/bin/python bench/repro_gang_stall.py [--wait 90]

One local control plane (the pinned kube-scheduler, GenericWorkload +
GangScheduling on, every other gate at its default). Two scenarios, each in
its own namespace on its own KWOK nodes (8 GPUs each):

* ``placeholders``: 2 nodes, each held by one placeholder pod (priority
  -1000, ``preemptionPolicy: Never``); a gang of 3 pods x 8 GPUs
  (``PodGroup`` ``minCount: 3``) arrives. Two members find a victim and
  preemption is actuated for them; the third does not fit, so the group
  fails. Then a third node is added: the gang fits now.
* ``empty``: the same, without placeholders (the control).

Expected: the gang is placed on the 3 nodes in both scenarios. Seen: only in
``empty``; in ``placeholders`` the members stay Pending for good (the
scheduler's ``scheduler_pending_pods{queue="gated"}`` counts them), until
``--kick`` creates one more pod of the group (no gate, a node selector that
matches nothing), whose own scheduling cycle pops the whole group again.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from fleetkeeper.core.kube import NAMESPACES, NODES, PODS, PRIORITYCLASSES, RetryPolicy  # noqa: E402
from fleetkeeper.core.resources import PODGROUPS, WORKLOADS  # noqa: E402
from fleetkeeper.localcluster.cluster import LocalCluster, node_ready  # noqa: E402
from fleetkeeper.localcluster.fleet import FleetSpec, node_manifest  # noqa: E402
from fleetkeeper.localcluster.slowdelete import SlowDeletes  # noqa: E402

POOL_LABEL = "repro/pool"
PLACEHOLDER = "repro/placeholder"


def pod(name: str, pool: str, *, group: str | None = None, priority_class: str | None = None,
        selector: dict | None = None) -> dict:
    spec: dict = {"nodeSelector": selector or {POOL_LABEL: pool}, "terminationGracePeriodSeconds": 0,
                  "containers": [{"name": "c", "image": "x",
                                  "resources": {"limits": {"nvidia.com/gpu": "8"}}}]}
    if group:
        spec["schedulingGroup"] = {"podGroupName": group}
    labels = {}
    if priority_class:
        spec["priorityClassName"] = priority_class
        labels[PLACEHOLDER] = "1"
    return {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name, "labels": labels}, "spec": spec}


async def add_node(kube, pool: str, i: int) -> str:
    n = node_manifest(FleetSpec(nodes=1, cpu_fraction=0.0, prefix=f"{pool}-{i}"), 0)
    n["metadata"]["labels"][POOL_LABEL] = pool
    await kube.create(NODES, n)
    return n["metadata"]["name"]


async def bound(kube, ns: str, prefix: str) -> int:
    items, _ = await kube.list(PODS, ns)
    return sum(1 for p in items if p["metadata"]["name"].startswith(prefix) and p["spec"].get("nodeName"))


async def scenario(kube, name: str, placeholders: bool, wait: float, kick: bool, nodes: int = 2) -> str:
    ns = f"repro-{name}"
    await kube.create(NAMESPACES, {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": ns}})
    for i in range(nodes):
        await add_node(kube, name, i)
    t = time.monotonic()
    while time.monotonic() - t < 60:
        items, _ = await kube.list(NODES, label_selector=f"{POOL_LABEL}={name}")
        if sum(1 for n in items if node_ready(n)) == nodes:
            break
        await asyncio.sleep(0.5)
    if placeholders:
        for i in range(nodes):
            await kube.create(PODS, pod(f"placeholder-{i}", name, priority_class="repro-placeholder"), ns)
        while await bound(kube, ns, "placeholder-") < nodes:
            await asyncio.sleep(0.5)
    await kube.create(WORKLOADS, {"apiVersion": WORKLOADS.api_version, "kind": "Workload",
                                  "metadata": {"name": "gang"},
                                  "spec": {"podGroupTemplates": [{"name": "w", "schedulingPolicy":
                                                                  {"gang": {"minCount": 3}}}]}}, ns)
    await kube.create(PODGROUPS, {"apiVersion": PODGROUPS.api_version, "kind": "PodGroup",
                                  "metadata": {"name": "gang"},
                                  "spec": {"podGroupTemplateRef": {"workload": {"workloadName": "gang",
                                                                                "podGroupTemplateName": "w"}},
                                           "schedulingPolicy": {"gang": {"minCount": 3}}}}, ns)
    for i in range(3):
        await kube.create(PODS, pod(f"member-{i}", name, group="gang"), ns)
    await asyncio.sleep(8)  # the group is tried, preempts (placeholders) and fails
    if nodes < 3:
        await add_node(kube, name, 2)
    t = time.monotonic()
    while time.monotonic() - t < wait and await bound(kube, ns, "member-") < 3:
        await asyncio.sleep(1)
    got = await bound(kube, ns, "member-")
    out = f"{name}: {got} of 3 members bound {wait:.0f}s after the third node joined"
    if got < 3:
        items, _ = await kube.list(PODS, ns)
        for p in items:
            c = next((c for c in p["status"].get("conditions") or () if c["type"] == "PodScheduled"), {})
            out += (f"\n  {p['metadata']['name']} node={p['spec'].get('nodeName')} "
                    f"deleting={bool(p['metadata'].get('deletionTimestamp'))} {c.get('reason')}: "
                    f"{(c.get('message') or '')[:100]}")
        if kick:
            await kube.create(PODS, pod("kick", name, group="gang", selector={POOL_LABEL: "none"}), ns)
            t = time.monotonic()
            while time.monotonic() - t < wait and await bound(kube, ns, "member-") < 3:
                await asyncio.sleep(1)
            out += (f"; after one more pod of the group (never placed): {await bound(kube, ns, 'member-')} "
                    f"of 3 bound in {time.monotonic() - t:.0f}s")
    return out


async def main(args) -> None:
    with tempfile.TemporaryDirectory(prefix="fk-repro-") as d:
        lc = LocalCluster(Path(d) / "cluster")
        kube = None
        try:
            lc.state.scheduler_verbosity = args.v
            lc.state.scheduler_feature_gates = args.gates
            await lc.up(0, 8, wait_ready=False)
            kube = await lc.connect(retry=RetryPolicy(attempts=8))
            await kube.create(PRIORITYCLASSES, {"apiVersion": "scheduling.k8s.io/v1", "kind": "PriorityClass",
                                                "metadata": {"name": "repro-placeholder"}, "value": -1000,
                                                "preemptionPolicy": "Never"})
            async with SlowDeletes(kube, PLACEHOLDER, args.slow_delete):
                for name, ph, n in (("empty", False, 2), ("placeholders", True, 2), ("preempt-all", True, 3)):
                    print(await scenario(kube, name, ph, args.wait, args.kick, n), flush=True)
        finally:
            if kube is not None:
                await kube.close()
            if args.keep_log:
                import shutil
                shutil.copy(Path(d) / "cluster" / "logs" / "kube-scheduler.log", args.keep_log)
            lc.down(purge=True)


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--wait", type=float, default=90.0)
    ap.add_argument("--slow-delete", type=float, default=3.0,
                    help="placeholder deletions take this long (an admission webhook holds them)")
    ap.add_argument("--gates", default="", help="extra kube-scheduler feature gates")
    ap.add_argument("--v", type=int, default=1, help="kube-scheduler log verbosity")
    ap.add_argument("--keep-log", help="copy kube-scheduler's log here")
    ap.add_argument("--kick", action="store_true", help="then create one more pod of the group")
    asyncio.run(main(ap.parse_args()))
