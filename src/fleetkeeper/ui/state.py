"""A node's lifecycle state, as the map colours it.

Derived in ONE place, :func:`lifecycle_state`, from what fleetkeeper writes on
the node today: the preflight gate's taint and label, the remediation
controller's quarantine taint and its annotations (ladder target, drained,
handed back to validation), cordoning, deletion and the node's conditions.
When nodes carry their lifecycle state themselves, this function is the one
to replace.
"""

from __future__ import annotations

from fleetkeeper.core.domain import Names
from fleetkeeper.core.views import NodeView
from fleetkeeper.health.decide import Keys as HealthKeys
from fleetkeeper.preflight.keys import FAILED

# In display order (the legend), with the colour of each state's cells.
STATES: dict[str, str] = {
    "in-service": "#3a9a5b",
    "joining": "#4a90d9",        # joining or validating (preflight gate)
    "suspect": "#e2c044",        # not Ready, or a condition reports a problem not yet acted on
    "quarantined": "#d64541",
    "draining": "#ef8a2c",
    "awaiting-repair": "#9b59b6",
    "retiring": "#7a5230",
    "terminated": "#555555",
}
LABELS = {"in-service": "in service", "joining": "joining / validating", "suspect": "suspect",
          "quarantined": "quarantined", "draining": "draining", "awaiting-repair": "awaiting repair",
          "retiring": "retiring", "terminated": "terminated"}
_HEALTHY_TRUE = {"Ready"}


def lifecycle_state(node: NodeView, names: Names, pods_on_node: int = 0) -> str:
    """The state of one node. ``pods_on_node``: its active pods (a node the
    ladder drains is "draining" while pods remain, "awaiting repair" once the
    controller marked it drained)."""
    if node.deleting:
        return "terminated"
    k = HealthKeys(names)
    a = node.annotations
    if node.taint(names.quarantine) is not None:
        target = a.get(k.action, "quarantine")
        if a.get(k.state) == "validating":
            return "joining"
        if target == "terminate":
            return "draining" if pods_on_node else "retiring"
        if target == "drain":
            if a.get(k.drained):
                return "awaiting-repair"
            return "draining" if pods_on_node else "quarantined"
        return "quarantined"
    gate = node.labels.get(names.preflight)
    if gate is None and node.taint(names.preflight) is not None:
        gate = node.taint(names.preflight).value  # type: ignore[union-attr]
    if gate is not None:
        return "awaiting-repair" if gate == FAILED else "joining"
    if node.unschedulable:
        return "draining" if pods_on_node else "awaiting-repair"
    if not node.ready:
        return "suspect"
    if any(c.status == "True" and c.type not in _HEALTHY_TRUE for c in node.conditions):
        return "suspect"
    return "in-service"
