"""Prometheus metrics of the netacct agent, on an injected registry.

Traffic counters come from the kernel's rule counters. The kernel loses a
counter when its rule goes (a pod leaves) or is recreated; summing the rules
of a namespace directly would then go *down* and look like a counter reset.
:class:`TrafficCollector` therefore accumulates per-rule deltas into its own
monotonic totals: namespace, team and node aggregates never go backwards and
keep the bytes of pods that have left. Pod-level series are optional and
capped (``max_pod_series``; pods already exported keep their series, new ones
beyond the cap are only in the aggregates, counted by
``fleetkeeper_netacct_pod_series_dropped``); a pod's series go when the pod goes.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from fleetkeeper.core.metrics import PREFIX
from fleetkeeper.netacct.iptables import SaveDump
from fleetkeeper.netacct.rules import COUNTING_CHAINS, DIRECTIONS, OWNER, TABLE, parse_exporter_comment

P = f"{PREFIX}_netacct"
NODE_DIRECTIONS = ("internet-in", "internet-out", "internal")


class AgentMetrics:
    """Health of the agent itself."""

    def __init__(self, registry: CollectorRegistry):
        self.syncs = Counter(f"{P}_syncs_total", "Sync passes by result", ["result"], registry=registry)
        self.sync_seconds = Histogram(f"{P}_sync_duration_seconds", "Duration of a sync pass",
                                      registry=registry,
                                      buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10))
        self.rule_changes = Counter(f"{P}_rule_changes_total", "Rule changes applied",
                                    ["op"], registry=registry)
        self.rules = Gauge(f"{P}_rules", "Rules in fleetkeeper's mangle chains", registry=registry)
        self.pods = Gauge(f"{P}_pods", "Pods accounted on this node", registry=registry)
        self.pods_skipped = Gauge(f"{P}_pods_skipped", "Pods in the pod source that could not be accounted",
                                  registry=registry)
        self.invalid_annotations = Gauge(f"{P}_invalid_annotations",
                                         "Pods whose egress-limit annotation is malformed (ignored)",
                                         registry=registry)
        self.source_errors = Counter(f"{P}_pod_source_errors_total", "Failed reads of the pod source",
                                     registry=registry)
        self.shaping_errors = Counter(f"{P}_shaping_errors_total", "Shaping that could not be applied",
                                      ["reason"], registry=registry)
        self.shaped_buckets = Gauge(f"{P}_shaping_buckets", "Egress shaping buckets on the uplink",
                                    registry=registry)
        self.last_sync = Gauge(f"{P}_last_sync_timestamp_seconds", "End of the last successful sync",
                               registry=registry)
        for result in ("ok", "error", "skipped"):
            self.syncs.labels(result)
        for op in ("add", "delete", "rewrite", "jump"):
            self.rule_changes.labels(op)
        for reason in ("foreign-qdisc", "tc-failed", "no-bucket-ids"):
            self.shaping_errors.labels(reason)


@dataclass
class _Acc:
    packets: int = 0
    bytes: int = 0

    def add(self, p: int, b: int) -> None:
        self.packets += p
        self.bytes += b


@dataclass
class ShapedBucket:
    scope: str
    namespace: str
    pod: str
    rate_bps: int
    sent_bytes: int
    sent_packets: int
    dropped: int
    overlimits: int


class TrafficCollector(Collector):
    """Turns snapshots of the counting rules into Prometheus series."""

    def __init__(self, registry: CollectorRegistry | None = None, *, pod_series: bool = True,
                 max_pod_series: int = 2000):
        self.pod_series = pod_series
        self.max_pod_series = max_pod_series
        self._last: dict[str, tuple[int, int]] = {}             # rule comment -> last counters
        self._pod: dict[tuple[str, str, str, str], _Acc] = {}     # (dir, ns, pod, team)
        self._exported_pods: set[tuple[str, str]] = set()
        self._dropped_pods = 0
        self._ns: dict[tuple[str, str], _Acc] = {}
        self._team: dict[tuple[str, str], _Acc] = {}
        self._node: dict[tuple[str, str], _Acc] = {
            (d, s): _Acc() for d in NODE_DIRECTIONS for s in ("host", "pods")
            if not (s == "host" and d == "internal")}
        self._shaping: dict[str, ShapedBucket] = {}
        self._shaping_acc: dict[str, list[int]] = {}
        self._shaping_last: dict[str, tuple[int, int, int, int]] = {}
        if registry is not None:
            registry.register(self)

    # ------------------------------------------------------------ feeding
    def observe(self, dump: SaveDump) -> None:
        """Fold a ``iptables-save -c`` snapshot into the totals."""
        seen: dict[str, tuple[int, int]] = {}
        pods_now: set[tuple[str, str]] = set()
        for rule in dump.table(TABLE).rules():
            labels = parse_exporter_comment(rule.comment)
            if not labels or labels.get("owner") != OWNER:
                continue
            key = f"{rule.chain}|{rule.comment}"
            if key in seen:  # a duplicate rule: count it once
                continue
            seen[key] = (rule.packets, rule.bytes)
            prev = self._last.get(key)
            if prev is None or rule.packets < prev[0] or rule.bytes < prev[1]:
                dp, db = rule.packets, rule.bytes      # new rule, or its counter was reset
            else:
                dp, db = rule.packets - prev[0], rule.bytes - prev[1]
            traffic = labels.get("traffic", "")
            if "pod" in labels and "ns" in labels:
                if traffic not in DIRECTIONS or rule.chain not in COUNTING_CHAINS:
                    continue
                ns, pod, team = labels["ns"], labels["pod"], labels.get("team", "none")
                pods_now.add((ns, pod))
                self._pod.setdefault((traffic, ns, pod, team), _Acc()).add(dp, db)
                self._ns.setdefault((traffic, ns), _Acc()).add(dp, db)
                self._team.setdefault((traffic, team), _Acc()).add(dp, db)
            elif labels.get("scope") in ("host", "pods") and traffic in NODE_DIRECTIONS:
                self._node.setdefault((traffic, labels["scope"]), _Acc()).add(dp, db)
        self._last = seen
        # pods that left lose their pod-level series (their bytes stay in the aggregates)
        for k in [k for k in self._pod if (k[1], k[2]) not in pods_now]:
            del self._pod[k]
        self._exported_pods &= pods_now
        dropped = 0
        for pk in sorted(pods_now - self._exported_pods):
            if len(self._exported_pods) < self.max_pod_series:
                self._exported_pods.add(pk)
            else:
                dropped += 1
        self._dropped_pods = dropped if self.pod_series else 0

    def observe_shaping(self, buckets: dict[str, ShapedBucket]) -> None:
        """Fold tc class stats (keyed by bucket key) into monotonic totals."""
        for key in list(self._shaping_acc):
            if key not in buckets:
                del self._shaping_acc[key]
                self._shaping_last.pop(key, None)
        for key, b in buckets.items():
            now = (b.sent_bytes, b.sent_packets, b.dropped, b.overlimits)
            prev = self._shaping_last.get(key)
            acc = self._shaping_acc.setdefault(key, [0, 0, 0, 0])
            reset = prev is None or any(n < p for n, p in zip(now, prev))
            for i in range(4):
                acc[i] += now[i] if reset else now[i] - prev[i]  # type: ignore[index]
            self._shaping_last[key] = now
        self._shaping = dict(buckets)

    def pod_totals(self) -> dict[tuple[str, str, str], tuple[int, int]]:
        """(direction, namespace, pod) -> (packets, bytes) of pods present now."""
        return {(d, ns, pod): (a.packets, a.bytes) for (d, ns, pod, _t), a in self._pod.items()}

    # ------------------------------------------------------------ scraping
    def describe(self) -> Iterable[Metric]:
        return []

    def collect(self) -> Iterable[Metric]:
        def pair(name: str, doc: str, labels: list[str]) -> tuple[CounterMetricFamily, CounterMetricFamily]:
            return (CounterMetricFamily(f"{P}_{name}_bytes", f"{doc} (bytes)", labels=labels),
                    CounterMetricFamily(f"{P}_{name}_packets", f"{doc} (packets)", labels=labels))

        nb, np_ = pair("node", "Traffic through this node by direction; scope host = the node's own "
                       "traffic (INPUT/OUTPUT), pods = forwarded pod traffic", ["direction", "scope"])
        for (d, s), acc in sorted(self._node.items()):
            nb.add_metric([d, s], acc.bytes)
            np_.add_metric([d, s], acc.packets)
        yield nb
        yield np_
        b, p = pair("namespace", "Pod traffic by namespace and direction", ["direction", "namespace"])
        for (d, ns), acc in sorted(self._ns.items()):
            b.add_metric([d, ns], acc.bytes)
            p.add_metric([d, ns], acc.packets)
        yield b
        yield p
        b, p = pair("team", "Pod traffic by team and direction", ["direction", "team"])
        for (d, t), acc in sorted(self._team.items()):
            b.add_metric([d, t], acc.bytes)
            p.add_metric([d, t], acc.packets)
        yield b
        yield p
        if self.pod_series:
            b, p = pair("pod", "Traffic by pod and direction", ["direction", "namespace", "pod", "team"])
            for (d, ns, pod, team), acc in sorted(self._pod.items()):
                if (ns, pod) in self._exported_pods:
                    b.add_metric([d, ns, pod, team], acc.bytes)
                    p.add_metric([d, ns, pod, team], acc.packets)
            yield b
            yield p
        g = GaugeMetricFamily(f"{P}_pod_series_dropped",
                              "Pods beyond max_pod_series, counted only in the aggregates")
        g.add_metric([], self._dropped_pods)
        yield g

        lbl = ["scope", "namespace", "pod"]
        limit = GaugeMetricFamily(f"{P}_shaping_limit_bits_per_second", "Internet egress limit of a bucket", labels=lbl)
        sent = CounterMetricFamily(f"{P}_shaping_sent_bytes", "Bytes sent through a shaping bucket", labels=lbl)
        sentp = CounterMetricFamily(f"{P}_shaping_sent_packets", "Packets sent through a shaping bucket", labels=lbl)
        drops = CounterMetricFamily(f"{P}_shaping_dropped_packets", "Packets dropped by a shaping bucket", labels=lbl)
        over = CounterMetricFamily(f"{P}_shaping_overlimits", "Times a bucket was over its limit (throttled)",
                                   labels=lbl)
        for key, bk in sorted(self._shaping.items()):
            acc = self._shaping_acc.get(key, [0, 0, 0, 0])
            lv = [bk.scope, bk.namespace, bk.pod]
            limit.add_metric(lv, bk.rate_bps)
            sent.add_metric(lv, acc[0])
            sentp.add_metric(lv, acc[1])
            drops.add_metric(lv, acc[2])
            over.add_metric(lv, acc[3])
        yield from (limit, sent, sentp, drops, over)
