"""The relay's state and fan-out, with no I/O.

Informer handlers feed the hub; the hub keeps, per node, the node's agent
view (its Node, its pods), a short history of serialised events and the
node's subscribers. An event touches exactly one node's entry: a pod update
is appended to that node's history and pushed to that node's subscribers
only (O(1) in the number of agents). The team configuration is the one
exception: it goes to every subscriber, and it changes rarely.

Resource versions
    The relay numbers every change it applies with its own sequence; a
    resourceVersion is ``"<epoch>-<seq>"`` where the epoch is drawn at start.
    A watcher resuming at ``R`` gets the node's events after ``R`` from the
    history; if the history no longer reaches back to ``R`` (trimmed, or
    another relay process: other epoch), the watch answers ``410 Gone`` and
    the agent relists its node view (one small request), exactly as a
    Kubernetes client relists its watch cache.

Slow subscribers
    Each subscriber has a bounded buffer. A subscriber whose buffer is full is
    dropped (its buffer freed); its stream ends with a 410 and it resumes by
    relisting its node view, so one stuck agent never holds relay memory.
"""

from __future__ import annotations

import asyncio
import secrets
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import orjson

from fleetkeeper.relay.views import AgentNode, AgentPod, TeamConfig

KIND_NODE = "Node"
KIND_POD = "Pod"
KIND_TEAMS = "TeamConfig"


class Gone(Exception):
    """The requested resourceVersion cannot be served: relist."""


def encode_event(typ: str, kind: str, rv: str, obj: Any) -> bytes:
    return orjson.dumps({"type": typ, "kind": kind, "resourceVersion": rv, "object": obj}) + b"\n"


def encode_bookmark(rv: str) -> bytes:
    return orjson.dumps({"type": "BOOKMARK", "resourceVersion": rv}) + b"\n"


def encode_error(code: int, reason: str, message: str) -> bytes:
    return orjson.dumps({"type": "ERROR", "object": {"kind": "Status", "code": code, "reason": reason,
                                                     "message": message}}) + b"\n"


def _expire(fut: asyncio.Future) -> None:
    if not fut.done():
        fut.set_result(False)


class Subscriber:
    """One agent's watch: a bounded buffer of serialised events.

    Waiting costs one future and one timer handle (no task, no exception on a
    timeout): with thousands of idle watches each waking for its bookmark,
    ``asyncio.wait_for`` (a task per wait, cancelled on every timeout) was a
    visible share of the relay's CPU."""

    __slots__ = ("node", "max_buffer", "buf", "overflowed", "closed", "_waiter", "sent_events")

    def __init__(self, node: str, max_buffer: int):
        self.node = node
        self.max_buffer = max_buffer
        self.buf: deque[bytes] = deque()
        self.overflowed = False
        self.closed = False
        self._waiter: asyncio.Future | None = None
        self.sent_events = 0

    def wake(self) -> None:
        w = self._waiter
        if w is not None and not w.done():
            w.set_result(True)

    def push(self, line: bytes) -> bool:
        """Queue one event; False (and the subscriber is marked overflowed) when full."""
        if self.overflowed or self.closed:
            return False
        if len(self.buf) >= self.max_buffer:
            self.overflowed = True
            self.buf.clear()
            self.wake()
            return False
        self.buf.append(line)
        self.wake()
        return True

    def drain(self) -> list[bytes]:
        out = list(self.buf)
        self.buf.clear()
        return out

    async def wait(self, timeout: float) -> bool:
        """Wait until something is queued (True) or the timeout passes (False)."""
        if self.buf or self.overflowed:
            return True
        if timeout <= 0:
            return False
        loop = asyncio.get_running_loop()
        fut = self._waiter = loop.create_future()
        timer = loop.call_later(timeout, _expire, fut)
        try:
            return await fut
        finally:
            timer.cancel()
            self._waiter = None


@dataclass
class NodeEntry:
    since: int  # the history holds every event of this node with seq > since
    node: AgentNode | None = None
    pods: dict[str, AgentPod] = field(default_factory=dict)
    history: deque[tuple[int, bytes]] = field(default_factory=deque)
    subs: set[Subscriber] = field(default_factory=set)

    def empty(self) -> bool:
        return self.node is None and not self.pods and not self.subs


class HubStats:
    """Counters the metrics module reads (plain ints: the hub does no I/O)."""

    def __init__(self) -> None:
        self.upstream_events = {KIND_NODE: 0, KIND_POD: 0, KIND_TEAMS: 0}
        self.suppressed = 0  # upstream updates that changed nothing an agent sees
        self.fanned_out = 0  # event deliveries to subscribers
        self.dropped = 0  # subscribers dropped for a full buffer
        self.gone = 0  # resumes answered with 410


class Hub:
    def __init__(self, *, history: int = 128, buffer: int = 1024, team_history: int = 16,
                 epoch: str | None = None, on_drop=None):
        if history < 1 or buffer < 1:
            raise ValueError("history and buffer must be >= 1")
        self.history_len = history
        self.buffer = buffer
        self.epoch = epoch or secrets.token_hex(4)
        self.seq = 0
        self.entries: dict[str, NodeEntry] = {}
        self.teams: TeamConfig | None = None
        self.team_history: deque[tuple[int, bytes]] = deque()
        self.team_history_len = team_history
        self.team_since = 0
        self._last_drop = 0  # seq at which an empty entry was last forgotten
        self.subscribers = 0
        self._pod_node: dict[str, str] = {}  # "namespace/name" -> node, for authorisation
        self.stats = HubStats()
        self.on_drop = on_drop
        self._bookmark: tuple[str, bytes] = ("", b"")
        self.teams_json = b"null"  # the team config's doc, serialised once per change (every view carries it)

    # --- resource versions ------------------------------------------------
    def rv(self, seq: int | None = None) -> str:
        return f"{self.epoch}-{self.seq if seq is None else seq}"

    def parse_rv(self, rv: str) -> int:
        epoch, sep, seq = rv.rpartition("-")
        if not sep or epoch != self.epoch or not seq.isdigit():
            raise Gone(f"resourceVersion {rv!r} is not from this relay (epoch {self.epoch}); relist")
        n = int(seq)
        if n > self.seq:
            raise Gone(f"resourceVersion {rv!r} is ahead of this relay ({self.rv()}); relist")
        return n

    # --- entries ------------------------------------------------------------
    def _entry(self, node: str) -> NodeEntry:
        e = self.entries.get(node)
        if e is None:
            e = self.entries[node] = NodeEntry(since=self._last_drop)
        return e

    def _maybe_forget(self, node: str, e: NodeEntry) -> None:
        if e.empty():
            del self.entries[node]
            self._last_drop = self.seq

    def _publish(self, e: NodeEntry, line: bytes) -> None:
        if len(e.history) >= self.history_len:
            e.since = e.history.popleft()[0]
        e.history.append((self.seq, line))
        self._fan(e.subs, line)

    def _fan(self, subs: Iterable[Subscriber], line: bytes) -> None:
        dropped = []
        for s in subs:
            if s.push(line):
                self.stats.fanned_out += 1
            else:
                dropped.append(s)
        for s in dropped:
            self._detach(s)
            self.stats.dropped += 1
            if self.on_drop:
                self.on_drop(s)

    # --- informer handlers (typ, key, old, new) --------------------------
    def on_pod(self, typ: str, key: str, old: AgentPod | None, new: AgentPod | None) -> None:
        self.stats.upstream_events[KIND_POD] += 1
        old_node = old.node if old else ""
        new_node = new.node if new else ""
        if old_node and old_node != new_node:  # deleted, or (never in practice) moved
            e = self.entries.get(old_node)
            if e is not None and key in e.pods:
                gone = e.pods.pop(key)
                self.seq += 1
                self._publish(e, encode_event("DELETED", KIND_POD, self.rv(), gone.doc))
                self._maybe_forget(old_node, e)
        if new is None or not new_node:
            self._pod_node.pop(key, None)
        else:
            self._pod_node[key] = new_node
        if new is not None and new_node:
            e = self._entry(new_node)
            prev = e.pods.get(key)
            e.pods[key] = new
            if prev is not None and prev.doc == new.doc:
                self.stats.suppressed += 1
                return
            self.seq += 1
            self._publish(e, encode_event("MODIFIED" if prev else "ADDED", KIND_POD, self.rv(), new.doc))
        elif new is not None and not new_node and old is None:
            self.stats.suppressed += 1  # not scheduled yet: no agent's business

    def on_node(self, typ: str, key: str, old: AgentNode | None, new: AgentNode | None) -> None:
        self.stats.upstream_events[KIND_NODE] += 1
        if new is None:
            e = self.entries.get(key)
            if e is None or e.node is None:
                return
            gone, e.node = e.node, None
            self.seq += 1
            self._publish(e, encode_event("DELETED", KIND_NODE, self.rv(), gone.doc))
            self._maybe_forget(key, e)
            return
        e = self._entry(key)
        prev = e.node
        e.node = new
        if prev is not None and prev.doc == new.doc:
            self.stats.suppressed += 1  # a heartbeat: nothing the agent reads changed
            return
        self.seq += 1
        self._publish(e, encode_event("MODIFIED" if prev else "ADDED", KIND_NODE, self.rv(), new.doc))

    def on_teams(self, typ: str, key: str, old: TeamConfig | None, new: TeamConfig | None) -> None:
        self.stats.upstream_events[KIND_TEAMS] += 1
        if new is not None and self.teams is not None and new.doc == self.teams.doc:
            self.teams = new
            self.stats.suppressed += 1
            return
        prev, self.teams = self.teams, new
        self.teams_json = orjson.dumps(new.doc) if new is not None else b"null"
        if new is None and prev is None:
            return
        self.seq += 1
        if new is None:
            line = encode_event("DELETED", KIND_TEAMS, self.rv(), prev.doc)  # type: ignore[union-attr]
        else:
            line = encode_event("MODIFIED" if prev else "ADDED", KIND_TEAMS, self.rv(), new.doc)
        if len(self.team_history) >= self.team_history_len:
            self.team_since = self.team_history.popleft()[0]
        self.team_history.append((self.seq, line))
        for e in list(self.entries.values()):
            self._fan(list(e.subs), line)

    # --- reading --------------------------------------------------------------
    def node_doc(self, node: str) -> dict | None:
        e = self.entries.get(node)
        return e.node.doc if e and e.node else None

    def pod_docs(self, node: str) -> list[dict]:
        e = self.entries.get(node)
        if e is None:
            return []
        return [e.pods[k].doc for k in sorted(e.pods)]

    def pod_node(self, namespace: str, name: str) -> str | None:
        """The node of a pod the relay knows (used by authorisation)."""
        return self._pod_node.get(f"{namespace}/{name}")

    def teams_doc(self) -> dict | None:
        return self.teams.doc if self.teams else None

    def bookmark(self) -> bytes:
        """The BOOKMARK line at the current resourceVersion, serialised once per version."""
        rv = self.rv()
        if self._bookmark[0] != rv:
            self._bookmark = (rv, encode_bookmark(rv))
        return self._bookmark[1]

    def view_json(self, node: str) -> bytes:
        """:meth:`view` serialised, with the team config's bytes spliced in as they are."""
        head = orjson.dumps({"resourceVersion": self.rv(), "node": self.node_doc(node), "pods": self.pod_docs(node)})
        return head[:-1] + b',"teams":' + self.teams_json + b"}"

    def view(self, node: str) -> dict:
        return {"resourceVersion": self.rv(), "node": self.node_doc(node), "pods": self.pod_docs(node),
                "teams": self.teams_doc()}

    # --- subscriptions ---------------------------------------------------------
    def subscribe(self, node: str, resource_version: str | None) -> Subscriber:
        """A new subscriber for ``node``. With no resourceVersion (or "0") the
        buffer starts with the node's current objects as ADDED events, as a
        Kubernetes watch from "0" does; with one, the events after it are
        replayed from the history, or :class:`Gone` is raised."""
        sub = Subscriber(node, self.buffer)
        e = self._entry(node)
        if not resource_version or resource_version == "0":
            rv = self.rv()
            initial: list[bytes] = []
            if self.teams:
                initial.append(encode_event("ADDED", KIND_TEAMS, rv, self.teams.doc))
            if e.node:
                initial.append(encode_event("ADDED", KIND_NODE, rv, e.node.doc))
            for k in sorted(e.pods):
                initial.append(encode_event("ADDED", KIND_POD, rv, e.pods[k].doc))
            initial.append(encode_bookmark(rv))
            if len(initial) > self.buffer:
                sub.max_buffer = len(initial) + self.buffer
            for line in initial:
                sub.push(line)
        else:
            try:
                since = self.parse_rv(resource_version)
                if since < e.since or since < self.team_since:
                    raise Gone(f"resourceVersion {resource_version} is older than this node's history "
                               f"({self.rv(max(e.since, self.team_since))}); relist")
            except Gone:
                self.stats.gone += 1
                self._maybe_forget(node, e)
                raise
            replay = [(s, line) for s, line in e.history if s > since]
            replay += [(s, line) for s, line in self.team_history if s > since]
            replay.sort(key=lambda t: t[0])
            if len(replay) > self.buffer:
                sub.max_buffer = len(replay) + self.buffer
            for _, line in replay:
                sub.push(line)
        e.subs.add(sub)
        self.subscribers += 1
        return sub

    def _detach(self, sub: Subscriber) -> None:
        e = self.entries.get(sub.node)
        if e is not None and sub in e.subs:
            e.subs.discard(sub)
            self.subscribers -= 1
            self._maybe_forget(sub.node, e)

    def unsubscribe(self, sub: Subscriber) -> None:
        sub.closed = True
        self._detach(sub)

    def subscriber_count(self, node: str) -> int:
        e = self.entries.get(node)
        return len(e.subs) if e else 0
