"""``fleetkeeper teams``: status, plan/apply, validate, webhook recovery."""

from __future__ import annotations

import sys
from pathlib import Path

import orjson
from typing import Optional

import typer
from rich.console import Console
from rich.table import Table

from fleetkeeper.core import cliutil, errors
from fleetkeeper.core.domain import DEFAULT_DOMAIN, SYSTEM_NAMESPACE, Names

from fleetkeeper.teams.config import DEFAULT_CONFIGMAP, parse_config
from fleetkeeper.teams.live import load

app = typer.Typer(help="Team capacity: which nodes each team owns, and the toleration webhook.",
                  no_args_is_help=True)
out = Console()
err = Console(stderr=True)


_run = cliutil.run
_connect = cliutil.connect


KUBECONFIG = cliutil.kubeconfig_option()
NAMESPACE = typer.Option(SYSTEM_NAMESPACE, "--namespace", "-n", help="where the teams ConfigMap lives")
CONFIGMAP = typer.Option(DEFAULT_CONFIGMAP, "--configmap", help="name of the teams ConfigMap")
DOMAIN = typer.Option(DEFAULT_DOMAIN, "--domain", help="label/taint domain")


@app.command()
def status(kubeconfig: str = KUBECONFIG, context: Optional[str] = cliutil.context_option(), namespace: str = NAMESPACE, configmap: str = CONFIGMAP,
           domain: str = DOMAIN, output: str = cliutil.output_option(),
           as_json: bool = typer.Option(False, "--json", help="same as -o json")) -> None:
    """Per team: desired, assigned, eligible, shortfall, borrowed; and the configuration's state."""

    async def go():
        async with await _connect(kubeconfig) as kube:
            return await load(kube, Names(domain), namespace, configmap)

    live = _run(go())
    ctl = live.controller_status.get("config") or {}
    if cliutil.emit_structured({"configError": live.config_error, "controller": live.controller_status,
                                "teams": live.team_rows() if live.plan else [],
                                "pendingChanges": len(live.plan.changes) if live.plan else None},
                               "json" if as_json else output):
        return
    if live.config_error:
        err.print(f"[red]ConfigMap {namespace}/{configmap} is invalid[/red]:\n{live.config_error}")
        if ctl.get("inForceResourceVersion"):
            err.print(f"the controller keeps its last good configuration (resourceVersion "
                      f"{ctl['inForceResourceVersion']}); figures below are from the controller's last status")
    elif ctl and not ctl.get("valid", True):
        err.print(f"[yellow]controller reports[/yellow]: {ctl.get('error')}")
    rows = live.team_rows()
    t = Table(title=f"teams ({domain}/team)")
    for col in ("team", "desired", "assigned", "eligible", "shortfall", "borrowed", "unhealthy held"):
        t.add_column(col, justify="left" if col == "team" else "right")
    for r in rows:
        t.add_row(r["team"], str(r["desired"]), str(r["assigned"]), str(r["eligible"]),
                  f"[red]{r['shortfall']}[/red]" if r["shortfall"] else "0", str(r["borrowed"]),
                  str(r.get("unhealthy_held", 0)))
    out.print(t)
    for r in rows:
        for reason in r.get("reasons", []):
            out.print(f"  {r['team']}: {reason}")
    if live.plan:
        for line in live.plan.overlaps:
            out.print(f"  overlap: {line}")
        if live.plan.changes:
            out.print(f"{len(live.plan.changes)} node change(s) pending (see 'fleetkeeper teams apply --dry-run')")
        else:
            out.print("in sync: every node carries the team it should")
    if live.config_error:
        raise typer.Exit(2)


@app.command()
def apply(kubeconfig: str = KUBECONFIG, context: Optional[str] = cliutil.context_option(), namespace: str = NAMESPACE, configmap: str = CONFIGMAP,
          domain: str = DOMAIN, dry_run: bool = typer.Option(False, "--dry-run", help="print the plan; write nothing"),
          limit: int = typer.Option(50, "--limit", min=1, help="print at most this many changes")) -> None:
    """Plan (and with no --dry-run, apply once) the node changes the controller would make."""
    import time

    from fleetkeeper.core.applier import Applier
    from fleetkeeper.core.events import EventRecorder
    from fleetkeeper.teams.apply import apply_changes
    from fleetkeeper.teams.metrics import TeamsMetrics
    from prometheus_client import CollectorRegistry

    async def go():
        async with await _connect(kubeconfig) as kube:
            names = Names(domain)
            live = await load(kube, names, namespace, configmap)
            if live.config is None:
                raise errors.ConfigError(f"configmap {namespace}/{configmap}", [("", None, live.config_error)])
            plan = live.plan
            assert plan is not None
            out.print(f"{len(plan.changes)} change(s){' (dry-run: nothing written)' if dry_run else ''}")
            for c in plan.changes[:limit]:
                out.print(f"  {c.node}: {c.action} {c.old_team or 'none'} -> {c.new_team or 'none'}  ({c.reason})")
            if len(plan.changes) > limit:
                out.print(f"  ... and {len(plan.changes) - limit} more")
            for s in plan.teams.values():
                if s.shortfall:
                    out.print(f"  [yellow]{s.team} short by {s.shortfall}[/yellow]: {'; '.join(s.reasons)}")
            if plan.budget_held:
                out.print(f"  [yellow]{len(plan.budget_held)} replacement(s) held by the disruption budget[/yellow] "
                          f"({live.budget_source}): {', '.join(plan.budget_held[:10])}")
            if dry_run or not plan.changes:
                return
            w = live.config.writes
            registry = CollectorRegistry()
            applier = Applier(kube, EventRecorder(kube, "teams", namespace="default"), component="teams",
                              registry=registry, writes_per_second=w.per_second)
            applier.set_write_rate(w.per_second, w.burst)
            res = await apply_changes(applier, plan.changes, live.views, names, now=time.time(),
                                      concurrency=w.concurrency, metrics=TeamsMetrics(registry))
            await applier.recorder.flush(30.0)  # its Events are written before the command exits
            out.print(f"written: {len(res.ok)}, conflicts: {res.conflicts}, failed: {res.failed}")
            if res.conflicts or res.failed:
                raise errors.Temporary("some nodes changed meanwhile or failed; run again")

    _run(go())


@app.command()
def validate(path: Path = typer.Argument(..., exists=True, dir_okay=False, help="a config.yaml to check"),
             domain: str = DOMAIN) -> None:
    """Validate a teams configuration file offline (exit 2 with every problem listed)."""
    try:
        cfg = parse_config(path.read_text(), str(path), domain)
    except errors.ConfigError as exc:
        err.print(f"[red]configuration error[/red]: {exc}")
        raise typer.Exit(2) from None
    out.print(f"ok: {len(cfg.teams)} entries, teams: {', '.join(cfg.team_names) or 'none'}")


webhook_app = typer.Typer(help="The toleration webhook's registration.", no_args_is_help=True)
app.add_typer(webhook_app, name="webhook")


@webhook_app.command("unregister")
def webhook_unregister(name: str = typer.Option("fleetkeeper-teams", "--name", help="webhook configuration name"),
                       kubeconfig: str = KUBECONFIG, context: Optional[str] = cliutil.context_option()) -> None:
    """Recovery: delete the webhook configurations (e.g. the webhook is down and
    its Fail policy blocks pod creation). The controller re-registers on start."""
    from fleetkeeper.teams.serve import unregister

    async def go():
        async with await _connect(kubeconfig) as kube:
            await unregister(kube, name)

    _run(go())
    out.print(f"deleted Mutating/ValidatingWebhookConfiguration {name} (if they existed)")


@webhook_app.command("show")
def webhook_show(host: str = typer.Option("127.0.0.1", "--host"), port: int = typer.Option(9443, "--port"),
                 service: str = typer.Option(None, "--service", help="NAMESPACE/NAME[:PORT]"),
                 namespace: str = NAMESPACE, domain: str = DOMAIN) -> None:
    """Print the webhook configurations the controller registers (with a placeholder CA)."""
    from fleetkeeper.teams.options import WebhookOptions
    from fleetkeeper.teams.serve import registrations

    opts = WebhookOptions(host=host, port=port, service=service)
    for obj in registrations(opts, namespace, port, b"<CA bundle>", domain):
        sys.stdout.write(orjson.dumps(obj, option=orjson.OPT_INDENT_2).decode() + "\n")
