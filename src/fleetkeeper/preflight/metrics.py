"""Preflight metrics, on the manager's registry, label sets pre-initialised."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from fleetkeeper.core.metrics import PREFIX
from fleetkeeper.preflight.config import CHECKS
from fleetkeeper.preflight.keys import GATE, PERIODIC

OUTCOMES = ("passed", "failed", "exhausted", "timeout", "rejected", "preempted", "given-up")
NODE_ACTIONS = ("release", "fail", "retaint", "reset", "annotate", "periodic-fail", "periodic-pass")
STATES = ("not-ready", "pending", "testing", "failed", "exhausted")  # not-ready: no test until the node is up


class PreflightMetrics:
    def __init__(self, registry: CollectorRegistry):
        self.results = Counter(f"{PREFIX}_preflight_results_total", "Validation results applied, by kind and outcome",
                               ["kind", "outcome"], registry=registry)
        self.check_failures = Counter(f"{PREFIX}_preflight_check_failures_total", "Failed checks by name",
                                      ["check"], registry=registry)
        self.pods_created = Counter(f"{PREFIX}_preflight_pods_created_total", "Test pods created", ["kind"],
                                    registry=registry)
        self.pods_deleted = Counter(f"{PREFIX}_preflight_pods_deleted_total", "Test pods deleted", ["kind"],
                                    registry=registry)
        self.node_writes = Counter(f"{PREFIX}_preflight_node_writes_total", "Node patches by action (dry-run included)",
                                   ["action"], registry=registry)
        self.gated = Gauge(f"{PREFIX}_preflight_gated_nodes", "Nodes held by the gate, by state", ["state"],
                           registry=registry)
        self.gate_seconds = Histogram(f"{PREFIX}_preflight_gate_seconds", "From gating to release",
                                      registry=registry, buckets=(5, 10, 30, 60, 120, 300, 600, 1800, 3600, 7200))
        self.coverage = Gauge(f"{PREFIX}_preflight_coverage_ratio",
                              "Share of in-scope nodes validated within the periodic period", registry=registry)
        self.oldest = Gauge(f"{PREFIX}_preflight_oldest_validation_age_seconds",
                            "Age of the oldest validation among in-scope nodes", registry=registry)
        self.eligible = Gauge(f"{PREFIX}_preflight_periodic_eligible_nodes", "Idle nodes due for a re-test",
                              registry=registry)
        self.in_flight = Gauge(f"{PREFIX}_preflight_pods_in_flight", "Test pods running", ["kind"], registry=registry)
        self.budget_denied = Counter(f"{PREFIX}_preflight_budget_denied_total",
                                     "Periodic failures that could not take a node out (budget spent)",
                                     registry=registry)
        self.history_writes = Counter(f"{PREFIX}_preflight_gpu_history_writes_total", "Per-GPU history shard writes",
                                      ["result"], registry=registry)
        for k in (GATE, PERIODIC):
            for o in OUTCOMES:
                self.results.labels(k, o)
            self.pods_created.labels(k)
            self.pods_deleted.labels(k)
            self.in_flight.labels(k).set(0)
        for c in CHECKS + ("report", "pod", "timeout"):
            self.check_failures.labels(c)
        for a in NODE_ACTIONS:
            self.node_writes.labels(a)
        for s in STATES:
            self.gated.labels(s).set(0)
        for r in ("ok", "conflict", "error"):
            self.history_writes.labels(r)
