"""Helpers shared by CLI commands: one way to report errors and run coroutines."""

from __future__ import annotations

import asyncio
import functools
import sys
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

import typer
from rich.console import Console

from fleetkeeper.core import errors

console = Console(stderr=True)
out = Console()
T = TypeVar("T")


def run_async(coro: Coroutine[Any, Any, T]) -> T:
    """Run a coroutine; map fleetkeeper errors to a clear message and exit code 1."""
    try:
        return asyncio.run(coro)
    except errors.ConfigError as exc:
        console.print(f"[red]configuration error[/red]: {exc}")
        raise typer.Exit(2) from None
    except errors.ApiUnreachable as exc:
        console.print(f"[red]cannot reach the Kubernetes API server[/red]: {exc}\n"
                      "Is the cluster up? ('fleetkeeper cluster status', or check --kubeconfig)")
        raise typer.Exit(1) from None
    except errors.FleetkeeperError as exc:
        console.print(f"[red]error[/red]: {exc}")
        raise typer.Exit(1) from None
    except KeyboardInterrupt:
        raise typer.Exit(130) from None


def handle_errors(fn: Callable[..., T]) -> Callable[..., T]:
    @functools.wraps(fn)
    def wrapper(*a: Any, **kw: Any) -> T:
        try:
            return fn(*a, **kw)
        except errors.ConfigError as exc:
            console.print(f"[red]configuration error[/red]: {exc}")
            raise typer.Exit(2) from None
        except errors.FleetkeeperError as exc:
            console.print(f"[red]error[/red]: {exc}")
            raise typer.Exit(1) from None

    return wrapper


def kubeconfig_option() -> Any:
    return typer.Option(None, "--kubeconfig", envvar="KUBECONFIG",
                        help="kubeconfig file (default: the local cluster's, else $KUBECONFIG or in-cluster)")


def resolve_kubeconfig(path: str | None) -> str | None:
    """An explicit --kubeconfig wins; else the local cluster's if it is up; else the default chain."""
    if path:
        return path
    from fleetkeeper.localcluster.cluster import LocalCluster

    lc = LocalCluster()
    if lc.kubeconfig.exists() and lc.running().get("kube-apiserver"):
        return str(lc.kubeconfig)
    return None


def eprint(*a: Any) -> None:
    print(*a, file=sys.stderr)
