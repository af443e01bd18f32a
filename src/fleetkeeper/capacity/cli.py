"""``fleetkeeper capacity``: balloons and gangs from the command line.

* ``config``     validate a configuration file and print it with defaults filled in
* ``balloons``   what the balloon manager would do now (plan, per-pool idle capacity)
* ``manifests``  the PriorityClass and balloon Deployments as YAML (GitOps, review)
* ``gangs``      every gang in the cluster, its size and state
* ``webhook``    the MutatingWebhookConfiguration for an in-cluster install

Exit status: 0 ok, 1 cluster/API error, 2 bad flag or configuration.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
import yaml

from fleetkeeper.core import cliutil, errors
from fleetkeeper.core.domain import DEFAULT_DOMAIN, SYSTEM_NAMESPACE, Names
from fleetkeeper.core.kube import DEPLOYMENTS, NODES, PODS, Kube
from fleetkeeper.core.views import default_projector

from fleetkeeper.capacity import balloons as bl
from fleetkeeper.capacity import gangs as gg
from fleetkeeper.capacity.config import CapacityConfig, load_config, load_config_text

app = typer.Typer(help="Balloons (warm idle capacity) and gang scheduling (all-or-nothing training jobs).",
                  no_args_is_help=True)

_CONFIG = typer.Option(None, "--config", "-c", help="capacity configuration YAML (default: the cluster's "
                                                    "ConfigMap fleetkeeper-capacity, else defaults)")
_KUBECONFIG = cliutil.kubeconfig_option()
_DOMAIN = typer.Option(DEFAULT_DOMAIN, "--domain", help="label/taint domain")
_NAMESPACE = typer.Option(SYSTEM_NAMESPACE, "--namespace", help="fleetkeeper's namespace")


def _fail(exc: BaseException) -> None:
    raise cliutil.fail(exc)


def _file_config(path: Optional[Path]) -> CapacityConfig | None:
    if path is None:
        return None
    if not path.is_file():
        raise errors.ConfigError("--config", [("config", str(path), "no such file")])
    return load_config_text(path.read_text(), str(path))


def _kubeconfig(path: Optional[str]) -> Optional[str]:
    if path and not Path(path).is_file():
        raise errors.ConfigError("--kubeconfig", [("kubeconfig", path, "no such file")])
    return cliutil.resolve_kubeconfig(path)


_run = cliutil.run


async def _cluster_config(kube: Kube, namespace: str, cfg: CapacityConfig | None) -> CapacityConfig:
    from fleetkeeper.capacity.controller import load_cluster_config

    return cfg if cfg is not None else await load_cluster_config(kube, namespace)


@app.command("config")
def config_cmd(config: Optional[Path] = _CONFIG) -> None:
    """Validate a configuration file; print the effective configuration."""
    try:
        cfg = _file_config(config) or load_config(None, "defaults")
    except errors.FleetkeeperError as exc:
        _fail(exc)
        return
    typer.echo(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False))


async def _balloon_plan(kubeconfig, namespace, domain, config) -> tuple[bl.BalloonPlan, CapacityConfig, str]:
    names = Names(domain)
    cfg = _file_config(config)
    async with await cliutil.connect(_kubeconfig(kubeconfig)) as kube:
        cfg = await _cluster_config(kube, namespace, cfg)
        ns = cfg.balloons.namespace or namespace
        proj = default_projector(domain)
        nodes = [proj.node(n) for n in (await kube.list(NODES))[0]]
        pods = [proj.pod(p) for p in (await kube.list(PODS, ns, label_selector=bl.balloon_label(names)))[0]]
        deps, _ = await kube.list(DEPLOYMENTS, ns, label_selector=bl.balloon_label(names))
        plan = bl.decide(cfg.balloons, names, ns, nodes, pods, [d["metadata"]["name"] for d in deps])
        return plan, cfg, ns


@app.command("balloons")
def balloons_cmd(config: Optional[Path] = _CONFIG, kubeconfig: Optional[str] = _KUBECONFIG, context: Optional[str] = cliutil.context_option(),
                 namespace: str = _NAMESPACE, domain: str = _DOMAIN, output: str = cliutil.output_option()) -> None:
    """What the balloon manager would do now, and the idle capacity balloons hold per pool (read-only)."""
    plan, cfg, ns = _run(_balloon_plan(kubeconfig, namespace, domain, config))
    if cliutil.emit_structured({
            "namespace": ns, "priorityClass": cfg.balloons.priority_class,
            "pools": [{"pool": st.pool, "desired": st.desired, "running": st.running, "pending": st.pending,
                       "idleCapacity": st.idle_capacity, "resource": st.resource,
                       "blockedNodes": len(st.blocked_nodes)} for st in plan.status],
            "apply": [{"deployment": d["metadata"]["name"], "replicas": d["spec"]["replicas"]}
                      for d in plan.deployments],
            "delete": list(plan.delete_deployments),
            "evictions": [{"pod": f"{ev.namespace}/{ev.name}", "node": ev.node, "reason": ev.reason}
                          for ev in plan.evictions],
            "problems": list(plan.problems)}, output):
        return
    typer.echo(f"balloons in namespace {ns}, priority class {cfg.balloons.priority_class} "
               f"(value {cfg.balloons.priority})")
    for st in plan.status:
        typer.echo(f"  pool {st.pool}: desired {st.desired}, running {st.running}, pending {st.pending}; "
                   f"idle capacity held {st.idle_capacity:g} {st.resource}"
                   + (f"; balloons barred from {len(st.blocked_nodes)} node(s)" if st.blocked_nodes else ""))
    for d in plan.deployments:
        typer.echo(f"  apply Deployment {d['metadata']['name']}: {d['spec']['replicas']} replicas of "
                   f"{d['metadata']['annotations'][f'{domain}/balloon-size']}")
    for name in plan.delete_deployments:
        typer.echo(f"  delete Deployment {name} (pool no longer configured)")
    for ev in plan.evictions:
        typer.echo(f"  remove balloon {ev.namespace}/{ev.name} from {ev.node}: {ev.reason}")
    for p in plan.problems:
        typer.echo(f"  problem: {p}")


@app.command("manifests")
def manifests_cmd(config: Optional[Path] = _CONFIG, kubeconfig: Optional[str] = _KUBECONFIG, context: Optional[str] = cliutil.context_option(),
                  namespace: str = _NAMESPACE, domain: str = _DOMAIN) -> None:
    """Print the PriorityClass and balloon Deployments as YAML (sized from the cluster's nodes)."""
    plan, _, _ = _run(_balloon_plan(kubeconfig, namespace, domain, config))
    docs = ([plan.priority_class] if plan.priority_class else []) + plan.deployments
    typer.echo(yaml.safe_dump_all(docs, sort_keys=False))


async def _gangs(kubeconfig, namespace: Optional[str], domain: str) -> list[str]:
    names = Names(domain)
    async with await cliutil.connect(_kubeconfig(kubeconfig)) as kube:
        items, _ = await kube.list(PODS, namespace, label_selector=names.gang)
        proj = gg.gang_pod_projector(names)
        by: dict[str, list[gg.GangPod]] = {}
        for p in items:
            m = proj(p)
            by.setdefault(m.key, []).append(m)
        lines = []
        from fleetkeeper.core.kube import PODGROUPS

        for key in sorted(by):
            ns, gang = key.split("/", 1)
            pg = await kube.get_or_none(PODGROUPS, gang, ns)
            mn = gg.group_min(pg)
            ann = ((pg or {}).get("metadata") or {}).get("annotations") or {}
            members = by[key]
            placed = sum(1 for m in members if m.active and m.node)
            lines.append(f"{key}: {len(members)} pods, {placed} placed, minCount "
                         f"{mn if mn is not None else '(no PodGroup yet)'}, state "
                         f"{ann.get(gg.state_annotation(names), '?')}: {ann.get(gg.message_annotation(names), '')}")
        return lines


@app.command("gangs")
def gangs_cmd(namespace: Optional[str] = typer.Option(None, "--namespace", "-n", help="default: all namespaces"),
              kubeconfig: Optional[str] = _KUBECONFIG, context: Optional[str] = cliutil.context_option(), domain: str = _DOMAIN,
              output: str = cliutil.output_option()) -> None:
    """Every gang (pods labelled <domain>/gang), its size and state."""
    lines = _run(_gangs(kubeconfig, namespace, domain))
    if cliutil.emit_structured({"gangs": lines}, output):
        return
    for line in lines or ["no gangs"]:
        typer.echo(line)


@app.command("webhook")
def webhook_cmd(ca_file: Path = typer.Option(..., "--ca-file", help="PEM CA that signed the webhook's certificate"),
                config: Optional[Path] = _CONFIG, domain: str = _DOMAIN, namespace: str = _NAMESPACE) -> None:
    """Print the MutatingWebhookConfiguration for an in-cluster install (Service-backed)."""
    try:
        cfg = _file_config(config) or load_config(None, "defaults")
        if not ca_file.is_file():
            raise errors.ConfigError("--ca-file", [("ca_file", str(ca_file), "no such file")])
    except errors.FleetkeeperError as exc:
        _fail(exc)
        return
    from fleetkeeper.capacity.controller import WEBHOOK_CONFIG_NAME, webhook_registration

    typer.echo(yaml.safe_dump(webhook_registration(cfg, Names(domain), WEBHOOK_CONFIG_NAME, None,
                                                   ca_file.read_bytes(), service_namespace=namespace),
                              sort_keys=False))
