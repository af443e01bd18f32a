"""The team-resource-manager and the toleration webhook, wired into the manager.

* the teams ConfigMap is watched (all replicas); every version is validated;
  a valid one replaces the configuration in force, an invalid one is reported
  (Event, status ConfigMap, metric) and changes nothing;
* the leader reconciles one key, ``teams``: snapshot the node and pod caches,
  ``plan.decide``, ``apply.apply_changes``, publish the status;
* every replica serves the webhook (it only reads the configuration).
"""

from __future__ import annotations

import logging
import time

import orjson

from fleetkeeper.core import errors
from fleetkeeper.core.owners import OwnerIndex
from fleetkeeper.core.config import load_model, parse_yaml
from fleetkeeper.core.controller import Controller, Result
from fleetkeeper.core.events import EventRecorder, ObjectRef
from fleetkeeper.core.informer import Informer, identity
from fleetkeeper.core.kube import CONFIGMAPS, PRIORITYCLASSES, Kube
from fleetkeeper.core.manager import Manager
from fleetkeeper.core.ratelimit import SlidingWindow, TokenBucket
from fleetkeeper.core.views import NodeView

from fleetkeeper.teams.admission import Priorities, TeamAdmission, borrower_label
from fleetkeeper.teams.apply import apply_changes
from fleetkeeper.teams.config import ConfigState, TeamsConfig, parse_configmap
from fleetkeeper.teams.metrics import TeamsMetrics
from fleetkeeper.teams.options import OPTIONS_KEY, TeamsOptions
from fleetkeeper.teams.plan import Plan, decide, fill_borrowed, snapshot
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
                 nodes: Informer, pods: Informer, configmaps: Informer):
        self.mgr, self.opts, self.state, self.metrics = mgr, opts, state, metrics
        self.kube: Kube = mgr.kube
        self.names = mgr.names
        self.nodes, self.pods, self.configmaps = nodes, pods, configmaps
        self.namespace = opts.config_namespace or mgr.settings.namespace
        self.dry_run = mgr.settings.dry_run
        # The API server accepts Events about cluster-scoped objects (Nodes) only in
        # the "default" namespace; the manager's recorder writes them to its own
        # namespace, so node events get a recorder of their own.
        self.recorder: EventRecorder = mgr.recorder("teams")
        self.node_recorder = EventRecorder(mgr.kube, "teams", namespace="default", clock=mgr.clock,
                                           metrics=mgr.metrics, dry_run=mgr.settings.dry_run)
        self.controller = Controller("teams", self.reconcile, metrics=mgr.metrics, clock=mgr.clock)
        self._reported_generation = -1
        self._bucket: TokenBucket | None = None
        self._bucket_cfg: tuple = ()
        self._window: SlidingWindow | None = None
        self._window_cfg = 0.0
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

    def _limits(self, cfg: TeamsConfig) -> tuple[TokenBucket, SlidingWindow]:
        w = cfg.writes
        if self._bucket is None or self._bucket_cfg != (w.per_second, w.burst):
            self._bucket = TokenBucket(w.per_second, w.burst, self.mgr.clock)
            self._bucket_cfg = (w.per_second, w.burst)
        if self._window is None or self._window_cfg != cfg.replacement.window_seconds:
            self._window = SlidingWindow(cfg.replacement.window_seconds, self.mgr.clock)
            self._window_cfg = cfg.replacement.window_seconds
        return self._bucket, self._window

    def plan(self, cfg: TeamsConfig, budget: int) -> tuple[Plan, dict[str, NodeView]]:
        views = {v.name: v for v in self.nodes.items()}
        states, borrowers = snapshot(list(views.values()), self.pods.items(), self.names, borrower_label(self.names))
        plan = decide(states, cfg, budget)
        fill_borrowed(plan, borrowers)
        return plan, views

    async def reconcile(self, key: str) -> Result | None:
        await self._report_config()
        cfg = self.state.config
        if cfg is None:
            await self._publish(None)
            return Result(requeue_after=self.opts.resync_seconds)
        bucket, window = self._limits(cfg)
        budget = max(0, cfg.replacement.max_nodes - window.count())
        t0 = time.perf_counter()
        plan, views = self.plan(cfg, budget)
        self.last_plan = plan
        self.metrics.plan_changes.set(len(plan.changes))
        if plan.throttled:
            self.metrics.replacements_throttled.inc(plan.throttled)
        log.info("plan: %d change(s), %d replacement(s), %d throttled (%.0f ms)", len(plan.changes),
                 plan.replacements, plan.throttled, (time.perf_counter() - t0) * 1000)
        res = await apply_changes(self.kube, plan.changes, views, self.names, bucket=bucket,
                                  concurrency=cfg.writes.concurrency, dry_run=self.dry_run, metrics=self.metrics,
                                  recorder=self.node_recorder, summary_recorder=self.recorder,
                                  summary_ref=self.cm_ref, on_write=self._count_write)
        for c in res.ok:
            if c.action == "replace":
                window.record()
        for st in plan.teams.values():
            self.metrics.set_team(st.team, st.desired, st.assigned, st.eligible, st.shortfall, st.held_unhealthy,
                                  st.borrowed)
        self.metrics.forget_teams(set(plan.teams))
        await self._publish(plan)
        if res.written:
            await self._await_cache(res.written)
        if res.conflicts or res.failed:
            raise errors.Temporary(f"{res.conflicts} conflict(s), {res.failed} failure(s) writing nodes", delay=1.0)
        if plan.throttled:
            return Result(requeue_after=min(self.opts.resync_seconds, cfg.replacement.window_seconds / max(1, cfg.replacement.max_nodes)))
        return Result(requeue_after=self.opts.resync_seconds)

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
            self.state.reject(errors.ConfigError(f"configmap {self.namespace}/{self.opts.configmap}", [
                ("", None, "ConfigMap not found; no team owns any node until it exists")]), "")
        self.controller.enqueue(KEY)
        await self.controller.run()


def load_config_into(state: ConfigState, cm: dict | None, domain: str, source: str) -> None:
    """Validate one ConfigMap version into ``state`` (keeping the last good one on error)."""
    if cm is None:
        state.reject(errors.ConfigError(source, [("", None, "ConfigMap not found (deleted?)")]), "")
        return
    rv = cm["metadata"].get("resourceVersion", "")
    if rv and rv in (state.resource_version, state.error_resource_version):
        return
    try:
        cfg = parse_configmap(cm, domain)
    except errors.ConfigError as exc:
        log.error("invalid teams configuration: %s", exc)
        state.reject(exc, rv)
        return
    state.accept(cfg, rv)


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
    source = f"configmap {namespace}/{opts.configmap}"
    configmaps = mgr.informer(CONFIGMAPS, identity, namespace=namespace,
                              field_selector=f"metadata.name={opts.configmap}", key=f"teams-config-{opts.configmap}")

    def on_cm(typ: str, key: str, old: dict | None, new: dict | None) -> None:
        load_config_into(state, None if typ == "DELETED" else new, domain, source)

    configmaps.add_handler(on_cm)
    nodes = mgr.node_informer()
    pods = mgr.pod_informer()
    tm = TeamManager(mgr, opts, state, metrics, nodes, pods, configmaps)

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
                            wait_owner=owners.wait_for, owner_wait_s=opts.owner_wait_seconds)
        # served by the process's one webhook server (one port, one certificate for every component)
        runner = WebhookRunner(mgr.kube, adm, opts.webhook, mgr.settings.namespace, domain, mgr.registry,
                               register=mgr.webhook)
        mgr.add("teams-webhook", runner.run, leader=False)
        mgr.teams_webhook = runner  # type: ignore[attr-defined]
