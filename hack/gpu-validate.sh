#!/usr/bin/env bash
# Run the preflight validation suite on a real GPU machine and print its figures.
# Installs nothing outside a venv (./.venv-gpu by default). Needs: python3 (>=3.11), an NVIDIA driver.
# Optional: PyTorch with CUDA (compute, HBM and NCCL checks), dcgmi, nccl-tests' all_reduce_perf on PATH.
#   hack/gpu-validate.sh [--profile h100-8x] [--config my-thresholds.yaml]
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv-gpu}
if [ ! -x "$VENV/bin/python" ]; then
  python3 -m venv "$VENV"
  "$VENV/bin/pip" install -q --upgrade pip
  if [ -f requirements.lock ]; then "$VENV/bin/pip" install -q -r requirements.lock; fi
  "$VENV/bin/pip" install -q --no-deps -e .
  # PyTorch is optional: without it the compute/HBM/NCCL checks say "skipped: torch not installed".
  "$VENV/bin/pip" install -q torch || echo "torch not installed: compute, HBM and NCCL checks will be skipped"
fi
nvidia-smi -L || echo "nvidia-smi not found: NVML checks will say 'skipped: no GPU'"
out=$(mktemp)
set +e
"$VENV/bin/fleetkeeper" preflight validate --json "$@" >"$out"
rc=$?
set -e
"$VENV/bin/python" - "$out" <<'PY'
import json, sys
r = json.load(open(sys.argv[1]))
print(f"node {r['node']} profile {r['profile']} passed={r['passed']} ({r['duration']:.1f}s)")
for c in r["checks"]:
    st = "skip" if c["skipped"] else ("pass" if c["passed"] else "FAIL")
    print(f"  {st:4} {c['check']:12} value={c['value']!s:>10} threshold={c['threshold']!s:>10} "
          f"{c['duration']:7.2f}s  {c['detail']}")
print("GPUs:", ", ".join(r["gpus"]) or "none")
PY
echo "full JSON: $out (exit $rc: 0 passed, 1 failed, 2 bad input)"
# The health agent's NVML read path and, with FLEETKEEPER_GPU_RESET=<index>, the node-local GPU reset
# (nvidia-smi --gpu-reset, which refuses a GPU with processes on it: then it reports failed, as in production).
"$VENV/bin/python" - <<'PY' || true
import asyncio, os
from fleetkeeper.health.gpu import NvmlBackend
from fleetkeeper.health.actions import HostActions, new_request
be = NvmlBackend()
for g in be.sample():
    print(f"  NVML GPU {g.index} {g.uuid} lost={g.lost} ecc_uncorrected_volatile={g.ecc_uncorrected_volatile} "
          f"remap_pending={g.remap_pending} xids={g.xids}")
idx = os.environ.get("FLEETKEEPER_GPU_RESET")
if idx is not None:
    try:
        print("reset:", asyncio.run(HostActions(be).perform(new_request("reset", "local", "local", 0, 60, gpu=idx))))
    except Exception as exc:  # noqa: BLE001
        print("reset refused or failed:", exc)
PY
exit $rc
