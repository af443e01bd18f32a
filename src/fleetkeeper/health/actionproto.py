"""The node-local action protocol, pure (no I/O): the request and report
annotations and :func:`local_step`, the controller's next step. The agent's
side is :mod:`fleetkeeper.health.actions`."""

from __future__ import annotations

import json
import secrets
from dataclasses import dataclass

from fleetkeeper.core.domain import Names

# remedy -> the node-local action that performs it
LOCAL_ACTIONS = {"reset": "reset", "reboot": "reboot", "wait": "wait-maintenance"}


class ActionKeys:
    def __init__(self, names: Names):
        self.request = f"{names.domain}/action-request"
        self.result = f"{names.domain}/action-result"


@dataclass(frozen=True)
class Request:
    action: str
    nonce: str
    node: str
    uid: str
    at: float
    deadline: float
    gpu: str = "all"

    def dumps(self) -> str:
        return json.dumps(self.__dict__, separators=(",", ":"), sort_keys=True)

    @classmethod
    def loads(cls, raw: str | None) -> "Request | None":
        try:
            d = json.loads(raw or "")
            return cls(str(d["action"]), str(d["nonce"]), str(d["node"]), str(d["uid"]), float(d["at"]),
                       float(d["deadline"]), str(d.get("gpu", "all")))
        except (ValueError, KeyError, TypeError):
            return None


@dataclass(frozen=True)
class Report:
    nonce: str
    outcome: str  # succeeded | failed
    message: str
    at: float

    def dumps(self) -> str:
        return json.dumps(self.__dict__, separators=(",", ":"), sort_keys=True)

    @classmethod
    def loads(cls, raw: str | None) -> "Report | None":
        try:
            d = json.loads(raw or "")
            return cls(str(d["nonce"]), str(d["outcome"]), str(d.get("message", "")), float(d.get("at", 0)))
        except (ValueError, KeyError, TypeError):
            return None


def new_request(action: str, node: str, uid: str, now: float, timeout: float, gpu: str = "all") -> Request:
    return Request(action, secrets.token_hex(8), node, uid, now, now + timeout, gpu)


@dataclass(frozen=True)
class LocalStep:
    kind: str  # request | wait | escalate
    why: str
    requeue_after: float | None = None


def local_step(annotations: dict[str, str], keys: ActionKeys, remedy: str, node: str, uid: str,
               now: float) -> LocalStep | None:
    """What the controller does next for a drained node whose remedy is node-local (None: not node-local)."""
    action = LOCAL_ACTIONS.get(remedy)
    if action is None:
        return None
    req = Request.loads(annotations.get(keys.request))
    if req is None or req.uid != uid or req.node != node:
        return LocalStep("request", f"drained; asking the node's agent for a {action}")
    rep = Report.loads(annotations.get(keys.result))
    if rep is not None and rep.nonce == req.nonce:
        if rep.outcome != "succeeded":
            return LocalStep("escalate", f"{action} failed on the node: {rep.message}")
        if now >= req.deadline:
            return LocalStep("escalate", f"{action} done, but the fault did not clear by its deadline")
        return LocalStep("wait", f"{action} done; waiting for the fault to clear", max(0.5, req.deadline - now))
    if now >= req.deadline:
        return LocalStep("escalate", f"{action} requested but never reported back by its deadline")
    return LocalStep("wait", f"waiting for the agent to {action}", max(0.5, req.deadline - now))


