"""Helpers for the teams end-to-end tests: own KWOK nodes (distinct prefix,
deleted after), the controller and webhook running in the test process, and
everything cluster-scoped this test created removed in teardown."""

from __future__ import annotations

import asyncio
import secrets
import time
from collections.abc import Callable

from prometheus_client import CollectorRegistry

from fleetkeeper.core import errors
from fleetkeeper.core.domain import Names
from fleetkeeper.core.kube import CONFIGMAPS, NAMESPACES, NODES, PODS, PRIORITYCLASSES, Kube, Resource
from fleetkeeper.core.manager import Manager
from fleetkeeper.core.settings import RuntimeSettings
from fleetkeeper.localcluster.fleet import FleetSpec, node_manifest
from fleetkeeper.teams.controller import setup
from fleetkeeper.teams.serve import unregister

ROLEBINDINGS = Resource("rbac.authorization.k8s.io", "v1", "rolebindings", "RoleBinding", True)
NAMES = Names()
WEBHOOK_LABEL = "fleetkeeper.io/teams-webhook"


async def until(pred: Callable, timeout: float = 60.0, what: str = "condition", interval: float = 0.2):
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        last = await pred()
        if last:
            return last
        await asyncio.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what} (last: {last!r})")


class TeamsEnv:
    def __init__(self, cluster, kube: Kube, namespace: str):
        self.cluster, self.kube, self.namespace = cluster, kube, namespace
        self.id = secrets.token_hex(3)
        self.select_key = f"{NAMES.domain}/teams-e2e"
        self.nodes: list[str] = []
        self.priority_classes: list[str] = []
        self.webhook_config = f"fleetkeeper-teams-{namespace}"[:63]
        self.task: asyncio.Task | None = None
        self.mgr: Manager | None = None
        self.users: dict[str, Kube] = {}

    async def setup(self) -> None:
        try:
            await self.kube.create(NAMESPACES, {"apiVersion": "v1", "kind": "Namespace",
                                                "metadata": {"name": "fleetkeeper-system"}})
        except errors.Conflict:
            pass
        await self.kube.patch(NAMESPACES, self.namespace, {"metadata": {"labels": {WEBHOOK_LABEL: "enabled"}}})
        await self.kube.create(ROLEBINDINGS, {
            "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding",
            "metadata": {"name": "researchers-edit", "namespace": self.namespace},
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": "edit"},
            "subjects": [{"apiGroup": "rbac.authorization.k8s.io", "kind": "Group", "name": "researchers"}],
        }, self.namespace)

    async def user(self, name: str) -> Kube:
        if name not in self.users:
            self.users[name] = await Kube.connect(str(self.cluster.user_kubeconfig(name)))
        return self.users[name]

    async def create_nodes(self, n: int) -> list[str]:
        spec = FleetSpec(nodes=n, cpu_fraction=0.0, prefix=f"tm{self.id}")
        created = []
        for i in range(n):
            m = node_manifest(spec, i)
            m["metadata"]["labels"][self.select_key] = self.id
            await self.kube.create(NODES, m)
            created.append(m["metadata"]["name"])
            self.nodes.append(m["metadata"]["name"])

        async def ready():
            items, _ = await self.kube.list(NODES, label_selector=f"{self.select_key}={self.id}")
            return sum(1 for i in items for c in i["status"].get("conditions") or []
                       if c["type"] == "Ready" and c["status"] == "True") == n

        await until(ready, 60, "own nodes Ready")
        return created

    async def priority_class(self, value: int) -> str:
        name = f"teams-{self.id}-{'low' if value < 0 else 'p'}{abs(value)}"
        await self.kube.create(PRIORITYCLASSES, {"apiVersion": "scheduling.k8s.io/v1", "kind": "PriorityClass",
                                                 "metadata": {"name": name}, "value": value,
                                                 "preemptionPolicy": "PreemptLowerPriority"})
        self.priority_classes.append(name)
        return name

    def selector(self) -> dict:
        return {self.select_key: self.id}

    async def write_config(self, text: str) -> None:
        body = {"apiVersion": "v1", "kind": "ConfigMap",
                "metadata": {"name": "fleetkeeper-teams", "namespace": self.namespace}, "data": {"config.yaml": text}}
        await self.kube.apply(CONFIGMAPS, body)

    async def start(self, webhook: bool = True) -> Manager:
        settings = RuntimeSettings(server={"port": 0}, leader_election={"enabled": False})
        mgr = Manager(self.kube, settings, registry=CollectorRegistry())
        await setup(mgr, {"configNamespace": self.namespace, "resyncSeconds": 30,
                          "webhook": {"enabled": webhook, "configName": self.webhook_config,
                                      "namespaceLabels": {WEBHOOK_LABEL: "enabled"}}})
        self.mgr = mgr
        self.task = asyncio.create_task(mgr.run(), name=f"teams-manager-{self.id}")
        if webhook:
            await until(lambda: self._ready(mgr), 60, "webhook registered")
        return mgr

    async def _ready(self, mgr):
        if self.task is not None and self.task.done():
            self.task.result()
            raise AssertionError("the manager exited")
        return mgr.teams_webhook.ready.is_set()

    async def stop(self) -> None:
        if self.task is not None:
            self.task.cancel()
            await asyncio.gather(self.task, return_exceptions=True)
            self.task = None

    async def node_teams(self) -> dict[str, tuple[str, list[str]]]:
        """node -> (team label, [team taint values])"""
        items, _ = await self.kube.list(NODES, label_selector=f"{self.select_key}={self.id}")
        return {i["metadata"]["name"]: ((i["metadata"].get("labels") or {}).get(NAMES.team, ""),
                                        [t.get("value", "") for t in (i["spec"].get("taints") or [])
                                         if t["key"] == NAMES.team])
                for i in items}

    async def counts(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for label, taints in (await self.node_teams()).values():
            assert len(taints) <= 1, "a node carries two team taints"
            assert (taints[0] if taints else "") == label, "team label and taint disagree"
            if label:
                out[label] = out.get(label, 0) + 1
        return out

    def pod(self, name: str, *, gpus: int = 8, priority_class: str | None = None, tolerations=None,
            labels=None) -> dict:
        spec: dict = {"containers": [{"name": "main", "image": "trainer:latest",
                                      "resources": {"limits": {"nvidia.com/gpu": str(gpus)},
                                                    "requests": {"nvidia.com/gpu": str(gpus)}}}],
                      "nodeSelector": self.selector(), "terminationGracePeriodSeconds": 0}
        if priority_class:
            spec["priorityClassName"] = priority_class
        if tolerations is not None:
            spec["tolerations"] = tolerations
        return {"apiVersion": "v1", "kind": "Pod",
                "metadata": {"name": name, "namespace": self.namespace, "labels": labels or {}}, "spec": spec}

    async def teardown(self) -> None:
        await self.stop()
        try:
            await unregister(self.kube, self.webhook_config)
        except errors.FleetkeeperError:
            pass
        for k in self.users.values():
            await k.close()
        try:
            pods, _ = await self.kube.list(PODS, self.namespace)
            for p in pods:
                await self.kube.delete(PODS, p["metadata"]["name"], self.namespace, grace_period=0)
        except errors.FleetkeeperError:
            pass
        for n in self.nodes:
            try:
                await self.kube.delete(NODES, n)
            except errors.NotFound:
                pass
        for pc in self.priority_classes:
            try:
                await self.kube.delete(PRIORITYCLASSES, pc)
            except errors.NotFound:
                pass
