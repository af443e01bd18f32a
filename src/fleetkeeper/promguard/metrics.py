"""The guard's own metrics, on an injected registry."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from fleetkeeper.core.metrics import PREFIX

ENDPOINTS = ("series", "labels", "label_values")
OUTCOMES = (
    "ok",            # forwarded and answered within the deadline and limit
    "truncated",     # answered, trimmed to the limit with a warning
    "unscoped",      # refused: selector without a metric name
    "bad_request",   # refused: unparsable selector, time or limit
    "wide_range",    # refused: time range too wide (on_wide_range=reject)
    "limit",         # refused: more results than the limit (on_limit=reject)
    "deadline",      # upstream cancelled at the deadline
    "busy",          # refused: too many guarded requests in flight
    "upstream_error",  # upstream unreachable or answered garbage
    "client_gone",   # the client disconnected; upstream cancelled
)


class GuardMetrics:
    def __init__(self, registry: CollectorRegistry):
        self.registry = registry
        p = f"{PREFIX}_promguard"
        self.requests = Counter(
            f"{p}_requests_total", "Guarded metadata requests by endpoint and outcome",
            ["endpoint", "outcome"], registry=registry,
        )
        self.duration = Histogram(
            f"{p}_request_duration_seconds", "Time to answer a guarded request",
            ["endpoint"], registry=registry,
            buckets=(0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
        )
        self.clamped = Counter(
            f"{p}_rewrites_total", "Requests whose time range or limit the guard rewrote",
            ["endpoint", "what"], registry=registry,
        )
        self.inflight = Gauge(
            f"{p}_inflight_requests", "Guarded requests waiting on the upstream", registry=registry,
        )
        self.passthrough = Counter(
            f"{p}_passthrough_requests_total", "Requests proxied untouched, by HTTP status class",
            ["code_class"], registry=registry,
        )
        for e in ENDPOINTS:
            for o in OUTCOMES:
                self.requests.labels(e, o)
            self.duration.labels(e)
            for w in ("start", "limit"):
                self.clamped.labels(e, w)
        for c in ("2xx", "3xx", "4xx", "5xx", "error"):
            self.passthrough.labels(c)
