"""``fleetkeeper preflight ...`` and the test pods' entry point ``fleetkeeper preflight validate``."""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path
from typing import Optional

import typer

from fleetkeeper.core import cliutil, errors
from fleetkeeper.core.config import parse_yaml
from fleetkeeper.core.domain import DEFAULT_DOMAIN, INSTANCE_TYPE_LABEL, Names
from fleetkeeper.preflight.config import CHECKS, PreflightConfig, load_config
from fleetkeeper.preflight.keys import Keys, PENDING
from fleetkeeper.preflight.report import encode, summary
from fleetkeeper.preflight.suite import (NoGpuBackend, NvmlBackend, RealHost, SimulatedBackend, SimulatedHost,
                                         Unavailable, run_suite)

app = typer.Typer(help="Join gate and active GPU validation: run the suite, see and retry gated nodes.",
                  no_args_is_help=True)


def _fail(exc: errors.FleetkeeperError) -> None:
    typer.echo(f"error: {exc}", err=True)
    raise typer.Exit(2 if isinstance(exc, errors.ConfigError) else 1)


def _load(config: Optional[Path]) -> PreflightConfig:
    if config is None:
        return PreflightConfig()
    try:
        text = config.read_text()
    except OSError as exc:
        raise errors.ConfigError(str(config), [("", str(config), f"cannot read: {exc.strerror}")]) from None
    return load_config(parse_yaml(text, str(config)), str(config))


def _gpu_backend(name: str, node: str, profile, faults: list[str]):
    if name == "simulated":
        return SimulatedBackend(node, profile, faults), SimulatedHost(profile, faults)
    if name == "none":
        return NoGpuBackend(), RealHost()
    try:
        return NvmlBackend(), RealHost()
    except Unavailable as exc:
        if name == "nvml":
            raise errors.ConfigError("--backend", [("backend", name, f"NVML is not usable here: {exc}")]) from None
        return NoGpuBackend(str(exc) if "no GPU" in str(exc) else f"no GPU ({exc})"), RealHost()
    except ImportError:
        return NoGpuBackend("no GPU (nvidia-ml-py not installed)"), RealHost()


@app.command()
def validate(
    config: Optional[Path] = typer.Option(None, "--config", "-c", help="preflight config YAML (thresholds)"),
    profile: Optional[str] = typer.Option(None, "--profile", help="profile name; default: by instance type / GPU model"),
    instance_type: str = typer.Option("", "--instance-type", envvar="INSTANCE_TYPE"),
    check: Optional[list[str]] = typer.Option(None, "--check", help=f"run only these checks ({', '.join(CHECKS)})"),
    backend: str = typer.Option("auto", "--backend", help="auto, nvml, none or simulated"),
    faults: Optional[list[str]] = typer.Option(None, "--fault", help="simulated backend: fault (e.g. validation:nccl)"),
    dcgm_level: Optional[int] = typer.Option(None, "--dcgm-level", min=1, max=4, help="dcgmi diag level (default: profile)"),
    as_json: bool = typer.Option(False, "--json", help="print the structured result as JSON"),
    termination_log: Optional[Path] = typer.Option(None, "--termination-log",
                                                   help="write the signed compact report here (test pods)"),
) -> None:
    """Run the validation suite on this machine (the test pods' entry point). Exit 0 passed, 1 failed, 2 bad input."""
    try:
        cfg = _load(config)
        if backend not in ("auto", "nvml", "none", "simulated"):
            raise errors.ConfigError("--backend", [("backend", backend, "allowed: auto, nvml, none, simulated")])
        for c in check or []:
            if c not in CHECKS:
                raise errors.ConfigError("--check", [("check", c, f"unknown check; known: {', '.join(CHECKS)}")])
        node = os.environ.get("NODE_NAME") or socket.gethostname()
        prof = cfg.profile_named(profile) if profile else cfg.profile_for(instance_type)
        gpu, host = _gpu_backend(backend, node, prof, list(faults or []))
        if not profile and not instance_type and backend != "simulated":
            try:  # choose by GPU model when the instance type is unknown
                gs = gpu.gpus()
                if gs:
                    prof = cfg.profile_for(gpu_model=gs[0].name)
            except Unavailable:
                pass
        result = run_suite(node, prof, gpu, host, checks=list(check) if check else None, dcgm_level=dcgm_level)
        if termination_log is not None:
            key = os.environ.get("PREFLIGHT_KEY", "")
            if not key:
                raise errors.ConfigError("env", [("PREFLIGHT_KEY", "", "the report key is not set (Secret not mounted)")])
            termination_log.write_text(encode(result, pod=os.environ.get("POD_NAME", ""),
                                              nonce=os.environ.get("PREFLIGHT_NONCE", ""), key=key.encode()))
    except errors.FleetkeeperError as exc:
        _fail(exc)
        return
    if as_json:
        typer.echo(json.dumps(result.as_dict(), indent=1, default=str))
    else:
        typer.echo(f"node {result.node} profile {result.profile}: {summary(result)}")
        for c in result.checks:
            typer.echo(f"  {c.status:4} {c.check:12} value={c.value!s:>10} threshold={c.threshold!s:>10} "
                       f"{c.duration:6.2f}s  {c.detail}")
    raise typer.Exit(0 if result.passed else 1)


@app.command("config")
def show_config(config: Optional[Path] = typer.Option(None, "--config", "-c")) -> None:
    """Validate a config file and print the effective configuration (defaults filled in)."""
    try:
        cfg = _load(config)
    except errors.FleetkeeperError as exc:
        _fail(exc)
        return
    typer.echo(json.dumps(cfg.model_dump(), indent=1))


def _kube(kubeconfig: Optional[str]):
    from fleetkeeper.core import cliutil

    return cliutil.connect(kubeconfig)


def status_row(node: dict, keys: Keys, proj, when_ready: bool, structured: bool = False):
    """One gated node as ``preflight status`` shows it; up or not as the controller judges it
    (``gate.start_when_ready``)."""
    from fleetkeeper.preflight.gate import node_up

    meta = node["metadata"]
    labels = meta.get("labels") or {}
    ann = meta.get("annotations") or {}
    up = node_up(proj.node(node), when_ready)
    if structured:
        return {"node": meta["name"], "state": labels.get(keys.gate), "up": up,
                "attempts": int(ann.get(keys.attempts, "0") or 0), "failedCheck": ann.get(keys.failed_check),
                "instanceType": labels.get(INSTANCE_TYPE_LABEL)}
    return (f"{meta['name']:32} {labels.get(keys.gate)!s:8} "
            f"{'' if up else 'not-ready (no test until it is up) '}"
            f"attempts={ann.get(keys.attempts, '0')} "
            f"failed-check={ann.get(keys.failed_check, '-')} "
            f"type={labels.get(INSTANCE_TYPE_LABEL, '?')}")


@app.command()
def status(kubeconfig: Optional[str] = typer.Option(None, "--kubeconfig", envvar="KUBECONFIG"), context: Optional[str] = cliutil.context_option(),
           domain: str = typer.Option(DEFAULT_DOMAIN, "--domain"),
           config: Optional[Path] = typer.Option(
               None, "--config", "-c", help="the controller's preflight config YAML (the chart's `preflight` "
                                             "values), so that a node counts as up as the controller judges it; "
                                             "default: the built-in defaults"),
           output: str = cliutil.output_option()) -> None:
    """Nodes held by the gate: state, attempts, failing check."""
    import asyncio

    from fleetkeeper.core.kube import NODES
    from fleetkeeper.core.views import default_projector

    try:  # a bad file fails before anything is read from the cluster
        when_ready = _load(config).gate.start_when_ready
    except errors.FleetkeeperError as exc:
        _fail(exc)
        return

    keys = Keys(Names(domain))
    proj = default_projector(domain)

    async def go() -> list:
        async with await _kube(kubeconfig) as kube:
            nodes, _ = await kube.list(NODES, label_selector=keys.gate)
        lines = [status_row(n, keys, proj, when_ready, structured=output != "text") for n in nodes]
        return lines or ([] if output != "text" else ["no node is held by the preflight gate"])

    try:
        lines = asyncio.run(go())
        if cliutil.emit_structured({"gated": lines}, output):
            return
        for line in lines:
            typer.echo(line)
    except errors.FleetkeeperError as exc:
        _fail(exc)


@app.command()
def retry(node: str, kubeconfig: Optional[str] = typer.Option(None, "--kubeconfig", envvar="KUBECONFIG"), context: Optional[str] = cliutil.context_option(),
          domain: str = typer.Option(DEFAULT_DOMAIN, "--domain"),
          dry_run: bool = typer.Option(False, "--dry-run")) -> None:
    """Start a new validation cycle on NODE (after a repair): gate it again with label value 'pending'."""
    import asyncio

    from fleetkeeper.core.kube import NODES

    keys = Keys(Names(domain))

    async def go() -> str:
        async with await _kube(kubeconfig) as kube:
            n = await kube.get_or_none(NODES, node)
            if n is None:
                raise errors.ConfigError("retry", [("node", node, "no such node")])
            taints = [t for t in (n.get("spec") or {}).get("taints") or [] if t["key"] != keys.gate]
            taints.append({"key": keys.gate, "value": PENDING, "effect": "NoSchedule"})
            await kube.patch(NODES, node, {"metadata": {"resourceVersion": n["metadata"]["resourceVersion"],
                                                        "labels": {keys.gate: PENDING}},
                                           "spec": {"taints": taints}}, dry_run=dry_run)
        return f"{node}: gated with {keys.gate}={PENDING}; the preflight controller will test it" + \
            (" (dry run: nothing written)" if dry_run else "")

    try:
        typer.echo(asyncio.run(go()))
    except errors.FleetkeeperError as exc:
        _fail(exc)
