"""What simulated nodes look like: the GPU fleet of the mission.

Pure functions: :func:`node_manifest` builds one Node object; the cluster
creates them through the API like a kubelet registering (with
``--register-with-taints`` when the join gate is on).
"""

from __future__ import annotations

from dataclasses import dataclass

from fleetkeeper.core.domain import (
    GPU_RESOURCE,
    HOSTNAME_LABEL,
    INSTANCE_TYPE_LABEL,
    ZONE_LABEL,
    Names,
)

KWOK_ANNOTATION = "kwok.x-k8s.io/node"
KWOK_LABEL = "type"
KWOK_LABEL_VALUE = "kwok"
ZONES = ("zone-a", "zone-b", "zone-c")


@dataclass(frozen=True)
class FleetSpec:
    nodes: int = 50
    gpus_per_node: int = 8
    cpu_fraction: float = 0.1  # share of nodes in the CPU pool
    nodes_per_rack: int = 16
    prefix: str = "node"
    join_gate: bool = False  # register with the preflight taint and label
    # register already Ready (a fleet that has joined before the cluster starts): the node lifecycle controller
    # then never adds node.kubernetes.io/not-ready only to lift it again, two node writes per node that at
    # 7,500 nodes queue behind each other for many minutes. Nodes that join later register NotReady.
    ready: bool = False

    def pool_of(self, index: int) -> str:
        ncpu = int(self.nodes * self.cpu_fraction)
        return "cpu" if index >= self.nodes - ncpu else "gpu"


def node_name(prefix: str, pool: str, index: int) -> str:
    return f"{prefix}-{pool}-{index:05d}"


def node_manifest(spec: FleetSpec, index: int, names: Names = Names()) -> dict:
    pool = spec.pool_of(index)
    name = node_name(spec.prefix, pool, index)
    gpu = pool == "gpu"
    rack = index // spec.nodes_per_rack
    labels = {
        KWOK_LABEL: KWOK_LABEL_VALUE,
        HOSTNAME_LABEL: name,
        "kubernetes.io/os": "linux",
        "kubernetes.io/arch": "amd64",
        # the deprecated copies a kubelet still sets; without them the node lifecycle controller patches every
        # node to add them, one write each that at 7,500 nodes queues its taint work behind it for many minutes
        "beta.kubernetes.io/os": "linux",
        "beta.kubernetes.io/arch": "amd64",
        ZONE_LABEL: ZONES[rack % len(ZONES)],
        names.rack: f"rack-{rack:04d}",
        names.pool: pool,
        INSTANCE_TYPE_LABEL: f"gpu-{spec.gpus_per_node}x-h100" if gpu else "cpu-96",
    }
    capacity = {"cpu": "96", "memory": "1843Gi" if gpu else "384Gi", "pods": "110", "ephemeral-storage": "7Ti"}
    allocatable = {"cpu": "94", "memory": "1800Gi" if gpu else "370Gi", "pods": "110", "ephemeral-storage": "7Ti"}
    if gpu:
        capacity[GPU_RESOURCE] = str(spec.gpus_per_node)
        allocatable[GPU_RESOURCE] = str(spec.gpus_per_node)
    # a node that registers NotReady is tainted not-ready from its first write (the API server's
    # TaintNodesByCondition admission does that for a kubelet; the local cluster runs without it)
    taints = [] if spec.ready else [{"key": NOT_READY_TAINT, "effect": "NoSchedule"}]
    if spec.join_gate:
        labels[names.preflight] = "pending"
        taints.append({"key": names.preflight, "value": "pending", "effect": "NoSchedule"})
    node = {
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {"name": name, "labels": labels, "annotations": {KWOK_ANNOTATION: "fake"}},
        "spec": {"taints": taints} if taints else {},
        "status": {"capacity": capacity, "allocatable": allocatable,
                   "nodeInfo": {"kubeletVersion": "fake", "architecture": "amd64", "operatingSystem": "linux"}},
    }
    if spec.ready:
        node["status"]["conditions"] = [dict(c) for c in READY_CONDITIONS]
        node["status"]["addresses"] = [{"type": "InternalIP", "address": NODE_IP}, {"type": "Hostname", "address": name}]
    return node


NOT_READY_TAINT = "node.kubernetes.io/not-ready"
NODE_IP = "10.0.0.1"  # KWOK's --node-ip
# what a kubelet posts once it is Ready (KWOK's heartbeat keeps them from then on)
READY_CONDITIONS = [
    {"type": "Ready", "status": "True", "reason": "KubeletReady", "message": "kubelet is posting ready status"},
    {"type": "MemoryPressure", "status": "False", "reason": "KubeletHasSufficientMemory",
     "message": "kubelet has sufficient memory available"},
    {"type": "DiskPressure", "status": "False", "reason": "KubeletHasNoDiskPressure",
     "message": "kubelet has no disk pressure"},
    {"type": "PIDPressure", "status": "False", "reason": "KubeletHasSufficientPID",
     "message": "kubelet has sufficient PID available"},
    {"type": "NetworkUnavailable", "status": "False", "reason": "RouteCreated", "message": "RouteController created a route"},
]
