"""The netacct node agent: learn the node's pods, keep fleetkeeper's mangle
chains and the uplink's shaping classes equal to what they should be, and feed
the exporter. Each pass is: read pods -> save -> plan -> apply -> observe."""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field

from prometheus_client import CollectorRegistry, generate_latest

from fleetkeeper.core.clock import Clock, RealClock
from fleetkeeper.core.domain import Names
from fleetkeeper.core.errors import Temporary
from fleetkeeper.netacct import rules as R
from fleetkeeper.netacct import shaping as S
from fleetkeeper.netacct.iptables import Iptables, Runner, SaveDump, detect_backend
from fleetkeeper.netacct.metrics import AgentMetrics, ShapedBucket, TrafficCollector
from fleetkeeper.netacct.pods import PodInfo, PodSource
from fleetkeeper.netacct.settings import NetacctSettings

log = logging.getLogger("fleetkeeper.netacct")


@dataclass
class SyncReport:
    pods: int = 0
    rule_plan: R.RulePlan | None = None
    tc_commands: list[str] = field(default_factory=list)
    problems: list[S.Problem] = field(default_factory=list)
    buckets: dict[str, S.Bucket] = field(default_factory=dict)
    bucket_ids: dict[str, int] = field(default_factory=dict)
    shaping_error: str | None = None
    applied: bool = False
    stale_pods: bool = False

    def lines(self) -> list[str]:
        out = [f"pods: {self.pods}" + (" (pod source unavailable: last known list)" if self.stale_pods else "")]
        if self.rule_plan is not None:
            changes = self.rule_plan.summary()
            out.append(f"rules: {self.rule_plan.kept} unchanged, {len(changes)} change(s)")
            out += [f"  {c}" for c in changes]
        for key, b in sorted(self.buckets.items()):
            out.append(f"shape {key}: {S.format_rate(b.rate_bps)} ({b.source}) "
                       f"bucket {self.bucket_ids.get(key, '-')}")
        out += [f"tc: {c}" for c in self.tc_commands]
        if self.shaping_error:
            out.append(f"shaping disabled: {self.shaping_error}")
        out += [f"problem: {p}" for p in self.problems]
        return out


class Agent:
    def __init__(self, settings: NetacctSettings, source: PodSource, runner: Runner, *,
                 registry: CollectorRegistry | None = None, clock: Clock | None = None):
        self.settings = settings
        self.source = source
        self.runner = runner
        self.clock = clock or RealClock()
        self.names = Names(settings.domain)
        self.registry = registry or CollectorRegistry()
        self.metrics = AgentMetrics(self.registry)
        self.traffic = TrafficCollector(self.registry, pod_series=settings.pod_series,
                                        max_pod_series=settings.max_pod_series)
        # the agent's own metrics alone, for the scrape path (the traffic series are rendered apart)
        self._own = CollectorRegistry()
        for m in vars(self.metrics).values():
            self._own.register(m)
        # one reader of the counters at a time: an older snapshot folded after a
        # newer one would look like a counter reset
        self._read_lock = asyncio.Lock()
        self.tc = S.Tc(runner)
        self._ipt: Iptables | None = None
        self._pods: list[PodInfo] | None = None
        self._reported: set[tuple[str, str, str]] = set()

    async def iptables(self) -> Iptables:
        if self._ipt is None:
            self._ipt = Iptables(self.runner, await detect_backend(self.runner, self.settings.backend))
        return self._ipt

    async def _read_pods(self, report: SyncReport) -> list[PodInfo]:
        try:
            pods = await self.source.list()
        except Temporary as exc:
            self.metrics.source_errors.inc()
            if self._pods is None:
                raise
            log.warning("pod source unavailable, keeping the last known %d pods: %s", len(self._pods), exc)
            report.stale_pods = True
            return self._pods
        self._pods = pods
        self.metrics.pods_skipped.set(len(getattr(self.source, "last_skipped", []) or []))
        return pods

    def _report_problems(self, problems: list[S.Problem]) -> None:
        now = {(p.namespace, p.pod, p.value) for p in problems}
        for p in problems:
            if (p.namespace, p.pod, p.value) not in self._reported:
                log.warning("pod %s", p, extra={"namespace": p.namespace, "pod": p.pod})
        self._reported = now
        self.metrics.invalid_annotations.set(len(problems))

    async def _plan_shaping(self, pods: list[PodInfo], observed: SaveDump, report: SyncReport
                            ) -> tuple[dict[str, tuple[int, str]], S.TcState | None]:
        st = self.settings
        ids_seen = S.observed_bucket_ids(observed)
        tcstate: S.TcState | None = None
        previous: dict[str, int] = {}
        if st.uplink:
            tcstate = await self.tc.observe(st.uplink)
            if tcstate.ours:
                previous = {k: tcstate.classes[i].rate_bps for k, i in ids_seen.items() if i in tcstate.classes}
        limits = S.resolve_limits(pods, self.names, st.team_limits, st.namespace_limits, previous)
        report.problems = limits.problems
        self._report_problems(limits.problems)
        if not st.uplink:
            return {}, None
        ids, overflow = S.allocate(limits.buckets, ids_seen, st.max_buckets)
        if overflow:
            self.metrics.shaping_errors.labels("no-bucket-ids").inc()
            log.error("%d shaping bucket(s) left unshaped: at most %d buckets per node: %s",
                      len(overflow), st.max_buckets, ", ".join(overflow[:5]))
        report.buckets = {k: b for k, b in limits.buckets.items() if k in ids}
        report.bucket_ids = ids
        desired_tc = {ids[k]: b.rate_bps for k, b in report.buckets.items()}
        try:
            report.tc_commands = S.plan_tc(st.uplink, desired_tc, tcstate)
        except S.ForeignQdisc as exc:
            self.metrics.shaping_errors.labels("foreign-qdisc").inc()
            report.shaping_error = str(exc)
            report.buckets, report.bucket_ids = {}, {}
            log.error("shaping disabled: %s", exc)
            return {}, tcstate
        marks = {}
        for pod_key, bkey in limits.pod_bucket.items():
            if bkey in ids:
                marks[pod_key] = (ids[bkey], limits.buckets[bkey].scope)
        return marks, tcstate

    async def sync_once(self, *, dry_run: bool = False) -> SyncReport:
        """One pass. Raises Temporary when nothing could be done (no pods yet,
        iptables unavailable); keeps every existing rule in that case."""
        t0 = time.perf_counter()
        report = SyncReport()
        try:
            pods = await self._read_pods(report)
            report.pods = len(pods)
            ipt = await self.iptables()
            async with self._read_lock:
                observed = await ipt.save()
                self.traffic.observe(observed)
            marks, tcstate = await self._plan_shaping(pods, observed, report)
            desired = R.desired_rules(pods, self.settings.internal_ranges, marks, S.QDISC_MAJOR)
            plan = R.plan(desired, observed)
            report.rule_plan = plan
            if dry_run:
                return report
            if not plan.empty:
                await ipt.restore(plan.render())
                self.metrics.rule_changes.labels("add").inc(len(plan.appends))
                self.metrics.rule_changes.labels("delete").inc(len(plan.deletes))
                self.metrics.rule_changes.labels("rewrite").inc(len(plan.rewrite))
                self.metrics.rule_changes.labels("jump").inc(len(plan.jump_inserts) + len(plan.jump_deletes))
                log.info("rules synced: %d added, %d deleted, %d chains rewritten, %d unchanged",
                         len(plan.appends), len(plan.deletes), len(plan.rewrite), plan.kept)
            if report.tc_commands:
                try:
                    await self.tc.apply(report.tc_commands)
                except Temporary:
                    self.metrics.shaping_errors.labels("tc-failed").inc()
                    raise
                log.info("shaping synced on %s: %d tc command(s)", self.settings.uplink, len(report.tc_commands))
            self._observe_shaping(report, tcstate)
            self.metrics.rules.set(sum(len(v) for v in desired.chains.values()) + len(desired.jumps))
            self.metrics.pods.set(len(pods))
            self.metrics.shaped_buckets.set(len(report.buckets))
            self.metrics.last_sync.set(self.clock.now())
            self.metrics.syncs.labels("ok").inc()
            report.applied = True
            return report
        except Temporary:
            self.metrics.syncs.labels("error").inc()
            raise
        finally:
            self.metrics.sync_seconds.observe(time.perf_counter() - t0)

    def _observe_shaping(self, report: SyncReport, tcstate: S.TcState | None) -> None:
        out: dict[str, ShapedBucket] = {}
        classes = tcstate.classes if tcstate is not None and tcstate.ours else {}
        for key, b in report.buckets.items():
            c = classes.get(report.bucket_ids[key])
            out[key] = ShapedBucket(b.scope, b.namespace, b.pod, b.rate_bps,
                                    c.sent_bytes if c else 0, c.sent_packets if c else 0,
                                    c.dropped if c else 0, c.overlimits if c else 0)
        self.traffic.observe_shaping(out)

    async def refresh_stats(self) -> None:
        """Re-read every counter in one ``iptables-save -c`` call, changing nothing."""
        ipt = await self.iptables()
        async with self._read_lock:
            text = await ipt.save_text()
            try:
                self.traffic.observe_text(text)
            except ValueError as exc:
                raise Temporary(f"{ipt.save_cmd}: {exc}", delay=5) from None

    async def scrape(self) -> bytes:
        """The /metrics answer: counters read once, at scrape time, then rendered.
        If they cannot be read, the last values are served (and the failure logged)."""
        try:
            await self.refresh_stats()
        except Temporary as exc:
            log.warning("scrape: counters not refreshed: %s", exc)
        return generate_latest(self._own) + self.traffic.render().encode()

    async def uninstall(self) -> list[str]:
        """Remove every fleetkeeper chain, jump and the uplink's fleetkeeper qdisc."""
        ipt = await self.iptables()
        plan = R.plan_uninstall(await ipt.save())
        done = plan.summary()
        if not plan.empty:
            await ipt.restore(plan.render())
        if self.settings.uplink:
            st = await self.tc.observe(self.settings.uplink)
            if st.ours:
                await self.tc.apply([f"qdisc del dev {self.settings.uplink} root"])
                done.append(f"removed fleetkeeper qdisc on {self.settings.uplink}")
        return done

    async def run(self, stop: asyncio.Event | None = None) -> None:
        stop = stop or asyncio.Event()
        while not stop.is_set():
            delay = self.settings.interval_s
            try:
                await self.sync_once()
            except Temporary as exc:
                log.warning("sync failed: %s; again in %.0fs", exc, min(delay, exc.delay))
                delay = min(delay, max(exc.delay, 1.0))
            sleeper = asyncio.ensure_future(self.clock.sleep(delay))
            waiter = asyncio.ensure_future(stop.wait())
            try:
                await asyncio.wait({sleeper, waiter}, return_when=asyncio.FIRST_COMPLETED)
            finally:
                sleeper.cancel()
                waiter.cancel()
