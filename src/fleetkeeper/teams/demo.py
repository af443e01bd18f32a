"""Demo: three teams share the GPU pool; researchers submit pods as themselves."""

from __future__ import annotations

import asyncio
import time

from fleetkeeper.core import errors
from fleetkeeper.core.domain import SYSTEM_NAMESPACE
from fleetkeeper.core.kube import CONFIGMAPS, NAMESPACES, NODES, PODS, PRIORITYCLASSES, Kube, Resource
from fleetkeeper.core.outcome import Outcome

ROLEBINDINGS = Resource("rbac.authorization.k8s.io", "v1", "rolebindings", "RoleBinding", True)
NS = "teams-demo"


def _config(a: int, b: int, c: int, domain: str) -> str:
    return f"""teams:
  - {{team: team-a, nodeSelector: {{{domain}/pool: gpu, topology.kubernetes.io/zone: zone-a}}, count: {a}}}
  - {{team: team-b, nodeSelector: {{{domain}/pool: gpu}}, count: {b}}}
  - {{team: team-c, nodeSelector: {{{domain}/pool: gpu}}, count: {c}}}
membership:
  team-a: {{groups: [team-a]}}
  team-b: {{groups: [team-b]}}
  team-c: {{groups: [team-c]}}
lowPriority: {{below: 0}}
"""


async def _ensure(kube: Kube, res, body: dict, ns: str | None = None) -> None:
    try:
        await kube.create(res, body, ns)
    except errors.Conflict:
        pass


async def _team_counts(kube: Kube, key: str) -> dict[str, int]:
    nodes, _ = await kube.list(NODES, label_selector=key)
    out: dict[str, int] = {}
    for n in nodes:
        t = n["metadata"]["labels"][key]
        out[t] = out.get(t, 0) + 1
    return out


async def _wait(pred, timeout: float):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        r = await pred()
        if r:
            return r
        await asyncio.sleep(0.5)
    return None


def _pod(name: str, gpus: int, pcn: str | None = None, tolerations=None) -> dict:
    spec: dict = {"containers": [{"name": "train", "image": "trainer:latest",
                                  "resources": {"limits": {"nvidia.com/gpu": str(gpus)}}}],
                  "terminationGracePeriodSeconds": 0}
    if pcn:
        spec["priorityClassName"] = pcn
    if tolerations:
        spec["tolerations"] = tolerations
    return {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name, "namespace": NS}, "spec": spec}


async def demo(ctx) -> Outcome:
    kube: Kube = ctx.kube
    outcome = Outcome()
    names = ctx.names
    gpu_nodes = max(3, int(ctx.nodes * 0.9))
    a, b, c = max(1, gpu_nodes // 10), max(1, gpu_nodes // 5), max(1, gpu_nodes // 10)
    await _ensure(kube, NAMESPACES, {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": SYSTEM_NAMESPACE}})
    await kube.apply(CONFIGMAPS, {"apiVersion": "v1", "kind": "ConfigMap",
                                  "metadata": {"name": "fleetkeeper-teams", "namespace": SYSTEM_NAMESPACE},
                                  "data": {"config.yaml": _config(a, b, c, names.domain)}})
    want = {"team-a": a, "team-b": b, "team-c": c}
    ctx.report(f"ConfigMap: team-a {a} nodes in zone-a, team-b {b}, team-c {c} (GPU pool); "
               "team-a's selector is more specific, so it is served first")
    t0 = time.monotonic()
    # one write per team node (2,700 at 7,500 nodes), at most writes.perSecond and a round trip each: the
    # wait grows with the nodes to write (60 s + 1 s per 20)
    got = await _wait(lambda: _counts_match(kube, names.team, want), 60 + (a + b + c) / 20)
    outcome.expect(got, "each team's nodes tainted and labelled as configured")
    ctx.report(f"team taints+labels in place after {time.monotonic() - t0:.1f}s: "
               f"{got or await _team_counts(kube, names.team)}")

    await _ensure(kube, NAMESPACES, {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": NS}})
    await _ensure(kube, ROLEBINDINGS, {
        "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding",
        "metadata": {"name": "researchers-edit", "namespace": NS},
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": "edit"},
        "subjects": [{"apiGroup": "rbac.authorization.k8s.io", "kind": "Group", "name": "researchers"}]}, NS)
    await _ensure(kube, PRIORITYCLASSES, {"apiVersion": "scheduling.k8s.io/v1", "kind": "PriorityClass",
                                          "metadata": {"name": "teams-demo-low"}, "value": -100})
    users = {u: await Kube.connect(str(ctx.cluster.user_kubeconfig(u))) for u in ("alice", "bob", "carol", "mallory")}
    try:
        plan = [("alice", "alice-train", 8, None), ("bob", "bob-train", 8, None), ("carol", "carol-train", 8, None),
                ("mallory", "mallory-notebook", 1, None), ("carol", "carol-sweep", 8, "teams-demo-low")]
        for user, name, gpus, pcn in plan:
            body = _pod(name, gpus, pcn)
            if pcn:  # the borrower asks for team-b's idle nodes explicitly, to show borrowing
                body["spec"]["nodeSelector"] = {names.team: "team-b"}
            try:
                await users[user].create(PODS, body, NS)
            except errors.ApiError as exc:
                ctx.report(f"{user}: {name} refused: {exc.message}")
        try:
            await users["alice"].create(PODS, _pod("alice-sneaky", 8, tolerations=[
                {"key": names.team, "operator": "Equal", "value": "team-b", "effect": "NoSchedule"}]), NS)
            ctx.report("alice: a pod with team-b's toleration was ADMITTED (unexpected)")
            outcome.expect(False, "a hand-written toleration of another team is rejected")
        except errors.ApiError as exc:
            ctx.report(f"alice: pod with a hand-written team-b toleration rejected: {exc.message[:140]}")
            outcome.expect(True, "a hand-written toleration of another team is rejected")

        async def all_running():
            pods, _ = await kube.list(PODS, NS)
            return pods if pods and all(p["status"].get("phase") == "Running" for p in pods) else None

        running = await _wait(all_running, 45)
        pods = running or (await kube.list(PODS, NS))[0]
        outcome.expect(running, "every admitted pod runs (the borrower on another team's idle node)",
                       ", ".join(p["metadata"]["name"] for p in pods if p["status"].get("phase") != "Running"))
        nodes, _ = await kube.list(NODES)
        team_of = {n["metadata"]["name"]: (n["metadata"].get("labels") or {}).get(names.team, "") for n in nodes}
        for p in sorted(pods, key=lambda p: p["metadata"]["name"]):
            node = p["spec"].get("nodeName", "")
            tol = [t.get("value") or "any" for t in p["spec"].get("tolerations") or [] if t.get("key") == names.team]
            ctx.report(f"{p['metadata']['name']}: toleration {tol or 'none'} -> "
                       f"{node or 'pending'} ({'team ' + team_of[node] if team_of.get(node) else 'untainted node'})")
        # a count change moves only what must move
        before = _writes(ctx.registry)
        labels_before = await _node_teams(kube, names.team)
        await kube.apply(CONFIGMAPS, {"apiVersion": "v1", "kind": "ConfigMap",
                                      "metadata": {"name": "fleetkeeper-teams", "namespace": SYSTEM_NAMESPACE},
                                      "data": {"config.yaml": _config(a, b + 3, max(0, c - 2), names.domain)}})
        want2 = {"team-a": a, "team-b": b + 3, **({"team-c": c - 2} if c > 2 else {})}
        got = await _wait(lambda: _counts_match(kube, names.team, want2), 60)
        outcome.expect(got, "a count change is applied")
        labels_after = await _node_teams(kube, names.team)
        changed = sum(1 for n, t in labels_after.items() if labels_before.get(n, "") != t)
        ctx.report(f"count change team-b +3, team-c -2 -> {got or await _team_counts(kube, names.team)}; "
                   f"{changed} node(s) changed team, node writes: {_writes(ctx.registry) - before:.0f}")
        ctx.report("see: fleetkeeper teams status, fleetkeeper explain pod teams-demo/carol-sweep")
    finally:
        for k in users.values():
            await k.close()
    return outcome


async def _node_teams(kube: Kube, key: str) -> dict[str, str]:
    nodes, _ = await kube.list(NODES)
    return {n["metadata"]["name"]: (n["metadata"].get("labels") or {}).get(key, "") for n in nodes}


def _writes(registry) -> float:
    total = 0.0
    for metric in registry.collect():
        if metric.name == "fleetkeeper_teams_node_writes":
            total += sum(s.value for s in metric.samples
                         if s.name.endswith("_total") and s.labels.get("result") == "ok")
    return total


async def _counts_match(kube: Kube, key: str, want: dict[str, int]):
    got = await _team_counts(kube, key)
    return got if got == want else None
