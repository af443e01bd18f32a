"""AWS EC2 through boto3 (the official client; its calls run in a worker thread).

* terminate: an instance in an Auto Scaling group is terminated with
  ``TerminateInstanceInAutoScalingGroup(ShouldDecrementDesiredCapacity=False)``
  so the group launches a replacement; any other instance with
  ``TerminateInstances``;
* replace: the same call; for an instance in no group it is refused (nothing
  would replace it);
* reboot: ``RebootInstances``;
* exists: ``DescribeInstances``: gone once ``shutting-down`` or ``terminated``.

Dry-run uses EC2's own ``DryRun=True`` (the permission check; AWS answers
``DryRunOperation``); Auto Scaling has no dry-run, so there only the lookup runs.
"""

from __future__ import annotations

import asyncio
from typing import Any

from fleetkeeper.core import errors
from fleetkeeper.machines.base import Machine, Outcome, parse_aws

NOT_FOUND = {"InvalidInstanceID.NotFound", "InvalidInstanceID.Malformed"}
THROTTLED = {"RequestLimitExceeded", "Throttling", "ThrottlingException", "TooManyRequestsException",
             "RequestThrottled"}
FORBIDDEN = {"UnauthorizedOperation", "AccessDenied", "AccessDeniedException", "AuthFailure",
             "UnrecognizedClientException"}
GONE_STATES = {"shutting-down", "terminated"}


class AwsProvider:
    name = "aws"
    actions = frozenset({"terminate", "replace", "reboot"})
    deletes_node = False  # the node is deleted once DescribeInstances says it is gone

    def __init__(self, *, region: str | None = None, endpoint_url: str | None = None, session: Any = None):
        try:
            import boto3
            from botocore.config import Config
        except ImportError as exc:  # pragma: no cover - depends on the install
            raise errors.ConfigError("machines", [("provider", "aws", "needs boto3 (pip install fleetkeeper[aws])")]) \
                from exc
        sess = session or boto3.session.Session(region_name=region)
        cfg = Config(retries={"mode": "standard", "max_attempts": 3})
        self.ec2 = sess.client("ec2", endpoint_url=endpoint_url, config=cfg)
        self.asg = sess.client("autoscaling", endpoint_url=endpoint_url, config=cfg)

    def _id(self, m: Machine) -> str:
        aid = parse_aws(m.provider_id)
        if aid is None:
            raise errors.MachineNotFound(self.name, m.node, f"providerID {m.provider_id!r} is not aws:///<zone>/i-...")
        return aid.instance_id

    def _error(self, m: Machine, exc: Exception) -> errors.MachineError:
        from botocore.exceptions import BotoCoreError, ClientError

        if isinstance(exc, ClientError):
            code = exc.response.get("Error", {}).get("Code", "")
            msg = f"{code}: {exc.response.get('Error', {}).get('Message', '')}"
            if code in NOT_FOUND or (code == "ValidationError" and "not found" in msg.lower()):
                return errors.MachineNotFound(self.name, m.node, msg)
            if code in THROTTLED:
                return errors.MachineThrottled(self.name, m.node, msg)
            if code in FORBIDDEN:
                return errors.MachineForbidden(self.name, m.node, msg)
            return errors.MachineFailed(self.name, m.node, msg)
        if isinstance(exc, BotoCoreError):
            return errors.MachineFailed(self.name, m.node, f"{type(exc).__name__}: {exc}")
        raise exc

    async def _call(self, m: Machine, fn: Any, **kw: Any) -> dict:
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            return await asyncio.to_thread(fn, **kw)
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") == "DryRunOperation":
                return {"DryRun": True}
            raise self._error(m, exc) from exc
        except BotoCoreError as exc:
            raise self._error(m, exc) from exc

    async def group_of(self, m: Machine) -> str:
        """The Auto Scaling group of the instance, or ""."""
        iid = self._id(m)
        out = await self._call(m, self.asg.describe_auto_scaling_instances, InstanceIds=[iid])
        groups = [i.get("AutoScalingGroupName", "") for i in out.get("AutoScalingInstances") or []]
        return groups[0] if groups else ""

    async def _terminate(self, action: str, m: Machine, dry_run: bool) -> Outcome:
        iid = self._id(m)
        state = await self._state(m)
        if state is None or state in GONE_STATES:
            return Outcome(action, f"instance {iid} already {state or 'gone'}", dry_run, gone=True)
        group = await self.group_of(m)
        if group:
            if dry_run:
                return Outcome(action, f"dry-run: would terminate {iid} in Auto Scaling group {group} "
                                       "(desired capacity kept, so the group replaces it)", True)
            out = await self._call(m, self.asg.terminate_instance_in_auto_scaling_group, InstanceId=iid,
                                   ShouldDecrementDesiredCapacity=False)
            act = (out.get("Activity") or {}).get("ActivityId", "")
            return Outcome(action, f"terminated {iid} in Auto Scaling group {group} without decrementing its "
                                   f"desired capacity (activity {act})", False, gone=False)
        if action == "replace":
            raise errors.MachineUnsupported(self.name, m.node, f"instance {iid} is in no Auto Scaling group: "
                                                               "nothing would replace it")
        out = await self._call(m, self.ec2.terminate_instances, InstanceIds=[iid], DryRun=dry_run)
        if out.get("DryRun"):
            return Outcome(action, f"dry-run: would terminate instance {iid} (permission checked)", True)
        states = [s.get("CurrentState", {}).get("Name") for s in out.get("TerminatingInstances") or []]
        return Outcome(action, f"terminated instance {iid} ({', '.join(filter(None, states)) or 'requested'})",
                       False, gone=False)

    async def terminate(self, m: Machine, *, dry_run: bool = False) -> Outcome:
        return await self._terminate("terminate", m, dry_run)

    async def replace(self, m: Machine, *, dry_run: bool = False) -> Outcome:
        return await self._terminate("replace", m, dry_run)

    async def reboot(self, m: Machine, *, dry_run: bool = False) -> Outcome:
        iid = self._id(m)
        out = await self._call(m, self.ec2.reboot_instances, InstanceIds=[iid], DryRun=dry_run)
        if out.get("DryRun"):
            return Outcome("reboot", f"dry-run: would reboot instance {iid} (permission checked)", True)
        return Outcome("reboot", f"rebooted instance {iid}", False, gone=False)

    async def _state(self, m: Machine) -> str | None:
        iid = self._id(m)
        try:
            out = await self._call(m, self.ec2.describe_instances, InstanceIds=[iid])
        except errors.MachineNotFound:
            return None
        for r in out.get("Reservations") or []:
            for i in r.get("Instances") or []:
                if i.get("InstanceId") == iid:
                    return (i.get("State") or {}).get("Name")
        return None

    async def exists(self, m: Machine) -> bool | None:
        state = await self._state(m)
        return state is not None and state not in GONE_STATES

    def close(self) -> None:
        self.ec2.close()
        self.asg.close()
