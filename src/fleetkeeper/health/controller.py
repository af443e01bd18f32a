"""The remediation controller: reads Node conditions (from this agent or
node-problem-detector), decides with :mod:`fleetkeeper.health.decide`, and
applies the ladder with budgets, dry-run, Events and metrics.

All state lives on the Node (taint ``<domain>/quarantine`` and
``<domain>/health-*`` annotations), so a controller killed in the middle of a
drain continues from the cluster's state: a node already tainted is not
re-admitted against the budget, pods already evicted are gone, a node
already deleted is not deleted again.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import re
from collections import defaultdict
from dataclasses import dataclass, field

from fleetkeeper.core import errors
from fleetkeeper.core.controller import Controller, Result
from fleetkeeper.core.events import node_ref
from fleetkeeper.core.faults import FaultPlan, default_fault_file
from fleetkeeper.core.kube import CONFIGMAPS, NODES
from fleetkeeper.core.manager import Manager
from fleetkeeper.core.ratelimit import TokenBucket
from fleetkeeper.core.views import NodeView, PodView
from fleetkeeper.health.actions import LOCAL_ACTIONS, new_request
from fleetkeeper.health.decide import (
    FleetStats,
    Keys,
    Plan,
    admit,
    evictable,
    fleet_stats,
    history_add,
    scopes_of,
    selected,
    storm_threshold,
    watched_types,
)
from fleetkeeper.health.metrics import NODE_STATES, AgentMetrics, RemediationMetrics
from fleetkeeper.health.policy import Policy, load_policy
from fleetkeeper.machines.actuator import MachineActuator
from fleetkeeper.machines.config import build_provider, load_config

log = logging.getLogger("fleetkeeper.health")

CONFIGMAP = "fleetkeeper-health"
STATE_CONFIGMAP = "fleetkeeper-health-state"
STORM_UNTIL_KEY = "storm-until"
FLAPS_KEY = "flaps"
POLICY_KEY = "policy.yaml"
MACHINES_CONFIGMAP = "fleetkeeper-machines"
_LABEL_VALUE = re.compile(r"[^A-Za-z0-9_.-]")


def taint_value(text: str) -> str:
    v = _LABEL_VALUE.sub("-", text)[:63].strip("-_.")
    return v or "unhealthy"


@dataclass
class HealthOptions:
    policy: Policy | None = None  # None: the ConfigMap's, else defaults
    simulate: bool | None = None  # run simulated agents for KWOK nodes (None: the ConfigMap's flag)
    fault_file: str | None = None
    sim_interval: float = 2.0
    sim_heartbeat: float = 300.0
    machines: MachineActuator | None = None  # None: from the fleetkeeper-machines ConfigMap and --machine-provider
    stats_interval: float = 1.0
    state_interval: float = 30.0  # flap history written at most this often (when it changed)
    reload_interval: float = 30.0
    workers: int = 16  # reconciles in flight: each action is 2-3 API round trips; admission is serialised


class FlapTracker:
    """Transitions of watched conditions per node (from informer updates).

    A transition is identified by what the cluster records: (type, new status, the resourceVersion of
    the write that made it). Every replica watching the nodes, and a controller restarted from the
    saved history, then agree on which transitions happened, and merging two histories never counts
    one twice. Its time is the condition's lastTransitionTime (local time when a writer leaves it out).
    (A transition first seen through a relist carries the listed object's resourceVersion; a replica
    that saw it live would count it again, once.)"""

    def __init__(self) -> None:
        self._t: dict[str, dict[tuple[str, str, str], float]] = defaultdict(dict)
        self.dirty = False  # changed since the last export

    def _add(self, node: str, key: tuple[str, str, str], t: float) -> bool:
        seen = self._t[node]
        if key in seen:
            return False
        seen[key] = t
        if len(seen) > 64:  # bounded: drop the oldest
            del seen[min(seen, key=seen.__getitem__)]
        return True

    def observe(self, node: str, old: NodeView | None, new: NodeView | None, watched: set[str], now: float) -> bool:
        if old is None or new is None:
            if new is None and self._t.pop(node, None) is not None:
                self.dirty = True
            return False
        before = {c.type: c.status for c in old.conditions if c.type in watched}
        changed = False
        for c in new.conditions:
            if c.type in watched and c.type in before and before[c.type] != c.status:
                changed = self._add(node, (c.type, c.status, new.resource_version), c.last_transition or now) \
                    or changed
        self.dirty = self.dirty or changed
        return changed

    def nodes(self) -> list[str]:
        return [n for n, seen in self._t.items() if seen]

    def flapping(self, node: str, now: float, transitions: int, window: float) -> bool:
        seen = self._t.get(node)
        return bool(seen) and sum(1 for t in seen.values() if now - t < window) >= transitions

    def export(self, now: float, window: float, keep: int, max_nodes: int = 2000) -> dict[str, list[list]]:
        """The transitions still inside ``window``, the last ``keep`` per node (all that can matter),
        for the nodes with the most of them; small enough for a ConfigMap: ``[[time, type, status, rv]]``."""
        out: dict[str, list[list]] = {}
        for n, seen in self._t.items():
            recent = sorted((t, k) for k, t in seen.items() if now - t < window)[-keep:]
            if recent:
                out[n] = [[round(t, 3), k[0], k[1], k[2]] for t, k in recent]
        if len(out) > max_nodes:
            out = dict(sorted(out.items(), key=lambda kv: -len(kv[1]))[:max_nodes])
        return out

    def restore(self, data: object) -> None:
        """Merge transitions recorded before a restart (or by another leader) with those seen since.
        Raises ValueError, merging nothing, when ``data`` is not what :meth:`export` writes."""
        if not isinstance(data, dict) or not all(
                isinstance(v, list) and all(isinstance(x, list) and len(x) == 4 for x in v) for v in data.values()):
            raise ValueError("not a mapping of node to [[time, type, status, resourceVersion], ...]")
        try:
            parsed = [(node, str(typ), str(status), str(rv), float(t)) for node, items in data.items()
                      for t, typ, status, rv in items]
        except (TypeError, ValueError) as exc:
            raise ValueError(f"a transition time is not a number ({exc})") from None
        for node, typ, status, rv, t in parsed:
            self._add(node, (typ, status, rv), t)

    def merge(self, other: "FlapTracker") -> None:
        for node, seen in other._t.items():
            for key, t in seen.items():
                self._add(node, key, t)


def parse_state(data: dict[str, str]) -> tuple[float, FlapTracker, list[str]]:
    """The state ConfigMap's data: the storm cooldown's end, the flap history, and what was unreadable
    (each part that cannot be read is left out and named, never fatal)."""
    problems: list[str] = []
    raw = data.get(STORM_UNTIL_KEY, "")
    try:
        until = float(raw) if raw else 0.0
    except ValueError:
        until = 0.0
        problems.append(f"{STORM_UNTIL_KEY}={raw!r} is not a time")
    flaps = FlapTracker()
    try:
        flaps.restore(json.loads(data.get(FLAPS_KEY) or "{}"))
    except ValueError as exc:  # json.JSONDecodeError is one
        problems.append(f"{FLAPS_KEY}: {exc}")
    return until, flaps, problems


@dataclass
class Remediator:
    mgr: Manager
    policy: Policy
    machines: MachineActuator
    stats_interval: float = 1.0
    workers: int = 16
    state_interval: float = 30.0
    metrics: RemediationMetrics = field(init=False)

    def __post_init__(self) -> None:
        self.names = self.mgr.names
        self.keys = Keys(self.names)
        self.clock = self.mgr.clock
        self.kube = self.mgr.kube
        self.recorder = self.mgr.recorder("health")
        self.metrics = RemediationMetrics(self.mgr.registry)
        self.nodes = self.mgr.node_informer()
        self.pods = self.mgr.pod_informer()
        self.flaps = FlapTracker()
        self._pods_by_node: dict[str, dict[str, PodView]] = defaultdict(dict)
        self.controller = Controller("health", self.reconcile, metrics=self.mgr.metrics, clock=self.clock,
                                     workers=self.workers)
        self._lock = asyncio.Lock()  # budget admission is serialised
        self._stats: FleetStats | None = None
        self._stats_at = -1e9
        self._inflight: dict[str, float] = {}  # admitted, not yet seen tainted in the cache
        self._dry_quarantined: set[str] = set()
        self._admissions: list[float] = []
        self._storm_until = 0.0
        self._noted: set[tuple[str, str]] = set()
        self._evict_bucket = TokenBucket(self.policy.drain.evictions_per_second,
                                         max(1, int(self.policy.drain.evictions_per_second)), self.clock)
        self._watched = watched_types(self.policy)
        self.nodes.add_handler(self._on_node)
        self.pods.add_handler(self._on_pod)

    # --- informer handlers -----------------------------------------------
    @property
    def dry_run(self) -> bool:
        return self.mgr.settings.dry_run or self.policy.dry_run

    def _on_node(self, typ: str, key: str, old: NodeView | None, new: NodeView | None) -> None:
        self.flaps.observe(key, old, new, self._watched, self.clock.now())
        if new is not None and new.taint(self.names.quarantine) is not None:
            self._inflight.pop(key, None)
        if new is None:
            self._pods_by_node.pop(key, None)
            self._inflight.pop(key, None)
            self._dry_quarantined.discard(key)
            return
        if selected(new, self.policy):
            self.controller.enqueue(key)

    def _on_pod(self, typ: str, key: str, old: PodView | None, new: PodView | None) -> None:
        pv = new or old
        if pv is None or not pv.node:
            return
        if old is not None and old.node and old.node != pv.node:
            self._pods_by_node[old.node].pop(key, None)
        if new is None:
            self._pods_by_node[pv.node].pop(key, None)
        else:
            self._pods_by_node[pv.node][key] = new
        nv = self.nodes.get(pv.node)
        if nv is not None and nv.taint(self.names.quarantine) is not None:
            self.controller.enqueue(pv.node)

    def pods_on(self, node: str) -> list[PodView]:
        return list(self._pods_by_node.get(node, {}).values())

    # --- fleet view ----------------------------------------------------------
    def stats(self, force: bool = False) -> FleetStats:
        mono = self.clock.monotonic()
        if force or self._stats is None or mono - self._stats_at >= self.stats_interval:
            now = self.clock.now()
            views = self.nodes.items()
            left = {n.name: sum(len(x) for x in evictable(self.pods_on(n.name)))
                    for n in views if n.taint(self.names.quarantine) is not None}
            st = fleet_stats(views, left, self.policy, self.names, now, self._admissions)
            # admitted but not yet visible in the cache (and dry-run "quarantines") count too
            extra = [n for n in list(self._inflight) + list(self._dry_quarantined)
                     if (v := self.nodes.get(n)) is not None and v.taint(self.names.quarantine) is None]
            for n in extra:
                for s in scopes_of(self.nodes.get(n), self.names):  # type: ignore[arg-type]
                    st.disrupted[s] = st.disrupted.get(s, 0) + 1
            self._stats, self._stats_at = st, mono
            self._admissions = [t for t in self._admissions if now - t < max(self.policy.budget.window,
                                                                                 self.policy.storm.window)]
        return self._stats  # type: ignore[return-value]

    def publish(self) -> FleetStats:
        st = self.stats(force=True)
        m = self.metrics
        for s in NODE_STATES:
            m.nodes.labels(s).set(st.states.get(s, 0))
        for scope in set(st.totals) | {"cluster"}:
            m.budget_used.labels(scope).set(round(st.used_ratio(scope, self.policy), 4))
            over = bool(st.wanting.get(scope)) and bool(admit(st, [scope], self.policy)) and \
                "window" not in admit(st, [scope], self.policy)
            m.budget_exhausted.labels(scope).set(1 if over else 0)
        if st.wanting.get("cluster") and "window" in admit(st, ["cluster"], self.policy):
            m.budget_exhausted.labels("window").set(1)
        else:
            m.budget_exhausted.labels("window").set(0)
        m.storm.set(1 if self.clock.now() < self._storm_until else 0)
        return st

    async def stats_loop(self) -> None:
        while True:
            try:
                self.publish()
            except Exception:  # noqa: BLE001
                log.exception("health stats failed")
            await self.clock.sleep(max(0.5, self.stats_interval))

    # --- reconcile -----------------------------------------------------------
    async def reconcile(self, key: str) -> Result | None:
        from fleetkeeper.health.decide import decide_node

        node = self.nodes.get(key)
        if node is None:
            return None
        now = self.clock.now()
        fl = self.policy.flapping
        plan = decide_node(node, self.pods_on(key), self.policy, self.names, now,
                           flapping=self.flaps.flapping(key, now, fl.transitions, fl.window))
        if plan.kind in ("noop",):
            self._noted = {x for x in self._noted if x[0] != key} if any(x[0] == key for x in self._noted) else \
                self._noted
            return None
        return await self.apply(plan, node)

    async def _note(self, node: NodeView, reason: str, note: str, type_: str = "Normal") -> None:
        """An Event once per (node, reason) episode; the episode ends when the node is healthy again."""
        if (node.name, reason) in self._noted:
            return
        self._noted.add((node.name, reason))
        await self.recorder.emit(node_ref(node.name, node.uid), reason, note, type_=type_)

    def _count(self, action: str, result: str) -> None:
        self.metrics.actions.labels(action, result).inc()

    async def apply(self, plan: Plan, node: NodeView) -> Result | None:
        p = plan
        if p.kind == "wait":
            if p.wait == "validation":
                pass
            return Result(requeue_after=p.requeue_after) if p.requeue_after else None
        if p.kind == "note":
            await self._note(node, "HealthProblem",
                             f"{p.why} ({p.remedy}); policy records it and takes no action", "Warning")
            return None
        if p.kind == "quarantine":
            return await self._quarantine(p, node)
        if p.kind == "escalate":
            return await self._mutate(node, p, "escalate", "Escalated",
                                      f"{p.why}: escalating to {p.action} (fixable by {p.remedy})",
                                      annotations=self._marker_annotations(p, node, keep_since=True))
        if p.kind == "evict":
            return await self._evict(p, node)
        if p.kind == "mark_drained":
            return await self._mutate(node, p, "evict", "Drained",
                                      f"all pods evicted; node stays quarantined until {p.remedy} fixes it "
                                      f"and its conditions clear",
                                      annotations={self.keys.drained: str(int(self.clock.now()))})
        if p.kind == "terminate":
            return await self._terminate(p, node)
        if p.kind == "request_action":
            req = new_request(LOCAL_ACTIONS[p.remedy], node.name, node.uid, self.clock.now(),
                              self.policy.actions.timeout)
            return await self._mutate(node, p, "request", "ActionRequested",
                                      f"{p.why} (nonce {req.nonce}); escalating to replace if it fails or the fault "
                                      f"is still there in {self.policy.actions.timeout:.0f}s",
                                      annotations={self.keys.request: req.dumps(), self.keys.result: None},
                                      warn=True)
        if p.kind == "return":
            return await self._mutate(
                node, p, "return", "ReturnedToValidation",
                f"{p.why}; handing the node to the preflight gate before it takes work again",
                remove_taints=(self.names.quarantine,),
                add_taint={"key": self.names.preflight, "value": "pending", "effect": "NoSchedule"},
                labels={self.names.preflight: "pending"},
                annotations={**{k: None for k in self.keys.all_state()}, self.keys.state: "validating"})
        if p.kind == "mark_cleared":
            return await self._mutate(node, p, "return", "ConditionsCleared", f"{p.why} "
                                      f"{self.policy.return_to_service.hold:.0f}s before return",
                                      annotations={self.keys.cleared: str(int(self.clock.now()))},
                                      requeue=p.requeue_after)
        if p.kind == "unmark_cleared":
            return await self._mutate(node, p, "return", "ConditionsReturned", p.why,
                                      annotations={self.keys.cleared: None}, warn=True)
        if p.kind == "release":
            self._noted = {x for x in self._noted if x[0] != node.name}
            return await self._mutate(node, p, "release", "ReturnedToService", p.why,
                                      remove_taints=(self.names.quarantine,),
                                      annotations={k: None for k in self.keys.all_state()})
        log.warning("unknown plan %s for %s", p.kind, node.name)
        return None

    def _marker_annotations(self, p: Plan, node: NodeView, keep_since: bool = False) -> dict[str, str | None]:
        now = self.clock.now()
        types = sorted({pr.type for pr in p.problems} |
                       (set((node.annotations.get(self.keys.types) or "").split(",")) - {""} if keep_since else set()))
        ann: dict[str, str | None] = {
            self.keys.action: p.action, self.keys.remedy: p.remedy,
            self.keys.reason: "; ".join(pr.label for pr in p.problems)[:500] or p.why,
            self.keys.types: ",".join(types),
            self.keys.cleared: None, self.keys.state: None,
        }
        if not keep_since:
            ann[self.keys.since] = str(int(now))
            ann[self.keys.drained] = None
        return ann

    # --- state that must survive a restart -------------------------------------
    # Everything else is read back from the nodes (taints and annotations). The storm
    # cooldown and the flap detector's recent transitions are on no node, so they live in a
    # small ConfigMap, written when a storm starts and when the transitions changed (at most
    # every state_interval). Losing it (no RBAC, API down) only shortens a pause or delays
    # a flapping verdict after a restart.
    def _state_ref(self) -> tuple[str, str]:
        return STATE_CONFIGMAP, self.mgr.settings.namespace

    async def load_state(self) -> None:
        name, ns = self._state_ref()
        try:
            cm = await self.kube.get_or_none(CONFIGMAPS, name, ns)
        except errors.FleetkeeperError as exc:
            log.warning("health state %s/%s unreadable (%s); starting without it", ns, name, exc)
            return
        until, flaps, problems = parse_state((cm or {}).get("data") or {})
        for p in problems:
            log.warning("health state %s/%s: %s; that part starts empty", ns, name, p)
        if until > self.clock.now():
            self._storm_until = until
            self.metrics.storm.set(1)
            log.warning("fault-storm cooldown carried over from before the restart: %.0fs left",
                        until - self.clock.now())
        self.flaps.merge(flaps)

    async def _save_state(self) -> None:
        if self.dry_run:
            return
        name, ns = self._state_ref()
        fl = self.policy.flapping
        flaps = self.flaps.export(self.clock.now(), fl.window, fl.transitions)
        self.flaps.dirty = False
        body = {"apiVersion": "v1", "kind": "ConfigMap",
                "metadata": {"name": name, "namespace": ns, "labels": {self.names.managed_by: "health"}},
                "data": {STORM_UNTIL_KEY: str(int(self._storm_until)),
                         FLAPS_KEY: json.dumps(flaps, separators=(",", ":"), sort_keys=True)}}
        try:
            await self.kube.apply(CONFIGMAPS, body)
        except errors.FleetkeeperError as exc:
            self.flaps.dirty = True
            log.warning("could not record the health state in %s/%s (%s); a restart would forget it", ns, name, exc)

    async def state_loop(self) -> None:
        """Write the flap history when it changed, at most every ``state_interval`` (transitions are rare:
        each is already an agent write)."""
        while True:
            await self.clock.sleep(self.state_interval)
            if self.flaps.dirty:
                try:
                    await self._save_state()
                except Exception:  # noqa: BLE001 - never take remediation down with the bookkeeping
                    log.exception("saving the health state failed")

    async def run(self) -> None:
        await self.load_state()
        await asyncio.gather(self.controller.run(), self.state_loop())

    async def _quarantine(self, p: Plan, node: NodeView) -> Result | None:
        now = self.clock.now()
        async with self._lock:
            if self._storm_until > now:
                await self._note(node, "RemediationPaused",
                                 f"{p.why}: a fault storm paused new quarantines until "
                                 f"{self._storm_until - now:.0f}s from now", "Warning")
                self._count("quarantine", "budget")
                return Result(requeue_after=min(30.0, self._storm_until - now + 0.5))
            st = self.stats()
            total = st.totals.get("cluster", 0)
            # the stats may predate this burst (refreshed every stats_interval): this node and every
            # admission since count as onsets too, so a burst inside one refresh is still seen as a storm
            onsets = len(st.onset_nodes | {node.name})
            if onsets >= storm_threshold(total, self.policy) and total:
                self._storm_until = now + self.policy.storm.cooldown
                self.metrics.storm.set(1)
                await self._save_state()
                log.warning("fault storm: %d nodes faulted within %.0fs (threshold %d); pausing new quarantines "
                            "for %.0fs", onsets, self.policy.storm.window, storm_threshold(total, self.policy),
                            self.policy.storm.cooldown)
                await self._note(node, "RemediationPaused",
                                 f"{p.why}: fault storm ({onsets} nodes within "
                                 f"{self.policy.storm.window:.0f}s); pausing new quarantines for "
                                 f"{self.policy.storm.cooldown:.0f}s", "Warning")
                self._count("quarantine", "budget")
                return Result(requeue_after=30.0)
            over = admit(st, scopes_of(node, self.names), self.policy)
            if over:
                for s in over:
                    self.metrics.budget_exhausted.labels(s).set(1)
                await self._note(node, "BudgetExhausted",
                                 f"{p.why} wants {p.action} (fixable by {p.remedy}), but the remediation budget "
                                 f"of {', '.join(over)} is used up; waiting", "Warning")
                self._count("quarantine", "budget")
                return Result(requeue_after=5.0)
            # admitted: count it now, before the write, so concurrent reconciles see it
            for s in scopes_of(node, self.names):
                st.disrupted[s] = st.disrupted.get(s, 0) + 1
            st.new_in_window += 1
            st.onset_nodes.add(node.name)
            self._admissions.append(now)
            if self.dry_run:
                self._dry_quarantined.add(node.name)
            else:
                self._inflight[node.name] = now
        try:
            res = await self._quarantine_write(p, node)
        except BaseException:
            # not written: undo the admission so the retry is not counted twice
            self._inflight.pop(node.name, None)
            if now in self._admissions:
                self._admissions.remove(now)
            self._stats_at = -1e9
            raise
        if not self.dry_run and p.problems:
            since = max(pr.since for pr in p.problems)
            if since > 0:
                self.metrics.latency.observe(max(0.0, now - since))
        return res

    async def _quarantine_write(self, p: Plan, node: NodeView) -> Result | None:
        return await self._mutate(
            node, p, "quarantine", "Quarantined",
            f"{p.why}: tainted {self.names.quarantine}:NoSchedule; ladder target {p.action}; "
            f"fixable by {p.remedy}" + (" (needs hardware replacement)" if p.remedy == "replace" else ""),
            add_taint={"key": self.names.quarantine, "value": taint_value(p.problems[0].label if p.problems else p.why),
                       "effect": "NoSchedule"},
            annotations=self._marker_annotations(p, node), warn=True)

    async def _mutate(self, node: NodeView, p: Plan, action: str, reason: str, note: str, *,
                      add_taint: dict | None = None, remove_taints: tuple[str, ...] = (),
                      labels: dict[str, str | None] | None = None, annotations: dict[str, str | None] | None = None,
                      warn: bool = False, requeue: float | None = None) -> Result | None:
        """Read the live node, change taints/labels/annotations, write it back with
        a resourceVersion precondition (one write), then Event + metric + log."""
        now = self.clock.now()
        if self.dry_run:
            if (node.name, f"dry:{action}:{p.action}") not in self._noted:
                self._noted.add((node.name, f"dry:{action}:{p.action}"))
                log.info("dry-run: %s %s: %s", action, node.name, note)
                await self.recorder.emit(node_ref(node.name, node.uid), f"DryRun{reason}", f"would: {note}",
                                         type_="Normal")
                self._count(action, "dry_run")
            return None
        try:
            live = await self.kube.get(NODES, node.name)
        except errors.NotFound:
            return None
        meta, spec = live["metadata"], live.get("spec") or {}
        if meta.get("resourceVersion") != node.resource_version:
            # the cache is behind the live node (our own last write, or an agent's): decide again on
            # fresh state instead of acting twice
            raise errors.Temporary(f"{node.name}: cache behind the live object; deciding again", 0.2)
        taints = [t for t in spec.get("taints") or [] if t.get("key") not in remove_taints]
        if add_taint:
            taints = [t for t in taints if t.get("key") != add_taint["key"]] + [add_taint]
        ann = dict(annotations or {})
        ann[self.keys.history] = history_add((meta.get("annotations") or {}).get(self.keys.history), now,
                                             f"{reason}: {note}")
        body: dict = {"metadata": {"resourceVersion": meta["resourceVersion"], "annotations": ann}}
        if add_taint or remove_taints:
            body["spec"] = {"taints": taints or None}
        if labels:
            body["metadata"]["labels"] = labels
        try:
            await self.kube.patch(NODES, node.name, body)
        except errors.Conflict:
            self._count(action, "error")
            raise errors.Temporary(f"{node.name} changed while acting; re-reading", 0.2)
        except errors.NotFound:
            return None
        except errors.ApiError:
            self._count(action, "error")
            raise
        self._count(action, "success")
        log.info("%s %s: %s", action, node.name, note)
        await self.recorder.emit(node_ref(node.name, node.uid), reason, note, type_="Warning" if warn else "Normal")
        return Result(requeue_after=requeue) if requeue else None

    async def _evict(self, p: Plan, node: NodeView) -> Result | None:
        evicted, blocked, errs = 0, [], 0
        for key in p.pods:
            if not self._evict_bucket.take():
                self._count("evict", "blocked")
                return Result(requeue_after=max(0.2, self._evict_bucket.wait_time()))
            ns, name = key.split("/", 1)
            try:
                await self.kube.evict(ns, name, dry_run=self.dry_run)
                evicted += 1
                self._count("evict", "dry_run" if self.dry_run else "success")
            except errors.NotFound:
                pass
            except errors.TooManyRequests as exc:
                blocked.append(key)
                self._count("evict", "blocked")
                log.info("eviction of %s from %s blocked: %s", key, node.name, exc.message)
            except errors.ServerError as exc:  # e.g. more than one PDB selects the pod
                blocked.append(key)
                self._count("evict", "error")
                log.warning("eviction of %s failed: %s", key, exc)
            except errors.ApiError as exc:
                errs += 1
                self._count("evict", "error")
                log.warning("eviction of %s failed: %s", key, exc)
        if evicted:
            verb = "would evict" if self.dry_run else "evicted"
            await self.recorder.emit(node_ref(node.name, node.uid), "Evicting",
                                     f"{verb} {evicted} pod(s) through the Eviction API ({p.action}, fixable by "
                                     f"{p.remedy})", type_="Warning")
            log.info("%s %d pod(s) from %s", verb, evicted, node.name)
        if blocked:
            since = float(node.annotations.get(self.keys.since) or self.clock.now())
            left = since + self.policy.drain.deadline - self.clock.now()
            await self._note(node, "EvictionBlocked",
                             f"{len(blocked)} pod(s) protected by a PodDisruptionBudget ({', '.join(blocked[:5])}); "
                             f"retrying every {self.policy.drain.retry_interval:.0f}s"
                             + (f"; terminating anyway in {left:.0f}s (drain deadline)"
                                if p.action == "terminate" or self.policy.drain.terminate_at_deadline else ""),
                             "Warning")
        if self.dry_run:
            return None
        return Result(requeue_after=p.requeue_after if blocked or errs else 1.0)

    async def _terminate(self, p: Plan, node: NodeView) -> Result | None:
        """The machine goes through the machine layer: its ledger (in the cluster) keeps the hourly
        limit and never acts on a machine twice; the Node is deleted only once the machine is gone."""
        why = (f"{p.why} (fixable by {p.remedy})" + ("; a PodDisruptionBudget still blocked eviction"
                                                     if p.deadline_passed else ""))
        limit = self.policy.terminate.max_per_hour
        step = await self.machines.act("terminate", node.name, why, dry_run=self.dry_run, uid=node.uid,
                                       max_per_hour=limit,
                                       reason="TerminatedAtDeadline" if p.deadline_passed else "Terminated")
        result = "success" if step.fresh else {"limited": "budget", "dry_run": "dry_run", "refused": "error"}.get(step.kind)
        if result:
            self._count("terminate", result)
        if step.kind == "refused":
            return Result(requeue_after=3600.0)
        return Result(requeue_after=step.requeue_after) if step.requeue_after else None


async def load_from_configmap(mgr: Manager) -> tuple[Policy, bool]:
    cm = await mgr.kube.get_or_none(CONFIGMAPS, CONFIGMAP, mgr.settings.namespace)
    data = (cm or {}).get("data") or {}
    source = f"configmap {mgr.settings.namespace}/{CONFIGMAP} key {POLICY_KEY}"
    policy = load_policy(data.get(POLICY_KEY), source)
    sim = str(data.get("simulate", "")).lower() in ("1", "true", "yes")
    return policy, sim


async def machine_actuator(mgr: Manager) -> MachineActuator:
    """The machine provider from ConfigMap fleetkeeper-machines (key machines.yaml) and --machine-provider."""
    cm = await mgr.kube.get_or_none(CONFIGMAPS, MACHINES_CONFIGMAP, mgr.settings.namespace)
    text = ((cm or {}).get("data") or {}).get("machines.yaml")
    cfg = load_config(text, f"configmap {mgr.settings.namespace}/{MACHINES_CONFIGMAP} key machines.yaml",
                      provider=mgr.settings.machine_provider)
    provider = await build_provider(cfg, mgr.kube)
    log.info("machine provider: %s", provider.name)
    return MachineActuator(mgr.kube, provider, cfg, mgr.recorder("machines"), mgr.clock, mgr.registry,
                           mgr.settings.namespace)


async def reload_loop(mgr: Manager, rem: Remediator, interval: float) -> None:
    """Pick up ConfigMap changes; a broken policy keeps the last good one."""
    last_error = ""
    while True:
        await mgr.clock.sleep(interval)
        try:
            policy, _ = await load_from_configmap(mgr)
        except errors.ConfigError as exc:
            if str(exc) != last_error:
                log.error("new health policy rejected, keeping the previous one: %s", exc)
                last_error = str(exc)
            continue
        except errors.FleetkeeperError as exc:
            log.warning("could not read the health policy: %s", exc)
            continue
        last_error = ""
        if policy != rem.policy:
            log.info("health policy reloaded")
            rem.policy = policy
            rem._watched = watched_types(policy)
            for k in rem.nodes.keys():
                rem.controller.enqueue(k)


async def setup(mgr: Manager, options: HealthOptions | None) -> None:
    opts = options or HealthOptions()
    from_cm = opts.policy is None
    policy, sim_flag = (await load_from_configmap(mgr)) if from_cm else (opts.policy, False)
    simulate = opts.simulate if opts.simulate is not None else (
        sim_flag or os.environ.get("FLEETKEEPER_HEALTH_SIMULATE", "") in ("1", "true"))
    machines = opts.machines or await machine_actuator(mgr)
    rem = Remediator(mgr, policy, machines, stats_interval=opts.stats_interval,
                     state_interval=opts.state_interval,
                     workers=opts.workers)
    mgr.health = rem  # type: ignore[attr-defined]  # for the demo and tests in the same process
    mgr.add("health-remediation", rem.run)
    mgr.add("health-stats", rem.stats_loop)
    if from_cm:
        mgr.add("health-policy-reload", lambda: reload_loop(mgr, rem, opts.reload_interval))
    if simulate:
        from fleetkeeper.health.agent import AgentCore, ConditionWriter, SimulatedFleet

        core = AgentCore(ConditionWriter(mgr.kube, dry_run=mgr.settings.dry_run), mgr.clock,
                         heartbeat=opts.sim_heartbeat, metrics=AgentMetrics(mgr.registry))
        from fleetkeeper.health.actions import ActionAgent, ActionKeys, DoneLog
        from fleetkeeper.health.agent import SimulatedActions

        plan = FaultPlan(opts.fault_file or default_fault_file())
        akeys = ActionKeys(mgr.names)
        actor = ActionAgent(mgr.kube, mgr.names, SimulatedActions(plan), DoneLog(None), mgr.clock.now,
                            dry_run=mgr.settings.dry_run)
        fleet = SimulatedFleet(core, plan,
                               lambda: [(n.name, n.gpus) for n in rem.nodes.items()
                                        if n.labels.get("type") == "kwok" and selected(n, rem.policy)],
                               interval=opts.sim_interval,
                               requests=lambda: [(n.name, n.uid, n.annotations) for n in rem.nodes.items()
                                                 if akeys.request in n.annotations and n.labels.get("type") == "kwok"
                                                 and selected(n, rem.policy)],
                               actor=actor)
        mgr.simulated_agents = fleet  # type: ignore[attr-defined]
        mgr.add("health-simulated-agents", fleet.run)
