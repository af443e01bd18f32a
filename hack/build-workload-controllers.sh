#!/usr/bin/env bash
# Builds (or reuses) the workload controllers the end-to-end tests run against
# the local control plane, from their Go modules through the module proxy:
#   jobset-controller  sigs.k8s.io/jobset@JOBSET_VERSION            (main.go)
#   mpi-operator       github.com/kubeflow/mpi-operator@MPI_OPERATOR_VERSION (cmd/mpi-operator)
# and collects the CRDs of those and of the kinds whose controllers are not
# run here (PyTorchJob: training-operator; LeaderWorkerSet: lws; RayJob and
# RayCluster: kuberay), each from its own module.
#
# Each piece is cached under its own version (never under the control plane's
# key): $cache/bin/<name>-<version>/ and $cache/crds/<name>-<version>/.
# Usage: build-workload-controllers.sh [all|crds|jobset-controller,mpi-operator]
# Prints "name=dir" lines on stdout, one per piece.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source=versions.env
source "$here/versions.env"
cache_root="${FLEETKEEPER_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/fleetkeeper}"
export GOTOOLCHAIN=local GOFLAGS=-mod=readonly

log() { printf '[build-workload-controllers] %s\n' "$*" >&2; }
die() { printf '[build-workload-controllers] error: %s\n' "$*" >&2; exit 1; }

command -v go >/dev/null 2>&1 || die "no 'go' on PATH (Go 1.25 or newer is needed)"
[[ "$(go env GOPROXY)" != off ]] || die "GOPROXY is 'off': the Go module proxy is needed"

# module source dir (downloaded through the proxy into the module cache)
moddir() {
  local dir
  dir="$(go mod download -json "$1@$2" | sed -n 's/^[[:space:]]*"Dir": "\(.*\)",$/\1/p')"
  [[ -n "$dir" && -d "$dir" ]] || die "could not download $1@$2 from the module proxy"
  echo "$dir"
}

# build NAME MODULE VERSION PACKAGE -> $cache/bin/NAME-VERSION/NAME
build() {
  local name=$1 module=$2 version=$3 pkg=$4
  local out="$cache_root/bin/$name-$version"
  if [[ -x "$out/$name" ]]; then
    log "reusing $out/$name"
  else
    local src work start=$SECONDS
    src="$(moddir "$module" "$version")"
    work="$cache_root/build/$name-$version"
    rm -rf "$work" && mkdir -p "$work" "$out"
    cp -r "$src/." "$work/" && chmod -R u+w "$work"
    log "go build $module@$version ($pkg) ..."
    (cd "$work" && CGO_ENABLED=0 go build -trimpath -o "$out/$name.tmp" "$pkg") \
      || die "go build of $module@$version failed"
    mv "$out/$name.tmp" "$out/$name"
    rm -rf "$work"
    log "$name built in $((SECONDS - start))s"
  fi
  echo "$name=$out"
}

# crds NAME MODULE VERSION FILE... -> $cache/crds/NAME-VERSION/
crds() {
  local name=$1 module=$2 version=$3; shift 3
  local out="$cache_root/crds/$name-$version"
  if [[ ! -f "$out/.complete" ]]; then
    local src f
    src="$(moddir "$module" "$version")"
    mkdir -p "$out"
    for f in "$@"; do
      [[ -f "$src/$f" ]] || die "$module@$version has no $f"
      cp "$src/$f" "$out/" && chmod u+w "$out/$(basename "$f")"
    done
    touch "$out/.complete"
  fi
  echo "crds-$name=$out"
}

want="${1:-all}"
crds jobset sigs.k8s.io/jobset "$JOBSET_VERSION" config/components/crd/bases/jobset.x-k8s.io_jobsets.yaml
crds mpi-operator github.com/kubeflow/mpi-operator "$MPI_OPERATOR_VERSION" manifests/base/kubeflow.org_mpijobs.yaml
crds training-operator github.com/kubeflow/training-operator "$TRAINING_OPERATOR_VERSION" \
  manifests/base/crds/kubeflow.org_pytorchjobs.yaml
crds lws sigs.k8s.io/lws "$LWS_VERSION" config/crd/bases/leaderworkerset.x-k8s.io_leaderworkersets.yaml
crds kuberay github.com/ray-project/kuberay/ray-operator "$KUBERAY_VERSION" \
  config/crd/bases/ray.io_rayjobs.yaml config/crd/bases/ray.io_rayclusters.yaml
# WANT: all (default), crds, or a comma-separated list of controllers
case ",$want," in *,all,*|*,jobset-controller,*)
  build jobset-controller sigs.k8s.io/jobset "$JOBSET_VERSION" . ;; esac
case ",$want," in *,all,*|*,mpi-operator,*)
  build mpi-operator github.com/kubeflow/mpi-operator "$MPI_OPERATOR_VERSION" ./cmd/mpi-operator ;; esac
