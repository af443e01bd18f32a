# Two commands do all set-up on a fresh machine:
#   make demo   - build/reuse the control plane, start it, run fleetkeeper, play a scenario, summary
#   make test   - every test (unit, layering, promtool, network namespaces, end-to-end)
SHELL := /bin/bash
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
NODES ?= 200
KEEP ?=

.PHONY: demo test unit e2e bench lint deps system-deps controlplane helm realnode images chart-lint clean lock

$(STAMP): pyproject.toml requirements.lock
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip uv
	$(BIN)/uv pip install -q --python $(BIN)/python -r requirements.lock
	$(BIN)/uv pip install -q --python $(BIN)/python --no-deps -e .
	touch $(STAMP)

deps: $(STAMP) system-deps

# Debian packages the tests and demo use (promtool, iptables, tc, ip netns, chromium).
system-deps:
	@bash hack/install-system-deps.sh

controlplane: deps
	@bash hack/build-controlplane.sh >/dev/null

# Helm, built from its Go module (HELM_VERSION in hack/versions.env), cached.
helm: deps
	@bash hack/build-helm.sh >/dev/null

# The real node's binaries (kubelet, kube-proxy, containerd 2.x, CoreDNS, pause), cached.
realnode: deps
	@bash hack/build-realnode.sh >/dev/null

# Images built here with no registry: Debian base (mmdebstrap), the fleetkeeper image and
# the validator image (buildah), tagged with the package version.
images: deps
	@bash hack/build-images.sh

chart-lint: helm
	$$(bash hack/build-helm.sh) lint --strict charts/fleetkeeper

lock:
	$(BIN)/uv pip compile -q pyproject.toml --extra dev --python-version 3.11 -o requirements.lock

demo: controlplane
	NODES=$(NODES) KEEP=$(KEEP) $(BIN)/fleetkeeper demo

lint: deps
	$(BIN)/lint-imports

unit: deps
	$(BIN)/pytest -q -m "not e2e" -p no:cacheprovider

# The real-node lane (tests/e2e/realnode: the chart on a real kubelet + containerd node) runs
# by default as root; FLEETKEEPER_REAL_NODE=0 leaves it out. It must not run beside another
# real-node lane or the network-namespace tests (pytest runs them one after the other).
FLEETKEEPER_REAL_NODE ?= $(if $(filter 0,$(shell id -u)),1,0)
export FLEETKEEPER_REAL_NODE
test: controlplane helm lint chart-lint $(if $(filter 1,$(FLEETKEEPER_REAL_NODE)),realnode images)
	$(BIN)/pytest -q -p no:cacheprovider

bench: controlplane
	@for b in bench/bench_*.py; do echo "== $$b"; $(BIN)/python $$b || exit 1; done

clean:
	-$(BIN)/fleetkeeper cluster down
	rm -rf $(VENV) build *.egg-info
