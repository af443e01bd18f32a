"""One admission webhook server per process, on the real local control plane: the
teams and capacity components of one manager register their webhooks on the
manager's one server (one port, one certificate), and the API server calls both
through it."""

from __future__ import annotations

import asyncio
import base64
import secrets

from prometheus_client import CollectorRegistry

from fleetkeeper.capacity.config import CapacityConfig
from fleetkeeper.capacity.controller import CapacityOptions
from fleetkeeper.capacity.controller import setup as capacity_setup
from fleetkeeper.core import errors
from fleetkeeper.core.domain import Names
from fleetkeeper.core.kube import CONFIGMAPS, MUTATING_WEBHOOKS, NAMESPACES, PODS, VALIDATING_WEBHOOKS
from fleetkeeper.core.manager import Manager
from fleetkeeper.core.settings import RuntimeSettings
from fleetkeeper.teams.controller import setup as teams_setup
from e2e_helpers import stop, wait_for

N = Names()


async def test_teams_and_capacity_share_the_managers_one_webhook_server(kube, namespace, tmp_path):
    tid = secrets.token_hex(3)
    label = "fleetkeeper.io/one-webhook-e2e"
    await kube.patch(NAMESPACES, namespace, {"metadata": {"labels": {label: tid}}})
    await kube.create(CONFIGMAPS, {"apiVersion": "v1", "kind": "ConfigMap",
                                   "metadata": {"name": "fleetkeeper-teams", "namespace": namespace},
                                   "data": {"config.yaml": "teams: []\n"}}, namespace)
    registry = CollectorRegistry()
    # (the manager's own namespace is never admitted by the teams webhook: the test's is another)
    mgr = Manager(kube, RuntimeSettings(server={"port": 0}, leader_election={"enabled": False}), registry=registry)
    teams_name, cap_name = f"fk-teams-{tid}", f"fk-capacity-{tid}"
    await teams_setup(mgr, {"configNamespace": namespace, "webhook": {
        "enabled": True, "configName": teams_name, "namespaceLabels": {label: tid}, "certDir": str(tmp_path)}})
    cap = await capacity_setup(mgr, CapacityOptions(
        config=CapacityConfig.model_validate({"balloons": {"enabled": False}, "gangs": {"webhook_port": 0}}),
        webhook_config_name=cap_name, unregister_on_exit=True,
        namespace_selector={"matchLabels": {label: tid}}))
    assert mgr.teams_webhook.webhooks is cap.webhook.webhooks  # type: ignore[attr-defined]
    task = asyncio.create_task(mgr.run())
    try:
        async def ready():
            if task.done():
                task.result()
            return mgr.teams_webhook.ready.is_set() and cap.webhook.ready.is_set()  # type: ignore[attr-defined]
        await wait_for(ready, 60, "both components' webhooks registered")
        port = mgr.webhooks.server.port
        mutating = {n: await kube.get(MUTATING_WEBHOOKS, n) for n in (teams_name, cap_name)}
        validating = await kube.get(VALIDATING_WEBHOOKS, teams_name)
        clients = [w["clientConfig"] for obj in (*mutating.values(), validating) for w in obj["webhooks"]]
        assert {c["url"].split("/")[2] for c in clients} == {f"127.0.0.1:{port}"}  # one server
        assert {base64.b64decode(c["caBundle"]) for c in clients} == {(tmp_path / "ca.crt").read_bytes()}
        # a gang member: the API server calls the teams webhooks and the gang webhook, all on that one port
        pod = {"apiVersion": "v1", "kind": "Pod",
               "metadata": {"name": "rank-0", "labels": {N.gang: "g1"}, "annotations": {N.gang_min: "1"}},
               "spec": {"containers": [{"name": "c", "image": "busybox"}]}}
        hooks = ("teams-mutate", "teams-validate", "capacity-gang")

        def calls(webhook: str) -> float:
            return sum(registry.get_sample_value("fleetkeeper_webhook_requests_total",
                                                 {"webhook": webhook, "result": r}) or 0
                       for r in ("allowed", "patched", "denied", "error"))

        async def every_hook_called():
            # the API server learns of webhook configurations through a watch of its own: server-side dry
            # runs (nothing stored) until it calls all three
            before = {w: calls(w) for w in hooks}
            try:
                await kube.create(PODS, pod, namespace, dry_run=True)
            except errors.ApiError as exc:  # the configuration not yet seen by every API server watch
                if "failed calling webhook" in str(exc):
                    return False
                raise
            return all(calls(w) > before[w] for w in hooks)
        await wait_for(every_hook_called, 60, "the API server calling all three webhooks")
        before = {w: calls(w) for w in hooks}
        made = await kube.create(PODS, pod, namespace)
        assert made["spec"].get("schedulingGroup", {}).get("podGroupName")  # the gang webhook's patch
        assert {w: calls(w) > before[w] for w in hooks} == {w: True for w in hooks}
    finally:
        await stop(task)
        for res, name in ((MUTATING_WEBHOOKS, teams_name), (VALIDATING_WEBHOOKS, teams_name),
                          (MUTATING_WEBHOOKS, cap_name)):
            try:
                await kube.delete(res, name)
            except errors.NotFound:
                pass
