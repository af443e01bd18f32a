"""The toleration webhook's decisions: pure functions of the admission request,
the team configuration and the cluster's PriorityClasses.

* **mutate** (pods on CREATE; workload pod templates on CREATE/UPDATE): adds
  the toleration of the submitter's team, taken from the authenticated
  request (user name and groups), or the "any" toleration (key
  ``<domain>/team``, operator Exists) to pods below the low-priority
  threshold, plus a ``<domain>/team`` (or ``<domain>/team-borrower``) label
  for accounting. Idempotent: nothing is added twice, so reinvocation is safe.
* **validate** (the same objects, CREATE and UPDATE): rejects a toleration of
  a team's taint the submitter is not entitled to, and any toleration that
  covers every team (``<domain>/team`` Exists, or an empty key with Exists)
  on a pod that is not low priority. On UPDATE only tolerations added by the
  update are judged, so a membership change never strands running pods.

Requesters in ``exempt`` (cluster admins, the built-in controllers that create
pods from templates this webhook already admitted) are left alone.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from fleetkeeper.core.domain import Names
from fleetkeeper.core.admission import Admission, AdmissionRequest, json_patch_path

from fleetkeeper.teams.config import ConfigState, Exempt, TeamsConfig
from fleetkeeper.teams.plan import TEAM_EFFECT

ANY = "*"

# where the pod spec and pod metadata live in each kind this webhook admits
SPEC_PATHS: dict[str, tuple[str, ...]] = {
    "Pod": ("spec",),
    "Deployment": ("spec", "template", "spec"),
    "ReplicaSet": ("spec", "template", "spec"),
    "StatefulSet": ("spec", "template", "spec"),
    "DaemonSet": ("spec", "template", "spec"),
    "Job": ("spec", "template", "spec"),
    "CronJob": ("spec", "jobTemplate", "spec", "template", "spec"),
}


def _meta_path(kind: str) -> tuple[str, ...]:
    return ("metadata",) if kind == "Pod" else SPEC_PATHS[kind][:-1] + ("metadata",)


def _dig(obj: dict | None, path: tuple[str, ...]) -> dict:
    cur: object = obj or {}
    for p in path:
        cur = (cur or {}).get(p) if isinstance(cur, dict) else None
    return cur if isinstance(cur, dict) else {}


def borrower_label(names: Names) -> str:
    return f"{names.domain}/team-borrower"


def coverage(tol: dict, team_key: str) -> str | None:
    """Which team taint (``<team_key>=<team>:NoSchedule``) a toleration tolerates:
    None (none), :data:`ANY` (every team), or one team's name."""
    effect = tol.get("effect") or ""
    if effect not in ("", TEAM_EFFECT):
        return None
    key = tol.get("key") or ""
    op = tol.get("operator") or "Equal"
    if key == "":
        return ANY if op == "Exists" else None
    if key != team_key:
        return None
    if op == "Exists":
        return ANY
    return str(tol.get("value") or "")


def _fmt_tol(t: dict) -> str:
    key = t.get("key") or "<any key>"
    op = t.get("operator") or "Equal"
    val = f"={t.get('value', '')}" if op == "Equal" else " Exists"
    return f"{{{key}{val}:{t.get('effect') or '<any effect>'}}}"


@dataclass(frozen=True)
class Priorities:
    """PriorityClass name -> value, and the global default's value."""

    classes: dict[str, int]
    default: int = 0

    def of(self, kind: str, spec: dict) -> int:
        if kind == "Pod" and spec.get("priority") is not None:  # resolved by the Priority admission plugin
            return int(spec["priority"])
        name = spec.get("priorityClassName") or ""
        if name:
            return self.classes.get(name, self.default)
        return self.default


@dataclass(frozen=True)
class Verdict:
    allowed: bool
    message: str
    add_tolerations: tuple[dict, ...] = ()
    add_labels: tuple[tuple[str, str], ...] = ()
    teams: tuple[str, ...] = ()
    low_priority: bool = False


def judge(cfg: TeamsConfig | None, names: Names, username: str, groups: tuple[str, ...], kind: str,
          obj: dict, old: dict | None, priorities: Priorities) -> Verdict:
    """The whole decision for one object; ``mutate`` and ``validate`` both use it."""
    if kind not in SPEC_PATHS:
        return Verdict(True, f"kind {kind} not handled")
    spec = _dig(obj, SPEC_PATHS[kind])
    meta = _dig(obj, _meta_path(kind))
    if cfg is None:
        default_exempt = Exempt()  # cluster admins and built-in controllers, as configured by default
        if username in default_exempt.users or set(groups) & set(default_exempt.groups):
            return Verdict(True, f"{username} is exempt (default exemptions; team configuration not loaded yet)")
        if any(coverage(t, names.team) for t in spec.get("tolerations") or ()):
            return Verdict(False, "team configuration not loaded yet; team tolerations cannot be checked, "
                                  "try again in a moment")
        return Verdict(True, "team configuration not loaded yet")
    if cfg.is_exempt(username, groups):
        return Verdict(True, f"{username} is exempt")
    prio = priorities.of(kind, spec)
    low = prio < cfg.low_priority.below
    entitled = cfg.teams_of(username, groups)
    who = f"user {username!r}" + (f" (teams: {', '.join(entitled)})" if entitled else " (member of no team)")
    labels = meta.get("labels") or {}
    old_labels = _dig(old, _meta_path(kind)).get("labels") or {} if old else {}
    chosen = labels.get(names.team)
    if chosen and chosen != old_labels.get(names.team) and chosen not in entitled:
        return Verdict(False, f"label {names.team}={chosen}: {who} is not in team {chosen!r}")

    old_tols = _dig(old, SPEC_PATHS[kind]).get("tolerations") or [] if old else []
    new_tols = [t for t in spec.get("tolerations") or () if t not in old_tols]
    for t in new_tols:
        cov = coverage(t, names.team)
        if cov is None:
            continue
        if cov == ANY and not low:
            return Verdict(False, f"toleration {_fmt_tol(t)} tolerates every team's nodes; only pods with "
                                  f"priority below {cfg.low_priority.below} may borrow them (this pod's priority "
                                  f"is {prio}); remove it and the webhook adds your team's toleration")
        if cov != ANY and cov not in entitled and not low:
            return Verdict(False, f"toleration {_fmt_tol(t)} would let this pod onto team {cov!r}'s nodes, "
                                  f"but {who} is not in that team")

    if low:
        want = [{"key": names.team, "operator": "Exists", "effect": TEAM_EFFECT}]
        teams: tuple[str, ...] = (ANY,)
        add_labels = [] if borrower_label(names) in labels else [(borrower_label(names), entitled[0] if entitled else "none")]
    else:
        teams = (chosen,) if chosen else tuple(entitled)
        want = [{"key": names.team, "operator": "Equal", "value": t, "effect": TEAM_EFFECT} for t in teams]
        add_labels = [(names.team, teams[0])] if len(teams) == 1 and names.team not in labels else []
    have = spec.get("tolerations") or []
    add = tuple(w for w in want if not any(_same(w, h) for h in have))
    return Verdict(True, "ok", add, tuple(add_labels), teams, low)


def _same(a: dict, b: dict) -> bool:
    return (a.get("key") or "") == (b.get("key") or "") and (a.get("operator") or "Equal") == (
        b.get("operator") or "Equal") and (a.get("value") or "") == (b.get("value") or "") and (
        a.get("effect") or "") == (b.get("effect") or "")


def patch_for(kind: str, obj: dict, v: Verdict) -> list[dict]:
    spath, mpath = SPEC_PATHS[kind], _meta_path(kind)
    spec, meta = _dig(obj, spath), _dig(obj, mpath)
    ops: list[dict] = []
    if v.add_tolerations:
        if "tolerations" in spec and spec["tolerations"] is not None:
            ops += [{"op": "add", "path": json_patch_path(*spath, "tolerations", "-"), "value": t}
                    for t in v.add_tolerations]
        else:
            ops.append({"op": "add", "path": json_patch_path(*spath, "tolerations"), "value": list(v.add_tolerations)})
    if v.add_labels:
        if isinstance(meta.get("labels"), dict):
            ops += [{"op": "add", "path": json_patch_path(*mpath, "labels", k), "value": val} for k, val in v.add_labels]
        elif isinstance(_dig(obj, mpath[:-1]).get("metadata"), dict):
            ops.append({"op": "add", "path": json_patch_path(*mpath, "labels"), "value": dict(v.add_labels)})
        else:  # a template without metadata
            ops.append({"op": "add", "path": json_patch_path(*mpath), "value": {"labels": dict(v.add_labels)}})
    return ops


class TeamAdmission:
    """The two handlers served by :class:`fleetkeeper.core.webhook.WebhookServer`."""

    def __init__(self, names: Names, state: ConfigState, priorities: Callable[[], Priorities],
                 on_decision: Callable[[str, str], None] | None = None):
        self.names = names
        self.state = state
        self.priorities = priorities
        self.on_decision = on_decision or (lambda webhook, decision: None)

    def _ignored(self, req: AdmissionRequest) -> bool:
        return req.kind not in SPEC_PATHS or req.operation not in ("CREATE", "UPDATE")

    def mutate(self, req: AdmissionRequest) -> Admission:
        if self._ignored(req):
            return Admission(True)
        v = judge(self.state.config, self.names, req.username, req.groups, req.kind, req.obj, req.old,
                  self.priorities())
        if not v.allowed:
            self.on_decision("mutate", "denied")
            return Admission(False, f"fleetkeeper teams: {v.message}")
        patch = patch_for(req.kind, req.obj, v)
        self.on_decision("mutate", "borrow" if v.low_priority and patch else ("patched" if patch else "allowed"))
        return Admission(True, patch=patch)

    def validate(self, req: AdmissionRequest) -> Admission:
        if self._ignored(req):
            return Admission(True)
        v = judge(self.state.config, self.names, req.username, req.groups, req.kind, req.obj, req.old,
                  self.priorities())
        self.on_decision("validate", "allowed" if v.allowed else "denied")
        if not v.allowed:
            return Admission(False, f"fleetkeeper teams: {v.message}")
        return Admission(True)
