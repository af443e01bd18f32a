"""Helpers of the top-level commands (the shared parts live in core.cliutil)."""

from __future__ import annotations

from rich.console import Console

from fleetkeeper.core.cliutil import err_console as console
from fleetkeeper.core.cliutil import kubeconfig_option, resolve_kubeconfig
from fleetkeeper.core.cliutil import run as run_async

out = Console()

__all__ = ["console", "out", "run_async", "kubeconfig_option", "resolve_kubeconfig"]
