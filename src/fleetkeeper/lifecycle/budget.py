"""The one disruption budget, asked by every action that takes capacity away
(quarantine, drain, terminate, a periodic re-test that fails a node, a team
replacement).

Pure admission: :func:`admit` is a function of

* the **cluster's record** (:func:`snapshot`): which nodes are out of service
  now and when their disruption began, read from the node caches (the
  quarantine taint, the preflight gate on a node that had been validated, the
  lifecycle record). It survives restarts and leader changes because it is on
  the nodes;
* the **actions in flight** (:class:`Ledger`): admitted, but not yet visible
  in the cache, like a scheduler's assumed pods. A restarted process starts
  with an empty ledger and loses nothing: an action either reached the API
  server (then it is in the cache) or it did not (then it is decided again).

A node already out of service costs nothing more (draining or terminating a
quarantined node uses the budget it already holds); a gang evicted with one
node's drain is that node's one disruption, and the nodes of one gang repair
window (``<domain>/lifecycle-gang``: the gang's nodes with reset-class faults,
drained and repaired together) are one unit.

Scopes: ``cluster``, ``zone:<zone>``, ``rack:<rack>``, and
``label:<key>=<value>`` for every label the operator names.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field

from fleetkeeper.core.domain import ZONE_LABEL, Names
from fleetkeeper.core.views import NodeView
from fleetkeeper.lifecycle.config import BudgetConfig, Limit
from fleetkeeper.lifecycle.keys import HealthKeys, PreflightFactKeys, RecordKeys

KINDS = ("quarantine", "drain", "terminate", "retest", "team-replace", "gang-drain")


def scopes_of(node: NodeView, names: Names, cfg: BudgetConfig) -> tuple[str, ...]:
    out = ["cluster"]
    if node.labels.get(ZONE_LABEL):
        out.append(f"zone:{node.labels[ZONE_LABEL]}")
    if node.labels.get(names.rack):
        out.append(f"rack:{node.labels[names.rack]}")
    for key in cfg.labels:
        if node.labels.get(key):
            out.append(f"label:{key}={node.labels[key]}")
    return tuple(out)


def limit_of(scope: str, cfg: BudgetConfig) -> Limit:
    kind, _, rest = scope.partition(":")
    if kind == "label":
        return cfg.labels[rest.split("=", 1)[0]]
    return {"cluster": cfg.cluster, "zone": cfg.zone, "rack": cfg.rack}[kind]


def _f(s: str | None) -> float:
    try:
        return float(s) if s else 0.0
    except ValueError:
        return 0.0


def disrupted_since(node: NodeView, names: Names) -> float | None:
    """When this node's disruption began, per the cluster's record, or None when it is in service.

    Out of service: the quarantine taint (health or a retiring lifecycle), or the preflight gate on a node
    that had been validated before and was taken out by a periodic re-test. A joining node's first
    validation is not a disruption (it never was capacity), and a repaired node handed back to the gate
    has released its unit (as it always did: the waiting faults get it)."""
    a = node.annotations
    if node.taint(names.quarantine) is not None:
        return _f(a.get(HealthKeys(names).since)) or _f(a.get(RecordKeys(names).since)) or 1.0
    pk = PreflightFactKeys(names)
    if node.taint(pk.gate) is not None and pk.validated_at in a and a.get(HealthKeys(names).state) != "validating":
        return _f(a.get(pk.gated_at)) or 1.0
    return None


@dataclass(frozen=True)
class InFlight:
    """One admitted action not yet visible in the cache."""

    node: str
    kind: str
    at: float
    scopes: tuple[str, ...]
    gang: str = ""
    dry_run: bool = False


@dataclass
class Snapshot:
    totals: dict[str, int] = field(default_factory=dict)  # scope -> nodes
    out: dict[str, set[str]] = field(default_factory=dict)  # scope -> nodes out of service
    since: dict[str, float] = field(default_factory=dict)  # node -> when its disruption began
    scopes: dict[str, tuple[str, ...]] = field(default_factory=dict)  # node -> its scopes
    unit: dict[str, str] = field(default_factory=dict)  # node -> its gang repair window (one unit for all)

    def units(self, nodes: Iterable[str]) -> int:
        return len({self.unit.get(n, n) for n in nodes})

    def used(self, scope: str) -> int:
        return self.units(self.out.get(scope, ()))


def snapshot(nodes: Iterable[NodeView], names: Names, cfg: BudgetConfig,
             selected: Callable[[NodeView], bool] = lambda n: True) -> Snapshot:
    snap = Snapshot()
    for n in nodes:
        if not selected(n):
            continue
        scopes = scopes_of(n, names, cfg)
        snap.scopes[n.name] = scopes
        for s in scopes:
            snap.totals[s] = snap.totals.get(s, 0) + 1
        since = disrupted_since(n, names)
        if since is not None and not n.deleting:
            snap.since[n.name] = since
            window = n.annotations.get(RecordKeys(names).gang)
            if window:
                snap.unit[n.name] = "window:" + window
            for s in scopes:
                snap.out.setdefault(s, set()).add(n.name)
    return snap


@dataclass(frozen=True)
class Verdict:
    admitted: bool
    over: tuple[str, ...] = ()  # scopes (or "window") that would be exceeded
    free: bool = False  # the node already holds budget
    usage: tuple[tuple[str, int, int | None], ...] = ()  # (scope, used incl. in-flight, limit)

    def explain(self) -> str:
        use = ", ".join(f"{s} {u}/{'-' if lim is None else lim}" for s, u, lim in self.usage)
        if self.free:
            return f"budget: already counted ({use})"
        if self.admitted:
            return f"budget: admitted ({use})"
        return f"budget: used up in {', '.join(self.over)} ({use})"


def usage(snap: Snapshot, inflight: Mapping[str, InFlight], cfg: BudgetConfig, now: float
          ) -> tuple[dict[str, int], int]:
    """(scope -> nodes out of service including in-flight admissions, new disruptions within the window)."""
    used = {s: snap.units(v) for s, v in snap.out.items()}
    starts: dict[str, float] = {}  # unit -> when it began (a window's nodes began together: one start)
    for n, t in snap.since.items():
        u = snap.unit.get(n, n)
        starts[u] = min(starts.get(u, t), t)
    recent = sum(1 for t in starts.values() if t > 1.0 and now - t < cfg.window)
    for name, f in inflight.items():
        if name in snap.since:
            continue
        for s in f.scopes:
            used[s] = used.get(s, 0) + 1
        if now - f.at < cfg.window:
            recent += 1
    return used, recent


def admit(node: str, scopes: tuple[str, ...], snap: Snapshot, inflight: Mapping[str, InFlight],
          cfg: BudgetConfig, now: float) -> Verdict:
    """May ``node`` be taken out of service now? Pure."""
    used, recent = usage(snap, inflight, cfg, now)
    rows = tuple((s, used.get(s, 0), limit_of(s, cfg).limit(snap.totals.get(s, 0) or 1)) for s in scopes)
    if node in snap.since or node in inflight:
        return Verdict(True, free=True, usage=rows)
    over = [s for s, u, lim in rows if lim is not None and u + 1 > lim]
    if cfg.max_new_per_window is not None and recent + 1 > cfg.max_new_per_window:
        over.append("window")
    return Verdict(not over, tuple(over), usage=rows)


class Ledger:
    """The actions admitted in this process and not yet seen in the cache: the in-flight input of
    :func:`admit`, shared by every component of one manager (one per manager; see :func:`shared`).
    Admission holds :attr:`lock` from the verdict to :meth:`add`, so two components never take the
    last unit of budget twice."""

    def __init__(self) -> None:
        self.lock = asyncio.Lock()
        self._items: dict[str, InFlight] = {}

    def view(self) -> dict[str, InFlight]:
        return dict(self._items)

    def add(self, f: InFlight) -> None:
        self._items[f.node] = f

    def drop(self, node: str) -> None:
        self._items.pop(node, None)

    def settle(self, snap: Snapshot, now: float, ttl: float = 120.0) -> None:
        """Forget admissions the cache now shows (they are counted from the record), dry-run ones after the
        window, and real ones whose write never showed after ``ttl`` (the write failed: decided again)."""
        for name, f in list(self._items.items()):
            if name in snap.since and not f.dry_run:
                del self._items[name]
            elif now - f.at > ttl and not f.dry_run:
                del self._items[name]

    def __len__(self) -> int:
        return len(self._items)


@dataclass
class SharedBudget:
    """The budget configuration and ledger every component of one manager uses."""

    cfg: BudgetConfig = field(default_factory=BudgetConfig)
    ledger: Ledger = field(default_factory=Ledger)
    pinned: bool = False  # set by the lifecycle configuration: the health policy's budget no longer applies

    def configure(self, cfg: BudgetConfig, *, pin: bool = False) -> None:
        if pin or not self.pinned:
            self.cfg = cfg
            self.pinned = self.pinned or pin


class Admitter:
    """Admission of several actions in one decision, in order: each admitted one counts against the next
    (a local in-flight list on top of the ledger's), as if already in flight. Pure; the caller adds
    :attr:`added` to the ledger (under its lock) when it acts on them, and drops them when done."""

    def __init__(self, snap: Snapshot, inflight: Mapping[str, InFlight], cfg: BudgetConfig, now: float,
                 kind: str, *, dry_run: bool = False):
        self.snap, self.inflight, self.cfg, self.now = snap, dict(inflight), cfg, now
        self.kind, self.dry_run = kind, dry_run
        self.added: dict[str, InFlight] = {}
        self.verdicts: dict[str, Verdict] = {}

    def __call__(self, node: str, scopes: tuple[str, ...] | None = None) -> Verdict:
        scopes = scopes or self.snap.scopes.get(node) or ("cluster",)
        v = admit(node, scopes, self.snap, self.inflight, self.cfg, self.now)
        self.verdicts[node] = v
        if v.admitted and not v.free:
            f = InFlight(node, self.kind, self.now, scopes, dry_run=self.dry_run)
            self.inflight[node] = self.added[node] = f
        return v
