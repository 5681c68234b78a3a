package sockets_test

import (
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/netip"
	"os"
	"os/exec"
	"slices"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netns"
	"golang.org/x/sys/unix"

	"github.com/clovisor/clovisor/internal/testbed"
	"github.com/clovisor/clovisor/probes"
	"github.com/clovisor/clovisor/spans"
)

// The test binary doubles as the workload's HTTP server: with
// CLOVISOR_TEST_HTTP_SERVER=ADDR it serves a few fixed paths on ADDR (once
// the address exists), with keep-alive. Only Go is needed, so the workload
// runs in the VM kernels' initramfs too.
func httpServer(addr string) int {
	mux := http.NewServeMux()
	mux.HandleFunc("/a", func(w http.ResponseWriter, r *http.Request) { fmt.Fprint(w, "alpha\n") })
	mux.HandleFunc("/big", func(w http.ResponseWriter, r *http.Request) { w.Write(make([]byte, 100000)) })
	mux.HandleFunc("/post", func(w http.ResponseWriter, r *http.Request) {
		n, _ := io.Copy(io.Discard, r.Body)
		fmt.Fprintf(w, "got %d\n", n)
	})
	var ln net.Listener
	var err error
	for deadline := time.Now().Add(10 * time.Second); ; time.Sleep(20 * time.Millisecond) {
		if ln, err = net.Listen("tcp", addr); err == nil || time.Now().After(deadline) {
			break
		}
	}
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 1
	}
	fmt.Println("listening")
	if err := http.Serve(ln, mux); err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 1
	}
	return 0
}

// modeWorkload is the scripted workload every mode must see the same way:
// keep-alive requests between two network namespaces (the test's own and
// the server's), client and server in their own cgroups.
type modeWorkload struct {
	server        *exec.Cmd
	serverCG      *testbed.Cgroup
	clientCG      *testbed.Cgroup
	serverAddr    netip.AddrPort
	clientCommand func() (string, error)
}

// modeSubnet picks a /24 in 10.201.100-199.0 that no interface of this
// namespace uses yet, starting from one derived from the pid, so that test
// runs on one machine at the same time do not route into each other's
// namespaces. It returns the host's and the server's addresses.
func modeSubnet(t testing.TB) (host, server netip.Prefix) {
	addrs, err := netlink.AddrList(nil, netlink.FAMILY_V4)
	if err != nil {
		t.Fatal(err)
	}
	for i := 0; i < 100; i++ {
		x := byte(100 + (os.Getpid()+i)%100)
		net := netip.PrefixFrom(netip.AddrFrom4([4]byte{10, 201, x, 0}), 24)
		if !slices.ContainsFunc(addrs, func(a netlink.Addr) bool {
			ip, ok := netip.AddrFromSlice(a.IP.To4())
			return ok && net.Contains(ip)
		}) {
			return netip.PrefixFrom(netip.AddrFrom4([4]byte{10, 201, x, 1}), 24),
				netip.PrefixFrom(netip.AddrFrom4([4]byte{10, 201, x, 2}), 24)
		}
	}
	t.Fatal("no free test subnet in 10.201.100.0-10.201.199.0")
	return
}

func startModeWorkload(t testing.TB) *modeWorkload {
	t.Helper()
	testbed.RequireRoot(t)
	exe, err := os.Executable()
	if err != nil {
		t.Fatal(err)
	}
	modeHostSide, modeServerSide := modeSubnet(t)
	w := &modeWorkload{
		serverCG:   testbed.NewCgroup(t, "mode-srv"),
		clientCG:   testbed.NewCgroup(t, "mode-cli"),
		serverAddr: netip.AddrPortFrom(modeServerSide.Addr(), 8080),
	}
	// The server, in a new network namespace and its cgroup.
	w.server = exec.Command(exe)
	w.server.Env = append(os.Environ(), "CLOVISOR_TEST_HTTP_SERVER="+w.serverAddr.String())
	w.server.Stderr = os.Stderr
	w.server.SysProcAttr = &syscall.SysProcAttr{Cloneflags: syscall.CLONE_NEWNET, Pdeathsig: syscall.SIGKILL}
	out := &lineWaiter{ch: make(chan struct{})}
	w.server.Stdout = out
	if err := w.serverCG.Start(w.server); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { w.server.Process.Kill(); w.server.Wait() })

	// A veth pair from here into the server's namespace.
	name := fmt.Sprintf("clvtm%d", os.Getpid()%100000)
	veth := &netlink.Veth{LinkAttrs: netlink.LinkAttrs{Name: name + "a"}, PeerName: name + "b",
		PeerNamespace: netlink.NsPid(w.server.Process.Pid)}
	if err := netlink.LinkAdd(veth); err != nil {
		t.Fatalf("veth: %v", err)
	}
	t.Cleanup(func() { netlink.LinkDel(veth) })
	setUp := func(h *netlink.Handle, dev string, p netip.Prefix) {
		t.Helper()
		l, err := h.LinkByName(dev)
		if err != nil {
			t.Fatal(err)
		}
		addr, _ := netlink.ParseAddr(p.String())
		if err := h.AddrAdd(l, addr); err != nil {
			t.Fatal(err)
		}
		if err := h.LinkSetUp(l); err != nil {
			t.Fatal(err)
		}
	}
	host, err := netlink.NewHandle(unix.NETLINK_ROUTE)
	if err != nil {
		t.Fatal(err)
	}
	defer host.Close()
	setUp(host, name+"a", modeHostSide)
	ns, err := netns.GetFromPid(w.server.Process.Pid)
	if err != nil {
		t.Fatal(err)
	}
	defer ns.Close()
	inside, err := netlink.NewHandleAt(ns, unix.NETLINK_ROUTE)
	if err != nil {
		t.Fatal(err)
	}
	defer inside.Close()
	setUp(inside, name+"b", modeServerSide)
	if lo, err := inside.LinkByName("lo"); err == nil {
		inside.LinkSetUp(lo)
	}
	select {
	case <-out.ch:
	case <-time.After(15 * time.Second):
		t.Fatal("the workload server did not start")
	}
	base := "http://" + w.serverAddr.String()
	urls := []string{base + "/a", base + "/big", base + "/missing", "POST:" + base + "/post", base + "/a"}
	w.clientCommand = func() (string, error) { return w.client(strings.Join(urls, " ")) }
	return w
}

// client runs the workload's client with these URLs (see httpClient).
func (w *modeWorkload) client(urls string) (string, error) {
	exe, err := os.Executable()
	if err != nil {
		return "", err
	}
	{
		cmd := exec.Command(exe)
		cmd.Env = append(os.Environ(), "CLOVISOR_TEST_HTTP_CLIENT="+urls)
		var b strings.Builder
		cmd.Stdout, cmd.Stderr = &b, &b
		if err := w.clientCG.Start(cmd); err != nil {
			return "", err
		}
		err := cmd.Wait()
		return b.String(), err
	}
}

type lineWaiter struct {
	ch   chan struct{}
	done bool
}

func (l *lineWaiter) Write(p []byte) (int, error) {
	if !l.done && strings.Contains(string(p), "listening") {
		l.done = true
		close(l.ch)
	}
	return len(p), nil
}

// sessionKey is what every mode must agree on.
type sessionKey struct {
	Kind                string
	Method, Path        string
	Status              int
	ReqBytes, RespBytes int64
	ReqBody, RespBody   int64
}

func keyOf(s *spans.Session) sessionKey {
	k := sessionKey{Kind: map[spans.Kind]string{spans.Client: "CLIENT", spans.Server: "SERVER"}[s.Kind],
		Method: attr(s.Tx, "http.request.method").AsString(), Path: attr(s.Tx, "url.path").AsString(),
		Status: s.Tx.StatusCode, ReqBytes: s.Tx.ReqBytes, RespBytes: s.Tx.RespBytes,
		ReqBody: attr(s.Tx, "http.request.body.size").AsInt64(), RespBody: attr(s.Tx, "http.response.body.size").AsInt64()}
	return k
}

// TestModeEquivalence runs the same workload under every attach mode the
// kernel allows and requires the same sessions from each. Modes the kernel
// refuses are logged; CLOVISOR_REQUIRE_MODES (comma-separated, set by the
// VM harness for kernels known to have them) makes a refusal a failure.
func TestModeEquivalence(t *testing.T) {
	runModeEquivalence(t)
}

// runModeEquivalence runs the workload under each mode, checks the
// sessions, logs them as MODE-RESULT lines (for the kernel matrix to
// compare across kernels) and returns them by mode.
func runModeEquivalence(t *testing.T) map[string][]sessionKey {
	w := startModeWorkload(t)
	required := map[string]bool{}
	for _, m := range strings.Split(os.Getenv("CLOVISOR_REQUIRE_MODES"), ",") {
		if m != "" {
			required[m] = true
		}
	}
	results := map[string][]sessionKey{}
	for _, mode := range probes.Modes {
		t.Run(mode, func(t *testing.T) {
			tr, err := probes.Open(probes.Options{Mode: mode, FilterCgroups: true})
			if errors.Is(err, probes.ErrUnsupported) && !required[mode] {
				t.Logf("not on this kernel: %v", err)
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			tr.Close()
			c := startTracerWith(t, probes.Options{Mode: mode, FilterCgroups: true}, w.clientCG.ID(), w.serverCG.ID())
			out, err := w.clientCommand()
			if err != nil {
				t.Fatalf("client: %v\n%s", err, out)
			}
			got := c.wait(t, 10)
			c.close(t)
			// Go's client writes requests and reads responses on two
			// threads: a response's event may come first and wait for its
			// request's (Stats.HeldReceives). None may wait in vain.
			st := c.tracker.Stats()
			t.Logf("%s: %d receives waited for their sends", mode, st.HeldReceives)
			if st.HeldTimedOut != 0 || st.GarbageBytes != 0 || st.Reordered != 0 || st.GapBytes != 0 {
				t.Errorf("tracker %+v", st)
			}
			var keys []sessionKey
			for _, s := range got {
				keys = append(keys, keyOf(s))
				if s.Process.PID == 0 || s.CgroupID == 0 {
					t.Errorf("session without process or cgroup: %+v", s)
				}
				// The connection's open event was seen (connect or
				// accept), so exchanges are counted from its start.
				if s.Index < 0 || s.ConnTag == 0 {
					t.Errorf("%s session %s without its connection's open event (index %d, tag %#x)", keyOf(s).Kind, s.Tx.Summary, s.Index, s.ConnTag)
				}
			}
			slices.SortFunc(keys, func(a, b sessionKey) int { return strings.Compare(fmt.Sprint(a), fmt.Sprint(b)) })
			results[mode] = keys
			line, _ := json.Marshal(keys)
			t.Logf("MODE-RESULT %s %s", mode, line)
		})
	}
	want := []sessionKey{}
	for _, kind := range []string{"CLIENT", "SERVER"} {
		want = append(want,
			sessionKey{kind, "GET", "/a", 200, 0, 0, 0, 6},
			sessionKey{kind, "GET", "/a", 200, 0, 0, 0, 6},
			sessionKey{kind, "GET", "/big", 200, 0, 0, 0, 100000},
			sessionKey{kind, "GET", "/missing", 404, 0, 0, 0, 19},
			sessionKey{kind, "POST", "/post", 200, 0, 0, 300, 8},
		)
	}
	if len(results) == 0 {
		t.Fatal("no mode ran")
	}
	for mode, keys := range results {
		if len(keys) != len(want) {
			t.Errorf("%s: %d sessions, want %d: %+v", mode, len(keys), len(want), keys)
			continue
		}
		// Byte counts depend on headers (dates, lengths): every mode must
		// agree on them, and the rest must be as scripted.
		for i, k := range keys {
			w := want[i]
			w.ReqBytes, w.RespBytes = k.ReqBytes, k.RespBytes
			if k != w {
				t.Errorf("%s #%d: %+v, want %+v", mode, i, k, w)
			}
			if k.ReqBytes <= 0 || k.RespBytes <= k.RespBody {
				t.Errorf("%s #%d: byte counts %+v", mode, i, k)
			}
		}
		for other, ok := range results {
			if !slices.EqualFunc(ok, keys, func(a, b sessionKey) bool {
				return a.Kind == b.Kind && a.Method == b.Method && a.Path == b.Path && a.Status == b.Status &&
					a.ReqBody == b.ReqBody && a.RespBody == b.RespBody && a.ReqBytes == b.ReqBytes
			}) {
				t.Errorf("%s and %s disagree:\n%+v\n%+v", mode, other, keys, ok)
			}
		}
	}
	return results
}
