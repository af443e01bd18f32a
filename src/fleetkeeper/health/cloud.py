"""Cloud maintenance events, read from each cloud's instance metadata service
in its real document shape.

* Azure Scheduled Events: ``GET /metadata/scheduledevents?api-version=2020-07-01``
  with ``Metadata: true``; ``{"DocumentIncarnation": n, "Events": [{"EventId",
  "EventType": Reboot|Redeploy|Freeze|Preempt|Terminate, "ResourceType",
  "Resources": [vm names], "EventStatus": Scheduled|Started, "NotBefore",
  "Description", "EventSource", "DurationInSeconds"}]}``.
* AWS IMDSv2: ``PUT /latest/api/token`` (``X-aws-ec2-metadata-token-ttl-seconds``),
  then with ``X-aws-ec2-metadata-token``:
  ``GET /latest/meta-data/events/maintenance/scheduled`` -> ``[{"Code":
  instance-reboot|system-reboot|system-maintenance|instance-retirement|instance-stop,
  "Description", "EventId", "NotBefore", "NotAfter", "State": active|completed|canceled}]``
  and ``GET /latest/meta-data/spot/instance-action`` -> 404, or ``{"action":
  terminate|stop|hibernate, "time"}``.
* GCE: ``GET /computeMetadata/v1/instance/maintenance-event`` with
  ``Metadata-Flavor: Google`` -> ``NONE`` | ``MIGRATE_ON_HOST_MAINTENANCE`` |
  ``TERMINATE_ON_HOST_MAINTENANCE``; and ``/computeMetadata/v1/instance/preempted``
  -> ``TRUE``/``FALSE``.

Parsers are pure (document in, :class:`Finding` out); :class:`MaintenanceCheck`
fetches with aiohttp from an injectable base URL.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import aiohttp

from fleetkeeper.health.conditions import MAINTENANCE, Finding

AZURE_BASE = "http://169.254.169.254"
AWS_BASE = "http://169.254.169.254"
GCE_BASE = "http://metadata.google.internal"
AZURE_PATH = "/metadata/scheduledevents?api-version=2020-07-01"

# what each event means for the node: the kind becomes the condition reason's suffix
AZURE_KINDS = {"reboot": "Reboot", "redeploy": "Redeploy", "freeze": "Freeze", "preempt": "Terminate",
               "terminate": "Terminate"}
AWS_KINDS = {"instance-reboot": "Reboot", "system-reboot": "Reboot", "system-maintenance": "Maintenance",
             "instance-retirement": "Terminate", "instance-stop": "Terminate"}


def parse_azure(doc: dict | str, vm_name: str = "") -> Finding:
    d: dict[str, Any] = json.loads(doc) if isinstance(doc, str) else doc
    hits = []
    for ev in d.get("Events") or []:
        res = ev.get("Resources") or []
        if vm_name and res and vm_name not in res:
            continue
        if ev.get("EventStatus") not in (None, "Scheduled", "Started"):
            continue
        kind = AZURE_KINDS.get(str(ev.get("EventType", "")).lower(), "Maintenance")
        hits.append((kind, f"Azure {ev.get('EventType')} {ev.get('EventStatus', '')} not before "
                           f"{ev.get('NotBefore') or 'now'} ({ev.get('EventSource', 'Platform')}, "
                           f"id {ev.get('EventId', '?')}): {ev.get('Description', '')}".strip()))
    return _finding("Azure", hits, f"no scheduled events (incarnation {d.get('DocumentIncarnation', '?')})")


def parse_aws(scheduled: list | str | None, instance_action: dict | str | None) -> Finding:
    hits = []
    events = json.loads(scheduled) if isinstance(scheduled, str) else (scheduled or [])
    for ev in events:
        if str(ev.get("State", "active")).lower() != "active":
            continue
        code = str(ev.get("Code", ""))
        hits.append((AWS_KINDS.get(code, "Maintenance"),
                     f"AWS {code} between {ev.get('NotBefore', '?')} and {ev.get('NotAfter', '?')} "
                     f"(id {ev.get('EventId', '?')}): {ev.get('Description', '')}".strip()))
    if instance_action:
        ia = json.loads(instance_action) if isinstance(instance_action, str) else instance_action
        action = str(ia.get("action", "terminate"))
        hits.append(("Terminate" if action in ("terminate", "stop", "hibernate") else "Maintenance",
                     f"AWS spot instance-action {action} at {ia.get('time', '?')}"))
    return _finding("AWS", hits, "no active scheduled events, no spot instance-action")


def parse_gce(maintenance_event: str, preempted: str = "FALSE") -> Finding:
    ev = maintenance_event.strip().upper()
    hits = []
    if preempted.strip().upper() == "TRUE":
        hits.append(("Terminate", "GCE instance preempted"))
    if ev == "MIGRATE_ON_HOST_MAINTENANCE":
        hits.append(("Migrate", "GCE live migration for host maintenance"))
    elif ev == "TERMINATE_ON_HOST_MAINTENANCE":
        hits.append(("Terminate", "GCE terminate on host maintenance"))
    elif ev not in ("", "NONE"):
        hits.append(("Maintenance", f"GCE maintenance-event {ev}"))
    return _finding("GCE", hits, "maintenance-event NONE")


_RANK = {"Terminate": 5, "Redeploy": 4, "Reboot": 3, "Maintenance": 2, "Migrate": 1, "Freeze": 0}


def _finding(cloud: str, hits: list[tuple[str, str]], ok: str) -> Finding:
    if not hits:
        return Finding.ok(MAINTENANCE, f"{cloud}: {ok}")
    hits.sort(key=lambda h: -_RANK.get(h[0], 0))
    return Finding(MAINTENANCE, True, f"{cloud}{hits[0][0]}", "; ".join(m for _, m in hits)[:1000])


@dataclass
class MaintenanceCheck:
    """``cloud``: azure, aws, gce, or none. ``base`` overrides the metadata
    endpoint (tests serve recorded documents from 127.0.0.1)."""

    cloud: str = "none"
    base: str = ""
    vm_name: str = ""
    timeout: float = 2.0

    async def check(self) -> list[Finding]:
        if self.cloud == "none":
            return []
        to = aiohttp.ClientTimeout(total=self.timeout)
        try:
            async with aiohttp.ClientSession(timeout=to) as s:
                if self.cloud == "azure":
                    async with s.get((self.base or AZURE_BASE) + AZURE_PATH, headers={"Metadata": "true"}) as r:
                        r.raise_for_status()
                        return [parse_azure(await r.json(content_type=None), self.vm_name)]
                if self.cloud == "aws":
                    base = self.base or AWS_BASE
                    async with s.put(base + "/latest/api/token",
                                     headers={"X-aws-ec2-metadata-token-ttl-seconds": "21600"}) as r:
                        r.raise_for_status()
                        token = await r.text()
                    h = {"X-aws-ec2-metadata-token": token}
                    async with s.get(base + "/latest/meta-data/events/maintenance/scheduled", headers=h) as r:
                        sched = await r.text() if r.status == 200 else "[]"
                        if r.status not in (200, 404):
                            r.raise_for_status()
                    async with s.get(base + "/latest/meta-data/spot/instance-action", headers=h) as r:
                        action = await r.text() if r.status == 200 else None
                        if r.status not in (200, 404):
                            r.raise_for_status()
                    return [parse_aws(sched or "[]", action)]
                if self.cloud == "gce":
                    base = (self.base or GCE_BASE) + "/computeMetadata/v1/instance/"
                    h = {"Metadata-Flavor": "Google"}
                    async with s.get(base + "maintenance-event", headers=h) as r:
                        r.raise_for_status()
                        ev = await r.text()
                    async with s.get(base + "preempted", headers=h) as r:
                        pre = await r.text() if r.status == 200 else "FALSE"
                    return [parse_gce(ev, pre)]
        except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
            # an unreachable metadata service is not a maintenance event; say so, keep status False
            return [Finding(MAINTENANCE, False, "MetadataUnavailable",
                            f"{self.cloud} metadata service: {type(exc).__name__}: {exc}"[:300])]
        raise ValueError(f"unknown cloud {self.cloud!r}")
