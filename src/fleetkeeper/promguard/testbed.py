"""A real Prometheus on loopback, loaded with a large synthetic series set.

Used by the end-to-end tests, the benchmark and the demo. Nothing here is
used in production. The synthetic target is an aiohttp server on 127.0.0.1
serving a GPU-fleet-shaped histogram (node x GPU x collective op x bucket);
it serves the full body once, then an empty body, so Prometheus pays for
the ingest once and the series stay in the head for the queries.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import orjson
from aiohttp import web

BUCKETS = ("0.005", "0.01", "0.025", "0.05", "0.1", "0.25", "0.5", "1", "2.5", "5", "10", "+Inf")
OPS = ("allreduce", "allgather", "reduce_scatter", "broadcast")
METRIC = "gpu_collective_latency_seconds"


def find_binary(name: str) -> str | None:
    return shutil.which(name) or (f"/usr/bin/{name}" if os.access(f"/usr/bin/{name}", os.X_OK) else None)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def series_count(nodes: int, gpus: int = 8) -> int:
    """Bucket series the synthetic exposition creates (plus _sum/_count)."""
    return nodes * gpus * len(OPS) * (len(BUCKETS) + 2)


def exposition(nodes: int, gpus: int = 8) -> bytes:
    """A text exposition with ``series_count(nodes, gpus)`` series."""
    lines = [f"# HELP {METRIC} Collective op latency per GPU\n", f"# TYPE {METRIC} histogram\n"]
    for n in range(nodes):
        node = f"gpu-node-{n:05d}.research.cluster.internal"
        rack = f"rack-{n // 32:04d}"
        for g in range(gpus):
            for op in OPS:
                common = f'node="{node}",rack="{rack}",gpu="{g}",uuid="GPU-{n:05d}{g:02d}-8c1e-4d2a-bbbb-{n:06x}{g:02x}",op="{op}"'
                for i, le in enumerate(BUCKETS):
                    lines.append(f'{METRIC}_bucket{{{common},le="{le}"}} {i * 3}\n')
                lines.append(f"{METRIC}_sum{{{common}}} 1.5\n")
                lines.append(f"{METRIC}_count{{{common}}} {len(BUCKETS) * 3}\n")
    return "".join(lines).encode()


class SyntheticTarget:
    """Serves ``body`` for the first ``full_scrapes`` scrapes, then nothing."""

    def __init__(self, body: bytes, full_scrapes: int = 1):
        self.body = body
        self.full_scrapes = full_scrapes
        self.scrapes = 0
        self.port = 0
        self._runner: web.AppRunner | None = None

    async def _metrics(self, request: web.Request) -> web.Response:
        self.scrapes += 1
        body = self.body if self.scrapes <= self.full_scrapes else b"# no series\n"
        return web.Response(body=body, content_type="text/plain", charset="utf-8")

    async def start(self) -> int:
        app = web.Application()
        app.router.add_get("/metrics", self._metrics)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        return self.port

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None


@dataclass
class PrometheusProcess:
    """A Prometheus child process on 127.0.0.1 with its data in a temp dir."""

    config: str
    binary: str = "prometheus"
    extra_args: tuple[str, ...] = ()
    env: dict[str, str] | None = None

    def __post_init__(self) -> None:
        self.port = 0
        self.proc: subprocess.Popen | None = None
        self.dir: Path | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def start(self, ready_timeout: float = 30.0) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="fk-prom-"))
        (self.dir / "prometheus.yml").write_text(self.config)
        self.port = free_port()
        args = [
            self.binary,
            f"--config.file={self.dir / 'prometheus.yml'}",
            f"--storage.tsdb.path={self.dir / 'data'}",
            f"--web.listen-address=127.0.0.1:{self.port}",
            "--storage.tsdb.retention.time=1d",
            *self.extra_args,
        ]
        self.log = open(self.dir / "prometheus.log", "wb")
        self.proc = subprocess.Popen(args, stdout=self.log, stderr=subprocess.STDOUT,
                                     env={**os.environ, **(self.env or {})}, start_new_session=True)
        deadline = time.monotonic() + ready_timeout
        async with aiohttp.ClientSession() as s:
            while time.monotonic() < deadline:
                if self.proc.poll() is not None:
                    raise RuntimeError(f"prometheus exited with {self.proc.returncode}: {self.tail()}")
                try:
                    async with s.get(f"{self.url}/-/ready") as r:
                        if r.status == 200:
                            return
                except aiohttp.ClientError:
                    pass
                await asyncio.sleep(0.1)
        raise RuntimeError(f"prometheus not ready after {ready_timeout}s: {self.tail()}")

    def tail(self, n: int = 2000) -> str:
        if self.dir is None:
            return ""
        try:
            return (self.dir / "prometheus.log").read_text(errors="replace")[-n:]
        except OSError:
            return ""

    async def query_scalar(self, expr: str) -> float | None:
        async with aiohttp.ClientSession() as s:
            async with s.get(f"{self.url}/api/v1/query", params={"query": expr}) as r:
                body = orjson.loads(await r.read())
        res = body.get("data", {}).get("result", [])
        return float(res[0]["value"][1]) if res else None

    async def wait_for(self, expr: str, at_least: float, timeout: float = 60.0) -> float:
        deadline = time.monotonic() + timeout
        last = None
        while time.monotonic() < deadline:
            try:
                last = await self.query_scalar(expr)
            except aiohttp.ClientError:
                last = None
            if last is not None and last >= at_least:
                return last
            await asyncio.sleep(0.25)
        raise TimeoutError(f"{expr} = {last}, wanted >= {at_least} within {timeout}s; log: {self.tail()}")

    async def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                await asyncio.to_thread(self.proc.wait, 10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                await asyncio.to_thread(self.proc.wait, 5)
        if getattr(self, "log", None):
            self.log.close()
        if self.dir is not None:
            shutil.rmtree(self.dir, ignore_errors=True)


def scrape_config(target_port: int, interval: str = "1s") -> str:
    return f"""
global:
  scrape_interval: {interval}
  scrape_timeout: {interval}
scrape_configs:
  - job_name: synthetic-gpu
    static_configs:
      - targets: ['127.0.0.1:{target_port}']
"""


class LoadedPrometheus:
    """A Prometheus holding ``series_count(nodes)`` synthetic series in its head."""

    def __init__(self, nodes: int, binary: str | None = None):
        self.nodes = nodes
        self.binary = binary or find_binary("prometheus") or "prometheus"
        self.target: SyntheticTarget | None = None
        self.prom: PrometheusProcess | None = None
        self.series = series_count(nodes)

    async def __aenter__(self) -> "LoadedPrometheus":
        body = await asyncio.to_thread(exposition, self.nodes)
        self.target = SyntheticTarget(body)
        port = await self.target.start()
        # A 2s scrape timeout so the one big scrape is never cut short.
        self.prom = PrometheusProcess(scrape_config(port, "2s"), binary=self.binary)
        try:
            await self.prom.start()
            await self.prom.wait_for('scrape_samples_scraped{job="synthetic-gpu"}', self.series, timeout=90)
        except BaseException:
            await self.aclose()
            raise
        return self

    async def aclose(self) -> None:
        if self.prom is not None:
            await self.prom.stop()
        if self.target is not None:
            await self.target.stop()

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    @property
    def url(self) -> str:
        assert self.prom is not None
        return self.prom.url


async def timed_get(url: str, params: list[tuple[str, str]], timeout: float = 120.0) -> tuple[float, int, dict | None, int]:
    """GET once; answer (seconds, status, parsed JSON or None, body bytes)."""
    t0 = time.monotonic()
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=timeout)) as s:
        async with s.get(url, params=params) as r:
            raw = await r.read()
            status = r.status
    dt = time.monotonic() - t0
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError:
        body = None
    return dt, status, body, len(raw)
