"""The relay's HTTP API for node agents (aiohttp).

=====================================  ==========================================
``GET /v1/nodes/{node}``                the node's agent view of its Node
``GET /v1/nodes/{node}/pods``           ``{"resourceVersion", "items": [...]}``
``GET /v1/nodes/{node}/view``           node, pods and team config in one answer
``GET /v1/config/teams``                the team ConfigMap's data
``GET /v1/nodes/{node}/watch``          ndjson events of that node only, with
                                        bookmarks; ``?resourceVersion=`` resumes,
                                        ``?mode=poll`` long-polls instead
``GET /healthz``, ``/readyz``           liveness; readiness = caches synced
=====================================  ==========================================

Every request is answered from memory; none reaches the API server (except a
TokenReview on a cache miss when authentication is on).

Overload (:mod:`fleetkeeper.relay.admission`): before any work, a request
whose client has already closed its connection is dropped (counted with code
499), and a request that arrives while the relay is behind (its event loop
running late by more than ``max_lag``, or ``max_inflight`` requests being
answered) is refused with 503 and ``Retry-After``, so that the relay never
spends its time on answers nobody waits for.
"""

from __future__ import annotations

import asyncio
import logging
import random
import select
import ssl
import time
from collections.abc import Callable

import orjson
from aiohttp import web

from fleetkeeper.core import errors
from fleetkeeper.relay.admission import AdmissionPolicy, admit
from fleetkeeper.relay.auth import AuthPolicy, TokenReviewAuthenticator, authorize
from fleetkeeper.relay.hub import Gone, Hub, encode_error
from fleetkeeper.relay.metrics import RelayMetrics
from fleetkeeper.relay.settings import RelaySettings

log = logging.getLogger("fleetkeeper.relay")

_RDHUP = getattr(select, "POLLRDHUP", 0x2000)


def peer_closed(request: web.Request) -> bool:
    """True when the client has closed its end of the connection (it gave up
    waiting): the kernel knows at once, although the event loop, when behind,
    has not yet run the callback that says so."""
    t = request.transport
    if t is None or t.is_closing():
        return True
    sock = t.get_extra_info("socket")
    if sock is None:
        return False
    p = select.poll()
    p.register(sock.fileno(), _RDHUP)
    return any(ev & (_RDHUP | select.POLLHUP | select.POLLERR) for _, ev in p.poll(0))


class LoopLag:
    """How late the event loop runs a timer, the relay's measure of being behind:
    every callback queued ahead of a timer (accepted connections, requests to
    parse, responses to write) delays it."""

    def __init__(self, interval: float = 0.05):
        self.interval = interval
        self.last = 0.0
        self._due: float | None = None
        self._task: asyncio.Task | None = None

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run())

    async def _run(self) -> None:
        while True:
            self._due = time.monotonic() + self.interval  # the loop's clock (and callable from a scrape thread)
            await asyncio.sleep(self.interval)
            self.last = max(0.0, time.monotonic() - self._due)

    def now(self) -> float:
        """The lag now: the last measurement, or longer when the timer is overdue."""
        due = self._due
        if due is None:
            return self.last
        return max(self.last, time.monotonic() - due)

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None
            self._due = None


class RelayServer:
    def __init__(self, hub: Hub, settings: RelaySettings, metrics: RelayMetrics, *,
                 ready: Callable[[], bool] = lambda: True,
                 authenticator: TokenReviewAuthenticator | None = None, lag: LoopLag | None = None):
        if settings.auth == "tokenreview" and authenticator is None:
            raise errors.ConfigError("relay", [("auth", settings.auth, "tokenreview needs an authenticator")])
        self.hub = hub
        self.settings = settings
        self.metrics = metrics
        self.ready = ready
        self.authenticator = authenticator if settings.auth == "tokenreview" else None
        self.policy = AuthPolicy(tuple(settings.agent_service_accounts), tuple(settings.reader_groups))
        self.app = web.Application()
        r = self.app.router
        r.add_get("/v1/nodes/{node}", self._node)
        r.add_get("/v1/nodes/{node}/pods", self._pods)
        r.add_get("/v1/nodes/{node}/view", self._view)
        r.add_get("/v1/nodes/{node}/watch", self._watch)
        r.add_get("/v1/config/teams", self._teams)
        r.add_get("/healthz", self._healthz)
        r.add_get("/readyz", self._readyz)
        self._runner: web.AppRunner | None = None
        self.port = settings.port
        self._streams: set[web.StreamResponse] = set()
        self._subs: set = set()  # the streaming watches' subscribers (woken to end at stop)
        self._closing = asyncio.Event()
        self.admission = AdmissionPolicy(max_inflight=settings.max_inflight, max_lag=settings.max_lag)
        self.lag = lag or LoopLag()
        self.inflight = 0
        metrics.attach_server(lambda: self.inflight, lambda: self.lag.now())

    # --- helpers ----------------------------------------------------------------
    def _json(self, endpoint: str, status: int, doc: object) -> web.Response:
        return self._raw(endpoint, status, orjson.dumps(doc))

    def _raw(self, endpoint: str, status: int, body: bytes) -> web.Response:
        self.metrics.requests.labels(endpoint, str(status)).inc()
        self.metrics.bytes_sent.labels(endpoint).inc(len(body))
        return web.Response(status=status, body=body, content_type="application/json")

    def _status(self, endpoint: str, code: int, reason: str, message: str) -> web.Response:
        return self._json(endpoint, code, {"kind": "Status", "code": code, "reason": reason, "message": message})

    def _busy(self, endpoint: str, retry_after: int, reason: str, message: str) -> web.Response:
        self.metrics.requests.labels(endpoint, "503").inc()
        self.metrics.refused.labels(reason).inc()
        body = orjson.dumps({"kind": "Status", "code": 503, "reason": "ServiceUnavailable", "message": message,
                             "details": {"retryAfterSeconds": retry_after}})
        return web.Response(status=503, body=body, content_type="application/json",
                            headers={"Retry-After": str(retry_after)})

    async def _check(self, request: web.Request, endpoint: str, node: str | None) -> web.Response | None:
        """None when the request may go on (it then holds one of the in-flight
        places: the caller gives it back with ``self.inflight -= 1``), else the
        response that ends it."""
        if peer_closed(request):
            # the client gave up before its turn came: no work, no answer
            self.metrics.requests.labels(endpoint, "499").inc()
            request.transport.close() if request.transport is not None else None
            return web.Response(status=499)
        decision = admit(self.inflight, self.lag.now(), self.admission)
        if not decision.admit:
            return self._busy(endpoint, decision.retry_after, decision.cause,
                              f"the relay is busy: {decision.reason}; retry after {decision.retry_after}s")
        if not self.ready():
            return self._status(endpoint, 503, "NotReady", "the relay's caches are not synced yet")
        self.inflight += 1
        try:
            err = await self._authorize(request, endpoint, node)
        except BaseException:
            self.inflight -= 1
            raise
        if err is not None:
            self.inflight -= 1
        return err

    async def _authorize(self, request: web.Request, endpoint: str, node: str | None) -> web.Response | None:
        if self.authenticator is None:
            return None
        header = request.headers.get("Authorization", "")
        if not header.startswith("Bearer ") or not header[7:].strip():
            self.metrics.auth.labels("unauthenticated").inc()
            return self._status(endpoint, 401, "Unauthorized", "a bearer token (the agent's ServiceAccount token) "
                                                               "is required")
        try:
            ident = await self.authenticator.authenticate(header[7:].strip())
        except errors.Temporary as exc:
            self.metrics.auth.labels("error").inc()
            return self._status(endpoint, 503, "ServiceUnavailable", f"cannot authenticate now: {exc}")
        if ident is None:
            self.metrics.auth.labels("unauthenticated").inc()
            return self._status(endpoint, 401, "Unauthorized", "the API server did not accept this token")
        ok, why = authorize(ident, node, self.policy, self.hub.pod_node)
        if not ok:
            self.metrics.auth.labels("forbidden").inc()
            log.info("relay: forbidden: %s", why)
            return self._status(endpoint, 403, "Forbidden", why)
        self.metrics.auth.labels("allowed").inc()
        return None

    # --- snapshots --------------------------------------------------------------
    async def _node(self, request: web.Request) -> web.Response:
        node = request.match_info["node"]
        if (err := await self._check(request, "node", node)) is not None:
            return err
        try:
            doc = self.hub.node_doc(node)
            if doc is None:
                return self._status("node", 404, "NotFound", f"node {node} is not known to the relay")
            return self._json("node", 200, {"resourceVersion": self.hub.rv(), "object": doc})
        finally:
            self.inflight -= 1

    async def _pods(self, request: web.Request) -> web.Response:
        node = request.match_info["node"]
        if (err := await self._check(request, "pods", node)) is not None:
            return err
        try:
            return self._json("pods", 200, {"resourceVersion": self.hub.rv(), "items": self.hub.pod_docs(node)})
        finally:
            self.inflight -= 1

    async def _view(self, request: web.Request) -> web.Response:
        node = request.match_info["node"]
        if (err := await self._check(request, "view", node)) is not None:
            return err
        try:
            return self._raw("view", 200, self.hub.view_json(node))
        finally:
            self.inflight -= 1

    async def _teams(self, request: web.Request) -> web.Response:
        if (err := await self._check(request, "teams", None)) is not None:
            return err
        try:
            doc = self.hub.teams_doc()
            if doc is None:
                return self._status("teams", 404, "NotFound", f"ConfigMap {self.settings.teams_configmap} not found")
            return self._json("teams", 200, {"resourceVersion": self.hub.rv(), "object": doc})
        finally:
            self.inflight -= 1

    async def _healthz(self, request: web.Request) -> web.Response:
        return web.Response(text="ok\n")

    async def _readyz(self, request: web.Request) -> web.Response:
        return web.Response(text="ok\n") if self.ready() else web.Response(status=503, text="caches not synced\n")

    # --- watch ------------------------------------------------------------------
    async def _watch(self, request: web.Request) -> web.StreamResponse:
        node = request.match_info["node"]
        poll = request.query.get("mode") == "poll"
        endpoint = "poll" if poll else "watch"
        if (err := await self._check(request, endpoint, node)) is not None:
            return err
        try:  # the in-flight place is held while the watch is set up, not while it streams
            try:
                timeout = float(request.query.get("timeoutSeconds") or 0)
            except ValueError:
                return self._status(endpoint, 400, "BadRequest", "timeoutSeconds must be a number")
            limit = float(self.settings.watch_timeout)
            if timeout <= 0 or timeout > limit:
                # spread reconnects: an agent fleet restarting at once must not come back at once
                timeout = limit * random.uniform(0.8, 1.0) if timeout <= 0 else limit
            try:
                sub = self.hub.subscribe(node, request.query.get("resourceVersion"))
            except Gone as exc:
                return self._status(endpoint, 410, "Expired", str(exc))
        finally:
            self.inflight -= 1
        try:
            if poll:
                return await self._poll(sub, timeout)
            return await self._stream(request, sub, timeout)
        finally:
            self.hub.unsubscribe(sub)

    async def _poll(self, sub, timeout: float) -> web.Response:
        await sub.wait(timeout)
        if sub.overflowed:
            return self._status("poll", 410, "Expired", "too many events queued; relist")
        lines = sub.drain()
        events = [orjson.loads(line) for line in lines]
        events = [e for e in events if e.get("type") != "BOOKMARK"]
        return self._json("poll", 200, {"resourceVersion": self.hub.rv(), "events": events})

    async def _stream(self, request: web.Request, sub, timeout: float) -> web.StreamResponse:
        resp = web.StreamResponse(status=200, headers={"Content-Type": "application/x-ndjson",
                                                       "Cache-Control": "no-cache"})
        await resp.prepare(request)
        self.metrics.requests.labels("watch", "200").inc()
        sent = self.metrics.bytes_sent.labels("watch")
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        next_bookmark = loop.time() + self.settings.bookmark_interval
        self._streams.add(resp)
        self._subs.add(sub)
        try:
            while not self._closing.is_set():
                now = loop.time()
                if now >= deadline:
                    break
                got = await sub.wait(min(deadline, next_bookmark) - now)
                if sub.overflowed:
                    line = encode_error(410, "Expired", "the relay dropped this watch: events came faster than "
                                                         "they were read; relist")
                    await resp.write(line)
                    sent.inc(len(line))
                    break
                if got:
                    chunk = b"".join(sub.drain())
                else:
                    chunk = b""
                if not chunk and loop.time() >= next_bookmark:
                    chunk = self.hub.bookmark()  # buffer empty: every event up to now was sent
                if loop.time() >= next_bookmark:
                    next_bookmark = loop.time() + self.settings.bookmark_interval
                if chunk:
                    await resp.write(chunk)
                    sent.inc(len(chunk))
        except ConnectionResetError:
            pass
        finally:
            self._streams.discard(resp)
            self._subs.discard(sub)
        try:
            await resp.write_eof()
        except (ConnectionResetError, RuntimeError):
            pass
        return resp

    # --- lifecycle --------------------------------------------------------------
    def ssl_context(self) -> ssl.SSLContext | None:
        if not self.settings.tls_cert:
            return None
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        try:
            ctx.load_cert_chain(self.settings.tls_cert, self.settings.tls_key)
        except (OSError, ssl.SSLError) as exc:
            raise errors.ConfigError("relay", [("tls_cert", self.settings.tls_cert,
                                                f"cannot load the certificate and key: {exc}")]) from None
        return ctx

    async def start(self) -> None:
        self._runner = web.AppRunner(self.app, access_log=None, shutdown_timeout=1.0)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.settings.host, self.settings.port, ssl_context=self.ssl_context(),
                           backlog=4096)
        await site.start()
        self.lag.start()
        self.port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        log.info("relay serving agents on %s://%s:%d", "https" if self.settings.tls_cert else "http",
                 self.settings.host, self.port)

    def reset(self) -> None:
        self._closing = asyncio.Event()

    async def stop(self) -> None:
        self._closing.set()
        for sub in list(self._subs):
            sub.wake()  # a watch waiting for its next bookmark ends now, not then
        await self.lag.stop()
        if self._runner:
            await self._runner.cleanup()
            self._runner = None

    async def serve_forever(self) -> None:
        await self.start()
        try:
            await asyncio.Event().wait()
        finally:
            await self.stop()
