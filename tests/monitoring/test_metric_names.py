"""Every fleetkeeper metric that a rule, an alert or a dashboard queries is one the code exports.
(promtool's unit tests feed the rules made-up series, so a renamed or never-existing metric would
pass them and leave an alert that can never fire.)"""

from __future__ import annotations

import re
from pathlib import Path

from prometheus_client import CollectorRegistry

from fleetkeeper.capacity.metrics import CapacityMetrics
from fleetkeeper.core.metrics import RuntimeMetrics
from fleetkeeper.core.webhook import WebhookMetrics
from fleetkeeper.health.metrics import AgentMetrics as HealthAgentMetrics
from fleetkeeper.health.metrics import RemediationMetrics
from fleetkeeper.netacct.metrics import AgentMetrics as NetacctAgentMetrics
from fleetkeeper.netacct.metrics import TrafficCollector
from fleetkeeper.preflight.metrics import PreflightMetrics
from fleetkeeper.promguard.metrics import GuardMetrics
from fleetkeeper.relay.metrics import PacerMetrics, RelayMetrics
from fleetkeeper.teams.metrics import TeamsMetrics
from fleetkeeper.ui.server import UiMetrics

MON = Path(__file__).resolve().parents[2] / "deploy" / "monitoring"
NAME = re.compile(r"(?<![:\w])(fleetkeeper_[a-z0-9_]+)(?![:\w])")  # not inside a recorded series name (a:b:c)


def exported() -> set[str]:
    reg = CollectorRegistry()
    for cls in (RuntimeMetrics, WebhookMetrics, HealthAgentMetrics, RemediationMetrics, PreflightMetrics,
                CapacityMetrics, TeamsMetrics, GuardMetrics, RelayMetrics, PacerMetrics, NetacctAgentMetrics,
                UiMetrics):
        cls(reg)
    TrafficCollector(reg)
    names: set[str] = set()
    for fam in reg.collect():
        names.add(fam.name)
        names.update(s.name for s in fam.samples)
        if fam.type == "counter":
            names.add(fam.name + "_total")
        if fam.type == "histogram":
            names.update(fam.name + x for x in ("_bucket", "_count", "_sum"))
    return names


def referenced() -> dict[str, set[str]]:
    out: dict[str, set[str]] = {}
    for f in sorted(MON.glob("rules/*.yml")) + sorted(MON.glob("dashboards/*.json")):
        for m in NAME.findall(f.read_text()):
            out.setdefault(m, set()).add(f.name)
    return out


def test_every_queried_fleetkeeper_metric_is_exported():
    have = exported()
    refs = referenced()
    assert len(refs) > 10  # the scan found the pack
    missing = {m: sorted(files) for m, files in refs.items() if m not in have}
    assert not missing, f"queried but never exported: {missing}"
