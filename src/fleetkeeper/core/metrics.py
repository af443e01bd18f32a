"""Runtime metric names, in one place, on an injected registry.

Every collector takes ``registry=``; tests build a fresh
:class:`prometheus_client.CollectorRegistry`. Label sets known up front are
pre-initialised (``.labels(...)`` without ``inc``) so series exist before the
first event. Components keep their own metric definitions in their own
``metrics`` module, built the same way on the same registry.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

PREFIX = "fleetkeeper"


class ApiMetrics:
    """Requests to the Kubernetes API server, by verb, resource and HTTP code."""

    def __init__(self, registry: CollectorRegistry):
        self.requests = Counter(
            f"{PREFIX}_api_requests_total", "Requests sent to the Kubernetes API server",
            ["verb", "resource", "code"], registry=registry,
        )
        self.latency = Histogram(
            f"{PREFIX}_api_request_duration_seconds", "Latency of Kubernetes API requests",
            ["verb"], registry=registry, buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
        )

    def observe(self, verb: str, resource: str, code: str, seconds: float) -> None:
        self.requests.labels(verb, resource, code).inc()
        self.latency.labels(verb).observe(seconds)


class RuntimeMetrics:
    """Controllers, queues and informers."""

    def __init__(self, registry: CollectorRegistry):
        self.registry = registry
        self.api = ApiMetrics(registry)
        self.reconciles = Counter(
            f"{PREFIX}_reconcile_total", "Reconciles by controller and result",
            ["controller", "result"], registry=registry,
        )
        self.reconcile_seconds = Histogram(
            f"{PREFIX}_reconcile_duration_seconds", "Reconcile latency",
            ["controller"], registry=registry,
            buckets=(0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1, 5, 10, 30),
        )
        self.queue_depth = Gauge(
            f"{PREFIX}_workqueue_depth", "Keys waiting in a work queue", ["controller"], registry=registry,
        )
        self.queue_retries = Counter(
            f"{PREFIX}_workqueue_retries_total", "Keys requeued after an error", ["controller"], registry=registry,
        )
        self.informer_events = Counter(
            f"{PREFIX}_informer_events_total", "Watch events applied to an informer cache",
            ["resource", "type"], registry=registry,
        )
        self.informer_relists = Counter(
            f"{PREFIX}_informer_relists_total", "Full relists (start, 410 Gone, errors)",
            ["resource", "reason"], registry=registry,
        )
        self.informer_objects = Gauge(
            f"{PREFIX}_informer_objects", "Objects held in an informer cache", ["resource"], registry=registry,
        )
        self.leader = Gauge(
            f"{PREFIX}_leader", "1 while this process holds the leader lease", ["lease"], registry=registry,
        )
        self.events_emitted = Counter(
            f"{PREFIX}_events_total", "Kubernetes Events emitted", ["reason", "type"], registry=registry,
        )
        self.events_dropped = Counter(
            f"{PREFIX}_events_dropped_total",
            "Kubernetes Events not recorded: the recorder's sink was full (queue_full) or the API server refused "
            "the write (error)", ["reason", "cause"], registry=registry,
        )

    def init_controller(self, name: str) -> None:
        for result in ("success", "error", "requeue"):
            self.reconciles.labels(name, result)
        self.queue_depth.labels(name).set(0)
        self.queue_retries.labels(name)
        self.reconcile_seconds.labels(name)
