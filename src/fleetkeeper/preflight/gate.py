"""The join gate's decision for one node: pure (no I/O, time is an input).

State lives on the node (level-based: a restarted controller re-derives it):
  taint+label ``<domain>/preflight``   gated; label value ``pending`` or ``failed``
  ``preflight-attempts``                failed attempts in this gating cycle
  ``preflight-retry-at``                earliest next attempt (exponential backoff)
  ``preflight-failed-check``            failing check(s), for the health controller
  ``preflight-last-pod``                the last test pod whose result was applied (idempotence)
  ``preflight-history``                 the last N results (bounded)
  ``preflight-gated-at``                when the cycle began (a joining node: its creation, not written)
A label set back to ``pending`` on a node with failed attempts starts a new
cycle (the health controller does this after a repair, as does
``fleetkeeper preflight retry``).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field

from fleetkeeper.core.views import NodeView, PodView
from fleetkeeper.preflight.config import PreflightConfig
from fleetkeeper.preflight.keys import FAILED, GATE, NOT_READY_TAINT, PENDING, Keys
from fleetkeeper.preflight.report import ReportError, summary
from fleetkeeper.preflight.suite import SuiteResult

Verify = Callable[[PodView], SuiteResult]  # raises ReportError

# taints the node lifecycle controller keeps on a node that is not (yet) Ready; no test pod starts under them
NOT_READY_TAINTS = (NOT_READY_TAINT, "node.kubernetes.io/unreachable")
NOT_READY_RECHECK_S = 60.0


def node_up(node: NodeView, tolerate_not_ready: bool = False) -> bool:
    """Ready and without the not-ready / unreachable taints: a test pod could be scheduled and run.

    With ``tolerate_not_ready`` (``gate.start_when_ready``) a Ready node still carrying the not-ready
    *NoSchedule* taint counts as up: kube-controller-manager lifts that taint only after the kubelet
    reports Ready, and the gate's test pod tolerates it (as DaemonSet pods do), so the test runs while
    the taint is lifted instead of after. The NoExecute form (a node that went NotReady) and the
    unreachable taint never count as up."""
    if not node.ready:
        return False
    for t in node.taints:
        if t.key not in NOT_READY_TAINTS:
            continue
        if not (tolerate_not_ready and t.key == NOT_READY_TAINT and t.effect == "NoSchedule"):
            return False
    return True


@dataclass
class Plan:
    outcome: str = "none"  # none, wait, start, passed, failed, exhausted, timeout, retaint, reset, cleanup
    create_pod: bool = False
    attempt: int = 0
    delete_pods: list[str] = field(default_factory=list)
    labels: dict[str, str | None] = field(default_factory=dict)
    annotations: dict[str, str | None] = field(default_factory=dict)
    taints: list[dict] | None = None  # the node's full new taint list, or None for unchanged
    event: tuple[str, str, str] | None = None  # reason, note, type
    result: SuiteResult | None = None
    requeue_after: float | None = None
    cycle: str = ""  # when this gating cycle began (names the test pods: one per cycle and attempt)

    @property
    def patches_node(self) -> bool:
        return bool(self.labels or self.annotations or self.taints is not None)


def _taints_without(node: NodeView, key: str) -> list[dict]:
    return [{"key": t.key, "value": t.value, "effect": t.effect} if t.value else {"key": t.key, "effect": t.effect}
            for t in node.taints if t.key != key]


def gate_taint(keys: Keys, value: str = PENDING) -> dict:
    return {"key": keys.gate, "value": value, "effect": "NoSchedule"}


def history_entry(now: float, kind: str, result: SuiteResult | None, note: str, pod: str) -> dict:
    return {"t": int(now), "k": kind, "ok": bool(result and result.passed), "p": result.profile if result else "",
            "s": note[:200], "pod": pod[-63:]}


def append_history(raw: str | None, entry: dict, keep: int) -> str:
    try:
        hist = json.loads(raw) if raw else []
        if not isinstance(hist, list):
            hist = []
    except ValueError:
        hist = []
    hist.append(entry)
    return json.dumps(hist[-keep:], separators=(",", ":"))


def backoff(cfg: PreflightConfig, attempts: int) -> float:
    return min(cfg.gate.retry_backoff_s * (2 ** max(0, attempts - 1)), 6 * 3600.0)


def in_scope(node: NodeView, cfg: PreflightConfig) -> bool:
    return all(node.labels.get(k) == v for k, v in cfg.node_selector.items())


def decide(node: NodeView, pods: list[PodView], cfg: PreflightConfig, keys: Keys, now: float,
           verify: Verify) -> Plan:
    gate_pods = sorted((p for p in pods if p.labels.get(keys.pod_kind) == GATE), key=lambda p: p.created)
    gated = node.taint(keys.gate) is not None
    label = node.labels.get(keys.gate)
    if node.deleting:
        return Plan("cleanup", delete_pods=[p.name for p in gate_pods if not p.deleting])
    if not gated and label is None:
        # released (or never gated): a leftover test pod has nothing to do
        return Plan("cleanup" if gate_pods else "none", delete_pods=[p.name for p in gate_pods if not p.deleting])
    if not gated:
        # the label without the taint: the label means "not validated", so close the window first
        return Plan("retaint", taints=_taints_without(node, keys.gate) + [gate_taint(keys, label or PENDING)],
                    event=("PreflightRetainted", f"label {keys.gate}={label} without its taint: taint re-added",
                           "Normal"), requeue_after=0.0)
    ann = node.annotations
    try:
        attempts = int(ann.get(keys.attempts, "0"))
    except ValueError:
        attempts = 0
    if label == PENDING and attempts > 0:
        # someone (health after a repair, or an operator) asked for a new cycle
        return Plan("reset", annotations={keys.attempts: None, keys.retry_at: None, keys.failed_check: None},
                    event=("PreflightRestarted", f"new validation cycle after {attempts} failed attempt(s)", "Normal"),
                    requeue_after=0.0)
    annotations: dict[str, str | None] = {}
    cycle = ann.get(keys.gated_at, "")
    if not cycle:
        # the gating clock of a joining node starts when the node was created: derived from the node, no
        # write (a joining node's only writes are its release or failure); of a node gated again (by hand;
        # health and the periodic re-test write it with the gate) now, recorded with the first write
        if keys.validated_at not in ann and node.created > 0:
            cycle = str(int(node.created))
        else:
            cycle = annotations[keys.gated_at] = str(int(now))
    last_pod = ann.get(keys.last_pod, "")
    finished = [p for p in gate_pods if p.phase in ("Succeeded", "Failed") and p.name != last_pod]
    stale = [p.name for p in gate_pods if p.name == last_pod and not p.deleting]
    if finished:
        pod = finished[-1]
        try:
            result = verify(pod)
            why = summary(result)
            ok = result.passed and pod.phase == "Succeeded"
            if result.passed and pod.phase != "Succeeded":
                ok, why = False, f"test pod {pod.phase} although its report passed"
            failed_checks = result.failed_checks or ["pod"]
        except ReportError as exc:
            result, ok, why, failed_checks = None, False, f"report rejected: {exc}", ["report"]
        entry = history_entry(now, GATE, result, why, pod.name)
        annotations[keys.history] = append_history(ann.get(keys.history), entry, cfg.history_entries)
        annotations[keys.last_pod] = pod.name
        if result and result.gpus:
            annotations[keys.gpus] = ",".join(result.gpus)[:2000]
        deletes = [p.name for p in gate_pods if not p.deleting]
        if ok:
            annotations.update({keys.validated_at: str(int(now)), keys.attempts: None, keys.retry_at: None,
                                keys.failed_check: None, keys.gated_at: None})
            return Plan("passed", delete_pods=deletes, labels={keys.gate: None}, annotations=annotations,
                        taints=_taints_without(node, keys.gate), result=result,
                        event=("PreflightPassed", f"validation {why}; released for scheduling", "Normal"))
        attempts += 1
        annotations[keys.attempts] = str(attempts)
        annotations[keys.failed_check] = ",".join(failed_checks)[:200]
        final = attempts >= cfg.gate.max_attempts
        if final:
            annotations[keys.retry_at] = None
            note = f"attempt {attempts}/{cfg.gate.max_attempts} {why}; no retries left, node stays out"
        else:
            wait = backoff(cfg, attempts)
            annotations[keys.retry_at] = str(int(now + wait))
            note = f"attempt {attempts}/{cfg.gate.max_attempts} {why}; retry in {wait:.0f}s"
        return Plan("exhausted" if final else "failed", delete_pods=deletes, labels={keys.gate: FAILED}
                    if label != FAILED else {}, annotations=annotations, result=result, attempt=attempts,
                    event=("PreflightFailed", note, "Warning"),
                    requeue_after=None if final else backoff(cfg, attempts))
    active = [p for p in gate_pods if p.active and p.name != last_pod]
    if active:
        pod = active[-1]
        age = now - pod.created
        if age > cfg.gate.pod_timeout_s:
            attempts += 1
            final = attempts >= cfg.gate.max_attempts
            why = f"test pod {pod.name} did not finish within {cfg.gate.pod_timeout_s:.0f}s ({pod.phase})"
            annotations.update({
                keys.attempts: str(attempts), keys.failed_check: "timeout", keys.last_pod: pod.name,
                keys.retry_at: None if final else str(int(now + backoff(cfg, attempts))),
                keys.history: append_history(ann.get(keys.history), history_entry(now, GATE, None, why, pod.name),
                                             cfg.history_entries)})
            return Plan("exhausted" if final else "timeout", delete_pods=[p.name for p in gate_pods if not p.deleting],
                        labels={keys.gate: FAILED} if label != FAILED else {}, annotations=annotations,
                        attempt=attempts, event=("PreflightFailed", f"attempt {attempts}/{cfg.gate.max_attempts}: {why}",
                                                 "Warning"),
                        requeue_after=None if final else backoff(cfg, attempts))
        return Plan("wait", delete_pods=stale, annotations=annotations,
                    requeue_after=max(1.0, cfg.gate.pod_timeout_s - age + 1))
    if attempts >= cfg.gate.max_attempts:
        return Plan("none", delete_pods=stale, annotations=annotations)  # exhausted: waits for a repair + reset
    try:
        retry_at = float(ann.get(keys.retry_at, "0"))
    except ValueError:
        retry_at = 0.0
    if now < retry_at:
        return Plan("wait", delete_pods=stale, annotations=annotations, requeue_after=retry_at - now)
    if not node_up(node, cfg.gate.start_when_ready):
        # a test pod could not be scheduled or run yet: creating it now only costs failed scheduling
        # attempts (and their Events), and a node that never comes up would burn its attempts on
        # timeouts. The node's update (Ready, the taint lifted) re-runs this; the requeue is a backstop.
        # No write either: the node lifecycle controller is about to change this node's taints, and a
        # write now would only make its resourceVersion-guarded patch conflict and retry.
        return Plan("wait", delete_pods=stale, requeue_after=NOT_READY_RECHECK_S)
    return Plan("start", create_pod=True, attempt=attempts + 1, delete_pods=stale, annotations=annotations,
                requeue_after=cfg.gate.pod_timeout_s + 1, cycle=cycle)
