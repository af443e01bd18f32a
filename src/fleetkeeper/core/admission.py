"""Admission types: the request a webhook handler reads and the answer it
gives. Pure (no I/O), so handlers that decide admission import only this;
:mod:`fleetkeeper.core.webhook` serves them over HTTPS.
"""

from __future__ import annotations

import base64
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import orjson


@dataclass(frozen=True)
class AdmissionRequest:
    uid: str
    kind: str  # Pod, Node
    operation: str  # CREATE, UPDATE, ...
    namespace: str
    name: str
    username: str
    groups: tuple[str, ...]
    obj: dict
    old: dict | None
    dry_run: bool
    group: str = ""  # the API group of kind ("" for the core group)

    @classmethod
    def from_review(cls, review: dict) -> "AdmissionRequest":
        r = review["request"]
        ui = r.get("userInfo") or {}
        obj = r.get("object") or {}
        return cls(
            uid=r["uid"], kind=(r.get("kind") or {}).get("kind", ""), operation=r.get("operation", ""),
            namespace=r.get("namespace", ""), name=r.get("name") or (obj.get("metadata") or {}).get("name", ""),
            username=ui.get("username", ""), groups=tuple(ui.get("groups") or ()), obj=obj,
            old=r.get("oldObject"), dry_run=bool(r.get("dryRun")), group=(r.get("kind") or {}).get("group", ""),
        )


@dataclass
class Admission:
    allowed: bool = True
    message: str = ""
    patch: list[dict] = field(default_factory=list)  # RFC 6902 JSON Patch
    warnings: list[str] = field(default_factory=list)
    code: int = 403

    def response(self, uid: str) -> dict:
        resp: dict[str, Any] = {"uid": uid, "allowed": self.allowed}
        if not self.allowed:
            resp["status"] = {"code": self.code, "message": self.message, "reason": "Forbidden"}
        if self.patch:
            resp["patchType"] = "JSONPatch"
            resp["patch"] = base64.b64encode(orjson.dumps(self.patch)).decode()
        if self.warnings:
            resp["warnings"] = self.warnings
        return {"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview", "response": resp}


Handler = Callable[[AdmissionRequest], "Admission | Awaitable[Admission]"]


def json_patch_path(*parts: str) -> str:
    """Escape path parts for RFC 6901 (``/`` and ``~`` in label keys)."""
    return "".join("/" + p.replace("~", "~0").replace("/", "~1") for p in parts)
