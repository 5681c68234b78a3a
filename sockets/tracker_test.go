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
