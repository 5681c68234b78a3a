package sockets

import (
	"fmt"
	"net/netip"
	"strings"
	"testing"
	"time"
	"unsafe"

	"github.com/clovisor/clovisor/probes"
	"github.com/clovisor/clovisor/protocols"
	"github.com/clovisor/clovisor/protocols/http1"
	"github.com/clovisor/clovisor/spans"
)

// Records as the kernel writes them, for feeding the tracker without BPF.

var (
	cliAddr = netip.MustParseAddrPort("10.1.0.1:40000")
	srvAddr = netip.MustParseAddrPort("10.1.0.2:80")
)

func setTuple(saddr, daddr *[16]uint8, sport, dport, family *uint16, local, remote netip.AddrPort) {
	*family = afInet
	if local.Addr().Is6() {
		*family = afInet6
		*saddr = local.Addr().As16()
		*daddr = remote.Addr().As16()
	} else {
		a, b := local.Addr().As4(), remote.Addr().As4()
		copy(saddr[:], a[:])
		copy(daddr[:], b[:])
	}
	*sport, *dport = local.Port(), remote.Port()
}

func connRecord(kind, role uint8, cookie, ts uint64, local, remote netip.AddrPort) []byte {
	var ev probes.ConnEvent
	ev.Kind, ev.Role, ev.Cookie, ev.Ts, ev.CgroupId = kind, role, cookie, ts, 77
	setTuple(&ev.Tuple.Saddr, &ev.Tuple.Daddr, &ev.Tuple.Sport, &ev.Tuple.Dport, &ev.Tuple.Family, local, remote)
	return append([]byte(nil), unsafe.Slice((*byte)(unsafe.Pointer(&ev)), unsafe.Sizeof(ev))...)
}

// dataRecord builds a data event of n true bytes carrying payload (a
// prefix of them) at stream position seq.
func dataRecord(dir uint8, cookie, ts uint64, seq uint32, n int, payload []byte, local, remote netip.AddrPort) []byte {
	var ev probes.DataEvent
	ev.Kind, ev.Dir, ev.Cookie, ev.Ts, ev.Seq = probes.EventData, dir, cookie, ts, seq
	ev.Tgid, ev.Pid, ev.CgroupId, ev.Len, ev.Cap = 4242, 4243, 77, uint32(n), uint32(len(payload))
	copy(ev.Comm[:], "testproc")
	setTuple(&ev.Tuple.Saddr, &ev.Tuple.Daddr, &ev.Tuple.Sport, &ev.Tuple.Dport, &ev.Tuple.Family, local, remote)
	hdr := unsafe.Slice((*byte)(unsafe.Pointer(&ev)), dataHeaderSize)
	return append(append([]byte(nil), hdr...), payload...)
}

type sink struct{ got []*spans.Session }

func (s *sink) add(x *spans.Session) { s.got = append(s.got, x) }

func newTestTracker(cfg Config) (*Tracker, *sink) {
	s := &sink{}
	cfg.Analyzers = protocols.NewRegistry(http1.New())
	cfg.Sink = s.add
	return NewTracker(cfg), s
}

const (
	req  = "GET /x?a=1 HTTP/1.1\r\nHost: svc\r\nUser-Agent: t/1\r\n\r\n"
	resp = "HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello"
)

func TestServerSessionFromEvents(t *testing.T) {
	tk, s := newTestTracker(Config{})
	tk.Handle(connRecord(probes.EventConnOpen, probes.RoleServer, 1, 100, srvAddr, cliAddr))
	tk.Handle(dataRecord(probes.DirRecv, 1, 200, 1000, len(req), []byte(req), srvAddr, cliAddr))
	tk.Handle(dataRecord(probes.DirSend, 1, 300, 5000, len(resp), []byte(resp), srvAddr, cliAddr))
	if len(s.got) != 1 {
		t.Fatalf("%d sessions", len(s.got))
	}
	x := s.got[0]
	if x.Kind != spans.Server || x.Client != cliAddr || x.Server != srvAddr || x.ConnID != 1 || x.Index != 0 ||
		x.CgroupID != 77 || x.Process.PID != 4242 || x.Process.Comm != "testproc" {
		t.Errorf("session %+v", x)
	}
	if x.Tx.ReqStart != 200 || x.Tx.RespEnd != 300 || x.Tx.StatusCode != 200 || x.Tx.ReqBytes != int64(len(req)) || x.Tx.RespBytes != int64(len(resp)) {
		t.Errorf("tx %+v", x.Tx)
	}
	tk.Handle(connRecord(probes.EventConnClose, 0, 1, 400, srvAddr, cliAddr))
	if st := tk.Stats(); st.Conns != 0 || st.Sessions != 1 || st.Events != 4 {
		t.Errorf("stats %+v", st)
	}
}

// A connection that predates the agent: no open event, the role comes from
// the payload, and the index is unknown.
func TestRoleFromPayload(t *testing.T) {
	for _, tc := range []struct {
		name       string
		first      uint8 // direction of the request
		wantKind   spans.Kind
		wantClient netip.AddrPort
	}{
		{"sent request: client", probes.DirSend, spans.Client, srvAddr},
		{"received request: server", probes.DirRecv, spans.Server, cliAddr},
	} {
		t.Run(tc.name, func(t *testing.T) {
			tk, s := newTestTracker(Config{})
			respDir := uint8(probes.DirRecv)
			if tc.first == probes.DirRecv {
				respDir = probes.DirSend
			}
			tk.Handle(dataRecord(tc.first, 9, 10, 1, len(req), []byte(req), srvAddr, cliAddr))
			tk.Handle(dataRecord(respDir, 9, 20, 1, len(resp), []byte(resp), srvAddr, cliAddr))
			if len(s.got) != 1 || s.got[0].Kind != tc.wantKind || s.got[0].Index != -1 || s.got[0].Client != tc.wantClient {
				t.Fatalf("%s", describeAll(s.got))
			}
		})
	}
}

// Events the ring buffer dropped show as a jump in the stream position:
// the parser steps over the missing bytes and stays in step.
func TestLostEventsBecomeGaps(t *testing.T) {
	tk, s := newTestTracker(Config{})
	body := strings.Repeat("b", 3000)
	big := "HTTP/1.1 200 OK\r\nContent-Length: 3000\r\n\r\n" + body
	tk.Handle(connRecord(probes.EventConnOpen, probes.RoleClient, 5, 1, cliAddr, srvAddr))
	tk.Handle(dataRecord(probes.DirSend, 5, 2, 100, len(req), []byte(req), cliAddr, srvAddr))
	// The response arrives in three reads; the middle one is lost.
	tk.Handle(dataRecord(probes.DirRecv, 5, 3, 700, 1000, []byte(big[:1000]), cliAddr, srvAddr))
	tk.Handle(dataRecord(probes.DirRecv, 5, 5, 700+2000, len(big)-2000, []byte(big[2000:]), cliAddr, srvAddr))
	// The next exchange parses normally.
	tk.Handle(dataRecord(probes.DirSend, 5, 6, 100+uint32(len(req)), len(req), []byte(req), cliAddr, srvAddr))
	tk.Handle(dataRecord(probes.DirRecv, 5, 7, 700+uint32(len(big)), len(resp), []byte(resp), cliAddr, srvAddr))
	if len(s.got) != 2 {
		t.Fatalf("%d sessions: %s", len(s.got), describeAll(s.got))
	}
	if s.got[0].Tx.RespBytes != int64(len(big)) || s.got[0].Tx.RespEnd != 5 || s.got[1].Tx.StatusCode != 200 || s.got[1].Index != 1 {
		t.Errorf("%s", describeAll(s.got))
	}
	if st := tk.Stats(); st.GapBytes != 1000 {
		t.Errorf("gap bytes %d, want 1000", st.GapBytes)
	}
}

func TestGarbageIsCountedNotExported(t *testing.T) {
	tk, s := newTestTracker(Config{})
	tk.Handle(connRecord(probes.EventConnOpen, probes.RoleClient, 3, 1, cliAddr, srvAddr))
	junk := []byte("\x00\x01\x00\x01\xfc\x03\x03random-binary-junk")
	for i := 0; i < 6; i++ {
		tk.Handle(dataRecord(probes.DirSend, 3, uint64(2+i), uint32(i*len(junk)), len(junk), junk, cliAddr, srvAddr))
	}
	if len(s.got) != 0 {
		t.Fatalf("garbage made sessions: %s", describeAll(s.got))
	}
	if st := tk.Stats(); st.Unrecognized != 1 {
		t.Errorf("unrecognized %d, want 1", st.Unrecognized)
	}
	// Malformed records are counted, not fatal.
	tk.Handle(nil)
	tk.Handle([]byte{probes.EventData, 1, 2})
	tk.Handle([]byte{99})
	bad := dataRecord(probes.DirSend, 3, 1, 0, 4, []byte("abcd"), cliAddr, srvAddr)
	tk.Handle(bad[:len(bad)-2]) // claims 4 payload bytes, holds 2
	if st := tk.Stats(); st.BadEvents != 4 {
		t.Errorf("bad events %d, want 4", st.BadEvents)
	}
}

func TestTableIsBoundedAndExpires(t *testing.T) {
	tk, s := newTestTracker(Config{MaxConns: 3, IdleTimeout: time.Second})
	for i := uint64(1); i <= 5; i++ {
		tk.Handle(connRecord(probes.EventConnOpen, probes.RoleClient, i, i, cliAddr, srvAddr))
		tk.Handle(dataRecord(probes.DirSend, i, i, 0, len(req), []byte(req), cliAddr, srvAddr))
	}
	st := tk.Stats()
	if st.Conns != 3 || st.ConnsEvicted != 2 {
		t.Fatalf("stats %+v", st)
	}
	// Evicted connections flushed their pending requests as unanswered.
	if len(s.got) != 2 || !s.got[0].Tx.NoResponse || s.got[0].ConnID != 1 || s.got[1].ConnID != 2 {
		t.Fatalf("%s", describeAll(s.got))
	}
	// Connection 3 is touched late; 4 and 5 go idle.
	tk.Handle(dataRecord(probes.DirRecv, 3, uint64(2*time.Second), 0, len(resp), []byte(resp), cliAddr, srvAddr))
	tk.Expire(uint64(2*time.Second) + 10)
	if st := tk.Stats(); st.Conns != 1 || st.ConnsExpired != 2 {
		t.Errorf("stats %+v", st)
	}
	tk.Flush(uint64(3 * time.Second))
	if st := tk.Stats(); st.Conns != 0 {
		t.Errorf("stats %+v", st)
	}
}

func TestReorderedEventIsDropped(t *testing.T) {
	tk, _ := newTestTracker(Config{})
	tk.Handle(connRecord(probes.EventConnOpen, probes.RoleClient, 1, 1, cliAddr, srvAddr))
	tk.Handle(dataRecord(probes.DirSend, 1, 2, 100, len(req), []byte(req), cliAddr, srvAddr))
	tk.Handle(dataRecord(probes.DirSend, 1, 3, 90, 10, []byte("0123456789"), cliAddr, srvAddr))
	if st := tk.Stats(); st.Reordered != 1 {
		t.Errorf("stats %+v", st)
	}
}

// openRecord is an open event that knows the socket's first send position.
func openRecord(role uint8, cookie, ts uint64, sendSeq uint32, local, remote netip.AddrPort) []byte {
	b := connRecord(probes.EventConnOpen, role, cookie, ts, local, remote)
	ev := (*probes.ConnEvent)(unsafe.Pointer(unsafe.SliceData(b)))
	ev.Flags, ev.SendSeq = probes.FlagSendSeq, sendSeq
	return b
}

// recvRecord is a receive that says where the socket's send stream ended
// when it read its bytes.
func recvRecord(cookie, ts uint64, seq uint32, payload string, sent uint32, local, remote netip.AddrPort) []byte {
	b := dataRecord(probes.DirRecv, cookie, ts, seq, len(payload), []byte(payload), local, remote)
	ev := (*probes.DataEvent)(unsafe.Pointer(unsafe.SliceData(b)))
	ev.Flags, ev.SentSeq = probes.FlagSentSeq, sent
	return b
}

// A client sends each request from one thread and reads the responses in
// another (Go's HTTP client does). The send's event is written when its
// call returns, which can be after the other thread read the response:
// the response's event comes first. It must wait for the request.
func TestReceiveBeforeItsSend(t *testing.T) {
	tk, s := newTestTracker(Config{})
	const base = 1000
	n := uint32(len(req))
	tk.Handle(openRecord(probes.RoleClient, 1, 100, base, cliAddr, srvAddr))
	// Exchange 1: the response (read at 200, after the request's bytes
	// up to base+n were sent) before the request's event (returned at 300).
	tk.Handle(recvRecord(1, 200, 7000, resp, base+n, cliAddr, srvAddr))
	if len(s.got) != 0 || tk.Stats().HeldReceives != 1 {
		t.Fatalf("the response was not held: %s %+v", describeAll(s.got), tk.Stats())
	}
	tk.Handle(dataRecord(probes.DirSend, 1, 300, base, len(req), []byte(req), cliAddr, srvAddr))
	// Exchange 2 in order; its response was read with nothing more sent.
	tk.Handle(dataRecord(probes.DirSend, 1, 400, base+n, len(req), []byte(req), cliAddr, srvAddr))
	tk.Handle(recvRecord(1, 500, 7000+uint32(len(resp)), resp, base+2*n, cliAddr, srvAddr))
	if len(s.got) != 2 {
		t.Fatalf("%d sessions, want 2: %s", len(s.got), describeAll(s.got))
	}
	for i, x := range s.got {
		if x.Kind != spans.Client || x.Index != i || x.Tx.StatusCode != 200 || x.Tx.ReqBytes != int64(n) ||
			x.Tx.RespBytes != int64(len(resp)) || x.Tx.NoResponse {
			t.Errorf("session %d: %s", i, describeAll(s.got[i:i+1]))
		}
	}
	// The first request's bytes were out by the time their answer was
	// read (200): its send cannot be later.
	if tx := s.got[0].Tx; tx.ReqStart != 200 || tx.RespEnd != 200 {
		t.Errorf("exchange 1: request at %d, response end %d, want 200 and 200", tx.ReqStart, tx.RespEnd)
	}
	if tx := s.got[1].Tx; tx.ReqStart != 400 || tx.RespEnd != 500 {
		t.Errorf("exchange 2: request at %d, response end %d, want 400 and 500", tx.ReqStart, tx.RespEnd)
	}
	if st := tk.Stats(); st.HeldReceives != 1 || st.HeldTimedOut != 0 || st.Reordered != 0 || st.GapBytes != 0 {
		t.Errorf("stats %+v", st)
	}
}

// A receive is held only for sends not seen: the server's first read
// comes before it sent anything, and a connection that predates the agent
// (no open event, no send seen) has no position to wait for.
func TestReceiveNotHeldWithoutMissingSends(t *testing.T) {
	tk, s := newTestTracker(Config{})
	tk.Handle(openRecord(probes.RoleServer, 1, 100, 5000, srvAddr, cliAddr))
	tk.Handle(recvRecord(1, 200, 1000, req, 5000, srvAddr, cliAddr))
	tk.Handle(dataRecord(probes.DirSend, 1, 300, 5000, len(resp), []byte(resp), srvAddr, cliAddr))
	// Predates the agent: the role comes from the payload.
	tk.Handle(dataRecord(probes.DirSend, 2, 400, 10, len(req), []byte(req), cliAddr, srvAddr))
	tk.Handle(recvRecord(2, 500, 90, resp, 10+uint32(len(req)), cliAddr, srvAddr))
	if len(s.got) != 2 || s.got[0].Kind != spans.Server || s.got[1].Kind != spans.Client || s.got[1].Index != -1 {
		t.Fatalf("%s", describeAll(s.got))
	}
	if st := tk.Stats(); st.HeldReceives != 0 {
		t.Errorf("stats %+v", st)
	}
}

// The sends a receive waits for may never come (their events were lost):
// after HoldTimeout (by the clock, with the ring buffer empty, or by the
// time of later events), or when the connection ends, it is analyzed
// without them. Receives behind a held one wait too, in their order.
func TestHeldReceiveTimesOut(t *testing.T) {
	for _, end := range []string{"clock", "later events", "close"} {
		t.Run(end, func(t *testing.T) {
			tk, s := newTestTracker(Config{})
			n := uint32(len(req))
			tk.Handle(openRecord(probes.RoleClient, 1, 100, 0, cliAddr, srvAddr))
			tk.Handle(dataRecord(probes.DirSend, 1, 200, 0, len(req), []byte(req), cliAddr, srvAddr))
			// The response came after 40 more bytes were sent, whose
			// event never arrives; then half of a second response.
			tk.Handle(recvRecord(1, 300, 0, resp, n+40, cliAddr, srvAddr))
			tk.Handle(recvRecord(1, 310, uint32(len(resp)), resp[:10], n, cliAddr, srvAddr))
			if len(s.got) != 0 {
				t.Fatalf("not held: %s", describeAll(s.got))
			}
			hold := uint64(HoldTimeout.Nanoseconds())
			// Time passes (by the clock, or by another connection's
			// events): the first receive's timeout, then the second's.
			release := func(now uint64) {
				if end == "clock" {
					tk.Release(now)
				} else {
					tk.Handle(connRecord(probes.EventConnOpen, probes.RoleClient, now, now, cliAddr, srvAddr))
				}
			}
			if end == "close" {
				tk.Handle(connRecord(probes.EventConnClose, 0, 1, 400, cliAddr, srvAddr))
			} else {
				release(300 + hold - 1)
				if len(s.got) != 0 {
					t.Fatalf("released early: %s", describeAll(s.got))
				}
				release(300 + hold)
				if len(s.got) != 1 || tk.heldCount != 1 || tk.Stats().HeldTimedOut != 1 {
					t.Fatalf("after the first's timeout: %d held, %+v%s", tk.heldCount, tk.Stats(), describeAll(s.got))
				}
				release(310 + hold)
			}
			if len(s.got) != 1 || s.got[0].Tx.StatusCode != 200 || s.got[0].Tx.RespEnd != 300 || s.got[0].Tx.ReqStart != 200 {
				t.Fatalf("%s", describeAll(s.got))
			}
			st := tk.Stats()
			wantTimedOut := map[string]uint64{"clock": 2, "later events": 2, "close": 0}[end]
			if st.HeldReceives != 2 || st.HeldTimedOut != wantTimedOut || tk.heldCount != 0 {
				t.Errorf("stats %+v, %d held", st, tk.heldCount)
			}
			if end != "close" && (len(tk.heldConns) != 0 || len(tk.conns[1].held) != 0) {
				t.Errorf("held receives left: %d connections", len(tk.heldConns))
			}
		})
	}
}

// Held receives are bounded per connection: past maxHeldPerConn the
// oldest is analyzed without waiting.
func TestHeldReceivesBounded(t *testing.T) {
	tk, _ := newTestTracker(Config{})
	tk.Handle(openRecord(probes.RoleClient, 1, 100, 0, cliAddr, srvAddr))
	for i := 0; i < maxHeldPerConn+5; i++ {
		tk.Handle(recvRecord(1, uint64(200+i), uint32(i), "x", 1, cliAddr, srvAddr))
	}
	if got := len(tk.conns[1].held); got != maxHeldPerConn || tk.heldCount != maxHeldPerConn {
		t.Fatalf("%d held on the connection, %d in all, want %d", got, tk.heldCount, maxHeldPerConn)
	}
	// The first 5 were analyzed in order (their stream positions 0-4).
	if st := tk.conns[1].streams[1]; !st.started || st.next != 5 {
		t.Errorf("receive stream at %+v, want next 5", st)
	}

	// And in all: fill the table up to maxHeld.
	last := uint64(1 + (maxHeld-maxHeldPerConn)/maxHeldPerConn)
	for cookie := uint64(2); cookie <= last; cookie++ {
		tk.Handle(openRecord(probes.RoleClient, cookie, 100, 0, cliAddr, srvAddr))
		for i := 0; i < maxHeldPerConn; i++ {
			tk.Handle(recvRecord(cookie, uint64(200+i), uint32(i), "x", 1, cliAddr, srvAddr))
		}
	}
	if tk.heldCount != maxHeld {
		t.Fatalf("%d held, want %d", tk.heldCount, maxHeld)
	}
	held := tk.Stats().HeldReceives
	// A connection with none held: its receive is analyzed as it came.
	tk.Handle(openRecord(probes.RoleClient, last+1, 100, 0, cliAddr, srvAddr))
	tk.Handle(recvRecord(last+1, 300, 0, "x", 1, cliAddr, srvAddr))
	if c := tk.conns[last+1]; len(c.held) != 0 || c.streams[1].next != 1 || tk.heldCount != maxHeld || tk.Stats().HeldReceives != held {
		t.Errorf("receive with the table full: %d held on it, stream %+v, %d held in all", len(c.held), c.streams[1], tk.heldCount)
	}
	// One with some held: its oldest makes room.
	tk.Handle(recvRecord(2, 301, maxHeldPerConn, "x", 1, cliAddr, srvAddr))
	if c := tk.conns[2]; len(c.held) != maxHeldPerConn || c.streams[1].next != 1 || tk.heldCount != maxHeld {
		t.Errorf("connection 2: %d held, stream %+v, %d held in all", len(c.held), c.streams[1], tk.heldCount)
	}
}

func TestIPv6MappedAddresses(t *testing.T) {
	local, remote := netip.MustParseAddrPort("[::ffff:10.0.0.1]:80"), netip.MustParseAddrPort("[::ffff:10.0.0.2]:5555")
	tk, s := newTestTracker(Config{})
	tk.Handle(connRecord(probes.EventConnOpen, probes.RoleServer, 1, 1, local, remote))
	tk.Handle(dataRecord(probes.DirRecv, 1, 2, 0, len(req), []byte(req), local, remote))
	tk.Handle(dataRecord(probes.DirSend, 1, 3, 0, len(resp), []byte(resp), local, remote))
	if len(s.got) != 1 || s.got[0].Server.String() != "10.0.0.1:80" || s.got[0].Client.String() != "10.0.0.2:5555" {
		t.Fatalf("%s", describeAll(s.got))
	}
}

func describeAll(ss []*spans.Session) string {
	var b strings.Builder
	for _, s := range ss {
		fmt.Fprintf(&b, "\n  kind=%d %s -> %s conn=%d idx=%d %s %+v", s.Kind, s.Client, s.Server, s.ConnID, s.Index, s.Tx.Summary, *s.Tx)
	}
	return b.String()
}

func defaultRegistry() *protocols.Registry { return protocols.NewRegistry(http1.New()) }
