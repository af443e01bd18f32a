"""The preflight controllers: the join gate (one reconcile per node) and the
periodic re-tester (a planner loop), plus the optional Node-CREATE webhook.

* gate: every node carrying the preflight taint or label gets one test pod at
  a time; its signed report releases the node (taint and label removed in one
  patch with a resourceVersion precondition) or records the failure and
  retries with backoff up to ``max_attempts``.
* periodic: picks idle in-service nodes whose validation is getting old, runs
  low-priority test pods there (real work preempts them), gives them up when
  real work arrives, and reports coverage.
* simulation (KWOK nodes, or ``simulate: always``): the suite runs in-process
  against the fault plan and the pod carries the signed result for KWOK to
  return as its termination message; the real result path handles it.
"""

from __future__ import annotations

import asyncio
import base64
import logging
import secrets
from pathlib import Path

from fleetkeeper.core import errors
from fleetkeeper.core.applier import Applier
from fleetkeeper.core.config import parse_yaml
from fleetkeeper.core.configmap import ConfigMapKey
from fleetkeeper.core.controller import Controller, Result
from fleetkeeper.core.events import EventRecorder, node_ref
from fleetkeeper.core.faults import FaultPlan, default_fault_file
from fleetkeeper.core.kube import MUTATING_WEBHOOKS, PODS, PRIORITYCLASSES, SECRETS, \
    SERVICEACCOUNTS
from fleetkeeper.core.manager import Manager
from fleetkeeper.core.domain import INSTANCE_TYPE_LABEL
from fleetkeeper.core.plan import AddTaint, Plan as Ops, RemoveTaint, SetAnnotation, SetLabel
from fleetkeeper.core.ratelimit import TokenBucket
from fleetkeeper.core.views import NodeView, PodView
from fleetkeeper.lifecycle import budget as bud
from fleetkeeper.lifecycle import machine as lifecycle
from fleetkeeper.lifecycle.controller import shared_budget
from fleetkeeper.preflight import gate, periodic
from fleetkeeper.preflight.config import CONFIGMAP_KEY, CONFIGMAP_NAME, PreflightConfig, load_config
from fleetkeeper.preflight.history import GpuHistory
from fleetkeeper.preflight.keys import FAILED, GATE, KWOK_NODE_ANNOTATION, PERIODIC, Keys
from fleetkeeper.preflight.metrics import STATES, PreflightMetrics
from fleetkeeper.preflight.pods import HMAC_KEY_FIELD, pod_name, priority_class, test_pod
from fleetkeeper.preflight.report import ReportError, decode, encode, summary
from fleetkeeper.preflight.suite import SimulatedBackend, SimulatedHost, SuiteResult, run_suite

log = logging.getLogger("fleetkeeper.preflight")


def _parse(text: str | None, source: str) -> PreflightConfig:
    return PreflightConfig() if text is None else load_config(parse_yaml(text, source), source)


async def load_from_cluster(mgr: Manager) -> PreflightConfig:
    return await ConfigMapKey(mgr.kube, mgr.settings.namespace, CONFIGMAP_NAME, CONFIGMAP_KEY, _parse).load()


async def setup(mgr: Manager, options) -> None:
    if options is None:
        cfg = await load_from_cluster(mgr)
    elif isinstance(options, PreflightConfig):
        cfg = options
    else:
        cfg = load_config(options, "preflight options")
    Preflight(mgr, cfg).register()


class Preflight:
    def __init__(self, mgr: Manager, cfg: PreflightConfig):
        self.mgr, self.cfg = mgr, cfg
        self.kube, self.clock = mgr.kube, mgr.clock
        self.keys = Keys(mgr.names)
        self.namespace = cfg.namespace or mgr.settings.namespace
        self.dry_run = mgr.settings.dry_run
        self.metrics = PreflightMetrics(mgr.registry)
        # Events about Nodes (cluster-scoped) must live in "default": the API server rejects them in any other
        # namespace, and Manager.recorder() puts them in the manager's namespace, so build our own here.
        self.recorder = EventRecorder(self.kube, "preflight", namespace="default", clock=self.clock,
                                      metrics=mgr.metrics, dry_run=mgr.settings.dry_run)
        self.nodes = mgr.node_informer()
        self.pods = mgr.pod_informer()
        self.key: bytes = b""
        self.faults = FaultPlan(cfg.fault_file or default_fault_file())
        self.gate_ctl = Controller("preflight-gate", self.reconcile, metrics=mgr.metrics, clock=self.clock,
                                   workers=cfg.gate.workers)
        self.create_bucket = TokenBucket(cfg.gate.pod_create_rate, max(1, int(cfg.gate.pod_create_rate)), self.clock)
        # one writer for nodes, and the one disruption budget (periodic failures take capacity away)
        self.applier = Applier(self.kube, self.recorder, component="preflight", registry=mgr.registry,
                               clock=self.clock, dry_run=self.dry_run, writes_per_second=cfg.gate.node_write_rate)
        self.budget = shared_budget(mgr)
        self.history = GpuHistory(self.kube, self.namespace, cfg.history_shards, cfg.history_entries, self.clock,
                                  self.metrics, self.dry_run)
        # indexes kept by informer handlers
        self.test_pods: dict[str, dict[str, PodView]] = {}  # node -> pod key -> our test pods
        self.pods_on_node = mgr.pods_by_node()  # every pod bound to a node (the manager's shared index)
        self.last_busy: dict[str, float] = {}
        self.started = self.clock.now()
        self.we_deleted: set[str] = set()
        self.webhook_server = None
        self.webhook_url = ""

    # ----------------------------------------------------------- wiring
    def register(self) -> None:
        self.nodes.add_handler(self._on_node)
        self.pods.add_handler(self._on_pod)
        self.mgr.add("preflight-gate", self.run_gate)
        self.mgr.add("preflight-periodic", self.run_periodic)
        if self.cfg.webhook.enabled:
            self._register_webhook()
            self.mgr.add("preflight-webhook", self.run_webhook, leader=False)

    def _gated(self, n: NodeView | None) -> bool:
        return n is not None and (n.taint(self.keys.gate) is not None or self.keys.gate in n.labels)

    def _on_node(self, typ: str, key: str, old, new) -> None:
        if self._gated(new) or self._gated(old) or self.test_pods.get(key):
            self.gate_ctl.enqueue(key)

    def _on_pod(self, typ: str, key: str, old: PodView | None, new: PodView | None) -> None:
        keys = self.keys
        if old is not None and old.node:
            if periodic.is_real_work(old, keys) and (new is None or not periodic.is_real_work(new, keys)):
                self.last_busy[old.node] = self.clock.now()
        if new is not None and new.node and new.active:
            if periodic.is_real_work(new, keys):
                self.last_busy[new.node] = self.clock.now()
        mine = (new or old)
        if mine is None or keys.pod_kind not in mine.labels or mine.namespace != self.namespace:
            return
        node = mine.annotations.get(keys.pod_node) or mine.node
        if new is None:
            self.test_pods.get(node, {}).pop(key, None)
            if old is not None and old.labels.get(keys.pod_kind) == PERIODIC and old.active \
                    and old.name not in self.we_deleted:
                self.metrics.results.labels(PERIODIC, "preempted").inc()
            self.we_deleted.discard(mine.name)
        else:
            self.test_pods.setdefault(node, {})[key] = new
        if mine.labels.get(keys.pod_kind) == GATE:
            self.gate_ctl.enqueue(node)

    # ----------------------------------------------------------- start-up
    async def ensure_objects(self) -> None:
        """The HMAC key Secret, the runner ServiceAccount (no RBAC), the periodic PriorityClass."""
        if self.dry_run:
            sec = await self.kube.get_or_none(SECRETS, self.cfg.key_secret, self.namespace)
            self.key = base64.b64decode((sec or {}).get("data", {}).get(HMAC_KEY_FIELD, "")) or secrets.token_hex(32).encode()
            return
        sec = await self.kube.get_or_none(SECRETS, self.cfg.key_secret, self.namespace)
        if sec is None:
            body = {"apiVersion": "v1", "kind": "Secret", "type": "Opaque",
                    "metadata": {"name": self.cfg.key_secret, "namespace": self.namespace,
                                 "labels": {self.keys.component: "preflight"}},
                    "data": {HMAC_KEY_FIELD: base64.b64encode(secrets.token_hex(32).encode()).decode()}}
            try:
                sec = await self.kube.create(SECRETS, body, self.namespace)
            except errors.Conflict:
                sec = await self.kube.get(SECRETS, self.cfg.key_secret, self.namespace)
        key = base64.b64decode(sec["data"][HMAC_KEY_FIELD])
        self.key = key
        if await self.kube.get_or_none(SERVICEACCOUNTS, self.cfg.service_account, self.namespace) is None:
            try:
                await self.kube.create(SERVICEACCOUNTS, {
                    "apiVersion": "v1", "kind": "ServiceAccount", "automountServiceAccountToken": False,
                    "metadata": {"name": self.cfg.service_account, "namespace": self.namespace,
                                 "labels": {self.keys.component: "preflight"}}}, self.namespace)
            except errors.Conflict:
                pass
        try:
            await self.kube.apply(PRIORITYCLASSES, priority_class(self.cfg, self.keys))
        except errors.ApiError as exc:  # e.g. the value of an existing PriorityClass cannot change
            log.warning("PriorityClass %s: %s", self.cfg.periodic.priority_class, exc)
        self.key = key  # last: the periodic loop starts once everything above exists

    # ----------------------------------------------------------- gate
    async def run_gate(self) -> None:
        await self.ensure_objects()
        for name in self.nodes.keys():
            if self._gated(self.nodes.get(name)) or self.test_pods.get(name):
                self.gate_ctl.enqueue(name)
        await asyncio.gather(self.gate_ctl.run(), self.history.run())

    def _verify(self, node: NodeView):
        def verify(pod: PodView) -> SuiteResult:
            if pod.node and pod.node != node.name:
                raise ReportError(f"test pod ran on {pod.node!r}, not on {node.name!r}")
            return decode(pod.termination_message, key=self.key, node=node.name, pod=pod.name,
                          nonce=pod.annotations.get(self.keys.nonce, ""))
        return verify

    def simulated(self, node: NodeView) -> bool:
        return self.cfg.simulate == "always" or (
            self.cfg.simulate == "auto" and node.annotations.get(KWOK_NODE_ANNOTATION) == "fake")

    def simulate(self, node: NodeView, profile_name: str, pod: str, nonce: str) -> tuple[bool, str] | None:
        """Run the suite in-process against the fault plan; the signed report for KWOK to return.
        ``validation:hang`` simulates a test that never finishes (None: KWOK keeps the pod Running)."""
        try:
            faults = [str(f) for f in self.faults.faults(node.name)]
        except errors.ConfigError as exc:
            log.warning("fault plan unreadable (%s); simulating a healthy node", exc)
            faults = []
        if "validation:hang" in faults:
            return None
        profile = self.cfg.profile_named(profile_name)
        res = run_suite(node.name, profile, SimulatedBackend(node.name, profile, faults),
                        SimulatedHost(profile, faults), clock=self.clock.now)
        return res.passed, encode(res, pod=pod, nonce=nonce, key=self.key)

    async def reconcile(self, name: str) -> Result | None:
        node = self.nodes.get(name)
        pods = list(self.test_pods.get(name, {}).values())
        if node is None:
            for p in pods:
                await self._delete_pod(p, "node gone")
            return None
        if not gate.in_scope(node, self.cfg) and not pods:
            return None
        now = self.clock.now()
        plan = gate.decide(node, pods, self.cfg, self.keys, now, self._verify(node))
        if plan.create_pod:
            inflight = sum(1 for ps in self.test_pods.values() for p in ps.values()
                           if p.active and p.labels.get(self.keys.pod_kind) == GATE)
            if inflight >= self.cfg.gate.max_concurrent:
                raise errors.Temporary(f"{inflight} gate test pods in flight (max {self.cfg.gate.max_concurrent})", 2.0)
        if plan.patches_node:
            await self._patch_node(node, plan, record=lifecycle.IN_SERVICE if plan.outcome == "passed" else "")
        for pname in plan.delete_pods:
            p = next((p for p in pods if p.name == pname), None)
            if p is not None:
                await self._delete_pod(p, plan.outcome)
        if plan.create_pod:
            await self._create_pod(node, GATE, pod_name(GATE, node.name, plan.cycle, plan.attempt),
                                   self.cfg.gate.sim_duration_ms)
        if plan.event:
            reason, note, typ = plan.event
            await self.recorder.emit(node_ref(node.name, node.uid), reason, note, type_=typ)
        self._account(node, plan, now)
        return Result(requeue_after=plan.requeue_after) if plan.requeue_after is not None else None

    def _account(self, node: NodeView, plan: gate.Plan, now: float) -> None:
        m = self.metrics
        if plan.outcome in ("passed", "failed", "exhausted", "timeout"):
            outcome = plan.outcome
            if plan.outcome in ("failed", "exhausted") and plan.result is None:
                outcome = "rejected" if plan.outcome == "failed" else outcome
            m.results.labels(GATE, outcome).inc()
        if plan.outcome == "passed":
            try:
                since = node.annotations.get(self.keys.gated_at) or (node.created if self.keys.validated_at not in
                                                                      node.annotations else now)
                m.gate_seconds.observe(max(0.0, now - float(since)))
            except ValueError:
                pass
        if plan.outcome in ("failed", "exhausted", "timeout"):
            for c in (plan.annotations.get(self.keys.failed_check) or "").split(","):
                if c:
                    m.check_failures.labels(c).inc()
        if plan.result is not None:
            self._record_gpus(node.name, GATE, plan.result, now)

    def _record_gpus(self, node: str, kind: str, result: SuiteResult, now: float) -> None:
        for u in result.gpus:
            self.history.add(u, {"t": int(now), "n": node, "k": kind,
                                 "ok": result.passed and u not in result.failed_gpus,
                                 "s": summary(result)[:120] if u in result.failed_gpus or not result.passed else "ok"})

    async def _patch_node(self, node: NodeView, plan: gate.Plan, action: str | None = None,
                          record: str = "") -> None:
        """One node write through the core applier (cached resourceVersion, rate limit, metric)."""
        action = action or {"passed": "release", "failed": "fail", "exhausted": "fail", "timeout": "fail",
                            "retaint": "retaint", "reset": "reset"}.get(plan.outcome, "annotate")
        ops: list = [SetLabel(k, v) for k, v in plan.labels.items()]
        ops += [SetAnnotation(k, v) for k, v in plan.annotations.items()]
        if plan.taints is not None:
            want = {t["key"]: t for t in plan.taints}
            ops += [RemoveTaint(t.key) for t in node.taints if t.key not in want]
            ops += [AddTaint(t["key"], t.get("value", ""), t["effect"]) for t in plan.taints]  # no-ops fold away
        if record:
            ops += list(lifecycle.record_ops(self.mgr.names, record, plan.outcome, self.clock.now()))
        self.metrics.node_writes.labels(action).inc()
        await self.applier.apply(node, Ops(node.name, action, tuple(ops)), announce=False)  # its own Events

    def periodic_admission(self, node: NodeView, now: float) -> tuple[bool, str]:
        """May a periodic failure take ``node`` out of service? The shared disruption budget, then this
        component's own hourly cap, counted from the nodes (durable): nodes it re-gated within the hour."""
        cfg = self.budget.cfg
        snap = bud.snapshot(self.nodes.items(), self.mgr.names, cfg, lambda n: gate.in_scope(n, self.cfg))
        scopes = snap.scopes.get(node.name) or bud.scopes_of(node, self.mgr.names, cfg)
        verdict = bud.admit(node.name, scopes, snap, self.budget.ledger.view(), cfg, now)
        if not verdict.admitted:
            return False, verdict.explain()
        recent = sum(1 for n in self.nodes.items()
                     if n.labels.get(self.keys.gate) == FAILED and self.keys.validated_at in n.annotations
                     and now - float(n.annotations.get(self.keys.gated_at) or 0) < 3600)
        recent += sum(1 for f in self.budget.ledger.view().values() if f.kind == "retest" and f.node not in snap.since)
        if recent >= self.cfg.periodic.fail_budget_per_hour:
            return False, f"{self.cfg.periodic.fail_budget_per_hour} periodic removals per hour already made"
        return True, verdict.explain()

    async def _create_pod(self, node: NodeView, kind: str, name: str, sim_ms: int) -> bool:
        nonce = secrets.token_hex(12)
        profile = self.cfg.profile_for(node.labels.get(INSTANCE_TYPE_LABEL, "")).name
        sim = self.simulate(node, profile, name, nonce) if self.simulated(node) else None
        body = test_pod(node, kind, name, nonce, profile, self.cfg, self.keys, self.namespace, sim=sim,
                        sim_delay_ms=sim_ms)
        if self.dry_run:
            log.info("dry-run: would create %s test pod %s on %s", kind, name, node.name)
            return False
        await self.create_bucket.acquire()
        try:
            await self.kube.create(PODS, body, self.namespace)
        except errors.Conflict:
            return False  # exists already (an earlier pass created it)
        self.metrics.pods_created.labels(kind).inc()
        return True

    async def _delete_pod(self, pod: PodView, why: str) -> None:
        kind = pod.labels.get(self.keys.pod_kind, "")
        if self.dry_run:
            log.info("dry-run: would delete test pod %s (%s)", pod.key, why)
            return
        self.we_deleted.add(pod.name)
        try:
            await self.kube.delete(PODS, pod.name, pod.namespace, grace_period=0 if not pod.active else None)
            self.metrics.pods_deleted.labels(kind).inc()
        except errors.NotFound:
            pass

    # ----------------------------------------------------------- periodic
    async def run_periodic(self) -> None:
        await self.nodes.wait_synced()
        await self.pods.wait_synced()
        while not self.key:
            await self.clock.sleep(0.5)  # the gate runnable loads the key
        while True:
            try:
                await self.periodic_pass()
            except errors.FleetkeeperError as exc:
                log.warning("periodic pass failed: %s", exc)
            await self.clock.sleep(self.cfg.periodic.interval_s)

    async def periodic_pass(self) -> periodic.PeriodicPlan:
        now = self.clock.now()
        nodes = self.nodes.items()
        pods_by_node: dict[str, list[PodView]] = {}
        for n in nodes:
            ps = [p for p in self.pods_on_node.get(n.name) if p.active]
            ps += [p for p in self.test_pods.get(n.name, {}).values() if not p.node]
            pods_by_node[n.name] = ps
        last_busy = {n.name: self.last_busy.get(n.name, self.started) for n in nodes}
        plan = periodic.decide(nodes, pods_by_node, last_busy, self.cfg, self.keys, now)
        m = self.metrics
        m.coverage.set(plan.coverage)
        m.oldest.set(plan.oldest_age)
        m.eligible.set(plan.eligible)
        # results of finished periodic pods
        for node_name, ps in list(self.test_pods.items()):
            for p in list(ps.values()):
                if p.labels.get(self.keys.pod_kind) == PERIODIC and p.phase in ("Succeeded", "Failed") \
                        and not p.deleting:
                    await self._periodic_result(node_name, p, now)
        for pname, why in plan.give_up:
            pod = next((p for ps in self.test_pods.values() for p in ps.values() if p.name == pname), None)
            if pod is not None:
                await self._delete_pod(pod, why)
                m.results.labels(PERIODIC, "given-up").inc()
                n = self.nodes.get(pod.annotations.get(self.keys.pod_node, ""))
                if n is not None:
                    await self.recorder.emit(node_ref(n.name, n.uid), "PreflightYielded",
                                             f"periodic test {pname} stopped: {why}")
        for name in plan.start:
            node = self.nodes.get(name)
            if node is None:
                continue
            stamp = node.annotations.get(self.keys.validated_at) or str(int(node.created))
            if await self._create_pod(node, PERIODIC, pod_name(PERIODIC, name, stamp + str(int(now)), 0),
                                      self.cfg.periodic.sim_duration_ms):
                await self.recorder.emit(node_ref(node.name, node.uid), "PreflightPeriodicStarted",
                                         "idle node due for re-validation: low-priority test pod started")
        m.in_flight.labels(PERIODIC).set(plan.in_flight - len(plan.give_up) + len(plan.start))
        m.in_flight.labels(GATE).set(sum(1 for ps in self.test_pods.values() for p in ps.values()
                                         if p.active and p.labels.get(self.keys.pod_kind) == GATE))
        self._gauge_gated(nodes)
        return plan

    def _gauge_gated(self, nodes: list[NodeView]) -> None:
        counts = {s: 0 for s in STATES}
        for n in nodes:
            if not self._gated(n):
                continue
            label = n.labels.get(self.keys.gate)
            try:
                attempts = int(n.annotations.get(self.keys.attempts, "0"))
            except ValueError:
                attempts = 0
            if label == FAILED and attempts >= self.cfg.gate.max_attempts:
                counts["exhausted"] += 1
            elif any(p.active for p in self.test_pods.get(n.name, {}).values()):
                counts["testing"] += 1
            elif not gate.node_up(n, self.cfg.gate.start_when_ready):
                counts["not-ready"] += 1
            elif label == FAILED:
                counts["failed"] += 1
            else:
                counts["pending"] += 1
        for s, v in counts.items():
            self.metrics.gated.labels(s).set(v)

    async def _periodic_result(self, node_name: str, pod: PodView, now: float) -> None:
        node = self.nodes.get(node_name)
        if node is None:
            await self._delete_pod(pod, "node gone")
            return
        keys = self.keys
        if node.annotations.get(keys.last_pod) == pod.name:
            await self._delete_pod(pod, "result applied")
            return
        try:
            result = self._verify(node)(pod)
            ok = result.passed and pod.phase == "Succeeded"
            why = summary(result)
            failed = result.failed_checks or ["pod"]
        except ReportError as exc:
            result, ok, why, failed = None, False, f"report rejected: {exc}", ["report"]
        entry = gate.history_entry(now, PERIODIC, result, why, pod.name)
        ann: dict[str, str | None] = {keys.history: gate.append_history(node.annotations.get(keys.history), entry,
                                                                          self.cfg.history_entries),
                                      keys.last_pod: pod.name}
        if result is not None and result.gpus:
            ann[keys.gpus] = ",".join(result.gpus)[:2000]
            self._record_gpus(node.name, PERIODIC, result, now)
        plan = gate.Plan("periodic", annotations=ann)
        if ok:
            ann[keys.validated_at] = str(int(now))
            await self._patch_node(node, plan, "periodic-pass")
            self.metrics.results.labels(PERIODIC, "passed").inc()
        else:
            async with self.budget.ledger.lock:
                admitted, budget_why = self.periodic_admission(node, now)
                if admitted:
                    self.budget.ledger.add(bud.InFlight(node.name, "retest", now, bud.scopes_of(
                        node, self.mgr.names, self.budget.cfg), dry_run=self.dry_run))
        if not ok and not admitted:
            self.metrics.budget_denied.inc()
            self.metrics.results.labels(PERIODIC, "failed").inc()
            await self._patch_node(node, plan, "annotate")
            await self.recorder.emit(node_ref(node.name, node.uid), "PreflightFailedNoBudget",
                                     f"periodic validation {why}; node left in service: {budget_why}",
                                     type_="Warning")
        elif not ok:
            ann.update({keys.attempts: "1", keys.failed_check: ",".join(failed)[:200],
                        keys.retry_at: str(int(now + gate.backoff(self.cfg, 1))), keys.gated_at: str(int(now))})
            plan.labels = {keys.gate: FAILED}
            plan.taints = [{"key": t.key, "value": t.value, "effect": t.effect} for t in node.taints
                           if t.key != keys.gate] + [gate.gate_taint(keys, FAILED)]
            try:
                await self._patch_node(node, plan, "periodic-fail", record=lifecycle.REVALIDATING)
            except BaseException:
                self.budget.ledger.drop(node.name)
                raise
            self.metrics.results.labels(PERIODIC, "failed").inc()
            for c in failed:
                self.metrics.check_failures.labels(c).inc()
            await self.recorder.emit(node_ref(node.name, node.uid), "PreflightFailed",
                                     f"periodic validation {why}; node taken out of service and handed to the gate",
                                     type_="Warning")
        await self._delete_pod(pod, "result applied")

    # ----------------------------------------------------------- webhook
    def _register_webhook(self) -> None:
        """The Node-CREATE gate's handler on the process's one webhook server (one port, one certificate)."""
        from fleetkeeper.core.pki import mounted_serving_cert
        from fleetkeeper.core.webhook import WebhookAsk
        from fleetkeeper.preflight.webhook import WEBHOOK_NAME, gate_node

        wc = self.cfg.webhook
        mounted = mounted_serving_cert(Path(wc.cert_dir)) if wc.cert_dir else None
        hosts = [wc.url_host] if wc.url_host else [f"{wc.service_name}.{self.namespace}.svc",
                                                    f"{wc.service_name}.{self.namespace}.svc.cluster.local"]
        self.webhooks = self.mgr.webhook(
            WebhookAsk("preflight", (WEBHOOK_NAME,), wc.host, wc.port, tuple(hosts), mounted=mounted),
            {WEBHOOK_NAME: lambda req: gate_node(req, self.keys, wc.exempt_labels)})

    async def run_webhook(self) -> None:
        from fleetkeeper.preflight.webhook import WEBHOOK_NAME, gate_registration

        wc = self.cfg.webhook
        await self.webhooks.started.wait()
        self.webhook_server = self.webhooks.server
        if wc.auto_register and not self.dry_run:
            url = self.webhooks.url(WEBHOOK_NAME, wc.url_host) if wc.url_host else None
            self.webhook_url = url or ""
            await self.kube.apply(MUTATING_WEBHOOKS, gate_registration(wc, self.webhooks.ca_bundle, url=url,
                                                                       namespace=self.namespace))


__all__ = ["setup", "Preflight", "load_from_cluster"]
