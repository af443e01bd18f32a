"""The test pod's report: a compact, signed JSON result that fits in a
termination message (the kubelet truncates those at 4096 bytes).

The signature is an HMAC-SHA256, keyed by a Secret only the controller and
its test pods can read, over (node, pod, nonce, result). The controller
accepts a report only if the signature holds AND the signed node is the
node the pod actually ran on AND the signed pod and nonce are that pod's, so
a pod cannot vouch for another node, and an old report cannot be replayed.
"""

from __future__ import annotations

import hashlib
import hmac
import json
from dataclasses import dataclass

from fleetkeeper.preflight.suite import CheckResult, SuiteResult

SCHEMA = 1
MAX_BYTES = 4000  # under the kubelet's 4096-byte termination-message cap
_STATUS = {"pass": (True, False), "fail": (False, False), "skip": (False, True)}


class ReportError(Exception):
    """The report is missing, malformed, too big, or does not verify."""


def _compact(result: SuiteResult, detail_len: int) -> dict:
    return {
        "p": result.profile, "ok": result.passed, "t0": round(result.started, 3), "dt": result.duration,
        "c": [[c.check, c.value, c.threshold, c.status, round(c.duration, 3), c.detail[:detail_len]]
              for c in result.checks],
        "g": result.gpus, "fg": result.failed_gpus,
    }


def _mac(key: bytes, node: str, pod: str, nonce: str, body: str) -> str:
    msg = f"v{SCHEMA}\n{node}\n{pod}\n{nonce}\n{body}".encode()
    return hmac.new(key, msg, hashlib.sha256).hexdigest()


def encode(result: SuiteResult, *, pod: str, nonce: str, key: bytes) -> str:
    """The termination message: compact JSON, signed, at most MAX_BYTES."""
    for detail_len in (160, 80, 40, 0):
        body = json.dumps(_compact(result, detail_len), separators=(",", ":"), sort_keys=True)
        msg = json.dumps({"v": SCHEMA, "node": result.node, "pod": pod, "nonce": nonce, "r": body,
                          "sig": _mac(key, result.node, pod, nonce, body)}, separators=(",", ":"))
        if len(msg.encode()) <= MAX_BYTES:
            return msg
    raise ReportError(f"result does not fit in {MAX_BYTES} bytes even without details")


@dataclass
class Verified:
    result: SuiteResult


def decode(message: str, *, key: bytes, node: str, pod: str, nonce: str) -> SuiteResult:
    """Parse and verify a termination message against the pod it came from."""
    if not message:
        raise ReportError("no termination message")
    try:
        outer = json.loads(message)
        body = outer["r"]
        if outer.get("v") != SCHEMA:
            raise ReportError(f"unknown report schema {outer.get('v')!r}")
        signed_node, signed_pod, signed_nonce, sig = outer["node"], outer["pod"], outer["nonce"], outer["sig"]
    except (ValueError, KeyError, TypeError) as exc:
        raise ReportError(f"malformed report: {exc}") from None
    if not hmac.compare_digest(_mac(key, signed_node, signed_pod, signed_nonce, body), str(sig)):
        raise ReportError("signature does not verify")
    if signed_node != node:
        raise ReportError(f"report is for node {signed_node!r} but the pod ran on {node!r}")
    if signed_pod != pod or signed_nonce != nonce:
        raise ReportError("report belongs to another test pod (pod name or nonce differ)")
    try:
        r = json.loads(body)
        checks = []
        for name, value, threshold, status, dur, detail in r["c"]:
            passed, skipped = _STATUS[status]
            checks.append(CheckResult(name, value, threshold, passed, skipped, dur, detail))
        return SuiteResult(node=node, profile=r["p"], passed=bool(r["ok"]), checks=checks, gpus=list(r["g"]),
                           failed_gpus=list(r["fg"]), started=float(r["t0"]), duration=float(r["dt"]))
    except (ValueError, KeyError, TypeError) as exc:
        raise ReportError(f"malformed result: {exc}") from None


def summary(result: SuiteResult) -> str:
    """One line: 'passed 10/12 (2 skipped)' or 'failed nccl (value 105.0 < 350.0)'."""
    ran = [c for c in result.checks if not c.skipped]
    skipped = len(result.checks) - len(ran)
    if result.passed:
        return f"passed {len(ran)} checks" + (f" ({skipped} skipped)" if skipped else "")
    bad = [c for c in result.checks if c.status == "fail"] or [c for c in result.checks if c.skipped]
    return "failed " + ", ".join(f"{c.check} ({c.value} vs {c.threshold}{': ' + c.detail if c.detail else ''})"
                                 for c in bad[:3])
