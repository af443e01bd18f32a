"""Metrics of the capacity component (balloons and gangs), on an injected registry."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from fleetkeeper.core.metrics import PREFIX

GANG_STATES = ("Waiting", "Running", "Broken", "Completed", "Failed")


class CapacityMetrics:
    def __init__(self, registry: CollectorRegistry, pools: list[tuple[str, str]] = ()):
        self.idle = Gauge(f"{PREFIX}_balloon_idle_capacity",
                          "Capacity held by running balloons (GPUs or CPU cores), free for real work at once",
                          ["pool", "resource"], registry=registry)
        self.balloons = Gauge(f"{PREFIX}_balloon_pods", "Balloon pods by pool and state (running, pending, desired)",
                              ["pool", "state"], registry=registry)
        self.blocked = Gauge(f"{PREFIX}_balloon_blocked_nodes",
                             "Pool nodes balloons may not use (preflight or quarantine taint)", ["pool"],
                             registry=registry)
        self.evictions = Counter(f"{PREFIX}_balloon_evictions_total",
                                 "Balloons removed from preflight/quarantined nodes",
                                 ["pool", "result"], registry=registry)
        self.lingering = Counter(f"{PREFIX}_balloon_lingering_evictions_total",
                                 "Released balloons evicted because their ReplicaSet had not removed them in time",
                                 ["pool", "result"], registry=registry)
        self.releases = Counter(f"{PREFIX}_balloon_releases_total",
                                "Balloons released in one step for waiting work (a gang as a unit)",
                                ["pool", "result"], registry=registry)
        self.waiting = Gauge(f"{PREFIX}_balloon_waiting_pods",
                             "Pods the scheduler found no room for that balloons of the pool could make room for",
                             ["pool"], registry=registry)
        self.held = Gauge(f"{PREFIX}_balloon_pool_held",
                          "1 while work waits for the pool: no new balloon takes room that frees up", ["pool"],
                          registry=registry)
        self.pass_seconds = Histogram(f"{PREFIX}_balloon_pass_seconds",
                                      "Wall time of one balloon pass (its decision over every pool's nodes and pods, "
                                      "and its writes); the next pass waits 10x this, 0.2 s at least and 1 s at most",
                                      buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5),
                                      registry=registry)
        self.reserved = Gauge(f"{PREFIX}_gang_reserved_nodes",
                              "Nodes reserved for a gang that waited past reserve_after_seconds at the head of "
                              "its pool's queue", ["pool"], registry=registry)
        self.head_wait = Gauge(f"{PREFIX}_gang_queue_head_wait_seconds",
                               "How long the pool's head (the first of its waiting work) has been the head, as of "
                               "the last pass; 0 while nothing waits. Its room is reserved once this reaches "
                               "reserve_after_seconds", ["pool"], registry=registry)
        self.reservations = Counter(f"{PREFIX}_node_reservations_total",
                                    "Reservation taints set (reserve) and removed (release)", ["op", "result"],
                                    registry=registry)
        self.gangs = Gauge(f"{PREFIX}_gangs", "Gangs by state", ["state"], registry=registry)
        self.group_ops = Counter(f"{PREFIX}_gang_group_operations_total",
                                 "Group objects created/deleted for gangs", ["kind", "op", "result"],
                                 registry=registry)
        self.ungates = Counter(f"{PREFIX}_gang_member_ungates_total",
                               "Gang gates removed from members whose gang is no longer held (one PATCH each)",
                               ["result"], registry=registry)
        self.owner_reads = Counter(f"{PREFIX}_gang_owner_reads_total",
                                   "Live reads of gang owners (Job, StatefulSet, ...): one per gang per "
                                   "interval, plus one before each group object write", registry=registry)
        self.members_lost = Counter(f"{PREFIX}_gang_broken_total",
                                    "Gangs that lost a member while running (the job must restart whole)",
                                    registry=registry)
        self.requeues = Counter(f"{PREFIX}_gang_requeue_pods_total",
                                "Requeue pods for gangs kube-scheduler had stopped trying (create), for gangs "
                                "whose room freed while they backed off (kick), and their removal (delete)", ["op", "result"], registry=registry)
        for op in ("reserve", "release"):
            for r in ("ok", "error", "dry_run", "rate_limited"):
                self.reservations.labels(op, r)
        for op in ("create", "kick", "delete"):
            for r in ("ok", "error", "dry_run", "rate_limited"):
                self.requeues.labels(op, r)
        for r in ("ok", "error", "dry_run"):
            self.ungates.labels(r)
        for s in GANG_STATES:
            self.gangs.labels(s).set(0)
        for kind in ("Workload", "PodGroup", "CoschedulingPodGroup"):
            for op in ("create", "delete"):
                for r in ("ok", "error", "dry_run"):
                    self.group_ops.labels(kind, op, r)
        for pool, resource in pools:
            self.init_pool(pool, resource)

    def init_pool(self, pool: str, resource: str) -> None:
        self.idle.labels(pool, resource)
        for s in ("running", "pending", "desired"):
            self.balloons.labels(pool, s)
        self.blocked.labels(pool)
        for r in ("ok", "error", "dry_run", "rate_limited"):
            self.evictions.labels(pool, r)
            self.releases.labels(pool, r)
            self.lingering.labels(pool, r)
        self.waiting.labels(pool)
        self.held.labels(pool)
        self.reserved.labels(pool)
