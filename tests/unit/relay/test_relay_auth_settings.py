"""Authorisation decisions and configuration errors."""

from __future__ import annotations

import pytest

from fleetkeeper.core import errors
from fleetkeeper.core.clock import FakeClock
from fleetkeeper.relay.auth import EXTRA_NODE, EXTRA_POD, AuthPolicy, Identity, TokenReviewAuthenticator, authorize
from fleetkeeper.relay.settings import parse_config

POLICY = AuthPolicy(agent_service_accounts=("fleetkeeper-system:node-agent",), reader_groups=("sre",))
SA = "system:serviceaccount:fleetkeeper-system:node-agent"


def pods(ns, name):
    return {("fleetkeeper-system", "agent-abc"): "node-a"}.get((ns, name))


@pytest.mark.parametrize("ident,node,allowed", [
    (Identity("system:node:node-a"), "node-a", True),
    (Identity("system:node:node-a"), "node-b", False),
    (Identity(SA, extra={EXTRA_NODE: ("node-a",)}), "node-a", True),
    (Identity(SA, extra={EXTRA_NODE: ("node-a",)}), "node-b", False),
    (Identity(SA, extra={EXTRA_POD: ("agent-abc",)}), "node-a", True),
    (Identity(SA, extra={EXTRA_POD: ("agent-abc",)}), "node-b", False),
    (Identity(SA), "node-a", False),  # an unbound (legacy) token
    (Identity(SA), None, True),  # team config: any agent
    (Identity("system:serviceaccount:default:default", extra={EXTRA_NODE: ("node-a",)}), "node-a", False),
    (Identity("mallory", ("researchers",)), "node-a", False),
    (Identity("ops", ("sre",)), "node-a", True),
])
def test_authorize(ident, node, allowed):
    ok, why = authorize(ident, node, POLICY, pods)
    assert ok is allowed, why
    assert why


class ReviewKube:
    def __init__(self, answers):
        self.answers = answers
        self.calls = 0

    async def create(self, res, body, namespace=None, **kw):
        self.calls += 1
        ans = self.answers[body["spec"]["token"]]
        if isinstance(ans, Exception):
            raise ans
        return {"status": ans}


async def test_token_reviews_are_cached_and_failures_are_temporary():
    clock = FakeClock()
    kube = ReviewKube({"good": {"authenticated": True, "user": {"username": SA, "groups": ["g"],
                                                                "extra": {EXTRA_NODE: ["node-a"]}}},
                       "bad": {"authenticated": False},
                       "down": errors.ServerError(500, "InternalError", "etcd")})
    auth = TokenReviewAuthenticator(kube, cache_ttl=60, negative_ttl=5, clock=clock)
    ident = await auth.authenticate("good")
    assert ident == Identity(SA, ("g",), {EXTRA_NODE: ("node-a",)})
    await auth.authenticate("good")
    assert kube.calls == 1
    assert await auth.authenticate("bad") is None
    await clock.advance(61)
    await auth.authenticate("good")
    assert kube.calls == 3
    with pytest.raises(errors.Temporary):
        await auth.authenticate("down")


@pytest.mark.parametrize("text,path", [
    ("relay: {port: 70000}", "relay.port"),
    ("relay: {auth: kerberos}", "relay.auth"),
    ("relay: {agent_service_accounts: [nocolon]}", "relay.agent_service_accounts"),
    ("relay: {tls_cert: /x}", "relay"),
    ("pacer: {rate: -1}", "pacer.rate"),
    ("pacer: {taints: [{key: a, effect: Sometimes}]}", "pacer.taints[0].effect"),
    ("pacer: {bootstrap_pod: {namespace: Bad_NS}}", "pacer.bootstrap_pod.namespace"),
    ("pacer: {colour: blue}", "pacer.colour"),
    ("relay: [1, 2", "line"),
    ("- a list", "<root>"),
])
def test_config_errors_name_the_field(text, path):
    with pytest.raises(errors.ConfigError) as exc:
        parse_config(text, "configmap fk/fleetkeeper-relay")
    assert path in str(exc.value)


def test_config_defaults_and_values():
    cfg = parse_config("pacer: {enabled: true, rate: 5, labels: {a: b}}", "x")
    assert cfg.relay.enabled and cfg.relay.port == 8081
    assert cfg.pacer.rate == 5 and cfg.pacer.labels == {"a": "b"} and cfg.pacer.bootstrap_pod is None
    assert parse_config("", "x").pacer.enabled is False
