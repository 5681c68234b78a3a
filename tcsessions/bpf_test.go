package tcsessions

import (
	"bytes"
	"encoding/binary"
	"errors"
	"fmt"
	"maps"
	"net/netip"
	"os"
	"reflect"
	"runtime"
	"slices"
	"sort"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/ringbuf"
	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netns"

	"github.com/clovisor/clovisor/internal/testbed"
)

// These tests run the tc programs on crafted packets with BPF_PROG_TEST_RUN
// (no interface, no attach): the kernel runs the program on an skb of the
// given bytes on the loopback device (ifindex 1), which the tests mark as
// traced in the ifaces table.
//
// Where one program serves both hooks (tc, kernels from 6.4 on), it asks
// the kernel which hook runs it, and a test run is not at an ingress hook:
// every run is an egress run for it. What depends on the hook (a session's
// ConnClientIngress) is left out of these tests' comparisons and tested
// through real hooks (TestHookRolesAndSeq0).

const loIfindex = 1

// ifacesArray is IFACES_ARRAY of bpf/tc.h, the size of the ifaces array:
// the tests put interfaces on both sides of it.
const ifacesArray = 32768

// harness holds loaded objects and a ring-buffer reader.
type harness struct {
	t  *testing.T
	o  *objects
	rd *ringbuf.Reader
	// gsoSegs, when set, is passed as the skb's gso_segs.
	gsoSegs uint32
	// egress runs every packet through the egress program.
	egress bool
	// ifindex, when set, is the skb's interface (it must exist in the
	// calling thread's network namespace); else loopback.
	ifindex uint32
}

// egressSegs runs segments through the egress program.
func (h *harness) egressSegs(ss ...seg) {
	h.t.Helper()
	h.egress = true
	defer func() { h.egress = false }()
	h.segs(ss...)
}

func newHarness(t *testing.T, cfg Config, ifaceFlags uint32) *harness {
	t.Helper()
	testbed.RequireRoot(t)
	if err := cfg.normalize(); err != nil {
		t.Fatal(err)
	}
	o, err := loadObjects(&cfg)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { o.Close() })
	if ifaceFlags != 0 {
		if err := o.setInterface(loIfindex, ifaceFlags); err != nil {
			t.Fatal(err)
		}
	}
	for _, p := range cfg.Ports {
		id, _ := ProtocolID(p.Protocol)
		if err := o.setPort(0, p.Port, id); err != nil {
			t.Fatal(err)
		}
	}
	for _, p := range cfg.IgnorePorts {
		if err := o.setPort(0, p, ProtocolIgnore); err != nil {
			t.Fatal(err)
		}
	}
	for _, e := range cfg.Egress {
		id, _ := ProtocolID(e.Protocol)
		if err := o.setEgress(e.Prefix, e.Port, id); err != nil {
			t.Fatal(err)
		}
	}
	rd, err := ringbuf.NewReader(o.TcEvents)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { rd.Close() })
	return &harness{t: t, o: o, rd: rd}
}

// skbCtx is the head of struct __sk_buff up to gso_segs, as
// BPF_PROG_TEST_RUN accepts it for a context.
type skbCtx struct {
	Len, PktType, Mark, QueueMapping, Protocol, VlanPresent, VlanTci, VlanProto, Priority,
	IngressIfindex, Ifindex, TcIndex uint32
	Cb                                     [5]uint32
	Hash, TcClassid, Data, DataEnd, NapiID uint32
	Family, RemoteIP4, LocalIP4            uint32
	RemoteIP6, LocalIP6                    [4]uint32
	RemotePort, LocalPort, DataMeta        uint32
	FlowKeys                               uint64
	Tstamp                                 uint64
	WireLen, GsoSegs                       uint32
	Sk                                     uint64
	GsoSize                                uint32
	_                                      uint32
}

// run runs the ingress program (and every other packet the egress program,
// which is the same code but for the hook it names) on each frame and
// checks it passes. Where one program serves both hooks, both are it.
func (h *harness) run(frames ...[]byte) {
	h.t.Helper()
	for i, f := range frames {
		prog := h.o.Ingress
		if i%2 == 1 || h.egress {
			prog = h.o.Egress
		}
		opts := &ebpf.RunOptions{Data: f}
		if h.gsoSegs != 0 || h.ifindex != 0 {
			var ctx skbCtx
			if h.gsoSegs != 0 {
				ctx.GsoSegs = h.gsoSegs
				ctx.GsoSize = 1000
			}
			ctx.Ifindex = h.ifindex
			opts.Context = ctx
		}
		ret, err := prog.Run(opts)
		if err != nil {
			h.t.Fatalf("prog.Run: %v", err)
		}
		if int32(ret) != -1 {
			h.t.Fatalf("program returned %d, want -1 (TC_ACT_UNSPEC / TCX_NEXT)", int32(ret))
		}
	}
}

func (h *harness) segs(ss ...seg) {
	h.t.Helper()
	for _, s := range ss {
		h.run(s.frame())
	}
}

// events returns the events written so far, decoded.
func (h *harness) events() (ex []ExchangeEvent, pl []PayloadEvent) {
	h.t.Helper()
	h.rd.SetDeadline(time.Now())
	for {
		rec, err := h.rd.Read()
		if errors.Is(err, os.ErrDeadlineExceeded) {
			return ex, pl
		}
		if err != nil {
			h.t.Fatal(err)
		}
		switch rec.RawSample[0] {
		case eventExchange:
			var e ExchangeEvent
			if err := binary.Read(bytes.NewReader(rec.RawSample), binary.NativeEndian, &e); err != nil {
				h.t.Fatal(err)
			}
			ex = append(ex, e)
		case eventPayload:
			e, err := decodePayload(rec.RawSample)
			if err != nil {
				h.t.Fatal(err)
			}
			pl = append(pl, *e)
		default:
			h.t.Fatalf("unknown event kind %d", rec.RawSample[0])
		}
	}
}

func (h *harness) sessions() []SessionInfo {
	h.t.Helper()
	s, err := h.o.readSessions()
	if err != nil {
		h.t.Fatal(err)
	}
	sort.Slice(s, func(i, j int) bool { return s[i].Client.String() < s[j].Client.String() })
	return s
}

func (h *harness) stats() Stats {
	h.t.Helper()
	s, err := h.o.readStats()
	if err != nil {
		h.t.Fatal(err)
	}
	return s
}

// ipLen is the IP length of a segment (IP header with options or extension
// headers, TCP header, payload).
func ipLen(s seg) uint64 { return uint64(len(s.frame()) - 14) }

// dc builds expected counters.
func dc(bytes, packets, payload, newBytes, rpackets uint64) DirCounters {
	return DirCounters{Bytes: bytes, Packets: packets, PayloadBytes: payload, NewBytes: newBytes, RetransPackets: rpackets}
}

func sum(ss ...seg) uint64 {
	var n uint64
	for _, s := range ss {
		n += ipLen(s)
	}
	return n
}

func tuple(c *conv) tcConnTuple {
	return tcConnTuple{
		ClientAddr: addr16(c.client.Addr()), ServerAddr: addr16(c.server.Addr()),
		ClientPort: c.client.Port(), ServerPort: c.server.Port(), Ifindex: loIfindex,
	}
}

// checkExchange compares a record with what is expected, timestamps
// aside (which must be ordered and set where the phase says).
func checkExchange(t *testing.T, got ExchangeEvent, c *conv, index uint32, end End, phase Phase, req, resp DirCounters, reqFlags, respFlags uint32) {
	t.Helper()
	if got.Tuple != tuple(c) {
		t.Errorf("exchange %d: tuple %+v, want %+v", index, got.Tuple, tuple(c))
	}
	if got.Index != index || End(got.End) != end || Phase(got.Phase) != phase {
		t.Errorf("exchange: index %d end %v phase %d, want %d %v %d", got.Index, End(got.End), got.Phase, index, end, phase)
	}
	if got.Dir[0] != req {
		t.Errorf("exchange %d: request counters %+v, want %+v", index, got.Dir[0], req)
	}
	if got.Dir[1] != resp {
		t.Errorf("exchange %d: response counters %+v, want %+v", index, got.Dir[1], resp)
	}
	if got.Flags[0] != reqFlags || got.Flags[1] != respFlags {
		t.Errorf("exchange %d: flags %#x/%#x, want %#x/%#x", index, got.Flags[0], got.Flags[1], reqFlags, respFlags)
	}
	if got.FirstTs == 0 || got.EndTs < got.FirstTs {
		t.Errorf("exchange %d: first %d end %d", index, got.FirstTs, got.EndTs)
	}
	switch phase {
	case PhaseResponse:
		if got.RespFirstTs == 0 || got.RespLastTs < got.RespFirstTs || got.EndTs < got.RespLastTs {
			t.Errorf("exchange %d: response times %d..%d end %d", index, got.RespFirstTs, got.RespLastTs, got.EndTs)
		}
		if got.ReqFirstTs != 0 && got.RespFirstTs < got.ReqLastTs {
			t.Errorf("exchange %d: response %d before the request's end %d", index, got.RespFirstTs, got.ReqLastTs)
		}
		fallthrough
	case PhaseRequest:
		if got.ReqFirstTs == 0 && phase == PhaseRequest || got.ReqLastTs < got.ReqFirstTs {
			t.Errorf("exchange %d: request times %d..%d", index, got.ReqFirstTs, got.ReqLastTs)
		}
	case PhaseIdle:
		if got.ReqFirstTs != 0 || got.RespFirstTs != 0 {
			t.Errorf("exchange %d: idle with payload times %d %d", index, got.ReqFirstTs, got.RespFirstTs)
		}
	}
}

func checkPayload(t *testing.T, got PayloadEvent, c *conv, index uint32, dir uint8, data string, length uint32) {
	t.Helper()
	if got.Tuple != tuple(c) || got.Index != index || got.Dir != dir {
		t.Errorf("payload: tuple %+v index %d dir %d, want %+v %d %d", got.Tuple, got.Index, got.Dir, tuple(c), index, dir)
	}
	if string(got.Data[:got.Cap]) != data || got.Len != length {
		t.Errorf("payload %d/%d: %q (len %d), want %q (len %d)", index, dir, got.Data[:got.Cap], got.Len, data, length)
	}
	if got.Ts == 0 || got.FirstTs == 0 || got.Ts < got.FirstTs {
		t.Errorf("payload %d/%d: ts %d first %d", index, dir, got.Ts, got.FirstTs)
	}
}

var httpPorts = Config{Ports: []Port{{Port: 8080, Protocol: "http"}}}

// handshake runs SYN, SYN-ACK, ACK and returns them.
func (h *harness) handshake(c *conv) (syn, synack, ack seg) {
	syn = c.fromClient(fSYN, "")
	synack = c.fromServer(fSYN|fACK, "")
	ack = c.fromClient(fACK, "")
	h.segs(syn, synack, ack)
	return
}

// TestKeepAliveExchangesIPv4 follows a whole keep-alive connection: the
// handshake, three request/response exchanges (one response in two
// segments), the close; it checks the sessions entry, every record and every
// payload prefix exactly.
func TestKeepAliveExchangesIPv4(t *testing.T) {
	h := newHarness(t, httpPorts, ifaceSessions)
	c := newConv("10.1.0.1:40000", "10.1.0.2:8080")
	syn, synack, ack := h.handshake(c)

	s := h.sessions()
	if len(s) != 1 {
		t.Fatalf("sessions after the handshake: %+v", s)
	}
	e := s[0]
	if e.Client != c.client || e.Server != c.server || e.Ifindex != loIfindex {
		t.Errorf("entry %v -> %v on %d", e.Client, e.Server, e.Ifindex)
	}
	if e.Entry.Proto != 1 || e.Entry.ConnFlags&^ConnClientIngress != ConnFromSYN|ConnHighRequest|ConnHighResponse|ConnSeq0 ||
		e.Entry.State != 0 || e.Entry.ReqSeq0 != c.clientISN+1 {
		t.Errorf("entry proto %d flags %#x state %#x seq0 %d", e.Entry.Proto, e.Entry.ConnFlags, e.Entry.State, e.Entry.ReqSeq0)
	}
	if h := [2]uint32{e.Entry.Dir[0].HighEnd, e.Entry.Dir[1].HighEnd}; h != [2]uint32{c.clientISN + 1, c.serverISN + 1} {
		t.Errorf("stream starts %v, want the ISNs + 1", h)
	}
	if e.Entry.Dir[0].OpenTs == 0 || e.Entry.Dir[1].OpenTs <= e.Entry.Dir[0].OpenTs {
		t.Errorf("handshake times syn %d synack %d", e.Entry.Dir[0].OpenTs, e.Entry.Dir[1].OpenTs)
	}
	if want := dc(sum(syn, ack), 2, 0, 0, 0); e.Entry.Dir[0].Total != want {
		t.Errorf("request totals %+v, want %+v", e.Entry.Dir[0].Total, want)
	}
	if want := dc(sum(synack), 1, 0, 0, 0); e.Entry.Dir[1].Total != want {
		t.Errorf("response totals %+v, want %+v", e.Entry.Dir[1].Total, want)
	}
	if f := [2]uint32{e.Entry.Dir[0].Flags, e.Entry.Dir[1].Flags}; f != [2]uint32{fSYN | fACK, fSYN | fACK} {
		t.Errorf("flags %#x", f)
	}

	req1 := c.fromClient(fPSH|fACK, "GET /a HTTP/1.1\r\nHost: x\r\n\r\n")
	resp1a := c.fromServer(fACK, "HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n")
	resp1b := c.fromServer(fPSH|fACK, "hello")
	ack1 := c.fromClient(fACK, "")
	req2 := c.fromClient(fPSH|fACK, "GET /b HTTP/1.1\r\nHost: x\r\n\r\n")
	resp2 := c.fromServer(fPSH|fACK, "HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n")
	req3 := c.fromClient(fPSH|fACK, "GET /c HTTP/1.1\r\nHost: x\r\n\r\n")
	resp3 := c.fromServer(fPSH|fACK, "HTTP/1.1 204 No Content\r\n\r\n")
	fin1 := c.fromClient(fFIN|fACK, "")
	fin2 := c.fromServer(fFIN|fACK, "")
	h.segs(req1, resp1a, resp1b, ack1)
	ex, pl := h.events()
	if len(ex) != 0 || len(pl) != 2 {
		t.Fatalf("before the next request: %d records, %d payloads", len(ex), len(pl))
	}
	s = h.sessions()
	if len(s) != 1 || s[0].Index() != 0 || s[0].Phase() != PhaseResponse {
		t.Fatalf("after exchange 0: %+v", s)
	}
	h.segs(req2, resp2, req3, resp3, fin1, fin2)

	ex, more := h.events()
	pl = append(pl, more...)
	if len(ex) != 3 {
		t.Fatalf("%d records, want 3: %+v", len(ex), ex)
	}
	checkExchange(t, ex[0], c, 0, EndNextRequest, PhaseResponse,
		dc(sum(syn, ack, req1, ack1), 4, uint64(len(req1.payload)), uint64(len(req1.payload)), 0),
		dc(sum(synack, resp1a, resp1b), 3, uint64(len(resp1a.payload)+len(resp1b.payload)), uint64(len(resp1a.payload)+len(resp1b.payload)), 0),
		fSYN|fACK|fPSH, fSYN|fACK|fPSH)
	checkExchange(t, ex[1], c, 1, EndNextRequest, PhaseResponse,
		dc(sum(req2), 1, uint64(len(req2.payload)), uint64(len(req2.payload)), 0),
		dc(sum(resp2), 1, uint64(len(resp2.payload)), uint64(len(resp2.payload)), 0),
		fACK|fPSH, fACK|fPSH)
	checkExchange(t, ex[2], c, 2, EndFIN, PhaseResponse,
		dc(sum(req3, fin1), 2, uint64(len(req3.payload)), uint64(len(req3.payload)), 0),
		dc(sum(resp3, fin2), 2, uint64(len(resp3.payload)), uint64(len(resp3.payload)), 0),
		fACK|fPSH|fFIN, fACK|fPSH|fFIN)
	if ex[0].SynTs == 0 || ex[0].SynackTs <= ex[0].SynTs || ex[2].SynTs != ex[0].SynTs || ex[0].FirstTs != ex[2].FirstTs {
		t.Errorf("connection times differ between records: %+v / %+v", ex[0], ex[2])
	}
	if ex[0].ConnFlags&^ConnClientIngress != ConnFromSYN|ConnHighRequest|ConnHighResponse|ConnSeq0|ConnHTTP ||
		ex[0].ReqSeq0 != c.clientISN+1 || ex[2].ReqSeq0 != c.clientISN+1 {
		t.Errorf("conn flags %#x seq0 %d", ex[0].ConnFlags, ex[0].ReqSeq0)
	}
	if ex[1].ReqFirstTs <= ex[0].RespLastTs {
		t.Errorf("exchange 1 starts at %d, before exchange 0's response ended at %d", ex[1].ReqFirstTs, ex[0].RespLastTs)
	}

	// One prefix per direction per exchange: the first new payload.
	if len(pl) != 6 {
		for _, p := range pl {
			t.Logf("%d %d %q", p.Index, p.Dir, p.Data[:p.Cap])
		}
		t.Fatalf("%d payload events, want 6", len(pl))
	}
	checkPayload(t, pl[0], c, 0, dirRequest, string(req1.payload), uint32(len(req1.payload)))
	checkPayload(t, pl[1], c, 0, dirResponse, string(resp1a.payload), uint32(len(resp1a.payload)))
	checkPayload(t, pl[2], c, 1, dirRequest, string(req2.payload), uint32(len(req2.payload)))
	checkPayload(t, pl[3], c, 1, dirResponse, string(resp2.payload), uint32(len(resp2.payload)))
	checkPayload(t, pl[4], c, 2, dirRequest, string(req3.payload), uint32(len(req3.payload)))
	checkPayload(t, pl[5], c, 2, dirResponse, string(resp3.payload), uint32(len(resp3.payload)))
	if pl[0].Seq != c.clientISN+1 || pl[1].Seq != c.serverISN+1 {
		t.Errorf("payload seqs %d %d", pl[0].Seq, pl[1].Seq)
	}

	if s := h.sessions(); len(s) != 0 {
		t.Errorf("sessions after both FINs: %+v", s)
	}
	if st := h.stats(); st != (Stats{SessionsCreated: 1, SessionsClosed: 1}) {
		t.Errorf("stats %+v", st)
	}
	// The last ACK after both FINs opens nothing.
	h.segs(c.fromClient(fACK, ""))
	if s := h.sessions(); len(s) != 0 {
		t.Errorf("the last ACK made a session: %+v", s)
	}
}

// variants are the L3 forms every scenario runs in.
var variants = []struct {
	name           string
	client, server string
	ipOpts         []byte
	ext            []ext6
}{
	{name: "IPv4", client: "10.1.0.1:40000", server: "10.1.0.2:8080"},
	{name: "IPv6", client: "[fd00::1]:40000", server: "[fd00::2]:8080"},
	// Record route (7) with room for two addresses, then end of list.
	{name: "IPv4 options", client: "10.1.0.1:40000", server: "10.1.0.2:8080",
		ipOpts: []byte{7, 11, 4, 0, 0, 0, 0, 0, 0, 0, 0, 0}},
	{name: "IPv6 extension headers", client: "[fd00::1]:40000", server: "[fd00::2]:8080",
		ext: []ext6{hopByHop(), destOpts(), routing0()}},
	// An IPv4 client behind an IPv4-mapped listener looks the same on the
	// wire as IPv4; this checks a different port order (client port lower).
	{name: "IPv4 low client port", client: "10.1.0.9:1000", server: "10.1.0.2:8080"},
}

// TestRetransmissionAndRSTMidRequest runs, in every variant: a handshake,
// one exchange, a second request sent twice (a retransmission must neither
// start an exchange nor be captured), a partly retransmitted third segment,
// then a RST from the server before any response.
func TestRetransmissionAndRSTMidRequest(t *testing.T) {
	for _, v := range variants {
		t.Run(v.name, func(t *testing.T) {
			h := newHarness(t, httpPorts, ifaceSessions)
			c := newConv(v.client, v.server)
			c.ipOpts, c.ext = v.ipOpts, v.ext
			syn, synack, ack := h.handshake(c)
			req1 := c.fromClient(fPSH|fACK, "GET /x HTTP/1.1\r\n\r\n")
			resp1 := c.fromServer(fPSH|fACK, "HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
			seq2 := c.cseq
			req2 := c.fromClient(fACK, "POST /y HTTP/1.1\r\nContent-Length: 10\r\n\r\n")
			req2again := req2 // same sequence: a retransmission
			// Half old, half new: starts 4 bytes before the end of req2.
			c.cseq -= 4
			req2tail := c.fromClient(fPSH|fACK, "\r\n\r\n0123456789")
			rst := c.fromServer(fRST|fACK, "")
			h.segs(req1, resp1, req2, req2again, req2tail, rst)

			ex, pl := h.events()
			if len(ex) != 2 || len(pl) != 3 {
				t.Fatalf("%d records and %d payloads, want 2 and 3", len(ex), len(pl))
			}
			checkExchange(t, ex[0], c, 0, EndNextRequest, PhaseResponse,
				dc(sum(syn, ack, req1), 3, uint64(len(req1.payload)), uint64(len(req1.payload)), 0),
				dc(sum(synack, resp1), 2, uint64(len(resp1.payload)), uint64(len(resp1.payload)), 0),
				fSYN|fACK|fPSH, fSYN|fACK|fPSH)
			n2 := uint64(len(req2.payload))
			checkExchange(t, ex[1], c, 1, EndRST, PhaseRequest,
				dc(sum(req2, req2again, req2tail), 3, 2*n2+uint64(len(req2tail.payload)), n2+uint64(len(req2tail.payload))-4, 2),
				dc(sum(rst), 1, 0, 0, 0),
				fACK|fPSH, fACK|fRST)
			if ex[1].RespFirstTs != 0 || ex[1].ReqLastTs <= ex[1].ReqFirstTs {
				t.Errorf("exchange 1 times: request %d..%d response %d", ex[1].ReqFirstTs, ex[1].ReqLastTs, ex[1].RespFirstTs)
			}
			checkPayload(t, pl[0], c, 0, dirRequest, string(req1.payload), uint32(len(req1.payload)))
			checkPayload(t, pl[1], c, 0, dirResponse, string(resp1.payload), uint32(len(resp1.payload)))
			checkPayload(t, pl[2], c, 1, dirRequest, string(req2.payload), uint32(n2))
			if pl[2].Seq != seq2 {
				t.Errorf("payload seq %d, want %d", pl[2].Seq, seq2)
			}
			if s := h.sessions(); len(s) != 0 {
				t.Errorf("sessions after RST: %+v", s)
			}
			if st := h.stats(); st != (Stats{SessionsCreated: 1, SessionsClosed: 1}) {
				t.Errorf("stats %+v", st)
			}
		})
	}
}

// TestPacketsWithoutPayload: pure ACKs, FINs and RSTs of unknown
// connections open nothing; a SYN to a port no table names opens nothing; a
// connection closed without data gives one idle record, with RST or FIN.
func TestPacketsWithoutPayload(t *testing.T) {
	for _, v := range variants[:2] {
		t.Run(v.name, func(t *testing.T) {
			h := newHarness(t, httpPorts, ifaceSessions)
			c := newConv(v.client, v.server)
			h.segs(c.fromClient(fACK, ""), c.fromServer(fACK, ""), c.fromClient(fFIN|fACK, ""), c.fromServer(fRST, ""))
			other := newConv(v.client, v.server)
			other.server = netip.AddrPortFrom(other.server.Addr(), 9999)
			h.segs(other.fromClient(fSYN, ""), other.fromServer(fSYN|fACK, ""), other.fromClient(fPSH|fACK, "data"))
			if s := h.sessions(); len(s) != 0 {
				t.Fatalf("sessions: %+v", s)
			}

			// Handshake then RST: one idle record.
			c = newConv(v.client, v.server)
			syn, synack, ack := h.handshake(c)
			rst := c.fromClient(fRST|fACK, "")
			h.segs(rst)
			// Handshake then FIN, FIN: one idle record.
			d := newConv(v.client, v.server)
			d.client = netip.AddrPortFrom(d.client.Addr(), d.client.Port()+1)
			dsyn, dsynack, dack := h.handshake(d)
			fin1, fin2 := d.fromClient(fFIN|fACK, ""), d.fromServer(fFIN|fACK, "")
			h.segs(fin1, fin2)

			ex, pl := h.events()
			if len(ex) != 2 || len(pl) != 0 {
				t.Fatalf("%d records and %d payloads, want 2 and 0", len(ex), len(pl))
			}
			checkExchange(t, ex[0], c, 0, EndRST, PhaseIdle,
				dc(sum(syn, ack, rst), 3, 0, 0, 0), dc(sum(synack), 1, 0, 0, 0), fSYN|fACK|fRST, fSYN|fACK)
			checkExchange(t, ex[1], d, 0, EndFIN, PhaseIdle,
				dc(sum(dsyn, dack, fin1), 3, 0, 0, 0), dc(sum(dsynack, fin2), 2, 0, 0, 0), fSYN|fACK|fFIN, fSYN|fACK|fFIN)
			if ex[0].SynackTs-ex[0].SynTs == 0 || ex[0].ConnFlags&ConnFromSYN == 0 {
				t.Errorf("handshake: syn %d synack %d flags %#x", ex[0].SynTs, ex[0].SynackTs, ex[0].ConnFlags)
			}
			if st := h.stats(); st != (Stats{SessionsCreated: 2, SessionsClosed: 2}) {
				t.Errorf("stats %+v", st)
			}
		})
	}
}

// TestFragments: the first fragment of a TCP segment is traced (its own
// bytes), later fragments have no L4 header and only count for workloads
// and in the Fragments counter; a first fragment too short for the TCP
// header is a header fault.
func TestFragments(t *testing.T) {
	for _, v := range variants[:4] {
		t.Run(v.name, func(t *testing.T) {
			h := newHarness(t, httpPorts, ifaceSessions|ifaceWorkloads)
			w := newWorkloads(h.o)
			c := newConv(v.client, v.server)
			c.ipOpts, c.ext = v.ipOpts, v.ext
			if err := w.set("client", c.client.Addr()); err != nil {
				t.Fatal(err)
			}
			syn, synack, ack := h.handshake(c)
			body := "GET /fragmented HTTP/1.1\r\nHost: fragments\r\n\r\n"
			req := c.fromClient(fPSH|fACK, body)
			frags := req.fragments(32) // TCP header (20) + 12 payload bytes, then the rest
			h.run(frags...)
			resp := c.fromServer(fPSH|fACK, "HTTP/1.1 200 OK\r\n\r\n")
			fin1, fin2 := c.fromClient(fFIN|fACK, ""), c.fromServer(fFIN|fACK, "")
			h.segs(resp, fin1, fin2)

			ex, pl := h.events()
			if len(ex) != 1 || len(pl) != 2 {
				t.Fatalf("%d records and %d payloads, want 1 and 2", len(ex), len(pl))
			}
			first := uint64(len(frags[0]) - 14)
			checkExchange(t, ex[0], c, 0, EndFIN, PhaseResponse,
				dc(sum(syn, ack, fin1)+first, 4, 12, 12, 0),
				dc(sum(synack, resp, fin2), 3, uint64(len(resp.payload)), uint64(len(resp.payload)), 0),
				fSYN|fACK|fPSH|fFIN, fSYN|fACK|fPSH|fFIN)
			checkPayload(t, pl[0], c, 0, dirRequest, body[:12], 12)
			st := h.stats()
			if st.Fragments != 1 || st.HeaderFaults != 0 {
				t.Errorf("stats %+v, want 1 fragment", st)
			}
			tr, err := w.traffic()
			if err != nil {
				t.Fatal(err)
			}
			want := Traffic{
				TxBytes: sum(syn, ack, fin1) + uint64(len(frags[0])+len(frags[1])-28), TxPackets: 5,
				RxBytes: sum(synack, resp, fin2), RxPackets: 3,
			}
			if tr["client"] != want {
				t.Errorf("client traffic %+v, want %+v", tr["client"], want)
			}

			// A first fragment holding 8 bytes of the TCP header.
			tiny := c.fromClient(fPSH|fACK, "x").fragments(8)
			h.run(tiny...)
			if st := h.stats(); st.HeaderFaults != 1 || st.Fragments != 2 {
				t.Errorf("after a tiny first fragment: %+v", st)
			}
		})
	}
}

// TestMidstream: connections already open when tracing starts are picked
// up at their first payload, with roles from the port table.
func TestMidstream(t *testing.T) {
	h := newHarness(t, httpPorts, ifaceSessions)
	// Request first.
	c := newConv("10.1.0.1:40000", "10.1.0.2:8080")
	ack := c.fromClient(fACK, "") // no session yet
	req := c.fromClient(fPSH|fACK, "GET / HTTP/1.1\r\n\r\n")
	resp := c.fromServer(fPSH|fACK, "HTTP/1.1 200 OK\r\n\r\n")
	h.segs(ack, req, resp)
	// Response first: the first exchange has no request.
	d := newConv("10.1.0.3:40001", "10.1.0.2:8080")
	resp0 := d.fromServer(fPSH|fACK, "HTTP/1.1 200 OK\r\n\r\n")
	req1 := d.fromClient(fPSH|fACK, "GET /next HTTP/1.1\r\n\r\n")
	h.segs(resp0, req1)

	s := h.sessions()
	if len(s) != 2 {
		t.Fatalf("sessions %+v", s)
	}
	if s[0].Client != c.client || s[0].Entry.ConnFlags&^(ConnHighRequest|ConnHighResponse|ConnClientIngress) != ConnFromMidstream|ConnHTTP ||
		s[0].Entry.Dir[0].OpenTs != 0 || s[0].Index() != 0 || s[0].Phase() != PhaseResponse {
		t.Errorf("request-first entry %+v", s[0])
	}
	if want := dc(sum(req), 1, uint64(len(req.payload)), uint64(len(req.payload)), 0); s[0].Entry.Dir[0].Total != want {
		t.Errorf("request-first totals %+v, want %+v (the ACK before the session is not counted)", s[0].Entry.Dir[0].Total, want)
	}
	if s[1].Client != d.client || s[1].Index() != 1 || s[1].Phase() != PhaseRequest {
		t.Errorf("response-first entry %+v", s[1])
	}
	ex, _ := h.events()
	if len(ex) != 1 {
		t.Fatalf("records %+v", ex)
	}
	checkExchange(t, ex[0], d, 0, EndNextRequest, PhaseResponse,
		dc(0, 0, 0, 0, 0), dc(sum(resp0), 1, uint64(len(resp0.payload)), uint64(len(resp0.payload)), 0), 0, fPSH|fACK)
	if ex[0].ReqFirstTs != 0 || ex[0].ConnFlags&ConnFromMidstream == 0 {
		t.Errorf("response-only record %+v", ex[0])
	}
}

// TestTrackAllIgnoreAndGuess: with no tables every connection is traced,
// except to ignored ports; a connection picked up midstream takes the lower
// port as the server and says so.
func TestTrackAllIgnoreAndGuess(t *testing.T) {
	h := newHarness(t, Config{IgnorePorts: []uint16{4317}}, ifaceSessions)
	a := newConv("10.1.0.1:40000", "10.1.0.2:5432")
	h.segs(a.fromClient(fSYN, ""))
	b := newConv("10.1.0.1:40001", "10.1.0.2:4317")
	h.segs(b.fromClient(fSYN, ""), b.fromServer(fSYN|fACK, ""), b.fromClient(fPSH|fACK, "otlp"))
	g := newConv("10.1.0.1:50000", "10.1.0.2:6379")
	h.segs(g.fromServer(fPSH|fACK, "+OK\r\n")) // server speaks first, midstream
	s := h.sessions()
	if len(s) != 2 {
		t.Fatalf("sessions %+v", s)
	}
	if s[0].Server != a.server || s[0].Entry.ConnFlags&^ConnClientIngress != ConnFromSYN|ConnHighRequest|ConnSeq0 || s[0].Entry.Proto != 0 {
		t.Errorf("SYN entry %+v", s[0])
	}
	if s[1].Server != g.server || s[1].Entry.ConnFlags&ConnRolesGuessed == 0 || s[1].Phase() != PhaseResponse {
		t.Errorf("guessed entry %+v", s[1])
	}
}

// TestEgressLookupTable: servers outside the node selected by prefix and
// port (or any port), longest prefix first; a SYN-ACK alone also opens a
// session, with the roles it implies.
func TestEgressLookupTable(t *testing.T) {
	cfg := Config{Egress: []EgressMatch{
		{Prefix: netip.MustParsePrefix("203.0.113.0/24"), Port: 443, Protocol: "https"},
		{Prefix: netip.MustParsePrefix("203.0.113.128/25"), Port: 443, Protocol: "tls"},
		{Prefix: netip.MustParsePrefix("2001:db8::/32"), Protocol: "http"},
		{Prefix: netip.MustParsePrefix("198.51.100.7/32"), Port: 80, Protocol: "ignore"},
	}}
	h := newHarness(t, cfg, ifaceSessions)
	cases := []struct {
		client, server string
		synack         bool
		proto          string // "" for not traced
	}{
		{"10.1.0.1:40000", "203.0.113.5:443", false, "https"},
		{"10.1.0.1:40001", "203.0.113.200:443", false, "tls"},
		{"10.1.0.1:40002", "203.0.113.5:80", false, ""},
		{"10.1.0.1:40003", "203.0.114.5:443", false, ""},
		{"[fd00::1]:40004", "[2001:db8::9]:8443", false, "http"},
		{"[fd00::1]:40005", "[2001:db9::9]:8443", false, ""},
		{"10.1.0.1:40006", "203.0.113.9:443", true, "https"},
		{"10.1.0.1:40007", "198.51.100.7:80", false, ""},
	}
	for _, tc := range cases {
		c := newConv(tc.client, tc.server)
		if tc.synack {
			c.fromClient(fSYN, "")
			h.segs(c.fromServer(fSYN|fACK, ""))
		} else {
			h.segs(c.fromClient(fSYN, ""))
		}
	}
	got := map[string]string{}
	for _, s := range h.sessions() {
		got[s.Client.String()+" "+s.Server.String()] = ProtocolName(s.Entry.Proto)
		if f := s.Entry.ConnFlags &^ (ConnHighRequest | ConnHighResponse | ConnSeq0 | ConnClientIngress); f != ConnFromSYN && f != ConnFromSYNACK {
			t.Errorf("%v: flags %#x", s.Client, s.Entry.ConnFlags)
		}
	}
	for _, tc := range cases {
		k := netip.MustParseAddrPort(tc.client).String() + " " + netip.MustParseAddrPort(tc.server).String()
		if got[k] != tc.proto {
			t.Errorf("%s: traced as %q, want %q", k, got[k], tc.proto)
		}
	}
}

// TestPortReuse: a SYN on the tuple of a connection that never closed ends
// it (record "reused") and starts a new one from zero.
func TestPortReuse(t *testing.T) {
	h := newHarness(t, httpPorts, ifaceSessions)
	c := newConv("10.1.0.1:40000", "10.1.0.2:8080")
	h.handshake(c)
	h.segs(c.fromClient(fPSH|fACK, "GET / HTTP/1.1\r\n\r\n"))
	d := newConv("10.1.0.1:40000", "10.1.0.2:8080")
	syn := d.fromClient(fSYN, "")
	h.segs(syn)
	// A retransmitted SYN of a connection that has not started ends
	// nothing.
	h.segs(syn)
	ex, _ := h.events()
	if len(ex) != 1 || End(ex[0].End) != EndReused || Phase(ex[0].Phase) != PhaseRequest {
		t.Fatalf("records %+v", ex)
	}
	s := h.sessions()
	if len(s) != 1 || s[0].Entry.Dir[0].Total != dc(2*ipLen(syn), 2, 0, 0, 0) || s[0].Entry.FirstTs <= ex[0].FirstTs {
		t.Errorf("new session %+v", s)
	}
	if st := h.stats(); st.SessionsCreated != 2 || st.SessionsClosed != 1 {
		t.Errorf("stats %+v", st)
	}
}

// TestGSO: a GSO/GRO packet counts as its segments on the wire.
func TestGSO(t *testing.T) {
	h := newHarness(t, httpPorts, ifaceSessions|ifaceWorkloads)
	w := newWorkloads(h.o)
	c := newConv("10.1.0.1:40000", "10.1.0.2:8080")
	if err := w.set("server", c.server.Addr()); err != nil {
		t.Fatal(err)
	}
	h.handshake(c)
	// BPF_PROG_TEST_RUN takes at most about a page of data.
	big := c.fromClient(fACK, string(bytes.Repeat([]byte("a"), 3000)))
	h.gsoSegs = 3
	h.segs(big)
	h.gsoSegs = 0
	s := h.sessions()
	want := ipLen(big) + 2*40
	if len(s) != 1 || s[0].Entry.Dir[0].Total.Packets != 2+3 || s[0].Entry.Dir[0].Total.PayloadBytes != 3000 {
		t.Fatalf("sessions %+v", s)
	}
	tr, _ := w.traffic()
	if tr["server"].RxPackets != 2+3 || tr["server"].RxBytes != 2*40+want {
		t.Errorf("server traffic %+v, want 5 packets, %d bytes", tr["server"], 2*40+want)
	}
	if got := s[0].Entry.Dir[0].Total.Bytes; got != 2*40+want {
		t.Errorf("request bytes %d, want %d", got, 2*40+want)
	}
}

// TestWorkloadTraffic: addresses map to workloads; moving an address moves
// its later traffic; a removed workload's slot starts from zero when reused.
func TestWorkloadTraffic(t *testing.T) {
	h := newHarness(t, httpPorts, ifaceWorkloads) // node NIC without sessions
	w := newWorkloads(h.o)
	a4, a6, b4 := netip.MustParseAddr("10.1.0.2"), netip.MustParseAddr("fd00::2"), netip.MustParseAddr("10.1.0.3")
	if err := w.set("a", a4, a6); err != nil {
		t.Fatal(err)
	}
	if err := w.set("b", b4); err != nil {
		t.Fatal(err)
	}
	c4 := newConv("10.9.0.1:40000", "10.1.0.2:8080")
	c6 := newConv("[fd00::9]:40000", "[fd00::2]:8080")
	in4, out4 := c4.fromClient(fPSH|fACK, "abc"), c4.fromServer(fPSH|fACK, "defgh")
	in6 := c6.fromClient(fPSH|fACK, "x")
	h.segs(in4, out4, in6)
	// UDP is counted too (no session).
	udp := ipFrame(netip.MustParseAddr("10.1.0.3"), netip.MustParseAddr("10.9.0.1"), 17, make([]byte, 8+100), nil, nil, nil)
	h.run(udp)
	tr, err := w.traffic()
	if err != nil {
		t.Fatal(err)
	}
	if want := (Traffic{RxBytes: sum(in4, in6), RxPackets: 2, TxBytes: sum(out4), TxPackets: 1}); tr["a"] != want {
		t.Errorf("a: %+v, want %+v", tr["a"], want)
	}
	if want := (Traffic{TxBytes: 128, TxPackets: 1}); tr["b"] != want {
		t.Errorf("b: %+v, want %+v", tr["b"], want)
	}
	if s := h.sessions(); len(s) != 0 {
		t.Errorf("sessions on an interface without session tracking: %+v", s)
	}
	// Move 10.1.0.2 to b, remove a, add c (reusing a's slot).
	if err := w.set("b", b4, a4); err != nil {
		t.Fatal(err)
	}
	h.segs(c4.fromClient(fACK, ""))
	if err := w.remove("a"); err != nil {
		t.Fatal(err)
	}
	if err := w.set("c", a6); err != nil {
		t.Fatal(err)
	}
	tr, _ = w.traffic()
	if len(tr) != 2 || tr["c"] != (Traffic{}) || tr["b"].RxPackets != 1 || tr["b"].TxPackets != 1 {
		t.Errorf("after moves: %+v", tr)
	}
}

// TestUntracedInterface: an interface missing from the ifaces table is
// left alone entirely.
func TestUntracedInterface(t *testing.T) {
	h := newHarness(t, httpPorts, 0)
	c := newConv("10.1.0.1:40000", "10.1.0.2:8080")
	h.handshake(c)
	h.segs(c.fromClient(fPSH|fACK, "GET / HTTP/1.1\r\n\r\n"))
	if s := h.sessions(); len(s) != 0 {
		t.Errorf("sessions %+v", s)
	}
	if st := h.stats(); st != (Stats{}) {
		t.Errorf("stats %+v", st)
	}
}

// TestPayloadCap: the prefix is cut at PayloadBytes (the length says how
// long the payload was), the response's at ResponsePayloadBytes (512 by
// default); PayloadBytes -1 sends none.
func TestPayloadCap(t *testing.T) {
	cfg := httpPorts
	cfg.PayloadBytes = 16
	h := newHarness(t, cfg, ifaceSessions)
	c := newConv("10.1.0.1:40000", "10.1.0.2:8080")
	h.handshake(c)
	req := c.fromClient(fPSH|fACK, "GET /a-long-path HTTP/1.1\r\n\r\n")
	h.segs(req)
	_, pl := h.events()
	if len(pl) != 1 {
		t.Fatalf("payloads %d", len(pl))
	}
	checkPayload(t, pl[0], c, 0, dirRequest, string(req.payload[:16]), uint32(len(req.payload)))

	// By default the response's prefix is shorter than the request's.
	h = newHarness(t, httpPorts, ifaceSessions)
	d := newConv("10.1.0.1:40001", "10.1.0.2:8080")
	h.handshake(d)
	long := "GET /" + strings.Repeat("p", 595) + "\r\n"
	req = d.fromClient(fPSH|fACK, long)
	resp := d.fromServer(fPSH|fACK, "HTTP/1.1 200 OK\r\n"+strings.Repeat("h", 600))
	h.segs(req, resp)
	_, pl = h.events()
	if len(pl) != 2 {
		t.Fatalf("payloads %d", len(pl))
	}
	checkPayload(t, pl[0], d, 0, dirRequest, long, uint32(len(long)))
	checkPayload(t, pl[1], d, 0, dirResponse, string(resp.payload[:DefaultResponsePayloadBytes]), uint32(len(resp.payload)))

	cfg.PayloadBytes = -1
	h = newHarness(t, cfg, ifaceSessions)
	h.handshake(c)
	h.segs(c.fromClient(fPSH|fACK, "GET / HTTP/1.1\r\n\r\n"))
	if _, pl := h.events(); len(pl) != 0 {
		t.Errorf("payloads with PayloadBytes -1: %d", len(pl))
	}
}

// TestNonIPAndMalformed: ARP and broken IP headers pass untouched.
func TestNonIPAndMalformed(t *testing.T) {
	h := newHarness(t, httpPorts, ifaceSessions|ifaceWorkloads)
	arp := append(append(append([]byte(nil), dstMAC...), srcMAC...), 0x08, 0x06)
	arp = append(arp, make([]byte, 28)...)
	h.run(arp)
	c := newConv("10.1.0.1:40000", "10.1.0.2:8080")
	bad := c.fromClient(fSYN, "").frame()
	bad[14] = 0x44 // IHL 4: invalid
	// The kernel's test run wants a whole IPv4 header; the TCP header is
	// cut short.
	short := c.fromClient(fSYN, "").frame()[:40]
	h.run(bad, short)
	if st := h.stats(); st.HeaderFaults != 2 {
		t.Errorf("stats %+v, want 2 header faults", st)
	}
	if s := h.sessions(); len(s) != 0 {
		t.Errorf("sessions %+v", s)
	}
}

// TestReorderingAndGaps: segments arriving out of order count once in
// NewBytes (the stream's advance); the late one is flagged as old data; a
// later retransmission of both counts again in PayloadBytes only.
func TestReorderingAndGaps(t *testing.T) {
	h := newHarness(t, httpPorts, ifaceSessions)
	c := newConv("10.1.0.1:40000", "10.1.0.2:8080")
	h.handshake(c)
	a := c.fromClient(fACK, "AAAAAAAAAA")
	b := c.fromClient(fACK, "BBBBBBBBBBBBBBBBBBBB")
	cc := c.fromClient(fPSH|fACK, "CCCCC")
	h.segs(b, a, cc, a, b) // b before a (a gap, then its filling), then both again
	s := h.sessions()
	if len(s) != 1 {
		t.Fatalf("sessions %+v", s)
	}
	got := s[0].Entry.Dir[0].Total
	if got.PayloadBytes != 10+20+5+10+20 || got.NewBytes != 35 || got.RetransPackets != 3 {
		t.Errorf("request totals %+v: want payload 65, new 35, 3 packets of old data", got)
	}
	if s[0].Entry.Dir[0].HighEnd != c.cseq {
		t.Errorf("high %d, want %d", s[0].Entry.Dir[0].HighEnd, c.cseq)
	}
	// The first packet seen (b) is the exchange's first; its prefix is
	// what is captured.
	_, pl := h.events()
	if len(pl) != 1 || string(pl[0].Data[:pl[0].Cap]) != string(b.payload) || pl[0].Seq != b.seq {
		t.Errorf("payloads %+v", pl)
	}
}

// TestSessionsBounded: the sessions table is an LRU of MaxSessions
// entries; the connections it forgets show in the counters (created -
// closed - entries).
func TestSessionsBounded(t *testing.T) {
	cfg := httpPorts
	cfg.MaxSessions = 64
	h := newHarness(t, cfg, ifaceSessions)
	for i := 0; i < 500; i++ {
		c := newConv(fmt.Sprintf("10.1.%d.%d:40000", i/200, i%200+1), "10.1.0.2:8080")
		h.segs(c.fromClient(fSYN, ""))
	}
	n := len(h.sessions())
	st := h.stats()
	if n == 0 || n > 64 || st.SessionsCreated != 500 || st.SessionsFull != 0 {
		t.Errorf("%d entries, stats %+v", n, st)
	}
	t.Logf("%d entries kept, %d forgotten", n, st.SessionsCreated-st.SessionsClosed-uint64(n))
}

// flowKeyOf is the sessions entry's key of c's connection on lo: its
// endpoints in canonical order (the address that compares lower as two
// native u64 first, then the port), as track_tcp makes it.
func flowKeyOf(c *conv) FlowKey {
	a, b := addr16(c.client.Addr()), addr16(c.server.Addr())
	ap, bp := c.client.Port(), c.server.Port()
	words := func(x [16]byte) [2]uint64 {
		return [2]uint64{binary.NativeEndian.Uint64(x[:8]), binary.NativeEndian.Uint64(x[8:])}
	}
	wa, wb := words(a), words(b)
	less := wa[0] < wb[0] || wa[0] == wb[0] && (wa[1] < wb[1] || wa[1] == wb[1] && ap <= bp)
	if !less {
		a, b, ap, bp = b, a, bp, ap
	}
	return FlowKey{AddrLo: a, AddrHi: b, PortLo: ap, PortHi: bp, Ifindex: loIfindex}
}

// flowFingerprint is flow_fp of bpf/tc.h: the sessions table's key.
func flowFingerprint(k *FlowKey, seed uint64) uint64 {
	var b [40]byte
	copy(b[0:16], k.AddrLo[:])
	copy(b[16:32], k.AddrHi[:])
	binary.NativeEndian.PutUint16(b[32:], k.PortLo)
	binary.NativeEndian.PutUint16(b[34:], k.PortHi)
	binary.NativeEndian.PutUint32(b[36:], k.Ifindex)
	x := seed
	for i := 0; i < len(b); i += 8 {
		x = (x ^ binary.NativeEndian.Uint64(b[i:])) * 0x9E3779B97F4A7C15
		x ^= x >> 32
	}
	return x
}

func (h *harness) seed() uint64 {
	h.t.Helper()
	var seed uint64
	if err := h.o.FpSeed.Get(&seed); err != nil {
		h.t.Fatal(err)
	}
	return seed
}

// TestSessionsFingerprint: the sessions table's key is the seeded
// fingerprint of the connection's flow key, which its entry holds; the
// seed differs from one load to the next.
func TestSessionsFingerprint(t *testing.T) {
	h := newHarness(t, httpPorts, ifaceSessions)
	convs := []*conv{
		newConv("10.1.0.1:40000", "10.1.0.2:8080"),
		newConv("10.1.0.9:40000", "10.1.0.2:8080"), // the server's address is the lower one
		newConv("[fd00::1]:40000", "[fd00::2]:8080"),
	}
	want := map[uint64]FlowKey{}
	for _, c := range convs {
		h.segs(c.fromClient(fSYN, ""))
		k := flowKeyOf(c)
		want[flowFingerprint(&k, h.seed())] = k
	}
	got := map[uint64]FlowKey{}
	var (
		fp uint64
		v  SessionEntry
	)
	it := h.o.Sessions.Iterate()
	for it.Next(&fp, &v) {
		got[fp] = v.Key
	}
	if err := it.Err(); err != nil {
		t.Fatal(err)
	}
	if !reflect.DeepEqual(got, want) {
		t.Errorf("sessions table %+v, want %+v", got, want)
	}
	if st := h.stats(); st.SessionsCreated != 3 || st.KeyCollisions != 0 {
		t.Errorf("stats %+v", st)
	}
	if h2 := newHarness(t, httpPorts, ifaceSessions); h2.seed() == h.seed() {
		t.Errorf("two loads, one seed %#x", h.seed())
	}
}

// TestKeyCollision: when another connection's entry holds a connection's
// fingerprint, the connection's packets leave that entry alone, make no
// record and are counted; once the entry is gone, the connection is
// picked up.
func TestKeyCollision(t *testing.T) {
	h := newHarness(t, httpPorts, ifaceSessions)
	c := newConv("10.1.0.1:40000", "10.1.0.2:8080")
	other := newConv("10.1.0.1:40001", "10.1.0.2:8080")
	k := flowKeyOf(c)
	fp := flowFingerprint(&k, h.seed())
	holder := SessionEntry{Key: flowKeyOf(other), State: 3<<8 | uint64(PhaseResponse), ConnFlags: ConnFromSYN}
	holder.Dir[dirResponse].Total = dc(1, 1, 0, 0, 0)
	if err := h.o.Sessions.Update(fp, &holder, ebpf.UpdateNoExist); err != nil {
		t.Fatal(err)
	}
	h.handshake(c)
	req := c.fromClient(fPSH|fACK, "GET / HTTP/1.1\r\n\r\n")
	h.segs(req)
	ex, pl := h.events()
	if len(ex) != 0 || len(pl) != 0 {
		t.Errorf("%d records, %d payloads from a colliding connection", len(ex), len(pl))
	}
	var v SessionEntry
	if err := h.o.Sessions.Lookup(fp, &v); err != nil || v != holder {
		t.Errorf("the holder's entry: %+v (%v), want %+v", v, err, holder)
	}
	if st := h.stats(); st.KeyCollisions != 4 || st.SessionsCreated != 0 {
		t.Errorf("stats %+v, want 4 collisions, no session", st)
	}

	if err := h.o.Sessions.Delete(fp); err != nil {
		t.Fatal(err)
	}
	resp := c.fromServer(fPSH|fACK, "HTTP/1.1 204 No Content\r\n\r\n")
	h.segs(resp)
	s := h.sessions()
	if len(s) != 1 || s[0].Entry.Key != k || s[0].Client != c.client || s[0].Entry.Dir[dirResponse].Total.PayloadBytes != uint64(len(resp.payload)) {
		t.Errorf("sessions after the holder left: %+v", s)
	}
}

// TestFastOpen: data on the SYN (TCP Fast Open) is the stream's first
// bytes and starts exchange 0.
func TestFastOpen(t *testing.T) {
	h := newHarness(t, httpPorts, ifaceSessions)
	c := newConv("10.1.0.1:40000", "10.1.0.2:8080")
	req := "GET / HTTP/1.1\r\n\r\n"
	syn := c.fromClient(fSYN, req)
	synack := c.fromServer(fSYN|fACK, "")
	resp := c.fromServer(fPSH|fACK, "HTTP/1.1 204 No Content\r\n\r\n")
	fin1, fin2 := c.fromClient(fFIN|fACK, ""), c.fromServer(fFIN|fACK, "")
	h.segs(syn, synack, resp, fin1, fin2)
	ex, pl := h.events()
	if len(ex) != 1 || len(pl) != 2 {
		t.Fatalf("%d records, %d payloads", len(ex), len(pl))
	}
	checkExchange(t, ex[0], c, 0, EndFIN, PhaseResponse,
		dc(sum(syn, fin1), 2, uint64(len(req)), uint64(len(req)), 0),
		dc(sum(synack, resp, fin2), 3, uint64(len(resp.payload)), uint64(len(resp.payload)), 0),
		fSYN|fACK|fFIN, fSYN|fACK|fPSH|fFIN)
	checkPayload(t, pl[0], c, 0, dirRequest, req, uint32(len(req)))
	if pl[0].Seq != c.clientISN+1 {
		t.Errorf("payload seq %d, want %d", pl[0].Seq, c.clientISN+1)
	}
}

// TestPipelinedMarks: on a connection whose first request begins with an
// HTTP method, every later packet of an exchange that begins a request
// (request direction) or a status line (response direction) is captured
// too, with its mark number, the exchange's counts before it and the other
// direction's new bytes; packets inside messages are not; the marks start
// again with each exchange; a connection that does not speak HTTP gets
// none; at most MAX_MARKS (64) per direction of an exchange.
func TestPipelinedMarks(t *testing.T) {
	h := newHarness(t, httpPorts, ifaceSessions)
	c := newConv("10.1.0.1:40000", "10.1.0.2:8080")
	syn, synack, ack := h.handshake(c)
	r12 := c.fromClient(fPSH|fACK, "GET /a HTTP/1.1\r\n\r\nGET /b HTTP/1.1\r\n\r\n")
	r3 := c.fromClient(fACK, "POST /c HTTP/1.1\r\nContent-Length: 12\r\n\r\n")
	body := c.fromClient(fPSH|fACK, "GET 12 bytes") // a body that looks like a request, mid-message: its start is a mark all the same
	sack := c.fromServer(fACK, "")
	s1 := c.fromServer(fACK, "HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n")
	s1body := c.fromServer(fACK, "0123456789")
	s23 := c.fromServer(fPSH|fACK, "HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
	cack := c.fromClient(fACK, "")
	r4 := c.fromClient(fPSH|fACK, "GET /d HTTP/1.1\r\n\r\n")
	s4 := c.fromServer(fPSH|fACK, "HTTP/1.1 204 No Content\r\n\r\n")
	h.segs(r12, r3, body, sack, s1, s1body, s23, cack, r4, s4)
	ex, pl := h.events()
	if len(ex) != 1 || len(pl) != 7 {
		t.Fatalf("%d records and %d payloads, want 1 and 7", len(ex), len(pl))
	}
	n := func(ss ...seg) uint64 {
		var x uint64
		for _, s := range ss {
			x += uint64(len(s.payload))
		}
		return x
	}
	type want struct {
		s       seg
		index   uint32
		dir     uint8
		mark    uint16
		at      DirCounters
		peerNew uint64
	}
	for i, w := range []want{
		{r12, 0, dirRequest, 0, dc(sum(syn, ack), 2, 0, 0, 0), 0},
		{r3, 0, dirRequest, 1, dc(sum(syn, ack, r12), 3, n(r12), n(r12), 0), 0},
		{body, 0, dirRequest, 2, dc(sum(syn, ack, r12, r3), 4, n(r12, r3), n(r12, r3), 0), 0},
		{s1, 0, dirResponse, 0, dc(sum(synack, sack), 2, 0, 0, 0), n(r12, r3, body)},
		{s23, 0, dirResponse, 1, dc(sum(synack, sack, s1, s1body), 4, n(s1, s1body), n(s1, s1body), 0), n(r12, r3, body)},
		{r4, 1, dirRequest, 0, dc(0, 0, 0, 0, 0), 0},
		{s4, 1, dirResponse, 0, dc(0, 0, 0, 0, 0), n(r4)},
	} {
		p := pl[i]
		checkPayload(t, p, c, w.index, w.dir, string(w.s.payload), uint32(len(w.s.payload)))
		if p.Mark != w.mark || p.At != w.at || p.PeerNewBytes != w.peerNew || p.Seq != w.s.seq {
			t.Errorf("payload %d: mark %d at %+v peer %d seq %d, want %d %+v %d %d", i, p.Mark, p.At, p.PeerNewBytes, p.Seq,
				w.mark, w.at, w.peerNew, w.s.seq)
		}
	}
	checkExchange(t, ex[0], c, 0, EndNextRequest, PhaseResponse,
		dc(sum(syn, ack, r12, r3, body, cack), 6, n(r12, r3, body), n(r12, r3, body), 0),
		dc(sum(synack, sack, s1, s1body, s23), 5, n(s1, s1body, s23), n(s1, s1body, s23), 0),
		fSYN|fACK|fPSH, fSYN|fACK|fPSH)
	if ex[0].ConnFlags&ConnHTTP == 0 {
		t.Errorf("flags %#x: not HTTP", ex[0].ConnFlags)
	}

	// Not HTTP: no marks.
	d := newConv("10.1.0.1:40001", "10.1.0.2:8080")
	h.handshake(d)
	h.segs(d.fromClient(fACK, "hello, not HTTP"), d.fromClient(fPSH|fACK, "GET / HTTP/1.1\r\n\r\n"))
	if _, pl := h.events(); len(pl) != 1 {
		t.Errorf("%d payloads on a connection that is not HTTP, want 1", len(pl))
	}

	// The bound.
	e := newConv("10.1.0.1:40002", "10.1.0.2:8080")
	h.handshake(e)
	for range 1 + 70 {
		h.segs(e.fromClient(fACK, "GET / HTTP/1.1\r\n\r\n"))
	}
	_, pl = h.events()
	if len(pl) != 1+64 || pl[64].Mark != 64 || h.stats().MarkLimit != 6 {
		t.Errorf("%d payloads (last mark %d), stats %+v; want 65, 64 and 6 over the limit", len(pl), pl[len(pl)-1].Mark, h.stats())
	}
}

// TestPortMarks: the ports the tables name are marked in port_marks (an
// ignored port is not; an egress match of any port marks port 0); packets
// of unmarked ports make no session; a port removed from the table stays
// marked, so its connection already traced goes on, while a new one is not
// traced.
func TestPortMarks(t *testing.T) {
	cfg := Config{Ports: []Port{{Port: 8080, Protocol: "http"}}, IgnorePorts: []uint16{9},
		Egress: []EgressMatch{{Prefix: netip.MustParsePrefix("203.0.113.0/24"), Port: 443, Protocol: "tls"}}}
	h := newHarness(t, cfg, ifaceSessions)
	marked := func() []uint16 {
		t.Helper()
		p, err := h.o.markedPorts()
		if err != nil {
			t.Fatal(err)
		}
		return p
	}
	if got := marked(); !slices.Equal(got, []uint16{443, 8080}) {
		t.Fatalf("marked ports %v, want [443 8080]", got)
	}
	other := newConv("10.1.0.1:40000", "10.1.0.2:5432")
	h.handshake(other)
	h.segs(other.fromClient(fPSH|fACK, "query"), other.fromServer(fPSH|fACK, "rows"))
	web := newConv("10.1.0.1:40001", "10.1.0.2:8080")
	h.handshake(web)
	req := web.fromClient(fPSH|fACK, "GET / HTTP/1.1\r\n\r\n")
	h.segs(req)
	s := h.sessions()
	if len(s) != 1 || s[0].Server != web.server {
		t.Fatalf("sessions %+v, want the port 8080 connection only", s)
	}
	if st := h.stats(); st.SessionsCreated != 1 || st.HeaderFaults != 0 {
		t.Errorf("stats %+v", st)
	}

	if err := h.o.deletePort(0, 8080); err != nil {
		t.Fatal(err)
	}
	if got := marked(); !slices.Equal(got, []uint16{443, 8080}) {
		t.Fatalf("marked ports after removing 8080: %v", got)
	}
	resp := web.fromServer(fPSH|fACK, "HTTP/1.1 200 OK\r\n\r\n")
	h.segs(resp)
	late := newConv("10.1.0.1:40002", "10.1.0.2:8080")
	h.handshake(late)
	s = h.sessions()
	if len(s) != 1 || s[0].Entry.Dir[1].Total.PayloadBytes != uint64(len(resp.payload)) || s[0].Phase() != PhaseResponse {
		t.Fatalf("after removing port 8080: sessions %+v, want the traced connection going on alone", s)
	}

	// An egress match of any port: every port may be traced.
	if err := h.o.setEgress(netip.MustParsePrefix("198.51.100.0/24"), 0, mustProtocolID(t, "http")); err != nil {
		t.Fatal(err)
	}
	if got := marked(); !slices.Equal(got, []uint16{0, 443, 8080}) {
		t.Fatalf("marked ports with an any-port match: %v", got)
	}
	ext := newConv("10.1.0.1:40003", "198.51.100.9:5432")
	h.segs(ext.fromClient(fSYN, ""))
	if s = h.sessions(); len(s) != 2 || s[1].Server != ext.server {
		t.Fatalf("sessions %+v, want the any-port egress connection too", s)
	}
}

func mustProtocolID(t *testing.T, name string) uint16 {
	t.Helper()
	id, err := ProtocolID(name)
	if err != nil {
		t.Fatal(err)
	}
	return id
}

// TestInterfaceIndexes checks the ifaces tables: interfaces below
// ifacesArray are found in the array, higher ones in the hash, an
// interface in neither is not traced, and a cleared one is traced no
// more (in either table). The packets run on veths of chosen
// indexes in a new network namespace of the test's thread (netlink: the
// VM guests have no ip netns).
func TestInterfaceIndexes(t *testing.T) {
	h := newHarness(t, httpPorts, 0)
	runtime.LockOSThread()
	orig, err := netns.Get()
	if err != nil {
		runtime.UnlockOSThread()
		t.Fatal(err)
	}
	defer orig.Close()
	ns, err := netns.New() // the thread is in it from here
	if err != nil {
		runtime.UnlockOSThread()
		t.Fatal(err)
	}
	defer ns.Close()
	defer func() {
		// A thread that cannot go back stays locked and dies with
		// the test's goroutine.
		if err := netns.Set(orig); err != nil {
			t.Errorf("restoring the network namespace: %v", err)
			return
		}
		runtime.UnlockOSThread()
	}()
	low, high, other := uint32(ifacesArray-1), uint32(ifacesArray), uint32(ifacesArray+7)
	for _, ix := range []uint32{low, high, other} {
		// A veth (the VM kernels have no dummy or bridge built in);
		// its peer gets a low index of its own.
		v := &netlink.Veth{LinkAttrs: netlink.LinkAttrs{Name: fmt.Sprintf("x%d", ix), Index: int(ix)},
			PeerName: fmt.Sprintf("y%d", ix)}
		if err := netlink.LinkAdd(v); err != nil {
			t.Fatalf("adding %s with index %d: %v", v.Name, ix, err)
		}
	}
	for _, ix := range []uint32{low, high} {
		if err := h.o.setInterface(int(ix), ifaceSessions); err != nil {
			t.Fatal(err)
		}
	}
	// One connection per interface and round, each a handshake and a
	// request.
	port := 40000
	open := func(ix uint32) {
		t.Helper()
		h.ifindex = ix
		c := newConv(fmt.Sprintf("10.1.0.1:%d", port), "10.1.0.2:8080")
		h.handshake(c)
		h.segs(c.fromClient(fPSH|fACK, "GET / HTTP/1.1\r\n\r\n"))
		port++
	}
	byIfindex := func() map[int]int {
		t.Helper()
		n := map[int]int{}
		for _, s := range h.sessions() {
			n[s.Ifindex]++
		}
		return n
	}
	for _, ix := range []uint32{low, high, other} {
		open(ix)
	}
	if got, want := byIfindex(), map[int]int{int(low): 1, int(high): 1}; !maps.Equal(got, want) {
		t.Fatalf("sessions by interface %v, want %v", got, want)
	}
	for _, ix := range []uint32{low, high} {
		if err := h.o.clearInterface(int(ix)); err != nil {
			t.Fatal(err)
		}
	}
	for _, ix := range []uint32{low, high, other} {
		open(ix)
	}
	if got, want := byIfindex(), map[int]int{int(low): 1, int(high): 1}; !maps.Equal(got, want) {
		t.Fatalf("sessions by interface after clearing %v, want %v (nothing new)", got, want)
	}
	if err := h.o.clearInterface(int(other)); err != nil {
		t.Errorf("clearing an interface never set: %v", err)
	}
	if err := h.o.setInterface(0, ifaceSessions); err == nil {
		t.Errorf("interface index 0 accepted")
	}
}

// TestConcurrentStream: one direction's packets run on two CPUs at once,
// as a flow's packets do when they are spread over queues or a packet is
// retransmitted while its first copy is still in flight. Two threads run
// the same stream, every packet of it, at the same time. The highest
// sequence is raised by compare-and-exchange, retried when another CPU
// moved it first, so exactly one copy of each packet advances the stream
// and the other is old data: the new bytes are the stream's, and the
// packets of old data exactly half. (Whether a compare-and-exchange lost
// in a run is not observable.)
func TestConcurrentStream(t *testing.T) {
	h := newHarness(t, httpPorts, ifaceSessions)
	c := newConv("10.1.0.1:40000", "10.1.0.2:8080")
	h.handshake(c)
	const n, size = 20000, 10
	frames := make([][]byte, n)
	for i := range frames {
		frames[i] = c.fromClient(fACK, strings.Repeat("x", size)).frame()
	}
	var wg sync.WaitGroup
	start := make(chan struct{})
	for g := 0; g < 2; g++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			runtime.LockOSThread()
			defer runtime.UnlockOSThread()
			<-start
			for _, f := range frames {
				if _, err := h.o.Ingress.Run(&ebpf.RunOptions{Data: f}); err != nil {
					t.Errorf("prog.Run: %v", err)
					return
				}
			}
		}()
	}
	close(start)
	wg.Wait()
	s := h.sessions()
	if len(s) != 1 {
		t.Fatalf("sessions %+v", s)
	}
	got := s[0].Entry.Dir[0].Total
	if got.NewBytes != n*size || got.PayloadBytes != 2*n*size || got.Packets != 2*n+2 || got.RetransPackets != n ||
		s[0].Entry.Dir[0].HighEnd != c.cseq {
		t.Errorf("request totals %+v, high %d: want new bytes %d, payload bytes %d, %d packets, %d of old data, high %d",
			got, s[0].Entry.Dir[0].HighEnd, n*size, 2*n*size, 2*n+2, n, c.cseq)
	}
	if st := h.stats(); st.StateRaces != 0 {
		t.Errorf("stats %+v", st)
	}
}
