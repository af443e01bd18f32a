"""A real EC2/Auto Scaling emulator (moto in server mode, its own process) and a
recording HTTP server that answers GCE/Azure requests with recorded response shapes."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def moto_url(tmp_path_factory):
    port = free_port()
    log = tmp_path_factory.mktemp("moto") / "moto.log"
    with open(log, "w") as f:
        proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                                stdout=f, stderr=subprocess.STDOUT, cwd=log.parent,
                                env={**os.environ, "MOTO_RECORDER_FILEPATH": str(log.parent / "recording")})
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                urllib.request.urlopen(url + "/moto-api/", timeout=2).read()
                break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise AssertionError(f"moto server did not start: {log.read_text()[-2000:]}")
                time.sleep(0.2)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()


@pytest.fixture
def aws_env(monkeypatch):
    for k, v in {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_SESSION_TOKEN": "testing",
                 "AWS_DEFAULT_REGION": "us-east-1"}.items():
        monkeypatch.setenv(k, v)
    monkeypatch.delenv("AWS_PROFILE", raising=False)


class Recorder:
    """Routes (method, path prefix) -> (status, json body, headers); records every request."""

    def __init__(self) -> None:
        self.routes: list[tuple[str, str, int, object, dict]] = []
        self.requests: list[tuple[str, str, object]] = []
        self.server: ThreadingHTTPServer | None = None

    def route(self, method: str, path: str, status: int, body: object, headers: dict | None = None) -> None:
        self.routes.insert(0, (method, path, status, body, headers or {}))

    @property
    def url(self) -> str:
        assert self.server is not None
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def calls(self, method: str | None = None) -> list[tuple[str, str, object]]:
        return [r for r in self.requests if method is None or r[0] == method]


@pytest.fixture
def recorder():
    rec = Recorder()

    class H(BaseHTTPRequestHandler):
        def log_message(self, *a):  # quiet
            pass

        def _do(self):
            n = int(self.headers.get("Content-Length") or 0)
            raw = self.rfile.read(n) if n else b""
            try:
                body = json.loads(raw) if raw else None
            except ValueError:
                body = raw.decode(errors="replace")
            path = self.path.split("?", 1)[0]
            rec.requests.append((self.command, self.path, body))
            for method, prefix, status, rbody, headers in rec.routes:
                if method == self.command and path == prefix:
                    data = json.dumps(rbody).encode()
                    self.send_response(status)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(data)))
                    for k, v in headers.items():
                        self.send_header(k, v)
                    self.end_headers()
                    self.wfile.write(data)
                    return
            data = json.dumps({"error": {"code": 404, "message": f"no route {self.command} {path}",
                                         "status": "NOT_FOUND"}}).encode()
            self.send_response(404)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        do_GET = do_POST = do_DELETE = do_PUT = do_PATCH = _do

    srv = ThreadingHTTPServer(("127.0.0.1", 0), H)
    rec.server = srv
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()
    yield rec
    srv.shutdown()
    srv.server_close()


os.environ.setdefault("NO_PROXY", "127.0.0.1,localhost")
