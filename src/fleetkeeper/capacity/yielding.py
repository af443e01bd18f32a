"""Balloons yield to waiting work as a unit: pure decisions.

kube-scheduler frees room held by balloons through preemption: one victim per
pod per scheduling cycle, then the preemptor waits for the victim to go and
for its own backoff. For a gang that is the worst case: each pod group cycle
preempts for every member, the ReplicaSet re-creates the victims at once, and
the freed nodes are taken back by re-created balloons (which are in the queue,
waiting for exactly that) before the gang's next cycle. Low-priority pods
with ``preemptionPolicy: Never`` (periodic GPU re-tests) cannot preempt at all.

So fleetkeeper does it itself. :func:`decide` looks at the work waiting for a
pool (pods the scheduler has found unschedulable, grouped by gang: a gang is
one unit) in order (priority, then oldest first), places each unit whole on
the pool's nodes in a simulation (free room first, then nodes a balloon
holds), and for each unit that fits names exactly the balloons to release.
While work waits, a pool's balloon Deployment is held at the balloons it keeps
(``replicas`` = kept), so no new balloon lands on the room just freed; the
ReplicaSet removes the released balloons in one step (they carry the lowest
``controller.kubernetes.io/pod-deletion-cost``; when any of the pool's balloons
would do, :attr:`Release.interchangeable`, none is marked and the hold alone
decides how many go). When nothing waits, replicas go back to the pool's size.

No I/O, no clock.
"""

from __future__ import annotations

import heapq
from collections.abc import Callable
from dataclasses import dataclass, field, replace

from fleetkeeper.core.domain import GPU_RESOURCE, Names
from fleetkeeper.core.views import NodeView, PodView, Toleration, parse_time, requested_cpu_millis

DELETION_COST = "controller.kubernetes.io/pod-deletion-cost"
KUEUE_QUEUE_LABEL = "kueue.x-k8s.io/queue-name"
RELEASE_COST = "-2147483647"


def released_annotation(names: Names) -> str:
    """On a balloon chosen for release: the unit it makes room for."""
    return f"{names.domain}/balloon-released-for"


@dataclass(frozen=True, slots=True)
class WaitingPod:
    """An unbound pod, as the release decision needs it."""

    namespace: str
    name: str
    uid: str
    priority: int
    gpus: int
    node_selector: tuple[tuple[str, str], ...]
    node_names: tuple[str, ...]  # required matchFields metadata.name In (empty: any)
    affinity: tuple[tuple[tuple[str, str, tuple[str, ...]], ...], ...]  # required terms: ((key, op, values), ...)
    tolerations: tuple[Toleration, ...]
    group: str  # spec.schedulingGroup.podGroupName
    created: float
    unschedulable: bool  # PodScheduled=False reason Unschedulable: the scheduler tried and found no room
    unschedulable_since: float
    nominated: str
    deleting: bool
    balloon: bool
    phase: str
    scheduler_name: str = "default-scheduler"
    queued: bool = False  # managed by Kueue (kueue.x-k8s.io/queue-name): its ordering is Kueue's
    requeue_for: str = ""  # a requeue pod fleetkeeper made for this group (capacity/requeue.py)
    cpu_millis: int = 0  # CPU requested (pods of CPU pools: what a CPU balloon holds)
    scheduled_note: str = ""  # the PodScheduled condition as the scheduler last wrote it (status|reason|message|time)
    tried: bool = True  # has a PodScheduled condition other than SchedulingGated (False: not looked at yet)
    gated: bool = False  # spec.schedulingGates other than fleetkeeper's gang gate: held before the queue on purpose
    held: bool = False  # carries fleetkeeper's gang gate: its gang waits for this pass's verdict on its room
    placeholder: bool = False  # not a pod: a member its gang still lacks (``units``, ``expected``)

    @property
    def unit(self) -> str:
        return f"{self.namespace}/{self.group}" if self.group else f"{self.namespace}/pod/{self.name}"


def requeue_label(names: Names) -> str:
    """On a requeue pod (capacity/requeue.py): the group it makes kube-scheduler try again."""
    return f"{names.domain}/gang-requeue"


def waiting_pod_projector(names: Names):
    balloon = names.balloon
    requeue = requeue_label(names)
    own_gate = names.gang_gate

    def project(obj: dict) -> WaitingPod:
        meta, spec, status = obj["metadata"], obj.get("spec") or {}, obj.get("status") or {}
        gpus = 0
        for c in spec.get("containers") or ():
            res = c.get("resources") or {}
            v = (res.get("requests") or {}).get(GPU_RESOURCE) or (res.get("limits") or {}).get(GPU_RESOURCE)
            try:
                gpus += int(v or 0)
            except ValueError:
                pass
        names_: list[str] = []
        terms: list[tuple] = []
        req = (((spec.get("affinity") or {}).get("nodeAffinity") or {})
               .get("requiredDuringSchedulingIgnoredDuringExecution") or {})
        for term in req.get("nodeSelectorTerms") or ():
            for f in term.get("matchFields") or ():
                if f.get("key") == "metadata.name" and f.get("operator") == "In":
                    names_.extend(f.get("values") or ())
            exprs = tuple((e.get("key", ""), e.get("operator", ""), tuple(e.get("values") or ()))
                          for e in term.get("matchExpressions") or ())
            if exprs:
                terms.append(exprs)
        sched = next((c for c in status.get("conditions") or () if c.get("type") == "PodScheduled"), {})
        unsched = sched.get("status") == "False" and sched.get("reason") == "Unschedulable"
        return WaitingPod(
            namespace=meta["namespace"], name=meta["name"], uid=meta.get("uid", ""),
            priority=int(spec.get("priority") or 0), gpus=gpus,
            node_selector=tuple(sorted((spec.get("nodeSelector") or {}).items())),
            node_names=tuple(names_), affinity=tuple(terms),
            tolerations=tuple(Toleration(t.get("key", ""), t.get("operator", "Equal"), t.get("value", ""),
                                         t.get("effect", "")) for t in spec.get("tolerations") or ()),
            group=((spec.get("schedulingGroup") or {}).get("podGroupName") or ""),
            created=parse_time(meta.get("creationTimestamp")), unschedulable=unsched,
            unschedulable_since=parse_time(sched.get("lastTransitionTime")) if unsched else 0.0,
            nominated=status.get("nominatedNodeName", ""), deleting=bool(meta.get("deletionTimestamp")),
            balloon=balloon in (meta.get("labels") or {}), phase=status.get("phase", "Pending"),
            scheduler_name=spec.get("schedulerName") or "default-scheduler",
            queued=KUEUE_QUEUE_LABEL in (meta.get("labels") or {}),
            requeue_for=(meta.get("labels") or {}).get(requeue, ""),
            cpu_millis=requested_cpu_millis(spec),
            # fleetkeeper's own gang gate holds a member of a gang it judges (the gang counts as waiting work
            # like any held gang); the API server's SchedulingGated condition is no attempt by the scheduler
            tried=bool(sched) and sched.get("reason") != "SchedulingGated",
            gated=any(g.get("name") != own_gate for g in spec.get("schedulingGates") or ()),
            held=any(g.get("name") == own_gate for g in spec.get("schedulingGates") or ()),
            scheduled_note="|".join(str(sched.get(k) or "") for k in ("status", "reason", "message",
                                                                      "lastTransitionTime")),
        )

    return project


def tolerates(tolerations: tuple[Toleration, ...], key: str, value: str, effect: str) -> bool:
    for t in tolerations:
        if t.effect and t.effect != effect:
            continue
        if not t.key:
            if t.operator == "Exists":
                return True
            continue
        if t.key != key:
            continue
        if t.operator == "Exists" or t.value == value:
            return True
    return False


def eligible(pod: WaitingPod, node: NodeView) -> bool:
    """Could the scheduler put this pod on this node, resources aside? (Node
    labels are those fleetkeeper keeps; a selector on another label does not
    match, so fleetkeeper then leaves the room to the scheduler's preemption.)"""
    if pod.node_names and node.name not in pod.node_names:
        return False
    for k, v in pod.node_selector:
        if node.labels.get(k) != v:
            return False
    if pod.affinity and not any(_term_matches(term, node.labels) for term in pod.affinity):
        return False
    for t in node.taints:
        if t.effect in ("NoSchedule", "NoExecute") and not tolerates(pod.tolerations, t.key, t.value, t.effect):
            return False
    return True


def selects_pool(pod: WaitingPod, names: Names, pool: str) -> bool:
    """Does the pod ask for this pool by name (node selector, or every required affinity term)?"""
    if (names.pool, pool) in pod.node_selector:
        return True
    return bool(pod.affinity) and all(
        any(k == names.pool and op == "In" and pool in vals for k, op, vals in term) for term in pod.affinity)


def _term_matches(term, labels: dict[str, str]) -> bool:
    for key, op, values in term:
        have = labels.get(key)
        if op == "In" and have not in values:
            return False
        if op == "NotIn" and have in values:
            return False
        if op == "Exists" and have is None:
            return False
        if op == "DoesNotExist" and have is not None:
            return False
        if op not in ("In", "NotIn", "Exists", "DoesNotExist"):
            return False
    return True


def amount(pod: WaitingPod | PodView, resource: str) -> int:
    """What a pod takes of a pool's resource: GPUs (GPU pools) or CPU millicores (CPU pools)."""
    return pod.gpus if resource == "gpu" else pod.cpu_millis


def capacity(node: NodeView, resource: str) -> float:
    return float(node.gpus if resource == "gpu" else node.cpu_millis)


def unit_of(resource: str) -> str:
    return "GPUs" if resource == "gpu" else "CPU millicores"


@dataclass(frozen=True)
class Unit:
    """Work that must be placed together: a gang's unbound members, or one pod."""

    key: str
    priority: int
    since: float  # when it started waiting (oldest member's creation)
    pods: tuple[WaitingPod, ...]
    resource: str = "gpu"  # the pool resource it waits for: gpu, or cpu (pods that ask for no GPU)
    # a gang whose controller has not fixed its size yet (``expected`` answered None): its turn is kept, and
    # no younger unit gets balloons released before it is known (it may need all of them)
    sizing: bool = False

    @property
    def amount(self) -> int:
        return sum(amount(p, self.resource) for p in self.pods)


def units(pods: list[WaitingPod], balloon_priority: int, resource: str = "gpu",
          complete: Callable[[str], bool] | None = None,
          expected: Callable[[str], int | None] | None = None) -> list[Unit]:
    """The waiting work for pools of ``resource``, in the order it is served: priority, then oldest.

    GPU pools: pods that ask for GPUs; CPU pools: pods that ask for CPU and no
    GPU. Work counts once the scheduler has found no room for it (a member is
    Unschedulable), and also **before the scheduler has tried it**, so that
    the room is free by the time it does (otherwise its first cycle preempts
    one balloon per pod, and the pod waits for the victim and its backoff):
    a pod of its own that is not gated, and a gang whose members are all
    there with their group (``complete(key)``; before that its members are
    held before the queue and no room would help). ``expected(key)``: the
    unbound members a gang's controller knows of (placeholders stand in for
    those this view lacks), or None while its size is not known yet (the unit
    is then ``sizing``: it keeps its turn). Pods at or below the
    balloons' priority never get room from balloons."""
    groups: dict[str, list[WaitingPod]] = {}
    for p in pods:
        if p.balloon or p.deleting or p.phase != "Pending" or p.priority <= balloon_priority:
            continue
        if (p.gpus <= 0) if resource == "gpu" else (p.gpus > 0 or p.cpu_millis <= 0):
            continue
        if p.scheduler_name != "default-scheduler":
            continue  # another scheduler (Volcano, scheduler-plugins) places it: its room is that scheduler's call
        groups.setdefault(p.unit, []).append(p)
    out = []
    for key, members in groups.items():
        # members of a gang this view lacks (``expected``: the gang's unbound members as its controller
        # knows them, or all of a held gang of known size while the rest are created): counted as
        # placeholders shaped like its first member, so that the gang keeps its turn and its whole room
        want = expected(key) if expected is not None and members[0].group else 0
        sizing = want is None  # the gang's size is not known yet: it keeps its turn (Unit.sizing)
        missing = 0 if want is None else want - len(members)
        if not any(m.unschedulable for m in members):
            fresh = not any(m.tried or m.gated for m in members)
            # a gang fleetkeeper holds (its gate) waits for this pass's verdict: it counts even where the gang
            # controller's view lags behind this one (all members seen here, not yet there): left out, a
            # younger gang behind it was judged to fit, let go, and took the room first
            if not fresh or (members[0].group and missing <= 0 and not sizing and
                             not any(m.held for m in members) and (complete is None or not complete(key))):
                continue
        if missing > 0:
            first = min(members, key=lambda m: m.name)
            members = members + [replace(first, name=f"{first.name}~{i}", uid="", placeholder=True,
                                         unschedulable=False, unschedulable_since=0.0, nominated="",
                                         requeue_for="", tried=False, scheduled_note="")
                                 for i in range(missing)]
        out.append(Unit(key, max(m.priority for m in members), min(m.created for m in members),
                        tuple(sorted(members, key=lambda m: (-amount(m, resource), m.name))), resource, sizing))
    return sorted(out, key=lambda u: (-u.priority, u.since, u.key))


@dataclass(frozen=True)
class Balloon:
    namespace: str
    name: str
    node: str
    amount: float  # what it holds: GPUs, or CPU millicores (CPU pools)
    released: bool  # already chosen (annotation) or being deleted
    deleting: bool = False  # being deleted (on its way out)


@dataclass
class Release:
    unit: str
    pods: int
    amount: int  # GPUs, or CPU millicores (CPU pools)
    balloons: list[Balloon]
    # any len(balloons) of the pool's balloons would do (every node they hold is alike and takes
    # every pod of the unit): no need to mark which; the Deployment's hold lets the ReplicaSet pick
    interchangeable: bool = False


@dataclass
class PoolYield:
    pool: str
    resource: str = "gpu"
    waiting_units: int = 0
    waiting_pods: int = 0
    releases: list[Release] = field(default_factory=list)
    kept: int = 0  # running balloons that stay
    hold: bool = False  # work waits: hold the Deployment at `kept` replicas
    unfit: list[str] = field(default_factory=list)  # units that do not fit the pool even when it is empty
    blocked: list[str] = field(default_factory=list)  # units that fit the pool but not now (real work holds it)
    sizing: list[str] = field(default_factory=list)  # gangs of a size not known yet: no release behind them
    # gangs that would fit but wait behind an older gang being sized (a second or so): held, as it may need
    # their room (with no balloons in the pool, free room went to them and the older gang lost its turn)
    behind: list[str] = field(default_factory=list)
    over_budget: list[str] = field(default_factory=list)
    fits: list[str] = field(default_factory=list)  # units placed whole in this pass's simulation (room is there)
    # those of them placed in room no balloon pod is on any more (none to release, none still leaving): the
    # room has actually freed, and kube-scheduler would place them now
    free: list[str] = field(default_factory=list)
    leaving: int = 0  # balloons the ReplicaSet is still to remove for an earlier hold (unmarked releases)
    # balloons released earlier (marked, or among the leaving) that are not being deleted yet: the ReplicaSet
    # removes them, unless it is still creating the pool (it then deletes its pending pods first, in
    # batches), in which case the controller evicts those that linger (BALLOON_LINGER_SECONDS)
    going: list[Balloon] = field(default_factory=list)

    @property
    def release_count(self) -> int:
        return sum(len(r.balloons) for r in self.releases)


def _node_room(nodes: list[NodeView], bound: list[PodView], balloons: list[Balloon], label: str,
               resource: str = "gpu") -> tuple[dict[str, float], dict[str, Balloon]]:
    """Free room per node (balloons not counted as used) and the balloon on each node."""
    free = {n.name: capacity(n, resource) for n in nodes}
    for p in bound:
        if p.node in free and p.active and label not in p.labels:
            free[p.node] -= amount(p, resource)
    on: dict[str, Balloon] = {}
    for b in balloons:
        if b.node in free and not b.released:
            on[b.node] = b
    return free, on


def _shape(pod: WaitingPod) -> tuple:
    """What :func:`eligible` reads of a pod: pods of one shape may go on the same nodes."""
    return (pod.node_names, pod.node_selector, pod.affinity, pod.tolerations)


class Eligibility:
    """The nodes each pod shape may go on, each computed once per decision (the members of a gang
    usually share one shape: one pass over the nodes instead of one per member)."""

    def __init__(self, nodes: list[NodeView]):
        self.nodes = nodes
        self._by_shape: dict[tuple, tuple[list[NodeView], frozenset[str]]] = {}

    def _get(self, pod: WaitingPod) -> tuple[list[NodeView], frozenset[str]]:
        key = _shape(pod)
        got = self._by_shape.get(key)
        if got is None:
            ok = [n for n in self.nodes if eligible(pod, n)]
            got = self._by_shape[key] = (ok, frozenset(n.name for n in ok))
        return got

    def nodes_for(self, pod: WaitingPod) -> list[NodeView]:
        return self._get(pod)[0]

    def names_for(self, pod: WaitingPod) -> frozenset[str]:
        return self._get(pod)[1]


class Slots:
    """How many more pods of one shape and size the nodes could take: the sum of ``room // need`` over the
    nodes the shape may go on (a node's balloon may be released, so its whole room counts), counted once
    per shape and size and again only after the room changed (:meth:`changed`).

    A unit that wants more pods of one kind than that cannot be placed, whatever the placement: the check
    costs a dictionary lookup per kind instead of a heap over the nodes per unit, which is what a pass over
    hundreds of units blocked behind a full pool spent its time on. For a unit whose pods are all of one
    kind the count is exact (equal-sized pods fill nodes in any order), so :meth:`fits` says "fits" or "does
    not" without placing it."""

    def __init__(self, eligibility: Eligibility, room: dict[str, float]):
        self.elig, self.room = eligibility, room
        self._count: dict[tuple, int] = {}

    def changed(self) -> None:
        self._count.clear()

    def _slots(self, pod: WaitingPod, need: int) -> int:
        key = (_shape(pod), need)
        n = self._count.get(key)
        if n is None:
            room = self.room
            n = self._count[key] = sum(int(room[x.name] // need) for x in self.elig.nodes_for(pod)
                                       if room[x.name] >= need)
        return n

    def fits(self, unit: Unit) -> bool | None:
        """False: cannot fit; True: fits (a unit of one kind); None: may fit (a placement must tell)."""
        want: dict[tuple, list] = {}
        for pod in unit.pods:
            need = amount(pod, unit.resource)
            if need <= 0:
                return None
            key = (_shape(pod), need)
            got = want.get(key)
            if got is None:
                want[key] = [pod, 1]
            else:
                got[1] += 1
        for (_, need), (pod, k) in want.items():
            if self._slots(pod, need) < k:
                return False
        return True if len(want) == 1 else None


def _fit(room: float, balloon: float, need: float) -> tuple[int, float] | None:
    """(tier, room left) of a node for a pod: 0 fits in room no balloon holds, 1 fits once its
    balloon goes; None: does not fit."""
    if room - balloon >= need:
        return 0, room - balloon - need
    if balloon and room >= need:
        return 1, room - need
    return None


def _place(unit: Unit, nodes: list[NodeView], room: dict[str, float], held: dict[str, Balloon],
           eligibility: Eligibility | None = None) -> tuple[dict[str, str], set[str]] | None:
    """Place every pod of the unit (largest first): room no balloon holds first
    (best fit: least room left, then node name), then nodes where it fits once
    their balloon goes. None if the unit does not fit whole.

    One heap of candidate nodes per pod shape and size, built once: a member
    costs a heap pop, not a pass over the nodes (a 1,000-pod gang on 7,500 nodes
    was 7.5 million eligibility checks per call). A node's entry is replaced
    when a member is placed on it (older entries are skipped by version)."""
    elig = eligibility or Eligibility(nodes)
    room = dict(room)
    released: set[str] = set()
    where: dict[str, str] = {}
    version: dict[str, int] = {}
    heaps: dict[tuple, tuple[list, frozenset[str], float]] = {}

    def balloon(name: str) -> float:
        return held[name].amount if name in held and name not in released else 0.0

    for pod in unit.pods:
        need = amount(pod, unit.resource)
        hk = (_shape(pod), need)
        entry = heaps.get(hk)
        if entry is None:
            heap = []
            for n in elig.nodes_for(pod):
                fit = _fit(room[n.name], balloon(n.name), need)
                if fit is not None:
                    heap.append((fit[0], fit[1], n.name, version.get(n.name, 0)))
            heapq.heapify(heap)
            entry = heaps[hk] = (heap, elig.names_for(pod), need)
        heap = entry[0]
        best: tuple[int, str] | None = None
        while heap:
            tier, _, name, v = heapq.heappop(heap)
            if v == version.get(name, 0):
                best = (tier, name)
                break
        if best is None:
            return None
        tier, name = best
        if tier == 1:
            released.add(name)
        room[name] -= need
        where[pod.name] = name
        version[name] = version.get(name, 0) + 1
        for h, names_ok, need_ in heaps.values():  # the node's new entry in every heap it belongs to
            if name in names_ok:
                fit = _fit(room[name], balloon(name), need_)
                if fit is not None:
                    heapq.heappush(h, (fit[0], fit[1], name, version[name]))
    return where, released


def _alike(held: dict[str, Balloon], room: dict[str, float]) -> bool:
    """Every node a balloon holds has the same room and the same balloon: with every pod of a unit
    eligible on each of them (checked per unit), which of them are released makes no difference."""
    return len({(room[name], b.amount) for name, b in held.items()}) <= 1


def decide(pool: str, nodes: list[NodeView], bound: list[PodView], balloons: list[Balloon], waiting: list[Unit],
           names: Names, budget: int, resource: str = "gpu", burst: int | None = None,
           replicas: int | None = None, transient: frozenset[str] = frozenset()) -> PoolYield:
    """Which balloons of one pool to release now, and for which waiting unit.

    ``nodes``: the pool's usable nodes (Ready, schedulable, not being deleted);
    ``bound``: pods bound to them; ``balloons``: the pool's balloon pods that
    are bound; ``waiting``: units in serving order (:func:`units`); ``budget``:
    how many balloons may be released now (rate limit). A unit is served whole
    or not at all; serving stops at the first unit the budget cannot cover, so
    a later, smaller unit never overtakes it. ``burst``: the most the budget
    can ever hold; a unit that needs more balloons than that is served once the
    budget is full, and takes all of it (else it could never be served, and
    every unit behind it would wait for good). ``replicas``: the balloon Deployment's replicas now;
    below the balloons still held, the difference is already on its way out (an earlier pass
    released that many interchangeable balloons without marking which). ``transient``: taint keys that
    hold a node only for a while (a reservation for another gang): a unit kept off a node only by them is
    still that pool's work and is blocked, not unfit."""
    out = PoolYield(pool, resource)
    room, held = _node_room(nodes, bound, balloons, names.balloon, resource)
    still_there = {b.node for b in balloons if b.released}  # released, the pod not gone yet
    out.going = [b for b in balloons if b.released and not b.deleting]
    if replicas is not None and len(held) > replicas:
        # the ReplicaSet removes pending balloons, then marked ones, then these: any of them will do
        # (they were released as interchangeable), so the simulation takes them off from the end
        out.leaving = len(held) - replicas
        for name in sorted(held)[-out.leaving:]:
            out.going.append(held[name])
            del held[name]
            still_there.add(name)
    alike = _alike(held, room)
    held_names = frozenset(held)
    empty = {n.name: capacity(n, resource) for n in nodes}
    elig = Eligibility(nodes)
    # which work is this pool's, and would it fit the pool empty: judged without the transient taints
    lasting = [replace(n, taints=tuple(t for t in n.taints if t.key not in transient))
               if any(t.key in transient for t in n.taints) else n for n in nodes] if transient else nodes
    pool_elig = Eligibility(lasting) if transient else elig
    mine = []
    empty_slots = Slots(pool_elig, empty)
    for u in waiting:
        if u.resource != resource or not any(pool_elig.nodes_for(p) for p in u.pods):
            continue  # another pool's work
        if resource == "cpu" and not all(selects_pool(p, names, pool) for p in u.pods):
            continue  # CPU work that does not ask for this pool by name: room is not the only thing it may lack
        fits_empty = empty_slots.fits(u)
        if fits_empty is False or (fits_empty is None and _place(u, lasting, empty, {}, pool_elig) is None):
            out.unfit.append(u.key)  # does not fit even an empty pool: no balloon can help
            continue
        mine.append(u)
    out.waiting_units = len(mine)
    out.waiting_pods = sum(len(u.pods) for u in mine)
    # work that fits the pool waits: no new balloon may take the room that frees up
    out.hold = bool(mine)
    stop = False
    slots = Slots(elig, room)  # room as this pass's placements leave it (changed() after each)
    for u in mine:
        if u.sizing:  # its size is being fixed (a second or so): younger units get no balloons before it
            stop = True
            out.sizing.append(u.key)
            continue
        placed = None if slots.fits(u) is False else _place(u, nodes, room, held, elig)
        if placed is None:
            out.blocked.append(u.key)  # the room is taken by real work: it waits for that to finish
            continue
        where, released = placed
        if out.sizing and u.pods[0].group:
            # a gang fleetkeeper holds waits for the older gang's size (it takes no room meanwhile); a pod of
            # its own is kube-scheduler's to place wherever room is free, so the simulation gives it that room
            out.behind.append(u.key)
            continue
        cost = min(len(released), burst) if burst else len(released)
        if released and (stop or cost > budget):
            stop = True
            out.over_budget.append(u.key)
            continue
        budget -= cost
        out.fits.append(u.key)
        if not released and not any(where[p.name] in still_there for p in u.pods):
            out.free.append(u.key)
        for pod in u.pods:
            room[where[pod.name]] -= amount(pod, resource)
        slots.changed()
        if released:
            # interchangeable: the nodes are alike and every pod of the unit may go on any of them
            anywhere = alike and all(held_names <= elig.names_for(p) for p in u.pods)
            out.releases.append(Release(u.key, len(u.pods), u.amount, [held[n] for n in sorted(released)],
                                        interchangeable=anywhere))
        for n in released:
            del held[n]
    out.kept = len(held)
    return out
