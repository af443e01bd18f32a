"""Least privilege, proven: run a component under its chart-made ServiceAccount, record
every request it makes, and check that (1) none was forbidden and (2) every rule the
chart grants it is the only rule that allowed at least one of those requests, so
removing any one rule would make a request fail."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from urllib.parse import unquote

from fleetkeeper.core import errors
from fleetkeeper.core.kube import (
    CLUSTERROLEBINDINGS, CLUSTERROLES, CONFIGMAPS, NAMESPACES, PRIORITYCLASSES, SECRETS, SERVICEACCOUNTS, Kube,
    Request, Resource,
)

from chartlib import NAMESPACE, render

ROLES = Resource("rbac.authorization.k8s.io", "v1", "roles", "Role", True)
ROLEBINDINGS = Resource("rbac.authorization.k8s.io", "v1", "rolebindings", "RoleBinding", True)
RBAC_KINDS = {r.kind: r for r in (SERVICEACCOUNTS, CLUSTERROLES, CLUSTERROLEBINDINGS, ROLES, ROLEBINDINGS)}
# objects the chart makes so that the components need not create them
SUPPORT_KINDS = {r.kind: r for r in (SECRETS, PRIORITYCLASSES, CONFIGMAPS)}


@dataclass(frozen=True)
class Call:
    verb: str
    group: str
    resource: str  # with /subresource
    namespace: str
    name: str
    code: int


def parse(req: Request, code: int) -> Call:
    parts = [unquote(p) for p in req.path.strip("/").split("/")]
    if parts[0] == "api":
        group, rest = "", parts[2:]
    else:
        group, rest = parts[1], parts[3:]
    ns = ""
    if rest[:1] == ["namespaces"] and len(rest) > 2:
        ns, rest = rest[1], rest[2:]
    resource, name, sub = rest[0], (rest[1] if len(rest) > 1 else ""), (rest[2] if len(rest) > 2 else "")
    if rest[:1] == ["namespaces"] and len(rest) <= 2:
        resource, name = "namespaces", rest[1] if len(rest) > 1 else ""
    verb = req.verb
    if verb == "evict":
        verb, sub = "create", "eviction"
    params = dict(req.params)
    if verb in ("list", "watch"):
        if params.get("watch") == "true":
            verb = "watch"
        fs = params.get("fieldSelector", "")
        if fs.startswith("metadata.name=") and "," not in fs:
            name = fs.split("=", 1)[1]
    return Call(verb, group, resource + (f"/{sub}" if sub else ""), ns, name, code)


@dataclass
class RecordingKube(Kube):
    calls: list[Call] = field(default_factory=list)

    @classmethod
    def of(cls, kube: Kube) -> "RecordingKube":
        return cls(**{f.name: getattr(kube, f.name) for f in dataclasses.fields(Kube)})

    async def _send(self, req: Request, *, stream: bool = False, timeout: float | None = None):
        try:
            resp = await super()._send(req, stream=stream, timeout=timeout)
        except errors.FleetkeeperError as exc:
            code = getattr(exc, "code", None) or getattr(exc, "status", None) or \
                (403 if isinstance(exc, errors.Forbidden) else 404 if isinstance(exc, errors.NotFound)
                 else 409 if isinstance(exc, errors.Conflict) else 0)
            self.calls.append(parse(req, int(code)))
            raise
        call = parse(req, getattr(resp, "status", 200))
        self.calls.append(call)
        if call.verb == "patch" and call.code == 201:  # server-side apply that created the object:
            self.calls.append(dataclasses.replace(call, verb="create", name=""))  # authorized as create too
        return resp


def service_account(kube: Kube, name: str, namespace: str = NAMESPACE) -> RecordingKube:
    return RecordingKube.of(kube.as_user(f"system:serviceaccount:{namespace}:{name}",
                                         ["system:serviceaccounts", f"system:serviceaccounts:{namespace}",
                                          "system:authenticated"]))


def chart_docs(values: dict | None = None) -> list[dict]:
    return render(values)


async def apply_rbac(kube: Kube, docs: list[dict], *, support: bool = True) -> None:
    """The chart's RBAC (and the objects it makes for the components) as an install would."""
    if await kube.get_or_none(NAMESPACES, NAMESPACE) is None:
        await kube.create(NAMESPACES, {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": NAMESPACE}})
    for d in docs:
        res = RBAC_KINDS.get(d["kind"])
        if res is None and support and d["kind"] in ("Secret", "PriorityClass"):
            res = SUPPORT_KINDS[d["kind"]]
        if res is not None:
            await kube.apply(res, d)


def _matches(rule: dict, call: Call) -> bool:
    if call.group not in rule["apiGroups"] or call.resource not in rule["resources"]:
        return False
    if call.verb not in rule["verbs"]:
        return False
    names = rule.get("resourceNames")
    return not names or (call.name in names and call.verb != "create")


def rules_of(docs: list[dict], sa: str) -> list[tuple[str, str, dict]]:
    """(kind, namespace, rule) granted to ServiceAccount ``sa`` by the chart."""
    roles = {(d["kind"], d["metadata"]["name"]): d for d in docs if d["kind"] in ("Role", "ClusterRole")}
    out = []
    for b in docs:
        if b["kind"] not in ("RoleBinding", "ClusterRoleBinding"):
            continue
        if not any(s["kind"] == "ServiceAccount" and s["name"] == sa for s in b["subjects"]):
            continue
        role = roles[(b["roleRef"]["kind"], b["roleRef"]["name"])]
        ns = b["metadata"].get("namespace", "")
        for r in role["rules"]:
            out.append((b["kind"], ns, r))
    return out


def allows(kind: str, ns: str, rule: dict, call: Call) -> bool:
    if kind == "RoleBinding" and call.namespace != ns:
        return False
    return _matches(rule, call)


def audit(docs: list[dict], sa: str, calls: list[Call]) -> tuple[list[Call], list[dict]]:
    """(forbidden calls, rules no call needed alone)."""
    rules = rules_of(docs, sa)
    forbidden = [c for c in calls if c.code == 403]
    unneeded = []
    ok = [c for c in calls if c.code != 403]
    for i, (kind, ns, rule) in enumerate(rules):
        others = [r for j, r in enumerate(rules) if j != i]
        if not any(allows(kind, ns, rule, c) and not any(allows(k, n, r, c) for k, n, r in others) for c in ok):
            unneeded.append({"binding": kind, **rule})
    return forbidden, unneeded
