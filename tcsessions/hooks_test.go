package tcsessions

import (
	"encoding/binary"
	"fmt"
	"os"
	"runtime"
	"slices"
	"sort"
	"testing"
	"time"
	"unsafe"

	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netns"
	"golang.org/x/sys/unix"

	"github.com/clovisor/clovisor/internal/testbed"
)

// hookRig runs the tc programs at real hooks on crafted frames: a Tracer
// attached (as the agent attaches it) to one end of a veth pair, ch0, in a
// namespace of its own, the other end, ch1, in another. A frame written with
// an AF_PACKET socket on ch1 comes in at ch0's ingress hook; one written on
// ch0 itself goes out through ch0's egress hook. Neither namespace has an
// address the frames are for, so no stack answers them.
type hookRig struct {
	t  *testing.T
	tr *Tracer
	// in and out are the AF_PACKET sockets on ch1 and ch0, and their
	// interfaces' indexes.
	in, out       int
	inIdx, outIdx int
}

func newHookRig(t *testing.T, cfg Config) *hookRig {
	t.Helper()
	testbed.RequireRoot(t)
	traced, peer := newNetns(t), newNetns(t)

	ht, err := netlink.NewHandleAt(traced, unix.NETLINK_ROUTE)
	if err != nil {
		t.Fatal(err)
	}
	defer ht.Close()
	hp, err := netlink.NewHandleAt(peer, unix.NETLINK_ROUTE)
	if err != nil {
		t.Fatal(err)
	}
	defer hp.Close()
	veth := &netlink.Veth{LinkAttrs: netlink.LinkAttrs{Name: "ch0"}, PeerName: "ch1", PeerNamespace: netlink.NsFd(peer)}
	if err := ht.LinkAdd(veth); err != nil {
		t.Fatalf("adding the veth pair: %v", err)
	}
	idx := map[string]int{}
	for _, e := range []struct {
		h    *netlink.Handle
		name string
	}{{ht, "ch0"}, {ht, "lo"}, {hp, "ch1"}, {hp, "lo"}} {
		lk, err := e.h.LinkByName(e.name)
		if err != nil {
			t.Fatal(err)
		}
		if err := e.h.LinkSetUp(lk); err != nil {
			t.Fatal(err)
		}
		idx[e.name] = lk.Attrs().Index
	}

	log, _ := testLogger(t)
	cfg.Netns = fmt.Sprintf("/proc/%d/fd/%d", os.Getpid(), int(traced))
	cfg.PodInterfaces, cfg.NodeInterfaces = []string{"ch0"}, []string{}
	cfg.StateDir, cfg.Logger = t.TempDir(), log
	tr, err := Open(cfg)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { tr.Close() })
	if ifs := tr.Interfaces(); len(ifs) != 1 || ifs[0].Name != "ch0" {
		t.Fatalf("attached to %+v, want ch0", ifs)
	}
	r := &hookRig{t: t, tr: tr, inIdx: idx["ch1"], outIdx: idx["ch0"]}
	r.in = packetSocket(t, peer, r.inIdx)
	r.out = packetSocket(t, traced, r.outIdx)
	return r
}

// newNetns makes a network namespace without a name (no ip netns: the VM
// kernels' guests have no ip tool), closed when the test ends. It is made on
// a locked thread, which goes back to its own namespace after.
func newNetns(t *testing.T) netns.NsHandle {
	t.Helper()
	var ns netns.NsHandle
	inNetns(t, 0, func() {
		var err error
		if ns, err = netns.New(); err != nil {
			t.Fatal(err)
		}
	})
	t.Cleanup(func() { ns.Close() })
	return ns
}

// inNetns runs fn on a locked thread in namespace ns (0: the thread's own),
// then puts the thread back in its own namespace. What fn makes there
// (sockets, namespaces) stays there, and can be used from any thread.
func inNetns(t *testing.T, ns netns.NsHandle, fn func()) {
	t.Helper()
	runtime.LockOSThread()
	orig, err := netns.Get()
	if err != nil {
		t.Fatal(err)
	}
	defer orig.Close()
	if ns != 0 {
		if err := netns.Set(ns); err != nil {
			t.Fatal(err)
		}
	}
	fn()
	if err := netns.Set(orig); err != nil {
		t.Fatal(err) // the thread stays locked and dies with the test
	}
	runtime.UnlockOSThread()
}

// packetSocket is an AF_PACKET socket of namespace ns that sends on the
// interface ifindex; closed when the test ends.
func packetSocket(t *testing.T, ns netns.NsHandle, ifindex int) int {
	t.Helper()
	var fd int
	var err error
	inNetns(t, ns, func() { fd, err = unix.Socket(unix.AF_PACKET, unix.SOCK_RAW|unix.SOCK_CLOEXEC, 0) }) // sends only
	if err != nil {
		t.Fatalf("AF_PACKET socket: %v", err)
	}
	t.Cleanup(func() { unix.Close(fd) })
	if err := unix.Bind(fd, &unix.SockaddrLinklayer{Ifindex: ifindex}); err != nil {
		t.Fatal(err)
	}
	return fd
}

// send writes frames on the socket fd's interface.
func (r *hookRig) send(fd, ifindex int, ss []seg) {
	r.t.Helper()
	for _, s := range ss {
		if err := unix.Sendto(fd, s.frame(), 0, &unix.SockaddrLinklayer{Ifindex: ifindex}); err != nil {
			r.t.Fatalf("sending a frame: %v", err)
		}
	}
}

// ingress sends segments in at ch0's ingress hook, egress out through its
// egress hook.
func (r *hookRig) ingress(ss ...seg) { r.t.Helper(); r.send(r.in, r.inIdx, ss) }
func (r *hookRig) egress(ss ...seg)  { r.t.Helper(); r.send(r.out, r.outIdx, ss) }

// sessions waits until the sessions table holds n entries (the frames that
// come in at ch0 are handled in its receive softirq, usually before the
// write returns) and returns them, ordered by client.
func (r *hookRig) sessions(n int) []SessionInfo {
	r.t.Helper()
	deadline := time.Now().Add(5 * time.Second)
	for {
		s, err := r.tr.objs.readSessions()
		if err != nil {
			r.t.Fatal(err)
		}
		if len(s) >= n || time.Now().After(deadline) {
			sort.Slice(s, func(i, j int) bool { return s[i].Client.String() < s[j].Client.String() })
			return s
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// TestHookRolesAndSeq0: a connection records whether its client's packets
// cross the ingress hook (on a pod veth's host side: the pod is the
// client), and the sequence number of the client's first byte from the
// SYN, or from the SYN-ACK when that is the first packet seen. The frames
// cross real hooks (hookRig): where one program serves both hooks, it
// learns the hook from the kernel.
func TestHookRolesAndSeq0(t *testing.T) {
	r := newHookRig(t, httpPorts)
	a := newConv("10.1.0.1:40000", "10.1.0.2:8080")
	r.ingress(a.fromClient(fSYN, ""))
	b := newConv("10.1.0.1:40001", "10.1.0.2:8080")
	r.egress(b.fromClient(fSYN, ""))
	c := newConv("10.1.0.1:40002", "10.1.0.2:8080")
	c.fromClient(fSYN, "") // not seen
	r.ingress(c.fromServer(fSYN|fACK, ""))
	d := newConv("10.1.0.1:40003", "10.1.0.2:8080")
	r.egress(d.fromServer(fPSH|fACK, "HTTP/1.1 200 OK\r\n\r\n"))
	e := newConv("10.1.0.1:40004", "10.1.0.2:8080")
	r.ingress(e.fromServer(fPSH|fACK, "HTTP/1.1 200 OK\r\n\r\n"))
	got := map[uint16]SessionEntry{}
	all := r.sessions(5)
	for _, s := range all {
		if s.Ifindex != r.outIdx {
			t.Errorf("session of port %d on ifindex %d, want ch0's %d", s.Client.Port(), s.Ifindex, r.outIdx)
		}
		got[s.Client.Port()] = s.Entry
	}
	if len(got) != 5 {
		t.Fatalf("%d sessions, want 5: %+v", len(got), all)
	}
	for _, tc := range []struct {
		port    uint16
		ingress bool
		seq0    uint32
		origin  uint32
	}{
		{40000, true, a.clientISN + 1, ConnFromSYN},     // the client's SYN coming in
		{40001, false, b.clientISN + 1, ConnFromSYN},    // the client's SYN going out
		{40002, false, c.clientISN + 1, ConnFromSYNACK}, // the server's SYN-ACK coming in
		{40003, true, 0, ConnFromMidstream},             // the server's payload going out
		{40004, false, 0, ConnFromMidstream},            // the server's payload coming in
	} {
		e, ok := got[tc.port]
		if !ok {
			t.Fatalf("no session of port %d", tc.port)
		}
		origin := e.ConnFlags & (ConnFromSYN | ConnFromSYNACK | ConnFromMidstream)
		if (e.ConnFlags&ConnClientIngress != 0) != tc.ingress || (e.ConnFlags&ConnSeq0 != 0) != (tc.seq0 != 0) ||
			e.ReqSeq0 != tc.seq0 || origin != tc.origin {
			t.Errorf("port %d: flags %#x seq0 %d, want client on ingress %v, seq0 %d, origin %#x",
				tc.port, e.ConnFlags, e.ReqSeq0, tc.ingress, tc.seq0, tc.origin)
		}
	}
	if st, err := r.tr.Stats(); err != nil || st.HeaderFaults != 0 || st.SessionsCreated != 5 {
		t.Errorf("stats %+v, %v: want 5 sessions made, no header fault", st, err)
	}
}

// sendAt writes a frame on the socket fd's interface with a departure time
// (SO_TXTIME, CLOCK_MONOTONIC): the kernel puts it in skb->tstamp, marked
// monotonic, as a TCP stack does with every packet it sends.
func (r *hookRig) sendAt(fd, ifindex int, s seg, at uint64) {
	r.t.Helper()
	txtime := make([]byte, 8) // struct sock_txtime: clockid, flags
	binary.NativeEndian.PutUint32(txtime, unix.CLOCK_MONOTONIC)
	if err := unix.SetsockoptString(fd, unix.SOL_SOCKET, unix.SO_TXTIME, string(txtime)); err != nil {
		r.t.Fatalf("SO_TXTIME: %v", err)
	}
	oob := make([]byte, unix.CmsgSpace(8))
	h := (*unix.Cmsghdr)(unsafe.Pointer(&oob[0]))
	h.Level, h.Type = unix.SOL_SOCKET, unix.SCM_TXTIME
	h.SetLen(unix.CmsgLen(8))
	binary.NativeEndian.PutUint64(oob[unix.CmsgLen(0):], at)
	if err := unix.Sendmsg(fd, s.frame(), oob, &unix.SockaddrLinklayer{Ifindex: ifindex}, 0); err != nil {
		r.t.Fatalf("sending a frame with a departure time: %v", err)
	}
}

// TestPacketTime: a packet that carries a departure time in CLOCK_MONOTONIC
// (skb->tstamp, as every packet a TCP stack of the node sends does; here
// set through SO_TXTIME on the AF_PACKET sockets) is timed by it, exactly,
// at either hook, and one that carries none by the clock when the program
// ran. A connection's SYN time is its first SYN's, also when a SYN-ACK
// older than a retransmitted SYN answers it. tcInline times every packet
// by the clock.
func TestPacketTime(t *testing.T) {
	r := newHookRig(t, httpPorts)
	lo := monotonicNow()
	// Departure times a second in the past, a few microseconds apart (the
	// kernel passes them on as they are: veths have no qdisc to hold a
	// packet until then).
	t1 := lo - uint64(time.Second)
	t2, t3 := t1+1500, t1+4000
	a := newConv("10.1.0.1:40000", "10.1.0.2:8080")
	r.sendAt(r.in, r.inIdx, a.fromClient(fSYN, ""), t1)
	r.sendAt(r.in, r.inIdx, a.fromClient(fPSH|fACK, "GET / HTTP/1.1\r\n\r\n"), t2)
	r.sendAt(r.out, r.outIdx, a.fromServer(fPSH|fACK, "HTTP/1.1 200 OK\r\n\r\n"), t3)
	b := newConv("10.1.0.1:40001", "10.1.0.2:8080")
	r.ingress(b.fromClient(fSYN, ""), b.fromClient(fPSH|fACK, "GET / HTTP/1.1\r\n\r\n"))
	r.egress(b.fromServer(fPSH|fACK, "HTTP/1.1 200 OK\r\n\r\n"))
	// A SYN sent again (t1+2000) before the SYN-ACK that answers the
	// first one (sent at t1+1000) arrives: the handshake runs from the
	// first SYN.
	c := newConv("10.1.0.1:40002", "10.1.0.2:8080")
	syn := c.fromClient(fSYN, "")
	r.sendAt(r.in, r.inIdx, syn, t1)
	r.sendAt(r.in, r.inIdx, syn, t1+2000)
	r.sendAt(r.out, r.outIdx, c.fromServer(fSYN|fACK, ""), t1+1000)
	s := r.sessions(3)
	hi := monotonicNow()
	if len(s) != 3 || s[0].Client.Port() != 40000 || s[1].Client.Port() != 40001 || s[2].Client.Port() != 40002 {
		t.Fatalf("sessions %+v, want ports 40000, 40001 and 40002", s)
	}
	times := func(e SessionEntry) []uint64 {
		q, p := e.Dir[dirRequest], e.Dir[dirResponse]
		return []uint64{e.FirstTs, q.OpenTs, q.FirstTs, q.LastTs, p.FirstTs, p.LastTs}
	}
	inClock := func(ts []uint64) bool {
		for _, v := range ts {
			if v < lo || v > hi {
				return false
			}
		}
		return true
	}
	// Connection start, SYN, request first and last, response first and last.
	got := times(s[0].Entry)
	if inlineVariant() {
		if !inClock(got) {
			t.Errorf("tcInline: times %v, want the clock's, in [%d, %d]", got, lo, hi)
		}
	} else if want := []uint64{t1, t1, t2, t2, t3, t3}; !slices.Equal(got, want) {
		t.Errorf("times %v, want the packets' departure times %v", got, want)
	}
	if got := times(s[1].Entry); !inClock(got) {
		t.Errorf("packets without a departure time: times %v, want the clock's, in [%d, %d]", got, lo, hi)
	}
	// SYN and SYN-ACK of the connection whose SYN went twice.
	e := s[2].Entry
	syn0, synack := e.Dir[dirRequest].OpenTs, e.Dir[dirResponse].OpenTs
	if inlineVariant() {
		if !inClock([]uint64{syn0, synack}) || synack <= syn0 {
			t.Errorf("tcInline: SYN %d, SYN-ACK %d: want the clock's, in order, in [%d, %d]", syn0, synack, lo, hi)
		}
	} else if syn0 != t1 || synack != t1+1000 {
		t.Errorf("SYN %d, SYN-ACK %d: want the first SYN's %d and %d", syn0, synack, t1, t1+1000)
	}
}
