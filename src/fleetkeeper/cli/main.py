"""``fleetkeeper``: the command line.

Components plug in through :data:`COMPONENTS`: each entry names a package
that may provide
  * ``<pkg>.cli:app``                            a typer sub-app (``fleetkeeper <name> ...``)
  * ``<pkg>.controller:setup(mgr, options)``     controllers for ``fleetkeeper run``
  * ``<pkg>.explain:explain_node(kube, names, node) -> list[str]`` and
    ``explain_pod(kube, names, ns, name) -> list[str]`` for ``fleetkeeper explain``
  * ``<pkg>.demo:demo(ctx)``                     its part of ``make demo``
"""

from __future__ import annotations

import asyncio
import importlib
import importlib.util
import logging
from typing import Any, Optional

import typer

from fleetkeeper import __version__
from fleetkeeper.cli import cluster as cluster_cli
from fleetkeeper.cli.common import console, kubeconfig_option, out, run_async
from fleetkeeper.core import cliutil, errors, log as fklog
from fleetkeeper.core.config import load_model
from fleetkeeper.core.domain import DEFAULT_DOMAIN, Names
from fleetkeeper.core.settings import RuntimeSettings

# name -> package. Order matters for `run` and the demo.
COMPONENTS: dict[str, str] = {
    "preflight": "fleetkeeper.preflight",
    "health": "fleetkeeper.health",
    "lifecycle": "fleetkeeper.lifecycle",  # after health: health registers the machine provider it shares
    "capacity": "fleetkeeper.capacity",
    "relay": "fleetkeeper.relay",
    "netacct": "fleetkeeper.netacct",
    "promguard": "fleetkeeper.promguard",
    "teams": "fleetkeeper.teams",  # last: its team taints would otherwise shape the other scenarios
}
# Sub-apps without controllers (name -> module with `app`).
SUBAPPS: dict[str, str] = {
    "fault": "fleetkeeper.health.faultcli",
}

app = typer.Typer(name="fleetkeeper", help="Run a research GPU cluster on Kubernetes at 7,500-node scale.",
                  no_args_is_help=True, pretty_exceptions_enable=False)
app.add_typer(cluster_cli.app, name="cluster")


def _budget_command() -> None:
    from fleetkeeper.lifecycle.cli import budget

    app.command("budget")(budget)


_budget_command()


def _optional(module: str) -> Any | None:
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as exc:
        if exc.name == module:
            return None
        raise


_registered = False


def _register_subapps() -> None:
    global _registered
    if _registered:
        return
    _registered = True
    for name, pkg in COMPONENTS.items():
        mod = _optional(f"{pkg}.cli")
        if mod is not None and hasattr(mod, "app"):
            app.add_typer(mod.app, name=name)
    for name, module in SUBAPPS.items():
        app.add_typer(importlib.import_module(module).app, name=name)


def components_with_controllers() -> list[str]:
    """The components ``fleetkeeper run`` can start (those with a ``controller`` module)."""
    return [name for name, pkg in COMPONENTS.items() if importlib.util.find_spec(f"{pkg}.controller") is not None]


@app.command()
def version(output: str = cliutil.output_option()) -> None:
    """Print fleetkeeper's version (and, from a checkout, the pinned local-cluster versions)."""
    from fleetkeeper.localcluster.cluster import versions

    try:
        pinned = versions()
    except OSError:  # an installed wheel has no hack/versions.env
        pinned = {}
    if cliutil.emit_structured({"fleetkeeper": __version__, "localCluster": pinned}, output):
        return
    out.print(f"fleetkeeper {__version__}")
    for k, v in pinned.items():
        out.print(f"  {k}: {v}")


parse_bind_address = cliutil.parse_bind_address


@app.command()
def run(
    controllers: Optional[str] = typer.Option(None, "--controllers",
                                              help="comma-separated components to run (default: every component "
                                                   "with a controller)"),
    kubeconfig: str = kubeconfig_option(),
    context: Optional[str] = cliutil.context_option(),
    domain: str = typer.Option(DEFAULT_DOMAIN, "--domain", help="label/taint domain"),
    namespace: str = typer.Option("fleetkeeper-system", "--namespace"),
    dry_run: bool = typer.Option(False, "--dry-run", help="decide and report; never write"),
    metrics_bind_address: Optional[str] = typer.Option(
        None, "--metrics-bind-address",
        help="where /metrics, /healthz and /readyz listen: HOST:PORT or :PORT (default 127.0.0.1:8080; "
             "in a pod, :8080 so the kubelet's probes reach it)"),
    metrics_port: Optional[int] = typer.Option(None, "--metrics-port", min=0, max=65535,
                                               help="port only, on 127.0.0.1 (superseded by --metrics-bind-address)"),
    webhook_bind_address: Optional[str] = typer.Option(
        None, "--webhook-bind-address",
        help="HOST:PORT or :PORT of the one admission webhook server every component of this process shares "
             "(default: the components' own settings; a wildcard address and a fixed port win)"),
    webhook_cert_dir: Optional[str] = typer.Option(
        None, "--webhook-cert-dir", help="tls.crt, tls.key and ca.crt of that server (a mounted Secret; reloaded "
                                         "when it changes); default: the components', else self-signed"),
    leader_elect: bool = typer.Option(True, "--leader-elect/--no-leader-elect"),
    leader_election_id: str = typer.Option("fleetkeeper-manager", "--leader-election-id",
                                           help="name of the Lease (one per Deployment of the manager)"),
    log_level: str = typer.Option("info", "--log-level"),
    log_format: str = typer.Option("auto", "--log-format", help="json, text or auto"),
    machine_provider: str = typer.Option("", "--machine-provider",
                                         help="kubernetes-node, cluster-api, karpenter, aws, gce, azure or command "
                                              "(default: the fleetkeeper-machines ConfigMap's, else kubernetes-node)"),
    ui: bool = typer.Option(False, "--ui/--no-ui", help="also serve the fleet map from the manager's informers"),
    ui_host: str = typer.Option("127.0.0.1", "--ui-host", help="the fleet map's address"),
    ui_port: int = typer.Option(8088, "--ui-port", min=0, max=65535),
    ui_auth: str = typer.Option("auto", "--ui-auth",
                                help="none, tokenreview, or auto (tokenreview in a cluster or off loopback)"),
) -> None:
    """Run the controller manager with the chosen controllers."""
    fklog.setup(log_level, log_format)
    runnable = components_with_controllers()
    names = runnable if controllers is None else [c.strip() for c in controllers.split(",") if c.strip()]
    unknown = [c for c in names if c not in runnable]
    if unknown:
        console.print(f"[red]unknown controller(s)[/red]: {', '.join(unknown)}; components with controllers: "
                      f"{', '.join(runnable) or 'none'}")
        raise typer.Exit(2)
    try:
        server: dict = {}
        if metrics_bind_address is not None:
            server["host"], server["port"] = parse_bind_address(metrics_bind_address)
        elif metrics_port is not None:
            server["port"] = metrics_port
        webhook: dict = {"cert_dir": webhook_cert_dir}
        if webhook_bind_address is not None:
            webhook["host"], webhook["port"] = parse_bind_address(webhook_bind_address, "--webhook-bind-address")
        settings = load_model(RuntimeSettings, {
            "domain": domain, "namespace": namespace, "dry_run": dry_run, "kubeconfig": kubeconfig,
            "context": context, "server": server, "webhook": webhook,
            "leader_election": {"enabled": leader_elect, "lease_name": leader_election_id},
            "controllers": names, "machine_provider": machine_provider or None,
        }, "flags")
        if machine_provider:
            from fleetkeeper.machines.config import load_config

            load_config(None, provider=machine_provider)  # a bad name fails here, before anything starts
    except errors.ConfigError as exc:
        console.print(f"[red]configuration error[/red]: {exc}")
        raise typer.Exit(2) from None

    async def main() -> None:
        # SIGTERM (a pod being stopped; as PID 1 nothing else would end it) stops the
        # manager gracefully: runnables are cancelled and the lease is released.
        stop = cliutil.stop_on_signals()
        await run_manager(settings, stop=stop, ui=ui_options(ui_host, ui_port, ui_auth, kubeconfig) if ui else None)

    run_async(main())


def ui_options(host: str, port: int, auth: str, kubeconfig: str | None):
    """The fleet map's options from flags; ``auth`` auto is tokenreview in a cluster or off loopback."""
    import os

    from fleetkeeper.ui.server import UiOptions, loopback

    if auth not in ("auto", "none", "tokenreview"):
        console.print(f"[red]--ui-auth {auth!r}[/red]: expected auto, none or tokenreview")
        raise typer.Exit(2)
    if auth == "auto":
        in_cluster = kubeconfig is None and bool(os.environ.get("KUBERNETES_SERVICE_HOST"))
        auth = "tokenreview" if in_cluster or not loopback(host) else "none"
    if auth == "none" and not loopback(host):
        console.print(f"[red]the fleet map without authentication serves loopback only[/red]: {host!r} is not; "
                      "use tokenreview to serve others")
        raise typer.Exit(2)
    return UiOptions(host=host, port=port, auth=auth, components=dict(COMPONENTS))


@app.command("ui")
def ui_cmd(
    kubeconfig: str = kubeconfig_option(),
    context: Optional[str] = cliutil.context_option(),
    domain: str = typer.Option(DEFAULT_DOMAIN, "--domain", help="label/taint domain"),
    namespace: str = typer.Option("fleetkeeper-system", "--namespace", help="where fleetkeeper's ConfigMaps live"),
    host: str = typer.Option("127.0.0.1", "--host", help="address to serve on (loopback unless told)"),
    port: int = typer.Option(8088, "--port", min=0, max=65535),
    auth: str = typer.Option("auto", "--auth", help="none, tokenreview, or auto (tokenreview in a cluster or "
                                                   "off loopback)"),
    metrics_bind_address: str = typer.Option("127.0.0.1:0", "--metrics-bind-address",
                                             help="/metrics, /healthz, /readyz: HOST:PORT (port 0: any free port)"),
    log_level: str = typer.Option("info", "--log-level"),
) -> None:
    """Serve the fleet map (read-only) from one set of informers; pages get changes pushed."""
    fklog.setup(log_level, "auto")
    opts = ui_options(host, port, auth, kubeconfig)
    try:
        mhost, mport = parse_bind_address(metrics_bind_address)
        settings = load_model(RuntimeSettings, {
            "domain": domain, "namespace": namespace, "dry_run": True, "kubeconfig": kubeconfig, "context": context,
            "server": {"host": mhost, "port": mport}, "leader_election": {"enabled": False}, "controllers": []},
            "flags")
    except errors.ConfigError as exc:
        console.print(f"[red]configuration error[/red]: {exc}")
        raise typer.Exit(2) from None

    async def main() -> None:
        stop = cliutil.stop_on_signals()
        await run_manager(settings, stop=stop, ui=opts, on_ui=lambda s: console.print(f"fleet map: {s.url}"))

    run_async(main())


async def run_manager(settings: RuntimeSettings, *, registry=None, clock=None, identity: str | None = None,
                      stop: asyncio.Event | None = None, ui=None, on_ui=None) -> None:
    """Run the manager with ``settings.controllers``; with ``ui`` (:class:`fleetkeeper.ui.server.UiOptions`)
    it also serves the fleet map, and ``on_ui(server)`` is called once the map listens."""
    from fleetkeeper.core.kube import Kube
    from fleetkeeper.core.manager import Manager

    kube = await Kube.connect(cliutil.resolve_kubeconfig(settings.kubeconfig), settings.context)
    try:
        mgr = Manager(kube, settings, registry=registry, clock=clock, identity=identity)
        for name in settings.controllers:
            mod = importlib.import_module(f"{COMPONENTS[name]}.controller")
            await mod.setup(mgr, None)
        if ui is not None:
            from fleetkeeper.ui.server import setup as ui_setup

            server = await ui_setup(mgr, ui)
            if on_ui is not None:
                server.on_start = on_ui
        if stop is None:
            await mgr.run()
        else:
            runner = asyncio.create_task(mgr.run())
            waiter = asyncio.create_task(stop.wait())
            done, _ = await asyncio.wait({runner, waiter}, return_when=asyncio.FIRST_COMPLETED)
            runner.cancel()
            waiter.cancel()
            await asyncio.gather(runner, waiter, return_exceptions=True)
            if runner in done and not runner.cancelled() and runner.exception() is not None:
                raise runner.exception()  # a manager that failed must not exit 0
    finally:
        await kube.close()


explain_app = typer.Typer(help="Why is this node tainted? Why is my pod not running?", no_args_is_help=True)
app.add_typer(explain_app, name="explain")


async def _explain(kind: str, target: str, kubeconfig: str | None, domain: str) -> list[tuple[str, list[str]]]:
    from fleetkeeper.explain import explain

    async with await cliutil.connect(kubeconfig) as kube:
        return await explain(kube, Names(domain), kind, target, COMPONENTS)


def _print_sections(sections: list[tuple[str, list[str]]], output: str = "text", target: str = "") -> None:
    if cliutil.emit_structured({"target": target, "sections": [{"source": t, "lines": ls} for t, ls in sections]},
                               output):
        return
    for title, lines in sections:
        out.print(f"[bold]{title}[/bold]")
        for line in lines:
            out.print(f"  {line}")


@explain_app.command("node")
def explain_node(name: str, kubeconfig: str = kubeconfig_option(), context: Optional[str] = cliutil.context_option(),
                 domain: str = typer.Option(DEFAULT_DOMAIN, "--domain"),
                 output: str = cliutil.output_option()) -> None:
    """Why this node carries its taints, its health history and next step."""
    _print_sections(run_async(_explain("node", name, kubeconfig, domain)), output, name)


@explain_app.command("pod")
def explain_pod(target: str = typer.Argument(..., metavar="NAMESPACE/NAME"), kubeconfig: str = kubeconfig_option(),
                context: Optional[str] = cliutil.context_option(),
                domain: str = typer.Option(DEFAULT_DOMAIN, "--domain"),
                output: str = cliutil.output_option()) -> None:
    """Where this pod may or may not go, and why."""
    _print_sections(run_async(_explain("pod", target, kubeconfig, domain)), output, target)


@app.command()
def demo(
    nodes: int = typer.Option(200, "--nodes", envvar="NODES", min=10, help="simulated nodes"),
    keep: bool = typer.Option(False, "--keep", envvar="KEEP", help="leave the cluster up afterwards"),
) -> None:
    """Build or reuse the control plane, start it, run fleetkeeper, play a scenario, print a summary."""
    from fleetkeeper.cli.demo import run_demo

    fklog.setup("warning", "text")
    if not run_async(run_demo(nodes=nodes, keep=keep, components=COMPONENTS)):
        raise typer.Exit(1)


def build_cli() -> click.Command:
    _register_subapps()
    return typer.main.get_command(app)


def main() -> None:
    logging.getLogger("asyncio").setLevel(logging.ERROR)
    build_cli()(prog_name="fleetkeeper")


