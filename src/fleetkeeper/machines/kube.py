"""Providers whose machines are Kubernetes objects: the Node itself (local
clusters), a Cluster API Machine, a Karpenter NodeClaim.

Each finds the object that owns the node, then deletes it with a UID
precondition (exactly the object it looked at, never a successor with the
same name).
"""

from __future__ import annotations

from fleetkeeper.core import errors
from fleetkeeper.core.kube import NODES, Kube, Resource
from fleetkeeper.machines.base import Machine, Outcome

# Cluster API v1.14 serves v1beta1 and v1beta2 (storage); Karpenter v1 serves v1.
MACHINES = Resource("cluster.x-k8s.io", "v1beta2", "machines", "Machine", True)
MACHINESETS = Resource("cluster.x-k8s.io", "v1beta2", "machinesets", "MachineSet", True)
NODECLAIMS = Resource("karpenter.sh", "v1", "nodeclaims", "NodeClaim", False)

CAPI_MACHINE_ANNOTATION = "cluster.x-k8s.io/machine"  # set by Cluster API on the Node
CAPI_NAMESPACE_ANNOTATION = "cluster.x-k8s.io/cluster-namespace"
CAPI_REMEDIATE_ANNOTATION = "cluster.x-k8s.io/remediate-machine"  # MachineHealthCheck's manual remediation


def _api(name: str, m: Machine, exc: errors.ApiError) -> errors.MachineError:
    if isinstance(exc, errors.NotFound):
        return errors.MachineNotFound(name, m.node, exc.message or "not found")
    if isinstance(exc, errors.TooManyRequests):
        return errors.MachineThrottled(name, m.node, exc.message or "throttled", max(5.0, exc.retry_after))
    if isinstance(exc, (errors.Forbidden, errors.Unauthorized)):
        return errors.MachineForbidden(name, m.node, exc.message or "forbidden")
    return errors.MachineFailed(name, m.node, str(exc))


def _unsupported(name: str, m: Machine, verb: str) -> errors.MachineUnsupported:
    return errors.MachineUnsupported(name, m.node, f"{verb} is not something this provider can do")


class KubernetesNodeProvider:
    """Deletes the Node object: the local control plane's machines are Node objects. On a real
    cloud the VM keeps running and its kubelet registers again, so this provider is refused
    for nodes with a cloud providerID unless it was chosen explicitly (``allow_real=True``)."""

    name = "kubernetes-node"
    actions = frozenset({"terminate", "replace"})
    deletes_node = True

    def __init__(self, kube: Kube, *, allow_real: bool = False):
        self.kube = kube
        self.allow_real = allow_real

    def _check(self, m: Machine) -> None:
        if m.provider_id and not m.provider_id.startswith("kwok://") and not self.allow_real:
            raise errors.MachineUnsupported(
                self.name, m.node, f"the node runs on {m.provider_id}: deleting its Node object would leave the "
                "machine running; choose that platform's provider, or this one explicitly (allow_real: true)")

    async def terminate(self, m: Machine, *, dry_run: bool = False) -> Outcome:
        self._check(m)
        try:
            await self.kube.delete(NODES, m.node, dry_run=dry_run,
                                   preconditions={"uid": m.node_uid} if m.node_uid else None)
        except errors.NotFound:
            return Outcome("terminate", "node already gone", dry_run, gone=True)
        except errors.Conflict:  # the uid precondition: a new Node of that name is another machine
            return Outcome("terminate", "node already gone (a new Node has its name)", dry_run, gone=True)
        except errors.ApiError as exc:
            raise _api(self.name, m, exc) from exc
        return Outcome("terminate", "deleted the Node object" + (" (dry-run)" if dry_run else ""), dry_run,
                       gone=not dry_run)

    async def replace(self, m: Machine, *, dry_run: bool = False) -> Outcome:
        out = await self.terminate(m, dry_run=dry_run)
        return Outcome("replace", out.message, dry_run, out.gone)

    async def reboot(self, m: Machine, *, dry_run: bool = False) -> Outcome:
        raise _unsupported(self.name, m, "reboot")

    async def exists(self, m: Machine) -> bool | None:
        try:
            n = await self.kube.get(NODES, m.node)
        except errors.NotFound:
            return False
        return not m.node_uid or (n.get("metadata") or {}).get("uid") == m.node_uid


class ClusterApiProvider:
    """The Node's Cluster API Machine: deleted (``mode: delete``), so its MachineSet or
    MachineDeployment creates a new one, or annotated ``cluster.x-k8s.io/remediate-machine``
    (``mode: remediate``) so a MachineHealthCheck remediates it (its owner, or an external
    remediation template). ``kube`` reaches the management cluster (where the Machines are)."""

    name = "cluster-api"
    actions = frozenset({"terminate", "replace"})
    deletes_node = True  # the Machine controller drains and deletes the Node

    def __init__(self, kube: Kube, *, mode: str = "delete", namespace: str | None = None):
        if mode not in ("delete", "remediate"):
            raise errors.ConfigError("machines", [("cluster_api.mode", mode, "expected delete or remediate")])
        self.kube = kube
        self.mode = mode
        self.namespace = namespace  # where to look when the node carries no namespace annotation

    async def find(self, m: Machine) -> dict:
        """The Machine of the node: named by the node's Cluster API annotations (and checked against
        its providerID), else the one whose spec.providerID or status.nodeRef names the node."""
        name = m.annotations.get(CAPI_MACHINE_ANNOTATION)
        ns = m.annotations.get(CAPI_NAMESPACE_ANNOTATION) or self.namespace
        try:
            if name and ns:
                obj = await self.kube.get_or_none(MACHINES, name, ns)
                pid = ((obj or {}).get("spec") or {}).get("providerID", "")
                if obj is not None and (not pid or not m.provider_id or pid == m.provider_id):
                    return obj
            items, _ = await self.kube.list(MACHINES, ns)
        except errors.ApiError as exc:
            raise _api(self.name, m, exc) from exc
        for obj in items:
            spec, status = obj.get("spec") or {}, obj.get("status") or {}
            if m.provider_id and spec.get("providerID") == m.provider_id:
                return obj
        for obj in items:
            if ((obj.get("status") or {}).get("nodeRef") or {}).get("name") == m.node and not m.provider_id:
                return obj
        raise errors.MachineNotFound(self.name, m.node, f"no Machine has providerID {m.provider_id or '(none)'} "
                                                         f"or nodeRef {m.node}")

    async def terminate(self, m: Machine, *, dry_run: bool = False) -> Outcome:
        return await self._act("terminate", m, dry_run)

    async def replace(self, m: Machine, *, dry_run: bool = False) -> Outcome:
        return await self._act("replace", m, dry_run)

    async def _act(self, action: str, m: Machine, dry_run: bool) -> Outcome:
        try:
            obj = await self.find(m)
        except errors.MachineNotFound:
            return Outcome(action, "no Machine owns the node any more", dry_run, gone=True)
        meta = obj["metadata"]
        ref = f"Machine {meta['namespace']}/{meta['name']}"
        if meta.get("deletionTimestamp"):
            return Outcome(action, f"{ref} is already being deleted", dry_run, gone=False)
        try:
            if self.mode == "remediate":
                await self.kube.patch(MACHINES, meta["name"], {"metadata": {
                    "resourceVersion": meta["resourceVersion"], "annotations": {CAPI_REMEDIATE_ANNOTATION: ""}}},
                    meta["namespace"], dry_run=dry_run)
                return Outcome(action, f"annotated {ref} {CAPI_REMEDIATE_ANNOTATION} for its MachineHealthCheck"
                               + (" (dry-run)" if dry_run else ""), dry_run, gone=False)
            await self.kube.delete(MACHINES, meta["name"], meta["namespace"], dry_run=dry_run,
                                   preconditions={"uid": meta["uid"]})
        except errors.NotFound:
            return Outcome(action, f"{ref} already gone", dry_run, gone=True)
        except errors.Conflict as exc:
            raise errors.MachineFailed(self.name, m.node, f"{ref} changed while acting ({exc.message})", 1.0) from exc
        except errors.ApiError as exc:
            raise _api(self.name, m, exc) from exc
        return Outcome(action, f"deleted {ref}; its owner creates a replacement" + (" (dry-run)" if dry_run else ""),
                       dry_run, gone=False)

    async def reboot(self, m: Machine, *, dry_run: bool = False) -> Outcome:
        raise _unsupported(self.name, m, "reboot")

    async def exists(self, m: Machine) -> bool | None:
        try:
            await self.find(m)
        except errors.MachineNotFound:
            return False
        return True


class KarpenterProvider:
    """The Node's Karpenter NodeClaim, deleted: Karpenter drains the node, terminates the instance
    through its cloud provider, and provisions new capacity for the pods that need it."""

    name = "karpenter"
    actions = frozenset({"terminate", "replace"})
    deletes_node = True

    def __init__(self, kube: Kube):
        self.kube = kube

    async def find(self, m: Machine) -> dict:
        try:
            items, _ = await self.kube.list(NODECLAIMS)
        except errors.ApiError as exc:
            raise _api(self.name, m, exc) from exc
        for obj in items:
            if m.provider_id and (obj.get("status") or {}).get("providerID") == m.provider_id:
                return obj
        for obj in items:
            if (obj.get("status") or {}).get("nodeName") == m.node and not m.provider_id:
                return obj
        raise errors.MachineNotFound(self.name, m.node, f"no NodeClaim has providerID {m.provider_id or '(none)'}")

    async def terminate(self, m: Machine, *, dry_run: bool = False) -> Outcome:
        return await self._delete("terminate", m, dry_run)

    async def replace(self, m: Machine, *, dry_run: bool = False) -> Outcome:
        return await self._delete("replace", m, dry_run)

    async def _delete(self, action: str, m: Machine, dry_run: bool) -> Outcome:
        try:
            obj = await self.find(m)
        except errors.MachineNotFound:
            return Outcome(action, "no NodeClaim owns the node any more", dry_run, gone=True)
        meta = obj["metadata"]
        if meta.get("deletionTimestamp"):
            return Outcome(action, f"NodeClaim {meta['name']} is already being deleted", dry_run, gone=False)
        try:
            await self.kube.delete(NODECLAIMS, meta["name"], dry_run=dry_run, preconditions={"uid": meta["uid"]})
        except errors.NotFound:
            return Outcome(action, f"NodeClaim {meta['name']} already gone", dry_run, gone=True)
        except errors.ApiError as exc:
            raise _api(self.name, m, exc) from exc
        return Outcome(action, f"deleted NodeClaim {meta['name']}" + (" (dry-run)" if dry_run else ""), dry_run,
                       gone=False)

    async def reboot(self, m: Machine, *, dry_run: bool = False) -> Outcome:
        raise _unsupported(self.name, m, "reboot")

    async def exists(self, m: Machine) -> bool | None:
        try:
            await self.find(m)
        except errors.MachineNotFound:
            return False
        return True
