# Sourced by the build scripts of cached test tools (jaeger.sh,
# kube-apiserver.sh). cached_build NAME VERSION BINARY sets $dir (the tool's
# cache folder outside the checkout) and $bin; if the binary is already
# built it prints its path and exits. Otherwise it takes the folder's lock
# (concurrent callers build once), removes what a killed build left, makes a
# fresh work folder $work (removed on exit) and sets $start, and returns:
# the caller builds $bin into $work and moves it into place.
cached_build() {
	local name=$1 version=$2 binary=$3
	local cache="${CLOVISOR_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/clovisor-testbed}"
	dir="$cache/$name-$version"
	bin="$dir/$binary"
	if [[ -x "$bin" ]]; then
		echo "$bin"
		exit 0
	fi
	mkdir -p "$dir"
	exec 9>"$dir/.lock"
	flock 9
	# Someone else may have built it while we waited for the lock.
	if [[ -x "$bin" ]]; then
		echo "$bin"
		exit 0
	fi
	command -v go >/dev/null || { echo "$name: go not found in PATH" >&2; exit 1; }
	start=$(date +%s)
	echo "$name: building $name $version into $dir (takes a few minutes cold)" >&2
	# Leftovers of a build that was killed.
	chmod -R u+w "$dir"/build.* 2>/dev/null || true
	rm -rf "$dir"/build.*
	work="$(mktemp -d "$dir/build.XXXXXX")"
	trap 'chmod -R u+w "$work" 2>/dev/null || true; rm -rf "$work"' EXIT
}
