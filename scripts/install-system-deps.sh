#!/bin/sh
# Installs the Debian packages cargohold's tests, demo and benchmark need, when they are missing.
#   scripts/install-system-deps.sh [test|demo|bench]
set -eu
what=${1:-test}
need=""
have() { command -v "$1" >/dev/null 2>&1; }
have docker-registry || need="$need docker-registry"
have htpasswd || need="$need apache2-utils"
have mount || need="$need mount"
if [ "$what" = bench ] || [ "$what" = test ]; then
  have ctr || need="$need containerd"
  have skopeo || need="$need skopeo"
  have umoci || need="$need umoci"
fi
if [ "$what" = bench ]; then
  # the raw floor the bench runs: curl BLOB | pigz -dc | tar -x, onto loop-mounted ext4 filesystems
  have curl || need="$need curl"
  have pigz || need="$need pigz"
  have tar || need="$need tar"
  have mkfs.ext4 || need="$need e2fsprogs"
  have losetup || need="$need mount"
fi
if [ "$what" = test ]; then
  # tests/test_rootless.py runs the CLI as nobody with the system interpreter (the venv's may be unreadable)
  [ -x /usr/bin/python3 ] || need="$need python3"
  have setpriv || need="$need util-linux"
  # tests/test_proxy_snapshotter.py builds a stargz remote snapshotter with scripts/stargz-grpc/build.sh
  have go || need="$need golang-go"
  dpkg -s golang-github-containerd-stargz-snapshotter-dev >/dev/null 2>&1 || need="$need golang-github-containerd-stargz-snapshotter-dev"
  dpkg -s golang-github-hanwen-go-fuse-dev >/dev/null 2>&1 || need="$need golang-github-hanwen-go-fuse-dev"
fi
[ -n "$need" ] || exit 0
echo "installing Debian packages:$need" >&2
if [ "$(id -u)" -eq 0 ]; then sudo=""; elif have sudo; then sudo="sudo"; else
  echo "error: need root (or sudo) to apt-get install:$need" >&2; exit 1; fi
export DEBIAN_FRONTEND=noninteractive
$sudo apt-get update -q >/dev/null
# shellcheck disable=SC2086
$sudo apt-get install -y -q --no-install-recommends $need >/dev/null
