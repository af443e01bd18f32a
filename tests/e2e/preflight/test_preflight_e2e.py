"""The preflight loop against the real local control plane: webhook gate on
Node CREATE, simulated test pods completed by KWOK, signed reports, release,
bounded retries, least privilege, and periodic re-tests that yield to real work."""

from __future__ import annotations

import asyncio
import json
import secrets
import sys
import time

import pytest
from prometheus_client import CollectorRegistry

from e2e_helpers import until_webhook_answers
from fleetkeeper.core import errors
from fleetkeeper.core.domain import Names
from fleetkeeper.core.faults import FaultPlan, parse_fault
from fleetkeeper.core.kube import MUTATING_WEBHOOKS, NODES, PODS
from fleetkeeper.core.manager import Manager
from fleetkeeper.core.settings import RuntimeSettings
from fleetkeeper.localcluster.fleet import FleetSpec, node_manifest
from fleetkeeper.preflight.config import PreflightConfig
from fleetkeeper.preflight.controller import Preflight
from fleetkeeper.preflight.explain import explain_node
from fleetkeeper.preflight.keys import Keys
from fleetkeeper.preflight.webhook import CONFIG_NAME

NAMES = Names()
KEYS = Keys(NAMES)
TEST_LABEL = "fleetkeeper.io/test-gate"


async def until(pred, timeout: float = 60.0, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        v = await pred()
        if v:
            return v
        await asyncio.sleep(0.3)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def taint(node: dict) -> dict | None:
    return next((t for t in (node.get("spec") or {}).get("taints") or [] if t["key"] == KEYS.gate), None)


async def start(kube, ns: str, cfg: PreflightConfig):
    mgr = Manager(kube, RuntimeSettings(namespace=ns, server={"port": 0}, leader_election={"enabled": False}),
                  registry=CollectorRegistry(), identity="test")
    pf = Preflight(mgr, cfg)
    pf.register()
    task = asyncio.create_task(mgr.run(), name="preflight-manager")
    return mgr, pf, task


async def stop(task):
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)


def my_nodes(tid: str, n: int) -> list[dict]:
    spec = FleetSpec(nodes=n, cpu_fraction=0.0, prefix=f"pf{tid}")
    out = []
    for i in range(n):
        m = node_manifest(spec, i, NAMES)
        m["metadata"]["labels"][TEST_LABEL] = tid
        out.append(m)
    return out


async def delete_nodes(kube, nodes: list[dict]):
    for n in nodes:
        try:
            await kube.delete(NODES, n["metadata"]["name"])
        except errors.NotFound:
            pass


async def test_join_gate_end_to_end(kube, namespace, tmp_path):
    tid = secrets.token_hex(3)
    faults = FaultPlan(tmp_path / "faults.json")
    cfg = PreflightConfig.model_validate({
        "namespace": namespace, "fault_file": str(faults.path), "node_selector": {TEST_LABEL: tid},
        "gate": {"max_attempts": 3, "retry_backoff_s": 3, "sim_duration_ms": 2000},
        "periodic": {"enabled": False},
        "webhook": {"enabled": True, "host": "127.0.0.1", "port": 0, "url_host": "127.0.0.1",
                    "object_selector": {"matchLabels": {TEST_LABEL: tid}}},
    })
    nodes = my_nodes(tid, 4)
    good, bad, flaky, good2 = (n["metadata"]["name"] for n in nodes)
    faults.inject(bad, parse_fault("validation:nccl"))
    faults.inject(flaky, parse_fault("validation:gpu-hbm"))
    mgr, pf, task = await start(kube, namespace, cfg)
    try:
        await until(lambda: kube.get_or_none(MUTATING_WEBHOOKS, CONFIG_NAME), 30, "webhook registration")
        await until_webhook_answers(kube, NODES, nodes[0], None, lambda o: taint(o) is not None,
                                    "the preflight gate webhook")
        created = []
        for n in nodes:
            obj = await kube.create(NODES, n)
            created.append(obj)
        # the webhook gated every node in the same write that created it: no window
        for obj in created:
            assert taint(obj) == {"key": KEYS.gate, "value": "pending", "effect": "NoSchedule"}, obj["metadata"]["name"]
            assert obj["metadata"]["labels"][KEYS.gate] == "pending"
        # a real pod aimed at a gated node must wait until the node passed
        work = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "work", "namespace": namespace},
                "spec": {"nodeSelector": {"kubernetes.io/hostname": good},
                         "tolerations": [{"key": "kwok.x-k8s.io/node", "operator": "Exists"}],
                         "containers": [{"name": "c", "image": "busybox"}]}}
        await kube.create(PODS, work, namespace)

        async def work_bound_after_release():
            p = await kube.get(PODS, "work", namespace)
            node = await kube.get(NODES, good)
            if p["spec"].get("nodeName"):
                assert taint(node) is None, "a pod was bound to a node still held by the gate"
                return True
            return False

        await until(work_bound_after_release, 60, "work pod bound after release")
        async def released(name):
            return taint(await kube.get(NODES, name)) is None

        await until(lambda: released(good2), 30, "second healthy node released")
        for name in (good, good2):
            node = await kube.get(NODES, name)
            assert taint(node) is None and KEYS.gate not in node["metadata"]["labels"]
            assert KEYS.validated_at in node["metadata"]["annotations"]

        # the flaky node fails once, then (fault cleared) passes within its limit
        async def attempts(name):
            n = await kube.get(NODES, name)
            return int(n["metadata"].get("annotations", {}).get(KEYS.attempts, "0"))

        await until(lambda: attempts(flaky), 30, "first failed attempt on the flaky node")
        faults.clear(flaky)

        await until(lambda: released(flaky), 60, "flaky node released on retry")
        hist = [line for line in await explain_node(kube, NAMES, flaky) if " gate " in line]
        # newest first: the pass, after one or more failures of the flaky check (a retry may start
        # before the test clears the fault), all within the attempt limit (3)
        assert "PASS" in hist[0] and 2 <= len(hist) <= 3, hist
        assert all("FAIL" in h and "gpu-hbm" in h for h in hist[1:]), hist

        # the broken node stays out after max_attempts, with its reason visible
        async def exhausted():
            n = await kube.get(NODES, bad)
            a = n["metadata"].get("annotations", {})
            return n if a.get(KEYS.attempts) == "3" and not a.get(KEYS.retry_at) else None

        n = await until(exhausted, 60, "broken node exhausted")
        assert taint(n) is not None and n["metadata"]["labels"][KEYS.gate] == "failed"
        assert n["metadata"]["annotations"][KEYS.failed_check] == "nccl"
        await asyncio.sleep(2.0)
        mine, _ = await kube.list(PODS, namespace, label_selector=f"{KEYS.pod_node}={bad}")
        assert [p for p in mine if not p["metadata"].get("deletionTimestamp")] == [], "no retries past the limit"
        lines = await explain_node(kube, NAMES, bad)
        text = "\n".join(lines)
        assert "GATED" in text and "nccl" in text and "no retries left" in text, text
        assert sum(1 for line in lines if "FAIL" in line) == 3, text
        assert "history by UUID" in text

        # the test pods' ServiceAccount cannot patch (or even read) any node
        sa = kube.as_user(f"system:serviceaccount:{namespace}:{cfg.service_account}",
                          ["system:serviceaccounts", f"system:serviceaccounts:{namespace}", "system:authenticated"])
        with pytest.raises(errors.Forbidden):
            await sa.patch(NODES, bad, {"metadata": {"labels": {KEYS.gate: None}}})
        with pytest.raises(errors.Forbidden):
            await sa.patch(NODES, bad, {"status": {"conditions": []}}, subresource="status")
        ev = [e for e in pf.recorder.emitted if e[2] == "PreflightFailed"]
        assert ev and all(e[1] == "Warning" for e in ev)
        assert pf.metrics.results.labels("gate", "passed")._value.get() >= 3
    finally:
        await stop(task)
        try:
            await kube.delete(MUTATING_WEBHOOKS, CONFIG_NAME)
        except errors.NotFound:
            pass
        await delete_nodes(kube, nodes)


async def test_periodic_tests_avoid_and_yield_to_real_work(kube, namespace, tmp_path):
    tid = secrets.token_hex(3)
    cfg = PreflightConfig.model_validate({
        "namespace": namespace, "fault_file": str(tmp_path / "faults.json"), "node_selector": {TEST_LABEL: tid},
        "periodic": {"period_s": 600, "interval_s": 1, "min_idle_s": 0, "max_concurrent": 5, "sim_duration_ms": 15000},
    })
    nodes = my_nodes(tid, 3)
    busy, preempt, idle = (n["metadata"]["name"] for n in nodes)
    FaultPlan(tmp_path / "faults.json").inject(preempt, parse_fault("validation:hang"))  # a long test
    old = str(int(time.time() - 3600))
    for n in nodes:
        n["metadata"]["annotations"][KEYS.validated_at] = old
        await kube.create(NODES, n)

    def work(name: str, node: str, gpus: int) -> dict:
        res = {"nvidia.com/gpu": str(gpus)} if gpus else {}
        return {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name, "namespace": namespace},
                "spec": {"nodeSelector": {"kubernetes.io/hostname": node},
                         "tolerations": [{"key": "kwok.x-k8s.io/node", "operator": "Exists"}],
                         "containers": [{"name": "c", "image": "busybox",
                                         "resources": {"requests": res, "limits": res}}]}}

    await kube.create(PODS, work("job-on-busy", busy, 1), namespace)

    async def running(name):
        p = await kube.get(PODS, name, namespace)
        return (p.get("status") or {}).get("phase") == "Running"

    await until(lambda: running("job-on-busy"), 30, "real work running")
    mgr, pf, task = await start(kube, namespace, cfg)
    try:
        async def periodic_pods():
            ps, _ = await kube.list(PODS, namespace, label_selector=f"{KEYS.pod_kind}=periodic")
            return {p["metadata"]["annotations"][KEYS.pod_node]: p for p in ps}

        async def on_both():
            ps = await periodic_pods()
            assert busy not in ps, "a periodic test landed on a node running real work"
            p = ps.get(preempt)
            return ps if p and (p.get("status") or {}).get("phase") == "Running" else None

        try:
            ps = await until(on_both, 30, "periodic tests on the idle nodes")
        except AssertionError:
            from fleetkeeper.preflight import periodic as per
            nv = [pf.nodes.get(n["metadata"]["name"]) for n in nodes]
            dbg = per.decide(pf.nodes.items(), {k: pf.pods_on_node.get(k) for k in pf.pods_on_node.keys()},
                             {}, cfg, KEYS, time.time())
            raise AssertionError(f"key={bool(pf.key)} plan={dbg} {await periodic_pods()} eligible={pf.metrics.eligible._value.get()} "
                                 f"{[(v.name, v.ready, v.taints, per.in_service(v, KEYS)) for v in nv if v]}")
        victim = ps[preempt]["metadata"]["name"]
        # real work that needs the GPUs preempts the low-priority test pod
        await kube.create(PODS, work("job-on-preempt", preempt, 8), namespace)
        await until(lambda: running("job-on-preempt"), 40, "real work scheduled by preempting the test")
        assert await kube.get_or_none(PODS, victim, namespace) is None or \
            (await kube.get(PODS, victim, namespace))["metadata"].get("deletionTimestamp")

        async def revalidated():
            n = await kube.get(NODES, idle)
            return n["metadata"]["annotations"].get(KEYS.validated_at) != old

        await until(revalidated, 40, "idle node re-validated")
        n = await kube.get(NODES, preempt)
        assert n["metadata"]["annotations"].get(KEYS.validated_at) == old  # preempted: no result
        assert taint(n) is None
        assert busy not in await periodic_pods()
        b = await kube.get(NODES, busy)
        assert b["metadata"]["annotations"][KEYS.validated_at] == old
        async def covered():  # the next periodic pass (every interval_s) reports the re-validation
            return pf.metrics.coverage._value.get() > 0

        await until(covered, 10, "coverage reported")
    finally:
        await stop(task)
        await delete_nodes(kube, nodes)


async def test_no_test_pod_until_the_node_is_up(kube, namespace, tmp_path, cluster):
    from fleetkeeper.localcluster.fleet import KWOK_LABEL, KWOK_LABEL_VALUE

    tid = secrets.token_hex(3)
    cfg = PreflightConfig.model_validate({
        "namespace": namespace, "fault_file": str(tmp_path / "faults.json"), "node_selector": {TEST_LABEL: tid},
        "periodic": {"enabled": False, "interval_s": 0.5}})
    (node,) = my_nodes(tid, 1)
    name = node["metadata"]["name"]
    node["spec"]["taints"] = [{"key": KEYS.gate, "value": "pending", "effect": "NoSchedule"}]  # as the kubelet flag does
    node["metadata"]["labels"][KEYS.gate] = "pending"
    del node["metadata"]["labels"][KWOK_LABEL]  # no simulated kubelet: the node never becomes Ready
    mgr, pf, task = await start(kube, namespace, cfg)
    try:
        await kube.create(NODES, node)

        async def gauged():
            return pf.metrics.gated.labels("not-ready")._value.get() >= 1
        await until(gauged, 20, "the node counted as gated and not ready")
        await asyncio.sleep(2.0)
        pods, _ = await kube.list(PODS, namespace, label_selector=f"{KEYS.pod_node}={name}")
        assert pods == [], "a test pod was created for a node that is not up"
        n = await kube.get(NODES, name)
        assert taint(n) is not None and KEYS.gated_at not in (n["metadata"].get("annotations") or {})  # no write

        # the operator's view: ``preflight status`` shows it held and not up, as the controller judges it
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "fleetkeeper", "preflight", "status", "--kubeconfig", str(cluster.kubeconfig),
            "-o", "json", stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
        out, err = await proc.communicate()
        assert proc.returncode == 0, err.decode()
        rows = {r["node"]: r for r in json.loads(out)["gated"]}
        assert rows[name]["state"] == "pending" and rows[name]["up"] is False, rows.get(name)

        # the kubelet comes up (KWOK takes the node over): the test runs and releases the node
        await kube.patch(NODES, name, {"metadata": {"labels": {KWOK_LABEL: KWOK_LABEL_VALUE}}})

        async def released():
            n = await kube.get(NODES, name)
            return taint(n) is None and KEYS.validated_at in n["metadata"]["annotations"]
        await until(released, 90, "the node tested and released once up")
    finally:
        await stop(task)
        await delete_nodes(kube, [node])


async def test_chart_rbac_is_enough_and_each_rule_needed(kube, tmp_path):
    """The Helm chart's identities for preflight: the controller, running as its ServiceAccount
    with its configuration read from the chart's ConfigMap, gates a joining node (the webhook
    registered by an administrator, as the chart does), runs its test pod, records GPU history
    and releases it; no request is refused, and each rule of its RBAC was needed by one."""
    import sys
    from pathlib import Path

    import yaml

    from fleetkeeper.core.kube import CONFIGMAPS, LEASES
    from fleetkeeper.preflight.config import WebhookConfig
    from fleetkeeper.preflight.controller import setup
    from fleetkeeper.preflight.history import LABEL as HISTORY_LABEL
    from fleetkeeper.preflight.webhook import gate_registration

    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "chart"))
    from rbac_audit import apply_rbac, audit, chart_docs, service_account

    ns = "fleetkeeper-system"
    docs = chart_docs()
    await apply_rbac(kube, docs)
    tid = secrets.token_hex(3)
    cfg = {"namespace": ns, "fault_file": str(tmp_path / "faults.json"), "node_selector": {TEST_LABEL: tid},
           "periodic": {"enabled": False},
           "webhook": {"enabled": True, "host": "127.0.0.1", "port": 0, "url_host": "127.0.0.1",
                       "auto_register": False}}
    PreflightConfig.model_validate(cfg)
    await kube.apply(CONFIGMAPS, {"apiVersion": "v1", "kind": "ConfigMap",
                                  "metadata": {"name": "fleetkeeper-preflight", "namespace": ns},
                                  "data": {"config.yaml": yaml.safe_dump(cfg)}})
    controller = service_account(kube, "fleetkeeper-preflight")
    registry = CollectorRegistry()
    mgr = Manager(controller, RuntimeSettings(namespace=ns, server={"port": 0},
                                              leader_election={"enabled": True, "lease_name": "fleetkeeper-preflight"}),
                  registry=registry, identity=f"test-{tid}")
    await setup(mgr, None)
    pf = mgr._runnables  # noqa: SLF001 - the webhook server is found through the running Preflight below
    task = asyncio.create_task(mgr.run())
    nodes = my_nodes(tid, 1)
    name = nodes[0]["metadata"]["name"]
    try:
        preflight = next(r.fn.__self__ for r in pf if r.name == "preflight-webhook")

        async def serving():
            return getattr(preflight, "webhook_server", None) is not None and preflight.webhook_server.port
        await until(serving, 30, "webhook serving")
        server = preflight.webhook_server
        ca = (Path(server.cert).parent / "ca.crt").read_bytes()
        await kube.apply(MUTATING_WEBHOOKS, gate_registration(
            WebhookConfig(), ca, url=f"https://127.0.0.1:{server.port}/node-preflight-gate",
            object_selector={"matchLabels": {TEST_LABEL: tid}}))
        await until_webhook_answers(kube, NODES, nodes[0], None, lambda o: taint(o) is not None,
                                    "the preflight gate webhook")
        obj = await kube.create(NODES, nodes[0])
        assert taint(obj) is not None, "the webhook did not gate the node"

        async def released():
            n = await kube.get(NODES, name)
            return taint(n) is None and KEYS.validated_at in n["metadata"]["annotations"]
        await until(released, 90, "the node tested and released by the controller's identity")

        async def history():
            cms, _ = await kube.list(CONFIGMAPS, ns, label_selector=f"{HISTORY_LABEL}=true")
            return any(name in str(c.get("data")) for c in cms)
        await until(history, 20, "GPU history recorded")
        assert (await kube.get(LEASES, "fleetkeeper-preflight", ns))["spec"]["holderIdentity"] == f"test-{tid}"
    finally:
        await stop(task)
        for res, n, space in ((MUTATING_WEBHOOKS, CONFIG_NAME, None), (LEASES, "fleetkeeper-preflight", ns),
                              (CONFIGMAPS, "fleetkeeper-preflight", ns)):
            try:
                await kube.delete(res, n, space)
            except errors.NotFound:
                pass
        await delete_nodes(kube, nodes)
    forbidden, unneeded = audit(docs, "fleetkeeper-preflight", controller.calls)
    assert not forbidden, f"refused: {forbidden}"
    assert not unneeded, f"rules none of its requests needed: {unneeded}"
