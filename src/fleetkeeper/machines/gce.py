"""Google Compute Engine through the official ``google-cloud-compute`` client
(REST transport; its calls run in a worker thread).

The node's providerID ``gce://<project>/<zone>/<instance>`` names the instance;
its ``created-by`` metadata names the managed instance group (MIG) that owns it.

* terminate: MIG ``deleteInstances`` (the group's target size shrinks with it),
  or ``instances.delete`` for an instance in no group;
* replace: MIG ``recreateInstances`` (same name, a new VM; refused outside a MIG);
* reboot: ``instances.reset`` (a hard reset: GCE has no soft reboot API);
* exists: ``instances.get``: gone on 404, or once ``STOPPING``/``TERMINATED`` after a delete.

Dry-run looks the instance up and says which call it would make.
"""

from __future__ import annotations

import asyncio
import re
from typing import Any

from fleetkeeper.core import errors
from fleetkeeper.machines.base import GceId, Machine, Outcome, parse_gce

_MIG = re.compile(r"(?:^|/)projects/[^/]+/(?P<scope>zones|regions)/(?P<loc>[^/]+)/instanceGroupManagers/(?P<name>[^/]+)$")


class GceProvider:
    name = "gce"
    actions = frozenset({"terminate", "replace", "reboot"})
    deletes_node = False

    def __init__(self, *, endpoint: str | None = None, credentials: Any = None):
        try:
            from google.cloud import compute_v1
        except ImportError as exc:  # pragma: no cover - depends on the install
            raise errors.ConfigError("machines", [("provider", "gce", "needs google-cloud-compute "
                                                   "(pip install fleetkeeper[gce])")]) from exc
        self.compute = compute_v1
        opts = {"api_endpoint": endpoint} if endpoint else None
        kw: dict[str, Any] = {"transport": "rest", "client_options": opts}
        if credentials is not None:
            kw["credentials"] = credentials
        self.instances = compute_v1.InstancesClient(**kw)
        self.migs = compute_v1.InstanceGroupManagersClient(**kw)
        self.region_migs = compute_v1.RegionInstanceGroupManagersClient(**kw)

    def _id(self, m: Machine) -> GceId:
        gid = parse_gce(m.provider_id)
        if gid is None:
            raise errors.MachineNotFound(self.name, m.node, f"providerID {m.provider_id!r} is not "
                                                            "gce://<project>/<zone>/<instance>")
        return gid

    def _error(self, m: Machine, exc: Exception) -> errors.MachineError:
        from google.api_core import exceptions as gexc

        if isinstance(exc, gexc.NotFound):
            return errors.MachineNotFound(self.name, m.node, exc.message or str(exc))
        if isinstance(exc, (gexc.TooManyRequests, gexc.ResourceExhausted)):
            return errors.MachineThrottled(self.name, m.node, exc.message or str(exc))
        if isinstance(exc, (gexc.Forbidden, gexc.Unauthorized, gexc.PermissionDenied)):
            return errors.MachineForbidden(self.name, m.node, exc.message or str(exc))
        return errors.MachineFailed(self.name, m.node, f"{type(exc).__name__}: {exc}")

    async def _call(self, m: Machine, fn: Any, **kw: Any) -> Any:
        from google.api_core import exceptions as gexc

        try:
            return await asyncio.to_thread(fn, **kw)
        except gexc.GoogleAPIError as exc:
            raise self._error(m, exc) from exc

    async def _get(self, m: Machine) -> Any | None:
        gid = self._id(m)
        try:
            return await self._call(m, self.instances.get, project=gid.project, zone=gid.zone, instance=gid.name)
        except errors.MachineNotFound:
            return None

    @staticmethod
    def mig_of(inst: Any) -> tuple[str, str, str] | None:
        """(scope, location, name) of the MIG named by the instance's created-by metadata."""
        for item in (inst.metadata.items if inst.metadata else []):
            if item.key == "created-by" and (mm := _MIG.search(item.value or "")):
                return mm["scope"], mm["loc"], mm["name"]
        return None

    async def _mig_call(self, m: Machine, verb: str, mig: tuple[str, str, str], url: str) -> Any:
        scope, loc, name = mig
        gid = self._id(m)
        c = self.compute
        if scope == "zones":
            if verb == "delete":
                req = c.InstanceGroupManagersDeleteInstancesRequest(instances=[url])
                return await self._call(m, self.migs.delete_instances, project=gid.project, zone=loc,
                                        instance_group_manager=name,
                                        instance_group_managers_delete_instances_request_resource=req)
            req2 = c.InstanceGroupManagersRecreateInstancesRequest(instances=[url])
            return await self._call(m, self.migs.recreate_instances, project=gid.project, zone=loc,
                                    instance_group_manager=name,
                                    instance_group_managers_recreate_instances_request_resource=req2)
        if verb == "delete":
            req3 = c.RegionInstanceGroupManagersDeleteInstancesRequest(instances=[url])
            return await self._call(m, self.region_migs.delete_instances, project=gid.project, region=loc,
                                    instance_group_manager=name,
                                    region_instance_group_managers_delete_instances_request_resource=req3)
        req4 = c.RegionInstanceGroupManagersRecreateRequest(instances=[url])
        return await self._call(m, self.region_migs.recreate_instances, project=gid.project, region=loc,
                                instance_group_manager=name,
                                region_instance_group_managers_recreate_request_resource=req4)

    async def _act(self, action: str, m: Machine, dry_run: bool) -> Outcome:
        gid = self._id(m)
        inst = await self._get(m)
        if inst is None:
            return Outcome(action, f"instance {gid.name} already gone", dry_run, gone=True)
        url = f"projects/{gid.project}/zones/{gid.zone}/instances/{gid.name}"
        mig = self.mig_of(inst)
        if mig is None:
            if action == "replace":
                raise errors.MachineUnsupported(self.name, m.node, f"instance {gid.name} is in no managed instance "
                                                                   "group: nothing would recreate it")
            if dry_run:
                return Outcome(action, f"dry-run: would delete instance {url}", True)
            op = await self._call(m, self.instances.delete, project=gid.project, zone=gid.zone, instance=gid.name)
            return Outcome(action, f"deleting instance {url} (operation {getattr(op, 'name', '?')})", False, False)
        verb = "delete" if action == "terminate" else "recreate"
        what = f"{'deleteInstances' if verb == 'delete' else 'recreateInstances'} {url} in MIG {mig[2]} ({mig[1]})"
        if dry_run:
            return Outcome(action, f"dry-run: would {what}", True)
        op = await self._mig_call(m, verb, mig, url)
        return Outcome(action, f"{what} (operation {getattr(op, 'name', '?')})", False, gone=False)

    async def terminate(self, m: Machine, *, dry_run: bool = False) -> Outcome:
        return await self._act("terminate", m, dry_run)

    async def replace(self, m: Machine, *, dry_run: bool = False) -> Outcome:
        return await self._act("replace", m, dry_run)

    async def reboot(self, m: Machine, *, dry_run: bool = False) -> Outcome:
        gid = self._id(m)
        if dry_run:
            if await self._get(m) is None:
                raise errors.MachineNotFound(self.name, m.node, f"instance {gid.name} not found")
            return Outcome("reboot", f"dry-run: would reset instance {gid.name}", True)
        op = await self._call(m, self.instances.reset, project=gid.project, zone=gid.zone, instance=gid.name)
        return Outcome("reboot", f"reset instance {gid.name} (operation {getattr(op, 'name', '?')})", False, False)

    async def exists(self, m: Machine) -> bool | None:
        inst = await self._get(m)
        return inst is not None and inst.status not in ("STOPPING", "TERMINATED")

    def close(self) -> None:
        for c in (self.instances, self.migs, self.region_migs):
            c.transport.close()
