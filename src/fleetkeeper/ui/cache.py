"""A read-only :class:`~fleetkeeper.core.kube.Kube` over informer caches.

The map answers "explain" with the same code as ``fleetkeeper explain``; that
code reads through ``kube.get`` / ``get_or_none`` / ``list``. Here those verbs
read the informers the map already keeps, so a browser's click never becomes
a request to the API server. A resource that is not cached, or a write, raises
:class:`CacheMiss` (a :class:`~fleetkeeper.core.errors.Terminal`), which the
explain code reports as "could not explain" for that part.

Objects are kept slim (no managedFields, no image lists), in the API's own
shape, and handed out as they are stored: callers must not modify them.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from fleetkeeper.core import errors
from fleetkeeper.core.informer import Informer
from fleetkeeper.core.kube import Resource


class CacheMiss(errors.Terminal):
    """The map's caches do not hold what was asked (it never asks the API server)."""


# --- slim projections (the API's shape, less what nothing reads) ---------------------------
def slim(obj: dict) -> dict:
    meta = dict(obj.get("metadata") or {})
    meta.pop("managedFields", None)
    out = {k: v for k, v in obj.items() if k != "metadata"}
    out["metadata"] = meta
    st = out.get("status")
    if isinstance(st, dict) and ("images" in st or "nodeInfo" in st):
        out["status"] = {k: v for k, v in st.items() if k not in ("images", "nodeInfo", "daemonEndpoints")}
    return out


# --- selectors --------------------------------------------------------------------------
_SET = re.compile(r"^\s*(!?)([^\s!=,()]+)\s+(in|notin)\s+\(([^)]*)\)\s*$")


def _split(selector: str) -> list[str]:
    """Split on commas outside parentheses."""
    parts, depth, cur = [], 0, ""
    for ch in selector:
        if ch == "(":
            depth += 1
        elif ch == ")":
            depth -= 1
        if ch == "," and depth == 0:
            parts.append(cur)
            cur = ""
        else:
            cur += ch
    if cur.strip():
        parts.append(cur)
    return [p.strip() for p in parts if p.strip()]


def label_matcher(selector: str | None) -> Callable[[dict[str, str]], bool]:
    """A predicate over labels for a Kubernetes label selector (equality- and set-based)."""
    if not selector:
        return lambda labels: True
    tests: list[Callable[[dict[str, str]], bool]] = []
    for req in _split(selector):
        m = _SET.match(req)
        if m:
            key, op, values = m.group(2), m.group(3), {v.strip() for v in m.group(4).split(",") if v.strip()}
            if op == "in":
                tests.append(lambda l, k=key, vs=values: l.get(k) in vs)
            else:
                tests.append(lambda l, k=key, vs=values: l.get(k) not in vs)
        elif "!=" in req:
            k, v = (s.strip() for s in req.split("!=", 1))
            tests.append(lambda l, k=k, v=v: l.get(k) != v)
        elif "=" in req:
            k, v = (s.strip() for s in req.replace("==", "=").split("=", 1))
            tests.append(lambda l, k=k, v=v: l.get(k) == v)
        elif req.startswith("!"):
            tests.append(lambda l, k=req[1:].strip(): k not in l)
        else:
            tests.append(lambda l, k=req: k in l)
    return lambda labels: all(t(labels) for t in tests)


def _field(obj: dict, path: str) -> str:
    cur: Any = obj
    for part in path.split("."):
        if not isinstance(cur, dict):
            return ""
        cur = cur.get(part)
    if cur is None:
        return ""
    return cur if isinstance(cur, str) else str(cur)


def field_matcher(selector: str | None) -> Callable[[dict], bool]:
    """A predicate over objects for a field selector (``a.b=v``, ``a.b==v``, ``a.b!=v``)."""
    if not selector:
        return lambda obj: True
    tests: list[Callable[[dict], bool]] = []
    for req in _split(selector):
        if "!=" in req:
            k, v = (s.strip() for s in req.split("!=", 1))
            tests.append(lambda o, k=k, v=v: _field(o, k) != v)
        elif "=" in req:
            k, v = (s.strip() for s in req.replace("==", "=").split("=", 1))
            tests.append(lambda o, k=k, v=v: _field(o, k) == v)
        else:
            raise errors.ConfigError("fieldSelector", [("", req, "expected field=value or field!=value")])
    return lambda obj: all(t(obj) for t in tests)


# --- the client ---------------------------------------------------------------------------
class Frozen:
    """What an informer held at one moment (the same objects, which informers replace and never
    modify), so a heavy read can run off the event loop while the informer goes on."""

    def __init__(self, inf: Informer):
        keys = inf.keys()
        self._d = dict(zip(keys, inf.items()))
        self.resource_version = inf.resource_version
        self.synced = inf.synced

    def get(self, key: str) -> Any:
        return self._d.get(key)

    def items(self) -> list:
        return list(self._d.values())

    def keys(self) -> list[str]:
        return list(self._d)


@dataclass(frozen=True)
class Source:
    """An informer and what it covers: one namespace (None: all, or cluster-scoped) and the
    objects matching its label selector (None: all)."""

    informer: Informer
    namespace: str | None = None
    label_selector: str | None = None

    def serves(self, namespace: str | None, label_selector: str | None) -> bool:
        if self.namespace is not None and namespace != self.namespace:
            return False
        if self.label_selector is None:
            return True
        return set(_split(self.label_selector)) <= set(_split(label_selector or ""))


class CachedKube:
    """``get`` / ``get_or_none`` / ``list`` of :class:`Kube`, answered from informers
    (``sources``: per resource, the informers that hold it and what each covers)."""

    def __init__(self, sources: dict[Resource, list[Source]]):
        self.sources = sources

    def frozen(self) -> "CachedKube":
        """A copy over what every informer holds now (cheap: the objects are shared)."""
        return CachedKube({res: [Source(Frozen(s.informer), s.namespace, s.label_selector) for s in srcs]  # type: ignore[arg-type]
                           for res, srcs in self.sources.items()})

    def _source(self, res: Resource, namespace: str | None, label_selector: str | None = None) -> Informer:
        for src in self.sources.get(res, ()):
            if src.serves(namespace, label_selector):
                return src.informer
        raise CacheMiss(f"{res.plural}.{res.group or 'core'}"
                        f"{' in namespace ' + namespace if namespace else ''}"
                        f"{' with ' + label_selector if label_selector else ''} is not cached by the fleet map")

    async def get(self, res: Resource, name: str, namespace: str | None = None) -> dict:
        obj = self._source(res, namespace, None).get(f"{namespace}/{name}" if res.namespaced else name)
        if obj is None:
            raise errors.NotFound(f"{res.plural} {namespace + '/' if namespace else ''}{name} not found")
        return obj

    async def get_or_none(self, res: Resource, name: str, namespace: str | None = None) -> dict | None:
        try:
            return await self.get(res, name, namespace)
        except errors.NotFound:
            return None

    def select(self, res: Resource, namespace: str | None = None, *, label_selector: str | None = None,
               field_selector: str | None = None) -> Iterable[dict]:
        inf = self._source(res, namespace, label_selector)
        lm, fm = label_matcher(label_selector), field_matcher(field_selector)
        for obj in inf.items():
            meta = obj.get("metadata") or {}
            if namespace and res.namespaced and meta.get("namespace") != namespace:
                continue
            if lm(meta.get("labels") or {}) and fm(obj):
                yield obj

    async def list(self, res: Resource, namespace: str | None = None, *, label_selector: str | None = None,
                   field_selector: str | None = None, page_size: int = 500,
                   resource_version: str | None = None) -> tuple[list[dict], str]:
        items = list(self.select(res, namespace, label_selector=label_selector, field_selector=field_selector))
        return items, self._source(res, namespace, label_selector).resource_version

    def __getattr__(self, verb: str) -> Any:
        if verb in ("create", "patch", "apply", "replace", "delete", "evict", "watch", "list_pages", "request"):
            async def refuse(*args: Any, **kwargs: Any) -> Any:
                raise CacheMiss(f"the fleet map is read-only and never calls the API server ({verb})")
            return refuse
        raise AttributeError(verb)
