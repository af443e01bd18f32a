"""Helpers for the capacity end-to-end tests: private nodes (own pool label
and an isolation taint, so other tests' pods never land there and "100% of the
GPU nodes" means 100% of these nodes) and the capacity controllers running in
the test process against the shared control plane."""

from __future__ import annotations

import secrets
from dataclasses import dataclass, field

import pytest
from prometheus_client import CollectorRegistry

from fleetkeeper.capacity.config import CapacityConfig
from fleetkeeper.capacity.controller import Capacity, CapacityOptions, setup
from fleetkeeper.core import errors
from fleetkeeper.core.domain import Names
from fleetkeeper.core.kube import JOBS, MUTATING_WEBHOOKS, NODES, PODGROUPS, PODS, WORKLOADS, Kube, build_request
from fleetkeeper.core.manager import Manager
from fleetkeeper.core.settings import RuntimeSettings
from fleetkeeper.localcluster.cluster import node_ready
from fleetkeeper.localcluster.fleet import FleetSpec, node_manifest

from e2e_helpers import wait_for  # noqa: F401  (the shared poll, re-exported for the capacity tests)

NAMES = Names()
ISOLATION_TAINT = "fleetkeeper.io/e2e-capacity"


@dataclass
class Pool:
    pool: str
    nodes: list[str]
    toleration: dict
    kube: Kube
    extra_taints: dict[str, dict] = field(default_factory=dict)

    def pod_spec(self, gpus: int = 8, tolerations: list[dict] | None = None) -> dict:
        return {
            "nodeSelector": {NAMES.pool: self.pool},
            "tolerations": [self.toleration, *(tolerations or [])],
            "terminationGracePeriodSeconds": 0,
            "containers": [{"name": "train", "image": "trainer:latest",
                            "resources": {"limits": {"nvidia.com/gpu": str(gpus)}}}],
        }


async def pods_of(kube: Kube, ns: str, selector: str) -> list[dict]:
    items, _ = await kube.list(PODS, ns, label_selector=selector)
    return [p for p in items if not p["metadata"].get("deletionTimestamp")]


async def balloons_on_every_node(kube: Kube, ns: str, pool: str, n: int, timeout: float = 90.0,
                                 what: str = "a balloon on every node") -> list[dict]:
    """Wait until ``n`` balloons of ``pool`` run (one a node); returns them."""
    async def running():
        pods = [p for p in await pods_of(kube, ns, f"{NAMES.balloon}={pool}") if p["status"].get("phase") == "Running"]
        return pods if len(pods) == n else None
    return await wait_for(running, timeout, what=what)


def bound(pods: list[dict]) -> list[dict]:
    return [p for p in pods if p["spec"].get("nodeName")]


async def delete_jobs(kube: Kube, ns: str) -> None:
    items, _ = await kube.list(JOBS, ns)
    for j in items:
        try:
            await kube.request(build_request(
                "delete", JOBS, namespace=ns, name=j["metadata"]["name"],
                body={"propagationPolicy": "Background"}))
        except errors.NotFound:
            pass


def gang_member(gang: str, i: int, size: int, spec: dict) -> dict:
    """A bare pod of gang ``gang`` (``<gang>-<i>``) declaring its size (``gang-min-members``)."""
    return {"apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": f"{gang}-{i}", "labels": {NAMES.gang: gang},
                         "annotations": {NAMES.gang_min: str(size)}},
            "spec": spec}


async def wait_held(kube: Kube, ns: str, gang: str, size: int, what: str) -> str:
    """Wait until fleetkeeper's message on the gang's Workload says it is held until its room is free."""
    async def held():
        wl = await kube.get_or_none(WORKLOADS, gang, ns)
        msg = ((wl or {}).get("metadata", {}).get("annotations") or {}).get(f"{NAMES.domain}/gang-message", "")
        return msg if f"until room for all {size} members is free" in msg else None
    return await wait_for(held, 60, what=what)


async def wait_gang_bound(kube: Kube, ns: str, gang: str, n: int, what: str, timeout: float = 120.0) -> None:
    """Wait until ``n`` members of gang ``gang`` are bound; on a timeout, the failure shows the namespace's
    pods and group objects as they were (what a stuck gang's cause is read from)."""
    async def placed():
        return len(bound(await pods_of(kube, ns, f"{NAMES.gang}={gang}"))) == n
    try:
        await wait_for(placed, timeout, what=what)
    except AssertionError as exc:
        raise AssertionError(f"{exc}\n{await gang_state_dump(kube, ns)}") from None


async def gang_state_dump(kube: Kube, ns: str) -> str:
    """The namespace's pods (node, gates, PodScheduled condition) and group objects (fleetkeeper's
    annotations, the scheduler's status), one line each."""
    lines = []
    items, _ = await kube.list(PODS, ns)
    for p in items:
        cond = next((c for c in (p.get("status") or {}).get("conditions") or () if c.get("type") == "PodScheduled"),
                    {})
        gates = [g.get("name") for g in p["spec"].get("schedulingGates") or ()]
        lines.append(f"pod {p['metadata']['name']}: node={p['spec'].get('nodeName')} gates={gates} "
                     f"deleting={bool(p['metadata'].get('deletionTimestamp'))} "
                     f"scheduled={cond.get('status')}/{cond.get('reason')}: {cond.get('message')}")
    for res in (WORKLOADS, PODGROUPS):
        try:
            objs, _ = await kube.list(res, ns)
        except errors.ApiError as exc:  # the API is not served on this control plane
            lines.append(f"{res.kind}: {exc}")
            continue
        for o in objs:
            ann = {k: v for k, v in (o["metadata"].get("annotations") or {}).items() if NAMES.domain in k}
            lines.append(f"{res.kind} {o['metadata']['name']}: annotations={ann} spec={o.get('spec')} "
                         f"status={o.get('status')}")
    return "\n".join(lines)
