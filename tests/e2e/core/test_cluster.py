"""The local control plane itself."""

import asyncio
import time

from fleetkeeper.core.kube import NODES, PODS
from fleetkeeper.localcluster.cluster import node_ready
import os

E2E_NODES = int(os.environ.get("FLEETKEEPER_E2E_NODES", "24"))


async def test_up_twice_is_idempotent(cluster, kube):
    pids = dict(cluster.state.pids)
    res = await cluster.up(E2E_NODES, 8)
    assert res["created"] == 0 and res["ready"] == E2E_NODES
    assert cluster.state.pids == pids  # nothing restarted


async def test_simulated_nodes_look_like_the_gpu_fleet(kube):
    nodes, _ = await kube.list(NODES, label_selector="type=kwok")
    assert len(nodes) >= E2E_NODES and all(node_ready(n) for n in nodes)
    pools = {n["metadata"]["labels"]["fleetkeeper.io/pool"] for n in nodes}
    assert pools == {"gpu", "cpu"}
    gpu = next(n for n in nodes if n["metadata"]["labels"]["fleetkeeper.io/pool"] == "gpu")
    labels = gpu["metadata"]["labels"]
    assert gpu["status"]["allocatable"]["nvidia.com/gpu"] == "8"
    assert labels["topology.kubernetes.io/zone"].startswith("zone-")
    assert labels["fleetkeeper.io/rack"].startswith("rack-")
    assert "node.kubernetes.io/instance-type" in labels


async def test_pods_run_and_finish_as_asked(kube, namespace):
    def pod(name, result):
        return {"apiVersion": "v1", "kind": "Pod",
                "metadata": {"name": name, "annotations": {"fleetkeeper.io/sim-result": result,
                                                           "fleetkeeper.io/sim-message": f"msg-{name}"}},
                "spec": {"containers": [{"name": "c", "image": "x",
                                         "resources": {"limits": {"nvidia.com/gpu": "1"}}}]}}

    await kube.create(PODS, pod("ok", "succeed"), namespace)
    await kube.create(PODS, pod("bad", "fail"), namespace)
    slow = pod("slow", "succeed")
    slow["metadata"]["annotations"]["fleetkeeper.io/sim-delay"] = "1h"  # cannot finish during the test, however slow
    await kube.create(PODS, slow, namespace)
    deadline = time.monotonic() + 60
    phases = {}
    while time.monotonic() < deadline:
        phases = {n: (await kube.get(PODS, n, namespace))["status"].get("phase") for n in ("ok", "bad")}
        if phases == {"ok": "Succeeded", "bad": "Failed"}:
            break
        await asyncio.sleep(0.5)
    assert phases == {"ok": "Succeeded", "bad": "Failed"}
    slow_phase = (await kube.get(PODS, "slow", namespace))["status"].get("phase")
    assert slow_phase in ("Pending", "Running")  # not finished: its delay has not passed yet
    bad = await kube.get(PODS, "bad", namespace)
    term = bad["status"]["containerStatuses"][0]["state"]["terminated"]
    assert term["exitCode"] == 1 and term["message"] == "msg-bad"
    assert bad["spec"]["nodeName"].startswith("node-gpu-")
