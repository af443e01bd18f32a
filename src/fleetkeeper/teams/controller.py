"""The team-resource-manager and the toleration webhook, wired into the manager.

* the teams ConfigMap is watched (all replicas); every version goes through
  the core ConfigMap loader (``ConfigMapKey.offer``): a valid one replaces the
  configuration in force, an invalid, keyless or deleted one is reported
  (Event, status ConfigMap, metric) and changes nothing;
* the leader reconciles one key, ``teams``: snapshot the node and pod caches,
  ``plan.decide`` (replacements bounded by the rate limit, counted from the
  nodes' ``team-replaced-at`` record, and by the one disruption budget),
  ``apply.apply_changes`` through the core applier, publish the status;
* every replica serves the webhook (it only reads the configuration).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

import orjson

from fleetkeeper.core import errors
from fleetkeeper.core.applier import Applier
from fleetkeeper.core.owners import OwnerIndex
from fleetkeeper.core.config import load_model, parse_yaml
from fleetkeeper.core.configmap import ConfigMapKey
from fleetkeeper.core.controller import Controller, Result
from fleetkeeper.core.events import EventRecorder, ObjectRef
from fleetkeeper.core.informer import Informer, identity
from fleetkeeper.core.kube import CONFIGMAPS, PRIORITYCLASSES, Kube
from fleetkeeper.core.manager import Manager
from fleetkeeper.core.views import NodeView
from fleetkeeper.lifecycle import budget as bud
from fleetkeeper.lifecycle.controller import shared_budget

from fleetkeeper.teams.admission import Priorities, TeamAdmission, borrower_label
from fleetkeeper.teams.apply import apply_changes
from fleetkeeper.teams.config import ConfigState, TeamsConfig
from fleetkeeper.teams.live import config_source
from fleetkeeper.teams.metrics import TeamsMetrics
from fleetkeeper.teams.options import OPTIONS_KEY, TeamsOptions
from fleetkeeper.teams.plan import Plan, decide, fill_borrowed, recent_replacements, snapshot
from fleetkeeper.teams.serve import WebhookRunner
from fleetkeeper.teams.workloads import WorkloadKinds

log = logging.getLogger("fleetkeeper.teams")

KEY = "teams"


def project_priority_class(obj: dict) -> tuple[str, int, bool]:
    return obj["metadata"]["name"], int(obj.get("value") or 0), bool(obj.get("globalDefault"))


def priorities_from(items: list[tuple[str, int, bool]]) -> Priorities:
    default = next((v for _, v, g in items if g), 0)
    return Priorities({n: v for n, v, _ in items}, default)


def _relevant(v: NodeView | None) -> tuple | None:
    if v is None:
        return None
    return (v.labels, v.taints, v.unschedulable, v.ready, v.deleting)


class TeamManager:
    def __init__(self, mgr: Manager, opts: TeamsOptions, state: ConfigState, metrics: TeamsMetrics,
                 nodes: Informer, pods: Informer, configmaps: Informer,
                 loader: ConfigMapKey[TeamsConfig] | None = None):
        self.mgr, self.opts, self.state, self.metrics = mgr, opts, state, metrics
        self.kube: Kube = mgr.kube
        self.names = mgr.names
        self.nodes, self.pods, self.configmaps = nodes, pods, configmaps
        self.namespace = opts.config_namespace or mgr.settings.namespace
        self.loader = loader or config_source(mgr.kube, self.namespace, opts.configmap, mgr.settings.domain)
        self.dry_run = mgr.settings.dry_run
        # The API server accepts Events about cluster-scoped objects (Nodes) only in
        # the "default" namespace; the manager's recorder writes them to its own
        # namespace, so node events get a recorder of their own.
        self.recorder: EventRecorder = mgr.recorder("teams")
        self.node_recorder = EventRecorder(mgr.kube, "teams", namespace="default", clock=mgr.clock,
                                           metrics=mgr.metrics, dry_run=mgr.settings.dry_run)
        self.controller = Controller("teams", self.reconcile, metrics=mgr.metrics, clock=mgr.clock)
        # every node write through the core applier (its bucket follows the configured writes rate)
        self.applier = Applier(mgr.kube, self.node_recorder, component="teams", registry=mgr.registry,
                               clock=mgr.clock, dry_run=self.dry_run)
        self.budget = shared_budget(mgr)  # the one disruption budget, shared with health and preflight
        self._reported_generation = -1
        self._held_reported: tuple[str, ...] = ()
        self._status_body = b""
        self.last_plan: Plan | None = None
        self.writes = 0
        nodes.add_handler(self._on_node)
        configmaps.add_handler(lambda typ, key, old, new: self.controller.enqueue(KEY))

    def _on_node(self, typ: str, key: str, old: NodeView | None, new: NodeView | None) -> None:
        if typ != "MODIFIED" or _relevant(old) != _relevant(new):
            self.controller.enqueue(KEY)

    @property
    def cm_ref(self) -> ObjectRef:
        cm = self.configmaps.get(f"{self.namespace}/{self.opts.configmap}")
        uid = (cm or {}).get("metadata", {}).get("uid", "")
        return ObjectRef("ConfigMap", self.opts.configmap, self.namespace, uid)

    async def _report_config(self) -> None:
        if self.state.generation == self._reported_generation:
            return
        self._reported_generation = self.state.generation
        if self.state.error:
            self.metrics.config_valid.set(0)
            self.metrics.config_errors.inc()
            kept = ("keeping the last good configuration (resourceVersion "
                    f"{self.state.resource_version}); nothing changes until it is fixed"
                    if self.state.config else "no valid configuration yet; no node is changed")
            await self.recorder.emit(self.cm_ref, "ConfigInvalid", f"{self.state.error}\n{kept}", type_="Warning")
        elif self.state.config is not None:
            self.metrics.config_valid.set(1)
            await self.recorder.emit(self.cm_ref, "ConfigLoaded",
                                     f"team configuration accepted (resourceVersion {self.state.resource_version}): "
                                     f"{len(self.state.config.teams)} entries, {len(self.state.config.team_names)} teams")

    def admission(self, views: dict[str, NodeView], now: float) -> bud.Admitter:
        """The disruption budget's verdicts for replacements, over every node in the cache: a replacement
        is admitted when the node it replaces already holds a unit (its quarantine: the replacement is part
        of that disruption) or when there is room for one more (a node out for a reason the budget does not
        count: NotReady, cordoned, being deleted)."""
        snap = bud.snapshot(views.values(), self.names, self.budget.cfg)
        return bud.Admitter(snap, self.budget.ledger.view(), self.budget.cfg, now, "team-replace",
                            dry_run=self.dry_run)

    def plan(self, cfg: TeamsConfig, budget: int, admit: Callable[[str], bud.Verdict] | None = None,
             views: dict[str, NodeView] | None = None) -> tuple[Plan, dict[str, NodeView]]:
        views = views if views is not None else {v.name: v for v in self.nodes.items()}
        states, borrowers = snapshot(list(views.values()), self.pods.items(), self.names, borrower_label(self.names))
        plan = decide(states, cfg, budget, (lambda n: admit(n).admitted) if admit is not None else None)
        fill_borrowed(plan, borrowers)
        return plan, views

    async def reconcile(self, key: str) -> Result | None:
        await self._report_config()
        cfg = self.state.config
        if cfg is None:
            await self._publish(None)
            return Result(requeue_after=self.opts.resync_seconds)
        self.applier.set_write_rate(cfg.writes.per_second, cfg.writes.burst)
        now = self.mgr.clock.now()
        t0 = time.perf_counter()
        views = {v.name: v for v in self.nodes.items()}
        # the replacement rate limit, counted from the nodes' record: a restart neither resets nor repeats it
        budget = max(0, cfg.replacement.max_nodes - recent_replacements(views.values(), self.names, now,
                                                                        cfg.replacement.window_seconds))
        asked: list[bud.Admitter] = []

        def admit_lazily(node: str) -> bud.Verdict:  # the budget's snapshot only when a replacement is due
            if not asked:
                asked.append(self.admission(views, now))
            return asked[0](node)

        plan, views = self.plan(cfg, budget, admit_lazily, views)
        admit = asked[0] if asked else bud.Admitter(bud.Snapshot(), {}, self.budget.cfg, now, "team-replace")
        if asked:
            # replacements were asked for: decide again holding the ledger's lock, so the verdicts and their
            # ledger entries are one step (health admits under the same lock)
            async with self.budget.ledger.lock:
                admit = self.admission(views, now)
                plan, views = self.plan(cfg, budget, admit, views)
                for f in admit.added.values():
                    self.budget.ledger.add(f)
        self.last_plan = plan
        plan_s = time.perf_counter() - t0
        self.metrics.plan_seconds.observe(plan_s)
        self.metrics.plan_changes.set(len(plan.changes))
        if plan.throttled:
            self.metrics.replacements_throttled.inc(plan.throttled)
        log.info("plan: %d change(s), %d replacement(s), %d throttled (%d by the disruption budget) (%.0f ms)",
                 len(plan.changes), plan.replacements, plan.throttled, len(plan.budget_held), plan_s * 1000)
        await self._report_held(plan, admit)
        try:
            res = await apply_changes(self.applier, plan.changes, views, self.names, now=now,
                                      concurrency=cfg.writes.concurrency, metrics=self.metrics,
                                      summary_recorder=self.recorder, summary_ref=self.cm_ref,
                                      on_write=self._count_write, current=self.nodes.get)
        finally:
            # a replacement takes no node out of service: once written it holds no unit of the budget
            for name in admit.added:
                f = self.budget.ledger.view().get(name)
                if f is not None and f.kind == "team-replace":
                    self.budget.ledger.drop(name)
        for st in plan.teams.values():
            self.metrics.set_team(st.team, st.desired, st.assigned, st.eligible, st.shortfall, st.held_unhealthy,
                                  st.borrowed)
        self.metrics.forget_teams(set(plan.teams))
        await self._publish(plan)
        if res.resent:
            log.info("%d write(s) refused with Conflict sent again against the newer cached node", res.resent)
        if res.written:
            await self._await_cache(res.written)
        if res.conflicts or res.failed:
            raise errors.Temporary(f"{res.conflicts} conflict(s), {res.failed} failure(s) writing nodes", delay=1.0)
        if plan.throttled:
            return Result(requeue_after=min(self.opts.resync_seconds, cfg.replacement.window_seconds / max(1, cfg.replacement.max_nodes)))
        return Result(requeue_after=self.opts.resync_seconds)

    async def _report_held(self, plan: Plan, admit: bud.Admitter) -> None:
        """A Warning Event when the set of unhealthy nodes the disruption budget keeps unreplaced changes."""
        held = tuple(plan.budget_held)
        if held == self._held_reported:
            return
        self._held_reported = held
        if held:
            why = admit.verdicts[held[0]].explain()
            await self.recorder.emit(self.cm_ref, "TeamReplacementHeld",
                                     f"{len(held)} unhealthy team node(s) not replaced: the disruption budget is "
                                     f"used up ({why}): {', '.join(held[:10])}" + (" ..." if len(held) > 10 else ""),
                                     type_="Warning")

    def _count_write(self, change) -> None:
        self.writes += 1

    async def _await_cache(self, written: dict[str, str], timeout: float = 30.0) -> None:
        """Wait until the node cache has seen our writes, so the next plan is
        not made from state we already changed (no duplicate writes)."""
        deadline = self.mgr.clock.monotonic() + timeout
        pending = dict(written)
        while pending and self.mgr.clock.monotonic() < deadline:
            for name, rv in list(pending.items()):
                v = self.nodes.get(name)
                if v is None or v.resource_version != rv:
                    del pending[name]
            if pending:
                await self.mgr.clock.sleep(0.05)
        if pending:
            log.warning("node cache has not caught up with %d write(s) after %.0fs", len(pending), timeout)

    def status(self, plan: Plan | None) -> dict:
        return {
            "config": {"valid": not self.state.error, "error": self.state.error,
                       "problems": [{"path": p, "value": repr(v), "message": m} for p, v, m in self.state.error_problems],
                       "inForceResourceVersion": self.state.resource_version,
                       "rejectedResourceVersion": self.state.error_resource_version},
            "dryRun": self.dry_run,
            "teams": [st.as_dict() for st in plan.teams.values()] if plan else [],
            "overlaps": plan.overlaps if plan else [],
            "throttledReplacements": plan.throttled if plan else 0,
            "heldByDisruptionBudget": list(plan.budget_held) if plan else [],
        }

    async def _publish(self, plan: Plan | None) -> None:
        body = orjson.dumps(self.status(plan), option=orjson.OPT_INDENT_2 | orjson.OPT_SORT_KEYS)
        if body == self._status_body or self.dry_run:
            return
        cm = {"apiVersion": "v1", "kind": "ConfigMap",
              "metadata": {"name": self.opts.status_configmap, "namespace": self.namespace,
                           "labels": {self.names.managed_by: "fleetkeeper-teams"}},
              "data": {"status.json": body.decode()}}
        try:
            await self.kube.apply(CONFIGMAPS, cm, field_manager="fleetkeeper-teams")
            self._status_body = body
        except errors.FleetkeeperError as exc:
            log.warning("could not publish teams status: %s", exc)

    async def run(self) -> None:
        # informers are synced before leader runnables start; a ConfigMap that
        # does not exist produces no event, so say so here
        if len(self.configmaps) == 0 and self.state.config is None and not self.state.error:
            load_config_into(self.state, None, self.loader)
        self.controller.enqueue(KEY)
        await self.controller.run()


def load_config_into(state: ConfigState, cm: dict | None, loader: ConfigMapKey[TeamsConfig]) -> None:
    """Validate one ConfigMap version into ``state`` through the core loader (the last good one stays in
    force when it is invalid, has no key, or is gone)."""
    rv = (cm or {}).get("metadata", {}).get("resourceVersion", "")
    if rv and rv in (state.resource_version, state.error_resource_version):
        return
    loader.offer(cm)
    if loader.error is not None:
        state.reject(loader.error, rv)
    elif loader.last_good is not None:
        state.accept(loader.last_good, rv)


async def read_options(kube: Kube, namespace: str) -> TeamsOptions:
    cm = await kube.get_or_none(CONFIGMAPS, TeamsOptions().configmap, namespace)
    text = ((cm or {}).get("data") or {}).get(OPTIONS_KEY)
    if not text:
        return TeamsOptions()
    source = f"configmap {namespace}/{TeamsOptions().configmap} key {OPTIONS_KEY}"
    return load_model(TeamsOptions, parse_yaml(text, source) or {}, source)


async def setup(mgr: Manager, options: TeamsOptions | dict | None) -> None:
    if options is None:
        opts = await read_options(mgr.kube, mgr.settings.namespace)
    elif isinstance(options, dict):
        opts = load_model(TeamsOptions, options, "teams options")
    else:
        opts = options
    if mgr.settings.dry_run and opts.webhook.register_webhook:
        # dry-run writes nothing: the webhook is served (and can be tried) but not registered
        opts = opts.model_copy(update={"webhook": opts.webhook.model_copy(update={"register_webhook": False})})
    namespace = opts.config_namespace or mgr.settings.namespace
    domain = mgr.settings.domain
    state = ConfigState()
    metrics = TeamsMetrics(mgr.registry)
    loader = config_source(mgr.kube, namespace, opts.configmap, domain)
    configmaps = mgr.informer(CONFIGMAPS, identity, namespace=namespace,
                              field_selector=f"metadata.name={opts.configmap}", key=f"teams-config-{opts.configmap}")

    def on_cm(typ: str, key: str, old: dict | None, new: dict | None) -> None:
        load_config_into(state, None if typ == "DELETED" else new, loader)

    configmaps.add_handler(on_cm)
    nodes = mgr.node_informer()
    pods = mgr.pod_informer()
    tm = TeamManager(mgr, opts, state, metrics, nodes, pods, configmaps, loader)

    mgr.add("teams", tm.run, leader=True)
    mgr.teams = tm  # type: ignore[attr-defined]  # for tests and the demo
    if opts.webhook.enabled:
        pcs = mgr.informer(PRIORITYCLASSES, project_priority_class, key="teams-priorityclasses")
        # recomputed on the manager's loop when a PriorityClass changes; the webhook
        # (served on its own thread) only reads the reference, never iterates the cache
        current = [priorities_from([])]

        def on_priority_class(typ: str, key: str, old: object, new: object) -> None:
            current[0] = priorities_from(pcs.items())
        pcs.add_handler(on_priority_class)
        kinds = WorkloadKinds(opts.workloads)
        owners = OwnerIndex(mgr.kube, mgr.names, kinds.owner_resources())
        mgr.add("teams-owner-index", owners.run, leader=False)
        mgr.teams_owners = owners  # type: ignore[attr-defined]
        adm = TeamAdmission(mgr.names, state, lambda: current[0],
                            on_decision=lambda w, d: metrics.admissions.labels(w, d).inc(), kinds=kinds,
                            owners=owners.get, own_namespace=mgr.settings.namespace,
                            wait_owner=owners.ensure, owner_wait_s=opts.owner_wait_seconds)
        # served by the process's one webhook server (one port, one certificate for every component)
        runner = WebhookRunner(mgr.kube, adm, opts.webhook, mgr.settings.namespace, domain, mgr.registry,
                               register=mgr.webhook)
        mgr.add("teams-webhook", runner.run, leader=False)
        mgr.teams_webhook = runner  # type: ignore[attr-defined]
