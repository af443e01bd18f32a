"""``fleetkeeper explain node NAME``: the preflight view of a node."""

from __future__ import annotations

import json
import time

from fleetkeeper.core.domain import Names
from fleetkeeper.core.kube import NODES, PODS, Kube
from fleetkeeper.preflight import history
from fleetkeeper.preflight.keys import FAILED, Keys


def _when(ts: object) -> str:
    try:
        t = float(ts)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return "?"
    return time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(t)) + "Z"


async def explain_node(kube: Kube, names: Names, node_name: str) -> list[str]:
    keys = Keys(names)
    node = await kube.get_or_none(NODES, node_name)
    if node is None:
        return []
    meta = node["metadata"]
    labels, ann = meta.get("labels") or {}, meta.get("annotations") or {}
    taint = next((t for t in (node.get("spec") or {}).get("taints") or [] if t["key"] == keys.gate), None)
    lines: list[str] = []
    label = labels.get(keys.gate)
    if taint or label:
        state = label or taint.get("value", "?")  # type: ignore[union-attr]
        lines.append(f"GATED ({keys.gate}={state}, taint {'present' if taint else 'MISSING'}): "
                     "not schedulable until it passes validation")
        if state == FAILED:
            lines.append(f"  failed attempts: {ann.get(keys.attempts, '?')}; failing check(s): "
                         f"{ann.get(keys.failed_check, '?')}")
            if ann.get(keys.retry_at):
                lines.append(f"  next attempt not before {_when(ann[keys.retry_at])}")
            else:
                lines.append("  no retries left: repair, then `fleetkeeper preflight retry NODE` starts a new cycle")
    else:
        lines.append("passed the preflight gate" if keys.validated_at in ann else "not gated")
    if keys.validated_at in ann:
        lines.append(f"last successful validation: {_when(ann[keys.validated_at])}")
    pods, _ = await kube.list(PODS, label_selector=f"{keys.pod_node}={node_name[:63]}")
    for p in pods:
        st = p.get("status") or {}
        lines.append(f"test pod {p['metadata']['namespace']}/{p['metadata']['name']} "
                     f"({p['metadata'].get('labels', {}).get(keys.pod_kind, '?')}): {st.get('phase', 'Pending')}")
    try:
        hist = json.loads(ann.get(keys.history) or "[]")
    except ValueError:
        hist = []
    if hist:
        lines.append(f"history (last {len(hist)}):")
        for h in reversed(hist):
            lines.append(f"  {_when(h.get('t'))} {h.get('k', '?'):8} {'PASS' if h.get('ok') else 'FAIL'} "
                         f"{h.get('p', '')} {h.get('s', '')}")
    uuids = [u for u in (ann.get(keys.gpus) or "").split(",") if u]
    if uuids:
        gh = await history.read(kube, uuids)
        lines.append(f"GPUs ({len(uuids)}), history by UUID (follows the hardware):")
        for u in uuids:
            es = gh.get(u, [])
            bad = [e for e in es if not e.get("ok")]
            last = es[-1] if es else None
            lines.append(f"  {u}: {len(es)} result(s), {len(bad)} failed"
                         + (f"; last {_when(last.get('t'))} on {last.get('n')} "
                            f"{'ok' if last.get('ok') else last.get('s')}" if last else ""))
    return lines
