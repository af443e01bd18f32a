"""No starvation: room reserved for a gang that waited too long. Pure decisions.

kube-scheduler serves pod groups in queue order and retries an unschedulable
group only after its backoff, so in a burst every smaller gang that fits the
room that frees up takes it first, and a large gang (it needs many nodes free
at once) can wait behind all of them. A gang that has been its pool's
**head** (the first of the pool's waiting work in serving order: priority,
then age) for ``reserve_after_seconds`` and still does not fit gets its room
reserved. The clock is the time at the head, not since the gang was created:
in a burst every gang is old after a few minutes, and a reservation for each
in turn (each draining its nodes for up to a pod length while smaller work
could have run there) cost the 53-job burst a whole extra wave; a head is
placed as soon as room for it frees, so a queue that moves never reaches the
threshold, and a gang that smaller work keeps overtaking does. The head's
start is kept by the controller (a restart starts it again):

* as many nodes of the pool as the gang needs get the taint
  ``<domain>/reserved=<token>:NoSchedule`` at once: nodes that hold no real
  work (empty, or only a balloon) first, then busy nodes whose work started
  longest ago; work already there runs on (NoSchedule), nothing new starts,
  so a node that frees up cannot be taken by smaller work first;
* the gang's unbound pods get a toleration for exactly that taint (adding a
  toleration to a pod is allowed after creation);
* once the gang is placed (or gone) every reservation taint of that token is
  removed. One reservation per pool at a time.

Room released for a gang (``claimed``: balloons were released for it a short
while ago) is that gang's at once, whatever its wait: when other work took
part of it before the gang was placed (kube-scheduler binds pods that are not
held behind fleetkeeper's gate wherever room is), the gang is blocked, and
without this backfill would hand the rest of the room to younger gangs, and
the gang, often the largest, would wait for its threshold. A claimed gang
still missing members is reserved only in the pools' simulation (``virtual``:
younger work is kept off the room, nothing is written; members created later
would lack the toleration) until its last member exists.

Utilisation lost: at most the reserved nodes, idle from when each is reserved
until the last node the gang needs frees up, i.e. at most ``nodes needed x
the longest remaining runtime of the jobs on the other nodes``, once per
starving gang; balloons keep reserved nodes warm meanwhile (they tolerate
nothing new, so only balloons already there stay).
"""

from __future__ import annotations

import dataclasses
import hashlib
from dataclasses import dataclass, field

from fleetkeeper.core.domain import Names
from fleetkeeper.core.views import NodeView, PodView, Taint, Toleration

from fleetkeeper.capacity import yielding as yd
from fleetkeeper.capacity.yielding import Eligibility, Unit, _place, _shape, capacity, tolerates


def reserved_key(names: Names) -> str:
    return f"{names.domain}/reserved"


def token(unit_key: str) -> str:
    """Taint value naming a unit (a label value: short, no slashes)."""
    return "g-" + hashlib.sha256(unit_key.encode()).hexdigest()[:12]


@dataclass
class ReservePlan:
    pool: str
    unit: str = ""
    token: str = ""
    waited: float = 0.0
    needed: int = 0  # nodes the unit needs
    taint: list[str] = field(default_factory=list)  # nodes to reserve now
    untaint: list[str] = field(default_factory=list)  # reservation taints to remove
    tolerate: list[str] = field(default_factory=list)  # "ns/name" of unit pods lacking the toleration
    reserved: list[str] = field(default_factory=list)  # nodes reserved after this plan
    claimed: bool = False  # reserved because the room released for it was taken in part (not for its wait)
    head: str = ""  # the pool's head: the first of its waiting work in serving order ("": none)
    head_since: float = 0.0  # when it became the head (the wait a reservation is judged on)
    virtual: bool = False  # judged in the pools' simulation only: nothing is written (members still missing)


def _without(node: NodeView, key: str) -> NodeView:
    return dataclasses.replace(node, taints=tuple(t for t in node.taints if t.key != key))


def head_of(waiting: list[Unit], pools_work: set[str] | frozenset[str]) -> Unit | None:
    """The pool's head: the first unit in serving order that is the pool's work (``pools_work``: the keys
    the pool's simulation judged, whether they fit now or not), Kueue's work left out (its order is
    Kueue's)."""
    for u in waiting:
        if u.key in pools_work and not any(p.queued for p in u.pods):
            return u
    return None


def decide(pool: str, nodes: list[NodeView], bound: list[PodView], waiting: list[Unit], blocked: list[str],
           names: Names, now: float, after: float | None,
           claimed: frozenset[str] = frozenset(), turn: tuple[str, float] | None = None,
           pools_work: set[str] | frozenset[str] | None = None) -> ReservePlan:
    """``nodes``: the pool's usable nodes; ``bound``: pods bound to them;
    ``waiting``: units in serving order; ``blocked``: keys of units that fit
    the pool but not now (from :func:`yielding.decide`); ``claimed``: units
    balloons were released for a short while ago (their room is theirs);
    ``turn``: the head as the last pass left it (its key, since when it is
    the head); ``pools_work``: the keys of every unit that is this pool's
    work (None: the blocked ones). A gang is reserved for its wait once it
    has been the head for ``after`` seconds and is blocked."""
    plan = ReservePlan(pool)
    head = head_of(waiting, frozenset(blocked) if pools_work is None else pools_work)
    if head is not None:
        plan.head = head.key
        plan.head_since = turn[1] if turn is not None and turn[0] == head.key else now
    key = reserved_key(names)
    holders: dict[str, str] = {}
    for n in nodes:
        t = n.taint(key)
        if t is not None:
            holders[n.name] = t.value
    by_key = {u.key: u for u in waiting}
    target: Unit | None = None
    # a reservation holds while its unit still waits, even if it now fits (it fits thanks to the reservation)
    for u in waiting:
        if token(u.key) in holders.values():
            target = u
            break
    virtual = claim = False
    if target is None:
        for k in blocked:
            u = by_key.get(k)
            if u is None or any(p.queued for p in u.pods):
                continue  # Kueue's work: its ordering is Kueue's
            # (a gang still missing members is not reserved for its wait: those created later would lack the
            # toleration; for its claim it is, in the simulation only)
            missing = any(p.placeholder for p in u.pods)
            if after is not None and u.key == plan.head and now - plan.head_since >= after and not missing:
                target = u
                break
            if u.key in claimed:
                target, claim, virtual = u, True, missing or after is None
                break
    if target is None:
        plan.untaint = sorted(holders)
        return plan
    tok = token(target.key)
    plan.unit, plan.token = target.key, tok
    plan.waited = now - (plan.head_since if target.key == plan.head and not claim else target.since)
    plan.claimed, plan.virtual = claim, virtual
    free_nodes = [_without(n, key) for n in nodes]
    elig = Eligibility(free_nodes)
    placed = _place(target, free_nodes, {n.name: capacity(n, target.resource) for n in nodes}, {}, elig)
    if placed is None:
        plan.untaint = sorted(holders)
        return plan
    plan.needed = len(set(placed[0].values()))
    newest: dict[str, float] = {}  # node -> start of the most recent real work on it
    for p in bound:
        if p.active and names.balloon not in p.labels:
            newest[p.node] = max(newest.get(p.node, 0.0), p.created)
    mine = sorted(n for n, v in holders.items() if v == tok)
    plan.untaint = sorted(n for n, v in holders.items() if v != tok)
    keep = mine[:plan.needed]
    plan.untaint += mine[plan.needed:]
    shapes = {_shape(p): p for p in target.pods}  # one per shape: a gang's members usually share one
    usable = frozenset().union(*(elig.names_for(p) for p in shapes.values()))
    cands = [n for n in free_nodes if n.name not in holders and n.name in usable]
    # every node the gang needs is reserved at once: free ones first, then busy ones whose work started
    # longest ago (likely to end first); work already there runs on (NoSchedule), nothing new starts, so
    # a node that frees up is not taken by smaller work before it could be reserved
    for n in sorted(cands, key=lambda n: (n.name in newest, newest.get(n.name, 0.0), n.name)):
        if len(keep) >= plan.needed:
            break
        keep.append(n.name)
        plan.taint.append(n.name)
    plan.reserved = sorted(keep)
    plan.tolerate = sorted(f"{p.namespace}/{p.name}" for p in target.pods
                           if not p.placeholder and not tolerates(p.tolerations, key, tok, "NoSchedule"))
    if virtual:
        plan.taint, plan.tolerate = [], []
    return plan


def as_planned(nodes: list[NodeView], waiting: list[Unit], plan: ReservePlan,
               names: Names) -> tuple[list[NodeView], list[Unit]]:
    """The pool's nodes and the waiting units as they will be once ``plan`` is written: its reservation
    taint on every node it reserves, and the toleration on the pods of the gang it is for. Reservations the
    plan removes are left in place (the scheduler may not see them gone yet)."""
    if not plan.unit:
        return nodes, waiting
    key = reserved_key(names)
    reserved = frozenset(plan.reserved)
    taint = Taint(key, plan.token, "NoSchedule")
    out_nodes = []
    for n in nodes:
        have = n.taint(key)
        if n.name in reserved and (have is None or have.value != plan.token):
            n = dataclasses.replace(n, taints=_without(n, key).taints + (taint,))
        out_nodes.append(n)
    tol = Toleration(key, "Equal", plan.token, "NoSchedule")
    out_units = [u if u.key != plan.unit else dataclasses.replace(u, pods=tuple(
        p if tolerates(p.tolerations, key, plan.token, "NoSchedule")
        else dataclasses.replace(p, tolerations=p.tolerations + (tol,)) for p in u.pods)) for u in waiting]
    return out_nodes, out_units


def settle(pool: str, nodes: list[NodeView], bound: list[PodView], balloons: list[yd.Balloon], waiting: list[Unit],
           names: Names, budget: int, now: float, after: float | None, resource: str = "gpu",
           burst: int | None = None, replicas: int | None = None,
           claimed: frozenset[str] = frozenset(),
           turn: tuple[str, float] | None = None) -> tuple[yd.PoolYield, ReservePlan]:
    """One pool's pass: which balloons yield to which waiting unit (:func:`yielding.decide`) and which gang
    gets its room reserved (:func:`decide`), judged together. The reservation is decided from the units the
    first simulation finds blocked; if there is one, the simulation runs again on the nodes as the
    reservation leaves them, so that no younger unit is judged to fit (its PodGroup created, balloons
    released for it) on nodes reserved in the same pass for an older gang: its pod group cycle would only
    fail there and back it off. A unit kept off only by reservations is blocked (it waits, held), never
    unfit or another pool's work (which would let its PodGroup go to the scheduler at once)."""
    transient = frozenset({reserved_key(names)})  # a unit kept off reserved nodes waits; it is not unfit
    y = yd.decide(pool, nodes, bound, balloons, waiting, names, budget, resource, burst=burst, replicas=replicas,
                  transient=transient)
    work = frozenset(y.fits + y.blocked + y.over_budget + y.sizing + y.behind)
    plan = decide(pool, nodes, bound, waiting, y.blocked, names, now, after, claimed, turn, work)
    if plan.unit and plan.reserved:
        planned_nodes, planned_units = as_planned(nodes, waiting, plan, names)
        y = yd.decide(pool, planned_nodes, bound, balloons, planned_units, names, budget, resource, burst=burst,
                      replicas=replicas, transient=transient)
    return y, plan
