"""Apply a Plan through the core applier (:mod:`fleetkeeper.core.applier`):
one merge patch per node that changes (team taint and label together, so a
node is never half-moved), carrying the resourceVersion of the cached node the
plan was made from (a Conflict means the cache was behind: the next pass plans
again), bounded by the applier's token bucket (the configured ``writes``) and
a concurrency limit, with an Event and ``fleetkeeper_node_writes_total``
per write; dry-run writes nothing."""

from __future__ import annotations

import asyncio
import logging
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

from fleetkeeper.core import errors
from fleetkeeper.core.applier import Applier
from fleetkeeper.core.domain import Names
from fleetkeeper.core.events import EventRecorder, ObjectRef
from fleetkeeper.core.plan import Event, Plan as Ops
from fleetkeeper.core.views import NodeView

from fleetkeeper.teams.metrics import TeamsMetrics
from fleetkeeper.teams.plan import Change, change_ops, same_inputs

log = logging.getLogger("fleetkeeper.teams")

PER_NODE_EVENTS = 50  # above this many changes in one plan, one summary Event instead of one per node
REASONS = {"assign": "TeamAssigned", "replace": "TeamReplacement", "release": "TeamReleased",
           "move": "TeamMoved", "repair": "TeamRepaired"}


def change_plan(c: Change, names: Names, now: float, event: bool) -> Ops:
    """One change as a core plan: its node operations and (``event``) its Event."""
    ops = change_ops(c, names, now)
    if event:
        ops += (Event(REASONS[c.action], f"team {c.old_team or 'none'} -> {c.new_team or 'none'}: {c.reason}"),)
    return Ops(c.node, c.action, ops, why=c.reason)


@dataclass
class ApplyResult:
    ok: list[Change] = field(default_factory=list)
    written: dict[str, str] = field(default_factory=dict)  # node -> resourceVersion it had before the write
    conflicts: int = 0  # left to the next pass: the node changed in a way the plan depends on, or not cached yet
    resent: int = 0  # Conflicts sent again against the newer cached node (the change did not touch the plan)
    gone: int = 0
    failed: int = 0


RESENDS = 3  # a node that keeps changing under one write is left to the next pass


async def apply_changes(applier: Applier, changes: list[Change], views: dict[str, NodeView], names: Names, *,
                        now: float, concurrency: int, metrics: TeamsMetrics,
                        summary_recorder: EventRecorder | None = None, summary_ref: ObjectRef | None = None,
                        on_write: Callable[[Change], None] | None = None,
                        current: Callable[[str], NodeView | None] | None = None) -> ApplyResult:
    """Write ``changes``, each against the cached node it was planned from (``views``).

    A Conflict says the node changed since. When ``current`` (the node cache) already holds the newer
    version and it gives the plan the same inputs (:func:`plan.same_inputs`: a status heartbeat, another
    component's unrelated label), the same change is sent again against it, once every other write of the
    pass has been tried, instead of waiting for the next pass; otherwise it is left to the next pass. Nothing
    was written by the refused patch, so nothing is written twice."""
    res = ApplyResult()
    sem = asyncio.Semaphore(concurrency)
    per_node = len(changes) <= PER_NODE_EVENTS
    dry_run = applier.dry_run
    stale: list[tuple[Change, NodeView]] = []  # answered Conflict, the cache not yet newer: tried at the end

    def newer(c: Change, view: NodeView) -> NodeView | None:
        """The cache's newer version of the node, if the plan would decide the same for it."""
        cur = current(c.node) if current is not None else None
        if cur is None or cur.resource_version == view.resource_version or not same_inputs(view, cur, names):
            return None
        return cur

    async def one(c: Change, view: NodeView, last_try: bool) -> None:
        for attempt in range(RESENDS):
            if attempt or last_try:  # the pass's last try is always a resend of a refused write
                res.resent += 1
            async with sem:
                try:
                    out = await applier.apply(view, change_plan(c, names, now, per_node), announce=False)
                except errors.Temporary as exc:  # a Conflict: the node changed since the plan
                    metrics.node_writes.labels(c.action, "conflict").inc()
                    cur = newer(c, view)
                    if cur is not None:
                        log.debug("node %s changed since the plan, not in a way it depends on; sending again", c.node)
                        view = cur
                        continue
                    if not last_try and current is not None:
                        stale.append((c, view))
                        return
                    res.conflicts += 1
                    log.info("node %s changed since the plan; re-planning (%s)", c.node, exc)
                    return
                except errors.FleetkeeperError as exc:
                    res.failed += 1
                    metrics.node_writes.labels(c.action, "error").inc()
                    log.warning("could not %s node %s: %s", c.action, c.node, exc)
                    return
            break
        else:
            res.conflicts += 1
            log.info("node %s changed %d times under one write; re-planning", c.node, RESENDS)
            return
        if out.gone:
            res.gone += 1
            return
        res.ok.append(c)
        if dry_run:
            metrics.node_writes.labels(c.action, "dry_run").inc()
            return
        metrics.node_writes.labels(c.action, "ok").inc()
        if on_write is not None:
            on_write(c)
        if out.patched:
            res.written[c.node] = view.resource_version

    await asyncio.gather(*(one(c, views[c.node], False) for c in changes if c.node in views))
    # the rest of the pass took long enough for the watch to deliver most of the changes behind these
    retry: list[tuple[Change, NodeView]] = []
    for c, view in stale:
        cur = newer(c, view)
        if cur is None:
            res.conflicts += 1
            log.info("node %s changed since the plan; re-planning", c.node)
        else:
            retry.append((c, cur))
    await asyncio.gather(*(one(c, cur, True) for c, cur in retry))
    if not per_node and summary_recorder is not None and summary_ref is not None and res.ok:
        counts = Counter(c.action for c in res.ok)
        await summary_recorder.emit(summary_ref, "TeamNodesChanged",
                            f"{'planned (dry-run)' if dry_run else 'changed'} {len(res.ok)} node(s): "
                            + ", ".join(f"{n} {a}" for a, n in sorted(counts.items())))
    return res
