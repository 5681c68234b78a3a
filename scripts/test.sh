#!/usr/bin/env bash
# Runs Clovisor's whole test suite: installs what it needs (Debian packages,
# a cached Jaeger build), checks formatting and vet, runs every Go test
# (privileged ones included: this needs root), and fuzzes the HTTP analyzer
# briefly. Exit status 0 only if everything passed.
set -euo pipefail
cd "$(dirname "$0")/.."

export PATH="/usr/local/go/bin:$PATH"
[[ $(id -u) -eq 0 ]] || { echo "test.sh: run as root (the tests attach BPF programs and make network namespaces)" >&2; exit 1; }

scripts/setup.sh
echo "--- Jaeger (cached build)"
scripts/jaeger.sh >/dev/null
echo "--- kube-apiserver (cached build)"
scripts/kube-apiserver.sh >/dev/null

echo "--- gofmt / go vet"
unformatted=$(gofmt -l $(git ls-files '*.go' 2>/dev/null || find . -name '*.go'))
if [[ -n "$unformatted" ]]; then
	echo "gofmt would change: $unformatted" >&2
	exit 1
fi
go vet ./...
echo "--- arm64 build"
GOARCH=arm64 CGO_ENABLED=0 go build -o /dev/null ./cmd/clovisor

echo "--- go test"
# Privileged tests fail rather than skip when they cannot run.
export CI="${CI:-true}"
go test -count=1 -timeout 20m ./...

echo "--- fuzz (HTTP/1.x analyzer, 30 s)"
go test -run='^$' -fuzz=FuzzParser -fuzztime=30s ./protocols/http1/
