"""Crash safety: the manager (``fleetkeeper run --controllers health,lifecycle,teams,preflight``,
a real process) is killed with SIGKILL at 20 random points of a scenario and
restarted each time. The final cluster state must equal a clean run's, no
machine may be terminated twice (counted from the Events and the API), every
evicted pod is named by an eviction Event (written before the eviction), and
each node is quarantined once (the deadline counts from that first action).

The scenario, on each run's own KWOK nodes:
  n0  uncorrectable ECC (drain ladder), running a member of a gang of 3 (n0, n1, n2): the gang is evicted,
      the node reset by its (simulated) agent, re-validated by the preflight gate, back in service (the
      drain deadline terminates only terminate-ladder nodes here, so n0's end does not depend on speed)
  n3  GPUs missing (terminate ladder), one pod held by a PodDisruptionBudget: terminated at the drain deadline
  n4  preflight attempts used up: retired and terminated by the lifecycle
  n5  healthy: untouched
  n6  a team's node, until the team moves (its ConfigMap changes half-way through the kills) to n7
  n8  validated two hours ago and idle: re-tested by the periodic preflight, and validated again

The end state is a fixpoint (every node's story has ended), so it does not depend on when it is read:
an end state that is only passed through (a node still quarantined while its fault clears) would be
missed by a run slowed down by the machine's load.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import re
import secrets
import signal
import sys
import time
from pathlib import Path

import pytest
import yaml

from fleetkeeper.core import errors
from fleetkeeper.core.faults import FaultPlan, parse_fault
from fleetkeeper.core.kube import CONFIGMAPS, EVENTS, NAMESPACES, NODES, PDBS, PODS
from fleetkeeper.localcluster.fleet import FleetSpec, node_manifest
from e2e_helpers import wait_for

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1800)]

GROUP = "fleetkeeper.io/e2e-group"
Q = "fleetkeeper.io/quarantine"
KILLS = 20
DEADLINE = 8  # health's drain deadline (s)
TEAM = "fleetkeeper.io/team"
PREFLIGHT = "fleetkeeper.io/preflight"
VALIDATED = "fleetkeeper.io/validated-at"
OLD = 7200  # n8 was validated this long ago: due for its periodic re-test (period 1h)


def teams_config(group: str, node: str) -> dict:
    config = {"teams": [{"team": f"tm-{group}", "nodeSelector": {"kubernetes.io/hostname": node}, "count": 1}],
              "membership": {f"tm-{group}": {"groups": [f"tm-{group}"]}}}
    return {"config.yaml": yaml.safe_dump(config),
            "options.yaml": yaml.safe_dump({"webhook": {"enabled": False}, "resyncSeconds": 5})}


async def prepare(kube, tmp_path, tag: str):
    """Nodes, pods, PDB, markers and configuration for one run; returns (namespace, nodes, fault file)."""
    group = f"{tag}{secrets.token_hex(2)}"
    ns = f"chaos-{group}"
    await kube.create(NAMESPACES, {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": ns}})
    spec = FleetSpec(nodes=9, prefix=f"ch{group}", cpu_fraction=0.0, nodes_per_rack=9)
    nodes = []
    validated = str(int(time.time()) - OLD)
    for i in range(9):
        m = node_manifest(spec, i)
        m["metadata"]["labels"][GROUP] = group
        if i == 8:
            m["metadata"]["annotations"][VALIDATED] = validated
        await kube.create(NODES, m)
        nodes.append(m["metadata"]["name"])

    async def settled():
        for name in nodes:
            n = await kube.get(NODES, name)
            if not any(c["type"] == "Ready" and c["status"] == "True" for c in n["status"].get("conditions") or []) \
                    or (n.get("spec") or {}).get("taints"):
                return False
        return True
    await wait_for(settled, 90, "nodes Ready and untainted")

    def pod(name, node, labels):
        return {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name, "namespace": ns, "labels": labels},
                "spec": {"nodeName": node, "terminationGracePeriodSeconds": 1,
                         "containers": [{"name": "c", "image": "busybox"}]}}
    for i in range(3):
        await kube.create(PODS, pod(f"rank-{i}", nodes[i], {"fleetkeeper.io/gang": "train"}), ns)
    await kube.create(PODS, pod("held", nodes[3], {"app": "held"}), ns)
    await kube.create(PODS, pod("free", nodes[3], {"app": "free"}), ns)
    await kube.create(PDBS, {"apiVersion": "policy/v1", "kind": "PodDisruptionBudget",
                             "metadata": {"name": "hold", "namespace": ns},
                             "spec": {"maxUnavailable": 0, "selector": {"matchLabels": {"app": "held"}}}}, ns)

    async def running():
        items, _ = await kube.list(PODS, ns)
        return sum(1 for p in items if (p.get("status") or {}).get("phase") == "Running") == 5
    await wait_for(running, 60, "pods Running")
    await kube.patch(NODES, nodes[4], {
        "spec": {"taints": [{"key": "fleetkeeper.io/preflight", "value": "failed", "effect": "NoSchedule"}]},
        "metadata": {"labels": {"fleetkeeper.io/preflight": "failed"},
                     "annotations": {"fleetkeeper.io/preflight-attempts": "3",
                                     "fleetkeeper.io/preflight-failed-check": "nccl"}}})
    policy = {"node_selector": {GROUP: group}, "drain": {"deadline": f"{DEADLINE}s", "retry_interval": "1s",
                                                     # only n3's terminate ladder ends at the deadline: n0's
                                                     # story must not depend on how fast its drain went
                                                     "terminate_at_deadline": False},
              "budget": {"cluster": {"max_nodes": 10}, "zone": {"max_percent": 100}, "rack": {"max_nodes": 10}},
              "storm": {"min_nodes": 50}}
    await kube.create(CONFIGMAPS, {"apiVersion": "v1", "kind": "ConfigMap",
                                   "metadata": {"name": "fleetkeeper-health", "namespace": ns},
                                   "data": {"policy.yaml": yaml.safe_dump(policy), "simulate": "true"}}, ns)
    await kube.create(CONFIGMAPS, {"apiVersion": "v1", "kind": "ConfigMap",
                                   "metadata": {"name": "fleetkeeper-lifecycle", "namespace": ns},
                                   "data": {"lifecycle.yaml": yaml.safe_dump({"node_selector": {GROUP: group}})}},
                      ns)
    await kube.create(CONFIGMAPS, {"apiVersion": "v1", "kind": "ConfigMap",
                                   "metadata": {"name": "fleetkeeper-teams", "namespace": ns},
                                   "data": teams_config(group, nodes[6])}, ns)
    preflight = {"namespace": ns, "node_selector": {GROUP: group}, "gate": {"retry_backoff_s": 1},
                 "periodic": {"period_s": 3600, "interval_s": 1, "min_idle_s": 0, "max_concurrent": 2,
                              "sim_duration_ms": 2000}}
    await kube.create(CONFIGMAPS, {"apiVersion": "v1", "kind": "ConfigMap",
                                   "metadata": {"name": "fleetkeeper-preflight", "namespace": ns},
                                   "data": {"config.yaml": yaml.safe_dump(preflight)}}, ns)
    faults = FaultPlan(tmp_path / f"faults-{group}.json")
    faults.inject(nodes[0], parse_fault("ecc"))
    faults.inject(nodes[3], parse_fault("gpu-missing"))
    return ns, nodes, faults, group, validated


def spawn(cluster, ns: str, faults: FaultPlan, log):
    env = {**os.environ, "FLEETKEEPER_FAULTS": str(faults.path)}
    return asyncio.create_subprocess_exec(
        str(Path(sys.executable).with_name("fleetkeeper")), "run", "--controllers", "health,lifecycle,teams,preflight",
        "--kubeconfig", str(cluster.kubeconfig), "--namespace", ns, "--metrics-port", "0", "--no-leader-elect",
        "--log-level", "warning", env=env, stdout=log, stderr=log)


async def final_state(kube, ns: str, nodes: list[str], validated: str) -> dict:
    out = {}
    for i, name in enumerate(nodes):
        n = await kube.get_or_none(NODES, name)
        if n is None:
            out[f"n{i}"] = "gone"
            continue
        a = n["metadata"].get("annotations") or {}
        taints = {t["key"] for t in n["spec"].get("taints") or []}
        out[f"n{i}"] = {"quarantined": Q in taints, "gated": PREFLIGHT in taints,
                        "action": a.get("fleetkeeper.io/health-action", ""),
                        "state": a.get("fleetkeeper.io/lifecycle-state", ""),
                        "team": bool((n["metadata"].get("labels") or {}).get(TEAM)) or TEAM in taints,
                        "revalidated": a.get(VALIDATED, validated) != validated if i == 8 else None}
    items, _ = await kube.list(PODS, ns)
    # n3's pods go with its machine (the pod garbage collector's timing): compared apart
    out["pods"] = sorted(p["metadata"]["name"] for p in items if not p["metadata"].get("deletionTimestamp")
                         and p["metadata"]["name"] not in ("held", "free"))
    return out


async def settled(kube, ns, nodes, validated) -> dict | None:
    """Every node's story has ended: n0 back in service, n3 and n4 gone, the team on n7, n8 re-tested,
    no rank and no test pod left."""
    st = await final_state(kube, ns, nodes, validated)
    n0, n6, n7, n8 = st["n0"], st["n6"], st["n7"], st["n8"]
    done = st["n3"] == "gone" and st["n4"] == "gone" and isinstance(n0, dict) and not n0["quarantined"] \
        and not n0["gated"] and n0["state"] == "in-service" and not n6["team"] and n7["team"] \
        and n8["revalidated"] and st["pods"] == []
    return st if done else None


async def events(kube, name: str) -> list[dict]:
    items, _ = await kube.list(EVENTS, "default", field_selector=f"regarding.name={name}")
    return items


async def move_team(kube, ns: str, nodes: list[str], group: str) -> None:
    """The team moves from n6 to n7, once n6 is the team's (what a user does: edit the ConfigMap)."""
    async def on_n6():
        n = await kube.get(NODES, nodes[6])
        return (n["metadata"].get("labels") or {}).get(TEAM) == f"tm-{group}"
    await wait_for(on_n6, 300, "the team on n6 before it moves")
    await kube.patch(CONFIGMAPS, "fleetkeeper-teams", {"data": teams_config(group, nodes[7])}, ns)


async def run_scenario(kube, cluster, tmp_path, tag: str, kills: int, log) -> tuple[dict, list[str], str]:
    ns, nodes, faults, group, validated = await prepare(kube, tmp_path, tag)
    rng = random.Random(1234 if kills else 0)
    killed = 0
    proc = await spawn(cluster, ns, faults, log)
    try:
        if not kills:
            await move_team(kube, ns, nodes, group)
        while killed < kills:
            await asyncio.sleep(rng.uniform(1.0, 4.0))  # a random point of the scenario
            proc.send_signal(signal.SIGKILL)
            await proc.wait()
            killed += 1
            proc = await spawn(cluster, ns, faults, log)
            if killed == kills // 2:  # half-way through the kills (and never counted on for the verdict)
                await move_team(kube, ns, nodes, group)
        # a generous wait for a condition, never a verdict on speed: a loaded machine only takes longer
        try:
            st = await wait_for(lambda: settled(kube, ns, nodes, validated), 600,
                                f"{tag}: the scenario's end state")
        except AssertionError as exc:
            raise AssertionError(f"{exc}; state: {await final_state(kube, ns, nodes, validated)}; events: "
                                 f"{ {n: [e['reason'] for e in await events(kube, n)] for n in nodes} }") from None
    finally:
        if proc.returncode is None:
            proc.send_signal(signal.SIGKILL)
            await proc.wait()
    return st, nodes, ns


async def test_sigkill_at_20_points_ends_like_a_clean_run_and_acts_once(kube, cluster, tmp_path):
    log = open(tmp_path / "manager.log", "wb")
    made: list[tuple[str, list[str]]] = []
    try:
        clean, clean_nodes, clean_ns = await run_scenario(kube, cluster, tmp_path, "c", 0, log)
        made.append((clean_ns, clean_nodes))
        chaos, nodes, ns = await run_scenario(kube, cluster, tmp_path, "k", KILLS, log)
        made.append((ns, nodes))
        assert chaos == clean, (chaos, clean)
        assert chaos["pods"] == [] and chaos["n5"] == {"quarantined": False, "gated": False, "action": "",
                                                       "state": "", "team": False, "revalidated": None}, chaos
        for name in nodes:
            evs = await events(kube, name)
            reasons = [e["reason"] for e in evs]
            assert reasons.count("Terminated") + reasons.count("TerminatedAtDeadline") + \
                reasons.count("Retiring") <= 1, (name, reasons)
            assert reasons.count("Quarantined") <= 1, (name, reasons)  # one first action: one deadline start
        # each machine terminated exactly once
        assert [e["reason"] for e in await events(kube, nodes[3])].count("TerminatedAtDeadline") == 1
        assert [e["reason"] for e in await events(kube, nodes[4])].count("Retiring") == 1
        # every eviction has its Event, written before it (a kill cannot come between them), naming the pods;
        # the gang's ranks are always evicted, n3's pods are asked for (held by its PDB, or gone with the node)
        announced: set[str] = set()
        for name in nodes:
            for e in await events(kube, name):
                if e["reason"] in ("Evicting", "GangEvicted"):
                    m = re.search(r"pod\(s\) through the Eviction API \([^)]*\): ([^;]*)", e["note"])
                    assert m, e["note"]
                    announced |= {k.split("/", 1)[1] for k in m.group(1).split(", ")}
        assert {"rank-0", "rank-1", "rank-2"} <= announced <= {"rank-0", "rank-1", "rank-2", "held", "free"}, \
            announced
    finally:
        log.close()
        for ns, nodes in made:
            for name in nodes:
                try:
                    await kube.delete(NODES, name)
                except errors.NotFound:
                    pass
            try:
                await kube.delete(NAMESPACES, ns)
            except errors.NotFound:
                pass
        print(json.dumps({"log": str(tmp_path / "manager.log")}))
