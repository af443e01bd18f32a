"""Admission webhooks: one TLS server, pure handlers.

A handler is a plain function ``(AdmissionRequest) -> Admission`` (no I/O;
it may be a coroutine that waits briefly for an informer cache),
so it is unit-tested directly and timed in process. :class:`WebhookServer`
serves handlers over HTTPS (aiohttp), records latency and results, and
:func:`registration` builds the Mutating/ValidatingWebhookConfiguration that
registers them by URL (local control plane) or by Service (in-cluster).
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import inspect
import logging
import ssl
import time
import weakref
from typing import Any

import orjson
from aiohttp import web
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from fleetkeeper.core.admission import (  # noqa: F401 - re-exported for the servers' callers
    Admission,
    AdmissionRequest,
    Handler,
    json_patch_path,
)
from fleetkeeper.core.metrics import PREFIX

log = logging.getLogger("fleetkeeper.webhook")


_METRICS_BY_REGISTRY = weakref.WeakKeyDictionary()


def webhook_metrics(registry: CollectorRegistry) -> "WebhookMetrics":
    """One set of webhook collectors per registry, shared by every WebhookServer on it."""
    m = _METRICS_BY_REGISTRY.get(registry)
    if m is None:
        m = _METRICS_BY_REGISTRY[registry] = WebhookMetrics(registry)
    return m


class WebhookMetrics:
    def __init__(self, registry: CollectorRegistry):
        self.cert_reloads = Counter(f"{PREFIX}_webhook_certificate_reloads_total",
                                    "Serving certificate reloads after its files changed, by result",
                                    ["result"], registry=registry)
        self.cert_expiry = Gauge(f"{PREFIX}_webhook_certificate_expiry_timestamp_seconds",
                                 "notAfter of the serving certificate in use", registry=registry)
        for r in ("loaded", "error"):
            self.cert_reloads.labels(r)
        self.requests = Counter(f"{PREFIX}_webhook_requests_total", "Admission requests by webhook and result",
                                ["webhook", "result"], registry=registry)
        self.latency = Histogram(f"{PREFIX}_webhook_duration_seconds", "Admission handler latency", ["webhook"],
                                 registry=registry,
                                 buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.5, 1))

    def init(self, name: str) -> None:
        for r in ("allowed", "patched", "denied", "error"):
            self.requests.labels(name, r)
        self.latency.labels(name)


class CertWatcher:
    """Keeps an :class:`ssl.SSLContext` serving the certificate and key currently in
    two files, as controller-runtime's certwatcher does: the files are polled (a
    mounted Secret is updated by swapping a symlink, which no inotify watch on the
    files themselves sees), and a changed pair is loaded into the live context, so
    new connections get the new certificate without a restart. A half-written or
    mismatched pair is tried in a scratch context first and never replaces a good one."""

    def __init__(self, cert: str, key: str, metrics: "WebhookMetrics", *, interval: float = 10.0):
        self.cert, self.key, self.metrics, self.interval = cert, key, metrics, interval
        self.context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        self._seen = b""
        self.reloads = 0
        self.load(initial=True)

    def _fingerprint(self) -> bytes:
        with open(self.cert, "rb") as c, open(self.key, "rb") as k:
            return hashlib.sha256(c.read() + b"\0" + k.read()).digest()

    def load(self, *, initial: bool = False) -> bool:
        """Load the files when they changed; True when a new pair is now served."""
        try:
            seen = self._fingerprint()
            if seen == self._seen:
                return False
            scratch = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
            scratch.load_cert_chain(self.cert, self.key)  # raises on a mismatched or partial pair
            self.context.load_cert_chain(self.cert, self.key)
        except (OSError, ssl.SSLError) as exc:
            if initial:
                raise
            self.metrics.cert_reloads.labels("error").inc()
            log.warning("webhook certificate %s not reloaded (the one in use stays): %s", self.cert, exc)
            return False
        self._seen = seen
        self._record_expiry()
        if not initial:
            self.reloads += 1
            self.metrics.cert_reloads.labels("loaded").inc()
            log.info("webhook certificate %s reloaded", self.cert)
        return True

    def _record_expiry(self) -> None:
        try:
            from cryptography import x509

            with open(self.cert, "rb") as f:
                leaf = x509.load_pem_x509_certificate(f.read())
            self.metrics.cert_expiry.set(leaf.not_valid_after_utc.timestamp())
        except (OSError, ValueError):
            pass

    async def run(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            self.load()


class WebhookServer:
    """HTTPS server for admission handlers at ``/<name>``. The serving certificate is
    reloaded when its files change (:class:`CertWatcher`)."""

    def __init__(self, cert: str, key: str, *, host: str = "127.0.0.1", port: int = 0,
                 registry: CollectorRegistry | None = None, cert_reload_interval: float = 10.0):
        self.cert, self.key, self.host, self.port = cert, key, host, port
        self.metrics = webhook_metrics(registry or CollectorRegistry())
        self.app = web.Application(client_max_size=8 * 1024 * 1024)
        self.handlers: dict[str, Handler] = {}
        self._runner: web.AppRunner | None = None
        self.cert_reload_interval = cert_reload_interval
        self.certs: CertWatcher | None = None
        self._watch: "asyncio.Task | None" = None

    def add(self, name: str, handler: Handler) -> None:
        self.handlers[name] = handler
        self.metrics.init(name)

        async def serve(request: web.Request) -> web.Response:
            t0 = time.perf_counter()
            try:
                review = orjson.loads(await request.read())
                req = AdmissionRequest.from_review(review)
            except (ValueError, KeyError) as exc:
                self.metrics.requests.labels(name, "error").inc()
                return web.Response(status=400, text=f"bad AdmissionReview: {exc}")
            try:
                result = handler(req)
                if inspect.isawaitable(result):  # a handler that may wait for a cache (no I/O)
                    result = await result
            except Exception as exc:  # a handler bug must answer, not hang the API server
                log.exception("webhook %s failed on %s/%s", name, req.namespace, req.name)
                result = Admission(False, f"fleetkeeper webhook {name} internal error: {exc}", code=500)
                self.metrics.requests.labels(name, "error").inc()
            else:
                self.metrics.requests.labels(
                    name, "denied" if not result.allowed else ("patched" if result.patch else "allowed")).inc()
            self.metrics.latency.labels(name).observe(time.perf_counter() - t0)
            return web.Response(body=orjson.dumps(result.response(req.uid)), content_type="application/json")

        self.app.router.add_post(f"/{name}", serve)

    async def start(self) -> None:
        self.certs = CertWatcher(self.cert, self.key, self.metrics, interval=self.cert_reload_interval)
        self._runner = web.AppRunner(self.app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.host, self.port, ssl_context=self.certs.context)
        await site.start()
        if self.port == 0:
            self.port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        self._watch = asyncio.ensure_future(self.certs.run())

    async def stop(self) -> None:
        if self._watch:
            self._watch.cancel()
            await asyncio.gather(self._watch, return_exceptions=True)
            self._watch = None
        if self._runner:
            await self._runner.cleanup()

    def url(self, name: str) -> str:
        return f"https://{self.host}:{self.port}/{name}"


def registration(kind: str, config_name: str, webhooks: list[dict]) -> dict:
    """A MutatingWebhookConfiguration (kind="mutating") or ValidatingWebhookConfiguration."""
    k = "MutatingWebhookConfiguration" if kind == "mutating" else "ValidatingWebhookConfiguration"
    return {"apiVersion": "admissionregistration.k8s.io/v1", "kind": k, "metadata": {"name": config_name},
            "webhooks": webhooks}


def webhook_entry(name: str, *, url: str | None = None, service: dict | None = None, ca_bundle: bytes,
                  rules: list[dict], failure_policy: str, timeout_seconds: int = 2,
                  namespace_selector: dict | None = None, object_selector: dict | None = None,
                  reinvocation: str | None = None, side_effects: str = "None") -> dict:
    client: dict[str, Any] = {"caBundle": base64.b64encode(ca_bundle).decode()}
    if url:
        client["url"] = url
    else:
        client["service"] = service
    entry: dict[str, Any] = {
        "name": name, "clientConfig": client, "rules": rules, "failurePolicy": failure_policy,
        "sideEffects": side_effects, "admissionReviewVersions": ["v1"], "timeoutSeconds": timeout_seconds,
    }
    if namespace_selector is not None:
        entry["namespaceSelector"] = namespace_selector
    if object_selector is not None:
        entry["objectSelector"] = object_selector
    if reinvocation:
        entry["reinvocationPolicy"] = reinvocation
    return entry
