"""The explain answer: what ``fleetkeeper explain node|pod`` prints and the fleet
map shows when a node is clicked or a pod searched. One implementation, over any
client with the read verbs of :class:`fleetkeeper.core.kube.Kube` (``get``,
``get_or_none``, ``list``): the live API server for the CLI, the map's informer
caches for the web page (:class:`fleetkeeper.ui.cache.CachedKube`).

Each component contributes through ``<pkg>.explain:explain_node(kube, names,
node)`` / ``explain_pod(kube, names, namespace, name)``; the packages are passed
in (the CLI's component registry), so this module imports no component.
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from typing import Any

from fleetkeeper.core import errors
from fleetkeeper.core.domain import Names
from fleetkeeper.core.kube import NODES, PODS

Sections = list[tuple[str, list[str]]]


def _optional(module: str) -> Any | None:
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as exc:
        if exc.name == module:
            return None
        raise


def _node_lines(node: dict) -> list[str]:
    spec = node.get("spec") or {}
    lines = [f"taint {t['key']}={t.get('value', '')}:{t['effect']}" for t in spec.get("taints") or []]
    if spec.get("unschedulable"):
        lines.append("cordoned (spec.unschedulable)")
    for c in (node.get("status") or {}).get("conditions") or []:
        if (c["type"] == "Ready") != (c["status"] == "True") or c["type"] not in (
                "Ready", "MemoryPressure", "DiskPressure", "PIDPressure", "NetworkUnavailable"):
            lines.append(f"condition {c['type']}={c['status']} {c.get('reason', '')}: {c.get('message', '')}")
    return lines or ["no taints, no abnormal conditions: generally schedulable"]


def _pod_lines(pod: dict) -> list[str]:
    st = pod.get("status") or {}
    lines = [f"phase {st.get('phase')} on node {(pod.get('spec') or {}).get('nodeName') or '(not scheduled)'}"]
    for c in st.get("conditions") or []:
        if c.get("status") != "True":
            lines.append(f"{c['type']}={c['status']} {c.get('reason', '')}: {c.get('message', '')}")
    return lines


async def explain(kube: Any, names: Names, kind: str, target: str, components: Mapping[str, str]) -> Sections:
    """Sections (title, lines) for ``node NAME`` or ``pod NAMESPACE/NAME``; a target
    that does not exist is a :class:`errors.ConfigError` naming it."""
    if kind == "node":
        node = await kube.get_or_none(NODES, target)
        if node is None:
            raise errors.ConfigError("explain", [("node", target, "no such node")])
        sections: Sections = [("node", _node_lines(node))]
        args: tuple[str, ...] = (target,)
    elif kind == "pod":
        if "/" not in target:
            raise errors.ConfigError("explain", [("pod", target, "expected NAMESPACE/NAME")])
        ns, name = target.split("/", 1)
        pod = await kube.get_or_none(PODS, name, ns)
        if pod is None:
            raise errors.ConfigError("explain", [("pod", target, "no such pod")])
        sections = [("pod", _pod_lines(pod))]
        args = (ns, name)
    else:
        raise errors.ConfigError("explain", [("kind", kind, "expected node or pod")])
    for comp, pkg in components.items():
        mod = _optional(f"{pkg}.explain")
        fn = getattr(mod, f"explain_{kind}", None) if mod is not None else None
        if fn is None:
            continue
        try:
            lines = await fn(kube, names, *args)
        except errors.FleetkeeperError as exc:
            lines = [f"(could not explain: {exc})"]
        if lines:
            sections.append((comp, lines))
    return sections
