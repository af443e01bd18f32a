"""The Helm chart against the real API server, without a kubelet: every object it
renders passes the server's own validation (server-side dry-run, the schema check),
the teams and relay identities are enough and each of their rules needed, and no identity of the
chart can patch arbitrary pods, touch webhook configurations or read Secrets other
than its own. (Health and preflight identities: tests/e2e/health and tests/e2e/preflight.)"""

from __future__ import annotations

import asyncio
import secrets
import sys
from pathlib import Path

import pytest
import yaml
from prometheus_client import CollectorRegistry

from fleetkeeper.core import errors
from fleetkeeper.core.domain import Names
from fleetkeeper.core.kube import (
    CLUSTERROLEBINDINGS, CLUSTERROLES, CONFIGMAPS, DAEMONSETS, DEPLOYMENTS, LEASES, MUTATING_WEBHOOKS, NAMESPACES,
    NODES, PDBS, PRIORITYCLASSES, SECRETS, SERVICEACCOUNTS, SERVICES, SUBJECT_ACCESS_REVIEWS, VALIDATING_WEBHOOKS,
    Resource,
)
from fleetkeeper.core.manager import Manager
from fleetkeeper.core.settings import RuntimeSettings
from fleetkeeper.localcluster.fleet import FleetSpec, node_manifest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "chart"))
from chartlib import ALL_OPTIONS, NAMESPACE, by_kind  # noqa: E402
from rbac_audit import ROLEBINDINGS, ROLES, apply_rbac, audit, chart_docs, service_account  # noqa: E402

KINDS = {r.kind: r for r in (SERVICEACCOUNTS, CLUSTERROLES, CLUSTERROLEBINDINGS, ROLES, ROLEBINDINGS, CONFIGMAPS,
                             SECRETS, SERVICES, DEPLOYMENTS, DAEMONSETS, PDBS, PRIORITYCLASSES, MUTATING_WEBHOOKS,
                             VALIDATING_WEBHOOKS)}


async def until(pred, timeout: float = 60.0, what: str = "condition"):
    for _ in range(int(timeout / 0.2)):
        if await pred():
            return
        await asyncio.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


async def test_every_rendered_object_passes_server_side_validation(kube):
    docs = chart_docs(ALL_OPTIONS)
    if await kube.get_or_none(NAMESPACES, NAMESPACE) is None:
        await kube.create(NAMESPACES, {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": NAMESPACE}})
    kinds = set()
    for d in docs:
        res = KINDS.get(d["kind"])
        assert res is not None, f"no check for kind {d['kind']}"
        try:
            await kube.create(res, d, d["metadata"].get("namespace"), dry_run=True)
        except errors.Conflict:
            # it exists (another test applied the RBAC): the server validates the update instead
            await kube.patch(res, d["metadata"]["name"], d, d["metadata"].get("namespace"), patch_type="apply",
                             force=True, dry_run=True)
        kinds.add(d["kind"])
    assert {"Deployment", "DaemonSet", "MutatingWebhookConfiguration", "ValidatingWebhookConfiguration",
            "PodDisruptionBudget", "Role", "ClusterRole"} <= kinds


async def test_a_broken_object_is_refused_by_the_check(kube):
    """The check can fail: the API server refuses what the chart must never render."""
    deploy = by_kind(chart_docs(), "Deployment")["fleetkeeper-teams"]
    deploy["spec"]["template"]["spec"]["containers"][0]["ports"][0]["containerPort"] = 70000
    with pytest.raises(errors.ApiError):
        await kube.create(DEPLOYMENTS, deploy, NAMESPACE, dry_run=True)


async def test_teams_identity_is_enough_and_each_rule_needed(kube, tmp_path):
    from fleetkeeper.teams.controller import setup

    docs = chart_docs()
    await apply_rbac(kube, docs)
    tid = secrets.token_hex(3)
    label = "fleetkeeper.io/test-chart-teams"
    spec = FleetSpec(nodes=2, cpu_fraction=0.0, prefix=f"ct{tid}")
    nodes = []
    for i in range(2):
        m = node_manifest(spec, i, Names())
        m["metadata"]["labels"][label] = tid
        nodes.append(m)
    for n in nodes:
        await kube.create(NODES, n)
    config = {"teams": [{"team": f"t{tid}", "nodeSelector": {label: tid}, "count": 1}],
              "membership": {f"t{tid}": {"groups": [f"t{tid}"]}}}
    options = {"webhook": {"enabled": True, "host": "127.0.0.1", "port": 0, "register": False,
                           "certDir": str(tmp_path)}}
    await kube.apply(CONFIGMAPS, {"apiVersion": "v1", "kind": "ConfigMap",
                                  "metadata": {"name": "fleetkeeper-teams", "namespace": NAMESPACE},
                                  "data": {"config.yaml": yaml.safe_dump(config),
                                           "options.yaml": yaml.safe_dump(options)}})
    teams = service_account(kube, "fleetkeeper-teams")
    mgr = Manager(teams, RuntimeSettings(namespace=NAMESPACE, server={"port": 0},
                                         leader_election={"enabled": True, "lease_name": "fleetkeeper-teams"}),
                  registry=CollectorRegistry(), identity=f"test-{tid}")
    await setup(mgr, None)
    task = asyncio.create_task(mgr.run())
    try:
        async def assigned():
            got = [await kube.get(NODES, n["metadata"]["name"]) for n in nodes]
            return sum(1 for g in got if (g["metadata"].get("labels") or {}).get("fleetkeeper.io/team") == f"t{tid}") == 1
        await until(assigned, 60, "one node assigned to the team by the teams identity")

        async def status_written():
            cm = await kube.get_or_none(CONFIGMAPS, "fleetkeeper-teams-status", NAMESPACE)
            return cm is not None and f"t{tid}" in cm["data"]["status.json"]
        await until(status_written, 30, "the status ConfigMap")
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        for res, name, ns in ((CONFIGMAPS, "fleetkeeper-teams", NAMESPACE),
                              (CONFIGMAPS, "fleetkeeper-teams-status", NAMESPACE),
                              (LEASES, "fleetkeeper-teams", NAMESPACE),
                              *((NODES, n["metadata"]["name"], None) for n in nodes)):
            try:
                await kube.delete(res, name, ns)
            except errors.NotFound:
                pass
    forbidden, unneeded = audit(docs, "fleetkeeper-teams", teams.calls)
    assert not forbidden, f"refused: {forbidden}"
    assert not unneeded, f"rules none of its requests needed: {unneeded}"


async def test_relay_identity_is_enough_and_each_rule_needed(kube):
    """The relay as the chart runs it (the ConfigMap's relay: section), under its own identity:
    the manager's check of its namespace, the three watches and a TokenReview are allowed,
    and every rule the chart grants it is needed by one of them."""
    import aiohttp

    from fleetkeeper.relay.controller import add_relay
    from fleetkeeper.relay.settings import parse_config

    values = {"relay": {"enabled": True, "expectedAgents": 10}}
    docs = chart_docs(values)
    await apply_rbac(kube, docs)
    rs = parse_config(by_kind(docs, "ConfigMap")["fleetkeeper-relay"]["data"]["config.yaml"], "chart").relay
    # on loopback and a free port here; tokenreview: what --auth tokenreview needs of the API server
    rs = rs.model_copy(update={"host": "127.0.0.1", "port": 0, "auth": "tokenreview"})
    relay = service_account(kube, "fleetkeeper-relay")
    mgr = Manager(relay, RuntimeSettings(namespace=NAMESPACE, server={"port": 0},
                                         leader_election={"enabled": False}), registry=CollectorRegistry())
    handle = add_relay(mgr, rs)
    task = asyncio.create_task(mgr.run())
    try:
        async def synced():
            assert not task.done(), task.exception()
            return handle.synced() and handle.server.port != 0
        await until(synced, 60, "the relay's three watches synced under its identity")
        tr = await kube.create(SERVICEACCOUNTS, {"apiVersion": "authentication.k8s.io/v1", "kind": "TokenRequest",
                                                 "spec": {"expirationSeconds": 600}},
                               NAMESPACE, subresource="token", name="fleetkeeper-relay")
        async with aiohttp.ClientSession() as http:
            async with http.get(f"http://127.0.0.1:{handle.server.port}/v1/nodes/no-such-node/pods",
                                headers={"Authorization": f"Bearer {tr['status']['token']}"}) as resp:
                assert resp.status == 403  # reviewed: a valid token, but not this node's agent
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
    forbidden, unneeded = audit(docs, "fleetkeeper-relay", relay.calls)
    assert not forbidden, f"refused: {forbidden}"
    assert not unneeded, f"rules none of its requests needed: {unneeded}"


# --- what no identity of the chart may do ----------------------------------------------
FORBIDDEN = [
    ("patch a pod anywhere", {"verb": "patch", "resource": "pods", "namespace": "default", "name": "x"}),
    ("patch a pod in its own namespace", {"verb": "patch", "resource": "pods", "namespace": NAMESPACE, "name": "x"}),
    ("create a mutating webhook configuration", {"verb": "create", "group": "admissionregistration.k8s.io",
                                                 "resource": "mutatingwebhookconfigurations"}),
    ("change the chart's webhook configuration", {"verb": "patch", "group": "admissionregistration.k8s.io",
                                                  "resource": "validatingwebhookconfigurations",
                                                  "name": "fleetkeeper-teams"}),
    ("read another Secret in its namespace", {"verb": "get", "resource": "secrets", "namespace": NAMESPACE,
                                              "name": "fleetkeeper-webhook-ca"}),
    ("list Secrets", {"verb": "list", "resource": "secrets", "namespace": NAMESPACE}),
    ("read a Secret elsewhere", {"verb": "get", "resource": "secrets", "namespace": "kube-system", "name": "x"}),
    ("create a Deployment elsewhere", {"verb": "create", "group": "apps", "resource": "deployments",
                                       "namespace": "default"}),
    ("bind a role", {"verb": "create", "group": "rbac.authorization.k8s.io", "resource": "rolebindings",
                     "namespace": NAMESPACE}),
    ("impersonate", {"verb": "impersonate", "resource": "users"}),
]

CAPACITY_POD_WRITES = {("fleetkeeper-capacity", "patch a pod anywhere"),
                       ("fleetkeeper-capacity", "patch a pod in its own namespace")}


async def _allowed(kube, user: str, attrs: dict) -> bool:
    ra = {"group": attrs.get("group", ""), "version": "*", **{k: v for k, v in attrs.items() if k != "group"}}
    review = await kube.create(SUBJECT_ACCESS_REVIEWS, {
        "apiVersion": "authorization.k8s.io/v1", "kind": "SubjectAccessReview",
        "spec": {"user": user, "groups": ["system:serviceaccounts", f"system:serviceaccounts:{NAMESPACE}",
                                          "system:authenticated"], "resourceAttributes": ra}})
    return bool(review["status"].get("allowed"))


async def test_no_identity_can_escalate(kube):
    docs = chart_docs(ALL_OPTIONS)
    await apply_rbac(kube, docs, support=False)
    sas = sorted(by_kind(docs, "ServiceAccount"))
    assert len(sas) == 9
    problems = []
    for sa in sas:
        user = f"system:serviceaccount:{NAMESPACE}:{sa}"
        for what, attrs in FORBIDDEN:
            if (sa, what) in CAPACITY_POD_WRITES:
                continue
            if await _allowed(kube, user, attrs):
                problems.append(f"{sa} may {what}")
    assert not problems, problems
    # the one documented exception (docs/helm.md): capacity changes pending pods (the reservation toleration of
    # a gang that waited too long, a balloon's release mark, the requeue pod of a gang the scheduler stopped
    # trying); it holds exactly that, and no other identity does
    for sa, what in CAPACITY_POD_WRITES:
        attrs = dict(FORBIDDEN)[what]
        assert await _allowed(kube, f"system:serviceaccount:{NAMESPACE}:{sa}", attrs), (sa, what)
    # and the check can say yes: each identity may do what it is for
    assert await _allowed(kube, f"system:serviceaccount:{NAMESPACE}:fleetkeeper-preflight",
                          {"verb": "get", "resource": "secrets", "namespace": NAMESPACE,
                           "name": "fleetkeeper-preflight-key"})
    assert await _allowed(kube, f"system:serviceaccount:{NAMESPACE}:fleetkeeper-health-agent",
                          {"verb": "patch", "resource": "nodes", "subresource": "status", "name": "n1"})
