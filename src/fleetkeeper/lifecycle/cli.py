"""``fleetkeeper lifecycle``: every node's state, deadline and next step; and
``fleetkeeper budget`` (registered at the top level): the disruption budget in use."""

from __future__ import annotations

import time
from typing import Optional

import typer

from fleetkeeper.core import cliutil
from fleetkeeper.core.domain import DEFAULT_DOMAIN, SYSTEM_NAMESPACE, Names
from fleetkeeper.lifecycle import machine
from fleetkeeper.lifecycle.explain import budget_report, format_budget, load_fleet

app = typer.Typer(help="The node lifecycle: states, deadlines, escalations.", no_args_is_help=True)


async def _fleet(kubeconfig, context, domain, namespace):
    kube = await cliutil.connect(kubeconfig, context)
    try:
        return await load_fleet(kube, Names(domain), namespace)
    finally:
        await kube.close()


@app.command()
def status(
    kubeconfig: Optional[str] = cliutil.kubeconfig_option(),
    context: Optional[str] = cliutil.context_option(),
    domain: str = typer.Option(DEFAULT_DOMAIN, "--domain"),
    namespace: str = typer.Option(SYSTEM_NAMESPACE, "--namespace"),
    output: str = cliutil.output_option(),
) -> None:
    """Nodes by lifecycle state, and every node past its state's deadline."""
    fleet = cliutil.run(_fleet(kubeconfig, context, domain, namespace))
    now = time.time()
    counts: dict[str, int] = {}
    overdue = []
    for n in fleet.nodes:
        d = machine.decide(fleet.facts(n), fleet.cfg, fleet.names, now)
        counts[d.state] = counts.get(d.state, 0) + 1
        if d.deadline is not None and now >= d.deadline:
            overdue.append({"node": n.name, "state": d.state, "since": d.since, "next": d.next_step})
    if cliutil.emit_structured({"states": counts, "overdue": overdue}, output):
        return
    typer.echo("nodes: " + ", ".join(f"{counts[s]} {s}" for s in machine.STATES if counts.get(s)))
    for o in overdue[:50]:
        typer.echo(f"  overdue {o['node']}: {o['state']} since {o['since']:.0f}; {o['next']}")


def budget(
    kubeconfig: Optional[str] = cliutil.kubeconfig_option(),
    context: Optional[str] = cliutil.context_option(),
    domain: str = typer.Option(DEFAULT_DOMAIN, "--domain"),
    namespace: str = typer.Option(SYSTEM_NAMESPACE, "--namespace"),
    output: str = cliutil.output_option(),
) -> None:
    """The one disruption budget: nodes out of service per cluster, zone, rack and named label, and new
    disruptions in the window (health, preflight and the lifecycle all ask it)."""
    fleet = cliutil.run(_fleet(kubeconfig, context, domain, namespace))
    rep = budget_report(fleet, time.time())
    if not cliutil.emit_structured(rep, output):
        typer.echo(format_budget(rep))
