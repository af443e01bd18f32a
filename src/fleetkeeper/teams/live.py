"""One-shot reads of the live cluster for the CLI and ``explain``: the
ConfigMap, the nodes and pods, and the plan ``decide`` makes from them (the
same function the controller runs)."""

from __future__ import annotations

import time
from dataclasses import dataclass

import orjson

from fleetkeeper.core import errors
from fleetkeeper.core.configmap import ConfigMapKey
from fleetkeeper.core.domain import Names
from fleetkeeper.core.kube import CONFIGMAPS, NODES, PODS, Kube
from fleetkeeper.core.views import NodeView, default_projector

from fleetkeeper.lifecycle import budget as bud
from fleetkeeper.lifecycle.explain import load_config as lifecycle_config
from fleetkeeper.teams.admission import borrower_label
from fleetkeeper.teams.config import CONFIG_KEY, DEFAULT_CONFIGMAP, TeamsConfig, parse_config
from fleetkeeper.teams.plan import NodeState, Plan, decide, fill_borrowed, recent_replacements, snapshot


def _parse(domain: str):
    def parse(text: str | None, source: str) -> TeamsConfig:
        if text is None:  # for teams, no ConfigMap is no configuration: an error, so nothing changes
            raise errors.ConfigError(source.rsplit(" key ", 1)[0], [(
                "", None, "ConfigMap not found: no team owns any node until it exists (a deleted one leaves "
                          "the last good configuration in force)")])
        return parse_config(text, source, domain)
    return parse


def config_source(kube: Kube, namespace: str, name: str, domain: str) -> ConfigMapKey[TeamsConfig]:
    """The teams ConfigMap through the core loader (the controller feeds it every watched version through
    :meth:`ConfigMapKey.offer`; the CLI reads it once)."""
    return ConfigMapKey(kube, namespace, name, CONFIG_KEY, _parse(domain))


@dataclass
class Live:
    config: TeamsConfig | None
    config_error: str
    controller_status: dict
    views: dict[str, NodeView]
    states: list[NodeState]
    plan: Plan | None
    budget_source: str = ""  # where the disruption budget the plan asked came from ("" : not asked)

    def team_rows(self) -> list[dict]:
        """Per team: desired, assigned, eligible, shortfall, borrowed, unhealthy held, reasons (the plan's,
        else the controller's last status)."""
        return [s.as_dict() for s in self.plan.teams.values()] if self.plan else \
            list(self.controller_status.get("teams", []))


async def read_config(kube: Kube, names: Names, namespace: str, configmap: str = DEFAULT_CONFIGMAP
                      ) -> tuple[TeamsConfig | None, str]:
    try:
        return await config_source(kube, namespace, configmap, names.domain).load(), ""
    except errors.ConfigError as exc:
        return None, str(exc)


async def load(kube: Kube, names: Names, namespace: str, configmap: str = DEFAULT_CONFIGMAP,
               status_configmap: str = "fleetkeeper-teams-status", replacement_budget: int | None = None) -> Live:
    """``replacement_budget`` None: what the rate limit leaves, from the nodes' record."""
    cfg, err = await read_config(kube, names, namespace, configmap)
    st_cm = await kube.get_or_none(CONFIGMAPS, status_configmap, namespace)
    status = {}
    if st_cm:
        try:
            status = orjson.loads((st_cm.get("data") or {}).get("status.json") or "{}")
        except orjson.JSONDecodeError:
            status = {}
    proj = default_projector(names.domain)
    nodes, _ = await kube.list(NODES)
    pods, _ = await kube.list(PODS, field_selector="status.phase!=Succeeded,status.phase!=Failed")
    views = {v.name: v for v in map(proj.node, nodes)}
    states, borrowers = snapshot(list(views.values()), [proj.pod(p) for p in pods], names, borrower_label(names))
    plan = None
    source = ""
    if cfg is not None:
        now = time.time()
        if replacement_budget is None:
            r = cfg.replacement
            replacement_budget = max(0, r.max_nodes - recent_replacements(views.values(), names, now,
                                                                          r.window_seconds))
        # the disruption budget in force, asked as the controller asks it (without its in-flight ledger)
        try:
            _, budget_cfg, source = await lifecycle_config(kube, namespace)
            admit = bud.Admitter(bud.snapshot(views.values(), names, budget_cfg), {}, budget_cfg, now, "team-replace")
        except errors.FleetkeeperError as exc:
            source, admit = f"not asked: {exc}", None
        plan = decide(states, cfg, replacement_budget, (lambda n: admit(n).admitted) if admit is not None else None)
        fill_borrowed(plan, borrowers)
    return Live(cfg, err, status, views, states, plan, source)
