#!/usr/bin/env bash
# Builds (or reuses) what the real node of the local cluster runs and Debian does not
# ship, from the Go module proxy, each cached under its own pinned version
# (hack/versions.env); the control plane's cache is not touched:
#   kubelet, kube-proxy   KUBERNETES_VERSION  (wrapper module, as hack/build-controlplane.sh)
#   containerd, containerd-shim-runc-v2, ctr  CONTAINERD_VERSION
#   coredns (coremain + cache errors forward health kubernetes loadbalance log ready)  COREDNS_VERSION
#   pause                 gcc -static from k8s.io/kubernetes' build/pause/linux/pause.c
# runc and the CNI plugins come from Debian (hack/apt-packages.txt).
# Prints the binary directory on the last line of stdout.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source=versions.env
source "$here/versions.env"
cache_root="${FLEETKEEPER_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/fleetkeeper}"
key="realnode-k8s-${KUBERNETES_VERSION}_containerd-${CONTAINERD_VERSION}_coredns-${COREDNS_VERSION}"
bindir="$cache_root/bin/$key"
workdir="$cache_root/build/$key"
binaries=(kubelet kube-proxy containerd containerd-shim-runc-v2 ctr coredns pause)
log() { printf '[build-realnode] %s\n' "$*" >&2; }
die() { printf '[build-realnode] error: %s\n' "$*" >&2; exit 1; }
have_all() { local b; for b in "${binaries[@]}"; do [[ -x "$bindir/$b" ]] || return 1; done; }
if have_all; then log "reusing cached binaries in $bindir"; echo "$bindir"; exit 0; fi
command -v go >/dev/null || die "no 'go' on PATH (Go 1.26 or newer)"
command -v gcc >/dev/null || die "no gcc (make deps)"
mkdir -p "$bindir" "$workdir"
proxy="$(go env GOPROXY)"; first_proxy="${proxy%%,*}"
start=$SECONDS
built() { log "    $1: built in $(( SECONDS - $2 ))s"; }

# --- kubelet, kube-proxy: the same wrapper module recipe as the control plane
k8s_minor="${KUBERNETES_VERSION#v1.}"; k8s_minor="${k8s_minor%%.*}"
staging_version="v0.${KUBERNETES_VERSION#v1.}"
kdir="$workdir/kubernetes"
mkdir -p "$kdir"
if [[ ! -f "$kdir/go.sum" ]]; then
  modfile="$(mktemp)"
  curl -fsS -m 60 -o "$modfile" "${first_proxy}/k8s.io/kubernetes/@v/${KUBERNETES_VERSION}.mod" \
    || cp "$(go env GOMODCACHE)/cache/download/k8s.io/kubernetes/@v/${KUBERNETES_VERSION}.mod" "$modfile"
  {
    echo "module fleetkeeper.local/build/realnode-kubernetes"; echo; echo "go 1.26.0"; echo
    echo "require k8s.io/kubernetes ${KUBERNETES_VERSION}"; echo; echo "replace ("
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
	_ "k8s.io/kubernetes/cmd/kube-proxy"
	_ "k8s.io/kubernetes/cmd/kubelet"
)
GO
  log "go mod tidy (kubelet, kube-proxy ${KUBERNETES_VERSION})"
  (cd "$kdir" && go mod tidy)
fi
ldflags="-s -w -X k8s.io/component-base/version.gitVersion=${KUBERNETES_VERSION} -X k8s.io/component-base/version.gitMajor=1 -X k8s.io/component-base/version.gitMinor=${k8s_minor} -X k8s.io/component-base/version.gitTreeState=clean"
for cmd in kubelet kube-proxy; do
  [[ -x "$bindir/$cmd" ]] && continue
  t0=$SECONDS
  (cd "$kdir" && go build -trimpath -ldflags "$ldflags" -o "$bindir/$cmd.tmp" "k8s.io/kubernetes/cmd/$cmd")
  mv "$bindir/$cmd.tmp" "$bindir/$cmd"; built "$cmd" "$t0"
done

# --- pause (the sandbox image's only binary; no registry to pull it from)
if [[ ! -x "$bindir/pause" ]]; then
  src="$(cd "$kdir" && go list -m -f '{{.Dir}}' k8s.io/kubernetes)/build/pause/linux/pause.c"
  [[ -f "$src" ]] || die "pause.c not found at $src"
  gcc -Os -static -DVERSION="${KUBERNETES_VERSION}-fleetkeeper" -o "$bindir/pause.tmp" "$src"
  strip "$bindir/pause.tmp"; mv "$bindir/pause.tmp" "$bindir/pause"; log "    pause: built"
fi

# --- containerd 2.x
cdir="$workdir/containerd"
mkdir -p "$cdir"
if [[ ! -x "$bindir/containerd" || ! -x "$bindir/containerd-shim-runc-v2" || ! -x "$bindir/ctr" ]]; then
  if [[ ! -f "$cdir/go.sum" ]]; then
    printf 'module fleetkeeper.local/build/containerd\n\ngo 1.26.0\n\nrequire github.com/containerd/containerd/v2 %s\n' \
      "$CONTAINERD_VERSION" > "$cdir/go.mod"
    printf '//go:build tools\n\npackage tools\n\nimport (\n\t_ "github.com/containerd/containerd/v2/cmd/containerd"\n\t_ "github.com/containerd/containerd/v2/cmd/containerd-shim-runc-v2"\n\t_ "github.com/containerd/containerd/v2/cmd/ctr"\n)\n' > "$cdir/tools.go"
    log "go mod tidy (containerd ${CONTAINERD_VERSION})"
    (cd "$cdir" && go mod tidy)
  fi
  for cmd in containerd containerd-shim-runc-v2 ctr; do
    t0=$SECONDS
    (cd "$cdir" && CGO_ENABLED=0 go build -trimpath -tags "no_btrfs no_devmapper no_zfs" \
      -ldflags "-s -w -X github.com/containerd/containerd/v2/version.Version=${CONTAINERD_VERSION}" \
      -o "$bindir/$cmd.tmp" "github.com/containerd/containerd/v2/cmd/$cmd")
    mv "$bindir/$cmd.tmp" "$bindir/$cmd"; built "$cmd" "$t0"
  done
fi

# --- CoreDNS with only the plugins a cluster's DNS needs
ddir="$workdir/coredns"
mkdir -p "$ddir"
if [[ ! -x "$bindir/coredns" ]]; then
  if [[ ! -f "$ddir/go.sum" ]]; then
    printf 'module fleetkeeper.local/build/coredns\n\ngo 1.26.0\n\nrequire github.com/coredns/coredns %s\n' \
      "$COREDNS_VERSION" > "$ddir/go.mod"
    cat > "$ddir/main.go" <<'GO'
// Command coredns is CoreDNS with the plugins a cluster's DNS needs.
package main

import (
	"github.com/coredns/coredns/core/dnsserver"
	_ "github.com/coredns/coredns/core/plugin"
	"github.com/coredns/coredns/coremain"
	_ "github.com/coredns/coredns/plugin/cache"
	_ "github.com/coredns/coredns/plugin/errors"
	_ "github.com/coredns/coredns/plugin/forward"
	_ "github.com/coredns/coredns/plugin/health"
	_ "github.com/coredns/coredns/plugin/kubernetes"
	_ "github.com/coredns/coredns/plugin/loadbalance"
	_ "github.com/coredns/coredns/plugin/log"
	_ "github.com/coredns/coredns/plugin/ready"
)

// The order of plugin.cfg.
func init() {
	dnsserver.Directives = []string{"ready", "health", "errors", "log", "loadbalance", "cache", "kubernetes", "forward"}
}

func main() { coremain.Run() }
GO
    # core/plugin imports every plugin; the list above is all we want
    sed -i '/core\/plugin"$/d' "$ddir/main.go"
    log "go mod tidy (coredns ${COREDNS_VERSION})"
    (cd "$ddir" && go mod tidy)
  fi
  t0=$SECONDS
  (cd "$ddir" && CGO_ENABLED=0 go build -trimpath -ldflags "-s -w" -o "$bindir/coredns.tmp" .)
  mv "$bindir/coredns.tmp" "$bindir/coredns"; built coredns "$t0"
fi
have_all || die "some binaries are missing in $bindir"
log "done (t+$((SECONDS-start))s)"
echo "$bindir"
