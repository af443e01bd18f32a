"""Metrics of the node agent and the remediation controller (on an injected registry).

The monitoring pack alerts on ``fleetkeeper_remediation_budget_exhausted``,
``fleetkeeper_remediation_budget_used_ratio``, ``fleetkeeper_nodes`` and
``fleetkeeper_remediation_actions_total``.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

NODE_STATES = ("preflight", "ready", "quarantined", "draining", "terminating")
ACTIONS = ("quarantine", "escalate", "evict", "request", "terminate", "return", "release")
RESULTS = ("success", "dry_run", "error", "blocked", "budget")
WRITE_REASONS = ("first", "change", "heartbeat", "error")
FAMILIES = ("disk", "gpu", "network", "maintenance")


class AgentMetrics:
    def __init__(self, registry: CollectorRegistry):
        self.writes = Counter("fleetkeeper_health_agent_writes_total",
                              "Node status writes of the health agent by why it wrote",
                              ["reason"], registry=registry)
        self.check_seconds = Histogram("fleetkeeper_health_agent_check_seconds",
                                       "Duration of one check family run", ["family"], registry=registry,
                                       buckets=(0.0005, 0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1, 2.5, 5))
        self.node_actions = Counter("fleetkeeper_health_agent_node_actions_total",
                                    "Node-local actions (GPU reset, reboot, maintenance wait) this agent took, "
                                    "by action and outcome (succeeded, failed, interrupted, dry-run)",
                                    ["action", "outcome"], registry=registry)
        for r in WRITE_REASONS:
            self.writes.labels(r)
        for f in FAMILIES:
            self.check_seconds.labels(f)


class RemediationMetrics:
    def __init__(self, registry: CollectorRegistry):
        self.budget_used = Gauge("fleetkeeper_remediation_budget_used_ratio",
                                 "Nodes quarantined or draining over the budget, per scope "
                                 "(cluster, zone:<zone>, rack:<rack>)", ["scope"], registry=registry)
        self.budget_exhausted = Gauge("fleetkeeper_remediation_budget_exhausted",
                                      "1 while a scope's budget holds back remediation", ["scope"],
                                      registry=registry)
        self.nodes = Gauge("fleetkeeper_nodes", "Managed nodes by health state", ["state"], registry=registry)
        self.actions = Counter("fleetkeeper_remediation_actions_total", "Remediation actions by result",
                               ["action", "result"], registry=registry)
        self.storm = Gauge("fleetkeeper_remediation_storm_active",
                           "1 while a fault storm pauses new quarantines", registry=registry)
        self.waiting = Gauge("fleetkeeper_remediation_waiting_nodes",
                             "Faulty nodes not acted on, by why", ["reason"], registry=registry)
        self.latency = Histogram("fleetkeeper_remediation_condition_to_taint_seconds",
                                 "From the condition's transition to the quarantine taint",
                                 registry=registry, buckets=(0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, 300))
        self.budget_used.labels("cluster").set(0)
        self.budget_exhausted.labels("cluster").set(0)
        self.storm.set(0)
        for s in NODE_STATES:
            self.nodes.labels(s).set(0)
        for a in ACTIONS:
            for r in RESULTS:
                self.actions.labels(a, r)
        for w in ("budget", "storm", "trigger", "flapping", "stale", "hold", "validation", "pdb", "rate", "action"):
            self.waiting.labels(w).set(0)
