#!/usr/bin/env bash
# Downloads official release binaries instead of building them, verifying
# every file's SHA-256. Used by build-controlplane.sh when
# FLEETKEEPER_RELEASE_URL is set:
#   FLEETKEEPER_RELEASE_URL=official   the official download sites
#   FLEETKEEPER_RELEASE_URL=<base>     a mirror laid out as
#       <base>/kubernetes/release/<v>/bin/linux/amd64/<binary>{,.sha256}
#       <base>/etcd/<v>/etcd-<v>-linux-amd64.tar.gz and <base>/etcd/<v>/SHA256SUMS
#       <base>/kwok/<v>/kwok-linux-amd64, <base>/kwok/<v>/stage-fast.yaml and <base>/kwok/<v>/checksums.txt
# Usage: fetch-release.sh BINDIR
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
source "$here/versions.env"
bindir="$1"
base="${FLEETKEEPER_RELEASE_URL:?set FLEETKEEPER_RELEASE_URL}"
if [[ "$base" == official ]]; then
  k8s="https://dl.k8s.io/release"
  etcd="https://github.com/etcd-io/etcd/releases/download"
  kwok="https://github.com/kubernetes-sigs/kwok/releases/download"
else
  k8s="$base/kubernetes/release"; etcd="$base/etcd"; kwok="$base/kwok"
fi
log() { printf '[fetch-release] %s\n' "$*" >&2; }
die() { printf '[fetch-release] error: %s\n' "$*" >&2; exit 1; }
tmp="$(mktemp -d)"; trap 'rm -rf "$tmp"' EXIT
get() { curl -fsSL --retry 2 -m 300 -o "$2" "$1" || die "download failed: $1"; }
check() { # file expected-sha256
  local got; got="$(sha256sum "$1" | awk '{print $1}')"
  [[ "$got" == "$2" ]] || die "checksum mismatch for $(basename "$1"): got $got, expected $2"
}
mkdir -p "$bindir"
for b in kube-apiserver kube-controller-manager kube-scheduler kubectl; do
  log "kubernetes $KUBERNETES_VERSION: $b"
  get "$k8s/$KUBERNETES_VERSION/bin/linux/amd64/$b" "$tmp/$b"
  get "$k8s/$KUBERNETES_VERSION/bin/linux/amd64/$b.sha256" "$tmp/$b.sha256"
  check "$tmp/$b" "$(awk '{print $1}' "$tmp/$b.sha256")"
  install -m 0755 "$tmp/$b" "$bindir/$b"
done
log "etcd $ETCD_VERSION"
tgz="etcd-${ETCD_VERSION}-linux-amd64.tar.gz"
get "$etcd/$ETCD_VERSION/$tgz" "$tmp/$tgz"
get "$etcd/$ETCD_VERSION/SHA256SUMS" "$tmp/SHA256SUMS"
check "$tmp/$tgz" "$(awk -v f="$tgz" '$2==f {print $1}' "$tmp/SHA256SUMS")"
tar -xzf "$tmp/$tgz" -C "$tmp"
install -m 0755 "$tmp/etcd-${ETCD_VERSION}-linux-amd64/etcd" "$bindir/etcd"
log "kwok $KWOK_VERSION"
get "$kwok/$KWOK_VERSION/kwok-linux-amd64" "$tmp/kwok"
get "$kwok/$KWOK_VERSION/stage-fast.yaml" "$tmp/stage-fast.yaml"
get "$kwok/$KWOK_VERSION/checksums.txt" "$tmp/checksums.txt"
check "$tmp/kwok" "$(awk '$2=="kwok-linux-amd64" {print $1}' "$tmp/checksums.txt")"
check "$tmp/stage-fast.yaml" "$(awk '$2=="stage-fast.yaml" {print $1}' "$tmp/checksums.txt")"
install -m 0755 "$tmp/kwok" "$bindir/kwok"
mkdir -p "$bindir/kwok-stages"
cp "$tmp/stage-fast.yaml" "$bindir/kwok-stages/stage-fast.yaml"
log "done: $bindir"
