"""The fleet map's web server (aiohttp): the page, its assets, one Server-Sent
Events stream per open page, and the explain / pod-search answers.

Everything a browser sees comes from the informers this process already keeps
(:meth:`fleetkeeper.core.manager.Manager.informer`, shared with the controllers
when the map runs inside the manager): no request of a browser is turned into
a request to the API server. The only API calls a browser can cause are the
TokenReview and SubjectAccessReviews of a new bearer token in cluster mode,
cached per token (:mod:`fleetkeeper.ui.auth`).

Stream messages (``data: <json>``), each with a type ``t``:

* ``hello``: the user, what they may see, the states and their colours;
* ``snapshot``: every cell (see :mod:`fleetkeeper.ui.model`);
* ``cells``: the cells that changed and the nodes gone since the last message;
* ``events``: new timeline entries (fleetkeeper's Kubernetes Events);
* ``panels``: the disruption budget in use per scope (the lifecycle's, as
  ``fleetkeeper budget`` reports it) and the team table.
"""

from __future__ import annotations

import asyncio
import hashlib
import base64
import ipaddress
import logging
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import orjson
from aiohttp import web
from prometheus_client import CollectorRegistry, Counter, Gauge
from prometheus_client.core import GaugeMetricFamily

from fleetkeeper.core import errors
from fleetkeeper.core.domain import SYSTEM_NAMESPACE
from fleetkeeper.core.kube import CONFIGMAPS, COSCHED_PODGROUPS, EVENTS, NODES, PODGROUPS, PODS, Request, Resource
from fleetkeeper.core.views import parse_time
from fleetkeeper.explain import explain
from fleetkeeper.lifecycle.explain import budget_report, load_fleet
from fleetkeeper.teams.live import load as load_teams
from fleetkeeper.ui.auth import ALL, Access, TokenAuth
from fleetkeeper.preflight.history import LABEL as GPU_HISTORY_LABEL
from fleetkeeper.ui.cache import CachedKube, Source, slim
from fleetkeeper.ui.model import Cell, FleetModel
from fleetkeeper.ui.state import LABELS, STATES

log = logging.getLogger("fleetkeeper.ui")
STATIC = Path(str(resources.files("fleetkeeper.ui") / "static"))
COOKIE = "fleetkeeper_ui_token"
REPORTER_PREFIX = "fleetkeeper.io/"  # EventRecorder's reportingController
ACCESS = web.RequestKey("access", Access)


@dataclass
class UiOptions:
    host: str = "127.0.0.1"
    port: int = 8088
    auth: str = "none"  # none | tokenreview
    components: Mapping[str, str] = field(default_factory=dict)  # name -> package, for explain
    flush_interval: float = 0.1  # seconds changes are coalesced before they are pushed
    panels_interval: float = 5.0  # at most one budget/team recomputation per interval (each reads every node)
    timeline_keep: int = 500
    queue_size: int = 2000  # messages a slow page may fall behind before it is dropped (it reconnects)
    port_fallback: bool = False  # the port is taken: take any free one (the demo)


PANELS_DUTY = 0.1  # the share of the process's time the budget/team panels may take


def panels_pause(interval: float, took: float) -> float:
    """Seconds until the next panels recomputation: ``interval``, or longer when one took long, so that
    reading every node and pod (seconds at 7,500 nodes, in a thread that holds the GIL) stays within
    PANELS_DUTY of the time and does not starve the controllers sharing the process."""
    return max(interval, took * (1 - PANELS_DUTY) / PANELS_DUTY)


def loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def event_item(obj: dict) -> dict | None:
    """A timeline entry of an Event fleetkeeper emitted (None for anyone else's)."""
    rc = obj.get("reportingController") or ""
    if not rc.startswith(REPORTER_PREFIX):
        return None
    meta, reg, series = obj.get("metadata") or {}, obj.get("regarding") or {}, obj.get("series") or {}
    t = parse_time(series.get("lastObservedTime") or obj.get("eventTime") or meta.get("creationTimestamp"))
    return {"id": meta.get("uid") or meta.get("name"), "t": t, "controller": rc[len(REPORTER_PREFIX):],
            "action": obj.get("action") or "", "reason": obj.get("reason") or "", "type": obj.get("type") or "",
            "kind": reg.get("kind") or "", "ns": reg.get("namespace") or "", "name": reg.get("name") or "",
            "note": obj.get("note") or "", "count": int(series.get("count") or 1)}


def _nodes_only(c: Cell) -> Cell:
    """A cell without what only pods tell (GPU use, gangs)."""
    return [c[0], c[1], c[2], c[3], c[4], None, c[6], []]


class UiMetrics:
    def __init__(self, registry: CollectorRegistry, model: FleetModel | None = None):
        self.clients = Gauge("fleetkeeper_ui_clients", "Open fleet-map pages (event streams)", registry=registry)
        self.messages = Counter("fleetkeeper_ui_messages_total", "Messages pushed to fleet-map pages by type",
                                ["type"], registry=registry)
        self.requests = Counter("fleetkeeper_ui_requests_total", "Fleet-map HTTP requests by route and status",
                                ["route", "code"], registry=registry)
        registry.register(_MapCollector(model))


class _MapCollector:
    """``fleetkeeper_fleet_map_nodes{zone,rack,state}``: what the map shows, for Grafana."""

    def __init__(self, model: FleetModel | None):
        self.model = model

    def collect(self):
        g = GaugeMetricFamily("fleetkeeper_fleet_map_nodes", "Nodes per zone, rack and lifecycle state, as the "
                              "fleet map shows them", labels=["zone", "rack", "state"])
        if self.model is not None:
            for (zone, rack, state), n in sorted(self.model.counts().items()):
                g.add_metric([zone, rack, state], n)
        yield g


@dataclass(eq=False)
class _Subscriber:
    queue: asyncio.Queue
    caps: frozenset[str]
    dropped: bool = False


class UiServer:
    def __init__(self, mgr: Any, options: UiOptions):
        if options.auth not in ("none", "tokenreview"):
            raise errors.ConfigError("ui", [("auth", options.auth, "expected none or tokenreview")])
        if options.auth == "none" and not loopback(options.host):
            raise errors.ConfigError("ui", [("host", options.host, "without authentication the map binds to a "
                                             "loopback address only; use --auth tokenreview to serve others")])
        self.mgr, self.opts = mgr, options
        self.names, self.clock = mgr.names, mgr.clock
        self.namespace = mgr.settings.namespace
        self.model = FleetModel(mgr.names, mgr.projector)
        self.metrics = UiMetrics(mgr.registry, self.model)
        self.auth = TokenAuth(mgr.kube, self.namespace, mgr.clock) if options.auth == "tokenreview" else None
        self.subs: set[_Subscriber] = set()
        self._wake = asyncio.Event()
        self._pending_events: list[dict] = []
        self._panels: dict = {}
        self._panels_dirty = True
        self._runner: web.AppRunner | None = None
        self.port = options.port
        self.on_start: Any = None  # called with this server once it listens
        self._register_informers()
        self.app = self._build_app()

    # --- informers -------------------------------------------------------------------------
    def _register_informers(self) -> None:
        mgr = self.mgr
        self.nodes = mgr.informer(NODES, slim, key="ui-slim", gate=False)
        self.pods = mgr.informer(PODS, slim, key="ui-slim", gate=False)
        self.events = mgr.informer(EVENTS, event_item, key="ui-timeline", gate=False)
        cms = [Source(mgr.informer(CONFIGMAPS, slim, namespace=ns, key="ui-slim", gate=False), ns)
               for ns in sorted({self.namespace, SYSTEM_NAMESPACE})]
        # preflight's per-GPU history shards, in whatever namespace they live
        cms.append(Source(mgr.informer(CONFIGMAPS, slim, label_selector=f"{GPU_HISTORY_LABEL}=true", key="ui-slim", gate=False),
                          None, f"{GPU_HISTORY_LABEL}=true"))
        self.sources: dict[Resource, list[Source]] = {NODES: [Source(self.nodes)], PODS: [Source(self.pods)],
                                                      CONFIGMAPS: cms}
        self.nodes.add_handler(self._on_node)
        self.pods.add_handler(self._on_pod)
        self.events.add_handler(self._on_event)
        for src in cms:
            src.informer.add_handler(lambda *a: self._touch_panels())
        self.cached = CachedKube(self.sources)

    async def add_optional_informers(self) -> None:
        """PodGroups (gang details of pod explain) where the cluster serves them: one discovery
        request per group at start-up."""
        for res in (PODGROUPS, COSCHED_PODGROUPS):
            try:
                body = await self.mgr.kube.request(Request("get", "GET", f"/apis/{res.group}/{res.version}"))
            except errors.FleetkeeperError:
                continue
            if any(r.get("name") == res.plural for r in body.get("resources") or []):
                self.sources[res] = [Source(self.mgr.informer(res, slim, key="ui-slim", gate=False))]

    def _on_node(self, typ: str, key: str, old: Any, new: Any) -> None:
        self.model.on_node(typ, key, old, new)
        self._touch_panels()
        self._wake.set()

    def _on_pod(self, typ: str, key: str, old: Any, new: Any) -> None:
        self.model.on_pod(typ, key, old, new)
        self._touch_panels()
        self._wake.set()

    def _on_event(self, typ: str, key: str, old: Any, new: Any) -> None:
        if new is not None and typ != "DELETED":
            self._pending_events.append(new)
            self._wake.set()

    def _touch_panels(self) -> None:
        self._panels_dirty = True

    @property
    def synced(self) -> bool:
        return all(s.informer.synced for srcs in self.sources.values() for s in srcs) and self.events.synced

    # --- pushing ---------------------------------------------------------------------------
    def _publish(self, kind: str, full: dict, nodes_only: dict | None = None, need: str = "nodes") -> None:
        data: dict[bool, bytes] = {}
        for sub in list(self.subs):
            if need not in sub.caps:
                continue
            full_view = "pods" in sub.caps or nodes_only is None
            if full_view not in data:
                data[full_view] = b"data: " + orjson.dumps(full if full_view else nodes_only) + b"\n\n"
            try:
                sub.queue.put_nowait(data[full_view])
                self.metrics.messages.labels(kind).inc()
            except asyncio.QueueFull:  # too slow: drop it; the browser reconnects and gets a snapshot
                sub.dropped = True
                self.subs.discard(sub)
                sub.queue.get_nowait()
                sub.queue.put_nowait(None)

    def flush(self) -> None:
        """Push what changed since the last flush to every open page."""
        changed, gone = self.model.take_deltas()
        if changed or gone:
            now = self.clock.now()
            self._publish("cells", {"t": "cells", "ts": now, "cells": changed, "gone": gone},
                          {"t": "cells", "ts": now, "cells": [_nodes_only(c) for c in changed], "gone": gone})
        if self._pending_events:
            items, self._pending_events = self._pending_events, []
            self._publish("events", {"t": "events", "items": items}, need="events")

    def timeline(self) -> list[dict]:
        items = [i for i in self.events.items() if i is not None]
        items.sort(key=lambda i: i["t"])
        return items[-self.opts.timeline_keep:]

    async def off_loop(self, fn: Any) -> Any:
        """Run ``fn(kube)`` (a coroutine function reading through a CachedKube) over a frozen copy of the
        caches in a worker thread: reading every node (the budget, the team plan, a team's explain) takes
        long at 7,500 nodes and must not hold back the pushes."""
        frozen = self.cached.frozen()
        return await asyncio.to_thread(lambda: asyncio.run(fn(frozen)))

    async def compute_panels(self) -> dict:
        now = self.clock.now()
        names, namespace = self.names, self.namespace

        async def read(kube: CachedKube) -> tuple[dict, Any]:
            out: dict[str, Any] = {"t": "panels"}
            cfg = None
            try:
                fleet = await load_fleet(kube, names, namespace)
                cfg = fleet.cfg
                out["budget"] = budget_report(fleet, now)
            except errors.FleetkeeperError as exc:
                out["budget"] = {"error": str(exc)}
            try:
                live = await load_teams(kube, names, namespace)
                out["teams"] = {"rows": live.team_rows(), "error": live.config_error}
            except errors.FleetkeeperError as exc:
                out["teams"] = {"rows": [], "error": str(exc)}
            return out, cfg

        out, cfg = await self.off_loop(read)
        if cfg is not None:
            self.model.set_lifecycle(cfg)  # its configuration shapes the states (e.g. gate attempts)
            if self.model.dirty:
                self._wake.set()
        return out

    async def _flush_loop(self) -> None:
        while True:
            await self._wake.wait()
            await self.clock.sleep(self.opts.flush_interval)  # coalesce a burst into one message
            self._wake.clear()
            self.flush()

    async def _panels_loop(self) -> None:
        while True:
            pause = self.opts.panels_interval
            if self._panels_dirty and self.synced:
                self._panels_dirty = False
                t0 = self.clock.monotonic()
                self._panels = await self.compute_panels()
                self._publish("panels", self._panels, need="config")
                pause = panels_pause(self.opts.panels_interval, self.clock.monotonic() - t0)
            await self.clock.sleep(pause)

    # --- HTTP ------------------------------------------------------------------------------
    def _build_app(self) -> web.Application:
        app = web.Application(middlewares=[self._middleware])
        app.router.add_get("/", self._index)
        app.router.add_get("/login", self._login_form)
        app.router.add_post("/login", self._login)
        app.router.add_get("/api/stream", self._stream)
        app.router.add_get("/api/explain", self._explain)
        app.router.add_get("/api/pods", self._pods)
        app.router.add_get("/healthz", lambda r: web.Response(text="ok\n"))
        app.router.add_static("/static/", STATIC, append_version=False)
        index = (STATIC / "index.html").read_text()
        m = re.search(r'<script type="importmap">(.*?)</script>', index, re.S)
        digest = base64.b64encode(hashlib.sha256(m.group(1).encode()).digest()).decode() if m else ""
        self._index_html = index
        self._csp = (f"default-src 'self'; script-src 'self' 'sha256-{digest}'; style-src 'self'; img-src 'self' data:; "
                     "connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'self'")
        return app

    def _token(self, request: web.Request) -> str | None:
        h = request.headers.get("Authorization", "")
        if h.lower().startswith("bearer "):
            return h[7:].strip() or None
        return request.cookies.get(COOKIE) or None

    @web.middleware
    async def _middleware(self, request: web.Request, handler):
        route = request.match_info.route.resource.canonical if request.match_info.route.resource else "?"
        try:
            resp = await self._authorised(request, handler)
        except web.HTTPException as exc:
            self.metrics.requests.labels(route, str(exc.status)).inc()
            raise
        self.metrics.requests.labels(route, str(resp.status)).inc()
        resp.headers.setdefault("X-Content-Type-Options", "nosniff")
        resp.headers.setdefault("Referrer-Policy", "no-referrer")
        return resp

    async def _authorised(self, request: web.Request, handler):
        public = request.path in ("/healthz", "/login") or request.path.startswith("/static/")
        if self.auth is None:
            request[ACCESS] = Access("", ALL)
            return await handler(request)
        if public:
            return await handler(request)
        token = self._token(request)
        try:
            acc = await self.auth.access(token) if token else None
        except errors.FleetkeeperError as exc:  # the API server cannot review it now: not the user's fault
            log.warning("cannot review a token: %s", exc)
            return web.json_response({"error": f"cannot check the token now: {exc}"}, status=503)
        if acc is None:
            return self._unauthorised(request)
        if "nodes" not in acc.caps:
            return web.json_response({"error": f"{acc.user} may not get nodes"}, status=403)
        request[ACCESS] = acc
        return await handler(request)

    def _unauthorised(self, request: web.Request) -> web.Response:
        hdrs = {"WWW-Authenticate": 'Bearer realm="fleetkeeper"'}
        if request.path.startswith("/api/"):
            return web.json_response({"error": "a bearer token is required"}, status=401, headers=hdrs)
        return web.Response(status=401, headers=hdrs, content_type="text/html", text=_LOGIN)

    async def _login_form(self, request: web.Request) -> web.Response:
        return web.Response(content_type="text/html", text=_LOGIN)

    async def _login(self, request: web.Request) -> web.Response:
        if self.auth is None:
            raise web.HTTPFound("/")
        token = str((await request.post()).get("token") or "").strip()
        acc = await self.auth.access(token) if token else None
        if acc is None:
            return self._unauthorised(request)
        resp = web.HTTPSeeOther("/")
        resp.set_cookie(COOKIE, token, httponly=True, samesite="Strict", secure=request.secure, path="/")
        raise resp

    async def _index(self, request: web.Request) -> web.Response:
        return web.Response(text=self._index_html, content_type="text/html",
                            headers={"Content-Security-Policy": self._csp, "Cache-Control": "no-store"})

    async def _stream(self, request: web.Request) -> web.StreamResponse:
        acc: Access = request[ACCESS]
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-store",
                                           "X-Accel-Buffering": "no"})
        await resp.prepare(request)
        for srcs in self.sources.values():
            for src in srcs:
                await src.informer.wait_synced()
        await self.events.wait_synced()
        # deliver what is pending to the open pages, then take the snapshot: no await in between,
        # so this page misses nothing and gets nothing twice
        self.flush()
        cells = self.model.current()
        if "pods" not in acc.caps:
            cells = [_nodes_only(c) for c in cells]
        first = [{"t": "hello", "user": acc.user, "caps": sorted(acc.caps), "states": STATES, "labels": LABELS,
                  "domain": self.names.domain},
                 {"t": "snapshot", "ts": self.clock.now(), "cells": cells}]
        if "events" in acc.caps:
            first.append({"t": "events", "items": self.timeline(), "reset": True})
        if "config" in acc.caps and self._panels:
            first.append(self._panels)
        sub = _Subscriber(asyncio.Queue(self.opts.queue_size), acc.caps)
        self.subs.add(sub)
        self.metrics.clients.set(len(self.subs))
        try:
            await resp.write(b"".join(b"data: " + orjson.dumps(m) + b"\n\n" for m in first))
            while True:
                try:
                    msg = await asyncio.wait_for(sub.queue.get(), 15.0)
                except asyncio.TimeoutError:
                    await resp.write(b": keep-alive\n\n")
                    continue
                if msg is None:
                    break
                await resp.write(msg)
        except (ConnectionResetError, ConnectionError):
            pass
        finally:
            self.subs.discard(sub)
            self.metrics.clients.set(len(self.subs))
        return resp

    async def _explain(self, request: web.Request) -> web.Response:
        acc: Access = request[ACCESS]
        if "pods" not in acc.caps:
            return web.json_response({"error": f"{acc.user} may not list pods, which explain names"}, status=403)
        node, pod = request.query.get("node"), request.query.get("pod")
        if bool(node) == bool(pod):
            return web.json_response({"error": "give node=NAME or pod=NAMESPACE/NAME"}, status=400)
        kind, target = ("node", node) if node else ("pod", pod)
        names, components = self.names, self.opts.components
        try:
            sections = await self.off_loop(lambda kube: explain(kube, names, kind, target or "", components))
        except errors.ConfigError as exc:
            return web.json_response({"error": exc.summary}, status=404)
        return web.json_response({"kind": kind, "target": target, "sections": sections})

    async def _pods(self, request: web.Request) -> web.Response:
        acc: Access = request[ACCESS]
        if "pods" not in acc.caps:
            return web.json_response({"error": f"{acc.user} may not list pods"}, status=403)
        q = request.query.get("q", "").strip().lower()
        out = []
        if len(q) >= 2:
            for p in self.pods.items():
                meta = p["metadata"]
                key = f"{meta['namespace']}/{meta['name']}"
                if q in key.lower():
                    out.append({"pod": key, "node": (p.get("spec") or {}).get("nodeName") or "",
                                "phase": (p.get("status") or {}).get("phase") or ""})
                    if len(out) >= 50:
                        break
        return web.json_response({"pods": out})

    # --- running ---------------------------------------------------------------------------
    async def start(self) -> None:
        self._runner = web.AppRunner(self.app, access_log=None, shutdown_timeout=2.0)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.opts.host, self.opts.port)
        try:
            await site.start()
        except OSError as exc:
            if not self.opts.port_fallback:
                raise errors.ConfigError("ui", [("port", self.opts.port, f"cannot listen: {exc}")]) from exc
            site = web.TCPSite(self._runner, self.opts.host, 0)
            await site.start()
        self.port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        log.info("fleet map on %s", self.url)
        if self.on_start is not None:
            self.on_start(self)

    @property
    def url(self) -> str:
        host = self.opts.host if ":" not in self.opts.host else f"[{self.opts.host}]"
        return f"http://{host}:{self.port}/"

    async def stop(self) -> None:
        for sub in list(self.subs):
            try:
                sub.queue.put_nowait(None)
            except asyncio.QueueFull:
                pass
        if self._runner:
            await self._runner.cleanup()
            self._runner = None

    async def run(self) -> None:
        await self.start()
        try:
            await asyncio.gather(self._flush_loop(), self._panels_loop())
        finally:
            await self.stop()


async def setup(mgr: Any, options: UiOptions) -> UiServer:
    """Add the fleet map to a manager (its informers and one runnable that needs no leadership)."""
    ui = UiServer(mgr, options)
    await ui.add_optional_informers()
    mgr.add("ui", ui.run, leader=False)
    return ui


_LOGIN = """<!doctype html><html><head><meta charset="utf-8"><title>fleetkeeper: sign in</title>
<link rel="stylesheet" href="/static/style.css"></head><body class="login">
<form method="post" action="/login"><h1>fleetkeeper fleet map</h1>
<p>A Kubernetes bearer token that may <code>get nodes</code>
(for example <code>kubectl create token NAME</code>):</p>
<input type="password" name="token" autocomplete="off" autofocus required>
<button type="submit">Sign in</button></form></body></html>
"""
