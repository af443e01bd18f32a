"""Node condition types written by the node agent, and the pure logic that
decides when the agent writes them.

Types follow node-problem-detector's style (CamelCase, ``status=True`` means
the problem is present), so conditions written by NPD and by this agent can
both feed the remediation controller.

The agent writes every type it owns on every write (True or False), so a
cleared problem shows up as ``False`` rather than vanishing; the controller
treats a *missing* condition as unknown, never as healthy.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from datetime import datetime, timezone

GPU_UNHEALTHY = "GPUUnhealthy"
GPU_XID = "GPUXidError"
DISK_UNHEALTHY = "DiskUnhealthy"
NETWORK_UNREACHABLE = "NetworkUnreachable"
MAINTENANCE = "MaintenanceScheduled"

AGENT_TYPES = (GPU_UNHEALTHY, GPU_XID, DISK_UNHEALTHY, NETWORK_UNREACHABLE, MAINTENANCE)
# node-problem-detector condition types the controller also understands
NPD_TYPES = ("KernelDeadlock", "ReadonlyFilesystem", "FrequentKubeletRestart", "FrequentContainerdRestart")

OK_REASONS = {
    GPU_UNHEALTHY: "GPUsHealthy",
    GPU_XID: "NoXidErrors",
    DISK_UNHEALTHY: "DisksHealthy",
    NETWORK_UNREACHABLE: "NetworkReachable",
    MAINTENANCE: "NoMaintenanceScheduled",
}


@dataclass(frozen=True, slots=True)
class Finding:
    """One check's verdict on one condition type."""

    type: str
    problem: bool
    reason: str
    message: str

    @staticmethod
    def ok(type_: str, message: str = "") -> "Finding":
        return Finding(type_, False, OK_REASONS.get(type_, "OK"), message or "no problem found")


def merge_findings(findings: list[Finding]) -> dict[str, Finding]:
    """One finding per type: problems win over OK; several problems are joined
    (reasons in order, first reason is the primary one)."""
    out: dict[str, Finding] = {}
    for f in findings:
        cur = out.get(f.type)
        if cur is None or (f.problem and not cur.problem):
            out[f.type] = f
        elif f.problem and cur.problem:
            reason = cur.reason if f.reason in cur.reason.split(",") else f"{cur.reason},{f.reason}"
            out[f.type] = Finding(f.type, True, reason[:120], f"{cur.message}; {f.message}"[:1000])
    return out


def fmt_time(ts: float) -> str:
    return datetime.fromtimestamp(ts, timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


@dataclass
class WriteState:
    """What the agent last wrote, and when it must write again."""

    written: dict[str, Finding]
    transitions: dict[str, float]
    last_write: float = -1.0
    next_heartbeat: float = 0.0


def heartbeat_delay(interval: float, jitter: float, rng: random.Random) -> float:
    """``interval`` +- ``jitter`` (a fraction), so thousands of agents spread out."""
    return interval * (1.0 + rng.uniform(-jitter, jitter))


def should_write(state: WriteState, current: dict[str, Finding], now: float) -> tuple[bool, str]:
    """Write on any change of status, reason or message, else on the heartbeat."""
    if state.last_write < 0:
        return True, "first"
    for t, f in current.items():
        w = state.written.get(t)
        if w is None or (w.problem, w.reason, w.message) != (f.problem, f.reason, f.message):
            return True, "change"
    if now >= state.next_heartbeat:
        return True, "heartbeat"
    return False, ""


def status_patch(state: WriteState, current: dict[str, Finding], now: float) -> dict:
    """The strategic-merge patch of ``status.conditions`` (merged by ``type``,
    so the kubelet's and other writers' conditions are left alone)."""
    conds = []
    for t in sorted(current):
        f = current[t]
        w = state.written.get(t)
        if w is None or w.problem != f.problem or t not in state.transitions:
            state.transitions[t] = now
        conds.append({
            "type": t, "status": "True" if f.problem else "False", "reason": f.reason, "message": f.message,
            "lastHeartbeatTime": fmt_time(now), "lastTransitionTime": fmt_time(state.transitions[t]),
        })
    return {"status": {"conditions": conds}}
