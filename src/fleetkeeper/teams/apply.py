"""Apply a Plan: one JSON patch per node that changes (team taint and label
together, so a node is never half-moved), guarded by the node's
resourceVersion, bounded by a token bucket and a concurrency limit, with an
Event and a metric per write; dry-run writes nothing."""

from __future__ import annotations

import asyncio
import logging
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

from fleetkeeper.core import errors
from fleetkeeper.core.domain import Names
from fleetkeeper.core.events import EventRecorder, ObjectRef, node_ref
from fleetkeeper.core.kube import NODES, Kube
from fleetkeeper.core.ratelimit import TokenBucket
from fleetkeeper.core.views import NodeView
from fleetkeeper.core.webhook import json_patch_path

from fleetkeeper.teams.metrics import TeamsMetrics
from fleetkeeper.teams.plan import TEAM_EFFECT, Change

log = logging.getLogger("fleetkeeper.teams")

PER_NODE_EVENTS = 50  # above this many changes in one plan, one summary Event instead of one per node
REASONS = {"assign": "TeamAssigned", "replace": "TeamReplacement", "release": "TeamReleased",
           "move": "TeamMoved", "repair": "TeamRepaired"}


def node_patch(view: NodeView, names: Names, new_team: str) -> list[dict]:
    """RFC 6902 patch moving ``view`` to ``new_team`` ("" = no team).

    The first op tests the resourceVersion the plan was made from, so taint
    indices are exact and a concurrent writer is never overwritten (the API
    server answers 422 and the next pass re-plans). Other taints are left
    untouched (their ``timeAdded`` survives)."""
    ops: list[dict] = [{"op": "test", "path": "/metadata/resourceVersion", "value": view.resource_version}]
    idx = [i for i, t in enumerate(view.taints) if t.key == names.team]
    for i in reversed(idx):
        ops.append({"op": "remove", "path": f"/spec/taints/{i}"})
    label_path = json_patch_path("metadata", "labels", names.team)
    if new_team:
        taint = {"key": names.team, "value": new_team, "effect": TEAM_EFFECT}
        if view.taints:
            ops.append({"op": "add", "path": "/spec/taints/-", "value": taint})
        else:
            ops.append({"op": "add", "path": "/spec/taints", "value": [taint]})
        ops.append({"op": "add", "path": label_path, "value": new_team})
    elif names.team in view.labels:
        ops.append({"op": "remove", "path": label_path})
    return ops


def is_conflict(exc: errors.ApiError) -> bool:
    """A stale plan: 409, or the 422 the API server answers when a JSON-patch op
    fails to apply (our resourceVersion ``test``, or a taint index that moved).
    That 422 carries no field causes; a real validation error always does."""
    if isinstance(exc, errors.Conflict):
        return True
    if not isinstance(exc, errors.Invalid):
        return False
    causes = (exc.body.get("details") or {}).get("causes") or []
    return not causes


@dataclass
class ApplyResult:
    ok: list[Change] = field(default_factory=list)
    written: dict[str, str] = field(default_factory=dict)  # node -> resourceVersion it had before the write
    conflicts: int = 0
    gone: int = 0
    failed: int = 0


async def apply_changes(kube: Kube, changes: list[Change], views: dict[str, NodeView], names: Names, *,
                        bucket: TokenBucket, concurrency: int, dry_run: bool, metrics: TeamsMetrics,
                        recorder: EventRecorder | None, summary_recorder: EventRecorder | None = None,
                        summary_ref: ObjectRef | None = None,
                        on_write: Callable[[Change], None] | None = None) -> ApplyResult:
    res = ApplyResult()
    sem = asyncio.Semaphore(concurrency)
    per_node = len(changes) <= PER_NODE_EVENTS

    async def one(c: Change) -> None:
        view = views.get(c.node)
        if view is None:
            return
        if dry_run:
            metrics.node_writes.labels(c.action, "dry_run").inc()
            res.ok.append(c)
            return
        async with sem:
            await bucket.acquire()
            try:
                await kube.patch(NODES, c.node, node_patch(view, names, c.new_team), patch_type="json")
            except errors.NotFound:
                res.gone += 1
                return
            except errors.ApiError as exc:
                if is_conflict(exc):
                    res.conflicts += 1
                    metrics.node_writes.labels(c.action, "conflict").inc()
                    log.info("node %s changed since the plan; re-planning", c.node)
                else:
                    res.failed += 1
                    metrics.node_writes.labels(c.action, "error").inc()
                    log.warning("could not %s node %s: %s", c.action, c.node, exc)
                return
            except errors.Temporary as exc:
                res.failed += 1
                metrics.node_writes.labels(c.action, "error").inc()
                log.warning("could not %s node %s: %s", c.action, c.node, exc)
                return
        metrics.node_writes.labels(c.action, "ok").inc()
        if on_write is not None:
            on_write(c)
        res.ok.append(c)
        res.written[c.node] = view.resource_version
        if per_node and recorder is not None:
            await recorder.emit(node_ref(c.node, view.uid), REASONS[c.action],
                                f"team {c.old_team or 'none'} -> {c.new_team or 'none'}: {c.reason}")

    await asyncio.gather(*(one(c) for c in changes))
    summary_recorder = summary_recorder or recorder
    if not per_node and summary_recorder is not None and summary_ref is not None and res.ok:
        counts = Counter(c.action for c in res.ok)
        await summary_recorder.emit(summary_ref, "TeamNodesChanged",
                            f"{'planned (dry-run)' if dry_run else 'changed'} {len(res.ok)} node(s): "
                            + ", ".join(f"{n} {a}" for a, n in sorted(counts.items())))
    return res
