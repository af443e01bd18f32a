"""An operator-supplied executable as the machine provider.

It is run as ``<command...> <verb> <node> <providerID>`` (the providerID
argument is "" when the node has none), with the environment variables
``FLEETKEEPER_VERB``, ``FLEETKEEPER_NODE``, ``FLEETKEEPER_PROVIDER_ID``,
``FLEETKEEPER_NODE_UID`` and ``FLEETKEEPER_DRY_RUN`` (``1`` or ``0``).
Verbs: ``terminate``, ``replace``, ``reboot``, ``exists``. Exit codes:

====  ==================================================================
0     done (``exists``: the machine is there)
2     this verb is not supported (``exists``: cannot tell)
3     no such machine (``terminate``/``replace``: already gone; ``exists``: gone)
4     throttled: retried later
5     forbidden: retried much later, after someone grants the permission
else  failed: retried later
====  ==================================================================

The last line of standard output is the message recorded in the Event.
"""

from __future__ import annotations

import asyncio
import os
import shlex

from fleetkeeper.core import errors
from fleetkeeper.machines.base import Machine, Outcome

EXIT_OK, EXIT_UNSUPPORTED, EXIT_NOT_FOUND, EXIT_THROTTLED, EXIT_FORBIDDEN = 0, 2, 3, 4, 5


class CommandProvider:
    name = "command"
    actions = frozenset({"terminate", "replace", "reboot"})

    def __init__(self, command: str | list[str], *, timeout: float = 120.0, deletes_node: bool = False):
        argv = shlex.split(command) if isinstance(command, str) else list(command)
        if not argv:
            raise errors.ConfigError("machines", [("command.argv", command, "must name an executable")])
        self.argv = argv
        self.timeout = timeout
        self.deletes_node = deletes_node

    async def _run(self, verb: str, m: Machine, dry_run: bool) -> tuple[int, str]:
        env = {**os.environ, "FLEETKEEPER_VERB": verb, "FLEETKEEPER_NODE": m.node,
               "FLEETKEEPER_PROVIDER_ID": m.provider_id, "FLEETKEEPER_NODE_UID": m.node_uid,
               "FLEETKEEPER_DRY_RUN": "1" if dry_run else "0"}
        try:
            proc = await asyncio.create_subprocess_exec(*self.argv, verb, m.node, m.provider_id, env=env,
                                                        stdout=asyncio.subprocess.PIPE,
                                                        stderr=asyncio.subprocess.STDOUT)
        except OSError as exc:
            raise errors.MachineFailed(self.name, m.node, f"cannot run {self.argv[0]}: {exc}", 300.0) from exc
        try:
            out, _ = await asyncio.wait_for(proc.communicate(), self.timeout)
        except asyncio.TimeoutError:
            proc.kill()
            await proc.wait()
            raise errors.MachineFailed(self.name, m.node, f"{verb} timed out after {self.timeout:.0f}s") from None
        lines = out.decode(errors="replace").strip().splitlines()
        return proc.returncode or 0, (lines[-1][:300] if lines else "")

    async def _act(self, verb: str, m: Machine, dry_run: bool) -> Outcome:
        rc, msg = await self._run(verb, m, dry_run)
        what = f"{shlex.join(self.argv)} {verb}"
        if rc == EXIT_OK:
            return Outcome(verb, msg or f"{what} succeeded", dry_run, gone=None)
        if rc == EXIT_NOT_FOUND:
            if verb == "reboot":
                raise errors.MachineNotFound(self.name, m.node, msg or "no such machine")
            return Outcome(verb, msg or "machine already gone", dry_run, gone=True)
        if rc == EXIT_UNSUPPORTED:
            raise errors.MachineUnsupported(self.name, m.node, msg or f"{verb} not supported by {self.argv[0]}")
        if rc == EXIT_THROTTLED:
            raise errors.MachineThrottled(self.name, m.node, msg or "throttled")
        if rc == EXIT_FORBIDDEN:
            raise errors.MachineForbidden(self.name, m.node, msg or "forbidden")
        raise errors.MachineFailed(self.name, m.node, f"{what} exited {rc}: {msg}")

    async def terminate(self, m: Machine, *, dry_run: bool = False) -> Outcome:
        return await self._act("terminate", m, dry_run)

    async def replace(self, m: Machine, *, dry_run: bool = False) -> Outcome:
        return await self._act("replace", m, dry_run)

    async def reboot(self, m: Machine, *, dry_run: bool = False) -> Outcome:
        return await self._act("reboot", m, dry_run)

    async def exists(self, m: Machine) -> bool | None:
        rc, _ = await self._run("exists", m, False)
        return {EXIT_OK: True, EXIT_NOT_FOUND: False}.get(rc)
