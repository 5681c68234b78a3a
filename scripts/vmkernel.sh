#!/usr/bin/env bash
# Fetches a real Debian kernel for Clovisor's VM tests (internal/vmtest) into a
# cache folder outside the checkout and prints that folder on stdout.
#
#   scripts/vmkernel.sh SERIES        # SERIES: 6.1 or 6.12
#   scripts/vmkernel.sh --list        # the supported series, one a line
#
# The build machine's kernel has no kprobes and no fentry, so the kprobe and
# fentry attach modes are tested on a second kernel booted under qemu. Each
# series is pinned below to one exact Debian package and version
# (linux-image-*-cloud-amd64-unsigned: small, virtio/serial built in, modules
# for everything else). The package is fetched with `apt-get download` from
# the configured apt sources (bookworm-security carries both series) and
# unpacked with `dpkg-deb -x` into
#
#   ${CLOVISOR_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/clovisor-testbed}/kernels/<release>/
#
# where <release> is the kernel's `uname -r` (e.g. 6.1.0-56-cloud-amd64). That
# folder then holds:
#
#   vmlinuz       the kernel image (symlink into root/boot/)
#   modules/      symlink to root/lib/modules/<release>/ (kernel/..., and the
#                 modules.dep that this script makes with depmod)
#   root/         the unpacked package
#   kernel.env    SERIES, PACKAGE, PKG_VERSION, RELEASE lines (shell syntax),
#                 written last: its presence marks a complete download
#
# When kernel.env already names the pinned package version, the folder is
# printed at once (no apt, no lock). Concurrent callers serialise on a flock,
# so only one downloads. Progress and errors go to stderr.
#
# Debian's security archive drops old kernel ABIs some months after newer ones
# appear. When the pinned version can no longer be downloaded, the script fails
# and lists the versions the apt sources offer now: update the table below
# (and nothing else; the tests read the release from kernel.env). A cached
# kernel keeps working after it left the archive.
set -euo pipefail

# SERIES -> "PACKAGE=VERSION", checked against bookworm-security.
declare -A pinned=(
	[6.1]="linux-image-6.1.0-56-cloud-amd64-unsigned=6.1.192-2"
	[6.12]="linux-image-6.12.117+deb12-cloud-amd64-unsigned=6.12.117-1~deb12u1"
)

usage() {
	echo "usage: $0 SERIES|--list   (SERIES: ${!pinned[*]})" >&2
	exit 2
}

[[ $# -eq 1 ]] || usage
if [[ $1 == --list ]]; then
	printf '%s\n' "${!pinned[@]}" | sort -V
	exit 0
fi
series="$1"
spec="${pinned[$series]:-}"
if [[ -z "$spec" ]]; then
	echo "vmkernel.sh: unsupported series '$series' (supported: ${!pinned[*]})" >&2
	exit 2
fi
pkg="${spec%%=*}"
pkgver="${spec#*=}"
# linux-image-<release>-unsigned -> <release>
release="${pkg#linux-image-}"
release="${release%-unsigned}"

cache="${CLOVISOR_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/clovisor-testbed}"
dir="$cache/kernels/$release"

# complete reports whether $dir holds a finished unpack of the pinned version.
complete() {
	[[ -f "$dir/kernel.env" && -e "$dir/vmlinuz" && -d "$dir/modules/" ]] &&
		grep -qxF "PKG_VERSION='$pkgver'" "$dir/kernel.env"
}

if complete; then
	echo "$dir"
	exit 0
fi

mkdir -p "$dir"
exec 9>"$dir/.lock"
flock 9

# Someone else may have fetched it while we waited for the lock.
if complete; then
	echo "$dir"
	exit 0
fi

for tool in apt-get apt-cache dpkg-deb; do
	command -v "$tool" >/dev/null || { echo "vmkernel.sh: $tool not found (Debian's apt is needed)" >&2; exit 1; }
done

start=$(date +%s)

# available reports whether apt knows the exact pinned version.
available() {
	apt-cache show "$pkg=$pkgver" >/dev/null 2>&1
}
if ! available; then
	if [[ $(id -u) -eq 0 ]]; then
		echo "vmkernel.sh: $pkg=$pkgver not in the apt lists; running apt-get update" >&2
		apt-get update -q >&2 || true
	fi
fi
if ! available; then
	echo "vmkernel.sh: the pinned kernel $pkg=$pkgver (series $series) is not downloadable" >&2
	echo "vmkernel.sh: from the configured apt sources (any more). They offer now:" >&2
	apt-cache search --names-only "^linux-image-${series//./\\.}[-.+].*-cloud-amd64-unsigned\$" 2>/dev/null |
		while read -r name _; do
			printf '  %s=%s\n' "$name" "$(apt-cache policy "$name" | sed -n 's/^ *Candidate: //p')"
		done >&2
	echo "vmkernel.sh: update the 'pinned' table in $0 to one of them." >&2
	exit 1
fi

echo "vmkernel.sh: fetching $pkg=$pkgver into $dir" >&2
# Leftovers of a run that was killed.
rm -rf "$dir"/work.* "$dir/root" "$dir/vmlinuz" "$dir/modules" "$dir/kernel.env"
work="$(mktemp -d "$dir/work.XXXXXX")"
trap 'rm -rf "$work"' EXIT

# As root, apt would drop to the _apt user, which cannot write here.
if ! (cd "$work" && apt-get download -q -o APT::Sandbox::User=root "$pkg=$pkgver") >&2; then
	echo "vmkernel.sh: apt-get download $pkg=$pkgver failed (stale apt lists? try apt-get update;" >&2
	echo "vmkernel.sh: if it left the archive, update the 'pinned' table in $0)" >&2
	exit 1
fi
deb=("$work"/*.deb)
[[ -f "${deb[0]}" ]] || { echo "vmkernel.sh: apt-get download produced no .deb" >&2; exit 1; }
dpkg-deb -x "${deb[0]}" "$work/root"

[[ -f "$work/root/boot/vmlinuz-$release" ]] || { echo "vmkernel.sh: no boot/vmlinuz-$release in $pkg" >&2; exit 1; }
[[ -d "$work/root/lib/modules/$release/kernel" ]] || { echo "vmkernel.sh: no lib/modules/$release/kernel in $pkg" >&2; exit 1; }

# The package ships no modules.dep (its postinst runs depmod): make it here.
# kmod's depmod if installed, else busybox's (it reads .ko.xz as well).
if command -v depmod >/dev/null; then
	depmod -b "$work/root" "$release"
elif command -v busybox >/dev/null; then
	busybox depmod -b "$work/root" "$release"
else
	echo "vmkernel.sh: need depmod (kmod) or busybox to make modules.dep (scripts/setup.sh installs busybox-static)" >&2
	exit 1
fi
[[ -s "$work/root/lib/modules/$release/modules.dep" ]] || { echo "vmkernel.sh: depmod made no modules.dep" >&2; exit 1; }

mv "$work/root" "$dir/root"
ln -sfn "root/boot/vmlinuz-$release" "$dir/vmlinuz"
ln -sfn "root/lib/modules/$release" "$dir/modules"
cat >"$dir/kernel.env.tmp" <<EOF
SERIES='$series'
PACKAGE='$pkg'
PKG_VERSION='$pkgver'
RELEASE='$release'
EOF
mv -f "$dir/kernel.env.tmp" "$dir/kernel.env"

echo "vmkernel.sh: $release ready in $(( $(date +%s) - start ))s ($(du -sh "$dir/root" | cut -f1) unpacked)" >&2
echo "$dir"
