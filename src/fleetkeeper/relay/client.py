"""``RelayClient``: how a node agent reads its node's view from the relay.

    client = RelayClient("https://relay.fleetkeeper-system:8081", node, token_file=TOKEN)
    async for state in client.sync():       # a NodeState after every change
        apply(state.node, state.pods, state.teams)

``sync`` relists the view (one request) at start and whenever the relay
answers 410 Gone (a relay restart, a trimmed history, a dropped slow
watcher), and otherwise resumes its watch from the last resourceVersion seen
(events or bookmarks), so a reconnect costs nothing. It never talks to the
API server.

When the relay is busy it answers 503 with ``Retry-After``; the client waits
that long and up to twice it (spread at random), on the same connection. After
a failure it backs off exponentially with full jitter; after the relay
restarted (the watch broke, then the resume was refused) it relists after a
random delay within ``relist_spread`` seconds, so a fleet does not relist in
the same second (:mod:`fleetkeeper.relay.admission`).
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
from fleetkeeper.relay.admission import BackoffPolicy, relist_delay, request_timeout, retry_delay

log = logging.getLogger("fleetkeeper.relay.client")


class RelayGone(errors.FleetkeeperError):
    """The relay cannot resume from our resourceVersion: relist."""


class RelayBusy(errors.Temporary):
    """The relay answered 503 with Retry-After (``delay``, seconds): it is behind; ask again later."""


def _retry_after(resp: aiohttp.ClientResponse, body: dict) -> float:
    for raw in (resp.headers.get("Retry-After"), (body.get("details") or {}).get("retryAfterSeconds")):
        try:
            v = float(raw)  # type: ignore[arg-type]
        except (TypeError, ValueError):
            continue
        if v > 0:
            return v
    return 0.0


def _error(resp: aiohttp.ClientResponse, raw: bytes) -> errors.FleetkeeperError:
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError:
        body = {}
    if not isinstance(body, dict):
        body = {}
    body.setdefault("message", raw.decode(errors="replace")[:300])
    if resp.status == 503 and (delay := _retry_after(resp, body)):
        return RelayBusy(f"relay busy: {body.get('message', '')}", delay=delay)
    return errors.api_error(resp.status, body)


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
                 request_timeout: float = 10.0, watch_timeout: int = 300, backoff: BackoffPolicy | None = None,
                 rng: random.Random | None = None):
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
        self.backoff = backoff or BackoffPolicy()
        self._rng = rng or random.Random()
        self.retries = 0  # waits after a failure or a 503 (for benchmarks and tests)
        self.busy = 0  # 503 answers with Retry-After
        self._timeouts = 0  # requests in a row that got no answer in time (each waits longer)

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

    def _timeout(self) -> float:
        return request_timeout(self.request_timeout, self._timeouts, self.backoff)

    async def _get(self, path: str) -> dict:
        url = self.base + path
        try:
            async with self._s().get(url, headers=self._headers(), ssl=self._ssl,
                                     timeout=aiohttp.ClientTimeout(total=self._timeout())) as resp:
                raw = await resp.read()
                self._timeouts = 0  # answered
                if resp.status == 410:
                    raise RelayGone(raw.decode(errors="replace")[:300])
                if resp.status >= 400:
                    raise _error(resp, raw)
                return orjson.loads(raw)
        except asyncio.TimeoutError as exc:
            self._timeouts += 1
            raise errors.ApiUnreachable(f"relay {url}: no answer in time") from exc
        except aiohttp.ClientError as exc:
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
                                     timeout=aiohttp.ClientTimeout(total=None, sock_connect=self._timeout(),
                                                                   sock_read=max(60.0, (timeout_seconds or
                                                                                        self.watch_timeout) + 30))
                                     ) as resp:
                self._timeouts = 0  # answered
                if resp.status == 410:
                    raise RelayGone((await resp.text())[:300])
                if resp.status >= 400:
                    raise _error(resp, await resp.read())
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

    async def sync(self) -> AsyncIterator[NodeState]:
        """Keep a :class:`NodeState` current; yield it after the first list and
        after every change. Runs until cancelled."""
        state: NodeState | None = None
        failures = 0  # in a row, reset by any answer
        lost = False  # the relay went away since the last answer: a 410 now means it restarted
        relist_wait = 0.0
        relists = 0
        while True:
            try:
                if state is None:
                    if relist_wait:
                        await asyncio.sleep(relist_wait)
                        relist_wait = 0.0
                    state = await self.view()
                    relists += 1
                    state.relists = relists
                    failures, lost = 0, False
                    yield state
                async for ev in self.watch(state.resource_version):
                    failures, lost = 0, False
                    if apply_event(state, ev):
                        yield state
            except RelayGone as exc:
                relist_wait = relist_delay(lost, self._rng.random(), self.backoff)
                log.info("relay: %s; relisting node %s in %.1fs", exc, self.node, relist_wait)
                state, failures, lost = None, 0, False
            except RelayBusy as exc:
                failures += 1
                self.retries += 1
                self.busy += 1
                delay = retry_delay(failures, self._rng.random(), self.backoff, exc.delay)
                log.warning("relay busy (503, Retry-After %gs); retrying in %.1fs", exc.delay, delay)
                await asyncio.sleep(delay)
            except (errors.ApiUnreachable, errors.ServerError) as exc:
                failures += 1
                self.retries += 1
                lost = True
                delay = retry_delay(failures, self._rng.random(), self.backoff)  # jitter: thousands of agents
                log.warning("relay unreachable (%s); retrying in %.1fs", exc, delay)
                await asyncio.sleep(delay)
