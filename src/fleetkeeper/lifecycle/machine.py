"""The node state machine, as a pure function (no I/O; ``now`` is an input).

::

    joining -> validating -> in-service -> suspect -> quarantined -> draining -> awaiting-repair
                   |             ^                        |              |              |
                   |             +------ revalidating <---+--------------+--------------+
                   |                          |
                   +---------> retiring <-----+   (attempts used up, or any deadline below)
                                   |
                               terminated

:func:`facts_of` reads what the components proposed (health's quarantine
taint and markers, the preflight gate's taint, label and attempts, node
conditions, the team label) from a cached node; :func:`state_of` maps facts
to a state; :func:`decide` adds the stored record, the deadline of the state
and its escalation, and returns a :class:`fleetkeeper.core.plan.Plan`:

====================  =========================  ===================================
state                 deadline (configurable)     escalation when it passes
====================  =========================  ===================================
joining               ``joining`` (1h)            retire: never came up
validating            ``validating`` (6h)         retire: never passed validation
in-service            none (the goal state;       (periodic re-test by preflight)
                      re-tested periodically)
suspect               ``suspect`` (1h)            Warning Event; the health policy decides
quarantined           ``quarantined`` (1d)        drain (ladder target raised to drain)
draining              ``draining`` (7d)           retire: pods still held by a PDB
awaiting-repair       ``awaiting_repair`` (4h)    replace: the reset/reboot/maintenance never came
revalidating          ``revalidating`` (6h)       retire: re-validation failed or never finished
retiring              ``retiring`` (1h)           Warning Event: an operator must remove it
terminated            none                        none
====================  =========================  ===================================

A gate whose attempts are used up goes to retiring at once, with the failing
checks as its reason. Retiring taints the node, records the request on the
node and asks the machine provider to terminate it, in that order, once: the
request is recorded first, so a restart never asks twice.
"""

from __future__ import annotations

from dataclasses import dataclass

from fleetkeeper.core.config import human
from fleetkeeper.core.domain import Names
from fleetkeeper.core.plan import AddTaint, Event, Op, Plan, RequeueAfter, SetAnnotation, TerminateMachine
from fleetkeeper.core.views import NodeView
from fleetkeeper.lifecycle.config import LifecycleConfig
from fleetkeeper.lifecycle.keys import HealthKeys, PreflightFactKeys, RecordKeys

JOINING = "joining"
VALIDATING = "validating"
IN_SERVICE = "in-service"
SUSPECT = "suspect"
QUARANTINED = "quarantined"
DRAINING = "draining"
AWAITING_REPAIR = "awaiting-repair"
REVALIDATING = "revalidating"
RETIRING = "retiring"
TERMINATED = "terminated"
STATES = (JOINING, VALIDATING, IN_SERVICE, SUSPECT, QUARANTINED, DRAINING, AWAITING_REPAIR, REVALIDATING,
          RETIRING, TERMINATED)
# states that take the node's capacity away (what the disruption budget counts)
OUT_OF_SERVICE = frozenset({QUARANTINED, DRAINING, AWAITING_REPAIR, REVALIDATING, RETIRING})

# escalation of each state's deadline
ESCALATION = {JOINING: "retire", VALIDATING: "retire", SUSPECT: "report", QUARANTINED: "drain",
              DRAINING: "retire", AWAITING_REPAIR: "replace", REVALIDATING: "retire", RETIRING: "report"}

NOT_READY_TAINTS = ("node.kubernetes.io/not-ready", "node.kubernetes.io/unreachable")
IGNORED_CONDITIONS = frozenset({"Ready", "MemoryPressure", "DiskPressure", "PIDPressure", "NetworkUnavailable"})
MAINTENANCE = "MaintenanceScheduled"


def _f(s: str | None) -> float:
    try:
        return float(s) if s else 0.0
    except ValueError:
        return 0.0


@dataclass(frozen=True)
class Facts:
    """What the components proposed about one node, read from the cache."""

    node: str
    uid: str = ""
    created: float = 0.0
    deleting: bool = False
    up: bool = True  # Ready, and not tainted not-ready / unreachable
    gated: bool = False  # the preflight gate's taint
    gate_label: str = ""  # pending | failed
    attempts: int = 0
    failed_check: str = ""
    validated_at: float = 0.0
    gated_at: float = 0.0
    quarantined: bool = False
    action: str = ""  # health's ladder target: quarantine | drain | terminate
    remedy: str = ""
    health_reason: str = ""
    health_since: float = 0.0
    handed_to_gate: bool = False  # health returned it to the gate after a repair
    faults: tuple[str, ...] = ()  # condition types reported True (other than the kubelet's)
    fault_since: float = 0.0  # the earliest of their transitions
    maintenance: bool = False
    team: str = ""
    pods_left: int = 0  # pods still to evict (or terminating)
    ignored: bool = False  # an operator took the node over
    # the stored record
    state: str = ""
    since: float = 0.0
    reason: str = ""
    escalated: str = ""
    terminate_requested: float = 0.0


def facts_of(node: NodeView, names: Names, pods_left: int = 0) -> Facts:
    hk, pk, rk = HealthKeys(names), PreflightFactKeys(names), RecordKeys(names)
    a = node.annotations
    try:
        attempts = int(a.get(pk.attempts, "0"))
    except ValueError:
        attempts = 0
    return Facts(
        node=node.name, uid=node.uid, created=node.created, deleting=node.deleting,
        up=node.ready and not any(node.taint(k) is not None for k in NOT_READY_TAINTS),
        gated=node.taint(pk.gate) is not None, gate_label=node.labels.get(pk.gate, ""), attempts=attempts,
        failed_check=a.get(pk.failed_check, ""), validated_at=_f(a.get(pk.validated_at)),
        gated_at=_f(a.get(pk.gated_at)),
        quarantined=node.taint(names.quarantine) is not None, action=a.get(hk.action, ""),
        remedy=a.get(hk.remedy, ""), health_reason=a.get(hk.reason, ""), health_since=_f(a.get(hk.since)),
        handed_to_gate=a.get(hk.state) == "validating",
        faults=tuple(sorted(c.type for c in node.conditions if c.status == "True" and c.type not in IGNORED_CONDITIONS)),
        fault_since=min((c.last_transition for c in node.conditions
                         if c.status == "True" and c.type not in IGNORED_CONDITIONS), default=0.0),
        maintenance=any(c.type == MAINTENANCE and c.status == "True" for c in node.conditions),
        team=node.labels.get(names.team, ""), pods_left=pods_left, ignored=a.get(hk.ignore) == "true",
        state=a.get(rk.state, ""), since=_f(a.get(rk.since)), reason=a.get(rk.reason, ""),
        escalated=a.get(rk.escalated, ""), terminate_requested=_f(a.get(rk.terminate_requested)),
    )


def state_of(f: Facts, cfg: LifecycleConfig) -> tuple[str, str]:
    """(state, reason) the facts imply."""
    if f.deleting:
        return TERMINATED, "the Node is being deleted"
    if f.state == RETIRING or f.terminate_requested:
        return RETIRING, f.reason or "retiring"
    if f.quarantined:
        why = f.health_reason or "quarantined"
        if f.action in ("drain", "terminate"):
            if f.pods_left > 0:
                return DRAINING, f"{why}; {f.pods_left} pod(s) to evict"
            if f.action == "terminate":
                return RETIRING, f"{why}; drained, machine to be terminated"
            waiting = "maintenance" if f.maintenance or f.remedy == "wait" else (f.remedy or "repair")
            return AWAITING_REPAIR, f"{why}; drained, waiting for {waiting}"
        return QUARANTINED, why
    if f.gated:
        if f.gate_label == "failed" and f.attempts >= cfg.preflight_max_attempts:
            return RETIRING, f"preflight attempts used up ({f.attempts}): {f.failed_check or 'failed'}"
        if f.handed_to_gate or f.validated_at:
            why = "re-validating after a repair" if f.handed_to_gate else "re-validating"
            if f.gate_label == "failed":
                why += f"; attempt {f.attempts} failed ({f.failed_check or 'failed'})"
            return REVALIDATING, why
        if not f.up:
            return JOINING, "not Ready yet"
        why = "validating"
        if f.gate_label == "failed":
            why += f"; attempt {f.attempts} failed ({f.failed_check or 'failed'})"
        return VALIDATING, why
    if f.faults:
        return SUSPECT, "reported: " + ", ".join(f.faults)
    if not f.up and not f.validated_at and f.state in ("", JOINING):
        return JOINING, "not Ready yet"
    return IN_SERVICE, "in service" + (f" (team {f.team})" if f.team else "")


def deadline_of(state: str, cfg: LifecycleConfig) -> float | None:
    return getattr(cfg.deadlines, state.replace("-", "_"), None) if state in ESCALATION else None


@dataclass(frozen=True)
class Decision:
    state: str
    reason: str
    since: float
    deadline: float | None  # absolute time, None: no deadline
    next_step: str
    escalation: str  # "" or retire | replace | drain | report: due now
    plan: Plan


def _next_step(state: str, f: Facts, deadline: float | None, cfg: LifecycleConfig) -> str:
    base = {
        JOINING: "wait for the node to become Ready",
        VALIDATING: "the preflight gate validates it",
        IN_SERVICE: "periodic re-test by preflight",
        SUSPECT: "the health policy decides (trigger time)",
        QUARANTINED: "wait for the conditions to clear",
        DRAINING: f"evict {f.pods_left} pod(s)",
        AWAITING_REPAIR: f"{f.remedy or 'repair'}, then re-validation",
        REVALIDATING: "the preflight gate re-validates it",
        RETIRING: "terminate the machine" if not f.terminate_requested else "wait for the machine to go",
        TERMINATED: "none",
    }[state]
    if deadline is not None:
        base += f"; by {int(deadline)} else {ESCALATION[state]}"
    return base


def since_of(state: str, f: Facts) -> float:
    """When ``state`` began, from the markers the actions themselves wrote (so deadlines count from the
    first action, across restarts, without a write of their own); 0 when the markers do not say."""
    derived = {
        JOINING: f.created,
        VALIDATING: f.gated_at or f.created,
        IN_SERVICE: f.validated_at or f.created,
        SUSPECT: f.fault_since,
        QUARANTINED: f.health_since,
        DRAINING: f.health_since,
        AWAITING_REPAIR: f.health_since,  # the repair deadline counts from the start of the drain
        REVALIDATING: f.gated_at,
    }.get(state, 0.0)
    if derived:
        return derived
    return f.since if f.state == state else 0.0


def retiring_event(reason: str, requested: int) -> Event:
    """The announcement of a retirement, identified by the request's time on the node: made with the
    request and again while the machine is still there, it is one Event (``core.events``)."""
    return Event("Retiring", f"{reason}; terminating the machine", "Warning", id=f"retire@{requested}")


def decide(f: Facts, cfg: LifecycleConfig, names: Names, now: float, *, budget_ok: bool = True,
           provider_idempotent: bool = False) -> Decision:
    """The state, its deadline, and what to do now. ``budget_ok``: the disruption budget admits this node
    (asked only when the plan would take capacity away; an out-of-service node is already counted).
    ``provider_idempotent``: the machine provider keeps its own durable record of what it did (the machine
    layer's ledger), so asking it again after the request is on the node is safe and finishes a termination
    a crash interrupted between the record and the provider's answer.

    The record on the node is written by the writes that change the state (components fold
    :func:`record_ops` into theirs) and by escalations here; deriving ``since`` from the markers costs no
    write of its own."""
    rk, hk = RecordKeys(names), HealthKeys(names)
    state, reason = state_of(f, cfg)
    since = since_of(state, f) or now
    if f.ignored:
        return Decision(state, "an operator took the node over", since, None, "none", "",
                        Plan(f.node, "lifecycle"))
    dl = deadline_of(state, cfg)
    deadline = since + dl if dl is not None else None
    ops: list[Op] = []
    nxt = _next_step(state, f, deadline, cfg)
    due = deadline is not None and now >= deadline
    escalation = ""
    action = "lifecycle"
    episode = f"{state}@{int(since)}"
    already = f.escalated == episode
    if state == RETIRING:
        # retire: taint, record the request, then ask the provider; once. A node on health's terminate
        # ladder is terminated by health (its hourly limit applies); the record guards both.
        health_ladder = f.action == "terminate" and f.quarantined  # health terminates (and announces) it
        if health_ladder and not f.terminate_requested:
            nxt = "health terminates the machine"
        elif not f.terminate_requested:
            if cfg.escalate:
                ops += [AddTaint(names.quarantine, "retiring"), SetAnnotation(rk.terminate_requested, str(int(now))),
                        SetAnnotation(rk.state, RETIRING), SetAnnotation(rk.reason, reason[:250]),
                        TerminateMachine("terminate", reason), retiring_event(reason, int(now))]
                action = "terminate"
            escalation = "retire"
        elif provider_idempotent and not due:
            # the request is on the node but the Node is still here: the process may have died between the
            # record and the provider's answer. The machine layer never acts twice (its ledger), so ask it
            # again; without such a provider the record alone guards "never twice" and the deadline reports.
            # The announcement is made again too (it may have died with the process): the Event's name
            # derives from the request, so the API server keeps one.
            ops.append(TerminateMachine("terminate", reason))
            ops.append(RequeueAfter(30.0))
            if not health_ladder:
                ops.append(retiring_event(reason, int(f.terminate_requested)))
            action = "terminate-check"
            nxt = "wait for the machine to go (the machine layer is asked again; it never acts twice)"
        elif not due and not health_ladder:
            ops.append(retiring_event(reason, int(f.terminate_requested)))  # announced once (see above)
        elif due and not already:
            ops += [SetAnnotation(rk.escalated, episode),
                    Event("RetireStuck", f"terminate requested {human(now - f.terminate_requested)} ago and the "
                                         "machine is still there; an operator must remove it", "Warning")]
            escalation, action = "report", "escalate"
    elif due and not already:
        escalation = ESCALATION[state]
        if escalation == "report":
            ops += [SetAnnotation(rk.escalated, episode),
                    Event("DeadlinePassed", f"{state} for {human(now - since)} ({reason})", "Warning")]
            action = "escalate"
        elif not cfg.escalate:
            ops += [SetAnnotation(rk.escalated, episode),
                    Event("DeadlinePassed", f"{state} for {human(now - since)}: would {escalation} "
                                            "(escalation disabled)", "Warning")]
            action = "escalate"
        elif escalation == "drain":
            ops += [SetAnnotation(hk.action, "drain"), SetAnnotation(rk.escalated, episode),
                    Event("Escalated", f"quarantined for {human(now - since)} without clearing ({reason}); "
                                       "draining", "Warning")]
            action = "escalate"
        elif escalation in ("retire", "replace"):
            if state not in OUT_OF_SERVICE and not f.gated and not budget_ok:
                nxt = f"{escalation} waits for the disruption budget"
                escalation = ""
            else:
                why = (f"{state} for {human(now - since)} past its {human(dl or 0)} deadline ({reason})")
                ops += [SetAnnotation(rk.state, RETIRING), SetAnnotation(rk.since, str(int(now))),
                        SetAnnotation(rk.reason, why[:250]), SetAnnotation(rk.escalated, None),
                        Event("Escalated", f"{why}; {escalation}", "Warning")]
                action = "escalate"
    if deadline is not None and not due:
        ops.append(RequeueAfter(max(1.0, deadline - now + 0.5)))
    return Decision(state, reason, since, deadline, nxt, escalation, Plan(f.node, action, tuple(ops), reason))


def record_ops(names: Names, state: str, reason: str, now: float) -> tuple[SetAnnotation, ...]:
    """The record for a write that puts the node into ``state`` (components fold it into their own write,
    so a state change costs no extra API write)."""
    rk = RecordKeys(names)
    ops = (SetAnnotation(rk.state, state), SetAnnotation(rk.since, str(int(now))),
           SetAnnotation(rk.reason, reason[:250]), SetAnnotation(rk.escalated, None))
    if state == IN_SERVICE:
        # back in service ends a hand-over from health to the gate (health then has nothing left to write)
        ops += (SetAnnotation(HealthKeys(names).state, None),)
    return ops
