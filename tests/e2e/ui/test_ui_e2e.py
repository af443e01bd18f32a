"""The fleet map in real headless Chromium (Debian's chromium + chromium-driver,
driven by selenium) against the real local control plane: every node shown, a
fault injected with ``fleetkeeper fault inject`` reaching the cell, the explain
answer on click, the team overlay; 50 open pages cost the API server nothing;
cluster mode answers 401/403 without a good token.

The map runs in this test's event loop (the way ``fleetkeeper run --ui`` runs
it inside the manager); every blocking WebDriver call goes through a thread so
the server keeps serving.
"""

from __future__ import annotations

import asyncio
import secrets
import shutil
import subprocess
import sys
from pathlib import Path

import aiohttp
import pytest
from prometheus_client import CollectorRegistry

from fleetkeeper.core import errors
from fleetkeeper.core.domain import Names
from fleetkeeper.core.faults import FaultPlan
from fleetkeeper.core.kube import EVENTS, NODES, PODS
from fleetkeeper.core.manager import Manager
from fleetkeeper.core.settings import RuntimeSettings
from fleetkeeper.health.controller import HealthOptions, setup as health_setup
from fleetkeeper.health.policy import load_policy
from fleetkeeper.localcluster.fleet import FleetSpec, node_manifest
from fleetkeeper.ui.server import UiOptions, setup as ui_setup
from e2e_helpers import wait_for

GROUP = "fleetkeeper.io/e2e-group"
N = Names()
FK = str(Path(sys.executable).with_name("fleetkeeper"))
COMPONENTS = {"health": "fleetkeeper.health", "teams": "fleetkeeper.teams"}
# this site quarantines a GPU that needs a reset and investigates before draining it, so the ECC fault's
# cell stays "quarantined" (with the default ladder it moves on to draining / awaiting repair)
POLICY = """
budget: {cluster: {max_nodes: 10}, zone: {max_percent: 100}, rack: {max_nodes: 10}}
storm: {min_nodes: 50}
remedy_actions: {reset: quarantine, reboot: drain, replace: terminate, investigate: quarantine, wait: drain, none: event}
"""


def chromium_driver(tmp: Path):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    browser, driver = shutil.which("chromium"), shutil.which("chromedriver")
    assert browser and driver, "Debian's chromium and chromium-driver are needed (make deps installs them)"
    opts = webdriver.ChromeOptions()
    opts.binary_location = browser
    for a in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
              "--disable-background-networking", "--disable-component-update", "--disable-sync",
              "--disable-dev-shm-usage", f"--user-data-dir={tmp}", "--window-size=1500,950"):
        opts.add_argument(a)
    return webdriver.Chrome(options=opts, service=Service(executable_path=driver))


@pytest.fixture
async def browser(tmp_path):
    d = await asyncio.to_thread(chromium_driver, tmp_path / "chromium-profile")
    try:
        yield d
    finally:
        await asyncio.to_thread(d.quit)


@pytest.fixture
async def own_nodes(kube):
    """Four nodes of this test in two racks: two carry a team (label and taint, as the teams controller writes)."""
    group = secrets.token_hex(3)
    spec = FleetSpec(nodes=4, prefix=f"ui{group}", cpu_fraction=0.0, nodes_per_rack=2)
    made = []
    for i in range(4):
        m = node_manifest(spec, i)
        m["metadata"]["labels"][GROUP] = group
        m["metadata"]["labels"][N.rack] = f"rack-ui{group}-{i // 2}"
        team = {0: "alpha", 2: "beta"}.get(i)
        if team:
            m["metadata"]["labels"][N.team] = team
            m["spec"]["taints"] = [{"key": N.team, "value": team, "effect": "NoSchedule"}]
        await kube.create(NODES, m)
        made.append(m["metadata"]["name"])

    async def ready():
        for name in made:
            n = await kube.get(NODES, name)
            if not any(c["type"] == "Ready" and c["status"] == "True" for c in n["status"].get("conditions") or []):
                return False
            if any(t["key"].startswith("node.kubernetes.io/") for t in n["spec"].get("taints") or []):
                return False
        return True
    await wait_for(ready, 90, "the test's nodes Ready")
    yield group, made
    for name in made:
        try:
            await kube.delete(NODES, name)
        except errors.NotFound:
            pass


async def run_manager(mgr: Manager) -> asyncio.Task:
    task = asyncio.create_task(mgr.run())
    await mgr.wait_synced(60)
    return task


async def stop(task: asyncio.Task) -> None:
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)


def js(driver, script, *args):
    return asyncio.to_thread(driver.execute_script, script, *args)


async def test_map_shows_every_node_a_fault_turns_quarantined_click_explains_team_overlay(
        cluster, kube, own_nodes, browser, tmp_path):
    group, nodes = own_nodes
    faults = tmp_path / "faults.json"
    FaultPlan(faults).clear(None)
    own = await cluster.connect()
    mgr = Manager(own, RuntimeSettings(server={"port": 0}, leader_election={"enabled": False}, namespace="default"),
                  registry=CollectorRegistry())
    policy = load_policy(POLICY + f"node_selector: {{{GROUP}: '{group}'}}\n", "test")
    await health_setup(mgr, HealthOptions(policy=policy, simulate=True, fault_file=str(faults), sim_interval=0.5,
                                          sim_heartbeat=60.0))
    ui = await ui_setup(mgr, UiOptions(port=0, components=COMPONENTS))
    task = await run_manager(mgr)
    try:
        await wait_for(lambda: asyncio.sleep(0, ui._runner is not None), 30, "the map listening")
        await asyncio.to_thread(browser.get, ui.url)

        # the page shows every node of the cluster
        async def every_node():
            want = sorted(n["metadata"]["name"] for n in (await kube.list(NODES))[0])
            have = await js(browser, "return window.__fleet ? window.__fleet.names().sort() : null")
            return have == want and await js(browser, "return window.__fleet.firstPaint() !== null")
        await wait_for(every_node, 60, "every node on the map")
        sick = nodes[1]
        colour = await js(browser, "return [window.__fleet.pixel(arguments[0]), window.__fleet.stateColour('in-service')]",
                          sick)
        assert colour[0] == colour[1], colour

        # a fault injected with the CLI turns the node's cell quarantined (poll; no time asserted)
        subprocess.run([FK, "fault", "inject", sick, "ecc", "--file", str(faults)], check=True, capture_output=True)

        seen: list = []

        async def quarantined_on_screen():
            px, want, cell = await js(browser, "return [window.__fleet.pixel(arguments[0]), "
                                               "window.__fleet.stateColour('quarantined'), window.__fleet.cell(arguments[0])]",
                                      sick)
            n = await kube.get(NODES, sick)
            seen[:] = [cell, n["spec"].get("taints"), {k: v for k, v in n["metadata"].get("annotations", {}).items()
                                                       if k.startswith("fleetkeeper.io/")}]
            return px == want
        try:
            await wait_for(quarantined_on_screen, 90, f"{sick}'s cell painted quarantined")
        except AssertionError as exc:
            raise AssertionError(f"{exc}; the page's cell, the node's taints and annotations: {seen}") from None
        node = await kube.get(NODES, sick)
        assert any(t["key"] == N.quarantine for t in node["spec"].get("taints") or [])

        # clicking the cell shows the explain answer: the same lines `fleetkeeper explain node` prints
        from selenium.webdriver.common.action_chains import ActionChains
        from selenium.webdriver.common.by import By

        canvas = await asyncio.to_thread(browser.find_element, By.ID, "map")
        cx, cy = await js(browser, "return window.__fleet.centre(arguments[0])", sick)
        size = canvas.size

        def click():
            ActionChains(browser).move_to_element_with_offset(
                canvas, int(cx - size["width"] / 2), int(cy - size["height"] / 2)).click().perform()
        await asyncio.to_thread(click)

        async def explain_text():
            t = await js(browser, "const e = document.getElementById('explain'); return e ? e.innerText : ''")
            return t if "quarantined since" in t else None
        page = await wait_for(explain_text, 30, "the explain answer on the page")
        cli = subprocess.run([FK, "explain", "node", sick, "--kubeconfig", str(cluster.kubeconfig)],
                             check=True, capture_output=True, text=True).stdout
        line = next(l.strip() for l in cli.splitlines() if "quarantined since" in l)
        assert line in page, (line, page)
        assert f"node {sick}" in page and "taint fleetkeeper.io/quarantine" in page

        # the timeline shows what fleetkeeper did to it: filtered by the node, and by its rack; another
        # rack's filter hides it
        from selenium.webdriver.support.ui import Select

        await asyncio.to_thread(lambda: browser.find_element(By.ID, "tl-node").send_keys(sick))

        async def timeline_text():
            t = await js(browser, "const e = document.querySelector('#timeline ol'); return e ? e.innerText : ''")
            return t if f"Node/{sick}" in t else None
        await wait_for(timeline_text, 60, f"an Event about {sick} in the timeline")
        events = [e for e in (await kube.list(EVENTS))[0] if (e.get("regarding") or {}).get("name") == sick
                  and (e.get("reportingController") or "").startswith("fleetkeeper.io/")]
        shown = await timeline_text()
        assert events and all(e["reason"] in shown for e in events), (events, shown)
        await asyncio.to_thread(lambda: browser.find_element(By.ID, "tl-node").clear())
        rack_of_sick = (await kube.get(NODES, sick))["metadata"]["labels"][N.rack]
        other_rack = (await kube.get(NODES, nodes[2]))["metadata"]["labels"][N.rack]
        assert rack_of_sick != other_rack
        await asyncio.to_thread(lambda: Select(browser.find_element(By.ID, "tl-rack")).select_by_value(other_rack))
        await asyncio.sleep(1.0)
        assert f"Node/{sick}" not in await js(browser, "return document.getElementById('timeline').innerText")
        await asyncio.to_thread(lambda: Select(browser.find_element(By.ID, "tl-rack")).select_by_value(rack_of_sick))
        await wait_for(timeline_text, 30, f"{sick}'s Events under its rack's filter")

        # the team overlay paints each node in its team's colour, as its team label says
        await asyncio.to_thread(lambda: browser.find_element(By.CSS_SELECTOR, "#overlay option[value=team]").click())
        labels = {n["metadata"]["name"]: (n["metadata"].get("labels") or {}).get(N.team, "")
                  for n in (await kube.list(NODES))[0]}
        assert labels[nodes[0]] == "alpha" and labels[nodes[2]] == "beta" and not labels[nodes[1]]

        async def overlay_matches():
            got = await js(browser, "return Object.fromEntries(arguments[0].map(n => [n, "
                                    "[window.__fleet.pixel(n), window.__fleet.teamColour(window.__fleet.cell(n)[4])]]))",
                           list(labels))
            want_px = await js(browser, "return Object.fromEntries(Object.entries(arguments[0]).map("
                                        "([n, t]) => [n, window.__fleet.teamColour(t)]))", labels)
            bad = {n: (got[n], want_px[n]) for n in labels if got[n][0] != want_px[n] or got[n][1] != want_px[n]}
            return not bad or None
        await wait_for(overlay_matches, 30, "the team overlay matching the team labels")
        alpha, beta, none = await js(browser, "return [window.__fleet.teamColour('alpha'), "
                                              "window.__fleet.teamColour('beta'), window.__fleet.teamColour('')]")
        assert len({alpha, beta, none}) == 3
    finally:
        FaultPlan(faults).clear(None)
        await stop(task)
        await own.close()


async def test_fifty_open_pages_cost_the_api_server_nothing(cluster, kube, own_nodes):
    """Count every request the map's client sends: none while 50 pages stream, click and search."""
    _, nodes = own_nodes
    own = await cluster.connect()
    registry = CollectorRegistry()
    mgr = Manager(own, RuntimeSettings(server={"port": 0}, leader_election={"enabled": False}, dry_run=True),
                  registry=registry)
    ui = await ui_setup(mgr, UiOptions(port=0, components=COMPONENTS))
    task = await run_manager(mgr)

    def api_requests() -> float:
        return sum(s.value for m in registry.collect() if m.name == "fleetkeeper_api_requests"
                   for s in m.samples if s.name == "fleetkeeper_api_requests_total")
    try:
        await wait_for(lambda: asyncio.sleep(0, ui._runner is not None), 30, "the map listening")
        await asyncio.sleep(1.0)  # the panels' first computation (from the caches) has run
        before = api_requests()
        assert before > 0  # the counter counts: the informers' lists and watches are in it
        async with aiohttp.ClientSession() as http:
            streams = [await http.get(ui.url + "api/stream") for _ in range(50)]
            for r in streams:
                assert r.status == 200
                first = await r.content.readuntil(b"\n\n")
                assert b'"t":"hello"' in first
                snap = await r.content.readuntil(b"\n\n")
                assert b'"t":"snapshot"' in snap and nodes[0].encode() in snap
            for n in nodes:
                async with http.get(ui.url + "api/explain", params={"node": n}) as r:
                    body = await r.json()
                    assert r.status == 200 and body["sections"][0][0] == "node", body
            pod_items, _ = await kube.list(PODS)
            if pod_items:
                p = pod_items[0]["metadata"]
                async with http.get(ui.url + "api/explain", params={"pod": f"{p['namespace']}/{p['name']}"}) as r:
                    assert r.status == 200
            async with http.get(ui.url + "api/pods", params={"q": "kube"}) as r:
                assert r.status == 200
            # a change reaches every open page, still without a request
            await kube.patch(NODES, nodes[3], {"metadata": {"labels": {N.team: "gamma"}}})
            for r in streams:
                async def got_change(r=r):
                    line = await r.content.readuntil(b"\n\n")
                    return b'"t":"cells"' in line and nodes[3].encode() in line and b"gamma" in line
                while not await asyncio.wait_for(got_change(), 30):
                    pass
            for r in streams:
                r.close()
        assert api_requests() == before, "a page made the map call the API server"
    finally:
        await stop(task)
        await own.close()


async def test_cluster_mode_needs_a_token_that_may_get_nodes(cluster, kube):
    own = await cluster.connect()
    mgr = Manager(own, RuntimeSettings(server={"port": 0}, leader_election={"enabled": False}, dry_run=True),
                  registry=CollectorRegistry())
    ui = await ui_setup(mgr, UiOptions(port=0, auth="tokenreview", components=COMPONENTS))
    task = await run_manager(mgr)
    try:
        await wait_for(lambda: asyncio.sleep(0, ui._runner is not None), 30, "the map listening")
        async with aiohttp.ClientSession() as http:
            for path in ("", "api/stream", "api/explain?node=x", "api/pods?q=ab"):
                async with http.get(ui.url + path) as r:
                    assert r.status == 401, path
                    assert r.headers["WWW-Authenticate"].startswith("Bearer")
            async with http.get(ui.url + "api/stream", headers={"Authorization": "Bearer not-a-token"}) as r:
                assert r.status == 401
            # mallory is authenticated but may not get nodes
            mallory = cluster.state.user_tokens["mallory"]
            async with http.get(ui.url + "api/stream", headers={"Authorization": f"Bearer {mallory}"}) as r:
                assert r.status == 403
            # the admin may: the stream opens with what they may see
            admin = {"Authorization": f"Bearer {cluster.state.token}"}
            async with http.get(ui.url + "api/stream", headers=admin) as r:
                assert r.status == 200
                hello = await r.content.readuntil(b"\n\n")
                assert b'"caps":["config","events","nodes","pods"]' in hello
            async with http.get(ui.url, headers=admin) as r:
                assert r.status == 200 and "script-src 'self'" in r.headers["Content-Security-Policy"]
        # the server refuses to serve others without authentication
        with pytest.raises(errors.ConfigError):
            await ui_setup(mgr, UiOptions(host="0.0.0.0", port=0, auth="none"))
    finally:
        await stop(task)
        await own.close()


# --- the deploy manifests ----------------------------------------------------------------------------
DEPLOY = Path(__file__).resolve().parents[3] / "deploy" / "ui"
NS = "fleetkeeper-system"


async def test_manifests_are_accepted_and_their_rbac_is_enough(cluster, kube, own_nodes):
    """The map runs as deploy/ui's ServiceAccount (impersonated): its informers sync, it reviews a
    browser's token, and explain answers; the Deployment and Service are accepted as written."""
    import yaml

    from fleetkeeper.core.kube import (CLUSTERROLEBINDINGS, CLUSTERROLES, DEPLOYMENTS, NAMESPACES, SERVICEACCOUNTS,
                                       SERVICES)

    by_kind = {r.kind: r for r in (SERVICEACCOUNTS, CLUSTERROLES, CLUSTERROLEBINDINGS, DEPLOYMENTS, SERVICES)}
    if await kube.get_or_none(NAMESPACES, NS) is None:
        await kube.create(NAMESPACES, {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": NS}})
    for d in yaml.safe_load_all((DEPLOY / "rbac.yaml").read_text()):
        await kube.apply(by_kind[d["kind"]], d)
    for d in yaml.safe_load_all((DEPLOY / "ui.yaml").read_text()):
        await kube.create(by_kind[d["kind"]], d, d["metadata"].get("namespace"), dry_run=True)
    _, nodes = own_nodes
    own = await cluster.connect()
    as_sa = own.as_user(f"system:serviceaccount:{NS}:fleetkeeper-ui",
                        ["system:serviceaccounts", f"system:serviceaccounts:{NS}", "system:authenticated"])
    mgr = Manager(as_sa, RuntimeSettings(namespace=NS, server={"port": 0}, leader_election={"enabled": False},
                                         dry_run=True), registry=CollectorRegistry())
    ui = await ui_setup(mgr, UiOptions(port=0, auth="tokenreview", components=COMPONENTS))
    task = asyncio.create_task(mgr.run())
    try:
        await mgr.wait_synced(60)  # every list and watch allowed
        await wait_for(lambda: asyncio.sleep(0, ui._runner is not None), 30, "the map listening")
        admin = {"Authorization": f"Bearer {cluster.state.token}"}
        async with aiohttp.ClientSession() as http:
            async with http.get(ui.url + "api/stream", headers=admin) as r:  # TokenReview + SARs allowed
                assert r.status == 200
                assert b'"caps":["config","events","nodes","pods"]' in await r.content.readuntil(b"\n\n")
                assert nodes[0].encode() in await r.content.readuntil(b"\n\n")
            async with http.get(ui.url + "api/explain", params={"node": nodes[0]}, headers=admin) as r:
                body = await r.json()
                assert r.status == 200, body
                text = "\n".join(line for _, lines in body["sections"] for line in lines)
                assert "could not explain" not in text, text
    finally:
        await stop(task)
        await own.close()


async def test_run_manager_serves_the_map_and_says_where(cluster):
    """``fleetkeeper run --ui`` / ``fleetkeeper ui`` / ``make demo``: the manager serves the map and reports
    its URL once it listens; the page answers and the stream opens."""
    from fleetkeeper.cli.main import run_manager

    urls: list[str] = []
    listening, stop = asyncio.Event(), asyncio.Event()

    def on_ui(server) -> None:
        urls.append(server.url)
        listening.set()
    settings = RuntimeSettings(kubeconfig=str(cluster.kubeconfig), dry_run=True, controllers=[],
                               server={"port": 0}, leader_election={"enabled": False})
    task = asyncio.create_task(run_manager(settings, stop=stop, ui=UiOptions(port=0, components=COMPONENTS),
                                           registry=CollectorRegistry(), on_ui=on_ui))
    try:
        await asyncio.wait_for(listening.wait(), 60)
        async with aiohttp.ClientSession() as http:
            async with http.get(urls[0]) as r:
                assert r.status == 200 and "fleet map" in await r.text()
            async with http.get(urls[0] + "api/stream") as r:
                assert r.status == 200 and b'"t":"hello"' in await r.content.readuntil(b"\n\n")
    finally:
        stop.set()
        await asyncio.wait_for(task, 60)
