// Package testbed provides helpers for Clovisor's privileged integration
// tests: a real Jaeger v2 (OTLP in, query API out), network namespaces joined
// by veth pairs, and cgroup v2 groups to run processes in.
//
// Every helper takes a testing.TB, fails the test itself on setup errors, and
// registers its teardown with t.Cleanup, so nothing it created (processes,
// namespaces, links, cgroups, temp files) outlives the test, also when the
// test fails. Typical use:
//
//	func TestTrace(t *testing.T) {
//		testbed.RequireRoot(t)
//		testbed.RequireTool(t, "ip")
//		j := testbed.StartJaeger(t)
//
//		client := testbed.NewNetns(t, "client")
//		server := testbed.NewNetns(t, "server")
//		testbed.VethPair(t, client, server,
//			netip.MustParsePrefix("10.201.1.1/24"), netip.MustParsePrefix("10.201.1.2/24"))
//
//		cg := testbed.NewCgroup(t, "server")
//		srv := server.Command(ctx, "nginx", "-c", conf)
//		if err := cg.Start(srv); err != nil { t.Fatal(err) } // in the netns and the cgroup
//		... run the code under test, exporting OTLP to j.OTLPGRPCEndpoint() ...
//		spans := j.WaitForSpans(t, "clovisor", 2, 10*time.Second)
//	}
//
// Privileged tests start with RequireRoot (and RequireTool for each program
// they exec). Outside CI these skip the test when the machine cannot run it;
// with CI=true they fail it instead, so a privileged test never passes in CI
// by silently skipping.
//
// Jaeger is built once by scripts/jaeger.sh into a cache folder outside the
// checkout (about 4 minutes cold, then instant); scripts/setup.sh installs the
// Debian packages the tests use (iproute2, nginx-light, iperf3, clang, ...).
//
// Addresses used by tests belong to 10.201.0.0/16 and fd00:c10::/64 and live
// only inside the tests' own network namespaces; servers outside namespaces
// listen on 127.0.0.1 only.
package testbed

import (
	"bufio"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"
)

// Capability numbers from linux/capability.h.
const (
	capNetAdmin = 12
	capSysAdmin = 21
	capBPF      = 39
)

// inCI reports whether the tests run in CI (CI=true), where privileged tests
// must not skip.
func inCI() bool {
	v, _ := strconv.ParseBool(os.Getenv("CI"))
	return v
}

// skipOrFail skips the test, or fails it when running in CI.
func skipOrFail(t testing.TB, format string, args ...any) {
	t.Helper()
	msg := fmt.Sprintf(format, args...)
	if inCI() {
		t.Fatalf("%s (CI=true: privileged tests must not skip)", msg)
		return
	}
	t.Skip(msg)
}

// RequireRoot skips the test unless it runs as root with CAP_SYS_ADMIN,
// CAP_BPF and CAP_NET_ADMIN in its effective set; with CI=true it fails the
// test instead of skipping.
func RequireRoot(t testing.TB) {
	t.Helper()
	if uid := os.Geteuid(); uid != 0 {
		skipOrFail(t, "test needs root (running as uid %d)", uid)
		return
	}
	eff, err := effectiveCaps()
	if err != nil {
		skipOrFail(t, "test needs root: cannot read capabilities: %v", err)
		return
	}
	var missing []string
	for _, c := range []struct {
		bit  uint
		name string
	}{{capSysAdmin, "CAP_SYS_ADMIN"}, {capBPF, "CAP_BPF"}, {capNetAdmin, "CAP_NET_ADMIN"}} {
		if eff&(1<<c.bit) == 0 {
			missing = append(missing, c.name)
		}
	}
	if len(missing) > 0 {
		skipOrFail(t, "test needs root with %s (effective set lacks them)", strings.Join(missing, ", "))
	}
}

// effectiveCaps returns the CapEff mask of this process.
func effectiveCaps() (uint64, error) {
	f, err := os.Open("/proc/self/status")
	if err != nil {
		return 0, err
	}
	defer f.Close()
	s := bufio.NewScanner(f)
	for s.Scan() {
		if v, ok := strings.CutPrefix(s.Text(), "CapEff:"); ok {
			return strconv.ParseUint(strings.TrimSpace(v), 16, 64)
		}
	}
	if err := s.Err(); err != nil {
		return 0, err
	}
	return 0, errors.New("no CapEff line in /proc/self/status")
}

// RequireTool skips the test unless the program name is found in PATH; with
// CI=true it fails the test instead of skipping. It returns the program's path.
func RequireTool(t testing.TB, name string) string {
	t.Helper()
	p, err := exec.LookPath(name)
	if err != nil {
		skipOrFail(t, "test needs %q in PATH (see scripts/setup.sh): %v", name, err)
		return ""
	}
	return p
}

// FreePort returns a TCP port on 127.0.0.1 that was free a moment ago. The
// port is not reserved: bind it soon.
func FreePort(t testing.TB) int {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatalf("FreePort: %v", err)
	}
	defer l.Close()
	return l.Addr().(*net.TCPAddr).Port
}

// WaitTCP dials addr (host:port) until a TCP connection succeeds or timeout
// passes, and returns the last dial error then.
func WaitTCP(addr string, timeout time.Duration) error {
	deadline := time.Now().Add(timeout)
	for {
		c, err := net.DialTimeout("tcp", addr, time.Second)
		if err == nil {
			c.Close()
			return nil
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("%s not accepting TCP connections after %v: %w", addr, timeout, err)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// RepoRoot returns the root of the checkout: the nearest directory at or
// above the working directory that holds go.mod.
func RepoRoot() (string, error) {
	dir, err := os.Getwd()
	if err != nil {
		return "", err
	}
	for {
		if _, err := os.Stat(filepath.Join(dir, "go.mod")); err == nil {
			return dir, nil
		}
		parent := filepath.Dir(dir)
		if parent == dir {
			return "", errors.New("no go.mod found above the working directory")
		}
		dir = parent
	}
}

// randSuffix returns n random hex characters.
func randSuffix(n int) string {
	b := make([]byte, (n+1)/2)
	if _, err := rand.Read(b); err != nil {
		panic(err)
	}
	return hex.EncodeToString(b)[:n]
}

// tail returns at most the last n bytes of the file at path, starting at a
// line boundary.
func tail(path string, n int) string {
	b, err := os.ReadFile(path)
	if err != nil {
		return fmt.Sprintf("(cannot read %s: %v)", path, err)
	}
	if len(b) > n {
		b = b[len(b)-n:]
		if i := strings.IndexByte(string(b), '\n'); i >= 0 {
			b = b[i+1:]
		}
	}
	return string(b)
}
