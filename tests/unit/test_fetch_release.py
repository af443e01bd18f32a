"""The download path of hack/build-controlplane.sh, against a local mirror."""

import hashlib
import http.server
import os
import subprocess
import tarfile
import threading
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
VERS = dict(line.split("=", 1) for line in (ROOT / "hack/versions.env").read_text().splitlines()
            if line and not line.startswith("#"))


def _sha(p: Path) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


def make_mirror(root: Path, corrupt: str | None = None) -> None:
    k, e, w = VERS["KUBERNETES_VERSION"], VERS["ETCD_VERSION"], VERS["KWOK_VERSION"]
    kdir = root / "kubernetes/release" / k / "bin/linux/amd64"
    kdir.mkdir(parents=True)
    for b in ("kube-apiserver", "kube-controller-manager", "kube-scheduler", "kubectl"):
        f = kdir / b
        f.write_text(f"#!/bin/sh\necho {b}\n")
        (kdir / f"{b}.sha256").write_text(("0" * 64 if corrupt == b else _sha(f)) + "\n")
    edir = root / "etcd" / e
    src = root / "src" / f"etcd-{e}-linux-amd64"
    src.mkdir(parents=True)
    (src / "etcd").write_text("#!/bin/sh\necho etcd\n")
    edir.mkdir(parents=True)
    tgz = edir / f"etcd-{e}-linux-amd64.tar.gz"
    with tarfile.open(tgz, "w:gz") as t:
        t.add(src, arcname=src.name)
    (edir / "SHA256SUMS").write_text(f"{_sha(tgz)}  {tgz.name}\n")
    wdir = root / "kwok" / w
    wdir.mkdir(parents=True)
    (wdir / "kwok-linux-amd64").write_text("#!/bin/sh\necho kwok\n")
    (wdir / "stage-fast.yaml").write_text("kind: Stage\n")
    (wdir / "checksums.txt").write_text(
        f"{_sha(wdir / 'kwok-linux-amd64')}  kwok-linux-amd64\n{_sha(wdir / 'stage-fast.yaml')}  stage-fast.yaml\n")


@pytest.fixture
def serve():
    servers = []

    def start(directory: Path) -> str:
        handler = lambda *a, **kw: http.server.SimpleHTTPRequestHandler(*a, directory=str(directory), **kw)  # noqa: E731
        httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
        threading.Thread(target=httpd.serve_forever, daemon=True).start()
        servers.append(httpd)
        return f"http://127.0.0.1:{httpd.server_address[1]}"

    yield start
    for s in servers:
        s.shutdown()
        s.server_close()


def run_build(url: str, cache: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, FLEETKEEPER_RELEASE_URL=url, FLEETKEEPER_CACHE=str(cache))
    return subprocess.run(["bash", str(ROOT / "hack/build-controlplane.sh")], env=env, capture_output=True,
                          text=True, timeout=120)


def test_download_path_installs_verified_binaries(tmp_path, serve):
    make_mirror(tmp_path / "mirror")
    url = serve(tmp_path / "mirror")
    r = run_build(url, tmp_path / "cache")
    assert r.returncode == 0, r.stderr
    bindir = Path(r.stdout.strip().splitlines()[-1])
    for b in ("etcd", "kube-apiserver", "kube-controller-manager", "kube-scheduler", "kubectl", "kwok"):
        assert subprocess.run([bindir / b], capture_output=True, text=True).stdout.strip() == b
    assert (bindir / "kwok-stages/stage-fast.yaml").exists()
    # second run reuses the cache without downloading
    r2 = run_build("http://127.0.0.1:9", tmp_path / "cache")
    assert r2.returncode == 0 and "reusing cached binaries" in r2.stderr


def test_download_path_rejects_bad_checksum(tmp_path, serve):
    make_mirror(tmp_path / "mirror", corrupt="kube-scheduler")
    r = run_build(serve(tmp_path / "mirror"), tmp_path / "cache")
    assert r.returncode != 0
    assert "checksum mismatch for kube-scheduler" in r.stderr
