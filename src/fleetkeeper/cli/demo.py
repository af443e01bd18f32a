"""``make demo``: the whole system on one machine.

1. build or reuse the control-plane binaries; start the local control plane
   with NODES simulated GPU/CPU nodes;
2. start fleetkeeper's controller manager in this process with every
   component that has controllers;
3. play each component's scenario (``<pkg>.demo:demo(ctx)``), in order;
4. print a summary; stop the cluster unless KEEP=1.
"""

from __future__ import annotations

import asyncio
import importlib
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
    try:
        controllers = [c for c in components if _has(components[c], "controller")]
        if controllers:
            from fleetkeeper.cli.main import run_manager

            settings = RuntimeSettings(controllers=controllers, kubeconfig=str(lc.kubeconfig),
                                       server={"port": 0}, leader_election={"enabled": True})
            manager_task = asyncio.create_task(run_manager(settings, registry=registry, stop=stop))
            out.print(f"fleetkeeper running controllers: {', '.join(controllers)}")
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
    finally:
        stop.set()
        if manager_task:
            await asyncio.gather(manager_task, return_exceptions=True)
        await kube.close()
        out.print(Panel("\n".join(f"[cyan]{s:>10}[/cyan]  {line}" for s, line in ctx.lines) or "(nothing)",
                        title=f"summary ({time.monotonic() - t0:.0f}s)"))
        if keep:
            out.print(f"cluster left up (KEEP=1). Look at it with:\n"
                      f"  .venv/bin/fleetkeeper cluster kubectl -- get nodes\n"
                      f"  .venv/bin/fleetkeeper explain node <name>\n"
                      f"and stop it with: .venv/bin/fleetkeeper cluster down")
        else:
            lc.down()
            out.print("cluster stopped (KEEP=1 leaves it up)")


def _has(pkg: str, module: str) -> bool:
    return importlib.util.find_spec(f"{pkg}.{module}") is not None
