"""``fleetkeeper explain node``: the join work the pacer did (or will do) on a node."""

from __future__ import annotations

from fleetkeeper.core.domain import SYSTEM_NAMESPACE, Names
from fleetkeeper.core.kube import CONFIGMAPS, NODES, Kube
from fleetkeeper.relay.pacing import done_annotation
from fleetkeeper.relay.settings import CONFIGMAP, load_config


async def explain_node(kube: Kube, names: Names, node_name: str) -> list[str]:
    node = await kube.get_or_none(NODES, node_name)
    if node is None:
        return []
    ann = (node["metadata"].get("annotations") or {})
    done = ann.get(done_annotation(names))
    lines = []
    if done:
        lines.append(f"join work done at {done} (annotation {done_annotation(names)})")
    cm = await kube.get_or_none(CONFIGMAPS, CONFIGMAP, SYSTEM_NAMESPACE)
    if cm is None:
        if not done:
            lines.append("join pacer not configured (no ConfigMap fleetkeeper-relay): no paced join work")
        return lines
    cfg = await load_config(kube, SYSTEM_NAMESPACE)
    if not cfg.pacer.enabled:
        lines.append("join pacer disabled in ConfigMap fleetkeeper-relay")
    elif not done:
        lines.append(f"join work pending: the pacer starts {cfg.pacer.rate:g} nodes/s "
                     f"(burst {cfg.pacer.burst}); selector {cfg.pacer.node_selector or '(all nodes)'}")
    if cfg.relay.enabled:
        lines.append(f"agents read this node's view from the relay: GET /v1/nodes/{node_name}/view "
                     f"(port {cfg.relay.port}, auth {cfg.relay.auth})")
    return lines
