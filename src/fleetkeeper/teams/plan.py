"""decide(): which node belongs to which team. Pure: no I/O, no clock.

Rules, in order:

1. **Eligible** nodes only count toward a team: Ready, not cordoned, not
   quarantined (``<domain>/quarantine`` taint), not in preflight
   (``<domain>/preflight`` taint or label), not being deleted.
2. **Keep** what is already right: a healthy node that carries team T and
   matches one of T's entries stays T's. When a team has more than its count
   (the count went down), it gives back first the nodes that run none of its
   own pods, then by name.
3. **Fill** what is missing from free candidates, preferring nodes that will
   change anyway (released by another team: one write instead of two), then
   nodes that run no other team's pods ("moved last"), then nodes matched by
   fewer entries (so overlapping selectors starve nobody), then by name.
4. An unhealthy node that carries team T is **held** until a replacement is
   made, and replacements are bounded by a budget (the caller's rate limit,
   counted from the ``<domain>/team-replaced-at`` record on the nodes) and by
   the one disruption budget (``admit``: the caller's verdict for the node
   being replaced); a recovered node is simply kept, so flapping nodes cause
   no churn.
5. **Overlapping selectors** are served in a fixed order: the entry with more
   selector keys (more specific) first, then ConfigMap order.
6. Every other node carries no team taint and no team label.

The result is a :class:`Plan`: one :class:`Change` per node whose taint or
label must change, the per-team status (desired, assigned, eligible,
shortfall and why) and the overlap explanations. :func:`change_ops` turns a
change into the core plan vocabulary the applier writes.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from fleetkeeper.core.domain import Names
from fleetkeeper.core.plan import AddTaint, NodeOp, RemoveTaint, SetAnnotation, SetLabel
from fleetkeeper.core.views import NodeView

from fleetkeeper.teams.config import TeamEntry, TeamsConfig

TEAM_EFFECT = "NoSchedule"


def replaced_at_key(names: Names) -> str:
    """On a node that replaced an unhealthy node of its team: when (epoch seconds). The replacement rate
    limit is counted from it, so a restart neither resets nor repeats it."""
    return f"{names.domain}/team-replaced-at"


def recent_replacements(views: Iterable[NodeView], names: Names, now: float, window: float) -> int:
    """Replacements made within ``window`` seconds before ``now``, per the nodes' record."""
    key = replaced_at_key(names)
    n = 0
    for v in views:
        t = v.annotations.get(key)
        if t:
            try:
                if now - float(t) < window:
                    n += 1
            except ValueError:
                pass
    return n


@dataclass(frozen=True, slots=True)
class NodeState:
    """What decide() needs to know about one node."""

    name: str
    labels: dict[str, str]
    team: str  # current team: the team taint's value, else the team label's value, else ""
    consistent: bool  # exactly one team taint T:NoSchedule and the label T (or neither)
    eligible: bool
    why_ineligible: str = ""
    pod_teams: frozenset[str] = frozenset()  # teams of the non-borrowing pods running on it


def eligibility(view: NodeView, names: Names) -> tuple[bool, str]:
    if view.deleting:
        return False, "being deleted"
    if not view.ready:
        return False, "not Ready"
    if view.unschedulable:
        return False, "cordoned"
    q = view.taint(names.quarantine)
    if q is not None:
        return False, f"quarantined ({q.value or 'no reason given'})"
    if view.taint(names.preflight) is not None or names.preflight in view.labels:
        return False, "in preflight (not validated yet)"
    return True, ""


def node_state(view: NodeView, names: Names, pod_teams: frozenset[str] = frozenset()) -> NodeState:
    key = names.team
    taints = [t for t in view.taints if t.key == key]
    label = view.labels.get(key, "")
    team = taints[0].value if taints else label
    if taints:
        consistent = len(taints) == 1 and taints[0].effect == TEAM_EFFECT and label == team and bool(team)
    else:
        consistent = not label
    ok, why = eligibility(view, names)
    return NodeState(view.name, view.labels, team, consistent, ok, why, pod_teams)


def same_inputs(planned: NodeView, current: NodeView, names: Names) -> bool:
    """Whether ``current`` (a newer version of the node in the cache) gives decide() the same inputs as
    ``planned``, the version a plan was made from: the same labels, team taint and label, eligibility and
    replacement record. A write that answered Conflict because of such a change (a status heartbeat) can be
    sent again against ``current`` without planning again; any other change waits for the next pass."""
    key = replaced_at_key(names)
    return (planned.name == current.name
            and planned.annotations.get(key) == current.annotations.get(key)
            and node_state(planned, names) == node_state(current, names))


@dataclass(frozen=True, slots=True)
class Change:
    node: str
    old_team: str
    new_team: str
    action: str  # assign, replace, release, move, repair
    reason: str


@dataclass
class TeamStatus:
    team: str
    desired: int = 0
    assigned: int = 0  # healthy nodes carrying the team after this plan
    eligible: int = 0  # healthy nodes matching any of the team's selectors
    held_unhealthy: int = 0  # unhealthy team nodes kept until replaced
    borrowed: int = 0  # filled in by the caller: borrowing pods on this team's nodes
    reasons: list[str] = field(default_factory=list)

    @property
    def shortfall(self) -> int:
        return max(0, self.desired - self.assigned)

    def as_dict(self) -> dict:
        return {"team": self.team, "desired": self.desired, "assigned": self.assigned, "eligible": self.eligible,
                "shortfall": self.shortfall, "unhealthy_held": self.held_unhealthy, "borrowed": self.borrowed,
                "reasons": list(self.reasons)}


@dataclass
class Plan:
    changes: list[Change]
    target: dict[str, str]  # node -> team for every node that carries a team after the plan
    teams: dict[str, TeamStatus]
    overlaps: list[str]
    order: list[int]  # entry indices in the order they were served
    replacements: int = 0
    throttled: int = 0  # replacements held back (the rate limit or the disruption budget)
    budget_held: list[str] = field(default_factory=list)  # unhealthy nodes the disruption budget kept unreplaced

    @property
    def writes(self) -> int:
        return len(self.changes)


def change_ops(c: Change, names: Names, now: float) -> tuple[NodeOp, ...]:
    """The node operations of one change, for the core applier (one merge patch): the team taint and label
    together, so a node is never half-moved; other taints are kept (with their ``timeAdded``). A
    replacement also records when it was made (the rate limit counts from it)."""
    ops: list[NodeOp] = [RemoveTaint(names.team)]
    if c.new_team:
        ops.append(AddTaint(names.team, c.new_team, TEAM_EFFECT))
    ops.append(SetLabel(names.team, c.new_team or None))
    if c.action == "replace":
        ops.append(SetAnnotation(replaced_at_key(names), str(int(now))))
    return tuple(ops)


def entry_label(i: int, e: TeamEntry) -> str:
    sel = ",".join(f"{k}={v}" for k, v in sorted(e.node_selector.items())) or "<all nodes>"
    return f"teams[{i}] ({e.team}, {sel}, count {e.count})"


def serve_order(cfg: TeamsConfig) -> list[int]:
    """Most specific selector first, then ConfigMap order."""
    return sorted(range(len(cfg.teams)), key=lambda i: (-len(cfg.teams[i].node_selector), i))


def _sel_key(e: TeamEntry) -> tuple:
    return tuple(sorted(e.node_selector.items()))


def match_sets(nodes: list[NodeState], cfg: TeamsConfig) -> list[frozenset[str]]:
    """For each entry, the names of the nodes its selector matches (via a label
    index; entries with the same selector share one set)."""
    index: dict[tuple[str, str], set[str]] = defaultdict(set)
    wanted = {kv for e in cfg.teams for kv in e.node_selector.items()}
    for n in nodes:
        for kv in n.labels.items():
            if kv in wanted:
                index[kv].add(n.name)
    cache: dict[tuple, frozenset[str]] = {}
    out: list[frozenset[str]] = []
    for e in cfg.teams:
        k = _sel_key(e)
        if k not in cache:
            if not k:
                cache[k] = frozenset(n.name for n in nodes)
            else:
                sets = sorted((index.get(kv, set()) for kv in k), key=len)
                cache[k] = frozenset(set.intersection(*sets))
        out.append(cache[k])
    return out


def match_entries(nodes: list[NodeState], cfg: TeamsConfig) -> list[list[NodeState]]:
    """For each entry, the nodes its selector matches (unordered)."""
    by_name = {n.name: n for n in nodes}
    return [[by_name[x] for x in m] for m in match_sets(nodes, cfg)]


def decide(nodes: list[NodeState], cfg: TeamsConfig, replacement_budget: int = 1 << 30,
           admit: Callable[[str], bool] | None = None) -> Plan:
    """``replacement_budget``: replacements the rate limit still allows; ``admit(node)``: may the unhealthy
    ``node`` be replaced now (the disruption budget's verdict; asked once per replacement, in order)."""
    by_name = {n.name: n for n in nodes}
    msets = match_sets(nodes, cfg)
    order = serve_order(cfg)
    contention: dict[str, int] = defaultdict(int)
    multiplicity: dict[frozenset, int] = defaultdict(int)
    for m in msets:
        multiplicity[m] += 1
    for m, k in multiplicity.items():
        for x in m:
            contention[x] += k
    by_team: dict[str, list[NodeState]] = defaultdict(list)
    for n in nodes:
        if n.team:
            by_team[n.team].append(n)
    eligible_names = frozenset(n.name for n in nodes if n.eligible)

    taken: dict[str, int] = {}  # node -> entry index (healthy, or held unhealthy)
    kept: dict[int, list[NodeState]] = {}
    held: dict[int, list[NodeState]] = {}
    released: set[str] = set()

    # 1-2. keep
    for i in order:
        e = cfg.teams[i]
        mi = msets[i]
        own = [n for n in by_team.get(e.team, ()) if n.name in mi and n.name not in taken]
        healthy = sorted((n for n in own if n.eligible),
                         key=lambda n: (0 if e.team in n.pod_teams else 1, n.name))
        keep = healthy[:e.count]
        for n in healthy[e.count:]:
            released.add(n.name)
        for n in keep:
            taken[n.name] = i
        sick = sorted((n for n in own if not n.eligible), key=lambda n: n.name)[:max(0, e.count - len(keep))]
        for n in sick:
            taken[n.name] = i
        kept[i], held[i] = keep, sick

    # 3-4. fill
    fills: dict[int, list[NodeState]] = {}
    replaced: dict[int, list[NodeState]] = {}
    budget = max(0, replacement_budget)
    replacements = throttled = 0
    budget_held: list[str] = []
    short_of_candidates: dict[int, int] = {}
    for i in order:
        e = cfg.teams[i]
        need = e.count - len(kept[i]) - len(held[i])  # fresh slots (count went up, or first assignment)
        sick = held[i]
        if need <= 0 and not sick:
            fills[i], replaced[i] = [], []
            continue
        cands = [by_name[x] for x in msets[i] & eligible_names if x not in taken]
        team = e.team
        cands.sort(key=lambda n: (
            # nodes running other teams' pods move last
            1 if n.pod_teams and (len(n.pod_teams) > 1 or team not in n.pod_teams) else 0,
            0 if (n.team and n.team != team) else 1,  # a node that changes anyway: one write, not two
            contention[n.name],
            n.name,
        ))
        n_fresh = min(max(need, 0), len(cands))
        possible = min(len(sick), len(cands) - n_fresh)
        repl: list[NodeState] = []
        for n in sick:
            if len(repl) >= possible or budget <= 0:
                break
            if admit is not None and not admit(n.name):
                budget_held.append(n.name)
                continue
            repl.append(n)
            budget -= 1
        n_repl = len(repl)
        throttled += possible - n_repl
        replacements += n_repl
        chosen = cands[:n_fresh + n_repl]
        for n in chosen:
            taken[n.name] = i
        fills[i] = chosen
        replaced[i] = repl
        for n in replaced[i]:
            del taken[n.name]
        held[i] = [n for n in sick if n not in repl]
        short_of_candidates[i] = (max(need, 0) - n_fresh) + (len(sick) - possible)

    target: dict[str, str] = {name: cfg.teams[i].team for name, i in taken.items()}
    repl_names = {n.name for i in replaced for n in replaced[i]}
    fill_reason: dict[str, str] = {}
    for i, chosen in fills.items():
        n_repl = len(replaced[i])
        for k, n in enumerate(chosen):
            # the last n_repl chosen nodes replace unhealthy ones
            fill_reason[n.name] = "replace" if k >= len(chosen) - n_repl else "assign"

    # 6. changes
    changes: list[Change] = []
    for n in nodes:
        want = target.get(n.name, "")
        if n.team == want and n.consistent:
            continue
        if not want:
            if n.name in repl_names:
                why = f"unhealthy ({n.why_ineligible}); replaced by another node of {n.team}"
            elif n.name in released:
                why = f"{n.team} has more nodes than its count"
            elif n.team and not any(cfg.teams[i].team == n.team for i in range(len(cfg.teams))):
                why = f"team {n.team} has no entry in the configuration"
            elif n.team:
                why = f"no entry of {n.team} selects this node any more (or its count is full)"
            else:
                why = "stray team label or taint on a node of no team"
            changes.append(Change(n.name, n.team, "", "release", why))
        elif n.team == want:
            changes.append(Change(n.name, n.team, want, "repair", "team label and taint disagree; rewriting both"))
        else:
            i = taken[n.name]
            action = fill_reason.get(n.name, "assign")
            if n.team:
                action = "move" if action == "assign" else action
            why = f"{entry_label(i, cfg.teams[i])} needs a node"
            if action == "replace":
                why = f"replaces an unhealthy node of {want} ({entry_label(i, cfg.teams[i])})"
            changes.append(Change(n.name, n.team, want, action, why))

    # status
    teams: dict[str, TeamStatus] = {t: TeamStatus(t) for t in cfg.team_names}
    eligible_sets: dict[str, set[frozenset]] = defaultdict(set)
    for i, e in enumerate(cfg.teams):
        st = teams[e.team]
        st.desired += e.count
        eligible_sets[e.team].add(msets[i])
    elig_count: dict[frozenset, int] = {}
    for name, team in target.items():
        if by_name[name].eligible:
            teams[team].assigned += 1
        else:
            teams[team].held_unhealthy += 1
    for t, group in eligible_sets.items():
        if len(group) == 1:
            [m] = group
            if m not in elig_count:
                elig_count[m] = len(m & eligible_names)
            teams[t].eligible = elig_count[m]
        else:
            teams[t].eligible = len(frozenset().union(*group) & eligible_names)
    for i in order:
        e = cfg.teams[i]
        st = teams[e.team]
        miss = short_of_candidates.get(i, 0)
        if miss > 0:
            st.reasons.append(f"{entry_label(i, e)}: {miss} node(s) short; "
                              f"{len(msets[i] & eligible_names)} eligible node(s) match, "
                              "the rest are taken by entries served earlier")
    held_by_budget = set(budget_held)
    for t, st in teams.items():
        if st.held_unhealthy:
            why = " (no eligible candidate)"
            if throttled:
                mine = sum(1 for name, team in target.items() if team == t and name in held_by_budget)
                why = (f" (disruption budget used up for {mine}; replacement rate limit)" if mine
                       else " (replacement rate limit)")
            st.reasons.append(f"{st.held_unhealthy} unhealthy node(s) awaiting replacement" + why)

    overlaps = explain_overlaps(cfg, msets, order)
    return Plan(changes, target, teams, overlaps, order, replacements, throttled, sorted(held_by_budget))


def explain_overlaps(cfg: TeamsConfig, sets: list[frozenset[str]], order: list[int]) -> list[str]:
    rank = {i: r for r, i in enumerate(order)}
    inter: dict[tuple, int] = {}
    lines = []
    for a in range(len(cfg.teams)):
        sa = cfg.teams[a].node_selector
        for b in range(a + 1, len(cfg.teams)):
            if cfg.teams[a].team == cfg.teams[b].team:
                continue
            sb = cfg.teams[b].node_selector
            if any(k in sb and sb[k] != v for k, v in sa.items()):
                continue  # the selectors contradict each other: no node can match both
            pair = (sets[a], sets[b])
            if pair not in inter:
                inter[pair] = len(sets[a] & sets[b])
            common = inter[pair]
            if common:
                first, second = (a, b) if rank[a] < rank[b] else (b, a)
                lines.append(
                    f"{entry_label(first, cfg.teams[first])} and {entry_label(second, cfg.teams[second])} "
                    f"both select {common} node(s); {cfg.teams[first].team} is served first "
                    f"({'more specific selector' if len(cfg.teams[first].node_selector) > len(cfg.teams[second].node_selector) else 'earlier in the ConfigMap'}); "
                    "nodes already assigned stay with their team")
    return lines


def explain_node(plan: Plan, cfg: TeamsConfig, node: NodeState, nodes: list[NodeState]) -> list[str]:
    """Why this node carries (or will carry) its team taint, in plain lines."""
    lines: list[str] = []
    matches = match_entries([node], cfg)
    matching = [i for i, m in enumerate(matches) if m]
    target = plan.target.get(node.name, "")
    cur = node.team or "none"
    lines.append(f"current team: {cur}; planned team: {target or 'none'}")
    if not node.eligible:
        lines.append(f"not eligible for team capacity: {node.why_ineligible}")
    if not matching:
        lines.append("no team entry selects this node: it stays untainted (shared capacity)")
    else:
        for i in sorted(matching, key=lambda i: plan.order.index(i)):
            lines.append(f"selected by {entry_label(i, cfg.teams[i])} (served #{plan.order.index(i) + 1})")
        if len({cfg.teams[i].team for i in matching}) > 1:
            lines.append("overlapping selectors: the more specific entry is served first, then ConfigMap order; "
                         "an already-assigned node stays with its team")
    for c in plan.changes:
        if c.node == node.name:
            lines.append(f"pending change: {c.action} {c.old_team or 'none'} -> {c.new_team or 'none'}: {c.reason}")
    if node.name in plan.budget_held:
        lines.append("its replacement is held: the disruption budget has no room for another node out of service")
    if node.pod_teams:
        lines.append(f"runs pods of team(s): {', '.join(sorted(node.pod_teams))}")
    if target:
        st = plan.teams.get(target)
        if st:
            lines.append(f"team {target}: {st.assigned}/{st.desired} nodes assigned, {st.eligible} eligible"
                         + (f", short {st.shortfall}" if st.shortfall else ""))
        lines.append(f"taint {TEAM_EFFECT} keeps pods of other teams off; low-priority pods with the 'any' "
                     "toleration may borrow it and are preempted when the team needs it")
    return lines


def snapshot(node_views: list[NodeView], pod_views: list, names: Names,
             borrower_key: str) -> tuple[list[NodeState], dict[str, int]]:
    """NodeStates from the caches, and the borrowing pods per node
    (pods carrying ``borrower_key``)."""
    pod_teams: dict[str, set[str]] = defaultdict(set)
    borrowers: dict[str, int] = defaultdict(int)
    for p in pod_views:
        if not p.node or not p.active:
            continue
        if borrower_key in p.labels:
            borrowers[p.node] += 1
            continue
        t = p.labels.get(names.team)
        if t:
            pod_teams[p.node].add(t)
    states = [node_state(v, names, frozenset(pod_teams.get(v.name, ()))) for v in node_views]
    return states, dict(borrowers)


def fill_borrowed(plan: Plan, borrowers: dict[str, int]) -> None:
    for node, n in borrowers.items():
        team = plan.target.get(node)
        if team and team in plan.teams:
            plan.teams[team].borrowed += n
