"""Admission webhooks: one TLS server per process, pure handlers.

A handler is a plain function ``(AdmissionRequest) -> Admission`` (no I/O;
it may be a coroutine that waits briefly for an informer cache),
so it is unit-tested directly and timed in process. :class:`WebhookServer`
serves handlers over HTTPS (aiohttp), records latency and results, and
:func:`registration` builds the Mutating/ValidatingWebhookConfiguration that
registers them by URL (local control plane) or by Service (in-cluster).
:class:`SharedWebhooks` is the manager's one server: every component of a
process registers its handlers (paths) on it, with one port and one
certificate.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import inspect
import logging
import socket
import ssl
import tempfile
import threading
import time
import weakref
from dataclasses import dataclass
from collections.abc import Coroutine
from pathlib import Path
from typing import Any, TypeVar

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
from fleetkeeper.core.pki import ServingCert, mounted_serving_cert, write_serving_cert

log = logging.getLogger("fleetkeeper.webhook")
T = TypeVar("T")


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
        site = _TLSSite(self._runner, self.host, self.port, ssl_context=self.certs.context)
        await site.start()
        if self.port == 0:
            self.port = site.port
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


@dataclass
class WebhookAsk:
    """What one component asks of the manager's webhook server."""

    component: str
    paths: tuple[str, ...]
    host: str | None = None  # bind address it would use alone (None: no preference)
    port: int | None = None  # 0: any free port; None: no preference
    hosts: tuple[str, ...] = ()  # names (DNS or IP) the certificate must cover for its registration
    mounted: ServingCert | None = None  # a certificate someone else made (cert-manager, the chart)
    cert_dir: Path | None = None  # where a self-signed certificate may be written


def resolve_bind(asks: list[WebhookAsk], host: str | None = None, port: int | None = None
                 ) -> tuple[str, int, list[str]]:
    """(host, port, warnings) of the one server for these asks. Explicit settings win; otherwise a
    wildcard bind covers a loopback one, a fixed port wins over "any free port", and of two fixed ports
    the first component's is served (the other is named in a warning: its registration follows the
    server's real port when it registers by URL)."""
    warnings: list[str] = []
    if host is None:
        hs = [a.host for a in asks if a.host]
        host = "0.0.0.0" if "0.0.0.0" in hs else (hs[0] if hs else "127.0.0.1")
        others = sorted({h for h in hs if h not in (host, "0.0.0.0")})
        if others and host != "0.0.0.0":
            warnings.append(f"webhook bind addresses {others} asked too; serving on {host}")
    if port is None:
        fixed = [(a.component, a.port) for a in asks if a.port]
        port = fixed[0][1] if fixed else 0
        for comp, p in fixed[1:]:
            if p != port:
                warnings.append(f"{comp} asked for webhook port {p}; every webhook of this process is served "
                                f"on {port} ({fixed[0][0]}'s)")
    return host, port, warnings


# How long a closing TLS connection waits for the client's close_notify before it is
# aborted. asyncio's default (30 s) outlives the serving thread's settle limit below,
# which would leave a kube-apiserver keep-alive connection mid-close when the loop
# stops: an unclosed transport for the garbage collector.
SSL_SHUTDOWN_TIMEOUT_S = 3.0


class _TLSSite(web.TCPSite):
    """aiohttp's TCP site, with a bounded TLS shutdown (:data:`SSL_SHUTDOWN_TIMEOUT_S`)."""

    async def start(self) -> None:
        await web.BaseSite.start(self)  # registers the site with its runner
        server = self._runner.server
        assert server is not None
        self._server = await asyncio.get_running_loop().create_server(
            server, self._host, self._port, ssl=self._ssl_context, backlog=self._backlog,
            reuse_address=self._reuse_address, reuse_port=self._reuse_port,
            ssl_shutdown_timeout=SSL_SHUTDOWN_TIMEOUT_S if self._ssl_context else None)
        sockets = self._server.sockets
        self._bound_port = sockets[0].getsockname()[1] if sockets else self._port


class ServingThread:
    """An event loop of its own in a daemon thread. The webhook server's TLS, HTTP
    and handlers run there, so a busy manager loop (an informer decoding a burst of
    watch events, a teams pass over 7,500 nodes) never sits between kube-apiserver
    and an answer; the two threads only share the GIL, which the interpreter hands
    over every few milliseconds. Handlers run in this thread: they read the
    manager's caches only in ways that are safe from another thread (single
    lookups, references swapped whole), and anything that must wait on the
    manager's loop goes through :func:`asyncio.run_coroutine_threadsafe`."""

    def __init__(self, name: str = "webhooks", settle_s: float = 10.0):
        self.settle_s = settle_s
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._main, name=name, daemon=True)
        self._thread.start()

    def _main(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.loop.run_forever()
        self.loop.close()

    async def call(self, coro: Coroutine[Any, Any, T]) -> T:
        """Run ``coro`` on this thread's loop and wait for it from the caller's loop."""
        return await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(coro, self.loop))

    async def close(self) -> None:
        """Stop the loop once the connections it served have finished closing."""
        if self.loop.is_closed() or not self._thread.is_alive():
            return
        await self.call(_settle(self.settle_s))
        self.loop.call_soon_threadsafe(self.loop.stop)
        await asyncio.to_thread(self._thread.join, 10)


def _open_transports(loop: asyncio.AbstractEventLoop) -> list[asyncio.BaseTransport]:
    """Every socket transport of a selector loop whose socket is not closed yet, from the loop's own
    registry of them by file descriptor (what it checks before reusing a descriptor). The selector
    alone does not see them all: a transport whose reading is paused (a request body larger than the
    buffers, a TLS layer holding back) is watched by nothing while it stays open."""
    registry = getattr(loop, "_transports", None) or {}
    return [t for t in list(registry.values()) if getattr(t, "_sock", None) is not None]


async def _settle(limit_s: float = 10.0) -> None:
    """Run this loop until the sockets it still watches are closed (a stopped TLS
    server's connections finish their close_notify exchange with the client on the
    loop), up to ``limit_s``; then cancel what is left, give the closes that starts
    their bounded TLS shutdown, and abort whatever is still open. A loop stopped
    earlier would leave those sockets to the garbage collector: a connection whose
    handshake ended after the server's shutdown is one the server cannot close."""
    loop = asyncio.get_running_loop()
    await _drained(loop, limit_s)
    rest = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
    for t in rest:
        t.cancel()
    await asyncio.gather(*rest, return_exceptions=True)
    if not await _drained(loop, SSL_SHUTDOWN_TIMEOUT_S + 1.0):
        for what in _still_open(loop):
            log.warning("webhook server: closing %r, still open as the serving thread stops", what)
            if isinstance(what, asyncio.BaseTransport):
                what.abort()  # type: ignore[attr-defined]
            else:
                loop.remove_reader(what)
                what.close()
        for _ in range(3):  # aborts finish on the loop (connection_lost)
            await asyncio.sleep(0)


async def _drained(loop: asyncio.AbstractEventLoop, limit_s: float) -> bool:
    """Wait up to ``limit_s`` until the loop watches no socket but its own wake-up socket and every
    transport it made is closed."""
    selector = getattr(loop, "_selector", None)
    if selector is None:
        return True

    def idle() -> bool:
        return len(selector.get_map()) <= 1 and not _open_transports(loop)
    for _ in range(max(1, int(limit_s / 0.02))):
        if idle():
            return True
        await asyncio.sleep(0.02)
    return idle()


def _still_open(loop: asyncio.AbstractEventLoop) -> list[Any]:
    """The transports still open and the listening sockets of a selector loop. asyncio keeps no list of a
    server's connections before 3.13 (``Server.abort_clients``): the transports come from the loop's
    registry of them by descriptor (:func:`_open_transports`, which every selector transport joins), the
    listeners from the ``_accept_connection`` callbacks the loop holds, the socket among their arguments."""
    found: list[Any] = list(_open_transports(loop))
    for key in list(getattr(loop, "_selector").get_map().values()):
        for handle in key.data or ():
            if handle is None or handle.cancelled():
                continue
            if getattr(handle._callback, "__self__", None) is loop and \
                    getattr(handle._callback, "__name__", "") == "_accept_connection":
                found.extend(a for a in (handle._args or ()) if isinstance(a, socket.socket))
    return list(dict.fromkeys(found))


class SharedWebhooks:
    """The manager's one admission webhook server: one port, one serving certificate (reloaded when its
    files change, :class:`CertWatcher`), every component's handlers at their own paths.

    Components register in their ``setup`` (:meth:`register`, before the manager runs); the manager starts
    the server as a runnable of every replica (:meth:`run`; a port still held by a previous process is
    retried without taking the other controllers down) and components wait for :attr:`started` before
    registering their webhook configurations with :attr:`ca_bundle` and :meth:`url`.

    The certificate: ``cert_dir`` of the manager's settings (a mounted Secret) if given, else the first
    mounted certificate a component names, else a self-signed one covering every component's hosts."""

    def __init__(self, registry: CollectorRegistry, *, host: str | None = None, port: int | None = None,
                 cert_dir: str | None = None, cert_reload_interval: float = 10.0, own_thread: bool = True):
        self.server = WebhookServer("", "", registry=registry, cert_reload_interval=cert_reload_interval)
        self.own_thread = own_thread  # serve on a ServingThread, not on the manager's loop
        self.thread: ServingThread | None = None
        self.host, self.port, self.cert_dir = host, port, cert_dir
        self.asks: list[WebhookAsk] = []
        self.started = asyncio.Event()
        self.cert: ServingCert | None = None

    def __bool__(self) -> bool:
        return bool(self.asks)

    def register(self, ask: WebhookAsk, handlers: dict[str, Handler]) -> None:
        from fleetkeeper.core import errors

        taken = {p for a in self.asks for p in a.paths}
        clash = sorted(taken & set(handlers))
        if clash:
            raise errors.ConfigError(ask.component, [("webhook path", clash, "already served by another component")])
        if self.started.is_set():
            raise RuntimeError("webhook handlers must be registered before the manager runs")
        for path, handler in handlers.items():
            self.server.add(path, handler)
        self.asks.append(WebhookAsk(ask.component, tuple(handlers), ask.host, ask.port, tuple(ask.hosts),
                                    ask.mounted, ask.cert_dir))
        self.cert = self._certificate()
        self.server.cert, self.server.key = str(self.cert.cert), str(self.cert.key)

    def register_and_return(self, ask: WebhookAsk, handlers: dict[str, Handler]) -> "SharedWebhooks":
        self.register(ask, handlers)
        return self

    def _certificate(self) -> ServingCert:
        from fleetkeeper.core import errors

        if self.cert_dir:
            mounted = mounted_serving_cert(Path(self.cert_dir))
            if mounted is None:
                raise errors.ConfigError("webhooks", [("cert_dir", self.cert_dir, "no tls.crt and tls.key there")])
            return mounted
        mounted = [a for a in self.asks if a.mounted is not None]
        if mounted:
            first = mounted[0]
            for a in mounted[1:]:
                if a.mounted != first.mounted:
                    log.warning("%s names webhook certificate %s; every webhook of this process serves %s (%s's)",
                                a.component, a.mounted.cert, first.mounted.cert, first.component)  # type: ignore
            return first.mounted  # type: ignore[return-value]
        hosts = sorted({h for a in self.asks for h in a.hosts} | {"localhost", "127.0.0.1"})
        directory = next((a.cert_dir for a in self.asks if a.cert_dir), None)
        if directory is None:
            directory = self.cert.cert.parent if self.cert is not None else \
                Path(tempfile.mkdtemp(prefix="fleetkeeper-webhook-"))
        # reused while it covers every host; a component registered later with another name gets a new one
        return write_serving_cert(directory, hosts)

    @property
    def ca_bundle(self) -> bytes:
        return self.cert.ca_bundle if self.cert is not None else b""

    @property
    def bound_port(self) -> int:
        return self.server.port

    def url(self, path: str, host: str | None = None) -> str:
        return f"https://{host or self.server.host}:{self.server.port}/{path}"

    async def run(self) -> None:
        host, port, warnings = resolve_bind(self.asks, self.host, self.port)
        for w in warnings:
            log.warning("%s", w)
        self.server.host, self.server.port = host, port
        if self.own_thread and self.thread is None:
            self.thread = ServingThread()
        on = self.thread.call if self.thread is not None else (lambda coro: coro)
        delay = 1.0
        while True:  # a port still held (a previous process) must not take the other controllers down
            try:
                await on(self.server.start())
                break
            except OSError as exc:
                log.error("webhook server cannot listen on %s:%s: %s; retrying in %.0fs (admission calls fail "
                          "meanwhile)", host, port, exc, delay)
                await on(self.server.stop())
                self.server.port = port
                await asyncio.sleep(delay)
                delay = min(delay * 2, 30.0)
        log.info("webhook server on https://%s:%d serving %s", host, self.server.port,
                 ", ".join(f"/{p}" for a in self.asks for p in a.paths))
        self.started.set()
        try:
            await asyncio.Event().wait()
        finally:
            self.started.clear()
            try:
                await on(self.server.stop())
            finally:
                if self.thread is not None:
                    await self.thread.close()
                    self.thread = None
