"""Metrics of the team-resource-manager and the toleration webhook."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from fleetkeeper.core.metrics import PREFIX

ACTIONS = ("assign", "replace", "release", "move", "repair")
RESULTS = ("ok", "conflict", "error", "dry_run")


class TeamsMetrics:
    def __init__(self, registry: CollectorRegistry):
        p = f"{PREFIX}_teams"
        self.desired = Gauge(f"{p}_desired_nodes", "Nodes a team should own (sum of its entries' counts)",
                             ["team"], registry=registry)
        self.assigned = Gauge(f"{p}_assigned_nodes", "Healthy nodes carrying the team's taint and label",
                              ["team"], registry=registry)
        self.eligible = Gauge(f"{p}_eligible_nodes", "Healthy nodes matching the team's selectors",
                              ["team"], registry=registry)
        self.shortfall = Gauge(f"{p}_shortfall_nodes", "desired - assigned, when positive", ["team"], registry=registry)
        self.unhealthy_held = Gauge(f"{p}_unhealthy_held_nodes", "Unhealthy team nodes awaiting replacement",
                                    ["team"], registry=registry)
        self.borrowed = Gauge(f"{p}_borrowed_pods", "Low-priority pods of others running on the team's nodes",
                              ["team"], registry=registry)
        self.node_writes = Counter(f"{p}_node_writes_total", "Node patches (taint + label) by action and result",
                                   ["action", "result"], registry=registry)
        self.replacements_throttled = Counter(f"{p}_replacements_throttled_total",
                                              "Unhealthy-node replacements held back by the rate limit",
                                              registry=registry)
        self.config_valid = Gauge(f"{p}_config_valid", "1 if the last ConfigMap read was valid", registry=registry)
        self.config_errors = Counter(f"{p}_config_errors_total", "Invalid ConfigMap versions seen", registry=registry)
        self.plan_changes = Gauge(f"{p}_plan_changes", "Node changes in the last plan", registry=registry)
        self.plan_seconds = Histogram(f"{p}_plan_seconds", "One plan pass: snapshot of the caches and decide",
                                      buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10), registry=registry)
        self.admissions = Counter(f"{p}_admission_total", "Webhook decisions",
                                  ["webhook", "decision"], registry=registry)
        for a in ACTIONS:
            for r in RESULTS:
                self.node_writes.labels(a, r)
        for d in ("patched", "borrow", "allowed", "denied"):
            self.admissions.labels("mutate", d)
        for d in ("allowed", "denied"):
            self.admissions.labels("validate", d)
        self.config_valid.set(0)
        self._teams: set[str] = set()

    def set_team(self, team: str, desired: int, assigned: int, eligible: int, shortfall: int, held: int,
                 borrowed: int) -> None:
        self._teams.add(team)
        self.desired.labels(team).set(desired)
        self.assigned.labels(team).set(assigned)
        self.eligible.labels(team).set(eligible)
        self.shortfall.labels(team).set(shortfall)
        self.unhealthy_held.labels(team).set(held)
        self.borrowed.labels(team).set(borrowed)

    def forget_teams(self, keep: set[str]) -> None:
        for t in list(self._teams - keep):
            for g in (self.desired, self.assigned, self.eligible, self.shortfall, self.unhealthy_held, self.borrowed):
                try:
                    g.remove(t)
                except KeyError:
                    pass
            self._teams.discard(t)
