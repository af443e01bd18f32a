"""``fleetkeeper relay``: serve node agents, pace joins, look at a node's view."""

from __future__ import annotations

import logging
from pathlib import Path

import orjson
from typing import Optional

import typer

from fleetkeeper.core import cliutil, errors
from fleetkeeper.core import log as fklog
from fleetkeeper.core.config import load_model
from fleetkeeper.core.domain import DEFAULT_DOMAIN, SYSTEM_NAMESPACE
from fleetkeeper.core.kube import Kube
from fleetkeeper.core.manager import Manager
from fleetkeeper.core.settings import RuntimeSettings
from fleetkeeper.relay.client import RelayClient
from fleetkeeper.relay.settings import PacerSettings, RelaySettings, parse_config

app = typer.Typer(help="Caching relay for node agents (one API-server watch per resource) and paced node joins.",
                  no_args_is_help=True)
log = logging.getLogger("fleetkeeper.relay")


def _fail(exc: errors.FleetkeeperError) -> None:
    raise cliutil.fail(exc)


_run = cliutil.run


def _split_listen(listen: str) -> tuple[str, str]:
    host, sep, port = listen.rpartition(":")
    if not sep:
        return "127.0.0.1", listen
    return host.strip("[]") or "0.0.0.0", port


def _runtime(kubeconfig: str | None, namespace: str, domain: str, metrics_port: int, dry_run: bool,
             leader_elect: bool) -> RuntimeSettings:
    return load_model(RuntimeSettings, {"kubeconfig": kubeconfig, "namespace": namespace, "domain": domain,
                                        "server": {"host": "0.0.0.0" if metrics_port else "127.0.0.1",
                                                   "port": metrics_port},
                                        "dry_run": dry_run, "leader_election": {"enabled": leader_elect,
                                                                                "lease_name": "fleetkeeper-join-pacer"}},
                      "flags")


async def _manager_main(settings: RuntimeSettings, build) -> None:
    kube = await cliutil.connect(settings.kubeconfig)
    try:
        mgr = Manager(kube, settings)
        build(mgr)
        await cliutil.until_stopped(mgr.run(), cliutil.stop_on_signals())
    finally:
        await kube.close()


KUBECONFIG = typer.Option(None, "--kubeconfig", envvar="KUBECONFIG", help="kubeconfig (default: in-cluster)")


@app.command()
def serve(
    listen: str = typer.Option("127.0.0.1:8081", help="host:port agents connect to"),
    tls_cert: str = typer.Option(None, help="serving certificate (PEM); with --tls-key"),
    tls_key: str = typer.Option(None, help="serving key (PEM)"),
    auth: str = typer.Option("none", help="none | tokenreview"),
    agent_sa: list[str] = typer.Option([], "--agent-service-account",
                                       help="namespace:name of an agent ServiceAccount (repeatable)"),
    reader_group: list[str] = typer.Option([], "--reader-group", help="group allowed to read every node"),
    audience: list[str] = typer.Option([], "--audience", help="token audience to require (repeatable)"),
    history: int = typer.Option(128, help="events kept per node for resuming watches"),
    buffer: int = typer.Option(1024, help="events queued per watcher before it is dropped"),
    bookmark_interval: float = typer.Option(30.0, help="seconds between bookmarks on an idle watch"),
    watch_timeout: int = typer.Option(300, help="longest agent watch, seconds"),
    max_inflight: int = typer.Option(256, help="agent requests answered at once before new ones get 503 "
                                     "with Retry-After"),
    max_lag: float = typer.Option(5.0, help="seconds the event loop may run late before new agent requests get "
                                  "503 with Retry-After"),
    expected_agents: int = typer.Option(0, help="agents this process serves: the open-file limit is checked "
                                        "against it at start (needs 2 x agents + 1024)"),
    config: Path = typer.Option(None, "--config", help="YAML file with a 'relay:' section (overrides the flags)"),
    kubeconfig: str = KUBECONFIG, context: Optional[str] = cliutil.context_option(),
    namespace: str = typer.Option(SYSTEM_NAMESPACE, help="where the team ConfigMap lives"),
    domain: str = typer.Option(DEFAULT_DOMAIN, help="label/annotation domain"),
    metrics_port: int = typer.Option(8082, min=0, max=65535, help="/metrics, /healthz, /readyz"),
    log_level: str = typer.Option("info"),
) -> None:
    """Run the relay: one watch per resource on the API server, each agent served its node's view."""
    fklog.setup(log_level, "auto")
    from fleetkeeper.relay.controller import add_relay

    try:
        if config is not None:
            try:
                text = config.read_text()
            except OSError as exc:
                raise errors.ConfigError(str(config), [("", str(config), f"cannot read: {exc.strerror}")]) from None
            rs = parse_config(text, str(config)).relay
        else:
            host, port = _split_listen(listen)
            rs = load_model(RelaySettings, {
                "host": host, "port": port, "tls_cert": tls_cert, "tls_key": tls_key, "auth": auth,
                "agent_service_accounts": agent_sa, "reader_groups": reader_group, "audiences": audience,
                "history": history, "buffer": buffer, "bookmark_interval": bookmark_interval,
                "watch_timeout": watch_timeout, "max_inflight": max_inflight, "max_lag": max_lag,
                "expected_agents": expected_agents}, "flags")
        settings = _runtime(kubeconfig, namespace, domain, metrics_port, False, False)
    except errors.ConfigError as exc:
        _fail(exc)
    _run(_manager_main(settings, lambda mgr: add_relay(mgr, rs)))


@app.command()
def pace(
    rate: float = typer.Option(20.0, min=0, help="nodes per second whose join work starts (0: unpaced)"),
    burst: int = typer.Option(20, min=1),
    workers: int = typer.Option(8, min=1, max=1000),
    selector: str = typer.Option("", "--selector", help="label selector of the nodes to handle"),
    label: list[str] = typer.Option([], "--label", help="KEY=VALUE set on each new node (repeatable)"),
    taint: list[str] = typer.Option([], "--taint", help="KEY=VALUE:EFFECT added to each new node (repeatable)"),
    bootstrap_image: str = typer.Option(None, "--bootstrap-image", help="create a per-node bootstrap pod"),
    bootstrap_namespace: str = typer.Option(None, "--bootstrap-namespace"),
    dry_run: bool = typer.Option(False, "--dry-run", help="decide and report; never write"),
    leader_elect: bool = typer.Option(True, "--leader-elect/--no-leader-elect"),
    kubeconfig: str = KUBECONFIG, context: Optional[str] = cliutil.context_option(),
    namespace: str = typer.Option(SYSTEM_NAMESPACE),
    domain: str = typer.Option(DEFAULT_DOMAIN),
    metrics_port: int = typer.Option(8083, min=0, max=65535),
    log_level: str = typer.Option("info"),
) -> None:
    """Run the join pacer alone: per-node join work at a configured rate."""
    fklog.setup(log_level, "auto")
    from fleetkeeper.relay.controller import add_pacer

    try:
        labels: dict[str, str] = {}
        for i, item in enumerate(label):
            k, sep, v = item.partition("=")
            if not sep or not k:
                raise errors.ConfigError("flags", [(f"label[{i}]", item, "expected KEY=VALUE")])
            labels[k] = v
        taints = []
        for i, item in enumerate(taint):
            kv, sep, effect = item.rpartition(":")
            k, _, v = kv.partition("=")
            if not sep or not k:
                raise errors.ConfigError("flags", [(f"taint[{i}]", item, "expected KEY=VALUE:EFFECT")])
            taints.append({"key": k, "value": v, "effect": effect})
        ps = load_model(PacerSettings, {
            "enabled": True, "rate": rate, "burst": burst, "workers": workers, "node_selector": selector,
            "labels": labels, "taints": taints,
            "bootstrap_pod": ({"image": bootstrap_image, "namespace": bootstrap_namespace}
                              if bootstrap_image else None)}, "flags")
        from fleetkeeper.relay.pacing import parse_selector

        try:
            parse_selector(selector)
        except ValueError as exc:
            raise errors.ConfigError("flags", [("selector", selector, str(exc))]) from None
        settings = _runtime(kubeconfig, namespace, domain, metrics_port, dry_run, leader_elect)
    except errors.ConfigError as exc:
        _fail(exc)
    _run(_manager_main(settings, lambda mgr: add_pacer(mgr, ps)))


async def _view(url: str, node: str, token_file: str | None, ca: str | None) -> dict:
    async with RelayClient(url, node, token_file=token_file, ca_file=ca) as c:
        st = await c.view()
        return {"resourceVersion": st.resource_version, "node": st.node, "pods": st.pod_items(),
                "teams": st.teams}


@app.command()
def view(
    node: str,
    relay: str = typer.Option("http://127.0.0.1:8081", "--relay", help="relay base URL"),
    token_file: str = typer.Option(None, help="bearer token file (the agent's ServiceAccount token)"),
    ca_file: str = typer.Option(None, help="CA bundle of the relay's serving certificate"),
) -> None:
    """Print NODE's view as the relay serves it to the node's agent (JSON)."""
    typer.echo(orjson.dumps(_run(_view(relay, node, token_file, ca_file)), option=orjson.OPT_INDENT_2).decode())


async def _watch(url: str, node: str, token_file: str | None, ca: str | None, count: int) -> None:
    async with RelayClient(url, node, token_file=token_file, ca_file=ca) as c:
        seen = 0
        async for st in c.sync():
            typer.echo(f"rv={st.resource_version} node={'yes' if st.node else 'no'} pods={len(st.pods)} "
                       f"teams={'yes' if st.teams else 'no'} relists={st.relists} events={st.events}")
            seen += 1
            if count and seen >= count:
                return


@app.command()
def watch(
    node: str,
    relay: str = typer.Option("http://127.0.0.1:8081", "--relay"),
    token_file: str = typer.Option(None),
    ca_file: str = typer.Option(None),
    count: int = typer.Option(0, help="stop after this many updates (0: run until interrupted)"),
) -> None:
    """Follow NODE's view through the relay, as an agent does; one line per change."""
    _run(_watch(relay, node, token_file, ca_file, count))
