"""``make demo``: the whole system on one machine.

1. build or reuse the control-plane binaries; start the local control plane
   with NODES simulated GPU/CPU nodes;
2. start fleetkeeper's controller manager in this process with every
   component that has controllers;
3. play each component's scenario (``<pkg>.demo:demo(ctx)``), in order; each
   returns an :class:`~fleetkeeper.core.outcome.Outcome` (the claims it checked);
4. print a summary, each scenario's outcome and each process's peak RSS and
   CPU seconds; stop the cluster unless KEEP=1.

:func:`run_demo` answers False when any scenario missed a claim (``make demo``
then exits 1).

The fleet map is served by the same manager from the start: its URL is
printed before the scenarios, it shows them live, and with KEEP=1 it stays up
(with the manager) until Ctrl-C.
"""

from __future__ import annotations

import asyncio
import importlib
import os
import resource
import signal
import time
from pathlib import Path
from collections import Counter
from dataclasses import dataclass, field

from prometheus_client import CollectorRegistry
from rich.panel import Panel
from rich.table import Table

from fleetkeeper.cli.common import console, out
from fleetkeeper.core.domain import Names
from fleetkeeper.core.kube import NODES, Kube
from fleetkeeper.core.outcome import Outcome
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


def scenario_timeout(nodes: int) -> float:
    return 300 + 0.04 * nodes  # 600 s at 7,500 nodes


async def run_scenario(ctx: DemoContext, mod, timeout: float) -> Outcome:
    """One scenario; an error, a time-out or no outcome at all is a missed claim."""
    try:
        res = await asyncio.wait_for(mod.demo(ctx), timeout=timeout)
    except TimeoutError:
        res = Outcome()
        res.expect(False, f"the scenario finishes within {timeout:.0f}s")
    except Exception as exc:  # one broken scenario must not hide the others
        res = Outcome()
        res.expect(False, "the scenario runs without an error", f"{type(exc).__name__}: {exc}")
    if not isinstance(res, Outcome):
        res = Outcome()
        res.expect(False, "the scenario reports its outcome", f"it returned {type(res).__name__}")
    return res


async def run_demo(nodes: int, keep: bool, components: dict[str, str]) -> bool:
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
    outcomes: dict[str, Outcome] = {}
    usage: list[tuple[str, float | None, float | None]] = []
    manager_task = None
    map_url: list[str] = []
    reported = False

    def report() -> None:
        nonlocal reported, usage
        if reported:
            return
        reported = True
        usage = process_usage(lc.state.pids)
        out.print(Panel("\n".join(f"[cyan]{s:>10}[/cyan]  {line}" for s, line in ctx.lines) or "(nothing)",
                        title=f"summary ({time.monotonic() - t0:.0f}s)"))
        out.print(outcome_table(outcomes))
        out.print(usage_table(usage))
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
            res = outcomes[name] = await run_scenario(ctx, mod, scenario_timeout(nodes))
            for c in res.missed:
                ctx.report(f"[red]MISSED[/red]: {c.text}" + (f" (seen: {c.seen})" if c.seen else ""))
            ctx.report(f"({time.monotonic() - t:.1f}s)")
        if manager_task and manager_task.done() and manager_task.exception():
            raise manager_task.exception()  # type: ignore[misc]
        if keep and map_url and manager_task and not manager_task.done():
            report()
            out.print(f"[bold]the fleet map stays up at {map_url[0]}[/bold]; Ctrl-C stops fleetkeeper "
                      f"(the cluster stays up)")
            await _until_interrupted(manager_task)
    finally:
        stop.set()
        if manager_task:
            await asyncio.gather(manager_task, return_exceptions=True)
        await kube.close()
        report()
        if keep:
            out.print(f"cluster left up (KEEP=1). Look at it with:\n"
                      f"  .venv/bin/fleetkeeper cluster kubectl -- get nodes\n"
                      f"  .venv/bin/fleetkeeper explain node <name>\n"
                      f"and stop it with: .venv/bin/fleetkeeper cluster down")
        else:
            lc.down()
            out.print("cluster stopped (KEEP=1 leaves it up)")
    ok = all(o.ok for o in outcomes.values())
    out.print("[green]every scenario reached its outcome[/green]" if ok else
              f"[red]missed: {', '.join(n for n, o in outcomes.items() if not o.ok)}[/red]")
    return ok


def outcome_table(outcomes: dict[str, Outcome]) -> Table:
    t = Table(title="outcomes")
    for col in ("scenario", "result", "claims"):
        t.add_column(col)
    for name, o in outcomes.items():
        if o.skipped:
            t.add_row(name, "[yellow]skipped[/yellow]", o.skipped)
            continue
        t.add_row(name, "[green]met[/green]" if o.ok else "[red]MISSED[/red]",
                  "\n".join(("ok  " if c.met else "MISS ") + c.text + (f" ({c.seen})" if c.seen and not c.met else "")
                            for c in o.claims))
    return t


_TICK = os.sysconf("SC_CLK_TCK")


def proc_usage(pid: int, proc: Path = Path("/proc")) -> tuple[float | None, float | None]:
    """(peak RSS in bytes, CPU seconds) of a live process, from the kernel's own
    accounting (VmHWM is the high-water mark of its resident set)."""
    try:
        status = (proc / str(pid) / "status").read_text()
        stat = (proc / str(pid) / "stat").read_text()
    except OSError:
        return None, None
    hwm = next((int(line.split()[1]) * 1024 for line in status.splitlines() if line.startswith("VmHWM:")), None)
    fields = stat[stat.rindex(")") + 2:].split()  # after "pid (comm) "; utime and stime are fields 14 and 15
    return hwm, (int(fields[11]) + int(fields[12])) / _TICK


def process_usage(pids: dict[str, int]) -> list[tuple[str, float | None, float | None]]:
    """Peak RSS and CPU seconds of each control-plane process, of this process
    (fleetkeeper: every component and the simulated agents) and of the
    short-lived children it ran and reaped (Prometheus, iptables, ...)."""
    rows = [(comp, *proc_usage(pid)) for comp, pid in sorted(pids.items())]
    me = resource.getrusage(resource.RUSAGE_SELF)
    rows.append(("fleetkeeper (this process)", me.ru_maxrss * 1024.0, me.ru_utime + me.ru_stime))
    ch = resource.getrusage(resource.RUSAGE_CHILDREN)
    rows.append(("processes it ran (Prometheus, iptables, ...; the largest one's peak)", ch.ru_maxrss * 1024.0,
                 ch.ru_utime + ch.ru_stime))
    return rows


def usage_table(rows: list[tuple[str, float | None, float | None]]) -> Table:
    t = Table(title="processes: peak RSS and CPU seconds")
    t.add_column("process")
    t.add_column("peak RSS MB", justify="right")
    t.add_column("CPU s", justify="right")
    for name, rss, cpu in rows:
        t.add_row(name, "?" if rss is None else f"{rss / 1e6:,.0f}", "?" if cpu is None else f"{cpu:,.1f}")
    return t


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
