"""The plan vocabulary: what a decision asks of the cluster, as plain values.

A ``decide`` function returns a :class:`Plan` for one node: a tuple of typed
operations. Pure (no I/O): the applier (:mod:`fleetkeeper.core.applier`) is
the only code that turns a plan into API writes, and ``--dry-run`` and
``explain`` print the very same plan.

Operations:

* node writes, folded into ONE merge patch carrying the cached
  resourceVersion (:func:`node_patch`): :class:`AddTaint`,
  :class:`RemoveTaint`, :class:`SetLabel`, :class:`SetAnnotation`,
  :class:`Cordon`;
* :class:`EvictPod` (the Eviction API: PodDisruptionBudgets apply);
* :class:`TerminateMachine` (through the machine provider passed to the
  applier: terminate, reboot, replace);
* :class:`Event` (a Kubernetes Event on the node);
* :class:`RequeueAfter` (look at the node again after so many seconds).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Union

from fleetkeeper.core.views import NodeView


@dataclass(frozen=True, slots=True)
class AddTaint:
    key: str
    value: str = ""
    effect: str = "NoSchedule"


@dataclass(frozen=True, slots=True)
class RemoveTaint:
    key: str


@dataclass(frozen=True, slots=True)
class SetLabel:
    key: str
    value: str | None  # None removes it


@dataclass(frozen=True, slots=True)
class SetAnnotation:
    key: str
    value: str | None  # None removes it


@dataclass(frozen=True, slots=True)
class Cordon:
    on: bool = True


@dataclass(frozen=True, slots=True)
class EvictPod:
    namespace: str
    name: str
    why: str = ""

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.name}"


@dataclass(frozen=True, slots=True)
class TerminateMachine:
    how: str = "terminate"  # terminate | reboot | replace: the provider's verb
    why: str = ""


@dataclass(frozen=True, slots=True)
class Event:
    """An Event about the plan's node. ``id``: the occurrence's identity where it may be announced again
    after a restart (a terminate, from the request recorded on the node): the Event's name derives from it,
    so the API server keeps one however often it is announced (see ``core.events``)."""

    reason: str
    note: str
    type: str = "Normal"
    id: str = ""


@dataclass(frozen=True, slots=True)
class RequeueAfter:
    seconds: float


NodeOp = Union[AddTaint, RemoveTaint, SetLabel, SetAnnotation, Cordon]
Op = Union[AddTaint, RemoveTaint, SetLabel, SetAnnotation, Cordon, EvictPod, TerminateMachine, Event, RequeueAfter]
NODE_OPS = (AddTaint, RemoveTaint, SetLabel, SetAnnotation, Cordon)


@dataclass(frozen=True)
class Plan:
    """Operations on one node. ``action`` names what they are for (quarantine, release, evict, ...):
    the ``action`` label of ``fleetkeeper_node_writes_total`` and of the Events."""

    node: str
    action: str
    ops: tuple[Op, ...] = ()
    why: str = ""

    @property
    def node_ops(self) -> tuple[NodeOp, ...]:
        return tuple(o for o in self.ops if isinstance(o, NODE_OPS))  # type: ignore[misc]

    @property
    def evictions(self) -> tuple[EvictPod, ...]:
        return tuple(o for o in self.ops if isinstance(o, EvictPod))

    @property
    def machine(self) -> TerminateMachine | None:
        return next((o for o in self.ops if isinstance(o, TerminateMachine)), None)

    @property
    def events(self) -> tuple[Event, ...]:
        return tuple(o for o in self.ops if isinstance(o, Event))

    @property
    def requeue_after(self) -> float | None:
        vals = [o.seconds for o in self.ops if isinstance(o, RequeueAfter)]
        return min(vals) if vals else None

    @property
    def empty(self) -> bool:
        return not any(not isinstance(o, RequeueAfter) for o in self.ops)

    def describe(self) -> list[str]:
        """One line per operation, for ``--dry-run`` and ``explain``."""
        out = []
        for o in self.ops:
            if isinstance(o, AddTaint):
                out.append(f"taint {o.key}={o.value}:{o.effect}")
            elif isinstance(o, RemoveTaint):
                out.append(f"remove taint {o.key}")
            elif isinstance(o, SetLabel):
                out.append(f"label {o.key}={o.value}" if o.value is not None else f"remove label {o.key}")
            elif isinstance(o, SetAnnotation):
                out.append(f"annotate {o.key}={(o.value or '')[:60]}" if o.value is not None
                           else f"remove annotation {o.key}")
            elif isinstance(o, Cordon):
                out.append("cordon" if o.on else "uncordon")
            elif isinstance(o, EvictPod):
                out.append(f"evict {o.key}" + (f" ({o.why})" if o.why else ""))
            elif isinstance(o, TerminateMachine):
                out.append(f"{o.how} the machine" + (f" ({o.why})" if o.why else ""))
            elif isinstance(o, Event):
                out.append(f"event {o.type} {o.reason}: {o.note}")
            elif isinstance(o, RequeueAfter):
                out.append(f"look again in {o.seconds:.0f}s")
        return out


def _taint_dict(key: str, value: str, effect: str, time_added: str = "") -> dict:
    out = {"key": key, "value": value, "effect": effect} if value else {"key": key, "effect": effect}
    if time_added:
        out["timeAdded"] = time_added
    return out


def node_patch(node: NodeView, ops: tuple[NodeOp, ...] | list[NodeOp]) -> dict | None:
    """The one merge patch that makes ``ops`` true on ``node`` (as the cache has it), with the cache's
    resourceVersion as precondition; None when they already hold (nothing to write).

    Taints are a list, which a merge patch replaces whole: the new list is built from the cached one (each
    kept taint with its ``timeAdded``), and the resourceVersion guarantees that the cache was current."""
    taints = [(t.key, t.value, t.effect) for t in node.taints]
    added = {(t.key, t.value, t.effect): t.time_added for t in node.taints if t.time_added}
    new_taints = list(taints)
    labels: dict[str, str | None] = {}
    annotations: dict[str, str | None] = {}
    unschedulable: bool | None = None
    for o in ops:
        if isinstance(o, AddTaint):
            new_taints = [t for t in new_taints if t[0] != o.key] + [(o.key, o.value, o.effect)]
        elif isinstance(o, RemoveTaint):
            new_taints = [t for t in new_taints if t[0] != o.key]
        elif isinstance(o, SetLabel):
            labels[o.key] = o.value
        elif isinstance(o, SetAnnotation):
            annotations[o.key] = o.value
        elif isinstance(o, Cordon):
            unschedulable = o.on
    labels = {k: v for k, v in labels.items() if node.labels.get(k) != v}
    annotations = {k: v for k, v in annotations.items() if node.annotations.get(k) != v}
    taints_changed = sorted(new_taints) != sorted(taints)
    cordon_changed = unschedulable is not None and unschedulable != node.unschedulable
    if not (labels or annotations or taints_changed or cordon_changed):
        return None
    body: dict = {"metadata": {"resourceVersion": node.resource_version}}
    if labels:
        body["metadata"]["labels"] = labels
    if annotations:
        body["metadata"]["annotations"] = annotations
    spec: dict = {}
    if taints_changed:
        # taints kept from the cache keep their timeAdded (NoExecute tolerationSeconds count from it)
        spec["taints"] = [_taint_dict(*t, added.get(t, "")) for t in new_taints] or None
    if cordon_changed:
        spec["unschedulable"] = unschedulable or None
    if spec:
        body["spec"] = spec
    return body
