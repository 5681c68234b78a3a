package vmtest

import (
	"bufio"
	"bytes"
	"compress/gzip"
	"debug/elf"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"sort"
	"strings"
	"sync"
)

// DefaultModules are the kernel modules loaded in every VM unless
// Options.Modules says otherwise: veth pairs, the clsact qdisc, tc BPF
// classifiers and kernel TLS. Their dependencies are loaded too.
var DefaultModules = []string{"veth", "sch_ingress", "cls_bpf", "tls"}

// Guest paths and markers shared by the /init script and the host side.
const (
	// guestOut is the serial port that carries only the guest command's
	// output and the harness's markers; the kernel log stays on ttyS0.
	guestOut = "/dev/ttyS1"
	// guestCmd is the script that runs the command line of Options.Args.
	guestCmd = "/clovisor/cmd.sh"
	// guestEnv is sourced by /init before the command runs.
	guestEnv = "/clovisor/env"
	// guestModules lists the modules /init loads, in order.
	guestModules = "/etc/clovisor/modules"

	markerStart   = "CLOVISOR-VM-START"
	markerEnd     = "CLOVISOR-VM-END"
	markerExit    = "CLOVISOR-VM-EXIT="
	markerSetup   = "CLOVISOR-VM-SETUP-ERROR="
	markerTimeout = "CLOVISOR-VM-GUEST-TIMEOUT="
)

// initScript is the guest's /init (busybox sh, PID 1). It mounts the usual
// file systems, brings up lo, loads the modules, then runs /clovisor/cmd.sh
// in its own session with its output on ttyS1, under the guest time limit
// CLOVISOR_VM_LIMIT (seconds, 0 = none). It reports the exit code as a
// marker line and powers off; qemu then exits. Any setup failure is reported
// as a marker too, so the host never mistakes it for a test result.
const initScript = `#!/bin/sh
# /init of a Clovisor test VM, written by internal/vmtest.
export PATH=/usr/local/sbin:/usr/local/bin:/bin:/sbin:/usr/bin:/usr/sbin HOME=/root TMPDIR=/tmp
out=` + guestOut + `
say() { echo "$*"; echo "$*" >$out; }
die() { say "` + markerSetup + `$*"; poweroff -f; sleep 60; }

mount -t proc proc /proc || die "mount proc"
mount -t sysfs sysfs /sys || die "mount sysfs"
mount -t devtmpfs devtmpfs /dev || die "mount devtmpfs"
mkdir -p /dev/pts /dev/shm
mount -t devpts devpts /dev/pts || die "mount devpts"
mount -t tmpfs tmpfs /dev/shm || die "mount /dev/shm"
mount -t tmpfs tmpfs /tmp || die "mount /tmp"
mount -t tmpfs tmpfs /run || die "mount /run"
mount -t bpf bpf /sys/fs/bpf || die "mount bpffs"
mount -t tracefs tracefs /sys/kernel/tracing || die "mount tracefs"
mount -t debugfs debugfs /sys/kernel/debug || die "mount debugfs"
mount -t cgroup2 cgroup2 /sys/fs/cgroup || die "mount cgroup2"
# No \r before \n (onlcr) on the output port.
stty -F $out raw -echo || die "stty $out"
ip link set lo up || die "ip link set lo up"
while read -r m; do
	[ -n "$m" ] || continue
	insmod "/lib/modules/$m.ko" || die "insmod $m"
done <` + guestModules + `
. ` + guestEnv + ` || die "source ` + guestEnv + `"

read -r up _ </proc/uptime
say "` + markerStart + ` uptime=$up"
cd /tmp
setsid ` + guestCmd + ` >$out 2>&1 </dev/null &
pid=$!
wd=
if [ "${CLOVISOR_VM_LIMIT:-0}" -gt 0 ]; then
	(
		sleep "$CLOVISOR_VM_LIMIT"
		say "` + markerTimeout + `$CLOVISOR_VM_LIMIT"
		kill -TERM -$pid $pid
		sleep 5
		kill -KILL -$pid $pid
	) </dev/null &
	wd=$!
fi
wait $pid
code=$?
[ -n "$wd" ] && kill $wd 2>/dev/null
read -r up _ </proc/uptime
say "` + markerEnd + ` uptime=$up"
say "` + markerExit + `$code"
# tcsetattr(TCSADRAIN): returns once every byte left the port.
stty -F $out -echo
poweroff -f
sleep 60
`

// baseKey identifies a cached base archive.
type baseKey struct {
	dir     string
	modules string
}

var (
	baseMu    sync.Mutex
	baseCache = map[baseKey][]byte{}
)

// baseArchive returns the part of the initramfs that depends only on the
// kernel and the module list: busybox with its applets, /init, the modules
// (decompressed) and their load order. It is built once per process for
// each kernel and module list, as an uncompressed cpio archive.
func baseArchive(k Kernel, modules []string) ([]byte, error) {
	key := baseKey{k.Dir, strings.Join(modules, ",")}
	baseMu.Lock()
	defer baseMu.Unlock()
	if b, ok := baseCache[key]; ok {
		return b, nil
	}
	b, err := buildBase(k, modules)
	if err != nil {
		return nil, err
	}
	baseCache[key] = b
	return b, nil
}

func buildBase(k Kernel, modules []string) ([]byte, error) {
	bb, err := exec.LookPath("busybox")
	if err != nil {
		return nil, fmt.Errorf("busybox not found (scripts/setup.sh installs busybox-static): %w", err)
	}
	if err := checkStatic(bb); err != nil {
		return nil, fmt.Errorf("%v (install busybox-static)", err)
	}
	list, err := exec.Command(bb, "--list").Output()
	if err != nil {
		return nil, fmt.Errorf("busybox --list: %w", err)
	}
	order, err := resolveModules(k.ModulesDir(), modules)
	if err != nil {
		return nil, err
	}

	var buf bytes.Buffer
	c := newCpioWriter(&buf)
	for _, d := range []string{"/bin", "/dev", "/proc", "/sys", "/tmp", "/run", "/root", "/etc", "/lib/modules", "/usr", "/var", "/clovisor"} {
		c.Dir(d, 0o755)
	}
	for _, l := range guestDirLinks {
		c.Symlink(l.dir, l.target)
	}
	// The kernel opens /dev/console for /init's stdio before devtmpfs is up.
	c.CharDev("/dev/console", 0o600, 5, 1)
	c.CharDev("/dev/null", 0o666, 1, 3)
	c.HostFile("/bin/busybox", bb)
	for _, a := range strings.Fields(string(list)) {
		if a != "busybox" && !strings.Contains(a, "/") {
			c.Symlink("/bin/"+a, "busybox")
		}
	}
	c.File("/init", []byte(initScript), 0o755)
	// Users and groups servers may switch to (nginx's "user" directive:
	// root, www-data, nobody), read by glibc's built-in "files" service.
	c.File("/etc/passwd", []byte("root:x:0:0:root:/root:/bin/sh\n"+
		"www-data:x:33:33:www-data:/var/www:/bin/false\n"+
		"nobody:x:65534:65534:nobody:/nonexistent:/bin/false\n"), 0o644)
	c.File("/etc/group", []byte("root:x:0:\nwww-data:x:33:\nnogroup:x:65534:\n"), 0o644)
	c.File("/etc/nsswitch.conf", []byte("passwd: files\ngroup: files\nshadow: files\nhosts: files dns\n"), 0o644)
	c.File("/etc/hosts", []byte("127.0.0.1 localhost\n::1 localhost\n"), 0o644)

	var names []string
	for _, m := range order {
		data, err := readModule(m.path)
		if err != nil {
			return nil, err
		}
		c.File("/lib/modules/"+m.name+".ko", data, 0o644)
		names = append(names, m.name)
	}
	var modList strings.Builder
	for _, n := range names {
		modList.WriteString(n + "\n")
	}
	c.File(guestModules, []byte(modList.String()), 0o644)
	if err := c.Close(); err != nil {
		return nil, err
	}
	return buf.Bytes(), nil
}

// module is a loadable module file of the kernel package.
type module struct {
	name string // canonical name: file name without .ko*, '-' as '_'
	path string // host path of the (maybe compressed) file
}

// moduleName turns "kernel/net/sched/sch_ingress.ko.xz" into "sch_ingress".
func moduleName(p string) string {
	b := filepath.Base(p)
	if i := strings.Index(b, ".ko"); i >= 0 {
		b = b[:i]
	}
	return strings.ReplaceAll(b, "-", "_")
}

// resolveModules returns the modules named in want together with all their
// dependencies (from modulesDir/modules.dep) in an order insmod accepts:
// every module after its dependencies. Modules built into the kernel
// (modules.builtin) are left out; a name that is neither is an error.
func resolveModules(modulesDir string, want []string) ([]module, error) {
	deps := map[string][]string{} // name -> dependency names
	paths := map[string]string{}  // name -> path relative to modulesDir
	f, err := os.Open(filepath.Join(modulesDir, "modules.dep"))
	if err != nil {
		return nil, err
	}
	defer f.Close()
	s := bufio.NewScanner(f)
	s.Buffer(make([]byte, 64<<10), 1<<20)
	for s.Scan() {
		file, rest, ok := strings.Cut(s.Text(), ":")
		if !ok {
			continue
		}
		n := moduleName(file)
		paths[n] = file
		for _, d := range strings.Fields(rest) {
			deps[n] = append(deps[n], moduleName(d))
		}
	}
	if err := s.Err(); err != nil {
		return nil, err
	}
	builtin := map[string]bool{}
	if b, err := os.ReadFile(filepath.Join(modulesDir, "modules.builtin")); err == nil {
		for _, l := range strings.Fields(string(b)) {
			builtin[moduleName(l)] = true
		}
	}

	var order []module
	state := map[string]int{} // 1: visiting, 2: done
	var visit func(n string, from []string) error
	visit = func(n string, from []string) error {
		switch state[n] {
		case 2:
			return nil
		case 1:
			return fmt.Errorf("module dependency cycle: %s -> %s", strings.Join(from, " -> "), n)
		}
		file, ok := paths[n]
		if !ok {
			if builtin[n] {
				state[n] = 2
				return nil
			}
			if len(from) > 0 {
				return fmt.Errorf("module %s (needed by %s) is not in %s/modules.dep", n, from[len(from)-1], modulesDir)
			}
			return fmt.Errorf("module %s is neither in %s/modules.dep nor built in", n, modulesDir)
		}
		state[n] = 1
		for _, d := range deps[n] {
			if err := visit(d, append(from, n)); err != nil {
				return err
			}
		}
		state[n] = 2
		order = append(order, module{name: n, path: filepath.Join(modulesDir, file)})
		return nil
	}
	for _, w := range want {
		if err := visit(strings.ReplaceAll(w, "-", "_"), nil); err != nil {
			return nil, err
		}
	}
	return order, nil
}

// readModule returns the contents of a module file, decompressed: busybox
// insmod loads only plain .ko files.
func readModule(p string) ([]byte, error) {
	switch {
	case strings.HasSuffix(p, ".ko"):
		return os.ReadFile(p)
	case strings.HasSuffix(p, ".ko.gz"):
		f, err := os.Open(p)
		if err != nil {
			return nil, err
		}
		defer f.Close()
		z, err := gzip.NewReader(f)
		if err != nil {
			return nil, fmt.Errorf("%s: %w", p, err)
		}
		var b bytes.Buffer
		if _, err := b.ReadFrom(z); err != nil {
			return nil, fmt.Errorf("%s: %w", p, err)
		}
		return b.Bytes(), nil
	case strings.HasSuffix(p, ".ko.xz"):
		return decompressWith(p, "busybox", "xz", "-dc", p)
	case strings.HasSuffix(p, ".ko.zst"):
		return decompressWith(p, "zstd", "-dcq", p)
	}
	return nil, fmt.Errorf("%s: unknown module file type", p)
}

func decompressWith(p, tool string, args ...string) ([]byte, error) {
	var stderr bytes.Buffer
	cmd := exec.Command(tool, args...)
	cmd.Stderr = &stderr
	out, err := cmd.Output()
	if err != nil {
		return nil, fmt.Errorf("decompressing %s with %s: %v: %s", p, tool, err, stderr.String())
	}
	return out, nil
}

// checkStatic fails for an ELF executable that needs a dynamic loader: the
// guest has no libc.
func checkStatic(p string) error {
	f, err := elf.Open(p)
	if err != nil {
		return nil // not ELF (a script, data): nothing to check
	}
	defer f.Close()
	for _, prog := range f.Progs {
		if prog.Type == elf.PT_INTERP {
			return fmt.Errorf("%s is dynamically linked; the VM has no libc (build Go with CGO_ENABLED=0)", p)
		}
	}
	return nil
}

// runArchive builds the per-run part of the initramfs: the command script,
// the environment file and the files of opts.
func runArchive(opts Options, env map[string]string) ([]byte, error) {
	var buf bytes.Buffer
	c := newCpioWriter(&buf)
	var words []string
	for _, a := range opts.Args {
		words = append(words, shellQuote(a))
	}
	c.File(guestCmd, []byte("#!/bin/sh\nexec "+strings.Join(words, " ")+"\n"), 0o755)

	keys := make([]string, 0, len(env))
	for k := range env {
		keys = append(keys, k)
	}
	sort.Strings(keys)
	var e strings.Builder
	for _, k := range keys {
		if !validEnvName(k) {
			return nil, fmt.Errorf("invalid environment variable name %q", k)
		}
		fmt.Fprintf(&e, "export %s=%s\n", k, shellQuote(env[k]))
	}
	c.File(guestEnv, []byte(e.String()), 0o644)

	guests := make([]string, 0, len(opts.Files))
	for g := range opts.Files {
		guests = append(guests, g)
	}
	sort.Strings(guests)
	for _, g := range guests {
		host := opts.Files[g]
		if err := checkStatic(host); err != nil {
			return nil, err
		}
		c.HostFile(guestPath(g), host)
	}
	if err := c.Close(); err != nil {
		return nil, err
	}
	return buf.Bytes(), nil
}

// shellQuote quotes s for sh as one word.
func shellQuote(s string) string {
	return "'" + strings.ReplaceAll(s, "'", `'\''`) + "'"
}

func validEnvName(s string) bool {
	if s == "" {
		return false
	}
	for i, r := range s {
		if r != '_' && (r < 'A' || r > 'Z') && (r < 'a' || r > 'z') && (i == 0 || r < '0' || r > '9') {
			return false
		}
	}
	return true
}
