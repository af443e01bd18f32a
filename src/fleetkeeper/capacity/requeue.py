"""Repair a gang kube-scheduler has stopped trying. Pure decisions.

kube-scheduler v1.36 can leave every unplaced member of a pod group in its
queue's unschedulable pool for good (docs/capacity.md, "the gang stall"): a
member whose preemption was started in a pod group cycle that then failed is
re-queued while that preemption is still running, so DefaultPreemption's
PreEnqueue holds it; its only rejector is then DefaultPreemption, whose
queueing hint for the victim's deletion is always "skip", and held pods are
never flushed. Nothing that happens to nodes, pods or the PodGroup moves it.

What does move it: a pod group cycle of the same group. A cycle pops every
unscheduled member of the group from the queue and runs PreEnqueue on each
again (the preemption has long finished, so they pass). A cycle starts when
any member is popped, so fleetkeeper creates one more pod of the group that
passes PreEnqueue (a **requeue pod**: no resources, a node selector no node
matches, so it is never placed). The scheduler pops it within a moment, the
cycle takes the stuck members along and places the gang if it fits. The
requeue pod is deleted as soon as the scheduler has tried it (it has a
``PodScheduled`` condition), or when its gang is placed or gone.

When: a gang is **stuck**, not slow. All of:

* it fits its pool now (yielding's simulation placed it whole) and has for
  ``after`` seconds: the room is there;
* the scheduler has tried it: a member is ``Unschedulable`` (the stall
  follows a failed pod group cycle). A gang never tried since it was handed
  over waits its first turn in the active queue, behind other groups: in a
  burst of 299 small gangs let go at once on 1,000 nodes, the last were first
  tried 15-23 s after their PodGroup, and 27 requeue pods (each made at the
  moment, or just after, its gang was placed) were false alarms;
* the scheduler has reported **no progress** for it for ``after`` plus
  ``per_member`` seconds per member: no member was bound, and no member's
  ``PodScheduled`` condition (status, reason, message, transition time) or
  nominated node changed. A group the scheduler retries or is binding shows
  progress; a held one shows none. kube-scheduler writes nothing while it runs
  a pod group cycle (the whole group is filtered and scored before the first
  bind), and that cycle grows with the group: on a loaded control plane a
  1,000-member cycle took longer than 20 s, hence the allowance per member;
* the last requeue pod for it is at least ``after x 2^k`` seconds old, where
  ``k`` counts the requeues since the gang last showed progress (at most 3):
  a gang the scheduler is slow on, not stuck on, costs at most about
  ``log2(wait / after) + wait / (8 x after)`` extra cycles, not one per
  ``after``.

A healthy gang is retried within the scheduler's maximum backoff (10 s by
default), so ``after`` above that only catches stuck ones; a false alarm
costs one extra pod group cycle. At most one requeue pod per gang at a time.

**Prompt retry** (``kick``): kube-scheduler v1.36 retries an unschedulable
pod group only when its backoff ends (up to ``podMaxBackoffSeconds``, 10 s),
never on the event that frees room, so in a burst room that frees up stays
idle for 5 s on average before a waiting gang is tried again. A gang the
scheduler has tried and found no room for, that fits now because room freed
(it did not fit before), and that has shown no progress for ``kick`` seconds
since, gets one requeue pod at once: its group is tried now, not at the end
of its backoff. Once per time it starts to fit; the cost is one cycle of a
group that fits.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from fleetkeeper.core.domain import Names

from fleetkeeper.capacity.yielding import Unit, WaitingPod, requeue_label

PAUSE_IMAGE = "registry.k8s.io/pause:3.10"


MAX_DOUBLINGS = 3


def progress(unit: Unit) -> tuple:
    """What the scheduler has reported for a gang's unbound members: changes whenever it binds one (the
    member leaves the unit), tries one with another outcome, or nominates a node."""
    return tuple(sorted((p.name, p.unschedulable, p.unschedulable_since, p.scheduled_note, p.nominated)
                        for p in unit.pods))


@dataclass
class RequeueState:
    """What the previous passes saw, per unit key (carried from pass to pass)."""

    fits_since: dict[str, float] = field(default_factory=dict)  # first seen fitting
    quiet: dict[str, tuple[tuple, float]] = field(default_factory=dict)  # (progress, unchanged since)
    last: dict[str, float] = field(default_factory=dict)  # last requeue pod made
    count: dict[str, int] = field(default_factory=dict)  # requeue pods since the last progress
    kicked: dict[str, float] = field(default_factory=dict)  # the free_since a prompt retry was made for
    free_since: dict[str, float] = field(default_factory=dict)  # first seen fitting in room no balloon is on


@dataclass
class RequeuePlan:
    create: list[tuple[str, str, float]] = field(default_factory=list)  # (namespace, group, seconds it fitted)
    kick: list[tuple[str, str, float]] = field(default_factory=list)  # prompt retries, as above
    next_kick_in: float | None = None  # seconds until a prompt retry falls due (look again then)
    delete: list[tuple[str, str, str]] = field(default_factory=list)  # (namespace, pod, why)
    state: RequeueState = field(default_factory=RequeueState)  # carry over to the next pass

    @property
    def fits_since(self) -> dict[str, float]:
        return self.state.fits_since


def decide(units: list[Unit], fitting: set[str], probes: list[WaitingPod], state: RequeueState, now: float,
           after: float | None, per_member: float = 0.0, kick: float | None = None,
           free: set[str] | None = None, handed: set[str] | None = None) -> RequeuePlan:
    """``units``: the waiting units; ``fitting``: keys of those that fit now; ``probes``: the requeue
    pods that exist (unbound pods labelled :func:`yielding.requeue_label`); ``state``: what the previous
    passes saw; ``now``: wall clock; ``per_member``: seconds of no progress allowed per member on top of
    ``after``; ``kick``: prompt retry of a tried gang this long after room freed for it (None: never);
    ``free``: those of ``fitting`` whose room no balloon is on any more (None: all of them). A gang that
    fits through balloons fleetkeeper releases for it has its room freed when they are gone, not when they
    are released: the prompt retry counts from then (a retry while they are still there fails, and the
    gang backs off again). ``handed``: the gangs kube-scheduler has (their group object exists: fleetkeeper
    creates it once it stops holding the gang and has removed its gate); None: every gang. Only those are
    watched, so every clock of a gang starts when it is handed over: a gang fleetkeeper held for a minute
    showed no progress all that time, by design, and would otherwise get a requeue pod the moment it was
    let go, while still waiting its turn in the scheduler's active queue (a cycle for nothing on a busy
    scheduling thread)."""
    plan = RequeuePlan()
    waiting = {u.key: u for u in units if handed is None or not u.pods[0].group or u.key in handed}
    new = plan.state
    for key, u in waiting.items():
        seen = progress(u)
        old = state.quiet.get(key)
        new.quiet[key] = old if old is not None and old[0] == seen else (seen, now)
        if old is not None and old[0] != seen:
            new.count[key] = 0  # it moved: the scheduler is working on it
        else:
            new.count[key] = state.count.get(key, 0)
        if key in state.last:
            new.last[key] = state.last[key]
        if key in state.kicked:
            new.kicked[key] = state.kicked[key]
    for key in fitting:
        if key in waiting:
            new.fits_since[key] = state.fits_since.get(key, now)
    for key in fitting if free is None else free & fitting:
        if key in waiting:
            new.free_since[key] = state.free_since.get(key, now)
    live: set[str] = set()
    for p in probes:
        if p.deleting:
            live.add(f"{p.namespace}/{p.requeue_for}")
            continue
        key = f"{p.namespace}/{p.requeue_for}"
        if key not in waiting:
            plan.delete.append((p.namespace, p.name, "its gang is placed or gone"))
        elif p.unschedulable:
            plan.delete.append((p.namespace, p.name, "the scheduler tried it (the group's cycle ran)"))
        elif after is not None and now - p.created >= 3 * after:
            plan.delete.append((p.namespace, p.name, "not tried by the scheduler in time"))
        else:
            live.add(key)
    if kick is not None:
        for key, since in sorted(new.free_since.items()):
            u = waiting[key]
            group = u.pods[0].group
            if not group or key in live or new.kicked.get(key) == since:
                continue
            tried = [p.unschedulable_since for p in u.pods if p.unschedulable]
            # tried before the room freed (a gang that fitted from its first try is the scheduler's own
            # business), and nothing moved since
            if not tried or min(tried) >= since or new.quiet[key][1] > since:
                continue
            if now - since < kick:
                due = since + kick - now
                plan.next_kick_in = due if plan.next_kick_in is None else min(plan.next_kick_in, due)
                continue
            new.kicked[key] = since
            live.add(key)
            plan.kick.append((u.pods[0].namespace, group, now - since))
    if after is None:
        return plan
    for key, since in sorted(new.fits_since.items()):
        u = waiting[key]
        group = u.pods[0].group
        if not group or key in live or now - since < after:
            continue
        if not any(p.unschedulable for p in u.pods):
            continue  # not tried yet: it waits its first turn in the active queue (the stall needs a failed cycle)
        if now - new.quiet[key][1] < after + per_member * len(u.pods):
            continue  # the scheduler may be in the middle of this group's (long) cycle
        gap = after * 2 ** min(new.count.get(key, 0), MAX_DOUBLINGS)
        if now - new.last.get(key, -1e18) < gap:
            continue
        plan.create.append((u.pods[0].namespace, group, now - since))
    return plan


def made(state: RequeueState, key: str, now: float) -> None:
    """Record a requeue pod made for ``key``."""
    state.last[key] = now
    state.count[key] = state.count.get(key, 0) + 1


def requeue_pod(namespace: str, group: str, names: Names) -> dict:
    """One more pod of ``group`` that kube-scheduler tries at once and never places."""
    label = requeue_label(names)
    return {
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {
            "generateName": f"{group[:40]}-requeue-", "namespace": namespace,
            "labels": {label: group, names.managed_by: "capacity"},
            "annotations": {f"{names.domain}/why": (
                "makes kube-scheduler run a pod group cycle of this gang, whose members it stopped retrying; "
                "never placed (no node has the selected label); fleetkeeper deletes it once tried")},
        },
        "spec": {
            "schedulingGroup": {"podGroupName": group},
            "nodeSelector": {label: "never-placed"},
            "restartPolicy": "Never", "terminationGracePeriodSeconds": 0,
            "automountServiceAccountToken": False, "enableServiceLinks": False,
            "containers": [{"name": "requeue", "image": PAUSE_IMAGE,
                            "resources": {"requests": {"cpu": "1m", "memory": "1Mi"},
                                          "limits": {"cpu": "1m", "memory": "1Mi"}}}],
        },
    }
