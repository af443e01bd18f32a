import pytest

from fleetkeeper.core import errors
from fleetkeeper.core.kube import NODES, PODS, WORKLOADS, RetryPolicy, build_request


@pytest.mark.parametrize(
    "verb,res,kw,method,path",
    [
        ("get", NODES, {"name": "n1"}, "GET", "/api/v1/nodes/n1"),
        ("list", PODS, {"namespace": "ns"}, "GET", "/api/v1/namespaces/ns/pods"),
        ("list", PODS, {}, "GET", "/api/v1/pods"),
        ("create", PODS, {"namespace": "ns", "body": {}}, "POST", "/api/v1/namespaces/ns/pods"),
        ("patch", NODES, {"name": "n1", "body": {}}, "PATCH", "/api/v1/nodes/n1"),
        ("delete", WORKLOADS, {"namespace": "a", "name": "w"}, "DELETE",
         "/apis/scheduling.k8s.io/v1alpha2/namespaces/a/workloads/w"),
        ("evict", PODS, {"namespace": "a", "name": "p"}, "POST", "/api/v1/namespaces/a/pods/p/eviction"),
    ],
)
def test_build_request_paths(verb, res, kw, method, path):
    req = build_request(verb, res, **kw)
    assert (req.method, req.path) == (method, path)


def test_watch_params_and_patch_content_type():
    req = build_request("watch", NODES, resource_version="42", timeout_seconds=60, label_selector="a=b")
    params = dict(req.params)
    assert params == {"labelSelector": "a=b", "resourceVersion": "42", "watch": "true",
                      "allowWatchBookmarks": "true", "timeoutSeconds": "60"}
    p = build_request("patch", NODES, name="n", body={}, patch_type="strategic", dry_run=True)
    assert ("Content-Type", "application/strategic-merge-patch+json") in p.headers
    assert ("dryRun", "All") in p.params


def test_eviction_body_dry_run():
    req = build_request("evict", PODS, namespace="a", name="p", dry_run=True)
    assert req.body["kind"] == "Eviction" and req.body["deleteOptions"] == {"dryRun": ["All"]}


def test_namespaced_write_needs_namespace():
    with pytest.raises(errors.Terminal):
        build_request("create", PODS, body={})


def test_retry_policy():
    p = RetryPolicy(attempts=3, base=0.1, cap=1.0)
    assert p.delay(errors.api_error(500), 0) == pytest.approx(0.1)
    assert p.delay(errors.api_error(503), 2) == pytest.approx(0.4)
    assert p.delay(errors.api_error(503), 3) is None
    assert p.delay(errors.api_error(404), 0) is None
    assert p.delay(errors.api_error(409), 0) is None
    tmr = errors.api_error(429, {"details": {"retryAfterSeconds": 2}})
    assert isinstance(tmr, errors.TooManyRequests) and p.delay(tmr, 0) == 1.0  # capped


def test_api_error_mapping():
    assert isinstance(errors.api_error(410, {"reason": "Expired"}), errors.Gone)
    assert isinstance(errors.api_error(502), errors.ServerError)
    e = errors.api_error(422, {"reason": "Invalid", "message": "bad"})
    assert isinstance(e, errors.Invalid) and "bad" in str(e)


async def test_requests_read_the_proxy_environment_once_not_per_request(monkeypatch):
    """The client's session does not look up ~/.netrc and the proxy variables on every request (aiohttp's
    trust_env, two worker-thread hand-offs per call); the environment's proxy is read once and used."""
    from kubernetes_asyncio import client

    from fleetkeeper.core.kube import Kube

    for var in ("HTTPS_PROXY", "https_proxy", "NO_PROXY", "no_proxy"):
        monkeypatch.delenv(var, raising=False)
    cfg = client.Configuration(host="https://203.0.113.7:6443")
    k = Kube(client.ApiClient(configuration=cfg))
    session, proxy, _ = k._session()
    assert not session.trust_env and proxy is None
    assert session.connector is k.api_client.rest_client.pool_manager.connector  # the same pool
    await k.close()
    monkeypatch.setenv("HTTPS_PROXY", "http://proxy.example:3128")
    k = Kube(client.ApiClient(configuration=cfg))
    assert k._session()[1] == "http://proxy.example:3128"
    assert k.as_user("u")._session() is k._session()  # shared by impersonating copies
    await k.close()
