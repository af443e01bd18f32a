#!/usr/bin/env bash
# Builds (or reuses) the local control plane binaries:
#   etcd, kube-apiserver, kube-controller-manager, kube-scheduler, kubectl, kwok
# from the Go module proxy with the installed Go, into a cache outside the repo
# keyed by the pinned versions (hack/versions.env), so a second run is instant.
#
# Where FLEETKEEPER_RELEASE_URL is set (a mirror of the official release
# downloads, or the official base URL on a machine that reaches it), the
# binaries are downloaded instead and their SHA-256 checked; see
# hack/fetch-release.sh.
#
# Prints the binary directory on the last line of stdout.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source=versions.env
source "$here/versions.env"

cache_root="${FLEETKEEPER_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/fleetkeeper}"
key="k8s-${KUBERNETES_VERSION}_etcd-${ETCD_VERSION}_kwok-${KWOK_VERSION}"
bindir="$cache_root/bin/$key"
workdir="$cache_root/build/$key"
binaries=(etcd kube-apiserver kube-controller-manager kube-scheduler kubectl kwok)

log() { printf '[build-controlplane] %s\n' "$*" >&2; }
die() { printf '[build-controlplane] error: %s\n' "$*" >&2; exit 1; }

have_all() {
  local b
  for b in "${binaries[@]}"; do [[ -x "$bindir/$b" ]] || return 1; done
  [[ -d "$bindir/kwok-stages" ]] || return 1
}

# KWOK's stock stages (node fast + heartbeat with lease, pod general), copied
# from the pinned KWOK module so the cluster simulates nodes the way KWOK does.
copy_kwok_stages() {
  local src
  src="$(cd "$workdir/kwok" 2>/dev/null && go list -m -f '{{.Dir}}' sigs.k8s.io/kwok 2>/dev/null || true)"
  [[ -n "$src" ]] || src="$(go env GOMODCACHE)/sigs.k8s.io/kwok@${KWOK_VERSION}"
  [[ -d "$src/kustomize/stage" ]] || die "KWOK stages not found in $src"
  mkdir -p "$bindir/kwok-stages"
  local d f
  for d in node/fast node/heartbeat-with-lease pod/general; do
    for f in "$src/kustomize/stage/$d"/*.yaml; do
      [[ "$(basename "$f")" == kustomization.yaml ]] && continue
      cp "$f" "$bindir/kwok-stages/$(echo "$d" | tr / -)-$(basename "$f")"
    done
  done
  chmod -R u+w "$bindir/kwok-stages"
}

if have_all; then
  log "reusing cached binaries in $bindir"
  echo "$bindir"
  exit 0
fi

if [[ -n "${FLEETKEEPER_RELEASE_URL:-}" ]]; then
  "$here/fetch-release.sh" "$bindir"
  have_all || die "download finished but binaries are missing in $bindir"
  echo "$bindir"
  exit 0
fi

command -v go >/dev/null 2>&1 || die "no 'go' on PATH. Install Go 1.26 or newer (https://go.dev/doc/install) or set FLEETKEEPER_RELEASE_URL to a release mirror."
gover="$(go env GOVERSION)"
proxy="$(go env GOPROXY)"
if [[ "$proxy" == "off" ]]; then
  die "GOPROXY is 'off': the Go module proxy is needed to fetch Kubernetes, etcd and KWOK. Set GOPROXY=https://proxy.golang.org or a mirror."
fi
first_proxy="${proxy%%,*}"
if [[ "$first_proxy" == http* ]] && ! curl -fsS -m 20 -o /dev/null "$first_proxy/k8s.io/kubernetes/@v/${KUBERNETES_VERSION}.info"; then
  die "cannot reach the Go module proxy at $first_proxy (k8s.io/kubernetes@${KUBERNETES_VERSION}). Check the network or GOPROXY."
fi

mkdir -p "$bindir" "$workdir"
k8s_minor="${KUBERNETES_VERSION#v1.}"; k8s_minor="${k8s_minor%%.*}"
staging_version="v0.${KUBERNETES_VERSION#v1.}"
start=$SECONDS
step=0
total=4
progress() { step=$((step+1)); log "[$step/$total] $* (t+$((SECONDS-start))s, $gover)"; }

# Runs a long command while printing a heartbeat so the user sees progress.
with_heartbeat() {
  local label="$1"; shift
  "$@" &
  local pid=$!
  while kill -0 "$pid" 2>/dev/null; do
    sleep 15
    kill -0 "$pid" 2>/dev/null && log "    ... $label still running (t+$((SECONDS-start))s)"
  done
  wait "$pid"
}

# --- Kubernetes: a wrapper module that replaces the staging modules with
# their published v0.Y.Z releases.
progress "resolving k8s.io/kubernetes@${KUBERNETES_VERSION} (wrapper module, staging modules at ${staging_version})"
kdir="$workdir/kubernetes"
mkdir -p "$kdir"
if [[ ! -f "$kdir/go.sum" ]]; then
  modfile="$(mktemp)"
  curl -fsS -m 60 -o "$modfile" "${first_proxy}/k8s.io/kubernetes/@v/${KUBERNETES_VERSION}.mod" \
    || GOFLAGS=-mod=mod go mod download -json "k8s.io/kubernetes@${KUBERNETES_VERSION}" >/dev/null
  [[ -s "$modfile" ]] || cp "$(go env GOMODCACHE)/cache/download/k8s.io/kubernetes/@v/${KUBERNETES_VERSION}.mod" "$modfile"
  {
    echo "module fleetkeeper.local/build/kubernetes"
    echo
    echo "go 1.26.0"
    echo
    echo "require k8s.io/kubernetes ${KUBERNETES_VERSION}"
    echo
    echo "replace ("
    # Staging modules are required at v0.0.0 by k8s.io/kubernetes.
    awk '/^[[:space:]]+k8s\.io\/[a-z0-9-]+ v0\.0\.0$/ {print $1}' "$modfile" | sort -u | while read -r m; do
      echo "	$m => $m ${staging_version}"
    done
    echo ")"
  } > "$kdir/go.mod"
  rm -f "$modfile"
  cat > "$kdir/tools.go" <<'GO'
//go:build tools

package tools

import (
	_ "k8s.io/kubernetes/cmd/kube-apiserver"
	_ "k8s.io/kubernetes/cmd/kube-controller-manager"
	_ "k8s.io/kubernetes/cmd/kube-scheduler"
	_ "k8s.io/kubernetes/cmd/kubectl"
)
GO
  (cd "$kdir" && with_heartbeat "go mod tidy (kubernetes)" go mod tidy)
fi

progress "building kube-apiserver, kube-controller-manager, kube-scheduler, kubectl"
ldflags="-s -w -X k8s.io/component-base/version.gitVersion=${KUBERNETES_VERSION} -X k8s.io/component-base/version.gitMajor=1 -X k8s.io/component-base/version.gitMinor=${k8s_minor} -X k8s.io/component-base/version.gitTreeState=clean -X k8s.io/client-go/pkg/version.gitVersion=${KUBERNETES_VERSION} -X k8s.io/client-go/pkg/version.gitMajor=1 -X k8s.io/client-go/pkg/version.gitMinor=${k8s_minor}"
for cmd in kube-apiserver kube-controller-manager kube-scheduler kubectl; do
  [[ -x "$bindir/$cmd" ]] && { log "    $cmd: cached"; continue; }
  t0=$SECONDS
  (cd "$kdir" && with_heartbeat "go build $cmd" go build -trimpath -ldflags "$ldflags" -o "$bindir/$cmd.tmp" "k8s.io/kubernetes/cmd/$cmd")
  mv "$bindir/$cmd.tmp" "$bindir/$cmd"
  log "    $cmd: built in $((SECONDS-t0))s"
done

# --- etcd: a wrapper main around go.etcd.io/etcd/server/v3/etcdmain.
progress "building etcd ${ETCD_VERSION} (wrapper module around go.etcd.io/etcd/server/v3)"
edir="$workdir/etcd"
mkdir -p "$edir"
if [[ ! -x "$bindir/etcd" ]]; then
  if [[ ! -f "$edir/go.sum" ]]; then
    cat > "$edir/go.mod" <<GOMOD
module fleetkeeper.local/build/etcd

go 1.26.0

require go.etcd.io/etcd/server/v3 ${ETCD_VERSION}
GOMOD
    cat > "$edir/main.go" <<'GO'
// Command etcd is the etcd server, built from go.etcd.io/etcd/server/v3.
package main

import (
	"os"

	"go.etcd.io/etcd/server/v3/etcdmain"
)

func main() { etcdmain.Main(os.Args) }
GO
    (cd "$edir" && with_heartbeat "go mod tidy (etcd)" go mod tidy)
  fi
  t0=$SECONDS
  (cd "$edir" && with_heartbeat "go build etcd" go build -trimpath -ldflags "-s -w" -o "$bindir/etcd.tmp" .)
  mv "$bindir/etcd.tmp" "$bindir/etcd"
  log "    etcd: built in $((SECONDS-t0))s"
fi

# --- KWOK
progress "building kwok ${KWOK_VERSION}"
wdir="$workdir/kwok"
mkdir -p "$wdir"
if [[ ! -x "$bindir/kwok" ]]; then
  if [[ ! -f "$wdir/go.sum" ]]; then
    cat > "$wdir/go.mod" <<GOMOD
module fleetkeeper.local/build/kwok

go 1.26.0

require sigs.k8s.io/kwok ${KWOK_VERSION}
GOMOD
    cat > "$wdir/tools.go" <<'GO'
//go:build tools

package tools

import _ "sigs.k8s.io/kwok/cmd/kwok"
GO
    (cd "$wdir" && with_heartbeat "go mod tidy (kwok)" go mod tidy)
  fi
  t0=$SECONDS
  (cd "$wdir" && with_heartbeat "go build kwok" go build -trimpath -ldflags "-s -w -X sigs.k8s.io/kwok/pkg/consts.Version=${KWOK_VERSION}" -o "$bindir/kwok.tmp" sigs.k8s.io/kwok/cmd/kwok)
  mv "$bindir/kwok.tmp" "$bindir/kwok"
  log "    kwok: built in $((SECONDS-t0))s"
fi

[[ -d "$bindir/kwok-stages" ]] || copy_kwok_stages
have_all || die "build finished but some binaries are missing in $bindir"
log "done in $((SECONDS-start))s: $bindir"
echo "$bindir"
