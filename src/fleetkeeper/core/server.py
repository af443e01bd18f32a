"""The operational HTTP endpoint of every fleetkeeper process:
``/metrics`` (Prometheus, from the injected registry), ``/healthz`` (the
process is alive) and ``/readyz`` (every registered readiness check passes,
e.g. informers synced)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from aiohttp import web
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST


class OpsServer:
    def __init__(self, registry: CollectorRegistry, host: str = "127.0.0.1", port: int = 8080,
                 exposition: Callable[[], Awaitable[bytes]] | None = None):
        """``exposition``: builds the /metrics answer itself (for a process whose
        series are read at scrape time); by default the registry's text."""
        self.registry = registry
        self.exposition = exposition
        self.host = host
        self.port = port
        self.ready_checks: dict[str, Callable[[], bool]] = {}
        self.app = web.Application()
        self.app.router.add_get("/metrics", self._metrics)
        self.app.router.add_get("/healthz", self._healthz)
        self.app.router.add_get("/readyz", self._readyz)
        self._runner: web.AppRunner | None = None

    def add_ready_check(self, name: str, check: Callable[[], bool]) -> None:
        self.ready_checks[name] = check

    async def _metrics(self, request: web.Request) -> web.Response:
        body = await self.exposition() if self.exposition else generate_latest(self.registry)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def _healthz(self, request: web.Request) -> web.Response:
        return web.Response(text="ok\n")

    async def _readyz(self, request: web.Request) -> web.Response:
        failed = [name for name, check in self.ready_checks.items() if not check()]
        if failed:
            return web.Response(status=503, text="not ready: " + ", ".join(sorted(failed)) + "\n")
        return web.Response(text="ok\n")

    async def start(self) -> None:
        self._runner = web.AppRunner(self.app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.host, self.port)
        await site.start()
        if self.port == 0:
            self.port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]

    async def stop(self) -> None:
        if self._runner:
            await self._runner.cleanup()
