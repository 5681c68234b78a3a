package vmtest

import (
	"bytes"
	"os/exec"
	"path/filepath"
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

	_, guestLimit := opts.limits()
	testTimeout := "0" // none
	if guestLimit > 0 {
		testTimeout = strconv.Itoa(max(1, int((guestLimit-min(5*time.Second, guestLimit/5))/time.Second))) + "s"
	}
	opts.Args = []string{guestTestBinary, "-test.v", "-test.count=1", "-test.timeout=" + testTimeout, "-test.run=" + pattern}
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
