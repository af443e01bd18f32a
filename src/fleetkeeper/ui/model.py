"""The map's live model: one cell per node, kept current from informer events,
and the deltas the browsers receive.

Pure bookkeeping (no I/O, no clock): informer handlers call :meth:`on_node`
and :meth:`on_pod`; the server calls :meth:`take_deltas` to get the cells that
changed since the last call (coalesced: a node that changed five times in one
interval is sent once, and a node whose cell did not change is not sent).

A cell is a list ``[name, zone, rack, state, team, gpus_used, gpus, gangs]``;
``gangs`` are ``namespace/group`` of the gangs with a pod on the node.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from fleetkeeper.core.domain import ZONE_LABEL, Names
from fleetkeeper.core.views import NodeView, PodView, Projector

from fleetkeeper.capacity.gangs import gang_pod_projector
from fleetkeeper.lifecycle.config import LifecycleConfig
from fleetkeeper.lifecycle.gangs import evictable
from fleetkeeper.teams.plan import node_state as team_node_state
from fleetkeeper.ui.state import lifecycle_state

Cell = list  # [name, zone, rack, state, team, gpus_used, gpus, gangs]


@dataclass(frozen=True, slots=True)
class PodOnNode:
    node: str
    gpus: int
    gang: str  # namespace/group, or ""
    active: bool
    to_evict: bool  # what a drain still has to evict (the lifecycle's "pods left")


@dataclass
class FleetModel:
    names: Names
    projector: Projector
    views: dict[str, NodeView] = field(default_factory=dict)
    pods: dict[str, PodOnNode] = field(default_factory=dict)  # pod key -> where it runs
    by_node: dict[str, set[str]] = field(default_factory=dict)  # node -> pod keys
    sent: dict[str, Cell] = field(default_factory=dict)  # the cells the browsers have
    dirty: set[str] = field(default_factory=set)
    version: int = 0
    lifecycle: LifecycleConfig = field(default_factory=LifecycleConfig)

    def set_lifecycle(self, cfg: LifecycleConfig) -> None:
        """A new lifecycle configuration: every cell is looked at again."""
        if cfg != self.lifecycle:
            self.lifecycle = cfg
            self.dirty.update(self.views)

    def __post_init__(self) -> None:
        self._gang = gang_pod_projector(self.names)

    # --- informer handlers (raw slim objects) -------------------------------------------
    def on_node(self, typ: str, key: str, old: dict | None, new: dict | None) -> None:
        if new is None:
            self.views.pop(key, None)
        else:
            self.views[key] = self.projector.node(new)
        self.dirty.add(key)

    def on_pod(self, typ: str, key: str, old: dict | None, new: dict | None) -> None:
        prev = self.pods.pop(key, None)
        if prev is not None:
            self.by_node.get(prev.node, set()).discard(key)
            self.dirty.add(prev.node)
        if new is None:
            return
        pv: PodView = self.projector.pod(new)
        if not pv.node:
            return
        m = self._gang(new)
        group = m.scheduling_group or m.cosched_group or m.gang
        p = PodOnNode(pv.node, pv.gpus, f"{pv.namespace}/{group}" if group else "", pv.active,
                      evictable(pv) or pv.deleting)
        self.pods[key] = p
        self.by_node.setdefault(pv.node, set()).add(key)
        self.dirty.add(pv.node)

    # --- cells ---------------------------------------------------------------------------
    def cell(self, name: str) -> Cell | None:
        v = self.views.get(name)
        if v is None:
            return None
        pods = [self.pods[k] for k in self.by_node.get(name, ()) if k in self.pods]
        active = [p for p in pods if p.active]
        return [name, v.labels.get(ZONE_LABEL, ""), v.labels.get(self.names.rack, ""),
                lifecycle_state(v, self.names, sum(1 for p in pods if p.to_evict), self.lifecycle),
                team_node_state(v, self.names).team,
                sum(p.gpus for p in active), v.gpus, sorted({p.gang for p in active if p.gang})]

    def current(self) -> list[Cell]:
        """Every cell as the browsers have it (call :meth:`take_deltas` first to include pending changes)."""
        return list(self.sent.values())

    def take_deltas(self) -> tuple[list[Cell], list[str]]:
        """(changed cells, names of nodes gone) since the last call."""
        changed, gone = [], []
        dirty, self.dirty = self.dirty, set()
        for name in sorted(dirty):
            c = self.cell(name)
            if c is None:
                if self.sent.pop(name, None) is not None:
                    gone.append(name)
            elif self.sent.get(name) != c:
                self.sent[name] = c
                changed.append(c)
        if changed or gone:
            self.version += 1
        return changed, gone

    def counts(self) -> dict[tuple[str, str, str], int]:
        """Nodes per (zone, rack, state), as last sent (the fleet-map gauge)."""
        out: dict[tuple[str, str, str], int] = {}
        for c in self.sent.values():
            k = (c[1], c[2], c[3])
            out[k] = out.get(k, 0) + 1
        return out
