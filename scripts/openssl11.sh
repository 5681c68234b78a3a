#!/usr/bin/env bash
# Fetches OpenSSL 1.1.1 (Debian bullseye's libssl1.1 and openssl packages)
# for the TLS uprobe tests into a cache folder outside the checkout, and
# prints the path of its openssl binary; its libraries are in
# ../lib/x86_64-linux-gnu beside it (run it with LD_LIBRARY_PATH set there).
#
# Debian 12 ships only OpenSSL 3; 1.1.1 is the release line of Debian 11,
# whose packages still install and run here. They are fetched with apt-get
# download from Debian's archive, with a private sources list and package
# lists under the work folder, so the machine's apt configuration and
# installed packages are not touched; then unpacked with dpkg-deb -x.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source=scripts/cached-build.sh
source "$here/cached-build.sh"

version=1.1.1w-0+deb11u1
cached_build openssl "$version" root/usr/bin/openssl

echo "deb http://deb.debian.org/debian bullseye main" >"$work/sources.list"
mkdir -p "$work/lists/partial" "$work/cache/archives/partial"
apt_opts=(-o "Dir::Etc::SourceList=$work/sources.list" -o Dir::Etc::SourceParts=/dev/null
	-o "Dir::State::Lists=$work/lists" -o "Dir::Cache=$work/cache" -o APT::Sandbox::User=root)
apt-get "${apt_opts[@]}" -qq update >&2
(cd "$work" && apt-get "${apt_opts[@]}" -qq download "libssl1.1=$version" "openssl=$version" >&2)
for deb in "$work"/*.deb; do
	dpkg-deb -x "$deb" "$work/root"
done
LD_LIBRARY_PATH="$work/root/usr/lib/x86_64-linux-gnu" "$work/root/usr/bin/openssl" version >&2
mv "$work/root" "$dir/root"
echo "openssl: fetched in $(($(date +%s) - start)) s" >&2
echo "$bin"
