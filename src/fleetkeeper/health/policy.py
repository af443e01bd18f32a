"""The remediation policy: which condition means what, how far up the ladder
to go, and the safety limits. Loaded from YAML (a ConfigMap key or a file)
and validated with field paths (``core.config.load_model``).

Ladder: ``event`` (record only) < ``quarantine`` (NoSchedule taint) <
``drain`` (taint, then evict through the Eviction API) < ``terminate``
(taint, evict, then terminate the machine once its pods are gone, or at the
deadline even if a PodDisruptionBudget still blocks).

Remedy (what fixes it): ``reset`` (a GPU reset), ``reboot``, ``replace``
(hardware), ``investigate`` (a person looks), ``wait`` (the cloud fixes it,
e.g. scheduled maintenance), ``none`` (not the machine's fault: ignored).
"""

from __future__ import annotations

import fnmatch
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from fleetkeeper.core.config import Duration, human, load_model, parse_duration, parse_yaml  # noqa: F401
from fleetkeeper.lifecycle.config import BudgetConfig as Budget, Limit  # noqa: F401 - the one budget

Action = Literal["event", "quarantine", "drain", "terminate"]
Remedy = Literal["reset", "reboot", "replace", "investigate", "wait", "none"]
LADDER: tuple[str, ...] = ("none", "event", "quarantine", "drain", "terminate")
class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Rule(_Strict):
    """Maps a condition (type, reason glob) to a remedy and an action."""

    type: str = Field(min_length=1)
    reason: str = "*"
    remedy: Remedy | None = None  # None: classify Xid codes through the xid table
    action: Action | None = None  # None: the remedy's default action
    trigger_after: Duration = 0.0  # condition must stay True this long before acting
    clear_after: Duration = 60.0  # and False this long before it counts as cleared

    def matches(self, type_: str, reason: str) -> bool:
        if self.type != type_:
            return False
        return any(fnmatch.fnmatchcase(r, self.reason) for r in (reason.split(",") or [""])) or \
            fnmatch.fnmatchcase(reason, self.reason)


class Storm(_Strict):
    """Many new faults at once usually share one cause (a driver rollout, a
    network partition, a broken agent): pause new quarantines for ``cooldown``."""

    window: Duration = 600.0
    max_percent: float = Field(10.0, ge=0, le=100)
    min_nodes: int = Field(20, ge=1)
    cooldown: Duration = 1800.0


class Flapping(_Strict):
    transitions: int = Field(4, ge=2)  # this many True/False transitions ...
    window: Duration = 1800.0  # ... within this window quarantine the node as Flapping


class Drain(_Strict):
    deadline: Duration = 7 * 86400.0  # R4: broken machines leave within 7 days
    retry_interval: Duration = 30.0  # a PDB-blocked eviction is retried this often
    evictions_per_second: float = Field(10.0, gt=0)
    terminate_at_deadline: bool = True  # drain-ladder nodes too: a blocked drain past the deadline is terminated


class Actions(_Strict):
    """Node-local actions (health.actions): once a node whose remedy is reset, reboot or wait is
    drained, its agent is asked to perform it; a failure, no report, or a fault still there
    ``timeout`` after the request escalates to replace."""

    enabled: bool = True
    timeout: Duration = 1800.0


class Terminate(_Strict):
    max_per_hour: int = Field(20, ge=0)


class ReturnToService(_Strict):
    """After a condition clears: ``preflight`` hands the node to the validation
    gate (taint and label ``<domain>/preflight``); ``hold`` untaints after
    ``hold`` seconds when the preflight gate is not in use."""

    mode: Literal["preflight", "hold"] = "preflight"
    hold: Duration = 1800.0


DEFAULT_XID: dict[int, Remedy] = {
    # application errors: not the machine
    13: "none", 31: "none", 43: "none", 45: "none", 68: "none",
    # fixed by a GPU reset (drain, then nvidia-smi -r or a reboot)
    48: "reset", 61: "reset", 62: "reset", 63: "reset", 74: "reset", 94: "reset", 119: "reset", 120: "reset",
    # needs a reboot
    79: "reboot", 92: "reboot", 95: "reboot", 140: "reboot",
    # needs hardware replacement
    64: "replace", 154: "replace",
}


def _default_rules() -> list[Rule]:
    R = Rule
    return [
        R(type="GPUXidError"),  # classified by the xid table
        R(type="GPUUnhealthy", reason="UncorrectableECC", remedy="reset"),
        R(type="GPUUnhealthy", reason="RemapPending", remedy="reset"),
        R(type="GPUUnhealthy", reason="RowRemapFailure", remedy="replace"),
        R(type="GPUUnhealthy", reason="RetiredPagesExceeded", remedy="replace"),
        R(type="GPUUnhealthy", reason="GPUMissing", remedy="replace"),
        R(type="GPUUnhealthy", reason="GPULost", remedy="reboot"),
        R(type="GPUUnhealthy", reason="*", remedy="investigate", action="quarantine"),
        R(type="DiskUnhealthy", reason="DiskFull", remedy="investigate", action="quarantine", trigger_after=60),
        R(type="DiskUnhealthy", reason="ReadOnlyFilesystem", remedy="reboot"),
        R(type="DiskUnhealthy", reason="IOErrors", remedy="replace"),
        R(type="DiskUnhealthy", reason="*", remedy="investigate", action="quarantine"),
        R(type="NetworkUnreachable", remedy="investigate", action="quarantine", trigger_after=60, clear_after=300),
        R(type="MaintenanceScheduled", reason="*Migrate", remedy="wait", action="event"),
        R(type="MaintenanceScheduled", reason="*Freeze", remedy="wait", action="event"),
        R(type="MaintenanceScheduled", remedy="wait", action="drain"),
        # node-problem-detector's defaults
        R(type="KernelDeadlock", remedy="reboot"),
        R(type="ReadonlyFilesystem", remedy="reboot"),
    ]


class Policy(_Strict):
    rules: list[Rule] = Field(default_factory=_default_rules)
    xid: dict[int, Remedy] = Field(default_factory=lambda: dict(DEFAULT_XID))
    xid_default: Remedy = "investigate"  # an Xid code not in the table
    remedy_actions: dict[Remedy, Action] = Field(default_factory=lambda: {
        "reset": "drain", "reboot": "drain", "replace": "terminate", "investigate": "quarantine",
        "wait": "drain", "none": "event"})
    budget: Budget = Budget()
    storm: Storm = Storm()
    flapping: Flapping = Flapping()
    drain: Drain = Drain()
    terminate: Terminate = Terminate()
    actions: Actions = Actions()
    return_to_service: ReturnToService = ReturnToService()
    node_selector: dict[str, str] = Field(default_factory=dict)  # manage only nodes with these labels
    dry_run: bool = False

    @model_validator(mode="after")
    def _remedies_covered(self) -> "Policy":
        missing = [r for r in ("reset", "reboot", "replace", "investigate", "wait", "none")
                   if r not in self.remedy_actions]
        if missing:
            raise ValueError(f"remedy_actions must give an action for every remedy; missing {missing}")
        return self

    def rule_for(self, type_: str, reason: str) -> Rule | None:
        for r in self.rules:
            if r.matches(type_, reason):
                return r
        return None


def load_policy(text: str | None, source: str = "policy") -> Policy:
    data = parse_yaml(text, source) if text else {}
    return load_model(Policy, data or {}, source)
