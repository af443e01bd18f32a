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


# The cluster a command talks to, in this order (the first that applies wins):
#   1. --kubeconfig FILE (or $KUBECONFIG, which the option reads)
#   2. in a pod: the in-cluster service account
#   3. ~/.kube/config, when it exists
#   4. the local cluster's kubeconfig ('fleetkeeper cluster up'), announced on stderr
# --context NAME picks a context of that kubeconfig (default: its current-context).
KUBECONFIG_ORDER = ("--kubeconfig/$KUBECONFIG", "in-cluster service account", "~/.kube/config",
                    "the local cluster's kubeconfig")
_selected_context: str | None = None


def select_context(name: str | None) -> None:
    """The --context of this invocation (set once by the option's callback)."""
    global _selected_context
    _selected_context = name or None


def selected_context() -> str | None:
    return _selected_context


def stop_on_signals() -> asyncio.Event:
    """An Event set on SIGTERM or SIGINT, for the running loop. A process that is PID 1
    in a container gets no default action for SIGTERM: without a handler a stopping
    pod waits out its whole grace period and is then killed."""
    import signal

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    return stop


async def until_stopped(coro: Coroutine[Any, Any, T], stop: asyncio.Event) -> T | None:
    """Run ``coro`` until it returns or ``stop`` is set (then cancel it and return None)."""
    task = asyncio.ensure_future(coro)
    waiter = asyncio.ensure_future(stop.wait())
    try:
        await asyncio.wait({task, waiter}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        waiter.cancel()
        if not task.done():
            task.cancel()
        await asyncio.gather(task, waiter, return_exceptions=True)
    return None if task.cancelled() else task.result()


def resolve_kubeconfig(path: str | None, *, announce: bool = True) -> str | None:
    """The kubeconfig file to load, or None for the client's own chain (in-cluster,
    then ~/.kube/config). See :data:`KUBECONFIG_ORDER`: the local cluster is used
    only when nothing else is configured, and then says so."""
    if path:
        return path
    env = os.environ.get("KUBECONFIG")
    if env:
        return env
    if os.environ.get("KUBERNETES_SERVICE_HOST"):
        return None
    if (Path.home() / ".kube" / "config").exists():
        return None
    local = default_cluster_dir() / "kubeconfig"
    if local.exists():
        if announce:
            err_console.print(f"[dim]using the local cluster's kubeconfig {local} (no --kubeconfig, "
                              "$KUBECONFIG or ~/.kube/config)[/dim]")
        return str(local)
    return None


async def connect(kubeconfig: str | None, context: str | None = None, **kw: Any) -> Kube:
    path = resolve_kubeconfig(kubeconfig)
    if path is None and not os.environ.get("KUBERNETES_SERVICE_HOST") \
            and not (Path.home() / ".kube" / "config").exists():
        raise errors.ConfigError("kubeconfig", [("", None, "no cluster configured: pass --kubeconfig, set "
                                                 "$KUBECONFIG, create ~/.kube/config, or start a local cluster "
                                                 "with 'fleetkeeper cluster up'")])
    return await Kube.connect(path, context or _selected_context, **kw)


def kubeconfig_option() -> Any:
    return typer.Option(None, "--kubeconfig", envvar="KUBECONFIG",
                        help="kubeconfig file (default: in-cluster, else ~/.kube/config, else the local "
                             "cluster's)")


def _context_callback(value: str | None) -> str | None:
    select_context(value)
    return value


def context_option() -> Any:
    return typer.Option(None, "--context", callback=_context_callback,
                        help="kubeconfig context to use (default: its current-context)")


def parse_bind_address(value: str, flag: str = "--metrics-bind-address") -> tuple[str, int]:
    """``HOST:PORT``, ``:PORT`` (every address) or ``[V6]:PORT``, as controller-runtime's
    --metrics-bind-address."""
    host, sep, port = value.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise errors.ConfigError("flags", [(flag, value,
                                            "expected HOST:PORT or :PORT, e.g. 0.0.0.0:8080 or :8080")])
    host = host.strip("[]") or "0.0.0.0"
    return host, int(port)


# --- -o json|yaml ----------------------------------------------------------------
OUTPUT_FORMATS = ("text", "json", "yaml")


def _check_output(value: str) -> str:
    v = (value or "").lower()
    if v not in OUTPUT_FORMATS:
        raise typer.BadParameter(f"{value!r}: expected one of {', '.join(OUTPUT_FORMATS)}")
    return v


def output_option(default: str = "text") -> Any:
    return typer.Option(default, "--output", "-o", callback=_check_output, metavar="text|json|yaml",
                        help="text, json or yaml")


def render(data: Any, fmt: str) -> str:
    """``data`` (plain dicts, lists, str, numbers) as json or yaml text."""
    import orjson
    import yaml

    if fmt == "json":
        return orjson.dumps(data, option=orjson.OPT_INDENT_2 | orjson.OPT_NON_STR_KEYS, default=str).decode()
    if fmt == "yaml":
        return yaml.safe_dump(orjson.loads(orjson.dumps(data, default=str)), sort_keys=False).rstrip("\n")
    raise ValueError(f"not a structured output format: {fmt}")


def emit_structured(data: Any, fmt: str) -> bool:
    """Print ``data`` and return True when ``fmt`` is json or yaml; False for text."""
    if fmt.lower() in ("json", "yaml"):
        typer.echo(render(data, fmt.lower()))
        return True
    return False
