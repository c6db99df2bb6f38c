#!/bin/sh
# Build the stargz remote snapshotter daemon the tests run (tests/support/stargz.py): containerd's snapshots
# gRPC API on a unix socket, backed by stargz-snapshotter's service package. Debian bookworm packages only, no
# network besides apt, GOPATH mode (the packages install their sources under /usr/share/gocode).
#
#   sh scripts/stargz-grpc/build.sh OUT          # root needed only when the packages must be apt-installed
#   OUT -address SOCKET -root DIR [-config TOML] [-log-level LEVEL]
#
# bookworm does not package k8s.io/cri-api; its only user in the import graph is stargz's CRI-based registry
# resolver (service/resolver/cri.go), which this daemon never uses, so the build hides that one file through
# `go build -overlay` instead of patching the installed sources.
set -eu
out=${1:?usage: build.sh OUTPUT_BINARY}
src=$(cd "$(dirname "$0")" && pwd)
gocode=/usr/share/gocode
stargz=$gocode/src/github.com/containerd/stargz-snapshotter
if ! command -v go >/dev/null 2>&1 || [ ! -d "$stargz" ] || [ ! -d "$gocode/src/github.com/hanwen/go-fuse" ]; then
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends \
    golang-go golang-github-containerd-stargz-snapshotter-dev golang-github-hanwen-go-fuse-dev >/dev/null
fi
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT INT TERM
pkg=$tmp/gopath/src/cargohold-stargz-grpc
mkdir -p "$pkg"
cp "$src/main.go" "$pkg/main.go"
printf '{"Replace": {"%s/service/resolver/cri.go": ""}}\n' "$stargz" >"$tmp/overlay.json"
cd "$pkg"
GO111MODULE=off GOFLAGS= GOPATH="$tmp/gopath:$gocode" GOCACHE="${GOCACHE:-$tmp/cache}" \
  go build -overlay "$tmp/overlay.json" -o "$out" .
echo "built $out"
