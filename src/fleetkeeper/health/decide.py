"""Pure remediation decisions: no I/O, no clock reads (``now`` is an input).

* :func:`classify` turns a node's conditions into problems (remedy, action);
* :func:`decide_node` picks the next step of the ladder for one node from the
  cluster's state (taints, annotations, conditions, pods), so a restarted
  controller continues where the last one stopped;
* admission against the disruption budget is the lifecycle's
  (:func:`fleetkeeper.lifecycle.budget.admit`, shared by every component);
* :func:`fleet_stats` counts what the budget, the storm detector and the
  metrics need.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field

from fleetkeeper.core.domain import Names
from fleetkeeper.core.views import NodeView, PodView
from fleetkeeper.health.actionproto import LOCAL_ACTIONS, ActionKeys, local_step
from fleetkeeper.health.conditions import AGENT_TYPES, NPD_TYPES
from fleetkeeper.health.policy import LADDER, Policy, human
from fleetkeeper.lifecycle.budget import scopes_of
from fleetkeeper.lifecycle.keys import HealthKeys as Keys  # the markers' names, defined once

REMEDY_RANK = {"none": 0, "wait": 1, "investigate": 2, "reset": 3, "reboot": 4, "replace": 5}
_XID = re.compile(r"Xid\s?(\d+)")


@dataclass(frozen=True)
class Problem:
    type: str
    reason: str
    message: str
    remedy: str
    action: str
    since: float
    trigger_after: float
    clear_after: float

    @property
    def rank(self) -> tuple[int, int]:
        return LADDER.index(self.action), REMEDY_RANK.get(self.remedy, 0)

    @property
    def label(self) -> str:
        return f"{self.type}/{self.reason}"


@dataclass(frozen=True)
class Health:
    active: tuple[Problem, ...]  # True for at least trigger_after
    pending: tuple[Problem, ...]  # True, but not yet for trigger_after
    false_since: dict[str, float]  # condition type -> since when it is False
    missing: frozenset[str]  # watched types with no condition at all (unknown)

    @property
    def worst(self) -> Problem | None:
        return max(self.active, key=lambda p: p.rank, default=None)


def watched_types(policy: Policy) -> set[str]:
    return set(AGENT_TYPES) | set(NPD_TYPES) | {r.type for r in policy.rules}


def _xid_remedy(reason: str, message: str, policy: Policy) -> str:
    codes = {int(c) for c in _XID.findall(reason + " " + message)}
    if not codes:
        return policy.xid_default
    return max((policy.xid.get(c, policy.xid_default) for c in codes), key=lambda r: REMEDY_RANK[r])


def classify(node: NodeView, policy: Policy, now: float) -> Health:
    active, pending = [], []
    false_since: dict[str, float] = {}
    watched = watched_types(policy)
    seen = set()
    for c in node.conditions:
        if c.type not in watched:
            continue
        seen.add(c.type)
        if c.status != "True":
            if c.status == "False":
                false_since[c.type] = c.last_transition
            continue
        rule = policy.rule_for(c.type, c.reason)
        if rule is None:
            continue
        remedy = rule.remedy or _xid_remedy(c.reason, c.message, policy)
        action = rule.action or policy.remedy_actions[remedy]  # type: ignore[index]
        if remedy == "none" and rule.action is None:
            action = "none"
        p = Problem(c.type, c.reason, c.message, remedy, action, c.last_transition, rule.trigger_after,
                    rule.clear_after)
        if action == "none":
            continue
        (active if now - c.last_transition >= rule.trigger_after else pending).append(p)
    missing = frozenset(t for t in AGENT_TYPES if t not in seen)
    return Health(tuple(active), tuple(pending), false_since, missing)


def clear_after_for(policy: Policy, type_: str) -> float:
    vals = [r.clear_after for r in policy.rules if r.type == type_]
    return max(vals) if vals else 60.0


@dataclass(frozen=True)
class Plan:
    """The next step for one node. ``kind``:

    noop, wait, note (an Event only), quarantine (new: needs budget; with ``request``, the node-local
    action is asked in the same write), escalate,
    evict, terminate, return (to the preflight gate), mark_cleared,
    unmark_cleared, release (remove taint/markers: back in service).
    """

    kind: str
    node: str
    why: str = ""
    action: str = ""  # the ladder target
    remedy: str = ""
    problems: tuple[Problem, ...] = ()
    pods: tuple[str, ...] = ()  # namespace/name to evict
    wait: str = ""  # budget, storm, trigger, hold, validation, pdb, drained, ...
    requeue_after: float | None = None
    deadline_passed: bool = False
    # a quarantine of a node with nothing to drain: the node-local action (reset, reboot, wait-maintenance)
    # asked of the node's agent in the same write, one state transition (why it is asked; empty: not asked)
    request: str = ""


def _ts(s: str | None) -> float:
    try:
        return float(s) if s else 0.0
    except ValueError:
        return 0.0


def evictable(pods: list[PodView]) -> tuple[list[PodView], list[PodView]]:
    """(pods to evict, pods already terminating); DaemonSet and static pods stay."""
    live = [p for p in pods if p.phase not in ("Succeeded", "Failed") and p.owner_kind not in ("DaemonSet", "Node")]
    return [p for p in live if not p.deleting], [p for p in live if p.deleting]


def selected(node: NodeView, policy: Policy) -> bool:
    return all(node.labels.get(k) == v for k, v in policy.node_selector.items())


def _folded_request(node: NodeView, pods: list[PodView], policy: Policy, names: Names, worst: Problem,
                    now: float, window_waiting: tuple[str, ...]) -> str:
    """For a new quarantine: the why of the node-local action to ask in the same write, or "".

    Asked only where the step after the quarantine would be exactly that request: the ladder target is
    drain, the remedy is node-local, node-local actions are on, the node has nothing to drain (no pod to
    evict, none terminating), no gang repair window waits for other nodes, and no request of this Node is
    already there (:func:`local_step` says "request"). A node with pods keeps the old path: quarantine,
    drain (PodDisruptionBudgets honoured), then the request."""
    if worst.action != "drain" or not policy.actions.enabled or window_waiting:
        return ""
    to_evict, terminating = evictable(pods)
    if to_evict or terminating:
        return ""
    step = local_step(node.annotations, ActionKeys(names), worst.remedy, node.name, node.uid, now)
    if step is None or step.kind != "request":
        return ""
    return f"nothing to drain; asking the node's agent for a {LOCAL_ACTIONS[worst.remedy]}"


def decide_node(node: NodeView, pods: list[PodView], policy: Policy, names: Names, now: float, *,
                flapping: bool = False, window_waiting: tuple[str, ...] = ()) -> Plan:
    """``window_waiting``: the other nodes of this node's gang repair window that still have pods to lose
    (its node-local repair waits for them, so the window's nodes are reset or rebooted together)."""
    k = Keys(names)
    a = node.annotations
    if node.deleting or a.get(k.ignore) == "true" or not selected(node, policy):
        return Plan("noop", node.name, "ignored" if a.get(k.ignore) == "true" else "")
    h = classify(node, policy, now)
    worst = h.worst
    quarantined = node.taint(names.quarantine) is not None
    if not quarantined:
        if a.get(k.state) == "validating":
            if worst is not None and LADDER.index(worst.action) >= LADDER.index("quarantine"):
                return Plan("quarantine", node.name, f"{worst.label} during validation", worst.action, worst.remedy,
                            h.active, request=_folded_request(node, pods, policy, names, worst, now, window_waiting))
            if node.taint(names.preflight) is None:
                return Plan("release", node.name, "passed validation")
            return Plan("wait", node.name, "waiting for the preflight gate", wait="validation")
        if worst is not None and LADDER.index(worst.action) >= LADDER.index("quarantine"):
            return Plan("quarantine", node.name, worst.label, worst.action, worst.remedy, h.active,
                        request=_folded_request(node, pods, policy, names, worst, now, window_waiting))
        if flapping:
            p = Problem("Flapping", "Flapping", "conditions flap", "investigate", "quarantine", now, 0, 0)
            return Plan("quarantine", node.name, "conditions flapping", "quarantine", "investigate", (p,))
        if any(k_ in a for k_ in (k.action, k.since)):
            return Plan("release", node.name, "quarantine taint removed by someone else; clearing markers")
        if worst is not None and worst.action == "event":
            return Plan("note", node.name, worst.label, "event", worst.remedy, h.active)
        if h.pending:
            nxt = min(p.since + p.trigger_after - now for p in h.pending)
            return Plan("wait", node.name, f"{h.pending[0].label} not yet sustained", wait="trigger",
                        requeue_after=max(0.5, nxt))
        return Plan("noop", node.name)

    target = a.get(k.action) or "quarantine"
    remedy = a.get(k.remedy) or "investigate"
    since = _ts(a.get(k.since)) or now
    types = [t for t in (a.get(k.types) or "").split(",") if t]
    # escalate when a worse problem appears
    if worst is not None and LADDER.index(worst.action) > LADDER.index(target):
        return Plan("escalate", node.name, worst.label, worst.action, worst.remedy, h.active)

    # cleared: every condition acted on is False long enough, nothing else is active, not flapping
    cleared_types = bool(types) and all(
        (t == "Flapping" and not flapping and not h.pending)
        or (t in h.false_since and now - h.false_since[t] >= clear_after_for(policy, t)) for t in types)
    blocking = [p for p in h.active if LADDER.index(p.action) >= LADDER.index("quarantine")]
    if cleared_types and not blocking and not flapping:
        if policy.return_to_service.mode == "preflight":
            return Plan("return", node.name, f"{', '.join(types)} cleared", target, remedy)
        cleared_at = _ts(a.get(k.cleared))
        if not cleared_at:
            return Plan("mark_cleared", node.name, f"{', '.join(types)} cleared; holding",
                        requeue_after=policy.return_to_service.hold)
        left = cleared_at + policy.return_to_service.hold - now
        if left > 0:
            return Plan("wait", node.name, "cleared; holding before return", wait="hold", requeue_after=left)
        return Plan("release", node.name, f"{', '.join(types)} cleared and held "
                                          f"{policy.return_to_service.hold:.0f}s")
    if a.get(k.cleared) and not cleared_types:
        return Plan("unmark_cleared", node.name, "problem is back while holding")
    pending_types = [t for t in types if t not in h.false_since]
    recheck = 30.0
    if types and not pending_types and not blocking:
        recheck = max(0.5, max(h.false_since[t] + clear_after_for(policy, t) - now for t in types) + 0.1)
    unknown = [t for t in types if t in h.missing]
    why_waiting = (f"condition(s) {', '.join(unknown)} missing (unknown, not healthy)" if unknown else
                   f"{', '.join(pending_types) or 'conditions'} not yet clear")

    if target in ("drain", "terminate"):
        to_evict, terminating = evictable(pods)
        deadline_passed = now - since >= policy.drain.deadline
        if to_evict or terminating:
            if deadline_passed and (target == "terminate" or policy.drain.terminate_at_deadline):
                return Plan("terminate", node.name,
                            f"drain deadline {human(policy.drain.deadline)} passed with "
                            f"{len(to_evict) + len(terminating)} pod(s) still on the node", target, remedy,
                            deadline_passed=True)
            if to_evict:
                return Plan("evict", node.name, why_waiting, target, remedy,
                            pods=tuple(p.key for p in to_evict),
                            requeue_after=min(policy.drain.retry_interval, max(1.0, since + policy.drain.deadline - now)))
            return Plan("wait", node.name, f"{len(terminating)} pod(s) terminating", wait="pdb", requeue_after=2.0)
        if target == "terminate":
            return Plan("terminate", node.name, "drained", target, remedy)
        # drained: no write (the lifecycle derives "awaiting repair" from the empty node). A fault that is
        # still there and fixable on the node is asked of the node's agent (health.actionproto)
        if policy.actions.enabled and pending_types and not unknown:
            step = local_step(a, ActionKeys(names), remedy, node.name, node.uid, now)
            if step is not None and step.kind == "request" and window_waiting:
                return Plan("wait", node.name, f"drained; its gang's repair window waits for "
                                               f"{', '.join(sorted(window_waiting))} to drain, then all are "
                                               f"repaired together", target, remedy, wait="window",
                            requeue_after=min(30.0, policy.drain.retry_interval))
            if step is not None and step.kind == "request":
                return Plan("request_action", node.name, step.why, target, remedy)
            if step is not None and step.kind == "escalate":
                return Plan("escalate", node.name, step.why, "terminate", "replace")
            if step is not None:
                return Plan("wait", node.name, f"{step.why}; {why_waiting}", target, remedy, wait="action",
                            requeue_after=min(recheck, step.requeue_after or recheck))
        return Plan("wait", node.name, f"drained; {why_waiting}", target, remedy, wait="drained",
                    requeue_after=min(60.0, recheck))
    return Plan("wait", node.name, why_waiting, wait="cleared", requeue_after=recheck)


# --- gang repair windows -------------------------------------------------------
RESET_CLASS = frozenset({"reset", "reboot"})


def reset_class_problems(node: NodeView, policy: Policy, now: float) -> tuple[Problem, ...]:
    """Faults on the node, active or still pending (not yet sustained), that a node-local reset or
    reboot fixes."""
    h = classify(node, policy, now)
    return tuple(p for p in h.active + h.pending if p.remedy in RESET_CLASS)


def window_id(gang: str, since: float) -> str:
    return f"{gang}@{int(since)}"


def gang_window(lead: NodeView, members: list[NodeView], gangs: list[str], policy: Policy, names: Names,
                now: float, *, max_new: int | None = None) -> tuple[str, list[Plan]]:
    """The repair window a gang drain opens: (its id, one plan per other node of the gang that joins it).

    The gang loses every pod at once anyway; so every node of it with a reset-class fault, active or
    pending, is drained and repaired in this one window instead of disrupting the restarted job again
    later. A node that joins is quarantined with the drain target (``join_window``, no budget of its
    own: the window is one disruption), or, when health already quarantined it for a reset-class fault
    and has not asked for its repair yet, marked (``mark_window``). Nodes already in a window, on the
    terminate ladder, or whose repair was already requested stay as they are. ``max_new``: at most this
    many nodes newly taken out of service (the window is one unit of the budget, but never more nodes than
    the budget's cluster limit; marking nodes already out takes nothing more)."""
    k = Keys(names)
    wid = lead.annotations.get(k.window) or window_id(sorted(gangs)[0], _ts(lead.annotations.get(k.since)) or now)
    plans: list[Plan] = []
    for n in members:
        a = n.annotations
        if n.name == lead.name or n.deleting or a.get(k.window) or a.get(k.ignore) == "true" \
                or not selected(n, policy):
            continue
        if n.taint(names.quarantine) is not None:
            if a.get(k.remedy) in RESET_CLASS and a.get(k.action) == "drain" and k.request not in a:
                plans.append(Plan("mark_window", n.name, f"repaired with the gang drained from {lead.name}",
                                  "drain", a.get(k.remedy, "")))
            continue
        if a.get(k.state) == "validating":
            continue
        probs = reset_class_problems(n, policy, now)
        if probs and (max_new is None or sum(1 for p in plans if p.kind == "join_window") < max_new):
            worst = max(probs, key=lambda p: p.rank)
            plans.append(Plan("join_window", n.name,
                              f"{worst.label}: repaired in the gang's window (drained from {lead.name})",
                              "drain", worst.remedy, probs))
    return wid, plans


# --- budget -----------------------------------------------------------------

@dataclass
class FleetStats:
    totals: dict[str, int] = field(default_factory=dict)  # scope -> managed nodes
    disrupted: dict[str, int] = field(default_factory=dict)  # scope -> quarantined/draining/terminating
    states: dict[str, int] = field(default_factory=dict)  # fleetkeeper_nodes{state}
    onset_nodes: set[str] = field(default_factory=set)  # nodes whose worst problem started within the storm window
    wanting: dict[str, int] = field(default_factory=dict)  # scope -> faulty nodes not yet quarantined
    new_in_window: int = 0

    @property
    def onsets(self) -> int:
        return len(self.onset_nodes)


def storm_threshold(total: int, policy: Policy) -> int:
    return max(policy.storm.min_nodes, int(total * policy.storm.max_percent / 100.0))


def node_state(node: NodeView, names: Names, pods_left: int) -> str:
    k = Keys(names)
    if node.taint(names.quarantine) is not None:
        target = node.annotations.get(k.action, "quarantine")
        if node.deleting or (target == "terminate" and pods_left == 0):
            return "terminating"
        if target in ("drain", "terminate") and pods_left > 0:
            return "draining"
        return "quarantined"
    if node.taint(names.preflight) is not None:
        return "preflight"
    return "ready"


def fleet_stats(nodes: list[NodeView], pods_left: dict[str, int], policy: Policy, names: Names, now: float,
                admissions: list[float]) -> FleetStats:
    st = FleetStats()
    k = Keys(names)
    recent = 0  # quarantines started within the budget window, as the cluster records them
    for n in nodes:
        if not selected(n, policy):
            continue
        scopes = scopes_of(n, names, policy.budget)
        for s in scopes:
            st.totals[s] = st.totals.get(s, 0) + 1
        state = node_state(n, names, pods_left.get(n.name, 0))
        st.states[state] = st.states.get(state, 0) + 1
        quarantined = n.taint(names.quarantine) is not None
        if quarantined:
            for s in scopes:
                st.disrupted[s] = st.disrupted.get(s, 0) + 1
            since = _ts(n.annotations.get(k.since))
            if since and now - since < policy.storm.window:
                st.onset_nodes.add(n.name)
            if since and now - since < policy.budget.window:
                recent += 1
            continue
        if not any(c.status == "True" for c in n.conditions if c.type != "Ready"):
            continue  # fast path: nothing wrong
        worst = classify(n, policy, now).worst
        if worst is None or LADDER.index(worst.action) < LADDER.index("quarantine"):
            continue
        if now - worst.since < policy.storm.window:
            st.onset_nodes.add(n.name)
        for s in scopes:
            st.wanting[s] = st.wanting.get(s, 0) + 1
    # the process's own admissions include those not yet visible in the cache; the nodes' since
    # annotations survive a restart (a restarted controller must not get a fresh window)
    st.new_in_window = max(recent, sum(1 for t in admissions if now - t < policy.budget.window))
    return st


# --- history ------------------------------------------------------------------

def history_add(raw: str | None, now: float, text: str, keep: int = 10) -> str:
    try:
        items = json.loads(raw) if raw else []
        if not isinstance(items, list):
            items = []
    except json.JSONDecodeError:
        items = []
    items.append([int(now), text[:160]])
    return json.dumps(items[-keep:], separators=(",", ":"))


def history_read(raw: str | None) -> list[tuple[float, str]]:
    try:
        return [(float(t), str(s)) for t, s in json.loads(raw or "[]")]
    except (json.JSONDecodeError, TypeError, ValueError):
        return []
