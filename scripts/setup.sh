#!/usr/bin/env bash
# Installs, from Debian's packages, everything the project's tests need.
#
# Idempotent and non-interactive: when every package is already installed it
# does nothing (no apt at all); otherwise it runs `apt-get update` once and
# installs only the missing packages. Services that packages would start
# (nginx) are kept from starting during the install through a temporary
# /usr/sbin/policy-rc.d, and any that still run afterwards are stopped and
# disabled, so nothing is left listening on port 80.
set -euo pipefail

packages=(
	clang-14 llvm-14 libbpf-dev bpftool # building and inspecting BPF programs
	iproute2 procps util-linux          # ip netns / ip link, ps, flock, nsenter
	nftables                            # a Service's NAT in a test node (tcsessions hairpin test)
	iputils-ping                        # ping across test veths
	curl jq                             # HTTP peer, JSON in scripts
	nginx-light                         # HTTP(S) server peer
	iperf3                              # TCP traffic generator
	wrk                                 # HTTP load generator (tcsessions overhead benchmarks)
	python3 libssl-dev                  # TLS uprobe tests: Python's ssl module; OpenSSL to link a static client
	ca-certificates git                 # go module downloads
	etcd-server                         # etcd 3.4 under the test kube-apiserver (internal/testbed/kube.go)
	qemu-system-x86 busybox-static      # second kernel under qemu: VM tests (internal/vmtest, scripts/vmkernel.sh)
)

if [[ $(id -u) -ne 0 ]]; then
	echo "setup.sh: must run as root (apt-get install)" >&2
	exit 1
fi

missing=()
for p in "${packages[@]}"; do
	status="$(dpkg-query -W -f='${db:Status-Status}' "$p" 2>/dev/null || true)"
	if [[ "$status" != installed ]]; then
		missing+=("$p")
	fi
done

if [[ ${#missing[@]} -eq 0 ]]; then
	echo "setup.sh: all ${#packages[@]} packages already installed"
	exit 0
fi

echo "setup.sh: installing ${missing[*]}"
export DEBIAN_FRONTEND=noninteractive

# Keep maintainer scripts from starting daemons (invoke-rc.d and
# deb-systemd-invoke both honour policy-rc.d exit code 101).
policy=/usr/sbin/policy-rc.d
policy_backup=""
if [[ -e "$policy" ]]; then
	policy_backup="$(mktemp)"
	cp -p "$policy" "$policy_backup"
fi
restore_policy() {
	if [[ -n "$policy_backup" ]]; then
		cp -p "$policy_backup" "$policy"
		rm -f "$policy_backup"
	else
		rm -f "$policy"
	fi
}
trap restore_policy EXIT
printf '#!/bin/sh\n# written by clovisor scripts/setup.sh for the duration of an install\nexit 101\n' >"$policy"
chmod 755 "$policy"

apt-get update -q
apt-get install -y -q --no-install-recommends \
	-o Dpkg::Options::=--force-confdef -o Dpkg::Options::=--force-confold \
	"${missing[@]}"

# Tests start their own servers on 127.0.0.1 with their own configs; make
# sure no packaged daemon is left running or enabled.
for svc in nginx iperf3; do
	if [[ " ${missing[*]} " == *" $svc"* ]]; then
		if command -v systemctl >/dev/null && [[ -d /run/systemd/system ]]; then
			systemctl disable --now "$svc" >/dev/null 2>&1 || true
		else
			update-rc.d "$svc" disable >/dev/null 2>&1 || true
			[[ -x /etc/init.d/$svc ]] && /etc/init.d/$svc stop >/dev/null 2>&1 || true
		fi
		# The packaged nginx writes /run/nginx.pid; stop it if it got started anyway.
		if [[ $svc == nginx && -f /run/nginx.pid ]] && kill -0 "$(cat /run/nginx.pid)" 2>/dev/null; then
			kill -QUIT "$(cat /run/nginx.pid)" 2>/dev/null || true
		fi
	fi
done

echo "setup.sh: done"
