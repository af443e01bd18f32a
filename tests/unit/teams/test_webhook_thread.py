"""The process's webhook server on an event loop of its own (SharedWebhooks'
ServingThread): the teams webhook answers while the manager's loop is busy,
and a request that must wait for the owner index waits on the manager's
loop, where that index lives."""

from __future__ import annotations

import asyncio
import base64
import http.client
import ssl
import threading

import orjson
import pytest
from prometheus_client import CollectorRegistry

from fleetkeeper.core.attribution import Stamp
from fleetkeeper.core.webhook import SharedWebhooks
from fleetkeeper.teams.admission import TeamAdmission, apply_ops
from fleetkeeper.teams.config import ConfigState
from fleetkeeper.teams.options import WebhookOptions
from fleetkeeper.teams.serve import MUTATE, WebhookRunner

from teams_helpers import N
from test_admission import A_TOL, CFG, PRIO
from test_workloads_admission import JOBSET_SA, KINDS, SA_GROUPS, Owners, chain, pod


def review(obj: dict, user: str, groups: tuple[str, ...]) -> bytes:
    return orjson.dumps({"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview", "request": {
        "uid": "u-1", "kind": {"group": "", "version": "v1", "kind": "Pod"}, "operation": "CREATE",
        "namespace": "ns", "name": obj["metadata"]["name"], "userInfo": {"username": user, "groups": list(groups)},
        "object": obj}})


def post(port: int, ca: bytes, body: bytes, timeout: float = 30.0) -> dict:
    """One AdmissionReview over TLS, from the calling (non-asyncio) thread."""
    ctx = ssl.create_default_context(cadata=ca.decode())
    conn = http.client.HTTPSConnection("127.0.0.1", port, context=ctx, timeout=timeout)
    try:
        conn.request("POST", f"/{MUTATE}", body=body, headers={"Content-Type": "application/json"})
        resp = conn.getresponse()
        assert resp.status == 200, resp.status
        return orjson.loads(resp.read())["response"]
    finally:
        conn.close()


def runner(tmp_path, own_thread: bool, owners=None, wait_owner=None) -> WebhookRunner:
    st = ConfigState()
    st.accept(CFG, "1")
    adm = TeamAdmission(N, st, lambda: PRIO, kinds=KINDS, owners=Owners() if owners is None else owners,
                        wait_owner=wait_owner, owner_wait_s=30.0)
    opts = WebhookOptions(register=False, certDir=str(tmp_path))
    shared = SharedWebhooks(CollectorRegistry(), host="127.0.0.1", port=0, own_thread=own_thread)
    return WebhookRunner(None, adm, opts, "fleetkeeper-system", N.domain, CollectorRegistry(),  # type: ignore[arg-type]
                         register=shared.register_and_return)


async def serving(r: WebhookRunner) -> list[asyncio.Task]:
    """The server and the runner, as the manager runs them."""
    tasks = [asyncio.create_task(r.webhooks.run()), asyncio.create_task(r.run())]
    await asyncio.wait_for(r.ready.wait(), 30)
    return tasks


async def stop(tasks: list[asyncio.Task]) -> None:
    for t in reversed(tasks):  # the runner, then the server
        t.cancel()
        await asyncio.gather(t, return_exceptions=True)


@pytest.mark.parametrize("own_thread", [True, False])
async def test_the_webhook_answers_while_the_managers_loop_is_busy(tmp_path, own_thread):
    r = runner(tmp_path, own_thread)
    task = await serving(r)
    answered = threading.Event()
    got: list[dict] = []

    def client() -> None:
        try:
            got.append(post(r.server.port, r.ca_bundle, review(pod(), "alice", ("team-a",)), timeout=60))
        finally:
            answered.set()
    t = threading.Thread(target=client, daemon=True)
    try:
        t.start()
        # the manager's loop does blocking work (as a long reconcile pass would): with
        # its own loop the webhook answers meanwhile; on the shared loop it cannot
        waited = answered.wait(30 if own_thread else 2)
        if own_thread:
            assert waited and got and got[0]["allowed"] and got[0].get("patch"), got
        else:
            assert not waited, "a webhook on the manager's loop answered while that loop was blocked"
    finally:
        await asyncio.to_thread(answered.wait, 60)  # the shared loop answers once it is free again
        await stop(task)
    assert got and got[0]["allowed"]
    assert r.webhooks.thread is None  # stopped (and its thread joined)


async def test_an_owner_wait_runs_on_the_managers_loop(tmp_path):
    """A controller's pod whose owner the index has not seen yet: the webhook thread
    waits for the owner index (asyncio objects of the manager's loop) through that
    loop, and judges the pod once the owner appears."""
    home = asyncio.get_running_loop()
    owners = Owners()
    changed = asyncio.Event()  # belongs to the manager's loop
    entered = asyncio.Event()
    loops: list[asyncio.AbstractEventLoop] = []

    async def wait_for(namespace: str, ref: dict, timeout: float):
        uid = ref["uid"]
        loops.append(asyncio.get_running_loop())
        entered.set()
        while owners.get(uid) is None:
            await asyncio.wait_for(changed.wait(), timeout)
            changed.clear()
        return owners.get(uid)

    r = runner(tmp_path, True, owners=owners, wait_owner=wait_for)
    task = await serving(r)
    try:
        call = asyncio.create_task(asyncio.to_thread(
            post, r.server.port, r.ca_bundle, review(pod(owner="job-1"), JOBSET_SA, SA_GROUPS)))
        await asyncio.wait_for(entered.wait(), 30)
        assert not call.done()  # still waiting for the owner
        owners.update(chain(Stamp("alice", ("team-a",))))
        changed.set()
        resp = await asyncio.wait_for(call, 30)
    finally:
        await stop(task)
    assert loops == [home]
    assert resp["allowed"], resp
    # judged as the JobSet's requester (alice, team-a) once the owner was seen
    after = apply_ops(pod(owner="job-1"), orjson.loads(base64.b64decode(resp["patch"])))
    assert after["spec"]["tolerations"] == [A_TOL]
