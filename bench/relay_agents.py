"""Many relay agents in one process, started at a paced rate (bench_scale.py runs
several of these side by side, so that 7,500 agents are not one event loop).

    python relay_agents.py URL RATE PREFIX < node-names

Each agent follows its node through the relay (``RelayClient.sync``: one view,
then a watch). Agent ``i`` starts ``i / RATE`` seconds after the process, as a
DaemonSet rolling out (or a relay restart with jittered reconnects) would,
rather than every connection at the same instant (RATE 0: all at once). Prints one JSON line per
second (``{"first": agents with their first view, "errors": ...}``) and, when
its stdin closes, one final line with every first-view time and, for each pod
whose ``namespace/name`` starts with PREFIX, when its node's agent first had
it (``time.monotonic()``, which every process on the machine shares).
"""

from __future__ import annotations

import asyncio
import logging
import resource
import sys
import time

import aiohttp
import orjson

from fleetkeeper.relay.client import RelayClient


class Counted(logging.Handler):
    """Counts the client's 'relay unreachable; retrying' warnings (timeouts, refused connections)."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.n = 0

    def emit(self, record: logging.LogRecord) -> None:
        self.n += 1


async def main(url: str, rate: float, prefix: str, nodes: list[str]) -> None:
    retries = Counted()
    client_log = logging.getLogger("fleetkeeper.relay.client")
    client_log.addHandler(retries)
    client_log.propagate = False
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, max(soft, 2 * len(nodes) + 256)), hard))
    session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0),
                                    timeout=aiohttp.ClientTimeout(total=None))
    t_start = time.monotonic()
    first: dict[str, float] = {}
    seen: dict[str, tuple[str, float]] = {}
    relists: dict[str, int] = {}
    clients: list[RelayClient] = []

    async def follow(i: int, node: str) -> None:
        if rate > 0:
            await asyncio.sleep(i / rate)
        client = RelayClient(url, node, session=session)
        clients.append(client)
        async for st in client.sync():
            now = time.monotonic()
            if node not in first:
                first[node] = now - t_start
            relists[node] = st.relists
            for key in st.pods:
                if key.startswith(prefix) and key not in seen:
                    seen[key] = (node, now)

    tasks = [asyncio.create_task(follow(i, n)) for i, n in enumerate(nodes)]
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    eof = asyncio.create_task(reader.read())

    def report(**extra) -> None:
        sys.stdout.write(orjson.dumps({"first": len(first), "agents": len(nodes),
                                       "retries": max(retries.n, sum(getattr(c, "retries", 0) for c in clients)),
                                       "busy": sum(getattr(c, "busy", 0) for c in clients),
                                       "failed": sum(1 for t in tasks if t.done() and not t.cancelled()
                                                     and t.exception() is not None), **extra}).decode() + "\n")
        sys.stdout.flush()

    while not eof.done():
        report()
        await asyncio.wait({eof}, timeout=1.0)
    for t in tasks:
        t.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    await session.close()
    report(final=True, relists=sum(v - 1 for v in relists.values()), first_view=sorted(first.values()), seen={k: list(v) for k, v in seen.items()})


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], float(sys.argv[2]), sys.argv[3], sys.stdin.readline().split()))
