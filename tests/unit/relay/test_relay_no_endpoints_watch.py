"""No fleetkeeper component lists or watches the Endpoints resource (at 7,500
nodes every Endpoints change is sent to every watcher; EndpointSlices are
the scalable replacement). Scans every source file under src/fleetkeeper."""

from __future__ import annotations

import ast
import re
from pathlib import Path

SRC = Path(__file__).resolve().parents[3] / "src" / "fleetkeeper"


def offending_uses(tree: ast.AST) -> list[int]:
    """Lines that build a Resource for plural "endpoints", or name the Endpoints
    API path, or watch/list it through a kubectl-style argument."""
    bad = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and isinstance(node.value, str):
            v = node.value
            if v == "endpoints" or re.search(r"/api/v1/(namespaces/[^/]+/)?endpoints\b", v) \
                    or re.search(r"\b(get|watch|list)\b.*\bendpoints\b", v, re.I) and "endpointslices" not in v:
                bad.append(node.lineno)
    return bad


def test_scanner_finds_an_endpoints_watch():
    snippet = 'ENDPOINTS = Resource("", "v1", "endpoints", "Endpoints", True)\nkube.watch(ENDPOINTS, "0")\n'
    assert offending_uses(ast.parse(snippet)) == [1]
    assert offending_uses(ast.parse('u = "/api/v1/namespaces/x/endpoints?watch=1"')) == [1]
    assert offending_uses(ast.parse('R = Resource("discovery.k8s.io", "v1", "endpointslices", "E", True)')) == []


def test_no_component_uses_endpoints():
    files = sorted(SRC.rglob("*.py"))
    assert len(files) > 20  # the scan really covers the tree
    found = []
    for path in files:
        for line in offending_uses(ast.parse(path.read_text(), str(path))):
            found.append(f"{path.relative_to(SRC.parent)}:{line}")
    assert not found, "Endpoints is used (use EndpointSlices): " + ", ".join(found)
