"""Prometheus metrics of the relay and the join pacer, on an injected registry.

Hub counters are plain ints inside :class:`~fleetkeeper.relay.hub.Hub` (it
does no I/O); :class:`HubCollector` exposes them at scrape time.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from fleetkeeper.core.metrics import PREFIX
from fleetkeeper.relay.hub import KIND_NODE, KIND_POD, KIND_TEAMS, Hub

P = f"{PREFIX}_relay"
ENDPOINTS = ("node", "pods", "teams", "view", "watch", "poll")
AUTH_RESULTS = ("allowed", "unauthenticated", "forbidden", "error")
JOIN_RESULTS = ("done", "conflict", "error", "dry_run")


class HubCollector(Collector):
    def __init__(self, hub: Hub, upstream_watches: Callable[[], int]):
        self.hub = hub
        self.upstream_watches = upstream_watches

    def collect(self) -> Iterable[Metric]:
        h, st = self.hub, self.hub.stats
        g = GaugeMetricFamily(f"{P}_subscribers", "Agents watching through the relay now")
        g.add_metric([], h.subscribers)
        yield g
        g = GaugeMetricFamily(f"{P}_nodes", "Nodes the relay holds a view for")
        g.add_metric([], len(h.entries))
        yield g
        g = GaugeMetricFamily(f"{P}_upstream_watches", "Watches the relay holds on the API server")
        g.add_metric([], self.upstream_watches())
        yield g
        c = CounterMetricFamily(f"{P}_upstream_events", "Events received from the API server", labels=["kind"])
        for kind in (KIND_NODE, KIND_POD, KIND_TEAMS):
            c.add_metric([kind], st.upstream_events[kind])
        yield c
        c = CounterMetricFamily(f"{P}_suppressed_events", "Upstream updates that changed nothing an agent sees "
                                "(heartbeats, status fields outside the projection)")
        c.add_metric([], st.suppressed)
        yield c
        c = CounterMetricFamily(f"{P}_events_fanned_out", "Events delivered to subscribers' buffers")
        c.add_metric([], st.fanned_out)
        yield c
        c = CounterMetricFamily(f"{P}_dropped_subscribers", "Subscribers dropped because their buffer was full")
        c.add_metric([], st.dropped)
        yield c
        c = CounterMetricFamily(f"{P}_gone", "Watch resumes answered 410 Gone (the agent relists)")
        c.add_metric([], st.gone)
        yield c


class RelayMetrics:
    def __init__(self, registry: CollectorRegistry):
        self.registry = registry
        self.requests = Counter(f"{P}_requests_total", "Agent requests by endpoint and HTTP code",
                                ["endpoint", "code"], registry=registry)
        self.bytes_sent = Counter(f"{P}_bytes_sent_total", "Response bytes sent to agents", ["endpoint"],
                                  registry=registry)
        self.auth = Counter(f"{P}_auth_total", "Authentication and authorisation decisions", ["result"],
                            registry=registry)
        self.token_reviews = Counter(f"{P}_token_reviews_total", "TokenReviews sent to the API server (cache misses)",
                                     registry=registry)
        self.refused = Counter(f"{P}_refused_total", "Agent requests answered 503 with Retry-After because the "
                               "relay was behind (reason: lag, inflight)", ["reason"], registry=registry)
        self.inflight = Gauge(f"{P}_inflight_requests", "Agent requests being answered now", registry=registry)
        self.loop_lag = Gauge(f"{P}_loop_lag_seconds", "How late the relay's event loop runs a timer",
                              registry=registry)
        self.open_files_limit = Gauge(f"{P}_open_files_limit", "The relay process's soft RLIMIT_NOFILE",
                                      registry=registry)
        for ep in ENDPOINTS:
            self.bytes_sent.labels(ep)
            for code in ("200", "401", "403", "404", "410", "499", "503"):
                self.requests.labels(ep, code)
        for r in ("lag", "inflight"):
            self.refused.labels(r)
        for r in AUTH_RESULTS:
            self.auth.labels(r)
        self._hub_collector: HubCollector | None = None

    def attach_server(self, inflight: Callable[[], float], lag: Callable[[], float]) -> None:
        self.inflight.set_function(inflight)
        self.loop_lag.set_function(lag)

    def attach_hub(self, hub: Hub, upstream_watches: Callable[[], int]) -> None:
        if self._hub_collector is None:
            self._hub_collector = HubCollector(hub, upstream_watches)
            self.registry.register(self._hub_collector)


class PacerMetrics:
    def __init__(self, registry: CollectorRegistry):
        self.joins = Counter(f"{P}_join_work_total", "Per-node join work by result", ["result"], registry=registry)
        self.writes = Counter(f"{P}_join_writes_total", "API writes made by join work", ["kind"], registry=registry)
        self.wait = Histogram(f"{P}_join_wait_seconds", "Time a node waited for a pacing token",
                              registry=registry, buckets=(0.01, 0.1, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300))
        self.pending = Gauge(f"{P}_join_pending", "Nodes whose join work is not done yet", registry=registry)
        self.rate = Gauge(f"{P}_join_rate_limit", "Configured join rate (nodes per second; 0 = unpaced)",
                          registry=registry)
        for r in JOIN_RESULTS:
            self.joins.labels(r)
        for k in ("node_patch", "bootstrap_pod"):
            self.writes.labels(k)
