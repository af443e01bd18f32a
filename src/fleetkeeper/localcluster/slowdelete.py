"""A fault for the local control plane: pod deletions that take a while.

A validating admission webhook (served by this process) holds every DELETE of
a pod carrying ``label`` for ``seconds`` before allowing it, as a loaded API
server or a slow admission chain would. kube-scheduler's asynchronous
preemption deletes its victims through the API, so this widens the window in
which a preemptor is "still preempting" from milliseconds to seconds, which
makes races around that window (docs/capacity.md: the gang stall)
reproducible on any machine.

    async with SlowDeletes(kube, "repro/placeholder", seconds=3):
        ...
"""

from __future__ import annotations

import asyncio
import secrets
import tempfile
from pathlib import Path

from fleetkeeper.core import errors
from fleetkeeper.core.admission import Admission
from fleetkeeper.core.kube import VALIDATING_WEBHOOKS, Kube
from fleetkeeper.core.pki import write_serving_cert
from fleetkeeper.core.webhook import WebhookServer, registration, webhook_entry


class SlowDeletes:
    def __init__(self, kube: Kube, label: str, seconds: float = 3.0, namespace_selector: dict | None = None):
        if not 0 < seconds <= 25:
            raise ValueError(f"seconds={seconds}: between 0 and 25 (the webhook timeout is at most 30 s)")
        self.kube, self.label, self.seconds = kube, label, seconds
        self.namespace_selector = namespace_selector
        self.name = f"fk-slow-deletes-{secrets.token_hex(3)}"
        self.held = 0
        self._dir = tempfile.TemporaryDirectory(prefix="fk-slowdelete-")
        self.server: WebhookServer | None = None

    async def _handle(self, req) -> Admission:
        self.held += 1
        await asyncio.sleep(self.seconds)
        return Admission(True)

    async def __aenter__(self) -> "SlowDeletes":
        cert = await asyncio.to_thread(write_serving_cert, Path(self._dir.name), ["127.0.0.1", "localhost"],
                                       common_name="fk-slow-deletes")
        self.server = WebhookServer(str(cert.cert), str(cert.key))
        self.server.add("slow-delete", self._handle)
        await self.server.start()
        entry = webhook_entry(
            f"slow-delete.{self.name}.fleetkeeper.io", url=self.server.url("slow-delete"), ca_bundle=cert.ca_bundle,
            rules=[{"operations": ["DELETE"], "apiGroups": [""], "apiVersions": ["v1"], "resources": ["pods"],
                    "scope": "Namespaced"}],
            failure_policy="Ignore", timeout_seconds=int(self.seconds) + 5,
            namespace_selector=self.namespace_selector,
            object_selector={"matchExpressions": [{"key": self.label, "operator": "Exists"}]})
        await self.kube.apply(VALIDATING_WEBHOOKS, registration("validating", self.name, [entry]))
        await asyncio.sleep(1.0)  # the API server's webhook configuration watch catches up
        return self

    async def __aexit__(self, *exc) -> None:
        try:
            await self.kube.delete(VALIDATING_WEBHOOKS, self.name)
        except errors.NotFound:
            pass
        if self.server is not None:
            await self.server.stop()
        self._dir.cleanup()
