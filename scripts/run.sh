#!/usr/bin/env bash
# Runs the Clovisor agent on this host: installs what it needs, builds it,
# and traces every process's TCP sessions, printing each HTTP exchange as a
# line (or exporting over OTLP when OTEL_EXPORTER_OTLP_ENDPOINT is set).
# Arguments are passed to the agent (see: scripts/run.sh --help).
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="/usr/local/go/bin:$PATH"
[[ $(id -u) -eq 0 ]] || { echo "run.sh: run as root (BPF programs need CAP_BPF and CAP_PERFMON)" >&2; exit 1; }
scripts/setup.sh >&2
mkdir -p bin
go build -o bin/clovisor ./cmd/clovisor
exec bin/clovisor "$@"
