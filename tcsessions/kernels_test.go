package tcsessions

import (
	"context"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"strings"
	"testing"
	"time"

	"github.com/cilium/ebpf/link"
	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"

	"github.com/clovisor/clovisor/internal/testbed"
	"github.com/clovisor/clovisor/internal/vmtest"
	"github.com/clovisor/clovisor/protocols"
	"github.com/clovisor/clovisor/protocols/http1"
)

// The kernel matrix: Debian's 6.1 kernel (no tcx: auto mode must fall back
// to clsact) and 6.12 (tcx) booted under qemu run the programs' prog.Run
// tests (the verifier of each kernel must accept the programs and they must
// give the same tables) and TestGuestAttach (auto attach, real traffic over
// a veth, clean close).

// wantModeEnv tells TestGuestAttach which mode auto must pick.
const wantModeEnv = "CLOVISOR_TC_WANT_MODE"

var tcKernelMatrix = []struct{ series, mode string }{
	{"6.1", AttachClsact},
	{"6.12", AttachTCX},
}

// guestTests are the tests run in each VM kernel.
const guestTests = "^(TestKeepAliveExchangesIPv4|TestRetransmissionAndRSTMidRequest|TestPacketsWithoutPayload|" +
	"TestFragments|TestMidstream|TestTrackAllIgnoreAndGuess|TestEgressLookupTable|TestPortReuse|TestGSO|" +
	"TestWorkloadTraffic|TestUntracedInterface|TestPayloadCap|TestNonIPAndMalformed|TestReorderingAndGaps|" +
	"TestSessionsBounded|TestSessionsFingerprint|TestKeyCollision|TestFastOpen|TestHookRolesAndSeq0|TestPacketTime|TestPipelinedMarks|TestPortMarks|TestInterfaceIndexes|TestGuestAttach|TestSessionElementLayout|TestProgramVariant)$"

func TestKernelMatrix(t *testing.T) {
	if vmtest.InGuest() {
		t.Skip("the matrix is run from the host")
	}
	testbed.RequireRoot(t)
	bin := vmtest.BuildTestBinary(t, "github.com/clovisor/clovisor/tcsessions")
	for _, km := range tcKernelMatrix {
		t.Run(km.series, func(t *testing.T) {
			k := vmtest.LoadKernel(t, km.series)
			res := vmtest.RunGoTest(t, k, bin, guestTests, vmtest.Options{Env: map[string]string{wantModeEnv: km.mode, "CI": "true"}})
			if n := strings.Count(res.Output, "--- PASS"); n < 26 {
				t.Errorf("%d guest tests passed, want at least 26:\n%s", n, res.Output)
			}
			if strings.Contains(res.Output, "--- SKIP") {
				t.Errorf("guest tests skipped:\n%s", res.Output)
			}
		})
	}
}

// TestGuestAttach (in a vmtest VM only): a veth with one end in a new
// network namespace serving HTTP; the tracer in auto mode picks the mode the
// kernel has, traces two keep-alive exchanges with their HTTP attributes
// (the client outside the veth's namespace: its packets cross the egress
// hook),
// and Close leaves no qdisc, filter or tcx program.
func TestGuestAttach(t *testing.T) {
	if !vmtest.InGuest() {
		t.Skip("runs in a vmtest VM (TestKernelMatrix)")
	}
	want := os.Getenv(wantModeEnv)
	srvNS := newNetns(t) // the server's namespace

	veth := &netlink.Veth{LinkAttrs: netlink.LinkAttrs{Name: "vg0"}, PeerName: "vg1"}
	if err := netlink.LinkAdd(veth); err != nil {
		t.Fatal(err)
	}
	defer netlink.LinkDel(veth)
	peer, err := netlink.LinkByName("vg1")
	if err != nil {
		t.Fatal(err)
	}
	if err := netlink.LinkSetNsFd(peer, int(srvNS)); err != nil {
		t.Fatal(err)
	}
	h, err := netlink.NewHandleAt(srvNS, unix.NETLINK_ROUTE)
	if err != nil {
		t.Fatal(err)
	}
	defer h.Close()
	for _, s := range []struct {
		h    *netlink.Handle
		name string
		addr string
	}{{nil, "vg0", "10.201.30.1/24"}, {h, "vg1", "10.201.30.2/24"}, {h, "lo", ""}} {
		nl := s.h
		if nl == nil {
			nl = &netlink.Handle{}
		}
		lk, err := nl.LinkByName(s.name)
		if err != nil {
			t.Fatal(err)
		}
		if s.addr != "" {
			a, _ := netlink.ParseAddr(s.addr)
			if err := nl.AddrAdd(lk, a); err != nil {
				t.Fatal(err)
			}
		}
		if err := nl.LinkSetUp(lk); err != nil {
			t.Fatal(err)
		}
	}
	// The listener is made in the server's namespace and served from any
	// goroutine.
	var ln net.Listener
	inNetns(t, srvNS, func() { ln, err = net.Listen("tcp", "10.201.30.2:8080") })
	if err != nil {
		t.Fatal(err)
	}
	srv := &http.Server{Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		fmt.Fprintf(w, "hello %s\n", r.URL.Path)
	})}
	go srv.Serve(ln)
	defer srv.Close()

	log, lb := testLogger(t)
	tr, err := Open(Config{PodInterfaces: []string{"vg0"}, NodeInterfaces: []string{}, StateDir: t.TempDir(),
		Ports: []Port{{Port: 8080, Protocol: "http"}}, Logger: log})
	if err != nil {
		t.Fatal(err)
	}
	if tr.Mode() != want || len(tr.Interfaces()) != 1 {
		t.Fatalf("mode %q interfaces %+v, want %s on vg0\n%s", tr.Mode(), tr.Interfaces(), want, lb.String())
	}
	var xs []*Exchange
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() {
		done <- tr.Run(ctx, protocols.NewRegistry(http1.New()), func(x *Exchange) { xs = append(xs, x) })
	}()
	client := &http.Client{Transport: &http.Transport{}}
	var sizes []int
	for _, p := range []string{"/one", "/two"} {
		resp, err := client.Get("http://10.201.30.2:8080" + p)
		if err != nil {
			t.Fatal(err)
		}
		b, _ := io.ReadAll(resp.Body)
		resp.Body.Close()
		sizes = append(sizes, len(b))
	}
	client.CloseIdleConnections()
	time.Sleep(500 * time.Millisecond)
	cancel()
	if err := <-done; err != nil {
		t.Fatal(err)
	}
	if len(xs) != 2 {
		t.Fatalf("%d exchanges: %s", len(xs), describe(xs))
	}
	for i, x := range xs {
		if x.Index != i || x.Tx == nil || attrOf(x, "url.path").AsString() != []string{"/one", "/two"}[i] ||
			x.Tx.StatusCode != 200 || attrOf(x, "http.response.body.size").AsInt64() != int64(sizes[i]) ||
			x.Interface != "vg0" || x.ClientInside() {
			t.Errorf("#%d: %s", i, x)
		}
	}
	if xs[1].End != EndFIN {
		t.Errorf("last exchange ended by %v", xs[1].End)
	}
	if err := tr.Close(); err != nil {
		t.Fatal(err)
	}
	lk, _ := netlink.LinkByName("vg0")
	qs, _ := netlink.QdiscList(lk)
	for _, q := range qs {
		if q.Type() == "clsact" {
			t.Errorf("clsact qdisc left on vg0")
		}
	}
	for _, hk := range hooks {
		if res, err := link.QueryPrograms(link.QueryOptions{Target: lk.Attrs().Index, Attach: hk.tcx}); err == nil && len(res.Programs) > 0 {
			t.Errorf("tcx programs left on vg0 %s: %+v", hk.name, res.Programs)
		}
	}
	t.Logf("kernel mode %s: %s", tr.Mode(), describe(xs))
}
