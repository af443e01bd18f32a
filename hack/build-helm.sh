#!/usr/bin/env bash
# Builds (or reuses) Helm from its Go module (helm.sh/helm/v3, HELM_VERSION in
# hack/versions.env) into a cache keyed on that version. Prints the binary's path.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source=versions.env
source "$here/versions.env"
cache_root="${FLEETKEEPER_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/fleetkeeper}"
bindir="$cache_root/bin/helm-${HELM_VERSION}"
workdir="$cache_root/build/helm-${HELM_VERSION}"
log() { printf '[build-helm] %s\n' "$*" >&2; }
if [[ -x "$bindir/helm" ]]; then echo "$bindir/helm"; exit 0; fi
# tests ask for the path only; building is `make helm`'s job
[[ -n "${FLEETKEEPER_HELM_NO_BUILD:-}" ]] && { log "helm ${HELM_VERSION} is not built (make helm)"; exit 1; }
command -v go >/dev/null || { log "error: no 'go' on PATH (Go 1.26 or newer)"; exit 1; }
mkdir -p "$bindir" "$workdir"
start=$SECONDS
if [[ ! -f "$workdir/go.sum" ]]; then
  cat > "$workdir/go.mod" <<GOMOD
module fleetkeeper.local/build/helm

go 1.26.0

require helm.sh/helm/v3 ${HELM_VERSION}
GOMOD
  cat > "$workdir/tools.go" <<'GO'
//go:build tools

package tools

import _ "helm.sh/helm/v3/cmd/helm"
GO
  log "go mod tidy (helm ${HELM_VERSION})"
  (cd "$workdir" && go mod tidy)
fi
log "go build helm ${HELM_VERSION}"
(cd "$workdir" && CGO_ENABLED=0 go build -trimpath \
  -ldflags "-s -w -X helm.sh/helm/v3/internal/version.version=${HELM_VERSION} -X helm.sh/helm/v3/internal/version.gitTreeState=clean" \
  -o "$bindir/helm.tmp" helm.sh/helm/v3/cmd/helm)
mv "$bindir/helm.tmp" "$bindir/helm"
log "helm ${HELM_VERSION} built in $((SECONDS-start))s"
echo "$bindir/helm"
