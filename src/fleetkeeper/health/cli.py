"""``fleetkeeper health``: the node agent, simulated agents, fleet status and policy checks;
``fleetkeeper fault``: the fault plan of simulated nodes."""

from __future__ import annotations

import asyncio
import logging
import socket
import time
from pathlib import Path
from typing import Optional

import typer
import yaml

from fleetkeeper.core import errors
from fleetkeeper.core import log as fklog
from fleetkeeper.core.clock import RealClock
from fleetkeeper.core import cliutil
from fleetkeeper.core.domain import DEFAULT_DOMAIN, Names
from fleetkeeper.core.faults import FaultPlan, default_fault_file, parse_fault
from fleetkeeper.core.kube import NODES, PODS, Kube
from fleetkeeper.core.views import default_projector

app = typer.Typer(help="Passive node health checks and safe automatic remediation.", no_args_is_help=True)
fault_app = typer.Typer(help="Inject and clear simulated faults on simulated nodes.", no_args_is_help=True)
log = logging.getLogger("fleetkeeper.health")


_run = cliutil.run


def _die(msg: str, code: int = 2) -> None:
    typer.echo(f"error: {msg}", err=True)
    raise typer.Exit(code)


_kubeconfig = cliutil.resolve_kubeconfig


# --- the node agent -------------------------------------------------------------
@app.command()
def agent(
    node: str = typer.Option(socket.gethostname(), "--node", envvar="NODE_NAME", help="this node's name"),
    root: Path = typer.Option(Path("/"), "--root", help="host filesystem root (mounts, disks)"),
    kmsg: Path = typer.Option(Path("/dev/kmsg"), "--kmsg", help="kernel log: /dev/kmsg or a dmesg-format file"),
    mounts: Optional[Path] = typer.Option(None, "--mounts", help="mount table (default <root>/proc/mounts)"),
    disk_path: list[str] = typer.Option(["/", "/var/lib/kubelet"], "--disk-path", help="paths to check (repeat)"),
    full_percent: float = typer.Option(95.0, "--full-percent", min=1, max=100),
    gpu: str = typer.Option("auto", "--gpu", help="nvml, none or auto (nvml when it loads)"),
    expected_gpus: int = typer.Option(0, "--expected-gpus", min=0, help="GPUs this machine should have"),
    dcgm_url: Optional[str] = typer.Option(None, "--dcgm-url", help="dcgm-exporter /metrics URL for Xid fields"),
    target: list[str] = typer.Option([], "--target", help="host:port or icmp://host to reach (repeat)"),
    peers_file: Optional[Path] = typer.Option(None, "--peers-file",
                                              help="peers, one host[:port] per line (a mounted ConfigMap)"),
    peers_dns: Optional[str] = typer.Option(None, "--peers-dns",
                                            help="a name resolving to every peer (headless Service of the agents)"),
    peer_sample: int = typer.Option(3, "--peer-sample", min=0, help="peers probed per cycle, drawn at random"),
    peer_port: int = typer.Option(10250, "--peer-port", min=1, max=65535,
                                  help="TCP port probed on a peer given without one (default: the kubelet's)"),
    node_ip: list[str] = typer.Option([], "--node-ip", envvar="NODE_IP", help="this node's IPs, never probed"),
    cloud: str = typer.Option("", "--cloud", help="azure, aws, gce or none (default: --config's, from the node's "
                                                   "providerID; without --config: none)"),
    config: Optional[Path] = typer.Option(None, "--config", help="agent.yaml: cloud, expected GPUs per instance "
                                          "type, thresholds, actions (the mounted ConfigMap fleetkeeper-health-agent)"),
    metadata_url: Optional[str] = typer.Option(None, "--metadata-url", help="override the metadata endpoint"),
    interval: float = typer.Option(30.0, "--interval", min=1, help="seconds between check cycles"),
    heartbeat: float = typer.Option(300.0, "--heartbeat", min=10, help="re-assert conditions this often"),
    jitter: float = typer.Option(0.2, "--jitter", min=0, max=0.9),
    once: bool = typer.Option(False, "--once", help="one cycle; print the findings; write nothing"),
    dry_run: bool = typer.Option(False, "--dry-run", help="log the status patches instead of writing them"),
    kubeconfig: Optional[str] = typer.Option(None, "--kubeconfig", envvar="KUBECONFIG"), context: Optional[str] = cliutil.context_option(),
    metrics_bind_address: Optional[str] = typer.Option(
        None, "--metrics-bind-address",
        help="serve /metrics, /healthz and /readyz (ready after the first check cycle) on HOST:PORT or :PORT"),
    domain: str = typer.Option(DEFAULT_DOMAIN, "--domain", help="label/taint/annotation domain"),
    log_level: str = typer.Option("info", "--log-level"),
) -> None:
    """Run the node agent (one per node, a DaemonSet in production)."""
    fklog.setup(log_level, "auto")
    from fleetkeeper.health.agent import Agent, AgentCore, Checks, ConditionWriter
    from fleetkeeper.health.checks import DiskCheck, GpuCheck, KernelEvents, NetworkCheck, PeerSource, parse_target
    from fleetkeeper.health.cloud import MaintenanceCheck
    from fleetkeeper.health.gpu import NoGpuBackend
    from fleetkeeper.health.kernlog import KernelLog

    if cloud not in ("", "azure", "aws", "gce", "none"):
        _die(f"--cloud {cloud!r}: expected azure, aws, gce or none")
    from fleetkeeper.health.agentconfig import load_agent_config

    try:
        acfg = load_agent_config(config.read_text() if config else None, str(config or "defaults"))
    except OSError as exc:
        _die(f"--config {config}: {exc}")
    except errors.ConfigError as exc:
        _die(str(exc))
    if gpu not in ("nvml", "none", "auto"):
        _die(f"--gpu {gpu!r}: expected nvml, none or auto")
    try:
        targets = tuple(parse_target(t) for t in target)
    except ValueError as exc:
        _die(f"--target: {exc}")
    if peers_file and peers_dns:
        _die("--peers-file and --peers-dns: give one of them")
    peers = PeerSource(file=peers_file, dns=peers_dns, port=peer_port, exclude=(node, *node_ip)) \
        if (peers_file or peers_dns) else None
    backend = NoGpuBackend()
    if gpu in ("nvml", "auto"):
        try:
            from fleetkeeper.health.gpu import NvmlBackend

            backend = NvmlBackend()
        except Exception as exc:  # noqa: BLE001 - NVML missing or no driver
            if gpu == "nvml":
                _die(f"--gpu nvml: NVML did not load: {exc}", 1)
            log.info("no NVML (%s); GPU checks use the kernel log only", exc)
    klog = KernelEvents(KernelLog(kmsg))

    def make_checks(cloud_: str, gpus_: int, vm_name: str, full: float) -> Checks:
        return Checks(
            disk=DiskCheck(tuple(disk_path), full, root, mounts, kernel=klog),
            gpu=GpuCheck(backend, gpus_, kernel=klog, dcgm_xids=_dcgm(dcgm_url) if dcgm_url else None),
            network=NetworkCheck(targets, peers=peers, peer_sample=peer_sample) if (targets or peers) else None,
            maintenance=MaintenanceCheck(cloud_, metadata_url or "", vm_name=vm_name) if cloud_ != "none" else None,
        )

    async def settings(kube: Kube | None):
        """Flags win; else the config resolved against this node (providerID, instance type)."""
        from fleetkeeper.health.agentconfig import resolve

        me = await kube.get(NODES, node) if (kube is not None and config) else {"metadata": {"name": node}}
        ns = resolve(acfg, me)
        full = full_percent if full_percent != 95.0 else ns.full_percent
        st = (cloud or (ns.cloud if config else "none"), expected_gpus or ns.expected_gpus, ns.vm_name, full)
        log.info("agent settings for %s: cloud=%s expected GPUs=%d (instance type %s) maintenance VM name=%s",
                 node, st[0], st[1], ns.instance_type or "?", st[2])
        return me, st

    async def main() -> None:
        if once:
            kube1 = await cliutil.connect(kubeconfig) if config else None
            try:
                _, st = await settings(kube1)
            finally:
                if kube1 is not None:
                    await kube1.close()
            found = await make_checks(*st).run()
            for t, f in sorted(found.items()):
                typer.echo(f"{t}={'True' if f.problem else 'False'} {f.reason}: {f.message}")
            return
        from prometheus_client import CollectorRegistry

        from fleetkeeper.core.server import OpsServer
        from fleetkeeper.health.metrics import AgentMetrics

        stop = cliutil.stop_on_signals()  # as PID 1, SIGTERM has no default action
        registry = CollectorRegistry()
        kube = await cliutil.connect(kubeconfig)
        server = None
        try:
            _me, st = await settings(kube)
            checks = make_checks(*st)
            agent_metrics = AgentMetrics(registry)
            core = AgentCore(ConditionWriter(kube, dry_run=dry_run), RealClock(), heartbeat=heartbeat, jitter=jitter,
                             metrics=agent_metrics)
            node_agent = Agent(node, checks, core, interval=interval)
            if metrics_bind_address:
                host, port = cliutil.parse_bind_address(metrics_bind_address)
                server = OpsServer(registry, host, port)
                server.add_ready_check("first-cycle", lambda: node_agent.cycles > 0)
                await server.start()
                log.info("agent ops server on http://%s:%d (metrics, healthz, readyz)", host, server.port)
            runners = [node_agent.run()]
            if acfg.actions.enabled:
                from fleetkeeper.health.actions import ActionAgent, DoneLog, HostActions, watch_own_node

                actions = HostActions(backend, nvidia_smi=acfg.actions.nvidia_smi,
                                      reboot_cmd=tuple(acfg.actions.reboot_command),
                                      maintenance_clear=_maintenance_clear(checks))
                actor = ActionAgent(kube, Names(domain), actions, DoneLog(Path(acfg.actions.state_file)),
                                    RealClock().now, dry_run=dry_run, metrics=agent_metrics)

                async def on_node(obj: dict) -> None:
                    meta = obj.get("metadata") or {}
                    await actor.handle(node, meta.get("uid", ""), meta.get("annotations") or {})
                runners.append(watch_own_node(kube, node, on_node))

            async def run_all() -> None:
                await asyncio.gather(*runners)
            await cliutil.until_stopped(run_all(), stop)
        finally:
            if server:
                await server.stop()
            await kube.close()

    _run(main())


def _maintenance_clear(checks):
    async def clear() -> bool:
        if checks.maintenance is None:
            return True
        return not any(f.problem for f in await checks.maintenance.check())
    return clear


def _dcgm(url: str):
    import urllib.request

    from fleetkeeper.health.gpu import parse_dcgm_xids

    def read() -> dict[str, int]:
        with urllib.request.urlopen(url, timeout=2) as r:  # noqa: S310 - operator-given local URL
            return parse_dcgm_xids(r.read().decode())
    return read


@app.command()
def agents(
    simulate: bool = typer.Option(False, "--simulate", help="agents for every simulated (KWOK) node"),
    fault_file: Optional[Path] = typer.Option(None, "--fault-file", help="default: the local cluster's faults.json"),
    interval: float = typer.Option(2.0, "--interval", min=0.1),
    heartbeat: float = typer.Option(300.0, "--heartbeat", min=5),
    kubeconfig: Optional[str] = typer.Option(None, "--kubeconfig", envvar="KUBECONFIG"), context: Optional[str] = cliutil.context_option(),
) -> None:
    """Run simulated agents for the local control plane's KWOK nodes in one process."""
    if not simulate:
        _die("only --simulate is supported here; on real nodes run 'fleetkeeper health agent' as a DaemonSet")
    fklog.setup("info", "auto")
    from fleetkeeper.health.agent import AgentCore, ConditionWriter, SimulatedFleet

    async def main() -> None:
        kube = await cliutil.connect(kubeconfig)
        try:
            known: list[tuple[str, int]] = []
            proj = default_projector(DEFAULT_DOMAIN)

            async def refresh() -> None:  # a periodic LIST, never a watch
                items, _ = await kube.list(NODES, label_selector="type=kwok")
                known[:] = [(v.name, v.gpus) for v in map(proj.node, items)]
            await refresh()
            fleet = SimulatedFleet(AgentCore(ConditionWriter(kube), RealClock(), heartbeat=heartbeat),
                                   FaultPlan(fault_file or default_fault_file()), lambda: known, interval=interval)
            typer.echo(f"simulating agents for {len(known)} nodes; faults from {fleet.plan.path}")
            t = time.monotonic()
            while True:
                await fleet.cycle()
                await asyncio.sleep(interval)
                if time.monotonic() - t > 60:
                    await refresh()
                    t = time.monotonic()
        finally:
            await kube.close()

    _run(main())


# --- status ------------------------------------------------------------------------
@app.command()
def status(
    kubeconfig: Optional[str] = typer.Option(None, "--kubeconfig", envvar="KUBECONFIG"), context: Optional[str] = cliutil.context_option(),
    domain: str = typer.Option(DEFAULT_DOMAIN, "--domain"),
    namespace: str = typer.Option("fleetkeeper-system", "--namespace",
                                  help="where the policy and state ConfigMaps live"),
    policy_file: Optional[Path] = typer.Option(None, "--policy", help="use this policy file instead"),
    output: str = cliutil.output_option(),
) -> None:
    """Nodes by health state and reason, the budget used per scope, a storm pause, flapping nodes."""
    from fleetkeeper.core.kube import CONFIGMAPS
    from fleetkeeper.health.controller import STATE_CONFIGMAP, parse_state
    from fleetkeeper.health.decide import Keys, evictable, fleet_stats
    from fleetkeeper.lifecycle.budget import limit_of
    from fleetkeeper.health.explain import load_cluster_policy
    from fleetkeeper.health.policy import load_policy

    async def main() -> dict:
        names = Names(domain)
        async with await cliutil.connect(kubeconfig) as kube:
            if policy_file:
                policy, src = load_policy(policy_file.read_text(), str(policy_file)), str(policy_file)
            else:
                policy, src = await load_cluster_policy(kube, namespace)
            proj = default_projector(domain)
            nodes = [proj.node(n) for n in (await kube.list(NODES))[0]]
            quarantined = {n.name for n in nodes if n.taint(names.quarantine)}
            pods: dict[str, int] = {}
            if quarantined:
                for p in (await kube.list(PODS, field_selector="status.phase=Running"))[0]:
                    pv = proj.pod(p)
                    if pv.node in quarantined and evictable([pv])[0]:
                        pods[pv.node] = pods.get(pv.node, 0) + 1
            st = fleet_stats(nodes, pods, policy, names, time.time(), [])
            k = Keys(names)
            by_reason: dict[str, list[str]] = {}
            for n in nodes:
                if n.name in quarantined:
                    by_reason.setdefault(f"{n.annotations.get(k.reason, '?')} -> {n.annotations.get(k.action, '?')}"
                                         f" ({n.annotations.get(k.remedy, '?')})", []).append(n.name)
            budget = {s: {"used": st.disrupted.get(s, 0), "limit": limit_of(s, policy.budget).limit(st.totals[s]),
                          "waiting": st.wanting.get(s, 0)}
                      for s in sorted(st.totals, key=lambda s: (s != "cluster", s))
                      if s == "cluster" or st.disrupted.get(s) or st.wanting.get(s)}
            state = await kube.get_or_none(CONFIGMAPS, STATE_CONFIGMAP, namespace)
            until, tracker, _ = parse_state((state or {}).get("data") or {})
            storm_left = max(0.0, until - time.time())
            flapping = sorted(n for n in tracker.nodes() if tracker.flapping(
                n, time.time(), policy.flapping.transitions, policy.flapping.window))
            return {"policy": src, "states": st.states, "reasons": by_reason, "budget": budget,
                    "waiting": st.wanting.get("cluster", 0), "storm_cooldown_s": round(storm_left),
                    "flapping": flapping}

    res = _run(main())
    if cliutil.emit_structured(res, output):
        return
    typer.echo(f"policy: {res['policy']}")
    typer.echo("nodes: " + ", ".join(f"{v} {k}" for k, v in sorted(res["states"].items())))
    for reason, ns in sorted(res["reasons"].items()):
        typer.echo(f"  {len(ns):>4}  {reason}: {', '.join(ns[:5])}{' ...' if len(ns) > 5 else ''}")
    typer.echo(f"faulty nodes waiting for budget or trigger: {res['waiting']}")
    if res["storm_cooldown_s"]:
        typer.echo(f"fault storm: new quarantines paused for another {res['storm_cooldown_s']}s")
    if res["flapping"]:
        typer.echo(f"flapping: {len(res['flapping'])} node(s): {', '.join(res['flapping'][:5])}"
                   f"{' ...' if len(res['flapping']) > 5 else ''}")
    typer.echo("budget (quarantined or draining / limit):")
    for s, b in res["budget"].items():
        lim = "none" if b["limit"] is None else b["limit"]
        flag = "  EXHAUSTED" if b["limit"] is not None and b["used"] >= b["limit"] and b["waiting"] else ""
        typer.echo(f"  {s:<20} {b['used']}/{lim}{flag}")


# --- policy ----------------------------------------------------------------------------
@app.command("policy")
def policy_cmd(file: Optional[Path] = typer.Argument(None, help="policy YAML to validate; omit to print the defaults")
               ) -> None:
    """Validate a policy file, or print the default policy."""
    from fleetkeeper.health.policy import Policy, load_policy

    if file is None:
        typer.echo(yaml.safe_dump(Policy().model_dump(mode="json"), sort_keys=False))
        return
    try:
        text = file.read_text()
    except OSError as exc:
        _die(f"{file}: {exc}")
    try:
        p = load_policy(text, str(file))
    except errors.ConfigError as exc:
        _die(str(exc))
    typer.echo(f"{file}: valid ({len(p.rules)} rules, {len(p.xid)} Xid codes)")


# --- faults ----------------------------------------------------------------------------------
_FILE = typer.Option(None, "--file", help="fault plan file (default: the local cluster's faults.json)")


@fault_app.command("inject")
def fault_inject(node: str, kind: str, file: Optional[Path] = _FILE) -> None:
    """Inject a fault: xid:<code>, ecc, remap-pending, gpu-missing, disk-full, disk-ro, disk-io,
    net-down, maintenance:<reboot|redeploy|terminate|replace>, validation:<check>."""
    try:
        f = parse_fault(kind)
        plan = FaultPlan(file or default_fault_file())
        plan.inject(node, f)
    except errors.ConfigError as exc:
        _die(exc.summary)
    typer.echo(f"injected {f} on {node} ({plan.path})")


@fault_app.command("clear")
def fault_clear(node: Optional[str] = typer.Argument(None), all_: bool = typer.Option(False, "--all"),
                file: Optional[Path] = _FILE) -> None:
    """Clear a node's faults (or --all)."""
    if not node and not all_:
        _die("name a NODE or pass --all")
    plan = FaultPlan(file or default_fault_file())
    try:
        plan.clear(None if all_ else node)
    except errors.ConfigError as exc:
        _die(exc.summary)
    typer.echo(f"cleared {'all faults' if all_ else node}")


@fault_app.command("list")
def fault_list(file: Optional[Path] = _FILE) -> None:
    """List injected faults."""
    plan = FaultPlan(file or default_fault_file())
    try:
        faults = plan.read()
    except errors.ConfigError as exc:
        _die(exc.summary)
    for n, fs in sorted(faults.items()):
        typer.echo(f"{n}: {', '.join(map(str, fs))}")
    if not faults:
        typer.echo("no faults")
