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

import re
from collections.abc import Iterable
from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from fleetkeeper.core.metrics import PREFIX
from fleetkeeper.netacct.iptables import SaveDump, canonical_tokens, comment_of
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


_NODE_DOC = ("Traffic through this node by direction; scope host = the node's own "
             "traffic (INPUT/OUTPUT), pods = forwarded pod traffic")
_SHAPING = (  # name, type, help, value from (rate, [sent bytes, sent packets, dropped, overlimits])
    ("shaping_limit_bits_per_second", "gauge", "Internet egress limit of a bucket", lambda r, a: r),
    ("shaping_sent_bytes", "counter", "Bytes sent through a shaping bucket", lambda r, a: a[0]),
    ("shaping_sent_packets", "counter", "Packets sent through a shaping bucket", lambda r, a: a[1]),
    ("shaping_dropped_packets", "counter", "Packets dropped by a shaping bucket", lambda r, a: a[2]),
    ("shaping_overlimits", "counter", "Times a bucket was over its limit (throttled)", lambda r, a: a[3]),
)
_ROW_RE = re.compile(r"^\[(\d+):(\d+)\] -A (.*)$", re.M)


@dataclass(frozen=True)
class _Counted:
    """What one counting rule feeds, resolved once from its comment."""

    key: str                     # chain|comment: duplicates of a rule count once
    accs: tuple[_Acc, ...]       # the totals its deltas go to
    pod: tuple[str, str] | None  # (namespace, pod) of a pod rule


_SKIP = object()  # a rule that is not ours, or not a counting rule


def _escape(v: str) -> str:
    return v.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _series(name: str, names: Iterable[str], values: Iterable[str]) -> str:
    """``name{a="x",b="y"} `` -- a sample line without its value."""
    pairs = ",".join(k + '="' + _escape(v) + '"' for k, v in zip(names, values))
    return name + "{" + pairs + "} " if pairs else name + " "


class TrafficCollector(Collector):
    """Turns snapshots of the counting rules into Prometheus series.

    A scrape at 10,000 rules must cost little, so per rule there is one dict
    lookup of the saved line (resolved to its totals the first time it is
    seen) and an integer subtraction; the series text is built once per
    series and reused (:meth:`render`). :meth:`collect` gives the same samples
    through prometheus_client for registries and tests.
    """

    def __init__(self, registry: CollectorRegistry | None = None, *, pod_series: bool = True,
                 max_pod_series: int = 2000):
        self.pod_series = pod_series
        self.max_pod_series = max_pod_series
        self._rules: dict[str, _Counted | object] = {}             # saved "CHAIN spec" -> what it feeds
        self._last: dict[str, tuple[int, int]] = {}             # rule key -> last counters
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
        self._text: list[tuple[str, bool, list[tuple[str, _Acc]]]] | None = None  # render cache
        if registry is not None:
            registry.register(self)

    # ------------------------------------------------------------ feeding
    def observe(self, dump: SaveDump) -> None:
        """Fold a parsed ``iptables-save -c`` snapshot into the totals."""
        self._fold([(r.packets, r.bytes, f"{r.chain} {r.spec}") for r in dump.table(TABLE).rules()])

    def observe_text(self, text: str) -> None:
        """Fold raw ``iptables-save -c -t mangle`` output into the totals: one
        regular-expression pass over the text, no full parse."""
        start = text.find(f"*{TABLE}\n")
        if start < 0:
            if text.strip():
                raise ValueError(f"no *{TABLE} table in iptables-save output")
            start = 0
        end = text.find("\nCOMMIT", start)
        self._fold(_ROW_RE.findall(text, start, len(text) if end < 0 else end))

    def _resolve(self, line: str) -> _Counted | object:
        chain, _, spec = line.partition(" ")
        if "iptables-exporter" not in spec:
            return _SKIP
        comment = comment_of(canonical_tokens(spec))
        labels = parse_exporter_comment(comment)
        if not labels or labels.get("owner") != OWNER:
            return _SKIP
        traffic = labels.get("traffic", "")
        key = f"{chain}|{comment}"
        if "pod" in labels and "ns" in labels:
            if traffic not in DIRECTIONS or chain not in COUNTING_CHAINS:
                return _SKIP
            ns, pod, team = labels["ns"], labels["pod"], labels.get("team", "none")
            pk = (traffic, ns, pod, team)
            if pk not in self._pod or (traffic, ns) not in self._ns or (traffic, team) not in self._team:
                self._text = None
            return _Counted(key, (self._pod.setdefault(pk, _Acc()), self._ns.setdefault((traffic, ns), _Acc()),
                                  self._team.setdefault((traffic, team), _Acc())), (ns, pod))
        if labels.get("scope") in ("host", "pods") and traffic in NODE_DIRECTIONS:
            if (traffic, labels["scope"]) not in self._node:
                self._text = None
            return _Counted(key, (self._node.setdefault((traffic, labels["scope"]), _Acc()),), None)
        return _SKIP

    def _fold(self, rows: list[tuple[str | int, str | int, str]]) -> None:
        """``rows``: (packets, bytes, "CHAIN spec") of every saved rule."""
        rules, last, resolve = self._rules, self._last, self._resolve
        seen: dict[str, tuple[int, int]] = {}
        new = False
        for p, b, line in rows:
            r = rules.get(line)
            if r is None:
                r = rules[line] = resolve(line)
                new = True
            if r is _SKIP:
                continue
            key = r.key  # type: ignore[union-attr]
            if key in seen:  # a duplicate rule: count it once
                continue
            p, b = int(p), int(b)
            seen[key] = (p, b)
            prev = last.get(key)
            if prev is None or p < prev[0] or b < prev[1]:
                dp, db = p, b      # new rule, or its counter was reset
            else:
                dp, db = p - prev[0], b - prev[1]
            if dp or db:
                for acc in r.accs:  # type: ignore[union-attr]
                    acc.packets += dp
                    acc.bytes += db
        self._last = seen
        if new or len(rows) != len(rules):  # rules came or went
            present = {line for _, _, line in rows}
            if len(present) != len(rules):
                self._rules = {line: r for line, r in rules.items() if line in present}
            self._membership()

    def _membership(self) -> None:
        pods_now = {r.pod for r in self._rules.values() if r is not _SKIP and r.pod}  # type: ignore[union-attr]
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
        self._text = None

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
    def render(self) -> str:
        """The Prometheus text exposition of :meth:`collect`'s samples, built
        from series text cached until a series comes or goes."""
        if self._text is None:
            self._text = self._families()
        out: list[str] = []
        for head, is_bytes, rows in self._text:
            out.append(head)
            out.extend([f"{prefix}{acc.bytes}\n" for prefix, acc in rows] if is_bytes
                       else [f"{prefix}{acc.packets}\n" for prefix, acc in rows])
        out.append(f"# HELP {P}_pod_series_dropped Pods beyond max_pod_series, counted only in the aggregates\n"
                   f"# TYPE {P}_pod_series_dropped gauge\n{P}_pod_series_dropped {self._dropped_pods}\n")
        lbl = ("scope", "namespace", "pod")
        shaping = [(_series("", lbl, (bk.scope, bk.namespace, bk.pod))[:-1], bk.rate_bps,
                    self._shaping_acc.get(key, [0, 0, 0, 0])) for key, bk in sorted(self._shaping.items())]
        for name, kind, doc, value in _SHAPING:
            sample = f"{P}_{name}_total" if kind == "counter" else f"{P}_{name}"
            out.append(f"# HELP {sample} {doc}\n# TYPE {sample} {kind}\n")
            out.extend(f"{sample}{labels} {value(rate, acc)}\n" for labels, rate, acc in shaping)
        return "".join(out)

    def _families(self) -> list[tuple[str, bool, list[tuple[str, _Acc]]]]:
        """(HELP and TYPE lines, bytes or packets, [(series text, totals)]) of each family."""
        fams: list[tuple[str, bool, list[tuple[str, _Acc]]]] = []

        def pair(name: str, doc: str, labels: tuple[str, ...], items) -> None:
            for unit in ("bytes", "packets"):
                full = f"{P}_{name}_{unit}"
                head = f"# HELP {full}_total {doc} ({unit})\n# TYPE {full}_total counter\n"
                fams.append((head, unit == "bytes", [(_series(f"{full}_total", labels, k), acc) for k, acc in items]))

        pair("node", _NODE_DOC, ("direction", "scope"), sorted(self._node.items()))
        pair("namespace", "Pod traffic by namespace and direction", ("direction", "namespace"),
             sorted(self._ns.items()))
        pair("team", "Pod traffic by team and direction", ("direction", "team"), sorted(self._team.items()))
        if self.pod_series:
            pair("pod", "Traffic by pod and direction", ("direction", "namespace", "pod", "team"),
                 [(k, acc) for k, acc in sorted(self._pod.items()) if (k[1], k[2]) in self._exported_pods])
        return fams

    def describe(self) -> Iterable[Metric]:
        return []

    def collect(self) -> Iterable[Metric]:
        def pair(name: str, doc: str, labels: list[str]) -> tuple[CounterMetricFamily, CounterMetricFamily]:
            return (CounterMetricFamily(f"{P}_{name}_bytes", f"{doc} (bytes)", labels=labels),
                    CounterMetricFamily(f"{P}_{name}_packets", f"{doc} (packets)", labels=labels))

        nb, np_ = pair("node", _NODE_DOC, ["direction", "scope"])
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
