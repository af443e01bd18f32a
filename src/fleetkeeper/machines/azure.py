"""Azure through the official ``azure-mgmt-compute`` client (its calls run in a
worker thread; long-running operations are started, not waited for).

The providerID names a scale-set instance
(``azure:///subscriptions/S/resourceGroups/RG/providers/Microsoft.Compute/virtualMachineScaleSets/SS/virtualMachines/ID``)
or a standalone VM (``.../virtualMachines/NAME``).

* terminate and replace: delete the scale-set instance (the scale set, or the
  cluster autoscaler, brings capacity back on other hardware) or the VM;
* reboot: restart;
* reimage: a fresh OS disk on the same host (``reimage``, an extra verb);
* exists: ``get``: gone on 404 or once its provisioning state is ``Deleting``.

Dry-run reads the instance and says which call it would make.
"""

from __future__ import annotations

import asyncio
from typing import Any

from fleetkeeper.core import errors
from fleetkeeper.machines.base import AzureId, Machine, Outcome, parse_azure


class AzureProvider:
    name = "azure"
    actions = frozenset({"terminate", "replace", "reboot", "reimage"})
    deletes_node = False

    def __init__(self, *, subscription_id: str = "", credential: Any = None, base_url: str | None = None):
        try:
            from azure.mgmt.compute import ComputeManagementClient
        except ImportError as exc:  # pragma: no cover - depends on the install
            raise errors.ConfigError("machines", [("provider", "azure", "needs azure-mgmt-compute and azure-identity "
                                                   "(pip install fleetkeeper[azure])")]) from exc
        if credential is None:
            from azure.identity import DefaultAzureCredential

            credential = DefaultAzureCredential()  # workload identity, managed identity, or the environment
        self.credential = credential
        self.base_url = base_url
        self._kw: dict[str, Any] = {"enforce_https": False} if base_url and base_url.startswith("http://") else {}
        self._clients: dict[str, Any] = {}
        self._cls = ComputeManagementClient
        self.subscription_id = subscription_id

    def client(self, subscription: str) -> Any:
        sub = self.subscription_id or subscription
        if sub not in self._clients:
            kw: dict[str, Any] = {"base_url": self.base_url} if self.base_url else {}
            # no retries inside the client: a throttled or failed call comes back at once as a typed
            # error, and the controller's work queue retries it (with the server's Retry-After)
            self._clients[sub] = self._cls(self.credential, sub, retry_total=0, **kw)
        return self._clients[sub]

    def _id(self, m: Machine) -> AzureId:
        aid = parse_azure(m.provider_id)
        if aid is None:
            raise errors.MachineNotFound(self.name, m.node, f"providerID {m.provider_id!r} is not an Azure VM or "
                                                            "scale-set instance")
        return aid

    def _error(self, m: Machine, exc: Exception) -> errors.MachineError:
        from azure.core.exceptions import ClientAuthenticationError, HttpResponseError, ResourceNotFoundError

        status = getattr(exc, "status_code", None)
        msg = getattr(exc, "message", None) or str(exc)
        if isinstance(exc, ResourceNotFoundError) or status == 404:
            return errors.MachineNotFound(self.name, m.node, msg)
        if status == 429:
            retry = 30.0
            resp = getattr(exc, "response", None)
            if resp is not None and (ra := resp.headers.get("Retry-After", "")).isdigit():
                retry = float(ra)
            return errors.MachineThrottled(self.name, m.node, msg, retry)
        if isinstance(exc, ClientAuthenticationError) or status in (401, 403):
            return errors.MachineForbidden(self.name, m.node, msg)
        if isinstance(exc, HttpResponseError):
            return errors.MachineFailed(self.name, m.node, msg)
        return errors.MachineFailed(self.name, m.node, f"{type(exc).__name__}: {exc}")

    async def _call(self, m: Machine, fn: Any, *a: Any, **kw: Any) -> Any:
        from azure.core.exceptions import AzureError

        try:
            return await asyncio.to_thread(fn, *a, **kw, **self._kw)
        except AzureError as exc:
            raise self._error(m, exc) from exc

    def _ops(self, aid: AzureId) -> tuple[Any, tuple[str, ...], str]:
        c = self.client(aid.subscription)
        if aid.instance_id:
            return (c.virtual_machine_scale_set_vms, (aid.resource_group, aid.name, aid.instance_id),
                    f"scale-set instance {aid.name}/{aid.instance_id}")
        return c.virtual_machines, (aid.resource_group, aid.name), f"VM {aid.name}"

    async def _get(self, m: Machine) -> Any | None:
        ops, args, _ = self._ops(self._id(m))
        try:
            return await self._call(m, ops.get, *args)
        except errors.MachineNotFound:
            return None

    async def _lro(self, action: str, verb: str, m: Machine, dry_run: bool, *, must_exist: bool = False) -> Outcome:
        aid = self._id(m)
        ops, args, what = self._ops(aid)
        vm = await self._get(m)
        if vm is None:
            if must_exist:
                raise errors.MachineNotFound(self.name, m.node, f"{what} not found")
            return Outcome(action, f"{what} already gone", dry_run, gone=True)
        if verb == "delete" and str(getattr(vm, "provisioning_state", "")).lower() == "deleting":
            return Outcome(action, f"{what} is already being deleted", dry_run, gone=False)
        if dry_run:
            return Outcome(action, f"dry-run: would {verb} {what}", True)
        await self._call(m, getattr(ops, f"begin_{verb}"), *args, polling=False)
        return Outcome(action, f"{verb} of {what} accepted", False, gone=False)

    async def terminate(self, m: Machine, *, dry_run: bool = False) -> Outcome:
        return await self._lro("terminate", "delete", m, dry_run)

    async def replace(self, m: Machine, *, dry_run: bool = False) -> Outcome:
        return await self._lro("replace", "delete", m, dry_run)

    async def reboot(self, m: Machine, *, dry_run: bool = False) -> Outcome:
        return await self._lro("reboot", "restart", m, dry_run, must_exist=True)

    async def reimage(self, m: Machine, *, dry_run: bool = False) -> Outcome:
        return await self._lro("reimage", "reimage", m, dry_run, must_exist=True)

    async def exists(self, m: Machine) -> bool | None:
        vm = await self._get(m)
        return vm is not None and str(getattr(vm, "provisioning_state", "")).lower() != "deleting"

    def close(self) -> None:
        for c in self._clients.values():
            c.close()
        self._clients.clear()
