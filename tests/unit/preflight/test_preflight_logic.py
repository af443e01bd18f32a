"""Pure logic of preflight: the suite, signed reports, the gate and periodic decisions, the webhook handler."""

from __future__ import annotations

import json

import pytest

from fleetkeeper.core.domain import Names
from fleetkeeper.core.errors import ConfigError
from fleetkeeper.core.views import Condition, NodeView, PodView, Taint
from fleetkeeper.core.webhook import AdmissionRequest
from fleetkeeper.preflight import gate, periodic
from fleetkeeper.preflight.config import PreflightConfig, parse_config
from fleetkeeper.preflight.keys import GATE, PERIODIC, Keys
from fleetkeeper.preflight.report import MAX_BYTES, ReportError, decode, encode
from fleetkeeper.preflight.suite import CheckResult, NoGpuBackend, SimulatedBackend, SimulatedHost, run_suite
from fleetkeeper.preflight.webhook import gate_node

K = Keys(Names())
CFG = PreflightConfig.model_validate({"gate": {"max_attempts": 3, "retry_backoff_s": 10, "pod_timeout_s": 100},
                                      "periodic": {"period_s": 1000, "min_idle_s": 60, "max_concurrent": 2}})
H100 = CFG.profile_named("h100-8x")
KEY = b"k" * 32
NOW = 1_800_000_000.0


def node(name="n1", *, gated=True, label="pending", ann=None, taints=(), ready=True, created=NOW - 10_000,
         unschedulable=False, labels=None):
    ts = tuple(Taint(*t) for t in taints)
    if gated:
        ts += (Taint(K.gate, label or "pending", "NoSchedule"),)
    lb = dict(labels or {})
    if label is not None:
        lb[K.gate] = label
    return NodeView(name, "uid-" + name, "7", lb, dict(ann or {}), ts, unschedulable,
                    (Condition("Ready", "True" if ready else "False", "", "", 0),), 8, 94000, created, False)


def pod(name="p1", *, kind=GATE, node_name="n1", phase="Running", msg="", created=NOW - 5, nonce="abc",
        owner="", labels=None):
    lb = {K.pod_kind: kind} if kind else {}
    lb.update(labels or {})
    return PodView("ns", name, "u", "1", node_name, phase, 0, "", lb,
                   {K.nonce: nonce, K.pod_node: node_name} if kind else {}, owner, "", (), 8 if kind else 0,
                   False, created, "", "", msg, "", "")


def report(node_name="n1", pod_name="p1", nonce="abc", faults=(), key=KEY):
    res = run_suite(node_name, H100, SimulatedBackend(node_name, H100, list(faults)), SimulatedHost(H100, list(faults)),
                    clock=lambda: NOW)
    return res, encode(res, pod=pod_name, nonce=nonce, key=key)


def verify_for(n: NodeView):
    return lambda p: decode(p.termination_message, key=KEY, node=n.name, pod=p.name, nonce=p.annotations[K.nonce])


# ------------------------------------------------------------------ suite
@pytest.mark.parametrize("fault,check", [
    ("validation:nccl", "nccl"), ("validation:gpu-matmul", "gpu-matmul"), ("gpu-missing", "gpu-count"),
    ("xid:79", "gpu-count"), ("ecc", "gpu-ecc"), ("remap-pending", "gpu-rows"), ("disk-full", "disk"),
    ("disk-ro", "disk"), ("validation:dcgm", "dcgm"), ("validation:gpu-thermal", "gpu-thermal"),
    ("validation:gpu-pcie", "gpu-pcie"), ("validation:gpu-hbm", "gpu-hbm"), ("validation:memory", "memory"),
])
def test_fault_fails_exactly_its_check(fault, check):
    res, _ = report(faults=[fault])
    assert not res.passed
    assert res.failed_checks == [check]


def test_healthy_simulated_node_passes_every_check_with_values():
    res, _ = report()
    assert res.passed and len(res.checks) == 12 and all(c.status == "pass" for c in res.checks)
    mm = next(c for c in res.checks if c.check == "gpu-matmul")
    assert mm.threshold == pytest.approx(989 * 0.8, abs=0.1) and mm.value >= mm.threshold
    assert len(res.gpus) == 8 and len(set(res.gpus)) == 8


def test_failed_gpu_is_named_by_uuid():
    res, _ = report(faults=["ecc"])
    assert res.failed_gpus == [res.gpus[0]]


def test_no_gpu_is_skipped_never_passed_and_fails_a_gpu_profile():
    res = run_suite("n", H100, NoGpuBackend(), SimulatedHost(H100, []))
    gpu = [c for c in res.checks if c.check.startswith("gpu") or c.check in ("nccl", "dcgm")]
    assert gpu and all(c.skipped and not c.passed and c.detail.startswith("skipped: no GPU") for c in gpu)
    assert not res.passed  # a GPU machine with no visible GPU does not pass
    cpu = run_suite("n", CFG.default_profile, NoGpuBackend(), SimulatedHost(CFG.default_profile, []))
    assert cpu.passed and all(c.status == "skip" for c in cpu.checks if c.check.startswith("gpu"))


def test_required_check_skipped_fails_the_suite():
    p = H100.model_copy(update={"required": ["gpu-matmul"]})

    class NoTorch(SimulatedBackend):
        def matmul_tflops(self, index):
            from fleetkeeper.preflight.suite import Unavailable
            raise Unavailable("torch not installed")

    res = run_suite("n", p, NoTorch("n", p, []), SimulatedHost(p, []))
    mm = next(c for c in res.checks if c.check == "gpu-matmul")
    assert mm.skipped and mm.detail == "skipped: torch not installed" and not res.passed


def test_probe_crash_is_a_failure_with_its_reason():
    class Broken(SimulatedBackend):
        def nccl_busbw_gbps(self):
            raise RuntimeError("NCCL WARN unhandled system error")

    res = run_suite("n", H100, Broken("n", H100, []), SimulatedHost(H100, []))
    c = next(c for c in res.checks if c.check == "nccl")
    assert c.status == "fail" and "unhandled system error" in c.detail


# ------------------------------------------------------------------ reports
def test_report_roundtrip_and_size():
    res, msg = report(faults=["validation:nccl", "ecc", "disk-full"])
    assert len(msg.encode()) <= MAX_BYTES
    back = decode(msg, key=KEY, node="n1", pod="p1", nonce="abc")
    assert back.failed_checks == res.failed_checks and back.gpus == res.gpus and not back.passed


@pytest.mark.parametrize("kw,err", [
    ({"key": b"x" * 32}, "signature"), ({"node": "n2"}, "node"), ({"pod": "p2"}, "another test pod"),
    ({"nonce": "zzz"}, "another test pod"),
])
def test_report_cannot_vouch_for_another_node_or_pod(kw, err):
    _, msg = report()
    args = {"key": KEY, "node": "n1", "pod": "p1", "nonce": "abc", **kw}
    with pytest.raises(ReportError, match=err):
        decode(msg, **args)


def test_tampered_report_is_rejected():
    _, msg = report(faults=["validation:nccl"])
    outer = json.loads(msg)
    outer["r"] = outer["r"].replace('"ok":false', '"ok":true')
    with pytest.raises(ReportError, match="signature"):
        decode(json.dumps(outer), key=KEY, node="n1", pod="p1", nonce="abc")
    with pytest.raises(ReportError):
        decode("", key=KEY, node="n1", pod="p1", nonce="abc")
    with pytest.raises(ReportError):
        decode("Error: OOMKilled", key=KEY, node="n1", pod="p1", nonce="abc")


def test_huge_details_are_trimmed_under_the_cap():
    res, _ = report()
    for c in res.checks:
        c.detail = "x" * 2000
    res.gpus = [f"GPU-{i:036d}" for i in range(16)]
    msg = encode(res, pod="p1", nonce="abc", key=KEY)
    assert len(msg.encode()) <= MAX_BYTES
    decode(msg, key=KEY, node="n1", pod="p1", nonce="abc")


# ------------------------------------------------------------------ gate
def test_new_gated_node_gets_a_test_pod():
    n = node()
    plan = gate.decide(n, [], CFG, K, NOW, verify_for(n))
    assert plan.outcome == "start" and plan.create_pod and plan.attempt == 1
    # a joining node: gated since it was created, derived from the node: no node write to start
    assert plan.cycle == str(int(n.created)) and not plan.patches_node
    again = node(ann={K.validated_at: str(int(NOW - 86400))})  # validated before: gated again from now
    p2 = gate.decide(again, [], CFG, K, NOW, verify_for(again))
    assert p2.annotations[K.gated_at] == p2.cycle == str(int(NOW))
    gated = node(ann={K.gated_at: str(int(NOW - 5))})  # recorded by whoever gated it (health, periodic)
    p3 = gate.decide(gated, [], CFG, K, NOW, verify_for(gated))
    assert p3.cycle == str(int(NOW - 5)) and not p3.patches_node


WAIT_FOR_TAINT = PreflightConfig.model_validate({"gate": {"start_when_ready": False}})


@pytest.mark.parametrize("kw,cfg", [
    ({"ready": False}, CFG),
    ({"taints": [("node.kubernetes.io/not-ready", "", "NoExecute")]}, CFG),  # went NotReady: never tolerated
    ({"taints": [("node.kubernetes.io/unreachable", "", "NoExecute")]}, CFG),
    ({"taints": [("node.kubernetes.io/unreachable", "", "NoSchedule")]}, CFG),
    ({"taints": [("node.kubernetes.io/not-ready", "", "NoSchedule")]}, WAIT_FOR_TAINT),
])
def test_no_test_pod_until_the_node_could_run_it(kw, cfg):
    n = node(**kw)
    plan = gate.decide(n, [], cfg, K, NOW, verify_for(n))
    assert plan.outcome == "wait" and not plan.create_pod and plan.requeue_after == gate.NOT_READY_RECHECK_S
    assert not plan.patches_node  # no write while the node lifecycle controller is busy with it
    up = node()
    plan = gate.decide(up, [], CFG, K, NOW + 30, verify_for(up))
    assert plan.create_pod and plan.cycle == str(int(up.created)) and not plan.patches_node  # clock from join


def test_a_ready_node_is_tested_while_its_not_ready_taint_is_lifted():
    """Ready, still carrying kube-controller-manager's not-ready NoSchedule taint: the test starts now (its
    pod tolerates that taint, and only that one); with ``start_when_ready: false`` it waits for the lift."""
    from fleetkeeper.preflight.pods import test_pod

    n = node(taints=[("node.kubernetes.io/not-ready", "", "NoSchedule")])
    plan = gate.decide(n, [], CFG, K, NOW, verify_for(n))
    assert plan.outcome == "start" and plan.create_pod and not plan.patches_node
    assert not gate.node_up(n) and gate.node_up(n, True)
    tol = test_pod(n, GATE, "p", "x", "default", CFG, K, "ns")["spec"]["tolerations"]
    assert {"key": "node.kubernetes.io/not-ready", "operator": "Exists", "effect": "NoSchedule"} in tol
    assert not any(t["key"] == "node.kubernetes.io/unreachable" for t in tol)
    assert all(t.get("effect") == "NoSchedule" for t in tol if t["key"].startswith("node.kubernetes.io/"))
    strict = test_pod(n, GATE, "p", "x", "default", WAIT_FOR_TAINT, K, "ns")["spec"]["tolerations"]
    assert not any(t["key"] == "node.kubernetes.io/not-ready" for t in strict)
    periodic_pod = test_pod(n, PERIODIC, "p", "x", "default", CFG, K, "ns")["spec"]["tolerations"]
    assert not any(t["key"] == "node.kubernetes.io/not-ready" for t in periodic_pod)  # in service: not needed
    assert gate.decide(n, [], WAIT_FOR_TAINT, K, NOW, verify_for(n)).outcome == "wait"


def test_status_judges_a_node_up_as_the_controller_configured_does(tmp_path):
    """``preflight status --config``: a Ready node still under the not-ready NoSchedule taint is up with the
    default ``start_when_ready`` and not up with it off, as the controller of that configuration judges it."""
    from fleetkeeper.core.views import default_projector
    from fleetkeeper.preflight.cli import _load, status_row

    raw = {"metadata": {"name": "n1", "uid": "u1", "resourceVersion": "7", "labels": {K.gate: "pending"},
                        "annotations": {K.attempts: "1"}, "creationTimestamp": "2026-01-01T00:00:00Z"},
           "spec": {"taints": [{"key": K.gate, "value": "pending", "effect": "NoSchedule"},
                               {"key": "node.kubernetes.io/not-ready", "effect": "NoSchedule"}]},
           "status": {"conditions": [{"type": "Ready", "status": "True"}]}}
    proj = default_projector(Names().domain)
    strict = tmp_path / "preflight.yaml"
    strict.write_text("gate:\n  start_when_ready: false\n")
    default_row = status_row(raw, K, proj, _load(None).gate.start_when_ready)
    strict_row = status_row(raw, K, proj, _load(strict).gate.start_when_ready)
    assert default_row.startswith("n1") and "not-ready" not in default_row and "attempts=1" in default_row
    assert "not-ready (no test until it is up)" in strict_row
    assert status_row(raw, K, proj, False, structured=True)["up"] is False
    assert status_row(raw, K, proj, True, structured=True) == {
        "node": "n1", "state": "pending", "up": True, "attempts": 1, "failedCheck": None, "instanceType": None}


def test_running_pod_waits_then_times_out():
    n = node(ann={K.gated_at: "1"})
    plan = gate.decide(n, [pod(created=NOW - 50)], CFG, K, NOW, verify_for(n))
    assert plan.outcome == "wait" and not plan.create_pod and not plan.patches_node
    plan = gate.decide(n, [pod(created=NOW - 101)], CFG, K, NOW, verify_for(n))
    assert plan.outcome == "timeout" and plan.annotations[K.attempts] == "1" and plan.delete_pods == ["p1"]
    assert plan.labels == {K.gate: "failed"} and plan.annotations[K.failed_check] == "timeout"


def test_pass_releases_taint_and_label_in_one_patch_keeping_other_taints():
    n = node(taints=[("fleetkeeper.io/team", "team-a", "NoSchedule")], ann={K.gated_at: str(int(NOW - 30))})
    _, msg = report()
    plan = gate.decide(n, [pod(phase="Succeeded", msg=msg)], CFG, K, NOW, verify_for(n))
    assert plan.outcome == "passed" and plan.labels == {K.gate: None}
    assert plan.taints == [{"key": "fleetkeeper.io/team", "value": "team-a", "effect": "NoSchedule"}]
    assert plan.annotations[K.validated_at] == str(int(NOW)) and plan.annotations[K.attempts] is None
    assert plan.delete_pods == ["p1"] and plan.annotations[K.last_pod] == "p1"
    assert json.loads(plan.annotations[K.history])[-1]["ok"] is True


def test_failure_marks_node_for_health_and_backs_off():
    n = node(ann={K.attempts: "1"}, label="failed")
    _, msg = report(faults=["validation:nccl"])
    plan = gate.decide(n, [pod(phase="Failed", msg=msg)], CFG, K, NOW, verify_for(n))
    assert plan.outcome == "failed" and plan.taints is None and plan.labels == {}
    assert plan.annotations[K.attempts] == "2" and plan.annotations[K.failed_check] == "nccl"
    assert plan.annotations[K.retry_at] == str(int(NOW + 20)) and plan.requeue_after == 20
    assert plan.event[2] == "Warning"


def test_last_attempt_exhausts_and_no_more_pods():
    n = node(ann={K.attempts: "2"}, label="failed")
    _, msg = report(faults=["validation:nccl"])
    plan = gate.decide(n, [pod(phase="Failed", msg=msg)], CFG, K, NOW, verify_for(n))
    assert plan.outcome == "exhausted" and plan.annotations[K.retry_at] is None and plan.requeue_after is None
    n2 = node(ann={K.attempts: "3", K.last_pod: "p1"}, label="failed")
    plan = gate.decide(n2, [], CFG, K, NOW + 1000, verify_for(n2))
    assert not plan.create_pod and plan.outcome == "none"


def test_retry_waits_for_backoff():
    n = node(ann={K.attempts: "1", K.retry_at: str(int(NOW + 5))}, label="failed")
    assert gate.decide(n, [], CFG, K, NOW, verify_for(n)).requeue_after == 5
    plan = gate.decide(n, [], CFG, K, NOW + 6, verify_for(n))
    assert plan.create_pod and plan.attempt == 2


def test_success_report_from_failed_pod_or_forged_report_does_not_release():
    n = node()
    _, msg = report()
    plan = gate.decide(n, [pod(phase="Failed", msg=msg)], CFG, K, NOW, verify_for(n))
    assert plan.outcome == "failed" and plan.taints is None
    _, other = report(node_name="n2")
    plan = gate.decide(n, [pod(phase="Succeeded", msg=other)], CFG, K, NOW, verify_for(n))
    assert plan.outcome == "failed" and plan.annotations[K.failed_check] == "report"
    _, forged = report(key=b"forged")
    plan = gate.decide(n, [pod(phase="Succeeded", msg=forged)], CFG, K, NOW, verify_for(n))
    assert plan.outcome == "failed" and plan.taints is None


def test_applied_result_is_not_counted_twice():
    n = node(ann={K.attempts: "1", K.last_pod: "p1", K.retry_at: str(int(NOW + 100))}, label="failed")
    _, msg = report(faults=["validation:nccl"])
    plan = gate.decide(n, [pod(phase="Failed", msg=msg)], CFG, K, NOW, verify_for(n))
    assert plan.outcome == "wait" and plan.delete_pods == ["p1"] and K.attempts not in plan.annotations


def test_pending_label_after_failures_starts_a_new_cycle():
    n = node(ann={K.attempts: "3"}, label="pending")
    plan = gate.decide(n, [], CFG, K, NOW, verify_for(n))
    assert plan.outcome == "reset" and plan.annotations[K.attempts] is None


def test_label_without_taint_is_retainted_and_released_node_cleans_up():
    n = node(gated=False, label="pending")
    plan = gate.decide(n, [], CFG, K, NOW, verify_for(n))
    assert plan.outcome == "retaint" and {"key": K.gate, "value": "pending", "effect": "NoSchedule"} in plan.taints
    free = node(gated=False, label=None)
    plan = gate.decide(free, [pod()], CFG, K, NOW, verify_for(free))
    assert plan.outcome == "cleanup" and plan.delete_pods == ["p1"]
    assert gate.decide(free, [], CFG, K, NOW, verify_for(free)).outcome == "none"


# ------------------------------------------------------------------ periodic
def inservice(name, validated=None, **kw):
    ann = {K.validated_at: str(int(validated))} if validated else {}
    return node(name, gated=False, label=None, ann=ann, **kw)


def test_periodic_picks_idle_overdue_nodes_most_overdue_first():
    nodes = [inservice("a", NOW - 900), inservice("b", NOW - 2000), inservice("c", NOW - 100),
             inservice("d", NOW - 1500), inservice("e", NOW - 5000)]
    busy = {"e": [pod("work", kind="", node_name="e")]}
    plan = periodic.decide(nodes, busy, {n.name: 0.0 for n in nodes}, CFG, K, NOW)
    assert plan.start == ["b", "d"]  # e is busy, c is fresh, max 2
    assert plan.in_scope == 5 and plan.covered == 2 and plan.coverage == 0.4


def test_periodic_never_picks_busy_recently_busy_gated_or_cordoned_nodes():
    nodes = [inservice("busy", NOW - 5000), inservice("recent", NOW - 5000), inservice("cordon", NOW - 5000,
             unschedulable=True), node("gated", ann={K.validated_at: "1"}), inservice("sick", NOW - 5000,
             taints=[("fleetkeeper.io/quarantine", "xid", "NoSchedule")]), inservice("notready", NOW - 5000,
                                                                                     ready=False)]
    pods = {"busy": [pod("j", kind="", node_name="busy", owner="Job")]}
    last_busy = {n.name: 0.0 for n in nodes} | {"recent": NOW - 30}
    plan = periodic.decide(nodes, pods, last_busy, CFG, K, NOW)
    assert plan.start == []
    ds = {"busy": [pod("ds", kind="", node_name="busy", owner="DaemonSet")]}
    assert periodic.decide(nodes, ds, last_busy, CFG, K, NOW).start == ["busy"]


def test_periodic_gives_up_when_real_work_arrives_or_timeout():
    nodes = [inservice("a", NOW - 5000), inservice("b", NOW - 5000)]
    pods = {"a": [pod("pa", kind=PERIODIC, node_name="a"), pod("work", kind="", node_name="a")],
            "b": [pod("pb", kind=PERIODIC, node_name="b", created=NOW - 5000)]}
    plan = periodic.decide(nodes, pods, {"a": 0.0, "b": 0.0}, CFG, K, NOW)
    assert dict(plan.give_up).keys() == {"pa", "pb"} and "real work" in dict(plan.give_up)["pa"]


def test_periodic_respects_max_concurrent_and_disabled():
    nodes = [inservice(f"n{i}", NOW - 5000) for i in range(5)]
    pods = {"n0": [pod("p0", kind=PERIODIC, node_name="n0")]}
    plan = periodic.decide(nodes, pods, {n.name: 0.0 for n in nodes}, CFG, K, NOW)
    assert len(plan.start) == 1 and "n0" not in plan.start
    off = CFG.model_copy(update={"periodic": CFG.periodic.model_copy(update={"enabled": False})})
    assert periodic.decide(nodes, {}, {n.name: 0.0 for n in nodes}, off, K, NOW).start == []


# ------------------------------------------------------------------ webhook
def review(labels=None, taints=None, spec=True):
    obj = {"metadata": {"name": "x", **({"labels": labels} if labels is not None else {})}}
    if spec:
        obj["spec"] = {"taints": taints} if taints is not None else {}
    return AdmissionRequest("u", "Node", "CREATE", "", "x", "system:node:x", (), obj, None, False)


def apply_patch(obj, ops):
    import copy

    o = copy.deepcopy(obj)
    for op in ops:
        parts = [p.replace("~1", "/").replace("~0", "~") for p in op["path"].split("/")[1:]]
        tgt = o
        for p in parts[:-1]:
            tgt = tgt[p]
        if parts[-1] == "-":
            tgt.append(op["value"])
        else:
            tgt[parts[-1]] = op["value"]
    return o


@pytest.mark.parametrize("labels,taints,spec", [
    (None, None, False), ({}, None, True), ({"a": "b"}, [], True),
    ({"a": "b"}, [{"key": "other", "effect": "NoExecute"}], True),
])
def test_webhook_adds_taint_and_label_atomically(labels, taints, spec):
    req = review(labels, taints, spec)
    adm = gate_node(req, K, {})
    out = apply_patch(req.obj, adm.patch)
    assert {"key": K.gate, "value": "pending", "effect": "NoSchedule"} in out["spec"]["taints"]
    assert out["metadata"]["labels"][K.gate] == "pending"
    if taints:
        assert taints[0] in out["spec"]["taints"]


def test_webhook_leaves_gated_and_exempt_nodes_alone():
    req = review({K.gate: "pending"}, [{"key": K.gate, "value": "pending", "effect": "NoSchedule"}])
    assert gate_node(req, K, {}).patch == []
    assert gate_node(review({"role": "infra"}), K, {"role": "infra"}).patch == []


# ------------------------------------------------------------------ config
def test_config_errors_name_the_field():
    with pytest.raises(ConfigError) as e:
        parse_config("gate:\n  max_attempts: 0\n", "cm")
    assert "gate.max_attempts" in str(e.value)
    with pytest.raises(ConfigError) as e:
        parse_config("profiles:\n- name: x\n  skip: [bogus]\n", "cm")
    assert "bogus" in str(e.value)
    with pytest.raises(ConfigError) as e:
        parse_config("gate: [\n", "cm")
    assert "YAML" in str(e.value)
    with pytest.raises(ConfigError):
        parse_config("unknown_key: 1\n", "cm")


def test_profile_selection():
    assert CFG.profile_for("gpu-8x-h100").name == "h100-8x"
    assert CFG.profile_for("", "NVIDIA A100-SXM4-80GB").name == "a100-8x"
    assert CFG.profile_for("weird").name == "default"


def test_check_result_status():
    assert CheckResult("x", skipped=True).status == "skip"
