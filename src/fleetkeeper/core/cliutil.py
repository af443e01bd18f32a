"""What every ``fleetkeeper`` command shares: one mapping of the error tree
to exit codes and messages, and one way to find the cluster.

Exit codes: 2 for bad input (:class:`errors.ConfigError`), 1 for other
fleetkeeper errors, 130 on Ctrl-C.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Coroutine
from pathlib import Path
from typing import Any, TypeVar

import typer
from rich.console import Console

from fleetkeeper.core import errors
from fleetkeeper.core.kube import Kube

err_console = Console(stderr=True)
T = TypeVar("T")


def default_cluster_dir() -> Path:
    """State directory of the local control plane (``$FLEETKEEPER_CLUSTER_DIR`` overrides)."""
    env = os.environ.get("FLEETKEEPER_CLUSTER_DIR")
    if env:
        return Path(env)
    return Path(os.environ.get("XDG_STATE_HOME") or Path.home() / ".local" / "state") / "fleetkeeper" / "cluster"


def fail(exc: BaseException) -> typer.Exit:
    """Print one clear line for an error and return the Exit to raise."""
    if isinstance(exc, errors.ConfigError):
        err_console.print(f"[red]configuration error[/red]: {exc}")
        return typer.Exit(2)
    if isinstance(exc, errors.ApiUnreachable):
        err_console.print(f"[red]cannot reach the Kubernetes API server[/red]: {exc}\n"
                          "Is the cluster up? ('fleetkeeper cluster status', or check --kubeconfig)")
        return typer.Exit(1)
    err_console.print(f"[red]error[/red]: {exc}")
    return typer.Exit(1)


def run(coro: Coroutine[Any, Any, T]) -> T:
    """Run a command's coroutine; fleetkeeper errors become a message and an exit code."""
    try:
        return asyncio.run(coro)
    except errors.FleetkeeperError as exc:
        raise fail(exc) from None
    except KeyboardInterrupt:
        raise typer.Exit(130) from None


def resolve_kubeconfig(path: str | None) -> str | None:
    """An explicit --kubeconfig wins; else the local cluster's kubeconfig when one
    exists (and we are not inside a cluster); else the client's default chain
    (in-cluster, $KUBECONFIG, ~/.kube/config)."""
    if path:
        return path
    local = default_cluster_dir() / "kubeconfig"
    if local.exists() and not os.environ.get("KUBERNETES_SERVICE_HOST") and not os.environ.get("KUBECONFIG"):
        return str(local)
    return None


async def connect(kubeconfig: str | None, **kw: Any) -> Kube:
    return await Kube.connect(resolve_kubeconfig(kubeconfig), **kw)


def kubeconfig_option() -> Any:
    return typer.Option(None, "--kubeconfig", envvar="KUBECONFIG",
                        help="kubeconfig file (default: the local cluster's, else $KUBECONFIG or in-cluster)")
