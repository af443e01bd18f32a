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
"""

from __future__ import annotations

import asyncio
import logging
import random
import ssl
from collections.abc import Callable

import orjson
from aiohttp import web

from fleetkeeper.core import errors
from fleetkeeper.relay.auth import AuthPolicy, TokenReviewAuthenticator, authorize
from fleetkeeper.relay.hub import Gone, Hub, encode_bookmark, encode_error
from fleetkeeper.relay.metrics import RelayMetrics
from fleetkeeper.relay.settings import RelaySettings

log = logging.getLogger("fleetkeeper.relay")


class RelayServer:
    def __init__(self, hub: Hub, settings: RelaySettings, metrics: RelayMetrics, *,
                 ready: Callable[[], bool] = lambda: True,
                 authenticator: TokenReviewAuthenticator | None = None):
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
        self._closing = asyncio.Event()

    # --- helpers ----------------------------------------------------------------
    def _json(self, endpoint: str, status: int, doc: object) -> web.Response:
        body = orjson.dumps(doc)
        self.metrics.requests.labels(endpoint, str(status)).inc()
        self.metrics.bytes_sent.labels(endpoint).inc(len(body))
        return web.Response(status=status, body=body, content_type="application/json")

    def _status(self, endpoint: str, code: int, reason: str, message: str) -> web.Response:
        return self._json(endpoint, code, {"kind": "Status", "code": code, "reason": reason, "message": message})

    async def _check(self, request: web.Request, endpoint: str, node: str | None) -> web.Response | None:
        """None when the request may go on, else the error response."""
        if not self.ready():
            return self._status(endpoint, 503, "NotReady", "the relay's caches are not synced yet")
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
        doc = self.hub.node_doc(node)
        if doc is None:
            return self._status("node", 404, "NotFound", f"node {node} is not known to the relay")
        return self._json("node", 200, {"resourceVersion": self.hub.rv(), "object": doc})

    async def _pods(self, request: web.Request) -> web.Response:
        node = request.match_info["node"]
        if (err := await self._check(request, "pods", node)) is not None:
            return err
        return self._json("pods", 200, {"resourceVersion": self.hub.rv(), "items": self.hub.pod_docs(node)})

    async def _view(self, request: web.Request) -> web.Response:
        node = request.match_info["node"]
        if (err := await self._check(request, "view", node)) is not None:
            return err
        return self._json("view", 200, self.hub.view(node))

    async def _teams(self, request: web.Request) -> web.Response:
        if (err := await self._check(request, "teams", None)) is not None:
            return err
        doc = self.hub.teams_doc()
        if doc is None:
            return self._status("teams", 404, "NotFound", f"ConfigMap {self.settings.teams_configmap} not found")
        return self._json("teams", 200, {"resourceVersion": self.hub.rv(), "object": doc})

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
                    chunk = encode_bookmark(self.hub.rv())  # buffer empty: every event up to now was sent
                if loop.time() >= next_bookmark:
                    next_bookmark = loop.time() + self.settings.bookmark_interval
                if chunk:
                    await resp.write(chunk)
                    sent.inc(len(chunk))
        except ConnectionResetError:
            pass
        finally:
            self._streams.discard(resp)
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
        self.port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        log.info("relay serving agents on %s://%s:%d", "https" if self.settings.tls_cert else "http",
                 self.settings.host, self.port)

    def reset(self) -> None:
        self._closing = asyncio.Event()

    async def stop(self) -> None:
        self._closing.set()
        if self._runner:
            await self._runner.cleanup()
            self._runner = None

    async def serve_forever(self) -> None:
        await self.start()
        try:
            await asyncio.Event().wait()
        finally:
            await self.stop()
