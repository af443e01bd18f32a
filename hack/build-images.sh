#!/usr/bin/env bash
# Builds fleetkeeper's images here, with no registry (make images):
#   localhost/fleetkeeper-base:<key>          Debian bookworm minbase + python3 (mmdebstrap)
#   localhost/fleetkeeper:<version>           controllers and agents (one image, several entry points)
#   localhost/fleetkeeper-validator:<version> preflight test pods (CPU profile here; CUDA base: see its recipe)
# <version> is the package version (pyproject.toml). The base is cached keyed on its recipe;
# the wheelhouse (fleetkeeper's wheel + the locked runtime dependencies) is built on the host,
# because pip inside a build container cannot reach an index here, and installed offline
# (buildah bud --network none --pull-never).
#
#   hack/build-images.sh                 build what is missing
#   hack/build-images.sh --archive DIR   also write DIR/<name>.oci.tar for `ctr images import`
# Prints "name:tag" of each image on stdout.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(cd "$here/.." && pwd)"
log() { printf '[build-images] %s\n' "$*" >&2; }
die() { printf '[build-images] error: %s\n' "$*" >&2; exit 1; }

archive=""
[[ "${1:-}" == "--archive" ]] && { archive="${2:?--archive DIR}"; mkdir -p "$archive"; }
for tool in mmdebstrap buildah; do
  command -v "$tool" >/dev/null || die "'$tool' not found: run 'make deps' (Debian packages in hack/apt-packages.txt)"
done
py="${PYTHON:-$root/.venv/bin/python}"
[[ -x "$py" ]] || die "$py not found: run 'make deps'"

version="$("$py" -c 'import sys, tomllib; print(tomllib.load(open(sys.argv[1], "rb"))["project"]["version"])' "$root/pyproject.toml")"
suite=bookworm
include="python3,python3-venv,ca-certificates,tzdata"
base_key="$(printf '%s|%s|%s' "$suite" "$include" "$(cat "$here/images/Containerfile" "$here/images/validator.Containerfile" | sha256sum | cut -c1-8)" | sha256sum | cut -c1-12)"
base="localhost/fleetkeeper-base:$suite-$base_key"
cache="${FLEETKEEPER_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/fleetkeeper}/images"
mkdir -p "$cache"
have() { buildah inspect --type image "$1" >/dev/null 2>&1; }
start=$SECONDS

# --- base: mmdebstrap minbase + python3, imported with buildah from scratch
if ! have "$base"; then
  tarball="$cache/base-$suite-$base_key.tar"
  if [[ ! -f "$tarball" ]]; then
    log "mmdebstrap $suite minbase + $include"
    mmdebstrap --quiet --variant=minbase --include="$include" \
      --customize-hook='rm -rf "$1"/var/cache/apt/* "$1"/var/lib/apt/lists/*' \
      --format=tar "$suite" "$tarball.partial"
    mv "$tarball.partial" "$tarball"
  fi
  ctr="$(buildah from scratch)"
  trap 'buildah rm "$ctr" >/dev/null 2>&1 || true' EXIT
  buildah add --quiet "$ctr" "$tarball" / >/dev/null
  buildah config --env LANG=C.UTF-8 --label org.opencontainers.image.title=fleetkeeper-base "$ctr"
  buildah commit --quiet --rm "$ctr" "$base" >/dev/null
  trap - EXIT
  log "base $base (t+$((SECONDS-start))s)"
fi
buildah tag "$base" localhost/fleetkeeper-base:latest

# --- nothing to build when the images of these sources exist
source_hash="$( (cd "$root" && cat pyproject.toml requirements.lock hack/images/* && find src -name '*.py' -o -name '*.yaml' -o -name '*.json' | sort | xargs cat) | sha256sum | cut -c1-16)"
fresh() {  # name: the image of these sources exists
  [[ "$(buildah inspect --type image --format '{{index .ImageAnnotations "org.opencontainers.image.revision"}}' "localhost/$1:$version" 2>/dev/null)" == "$source_hash" ]]
}
export_archive() {  # name: OCI archive for `ctr images import`, when asked for and stale
  [[ -n "$archive" ]] || return 0
  [[ -f "$archive/$1.oci.tar" && "$(cat "$archive/$1.source" 2>/dev/null)" == "$source_hash" ]] && return 0
  rm -f "$archive/$1.oci.tar"
  buildah push --quiet "localhost/$1:$version" "oci-archive:$archive/$1.oci.tar:localhost/$1:$version"
  echo "$source_hash" > "$archive/$1.source"
}
if fresh fleetkeeper && fresh fleetkeeper-validator; then
  log "images of these sources exist (source $source_hash)"
  for name in fleetkeeper fleetkeeper-validator; do export_archive "$name"; echo "localhost/$name:$version"; done
  exit 0
fi

# --- wheelhouse: fleetkeeper's wheel and its locked runtime dependencies (nvidia-ml-py for the validator)
ctx="$cache/context-$version"
rm -rf "$ctx"
mkdir -p "$ctx/wheelhouse"
log "wheelhouse (requirements.lock)"
# from a clean copy of the sources: no stale build/ of an earlier tree ends up in the wheel
mkdir -p "$ctx/src"
cp -r "$root/pyproject.toml" "$root/README.md" "$root/LICENSE" "$root/src" "$ctx/src/"
find "$ctx/src" -name __pycache__ -prune -exec rm -rf {} +
"$py" -m pip wheel -q --disable-pip-version-check -c "$root/requirements.lock" -w "$ctx/wheelhouse" "$ctx/src[gpu]" \
  || die "pip wheel failed: the package index must be reachable from this host (or pre-fill $ctx/wheelhouse)"

build() {  # name containerfile
  local image="localhost/$1:$version"
  buildah bud --quiet --network none --pull-never --layers=false --build-arg "BASE=$base" \
    --label "org.opencontainers.image.version=$version" --label "org.opencontainers.image.licenses=Apache-2.0" \
    --annotation "org.opencontainers.image.revision=$source_hash" \
    -f "$2" -t "$image" "$ctx" >/dev/null
  log "$image (t+$((SECONDS-start))s)"
  export_archive "$1"
  echo "$image"
}
rm -rf "$ctx/src"
build fleetkeeper "$here/images/Containerfile"
build fleetkeeper-validator "$here/images/validator.Containerfile"
rm -rf "$ctx"
