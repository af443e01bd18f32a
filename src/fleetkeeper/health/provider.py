"""The cloud-provider interface of the remediation controller.

``terminate(node)`` removes the machine so the cloud (or the cluster
autoscaler / node group) replaces it. :class:`LocalProvider` deletes the Node
object (the local control plane's machines are Node objects);
:class:`CommandProvider` runs an operator-supplied command (for example a
script that calls the cloud's API) with the node name.
"""

from __future__ import annotations

import asyncio
import shlex
from typing import Protocol

from fleetkeeper.core import errors
from fleetkeeper.core.kube import NODES, Kube


class CloudProvider(Protocol):
    name: str

    async def terminate(self, node: str, *, dry_run: bool = False) -> str: ...


class LocalProvider:
    name = "local"

    def __init__(self, kube: Kube):
        self.kube = kube

    async def terminate(self, node: str, *, dry_run: bool = False) -> str:
        try:
            await self.kube.delete(NODES, node, dry_run=dry_run)
        except errors.NotFound:
            return "node already gone"
        return "deleted the Node object" + (" (dry-run)" if dry_run else "")


class CommandProvider:
    """``command`` is a template such as ``/usr/local/bin/terminate-vm {node}``."""

    name = "command"

    def __init__(self, command: str, timeout: float = 120.0):
        if "{node}" not in command:
            raise errors.ConfigError("provider", [("command", command, "must contain {node}")])
        self.command = command
        self.timeout = timeout

    async def terminate(self, node: str, *, dry_run: bool = False) -> str:
        argv = [a.replace("{node}", node) for a in shlex.split(self.command)]
        if dry_run:
            return f"dry-run: would run {shlex.join(argv)}"
        proc = await asyncio.create_subprocess_exec(*argv, stdout=asyncio.subprocess.PIPE,
                                                    stderr=asyncio.subprocess.STDOUT)
        try:
            out, _ = await asyncio.wait_for(proc.communicate(), self.timeout)
        except asyncio.TimeoutError:
            proc.kill()
            raise errors.Temporary(f"terminate command for {node} timed out after {self.timeout:.0f}s", 60.0)
        if proc.returncode != 0:
            raise errors.Temporary(f"terminate command for {node} failed rc={proc.returncode}: "
                                   f"{out.decode(errors='replace')[-300:]}", 60.0)
        return out.decode(errors="replace").strip()[-200:] or "terminate command succeeded"
