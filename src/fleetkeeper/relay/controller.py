"""Wiring: the relay (one watch per resource, served to agents) and the join
pacer, as runnables of the controller manager.

* the relay runs on every replica (``leader=False``): it only reads;
* the join pacer writes, so it runs only on the leader.
"""

from __future__ import annotations

import asyncio
import logging
import resource
from dataclasses import dataclass

from fleetkeeper.core import errors
from fleetkeeper.core.configmap import watch_at_start_only
from fleetkeeper.core.informer import Informer
from fleetkeeper.core.kube import CONFIGMAPS, NODES, PODS
from fleetkeeper.core.manager import Manager
from fleetkeeper.relay.admission import open_files_plan
from fleetkeeper.relay.auth import TokenReviewAuthenticator
from fleetkeeper.relay.hub import Hub
from fleetkeeper.relay.metrics import PacerMetrics, RelayMetrics
from fleetkeeper.relay.pacing import CONTROLLER, JoinPacer, parse_selector
from fleetkeeper.relay.server import RelayServer
from fleetkeeper.relay.settings import PacerSettings, RelayConfig, RelaySettings, config_source
from fleetkeeper.relay.views import AgentProjector

log = logging.getLogger("fleetkeeper.relay")


@dataclass
class RelayHandle:
    hub: Hub
    server: RelayServer
    informers: tuple[Informer, ...]
    metrics: RelayMetrics

    def synced(self) -> bool:
        return all(i.synced for i in self.informers)

    @property
    def upstream_watches(self) -> int:
        return len(self.informers)


def raise_open_files(expected_agents: int) -> int:
    """Raise this process's soft open-file limit to the hard one (each agent holds a
    connection; Linux's default soft limit of 1,024 serves a thousand agents at
    most) and log whether it holds ``expected_agents``. Returns the soft limit now."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    plan = open_files_plan(soft, hard, expected_agents, infinity=resource.RLIM_INFINITY)
    if plan.soft != soft:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (plan.soft, hard))
        except (ValueError, OSError) as exc:
            log.warning("relay: cannot raise the open-file limit from %d to %d: %s", soft, plan.soft, exc)
            plan = open_files_plan(soft, soft, expected_agents)
    getattr(log, plan.level)("relay: %s", plan.message)
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def add_relay(mgr: Manager, cfg: RelaySettings) -> RelayHandle:
    """Add the relay's three informers (nodes, pods, the team ConfigMap) and its
    HTTP server to ``mgr``."""
    prefixes = tuple(cfg.annotation_prefixes) or (f"{mgr.settings.domain}/",)
    projector = AgentProjector(prefixes)
    metrics = RelayMetrics(mgr.registry)
    hub = Hub(history=cfg.history, buffer=cfg.buffer)
    pods = mgr.informer(PODS, projector.pod, key="relay-agent-pod")
    nodes = mgr.informer(NODES, projector.node, key="relay-agent-node")
    teams = mgr.informer(CONFIGMAPS, AgentProjector.teams, namespace=mgr.settings.namespace,
                         field_selector=f"metadata.name={cfg.teams_configmap}", key="relay-teams")
    pods.add_handler(hub.on_pod)
    nodes.add_handler(hub.on_node)
    teams.add_handler(hub.on_teams)
    informers = (nodes, pods, teams)
    auth = None
    if cfg.auth == "tokenreview":
        auth = TokenReviewAuthenticator(mgr.kube, audiences=tuple(cfg.audiences), cache_ttl=cfg.token_cache_seconds,
                                        clock=mgr.clock, on_review=metrics.token_reviews.inc)
    server = RelayServer(hub, cfg, metrics, ready=lambda: all(i.synced for i in informers), authenticator=auth)
    handle = RelayHandle(hub, server, informers, metrics)
    metrics.attach_hub(hub, lambda: handle.upstream_watches)

    async def serve() -> None:
        metrics.open_files_limit.set(raise_open_files(cfg.expected_agents))
        delay = 1.0
        while True:  # a port in use must not take the manager's other controllers down with it
            try:
                await server.start()
                break
            except OSError as exc:
                log.error("relay cannot listen on %s:%d: %s; retrying in %.0fs", cfg.host, cfg.port, exc, delay)
                await server.stop()
                server.reset()
                await asyncio.sleep(delay)
                delay = min(delay * 2, 60.0)
        try:
            await asyncio.Event().wait()
        finally:
            await server.stop()

    mgr.add("relay", serve, leader=False)
    return handle


def add_pacer(mgr: Manager, cfg: PacerSettings) -> JoinPacer:
    """Add the join pacer (leader only). Its selector is matched against the
    manager's shared NodeView, which keeps only some label prefixes; a selector
    on any other label would never match, so it is refused here."""
    try:
        keys = [k for k, _, _ in parse_selector(cfg.node_selector).reqs]
    except ValueError as exc:
        raise errors.ConfigError("pacer", [("node_selector", cfg.node_selector, str(exc))]) from None
    for key in keys:
        if not key.startswith(mgr.projector.keep):
            raise errors.ConfigError("pacer", [("node_selector", cfg.node_selector,
                                                f"label {key!r} is not kept in node views; use a label under "
                                                f"{', '.join(mgr.projector.keep)}")])
    pacer = JoinPacer(mgr.kube, mgr.node_informer(), cfg, mgr.names, mgr.settings.namespace,
                      recorder=mgr.recorder(CONTROLLER), metrics=PacerMetrics(mgr.registry),
                      runtime_metrics=mgr.metrics, clock=mgr.clock, dry_run=mgr.settings.dry_run,
                      registry=mgr.registry)
    mgr.add(CONTROLLER, pacer.run, leader=True)
    return pacer


async def setup(mgr: Manager, options: RelayConfig | None) -> None:
    """``fleetkeeper run``: the configuration comes from the ConfigMap
    ``fleetkeeper-relay`` (or the defaults: relay on, pacer off)."""
    src = config_source(mgr.kube, mgr.settings.namespace)
    cfg = options if options is not None else await src.load()
    if cfg.relay.enabled:
        add_relay(mgr, cfg.relay)
    if cfg.pacer.enabled:
        add_pacer(mgr, cfg.pacer)
    if options is None:  # applied at start; later versions are checked and reported (the running one stays)
        mgr.add("relay-config-watch", lambda: watch_at_start_only(src, mgr.clock.sleep), leader=False)
