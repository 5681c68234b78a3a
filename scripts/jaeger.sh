#!/usr/bin/env bash
# Builds Jaeger v2 (from the jaegertracing/jaeger v1.76.0 Go module) once into
# a cache folder outside the checkout and prints the binary's path on stdout.
#
#   ${CLOVISOR_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/clovisor-testbed}/jaeger-v1.76.0/jaeger
#
# If the binary already exists, the path is printed at once. Concurrent callers
# serialise on a flock, so only one of them builds. Build logs go to stderr.
# `go install` refuses Jaeger (its go.mod has replace directives), so the module
# is copied out of the module cache into a writable folder and built there.
set -euo pipefail

version=v1.76.0
source "$(dirname "$0")/cached-build.sh"
cached_build jaeger "$version" jaeger

moddir="$(cd "$work" && GOFLAGS=-modcacherw GO111MODULE=on go mod download -json "github.com/jaegertracing/jaeger@$version" |
	sed -n 's/^[[:space:]]*"Dir": "\(.*\)",\{0,1\}$/\1/p')"
if [[ -z "$moddir" || ! -d "$moddir" ]]; then
	echo "jaeger.sh: could not download github.com/jaegertracing/jaeger@$version" >&2
	exit 1
fi

cp -R "$moddir" "$work/src"
chmod -R u+w "$work/src"
(
	cd "$work/src"
	GOWORK=off GOFLAGS= CGO_ENABLED=0 go build -trimpath -ldflags '-s -w' -o "$work/jaeger" ./cmd/jaeger
) >&2
mv -f "$work/jaeger" "$bin"

echo "jaeger.sh: built $bin in $(( $(date +%s) - start ))s" >&2
echo "$bin"
