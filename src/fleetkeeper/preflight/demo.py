"""``make demo``: a burst of new nodes registers without the preflight taint;
the join-gate webhook gates each in the same write; simulated test pods run;
the healthy ones are released, one with a failing NCCL check stays out."""

from __future__ import annotations

import asyncio
import copy
import time

from fleetkeeper.core import errors
from fleetkeeper.core.domain import GPU_RESOURCE, HOSTNAME_LABEL, INSTANCE_TYPE_LABEL, ZONE_LABEL
from fleetkeeper.core.faults import FaultPlan, default_fault_file, parse_fault
from fleetkeeper.core.kube import MUTATING_WEBHOOKS, NODES
from fleetkeeper.core.outcome import Outcome
from fleetkeeper.core.webhook import WebhookServer
from fleetkeeper.preflight.config import WebhookConfig
from fleetkeeper.preflight.keys import KWOK_NODE_ANNOTATION, Keys
from fleetkeeper.preflight.webhook import WEBHOOK_NAME, gate_node, gate_registration, self_signed

DEMO_LABEL = "fleetkeeper.io/preflight-demo"
CONFIG = "fleetkeeper-preflight-demo-gate"
BURST = 12
# how long the scenario waits for the gate: a bound for a stuck gate, not a speed test (the time taken is
# reported; bench/ measures it). Inside the runner's own per-scenario limit (300 s and up).
WAIT_S = 240.0


def _new_node(template: dict, name: str) -> dict:
    """A fresh node like an existing GPU node of the demo cluster, as a kubelet without
    --register-with-taints would register it."""
    meta = template["metadata"]
    labels = {k: v for k, v in (meta.get("labels") or {}).items()}
    labels.update({HOSTNAME_LABEL: name, DEMO_LABEL: "burst"})
    return {"apiVersion": "v1", "kind": "Node",
            "metadata": {"name": name, "labels": labels, "annotations": {KWOK_NODE_ANNOTATION: "fake"}},
            "spec": {}, "status": copy.deepcopy({k: v for k, v in (template.get("status") or {}).items()
                                                 if k in ("capacity", "allocatable", "nodeInfo")})}


def _state(node: dict, keys: Keys) -> str:
    """Where a node stands, for a scenario that missed: its taints, gate label and annotations, Ready."""
    meta = node["metadata"]
    ann = meta.get("annotations") or {}
    taints = ", ".join(f"{t['key']}={t.get('value', '')}:{t['effect']}" for t in (node.get("spec") or {}).get("taints")
                       or []) or "none"
    ready = next((c.get("status") for c in (node.get("status") or {}).get("conditions") or []
                  if c.get("type") == "Ready"), "?")
    marks = {k.rsplit("/", 1)[-1]: v for k, v in ann.items() if "preflight" in k or "lifecycle" in k}
    return (f"{meta['name']} Ready={ready} taints ({taints}) {keys.gate}={(meta.get('labels') or {}).get(keys.gate)}"
            f" {marks}")


async def demo(ctx) -> Outcome:
    kube, keys = ctx.kube, Keys(ctx.names)
    outcome = Outcome()
    nodes, _ = await kube.list(NODES, label_selector=f"{ctx.names.pool}=gpu")
    template = next((n for n in nodes if (n.get("status") or {}).get("allocatable", {}).get(GPU_RESOURCE)), None)
    if template is None:
        ctx.report("no GPU node to model new nodes on; skipped")
        return Outcome.skip("no GPU node to model new nodes on")
    import tempfile
    from pathlib import Path

    cert, key, ca = self_signed(Path(tempfile.mkdtemp(prefix="fk-pf-demo-")), ["127.0.0.1"])
    server = WebhookServer(str(cert), str(key), host="127.0.0.1", port=0)
    server.add(WEBHOOK_NAME, lambda req: gate_node(req, keys, {}))
    await server.start()
    names = [f"preflight-demo-{i:03d}" for i in range(BURST)]
    bad = names[3]
    plan = FaultPlan(default_fault_file())
    try:
        reg = gate_registration(WebhookConfig(failure_policy="Fail"), ca, url=server.url(WEBHOOK_NAME),
                                config_name=CONFIG, object_selector={"matchLabels": {DEMO_LABEL: "burst"}})
        await kube.apply(MUTATING_WEBHOOKS, reg)
        ctx.report(f"join-gate webhook registered (Node CREATE, failurePolicy Fail) at {server.url(WEBHOOK_NAME)}")
        plan.inject(bad, parse_fault("validation:nccl"))
        ctx.report(f"fault plan: {bad} will fail its NCCL all-reduce check")
        await asyncio.sleep(1.5)  # the API server loads new webhook configurations asynchronously
        t0 = time.monotonic()
        created = await asyncio.gather(*(kube.create(NODES, _new_node(template, n)) for n in names))
        gated = sum(1 for o in created if any(t["key"] == keys.gate for t in (o.get("spec") or {}).get("taints") or []))
        outcome.expect(gated == BURST, "every joining node is gated by the webhook", f"{gated}/{BURST}")
        ctx.report(f"{BURST} nodes registered WITHOUT the preflight taint; {gated}/{BURST} came back from the API "
                   f"server already tainted+labelled {keys.gate}=pending (no window for a pod)")
        deadline = time.monotonic() + WAIT_S
        released: set[str] = set()
        failed_state = None
        while time.monotonic() < deadline:
            cur, _ = await kube.list(NODES, label_selector=f"{DEMO_LABEL}=burst")
            released = {n["metadata"]["name"] for n in cur
                        if not any(t["key"] == keys.gate for t in (n.get("spec") or {}).get("taints") or [])}
            b = next((n for n in cur if n["metadata"]["name"] == bad), None)
            ann = (b or {}).get("metadata", {}).get("annotations") or {}
            if len(released) >= BURST - 1 and ann.get(keys.failed_check):
                failed_state = ann
                break
            await asyncio.sleep(0.5)
        ctx.report(f"{len(released)}/{BURST} released after passing validation in {time.monotonic() - t0:.1f}s "
                   f"(signed reports verified; taint and label removed in one patch)")
        if not outcome.expect(len(released) == BURST - 1 and bad not in released,
                              "every good node released, the faulty one kept out", f"{len(released)}/{BURST} released"):
            for n in cur:
                if n["metadata"]["name"] not in released and n["metadata"]["name"] != bad:
                    ctx.report(f"not released: {_state(n, keys)}")
        if outcome.expect(failed_state, f"{bad}'s failed check recorded"):
            ctx.report(f"{bad} stays out: {keys.gate}=failed, failing check {failed_state.get(keys.failed_check)}, "
                       f"attempt {failed_state.get(keys.attempts)}, retried with backoff "
                       f"(see: fleetkeeper explain node {bad})")
        else:
            ctx.report(f"{bad}: no failure recorded within {WAIT_S:.0f}s (is the preflight controller running?)")
        sample = next((n for n in names if n in released), None)
        if sample:
            from fleetkeeper.preflight.explain import explain_node

            lines = await explain_node(kube, ctx.names, sample)
            ctx.report(f"explain {sample}: " + " | ".join(" ".join(ln.split()) for ln in lines[:4]))
    finally:
        plan.clear(bad)
        try:
            await kube.delete(MUTATING_WEBHOOKS, CONFIG)
        except errors.NotFound:
            pass
        await server.stop()
        for n in names:
            try:
                await kube.delete(NODES, n)
            except errors.FleetkeeperError:
                pass
        ctx.report(f"demo nodes removed ({ZONE_LABEL}/{INSTANCE_TYPE_LABEL} copied from {template['metadata']['name']})")
    return outcome
