package vmtest

import (
	"bytes"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"slices"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/clovisor/clovisor/internal/testbed"
)

// requireHost skips host-side VM tests inside a VM (where the guest tests of
// the same binary run) and checks what the host needs to boot a VM.
func requireHost(t *testing.T) {
	t.Helper()
	if InGuest() {
		t.Skip("host-side test: not run inside the VM")
	}
	testbed.RequireRoot(t) // vmkernel.sh may need to run apt-get update
	testbed.RequireTool(t, "qemu-system-x86_64")
	testbed.RequireTool(t, "busybox")
	testbed.RequireTool(t, "apt-get")
	testbed.RequireTool(t, "dpkg-deb")
}

// TestVMGuestFacts boots every supported kernel with this package's own test
// binary and runs the guest-side tests of guest_test.go in it: kernel
// release, BTF, the kprobe PMU, loaded modules, mounts, a veth pair, and
// kprobe and fentry programs on tcp_sendmsg that attach and fire.
func TestVMGuestFacts(t *testing.T) {
	requireHost(t)
	bin := BuildTestBinary(t, "./internal/vmtest")
	for _, k := range Kernels(t) {
		t.Run(k.Series, func(t *testing.T) {
			res := RunGoTest(t, k, bin, "^TestGuest", Options{Timeout: 120 * time.Second})
			for _, name := range []string{"TestGuestKernelRelease", "TestGuestSysfs", "TestGuestMounts",
				"TestGuestVethPair", "TestGuestKprobeTCPSendmsg", "TestGuestFentryTCPSendmsg"} {
				if !strings.Contains(res.Output, "--- PASS: "+name+" ") {
					t.Errorf("guest test %s did not pass (skipped or missing)", name)
				}
			}
			t.Logf("%s: boot-to-poweroff %v (qemu wall time), guest boot %v, guest tests %v",
				k, res.Duration.Round(time.Millisecond), res.GuestBoot.Round(time.Millisecond), res.GuestRun.Round(time.Millisecond))
		})
	}
}

// TestVMShellCommand runs a busybox command line, checks that arguments
// arrive verbatim, the environment is set, and the command's output is kept
// apart from kernel messages (which go to the console only).
func TestVMShellCommand(t *testing.T) {
	requireHost(t)
	k := LoadKernel(t, DefaultSeries)
	script := filepath.Join(t.TempDir(), "hello.sh")
	if err := os.WriteFile(script, []byte("#!/bin/sh\necho \"script: $1\"\n"), 0o755); err != nil {
		t.Fatal(err)
	}
	arg := `it's "quoted" $HOME; exit 9`
	res := Run(t, k, Options{
		Args:    []string{"sh", "-c", `/opt/hello.sh "$1"; echo "env: $FOO $CLOVISOR_VMTEST"; echo "<2>vmtest-kmsg-line" >/dev/kmsg; uname -r`, "sh", arg},
		Files:   map[string]string{"/opt/hello.sh": script},
		Env:     map[string]string{"FOO": "bar baz"},
		Modules: []string{},
		Timeout: 60 * time.Second,
	})
	want := "script: " + arg + "\nenv: bar baz 1\n" + k.Version + "\n"
	if res.Output != want {
		t.Errorf("guest output:\n%q\nwant\n%q", res.Output, want)
	}
	if !strings.Contains(res.Console, "vmtest-kmsg-line") {
		t.Errorf("kernel message missing from the console:\n%s", res.Console)
	}
	if res.ExitCode != 0 || res.Duration <= 0 || res.GuestBoot <= 0 {
		t.Errorf("result %+v", res)
	}
	t.Logf("boot-to-poweroff %v (guest boot %v)", res.Duration.Round(time.Millisecond), res.GuestBoot.Round(time.Millisecond))
}

// TestVMPrograms copies dynamically linked host programs (with their
// libraries and the loader) into the guest and runs them there: their
// version output must be the host's, `ip netns` must work (it bind-mounts
// under /run/netns, reached as /var/run/netns too), nginx must accept its
// "user" directive (passwd/group lookups) and serve a file to curl, and
// bash's /dev/tcp must connect (testbed's nginx readiness check).
func TestVMPrograms(t *testing.T) {
	requireHost(t)
	programs := []string{"curl", "nginx", "ip", "bash"}
	for _, p := range programs {
		testbed.RequireTool(t, p)
	}
	hostOut := func(name string, args ...string) string {
		out, err := exec.Command(name, args...).CombinedOutput()
		if err != nil {
			t.Fatalf("%s on the host: %v: %s", name, err, out)
		}
		return string(out)
	}
	k := LoadKernel(t, DefaultSeries)
	// busybox sh runs its own applets before looking in PATH (Debian's
	// busybox-static is a "standalone shell"), so the script names
	// iproute2's ip by its path; programs exec'd by Go, bash or ip itself
	// find it in PATH.
	ip, _ := exec.LookPath("ip")
	script := `set -e
exec 2>&1
echo "--- curl"; curl --version
echo "--- nginx"; nginx -v
echo "--- ip"; "$IP" -V
echo "--- bash"; bash -c 'echo "$BASH_VERSION"'
echo "--- netns"
"$IP" netns add x && "$IP" netns list
ls /var/run/netns
"$IP" netns exec x ip -o link show | cut -d: -f2 | tr -d ' '
"$IP" netns delete x
echo "--- serve"
mkdir -p /tmp/www /tmp/ngx
echo hello-from-guest-nginx >/tmp/www/hello.txt
cat >/tmp/ngx/nginx.conf <<'CONF'
daemon on;
user www-data;
worker_processes 1;
pid /tmp/ngx/nginx.pid;
error_log /tmp/ngx/error.log info;
events { worker_connections 16; }
http {
    access_log off;
    client_body_temp_path /tmp/ngx/body;
    proxy_temp_path /tmp/ngx/proxy;
    fastcgi_temp_path /tmp/ngx/fastcgi;
    uwsgi_temp_path /tmp/ngx/uwsgi;
    scgi_temp_path /tmp/ngx/scgi;
    server { listen 127.0.0.1:8080; root /tmp/www; }
}
CONF
chmod -R a+rX /tmp/www
nginx -c /tmp/ngx/nginx.conf -e /tmp/ngx/error.log
n=0
until bash -c 'exec 3<>/dev/tcp/127.0.0.1/8080' 2>/dev/null; do
	n=$((n+1)); [ $n -lt 100 ] || { cat /tmp/ngx/error.log; exit 1; }
	sleep 0.1
done
curl -sS http://127.0.0.1:8080/hello.txt
ps -o user,comm | grep nginx | sort -u
kill "$(cat /tmp/ngx/nginx.pid)"
echo "--- done"
`
	res := Run(t, k, Options{
		Args:     []string{"sh", "-c", script},
		Env:      map[string]string{"IP": ip},
		Programs: programs,
		Timeout:  90 * time.Second,
	})
	want := "--- curl\n" + hostOut("curl", "--version") +
		"--- nginx\n" + hostOut("nginx", "-v") +
		"--- ip\n" + hostOut("ip", "-V") +
		"--- bash\n" + hostOut("bash", "-c", `echo "$BASH_VERSION"`) +
		"--- netns\nx\nx\nlo\n" +
		"--- serve\nhello-from-guest-nginx\nroot     nginx\nwww-data nginx\n" +
		"--- done\n"
	if res.Output != want {
		t.Errorf("guest output:\n%s\nwant:\n%s", res.Output, want)
	}
	t.Logf("boot-to-poweroff %v (guest boot %v, commands %v)", res.Duration.Round(time.Millisecond),
		res.GuestBoot.Round(time.Millisecond), res.GuestRun.Round(time.Millisecond))
}

func TestVMNonZeroExitFails(t *testing.T) {
	requireHost(t)
	k := LoadKernel(t, DefaultSeries)
	opts := Options{Args: []string{"sh", "-c", "echo before-failing; exit 3"}, Modules: []string{}, Timeout: 60 * time.Second}
	msg := expectFailure(t, func(tb testing.TB) { Run(tb, k, opts) })
	for _, s := range []string{"exited 3", "before-failing"} {
		if !strings.Contains(msg, s) {
			t.Errorf("failure message lacks %q:\n%s", s, msg)
		}
	}

	// The same through RunGoTest: a failing guest test fails the host test
	// and its output shows in the host's log.
	script := filepath.Join(t.TempDir(), "fake.test")
	if err := os.WriteFile(script, []byte("#!/bin/sh\necho '=== RUN   TestX'\necho '    x_test.go:1: guest says no'\necho '--- FAIL: TestX (0.00s)'\nexit 1\n"), 0o755); err != nil {
		t.Fatal(err)
	}
	msg = expectFailure(t, func(tb testing.TB) {
		RunGoTest(tb, k, script, ".", Options{Modules: []string{}, Timeout: 60 * time.Second})
	})
	for _, s := range []string{"guest says no", "--- FAIL: TestX", "exited 1"} {
		if !strings.Contains(msg, s) {
			t.Errorf("RunGoTest failure message lacks %q:\n%s", s, msg)
		}
	}

	// With IgnoreExitCode the code is a result.
	opts.IgnoreExitCode = true
	if res := Run(t, k, opts); res.ExitCode != 3 || res.Output != "before-failing\n" {
		t.Errorf("IgnoreExitCode: exit %d, output %q", res.ExitCode, res.Output)
	}
}

func TestVMHostTimeoutKillsQemu(t *testing.T) {
	requireHost(t)
	k := LoadKernel(t, DefaultSeries)
	start := time.Now()
	msg := expectFailure(t, func(tb testing.TB) {
		Run(tb, k, Options{
			Args:         []string{"sh", "-c", "echo hanging-now; sleep 1000"},
			Modules:      []string{},
			Timeout:      15 * time.Second,
			GuestTimeout: -1, // only the host's limit
		})
	})
	// The limit runs from when the VM lock is held, not while waiting
	// for another test process's VM.
	took := time.Since(start) - time.Duration(lockWaited.Load())
	for _, s := range []string{"timed out after 15s, qemu killed: the command did not finish", "hanging-now"} {
		if !strings.Contains(msg, s) {
			t.Errorf("failure message lacks %q:\n%s", s, msg)
		}
	}
	if took > 30*time.Second {
		t.Errorf("a 15 s limit took %v", took)
	}
	t.Logf("hung guest killed after %v", took.Round(time.Millisecond))
}

func TestVMGuestTimeoutKillsCommand(t *testing.T) {
	requireHost(t)
	k := LoadKernel(t, DefaultSeries)
	var res Result
	msg := expectFailure(t, func(tb testing.TB) {
		var err error
		res, err = run(tb, k, Options{
			Args:         []string{"sh", "-c", "echo hanging-now; sleep 1000"},
			Modules:      []string{},
			Timeout:      90 * time.Second,
			GuestTimeout: 5 * time.Second,
		})
		if err != nil {
			tb.Fatalf("%v", err)
		}
	})
	if !strings.Contains(msg, "guest time limit of 5s") || !strings.Contains(msg, "hanging-now") {
		t.Errorf("failure message:\n%s", msg)
	}
	if res.ExitCode != 128+15 {
		t.Errorf("exit code %d, want 143 (SIGTERM)", res.ExitCode)
	}
	if res.Duration > 60*time.Second {
		t.Errorf("the guest limit did not end the run early: %v", res.Duration)
	}
}

func TestVMKernelWithoutInitFails(t *testing.T) {
	requireHost(t)
	k := LoadKernel(t, DefaultSeries)
	msg := expectFailure(t, func(tb testing.TB) {
		Run(tb, k, Options{Args: []string{"true"}, KernelArgs: []string{"rdinit=/no-such-init"}, Modules: []string{}, Timeout: 60 * time.Second})
	})
	if !strings.Contains(msg, "never started the command") || !strings.Contains(msg, "Kernel panic") {
		t.Errorf("failure message:\n%s", msg)
	}
}

func TestVMSetupErrorFails(t *testing.T) {
	requireHost(t)
	k := LoadKernel(t, DefaultSeries)
	// The per-run archive is unpacked over the base one: replace the module
	// list with a module that does not exist, so /init's insmod fails.
	list := filepath.Join(t.TempDir(), "modules")
	if err := os.WriteFile(list, []byte("no_such_module\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	msg := expectFailure(t, func(tb testing.TB) {
		Run(tb, k, Options{Args: []string{"true"}, Files: map[string]string{guestModules: list}, Modules: []string{}, Timeout: 60 * time.Second})
	})
	if !strings.Contains(msg, "guest setup failed in /init: insmod no_such_module") {
		t.Errorf("failure message:\n%s", msg)
	}
}

func TestKernelsPinned(t *testing.T) {
	requireHost(t)
	ks := Kernels(t)
	var series []string
	for _, k := range ks {
		series = append(series, k.Series)
		if !strings.HasPrefix(k.Version, k.Series+".") || !strings.Contains(k.Package, k.Version) || k.PackageVersion == "" {
			t.Errorf("kernel %+v", k)
		}
		if fi, err := os.Stat(k.Vmlinuz()); err != nil || fi.Size() < 1<<20 {
			t.Errorf("vmlinuz: %v", err)
		}
		t.Logf("%s: %s=%s in %s", k.Series, k.Package, k.PackageVersion, k.Dir)
	}
	if !slices.Contains(series, "6.1") || !slices.Contains(series, "6.12") {
		t.Errorf("series %v, want 6.1 and 6.12", series)
	}
	// Cached: fast.
	start := time.Now()
	LoadKernel(t, DefaultSeries)
	if d := time.Since(start); d > 2*time.Second {
		t.Errorf("cached LoadKernel took %v", d)
	}
}

// --- unprivileged unit tests ---

func TestCpioWriter(t *testing.T) {
	var buf bytes.Buffer
	c := newCpioWriter(&buf)
	c.Dir("/a", 0o700)
	c.File("/a/b/c.txt", []byte("hello"), 0o644)
	c.Symlink("/bin/sh", "busybox")
	c.CharDev("/dev/console", 0o600, 5, 1)
	if err := c.Close(); err != nil {
		t.Fatal(err)
	}
	ents := parseCpio(t, buf.Bytes())
	var got []string
	for _, e := range ents {
		got = append(got, fmt.Sprintf("%s %o %q %d:%d", e.name, e.mode, e.data, e.rmaj, e.rmin))
	}
	want := []string{
		`a 40700 "" 0:0`,
		`a/b 40755 "" 0:0`,
		`a/b/c.txt 100644 "hello" 0:0`,
		`bin 40755 "" 0:0`,
		`bin/sh 120777 "busybox" 0:0`,
		`dev 40755 "" 0:0`,
		`dev/console 20600 "" 5:1`,
		`TRAILER!!! 0 "" 0:0`,
	}
	if !slices.Equal(got, want) {
		t.Errorf("entries:\n%s\nwant\n%s", strings.Join(got, "\n"), strings.Join(want, "\n"))
	}
	if len(buf.Bytes())%4 != 0 {
		t.Errorf("archive length %d not 4-aligned", buf.Len())
	}
}

type cpioEntry struct {
	name       string
	mode       uint64
	data       []byte
	rmaj, rmin uint64
}

// parseCpio reads a newc archive, checking alignment as it goes.
func parseCpio(t *testing.T, b []byte) []cpioEntry {
	t.Helper()
	var ents []cpioEntry
	off := 0
	field := func(i int) uint64 {
		v, err := strconv.ParseUint(string(b[off+6+8*i:off+14+8*i]), 16, 32)
		if err != nil {
			t.Fatalf("header at %d: %v", off, err)
		}
		return v
	}
	for off < len(b) {
		if string(b[off:off+6]) != "070701" {
			t.Fatalf("bad magic at %d: %q", off, b[off:off+6])
		}
		mode, size, rmaj, rmin, nameSize := field(1), field(6), field(9), field(10), field(11)
		name := string(b[off+110 : off+110+int(nameSize)-1])
		dataOff := (off + 110 + int(nameSize) + 3) &^ 3
		e := cpioEntry{name: name, mode: mode, data: b[dataOff : dataOff+int(size)], rmaj: rmaj, rmin: rmin}
		ents = append(ents, e)
		off = (dataOff + int(size) + 3) &^ 3
		if name == "TRAILER!!!" {
			break
		}
	}
	return ents
}

func TestResolveModules(t *testing.T) {
	dir := t.TempDir()
	dep := strings.Join([]string{
		"kernel/net/tls/tls.ko.xz:",
		"kernel/drivers/net/bonding/bonding.ko.xz: kernel/net/tls/tls.ko.xz",
		"kernel/net/a.ko: kernel/net/b-dash.ko kernel/net/c.ko",
		"kernel/net/b-dash.ko: kernel/net/c.ko",
		"kernel/net/c.ko:",
		"kernel/net/loop1.ko: kernel/net/loop2.ko",
		"kernel/net/loop2.ko: kernel/net/loop1.ko",
		"kernel/net/needsgone.ko: kernel/net/gone.ko",
		"",
	}, "\n")
	if err := os.WriteFile(filepath.Join(dir, "modules.dep"), []byte(dep), 0o644); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(dir, "modules.builtin"), []byte("kernel/net/veth.ko\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	names := func(ms []module) (s []string) {
		for _, m := range ms {
			s = append(s, m.name)
		}
		return s
	}
	got, err := resolveModules(dir, []string{"a", "veth", "bonding", "c"})
	if err != nil {
		t.Fatal(err)
	}
	if want := []string{"c", "b_dash", "a", "tls", "bonding"}; !slices.Equal(names(got), want) {
		t.Errorf("order %v, want %v", names(got), want)
	}
	if got[0].path != filepath.Join(dir, "kernel/net/c.ko") {
		t.Errorf("path %s", got[0].path)
	}
	for w, errWant := range map[string]string{"nosuch": "neither", "loop1": "cycle", "needsgone": "needed by needsgone"} {
		if _, err := resolveModules(dir, []string{w}); err == nil || !strings.Contains(err.Error(), errWant) {
			t.Errorf("resolveModules(%s): %v, want an error with %q", w, err, errWant)
		}
	}
}

func TestParseOutput(t *testing.T) {
	p := parseOutput("noise\n" + markerStart + " uptime=2.50\nline 1\nline 2\n" + markerEnd + " uptime=3.75\n" + markerExit + "7\n")
	if !p.started || !p.exited || p.exit != 7 || p.output != "line 1\nline 2\n" ||
		p.boot != 2500*time.Millisecond || p.run != 1250*time.Millisecond {
		t.Errorf("%+v", p)
	}
	if p := parseOutput(markerStart + " uptime=1\npartial"); p.exited || p.output != "partial" {
		t.Errorf("%+v", p)
	}
	if p := parseOutput(markerSetup + "insmod tls\n"); p.setupErr != "insmod tls" || p.started {
		t.Errorf("%+v", p)
	}
}

// TestConsoleMarkers: when the output port lost /init's last lines (seen
// once in CI: the command's output ended, then no end or exit marker),
// the console's copies of the markers stand in; the output stays the
// port's, and a port that has its markers is left as it is.
func TestConsoleMarkers(t *testing.T) {
	console := parseOutput("[    3.1] boot\n" + markerStart + " uptime=3.28\n" + markerEnd + " uptime=4.69\n" + markerExit + "0\n[    4.7] reboot: Power down\n")
	port := parseOutput(markerStart + " uptime=3.28\n--- serve\nhello\n--- done\n")
	p, took := withConsoleMarkers(port, console)
	if !took || !p.started || !p.exited || p.exit != 0 || p.output != "--- serve\nhello\n--- done\n" ||
		p.run != 1410*time.Millisecond || p.boot != 3280*time.Millisecond {
		t.Errorf("lost exit marker: took %v, %+v", took, p)
	}
	whole := parseOutput(markerStart + " uptime=3.28\nout\n" + markerEnd + " uptime=4.69\n" + markerExit + "3\n")
	if p, took := withConsoleMarkers(whole, console); took || p.exit != 3 || p.output != "out\n" {
		t.Errorf("port with its markers: took %v, %+v", took, p)
	}
	if p, took := withConsoleMarkers(parseOutput(""), parseOutput(markerSetup+"insmod tls\n")); !took || p.setupErr != "insmod tls" || p.started {
		t.Errorf("setup error on the console only: took %v, %+v", took, p)
	}
	if p, took := withConsoleMarkers(port, parseOutput(markerStart+" uptime=3.28\n[  5.0] Kernel panic\n")); took || p.exited {
		t.Errorf("no exit marker anywhere: took %v, %+v", took, p)
	}
}

func TestOptionsLimits(t *testing.T) {
	for _, c := range []struct {
		o           Options
		host, guest time.Duration
	}{
		{Options{}, DefaultTimeout, DefaultTimeout - 30*time.Second},
		{Options{Timeout: 20 * time.Second}, 20 * time.Second, 15 * time.Second},
		{Options{Timeout: 20 * time.Second, GuestTimeout: -1}, 20 * time.Second, -1},
		{Options{GuestTimeout: 5 * time.Second}, DefaultTimeout, 5 * time.Second},
	} {
		if h, g := c.o.limits(); h != c.host || g != c.guest {
			t.Errorf("%+v: limits %v %v, want %v %v", c.o, h, g, c.host, c.guest)
		}
	}
}

func TestShellQuote(t *testing.T) {
	if got := shellQuote(`a'b "c" $d`); got != `'a'\''b "c" $d'` {
		t.Errorf("shellQuote: %s", got)
	}
	for name, ok := range map[string]bool{"FOO": true, "_x1": true, "1X": false, "A-B": false, "": false} {
		if validEnvName(name) != ok {
			t.Errorf("validEnvName(%q) != %v", name, ok)
		}
	}
}

// fakeTB records Fatal/Error calls instead of failing the real test; Fatal
// and FailNow end the calling goroutine as testing.T does.
type fakeTB struct {
	testing.TB
	mu     sync.Mutex
	failed bool
	msgs   []string
}

func (f *fakeTB) record(s string) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.failed = true
	f.msgs = append(f.msgs, s)
}
func (f *fakeTB) Helper()                        {}
func (f *fakeTB) Fail()                          { f.record("Fail") }
func (f *fakeTB) FailNow()                       { f.record("FailNow"); runtime.Goexit() }
func (f *fakeTB) Error(args ...any)              { f.record(fmt.Sprint(args...)) }
func (f *fakeTB) Errorf(format string, a ...any) { f.record(fmt.Sprintf(format, a...)) }
func (f *fakeTB) Fatal(args ...any)              { f.record(fmt.Sprint(args...)); runtime.Goexit() }
func (f *fakeTB) Fatalf(format string, a ...any) {
	f.record(fmt.Sprintf(format, a...))
	runtime.Goexit()
}
func (f *fakeTB) Skip(args ...any)                { f.record("skipped: " + fmt.Sprint(args...)); runtime.Goexit() }
func (f *fakeTB) Skipf(format string, a ...any)   { f.Skip(fmt.Sprintf(format, a...)) }
func (f *fakeTB) SkipNow()                        { f.Skip() }
func (f *fakeTB) Failed() bool                    { f.mu.Lock(); defer f.mu.Unlock(); return f.failed }
func (f *fakeTB) Logf(format string, args ...any) { f.TB.Logf(format, args...) }

// expectFailure runs fn with a fakeTB and returns the failure it reported;
// it fails t if fn did not fail.
func expectFailure(t *testing.T, fn func(testing.TB)) string {
	t.Helper()
	f := &fakeTB{TB: t}
	done := make(chan struct{})
	go func() {
		defer close(done)
		fn(f)
	}()
	<-done
	msg := strings.Join(f.msgs, "\n")
	if !f.Failed() {
		t.Fatalf("expected a test failure, got none")
	}
	if strings.HasPrefix(msg, "skipped: ") {
		t.Fatalf("expected a test failure, got a skip: %s", msg)
	}
	t.Logf("reported failure (as expected):\n%s", tail(msg, 3000))
	return msg
}

func TestParseLdd(t *testing.T) {
	out := "\tlinux-vdso.so.1 (0x00007ffd1d9f5000)\n" +
		"\tlibtinfo.so.6 => /lib/x86_64-linux-gnu/libtinfo.so.6 (0x00007f0f1e6a1000)\n" +
		"\tlibc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x00007f0f1e4bf000)\n" +
		"\t/lib64/ld-linux-x86-64.so.2 (0x00007f0f1e828000)\n"
	got, err := parseLdd(out)
	if err != nil {
		t.Fatal(err)
	}
	want := []string{"/lib/x86_64-linux-gnu/libtinfo.so.6", "/lib/x86_64-linux-gnu/libc.so.6", "/lib64/ld-linux-x86-64.so.2"}
	if !slices.Equal(got, want) {
		t.Errorf("parseLdd: %q, want %q", got, want)
	}
	if _, err := parseLdd("\tlibgone.so.1 => not found\n"); err == nil || !strings.Contains(err.Error(), "libgone.so.1") {
		t.Errorf("missing library: %v", err)
	}
	if got, err := parseLdd("\tstatically linked\n"); err != nil || len(got) != 0 {
		t.Errorf("static: %q %v", got, err)
	}
}

func TestGuestPath(t *testing.T) {
	for in, want := range map[string]string{
		"/usr/sbin/nginx":                     "/bin/nginx",
		"/usr/bin/curl":                       "/bin/curl",
		"/sbin/ip":                            "/bin/ip",
		"/var/run/netns/x":                    "/run/netns/x",
		"/lib64/ld-linux-x86-64.so.2":         "/lib64/ld-linux-x86-64.so.2",
		"/lib/x86_64-linux-gnu/libc.so.6":     "/lib/x86_64-linux-gnu/libc.so.6",
		"/usr/lib/x86_64-linux-gnu/libz.so.1": "/usr/lib/x86_64-linux-gnu/libz.so.1",
		"/clovisor/guest.test":                "/clovisor/guest.test",
		"/usr/binary":                         "/usr/binary",
	} {
		if got := guestPath(in); got != want {
			t.Errorf("guestPath(%s) = %s, want %s", in, got, want)
		}
	}
}

// TestProgramFiles resolves a dynamically linked host program: the program
// at its path, its libraries and the loader, all existing files.
func TestProgramFiles(t *testing.T) {
	bash, err := exec.LookPath("bash")
	if err != nil {
		t.Skip("no bash on the host")
	}
	if _, err := exec.LookPath("ldd"); err != nil {
		t.Skip("no ldd on the host")
	}
	files, err := programFiles([]string{"bash"})
	if err != nil {
		t.Fatal(err)
	}
	abs, _ := filepath.Abs(bash)
	if f := files[guestPath(abs)]; f.host != abs {
		t.Errorf("bash (%s) missing: %v", abs, files)
	}
	var libc, loader bool
	for g, f := range files {
		switch {
		case f.host != "":
			if guestPath(f.host) != g {
				t.Errorf("%s copied from %s, want its own path", g, f.host)
			}
			if st, err := os.Stat(f.host); err != nil || !st.Mode().IsRegular() {
				t.Errorf("%s: %v", f.host, err)
			}
		case f.link != "":
			// The chain ends at a file of the archive.
			next := f.link
			if !filepath.IsAbs(next) {
				next = filepath.Join(filepath.Dir(g), next)
			}
			if _, ok := files[guestPath(next)]; !ok {
				t.Errorf("%s -> %s: no such entry", g, f.link)
			}
		default:
			t.Errorf("%s: empty entry", g)
		}
		libc = libc || strings.HasSuffix(g, "/libc.so.6")
		loader = loader || g == "/lib64/ld-linux-x86-64.so.2"
	}
	if !libc || !loader {
		t.Errorf("libc %v, loader %v: %v", libc, loader, files)
	}
	if _, err := programFiles([]string{"no-such-program-clovisor"}); err == nil {
		t.Error("a missing program was accepted")
	}
}

// TestLockVMSlots: VMs hold one slot per vCPU out of one per host CPU, so
// 1-vCPU VMs run side by side up to the host's CPUs, and a VM that needs
// every slot waits for them all.
func TestLockVMSlots(t *testing.T) {
	t.Setenv("CLOVISOR_CACHE", t.TempDir())
	n := runtime.NumCPU()
	if n < 2 {
		t.Skip("one host CPU: one slot")
	}
	var unlocks []func()
	for i := 0; i < n; i++ {
		done := make(chan func(), 1)
		go func() {
			u, err := lockVMs(t, 1)
			if err != nil {
				t.Error(err)
			}
			done <- u
		}()
		select {
		case u := <-done:
			unlocks = append(unlocks, u)
		case <-time.After(5 * time.Second):
			t.Fatalf("1-vCPU VM %d of %d waited for a slot", i+1, n)
		}
	}
	waiting := make(chan func(), 2)
	go func() {
		u, err := lockVMs(t, 2)
		if err != nil {
			t.Error(err)
		}
		waiting <- u
	}()
	go func() {
		u, err := lockVMs(t, 1)
		if err != nil {
			t.Error(err)
		}
		waiting <- u
	}()
	select {
	case <-waiting:
		t.Fatal("got a slot while all were held")
	case <-time.After(300 * time.Millisecond):
	}
	for _, u := range unlocks {
		u()
	}
	for i := 0; i < 2; i++ {
		select {
		case u := <-waiting:
			u()
		case <-time.After(10 * time.Second):
			t.Fatal("slots not taken after they were freed")
		}
	}
}

// TestVMRunGoTests runs three "test binaries" (scripts that talk like one)
// in one boot: each gets its own pattern and environment, its own output,
// and a failing one fails the host test, naming it, while the others
// still run.
func TestVMRunGoTests(t *testing.T) {
	requireHost(t)
	k := LoadKernel(t, DefaultSeries)
	dir := t.TempDir()
	fake := func(name, body string) string {
		p := filepath.Join(dir, name)
		if err := os.WriteFile(p, []byte("#!/bin/sh\n"+body), 0o755); err != nil {
			t.Fatal(err)
		}
		return p
	}
	pass := fake("pass.test", "echo '=== RUN   TestA'\necho \"mode=$MODE common=$COMMON $4\"\necho '--- PASS: TestA (0.00s)'\n")
	fail := fake("fail.test", "echo '=== RUN   TestB'\necho '    b_test.go:1: guest says no'\necho '--- FAIL: TestB (0.00s)'\nexit 1\n")
	runs := []GoTestRun{
		{Name: "one", Binary: pass, Pattern: "^TestA$", Env: map[string]string{"MODE": "kprobe"}},
		{Name: "two", Binary: fail, Pattern: "^TestB$"},
		{Name: "three", Binary: pass, Pattern: "^TestA$", Env: map[string]string{"MODE": "it's"}},
	}
	opts := Options{Env: map[string]string{"COMMON": "c"}, Modules: []string{}, Timeout: 60 * time.Second}
	var results []GoTestResult
	msg := expectFailure(t, func(tb testing.TB) { _, results = RunGoTests(tb, k, runs, opts) })
	if !strings.Contains(msg, "guest run two") || !strings.Contains(msg, "guest says no") || strings.Contains(msg, "guest run one") {
		t.Errorf("failure message:\n%s", msg)
	}
	if len(results) != 3 {
		t.Fatalf("%d results", len(results))
	}
	for i, want := range []struct {
		name, out string
		code      int
	}{
		{"one", "=== RUN   TestA\nmode=kprobe common=c -test.run=^TestA$\n--- PASS: TestA (0.00s)\n", 0},
		{"two", "=== RUN   TestB\n    b_test.go:1: guest says no\n--- FAIL: TestB (0.00s)\n", 1},
		{"three", "=== RUN   TestA\nmode=it's common=c -test.run=^TestA$\n--- PASS: TestA (0.00s)\n", 0},
	} {
		r := results[i]
		if r.Name != want.name || r.Output != want.out || r.ExitCode != want.code || r.Duration < 0 {
			t.Errorf("run %d: %+v, want %s exit %d output %q", i, r, want.name, want.code, want.out)
		}
	}
}

func TestSplitRuns(t *testing.T) {
	out := markerRunStart + " 0 uptime=3.00\na\nb\n" + markerRunExit + " 0 0 uptime=4.50\n" +
		markerRunStart + " 1 uptime=4.50\nc\n" + markerRunExit + " 1 2 uptime=5.00\n" +
		markerRunStart + " 2 uptime=5.00\npartial\n"
	got := splitRuns(out, 3)
	want := []GoTestResult{
		{Output: "a\nb\n", ExitCode: 0, Duration: 1500 * time.Millisecond},
		{Output: "c\n", ExitCode: 2, Duration: 500 * time.Millisecond},
		{Output: "partial\n", ExitCode: -1},
	}
	if !slices.Equal(got, want) {
		t.Errorf("splitRuns:\n%+v\nwant\n%+v", got, want)
	}
}

func TestInLoaderDirs(t *testing.T) {
	for p, want := range map[string]bool{
		"/lib/x86_64-linux-gnu/libc.so.6":                          true,
		"/usr/lib/x86_64-linux-gnu/libz.so.1":                      true,
		"/lib/x86_64-linux-gnu/glibc-hwcaps/x86-64-v3/libfoo.so.1": true,
		"/usr/local/lib/libfoo.so.1":                               false,
		"/opt/app/lib/libbar.so":                                   false,
		"/usr/lib/x86_64-linux-gnu/pulseaudio/libpulsecommon.so":   false,
	} {
		if got := inLoaderDirs(p); got != want {
			t.Errorf("inLoaderDirs(%s) = %v, want %v", p, got, want)
		}
	}
}

// TestVMKernelCrashReported crashes the guest kernel on purpose (sysrq c):
// the failure shows the command's output and the kernel's report from its
// first line, not only the console's tail. The command's line reaches the
// host only once the guest's serial driver has sent it (it writes from its
// buffer on transmit interrupts): a panic right after the write can take
// the unsent bytes with it, so the command drains the port first
// (stty's tcsetattr(TCSADRAIN)), as /init does before powering off.
func TestVMKernelCrashReported(t *testing.T) {
	requireHost(t)
	k := LoadKernel(t, DefaultSeries)
	msg := expectFailure(t, func(tb testing.TB) {
		Run(tb, k, Options{Args: []string{"sh", "-c", "echo 1 >/proc/sys/kernel/sysrq; echo crashing-now; stty -F " + guestOut + " -echo; echo c >/proc/sysrq-trigger"},
			Modules: []string{}, Timeout: 60 * time.Second})
	})
	for _, s := range []string{"crashing-now", "(from the kernel's first report)", "sysrq: Trigger a crash", "Kernel panic"} {
		if !strings.Contains(msg, s) {
			t.Errorf("failure message lacks %q:\n%s", s, msg)
		}
	}
	if i, j := strings.Index(msg, "sysrq: Trigger a crash"), strings.Index(msg, "Kernel panic"); i > j {
		t.Errorf("the report's first line is not before the panic:\n%s", msg)
	}
}

// TestVMTextPatchingUnderLoad switches every sched and syscalls tracepoint
// on and off while both vCPUs run busy loops: each switch rewrites kernel
// text (static keys, text_poke_bp) under the other vCPU's feet, as
// attaching tracepoint, kprobe and BPF programs does. Under QEMU's
// multi-threaded TCG this killed the guest ("Oops: int3") in 1 of 3 runs
// of 3 rounds (and a harsher form of it, from /init, in every run); the
// harness runs TCG single-threaded, where it must not.
func TestVMTextPatchingUnderLoad(t *testing.T) {
	requireHost(t)
	k := LoadKernel(t, "6.12")
	const rounds = 8
	script := `T=/sys/kernel/tracing
(while :; do :; done) & a=$!
(while :; do echo x >/dev/null; done) & b=$!
for i in $(seq 1 ` + strconv.Itoa(rounds) + `); do
	for g in sched syscalls; do
		echo 1 >$T/events/$g/enable || exit 1
		on=$(cat $T/events/$g/enable)
		echo 0 >$T/events/$g/enable || exit 1
		echo "$g $on $(cat $T/events/$g/enable)"
	done
done
kill $a $b`
	res := Run(t, k, Options{Args: []string{"sh", "-c", script}, Modules: []string{}, CPUs: 2, Timeout: 240 * time.Second})
	want := ""
	for i := 1; i <= rounds; i++ {
		want += "sched 1 0\nsyscalls 1 0\n"
	}
	if res.Output != want {
		t.Errorf("guest output %q, want %q", res.Output, want)
	}
	for _, m := range kernelTrouble {
		if strings.Contains(res.Console, m) {
			t.Errorf("the guest kernel reported %q:%s", m, consoleEvidence(res.Console))
		}
	}
	t.Logf("%d rounds of 2 tracepoint groups switched on and off under load in %v", rounds, res.Duration.Round(time.Millisecond))
}

func TestConsoleEvidence(t *testing.T) {
	boot := strings.Repeat("[    0.1] boot line\n", 400)
	report := "[    2.0] Oops: int3: 0000 [#1] PREEMPT SMP NOPTI\n[    2.0] RIP: 0010:sched_clock_cpu+0x9/0x190\n"
	after := strings.Repeat("[    2.1] trace line\n", 100) + "[    2.2] Kernel panic - not syncing: Fatal exception\n"
	got := consoleEvidence(boot + report + after)
	if !strings.HasPrefix(got, " (from the kernel's first report):\n[...]\n[    0.1] boot line\n") {
		t.Errorf("does not start at a line before the report:\n%.200s", got)
	}
	if !strings.Contains(got, report+after) || !strings.HasSuffix(got, "Fatal exception\n") {
		t.Errorf("report or its end missing:\n%s", got)
	}
	if n := strings.Count(got, "boot line"); n < 50 || n > 80 {
		t.Errorf("%d boot lines before the report, want the last ~1,500 bytes' worth", n)
	}
	// Without a report: the tail.
	plain := boot + "[    3.0] last line\n"
	if got := consoleEvidence(plain); got != " (tail):\n"+tail(plain, 4000) {
		t.Errorf("no report: %.100q", got)
	}
	// A long report is cut in the middle, its end kept.
	long := report + strings.Repeat("[    2.1] trace line\n", 3000) + "[    9.9] the end\n"
	got = consoleEvidence(long)
	if !strings.HasPrefix(got, " (from the kernel's first report):\n"+report) || !strings.HasSuffix(got, "the end\n") || !strings.Contains(got, "\n[...]\n") || len(got) > 27000 {
		t.Errorf("long report: %d bytes, start %.120q, end %q", len(got), got, got[len(got)-40:])
	}
}
