"""The series-query guard: a reverse proxy in front of Prometheus.

Guarded endpoints (``/api/v1/series``, ``/api/v1/labels``,
``/api/v1/label/<name>/values``) go through :func:`policy.plan`: the guard
clamps the time range and limit, refuses selectors with no metric name, and
holds the upstream request to a hard deadline. At the deadline, or when the
client disconnects, the upstream connection is closed, which cancels the
request's context inside Prometheus. Errors use Prometheus's JSON error shape.

Everything else is proxied untouched and streamed in both directions.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

import aiohttp
import orjson
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from yarl import URL
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from fleetkeeper.core.clock import Clock, RealClock
from fleetkeeper.core.errors import ConfigError

from . import policy as P
from .metrics import GuardMetrics

log = logging.getLogger("fleetkeeper.promguard")

HOP_BY_HOP = frozenset(
    h.lower()
    for h in (
        "Connection", "Keep-Alive", "Proxy-Authenticate", "Proxy-Authorization", "TE", "Trailer",
        "Transfer-Encoding", "Upgrade", "Host",
    )
)
OWN_PREFIX = "/-/promguard/"


class ProxySettings(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    upstream: str = Field(description="Prometheus base URL, e.g. http://127.0.0.1:9090")
    listen_host: str = "127.0.0.1"
    listen_port: int = Field(9091, ge=0, le=65535)
    connect_timeout: float = Field(5.0, gt=0, le=120)
    max_upstream_bytes: int = Field(256 * 1024 * 1024, ge=1024, description="largest guarded answer read from upstream")
    policy: P.GuardPolicy = P.GuardPolicy()

    @field_validator("upstream")
    @classmethod
    def _url(cls, v: str) -> str:
        u = v.strip().rstrip("/")
        if not (u.startswith("http://") or u.startswith("https://")):
            raise ValueError("must be an http:// or https:// URL")
        try:
            parsed = URL(u)
        except ValueError as exc:
            raise ValueError(f"not a URL: {exc}") from None
        if not parsed.host:
            raise ValueError("URL has no host")
        return u


def load_settings(source: str, **values: Any) -> ProxySettings:
    """Build settings, turning pydantic's errors into one :class:`ConfigError`."""
    policy_fields = set(P.GuardPolicy.model_fields)
    pol = {k: v for k, v in values.items() if k in policy_fields and v is not None}
    rest = {k: v for k, v in values.items() if k not in policy_fields and v is not None}
    problems: list[tuple[str, Any, str]] = []
    policy = None
    try:
        policy = P.GuardPolicy(**pol)
    except ValidationError as exc:
        problems += [(".".join(str(x) for x in e["loc"]) or "policy", e.get("input"), e["msg"]) for e in exc.errors()]
    try:
        settings = ProxySettings(**rest, **({"policy": policy} if policy else {}))
    except ValidationError as exc:
        problems += [(".".join(str(x) for x in e["loc"]), e.get("input"), e["msg"]) for e in exc.errors()]
    if problems:
        raise ConfigError(source, problems)
    return settings


def _json(status: int, body: dict, notes: list[str] | None = None) -> web.Response:
    headers = {"X-Promguard": "; ".join(notes)} if notes else None
    return web.Response(status=status, body=orjson.dumps(body), content_type="application/json", headers=headers)


def _reject(r: P.Reject) -> web.Response:
    return _json(r.status, r.body())


class Guard:
    """The proxy. ``await start()``, then ``await stop()``."""

    def __init__(self, settings: ProxySettings, registry: CollectorRegistry | None = None, clock: Clock | None = None):
        self.settings = settings
        self.policy = settings.policy
        self.registry = registry or CollectorRegistry()
        self.metrics = GuardMetrics(self.registry)
        self.clock = clock or RealClock()
        self._sem = asyncio.Semaphore(self.policy.max_concurrent)
        self._supports_limit: bool | None = None
        self._last_detect = -1e9
        self._runner: web.AppRunner | None = None
        self._json_session: aiohttp.ClientSession | None = None
        self._stream_session: aiohttp.ClientSession | None = None
        self.address: tuple[str, int] | None = None
        self.app = web.Application(client_max_size=64 * 1024 * 1024)
        self.app.router.add_route("*", "/{tail:.*}", self.handle)

    # ------------------------------------------------------------------ lifecycle

    async def start(self) -> tuple[str, int]:
        timeout = aiohttp.ClientTimeout(total=None, sock_connect=self.settings.connect_timeout)
        self._json_session = aiohttp.ClientSession(timeout=timeout)
        # Raw bytes for pass-through: keep Content-Encoding as Prometheus sent it.
        self._stream_session = aiohttp.ClientSession(timeout=timeout, auto_decompress=False)
        await self._detect_upstream()
        # handler_cancellation: a client that goes away cancels its handler, which
        # closes the upstream connection (aiohttp leaves this off by default).
        self._runner = web.AppRunner(self.app, handler_cancellation=True, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.settings.listen_host, self.settings.listen_port)
        await site.start()
        sock = site._server.sockets[0]  # type: ignore[union-attr]
        host, port = sock.getsockname()[:2]
        self.address = (host, port)
        log.info("promguard listening", extra={"listen": f"{host}:{port}", "upstream": self.settings.upstream})
        return self.address

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
        for s in (self._json_session, self._stream_session):
            if s is not None:
                await s.close()

    @property
    def url(self) -> str:
        assert self.address is not None
        return f"http://{self.address[0]}:{self.address[1]}"

    async def _detect_upstream(self) -> None:
        """Ask Prometheus its version once, to know whether it takes ``limit``."""
        self._last_detect = self.clock.monotonic()
        if self.policy.upstream_limit != "auto":
            self._supports_limit = self.policy.upstream_limit == "always"
            return
        assert self._json_session is not None
        try:
            async with asyncio.timeout(self.settings.connect_timeout):
                async with self._json_session.get(f"{self.settings.upstream}/api/v1/status/buildinfo") as r:
                    body = orjson.loads(await r.read())
            version = str(body["data"]["version"])
        except (aiohttp.ClientError, TimeoutError, orjson.JSONDecodeError, KeyError, TypeError) as exc:
            log.warning("cannot read upstream version; not sending limit", extra={"error": repr(exc)})
            self._supports_limit = None
            return
        self._supports_limit = P.version_supports_limit(version)
        log.info("upstream version", extra={"version": version, "limit_param": self._supports_limit})

    # ------------------------------------------------------------------ handlers

    async def handle(self, request: web.Request) -> web.StreamResponse:
        path = request.path
        if path.startswith(OWN_PREFIX):
            return self._own(request)
        endpoint = P.classify(path)
        if endpoint is None:
            return await self._passthrough(request)
        return await self._guarded(request, endpoint)

    def _own(self, request: web.Request) -> web.Response:
        if request.path == OWN_PREFIX + "metrics":
            return web.Response(body=generate_latest(self.registry), headers={"Content-Type": CONTENT_TYPE_LATEST})
        if request.path in (OWN_PREFIX + "ready", OWN_PREFIX + "healthy"):
            return web.Response(text="ok\n")
        return web.Response(status=404, text="not found\n")

    def _count(self, endpoint: str, outcome: str, t0: float) -> None:
        self.metrics.requests.labels(endpoint, outcome).inc()
        self.metrics.duration.labels(endpoint).observe(max(0.0, time.monotonic() - t0))

    async def _guarded(self, request: web.Request, endpoint: P.Endpoint) -> web.StreamResponse:
        t0 = time.monotonic()
        if request.method not in ("GET", "POST"):
            self._count(endpoint, "bad_request", t0)
            return _reject(P.Reject("bad_data", f"method {request.method} not allowed", "bad_request"))
        params = list(request.query.items())
        if request.method == "POST":
            form = await request.post()
            params += [(k, v) for k, v in form.items() if isinstance(v, str)]
        if (
            self._supports_limit is None
            and self.policy.upstream_limit == "auto"
            and self.clock.monotonic() - self._last_detect > 30
        ):
            await self._detect_upstream()
        decision = P.plan(path=request.path, params=params, now=self.clock.now(), policy=self.policy,
                          upstream_supports_limit=bool(self._supports_limit))
        assert decision is not None
        if isinstance(decision, P.Reject):
            self._count(endpoint, decision.reason, t0)
            log.info("refused", extra={"endpoint": endpoint, "reason": decision.reason, "error": decision.error})
            return _reject(decision)
        for note in decision.notes:
            if "start" in note:
                self.metrics.clamped.labels(endpoint, "start").inc()
            elif "limit" in note:
                self.metrics.clamped.labels(endpoint, "limit").inc()
        if self._sem.locked():
            self._count(endpoint, "busy", t0)
            return _reject(P.Reject("unavailable", "series-query guard: too many metadata requests in flight; retry later", "busy"))
        async with self._sem:
            self.metrics.inflight.inc()
            try:
                return await self._forward(request, endpoint, decision, t0)
            finally:
                self.metrics.inflight.dec()

    async def _forward(self, request: web.Request, endpoint: P.Endpoint, d: P.Forward, t0: float) -> web.StreamResponse:
        assert self._json_session is not None
        url = f"{self.settings.upstream}{request.path}"
        # /label/<name>/values only takes GET; the others take a form POST, which
        # keeps long match[] lists out of the URL.
        if endpoint == "label_values":
            kwargs: dict[str, Any] = {"params": d.params}
            method = "GET"
        else:
            kwargs = {"data": d.params}
            method = "POST"
        remaining = d.deadline - (time.monotonic() - t0)
        resp: aiohttp.ClientResponse | None = None
        try:
            async with asyncio.timeout(max(0.0, remaining)):
                resp = await self._json_session.request(method, url, headers={"Accept-Encoding": "gzip"}, **kwargs)
                raw = await self._read_capped(resp)
        except TimeoutError:
            if resp is not None:
                resp.close()  # drop the connection: Prometheus sees the request cancelled
            self._count(endpoint, "deadline", t0)
            log.warning("deadline exceeded; upstream cancelled", extra={"endpoint": endpoint, "deadline": d.deadline})
            return _reject(P.deadline_exceeded(d.deadline))
        except asyncio.CancelledError:
            if resp is not None:
                resp.close()
            self._count(endpoint, "client_gone", t0)
            log.info("client went away; upstream cancelled", extra={"endpoint": endpoint})
            raise
        except _TooLarge as exc:
            if resp is not None:
                resp.close()
            self._count(endpoint, "limit", t0)
            return _reject(P.Reject("execution", str(exc), "limit"))
        except aiohttp.ClientError as exc:
            if resp is not None:
                resp.close()
            self._count(endpoint, "upstream_error", t0)
            log.warning("upstream error", extra={"endpoint": endpoint, "error": repr(exc)})
            return _json(502, {"status": "error", "errorType": "unavailable", "error": f"upstream Prometheus: {exc}"})
        else:
            resp.release()

        try:
            body = orjson.loads(raw)
            if not isinstance(body, dict):
                raise ValueError("not a JSON object")
        except ValueError:
            self._count(endpoint, "upstream_error", t0)
            return _json(502, {"status": "error", "errorType": "internal",
                               "error": f"upstream answered {resp.status} with a body that is not Prometheus JSON"})
        if resp.status != 200 or body.get("status") != "success":
            self._count(endpoint, "upstream_error", t0)
            return _json(resp.status if resp.status >= 400 else 502, body, d.notes)
        limited = P.apply_limit(body, d.limit)
        if limited.truncated:
            if self.policy.on_limit == "reject":
                self._count(endpoint, "limit", t0)
                return _reject(P.limit_exceeded(endpoint, d.limit))
            self._count(endpoint, "truncated", t0)
            return _json(200, limited.body, d.notes + [f"truncated to {d.limit}"])
        self._count(endpoint, "ok", t0)
        return _json(200, limited.body, d.notes)

    async def _read_capped(self, resp: aiohttp.ClientResponse) -> bytes:
        cap = self.settings.max_upstream_bytes
        chunks: list[bytes] = []
        size = 0
        async for chunk in resp.content.iter_chunked(256 * 1024):
            size += len(chunk)
            if size > cap:
                raise _TooLarge(f"upstream answer exceeds {cap} bytes; narrow the selector or time range")
            chunks.append(chunk)
        return b"".join(chunks)

    async def _passthrough(self, request: web.Request) -> web.StreamResponse:
        assert self._stream_session is not None
        # raw_path is the path and query exactly as the client sent them.
        url = URL(f"{self.settings.upstream}{request.raw_path}", encoded=True)
        headers = {k: v for k, v in request.headers.items() if k.lower() not in HOP_BY_HOP}
        data = request.content if request.body_exists else None
        try:
            up = await self._stream_session.request(
                request.method, url, headers=headers, data=data, allow_redirects=False,
            )
        except aiohttp.ClientError as exc:
            self.metrics.passthrough.labels("error").inc()
            return _json(502, {"status": "error", "errorType": "unavailable", "error": f"upstream Prometheus: {exc}"})
        try:
            out = web.StreamResponse(status=up.status, reason=up.reason)
            for k, v in up.headers.items():
                if k.lower() not in HOP_BY_HOP:
                    out.headers.add(k, v)
            await out.prepare(request)
            async for chunk in up.content.iter_any():
                await out.write(chunk)
            await out.write_eof()
            self.metrics.passthrough.labels(f"{up.status // 100}xx").inc()
            return out
        except BaseException:
            up.close()
            raise
        finally:
            up.release()


class _TooLarge(Exception):
    pass


async def serve(settings: ProxySettings, registry: CollectorRegistry | None = None) -> None:
    """Run until cancelled."""
    guard = Guard(settings, registry)
    await guard.start()
    try:
        await asyncio.Event().wait()
    finally:
        await guard.stop()
