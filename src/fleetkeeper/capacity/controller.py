"""The capacity controllers: balloon manager, gang group manager, gang webhook.

* ``capacity-balloons`` (one key): snapshot nodes and balloon pods from the
  shared informers, :func:`balloons.decide`, apply (server-side apply of the
  PriorityClass and one Deployment per pool; eviction of balloons from
  preflight/quarantined nodes, rate limited; metrics).
* ``capacity-gangs`` (key ``namespace/gang``): snapshot the gang's members,
  its owner and its group objects, :func:`gangs.decide_gang`, apply (create or
  delete Workload/PodGroup/coscheduling PodGroup, record the gang's state on
  the group objects and as Events).
* ``capacity-webhook`` (every replica, not only the leader): serves the pod
  CREATE mutation that puts gang members into their group, and registers it.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import orjson

from fleetkeeper.core import errors
from fleetkeeper.core.applier import Applier
from fleetkeeper.core.configmap import ConfigMapKey, watch_at_start_only
from fleetkeeper.core.admission import Admission, AdmissionRequest
from fleetkeeper.core.controller import Controller, Result
from fleetkeeper.core.domain import Names
from fleetkeeper.core.events import EventRecorder, ObjectRef
from fleetkeeper.core.kube import (
    COSCHED_PODGROUPS, DEPLOYMENTS, MUTATING_WEBHOOKS, NAMESPACES, PODGROUPS, PODS, PRIORITYCLASSES,
    WORKLOADS, Kube, Resource, build_request,
)
from fleetkeeper.core.manager import Manager
from fleetkeeper.core.plan import AddTaint, Event, Plan, RemoveTaint
from fleetkeeper.core.ratelimit import TokenBucket
from fleetkeeper.core.pki import mounted_serving_cert
from fleetkeeper.core.webhook import WebhookAsk, WebhookServer, registration, webhook_entry

from fleetkeeper.capacity import balloons as bl
from fleetkeeper.capacity import gangs as gg
from fleetkeeper.capacity import requeue as rq
from fleetkeeper.capacity import reserve as rs
from fleetkeeper.capacity import yielding as yd
from fleetkeeper.capacity.config import CONFIGMAP_KEY, CONFIGMAP_NAME, CapacityConfig, load_config, load_config_text
from fleetkeeper.capacity.metrics import GANG_STATES, CapacityMetrics
from fleetkeeper.capacity.workload_gangs import mutate_workload, webhook_rules as workload_gang_rules

log = logging.getLogger("fleetkeeper.capacity")

WEBHOOK_PATH = "capacity-gang"
WORKLOAD_GANG_PATH = "capacity-workload-gang"
WEBHOOK_CONFIG_NAME = "fleetkeeper-capacity"
# bursts of pod and node events collapse into one balloon pass: the next pass comes at least
# pass_interval(the last pass's wall time) after the last one began. A pass's decision (every node and pod of the
# pools) is CPU on the manager's event loop: the interval keeps passes to at most 1/PASS_SHARE_DIVISOR of the
# loop (what a fixed second allowed a 0.1 s pass; the wall time also counts the pass's API calls, so its share of
# the CPU is less), and never lets passes run further apart than MAX_BALLOON_PASS_SECONDS while events come. A
# fixed second left a gang's room released 1.0 s after its first member (the pass that saw the first member judged
# it before it was sized; the next waited out the second): 1.44x an empty pool for a 200-pod gang, 1.20x at 0.2 s
MIN_BALLOON_PASS_SECONDS = 0.2
MAX_BALLOON_PASS_SECONDS = 1.0
PASS_SHARE_DIVISOR = 10.0


def pass_interval(pass_seconds: float) -> float:
    """Seconds from the start of one balloon pass to the earliest next: MIN_BALLOON_PASS_SECONDS when the
    pass is cheap, PASS_SHARE_DIVISOR times its wall time when that is more, at most MAX_BALLOON_PASS_SECONDS."""
    return min(MAX_BALLOON_PASS_SECONDS, max(MIN_BALLOON_PASS_SECONDS, PASS_SHARE_DIVISOR * pass_seconds))


HOLD_RESYNC_SECONDS = 5.0  # while work waits for a pool, look again this often even without events
# a balloon released for waiting work that its ReplicaSet has not removed after this long is evicted: a
# ReplicaSet still creating the pool (thousands of balloons at 7,500 nodes) deletes its pending pods first,
# in batches of 500, before it gets to the bound ones fleetkeeper released
BALLOON_LINGER_SECONDS = 10.0
ANNOUNCE_RETRY_SECONDS = 5.0  # a balloon eviction whose Event could not be written is tried again after this
# room released for a gang stays that gang's this long (reserve.decide's ``claimed``): if other work takes part
# of it before the gang is placed, the gang's room is reserved at once rather than after its wait threshold
CLAIM_SECONDS = 60.0
GANG_WORKERS = 16  # gangs reconciled at once: each is a few API calls (owner GET, group creates, Events), so in a
# burst of hundreds of gangs the API server's latency, not CPU, bounds how soon a PodGroup exists
# a gang's message annotation (on its Workload and PodGroup) is refreshed at most this often when only the
# message changed (member counts); a change of state is written at once. What `explain` shows is at most this
# stale (15 s was tried: explain then still said "2 of 4 members exist" with all 4 there)
MESSAGE_REFRESH_SECONDS = 5.0
# a gang's owner (Job, StatefulSet, ...) read live is reused for this long by passes that write no group object;
# a pass that would create or delete one reads the owner again first (never build a group for a gone owner).
# 5 s made 3,100 GETs of Jobs in the 1,000-node burst
OWNER_READ_SECONDS = 30.0
# a group object this process created is not created again for this long while the informer has yet to show
# it (each such pass was a Conflict and a live owner GET: 154 of 454 Workload creates in the 1,000-node burst)
MADE_GRACE_SECONDS = 10.0
# a gang of at least COALESCE_MEMBERS members is looked at again at most every COALESCE_SECONDS on pod events: a
# pass reads every member (O(members)), and a 1,000-member gang's members change thousands of times as they are
# created, ungated, bound, started and finished (O(members^2) without it: 10,000 passes in a 1,000-node burst)
COALESCE_MEMBERS = 50
COALESCE_SECONDS = 0.5
_GROUP_KIND = {PODGROUPS: "PodGroup", WORKLOADS: "Workload", COSCHED_PODGROUPS: "CoschedulingPodGroup"}


@dataclass
class CapacityOptions:
    config: CapacityConfig = field(default_factory=CapacityConfig)
    webhook: bool = True
    webhook_cert_dir: Path | None = None
    webhook_config_name: str = WEBHOOK_CONFIG_NAME
    namespace_selector: dict | None = None  # restrict the webhook (tests: their namespaces)
    unregister_on_exit: bool = False


def _parse(text: str | None, source: str) -> CapacityConfig:
    return load_config(None, "defaults") if text is None else load_config_text(text, source)


def config_source(kube: Kube, namespace: str) -> ConfigMapKey[CapacityConfig]:
    """The ConfigMap ``fleetkeeper-capacity`` through the core loader: absent means the defaults; present
    without its key, or invalid, is a ConfigError naming what is wrong."""
    return ConfigMapKey(kube, namespace, CONFIGMAP_NAME, CONFIGMAP_KEY, _parse)


async def load_cluster_config(kube: Kube, namespace: str) -> CapacityConfig:
    """The ConfigMap ``fleetkeeper-capacity`` in ``namespace``; defaults if it does not exist."""
    return await config_source(kube, namespace).load()


def _ident(obj: dict) -> dict:
    meta = obj.get("metadata") or {}
    return {"metadata": {k: meta.get(k) for k in ("name", "namespace", "labels", "annotations", "uid",
                                                   "deletionTimestamp", "resourceVersion")},
            "spec": obj.get("spec") or {}, "status": obj.get("status") or {}}


NODE_EVENTS_PER_STEP = 20  # NodeReserved / NodeReservationRemoved Events per reservation step
RELEASE_EVENTS_PER_PASS = 20  # BalloonsReleased Events per unit in one pass; the rest in one Event
WRITE_CONCURRENCY = 16  # API calls of one step in flight at once (a reservation of 1,000 nodes is one step)


async def _bounded(calls, limit: int = WRITE_CONCURRENCY) -> None:
    sem = asyncio.Semaphore(limit)

    async def one(c):
        async with sem:
            await c
    await asyncio.gather(*(one(c) for c in calls))


class BalloonManager:
    def __init__(self, mgr: Manager, cfg: CapacityConfig, metrics: CapacityMetrics, recorder: EventRecorder,
                 finish_gangs: bool = False):
        """``finish_gangs``: gangs are off but gangs admitted before are still in flight (setup's
        admitted-only gang controller finishes them): the repair of gangs kube-scheduler stopped trying
        (requeue.decide) keeps watching them, or a gang handed over while its room was taken could pend for
        good once the room frees."""
        self.kube, self.names, self.cfg = mgr.kube, mgr.names, cfg
        self.dry_run = mgr.settings.dry_run
        self.namespace = cfg.balloons.namespace or mgr.settings.namespace
        self.metrics, self.recorder, self.clock = metrics, recorder, mgr.clock
        self.nodes = mgr.node_informer()
        self.pods = mgr.pod_informer()
        self.bucket = TokenBucket(cfg.balloons.evict_per_minute / 60.0, max(1, int(cfg.balloons.evict_per_minute // 6)),
                                  mgr.clock)
        self.controller = Controller("capacity-balloons", self.reconcile, metrics=mgr.metrics, clock=mgr.clock)
        # node writes (the reservation taint) go through the core applier, like every node write
        self.applier = Applier(mgr.kube, recorder, component="capacity", registry=mgr.registry, clock=mgr.clock,
                               dry_run=self.dry_run, writes_per_second=200.0)
        b = cfg.balloons
        self.release_bucket = TokenBucket(b.release_per_minute / 60.0, b.release_burst, mgr.clock)
        # evictions of released balloons that linger: at most as fast as balloons are released
        self.linger_bucket = TokenBucket(b.release_per_minute / 60.0, b.release_burst, mgr.clock)
        self.reserve_after = cfg.gangs.reserve_after_seconds if cfg.gangs.enabled else None
        self.reserve_bucket = TokenBucket(cfg.gangs.reserve_per_minute / 60.0,
                                          max(1, int(cfg.gangs.reserve_per_minute // 4)), mgr.clock)
        self._reserved: dict[str, tuple[str, tuple[str, ...]]] = {}
        self.last_reserve: dict[str, rs.ReservePlan] = {}
        self.requeue_after = (cfg.gangs.requeue_stuck_after_seconds
                              if (cfg.gangs.enabled or finish_gangs) and cfg.in_tree else None)
        self.requeue_bucket = TokenBucket(cfg.gangs.requeue_per_minute / 60.0,
                                          max(1, int(cfg.gangs.requeue_per_minute // 4)), mgr.clock)
        self.requeue_per_member = cfg.gangs.requeue_seconds_per_member
        self.kick_after = cfg.gangs.retry_when_room_frees_after_seconds if self.requeue_after is not None else None
        self._requeue_state = rq.RequeueState()
        self.last_requeue: rq.RequeuePlan | None = None
        self.waiting = None
        if (b.enabled and b.yield_to_waiting) or self.reserve_after is not None or self.requeue_after is not None:
            # unbound pods only (a bound pod leaves this informer): what waits for room
            self.waiting = mgr.informer(PODS, yd.waiting_pod_projector(self.names), field_selector="spec.nodeName=",
                                        key="capacity-waiting-pods")
            self.waiting.add_handler(self.controller.handler(
                lambda k, o, n: None if (o is not None and n is not None and o.unschedulable == n.unschedulable
                                         and o.deleting == n.deleting) or (n or o).balloon else "pools"))
        self.last_yield: dict[str, yd.PoolYield] = {}
        self._going_since: dict[tuple[str, str], float] = {}  # released balloons not yet deleting: since when
        self._evicted: set[tuple[str, str]] = set()  # evicted by _evict_lingering (never twice)
        # "is this gang's group there with all its members?" (set by setup when gangs run): such a gang is
        # waiting work before the scheduler's first try
        self.gang_complete: Callable[[str], bool] | None = None
        # "how many members does this held gang of known size still lack?" (set by setup when gangs run): its
        # turn for room is kept while they are created (gangs.expect_members_seconds)
        self.gang_expected: Callable[[str], int | None] | None = None
        # told each pass what the simulation says about every waiting unit (fits, blocked, unfit): the gang
        # controller creates a held large gang's PodGroup once it fits (gangs.hold_podgroup)
        self.on_room: Callable[[dict[str, str]], bool] | None = None
        self._units: list[yd.Unit] = []
        self._pool_nodes: dict[str, list] = {}
        self._pool_bound: dict[str, list] = {}
        self._reserve_plans: dict[str, rs.ReservePlan] = {}  # per pool: this pass's reservation (_yields)
        # per pool: its head (the first of its waiting work) and since when (reserve.decide's ``turn``); kept in
        # memory: after a restart a head's wait starts again (a reservation already written stays: its taints)
        self._turns: dict[str, tuple[str, float]] = {}
        self._claims: dict[str, float] = {}  # gang -> when balloons were first released for it (CLAIM_SECONDS)
        self._applied: dict[str, str] = {}
        self._sized: dict[str, str] = {}
        self._ns_ready = False
        self._last_problems: list[str] = []
        self._last_pass = -1e9
        self._pass_interval = MIN_BALLOON_PASS_SECONDS  # pass_interval() of the last pass's wall time
        self.last_plan: bl.BalloonPlan | None = None
        label = bl.balloon_label(self.names)
        self.nodes.add_handler(self.controller.handler(lambda k, o, n: "pools"))
        # set by each pass: work waits for room (a pool holds its balloons, or a held gang waits for its room)
        self._room_wanted = False
        self._handed_waiting = False  # set by each pass: a gang kube-scheduler has waits unplaced (_requeue)

        def pod_event(k, o, n):
            p = n or o
            if p is not None and p.labels.get(label):
                return "pools"
            # room frees while work waits for it: a bound pod ends or goes. The next pass (at most one a
            # second) lets the waiting work go, rather than the hold's resync up to HOLD_RESYNC_SECONDS later
            if self._room_wanted and o is not None and o.node and o.active and (n is None or not n.active):
                return "pools"
            return None
        self.pods.add_handler(self.controller.handler(pod_event))
        for p in cfg.balloons.pools:
            metrics.init_pool(p.name, "nvidia.com/gpu" if p.resource == "gpu" else "cpu")

    async def run(self) -> None:
        self.controller.enqueue("pools")
        await self.controller.run()

    async def _ensure_namespace(self) -> None:
        if self._ns_ready or self.dry_run or not self.cfg.balloons.enabled:
            return
        try:
            await self.kube.create(NAMESPACES, {"apiVersion": "v1", "kind": "Namespace",
                                                "metadata": {"name": self.namespace}})
        except errors.Conflict:
            pass
        self._ns_ready = True

    async def _apply(self, res: Resource, body: dict) -> bool:
        meta = body["metadata"]
        key = f"{res.plural}/{meta.get('namespace', '')}/{meta['name']}"
        digest = hashlib.sha256(orjson.dumps(body, option=orjson.OPT_SORT_KEYS)).hexdigest()
        if self._applied.get(key) == digest:
            return False
        if self.dry_run:
            log.info("dry-run: would apply %s %s", res.kind, key)
        else:
            await self.kube.apply(res, body)
        self._applied[key] = digest
        return True

    async def reconcile(self, key: str) -> Result:
        # one pass sees every pool; bursts of pod/node events collapse into one pass per _pass_interval
        since = self.clock.monotonic() - self._last_pass
        if since < self._pass_interval:
            return Result(requeue_after=self._pass_interval - since)
        self._last_pass = start = self.clock.monotonic()
        try:
            return await self._pass()
        finally:
            took = self.clock.monotonic() - start
            self._pass_interval = pass_interval(took)
            self.metrics.pass_seconds.observe(took)

    async def _pass(self) -> Result:
        await self._ensure_namespace()
        items, _ = await self.kube.list(DEPLOYMENTS, self.namespace,
                                        label_selector=f"{self.names.managed_by}={bl.MANAGER}")
        existing = [d["metadata"]["name"] for d in items
                    if bl.balloon_label(self.names) in ((d["metadata"].get("labels")) or {})]
        replicas = {d["metadata"]["name"]: int((d.get("spec") or {}).get("replicas") or 0) for d in items}
        yields = self._yields(replicas)
        hold = {y.pool: y.kept for y in yields if y.hold}
        plan = bl.decide(self.cfg.balloons, self.names, self.namespace, self.nodes.items(), self.pods.items(), existing,
                         hold=hold)
        self.last_plan = plan
        if plan.problems != self._last_problems:
            for problem in plan.problems:
                log.warning("balloons: %s", problem)
            self._last_problems = list(plan.problems)
        if plan.priority_class:
            try:
                await self._apply(PRIORITYCLASSES, plan.priority_class)
            except errors.Invalid as exc:
                raise errors.Terminal(f"PriorityClass {self.cfg.balloons.priority_class}: {exc} (its value is "
                                      f"immutable: delete it to change the balloon priority)") from exc
        # the chosen balloons first get the lowest deletion cost, then the Deployment is held at the balloons
        # that stay: the ReplicaSet removes exactly those, in one step, and starts none in their place
        released = await self._release(yields)
        for dep in plan.deployments:
            meta = dep["metadata"]
            sized = f"{(self.last_plan_sizing(meta['name']))}"
            if await self._apply(DEPLOYMENTS, dep) and self._sized.get(meta["name"]) != sized:
                self._sized[meta["name"]] = sized
                await self.recorder.emit(
                    ObjectRef("Deployment", meta["name"], meta["namespace"], api_version="apps/v1"),
                    "BalloonPoolSized",
                    f"{dep['spec']['replicas']} balloons of {meta['annotations'][f'{self.names.domain}/balloon-size']} "
                    f"each, one per node of pool {meta['labels'][bl.balloon_label(self.names)]}")
        await self._announce(released)
        await self._evict_lingering(yields)
        await self._reserve_room(yields)
        watch_requeue, kick_in = await self._requeue(yields)
        if self.on_room is not None and self.on_room(room_verdicts(yields)):
            watch_requeue = True  # a held gang waits for room: look again soon even without events
        # a gang kube-scheduler has and found no room for also wants to hear of room freeing: its prompt retry
        # (the kick) counts from the pass that sees the room, not from the next resync
        self._room_wanted = watch_requeue or any(y.hold for y in yields) or self._handed_waiting
        for name in plan.delete_deployments:
            why = "balloons are disabled" if not self.cfg.balloons.enabled else "pool no longer configured for balloons"
            if self.dry_run:
                log.info("dry-run: would delete balloon Deployment %s/%s (%s)", self.namespace, name, why)
                continue
            try:
                await self.kube.delete(DEPLOYMENTS, name, self.namespace)
                self._applied = {k: v for k, v in self._applied.items()
                                 if k != f"{DEPLOYMENTS.plural}/{self.namespace}/{name}"}
                await self.recorder.emit(ObjectRef("Deployment", name, self.namespace, api_version="apps/v1"),
                                         "BalloonPoolRemoved", f"balloon Deployment removed: {why}")
            except errors.NotFound:
                pass
        requeue = self.cfg.resync_seconds
        for ev in plan.evictions:
            if not self.bucket.take():
                self.metrics.evictions.labels(ev.pool, "rate_limited").inc()
                requeue = min(requeue, max(0.5, self.bucket.wait_time()))
                continue
            # the Event first, written by the call (no eviction without its Event, even across a kill)
            if not await self.recorder.announce(
                    ObjectRef("Pod", ev.name, ev.namespace), "BalloonRemoved",
                    f"balloon of pool {ev.pool} removed from node {ev.node} ({ev.reason}): "
                    f"balloons never hold preflight or quarantined nodes" + (" [dry-run]" if self.dry_run else ""),
                    type_="Warning", id=f"removed:{ev.node}"):
                self.metrics.evictions.labels(ev.pool, "error").inc()
                requeue = min(requeue, ANNOUNCE_RETRY_SECONDS)
                continue
            result = "dry_run" if self.dry_run else "ok"
            try:
                if not self.dry_run:
                    await self.kube.evict(ev.namespace, ev.name)
            except errors.NotFound:
                continue
            except errors.ApiError as exc:
                result = "error"
                log.warning("could not remove balloon %s/%s from %s: %s", ev.namespace, ev.name, ev.node, exc)
            self.metrics.evictions.labels(ev.pool, result).inc()
        for st in plan.status:
            self.metrics.idle.labels(st.pool, st.resource).set(st.idle_capacity)
            self.metrics.balloons.labels(st.pool, "running").set(st.running)
            self.metrics.balloons.labels(st.pool, "pending").set(st.pending)
            self.metrics.balloons.labels(st.pool, "desired").set(st.desired)
            self.metrics.blocked.labels(st.pool).set(len(st.blocked_nodes))
        for y in yields:
            self.metrics.waiting.labels(y.pool).set(y.waiting_pods)
            self.metrics.held.labels(y.pool).set(1 if y.hold else 0)
            if y.hold:
                requeue = min(requeue, HOLD_RESYNC_SECONDS)
        if watch_requeue:
            requeue = min(requeue, HOLD_RESYNC_SECONDS)
        if kick_in is not None:  # a prompt retry falls due: be there when it does
            requeue = min(requeue, max(kick_in, self._pass_interval))
        return Result(requeue_after=requeue)

    def last_plan_sizing(self, name: str) -> str:
        for st in (self.last_plan.status if self.last_plan else ()):
            if bl.deployment_name(st.pool) == name:
                return f"{st.desired} {st.resource}"
        return ""

    def _yields(self, replicas: dict[str, int] | None = None) -> list[yd.PoolYield]:
        """Per GPU pool: which balloons to release for the work waiting for it (pure decision, see yielding).
        ``replicas``: each balloon Deployment's replicas now (what its ReplicaSet is still to remove)."""
        b = self.cfg.balloons
        if self.waiting is None:
            return []
        items = self.waiting.items()
        by_resource = {r: yd.units(items, b.priority, r, self.gang_complete, self.gang_expected)
                       for r in ("gpu", "cpu")}
        self._units = by_resource["gpu"] + by_resource["cpu"]
        label, released_key = self.names.balloon, yd.released_annotation(self.names)
        nodes, pods = self.nodes.items(), self.pods.items()
        budget = self.release_bucket.available()
        now = self.clock.now()
        keys = {u.key for u in self._units}
        self._claims = {k: t for k, t in self._claims.items() if k in keys and now - t <= CLAIM_SECONDS}
        claimed = frozenset(self._claims)
        out = []
        for pool in b.pools:
            if not pool.enabled:
                continue
            waiting = by_resource[pool.resource]
            pool_nodes = [n for n in nodes if n.labels.get(self.names.pool) == pool.name]
            sizing = bl.size_pool(pool, pool_nodes)
            usable = [n for n in pool_nodes if n.ready and not n.unschedulable and not n.deleting]
            self._pool_nodes[pool.name] = usable
            if not waiting or sizing.problem:
                out.append(yd.PoolYield(pool.name, pool.resource))
                # nothing waits: any reservation left is stale and goes
                self._reserve_plans[pool.name] = rs.decide(pool.name, usable, [], [], [], self.names, now,
                                                           self.reserve_after)
                self._set_turn(pool.name, self._reserve_plans[pool.name])
                continue
            names_ = {n.name for n in usable}
            bound = [p for p in pods if p.node in names_ and p.active]
            per_balloon = sizing.per_balloon if pool.resource == "gpu" else sizing.per_balloon * 1000  # millicores
            balloons = [yd.Balloon(p.namespace, p.name, p.node, per_balloon,
                                   released=p.deleting or released_key in p.annotations, deleting=p.deleting)
                        for p in pods if p.labels.get(label) == pool.name and p.namespace == self.namespace
                        and p.node in names_ and p.phase not in ("Succeeded", "Failed")] \
                if b.enabled and b.yield_to_waiting else []
            self._pool_bound[pool.name] = bound
            # the yield and the reservation judged together: no younger unit is let go onto nodes reserved in
            # the same pass for an older gang (reserve.settle)
            y, self._reserve_plans[pool.name] = rs.settle(
                pool.name, usable, bound, balloons, waiting, self.names, budget, now, self.reserve_after,
                pool.resource, burst=self.release_bucket.burst,
                replicas=(replicas or {}).get(bl.deployment_name(pool.name)), claimed=claimed,
                turn=self._turns.get(pool.name))
            self._set_turn(pool.name, self._reserve_plans[pool.name])
            if not (b.enabled and b.yield_to_waiting):
                y.hold = False  # the decision is only read for reservations
            multi = {u.key for u in waiting if len(u.pods) > 1}
            for r in y.releases:  # a gang's released room is its own for a while (a pod's: another is released)
                if r.unit in multi:
                    self._claims.setdefault(r.unit, now)
            budget = max(0, budget - y.release_count)  # a unit larger than the burst took all of it
            out.append(y)
        self.last_yield = {y.pool: y for y in out}
        return out

    def _set_turn(self, pool: str, plan: rs.ReservePlan) -> None:
        if plan.head:
            self._turns[pool] = (plan.head, plan.head_since)
            self.metrics.head_wait.labels(pool).set(max(0.0, self.clock.now() - plan.head_since))
        else:
            self._turns.pop(pool, None)
            self.metrics.head_wait.labels(pool).set(0)

    async def _evict_lingering(self, yields: list[yd.PoolYield]) -> None:
        """Evict balloons released for waiting work that are still there BALLOON_LINGER_SECONDS later (the
        Deployment is held at the balloons that stay by then, so none is started in their place)."""
        now = self.clock.monotonic()
        going = {(b.namespace, b.name): (y.pool, b) for y in yields for b in y.going}
        self._going_since = {k: self._going_since.get(k, now) for k in going}
        self._evicted = {k for k in self._evicted if k in going}
        due = []
        for k, (pool, b) in sorted(going.items()):
            if now - self._going_since[k] < BALLOON_LINGER_SECONDS or k in self._evicted:
                continue
            if not self.linger_bucket.take():
                self.metrics.lingering.labels(pool, "rate_limited").inc()
                continue
            due.append((k, pool, b))

        async def one(key: tuple[str, str], pool: str, b: yd.Balloon) -> None:
            # the Event first, written by the call (no eviction without its Event, even across a kill)
            if not await self.recorder.announce(
                    ObjectRef("Pod", b.name, b.namespace), "BalloonEvicted",
                    f"balloon of pool {pool} on node {b.node} evicted: released for waiting work "
                    f"{now - self._going_since[key]:.0f}s ago and not yet removed by its ReplicaSet"
                    + (" [dry-run]" if self.dry_run else ""), id=f"evicted:{b.node}"):
                self.metrics.lingering.labels(pool, "error").inc()
                return  # tried again at a later pass
            result = "dry_run" if self.dry_run else "ok"
            try:
                if not self.dry_run:
                    await self.kube.evict(b.namespace, b.name)
                self._evicted.add(key)
            except errors.NotFound:
                return
            except errors.ApiError as exc:  # counted and logged; tried again at a later pass
                self.metrics.lingering.labels(pool, "error").inc()
                log.warning("could not evict released balloon %s/%s: %s", b.namespace, b.name, exc)
                return
            self.metrics.lingering.labels(pool, result).inc()
        await _bounded([one(k, pool, b) for k, pool, b in due])

    async def _reserve_room(self, yields: list[yd.PoolYield]) -> None:
        """No starvation: reserve nodes for the gang that waited too long (pure plan: reserve.decide)."""
        key = rs.reserved_key(self.names)
        for y in yields:
            nodes = self._pool_nodes.get(y.pool, [])
            plan = self._reserve_plans.pop(y.pool, None)  # decided with the yield (_yields: reserve.settle)
            if not nodes or plan is None:
                continue
            self.last_reserve[y.pool] = plan
            if plan.virtual:  # kept in the simulation only (the gang still lacks members): nothing to write
                if plan.untaint:
                    plan = dataclasses.replace(plan, unit="", token="", reserved=[])
                else:
                    continue
            # the gang's pods first get the toleration, so that the nodes reserved are theirs
            waiting = {f"{p.namespace}/{p.name}": p for u in self._units for p in u.pods}
            tol = {"key": key, "operator": "Equal", "value": plan.token, "effect": "NoSchedule"}

            async def tolerate(name: str) -> None:
                pod = waiting.get(name)
                if pod is None or self.dry_run:
                    return
                ops = [{"op": "add", "path": "/spec/tolerations/-", "value": tol}] if pod.tolerations else \
                    [{"op": "add", "path": "/spec/tolerations", "value": [tol]}]
                try:
                    await self.kube.patch(PODS, pod.name, ops, pod.namespace, patch_type="json")
                except (errors.NotFound, errors.Invalid, errors.Conflict) as exc:
                    log.info("reservation toleration for %s: %s", name, exc)

            await _bounded(tolerate(n) for n in plan.tolerate)
            # one step: every write of the plan (a gang's whole reservation, and the removal of stale ones) at
            # once, for one token of the reservation budget; a gang is never reserved node by node
            writes = [(n, plan.token) for n in plan.taint] + [(n, None) for n in plan.untaint]
            if writes and not self.reserve_bucket.take():
                for _, value in writes:
                    self.metrics.reservations.labels("reserve" if value else "release", "rate_limited").inc()
                log.info("reservation of pool %s (%d taint(s) to set, %d to remove) waits for the rate limit",
                         y.pool, len(plan.taint), len(plan.untaint))
                continue  # the whole step waits: nothing of it is written, announced or counted as reserved

            async def write(i: int, node: str, value: str | None) -> None:
                note = (f"reserved for gang {plan.unit} ("
                        + ("room released for it" if plan.claimed else f"waited {plan.waited:.0f}s at the head")
                        + "): only its pods may start here "
                        f"until it is placed" if value else "reservation removed: the gang it was for is placed "
                        "or gone")
                # an Event on each of the first nodes of a step; the step's Event on the PodGroup names them
                # all (a 1,000-node reservation must not spend the whole Event budget)
                result = await self._set_taint(node, key, value, note, announce=i < NODE_EVENTS_PER_STEP)
                self.metrics.reservations.labels("reserve" if value else "release", result).inc()

            await _bounded(write(i, n, v) for i, (n, v) in enumerate(writes))
            self.metrics.reserved.labels(y.pool).set(len(plan.reserved))
            state = (plan.unit, tuple(plan.reserved))
            if plan.unit and self._reserved.get(y.pool) != state:
                self._reserved[y.pool] = state
                ns, _, gang = plan.unit.partition("/")
                why = (f"other work took part of the room released for it {plan.waited:.0f}s after it began "
                       "waiting" if plan.claimed else
                       f"waited {plan.waited:.0f}s at the head of its pool's queue (over "
                       f"{self.reserve_after:.0f}s)")
                await self.recorder.emit(
                    ObjectRef("PodGroup", gang, ns, api_version=PODGROUPS.api_version), "GangRoomReserved",
                    f"gang {gang} {why}: the {plan.needed} "
                    f"nodes it needs reserved in one step ({len(plan.reserved)} reserved now: "
                    + ", ".join(plan.reserved[:20]) + (" ..." if len(plan.reserved) > 20 else "")
                    + "); work already there runs on, smaller work no longer starts there"
                    + (" [dry-run]" if self.dry_run else ""))
            elif not plan.unit:
                self._reserved.pop(y.pool, None)

    async def _requeue(self, yields: list[yd.PoolYield]) -> tuple[bool, float | None]:
        """Repair gangs kube-scheduler stopped trying, retry gangs whose room freed (pure plan:
        requeue.decide). True while a gang that fits is watched (the next pass must come soon even without
        events), and the seconds until a prompt retry falls due."""
        if self.waiting is None:
            return False, None
        fitting = {k for y in yields for k in y.fits}
        free = {k for y in yields for k in y.free}
        probes = [p for p in self.waiting.items() if p.requeue_for]
        now = self.clock.now()
        # a gang still missing members has no PodGroup to retry
        whole = [u for u in self._units if not any(p.placeholder for p in u.pods)]
        handed = None if self.gang_complete is None else {
            u.key for u in whole if u.pods[0].group and self.gang_complete(u.key)}
        self._handed_waiting = self.kick_after is not None and any(
            u.pods[0].group and (handed is None or u.key in handed) for u in whole)
        plan = rq.decide(whole, fitting, probes, self._requeue_state, now, self.requeue_after,
                         self.requeue_per_member, self.kick_after, free=free, handed=handed)
        self.last_requeue = plan
        self._requeue_state = plan.state
        for ns, name, why in plan.delete:
            result = "dry_run" if self.dry_run else "ok"
            if not self.dry_run:
                try:
                    await self.kube.delete(PODS, name, ns)
                except errors.NotFound:
                    pass
                except errors.ApiError as exc:
                    result = "error"
                    log.warning("requeue pod %s/%s: %s", ns, name, exc)
            self.metrics.requeues.labels("delete", result).inc()
            log.info("requeue pod %s/%s removed: %s", ns, name, why)
        for op, (ns, group, fitted) in [("kick", k) for k in plan.kick] + [("create", c) for c in plan.create]:
            key = f"{ns}/{group}"
            if not self.requeue_bucket.take():
                self.metrics.requeues.labels(op, "rate_limited").inc()
                if op == "kick":  # not made: due again at the next pass
                    self._requeue_state.kicked.pop(key, None)
                continue
            if op == "create":
                rq.made(self._requeue_state, key, now)
            result = "dry_run" if self.dry_run else "ok"
            if not self.dry_run:
                try:
                    await self.kube.create(PODS, rq.requeue_pod(ns, group, self.names), ns)
                except errors.ApiError as exc:  # e.g. a quota or a policy of the namespace
                    result = "error"
                    log.warning("gang %s: cannot create its requeue pod: %s", key, exc)
            self.metrics.requeues.labels(op, result).inc()
            failed = "" if result in ("ok", "dry_run") else " (failed: see the controller log)"
            dry = " [dry-run]" if self.dry_run else ""
            ref = ObjectRef("PodGroup", group, ns, api_version=PODGROUPS.api_version)
            if op == "kick":
                await self.recorder.emit(
                    ref, "GangRetried",
                    f"room for gang {group} freed {fitted:.0f}s ago and the scheduler would otherwise retry it "
                    f"only when its backoff ends: one requeue pod of the group (never placed) created so that "
                    f"it is tried now{dry}{failed}")
                continue
            await self.recorder.emit(
                ref, "GangRequeued",
                f"gang {group} has fitted its pool for {fitted:.0f}s and kube-scheduler has reported no progress "
                f"for it (no member bound, no condition changed): one requeue pod of the group (never placed) "
                f"created so that the scheduler tries the whole group again{dry}{failed}",
                type_="Warning")
        return bool(plan.fits_since) or bool(probes), plan.next_kick_in

    async def _set_taint(self, node: str, key: str, value: str | None, note: str, announce: bool = True) -> str:
        """Add (value) or remove (None) the reservation taint through the core applier: one patch with the
        cached node's resourceVersion, its Event (``NodeReserved`` / ``NodeReservationRemoved``) and
        ``fleetkeeper_node_writes_total{component="capacity"}``; a conflict waits for the next pass."""
        view = self.nodes.get(node)
        if view is None:
            return "error"
        op = AddTaint(key, value, "NoSchedule") if value is not None else RemoveTaint(key)
        event = Event("NodeReserved" if value is not None else "NodeReservationRemoved", note)
        plan = Plan(node, "reserve" if value is not None else "unreserve", (op, event) if announce else (op,))
        try:
            out = await self.applier.apply(view, plan, announce=announce)
        except errors.FleetkeeperError as exc:  # Temporary (a Conflict: the cache was behind) or an API error
            log.info("reservation taint on %s: %s (next pass)", node, exc)
            return "error"
        if out.gone:
            return "error"
        return "dry_run" if self.dry_run else "ok"

    async def _release(self, yields: list[yd.PoolYield]) -> list[tuple[yd.PoolYield, yd.Release, str]]:
        """Mark the chosen balloons (lowest deletion cost + the unit they make room for), all of a pass at
        once (bounded concurrency): the Deployment's hold then removes exactly them in one step. The Events
        come after the hold (:meth:`_announce`), so that hundreds of releases never delay it."""
        released_key = yd.released_annotation(self.names)
        done: list[tuple[yd.PoolYield, yd.Release, str]] = []
        calls = []
        for y in yields:
            if y.over_budget:
                log.info("balloons of pool %s: release for %s waits for the rate limit", y.pool,
                         ", ".join(y.over_budget[:5]))
            for rel in y.releases:
                n = len(rel.balloons)
                # a unit larger than the burst is released when the bucket is full and empties it
                if not self.release_bucket.take(min(n, self.release_bucket.burst)):
                    self.metrics.releases.labels(y.pool, "rate_limited").inc(n)
                    continue
                outcome = ["dry_run" if self.dry_run else "ok"]
                done.append((y, rel, outcome))
                if rel.interchangeable:
                    continue  # any of them will do: the hold alone lets the ReplicaSet remove that many
                for bal in rel.balloons:
                    if not self.dry_run:
                        calls.append(self._mark(bal, rel.unit, released_key, outcome))
        await _bounded(calls)
        return [(y, rel, outcome[0]) for y, rel, outcome in done]

    async def _mark(self, bal: yd.Balloon, unit: str, released_key: str, outcome: list[str]) -> None:
        try:
            await self.kube.patch(PODS, bal.name, {"metadata": {"annotations": {
                yd.DELETION_COST: yd.RELEASE_COST, released_key: unit[:250]}}}, bal.namespace)
        except errors.NotFound:
            pass
        except errors.ApiError as exc:
            outcome[0] = "error"
            log.warning("could not release balloon %s/%s: %s", bal.namespace, bal.name, exc)

    async def _announce(self, released: list[tuple[yd.PoolYield, yd.Release, str]]) -> None:
        async def one(y: yd.PoolYield, rel: yd.Release, result: str) -> None:
            n = len(rel.balloons)
            self.metrics.releases.labels(y.pool, result).inc(n)
            what = f"gang {rel.unit}" if "/pod/" not in rel.unit else f"pod {rel.unit.replace('/pod/', '/')}"
            nodes = ("any of the pool's balloons (its nodes are alike for this work; the ReplicaSet picks)"
                     if rel.interchangeable else
                     ", ".join(bal.node for bal in rel.balloons[:10]) + (" ..." if n > 10 else ""))
            await self.recorder.emit(
                ObjectRef("Deployment", bl.deployment_name(y.pool), self.namespace, api_version="apps/v1"),
                "BalloonsReleased",
                f"{n} balloon(s) of pool {y.pool} released in one step for {what} ({rel.pods} pod(s), "
                f"{rel.amount} {yd.unit_of(y.resource)} waiting): {nodes}" + (" [dry-run]" if self.dry_run else ""))
        # one Event per unit, and one for the rest when many units got room at once (hundreds of single
        # pods would only exhaust the Event budget)
        await _bounded(one(*r) for r in released[:RELEASE_EVENTS_PER_PASS])
        rest = released[RELEASE_EVENTS_PER_PASS:]
        for y, rel, result in rest:
            self.metrics.releases.labels(y.pool, result).inc(len(rel.balloons))
        by_pool: dict[str, list[yd.Release]] = {}
        for y, rel, _ in rest:
            by_pool.setdefault(y.pool, []).append(rel)
        for pool, rels in by_pool.items():
            await self.recorder.emit(
                ObjectRef("Deployment", bl.deployment_name(pool), self.namespace, api_version="apps/v1"),
                "BalloonsReleased",
                f"{sum(len(r.balloons) for r in rels)} more balloon(s) of pool {pool} released in the same step "
                f"for {len(rels)} more unit(s) ({sum(r.pods for r in rels)} pod(s)): "
                + ", ".join(r.unit for r in rels[:10]) + (" ..." if len(rels) > 10 else "")
                + (" [dry-run]" if self.dry_run else ""))


def room_verdicts(yields: list[yd.PoolYield]) -> dict[str, str]:
    """Per waiting unit: does the pass's simulation place it whole now in room no balloon is on (fits),
    only once real work ends or the balloons released for it are gone (blocked, also over the release
    budget), or never on its pool (unfit). A held gang's PodGroup waits for the balloons to go: a pod group
    cycle while they are still there fails, and the gang then backs off (up to 10 s) with its room free."""
    out: dict[str, str] = {}
    for y in yields:
        for k in y.unfit:
            out.setdefault(k, gg.ROOM_UNFIT)
        for k in (*y.blocked, *y.over_budget, *y.fits, *y.sizing, *y.behind):
            if out.get(k) != gg.ROOM_FITS:
                out[k] = gg.ROOM_BLOCKED
        for k in y.free:
            out[k] = gg.ROOM_FITS
    return out


class GangManager:
    def __init__(self, mgr: Manager, cfg: CapacityConfig, metrics: CapacityMetrics, recorder: EventRecorder,
                 admitted_only: bool = False):
        self.kube, self.names, self.cfg = mgr.kube, mgr.names, cfg
        # gangs turned off: only pods admitted as gang members (naming their group, or gated) are members
        self.admitted_only = admitted_only
        self.dry_run = mgr.settings.dry_run
        self.metrics, self.recorder, self.clock = metrics, recorder, mgr.clock
        self.nodes = mgr.node_informer()
        self.pods = mgr.informer(PODS, gg.gang_pod_projector(self.names), label_selector=self.names.gang,
                                 key="capacity-gang-pods")
        sel = f"{self.names.managed_by}={gg.MANAGER}"
        self.groups: dict[Resource, object] = {}
        if cfg.in_tree:
            self.groups[WORKLOADS] = mgr.informer(WORKLOADS, _ident, label_selector=sel, key="capacity-groups")
            self.groups[PODGROUPS] = mgr.informer(PODGROUPS, _ident, label_selector=sel, key="capacity-groups")
        if cfg.coscheduling:
            self.groups[COSCHED_PODGROUPS] = mgr.informer(COSCHED_PODGROUPS, _ident, label_selector=sel,
                                                          key="capacity-groups")
        self.controller = Controller("capacity-gangs", self.reconcile, metrics=mgr.metrics, clock=mgr.clock,
                                     workers=GANG_WORKERS)
        self.members: dict[str, dict[str, gg.GangPod]] = {}
        self.by_node: dict[str, set[tuple[str, str]]] = {}  # node -> {(gang key, pod name)}
        self.empty_since: dict[str, float] = {}
        self.states: dict[str, str] = {}
        self.plans: dict[str, gg.GangPlan] = {}
        self._reported: dict[tuple[str, str], bool] = {}
        self._messages: dict[str, str] = {}
        self._emitted: dict[str, str] = {}
        self._annotated_at: dict[str, float] = {}
        # the balloon pass's verdicts on waiting gangs (set_room); None: no pass judges room (hold off)
        self.room: dict[str, str] | None = None
        self.judged_at: float | None = None  # when the balloon pass last judged room (set_room)
        self._owners: dict[str, tuple[float, gg.Owner]] = {}  # gang key -> (read at, owner as read live)
        self._soon: set[str] = set()  # large gangs due for a pass within COALESCE_SECONDS (_touch)
        self._made: dict[tuple[str, str], float] = {}  # (gang key, plural) -> when this process created it
        self.pods.add_handler(self._on_pod)
        for inf in self.groups.values():
            inf.add_handler(self.controller.handler())
        self.nodes.add_handler(self._on_node)

    def _on_pod(self, typ: str, key: str, old: gg.GangPod | None, new: gg.GangPod | None) -> None:
        if self.admitted_only:  # a pod admitted after gangs were turned off is no member
            old, new = (p if p is None or p.scheduling_group or p.cosched_group or p.gated else None
                        for p in (old, new))
        if old is not None and old.gang:
            self.members.get(old.key, {}).pop(old.name, None)
            if old.node:
                self.by_node.get(old.node, set()).discard((old.key, old.name))
        if new is not None and new.gang:
            self.members.setdefault(new.key, {})[new.name] = new
            if new.node:
                self.by_node.setdefault(new.node, set()).add((new.key, new.name))
        for p in (old, new):
            if p is not None and p.gang:
                self._touch(p.key)

    def _touch(self, key: str) -> None:
        """Look at the gang again: at once, or for a large gang at most every COALESCE_SECONDS."""
        if len(self.members.get(key, ())) < COALESCE_MEMBERS:
            self.controller.enqueue(key)
        elif key not in self._soon:
            self._soon.add(key)
            self.controller.queue.add_after(key, COALESCE_SECONDS)

    def complete(self, key: str) -> bool:
        """The gang's group object exists and all ``minCount`` members do: kube-scheduler's PreEnqueue lets
        it into the queue now."""
        plan = self.plans.get(key)
        if plan is None or not plan.min_count:
            return False
        if not any(inf.get(key) is not None for inf in self.groups.values()):
            return False
        return sum(1 for p in self.members.get(key, {}).values() if p.active) >= plan.min_count

    def expected(self, key: str) -> int | None:
        """How many unbound members the balloon pass should count for this gang (0: those it sees; None: its
        size is not known yet, it has members younger than ``gangs.expect_members_seconds`` and no pass of
        this controller yet: the pass keeps its turn rather than give its room to younger gangs meanwhile).

        A gang with all its members counts whole (``minCount`` less those bound), even while the pass's own
        view of the pods lags behind this controller's: a 1,000-member gang seen with 900 would leave room
        to smaller gangs that its own cycle then lacks. A held gang of known size still missing members
        counts whole too while its first member is younger than ``gangs.expect_members_seconds``."""
        plan = self.plans.get(key)
        window = self.cfg.gangs.expect_members_seconds
        if plan is None and window is not None:
            active = [p for p in self.members.get(key, {}).values() if p.active and not p.node]
            if active and self.clock.now() - min(p.created for p in active) <= window:
                return None
        if plan is None or not plan.min_count:
            return 0
        active = [p for p in self.members.get(key, {}).values() if p.active]
        if not active:
            return 0
        bound = sum(1 for p in active if p.node)
        if len(active) >= plan.min_count:
            return max(0, plan.min_count - bound)
        if window is None or not plan.held or bound or self.clock.now() - min(p.created for p in active) > window:
            return 0
        return plan.min_count

    def set_room(self, verdicts: dict[str, str]) -> bool:
        """The balloon pass's verdicts; a held gang whose verdict changed is looked at again. Returns
        whether a held gang still waits (the pass then looks again soon, even without events)."""
        old, self.room = self.room or {}, verdicts
        self.judged_at = self.clock.now()
        waiting = False
        for key, plan in list(self.plans.items()):
            if not plan.held:
                continue
            waiting = True
            if verdicts.get(key) != old.get(key) or key not in verdicts:  # (no verdict: maybe no pool's work)
                self.controller.enqueue(key)
        return waiting

    def _on_node(self, typ: str, key: str, old, new) -> None:
        if old is not None and new is not None and old.ready == new.ready:
            return
        for gang in {g for g, _ in self.by_node.get(key, ())}:
            self.controller.enqueue(gang)

    async def run(self) -> None:
        for key in list(self.members):
            self.controller.enqueue(key)
        for inf in self.groups.values():
            for k in inf.keys():
                self.controller.enqueue(k)
        await self.controller.run()

    async def _owner(self, key: str, pods: list[gg.GangPod], live: bool = False) -> tuple[gg.Owner | None, bool]:
        """The gang's owner and whether it was read live just now. Without ``live``, a read younger than
        OWNER_READ_SECONDS is reused (one GET per gang per interval, not one per pod event)."""
        owners = {(p.owner_kind, p.owner_name, p.owner_uid, p.owner_api_version) for p in pods if p.owner_kind}
        if len(owners) != 1:
            return None, True
        kind, name, uid, api_version = owners.pop()
        api = gg.OWNER_APIS.get(kind)
        if api is None:
            return gg.Owner(kind, name, uid, api_version, None), True
        now = self.clock.monotonic()
        cached = self._owners.get(key)
        if not live and cached is not None and cached[1].uid == uid and now - cached[0] < OWNER_READ_SECONDS:
            return cached[1], False
        res = Resource(api[0], api[1], api[2], kind, True)
        self.metrics.owner_reads.inc()
        obj = await self.kube.get_or_none(res, name, pods[0].namespace)
        if obj is None or obj["metadata"].get("uid") != uid:
            owner = gg.Owner(kind, name, uid, api_version, None, gone=True)
        else:
            owner = gg.Owner(kind, name, uid, api_version, gg.owner_replicas(kind, obj), gg.owner_problem(kind, obj),
                             deleting=bool(obj["metadata"].get("deletionTimestamp")))
        self._owners[key] = (now, owner)
        return owner, True

    async def reconcile(self, key: str) -> Result | None:
        ns, gang = key.split("/", 1)
        self._soon.discard(key)  # events from now on are seen by a later pass
        pods = list(self.members.get(key, {}).values())
        if not pods:
            self.members.pop(key, None)
            self.empty_since.setdefault(key, self.clock.now())
        else:
            self.empty_since.pop(key, None)
        objs = gg.GroupObjects(
            workload=self.groups[WORKLOADS].get(key) if WORKLOADS in self.groups else None,
            podgroup=self.groups[PODGROUPS].get(key) if PODGROUPS in self.groups else None,
            cosched=self.groups[COSCHED_PODGROUPS].get(key) if COSCHED_PODGROUPS in self.groups else None,
        )
        owner, live = await self._owner(key, pods) if pods else (None, True)
        node_ok: dict[str, bool] = {}
        for p in pods:
            if p.node:
                nv = self.nodes.get(p.node)
                if nv is not None and not nv.deleting:
                    node_ok[p.node] = nv.ready
        room = gg.ROOM_FITS if self.room is None else self.room.get(key)
        plan = gg.decide_gang(key, pods, owner, objs, node_ok, self.cfg, self.names, self.clock.now(),
                              self.empty_since.get(key), room=room, judged_at=self.judged_at)
        if not live and (plan.create or plan.delete):
            # a group object is about to be created or deleted (or is missing though just made: it may have
            # been collected with its owner): decide again on the owner as it is now
            owner, _ = await self._owner(key, pods, live=True)
            plan = gg.decide_gang(key, pods, owner, objs, node_ok, self.cfg, self.names, self.clock.now(),
                                  self.empty_since.get(key), room=room, judged_at=self.judged_at)
        plan = self._unmade(plan)
        self.plans[key] = plan
        await self._apply(ns, gang, plan, owner, pods, objs)
        if plan.state == "Deleted":
            self._messages.pop(key, None)
            self._emitted.pop(key, None)
            self._annotated_at.pop(key, None)
            self._reported = {k: v for k, v in self._reported.items() if k[0] != key}
            self.plans.pop(key, None)
            self.states.pop(key, None)
            self.empty_since.pop(key, None)
            self._owners.pop(key, None)
        elif plan.state:
            self.states[key] = plan.state
        counts = {s: 0 for s in GANG_STATES}
        for s in self.states.values():
            if s in counts:
                counts[s] += 1
        for s, n in counts.items():
            self.metrics.gangs.labels(s).set(n)
        return Result(requeue_after=plan.requeue_after) if plan.requeue_after else None

    def _unmade(self, plan: gg.GangPlan) -> gg.GangPlan:
        """Leave out of ``plan.create`` the group objects this process created moments ago that the informer
        has yet to show (another create would only meet Conflict)."""
        now = self.clock.monotonic()
        self._made = {k: t for k, t in self._made.items() if now - t < MADE_GRACE_SECONDS}
        left = [MADE_GRACE_SECONDS - (now - self._made[(plan.key, r.plural)]) for r, _ in plan.create
                if (plan.key, r.plural) in self._made]
        if left:  # looked at again once the grace ends (it may be gone for good, not just unseen)
            plan.create = [(r, b) for r, b in plan.create if (plan.key, r.plural) not in self._made]
            plan.requeue_after = min(plan.requeue_after or 1e9, max(0.1, min(left)))
        return plan

    async def _apply(self, ns: str, gang: str, plan: gg.GangPlan, owner: gg.Owner | None,
                     pods: list[gg.GangPod], objs: gg.GroupObjects) -> None:
        for problem in plan.problems:
            if self._reported.get((plan.key, problem)) is None:
                self._reported[(plan.key, problem)] = True
                log.warning("gang %s: %s", plan.key, problem)
                await self._event(ns, gang, owner, pods, "GangProblem", f"gang {gang}: {problem}", type_="Warning")
        if plan.ungate:
            await self._ungate(ns, plan)
        created: list[str] = []
        for res, body in plan.create:
            kind = _GROUP_KIND[res]
            try:
                if self.dry_run:
                    self.metrics.group_ops.labels(kind, "create", "dry_run").inc()
                else:
                    await self.kube.create(res, body, ns)
                    self.metrics.group_ops.labels(kind, "create", "ok").inc()
                    self._made[(plan.key, res.plural)] = self.clock.monotonic()
                created.append(res.kind)
            except errors.Conflict:
                self._made[(plan.key, res.plural)] = self.clock.monotonic()
                # already there: the cache had not seen it yet (our own create a moment ago)
            except errors.Forbidden as exc:  # e.g. the namespace is terminating: retrying will not help
                self.metrics.group_ops.labels(kind, "create", "error").inc()
                log.warning("gang %s: cannot create %s: %s", plan.key, res.kind, exc)
                return
            except errors.NotFound as exc:
                self.metrics.group_ops.labels(kind, "create", "error").inc()
                raise errors.Temporary(f"{res.kind} API {res.api_version} not served: {exc} (GenericWorkload "
                                       f"feature gate, or the scheduler-plugins CRD for coscheduling)", 30) from exc
        if created and plan.min_count:  # only what this pass created: an object that was already there is not news
            await self._event(ns, gang, owner, pods, "GangGroupCreated",
                              f"gang {gang}: {', '.join(created)} with minCount "
                              f"{plan.min_count} ({plan.size_source}); its members are scheduled all or nothing")
        for res, name in plan.delete:
            kind = _GROUP_KIND[res]
            if self.dry_run:
                self.metrics.group_ops.labels(kind, "delete", "dry_run").inc()
                continue
            self._made.pop((plan.key, res.plural), None)
            try:
                await self.kube.delete(res, name, ns)
                self.metrics.group_ops.labels(kind, "delete", "ok").inc()
            except errors.NotFound:
                pass
        if plan.state == "Deleted" and plan.delete:
            await self.recorder.emit(ObjectRef("PodGroup", gang, ns, api_version=PODGROUPS.api_version),
                                     "GangGroupDeleted", f"gang {gang} has no pods left; group objects removed")
        for name in plan.patch_labels:
            if not self.dry_run:
                try:
                    await self.kube.patch(PODS, name, {"metadata": {"labels": {gg.COSCHED_LABEL: gang}}}, ns)
                except errors.NotFound:
                    pass
        now = self.clock.monotonic()
        refresh = (plan.state and plan.state != "Deleted" and plan.message != self._messages.get(plan.key)
                   and now - self._annotated_at.get(plan.key, -1e9) >= MESSAGE_REFRESH_SECONDS)
        if not (plan.state_changed or refresh) and plan.state and plan.state != "Deleted" and \
                plan.message != self._messages.get(plan.key):
            wait = MESSAGE_REFRESH_SECONDS - (now - self._annotated_at.get(plan.key, -1e9))
            plan.requeue_after = min(plan.requeue_after or wait, max(wait, 0.1))
        # state and message live on one object: the PodGroup once there is one (what the scheduler reads),
        # the Workload before (a held gang); a PodGroup just created gets them at its first pass
        target = next(((res, o) for res, o in ((PODGROUPS, objs.podgroup), (COSCHED_PODGROUPS, objs.cosched),
                                               (WORKLOADS, objs.workload)) if o is not None), None)
        bare = (target is not None and plan.state and plan.state != "Deleted"
                and gg.state_annotation(self.names) not in ((target[1].get("metadata") or {}).get("annotations")
                                                            or {}))
        if plan.state_changed or refresh or bare:
            self._messages[plan.key] = plan.message
            self._annotated_at[plan.key] = now
            if not self.dry_run and target is not None:
                ann = {"metadata": {"annotations": {gg.state_annotation(self.names): plan.state,
                                                    gg.message_annotation(self.names): plan.message[:1000]}}}
                try:
                    await self.kube.patch(target[0], gang, ann, ns)
                except errors.NotFound:
                    pass
        if plan.state_changed and self._emitted.get(plan.key) != plan.state:
            self._emitted[plan.key] = plan.state
            if plan.state == "Broken":
                self.metrics.members_lost.inc()
            await self._event(ns, gang, owner, pods, f"Gang{plan.state}", f"gang {gang}: {plan.message}",
                              type_="Warning" if plan.state in ("Broken", "Failed") else "Normal")

    async def _ungate(self, ns: str, plan: gg.GangPlan) -> None:
        """Remove fleetkeeper's gang gate from the members ``plan.ungate`` names (strategic merge: only that
        gate goes, any other controller's stays). A member gone meanwhile is no error."""
        if self.dry_run:
            self.metrics.ungates.labels("dry_run").inc(len(plan.ungate))
            return
        body = {"spec": {"schedulingGates": [{"$patch": "delete", "name": self.names.gang_gate}]}}

        async def one(name: str) -> None:
            try:
                await self.kube.patch(PODS, name, body, ns, patch_type="strategic")
                self.metrics.ungates.labels("ok").inc()
            except errors.NotFound:
                pass
            except errors.FleetkeeperError as exc:
                self.metrics.ungates.labels("error").inc()
                log.warning("gang %s: cannot remove the gang gate from pod %s: %s", plan.key, name, exc)
        await _bounded([one(n) for n in plan.ungate])

    async def _event(self, ns: str, gang: str, owner: gg.Owner | None, pods: list[gg.GangPod], reason: str,
                     note: str, type_: str = "Normal") -> None:
        if owner is not None and owner.kind:
            ref = ObjectRef(owner.kind, owner.name, ns, owner.uid, owner.api_version)
        elif pods:
            ref = ObjectRef("Pod", pods[0].name, ns, pods[0].uid)
        else:
            ref = ObjectRef("PodGroup", gang, ns, api_version=PODGROUPS.api_version)
        await self.recorder.emit(ref, reason, note, type_=type_)


def webhook_registration(cfg: CapacityConfig, names: Names, config_name: str, url: str | None, ca: bytes,
                         namespace_selector: dict | None = None, service_namespace: str = "fleetkeeper-system") -> dict:
    """The MutatingWebhookConfiguration: pod CREATE, only pods carrying the gang
    label (objectSelector), failurePolicy Fail (a gang member created without its
    group would be scheduled alone: the partial placement gangs exist to prevent)."""
    g = cfg.gangs
    service = None if url else {"name": g.webhook_service, "namespace": service_namespace,
                                "path": f"/{WEBHOOK_PATH}", "port": g.webhook_port}
    entry = webhook_entry(
        f"gang.{names.domain}", url=url, service=service, ca_bundle=ca,
        rules=[{"operations": ["CREATE"], "apiGroups": [""], "apiVersions": ["v1"], "resources": ["pods"],
                "scope": "Namespaced"}],
        failure_policy="Fail", timeout_seconds=5, namespace_selector=namespace_selector,
        object_selector={"matchExpressions": [{"key": names.gang, "operator": "Exists"}]},
        reinvocation="IfNeeded")
    entries = [entry]
    if g.workload_gangs:  # workloads that declare a gang (JobSet, MPIJob, ...): label their member templates
        wservice = None if url else {**service, "path": f"/{WORKLOAD_GANG_PATH}"}  # type: ignore[dict-item]
        wurl = f"{url.rsplit('/', 1)[0]}/{WORKLOAD_GANG_PATH}" if url else None
        entries.append(webhook_entry(
            f"workload-gang.{names.domain}", url=wurl, service=wservice, ca_bundle=ca,
            rules=workload_gang_rules(), failure_policy="Ignore", timeout_seconds=5,
            namespace_selector=namespace_selector))
    return registration("mutating", config_name, entries)


def gangs_off(req: AdmissionRequest, names: Names) -> Admission:
    """The gang webhook with gangs disabled: a gang member is admitted unchanged, with a warning saying so."""
    labels = ((req.obj or {}).get("metadata") or {}).get("labels") or {}
    if req.kind != "Pod" or req.operation != "CREATE" or names.gang not in labels:
        return Admission()
    return Admission(warnings=[f"gangs are disabled in fleetkeeper's capacity configuration (gangs.enabled: "
                               f"false): label {names.gang} has no effect, the pod is scheduled on its own"])


class GangWebhook:
    """The gang and workload-gang handlers on the process's one webhook server (one port, one
    certificate), and the registration of their configuration."""

    def __init__(self, mgr: Manager, cfg: CapacityConfig, options: CapacityOptions):
        self.kube, self.names, self.cfg, self.options = mgr.kube, mgr.names, cfg, options
        self.dry_run = mgr.settings.dry_run
        self.registry = mgr.registry
        self.namespace = mgr.settings.namespace
        self.ready = asyncio.Event()
        g = cfg.gangs
        mounted = mounted_serving_cert(Path(g.webhook_cert_dir)) if g.webhook_cert_dir else None
        if mounted is None and g.webhook_cert_dir:
            raise errors.ConfigError("capacity", [("gangs.webhook_cert_dir", g.webhook_cert_dir,
                                                   "no tls.crt and tls.key there")])
        hosts = (g.webhook_host, f"{g.webhook_service}.{self.namespace}.svc", "localhost")
        self.webhooks = mgr.webhook(
            WebhookAsk("capacity", (WEBHOOK_PATH, WORKLOAD_GANG_PATH), g.webhook_host, g.webhook_port, hosts,
                       mounted=mounted, cert_dir=options.webhook_cert_dir),
            {WEBHOOK_PATH: self.handler, WORKLOAD_GANG_PATH: self.workload_handler})

    @property
    def server(self) -> WebhookServer:
        return self.webhooks.server

    def handler(self, req):
        if not self.cfg.gangs.enabled:
            return gangs_off(req, self.names)
        return gg.mutate_pod(req, self.cfg, self.names, gate=not self.dry_run)

    def workload_handler(self, req):
        if not self.cfg.gangs.enabled:
            return Admission()
        return mutate_workload(req, self.names)

    def registration(self, url: str | None, ca: bytes) -> dict:
        return webhook_registration(self.cfg, self.names, self.options.webhook_config_name, url, ca,
                                    self.options.namespace_selector, self.namespace)

    async def run(self) -> None:
        g = self.cfg.gangs
        await self.webhooks.started.wait()
        local = g.webhook_host in ("127.0.0.1", "localhost")
        url = g.webhook_url or (self.webhooks.url(WEBHOOK_PATH, g.webhook_host) if local else None)
        log.info("gang webhook serving on %s", self.webhooks.url(WEBHOOK_PATH))
        try:
            if g.manage_webhook_registration and not self.dry_run:
                if g.enabled:
                    await self.kube.apply(MUTATING_WEBHOOKS, self.registration(url, self.webhooks.ca_bundle))
                else:  # gangs off: the registration an earlier configuration made goes (no pod is sent here)
                    try:
                        await self.kube.delete(MUTATING_WEBHOOKS, self.options.webhook_config_name)
                        log.info("gangs are disabled: webhook registration %s removed",
                                 self.options.webhook_config_name)
                    except errors.NotFound:
                        pass
            self.ready.set()
            await asyncio.Event().wait()
        finally:
            if self.options.unregister_on_exit and not self.dry_run:
                try:
                    await asyncio.shield(self.kube.delete(MUTATING_WEBHOOKS, self.options.webhook_config_name))
                except (errors.FleetkeeperError, asyncio.CancelledError):
                    pass


@dataclass
class Capacity:
    """Handles on the running parts (tests and the demo read them)."""

    config: CapacityConfig
    metrics: CapacityMetrics
    balloons: BalloonManager | None = None
    gangs: GangManager | None = None
    webhook: GangWebhook | None = None


async def check_apis(kube: Kube, cfg: CapacityConfig) -> None:
    """Fail early, naming the fix, when a gang backend's API is not served."""
    wanted: list[tuple[Resource, str]] = []
    if cfg.gangs.enabled and cfg.in_tree:
        wanted += [(WORKLOADS, "enable the GenericWorkload feature gate and runtime-config "
                               "scheduling.k8s.io/v1alpha2=true on the API server (and GangScheduling on "
                               "kube-scheduler), or set gangs.backend: coscheduling"),
                   (PODGROUPS, "as for workloads")]
    if cfg.gangs.enabled and cfg.coscheduling:
        wanted.append((COSCHED_PODGROUPS, "install deploy/capacity/coscheduling-podgroup-crd.yaml (scheduler-plugins), "
                                          "or set gangs.backend: in-tree"))
    problems = []
    for res, fix in wanted:
        try:
            await kube.request(build_request("list", res, limit=1))
        except errors.NotFound:
            problems.append((f"gangs.backend={cfg.gangs.backend}", res.api_version + " " + res.plural,
                             f"the API server does not serve it: {fix}"))
    if problems:
        raise errors.ConfigError("capacity", problems)


async def gangs_in_flight(kube: Kube, cfg: CapacityConfig, names: Names) -> bool:
    """Whether group objects fleetkeeper made exist (gangs admitted while gangs were on): with gangs turned
    off, those gangs are still finished. An API not served means none."""
    resources = ([WORKLOADS, PODGROUPS] if cfg.in_tree else []) + ([COSCHED_PODGROUPS] if cfg.coscheduling else [])
    for res in resources:
        try:
            resp = await kube.request(build_request("list", res, limit=1,
                                                    label_selector=f"{names.managed_by}={gg.MANAGER}"))
        except errors.NotFound:
            continue
        if resp.get("items"):
            return True
    return False


async def setup(mgr: Manager, options: CapacityOptions | None) -> Capacity:
    watch = options is None
    src = config_source(mgr.kube, mgr.settings.namespace)
    if options is None:
        options = CapacityOptions(config=await src.load())
    cfg = options.config
    await check_apis(mgr.kube, cfg)
    metrics = CapacityMetrics(mgr.registry)
    recorder = mgr.recorder("capacity")
    cap = Capacity(cfg, metrics)
    # turned off: gangs already admitted as gangs (their pods name their group, possibly held behind
    # fleetkeeper's gate) still need their group objects and gates lifted, or they would pend for good
    in_flight = not cfg.gangs.enabled and await gangs_in_flight(mgr.kube, cfg, mgr.names)
    # started when balloons are off too: its plan then removes the balloon Deployments a previous
    # configuration left behind (turning a feature off cleans up after it)
    cap.balloons = BalloonManager(mgr, cfg, metrics, recorder, finish_gangs=in_flight)
    mgr.add("capacity-balloons", cap.balloons.run)
    if watch:  # applied at start; later versions are checked and reported (the running one stays)
        mgr.add("capacity-config-watch", lambda: watch_at_start_only(src, mgr.clock.sleep), leader=False)
    if options.webhook:  # served with gangs off too: a registration it does not manage (the chart's) stays,
        # and a gang member it admits unchanged is better than one refused (failurePolicy Fail)
        cap.webhook = GangWebhook(mgr, cfg, options)
        mgr.add("capacity-webhook", cap.webhook.run, leader=False)
    if not cfg.gangs.enabled:
        # gangs in flight are finished as gangs, handed to kube-scheduler at once (and watched by the
        # balloon pass's repair like any gang it has). New pods are not made gangs.
        if in_flight:
            cap.gangs = GangManager(mgr, cfg, metrics, recorder, admitted_only=True)
            mgr.add("capacity-gangs", cap.gangs.run)
            cap.balloons.gang_complete = cap.gangs.complete
        return cap
    cap.gangs = GangManager(mgr, cfg, metrics, recorder)
    mgr.add("capacity-gangs", cap.gangs.run)
    # a gang whose group appears is complete work waiting for room: look at the pools at once
    cap.balloons.gang_complete = cap.gangs.complete
    cap.balloons.gang_expected = cap.gangs.expected
    if cap.balloons.waiting is not None:  # the pass judges room: large gangs wait for it (hold_podgroup)
        cap.gangs.room = {}
        cap.balloons.on_room = cap.gangs.set_room
    for inf in cap.gangs.groups.values():
        inf.add_handler(cap.balloons.controller.handler(lambda k, o, n: "pools" if o is None else None))
    return cap
