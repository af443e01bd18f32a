"""``fleetkeeper cluster``: the local control plane."""

from __future__ import annotations

import os
from pathlib import Path

import typer
from rich.table import Table

from fleetkeeper.cli.common import console, out, run_async
from fleetkeeper.core import cliutil
from fleetkeeper.core.kube import NODES
from fleetkeeper.localcluster.cluster import LocalCluster, node_ready, versions

app = typer.Typer(help="A real local control plane (etcd, kube-apiserver, controller-manager, scheduler, KWOK).",
                  no_args_is_help=True)

DirOpt = typer.Option(None, "--dir", envvar="FLEETKEEPER_CLUSTER_DIR", help="cluster state directory")


@app.command()
def up(
    nodes: int = typer.Option(50, "--nodes", "-n", min=0, max=20000, help="simulated nodes"),
    gpus_per_node: int = typer.Option(8, "--gpus-per-node", "-g", min=1, max=16),
    port: int = typer.Option(None, "--port", min=1, max=65535, help="API server port (default: a free one)"),
    events_etcd: bool = typer.Option(False, "--events-etcd", help="keep Events in their own etcd (R15)"),
    join_gate: bool = typer.Option(False, "--join-gate", help="nodes register with the preflight taint and label"),
    real_node: bool = typer.Option(False, "--real-node",
                                   help="also run one real node here (kubelet, containerd, CNI bridge, kube-proxy, "
                                        "CoreDNS; needs root), tainted fleetkeeper.io/real-node=true:NoSchedule, "
                                        "with fleetkeeper's images loaded; docs/realnode.md"),
    directory: Path = DirOpt,
) -> None:
    """Start the control plane (building binaries if needed) and create NODES simulated nodes."""
    lc = LocalCluster(directory)

    def progress(msg: str) -> None:
        console.print(f"[dim]·[/dim] {msg}")

    res = run_async(lc.up(nodes, gpus_per_node, apiserver_port=port, events_etcd=events_etcd,
                          join_gate=join_gate, progress=progress, real_node=real_node))
    out.print(f"[green]cluster up[/green]: {lc.server}  nodes Ready: {res['ready']} (created {res['created']}, "
              f"{res['seconds']}s)")
    out.print(f"  kubeconfig: {lc.kubeconfig}\n  try: fleetkeeper cluster kubectl -- get nodes")


@app.command()
def status(directory: Path = DirOpt, output: str = cliutil.output_option()) -> None:
    """Show processes, versions and nodes of the local cluster."""
    lc = LocalCluster(directory)
    if not lc.state_path.exists():
        console.print(f"no local cluster in {lc.dir}; start one with 'fleetkeeper cluster up'")
        raise typer.Exit(1)
    if output != "text":
        running = lc.running()
        data: dict = {"dir": str(lc.dir), "kubeconfig": str(lc.kubeconfig), "server": lc.server,
                      "components": {c: {"running": ok, "pid": lc.state.pids.get(c)} for c, ok in running.items()},
                      "versions": versions()}
        if running.get("kube-apiserver"):
            total, ready = run_async(_count_nodes(lc))
            data["nodes"] = {"total": total, "ready": ready}
        cliutil.emit_structured(data, output)
        if not running.get("kube-apiserver"):
            raise typer.Exit(1)
        return
    t = Table(title=f"local cluster {lc.dir}")
    t.add_column("component")
    t.add_column("state")
    t.add_column("pid")
    running = lc.running()
    for comp, ok in running.items():
        t.add_row(comp, "[green]running[/green]" if ok else "[red]stopped[/red]", str(lc.state.pids.get(comp, "")))
    out.print(t)
    out.print("versions: " + ", ".join(f"{k.split('_')[0].lower()} {v}" for k, v in versions().items()))
    if not running.get("kube-apiserver"):
        raise typer.Exit(1)

    total, ready = run_async(_count_nodes(lc))
    out.print(f"API server: {lc.server}   nodes: {total} ({ready} Ready)   kubeconfig: {lc.kubeconfig}")


async def _count_nodes(lc: LocalCluster) -> tuple[int, int]:
    async with await lc.connect() as kube:
        nodes, _ = await kube.list(NODES)
        return len(nodes), sum(1 for n in nodes if node_ready(n))


@app.command()
def down(directory: Path = DirOpt,
         purge: bool = typer.Option(False, "--purge", help="also delete the state directory (etcd data, certs)")) -> None:
    """Stop every process of the local cluster."""
    lc = LocalCluster(directory)
    stopped = lc.down(purge=purge)
    out.print(f"stopped: {', '.join(stopped) or 'nothing was running'}" + (f"; removed {lc.dir}" if purge else ""))


@app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def kubectl(ctx: typer.Context, directory: Path = DirOpt) -> None:
    """Run the built kubectl against the local cluster: fleetkeeper cluster kubectl -- get nodes"""
    lc = LocalCluster(directory)
    if not lc.state.bin_dir or not lc.kubeconfig.exists():
        console.print("no local cluster; start one with 'fleetkeeper cluster up'")
        raise typer.Exit(1)
    args = [a for a in ctx.args if a != "--"] if ctx.args[:1] == ["--"] else list(ctx.args)
    kubectl_bin = str(Path(lc.state.bin_dir) / "kubectl")
    os.execv(kubectl_bin, [kubectl_bin, f"--kubeconfig={lc.kubeconfig}", *args])


