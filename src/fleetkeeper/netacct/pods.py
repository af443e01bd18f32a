"""Where the agent learns the pods of its node.

The agent never watches the API server: 7,500 nodes each holding a pod watch
would load it for nothing. Instead it reads a per-node view, either from a
file that a kubelet-side helper or a relay writes, or from the caching relay
over HTTP (``GET {relay}/v1/nodes/{node}/pods``). Both give
``{"items": [{"namespace", "name", "ip", "labels", "annotations"}]}``.

A source that fails raises :class:`Temporary`; the agent then keeps the rules
it has (a relay outage must never wipe a node's accounting).
"""

from __future__ import annotations

import ipaddress
import json
import logging
import random
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import quote

import aiohttp

from fleetkeeper.core.domain import Names
from fleetkeeper.core.config import parse_yaml
from fleetkeeper.core.errors import ConfigError, Temporary

log = logging.getLogger("fleetkeeper.netacct")

# DNS-1123 label (namespaces) / subdomain (pod names); label values (team)
_NS_RE = re.compile(r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$")
_POD_RE = re.compile(r"^[a-z0-9]([-a-z0-9.]{0,251}[a-z0-9])?$")
_LABEL_VALUE_RE = re.compile(r"^([A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?)?$")


@dataclass(frozen=True)
class PodInfo:
    namespace: str
    name: str
    ip: str
    team: str = ""
    annotations: dict[str, str] = field(default_factory=dict, hash=False, compare=True)

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.name}"


class PodSource(Protocol):
    async def list(self) -> list[PodInfo]:
        """The node's pods with an IPv4 pod IP; raises Temporary when unavailable."""


@dataclass
class ParseResult:
    pods: list[PodInfo]
    skipped: list[tuple[str, str]]  # (where, why)


def parse_items(doc: Any, names: Names) -> ParseResult:
    """Turn the per-node JSON view into PodInfos. Bad entries are skipped with a
    reason (never fatal: one broken entry must not stop accounting for the rest)."""
    if not isinstance(doc, dict) or not isinstance(doc.get("items"), list):
        raise ValueError('expected an object {"items": [...]}')
    pods: list[PodInfo] = []
    skipped: list[tuple[str, str]] = []
    seen_ip: dict[str, str] = {}
    for i, item in enumerate(doc["items"]):
        where = f"items[{i}]"
        if not isinstance(item, dict):
            skipped.append((where, "not an object"))
            continue
        ns, name, ip = item.get("namespace"), item.get("name"), item.get("ip")
        if isinstance(ns, str) and isinstance(name, str):
            where = f"{ns}/{name}"
        if not isinstance(ns, str) or not _NS_RE.match(ns):
            skipped.append((where, f"namespace {ns!r} is not a DNS-1123 label"))
            continue
        if not isinstance(name, str) or not _POD_RE.match(name):
            skipped.append((where, f"name {name!r} is not a DNS-1123 subdomain"))
            continue
        if not ip:
            skipped.append((where, "no pod IP yet"))
            continue
        try:
            addr = ipaddress.ip_address(str(ip))
        except ValueError:
            skipped.append((where, f"ip {ip!r} is not an IP address"))
            continue
        if addr.version != 4:
            skipped.append((where, f"ip {ip} is IPv6; only IPv4 is accounted"))
            continue
        labels = item.get("labels") or {}
        annotations = item.get("annotations") or {}
        if not isinstance(labels, dict) or not isinstance(annotations, dict):
            skipped.append((where, "labels and annotations must be objects"))
            continue
        team = labels.get(names.team, "")
        if not isinstance(team, str) or not _LABEL_VALUE_RE.match(team):
            skipped.append((where, f"team label {team!r} is not a valid label value"))
            continue
        if str(addr) in seen_ip:
            skipped.append((where, f"ip {addr} is also used by {seen_ip[str(addr)]} (host-network pod?)"))
            continue
        seen_ip[str(addr)] = where
        pods.append(PodInfo(ns, name, str(addr), team,
                            {str(k): str(v) for k, v in annotations.items()}))
    return ParseResult(pods, skipped)


def _log_skipped(skipped: list[tuple[str, str]]) -> None:
    for where, why in skipped:
        log.debug("pod %s not accounted: %s", where, why)


class FilePodSource:
    """A JSON or YAML file with the per-node view (written atomically by its producer)."""

    def __init__(self, path: Path, names: Names):
        self.path = path
        self.names = names
        self.last_skipped: list[tuple[str, str]] = []

    async def list(self) -> list[PodInfo]:
        try:
            text = self.path.read_text()
        except OSError as exc:
            raise Temporary(f"pod file {self.path}: {exc.strerror or exc}", delay=5) from None
        try:
            doc = json.loads(text) if self.path.suffix == ".json" else parse_yaml(text, str(self.path))
            res = parse_items(doc, self.names)
        except (ValueError, ConfigError) as exc:
            raise Temporary(f"pod file {self.path}: {exc}", delay=5) from None
        self.last_skipped = res.skipped
        _log_skipped(res.skipped)
        return res.pods


def retry_delay(status: int, retry_after: str | None, u: float | None = None) -> float:
    """Seconds before asking the relay again: its Retry-After on a 503 (it is behind), spread over
    [Retry-After, 2 x Retry-After) so a fleet of agents does not come back at once; else 5 s."""
    if status == 503 and retry_after:
        try:
            ra = float(retry_after)
        except ValueError:
            ra = 0.0
        if ra > 0:
            return ra * (1.0 + (random.random() if u is None else u))
    return 5.0


class HttpPodSource:
    """The caching relay's per-node view: ``GET {relay}/v1/nodes/{node}/pods``."""

    def __init__(self, relay_url: str, node: str, names: Names, *, timeout_s: float = 5.0,
                 session: aiohttp.ClientSession | None = None):
        self.url = f"{relay_url.rstrip('/')}/v1/nodes/{quote(node, safe='')}/pods"
        self.names = names
        self.timeout = aiohttp.ClientTimeout(total=timeout_s)
        self._session = session
        self._own_session = session is None
        self.last_skipped: list[tuple[str, str]] = []

    async def list(self) -> list[PodInfo]:
        if self._session is None:
            self._session = aiohttp.ClientSession()
        try:
            async with self._session.get(self.url, timeout=self.timeout) as resp:
                if resp.status != 200:
                    body = (await resp.text())[:200]
                    raise Temporary(f"relay {self.url}: HTTP {resp.status}: {body}",
                                    delay=retry_delay(resp.status, resp.headers.get("Retry-After")))
                doc = json.loads(await resp.read())
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise Temporary(f"relay {self.url}: {exc.__class__.__name__}: {exc}", delay=5) from None
        except ValueError as exc:
            raise Temporary(f"relay {self.url}: not JSON: {exc}", delay=5) from None
        try:
            res = parse_items(doc, self.names)
        except ValueError as exc:
            raise Temporary(f"relay {self.url}: {exc}", delay=5) from None
        self.last_skipped = res.skipped
        _log_skipped(res.skipped)
        return res.pods

    async def close(self) -> None:
        if self._session is not None and self._own_session:
            await self._session.close()
            self._session = None


class StaticPodSource:
    """A fixed list (tests, the demo and ``sync --dry-run`` use it)."""

    def __init__(self, pods: list[PodInfo]):
        self.pods = list(pods)

    async def list(self) -> list[PodInfo]:
        return list(self.pods)
