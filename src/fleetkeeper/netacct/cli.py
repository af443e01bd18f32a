"""``fleetkeeper netacct``: the node agent for traffic accounting and egress shaping."""

from __future__ import annotations

import asyncio
import logging
import signal
from pathlib import Path
from typing import Any, Optional

import typer
from prometheus_client import CollectorRegistry, generate_latest

from fleetkeeper.core.domain import Names
from fleetkeeper.core.errors import ConfigError, FleetkeeperError
from fleetkeeper.core.server import OpsServer
from fleetkeeper.netacct.agent import Agent
from fleetkeeper.netacct.iptables import SubprocessRunner
from fleetkeeper.netacct.pods import FilePodSource, HttpPodSource, PodSource
from fleetkeeper.netacct.settings import NetacctSettings, load_settings

app = typer.Typer(help="Count node and pod traffic in iptables mangle rules, export it to Prometheus, "
                       "and shape pods' internet egress.", no_args_is_help=True)
log = logging.getLogger("fleetkeeper.netacct")

_CONFIG = typer.Option(None, "--config", "-c", help="YAML settings file (keys as in docs/netacct.md)")
_NODE = typer.Option(None, "--node", envvar="NODE_NAME", help="this node's name")
_PODS = typer.Option(None, "--pods-file", help="per-node pod view written by a relay (JSON or YAML)")
_RELAY = typer.Option(None, "--relay", help="caching relay base URL (GET {relay}/v1/nodes/{node}/pods)")
_RANGE = typer.Option(None, "--internal-range", help="internal CIDR (repeat; default 10.0.0.0/8)")
_UPLINK = typer.Option(None, "--uplink", help="interface whose egress shapes internet traffic (off if unset)")
_BACKEND = typer.Option(None, "--backend", help="iptables back end: auto, nft or legacy")
_NETNS = typer.Option(None, "--netns", help="act inside this network namespace (testing)")


def _settings(config: Optional[Path], **flags: Any) -> NetacctSettings:
    if flags.get("internal_ranges") == []:
        flags["internal_ranges"] = None
    return load_settings(config, flags)


def _source(st: NetacctSettings) -> PodSource:
    names = Names(st.domain)
    if st.relay_url:
        return HttpPodSource(st.relay_url, st.node, names, timeout_s=st.relay_timeout_s)
    if st.pods_file:
        return FilePodSource(st.pods_file, names)
    raise ConfigError("flags", [("pods_file", None, "set --pods-file or --relay (where this node's pods are listed)")])


def _fail(exc: FleetkeeperError) -> None:
    typer.echo(f"error: {exc}", err=True)
    raise typer.Exit(2 if isinstance(exc, ConfigError) else 1)


def _agent(st: NetacctSettings, netns: Optional[str], registry: CollectorRegistry | None = None) -> Agent:
    return Agent(st, _source(st), SubprocessRunner(netns), registry=registry)


@app.command()
def run(config: Optional[Path] = _CONFIG, node: Optional[str] = _NODE, pods_file: Optional[Path] = _PODS,
        relay: Optional[str] = _RELAY, internal_range: Optional[list[str]] = _RANGE,
        uplink: Optional[str] = _UPLINK, backend: Optional[str] = _BACKEND,
        interval: Optional[float] = typer.Option(None, "--interval", help="seconds between syncs"),
        listen: str = typer.Option("0.0.0.0:9812", "--listen", help="metrics address host:port"),
        netns: Optional[str] = _NETNS,
        verbose: bool = typer.Option(False, "--verbose", "-v")) -> None:
    """Run the agent: sync rules and shaping every --interval, serve /metrics."""
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s %(message)s")
    try:
        st = _settings(config, node=node, pods_file=pods_file, relay_url=relay, internal_ranges=internal_range,
                       uplink=uplink, backend=backend, interval_s=interval)
        host, _, port = listen.rpartition(":")
        if not port.isdigit():
            raise ConfigError("flags", [("--listen", listen, "must be host:port, e.g. 0.0.0.0:9812")])
        registry = CollectorRegistry()
        agent = _agent(st, netns, registry)
    except FleetkeeperError as exc:
        _fail(exc)
        return

    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        # each scrape reads the counters once (one iptables-save -c) and renders them
        server = OpsServer(registry, host or "0.0.0.0", int(port), exposition=agent.scrape)
        await server.start()
        log.info("netacct agent for node %s; metrics on %s", st.node, listen)
        try:
            await agent.run(stop)
        finally:
            await server.stop()

    asyncio.run(main())


@app.command()
def sync(config: Optional[Path] = _CONFIG, node: Optional[str] = _NODE, pods_file: Optional[Path] = _PODS,
         relay: Optional[str] = _RELAY, internal_range: Optional[list[str]] = _RANGE,
         uplink: Optional[str] = _UPLINK, backend: Optional[str] = _BACKEND,
         dry_run: bool = typer.Option(False, "--dry-run", help="print the plan, change nothing"),
         show_payload: bool = typer.Option(False, "--payload", help="also print the iptables-restore payload"),
         netns: Optional[str] = _NETNS) -> None:
    """One sync pass; with --dry-run, show what would change."""
    try:
        st = _settings(config, node=node, pods_file=pods_file, relay_url=relay, internal_ranges=internal_range,
                       uplink=uplink, backend=backend)
        rep = asyncio.run(_agent(st, netns).sync_once(dry_run=dry_run))
    except FleetkeeperError as exc:
        _fail(exc)
        return
    for line in rep.lines():
        typer.echo(line)
    if show_payload and rep.rule_plan is not None and not rep.rule_plan.empty:
        typer.echo(rep.rule_plan.render(), nl=False)
    if rep.problems:
        raise typer.Exit(3)


@app.command()
def show(config: Optional[Path] = _CONFIG, node: Optional[str] = _NODE, pods_file: Optional[Path] = _PODS,
         relay: Optional[str] = _RELAY, backend: Optional[str] = _BACKEND, uplink: Optional[str] = _UPLINK,
         netns: Optional[str] = _NETNS) -> None:
    """Print the current counters as Prometheus text (what /metrics would show)."""
    try:
        st = _settings(config, node=node or "local", pods_file=pods_file, relay_url=relay, backend=backend,
                       uplink=uplink)
        registry = CollectorRegistry()
        agent = Agent(st, _source(st) if (st.pods_file or st.relay_url) else _NoPods(), SubprocessRunner(netns),
                      registry=registry)
        asyncio.run(agent.refresh_stats())
    except FleetkeeperError as exc:
        _fail(exc)
        return
    typer.echo(generate_latest(registry).decode(), nl=False)


@app.command()
def cleanup(backend: str = typer.Option("auto", "--backend"), uplink: Optional[str] = _UPLINK,
            netns: Optional[str] = _NETNS) -> None:
    """Remove every fleetkeeper chain and jump, and fleetkeeper's uplink qdisc."""
    try:
        st = _settings(None, node="local", backend=backend, uplink=uplink)
        done = asyncio.run(Agent(st, _NoPods(), SubprocessRunner(netns)).uninstall())
    except FleetkeeperError as exc:
        _fail(exc)
        return
    for line in done or ["nothing to remove"]:
        typer.echo(line)


class _NoPods:
    async def list(self) -> list:
        return []
