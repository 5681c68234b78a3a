package vmtest

import (
	"bytes"
	"fmt"
	"maps"
	"os/exec"
	"path/filepath"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/clovisor/clovisor/internal/testbed"
)

// guestTestBinary is where RunGoTest puts the test binary in the guest.
const guestTestBinary = "/clovisor/guest.test"

// BuildTestBinary compiles the tests of package pkg (an import path, or a
// path relative to the repository root such as "./probes") into a
// statically linked test binary (`CGO_ENABLED=0 go test -c`) in a temporary
// folder of the test, and returns its path. The go build cache makes
// repeated builds cheap.
func BuildTestBinary(t testing.TB, pkg string) string {
	t.Helper()
	goBin := testbed.RequireTool(t, "go")
	root, err := testbed.RepoRoot()
	if err != nil {
		t.Fatalf("vmtest: %v", err)
	}
	out := filepath.Join(t.TempDir(), strings.NewReplacer("/", "_", ".", "_").Replace(strings.Trim(pkg, "./"))+".test")
	cmd := exec.Command(goBin, "test", "-c", "-o", out, pkg)
	cmd.Dir = root
	cmd.Env = append(cmd.Environ(), "CGO_ENABLED=0")
	var stderr bytes.Buffer
	cmd.Stdout, cmd.Stderr = &stderr, &stderr
	start := time.Now()
	if err := cmd.Run(); err != nil {
		t.Fatalf("vmtest: CGO_ENABLED=0 go test -c %s: %v\n%s", pkg, err, stderr.String())
	}
	if err := checkStatic(out); err != nil {
		t.Fatalf("vmtest: %v", err)
	}
	t.Logf("vmtest: built %s test binary in %v", pkg, time.Since(start).Round(time.Millisecond))
	return out
}

// RunGoTest boots k and runs the Go test binary bin (see BuildTestBinary)
// in it as `bin -test.v -test.count=1 -test.run pattern`, with a
// -test.timeout a little shorter than the guest's time limit so that a hung
// test prints its goroutines. opts adds files, environment, modules and
// limits; its Args and IgnoreExitCode are ignored. The guest's test output is
// logged to t; if any guest test fails (or the VM does), t fails with that
// output, so the guest's failures show in the host's test log. Guest tests
// can tell they run in the VM with InGuest.
func RunGoTest(t testing.TB, k Kernel, bin, pattern string, opts Options) Result {
	t.Helper()
	files := map[string]string{guestTestBinary: bin}
	for g, h := range opts.Files {
		files[g] = h
	}
	opts.Files = files

	opts.Args = append([]string{guestTestBinary}, goTestArgs(opts, pattern)...)
	opts.IgnoreExitCode = false

	testbed.RequireTool(t, "qemu-system-x86_64")
	testbed.RequireTool(t, "busybox")
	res, err := run(t, k, opts)
	if err != nil {
		t.Fatalf("vmtest: %s: guest tests %q failed: %v", k, pattern, err)
	}
	if !strings.Contains(res.Output, "=== RUN") {
		t.Fatalf("vmtest: %s: no guest test matched %q:\n%s", k, pattern, res.Output)
	}
	t.Logf("vmtest: %s: guest tests %q passed; qemu ran %v (guest: boot %v, tests %v)\n%s",
		k, pattern, res.Duration.Round(time.Millisecond), res.GuestBoot.Round(time.Millisecond),
		res.GuestRun.Round(time.Millisecond), res.Output)
	return res
}

// goTestArgs are the flags of a guest test binary run: verbose, once, the
// tests of pattern, with a -test.timeout a little shorter than the guest's
// time limit so that a hung test prints its goroutines.
func goTestArgs(opts Options, pattern string) []string {
	_, guestLimit := opts.limits()
	testTimeout := "0" // none
	if guestLimit > 0 {
		testTimeout = strconv.Itoa(max(1, int((guestLimit-min(5*time.Second, guestLimit/5))/time.Second))) + "s"
	}
	return []string{"-test.v", "-test.count=1", "-test.timeout=" + testTimeout, "-test.run=" + pattern}
}

// GoTestRun is one run of a Go test binary in RunGoTests.
type GoTestRun struct {
	// Name names the run in the log and in failures, e.g. "kprobe".
	Name string
	// Binary is the test binary's host path (see BuildTestBinary).
	Binary string
	// Pattern selects the tests (-test.run).
	Pattern string
	// Env adds environment variables for this run, over Options.Env.
	Env map[string]string
}

// GoTestResult is what one run of RunGoTests produced.
type GoTestResult struct {
	// Name is the run's GoTestRun.Name.
	Name string
	// Output is the run's test output (stdout and stderr).
	Output string
	// ExitCode is the test binary's exit status.
	ExitCode int
	// Duration is the guest time the run took.
	Duration time.Duration
}

// Markers of RunGoTests's guest script, on the command's output.
const (
	markerRunStart = "CLOVISOR-VM-RUN-START"
	markerRunExit  = "CLOVISOR-VM-RUN-EXIT"
)

var runMarkerRE = regexp.MustCompile(`^(` + markerRunStart + `|` + markerRunExit + `) (\d+)(?: (\d+))? uptime=([0-9.]+)$`)

// RunGoTests boots k once and runs several Go test binaries in it, one
// after the other, each like RunGoTest (flags, time limit) with its own
// pattern and environment: runs that need the same kernel and VM share the
// boot. Every run is made even after one fails. opts adds files,
// environment, programs, modules and limits (the time limits are for all
// runs together); its Args and IgnoreExitCode are ignored. Each run's
// output is logged to t; t fails (Errorf, naming the run, with its output)
// for every run that fails or matches no test, and fails at once (Fatalf,
// with the VM's evidence) when the VM does.
func RunGoTests(t testing.TB, k Kernel, runs []GoTestRun, opts Options) (Result, []GoTestResult) {
	t.Helper()
	if len(runs) == 0 {
		t.Fatalf("vmtest.RunGoTests: no runs")
	}
	files := map[string]string{}
	for g, h := range opts.Files {
		files[g] = h
	}
	guestBin := map[string]string{} // host binary -> guest path
	var script strings.Builder
	script.WriteString("up() { read -r u _ </proc/uptime; echo \"$u\"; }\n")
	for i, r := range runs {
		g, ok := guestBin[r.Binary]
		if !ok {
			g = fmt.Sprintf("/clovisor/guest-%d.test", len(guestBin))
			guestBin[r.Binary] = g
			files[g] = r.Binary
		}
		keys := slices.Sorted(maps.Keys(r.Env))
		var exports []string
		for _, key := range keys {
			if !validEnvName(key) {
				t.Fatalf("vmtest.RunGoTests: run %s: invalid environment variable name %q", r.Name, key)
			}
			exports = append(exports, "export "+key+"="+shellQuote(r.Env[key])+"; ")
		}
		words := []string{shellQuote(g)}
		for _, a := range goTestArgs(opts, r.Pattern) {
			words = append(words, shellQuote(a))
		}
		fmt.Fprintf(&script, "echo \"%s %d uptime=$(up)\"\n", markerRunStart, i)
		fmt.Fprintf(&script, "(%sexec %s) 2>&1\n", strings.Join(exports, ""), strings.Join(words, " "))
		fmt.Fprintf(&script, "c=$?; echo \"%s %d $c uptime=$(up)\"\n", markerRunExit, i)
	}
	opts.Files = files
	opts.Args = []string{"sh", "-c", script.String()}
	opts.IgnoreExitCode = false

	testbed.RequireTool(t, "qemu-system-x86_64")
	testbed.RequireTool(t, "busybox")
	var names []string
	for _, r := range runs {
		names = append(names, r.Name)
	}
	res, err := run(t, k, opts)
	if err != nil {
		t.Fatalf("vmtest: %s: guest runs %v failed: %v", k, names, err)
	}
	results := splitRuns(res.Output, len(runs))
	for i, r := range runs {
		gr := &results[i]
		gr.Name = r.Name
		switch {
		case gr.ExitCode < 0:
			t.Errorf("vmtest: %s: guest run %s (%q) did not finish:\n%s", k, r.Name, r.Pattern, gr.Output)
		case gr.ExitCode != 0:
			t.Errorf("vmtest: %s: guest run %s (%q) failed, exit %d:\n%s", k, r.Name, r.Pattern, gr.ExitCode, gr.Output)
		case !strings.Contains(gr.Output, "=== RUN"):
			t.Errorf("vmtest: %s: guest run %s: no test matched %q:\n%s", k, r.Name, r.Pattern, gr.Output)
		default:
			t.Logf("vmtest: %s: guest run %s (%q) passed in %v\n%s", k, r.Name, r.Pattern,
				gr.Duration.Round(time.Millisecond), gr.Output)
		}
	}
	t.Logf("vmtest: %s: guest runs %v: qemu ran %v (guest: boot %v, runs %v)", k, names,
		res.Duration.Round(time.Millisecond), res.GuestBoot.Round(time.Millisecond), res.GuestRun.Round(time.Millisecond))
	return res, results
}

// splitRuns cuts RunGoTests's output into its n runs by the marker lines.
// A run without an exit marker has ExitCode -1.
func splitRuns(out string, n int) []GoTestResult {
	results := make([]GoTestResult, n)
	starts := make([]float64, n)
	for i := range results {
		results[i].ExitCode = -1
	}
	cur := -1
	var b strings.Builder
	flush := func() {
		if cur >= 0 && cur < n {
			results[cur].Output += b.String()
		}
		b.Reset()
	}
	for _, line := range strings.SplitAfter(out, "\n") {
		m := runMarkerRE.FindStringSubmatch(strings.TrimRight(line, "\n"))
		if m == nil {
			b.WriteString(line)
			continue
		}
		flush()
		i, _ := strconv.Atoi(m[2])
		up, _ := strconv.ParseFloat(m[4], 64)
		if i >= n {
			cur = -1
			continue
		}
		if m[1] == markerRunStart {
			cur, starts[i] = i, up
			continue
		}
		code, _ := strconv.Atoi(m[3])
		results[i].ExitCode = code
		results[i].Duration = time.Duration((up - starts[i]) * float64(time.Second))
		cur = -1
	}
	flush()
	return results
}
