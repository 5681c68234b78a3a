package testbed

import (
	"context"
	"errors"
	"fmt"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"runtime"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

// NetnsPrefix starts the name of every network namespace (and veth) the
// helpers create, so leftovers of a killed test run are easy to spot:
// `ip netns list | grep ^clvt-`.
const NetnsPrefix = "clvt-"

// netnsDir is where `ip netns` keeps its namespace bind mounts.
const netnsDir = "/run/netns"

// Netns is a named network namespace (as made by `ip netns add`), with only a
// loopback device (up) until links are added to it.
type Netns struct {
	// Name is the namespace's name for `ip netns` / `ip -n`.
	Name string
}

var nameRE = regexp.MustCompile(`[^a-zA-Z0-9_.-]+`)

// NewNetns creates a network namespace named clvt-<name>-<random>, sets its
// loopback up, and deletes it (killing any process left inside) when the
// test ends.
func NewNetns(t testing.TB, name string) *Netns {
	t.Helper()
	RequireTool(t, "ip")
	name = nameRE.ReplaceAllString(name, "_")
	if len(name) > 24 {
		name = name[:24]
	}
	ns := &Netns{Name: NetnsPrefix + name + "-" + randSuffix(6)}
	if out, err := exec.Command("ip", "netns", "add", ns.Name).CombinedOutput(); err != nil {
		t.Fatalf("NewNetns: ip netns add %s: %v: %s", ns.Name, err, out)
	}
	t.Cleanup(func() {
		if err := ns.remove(); err != nil {
			t.Errorf("NewNetns cleanup: %v", err)
		}
	})
	ns.IP(t, "link", "set", "lo", "up")
	return ns
}

// Path returns the namespace's bind mount, /run/netns/<name>, which
// unix.Setns and nsenter --net= accept.
func (ns *Netns) Path() string { return filepath.Join(netnsDir, ns.Name) }

// remove kills the processes in the namespace and deletes it.
func (ns *Netns) remove() error {
	for i := 0; i < 50; i++ {
		pids, err := ns.pids()
		if err != nil || len(pids) == 0 {
			break
		}
		for _, pid := range pids {
			_ = syscall.Kill(pid, syscall.SIGKILL)
		}
		time.Sleep(20 * time.Millisecond)
	}
	out, err := exec.Command("ip", "netns", "delete", ns.Name).CombinedOutput()
	if err != nil {
		if _, serr := os.Stat(ns.Path()); errors.Is(serr, os.ErrNotExist) {
			return nil
		}
		return fmt.Errorf("ip netns delete %s: %v: %s", ns.Name, err, out)
	}
	return nil
}

// pids lists the processes whose network namespace is this one.
func (ns *Netns) pids() ([]int, error) {
	out, err := exec.Command("ip", "netns", "pids", ns.Name).Output()
	if err != nil {
		return nil, err
	}
	var pids []int
	for _, f := range strings.Fields(string(out)) {
		if pid, err := strconv.Atoi(f); err == nil && pid != os.Getpid() {
			pids = append(pids, pid)
		}
	}
	return pids, nil
}

// IP runs `ip -n <ns> args...` and fails the test on error, e.g.
// ns.IP(t, "route", "add", "default", "via", "10.201.1.1").
func (ns *Netns) IP(t testing.TB, args ...string) {
	t.Helper()
	ipIn(t, ns, args...)
}

// Command returns a command that runs the program name inside the namespace
// (through `ip netns exec`). Combine it with Cgroup.Start to run it in a
// cgroup too.
func (ns *Netns) Command(ctx context.Context, name string, args ...string) *exec.Cmd {
	return exec.CommandContext(ctx, "ip", append([]string{"netns", "exec", ns.Name, name}, args...)...)
}

// Run runs fn on an OS thread that has entered the namespace, and returns
// fn's error. Sockets fn creates belong to the namespace and stay there after
// Run returns (so a listener made in Run can be served from any goroutine);
// goroutines fn starts do NOT run in the namespace. The thread's original
// namespace is always restored; if that fails, the thread is discarded and
// the test fails. A t.Fatal or panic inside fn is passed on to the caller.
func (ns *Netns) Run(t testing.TB, fn func() error) error {
	t.Helper()
	type result struct {
		err      error
		setupErr error
		panicked any
		returned bool
	}
	done := make(chan result, 1)
	go func() {
		var r result
		defer func() { done <- r }()
		// Never unlocked if restoring fails: the thread then dies with this
		// goroutine instead of going back to the scheduler in the wrong netns.
		runtime.LockOSThread()

		orig, err := os.Open(fmt.Sprintf("/proc/self/task/%d/ns/net", unix.Gettid()))
		if err != nil {
			r.setupErr = err
			runtime.UnlockOSThread()
			return
		}
		defer orig.Close()
		target, err := os.Open(ns.Path())
		if err != nil {
			r.setupErr = err
			runtime.UnlockOSThread()
			return
		}
		defer target.Close()
		if err := unix.Setns(int(target.Fd()), unix.CLONE_NEWNET); err != nil {
			r.setupErr = fmt.Errorf("setns %s: %w", ns.Path(), err)
			runtime.UnlockOSThread()
			return
		}
		defer func() {
			if err := unix.Setns(int(orig.Fd()), unix.CLONE_NEWNET); err != nil {
				r.setupErr = fmt.Errorf("restoring the original netns: %w", err)
				return
			}
			runtime.UnlockOSThread()
		}()
		defer func() {
			if p := recover(); p != nil {
				r.panicked = p
			}
		}()
		r.err = fn()
		r.returned = true
	}()
	r := <-done
	if r.panicked != nil {
		panic(r.panicked)
	}
	if r.setupErr != nil {
		t.Fatalf("Netns(%s).Run: %v", ns.Name, r.setupErr)
	}
	if !r.returned {
		// fn called runtime.Goexit, i.e. t.FailNow/t.Fatal/t.SkipNow.
		t.FailNow()
	}
	return r.err
}

// Veth is a veth pair made by VethPair. A and B are the names of its ends in
// the first and the second namespace.
type Veth struct {
	A, B string
}

// VethPair joins two namespaces with a veth pair, gives the end in a the
// address addrA and the end in b addrB (IPv4 or IPv6, e.g. 10.201.1.1/24 and
// 10.201.1.2/24, or fd00:c10::1/64 and fd00:c10::2/64), and sets both ends
// and both loopbacks up. A nil namespace means the test process's own (host)
// namespace; avoid that unless the test needs a host-side end. The pair is
// deleted when the test ends. Link names are clvt<random>a / clvt<random>b.
// Add more addresses or routes with Netns.IP.
func VethPair(t testing.TB, a, b *Netns, addrA, addrB netip.Prefix) *Veth {
	t.Helper()
	RequireTool(t, "ip")
	base := strings.TrimSuffix(NetnsPrefix, "-") + randSuffix(8)
	v := &Veth{A: base + "a", B: base + "b"}

	args := []string{"link", "add", "name", v.A}
	if a != nil {
		args = append(args, "netns", a.Name)
	}
	args = append(args, "type", "veth", "peer", "name", v.B)
	if b != nil {
		args = append(args, "netns", b.Name)
	}
	ipIn(t, nil, args...)
	t.Cleanup(func() {
		// Deleting one end deletes both. The namespaces' own cleanup also
		// removes it, so "cannot find device" is fine.
		if err := exec.Command("ip", nsArgs(a, "link", "del", v.A)...).Run(); err != nil {
			if exec.Command("ip", nsArgs(a, "link", "show", v.A)...).Run() == nil {
				t.Errorf("VethPair cleanup: ip link del %s failed: %v", v.A, err)
			}
		}
	})
	for _, end := range []struct {
		ns   *Netns
		dev  string
		addr netip.Prefix
	}{{a, v.A, addrA}, {b, v.B, addrB}} {
		if end.addr.IsValid() {
			args := []string{"addr", "add", end.addr.String(), "dev", end.dev}
			if end.addr.Addr().Is6() {
				args = append(args, "nodad") // usable at once, no DAD delay
			}
			ipIn(t, end.ns, args...)
		}
		ipIn(t, end.ns, "link", "set", end.dev, "up")
		ipIn(t, end.ns, "link", "set", "lo", "up")
	}
	return v
}

// nsArgs prefixes ip arguments with -n <ns> unless ns is nil.
func nsArgs(ns *Netns, args ...string) []string {
	if ns == nil {
		return args
	}
	return append([]string{"-n", ns.Name}, args...)
}

// ipIn runs ip in the namespace ns (nil: the current one), failing the test
// on error.
func ipIn(t testing.TB, ns *Netns, args ...string) {
	t.Helper()
	full := nsArgs(ns, args...)
	if out, err := exec.Command("ip", full...).CombinedOutput(); err != nil {
		t.Fatalf("ip %s: %v: %s", strings.Join(full, " "), err, strings.TrimSpace(string(out)))
	}
}
