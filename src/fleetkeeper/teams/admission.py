"""The toleration webhook's decisions: pure functions of the admission request,
the team configuration, the cluster's PriorityClasses and the owner index.

Every configured workload kind (:mod:`.workloads`: Pods, every built-in kind
with a pod template, JobSets, MPIJobs, PyTorchJobs, LeaderWorkerSets, Ray...)
is judged the same way, every one of its pod templates:

* **who**: the authenticated requester; for an object created by a configured
  workload *controller* (``controllers``) with a controller ownerReference,
  the requester stamped on its top-level owner (``<domain>/requester``, see
  :mod:`fleetkeeper.core.attribution`), never the controller itself;
* **mutate**: stamps ``<domain>/requester`` on CREATE (overwriting what the
  author wrote; restored on UPDATE); adds the team toleration of the
  requester's teams to every template (or the "any" toleration to a
  low-priority template) and a ``<domain>/team`` (or
  ``<domain>/team-borrower``) label; idempotent, so reinvocation is safe;
* **validate**: refuses a toleration of a team the requester is not in, a
  toleration covering every team on a template that is not low priority, a
  toleration of fleetkeeper's own lifecycle taints (preflight, quarantine,
  any ``<domain>/`` key but the team's, or a blanket ``Exists``) from anyone
  not exempt, and a stamp that differs from the one the webhook computes.
  On CREATE every toleration of every template is judged. On UPDATE a
  template whose priority changed, or that is new, is judged whole; otherwise
  only the tolerations the update adds (a membership change never strands
  running workloads).

Requesters in ``exempt`` (cluster admins, the built-in controllers that copy
templates this webhook already admitted) are left alone.
"""

from __future__ import annotations

import copy
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from fleetkeeper.core.attribution import OwnerEntry, Stamp, controller_ref, resolve
from fleetkeeper.core.domain import Names
from fleetkeeper.core.admission import Admission, AdmissionRequest, json_patch_path

from fleetkeeper.teams.config import ConfigState, Exempt, TeamsConfig
from fleetkeeper.teams.plan import TEAM_EFFECT
from fleetkeeper.teams.workloads import DEFAULT_WORKLOADS, Path, WorkloadKind, WorkloadKinds, dig, templates

ANY = "*"
DEFAULT_KINDS = WorkloadKinds(DEFAULT_WORKLOADS)


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


def lifecycle(tol: dict, names: Names, extra_keys: tuple[str, ...] = ()) -> bool:
    """Does the toleration tolerate one of fleetkeeper's lifecycle taints?"""
    key = tol.get("key") or ""
    if key == "":
        return (tol.get("operator") or "Equal") == "Exists"  # tolerates every taint
    return names.is_lifecycle_taint(key) or key in extra_keys


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
class Requester:
    """Whom an object is judged as."""

    user: str
    teams: tuple[str, ...]
    exempt: bool = False
    via: str = ""          # the controller that created it on the user's behalf
    owner: str = ""        # the top-level owner whose stamp was used (Kind ns/name)
    unresolved: str = ""   # why a controller's object could not be attributed

    def describe(self) -> str:
        who = f"user {self.user!r}"
        if self.via:
            who += f" (through {self.via}, for {self.owner})"
        if self.unresolved:
            return f"{self.user!r}: {self.unresolved}"
        return who + (f" (teams: {', '.join(self.teams)})" if self.teams else " (member of no team)")

    @property
    def stamp(self) -> Stamp:
        return Stamp(self.user, self.teams)


@dataclass(frozen=True)
class TemplateVerdict:
    path: Path
    add_tolerations: tuple[dict, ...] = ()
    add_labels: tuple[tuple[str, str], ...] = ()
    teams: tuple[str, ...] = ()
    low_priority: bool = False


@dataclass(frozen=True)
class Verdict:
    allowed: bool
    message: str
    templates: tuple[TemplateVerdict, ...] = ()
    stamp: str | None = None          # the requester annotation the object must carry (None: leave it)
    requester: Requester | None = None

    # the first template's decision (a Pod has exactly one)
    @property
    def add_tolerations(self) -> tuple[dict, ...]:
        return self.templates[0].add_tolerations if self.templates else ()

    @property
    def add_labels(self) -> tuple[tuple[str, str], ...]:
        return self.templates[0].add_labels if self.templates else ()

    @property
    def teams(self) -> tuple[str, ...]:
        return self.templates[0].teams if self.templates else ()

    @property
    def low_priority(self) -> bool:
        return any(t.low_priority for t in self.templates)


OwnerLookup = Callable[[str], OwnerEntry | None]


def _no_owner(uid: str) -> OwnerEntry | None:
    return None


def requester_of(cfg: TeamsConfig, username: str, groups: tuple[str, ...], obj: dict,
                 owners: OwnerLookup) -> Requester:
    if cfg.is_exempt(username, groups):
        return Requester(username, tuple(cfg.teams_of(username, groups)), exempt=True)
    ref = controller_ref(obj.get("metadata"))
    if ref is not None and cfg.is_controller(username, groups):
        stamp, chain = resolve(ref["uid"], owners)
        top = chain[-1] if chain else None
        owner = f"{top.kind} {top.namespace}/{top.name}" if top else f"{ref.get('kind')} {ref.get('name')}"
        if stamp is None:
            why = ("its owner is not in fleetkeeper's cache" if not chain else
                   f"no requester is recorded on {owner} or its owners")
            return Requester(username, (), via=username, owner=owner,
                             unresolved=f"controller {username} created this for {owner}, but {why}; "
                                        "team tolerations cannot be granted")
        return Requester(stamp.user, stamp.teams, via=username, owner=owner)
    return Requester(username, tuple(cfg.teams_of(username, groups)))


def _template_parts(kind: WorkloadKind, tmpl: dict) -> tuple[dict, dict]:
    spec = tmpl.get("spec") if isinstance(tmpl.get("spec"), dict) else {}
    meta = tmpl.get("metadata") if isinstance(tmpl.get("metadata"), dict) else {}
    return spec, meta


def judge(cfg: TeamsConfig | None, names: Names, username: str, groups: tuple[str, ...], kind: str,
          obj: dict, old: dict | None, priorities: Priorities, *, group: str | None = None,
          kinds: WorkloadKinds = DEFAULT_KINDS, owners: OwnerLookup = _no_owner,
          namespace: str = "", own_namespace: str = "") -> Verdict:
    """The whole decision for one object; ``mutate`` and ``validate`` both use it."""
    wk = kinds.get(group if group is not None else _group_of(obj, kind), kind)
    if wk is None:
        return Verdict(True, f"kind {kind} not handled")
    tmpls = templates(wk, obj)
    updating = old is not None
    old_stamp = ((old or {}).get("metadata") or {}).get("annotations", {}) or {}
    if cfg is None:
        # no teams known yet: no stamp is written on CREATE (none can be forged either), kept on UPDATE
        keep = old_stamp.get(names.requester) if updating else None
        default_exempt = Exempt()  # cluster admins and built-in controllers, as configured by default
        if username in default_exempt.users or set(groups) & set(default_exempt.groups):
            return Verdict(True, f"{username} is exempt (default exemptions; team configuration not loaded yet)",
                           stamp=keep)
        for _, t in tmpls:
            spec, _ = _template_parts(wk, t)
            if any(coverage(x, names.team) or lifecycle(x, names) for x in spec.get("tolerations") or ()):
                return Verdict(False, "team configuration not loaded yet; team tolerations cannot be checked, "
                                      "try again in a moment")
        return Verdict(True, "team configuration not loaded yet", stamp=keep)

    who = requester_of(cfg, username, groups, obj, owners)
    stamp = old_stamp.get(names.requester) if updating else who.stamp.encode()
    if who.exempt and not updating:
        given = Stamp.decode(((obj.get("metadata") or {}).get("annotations") or {}).get(names.requester))
        ref = controller_ref(obj.get("metadata"))
        if ref is not None:  # an exempt controller's object: inherit the owner's stamp when known
            inherited, _ = resolve(ref["uid"], owners)
            stamp = inherited.encode() if inherited else (given.encode() if given else who.stamp.encode())
    if who.exempt or (own_namespace and namespace == own_namespace):
        return Verdict(True, f"{username} is exempt", stamp=stamp, requester=who)

    out: list[TemplateVerdict] = []
    for path, tmpl in tmpls:
        spec, meta = _template_parts(wk, tmpl)
        old_tmpl = dig(old, path) if updating else None
        old_spec, old_meta = _template_parts(wk, old_tmpl) if isinstance(old_tmpl, dict) else ({}, {})
        prio = priorities.of(kind, spec)
        low = prio < cfg.low_priority.below
        where = f"template {'.'.join(map(str, path))}: " if path else ""
        labels = meta.get("labels") or {}
        chosen = labels.get(names.team)
        old_labels = old_meta.get("labels") or {}
        if chosen and chosen != old_labels.get(names.team) and chosen not in who.teams:
            return Verdict(False, f"{where}label {names.team}={chosen}: {who.describe()} is not in team "
                                  f"{chosen!r}", requester=who)
        whole = (not updating or not isinstance(old_tmpl, dict)
                 or priorities.of(kind, old_spec) != prio)
        old_tols = [] if whole else (old_spec.get("tolerations") or [])
        judged = [t for t in spec.get("tolerations") or () if isinstance(t, dict) and t not in old_tols]
        for t in judged:
            cov = coverage(t, names.team)
            # (a blanket Exists on a template that is not low priority is reported as "every team" below)
            if lifecycle(t, names, tuple(cfg.lifecycle_taint_keys)) and not (cov == ANY and not low):
                return Verdict(False, f"{where}toleration {_fmt_tol(t)} tolerates fleetkeeper's node lifecycle "
                                      f"taints (preflight, quarantine, ...); only exempt requesters and "
                                      f"fleetkeeper's own pods may use nodes being validated or quarantined, "
                                      f"and {who.describe()} is not exempt", requester=who)
            if cov is None:
                continue
            if cov == ANY and not low:
                changed = " after this update" if updating else ""
                return Verdict(False, f"{where}toleration {_fmt_tol(t)} tolerates every team's nodes; only pods "
                                      f"with priority below {cfg.low_priority.below} may borrow them (this "
                                      f"{'pod' if not path else 'template'}'s priority{changed} is {prio}); "
                                      f"{who.describe()}: remove it and the webhook adds your team's toleration",
                               requester=who)
            if cov != ANY and cov not in who.teams and not low:
                return Verdict(False, f"{where}toleration {_fmt_tol(t)} would let this pod onto team {cov!r}'s "
                                      f"nodes, but {who.describe()} is not in that team", requester=who)
        if low:
            want = [{"key": names.team, "operator": "Exists", "effect": TEAM_EFFECT}]
            teams: tuple[str, ...] = (ANY,)
            add_labels = [] if borrower_label(names) in labels else [
                (borrower_label(names), who.teams[0] if who.teams else "none")]
        else:
            teams = (chosen,) if chosen else tuple(who.teams)
            want = [{"key": names.team, "operator": "Equal", "value": t, "effect": TEAM_EFFECT} for t in teams]
            add_labels = [(names.team, teams[0])] if len(teams) == 1 and names.team not in labels else []
        have_tols = spec.get("tolerations") or []
        add = tuple(w for w in want if not any(_same(w, h) for h in have_tols if isinstance(h, dict)))
        out.append(TemplateVerdict(path, add, tuple(add_labels), teams, low))
    return Verdict(True, "ok", tuple(out), stamp=stamp, requester=who)


def _group_of(obj: dict, kind: str) -> str:
    api = obj.get("apiVersion") or ""
    return api.rpartition("/")[0] if "/" in api else ""


def _same(a: dict, b: dict) -> bool:
    return (a.get("key") or "") == (b.get("key") or "") and (a.get("operator") or "Equal") == (
        b.get("operator") or "Equal") and (a.get("value") or "") == (b.get("value") or "") and (
        a.get("effect") or "") == (b.get("effect") or "")


def patch_for(kind: str, obj: dict, v: Verdict, names: Names | None = None) -> list[dict]:
    """RFC 6902 ops: each template's additions, and the requester stamp."""
    ops: list[dict] = []
    for tv in v.templates:
        tmpl = dig(obj, tv.path)
        if not isinstance(tmpl, dict):
            continue
        p = tuple(str(x) for x in tv.path)
        spec = tmpl.get("spec") if isinstance(tmpl.get("spec"), dict) else None
        if tv.add_tolerations and spec is not None:
            if isinstance(spec.get("tolerations"), list):
                ops += [{"op": "add", "path": json_patch_path(*p, "spec", "tolerations", "-"), "value": t}
                        for t in tv.add_tolerations]
            else:
                ops.append({"op": "add", "path": json_patch_path(*p, "spec", "tolerations"),
                            "value": list(tv.add_tolerations)})
        if tv.add_labels:
            meta = tmpl.get("metadata")
            if isinstance(meta, dict) and isinstance(meta.get("labels"), dict):
                ops += [{"op": "add", "path": json_patch_path(*p, "metadata", "labels", k), "value": val}
                        for k, val in tv.add_labels]
            elif isinstance(meta, dict):
                ops.append({"op": "add", "path": json_patch_path(*p, "metadata", "labels"),
                            "value": dict(tv.add_labels)})
            else:  # a template without metadata
                ops.append({"op": "add", "path": json_patch_path(*p, "metadata"),
                            "value": {"labels": dict(tv.add_labels)}})
    if names is not None:
        meta = obj.get("metadata") if isinstance(obj.get("metadata"), dict) else {}
        ann = meta.get("annotations")
        have = ann.get(names.requester) if isinstance(ann, dict) else None
        if v.stamp is None and have is not None:
            ops.append({"op": "remove", "path": json_patch_path("metadata", "annotations", names.requester)})
        elif v.stamp is not None and have != v.stamp:
            if isinstance(ann, dict):
                ops.append({"op": "add", "path": json_patch_path("metadata", "annotations", names.requester),
                            "value": v.stamp})
            else:
                ops.append({"op": "add", "path": "/metadata/annotations", "value": {names.requester: v.stamp}})
    return ops


@dataclass
class TeamAdmission:
    """The two handlers served by :class:`fleetkeeper.core.webhook.WebhookServer`."""

    names: Names
    state: ConfigState
    priorities: Callable[[], Priorities]
    on_decision: Callable[[str, str], None] = field(default=lambda webhook, decision: None)
    kinds: WorkloadKinds = DEFAULT_KINDS
    owners: OwnerLookup = _no_owner
    own_namespace: str = ""
    # waits for the owner index to see an owner created a moment ago (namespace, ownerReference,
    # seconds), then reads what it still misses from the API server
    wait_owner: Callable[[str, dict, float], Awaitable[object]] | None = None
    owner_wait_s: float = 1.0

    def _kind(self, req: AdmissionRequest) -> WorkloadKind | None:
        if req.operation not in ("CREATE", "UPDATE"):
            return None
        return self.kinds.get(req.group, req.kind)

    def _judge(self, req: AdmissionRequest) -> Verdict:
        return judge(self.state.config, self.names, req.username, req.groups, req.kind, req.obj,
                     req.old if req.operation == "UPDATE" else None, self.priorities(), group=req.group,
                     kinds=self.kinds, owners=self.owners, namespace=req.namespace,
                     own_namespace=self.own_namespace)

    def needs_owner(self, req: AdmissionRequest) -> dict | None:
        """The controller ownerReference this request waits for, if its requester is a
        controller and the owner is not in the cache yet (created a moment ago)."""
        cfg = self.state.config
        if cfg is None or self._kind(req) is None or req.operation != "CREATE":
            return None
        ref = controller_ref(req.obj.get("metadata"))
        # a controller's objects are judged through their owner; an exempt controller's (the
        # Job controller's pods of a JobSet's or an MPIJob's Job) inherit the owner's stamp:
        # both wait, else a pod created a moment after its owner would be stamped with the
        # controller's own identity instead of the workload's requester
        if ref is None or not (cfg.is_exempt(req.username, req.groups) or cfg.is_controller(req.username, req.groups)):
            return None
        return None if self.owners(ref["uid"]) is not None else ref

    async def _await_owner(self, req: AdmissionRequest) -> None:
        ref = self.needs_owner(req)
        if ref and self.wait_owner is not None:
            await self.wait_owner(req.namespace, ref, self.owner_wait_s)

    async def serve_mutate(self, req: AdmissionRequest) -> Admission:
        await self._await_owner(req)
        return self.mutate(req)

    async def serve_validate(self, req: AdmissionRequest) -> Admission:
        await self._await_owner(req)
        return self.validate(req)

    def mutate(self, req: AdmissionRequest) -> Admission:
        if self._kind(req) is None:
            return Admission(True)
        v = self._judge(req)
        if not v.allowed:
            self.on_decision("mutate", "denied")
            return Admission(False, f"fleetkeeper teams: {v.message}")
        patch = patch_for(req.kind, req.obj, v, self.names)
        self.on_decision("mutate", "borrow" if v.low_priority and patch else ("patched" if patch else "allowed"))
        return Admission(True, patch=patch)

    def validate(self, req: AdmissionRequest) -> Admission:
        if self._kind(req) is None:
            return Admission(True)
        v = self._judge(req)
        if v.allowed and v.requester is not None and not v.requester.exempt and v.templates is not None:
            have = ((req.obj.get("metadata") or {}).get("annotations") or {}).get(self.names.requester)
            if have != v.stamp and have is None and req.operation == "CREATE":
                # the mutating webhook did not run for this request (failurePolicy Ignore: it timed out or was
                # unreachable): without the stamp the workload's pods could not be attributed later
                why = (f"is missing: fleetkeeper's mutating webhook (tolerations.teams) did not answer this request "
                       f"(timed out or unreachable), so it was neither stamped nor given its team tolerations; "
                       f"try again")
                v = Verdict(False, f"annotation {self.names.requester} {why}; {v.requester.describe()}")
            elif have != v.stamp:
                want = "absent" if v.stamp is None else v.stamp
                v = Verdict(False, f"annotation {self.names.requester} must be {want} (set by fleetkeeper: "
                                   f"who created this workload), not {have!r}; {v.requester.describe()}")
        self.on_decision("validate", "allowed" if v.allowed else "denied")
        if not v.allowed:
            return Admission(False, f"fleetkeeper teams: {v.message}")
        return Admission(True)


def apply_ops(obj: dict, ops: list[dict]) -> dict:
    """Apply the 'add'/'remove' ops this webhook emits (tests, explain, benchmarks)."""
    out = copy.deepcopy(obj)
    for op in ops:
        parts = [p.replace("~1", "/").replace("~0", "~") for p in op["path"].split("/")[1:]]
        cur = out
        for p in parts[:-1]:
            cur = cur[int(p)] if isinstance(cur, list) else cur[p]
        last = parts[-1]
        if op["op"] == "remove":
            del cur[int(last) if isinstance(cur, list) else last]
        elif last == "-":
            cur.append(op["value"])
        elif isinstance(cur, list):
            cur.insert(int(last), op["value"])
        else:
            cur[last] = op["value"]
    return out
