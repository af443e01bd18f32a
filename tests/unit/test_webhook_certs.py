"""The webhook server's certificate: reloaded when its files change (new connections
get the new one, no restart), a broken pair never replaces a good one; one mounted
certificate shared by every replica; who deletes webhook configurations."""

from __future__ import annotations

import asyncio
import gc
import socket
import ssl
from pathlib import Path

import pytest
from cryptography import x509
from prometheus_client import CollectorRegistry

from fleetkeeper.core.pki import cert_pem, make_ca, make_leaf, mounted_serving_cert, write_key
from fleetkeeper.core.webhook import Admission, ServingThread, WebhookServer
from fleetkeeper.teams.options import WebhookOptions


def _issue(directory: Path, ca, cn: str) -> None:
    ca_key, ca_cert = ca
    key, leaf = make_leaf(ca_key, ca_cert, cn, ["127.0.0.1", "localhost"])
    write_key(directory / "tls.key", key)
    (directory / "tls.crt").write_bytes(cert_pem(leaf))
    (directory / "ca.crt").write_bytes(cert_pem(ca_cert))


async def _served_cn(port: int, ca_file: Path) -> str:
    ctx = ssl.create_default_context(cafile=str(ca_file))
    _, writer = await asyncio.open_connection("127.0.0.1", port, ssl=ctx)
    try:
        der = writer.get_extra_info("ssl_object").getpeercert(binary_form=True)
        return x509.load_der_x509_certificate(der).subject.rfc4514_string()
    finally:
        writer.close()
        await writer.wait_closed()


async def _until(pred, timeout=30.0):
    for _ in range(int(timeout / 0.05)):
        if await pred():
            return
        await asyncio.sleep(0.05)
    raise AssertionError("condition not met in time")


async def test_new_connections_get_a_rotated_certificate_without_restart(tmp_path):
    ca = make_ca("test-ca")
    _issue(tmp_path, ca, "first")
    registry = CollectorRegistry()
    server = WebhookServer(str(tmp_path / "tls.crt"), str(tmp_path / "tls.key"), registry=registry,
                           cert_reload_interval=0.05)
    server.add("ok", lambda req: Admission())
    await server.start()
    try:
        assert await _served_cn(server.port, tmp_path / "ca.crt") == "CN=first"
        # a Secret update: the kubelet swaps the files; the port and the process stay
        _issue(tmp_path, ca, "second")

        async def rotated():
            return await _served_cn(server.port, tmp_path / "ca.crt") == "CN=second"
        await _until(rotated)
        assert registry.get_sample_value("fleetkeeper_webhook_certificate_reloads_total", {"result": "loaded"}) == 1
        assert registry.get_sample_value("fleetkeeper_webhook_certificate_expiry_timestamp_seconds") > 0
    finally:
        await server.stop()


async def test_a_mismatched_pair_never_replaces_the_good_one(tmp_path):
    ca = make_ca("test-ca")
    _issue(tmp_path, ca, "good")
    registry = CollectorRegistry()
    server = WebhookServer(str(tmp_path / "tls.crt"), str(tmp_path / "tls.key"), registry=registry,
                           cert_reload_interval=0.05)
    await server.start()
    try:
        other = tmp_path / "other"
        other.mkdir()
        _issue(other, ca, "half-written")
        (tmp_path / "tls.crt").write_bytes((other / "tls.crt").read_bytes())  # new cert, old key

        async def refused():
            return (registry.get_sample_value("fleetkeeper_webhook_certificate_reloads_total",
                                              {"result": "error"}) or 0) >= 1
        await _until(refused)
        assert await _served_cn(server.port, tmp_path / "ca.crt") == "CN=good"
        (tmp_path / "tls.key").write_bytes((other / "tls.key").read_bytes())  # the pair completes

        async def completed():
            return await _served_cn(server.port, tmp_path / "ca.crt") == "CN=half-written"
        await _until(completed)
    finally:
        await server.stop()


def test_mounted_certificate(tmp_path):
    assert mounted_serving_cert(tmp_path) is None
    _issue(tmp_path, make_ca("ca"), "svc")
    sc = mounted_serving_cert(tmp_path)
    assert sc is not None and sc.ca == tmp_path / "ca.crt"
    (tmp_path / "ca.crt").unlink()
    assert mounted_serving_cert(tmp_path).ca == tmp_path / "tls.crt"


@pytest.mark.parametrize("opts,unregisters", [
    ({}, True),                                              # a local process registered by URL
    ({"service": "fleetkeeper-system/fleetkeeper-teams-webhook:443"}, False),  # replicas behind a Service
    ({"service": "ns/svc", "unregisterOnExit": True}, True),  # said explicitly
])
def test_a_stopping_replica_never_deletes_a_service_webhook(opts, unregisters):
    assert WebhookOptions.model_validate(opts).unregisters_on_exit is unregisters


# --- one webhook server per process -----------------------------------------------------------
def test_one_bind_address_for_every_component():
    from fleetkeeper.core.webhook import WebhookAsk, resolve_bind

    a = WebhookAsk("teams", ("t",), "127.0.0.1", 0)
    b = WebhookAsk("capacity", ("c",), "127.0.0.1", 9445)
    c = WebhookAsk("preflight", ("p",), "0.0.0.0", 9443)
    assert resolve_bind([a]) == ("127.0.0.1", 0, [])
    assert resolve_bind([a, b]) == ("127.0.0.1", 9445, [])  # a fixed port wins over any free port
    host, port, warnings = resolve_bind([a, b, c])
    assert (host, port) == ("0.0.0.0", 9445) and len(warnings) == 1 and "preflight" in warnings[0]
    assert resolve_bind([a, b, c], host="127.0.0.1", port=9000)[:2] == ("127.0.0.1", 9000)  # the manager's
    assert resolve_bind([]) == ("127.0.0.1", 0, [])


async def _post(port: int, path: str, ca: Path) -> dict:
    import json

    import aiohttp

    review = {"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview",
              "request": {"uid": "u1", "kind": {"kind": "Pod"}, "operation": "CREATE", "namespace": "ns",
                          "name": "p", "object": {"metadata": {"name": "p"}}, "userInfo": {}}}
    ctx = ssl.create_default_context(cafile=str(ca))
    async with aiohttp.ClientSession() as s:
        async with s.post(f"https://127.0.0.1:{port}/{path}", data=json.dumps(review), ssl=ctx) as r:
            assert r.status == 200, await r.text()
            return (await r.json())["response"]


async def test_components_of_one_manager_share_one_server_port_and_certificate(tmp_path):
    from fleetkeeper.core import errors
    from fleetkeeper.core.manager import Manager
    from fleetkeeper.core.settings import RuntimeSettings
    from fleetkeeper.core.webhook import WebhookAsk

    class NoKube:
        metrics = None

    mgr = Manager(NoKube(), RuntimeSettings(server={"port": 0}), registry=CollectorRegistry())  # type: ignore
    one = mgr.webhook(WebhookAsk("teams", ("a",), "127.0.0.1", 0, ("teams.fk.svc",), cert_dir=tmp_path),
                      {"a": lambda req: Admission(True)})
    two = mgr.webhook(WebhookAsk("capacity", ("b",), "127.0.0.1", 0, ("capacity.fk.svc",)),
                      {"b": lambda req: Admission(False, "no")})
    assert one is two and [r.name for r in mgr._runnables].count("webhooks") == 1
    with pytest.raises(errors.ConfigError):
        mgr.webhook(WebhookAsk("other", ("a",)), {"a": lambda req: Admission(True)})
    # one certificate, covering both components' names
    leaf = x509.load_pem_x509_certificate((tmp_path / "tls.crt").read_bytes())
    sans = set(leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
               .get_values_for_type(x509.DNSName))
    assert {"teams.fk.svc", "capacity.fk.svc"} <= sans and one.ca_bundle == (tmp_path / "ca.crt").read_bytes()
    task = asyncio.create_task(one.run())
    try:
        await asyncio.wait_for(one.started.wait(), 30)
        assert (await _post(one.server.port, "a", tmp_path / "ca.crt"))["allowed"] is True
        assert (await _post(one.server.port, "b", tmp_path / "ca.crt"))["allowed"] is False
        assert one.url("b") == f"https://127.0.0.1:{one.server.port}/b"
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


def _silent_tls_client(port: int, ca_file: Path) -> socket.socket:
    """A client that completes the TLS handshake, then never reads again: it will never answer the
    server's close_notify (a peer that went away, or a kube-apiserver still busy)."""
    ctx = ssl.create_default_context(cafile=str(ca_file))
    raw = socket.create_connection(("127.0.0.1", port), timeout=60)
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = ctx.wrap_bio(incoming, outgoing, server_hostname="127.0.0.1")
    while True:
        try:
            tls.do_handshake()
            break
        except ssl.SSLWantReadError:
            raw.sendall(outgoing.read())
            incoming.write(raw.recv(65536))
    raw.sendall(outgoing.read())
    return raw


def _until_closed(raw: socket.socket) -> None:
    """Read raw TCP until the server's side is closed (FIN or RST)."""
    try:
        while raw.recv(65536):
            pass
    except ConnectionResetError:
        pass


async def _serving(tmp_path, **thread_kw) -> tuple[WebhookServer, ServingThread]:
    """A webhook server with one allow-all handler, started on a serving thread of its own."""
    _issue(tmp_path, make_ca("test-ca"), "srv")
    server = WebhookServer(str(tmp_path / "tls.crt"), str(tmp_path / "tls.key"), registry=CollectorRegistry())
    server.add("ok", lambda req: Admission())
    thread = ServingThread(**thread_kw)
    await thread.call(server.start())
    return server, thread


async def test_stopping_the_serving_thread_closes_connections_whose_peer_never_answers(tmp_path):
    """A connection mid TLS close when the serving thread stops is cut off (bounded TLS shutdown)
    before the thread's loop stops, never left open for the garbage collector."""
    server, thread = await _serving(tmp_path)
    raw = await asyncio.to_thread(_silent_tls_client, server.port, tmp_path / "ca.crt")
    try:
        await thread.call(server.stop())  # closes the idle keep-alive connection: close_notify, no answer
        await thread.close()
        gc.collect()  # a transport left open would warn here (an error under this suite's warning filter)
        await asyncio.to_thread(_until_closed, raw)  # returns only once the server closed the socket
    finally:
        raw.close()


async def test_stopping_the_serving_thread_closes_connections_still_in_their_handshake(tmp_path):
    """A connection accepted but not yet through its TLS handshake (aiohttp has not seen it, so its
    shutdown cannot close it) is cut off when the serving thread stops, never left to the garbage
    collector (an unclosed-transport warning, an error under this suite's warning filter)."""
    server, thread = await _serving(tmp_path, settle_s=0.5)
    raw = socket.create_connection(("127.0.0.1", server.port), timeout=60)  # never sends a ClientHello
    try:
        async def accepted() -> int:
            return len(asyncio.get_running_loop()._selector.get_map())  # type: ignore[attr-defined]
        for _ in range(500):  # the server's loop has accepted it (listener + wake-up socket + this one)
            if await thread.call(accepted()) >= 3:
                break
            await asyncio.sleep(0.01)
        await thread.call(server.stop())
        await thread.close()
        del thread, server  # what still held the loop (and so the connection) goes too
        gc.collect()
        await asyncio.to_thread(_until_closed, raw)  # returns only once the server closed the socket
    finally:
        raw.close()


async def test_stopping_the_serving_thread_closes_connections_its_server_no_longer_knows(tmp_path):
    """The serving thread stops while a connection is still open that the server's own shutdown did
    not close (here: the server was never stopped; in the manager: a connection whose handshake ended
    after the server's shutdown). Its handler is cancelled, its TLS close waits for a peer that never
    answers, and the thread's loop must still not stop and close with that connection (or the
    listening socket) left to the garbage collector."""
    server, thread = await _serving(tmp_path, settle_s=0.5)
    raw = await asyncio.to_thread(_silent_tls_client, server.port, tmp_path / "ca.crt")
    try:
        await thread.close()
        del thread, server  # what still held the loop (and so the connection) goes too
        gc.collect()  # a transport or socket left open would warn here (an error under this suite's filter)
        await asyncio.to_thread(_until_closed, raw)  # returns only once the server closed the socket
    finally:
        raw.close()


async def test_stopping_the_serving_thread_closes_connections_nothing_watches(tmp_path):
    """A connection whose reading is paused (a request body larger than the buffers, the TLS layer
    holding back) is open but watched by no selector callback. The serving thread must still close it
    before its loop stops, never leave it to the garbage collector (an unclosed-transport warning, an
    error under this suite's warning filter)."""
    server, thread = await _serving(tmp_path, settle_s=0.5)
    raw = await asyncio.to_thread(_silent_tls_client, server.port, tmp_path / "ca.crt")
    try:
        async def pause() -> int:
            paused = 0
            for key in list(asyncio.get_running_loop()._selector.get_map().values()):  # type: ignore[attr-defined]
                for handle in key.data or ():
                    owner = getattr(getattr(handle, "_callback", None), "__self__", None)
                    if isinstance(owner, asyncio.Transport) and not owner.is_closing():
                        owner.pause_reading()
                        paused += 1
            return paused
        paused = 0
        for _ in range(500):  # the server's loop has accepted the connection and made its transport
            paused = await thread.call(pause())
            if paused:
                break
            await asyncio.sleep(0.01)
        assert paused == 1
        await thread.close()
        del thread, server  # what still held the loop (and so the connection) goes too
        gc.collect()  # a transport or socket left open would warn here (an error under this suite's filter)
        await asyncio.to_thread(_until_closed, raw)  # returns only once the server closed the socket
    finally:
        raw.close()
