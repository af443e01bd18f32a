"""``make demo``: the whole system on one machine.

1. build or reuse the control-plane binaries; start the local control plane
   with NODES simulated GPU/CPU nodes;
2. start fleetkeeper's controller manager in this process with every
   component that has controllers;
3. play each component's scenario (``<pkg>.demo:demo(ctx)``), in order;
4. print a summary; stop the cluster unless KEEP=1.

The fleet map is served by the same manager from the start: its URL is
printed before the scenarios, it shows them live, and with KEEP=1 it stays up
(with the manager) until Ctrl-C.
"""

from __future__ import annotations

import asyncio
import importlib
import os
import signal
import time
from collections import Counter
from dataclasses import dataclass, field

from prometheus_client import CollectorRegistry
from rich.panel import Panel

from fleetkeeper.cli.common import console, out
from fleetkeeper.core.domain import Names
from fleetkeeper.core.kube import NODES, Kube
from fleetkeeper.core.settings import RuntimeSettings
from fleetkeeper.localcluster.cluster import LocalCluster, node_ready


@dataclass
class DemoContext:
    cluster: LocalCluster
    kube: Kube
    names: Names
    registry: CollectorRegistry
    nodes: int
    lines: list[tuple[str, str]] = field(default_factory=list)
    section: str = ""

    def report(self, line: str) -> None:
        self.lines.append((self.section, line))
        out.print(f"  [cyan]{self.section}[/cyan] {line}")

    __call__ = report  # scenarios may take the context or just a report function


async def run_demo(nodes: int, keep: bool, components: dict[str, str]) -> None:
    t0 = time.monotonic()
    lc = LocalCluster()
    out.print(Panel(f"fleetkeeper demo: a real control plane with {nodes} simulated nodes", style="bold"))
    if lc.state_path.exists():
        # the scenario starts from a fresh cluster, so a second run tells the same story
        console.print(f"[dim]·[/dim] removing the previous local cluster in {lc.dir}")
        lc.down(purge=True)
        lc = LocalCluster()
    res = await lc.up(nodes, progress=lambda m: console.print(f"[dim]·[/dim] {m}"))
    out.print(f"control plane up at {lc.server}: {res['ready']} nodes Ready ({res['seconds']}s)")
    registry = CollectorRegistry()
    kube = await lc.connect()
    stop = asyncio.Event()
    ctx = DemoContext(lc, kube, Names(), registry, nodes)
    manager_task = None
    map_url: list[str] = []
    try:
        controllers = [c for c in components if _has(components[c], "controller")]
        from fleetkeeper.cli.main import run_manager
        from fleetkeeper.ui.server import UiOptions

        settings = RuntimeSettings(controllers=controllers, kubeconfig=str(lc.kubeconfig),
                                   server={"port": 0}, leader_election={"enabled": True})
        listening = asyncio.Event()

        def on_ui(server) -> None:
            map_url.append(server.url)
            out.print(f"[bold]fleet map: {server.url}[/bold] (live while the scenario runs"
                      f"{'; stays up afterwards' if keep else '; KEEP=1 keeps it up afterwards'})")
            listening.set()
        ui = UiOptions(port=int(os.environ.get("FLEETKEEPER_UI_PORT", "8088")), port_fallback=True,
                       components=dict(components))
        manager_task = asyncio.create_task(run_manager(settings, registry=registry, stop=stop, ui=ui, on_ui=on_ui))
        out.print(f"fleetkeeper running controllers: {', '.join(controllers)}")
        await asyncio.wait({asyncio.create_task(listening.wait()), manager_task}, timeout=60,
                           return_when=asyncio.FIRST_COMPLETED)
        ctx.section = "cluster"
        all_nodes, _ = await kube.list(NODES)
        pools = Counter((n["metadata"].get("labels") or {}).get(ctx.names.pool, "?") for n in all_nodes)
        ctx.report(f"{len(all_nodes)} nodes ({', '.join(f'{v} {k}' for k, v in sorted(pools.items()))}), "
                   f"{sum(1 for n in all_nodes if node_ready(n))} Ready")
        for name, pkg in components.items():
            if not _has(pkg, "demo"):
                continue
            ctx.section = name
            mod = importlib.import_module(f"{pkg}.demo")
            t = time.monotonic()
            try:
                await asyncio.wait_for(mod.demo(ctx), timeout=300)
            except Exception as exc:  # one broken scenario must not hide the others
                ctx.report(f"[red]scenario failed[/red]: {type(exc).__name__}: {exc}")
            ctx.report(f"({time.monotonic() - t:.1f}s)")
        if manager_task and manager_task.done() and manager_task.exception():
            raise manager_task.exception()  # type: ignore[misc]
        if keep and map_url and manager_task and not manager_task.done():
            out.print(Panel("\n".join(f"[cyan]{s:>10}[/cyan]  {line}" for s, line in ctx.lines) or "(nothing)",
                            title=f"summary ({time.monotonic() - t0:.0f}s)"))
            ctx.lines.clear()
            out.print(f"[bold]the fleet map stays up at {map_url[0]}[/bold]; Ctrl-C stops fleetkeeper "
                      f"(the cluster stays up)")
            await _until_interrupted(manager_task)
    finally:
        stop.set()
        if manager_task:
            await asyncio.gather(manager_task, return_exceptions=True)
        await kube.close()
        if ctx.lines:
            out.print(Panel("\n".join(f"[cyan]{s:>10}[/cyan]  {line}" for s, line in ctx.lines),
                            title=f"summary ({time.monotonic() - t0:.0f}s)"))
        if keep:
            out.print(f"cluster left up (KEEP=1). Look at it with:\n"
                      f"  .venv/bin/fleetkeeper cluster kubectl -- get nodes\n"
                      f"  .venv/bin/fleetkeeper explain node <name>\n"
                      f"and stop it with: .venv/bin/fleetkeeper cluster down")
        else:
            lc.down()
            out.print("cluster stopped (KEEP=1 leaves it up)")


async def _until_interrupted(task: asyncio.Task) -> None:
    """Wait for Ctrl-C or SIGTERM (or the manager ending)."""
    done = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, done.set)
    try:
        await asyncio.wait({asyncio.create_task(done.wait()), task}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)


def _has(pkg: str, module: str) -> bool:
    return importlib.util.find_spec(f"{pkg}.{module}") is not None
