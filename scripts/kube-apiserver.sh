#!/usr/bin/env bash
# Builds kube-apiserver (Kubernetes v1.35.4) once into a cache folder outside
# the checkout and prints the binary's path on stdout.
#
#   ${CLOVISOR_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/clovisor-testbed}/kube-apiserver-v1.35.4/kube-apiserver
#
# If the binary already exists, the path is printed at once. Concurrent callers
# serialise on a flock, so only one of them builds. Build logs go to stderr.
#
# k8s.io/kubernetes is not meant to be imported: its go.mod requires the
# staging modules (k8s.io/api, k8s.io/apiserver, ...) at v0.0.0 and replaces
# them with ./staging/src/... folders. So it is built from a throwaway wrapper
# module in the cache folder (never in the project's own module) that requires
# k8s.io/kubernetes v1.35.4 and replaces each staging module listed in
# k8s.io/kubernetes's replace block with its published v0.35.4 release.
# About 200 s and 1.5 GB of module cache cold on 2 cores; the binary is ~100 MiB.
set -euo pipefail

version=v1.35.4
staging_version=v0.35.4 # k8s.io/<staging module> release matching $version
source "$(dirname "$0")/cached-build.sh"
cached_build kube-apiserver "$version" kube-apiserver

# Everything runs in $work, outside any other module, with the project's
# GOFLAGS (e.g. -mod=...) and any go.work out of the way.
export GOWORK=off GOFLAGS=-modcacherw GO111MODULE=on GOTOOLCHAIN=local

# k8s.io/kubernetes's own go.mod, for its list of staging modules.
gomod="$(cd "$work" && go mod download -json "k8s.io/kubernetes@$version" |
	sed -n 's/^[[:space:]]*"GoMod": "\(.*\)",\{0,1\}$/\1/p')"
if [[ -z "$gomod" || ! -f "$gomod" ]]; then
	echo "kube-apiserver.sh: could not download k8s.io/kubernetes@$version" >&2
	exit 1
fi
mapfile -t staging < <(sed -n '/^replace (/,/^)/s|^[[:space:]]*\(k8s\.io/[^[:space:]]*\)[[:space:]]*=>[[:space:]]*\./staging/src/.*$|\1|p' "$gomod")
if [[ ${#staging[@]} -lt 20 ]]; then
	echo "kube-apiserver.sh: found only ${#staging[@]} staging modules in $gomod; expected about 31" >&2
	exit 1
fi

{
	echo "module clovisor-testbed/kube-apiserver"
	echo
	echo "go 1.25.0"
	echo
	echo "godebug default=go1.25"
	echo
	echo "require k8s.io/kubernetes $version"
	echo
	echo "replace ("
	for m in "${staging[@]}"; do
		echo "	$m => $m $staging_version"
	done
	echo ")"
} >"$work/go.mod"
# A package in the wrapper module importing the command keeps `go get`'s
# requirements in go.mod.
cat >"$work/tools.go" <<'EOF'
//go:build tools

package tools

import _ "k8s.io/kubernetes/cmd/kube-apiserver"
EOF

IFS=. read -r major minor _ <<<"${version#v}"
(
	cd "$work"
	echo "kube-apiserver.sh: ${#staging[@]} staging modules replaced with $staging_version" >&2
	go get "k8s.io/kubernetes/cmd/kube-apiserver@$version"
	CGO_ENABLED=0 go build -trimpath \
		-ldflags "-s -w -X k8s.io/component-base/version.gitVersion=$version -X k8s.io/component-base/version.gitMajor=$major -X k8s.io/component-base/version.gitMinor=$minor -X k8s.io/component-base/version.gitTreeState=clean" \
		-o "$work/kube-apiserver" k8s.io/kubernetes/cmd/kube-apiserver
) >&2
"$work/kube-apiserver" --version >&2
mv -f "$work/kube-apiserver" "$bin"

echo "kube-apiserver.sh: built $bin in $(($(date +%s) - start))s" >&2
echo "$bin"
