"""The local control plane itself."""

import asyncio
import time

from fleetkeeper.core.kube import JOBS, NODES, PODS
from fleetkeeper.localcluster.cluster import node_ready
from e2e_helpers import wait_for
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


async def test_a_job_pod_that_says_how_it_ends_is_not_ended_early_by_kwok(kube, namespace):
    """KWOK's own ``pod-complete`` stage ends a Job's running pod after 1-5 s; a pod with
    ``fleetkeeper.io/sim-result`` matched it too and KWOK picked one of the two at random (1 in 11),
    so benchmarks' pods ran 1-5 s instead of their ``sim-delay``. 60 pods of one Job, each asked to
    run an hour: none may finish (with the old stages, all 60 surviving had odds of 1 in 300)."""
    n = 60
    await kube.create(JOBS, {
        "apiVersion": "batch/v1", "kind": "Job", "metadata": {"name": "long"},
        "spec": {"parallelism": n, "completions": n, "backoffLimit": 0,
                 "template": {"metadata": {"annotations": {"fleetkeeper.io/sim-result": "succeed",
                                                           "fleetkeeper.io/sim-delay": "1h"}},
                              "spec": {"restartPolicy": "Never", "nodeSelector": {"fleetkeeper.io/pool": "gpu"},
                                       "containers": [{"name": "c", "image": "x"}]}}}}, namespace)

    async def started():  # every pod past Pending (KWOK's pod-ready stage makes it Running and Ready at once)
        pods, _ = await kube.list(PODS, namespace)
        return len(pods) == n and all(p["status"].get("phase") != "Pending" for p in pods)
    await wait_for(started, 120, f"the {n} pods of the Job started")
    # past KWOK's pod-complete window (at most 5 s after Ready), then nothing may have ended
    await asyncio.sleep(7)
    pods, _ = await kube.list(PODS, namespace)
    ended = [p["metadata"]["name"] for p in pods if p["status"].get("phase") in ("Succeeded", "Failed")]
    assert ended == [], f"{len(ended)} of {n} pods ended before their sim-delay: {ended[:5]}"
    assert sum(1 for p in pods if p["status"].get("phase") == "Running") == n
