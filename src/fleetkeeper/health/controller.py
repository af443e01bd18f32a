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
import hashlib
import json
import logging
import os
import re
from collections import defaultdict
from dataclasses import dataclass, field

from fleetkeeper.core import errors
from fleetkeeper.core.applier import Applier, MachineProvider
from fleetkeeper.core.configmap import ConfigMapKey
from fleetkeeper.core.controller import Controller, Result
from fleetkeeper.core.events import node_ref
from fleetkeeper.core.faults import FaultPlan, default_fault_file
from fleetkeeper.core.kube import CONFIGMAPS
from fleetkeeper.core.manager import Manager
from fleetkeeper.core.plan import AddTaint, Event, EvictPod, Plan as Ops, RemoveTaint, SetAnnotation, SetLabel, \
    TerminateMachine
from fleetkeeper.core.views import NodeView, PodView
from fleetkeeper.health.actions import LOCAL_ACTIONS, Request, new_request
from fleetkeeper.health.decide import (
    FleetStats,
    Keys,
    Plan,
    evictable,
    fleet_stats,
    gang_window,
    history_add,
    history_read,
    selected,
    storm_threshold,
    watched_types,
)
from fleetkeeper.health.metrics import NODE_STATES, AgentMetrics, RemediationMetrics
from fleetkeeper.health.policy import Policy, load_policy
from fleetkeeper.lifecycle import budget as bud
from fleetkeeper.lifecycle import machine as lifecycle
from fleetkeeper.lifecycle.controller import shared_budget, shared_provider
from fleetkeeper.lifecycle.gangs import checkpoint_wait, gang_evictions, gang_index
from fleetkeeper.machines.actuator import MachinesProvider
from fleetkeeper.lifecycle.keys import PreflightFactKeys

log = logging.getLogger("fleetkeeper.health")

CONFIGMAP = "fleetkeeper-health"
STATE_CONFIGMAP = "fleetkeeper-health-state"
STORM_UNTIL_KEY = "storm-until"
FLAPS_KEY = "flaps"
POLICY_KEY = "policy.yaml"
ADMISSION_STATS_AGE = 15.0  # admission reads the stats loop's numbers up to this old (never recomputes inline)
EVICTED_EXPECT_S = 60.0  # a pod this process evicted is not evicted again for this long unless the cache sees it go
# a node write's Events are written off the write path; a process killed in between loses them. Each such
# Event is named after its reason and the write's time (its entry in the node's history), and the writes
# younger than this are announced again by the next process (the API server keeps one Event per name)
REANNOUNCE_S = 600.0
WARNING_REASONS = frozenset({"Quarantined", "ActionRequested", "ConditionsReturned"})

ANNOUNCE_RETRY_S = 5.0  # an eviction whose Event could not be written is tried again after this
EVICTION_NOTE_CHARS = 500  # pod names in an eviction's Event, at most this long (the rest counted)


def pod_list(keys: list[str], budget: int = EVICTION_NOTE_CHARS) -> str:
    """``keys`` for an Event's note (it holds 1,000 characters): as many as fit ``budget``, the rest counted
    ("a, b and 3 more"); the first always."""
    named: list[str] = []
    used = 0
    for k in keys:
        if named and used + len(k) > budget:
            break
        named.append(k)
        used += len(k) + 2
    return ", ".join(named) + (f" and {len(keys) - len(named)} more" if len(keys) > len(named) else "")


def _event(reason: str, note: str, at: float) -> Event:
    """A health node write's Event, named after its reason and the write's time (its history entry)."""
    return Event(reason, note, "Warning" if reason in WARNING_REASONS else "Normal", id=f"{reason}@{int(at)}")


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
    provider: MachineProvider | None = None  # None: the manager's (--machine-provider / ConfigMap fleetkeeper-machines)
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
    provider: MachineProvider | None = None
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
        self._pods_by_node = self.mgr.pods_by_node()
        self.controller = Controller("health", self.reconcile, metrics=self.mgr.metrics, clock=self.clock,
                                     workers=self.workers)
        self._lock = asyncio.Lock()  # budget admission is serialised
        self._stats: FleetStats | None = None
        self._admitting = 0  # quarantines being admitted or written
        self._stats_at = -1e9
        # the one disruption budget: its configuration is this policy's budget section; its ledger of
        # admitted actions not yet in the cache is shared with every component of this manager
        self.budget = shared_budget(self.mgr)
        self.budget.configure(self.policy.budget)
        self._bsnap = bud.Snapshot()
        self.provider = shared_provider(self.mgr, self.provider)
        self.applier = Applier(self.kube, self.recorder, component="health", registry=self.mgr.registry,
                               clock=self.clock, dry_run=lambda: self.dry_run, writes_per_second=500.0,
                               evictions_per_second=self.policy.drain.evictions_per_second, provider=self.provider)
        # (node writes: the budget is health's real limit; the bucket only stops a runaway loop, and must not
        # queue a burst of admitted quarantines behind it)
        self.gangs = self.pods.index("gang", gang_index(self.names))
        wkey = self.keys.window
        self.windows = self.nodes.index("repair-window", lambda n: (n.annotations[wkey],) if n.annotations.get(wkey)
                                        else ())
        self._storm_until = 0.0
        self._announced: dict[str, str] = {}  # node -> its history annotation whose Events were announced
        self._noted: set[tuple[str, str]] = set()
        # pods this process evicted, by key: (uid, when). Until the cache shows one going (or EVICTED_EXPECT_S
        # pass), it is not evicted again: a cache behind the API server would count one pod evicted twice
        self._evicted: dict[str, tuple[str, float]] = {}
        self._watched = watched_types(self.policy)
        self.nodes.add_handler(self._on_node)
        self.pods.add_handler(self._on_pod)

    # --- informer handlers -----------------------------------------------
    @property
    def dry_run(self) -> bool:
        return self.mgr.settings.dry_run or self.policy.dry_run

    def _on_node(self, typ: str, key: str, old: NodeView | None, new: NodeView | None) -> None:
        self.flaps.observe(key, old, new, self._watched, self.clock.now())
        if new is None:
            self.budget.ledger.drop(key)
            return
        if selected(new, self.policy):
            self.controller.enqueue(key)

    def _on_pod(self, typ: str, key: str, old: PodView | None, new: PodView | None) -> None:
        pv = new or old
        if pv is None or not pv.node:
            return
        nv = self.nodes.get(pv.node)
        if nv is not None and nv.taint(self.names.quarantine) is not None:
            self.controller.enqueue(pv.node)
            window = nv.annotations.get(self.keys.window)
            if window:  # a node of a repair window drained: the others may now be repaired with it
                for m in self.windows.get(window):
                    self.controller.enqueue(m.name)

    def pods_on(self, node: str) -> list[PodView]:
        return self._pods_by_node.get(node)

    def window_waiting(self, node: NodeView) -> tuple[str, ...]:
        """The other nodes of ``node``'s gang repair window that still have pods to lose."""
        window = node.annotations.get(self.keys.window)
        if not window:
            return ()
        return tuple(m.name for m in self.windows.get(window)
                     if m.name != node.name and not m.deleting and any(evictable(self.pods_on(m.name))))

    # --- fleet view ----------------------------------------------------------
    def stats(self, force: bool = False, max_age: float | None = None) -> FleetStats:
        """The fleet's numbers, recomputed (a pass over every node) when older than ``max_age`` (default
        ``stats_interval``)."""
        mono = self.clock.monotonic()
        if force or self._stats is None or mono - self._stats_at >= (self.stats_interval if max_age is None
                                                                       else max_age):
            now = self.clock.now()
            views = self.nodes.items()
            left = {n.name: sum(len(x) for x in evictable(self.pods_on(n.name)))
                    for n in views if n.taint(self.names.quarantine) is not None}
            inflight = self.budget.ledger.view()
            st = fleet_stats(views, left, self.policy, self.names, now,
                             [f.at for f in inflight.values() if f.node not in left])
            self._bsnap = bud.snapshot(views, self.names, self.budget.cfg, lambda n: selected(n, self.policy))
            self.budget.ledger.settle(self._bsnap, now)
            used, _ = bud.usage(self._bsnap, self.budget.ledger.view(), self.budget.cfg, now)
            st.disrupted = used
            self._stats, self._stats_at = st, mono
        return self._stats  # type: ignore[return-value]

    def publish(self) -> FleetStats:
        st = self.stats(force=True)
        m = self.metrics
        for s in NODE_STATES:
            m.nodes.labels(s).set(st.states.get(s, 0))
        cfg = self.budget.cfg
        for scope in set(st.totals) | {"cluster"}:
            lim = bud.limit_of(scope, cfg).limit(st.totals.get(scope, 0))
            used = st.disrupted.get(scope, 0)
            m.budget_used.labels(scope).set(round(used / lim, 4) if lim else (0.0 if lim is None else float(bool(used))))
            m.budget_exhausted.labels(scope).set(1 if st.wanting.get(scope) and lim is not None and used >= lim else 0)
        full = cfg.max_new_per_window is not None and st.new_in_window >= cfg.max_new_per_window
        m.budget_exhausted.labels("window").set(1 if st.wanting.get("cluster") and full else 0)
        m.storm.set(1 if self.clock.now() < self._storm_until else 0)
        return st

    async def _burst_written(self, at_most: float) -> None:
        """Wait while quarantines are being admitted or written, or keys wait in the queue (at most
        ``at_most`` seconds): the writes of a burst go before a pass over every node."""
        end = self.clock.monotonic() + at_most
        while (self._admitting or len(self.controller.queue)) and self.clock.monotonic() < end:
            await self.clock.sleep(0.05)

    async def stats_loop(self) -> None:
        while True:
            await self._burst_written(5.0)
            t0 = self.clock.monotonic()
            try:
                self.publish()
            except Exception:  # noqa: BLE001
                log.exception("health stats failed")
            # a pass reads every node (a fifth of a second at 7,500 nodes): at most a tenth of the loop's time,
            # and the gauges never more than 5 s older than that
            await self.clock.sleep(max(0.5, self.stats_interval, min(5.0, 9 * (self.clock.monotonic() - t0))))

    # --- reconcile -----------------------------------------------------------
    async def reconcile(self, key: str) -> Result | None:
        from fleetkeeper.health.decide import decide_node

        node = self.nodes.get(key)
        if node is None:
            self._announced.pop(key, None)
            return None
        now = self.clock.now()
        await self._announce_again(node, now)
        fl = self.policy.flapping
        plan = decide_node(node, self.pods_on(key), self.policy, self.names, now,
                           flapping=self.flaps.flapping(key, now, fl.transitions, fl.window),
                           window_waiting=self.window_waiting(node))
        if plan.kind in ("noop",):
            self._noted = {x for x in self._noted if x[0] != key} if any(x[0] == key for x in self._noted) else \
                self._noted
            return None
        return await self.apply(plan, node)

    async def _announce_again(self, node: NodeView, now: float) -> None:
        """The Events of the node's writes younger than REANNOUNCE_S (its history), once per process and
        node state: a process killed between a write and its Events lost them; the names derive from the
        history entry (:func:`_event`), so an Event already written is kept as it was (AlreadyExists). After
        a restart that costs one call per recent entry; a process never announces its own writes again."""
        raw = node.annotations.get(self.keys.history)
        if not raw or self.dry_run or self._announced.get(node.name) == raw:
            return  # (read once per change of the history, not at every pass)
        self._announced[node.name] = raw
        for ts, text in history_read(raw):
            reason, _, note = text.partition(": ")
            if now - ts <= REANNOUNCE_S and reason and note:
                e = _event(reason, note, ts)
                await self.recorder.emit(node_ref(node.name, node.uid), e.reason, e.note, type_=e.type, id=e.id)

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
            if p.wait == "drained":
                # an Event, no write: the lifecycle derives "awaiting repair" from the empty node
                await self._note(node, "Drained", f"all pods evicted; node stays quarantined until {p.remedy} "
                                                  "fixes it and its conditions clear")
            elif p.wait == "window":
                await self._note(node, "WaitingForRepairWindow", p.why)
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
                                      annotations=self._marker_annotations(p, node, keep_since=True),
                                      record=(lifecycle.DRAINING if p.action in ("drain", "terminate")
                                              else lifecycle.QUARANTINED))
        if p.kind == "evict":
            return await self._evict(p, node)
        if p.kind == "terminate":
            return await self._terminate(p, node)
        if p.kind == "request_action":
            _, ann, note = self._request(p, node)
            return await self._mutate(node, p, "request", "ActionRequested", note, annotations=ann)
        if p.kind == "return":
            return await self._mutate(
                node, p, "return", "ReturnedToValidation",
                f"{p.why}; handing the node to the preflight gate before it takes work again",
                remove_taints=(self.names.quarantine,),
                add_taint={"key": self.names.preflight, "value": "pending", "effect": "NoSchedule"},
                labels={self.names.preflight: "pending"},
                annotations={**{k: None for k in self.keys.all_state()}, self.keys.state: "validating",
                             # the gate's clock starts with this write (the gate then needs no write of its own)
                             PreflightFactKeys(self.names).gated_at: str(int(self.clock.now()))},
                record=lifecycle.REVALIDATING)
        if p.kind == "mark_cleared":
            return await self._mutate(node, p, "return", "ConditionsCleared", f"{p.why} "
                                      f"{self.policy.return_to_service.hold:.0f}s before return",
                                      annotations={self.keys.cleared: str(int(self.clock.now()))},
                                      requeue=p.requeue_after)
        if p.kind == "unmark_cleared":
            return await self._mutate(node, p, "return", "ConditionsReturned", p.why,
                                      annotations={self.keys.cleared: None})
        if p.kind == "release":
            self._noted = {x for x in self._noted if x[0] != node.name}
            return await self._mutate(node, p, "release", "ReturnedToService", p.why,
                                      remove_taints=(self.names.quarantine,),
                                      annotations={k: None for k in self.keys.all_state()},
                                      record=lifecycle.IN_SERVICE)
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
        self._admitting += 1
        try:
            return await self._admit_and_write(p, node)
        finally:
            self._admitting -= 1

    async def _admit_and_write(self, p: Plan, node: NodeView) -> Result | None:
        now = self.clock.now()
        async with self._lock:
            if self._storm_until > now:
                await self._note(node, "RemediationPaused",
                                 f"{p.why}: a fault storm paused new quarantines until "
                                 f"{self._storm_until - now:.0f}s from now", "Warning")
                self._count("quarantine", "budget")
                return Result(requeue_after=min(30.0, self._storm_until - now + 0.5))
            # Not a fresh pass here: one reads every node (about 0.3 s of the event loop at 7,500 nodes) and,
            # under this lock, held every admission of a burst behind it. The stats loop keeps them fresh;
            # what was admitted since its last pass is counted in below (ledger, onsets, disrupted).
            st = self.stats(max_age=ADMISSION_STATS_AGE)
            total = st.totals.get("cluster", 0)
            # the stats may predate this burst (refreshed every stats_interval): this node and every
            # admission since count as onsets too, so a burst inside one refresh is still seen as a storm
            onsets = len(st.onset_nodes | {node.name})
            if onsets >= storm_threshold(total, self.policy) and total:
                self._storm_until = now + self.policy.storm.cooldown
                await self._save_state()  # recorded before it is announced
                self.metrics.storm.set(1)
                log.warning("fault storm: %d nodes faulted within %.0fs (threshold %d); pausing new quarantines "
                            "for %.0fs", onsets, self.policy.storm.window, storm_threshold(total, self.policy),
                            self.policy.storm.cooldown)
                await self._note(node, "RemediationPaused",
                                 f"{p.why}: fault storm ({onsets} nodes within "
                                 f"{self.policy.storm.window:.0f}s); pausing new quarantines for "
                                 f"{self.policy.storm.cooldown:.0f}s", "Warning")
                self._count("quarantine", "budget")
                return Result(requeue_after=30.0)
            scopes = self._bsnap.scopes.get(node.name) or bud.scopes_of(node, self.names, self.budget.cfg)
            verdict = bud.admit(node.name, scopes, self._bsnap, self.budget.ledger.view(), self.budget.cfg, now)
            if not verdict.admitted:
                for s_ in verdict.over:
                    self.metrics.budget_exhausted.labels(s_).set(1)
                await self._note(node, "BudgetExhausted",
                                 f"{p.why} wants {p.action} (fixable by {p.remedy}), but the disruption budget "
                                 f"of {', '.join(verdict.over)} is used up; waiting ({verdict.explain()})", "Warning")
                self._count("quarantine", "budget")
                return Result(requeue_after=5.0)
            # admitted: in the ledger now, before the write, so every concurrent admission sees it
            self.budget.ledger.add(bud.InFlight(node.name, "quarantine", now, scopes, dry_run=self.dry_run))
            st.onset_nodes.add(node.name)
            for s_ in scopes:
                st.disrupted[s_] = st.disrupted.get(s_, 0) + 1
            st.new_in_window += 1
        try:
            res = await self._quarantine_write(p, node)
        except BaseException:
            # not written: undo the admission so the retry is not counted twice
            self.budget.ledger.drop(node.name)
            self._stats_at = -1e9
            raise
        if not self.dry_run and p.problems:
            since = max(pr.since for pr in p.problems)
            if since > 0:
                self.metrics.latency.observe(max(0.0, now - since))
        return res

    async def _quarantine_write(self, p: Plan, node: NodeView) -> Result | None:
        """The quarantine: one write. For a node with nothing to drain (``p.request``), the node-local
        action's request is in the same write (one state transition instead of two): the agent reads it
        from the node, and a restarted controller sees it there and does not ask again."""
        annotations = self._marker_annotations(p, node)
        also: tuple[tuple[str, str, str], ...] = ()
        note = (f"{p.why}: tainted {self.names.quarantine}:NoSchedule; ladder target {p.action}; "
                f"fixable by {p.remedy}" + (" (needs hardware replacement)" if p.remedy == "replace" else ""))
        if p.request:
            req, ann, req_note = self._request(p, node)
            annotations.update(ann)
            note += f"; nothing to drain: {req.action} requested in the same write"
            also = (("request", "ActionRequested", req_note),)
        return await self._mutate(
            node, p, "quarantine", "Quarantined", note,
            add_taint={"key": self.names.quarantine, "value": taint_value(p.problems[0].label if p.problems else p.why),
                       "effect": "NoSchedule"},
            annotations=annotations, also=also,
            record=lifecycle.DRAINING if p.action in ("drain", "terminate") else lifecycle.QUARANTINED)

    def _request(self, p: Plan, node: NodeView) -> tuple[Request, dict[str, str | None], str]:
        """A node-local action's request (a fresh nonce), its annotations and its Event's note."""
        why = p.request or p.why
        req = new_request(LOCAL_ACTIONS[p.remedy], node.name, node.uid, self.clock.now(), self.policy.actions.timeout)
        note = (f"{why} (nonce {req.nonce}); escalating to replace if it fails or the fault is still there in "
                f"{self.policy.actions.timeout:.0f}s")
        return req, {self.keys.request: req.dumps(), self.keys.result: None}, note

    async def _mutate(self, node: NodeView, p: Plan, action: str, reason: str, note: str, *,
                      add_taint: dict | None = None, remove_taints: tuple[str, ...] = (),
                      labels: dict[str, str | None] | None = None, annotations: dict[str, str | None] | None = None,
                      requeue: float | None = None, record: str = "",
                      also: tuple[tuple[str, str, str], ...] = ()) -> Result | None:
        """One write through the applier: taints, labels, annotations, the history and the lifecycle
        record, guarded by the cached resourceVersion; then the Event and the metric. ``also``: further
        steps folded into the same write, (action, Event reason, note), each with its own Event,
        history entry and metric, as if written on its own. An Event is a warning if its reason is one of
        WARNING_REASONS, and is named after the write (:func:`_event`): announced again after a restart."""
        now = self.clock.now()
        if self.dry_run:
            if (node.name, f"dry:{action}:{p.action}") in self._noted:
                return None
            self._noted.add((node.name, f"dry:{action}:{p.action}"))
        ops: list = [RemoveTaint(k) for k in remove_taints]
        if add_taint:
            ops.append(AddTaint(add_taint["key"], add_taint.get("value", ""), add_taint.get("effect", "NoSchedule")))
        ops += [SetLabel(k, v) for k, v in (labels or {}).items()]
        ops += [SetAnnotation(k, v) for k, v in (annotations or {}).items()]
        history = history_add(node.annotations.get(self.keys.history), now, f"{reason}: {note}")
        for _, r, n in also:
            history = history_add(history, now, f"{r}: {n}")
        ops.append(SetAnnotation(self.keys.history, history))
        if record:
            ops += list(lifecycle.record_ops(self.names, record, p.why or note, now))
        ops.append(_event(reason, note, now))
        ops += [_event(r, n, now) for _, r, n in also]
        done = await self.applier.apply(node, Ops(node.name, action, tuple(ops), p.why))
        if done.gone or self.dry_run:
            return None
        self._announced[node.name] = history  # its Events are this process's to write (not again)
        self._count(action, "success")
        log.info("%s %s: %s", action, node.name, note)
        for a, _, n in also:
            self._count(a, "success")
            log.info("%s %s: %s", a, node.name, n)
        return Result(requeue_after=requeue) if requeue else None

    def evictions(self, p: Plan, node: NodeView) -> tuple[list[PodView], list[str]]:
        """The node's pods to evict, and every member of a gang with a member here (one disruption)."""
        return gang_evictions(self.pods_on(node.name), self.gangs.get, self.names)

    async def _evict(self, p: Plan, node: NodeView) -> Result | None:
        now = self.clock.now()
        pods, gangs = self.evictions(p, node)
        since = float(node.annotations.get(self.keys.since) or now)
        deadline = since + self.policy.drain.deadline
        if p.action != "terminate":  # non-urgent: a job may ask to checkpoint first
            wait = checkpoint_wait(pods, self.names, since, now, deadline)
            if wait > 0:
                await self._note(node, "WaitingForCheckpoint",
                                 f"{len(pods)} pod(s) asked for a checkpoint grace; evicting in {wait:.0f}s")
                return Result(requeue_after=wait)
        gang_note = f"; gang(s) {', '.join(gangs)} evicted together (one disruption)" if gangs else ""
        if gangs:
            joined = await self._open_window(node, pods, gangs, now)
            if joined:
                gang_note += f"; {', '.join(joined)} repaired in the same window"
        mono = self.clock.monotonic()
        self._evicted = {k: v for k, v in self._evicted.items() if mono - v[1] < EVICTED_EXPECT_S}
        pods = [x for x in pods if self._evicted.get(x.key, ("",))[0] != x.uid]
        if not pods:  # all asked already: the cache has yet to see them go
            return Result(requeue_after=1.0)
        # the gang's members on other nodes first, the node's own pods after them, and only once every other
        # member is gone: the node's own member names the gang, so a crash (or a blocked member) part-way
        # leaves the eviction to be resumed from it, never half done and forgotten
        others = [x for x in pods if x.node != node.name]
        own = [x for x in pods if x.node == node.name]
        if not await self._announce_evictions(p, node, pods, bool(gangs), gang_note):
            return Result(requeue_after=ANNOUNCE_RETRY_S)  # no eviction before its Event exists
        done = await self.applier.apply(
            node, Ops(node.name, "evict", tuple(EvictPod(x.namespace, x.name) for x in others or own), p.why),
            announce=False)
        if others and own and not (done.blocked or done.failed or done.rate_limited):
            done.then(await self.applier.apply(
                node, Ops(node.name, "evict", tuple(EvictPod(x.namespace, x.name) for x in own), p.why),
                announce=False))
        if not self.dry_run:
            uids = {x.key: x.uid for x in pods}
            self._evicted.update({k: (uids.get(k, ""), mono) for k in done.evicted})
        for _ in done.evicted:
            self._count("evict", "dry_run" if self.dry_run else "success")
        for _ in done.blocked:
            self._count("evict", "blocked")
        for _ in done.failed:
            self._count("evict", "error")
        if done.rate_limited:
            self._count("evict", "blocked")
        if done.evicted:
            log.info("%s %d pod(s) for %s%s", "would evict" if self.dry_run else "evicted", len(done.evicted),
                     node.name, gang_note)
        if done.blocked:
            left = since + self.policy.drain.deadline - self.clock.now()
            await self._note(node, "EvictionBlocked",
                             f"{len(done.blocked)} pod(s) protected by a PodDisruptionBudget "
                             f"({', '.join(done.blocked[:5])}); retrying every {self.policy.drain.retry_interval:.0f}s"
                             + (f"; terminating anyway in {left:.0f}s (drain deadline)"
                                if p.action == "terminate" or self.policy.drain.terminate_at_deadline else ""),
                             "Warning")
        if self.dry_run:
            return None
        if done.rate_limited:
            return Result(requeue_after=max(0.2, self.applier.evict_bucket.wait_time()))
        return Result(requeue_after=p.requeue_after if done.blocked or done.failed else 1.0)

    async def _announce_evictions(self, p: Plan, node: NodeView, pods: list[PodView], gang: bool,
                                  gang_note: str) -> bool:
        """The Event of the evictions this pass is about to ask for, written before them (not queued): a
        process killed after an eviction would otherwise leave it without an Event, and the next process
        finds no pod left to announce. Named after the drain and the pods, so a retry of the same pods (a
        PodDisruptionBudget, a kill before the evictions) finds it written and adds none (the drain is its
        quarantine's recorded start, as written on the node: nothing that changes from pass to pass). False:
        not written, nothing is evicted this pass."""
        drain = node.annotations.get(self.keys.since, "")
        keys = sorted(f"{x.namespace}/{x.name}" for x in pods)
        digest = hashlib.sha256(" ".join(sorted(f"{x.key}/{x.uid}" for x in pods)).encode()).hexdigest()[:16]
        reason = "GangEvicted" if gang else "Evicting"
        shown = pod_list(keys)
        verb = "would evict" if self.dry_run else "evicting"
        return await self.applier.recorder.announce(
            node_ref(node.name, node.uid), reason,
            f"{verb} {len(pods)} pod(s) through the Eviction API ({p.action}, fixable by {p.remedy}): "
            f"{shown}{gang_note}", type_="Warning", id=f"{reason}@{drain}:{digest}")

    async def _open_window(self, lead: NodeView, pods: list[PodView], gangs: list[str], now: float) -> list[str]:
        """Before a gang is evicted: the gang's other nodes with reset-class faults (active or pending) join
        this drain's repair window (health.decide.gang_window), so they are drained now and repaired together
        instead of disrupting the restarted job again later; the window is one unit of the budget. Written
        in an order a crash can resume from: the lead's mark first, then the members, then the evictions."""
        members = [m for m in (self.nodes.get(n) for n in sorted({x.node for x in pods if x.node != lead.name}))
                   if m is not None]
        if self._storm_until > now:  # a fault storm pauses new quarantines, joiners of a window too
            return []
        # never more nodes out of service than the cluster's budget limit allows, however the window counts
        total = len(self._bsnap.scopes) or len(self.nodes.keys())
        limit = bud.limit_of("cluster", self.budget.cfg).limit(total)
        max_new = None if limit is None else max(0, limit - len(self._bsnap.out.get("cluster", ())))
        wid, plans = gang_window(lead, members, gangs, self.policy, self.names, now, max_new=max_new)
        if not plans:
            return []
        if lead.annotations.get(self.keys.window) != wid:
            await self.applier.apply(lead, Ops(lead.name, "window", (SetAnnotation(self.keys.window, wid),),
                                               f"gang repair window {wid}"), announce=False)
        joined = []
        for jp in plans:
            m = self.nodes.get(jp.node)
            if m is None:
                continue
            if jp.kind == "join_window":
                await self._mutate(
                    m, jp, "quarantine", "Quarantined",
                    f"{jp.why}: tainted {self.names.quarantine}:NoSchedule; ladder target drain; fixable by "
                    f"{jp.remedy}; in the gang repair window {wid} (one disruption with {lead.name})",
                    add_taint={"key": self.names.quarantine, "value": taint_value(jp.problems[0].label),
                               "effect": "NoSchedule"},
                    annotations={**self._marker_annotations(jp, m), self.keys.window: wid},
                    record=lifecycle.DRAINING)
            else:
                await self._mutate(m, jp, "window", "JoinedRepairWindow",
                                   f"{jp.why}: repaired together with the gang's other nodes in window {wid}",
                                   annotations={self.keys.window: wid})
            joined.append(jp.node)
        return joined

    async def _terminate(self, p: Plan, node: NodeView) -> Result | None:
        """Record the request on the node, then ask the machine provider, in one apply (a crash after the
        write never asks twice). The machine layer's ledger (in the cluster) keeps the hourly limit and never
        acts on a machine twice; once the request is on the node, each reconcile asks the machine layer what
        is left: a throttled or forbidden call is retried, and the Node is deleted only after the machine is
        gone (where the provider can tell and the platform does not delete it itself)."""
        rk = lifecycle.RecordKeys(self.names)
        act = await self.provider.ensure() if isinstance(self.provider, MachinesProvider) else None
        reason = "TerminatedAtDeadline" if p.deadline_passed else "Terminated"
        note = (f"{p.why}; terminating the machine through the {self.provider.name} provider "
                f"(fixable by {p.remedy})" + ("; a PodDisruptionBudget still blocked eviction" if p.deadline_passed
                                              else ""))
        if rk.terminate_requested in node.annotations:
            # announced again: the first announcement may have died with a process killed after the record
            # (the Event's name derives from the request, so the API server keeps one; core.events)
            if not self.dry_run:
                requested = node.annotations[rk.terminate_requested]
                await self.recorder.emit(node_ref(node.name, node.uid), reason, note, type_="Warning",
                                         id=f"terminate@{requested}")
            if act is None:
                return None  # asked once already (the request is on the node)
            step = await act.act("terminate", node.name, p.why, dry_run=self.dry_run, uid=node.uid,
                                 max_per_hour=self.policy.terminate.max_per_hour, announce=False)
            if step.fresh:
                self._count("terminate", "success")
            if step.kind == "refused":
                return Result(requeue_after=3600.0)
            return Result(requeue_after=step.requeue_after) if step.requeue_after else None
        if self.dry_run and (node.name, "dry:terminate") in self._noted:
            return None
        self._noted.add((node.name, "dry:terminate"))
        now = self.clock.now()
        ops = (SetAnnotation(rk.terminate_requested, str(int(now))),
               *lifecycle.record_ops(self.names, lifecycle.RETIRING, p.why, now),
               TerminateMachine("terminate", p.why), Event(reason, note, "Warning", id=f"terminate@{int(now)}"))
        try:
            done = await self.applier.apply(node, Ops(node.name, "terminate", ops, p.why))
        except errors.Temporary as exc:
            # the request is on the node; the machine layer said "later" (hourly limit, throttled): the
            # next reconcile asks it again
            self._count("terminate", "budget" if "max_per" in str(exc) else "error")
            raise
        except errors.FleetkeeperError as exc:
            self._count("terminate", "error")
            log.warning("terminate %s failed: %s", node.name, exc)
            raise
        if self.dry_run or done.gone:
            return None
        self._count("terminate", "success")
        log.info("terminate %s: %s (%s)", node.name, note, done.machine)
        return Result(requeue_after=15.0) if act is not None and not act.provider.deletes_node else None


def policy_source(mgr: Manager) -> ConfigMapKey[Policy]:
    return ConfigMapKey(mgr.kube, mgr.settings.namespace, CONFIGMAP, POLICY_KEY, load_policy)


async def load_from_configmap(mgr: Manager, src: ConfigMapKey[Policy] | None = None) -> tuple[Policy, bool]:
    src = src or policy_source(mgr)
    policy = await src.load()
    sim = str(src.data.get("simulate", "")).lower() in ("1", "true", "yes")
    return policy, sim


async def reload_loop(mgr: Manager, rem: Remediator, interval: float, src: ConfigMapKey[Policy]) -> None:
    """Pick up ConfigMap changes; a broken policy keeps the last good one (core.configmap)."""
    while True:
        await mgr.clock.sleep(interval)
        policy = await src.reload()
        if policy is not None and policy != rem.policy:
            log.info("health policy reloaded")
            rem.policy = policy
            rem.budget.configure(policy.budget)
            rem._watched = watched_types(policy)
            for k in rem.nodes.keys():
                rem.controller.enqueue(k)


async def setup(mgr: Manager, options: HealthOptions | None) -> None:
    opts = options or HealthOptions()
    from_cm = opts.policy is None
    src = policy_source(mgr)
    policy, sim_flag = (await load_from_configmap(mgr, src)) if from_cm else (opts.policy, False)
    simulate = opts.simulate if opts.simulate is not None else (
        sim_flag or os.environ.get("FLEETKEEPER_HEALTH_SIMULATE", "") in ("1", "true"))
    rem = Remediator(mgr, policy, opts.provider, stats_interval=opts.stats_interval,
                     state_interval=opts.state_interval,
                     workers=opts.workers)
    if isinstance(rem.provider, MachinesProvider):
        await rem.provider.ensure()  # a bad machine configuration is reported now, not at the first terminate
    mgr.health = rem  # type: ignore[attr-defined]  # for the demo and tests in the same process
    mgr.add("health-remediation", rem.run)
    mgr.add("health-stats", rem.stats_loop)
    if from_cm:
        mgr.add("health-policy-reload", lambda: reload_loop(mgr, rem, opts.reload_interval, src))
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
