"""The lifecycle's configuration: each state's deadline and escalation, and the
one disruption budget. Loaded from the ConfigMap ``fleetkeeper-lifecycle``
key ``lifecycle.yaml`` (the core ConfigMap loader: absent means these
defaults). The budget is ``budget:`` here, else the health policy's
``budget:`` section (where it has always been configured); either way it now
bounds every capacity-removing action, not only quarantines.

Example::

    deadlines:
      joining: 1h            # never came up -> retire
      validating: 6h         # never passed validation -> retire
      quarantined: 1d        # investigate-only quarantine -> drain
      draining: 7d           # pods still there (PodDisruptionBudget) -> retire
      awaiting_repair: 4h    # drained for a reset/reboot/maintenance that never came -> replace
      revalidating: 6h       # failed or never finished re-validation -> retire
      retiring: 1h           # the machine did not go away -> an operator is told
    preflight_max_attempts: 3
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

from fleetkeeper.core.config import Duration, load_model, parse_yaml

CONFIGMAP = "fleetkeeper-lifecycle"
CONFIG_KEY = "lifecycle.yaml"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Limit(_Strict):
    """At most ``max_nodes`` and at most ``max_percent`` of the scope's nodes
    disrupted at once (the smaller wins; never below ``min_nodes``)."""

    max_nodes: int | None = Field(None, ge=0)
    max_percent: float | None = Field(None, ge=0, le=100)
    min_nodes: int = Field(1, ge=0)

    def limit(self, total: int) -> int | None:
        caps = []
        if self.max_nodes is not None:
            caps.append(self.max_nodes)
        if self.max_percent is not None:
            caps.append(max(self.min_nodes, int(total * self.max_percent / 100.0)))
        return min(caps) if caps else None


class BudgetConfig(_Strict):
    """The disruption budget: per cluster, per zone, per rack and per value of any label the operator
    names (``labels: {example.com/pdu: {max_nodes: 2}}``), and new disruptions per window."""

    cluster: Limit = Limit(max_nodes=50, max_percent=2.0)
    zone: Limit = Limit(max_percent=5.0)
    rack: Limit = Limit(max_nodes=4)
    labels: dict[str, Limit] = Field(default_factory=dict)
    window: Duration = 3600.0
    max_new_per_window: int | None = Field(100, ge=0)  # new disruptions started within the window


class Deadlines(_Strict):
    joining: Duration = 3600.0
    validating: Duration = 6 * 3600.0
    suspect: Duration = 3600.0
    quarantined: Duration = 86400.0
    draining: Duration = 7 * 86400.0
    awaiting_repair: Duration = 4 * 3600.0
    revalidating: Duration = 6 * 3600.0
    retiring: Duration = 3600.0


class LifecycleConfig(_Strict):
    deadlines: Deadlines = Deadlines()
    budget: BudgetConfig | None = None  # None: the health policy's budget section
    preflight_max_attempts: int = Field(3, ge=1)  # the gate's max_attempts: used up -> retire
    escalate: bool = True  # False: deadlines are reported (Events, explain) but nothing is escalated
    node_selector: dict[str, str] = Field(default_factory=dict)
    workers: int = Field(8, ge=1)
    resync: Duration = 60.0  # every node is looked at again this often (deadlines need no event)


def load_lifecycle(text: str | None, source: str = "lifecycle") -> LifecycleConfig:
    data = parse_yaml(text, source) if text else {}
    return load_model(LifecycleConfig, data or {}, source)
