"""A node's lifecycle state, as the map colours it: the lifecycle's own state
machine (:func:`fleetkeeper.lifecycle.machine.state_of` over
:func:`~fleetkeeper.lifecycle.machine.facts_of`), the same function the
lifecycle controller and ``fleetkeeper lifecycle status`` use. This module adds
only the colours and labels.
"""

from __future__ import annotations

from fleetkeeper.core.domain import Names
from fleetkeeper.core.views import NodeView
from fleetkeeper.lifecycle import machine
from fleetkeeper.lifecycle.config import LifecycleConfig

# In the lifecycle's order (the legend), with the colour of each state's cells.
COLOURS = {
    machine.JOINING: "#6fa8dc",
    machine.VALIDATING: "#3d78c9",
    machine.IN_SERVICE: "#3a9a5b",
    machine.SUSPECT: "#e2c044",
    machine.QUARANTINED: "#d64541",
    machine.DRAINING: "#ef8a2c",
    machine.AWAITING_REPAIR: "#9b59b6",
    machine.REVALIDATING: "#48b5b0",
    machine.RETIRING: "#8d6238",
    machine.TERMINATED: "#555555",
}
STATES: dict[str, str] = {s: COLOURS[s] for s in machine.STATES}
LABELS = {s: s.replace("-", " ") for s in machine.STATES}


def lifecycle_state(node: NodeView, names: Names, pods_left: int = 0,
                    cfg: LifecycleConfig | None = None) -> str:
    """The state of one node; ``pods_left``: its pods still to evict (or terminating)."""
    return machine.state_of(machine.facts_of(node, names, pods_left), cfg or LifecycleConfig())[0]
