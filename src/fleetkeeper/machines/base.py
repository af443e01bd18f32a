"""What a machine provider is: the Node -> machine mapping (``spec.providerID``)
and the interface every provider implements.

A provider answers four verbs for one machine; each returns an
:class:`Outcome` or raises a :class:`fleetkeeper.core.errors.MachineError`
(not found, throttled, forbidden, unsupported, failed):

* ``terminate``: the machine goes away (whatever owns it may replace it);
* ``replace``: the machine goes away and its owner (MachineSet, NodePool,
  Auto Scaling group, managed instance group, scale set) brings a new one,
  never shrinking the group;
* ``reboot``: the platform restarts the machine (a hard reset where the
  platform has no soft reboot);
* ``exists``: is the machine still there? ``None`` when the provider cannot
  tell (then the Node object is never deleted by fleetkeeper).

Every verb takes ``dry_run``: it checks that the machine can be found and
says what it would do, and changes nothing.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

ACTIONS = ("terminate", "replace", "reboot")


@dataclass(frozen=True)
class Machine:
    """The machine behind a Node, as the Node tells it."""

    node: str
    node_uid: str = ""
    provider_id: str = ""  # spec.providerID
    labels: dict[str, str] = field(default_factory=dict)
    annotations: dict[str, str] = field(default_factory=dict)

    @classmethod
    def from_node(cls, obj: dict) -> "Machine":
        meta = obj.get("metadata") or {}
        return cls(meta.get("name", ""), meta.get("uid", ""), (obj.get("spec") or {}).get("providerID", ""),
                   dict(meta.get("labels") or {}), dict(meta.get("annotations") or {}))

    @property
    def key(self) -> str:
        """What identifies the machine across Node objects: its providerID, else the Node's uid."""
        return self.provider_id or f"node-uid://{self.node_uid or self.node}"

    @property
    def scheme(self) -> str:
        return self.provider_id.split("://", 1)[0] if "://" in self.provider_id else ""


@dataclass(frozen=True)
class Outcome:
    """What a verb did. ``gone``: the machine is already gone (True), still there (False), unknown (None)."""

    action: str
    message: str
    dry_run: bool = False
    gone: bool | None = None


@runtime_checkable
class MachineProvider(Protocol):
    name: str
    actions: frozenset[str]  # verbs this provider implements (subset of ACTIONS)
    deletes_node: bool  # the platform deletes the Node object itself once the machine is gone

    async def terminate(self, m: Machine, *, dry_run: bool = False) -> Outcome: ...

    async def replace(self, m: Machine, *, dry_run: bool = False) -> Outcome: ...

    async def reboot(self, m: Machine, *, dry_run: bool = False) -> Outcome: ...

    async def exists(self, m: Machine) -> bool | None: ...


# --- providerID formats -------------------------------------------------------------

_AWS = re.compile(r"^aws://(?:/(?P<zone>[^/]*))?/(?P<id>i-[0-9a-f]+)$")
_GCE = re.compile(r"^gce://(?P<project>[^/]+)/(?P<zone>[^/]+)/(?P<name>[^/]+)$")
_AZURE_VMSS = re.compile(
    r"^azure:///subscriptions/(?P<sub>[^/]+)/resourceGroups/(?P<rg>[^/]+)/providers/Microsoft\.Compute/"
    r"virtualMachineScaleSets/(?P<vmss>[^/]+)/virtualMachines/(?P<id>[^/]+)$", re.IGNORECASE)
_AZURE_VM = re.compile(
    r"^azure:///subscriptions/(?P<sub>[^/]+)/resourceGroups/(?P<rg>[^/]+)/providers/Microsoft\.Compute/"
    r"virtualMachines/(?P<name>[^/]+)$", re.IGNORECASE)


@dataclass(frozen=True)
class AwsId:
    zone: str
    instance_id: str


@dataclass(frozen=True)
class GceId:
    project: str
    zone: str
    name: str


@dataclass(frozen=True)
class AzureId:
    subscription: str
    resource_group: str
    name: str  # the VM's name (standalone VM) or the scale set's name
    instance_id: str = ""  # the scale-set instance id ("" for a standalone VM)

    @property
    def vm_name(self) -> str:
        """The name Azure's Scheduled Events and IMDS use: ``<scale set>_<instance id>`` for a scale-set VM."""
        return f"{self.name}_{self.instance_id}" if self.instance_id else self.name


def parse_aws(pid: str) -> AwsId | None:
    m = _AWS.match(pid.strip())
    return AwsId(m["zone"] or "", m["id"]) if m else None


def parse_gce(pid: str) -> GceId | None:
    m = _GCE.match(pid.strip())
    return GceId(m["project"], m["zone"], m["name"]) if m else None


def parse_azure(pid: str) -> AzureId | None:
    pid = pid.strip()
    if m := _AZURE_VMSS.match(pid):
        return AzureId(m["sub"], m["rg"], m["vmss"], m["id"])
    if m := _AZURE_VM.match(pid):
        return AzureId(m["sub"], m["rg"], m["name"])
    return None


def cloud_of(pid: str) -> str:
    """aws, gce, azure, or "" for anything else (kwok://, a bare-metal scheme, none)."""
    if parse_aws(pid):
        return "aws"
    if parse_gce(pid):
        return "gce"
    if parse_azure(pid):
        return "azure"
    return ""
