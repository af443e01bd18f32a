#!/usr/bin/env bash
# Fetches the CustomResourceDefinitions of Cluster API (Machine, MachineSet,
# MachineDeployment, Cluster) and Karpenter (NodeClaim, NodePool) from their
# published Go modules through the Go module proxy (checksums verified by the
# go command against the checksum database), into a cache keyed by their
# versions (hack/versions.env). Prints the CRD directory on the last line.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source=versions.env
source "$here/versions.env"

cache_root="${FLEETKEEPER_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/fleetkeeper}"
dir="$cache_root/crds/capi-${CLUSTER_API_VERSION}_karpenter-${KARPENTER_VERSION}"
log() { printf '[fetch-crds] %s\n' "$*" >&2; }
die() { printf '[fetch-crds] error: %s\n' "$*" >&2; exit 1; }

capi_files=(cluster.x-k8s.io_machines.yaml cluster.x-k8s.io_machinesets.yaml
            cluster.x-k8s.io_machinedeployments.yaml cluster.x-k8s.io_clusters.yaml)
karpenter_files=(karpenter.sh_nodeclaims.yaml karpenter.sh_nodepools.yaml)

have_all() {
  local f
  for f in "${capi_files[@]}" "${karpenter_files[@]}"; do [[ -s "$dir/$f" ]] || return 1; done
}

if have_all; then
  log "reusing cached CRDs in $dir"
  echo "$dir"
  exit 0
fi
command -v go >/dev/null 2>&1 || die "no 'go' on PATH (needed to fetch the Cluster API and Karpenter modules)"

# The module's directory in the module cache. `go mod download` verifies the zip's checksum; a newer
# `go` directive in the module's go.mod (Karpenter asks for a newer toolchain than this one) only makes
# it print an error after the verified download, so the directory is looked up either way.
module_dir() {
  local mod="$1" ver="$2" d
  GOFLAGS=-mod=mod GOTOOLCHAIN=local go mod download -json "$mod@$ver" >/dev/null 2>&1 || true
  d="$(go env GOMODCACHE)/$mod@$ver"
  [[ -d "$d" ]] || die "could not fetch $mod@$ver through the module proxy ($(go env GOPROXY))"
  echo "$d"
}

mkdir -p "$dir"
capi="$(module_dir sigs.k8s.io/cluster-api "$CLUSTER_API_VERSION")"
karp="$(module_dir sigs.k8s.io/karpenter "$KARPENTER_VERSION")"
for f in "${capi_files[@]}"; do
  install -m 0644 "$capi/core/config/crd/bases/$f" "$dir/$f"
done
for f in "${karpenter_files[@]}"; do
  install -m 0644 "$karp/pkg/apis/crds/$f" "$dir/$f"
done
have_all || die "CRDs missing in $dir"
log "CRDs of cluster-api ${CLUSTER_API_VERSION} and karpenter ${KARPENTER_VERSION} in $dir"
echo "$dir"
