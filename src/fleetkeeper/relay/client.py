"""``RelayClient``: how a node agent reads its node's view from the relay.

    client = RelayClient("https://relay.fleetkeeper-system:8081", node, token_file=TOKEN)
    async for state in client.sync():       # a NodeState after every change
        apply(state.node, state.pods, state.teams)

``sync`` relists the view (one request) at start and whenever the relay
answers 410 Gone (a relay restart, a trimmed history, a dropped slow
watcher), and otherwise resumes its watch from the last resourceVersion seen
(events or bookmarks), so a reconnect costs nothing. It never talks to the
API server.
"""

from __future__ import annotations

import asyncio
import logging
import random
import ssl
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import quote

import aiohttp
import orjson

from fleetkeeper.core import errors

log = logging.getLogger("fleetkeeper.relay.client")


class RelayGone(errors.FleetkeeperError):
    """The relay cannot resume from our resourceVersion: relist."""


@dataclass
class NodeState:
    resource_version: str = ""
    node: dict | None = None
    pods: dict[str, dict] = field(default_factory=dict)  # "namespace/name" -> pod
    teams: dict | None = None
    relists: int = 0
    events: int = 0

    def pod_items(self) -> list[dict]:
        return [self.pods[k] for k in sorted(self.pods)]


def apply_event(state: NodeState, ev: dict) -> bool:
    """Apply one watch event to ``state``; True when it changed something."""
    typ, kind, obj = ev.get("type"), ev.get("kind"), ev.get("object")
    if ev.get("resourceVersion"):
        state.resource_version = ev["resourceVersion"]
    if typ == "BOOKMARK":
        return False
    state.events += 1
    if kind == "Pod":
        key = f"{obj['namespace']}/{obj['name']}"
        if typ == "DELETED":
            return state.pods.pop(key, None) is not None
        state.pods[key] = obj
        return True
    if kind == "Node":
        state.node = None if typ == "DELETED" else obj
        return True
    if kind == "TeamConfig":
        state.teams = None if typ == "DELETED" else obj
        return True
    return False


class RelayClient:
    def __init__(self, base_url: str, node: str, *, token: str | None = None, token_file: str | Path | None = None,
                 ca_file: str | None = None, session: aiohttp.ClientSession | None = None,
                 request_timeout: float = 10.0, watch_timeout: int = 300):
        self.base = base_url.rstrip("/")
        self.node = node
        self._token = token
        self._token_file = Path(token_file) if token_file else None
        self._ssl = ssl.create_default_context(cafile=ca_file) if ca_file else None
        self._session = session
        self._own = session is None
        self.request_timeout = request_timeout
        self.watch_timeout = watch_timeout
        self._path = f"/v1/nodes/{quote(node, safe='')}"

    def _headers(self) -> dict[str, str]:
        token = self._token
        if self._token_file is not None:
            token = self._token_file.read_text().strip()  # projected tokens rotate: read every time
        return {"Authorization": f"Bearer {token}"} if token else {}

    def _s(self) -> aiohttp.ClientSession:
        if self._session is None:
            self._session = aiohttp.ClientSession()
        return self._session

    async def close(self) -> None:
        if self._session is not None and self._own:
            await self._session.close()
            self._session = None

    async def __aenter__(self) -> "RelayClient":
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def _get(self, path: str) -> dict:
        url = self.base + path
        try:
            async with self._s().get(url, headers=self._headers(), ssl=self._ssl,
                                     timeout=aiohttp.ClientTimeout(total=self.request_timeout)) as resp:
                raw = await resp.read()
                if resp.status == 410:
                    raise RelayGone(raw.decode(errors="replace")[:300])
                if resp.status >= 400:
                    try:
                        body = orjson.loads(raw)
                    except orjson.JSONDecodeError:
                        body = {"message": raw.decode(errors="replace")[:300]}
                    raise errors.api_error(resp.status, body)
                return orjson.loads(raw)
        except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
            raise errors.ApiUnreachable(f"relay {url}: {exc or type(exc).__name__}") from exc

    # --- snapshots ----------------------------------------------------------------
    async def node_object(self) -> dict:
        return (await self._get(self._path))["object"]

    async def pods(self) -> dict:
        """``{"resourceVersion", "items": [...]}``."""
        return await self._get(self._path + "/pods")

    async def teams(self) -> dict:
        return (await self._get("/v1/config/teams"))["object"]

    async def view(self) -> NodeState:
        doc = await self._get(self._path + "/view")
        return NodeState(doc["resourceVersion"], doc.get("node"),
                         {f"{p['namespace']}/{p['name']}": p for p in doc.get("pods") or []}, doc.get("teams"))

    # --- watching -----------------------------------------------------------------
    async def watch(self, resource_version: str | None = None,
                    timeout_seconds: int | None = None) -> AsyncIterator[dict]:
        """Yield raw events (dicts) of one watch request; raises :class:`RelayGone` on 410."""
        params = {"timeoutSeconds": str(timeout_seconds or self.watch_timeout)}
        if resource_version:
            params["resourceVersion"] = resource_version
        url = self.base + self._path + "/watch"
        try:
            async with self._s().get(url, params=params, headers=self._headers(), ssl=self._ssl,
                                     timeout=aiohttp.ClientTimeout(total=None, sock_connect=self.request_timeout,
                                                                   sock_read=max(60.0, (timeout_seconds or
                                                                                        self.watch_timeout) + 30))
                                     ) as resp:
                if resp.status == 410:
                    raise RelayGone((await resp.text())[:300])
                if resp.status >= 400:
                    raw = await resp.read()
                    try:
                        body = orjson.loads(raw)
                    except orjson.JSONDecodeError:
                        body = {"message": raw.decode(errors="replace")[:300]}
                    raise errors.api_error(resp.status, body)
                async for line in resp.content:
                    if not line.strip():
                        continue
                    ev = orjson.loads(line)
                    if ev.get("type") == "ERROR":
                        obj = ev.get("object") or {}
                        if obj.get("code") == 410:
                            raise RelayGone(obj.get("message", "expired"))
                        raise errors.api_error(int(obj.get("code") or 500), obj)
                    yield ev
        except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
            raise errors.ApiUnreachable(f"relay watch {url}: {exc or type(exc).__name__}") from exc

    async def sync(self, *, max_backoff: float = 30.0) -> AsyncIterator[NodeState]:
        """Keep a :class:`NodeState` current; yield it after the first list and
        after every change. Runs until cancelled."""
        state: NodeState | None = None
        backoff = 0.5
        relists = 0
        while True:
            try:
                if state is None:
                    state = await self.view()
                    relists += 1
                    state.relists = relists
                    backoff = 0.5
                    yield state
                async for ev in self.watch(state.resource_version):
                    if apply_event(state, ev):
                        yield state
                    backoff = 0.5
            except RelayGone as exc:
                log.info("relay: %s; relisting node %s", exc, self.node)
                state = None
            except (errors.ApiUnreachable, errors.ServerError) as exc:
                delay = backoff * random.uniform(0.5, 1.5)  # jitter: thousands of agents reconnect
                log.warning("relay unreachable (%s); retrying in %.1fs", exc, delay)
                await asyncio.sleep(delay)
                backoff = min(backoff * 2, max_backoff)
